//! The EC2 records the daemon keeps of its volumes and snapshots (EC2 `Volume` and `Snapshot`
//! shapes, stored as JSON in RocksDB and beside the chunks in the backend).

use serde::{Deserialize, Serialize};

use crate::ids::{SnapshotId, VolumeId};

/// Lifecycle state of a volume (EC2 `VolumeState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeStateName {
    /// Being created.
    Creating,
    /// Ready, not attached.
    Available,
    /// Attached or mounted.
    InUse,
    /// Being deleted.
    Deleting,
    /// Gone.
    Deleted,
    /// Failed.
    Error,
}

/// A tag (EC2 `Tag`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    /// Key.
    #[serde(rename = "Key")]
    pub key: String,
    /// Value.
    #[serde(rename = "Value")]
    pub value: String,
}

/// An attachment (EC2 `VolumeAttachment`), persisted with the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Instance id.
    pub instance_id: String,
    /// Device name, e.g. `/dev/sdf`.
    pub device: String,
    /// `attached` (persisted attachments are attached).
    pub state: String,
    /// RFC 3339.
    pub attach_time: String,
    /// EC2 `DeleteOnTermination`.
    pub delete_on_termination: bool,
}

/// A mount (Hive's `ebs.mount`): the grant to serve a volume or snapshot over NBD, until the
/// matching unmount. Persisted with the record, so a restarted daemon serves the same export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The export name's secret: [`MOUNT_SECRET_HEX`] lowercase hex digits (128 random bits).
    /// The export is `ID-SECRET`, unless the daemon runs with open exports (`ID`).
    pub secret: String,
    /// The node it was mounted through (`ebs.NODE.mount`, or the daemon's `--node`); empty when
    /// neither named one.
    #[serde(default)]
    pub node: String,
    /// Hive's `DeviceName`.
    #[serde(default)]
    pub device: String,
    /// Hive's `DeleteOnTermination` (reported in the volume's `Attachments`).
    #[serde(default)]
    pub delete_on_termination: bool,
    /// RFC 3339 time of the mount.
    #[serde(default)]
    pub mount_time: String,
}

/// Hex digits of a [`Mount::secret`]: 32, i.e. 128 bits.
pub const MOUNT_SECRET_HEX: usize = 32;

impl Mount {
    /// A new mount with a fresh random secret.
    pub fn new(node: String, device: String, delete_on_termination: bool, time: String) -> Self {
        use rand::Rng;
        let bits: u128 = rand::thread_rng().gen();
        Self {
            secret: format!("{bits:0width$x}", width = MOUNT_SECRET_HEX),
            node,
            device,
            delete_on_termination,
            mount_time: time,
        }
    }

    /// Why `name`, mounted with this mount, may not be mounted or unmounted through `node`
    /// (`ebs.NODE.mount`, `ebs.NODE.unmount`): it was mounted through another. `None` when
    /// `node` is this mount's or not named (`ebs.mount`, `ebs.unmount`).
    pub fn other_node(&self, name: &str, node: Option<&str>) -> Option<String> {
        node.filter(|n| *n != self.node)
            .map(|n| format!("{name} is mounted on node {:?}, not {n:?}", self.node))
    }

    /// Whether `secret` is this mount's, compared in time independent of where they differ.
    pub fn secret_matches(&self, secret: &str) -> bool {
        let (a, b) = (self.secret.as_bytes(), secret.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The NBD export name of volume or snapshot `id` while mounted with `mount`: `ID-SECRET`
/// (e.g. `vol-0123456789abcdef0-` and 32 hex digits), or the bare `ID` with open exports.
pub fn export_name(id: &str, mount: &Mount, open_exports: bool) -> String {
    if open_exports {
        id.to_owned()
    } else {
        format!("{id}-{}", mount.secret)
    }
}

/// Splits an export name into the id and the secret it carries: `(ID, Some(SECRET))` when the
/// part after the last `-` is [`MOUNT_SECRET_HEX`] lowercase hex digits, else `(name, None)`.
pub fn split_export_name(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('-') {
        Some((id, secret))
            if secret.len() == MOUNT_SECRET_HEX
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            (id, Some(secret))
        }
        _ => (name, None),
    }
}

/// Everything persisted about a volume besides its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Id.
    pub volume_id: VolumeId,
    /// Human name (optional, may be empty).
    #[serde(default)]
    pub name: String,
    /// Size in bytes (a multiple of 4096).
    pub size_bytes: u64,
    /// RFC 3339 creation time.
    pub create_time: String,
    /// Lifecycle state.
    pub state: VolumeStateName,
    /// EC2 `VolumeType` (default `gp3`).
    #[serde(default)]
    pub volume_type: String,
    /// EC2 `Iops`.
    #[serde(default)]
    pub iops: u32,
    /// EC2 `AvailabilityZone`.
    #[serde(default)]
    pub availability_zone: String,
    /// EC2 `SnapshotId` the volume was created from (empty if none).
    #[serde(default)]
    pub snapshot_id: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// EC2 `ClientToken` used to create it (idempotency).
    #[serde(default)]
    pub client_token: String,
    /// The mount while the volume is mounted (exported over NBD after `ebs.mount`); `None`
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<Mount>,
    /// `mounted` of records written before mounts had a secret: read, never written.
    /// [`crate::Engine::open`] turns a `true` into a [`Mount`] with a new secret.
    #[serde(default, rename = "mounted", skip_serializing)]
    pub legacy_mounted: bool,
    /// EC2 `MultiAttachEnabled`: the volume may be attached to several instances at once
    /// (EBS Multi-Attach; io1 and io2 volumes only).
    #[serde(default)]
    pub multi_attach_enabled: bool,
}

/// Lifecycle state of a snapshot (EC2 `SnapshotState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotStateName {
    /// Its map is frozen locally; the copy in the backend is being written.
    Pending,
    /// Durable in the backend.
    Completed,
    /// The backend copy could not be written.
    Error,
}

/// Everything persisted about a snapshot besides its map (`n SNAP`, and `SNAPID/snapshot.json`
/// in the backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Id.
    pub snapshot_id: SnapshotId,
    /// The volume it was taken of.
    pub volume_id: VolumeId,
    /// That volume's size in bytes at the time.
    pub volume_size_bytes: u64,
    /// Lifecycle state.
    pub state: SnapshotStateName,
    /// RFC 3339 time it was taken.
    pub start_time: String,
    /// Percent of the backend copy written (0..=100).
    pub progress: u8,
    /// EC2 `Description`.
    #[serde(default)]
    pub description: String,
    /// Every write of the volume up to this sequence number is in the snapshot; none after.
    pub seq: u64,
    /// The mount while the snapshot is exported read-only over NBD (`ebs.mount` with the
    /// SnapshotId as `Name`); local to this daemon, never in the backend copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<Mount>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_name_splits_into_its_id_and_secret() {
        let m = Mount::new(String::new(), String::new(), false, String::new());
        assert_eq!(m.secret.len(), MOUNT_SECRET_HEX);
        let name = export_name("vol-0123456789abcdef0", &m, false);
        assert_eq!(
            split_export_name(&name),
            ("vol-0123456789abcdef0", Some(m.secret.as_str()))
        );
        assert!(m.secret_matches(&m.secret));
        assert!(!m.secret_matches(&"0".repeat(MOUNT_SECRET_HEX)) || m.secret == "0".repeat(32));
        assert!(!m.secret_matches(""));
        // A bare id carries no secret, nor does a name whose tail is not 32 hex digits.
        assert_eq!(
            split_export_name("vol-0123456789abcdef0"),
            ("vol-0123456789abcdef0", None)
        );
        let upper = format!("vol-0123456789abcdef0-{}", "A".repeat(MOUNT_SECRET_HEX));
        assert_eq!(split_export_name(&upper), (upper.as_str(), None));
        assert_eq!(
            export_name("snap-0123456789abcdef0", &m, true),
            "snap-0123456789abcdef0"
        );
        // Two mounts never share a secret.
        let other = Mount::new(String::new(), String::new(), false, String::new());
        assert_ne!(m.secret, other.secret);
    }
}

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
    /// True while mounted (exported for a VM via `ebs.mount`).
    #[serde(default)]
    pub mounted: bool,
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
}

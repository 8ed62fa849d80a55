//! One handler per `ebs.*` subject, over the engine. Transport-free: [`Control::handle`] maps a
//! subject and body to a reply body (and, for Hive's mount/unmount, a broadcast).

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::*;
use super::cluster::{Answer, AtOwner, Purpose};
use crate::engine::{now_rfc3339, Engine};
use crate::ids::{SnapshotId, VolumeId};
use crate::records::{self, SnapshotRecord, SnapshotStateName, VolumeRecord, VolumeStateName};
use crate::volume::VolumeError;

const GIB: u64 = 1 << 30;
/// EC2's largest `Size`, GiB.
const MAX_SIZE_GIB: i64 = 16384;
/// Instances a Multi-Attach volume can be attached to at once (EBS's limit).
const MAX_MULTI_ATTACH: usize = 16;

/// The NATS header on a request one node forwards to a volume's owner (cluster mode): its
/// value is the forwarding node's name.
pub const FORWARDED_HEADER: &str = "Vblock-Forwarded-By";

/// What handling a request produced.
#[derive(Debug)]
pub struct Handled {
    /// Reply body.
    pub reply: Vec<u8>,
    /// `(subject, body)` to publish as well (`ebs.mount.response`, `ebs.unmount.response`).
    pub broadcast: Option<(String, Vec<u8>)>,
    /// `"ok"`, the EC2 error code, or `"error"` for Hive replies that carry an `Error` text
    /// (the `result` label of `vblock_nats_requests_total`).
    pub result: String,
}

fn hive_result(error: &str) -> String {
    if error.is_empty() { "ok" } else { "error" }.to_owned()
}

/// The control-plane service.
pub struct Control {
    pub(super) engine: Arc<Engine>,
    pub(super) nbd_uri_base: String,
    /// This daemon's `--node` name: the node of a mount through `ebs.mount`.
    pub(super) node: Option<String>,
    /// Export names are bare ids (`--nbd-open-exports`), without the mount's secret.
    pub(super) open_exports: bool,
    /// Serialises the read-modify-write of one volume's records, and its lease claims and
    /// takeovers on this node ([`Locks`]).
    pub(super) lock: Locks,
    /// Cluster mode (`--cluster`): mounts go through volume leases.
    pub(super) cluster: Option<Arc<super::cluster::ClusterMode>>,
}

/// Locks by name: a VolumeId (the read-modify-write of that volume's records, its lease
/// claims and takeovers on this node) or `token/TOKEN` (creates with that ClientToken).
/// Requests for other volumes go on meanwhile: a takeover can take seconds, and a node that
/// dies hands all its volumes to the survivors at once.
#[derive(Default)]
pub(super) struct Locks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    /// Waits for lock `name` and holds it until the guard is dropped.
    pub(super) async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Locks nobody holds or waits for (only this table refers to them) go.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(name.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

pub(super) fn body<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|e| {
        format!(r#"{{"Error":{{"Code":"InternalError","Message":"{e}"}}}}"#).into_bytes()
    })
}

pub(super) fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    // An empty body is an empty object (DescribeVolumes with no arguments).
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| ApiError::from_json(&e))
}

/// The EC2 error code of each engine error (EC2 API reference, "Error codes"): the one place
/// the control plane maps them.
impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::VolumeNotFound(id) => ApiError::volume_not_found(id.as_str()),
            VolumeError::SnapshotNotFound(id) => ApiError::snapshot_not_found(id.as_str()),
            VolumeError::InvalidArgument(m) => ApiError::invalid(m),
            VolumeError::OutOfRange { .. } | VolumeError::TooLarge { .. } => {
                ApiError::invalid(e.to_string())
            }
            VolumeError::IncorrectState(m) => ApiError::new("IncorrectState", m),
            VolumeError::InUse(m) => ApiError::new("VolumeInUse", m),
            VolumeError::ReadOnly => ApiError::new("IncorrectState", e.to_string()),
            VolumeError::Wal(_)
            | VolumeError::Meta(_)
            | VolumeError::Backend(_)
            | VolumeError::Chunk { .. }
            | VolumeError::Closed
            | VolumeError::LeaseLost(_)
            | VolumeError::Failed(_)
            | VolumeError::Corrupt { .. }
            | VolumeError::Io { .. }
            | VolumeError::Shipping(_)
            | VolumeError::Internal(_) => ApiError::internal(e.to_string()),
        }
    }
}

fn parse_snapshot_id(s: &str) -> Result<SnapshotId, ApiError> {
    SnapshotId::parse(s)
        .map_err(|_| ApiError::snapshot_not_found(&s.chars().take(64).collect::<String>()))
}

fn snapshot_state(s: SnapshotStateName) -> &'static str {
    match s {
        SnapshotStateName::Pending => "pending",
        SnapshotStateName::Completed => "completed",
        SnapshotStateName::Error => "error",
    }
}

/// EC2 view of a snapshot record.
pub fn snapshot_to_api(r: &SnapshotRecord) -> Snapshot {
    Snapshot {
        snapshot_id: r.snapshot_id.to_string(),
        volume_id: r.volume_id.to_string(),
        volume_size: r.volume_size_bytes.div_ceil(GIB),
        state: snapshot_state(r.state).into(),
        start_time: r.start_time.clone(),
        progress: format!("{}%", r.progress),
        description: r.description.clone(),
    }
}

fn parse_volume_id(s: &str) -> Result<VolumeId, ApiError> {
    VolumeId::parse(s).map_err(|_| {
        ApiError::new(
            "InvalidVolume.NotFound",
            format!(
                "The volume '{}' does not exist.",
                s.chars().take(64).collect::<String>()
            ),
        )
    })
}

/// EC2 view of a record.
pub fn to_api(r: &VolumeRecord) -> Volume {
    let state = match r.state {
        VolumeStateName::Available if !r.attachments.is_empty() || r.mount.is_some() => "in-use",
        VolumeStateName::Available => "available",
        VolumeStateName::InUse => "in-use",
        VolumeStateName::Creating => "creating",
        VolumeStateName::Deleting => "deleting",
        VolumeStateName::Deleted => "deleted",
        VolumeStateName::Error => "error",
    };
    Volume {
        volume_id: r.volume_id.to_string(),
        size: r.size_bytes.div_ceil(GIB),
        snapshot_id: r.snapshot_id.clone(),
        availability_zone: r.availability_zone.clone(),
        state: state.into(),
        create_time: r.create_time.clone(),
        volume_type: r.volume_type.clone(),
        iops: r.iops,
        multi_attach_enabled: r.multi_attach_enabled,
        attachments: r
            .attachments
            .iter()
            .map(|a| attachment(r, a, &a.state))
            .chain(r.mount.as_ref().map(|m| mount_attachment(r, m)))
            .collect(),
        tags: r
            .tags
            .iter()
            .map(|t| Tag {
                key: t.key.clone(),
                value: t.value.clone(),
            })
            .collect(),
    }
}

fn attachment(r: &VolumeRecord, a: &records::Attachment, state: &str) -> VolumeAttachment {
    VolumeAttachment {
        volume_id: r.volume_id.to_string(),
        instance_id: a.instance_id.clone(),
        device: a.device.clone(),
        state: state.into(),
        attach_time: a.attach_time.clone(),
        delete_on_termination: a.delete_on_termination,
    }
}

/// A mount, reported as an attachment: Hive's mount carries no instance id, so `InstanceId`
/// is empty; `Device` and `DeleteOnTermination` are the mount's.
fn mount_attachment(r: &VolumeRecord, m: &records::Mount) -> VolumeAttachment {
    VolumeAttachment {
        volume_id: r.volume_id.to_string(),
        instance_id: String::new(),
        device: m.device.clone(),
        state: "attached".into(),
        attach_time: m.mount_time.clone(),
        delete_on_termination: m.delete_on_termination,
    }
}

/// Refuses a volume that is being created or deleted (cluster mode's catalog shows both).
pub(super) fn usable(r: &VolumeRecord) -> Result<(), VolumeError> {
    match r.state {
        VolumeStateName::Creating | VolumeStateName::Deleting | VolumeStateName::Deleted => Err(
            VolumeError::IncorrectState(format!("volume {} is {}", r.volume_id, to_api(r).state)),
        ),
        _ => Ok(()),
    }
}

fn size_gib(size: i64) -> Result<u64, ApiError> {
    if !(1..=MAX_SIZE_GIB).contains(&size) {
        return Err(ApiError::invalid(format!(
            "Size {size} GiB is outside 1..{MAX_SIZE_GIB}"
        )));
    }
    Ok(size as u64)
}

impl Control {
    /// Deletes volume `id` unless it is attached or mounted (the caller holds its `self.lock`):
    /// `ebs.deletevolume` and Hive's `ebs.delete`. In cluster mode through any node that can
    /// take the volume's lease (docs/design/cluster.md, "Catalog").
    ///
    /// Errors: [`VolumeError::VolumeNotFound`], [`VolumeError::InUse`] when attached, mounted
    /// or owned by another node; engine and catalog errors.
    pub(super) async fn delete_unused_volume(&self, id: &VolumeId) -> Result<(), VolumeError> {
        let (rec, revision) = self.volume_at(id).await?;
        if rec.state == VolumeStateName::Creating {
            if let Some(cluster) = &self.cluster {
                let key = super::cluster::creating_key(id);
                if cluster.abandoned(&key, revision, &rec.create_time) {
                    return self.delete_abandoned_clone(cluster, &rec, revision).await;
                }
            }
            usable(&rec)?;
        }
        if !rec.attachments.is_empty() || rec.mount.is_some() {
            return Err(VolumeError::InUse(format!("{id} is attached or mounted")));
        }
        match &self.cluster {
            Some(cluster) => self.cluster_delete(cluster, rec, revision).await?,
            None => self.engine.delete_volume(id).await?,
        }
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// A control plane for `engine`; mount URIs are `nbd_uri_base/VolumeId`, the base being
    /// `nbd://host:port` (or `nbds://host:port` when the NBD server requires TLS).
    pub fn new(engine: Arc<Engine>, nbd_uri_base: String) -> Self {
        Self {
            engine,
            nbd_uri_base,
            node: None,
            open_exports: false,
            lock: Locks::default(),
            cluster: None,
        }
    }

    /// Cluster mode (`--cluster`): a mount makes this node the volume's owner through its
    /// lease, or answers the owner's URI (docs/design/cluster.md).
    pub fn with_cluster(mut self, cluster: Option<Arc<super::cluster::ClusterMode>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Names this daemon's node (`--node`): mounts through `ebs.mount` record it.
    pub fn with_node(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    /// Mount URIs name exports by the bare id (`--nbd-open-exports`, for development) instead
    /// of `ID-SECRET`.
    pub fn with_open_exports(mut self, open: bool) -> Self {
        self.open_exports = open;
        self
    }

    /// Handles `subject` (the operation is the last subject token: `ebs.createvolume`,
    /// `ebs.NODE.mount`, ...) with JSON `payload`.
    pub async fn handle(&self, subject: &str, payload: &[u8]) -> Handled {
        self.handle_request(subject, payload, false).await
    }

    /// [`Control::handle`]; `forwarded`: another node sent the request here (cluster mode,
    /// header [`FORWARDED_HEADER`]) because this node owns the volume: it is not forwarded
    /// again.
    pub async fn handle_request(&self, subject: &str, payload: &[u8], forwarded: bool) -> Handled {
        let op = subject.rsplit('.').next().unwrap_or("");
        // `ebs.NODE.mount` / `ebs.NODE.unmount` (and cluster mode's `vblock.NODE.OP`) name
        // the node.
        let node = subject
            .strip_prefix("ebs.")
            .or_else(|| subject.strip_prefix("vblock."))
            .and_then(|rest| rest.strip_suffix(op))
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|n| !n.is_empty());
        let plain = |r: Result<Vec<u8>, ApiError>| match r {
            Ok(reply) => Handled {
                reply,
                broadcast: None,
                result: "ok".into(),
            },
            Err(e) => Handled {
                result: e.code.clone(),
                reply: body(&ErrorReply { error: e }),
                broadcast: None,
            },
        };
        match op {
            "createvolume" => plain(self.create_volume(payload).await),
            "describevolumes" => plain(self.describe_volumes(payload).await),
            "attachvolume" => plain(self.attach_volume(payload).await),
            "detachvolume" => plain(self.detach_volume(payload, forwarded).await),
            "deletevolume" => plain(self.delete_volume(payload).await),
            "modifyvolume" => plain(self.modify_volume(payload).await),
            "createsnapshot" => plain(self.create_snapshot(payload, forwarded).await),
            "describesnapshots" => plain(self.describe_snapshots(payload).await),
            "deletesnapshot" => plain(self.delete_snapshot(payload).await),
            "describevolumespace" => plain(self.describe_volume_space(payload, forwarded).await),
            "mount" => {
                let r = self.mount(node, payload).await;
                let b = body(&r);
                Handled {
                    reply: b.clone(),
                    broadcast: Some(("ebs.mount.response".into(), b)),
                    result: hive_result(&r.error),
                }
            }
            "unmount" => {
                // `vblock.NODE.unmount` routes the request to NODE (a forward, or a caller
                // picking a node); only `ebs.NODE.unmount` says which node's mount it ends.
                let named = node.filter(|_| subject.starts_with("ebs."));
                let r = self.unmount(named, payload, forwarded).await;
                let b = body(&r);
                Handled {
                    reply: b.clone(),
                    // A forwarded unmount is broadcast by the node it was sent to.
                    broadcast: (!forwarded).then(|| ("ebs.unmount.response".into(), b)),
                    result: hive_result(&r.error),
                }
            }
            "delete" => {
                let r = self.hive_delete(payload).await;
                Handled {
                    reply: body(&r),
                    broadcast: None,
                    result: hive_result(&r.error),
                }
            }
            _ => plain(Err(ApiError::invalid(format!("unknown subject {subject}")))),
        }
    }

    async fn record(&self, id: &VolumeId) -> Result<VolumeRecord, ApiError> {
        Ok(self.volume_at(id).await?.0)
    }

    async fn create_volume(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: CreateVolumeRequest = parse(payload)?;
        let snapshot = match req.snapshot_id.as_deref() {
            None | Some("") => None,
            Some(s) => Some(self.snapshot_record(&parse_snapshot_id(s)?).await?),
        };
        let gib = match (req.size, &snapshot) {
            (Some(size), _) => size_gib(size)?,
            (None, Some(s)) => s.volume_size_bytes.div_ceil(GIB),
            (None, None) => return Err(ApiError::missing("missing field `Size`")),
        };
        if let Some(s) = &snapshot {
            if gib * GIB < s.volume_size_bytes {
                return Err(ApiError::invalid(format!(
                    "Size {gib} GiB is smaller than snapshot {} ({} GiB)",
                    s.snapshot_id,
                    s.volume_size_bytes.div_ceil(GIB)
                )));
            }
            if s.state != SnapshotStateName::Completed {
                return Err(ApiError::new(
                    "IncorrectState",
                    format!("snapshot {} is {}", s.snapshot_id, snapshot_state(s.state)),
                ));
            }
        }
        let token = req.client_token.clone().unwrap_or_default();
        // Retries with one ClientToken wait for each other (a new volume has no other lock).
        let _g = match token.as_str() {
            "" => None,
            t => Some(self.lock.lock(&format!("token/{t}")).await),
        };
        if !token.is_empty() {
            let existing = self.volume_records().await?;
            if let Some(r) = existing.iter().find(|r| r.client_token == token) {
                if r.size_bytes != gib * GIB {
                    return Err(ApiError::new(
                        "IdempotentParameterMismatch",
                        "ClientToken reused with different parameters",
                    ));
                }
                return Ok(body(&to_api(r)));
            }
        }
        let tags: Vec<records::Tag> = req
            .tag_specifications
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.resource_type.is_empty() || s.resource_type == "volume")
            .flat_map(|s| s.tags)
            .map(|t| records::Tag {
                key: t.key,
                value: t.value,
            })
            .collect();
        let name = tags
            .iter()
            .find(|t| t.key == "Name")
            .map(|t| t.value.clone())
            .unwrap_or_default();
        let mut rec = Engine::new_record(gib * GIB, &name);
        rec.tags = tags;
        rec.client_token = token;
        if let Some(t) = req.volume_type {
            rec.volume_type = t;
        }
        if let Some(az) = req.availability_zone {
            rec.availability_zone = az;
        }
        if let Some(iops) = req.iops {
            rec.iops = u32::try_from(iops)
                .map_err(|_| ApiError::invalid(format!("Iops {iops} out of range")))?;
        }
        if req.multi_attach_enabled == Some(true) {
            // EBS Multi-Attach exists for Provisioned IOPS volumes only.
            if !matches!(rec.volume_type.as_str(), "io1" | "io2") {
                return Err(ApiError::invalid(format!(
                    "MultiAttachEnabled is supported for io1 and io2 volumes, not {}",
                    rec.volume_type
                )));
            }
            rec.multi_attach_enabled = true;
        }
        if let Some(s) = &snapshot {
            rec.snapshot_id = s.snapshot_id.to_string();
        }
        match &self.cluster {
            Some(cluster) => {
                let token = !rec.client_token.is_empty();
                if token {
                    if let Some(earlier) = self.claim_client_token(cluster, &rec).await? {
                        return Ok(body(&to_api(&earlier)));
                    }
                }
                if let Err(e) = self.cluster_create(cluster, &rec, snapshot.as_ref()).await {
                    if token {
                        if let Err(e) = cluster
                            .catalog
                            .release_token(&rec.client_token, &rec.volume_id)
                            .await
                        {
                            tracing::warn!(volume = %rec.volume_id, error = %e, "releasing the ClientToken of a volume not created failed");
                        }
                    }
                    return Err(e.into());
                }
            }
            None => match &snapshot {
                Some(s) => {
                    self.engine
                        .create_volume_from_snapshot(rec.clone(), &s.snapshot_id)
                        .await?
                }
                None => self.engine.create_volume_from(rec.clone()).await?,
            },
        }
        tracing::info!(volume = %rec.volume_id, size_gib = gib, snapshot = %rec.snapshot_id, "volume created");
        Ok(body(&to_api(&rec)))
    }

    async fn describe_volumes(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: DescribeVolumesRequest = parse(payload)?;
        for f in req.filters.iter().flatten() {
            if !matches!(
                f.name.as_str(),
                "status" | "attachment.instance-id" | "volume-id"
            ) && !f.name.starts_with("tag:")
            {
                return Err(ApiError::invalid(format!("unknown filter {}", f.name)));
            }
        }
        let mut recs = match &req.volume_ids {
            Some(ids) => {
                let mut out = Vec::new();
                for id in ids {
                    out.push(self.record(&parse_volume_id(id)?).await?);
                }
                out
            }
            None => self.volume_records().await?,
        };
        for f in req.filters.unwrap_or_default() {
            let keep = |r: &VolumeRecord| -> Result<bool, ApiError> {
                let v = to_api(r);
                Ok(match f.name.as_str() {
                    "status" => f.values.contains(&v.state),
                    "attachment.instance-id" => v
                        .attachments
                        .iter()
                        .any(|a| f.values.contains(&a.instance_id)),
                    "volume-id" => f.values.contains(&v.volume_id),
                    name => match name.strip_prefix("tag:") {
                        Some(key) => v
                            .tags
                            .iter()
                            .any(|t| t.key == key && f.values.contains(&t.value)),
                        None => return Err(ApiError::invalid(format!("unknown filter {name}"))),
                    },
                })
            };
            let mut kept = Vec::new();
            for r in recs {
                if keep(&r)? {
                    kept.push(r);
                }
            }
            recs = kept;
        }
        Ok(body(&DescribeVolumesReply {
            volumes: recs.iter().map(to_api).collect(),
        }))
    }

    async fn attach_volume(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: AttachVolumeRequest = parse(payload)?;
        if req.instance_id.is_empty() || req.device.is_empty() {
            return Err(ApiError::missing("InstanceId and Device must not be empty"));
        }
        let id = parse_volume_id(&req.volume_id)?;
        let _g = self.lock.lock(id.as_str()).await;
        let (mut rec, revision) = self.volume_at(&id).await?;
        usable(&rec)?;
        if rec
            .attachments
            .iter()
            .any(|a| a.instance_id == req.instance_id)
        {
            return Err(ApiError::new(
                "VolumeInUse",
                format!("{id} is already attached to {}", req.instance_id),
            ));
        }
        if !rec.attachments.is_empty() && !rec.multi_attach_enabled {
            return Err(ApiError::new(
                "VolumeInUse",
                format!("{id} is already attached to an instance and is not a Multi-Attach volume"),
            ));
        }
        if rec.attachments.len() >= MAX_MULTI_ATTACH {
            return Err(ApiError::new(
                "VolumeInUse",
                format!("{id} is attached to {MAX_MULTI_ATTACH} instances, the most EBS allows"),
            ));
        }
        let a = records::Attachment {
            instance_id: req.instance_id,
            device: req.device,
            state: "attached".into(),
            attach_time: now_rfc3339(),
            delete_on_termination: false,
        };
        rec.attachments.push(a.clone());
        self.store_volume(&rec, revision).await?;
        tracing::info!(volume = %id, instance = %a.instance_id, "volume attached");
        Ok(body(&attachment(&rec, &a, "attached")))
    }

    /// `detachvolume` (EC2 `DetachVolume`). Cluster mode: a volume owned by another node is
    /// detached there (forwarded on `vblock.NODE.detachvolume` unless `forwarded`).
    async fn detach_volume(&self, payload: &[u8], forwarded: bool) -> Result<Vec<u8>, ApiError> {
        let req: DetachVolumeRequest = parse(payload)?;
        let id = parse_volume_id(&req.volume_id)?;
        let g = self.lock.lock(id.as_str()).await;
        match self.who_answers(&id, forwarded).await {
            Answer::Here => {}
            Answer::Refused(why) => return Err(ApiError::new("VolumeInUse", why)),
            Answer::Owner(owner) => {
                drop(g);
                let cluster = self.cluster.clone().ok_or_else(|| {
                    ApiError::internal("a forward outside cluster mode".to_owned())
                })?;
                return match self
                    .send_to_owner(&cluster, &owner, &id, ("detachvolume", payload))
                    .await
                {
                    AtOwner::Reply(reply) => Ok(reply),
                    AtOwner::TakenOver => {
                        let r = Box::pin(self.detach_volume(payload, true)).await;
                        cluster.release(&id, Purpose::EndMount).await;
                        r
                    }
                    AtOwner::InUse(why) => Err(ApiError::new("VolumeInUse", why)),
                    AtOwner::Unreachable(e) => Err(ApiError::internal(format!(
                        "forwarding to the owner node {owner} (vblock.{owner}.detachvolume) failed: {e}"
                    ))),
                };
            }
        }
        let (mut rec, revision) = self.volume_at(&id).await?;
        let named = |instance: &str, device: &str| {
            req.instance_id.as_ref().is_none_or(|i| i == instance)
                && req.device.as_ref().is_none_or(|d| d == device)
        };
        let pos = rec
            .attachments
            .iter()
            .position(|a| named(&a.instance_id, &a.device));
        // The mount is the attachment without an instance id: detaching it unmounts the volume.
        if let (None, Some(m)) = (pos, rec.mount.clone()) {
            if named("", &m.device) {
                self.end_mount(&mut rec, !req.force, Some(revision)).await?;
                tracing::info!(volume = %id, device = %m.device, force = req.force, "volume detached");
                return Ok(body(&VolumeAttachment {
                    state: "detached".into(),
                    ..mount_attachment(&rec, &m)
                }));
            }
        }
        let Some(pos) = pos else {
            if rec.attachments.is_empty() && rec.mount.is_none() {
                // A retry of a detach whose close failed after the record was updated: close
                // what is still open (nothing, usually).
                self.engine.close_volume_draining(&id, !req.force).await?;
            }
            return Err(ApiError::new(
                "IncorrectState",
                format!(
                    "{id} is not attached{}",
                    req.instance_id
                        .map(|i| format!(" to {i}"))
                        .unwrap_or_default()
                ),
            ));
        };
        let a = rec.attachments.remove(pos);
        let revision = self.store_volume(&rec, revision).await?;
        tracing::info!(volume = %id, instance = %a.instance_id, force = req.force, "volume detached");
        if rec.attachments.is_empty() {
            // The last instance is gone: so are its export and its NBD clients (drained first
            // unless `Force`).
            self.end_mount(&mut rec, !req.force, Some(revision)).await?;
        }
        Ok(body(&attachment(&rec, &a, "detached")))
    }

    async fn snapshot_record(&self, id: &SnapshotId) -> Result<SnapshotRecord, ApiError> {
        Ok(self.snapshot_at(id).await?.0)
    }

    /// `forwarded`: the request came from another node (`vblock.NODE.createsnapshot`), which
    /// found this node owning the volume; it is not forwarded again.
    async fn create_snapshot(&self, payload: &[u8], forwarded: bool) -> Result<Vec<u8>, ApiError> {
        let req: CreateSnapshotRequest = parse(payload)?;
        let id = parse_volume_id(&req.volume_id)?;
        if let Some(cluster) = &self.cluster {
            return self
                .cluster_snapshot(cluster, &id, &req.description, payload, forwarded)
                .await;
        }
        let rec = self.engine.create_snapshot(&id, &req.description).await?;
        // The snapshot opened the volume if it was not: only a mount keeps an instance open
        // (its write buffer, WAL writer and lock), so an unmounted volume is closed again.
        // The snapshot is taken whatever happens here.
        let _g = self.lock.lock(id.as_str()).await;
        if let Ok(Some(VolumeRecord { mount: None, .. })) = self.engine.get_record(&id).await {
            if let Err(e) = self.engine.close_volume(&id).await {
                tracing::warn!(volume = %id, error = %e, "closing an unmounted volume after its snapshot failed");
            }
        }
        Ok(body(&snapshot_to_api(&rec)))
    }

    async fn describe_snapshots(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: DescribeSnapshotsRequest = parse(payload)?;
        let filters = req.filters.unwrap_or_default();
        for f in &filters {
            if !matches!(f.name.as_str(), "volume-id" | "status" | "snapshot-id") {
                return Err(ApiError::invalid(format!("unknown filter {}", f.name)));
            }
        }
        let recs = match &req.snapshot_ids {
            Some(ids) => {
                let mut out = Vec::new();
                for id in ids {
                    out.push(self.snapshot_record(&parse_snapshot_id(id)?).await?);
                }
                out
            }
            None => self.snapshot_records().await?,
        };
        let snapshots = recs
            .iter()
            .map(snapshot_to_api)
            .filter(|s| {
                filters.iter().all(|f| {
                    let v = match f.name.as_str() {
                        "volume-id" => &s.volume_id,
                        "status" => &s.state,
                        _ => &s.snapshot_id,
                    };
                    f.values.contains(v)
                })
            })
            .collect();
        Ok(body(&DescribeSnapshotsReply { snapshots }))
    }

    async fn delete_snapshot(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: SnapshotIdRequest = parse(payload)?;
        let id = parse_snapshot_id(&req.snapshot_id)?;
        match &self.cluster {
            Some(cluster) => self.cluster_delete_snapshot(cluster, &id).await?,
            None => self.engine.delete_snapshot(&id).await?,
        }
        Ok(body(&ReturnReply { ret: true }))
    }

    /// `ebs.describevolumespace`. In cluster mode each volume is described by the node that
    /// holds its lease (its map is the current one; `vblock.NODE.describevolumespace`, one
    /// request per node with all of its volumes, every node asked at once, each answering
    /// within [`DESCRIBE_TIMEOUT`](super::cluster::DESCRIBE_TIMEOUT) plus 20 ms per volume)
    /// unless the request was forwarded; a volume nobody holds (or its owner left out), from
    /// this node's copy of its map, else from its newest map checkpoint in the bucket. Asked
    /// for every volume, the volumes no node can describe that way (no map anywhere, held by
    /// a node that does not answer, or an error) are left out (logged); asked for some by id,
    /// that is `InvalidVolume.NotFound` or the error. Volumes come in the order asked
    /// (a listing: the catalog's).
    async fn describe_volume_space(
        &self,
        payload: &[u8],
        forwarded: bool,
    ) -> Result<Vec<u8>, ApiError> {
        use futures::StreamExt;
        let req: DescribeVolumeSpaceRequest = parse(payload)?;
        let listing = req.volume_ids.is_none();
        let ids = match req.volume_ids {
            Some(ids) => ids
                .iter()
                .map(|s| parse_volume_id(s))
                .collect::<Result<Vec<_>, _>>()?,
            None => self
                .volume_records()
                .await?
                .into_iter()
                .map(|r| r.volume_id)
                .collect(),
        };
        let order: HashMap<String, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.to_string(), i))
            .collect();
        let mut volume_spaces = Vec::new();
        let mut here = Vec::new();
        match (&self.cluster, forwarded) {
            (Some(cluster), false) => {
                // Who holds each lease (16 reads at a time), then one request per owner.
                let holders: Vec<_> = futures::stream::iter(ids)
                    .map(|id| async move {
                        let holder = cluster.held_elsewhere(&id).await;
                        (id, holder)
                    })
                    .buffered(16)
                    .collect()
                    .await;
                let mut by_owner: HashMap<String, Vec<VolumeId>> = HashMap::new();
                for (id, holder) in holders {
                    match holder {
                        Ok(Some(owner)) => by_owner.entry(owner.node).or_default().push(id),
                        Ok(None) => here.push(id),
                        Err(e) if listing => {
                            tracing::warn!(volume = %id, error = %e, "describevolumespace: cannot read the volume's lease; left out");
                        }
                        Err(e) => {
                            return Err(ApiError::internal(format!(
                                "cannot read the lease of {id}: {e}"
                            )))
                        }
                    }
                }
                let asked = by_owner.into_iter().map(|(node, ids)| async move {
                    let spaces = self.spaces_at(cluster, &node, &ids).await;
                    (node, ids, spaces)
                });
                for (node, ids, spaces) in futures::future::join_all(asked).await {
                    match spaces {
                        Ok(spaces) => {
                            // One the owner left out (not rebuilt yet, or gone there) is
                            // described here, from the bucket if need be.
                            let got: std::collections::HashSet<&str> =
                                spaces.iter().map(|v| v.volume_id.as_str()).collect();
                            here.extend(
                                ids.iter().filter(|id| !got.contains(id.as_str())).cloned(),
                            );
                            volume_spaces.extend(spaces);
                        }
                        // One owner that does not answer (a dead node whose lease has not
                        // been taken over) does not fail the listing of every volume.
                        Err(e) if listing => {
                            tracing::warn!(node, volumes = ?ids, error = %e.message, "describevolumespace: the volumes' owner did not describe them; left out");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            _ => here = ids,
        }
        // 16 at a time: one from the bucket costs a LIST and a GET.
        let described: Vec<_> = futures::stream::iter(here)
            .map(|id| async move {
                let space = self.space_here(&id, forwarded).await;
                (id, space)
            })
            .buffered(16)
            .collect()
            .await;
        for (id, space) in described {
            match space {
                Ok(Some(space)) => volume_spaces.push(space),
                // Forwarded: the asking node tells which asked volume is missing.
                Ok(None) if listing || forwarded => {
                    tracing::info!(volume = %id, "describevolumespace: no node holds the volume, and neither this node nor the bucket has its map; left out");
                }
                Ok(None) => return Err(VolumeError::VolumeNotFound(id).into()),
                Err(e) if listing && self.cluster.is_some() => {
                    tracing::warn!(volume = %id, error = %e.message, "describevolumespace: cannot describe the volume; left out");
                }
                Err(e) => return Err(e),
            }
        }
        volume_spaces.sort_by_key(|v| order.get(&v.volume_id).copied());
        Ok(body(&DescribeVolumeSpaceReply { volume_spaces }))
    }

    /// The space of volume `id` from this node's copy of its map; in cluster mode, without
    /// one and unless `forwarded` (the asking node looks there), from its newest map checkpoint
    /// in the bucket ([`Control::stored_space`]). `None`: neither has it.
    ///
    /// Errors: metadata, catalog and backend errors.
    async fn space_here(
        &self,
        id: &VolumeId,
        forwarded: bool,
    ) -> Result<Option<VolumeSpace>, ApiError> {
        let s = match self.engine.volume_space(id).await {
            Ok(s) => s,
            Err(VolumeError::VolumeNotFound(_)) if self.cluster.is_some() && !forwarded => {
                match self.stored_space(id).await? {
                    Some(s) => s,
                    None => return Ok(None),
                }
            }
            Err(VolumeError::VolumeNotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(VolumeSpace {
            volume_id: id.to_string(),
            size_bytes: s.size_bytes,
            allocated_bytes: s.allocated_bytes,
            stored_bytes: s.stored_bytes,
            dead_bytes: s.dead_bytes,
            compression_ratio: (s.compression_ratio * 100.0).round() / 100.0,
        }))
    }

    /// Cluster mode: the space of volume `id` from its newest map checkpoint in the bucket
    /// (`None` without a catalog record or a checkpoint).
    ///
    /// Errors: catalog and backend errors; a corrupt checkpoint.
    async fn stored_space(
        &self,
        id: &VolumeId,
    ) -> Result<Option<crate::gc::VolumeSpace>, ApiError> {
        let size = match self.volume_at(id).await {
            Ok((rec, _)) => rec.size_bytes,
            Err(VolumeError::VolumeNotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(self.engine.stored_volume_space(id, size).await?)
    }

    /// Cluster mode: the space of volumes `ids` as node `node`, which holds their leases,
    /// describes them (one forwarded `describevolumespace`).
    ///
    /// Errors: the owner's error reply or a reply that does not parse; `InternalError` when
    /// the owner does not answer within [`DESCRIBE_TIMEOUT`](super::cluster::DESCRIBE_TIMEOUT).
    async fn spaces_at(
        &self,
        cluster: &super::cluster::ClusterMode,
        node: &str,
        ids: &[VolumeId],
    ) -> Result<Vec<VolumeSpace>, ApiError> {
        let request = DescribeVolumeSpaceRequest {
            volume_ids: Some(ids.iter().map(ToString::to_string).collect()),
        };
        let payload = serde_json::to_vec(&request)
            .map_err(|e| ApiError::internal(format!("encoding a request: {e}")))?;
        // Its volumes are described 16 at a time there.
        let timeout = super::cluster::DESCRIBE_TIMEOUT
            + std::time::Duration::from_millis(20) * ids.len() as u32;
        let reply = cluster
            .forward_within(node, "describevolumespace", &payload, timeout)
            .await?;
        if let Ok(err) = serde_json::from_slice::<ErrorReply>(&reply) {
            return Err(err.error);
        }
        let reply: DescribeVolumeSpaceReply = serde_json::from_slice(&reply).map_err(|e| {
            ApiError::internal(format!("node {node}'s describevolumespace reply: {e}"))
        })?;
        Ok(reply.volume_spaces)
    }

    async fn delete_volume(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: VolumeIdRequest = parse(payload)?;
        let id = parse_volume_id(&req.volume_id)?;
        let _g = self.lock.lock(id.as_str()).await;
        self.delete_unused_volume(&id).await?;
        Ok(body(&ReturnReply { ret: true }))
    }

    async fn modify_volume(&self, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
        let req: ModifyVolumeRequest = parse(payload)?;
        let id = parse_volume_id(&req.volume_id)?;
        let gib = size_gib(req.size)?;
        let _g = self.lock.lock(id.as_str()).await;
        let (mut rec, revision) = self.volume_at(&id).await?;
        usable(&rec)?;
        let original = rec.size_bytes.div_ceil(GIB);
        if gib * GIB < rec.size_bytes {
            return Err(ApiError::invalid(format!(
                "Size {gib} GiB is smaller than the current {original} GiB; volumes only grow"
            )));
        }
        if rec.mount.is_some() {
            return Err(ApiError::new(
                "IncorrectState",
                format!("{id} is mounted; unmount before resizing"),
            ));
        }
        if self.cluster.is_some() {
            // No node serves it (it is not mounted): the catalog's size is the size the next
            // owner opens it with.
            Engine::check_size(gib * GIB)?;
            rec.size_bytes = gib * GIB;
            self.store_volume(&rec, revision).await?;
        } else {
            self.engine.resize_volume(&id, gib * GIB).await?;
        }
        tracing::info!(volume = %id, from_gib = original, to_gib = gib, "volume resized");
        Ok(body(&ModifyVolumeReply {
            volume_modification: VolumeModification {
                volume_id: id.to_string(),
                target_size: gib,
                original_size: original,
                modification_state: "completed".into(),
            },
        }))
    }
}

//! Hive's subjects (`ebs.mount`, `ebs.unmount`, `ebs.delete`; `../shared/nats-api.md`): replies
//! carry an `Error` text instead of an EC2 error object.

use crate::engine::now_rfc3339;
use crate::ids::{SnapshotId, VolumeId};
use crate::records::{self, Mount, SnapshotRecord, VolumeRecord};
use crate::volume::VolumeError;

use super::api::*;
use super::cluster::{Answer, AtOwner, Purpose};
use super::handlers::{parse, Control};

/// How long a drained unmount in cluster mode waits to store a map checkpoint (for the GC
/// lock, then the PUT) before it goes on without one.
const UNMOUNT_CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Control {
    /// The mount URI of `id` mounted with `mount`.
    fn uri(&self, id: &str, mount: &Mount) -> String {
        format!(
            "{}/{}",
            self.nbd_uri_base,
            records::export_name(id, mount, self.open_exports)
        )
    }

    /// `ebs.mount` / `ebs.NODE.mount` (`node`): mounts a volume (read-write export) or a
    /// snapshot (read-only export) and returns its URI. Idempotent: a mounted volume or snapshot
    /// returns the same URI, unless `ebs.NODE.mount` names another node than the one it is
    /// mounted on (`VolumeInUse`).
    pub(super) async fn mount(&self, node: Option<&str>, payload: &[u8]) -> EbsMountResponse {
        let fail = |error: String, retryable: bool| EbsMountResponse {
            uri: String::new(),
            mounted: false,
            error,
            retryable,
        };
        let req: EbsRequest = match parse(payload) {
            Ok(r) => r,
            Err(e) => return fail(e.message, false),
        };
        let mount = Mount::new(
            node.or(self.node.as_deref()).unwrap_or("").to_owned(),
            req.device_name.clone(),
            req.delete_on_termination,
            now_rfc3339(),
        );
        let mounted = |name: &str, m: &Mount| match m.other_node(name, node) {
            Some(why) => fail(format!("VolumeInUse: {why}"), false),
            None => EbsMountResponse {
                uri: self.uri(name, m),
                mounted: true,
                error: String::new(),
                retryable: false,
            },
        };
        if let Ok(snap) = SnapshotId::parse(&req.name) {
            // A mount records itself here, then in the catalog: the check of this node's
            // exports against the catalog waits for it.
            let _g = self.lock.lock(snap.as_str()).await;
            if let Some(cluster) = &self.cluster {
                // Cluster mode: a snapshot of the catalog, taken on any node, is read from its
                // map in the bucket; it is exported through one node at a time.
                match self.snapshot_at(&snap).await {
                    Ok((rec, _)) => {
                        if let Some(m) = rec.mount.filter(|m| m.node != cluster.me.node) {
                            return fail(
                                format!(
                                    "VolumeInUse: snapshot {snap} is mounted through node {}",
                                    m.node
                                ),
                                false,
                            );
                        }
                    }
                    Err(e) => {
                        let retryable = !matches!(e, VolumeError::SnapshotNotFound(_));
                        return fail(e.to_string(), retryable);
                    }
                }
                if let Err(e) = self.engine.load_snapshot(&snap).await {
                    return fail(format!("cannot mount {snap}: {e}"), true);
                }
            }
            return match self.engine.mount_snapshot(&snap, mount.clone()).await {
                Ok(SnapshotRecord { mount: Some(m), .. }) => {
                    if let Some(cluster) = &self.cluster {
                        if let Err(e) = self.catalog_snapshot_mount(cluster, &snap, Some(&m)).await
                        {
                            // The export this request started ends (an earlier one stays).
                            if m == mount {
                                if let Err(e) = self.engine.unmount_snapshot(&snap, None).await {
                                    tracing::warn!(snapshot = %snap, error = %e, "unmounting a snapshot the catalog refused failed");
                                }
                            }
                            let retryable = !matches!(e, VolumeError::InUse(_));
                            return fail(format!("cannot mount {snap}: {e}"), retryable);
                        }
                    }
                    if m == mount {
                        tracing::info!(snapshot = %snap, device = %req.device_name, "snapshot mounted");
                    }
                    mounted(snap.as_str(), &m)
                }
                Ok(_) => fail(format!("snapshot {snap} was not mounted"), true),
                Err(e @ VolumeError::SnapshotNotFound(_)) => fail(e.to_string(), false),
                Err(e) => fail(format!("cannot mount {snap}: {e}"), true),
            };
        }
        let Ok(id) = VolumeId::parse(&req.name) else {
            return fail(
                format!("invalid volume or snapshot id {:?}", req.name),
                false,
            );
        };
        let _g = self.lock.lock(id.as_str()).await;
        let was_mounted = self.cluster.as_ref().is_some_and(|c| c.mounted_here(&id));
        if let Some(cluster) = self.cluster.clone() {
            let catalog = match self.volume_at(&id).await {
                Ok((r, _)) => r,
                Err(e @ VolumeError::VolumeNotFound(_)) => return fail(e.to_string(), false),
                Err(e) => return fail(e.to_string(), true),
            };
            if let Err(e) = super::handlers::usable(&catalog) {
                return fail(e.to_string(), true);
            }
            // The URI this node answers: its mount's while it owns the volume, else the new
            // one's (a takeover forgets any older mount here).
            let mut here = mount.clone();
            if cluster.keeps(&id) {
                match self.engine.get_record(&id).await {
                    Ok(r) => here = r.and_then(|r| r.mount).unwrap_or(here),
                    Err(e) => return fail(e.to_string(), true),
                }
            }
            match self
                .cluster_own(
                    &cluster,
                    &id,
                    &self.uri(id.as_str(), &here),
                    catalog,
                    super::cluster::Purpose::Mount,
                )
                .await
            {
                Ok(super::cluster::Owned::Here) => {}
                Ok(super::cluster::Owned::There(owner)) if owner.nbd_advertise.is_empty() => {
                    return fail(
                        format!(
                            "volume {id} is busy on node {} (a snapshot or a delete); try again",
                            owner.node
                        ),
                        true,
                    )
                }
                Ok(super::cluster::Owned::There(owner)) => {
                    return EbsMountResponse {
                        uri: owner.nbd_advertise,
                        mounted: true,
                        error: String::new(),
                        retryable: false,
                    }
                }
                Err(e @ VolumeError::VolumeNotFound(_)) => return fail(e.to_string(), false),
                Err(e) => return fail(format!("cannot take {id} over: {e}"), true),
            }
        }
        let mut rec = match self.engine.get_record(&id).await {
            Ok(Some(r)) => r,
            found => {
                // The mount hold this request added goes (an earlier mount's stays).
                if let Some(cluster) = self.cluster.as_ref().filter(|_| !was_mounted) {
                    cluster.release(&id, super::cluster::Purpose::Mount).await;
                }
                return match found {
                    Err(e) => fail(e.to_string(), true),
                    _ => fail(format!("volume {id} not found"), false),
                };
            }
        };
        if let Some(m) = &rec.mount {
            return mounted(id.as_str(), m);
        }
        // Open it now so WAL replay happens before the VM connects.
        let opened = match self.engine.volume(&id).await {
            Ok(_) if self.cluster.is_some() => match self.volume_at(&id).await {
                Ok((mut rec, revision)) => {
                    rec.mount = Some(mount.clone());
                    self.store_volume(&rec, revision).await.map(|_| ())
                }
                Err(e) => Err(e),
            },
            Ok(_) => {
                rec.mount = Some(mount.clone());
                self.engine.put_record(rec).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = opened {
            if let Some(cluster) = self.cluster.clone() {
                cluster.release(&id, super::cluster::Purpose::Mount).await;
            }
            return fail(format!("cannot mount {id}: {e}"), true);
        }
        tracing::info!(volume = %id, device = %req.device_name, "volume mounted");
        mounted(id.as_str(), &mount)
    }

    /// Ends the mount of `rec`'s volume if it has one (the caller holds its `self.lock`), then
    /// closes its instance if one is open: the export name stops working first, then the close
    /// answers the requests in flight and disconnects every client (`Volume::closed`).
    /// `drain`: turn the write buffer into chunks first (bounded); without it the buffer stays
    /// in the WAL, replayed at the next open (EC2 `Force` on detach). `revision`: the catalog
    /// revision `rec` was read at ([`Control::volume_at`]); cluster mode with `None` (a lost
    /// lease) ends only the local mount, leaving the catalog to the volume's new owner.
    pub(super) async fn end_mount(
        &self,
        rec: &mut VolumeRecord,
        drain: bool,
        revision: Option<u64>,
    ) -> Result<(), VolumeError> {
        let id = rec.volume_id.clone();
        if rec.mount.take().is_some() {
            match (&self.cluster, revision) {
                (None, _) => self.engine.put_record(rec.clone()).await?,
                (Some(_), Some(revision)) => {
                    self.store_volume(rec, revision).await?;
                }
                (Some(_), None) => {}
            }
            tracing::info!(volume = %id, "volume unmounted");
        }
        if self.cluster.is_some() {
            // The local record's mount (its export name) goes whatever the catalog said.
            if let Some(mut local) = self.engine.get_record(&id).await? {
                if local.mount.take().is_some() {
                    self.engine.put_local_record(local).await?;
                }
            }
        }
        if self.cluster.is_some() && drain {
            // Cluster mode: the next owner rebuilds the volume from the bucket alone, so what
            // the drain might not turn into chunks in time goes there first.
            let open = self.engine.open_volumes().await;
            if let Some(v) = open.iter().find(|v| v.id() == &id) {
                if let Err(e) = v.flush().await {
                    tracing::warn!(volume = %id, error = %e, "shipping the WAL before the unmount failed; the drain into chunks goes on");
                }
            }
        }
        let closed = self.engine.close_volume_draining(&id, drain).await;
        // Cluster mode: a mount that ended releases the volume's lease (whatever ended it).
        if let Some(cluster) = self.cluster.clone() {
            // After a drain, a checkpoint of the map: the next mount, anywhere, rebuilds the
            // volume from it rather than from every chunk written since the last one.
            // Bounded: it waits for the GC lock, which a takeover's rebuild on this node holds.
            if drain && closed.is_ok() && cluster.keeps(&id) {
                let stored = tokio::time::timeout(
                    UNMOUNT_CHECKPOINT_WAIT,
                    self.engine.checkpoint_at_rest(&id),
                )
                .await;
                match stored {
                    Ok(Ok(Some(bytes))) => {
                        tracing::info!(volume = %id, bytes, "map checkpoint stored at the unmount")
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(volume = %id, error = %e, "storing a map checkpoint at the unmount failed (the next owner reads the chunks instead)")
                    }
                    Err(_) => {
                        tracing::warn!(volume = %id, "no map checkpoint at the unmount: it did not finish within 10 s (the GC lock busy, or a slow PUT; the next owner reads the chunks instead)")
                    }
                }
            }
            cluster.release(&id, super::cluster::Purpose::Mount).await;
        }
        closed
    }

    /// Cluster mode: the unmount of volume `id`, owned by node `owner`, sent to it
    /// (`vblock.OWNER.unmount`) and its answer. When no daemon of that name serves, this node
    /// takes the volume over once the owner's lease has expired
    /// ([`Control::own_from_silent_owner`]) and ends the mount itself; `VolumeInUse` when
    /// that cannot be done, or the owner's node does not answer in time.
    async fn unmount_at_owner(
        &self,
        owner: &str,
        id: &VolumeId,
        (node, payload): (Option<&str>, &[u8]),
    ) -> EbsUnmountResponse {
        let refused = |why: String| EbsUnmountResponse {
            volume: id.to_string(),
            mounted: true,
            error: format!("VolumeInUse: {why}"),
            not_found: false,
        };
        let Some(cluster) = self.cluster.clone() else {
            return refused("not in cluster mode".into());
        };
        match self
            .send_to_owner(&cluster, owner, id, ("unmount", payload))
            .await
        {
            AtOwner::Reply(reply) => serde_json::from_slice(&reply).unwrap_or_else(|e| {
                refused(format!("node {owner}'s unmount reply does not parse: {e}"))
            }),
            AtOwner::TakenOver => {
                let r = Box::pin(self.unmount(node, payload, true)).await;
                cluster.release(id, Purpose::EndMount).await;
                r
            }
            AtOwner::InUse(why) => refused(why),
            AtOwner::Unreachable(e) => refused(format!(
                "volume {id} is owned by node {owner}, which does not answer: {e}"
            )),
        }
    }

    /// `ebs.unmount` / `ebs.NODE.unmount` (`node`): ends the mount of a volume or snapshot and
    /// disconnects its clients. Unmounting what is not mounted succeeds; one mounted through
    /// another node than `node` is refused. Cluster mode: a volume owned by another node is
    /// unmounted there (the request is forwarded to it).
    pub(super) async fn unmount(
        &self,
        node: Option<&str>,
        payload: &[u8],
        forwarded: bool,
    ) -> EbsUnmountResponse {
        let resp =
            |volume: String, mounted: bool, error: String, not_found: bool| EbsUnmountResponse {
                volume,
                mounted,
                error,
                not_found,
            };
        let req: EbsRequest = match parse(payload) {
            Ok(r) => r,
            Err(e) => return resp(String::new(), false, e.message, false),
        };
        if let Ok(snap) = SnapshotId::parse(&req.name) {
            let name = snap.to_string();
            if let Some(cluster) = &self.cluster {
                return match self
                    .cluster_unmount_snapshot(cluster, &snap, node, (payload, forwarded))
                    .await
                {
                    Ok(()) => resp(name, false, String::new(), false),
                    Err(e @ VolumeError::SnapshotNotFound(_)) => {
                        resp(name, false, e.to_string(), true)
                    }
                    Err(VolumeError::InUse(m)) => {
                        resp(name, true, format!("VolumeInUse: {m}"), false)
                    }
                    Err(e) => resp(name, true, format!("cannot unmount {snap}: {e}"), false),
                };
            }
            return match self.engine.unmount_snapshot(&snap, node).await {
                Ok(was) => {
                    if was {
                        tracing::info!(snapshot = %snap, "snapshot unmounted");
                    }
                    resp(name, false, String::new(), false)
                }
                Err(e @ VolumeError::SnapshotNotFound(_)) => resp(name, false, e.to_string(), true),
                Err(VolumeError::InUse(m)) => resp(name, true, format!("VolumeInUse: {m}"), false),
                Err(e) => resp(name, true, format!("cannot unmount {snap}: {e}"), false),
            };
        }
        let Ok(id) = VolumeId::parse(&req.name) else {
            return resp(
                req.name.clone(),
                false,
                format!("invalid volume or snapshot id {:?}", req.name),
                true,
            );
        };
        let g = self.lock.lock(id.as_str()).await;
        let (mut rec, revision) = match self.volume_at(&id).await {
            Ok(r) => r,
            Err(e @ VolumeError::VolumeNotFound(_)) => {
                return resp(id.to_string(), false, e.to_string(), true)
            }
            Err(e) => return resp(id.to_string(), true, e.to_string(), false),
        };
        if let Some(why) = rec
            .mount
            .as_ref()
            .and_then(|m| m.other_node(id.as_str(), node))
        {
            return resp(id.to_string(), true, format!("VolumeInUse: {why}"), false);
        }
        match self.who_answers(&id, forwarded).await {
            Answer::Here => {}
            Answer::Refused(why) => {
                return resp(id.to_string(), true, format!("VolumeInUse: {why}"), false)
            }
            Answer::Owner(owner) => {
                drop(g);
                return self.unmount_at_owner(&owner, &id, (node, payload)).await;
            }
        }
        match self.end_mount(&mut rec, true, Some(revision)).await {
            Ok(()) => resp(id.to_string(), false, String::new(), false),
            Err(e) => resp(
                id.to_string(),
                rec.mount.is_some(),
                format!("cannot unmount {id}: {e}"),
                false,
            ),
        }
    }

    pub(super) async fn hive_delete(&self, payload: &[u8]) -> EbsDeleteResponse {
        let req: EbsDeleteRequest = match parse(payload) {
            Ok(r) => r,
            Err(e) => {
                return EbsDeleteResponse {
                    volume: String::new(),
                    success: false,
                    error: e.message,
                }
            }
        };
        let fail = |error: String| EbsDeleteResponse {
            volume: req.volume.clone(),
            success: false,
            error,
        };
        let Ok(id) = VolumeId::parse(&req.volume) else {
            return fail(format!("invalid volume id {:?}", req.volume));
        };
        let _g = self.lock.lock(id.as_str()).await;
        match self.delete_unused_volume(&id).await {
            Ok(()) => EbsDeleteResponse {
                volume: id.to_string(),
                success: true,
                error: String::new(),
            },
            Err(e) => fail(e.to_string()),
        }
    }
}

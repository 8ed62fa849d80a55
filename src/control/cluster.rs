//! Cluster mode's mounts (`vblock serve --cluster`; docs/design/cluster.md): a volume is
//! served by the node that holds its lease in JetStream KV. A mount claims the lease (waiting
//! out the holder's TTL if it stopped renewing), takes the volume over in a new epoch when this
//! node is not its current writer (`Engine::take_over`: fence, rebuild from the backend), and
//! keeps the lease while mounted; the lease's value carries the mount URI, which a mount
//! answered by any other node returns while the owner is alive. A lost lease closes the volume
//! here; an unmount releases it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cluster::lease::{Claim, Kept, Leases, Owner};
use crate::ids::VolumeId;
use crate::volume::VolumeError;

use super::handlers::Control;

/// Cluster mode's state in the control plane.
pub struct ClusterMode {
    leases: Arc<Leases>,
    /// This daemon process as a lease holder (node name, random instance).
    me: Owner,
    /// Leases this node keeps, by volume.
    kept: tokio::sync::Mutex<HashMap<VolumeId, Kept>>,
}

impl ClusterMode {
    /// Cluster mode for node `node` with `leases`.
    pub fn new(leases: Leases, node: &str) -> Self {
        Self {
            leases: Arc::new(leases),
            me: Owner::new(node, 0, ""),
            kept: tokio::sync::Mutex::new(HashMap::new()),
        }
    }
}

/// What a cluster mount decided.
pub(super) enum Owned {
    /// This node owns the volume now (mount it here).
    Here,
    /// Another node owns it: its mount URI.
    There(String),
}

impl Control {
    /// Cluster mode, before a mount of `id` here that answers `uri`: makes this node the
    /// volume's owner or names the owner's URI. Unless this process already keeps the volume's
    /// lease, it claims the lease, keeps it at once (renewals run during the takeover), and
    /// takes the volume over in a new epoch: only a kept lease proves that nobody wrote the
    /// volume since this node did. On any failure the lease is released.
    pub(super) async fn cluster_own(
        &self,
        cluster: &ClusterMode,
        id: &VolumeId,
        uri: &str,
    ) -> Result<Owned, VolumeError> {
        if self.cluster_keeps(cluster, id).await {
            return Ok(Owned::Here);
        }
        let mut me = cluster.me.clone();
        me.nbd_advertise = uri.to_owned();
        let (revision, sent) = match cluster.leases.claim(id, &me).await.map_err(lease_err)? {
            Claim::Won { revision, sent } => (revision, sent),
            Claim::Held(owner) => return Ok(Owned::There(owner.nbd_advertise)),
        };
        let kept = cluster.leases.keep(id, &me, revision, sent);
        cluster.kept.lock().await.insert(id.clone(), kept);
        let taken = match self.engine.take_over(id, &me.node).await {
            Ok(epoch) => epoch,
            Err(e) => {
                self.cluster_release(cluster, id).await;
                return Err(e);
            }
        };
        if !self.cluster_keeps(cluster, id).await {
            self.cluster_release(cluster, id).await;
            return Err(VolumeError::Internal(format!(
                "the lease of {id} was lost during its takeover; try again"
            )));
        }
        tracing::info!(volume = %id, epoch = taken, "this node owns the volume");
        Ok(Owned::Here)
    }

    /// Cluster mode: stops renewing `id`'s lease here and releases it (a mount ended, or a
    /// mount failed after the claim).
    pub(super) async fn cluster_release(&self, cluster: &ClusterMode, id: &VolumeId) {
        let Some(kept) = cluster.kept.lock().await.remove(id) else {
            return;
        };
        if let Some(revision) = kept.stop().await {
            if let Err(e) = cluster.leases.release(id, revision).await {
                tracing::warn!(volume = %id, error = %e, "releasing the lease failed; it expires after the TTL");
            }
        }
    }

    /// Cluster mode: why `id` may not be unmounted or deleted through this node: another node
    /// holds its lease (owns it). `None` outside cluster mode, or when no other node does (a
    /// failure to read the lease is a reason too).
    pub(super) async fn cluster_elsewhere(&self, id: &VolumeId) -> Option<String> {
        let cluster = self.cluster.clone()?;
        if self.cluster_keeps(&cluster, id).await {
            return None;
        }
        match cluster.leases.holder(id).await {
            Ok(Some((owner, _))) if !owner.same_holder(&cluster.me) => Some(format!(
                "volume {id} is owned by node {} (through ebs.{}.unmount)",
                owner.node, owner.node
            )),
            Ok(_) => None,
            Err(e) => Some(format!("cannot read the lease of {id}: {e}")),
        }
    }

    /// Cluster mode: whether this process keeps `id`'s lease (it owns the volume).
    pub(super) async fn cluster_keeps(&self, cluster: &ClusterMode, id: &VolumeId) -> bool {
        cluster
            .kept
            .lock()
            .await
            .get(id)
            .is_some_and(|k| !k.is_lost())
    }

    /// Cluster mode, at start: this process holds no lease, so no mount recorded here by an
    /// earlier process may be served: each is forgotten (its clients reconnect through a new
    /// mount, which claims the lease).
    pub(super) async fn forget_mounts(&self) -> Result<(), VolumeError> {
        let _g = self.lock.lock().await;
        for mut rec in self.engine.list_records().await? {
            if rec.mount.take().is_some() {
                tracing::info!(volume = %rec.volume_id, "cluster mode: forgetting a mount of an earlier process (no lease held)");
                self.engine.put_record(rec).await?;
            }
        }
        Ok(())
    }

    /// Cluster mode: closes every volume whose lease was lost (another node may own it now) at
    /// once, then forgets its mount here. Runs until the process ends.
    pub(super) async fn watch_leases(self: Arc<Self>, cluster: Arc<ClusterMode>) {
        let every = (cluster.leases.ttl() / 10).max(std::time::Duration::from_millis(50));
        loop {
            tokio::time::sleep(every).await;
            let lost: Vec<VolumeId> = {
                let mut kept = cluster.kept.lock().await;
                let lost: Vec<VolumeId> = kept
                    .iter()
                    .filter(|(_, k)| k.is_lost())
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &lost {
                    kept.remove(id);
                }
                lost
            };
            for id in lost {
                tracing::error!(volume = %id, "the volume's lease was lost: closing it here (another node may own it now)");
                // Closed at once, without the control lock a mount may hold for a while.
                if let Err(e) = self.engine.close_volume_draining(&id, false).await {
                    tracing::warn!(volume = %id, error = %e, "closing a volume whose lease was lost failed");
                }
                let _g = self.lock.lock().await;
                // A mount may have claimed the lease again meanwhile.
                if self.cluster_keeps(&cluster, &id).await {
                    continue;
                }
                if let Ok(Some(mut rec)) = self.engine.get_record(&id).await {
                    if let Err(e) = self.end_mount(&mut rec, false).await {
                        tracing::warn!(volume = %id, error = %e, "forgetting the mount of a volume whose lease was lost failed");
                    }
                }
            }
        }
    }
}

fn lease_err(e: crate::cluster::lease::LeaseError) -> VolumeError {
    VolumeError::Internal(format!("volume lease: {e}"))
}

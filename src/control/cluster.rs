//! Cluster mode's mounts (`vblock serve --cluster`; docs/design/cluster.md): a volume is
//! served by the node that holds its lease in JetStream KV. A mount claims the lease (waiting
//! out the holder's TTL if it stopped renewing), takes the volume over in a new epoch when this
//! node is not its current writer (`Engine::take_over`: fence, rebuild from the backend), and
//! keeps the lease while mounted; the lease's value carries the mount URI, which a mount
//! answered by any other node returns while the owner is alive. A lost lease closes the volume
//! here; an unmount releases it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cluster::epoch::{epoch_of, highest_epoch};
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
    /// Cluster mode, before a mount of `id` here that would answer `uri`: makes this node the
    /// volume's owner (claim, takeover) or names the owner's URI.
    pub(super) async fn cluster_own(
        &self,
        cluster: &ClusterMode,
        id: &VolumeId,
        uri: &str,
    ) -> Result<Owned, VolumeError> {
        {
            let kept = cluster.kept.lock().await;
            if kept.get(id).is_some_and(|k| !k.is_lost()) {
                return Ok(Owned::Here);
            }
        }
        let mut me = cluster.me.clone();
        me.nbd_advertise = uri.to_owned();
        let (revision, sent) = match cluster.leases.claim(id, &me).await.map_err(lease_err)? {
            Claim::Won { revision, sent } => (revision, sent),
            Claim::Held(owner) => return Ok(Owned::There(owner.nbd_advertise)),
        };
        // This node writes the volume only in the newest epoch: take it over unless it already
        // is its writer (it created the volume, or took it over last and nobody since).
        let highest = highest_epoch(&*self.engine.backend, id)
            .await
            .map_err(VolumeError::from)?;
        let here = match self.engine.get_record(id).await? {
            Some(_) => Some(epoch_of(self.engine.next_object_id(id).await?)),
            None => None,
        };
        me.epoch = if here == Some(highest) {
            highest
        } else {
            self.engine.take_over(id, &me.node).await?
        };
        let kept = cluster.leases.keep(id, &me, revision, sent);
        cluster.kept.lock().await.insert(id.clone(), kept);
        tracing::info!(volume = %id, epoch = me.epoch, "this node owns the volume");
        Ok(Owned::Here)
    }

    /// Cluster mode, after an unmount of `id` here: stops renewing its lease and releases it.
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

    /// Cluster mode: closes every volume whose lease was lost (another node may own it now),
    /// forgetting its mount here. Runs until the process ends.
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
                let _g = self.lock.lock().await;
                if let Ok(Some(mut rec)) = self.engine.get_record(&id).await {
                    if let Err(e) = self.end_mount(&mut rec, false).await {
                        tracing::warn!(volume = %id, error = %e, "closing a volume whose lease was lost failed");
                    }
                }
            }
        }
    }
}

fn lease_err(e: crate::cluster::lease::LeaseError) -> VolumeError {
    VolumeError::Internal(format!("volume lease: {e}"))
}

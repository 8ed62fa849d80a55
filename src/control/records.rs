//! Where the control plane reads and writes records: the daemon's own metadata, or in cluster
//! mode the cluster's catalog (JetStream KV), with the local record (the owner's, which opens
//! the volume) and the backend's record copy (disaster recovery) following it.

use crate::ids::{SnapshotId, VolumeId};
use crate::records::{SnapshotRecord, SnapshotStateName, VolumeRecord};
use crate::volume::VolumeError;

use super::cluster::{catalog_err, ClusterMode};
use super::handlers::Control;

impl Control {
    /// Volume `id`'s record and the catalog revision it was read at (0 outside cluster mode),
    /// for [`Control::store_volume`].
    ///
    /// Errors: [`VolumeError::VolumeNotFound`]; metadata or catalog errors.
    pub(super) async fn volume_at(
        &self,
        id: &VolumeId,
    ) -> Result<(VolumeRecord, u64), VolumeError> {
        let found = match &self.cluster {
            Some(c) => c.catalog.volume(id).await.map_err(catalog_err)?,
            None => self.engine.get_record(id).await?.map(|r| (r, 0)),
        };
        found.ok_or_else(|| VolumeError::VolumeNotFound(id.clone()))
    }

    /// Every volume record.
    pub(super) async fn volume_records(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        match &self.cluster {
            Some(c) => c.catalog.volumes().await.map_err(catalog_err),
            None => self.engine.list_records().await,
        }
    }

    /// Replaces volume record `rec`, read at `revision` ([`Control::volume_at`]), and returns
    /// the new revision. In cluster mode the catalog first (compare-and-set), then the local
    /// record if this node has one, else only the backend's record copy (best effort).
    ///
    /// Errors: [`VolumeError::IncorrectState`] when the catalog record changed since it was
    /// read; metadata and catalog errors.
    pub(super) async fn store_volume(
        &self,
        rec: &VolumeRecord,
        revision: u64,
    ) -> Result<u64, VolumeError> {
        let Some(cluster) = &self.cluster else {
            self.engine.put_record(rec.clone()).await?;
            return Ok(0);
        };
        let revision = cluster
            .catalog
            .put_volume(rec, Some(revision))
            .await
            .map_err(catalog_err)?;
        self.follow_catalog(rec).await?;
        Ok(revision)
    }

    /// Cluster mode: makes the local record (if this node has one) and the backend's record
    /// copy say what catalog record `rec` says; the local record has the mount only while
    /// this node owns the volume (its export name is checked against it).
    pub(super) async fn follow_catalog(&self, rec: &VolumeRecord) -> Result<(), VolumeError> {
        match self.engine.get_record(&rec.volume_id).await? {
            Some(_) => {
                let mount = match &self.cluster {
                    Some(c) if !c.keeps(&rec.volume_id) => None,
                    _ => rec.mount.clone(),
                };
                self.engine
                    .put_record(VolumeRecord {
                        mount,
                        ..rec.clone()
                    })
                    .await
            }
            None => {
                if let Err(e) = self.engine.publish_record(rec).await {
                    tracing::warn!(volume = %rec.volume_id, error = %e, "could not update the volume record copy in the backend");
                }
                Ok(())
            }
        }
    }

    /// Snapshot `id`'s record and its catalog revision (0 outside cluster mode).
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`]; metadata or catalog errors.
    pub(super) async fn snapshot_at(
        &self,
        id: &SnapshotId,
    ) -> Result<(SnapshotRecord, u64), VolumeError> {
        let found = match &self.cluster {
            Some(c) => {
                let found = c.catalog.snapshot(id).await.map_err(catalog_err)?;
                match found {
                    Some((rec, _)) if self.settle_in_catalog(c, &rec).await?.is_some() => {
                        c.catalog.snapshot(id).await.map_err(catalog_err)?
                    }
                    found => found,
                }
            }
            None => self.engine.get_snapshot(id).await?.map(|r| (r, 0)),
        };
        found.ok_or_else(|| VolumeError::SnapshotNotFound(id.clone()))
    }

    /// Every snapshot record.
    pub(super) async fn snapshot_records(&self) -> Result<Vec<SnapshotRecord>, VolumeError> {
        match &self.cluster {
            Some(c) => {
                let mut recs = c.catalog.snapshots().await.map_err(catalog_err)?;
                for rec in &mut recs {
                    if let Some(copy) = self.settle_in_catalog(c, rec).await? {
                        (rec.state, rec.progress) = (copy.state, copy.progress);
                    }
                }
                Ok(recs)
            }
            None => self.engine.list_snapshots().await,
        }
    }

    /// Cluster mode: a `pending` catalog record `rec` whose record copy in the bucket is no
    /// longer pending (the node that took it stored it but never updated the catalog: it
    /// died, or restarted and stored it then; or the volume's next owner abandoned it) is
    /// updated from the copy; one with no copy at all that this node has seen so for
    /// `--abandon-after` (its node died between the catalog write and taking it) becomes
    /// `error`. Returns the record settled, if any.
    ///
    /// Errors: backend and catalog errors.
    async fn settle_in_catalog(
        &self,
        cluster: &ClusterMode,
        rec: &SnapshotRecord,
    ) -> Result<Option<SnapshotRecord>, VolumeError> {
        if rec.state != SnapshotStateName::Pending {
            return Ok(None);
        }
        let key = format!("snapshot/{}", rec.snapshot_id);
        let settled = match self.engine.stored_snapshot(&rec.snapshot_id).await? {
            Some(copy) if copy.state != SnapshotStateName::Pending => copy,
            Some(_) => {
                cluster.forget(&key);
                return Ok(None);
            }
            // Recorded, never taken: its node died before it stored the pending copy (which
            // it does right after taking it), or is slow. Once this node has seen it so for
            // --abandon-after, the snapshot's outcome decides, as for one whose volume moved:
            // `error` unless its node stored it and won the outcome first.
            None if cluster.abandoned(&key, 0, &rec.start_time) => {
                tracing::warn!(snapshot = %rec.snapshot_id, "a snapshot recorded but not taken by its node; settling its outcome");
                let state = self.engine.settle_unstored_snapshot(rec).await?;
                SnapshotRecord {
                    state,
                    progress: if state == SnapshotStateName::Completed {
                        100
                    } else {
                        rec.progress
                    },
                    ..rec.clone()
                }
            }
            None => return Ok(None),
        };
        cluster
            .catalog
            .finish_snapshot(&settled)
            .await
            .map_err(catalog_err)?;
        cluster.forget(&key);
        Ok(Some(settled))
    }
}

//! Garbage collection of chunk objects, and per-volume space accounting.
//!
//! An object is deleted when (1) its owner's map no longer uses it (`live_blocks == 0` in its
//! chunk stats: overwritten, trimmed, compacted away, or its volume deleted) and (2) a mark pass
//! over every map — each volume's and each snapshot's — finds no reference to it (snapshots and
//! clones share objects). Before deleting objects of a live volume, the volume's map is stored
//! in the backend as a checkpoint (`VOLUMEID/map/NEXTOBJECTID`): recovery starts from the newest
//! checkpoint and applies only younger chunks, so removing old chunks (including chunks of zero
//! extents that shadow older data) never changes what recovery rebuilds.
//!
//! Everything here runs under the engine's GC lock, which also serialises snapshot deletion,
//! clone creation and volume deletion — the only operations that add references to existing
//! objects or drop whole maps. A crash between deleting objects and forgetting their stats only
//! leaves stats of missing objects, which the next pass deletes again (deleting a missing object
//! succeeds).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;

use crate::backend::{checkpoint_key, checkpoint_prefix, chunk_key, volume_prefix};
use crate::block::BLOCK_SIZE;
use crate::engine::Engine;
use crate::ids::VolumeId;
use crate::lookup::BlockLookup;
use crate::meta::{blocking, ChunkStats};
use crate::retry::{delete_retried, put_retried};
use crate::volume::VolumeError;

/// What one garbage-collection pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Chunk objects deleted.
    pub objects_deleted: u64,
    /// Their stored bytes.
    pub bytes_deleted: u64,
    /// Map checkpoints written before deleting.
    pub checkpoints: u64,
}

/// Space used by one volume (`vblock volume describe`, `vblock_volume_*_bytes` metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct VolumeSpace {
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Bytes of blocks that hold data (4096 per mapped data block, shared ones included).
    pub allocated_bytes: u64,
    /// Bytes of the chunk objects this volume wrote and that still exist.
    pub stored_bytes: u64,
    /// Of `stored_bytes`, the part no longer used by this volume's map (pro rata by blocks);
    /// compaction and garbage collection reclaim it unless snapshots still use it.
    pub dead_bytes: u64,
    /// Logical data bytes per stored byte in this volume's chunks (1.0 when nothing is stored).
    pub compression_ratio: f64,
}

impl Engine {
    /// One garbage-collection pass (see the module docs). Returns what it deleted.
    ///
    /// Errors: metadata and backend errors (after bounded retries); a failed pass deletes
    /// nothing it had not verified and is simply run again.
    pub async fn collect_garbage(&self) -> Result<GcReport, VolumeError> {
        let _gc = self.gc.lock().await;
        let meta = self.meta.clone();
        let dead = blocking(move || {
            let dead = meta.dead_chunks()?;
            let mut free: HashSet<(u128, u64)> =
                dead.iter().map(|(v, id, _)| (v.number(), *id)).collect();
            meta.unmark_referenced(&mut free)?;
            Ok(dead
                .into_iter()
                .filter(|(v, id, _)| free.contains(&(v.number(), *id)))
                .collect::<Vec<_>>())
        })
        .await?;
        let mut by_owner: BTreeMap<VolumeId, Vec<(u64, ChunkStats)>> = BTreeMap::new();
        for (vol, id, st) in dead {
            by_owner.entry(vol).or_default().push((id, st));
        }
        let mut report = GcReport::default();
        for (vol, chunks) in by_owner {
            let live_volume = self.get_record(&vol).await?.is_some();
            if live_volume {
                self.checkpoint_volume(&vol).await?;
                report.checkpoints += 1;
            }
            for (id, st) in &chunks {
                let key = chunk_key(&vol, *id);
                delete_retried(&self.backend, &key).await?;
                report.objects_deleted += 1;
                report.bytes_deleted += st.stored_bytes;
            }
            let (meta, v) = (self.meta.clone(), vol.clone());
            let ids: Vec<(VolumeId, u64)> =
                chunks.iter().map(|(id, _)| (vol.clone(), *id)).collect();
            let left = blocking(move || {
                meta.forget_chunks(&ids)?;
                meta.chunk_stats(&v)
            })
            .await?;
            if !live_volume && left.is_empty() {
                // The volume is gone and nothing of it is shared any more: remove whatever is
                // left under its prefix (objects a crash left uncommitted).
                for key in self.backend.list(&volume_prefix(&vol)).await? {
                    delete_retried(&self.backend, &key).await?;
                }
            }
        }
        if report.objects_deleted > 0 {
            tracing::info!(
                objects = report.objects_deleted,
                bytes = report.bytes_deleted,
                "garbage collected"
            );
        }
        metrics::counter!("vblock_gc_deleted_objects_total").increment(report.objects_deleted);
        metrics::counter!("vblock_gc_deleted_bytes_total").increment(report.bytes_deleted);
        Ok(report)
    }

    /// Stores volume `vol`'s map, chunk stats and state in the backend as a map checkpoint
    /// (FORMAT.md, "Map object"), then deletes its older checkpoints.
    pub async fn checkpoint_volume(&self, vol: &VolumeId) -> Result<(), VolumeError> {
        let meta = self.meta.clone();
        let lookup = BlockLookup::new(self.meta.clone(), vol.clone());
        let (body, next_object_id) =
            blocking(move || meta.encode_map_object(&lookup, None)).await?;
        let key = checkpoint_key(vol, next_object_id);
        let body = Bytes::from(body);
        put_retried(&self.backend, &key, body).await?;
        for old in self.backend.list(&checkpoint_prefix(vol)).await? {
            if old != key {
                delete_retried(&self.backend, &old).await?;
            }
        }
        Ok(())
    }

    /// Space accounting of volume `vol` (scans its map and chunk stats).
    pub async fn volume_space(&self, vol: &VolumeId) -> Result<VolumeSpace, VolumeError> {
        let rec = self
            .get_record(vol)
            .await?
            .ok_or_else(|| VolumeError::Invalid(format!("volume {vol} not found")))?;
        let meta = self.meta.clone();
        let v = vol.clone();
        let (allocated_blocks, stats) = blocking(move || {
            let (_, allocated) = BlockLookup::new(meta.clone(), v.clone()).summary()?;
            Ok((allocated, meta.chunk_stats(&v)?))
        })
        .await?;
        let mut space = VolumeSpace {
            size_bytes: rec.size_bytes,
            allocated_bytes: allocated_blocks * BLOCK_SIZE,
            compression_ratio: 1.0,
            ..VolumeSpace::default()
        };
        let mut logical = 0u64;
        for (_, s) in &stats {
            space.stored_bytes += s.stored_bytes;
            logical += s.data_blocks * BLOCK_SIZE;
            if s.data_blocks > 0 {
                let dead = s.data_blocks.saturating_sub(s.live_blocks);
                space.dead_bytes += (u128::from(s.stored_bytes) * u128::from(dead)
                    / u128::from(s.data_blocks)) as u64;
            } else {
                space.dead_bytes += s.stored_bytes;
            }
        }
        if space.stored_bytes > 0 {
            space.compression_ratio = logical as f64 / space.stored_bytes as f64;
        }
        Ok(space)
    }
}

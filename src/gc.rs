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
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::{checkpoint_key, checkpoint_prefix, chunk_key, volume_prefix};
use crate::block::BLOCK_SIZE;
use crate::engine::Engine;
use crate::ids::VolumeId;
use crate::lookup::BlockLookup;
use crate::meta::{
    blocking, decode_stats_entry, vol_key, vol_u64_key, ChunkStats, MetaError, MetaStore,
    PREFIX_CHUNK,
};
use crate::records::SnapshotStateName;
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
    /// Their bytes.
    pub checkpoint_bytes: u64,
    /// Candidate objects left for a later pass ([`Engine::collect_garbage_paced`]): fewer
    /// bytes than their volume's map checkpoint, and not yet waiting `max_delay`.
    pub objects_waiting: u64,
    /// How long the pass scanned every map for references (the mark step); `None` when it
    /// did not, because no candidate could be due even if all were free.
    pub mark_duration: Option<Duration>,
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
    /// One full garbage-collection pass (see the module docs), after a delete or when asked:
    /// every unreferenced object goes now. Returns what it deleted.
    ///
    /// Errors: metadata and backend errors (after bounded retries); a failed pass deletes
    /// nothing it had not verified and is simply run again.
    pub async fn collect_garbage(&self) -> Result<GcReport, VolumeError> {
        self.collect_garbage_paced(Duration::ZERO).await
    }

    /// The periodic pass (`--gc-interval`): like [`Engine::collect_garbage`], except that a live
    /// volume's garbage waits while its stored bytes are fewer than the volume's last map
    /// checkpoint, for up to `max_delay` (`--gc-max-delay`). A checkpoint is the whole map
    /// (72 bytes per extent, FORMAT.md "Map object"): ~28 MB for a 2 GiB volume written in
    /// scattered 4 KiB blocks, which a pass freeing one compacted 4 MiB chunk every
    /// `--gc-interval` would write again and again. Waiting garbage is counted in
    /// [`GcReport::objects_waiting`]. Errors as [`Engine::collect_garbage`].
    pub async fn collect_garbage_paced(
        &self,
        max_delay: Duration,
    ) -> Result<GcReport, VolumeError> {
        let mut pacing = self.gc.lock().await;
        let meta = self.meta.clone();
        let candidates = blocking(move || meta.dead_chunks()).await?;
        let mut by_owner: BTreeMap<VolumeId, Vec<(u64, ChunkStats)>> = BTreeMap::new();
        for (vol, id, st) in candidates {
            by_owner.entry(vol).or_default().push((id, st));
        }
        match self.gc_scope.get() {
            Some(_) => {
                by_owner.retain(|vol, _| self.collects(vol));
                // Every pass, with garbage or not: it also settles snapshots abandoned by a
                // volume's earlier owner (one LIST of the snapshots' keys).
                let frozen = self.sync_snapshots_from_backend().await?;
                by_owner.retain(|vol, _| !frozen.contains(vol));
            }
            // Cluster mode before the control plane knows the leases: nothing is owned yet.
            None if self.config.cluster => by_owner.clear(),
            None => {}
        }
        let now = Instant::now();
        pacing.waiting_since.retain(|v, _| by_owner.contains_key(v));
        let mut live = HashSet::new();
        for vol in by_owner.keys() {
            if self.get_record(vol).await?.is_some() {
                live.insert(vol.clone());
                pacing.waiting_since.entry(vol.clone()).or_insert(now);
            }
        }
        pacing.checkpoint_bytes.retain(|v, _| live.contains(v));
        let mut report = GcReport::default();
        // Candidates are an upper bound of what is free: owners not due even with all of them
        // are not marked at all (the mark pass walks every map).
        by_owner.retain(|vol, chunks| {
            let due = pacing.due(vol, chunks, live.contains(vol), max_delay);
            if !due {
                report.objects_waiting += chunks.len() as u64;
            }
            due
        });
        if !by_owner.is_empty() {
            let meta = self.meta.clone();
            let started = Instant::now();
            let mut free: HashSet<(u128, u64)> = by_owner
                .iter()
                .flat_map(|(v, chunks)| chunks.iter().map(|(id, _)| (v.number(), *id)))
                .collect();
            let free = blocking(move || {
                meta.unmark_referenced(&mut free)?;
                Ok(free)
            })
            .await?;
            report.mark_duration = Some(started.elapsed());
            for (vol, chunks) in &mut by_owner {
                chunks.retain(|(id, _)| free.contains(&(vol.number(), *id)));
            }
        }
        for (vol, chunks) in by_owner {
            if chunks.is_empty() {
                continue;
            }
            let is_live = live.contains(&vol);
            if !pacing.due(&vol, &chunks, is_live, max_delay) {
                report.objects_waiting += chunks.len() as u64;
                continue;
            }
            if is_live {
                // No checkpoint in the middle of a split memtable's commits: its objects wait
                // for the next pass.
                let Some(written) = self.write_checkpoint(&vol, true).await? else {
                    report.objects_waiting += chunks.len() as u64;
                    continue;
                };
                pacing.checkpoint_bytes.insert(vol.clone(), written);
                report.checkpoints += 1;
                report.checkpoint_bytes += written;
                if self.gc_scope.get().is_some() && !self.still_the_writer(&vol).await {
                    report.objects_waiting += chunks.len() as u64;
                    continue;
                }
            }
            for (id, st) in &chunks {
                let key = chunk_key(&vol, *id);
                delete_retried(&self.backend, &key).await?;
                report.objects_deleted += 1;
                report.bytes_deleted += st.stored_bytes;
            }
            pacing.waiting_since.remove(&vol);
            let (meta, v) = (self.meta.clone(), vol.clone());
            let ids: Vec<(VolumeId, u64)> =
                chunks.iter().map(|(id, _)| (vol.clone(), *id)).collect();
            let left = blocking(move || {
                meta.forget_chunks(&ids)?;
                meta.chunk_stats(&v)
            })
            .await?;
            if !is_live && left.is_empty() {
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
                checkpoint_bytes = report.checkpoint_bytes,
                "garbage collected"
            );
        }
        metrics::counter!("vblock_gc_deleted_objects_total").increment(report.objects_deleted);
        metrics::counter!("vblock_gc_deleted_bytes_total").increment(report.bytes_deleted);
        metrics::counter!("vblock_gc_checkpoints_total").increment(report.checkpoints);
        metrics::counter!("vblock_gc_checkpoint_bytes_total").increment(report.checkpoint_bytes);
        metrics::gauge!("vblock_gc_waiting_objects").set(report.objects_waiting as f64);
        metrics::counter!("vblock_gc_passes_total").increment(1);
        Ok(report)
    }

    /// Cluster mode: whether volume `vol`'s chunks are this node's to collect: it keeps the
    /// volume's lease ([`Engine::set_cluster_gc`]), or this node deleted the volume (its
    /// lease went with it; its chunk stats stay here while snapshots or clones share its
    /// chunks, and no other node has them: [`MetaStore::deleted_here`], kept across restarts).
    /// Stats without a record alone do not count: a takeover cut short leaves those too.
    fn collects(&self, vol: &VolumeId) -> bool {
        self.gc_scope.get().is_some_and(|scope| scope(vol)) || self.meta.deleted_here(vol)
    }

    /// Cluster mode, before deleting chunks of live volume `vol` (after its checkpoint): whether
    /// a conditional PUT of its shipped WAL, started now, succeeds, proving that no takeover had
    /// fenced this node before the checkpoint and the chunks that made these objects dead were
    /// stored (a taker reads them all, so it needs none of the deleted objects). A volume that
    /// is not open here (held only for a snapshot) waits for a later pass.
    async fn still_the_writer(&self, vol: &VolumeId) -> bool {
        let Some(v) = self
            .open_volumes()
            .await
            .into_iter()
            .find(|v| v.id() == vol)
        else {
            return false;
        };
        match v.confirm_writer().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(volume = %vol, error = %e, "not deleting chunks: this node could not prove it still writes the volume");
                false
            }
        }
    }

    /// Cluster mode, before a mark pass (under the GC lock): installs every completed snapshot
    /// whose record copy is in the backend and not here, and forgets every completed one here
    /// whose record copy is gone (deleted through another node; a completed snapshot's copy was
    /// stored before it was marked completed). Pending and failed local snapshots stay.
    /// Returns the volumes with a snapshot pending on another node (its record copy says
    /// `pending`, its map is not stored yet): their chunks wait, since only that node knows
    /// what the snapshot uses. A pending copy of a volume whose lease this node keeps is
    /// abandoned ([`Engine::abandon_snapshot`]): the node that took it lost the lease, and
    /// unless it wins the snapshot's outcome first, the snapshot ends `error`. A record copy
    /// that does not decode is skipped (logged).
    async fn sync_snapshots_from_backend(&self) -> Result<HashSet<VolumeId>, VolumeError> {
        let mut frozen = HashSet::new();
        let keys: HashSet<String> = self.backend.list("snap-").await?.into_iter().collect();
        let local = self.list_snapshots().await?;
        let known: HashSet<&crate::ids::SnapshotId> =
            local.iter().map(|r| &r.snapshot_id).collect();
        for key in keys.iter().filter(|k| k.ends_with("/snapshot.json")) {
            let Some(id) = key
                .strip_suffix("/snapshot.json")
                .and_then(|id| crate::ids::SnapshotId::parse(id).ok())
            else {
                continue;
            };
            if known.contains(&id) {
                continue;
            }
            let Some(rec) = self
                .stored_record::<crate::records::SnapshotRecord>(key, "snapshot")
                .await?
            else {
                continue;
            };
            match rec.state {
                // Taken by another node that has not stored it yet. Should this node keep the
                // volume's lease, that node lost it: the snapshot is abandoned unless it won
                // its outcome first (then its record copy says completed soon).
                SnapshotStateName::Pending => {
                    let owned = self.collects(&rec.volume_id);
                    // Settled either way (error, or completed and installed from its map). A
                    // backend error is retried; an unreadable outcome is logged and keeps the
                    // volume's chunks rather than failing every pass.
                    let settled = owned
                        && match self.abandon_snapshot(&rec).await {
                            Ok(_) => true,
                            Err(e @ VolumeError::Corrupt { .. }) => {
                                tracing::error!(snapshot = %rec.snapshot_id, error = %e, "cannot settle an abandoned snapshot; its volume's garbage waits");
                                false
                            }
                            Err(e) => return Err(e),
                        };
                    if !settled {
                        frozen.insert(rec.volume_id);
                    }
                }
                SnapshotStateName::Completed => self.install_stored_snapshot(&rec).await?,
                // Never stored: nothing to install.
                SnapshotStateName::Error => {}
            }
        }
        for rec in &local {
            let stored = crate::backend::snapshot_record_key(&rec.snapshot_id);
            if rec.state == SnapshotStateName::Completed
                && rec.mount.is_none()
                && !keys.contains(&stored)
            {
                let (meta, id) = (self.meta.clone(), rec.snapshot_id.clone());
                blocking(move || meta.delete_snapshot(&id)).await?;
                tracing::info!(snapshot = %rec.snapshot_id, "forgot a snapshot deleted through another node");
            }
        }
        Ok(frozen)
    }

    /// Stores volume `vol`'s map, chunk stats and state in the backend as a map checkpoint
    /// (FORMAT.md, "Map object"), then deletes its older checkpoints. Returns the checkpoint's
    /// size in bytes.
    ///
    /// GC's passes take checkpoints only between memtables; this one is taken whatever the
    /// state (a test of recovery from a checkpoint an older build took in the middle of a split).
    pub async fn checkpoint_volume(&self, vol: &VolumeId) -> Result<u64, VolumeError> {
        Ok(self.write_checkpoint(vol, false).await?.unwrap_or(0))
    }

    /// Cluster mode, a volume closed after a drained unmount while this node keeps its lease:
    /// a map checkpoint (under the GC lock; nothing while a split memtable is half committed),
    /// so the next owner's takeover reads it and no chunk index. Returns its size in bytes.
    ///
    /// Errors: metadata and backend errors.
    pub async fn checkpoint_at_rest(&self, vol: &VolumeId) -> Result<Option<u64>, VolumeError> {
        let _gc = self.gc.lock().await;
        self.write_checkpoint(vol, true).await
    }

    /// [`Engine::checkpoint_volume`]; with `whole_memtables`, nothing (`None`) while a split
    /// memtable is half committed.
    async fn write_checkpoint(
        &self,
        vol: &VolumeId,
        whole_memtables: bool,
    ) -> Result<Option<u64>, VolumeError> {
        let meta = self.meta.clone();
        let lookup = BlockLookup::new(self.meta.clone(), vol.clone());
        let Some((body, next_object_id)) =
            blocking(move || meta.encode_map_object_if(&lookup, None, whole_memtables)).await?
        else {
            return Ok(None);
        };
        let key = checkpoint_key(vol, next_object_id);
        let body = Bytes::from(body);
        let written = body.len() as u64;
        put_retried(&self.backend, &key, body).await?;
        // Only older ones (keys sort like ids): a newer checkpoint is a later epoch's, whose
        // node took the volume over from this one.
        for old in self.backend.list(&checkpoint_prefix(vol)).await? {
            if old < key {
                delete_retried(&self.backend, &old).await?;
            }
        }
        Ok(Some(written))
    }

    /// Space accounting of volume `vol` (scans its map and chunk stats).
    pub async fn volume_space(&self, vol: &VolumeId) -> Result<VolumeSpace, VolumeError> {
        let rec = self
            .get_record(vol)
            .await?
            .ok_or_else(|| VolumeError::VolumeNotFound(vol.clone()))?;
        let meta = self.meta.clone();
        let v = vol.clone();
        let (allocated_blocks, stats) = blocking(move || {
            let (_, allocated) = BlockLookup::new(meta.clone(), v.clone()).summary()?;
            Ok((allocated, meta.chunk_stats(&v)?))
        })
        .await?;
        Ok(space_of(
            rec.size_bytes,
            allocated_blocks,
            stats.iter().map(|(_, s)| s),
        ))
    }

    /// Cluster mode: the space accounting of volume `vol` (`size_bytes` long) as its newest
    /// map checkpoint in the backend has it (writes since that checkpoint are not counted);
    /// `None` without one. For a volume no node holds and this node has no copy of.
    ///
    /// Errors: backend errors; a corrupt checkpoint.
    pub async fn stored_volume_space(
        &self,
        vol: &VolumeId,
        size_bytes: u64,
    ) -> Result<Option<VolumeSpace>, VolumeError> {
        let Some(key) = self.backend.list(&checkpoint_prefix(vol)).await?.pop() else {
            return Ok(None);
        };
        let body = self.backend.get(&key).await?;
        let decoded = tokio::task::spawn_blocking(move || crate::mapobj::MapObject::decode(&body))
            .await
            .map_err(|e| VolumeError::task("map checkpoint decode", e))?;
        let obj = decoded.map_err(|e| VolumeError::Corrupt {
            what: format!("map checkpoint {key}"),
            reason: e.to_string(),
        })?;
        let allocated = obj.extents.iter().map(|e| e.data_blocks()).sum();
        Ok(Some(space_of(
            size_bytes,
            allocated,
            obj.objects.iter().map(|(_, s)| s),
        )))
    }
}

/// The space accounting of a volume of `size_bytes` with `allocated_blocks` blocks of data in
/// its map and chunks of `stats`.
fn space_of<'a>(
    size_bytes: u64,
    allocated_blocks: u64,
    stats: impl Iterator<Item = &'a ChunkStats>,
) -> VolumeSpace {
    let mut space = VolumeSpace {
        size_bytes,
        allocated_bytes: allocated_blocks * BLOCK_SIZE,
        compression_ratio: 1.0,
        ..VolumeSpace::default()
    };
    let mut logical = 0u64;
    for s in stats {
        space.stored_bytes += s.stored_bytes;
        logical += s.data_blocks * BLOCK_SIZE;
        if s.data_blocks > 0 {
            let dead = s.data_blocks.saturating_sub(s.live_blocks);
            space.dead_bytes +=
                (u128::from(s.stored_bytes) * u128::from(dead) / u128::from(s.data_blocks)) as u64;
        } else {
            space.dead_bytes += s.stored_bytes;
        }
    }
    if space.stored_bytes > 0 {
        space.compression_ratio = logical as f64 / space.stored_bytes as f64;
    }
    space
}

impl MetaStore {
    /// Chunk objects no volume map uses any more (`live_blocks == 0`), of every volume,
    /// deleted or not: the candidates of garbage collection.
    pub fn dead_chunks(&self) -> Result<Vec<(VolumeId, u64, ChunkStats)>, MetaError> {
        let mut out = Vec::new();
        for item in self.db().prefix_iterator([PREFIX_CHUNK]) {
            let (k, v) = item?;
            if k.first() != Some(&PREFIX_CHUNK) {
                break;
            }
            let bad = || MetaError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "bad chunk key".into(),
            };
            let vol = std::str::from_utf8(&k[1..k.len().saturating_sub(8)])
                .ok()
                .and_then(|s| VolumeId::parse(s).ok())
                .ok_or_else(bad)?;
            let (id, st) = decode_stats_entry(&vol_key(PREFIX_CHUNK, &vol), &k, &v)?;
            if st.live_blocks == 0 {
                out.push((vol, id, st));
            }
        }
        Ok(out)
    }

    /// Removes `candidates` that some map — a volume's or a snapshot's — still references.
    pub fn unmark_referenced(
        &self,
        candidates: &mut std::collections::HashSet<(u128, u64)>,
    ) -> Result<(), MetaError> {
        if candidates.is_empty() {
            return Ok(());
        }
        let snapshots = self.list_snapshots()?;
        let mut maps: Vec<BlockLookup> = self
            .list_volumes()?
            .into_iter()
            .map(|r| BlockLookup::new(self.clone(), r.volume_id))
            .collect();
        maps.extend(
            snapshots
                .into_iter()
                .map(|s| BlockLookup::snapshot(self.clone(), &s.snapshot_id, s.volume_id)),
        );
        // Nothing may copy references between the listing above and the walks below (a
        // snapshot of a clone would carry a reference out of a map not yet walked):
        // Engine::create_snapshot holds the GC lock, as this pass does.
        fail::fail_point!("gc-mark-listed");
        for map in maps {
            map.for_each(|e| {
                if let crate::lookup::Target::Data(f) = e.target {
                    candidates.remove(&(f.owner, f.object_id));
                }
            })?;
        }
        Ok(())
    }

    /// Removes the stats of chunk `id` of `vol` (its object is gone).
    pub fn forget_chunks(&self, chunks: &[(VolumeId, u64)]) -> Result<(), MetaError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (vol, id) in chunks {
            batch.delete(vol_u64_key(PREFIX_CHUNK, vol, *id));
        }
        self.write_sync(batch)
    }
}

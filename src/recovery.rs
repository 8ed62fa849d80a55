//! Disaster recovery: rebuilds the metadata of volumes and snapshots from the backend alone
//! (FORMAT.md, "Recovery"): a volume from its newest map checkpoint and then its chunk objects
//! above it, in id order while the ids are contiguous, so that it holds a prefix of its writes;
//! then the shipped WAL objects (`VOLUMEID/wal/`) after what the chunks hold, which go into the
//! volume's local WAL and are replayed when it opens.

use std::collections::HashSet;

use crate::backend::{
    checkpoint_prefix, chunk_ids, chunk_key, volume_damaged_key, wal_object_counters, BackendError,
};
use crate::chunk::{self, FLAG_MORE_PARTS};
use crate::cluster::epoch::epoch_base;
use crate::engine::{max_extent_seq, Engine};
use crate::ids::VolumeId;
use crate::lookup::{BlockLookup, ChunkCommit, MapExtent};
use crate::mapobj::MapObject;
use crate::meta::{blocking, ChunkStats, VolumeState};
use crate::records::{SnapshotRecord, VolumeRecord};
use crate::volume::{read_chunk_index, Chain, VolumeError};
use crate::wal::Wal;

/// Counts chunk objects read, for a progress report.
pub(crate) struct Progress<'a> {
    done: u64,
    total: u64,
    report: &'a (dyn Fn(u64, u64) + Send + Sync),
}

impl<'a> Progress<'a> {
    /// A report of `total` chunk objects to `report`.
    pub(crate) fn new(total: u64, report: &'a (dyn Fn(u64, u64) + Send + Sync)) -> Self {
        Self {
            done: 0,
            total,
            report,
        }
    }

    /// `n` more chunk objects are accounted for.
    fn advance(&mut self, n: u64) {
        self.done += n;
        (self.report)(self.done, self.total);
    }
}

/// What a rebuild of a volume from the backend does when it finds the bucket damaged: a chunk
/// object that is there but short, fails verification or belongs elsewhere (puts are atomic,
/// so no crash leaves one), or shipped WAL objects past a break in their chain (one PUT is in
/// flight at a time, so no crash leaves one either). The chunks and records after the damage
/// may hold acknowledged writes; applying only what comes before it gives a prefix of the
/// volume's writes that may lack some of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDamage {
    /// Fail with [`VolumeError::Corrupt`] before deleting or writing anything of the volume's
    /// data (the takeover's epoch manifest and fence are stored by then, so an old owner is
    /// fenced): a takeover that is to serve the volume. The objects, and this node's local
    /// WAL of the volume, stay for an operator. Also while `VOLUMEID/damaged` is there.
    Refuse,
    /// Rebuild the prefix before the damage: disaster recovery (FORMAT.md, "Recovery"), and a
    /// takeover that is to delete the volume.
    KeepPrefix,
}

/// What ended [`Engine::apply_chunks`]'s walk of a volume's chunks.
enum ChunkWalk {
    /// Every chunk listed was applied.
    Whole,
    /// A chunk id is missing (a PUT that never finished: a crash of its owner, which had not
    /// committed it, so its records are still in the shipped WAL if they were flushed), or a
    /// memtable's last parts.
    Missing(String),
    /// A chunk is there but short, fails verification or belongs elsewhere: puts are atomic,
    /// so the bucket was damaged, and the chunks after it may hold acknowledged writes.
    Damaged(String),
}

/// The error of a takeover that finds the bucket damaged (`why`): it stops before it deletes
/// anything or writes any of the volume's data, so the objects stay for an operator
/// (docs/OPERATIONS.md, "When a volume or the daemon refuses to open"); the volume serves
/// nowhere meanwhile.
fn refused_takeover(id: &VolumeId, why: &str) -> VolumeError {
    metrics::counter!("vblock_takeovers_refused_damaged_total").increment(1);
    tracing::error!(volume = %id, why, "takeover refused: the bucket holds writes of this volume that cannot be applied in order; nothing was deleted");
    VolumeError::Corrupt {
        what: format!("volume {id} in the backend"),
        reason: format!("{why}; the takeover is refused (docs/OPERATIONS.md, \"When a volume or the daemon refuses to open\")"),
    }
}

impl Engine {
    /// Disaster recovery: rebuilds every volume found in the backend (`VOLUMEID/volume.json`)
    /// that the metadata DB does not know, from its newest map checkpoint and its chunk objects'
    /// headers and indexes (each extent carries its sequence number; newest wins), then every
    /// snapshot. Returns the volumes recovered. Meant for an empty data directory; data that was
    /// only in the lost WAL is not recoverable (FORMAT.md, "Recovery").
    ///
    /// Errors: backend errors other than a missing or corrupt chunk (which ends that volume's
    /// walk), a corrupt map checkpoint, metadata errors. A failed recovery is run again at the
    /// next start.
    pub async fn recover_from_backend(&self) -> Result<Vec<VolumeId>, VolumeError> {
        self.recover_from_backend_with(&|_, _| {}).await
    }

    /// [`Engine::recover_from_backend`], calling `progress(chunks_read, chunks_total)` after
    /// each chunk object's index is applied (progress bars).
    pub async fn recover_from_backend_with(
        &self,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Vec<VolumeId>, VolumeError> {
        let keys = self.backend.list("").await?;
        let mut progress = Progress {
            done: 0,
            total: keys.iter().filter(|k| k.contains("/chunks/")).count() as u64,
            report: progress,
        };
        let mut recovered = Vec::new();
        for key in keys.iter().filter(|k| k.ends_with("/volume.json")) {
            let Some(rec) = self.stored_record::<VolumeRecord>(key, "volume").await? else {
                continue;
            };
            if self.get_record(&rec.volume_id).await?.is_some() {
                continue;
            }
            let damage = OnDamage::KeepPrefix;
            let id = self
                .recover_volume(rec, &keys, None, damage, &mut progress)
                .await?;
            recovered.push(id);
        }
        self.recover_snapshots(&keys).await?;
        Ok(recovered)
    }

    /// Every volume record copy (`VOLUMEID/volume.json`) and snapshot record copy
    /// (`SNAPID/snapshot.json`) in the backend, but for snapshots whose delete has begun
    /// (cluster mode keeps a deleted snapshot's copies while clones pin it). Unreadable copies
    /// are skipped (logged). Lists the whole backend: for rebuilding a lost catalog.
    ///
    /// Errors: backend errors.
    pub async fn stored_records(
        &self,
    ) -> Result<(Vec<VolumeRecord>, Vec<SnapshotRecord>), VolumeError> {
        let keys = self.backend.list("").await?;
        let mut volumes = Vec::new();
        for key in keys.iter().filter(|k| k.ends_with("/volume.json")) {
            volumes.extend(self.stored_record::<VolumeRecord>(key, "volume").await?);
        }
        let mut snapshots = Vec::new();
        for key in keys
            .iter()
            .filter(|k| k.starts_with("snap-") && k.ends_with("/snapshot.json"))
        {
            if let Some(rec) = self
                .stored_record::<SnapshotRecord>(key, "snapshot")
                .await?
            {
                let deleted = crate::backend::snapshot_deleted_key(&rec.snapshot_id);
                if !keys.contains(&deleted) {
                    snapshots.push(rec);
                }
            }
        }
        Ok((volumes, snapshots))
    }

    /// The record copy stored under `key` (a `kind` record's JSON: volume or snapshot); `None`,
    /// logged, when it does not decode: recovery skips it rather than fail on one bad record.
    pub(crate) async fn stored_record<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        kind: &str,
    ) -> Result<Option<T>, VolumeError> {
        let body = self.backend.get(key).await?;
        Ok(serde_json::from_slice(&body)
            .map_err(
                |e| tracing::warn!(key = %key, error = %e, "skipping an unreadable {kind} record"),
            )
            .ok())
    }

    /// Rebuilds volume `rec` from the backend objects among `keys`: its map from the newest
    /// checkpoint, then the chunks above it, then its shipped WAL into the local WAL; with
    /// `epoch`, numbers its next chunk objects from that epoch's base and stores a map
    /// checkpoint under it (a takeover); stores the record (unmounted) last. `damage`: what a
    /// damaged bucket (a chunk that is there but unreadable, shipped WAL objects past a break)
    /// does to the rebuild.
    pub(crate) async fn recover_volume(
        &self,
        mut rec: VolumeRecord,
        keys: &[String],
        epoch: Option<u64>,
        damage: OnDamage,
        progress: &mut Progress<'_>,
    ) -> Result<VolumeId, VolumeError> {
        let id = rec.volume_id.clone();
        let started = std::time::Instant::now();
        let strict = damage == OnDamage::Refuse;
        let marker = volume_damaged_key(&id);
        if strict && keys.contains(&marker) {
            let why = format!("{marker}: a takeover for a delete found the bucket damaged");
            return Err(refused_takeover(&id, &why));
        }
        let mut ids = chunk_ids(&id, keys);
        ids.sort_unstable();
        let lookup = BlockLookup::new(self.meta.clone(), id.clone());
        let state = self.install_checkpoint(&lookup, keys, &ids).await?;
        // Chunks the checkpoint covers count as read; reported with the next one.
        progress.done += ids.iter().filter(|o| **o < state.next_object_id).count() as u64;
        ids.retain(|o| *o >= state.next_object_id);
        let (state, stop) = self.apply_chunks(&lookup, state, ids, progress).await?;
        let chunk_damage = match stop {
            ChunkWalk::Damaged(why) if strict => return Err(refused_takeover(&id, &why)),
            ChunkWalk::Damaged(why) => Some(why),
            _ => None,
        };
        let chunks_ms = started.elapsed().as_millis() as u64;
        let (shipped, wal_damage) = self
            .recover_shipped_wal(&id, keys, state.checkpoint, strict, epoch.is_some())
            .await?;
        if let (Some(_), Some(why)) = (epoch, chunk_damage.or(wal_damage)) {
            // A takeover for a delete went on past damage. Should the delete not happen after
            // all, its checkpoint below would hide the damage from the next takeover.
            tracing::error!(volume = %id, why, "a takeover for a delete found the bucket damaged; marking it");
            crate::retry::put_retried(&self.backend, &marker, why.into_bytes().into()).await?;
        }
        let shipped_ms = started.elapsed().as_millis() as u64;
        let mut state = state;
        if let Some(epoch) = epoch {
            // The epoch's ids, and a checkpoint under its base, before the record makes the
            // volume openable: recovery from the backend starts there from now on.
            state.next_object_id = state.next_object_id.max(epoch_base(epoch));
            let (meta, vol) = (self.meta.clone(), id.clone());
            blocking(move || meta.put_volume_state(&vol, state)).await?;
            self.checkpoint_volume(&id).await?;
        }
        rec.mount = None;
        let meta = self.meta.clone();
        blocking(move || meta.put_volume(&rec)).await?;
        tracing::info!(volume = %id, next_object_id = state.next_object_id, max_seq = state.max_seq, shipped_wal_records = shipped, chunks_ms, shipped_ms, elapsed_ms = started.elapsed().as_millis() as u64, "volume recovered from the backend");
        Ok(id)
    }

    /// Installs the newest map checkpoint of `lookup`'s volume among `keys` (or an empty map:
    /// an earlier recovery cut short may have left extents) and returns its state. Chunks in
    /// `ids` below the checkpoint's next object id that it does not list get empty stats, so GC
    /// deletes them.
    async fn install_checkpoint(
        &self,
        lookup: &BlockLookup,
        keys: &[String],
        ids: &[u64],
    ) -> Result<VolumeState, VolumeError> {
        let prefix = checkpoint_prefix(lookup.volume());
        // Fixed-width hex ids: the greatest key is the newest checkpoint.
        let Some(key) = keys.iter().filter(|k| k.starts_with(&prefix)).max() else {
            let (meta, l) = (self.meta.clone(), lookup.clone());
            let state = VolumeState::default();
            blocking(move || meta.install_map(&l, &[], Some((state, &[])), vec![])).await?;
            return Ok(state);
        };
        let body = self.backend.get(key).await?;
        let obj = MapObject::decode(&body).map_err(|e| VolumeError::Corrupt {
            what: format!("map checkpoint {key}"),
            reason: e.to_string(),
        })?;
        let state = VolumeState {
            checkpoint: obj.seq,
            next_object_id: obj.next_object_id,
            // Not the checkpoint: a split memtable's first chunks commit extents above it, and
            // new writes must get higher sequence numbers than every extent.
            max_seq: max_extent_seq(&obj.extents).max(obj.seq),
        };
        let known: HashSet<u64> = obj.objects.iter().map(|(id, _)| *id).collect();
        let mut objects = obj.objects.clone();
        objects.extend(
            ids.iter()
                .filter(|o| **o < obj.next_object_id && !known.contains(o))
                .map(|o| (*o, ChunkStats::default())),
        );
        let (meta, l) = (self.meta.clone(), lookup.clone());
        blocking(move || meta.install_map(&l, &obj.extents, Some((state, &objects)), vec![]))
            .await?;
        Ok(state)
    }

    /// Commits the chunks `ids` (sorted, above the checkpoint of `state`) to `lookup`'s map in
    /// id order — the order they were committed in — while the ids are contiguous: a chunk
    /// whose PUT never finished ends the walk, so no later chunk lands on top of the hole. A
    /// memtable split into several chunks is applied whole or not at all. The volume then holds
    /// a prefix of its writes. Returns the state after the last chunk applied and what ended
    /// the walk.
    async fn apply_chunks(
        &self,
        lookup: &BlockLookup,
        mut state: VolumeState,
        ids: Vec<u64>,
        progress: &mut Progress<'_>,
    ) -> Result<(VolumeState, ChunkWalk), VolumeError> {
        let id = lookup.volume().clone();
        let mut group: Vec<(ChunkCommit, u64)> = Vec::new();
        let mut stopped = ChunkWalk::Whole;
        for (expected, object_id) in (state.next_object_id.max(1)..).zip(ids) {
            progress.advance(1);
            if object_id != expected {
                stopped = ChunkWalk::Missing(format!("chunk {expected:#x} is missing"));
                break;
            }
            let okey = chunk_key(&id, object_id);
            let (header, index) = match read_chunk_index(&self.backend, &okey).await {
                Ok(v) => v,
                // Only an object that is gone, short or fails verification ends the walk (what
                // comes after it is then deleted at the next open); any other backend error (an
                // outage, denied access, expired credentials) fails the recovery, which is
                // tried again at the next start.
                Err(e @ VolumeError::Backend(BackendError::NotFound(_))) => {
                    stopped = ChunkWalk::Missing(format!("{okey} is gone: {e}"));
                    break;
                }
                Err(e @ VolumeError::Chunk { .. })
                | Err(e @ VolumeError::Backend(BackendError::BadRange { .. })) => {
                    stopped = ChunkWalk::Damaged(format!("{okey} is unreadable: {e}"));
                    break;
                }
                Err(e) => return Err(e),
            };
            if header.volume_tag != id.tag() || header.object_id != object_id {
                let why = format!("{okey} belongs to another volume or object");
                stopped = ChunkWalk::Damaged(why);
                break;
            }
            let commit = ChunkCommit {
                object_id,
                extents: index
                    .iter()
                    .map(|e| MapExtent::from_chunk(id.number(), object_id, e))
                    .collect(),
                stored_bytes: chunk::indexed_len(&header, &index),
            };
            group.push((commit, header.max_seq));
            if header.flags & FLAG_MORE_PARTS != 0 {
                continue;
            }
            for (commit, max_seq) in group.drain(..) {
                state = VolumeState {
                    checkpoint: state.checkpoint.max(max_seq),
                    next_object_id: state.next_object_id.max(commit.object_id + 1),
                    max_seq: state.max_seq.max(max_seq),
                };
                let (l, s) = (lookup.clone(), state);
                blocking(move || l.commit_chunk(&commit, s)).await?;
            }
        }
        if !group.is_empty() && matches!(stopped, ChunkWalk::Whole) {
            let why = "the last memtable's chunks are not all there".to_owned();
            stopped = ChunkWalk::Missing(why);
        }
        if let ChunkWalk::Missing(why) | ChunkWalk::Damaged(why) = &stopped {
            tracing::error!(volume = %id, next_object_id = state.next_object_id, %why, "recovery stops at a gap in the chunks: later chunks are not applied (the volume holds a prefix of its writes)");
        }
        Ok((state, stopped))
    }

    /// Replays volume `id`'s shipped WAL objects (if `keys` lists any) after seq `covered`
    /// (what its chunks hold) into its local WAL directory, where the volume's next open replays
    /// them. The objects are walked as [`Chain::load`] does (FORMAT.md, "Recovery"): the volume
    /// holds a prefix of its writes. Records the local WAL already holds are not written
    /// again. Returns the records written.
    ///
    /// Damage (objects past a break in the chain that no open dropped, a body that does not
    /// verify) is returned with the records written; with `strict` (a takeover to serve) it
    /// is [`VolumeError::Corrupt`] instead, before anything is written. With `replace_local`
    /// (a takeover) the local WAL directory is emptied first, once no damage was found: its
    /// records are of an earlier ownership here.
    ///
    /// Errors: backend errors other than a missing object, WAL errors.
    async fn recover_shipped_wal(
        &self,
        id: &VolumeId,
        keys: &[String],
        covered: u64,
        strict: bool,
        replace_local: bool,
    ) -> Result<(u64, Option<String>), VolumeError> {
        let (mut records, mut damage) = (Vec::new(), None);
        if !wal_object_counters(id, keys).is_empty() {
            let chain = Chain::load(&self.backend, id, covered).await?;
            if chain.damaged {
                damage = Some(format!(
                    "shipped WAL objects {:?} lie past a break in the chain after seq {covered}",
                    chain.orphans
                ));
            }
            let broken;
            (records, broken) = chain.records_after(&self.backend, id, covered).await?;
            if let Some(e) = broken {
                tracing::error!(volume = %id, error = %e, "replay of the shipped WAL stops here: later objects are not applied (the volume holds a prefix of its writes)");
                damage = damage.or(Some(e.to_string()));
            }
        }
        if let (true, Some(why)) = (strict, &damage) {
            return Err(refused_takeover(id, why));
        }
        if replace_local {
            self.clear_local_wal(id)?;
        }
        if records.is_empty() {
            return Ok((0, damage));
        }
        let config = &self.config.volume;
        let wal_config = config.wal_config(self.config.wal_dir.join(id.as_str()), id.to_string());
        let tag = id.tag();
        let wal = tokio::task::spawn_blocking(move || {
            let mut local_max = 0;
            Wal::open(&wal_config, tag, covered, |h, _| {
                local_max = local_max.max(h.seq)
            })
            .map(|(wal, _)| (wal, local_max))
        })
        .await
        .map_err(|e| VolumeError::task("WAL open", e))?;
        let (wal, local_max) = wal?;
        let mut written = 0;
        for (h, payload) in records.into_iter().filter(|(h, _)| h.seq > local_max) {
            wal.append(h.kind, h.seq, h.start_block, h.block_count, payload)?;
            written += 1;
        }
        wal.sync().await?;
        tokio::task::spawn_blocking(move || wal.shutdown(true))
            .await
            .map_err(|e| VolumeError::task("WAL shutdown", e))?;
        Ok((written, damage))
    }

    /// Recovers every snapshot whose record copy (`SNAPID/snapshot.json`) is among `keys` and
    /// that the metadata DB does not know, from its map object.
    async fn recover_snapshots(&self, keys: &[String]) -> Result<(), VolumeError> {
        for key in keys
            .iter()
            .filter(|k| k.starts_with("snap-") && k.ends_with("/snapshot.json"))
        {
            let Some(rec) = self
                .stored_record::<SnapshotRecord>(key, "snapshot")
                .await?
            else {
                continue;
            };
            // Only a completed copy has a map: a pending one (cluster mode, stored when taken)
            // or an error one (abandoned) was never completed.
            if rec.state != crate::records::SnapshotStateName::Completed
                || self.get_snapshot(&rec.snapshot_id).await?.is_some()
            {
                continue;
            }
            self.install_stored_snapshot(&rec).await?;
        }
        Ok(())
    }
}

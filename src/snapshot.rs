//! Snapshots (EC2 `CreateSnapshot` / `DescribeSnapshots` / `DeleteSnapshot`), clones
//! (`CreateVolume` with `SnapshotId`) and read-only snapshot exports.
//!
//! A snapshot copies no data: chunks are immutable, so it is the volume's map frozen at a
//! sequence number (`P SNAP` keys in RocksDB, referencing the volume's objects), plus a record.
//! It is `pending` until the map is stored in the backend as a map object (`SNAPID/map`) with the
//! record beside it (`SNAPID/snapshot.json`), then `completed`: from then on it survives the loss
//! of the local disk. A clone starts as a copy of the snapshot's map with the owner of every
//! frame written out (map value v2), so it shares the chunks; its own writes go to its own
//! objects. Garbage collection never deletes an object any map references (`crate::gc`).

use bytes::Bytes;

use crate::backend::{
    checkpoint_key, snapshot_deleted_key, snapshot_map_key, snapshot_outcome_key, snapshot_pin_key,
    snapshot_pins_prefix, snapshot_record_key, BackendError, SharedBackend,
};
use crate::block::BlockRange;
use crate::cache::FrameCache;
use crate::engine::{now_rfc3339, Engine};
use crate::ids::{SnapshotId, VolumeId};
use crate::lookup::{BlockLookup, MapExtent};
use crate::mapobj::MapObject;
use crate::meta::{blocking, MetaStore, VolumeState};
use crate::records::{SnapshotRecord, SnapshotStateName, VolumeRecord};
use crate::retry::{delete_retried, put_if_absent_retried, put_retried, RetryPolicy};
use crate::volume::read::{read_bytes, read_map, status};
use crate::volume::{StatusExtent, VolumeError};

/// A snapshot opened for reading (the read-only NBD export `SNAPID`).
#[derive(Clone)]
pub struct SnapshotVolume {
    id: SnapshotId,
    size: u64,
    lookup: BlockLookup,
    backend: SharedBackend,
    cache: FrameCache,
    retry: RetryPolicy,
    /// True once the snapshot's export ended (unmounted or deleted): every request fails.
    ended: tokio::sync::watch::Receiver<bool>,
}

impl SnapshotVolume {
    /// Snapshot id.
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    /// Size in bytes (the volume's size when the snapshot was taken).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `len` bytes at byte `offset` as the volume was at the snapshot.
    ///
    /// Errors: [`VolumeError::OutOfRange`], [`VolumeError::TooLarge`] above 32 MiB,
    /// [`VolumeError::Backend`] / [`VolumeError::Chunk`] when chunk data cannot be fetched or
    /// verified.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        self.check_open()?;
        read_bytes(offset, len, self.size, |r| async move {
            let map = self.map(r).await?;
            read_map(&self.cache, &self.backend, &self.retry, r, &map).await
        })
        .await
    }

    /// Allocation status of `offset..offset + len` (NBD `base:allocation`), as
    /// [`crate::Volume::block_status`].
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, VolumeError> {
        self.check_open()?;
        status(offset, len, self.size, |r| async move {
            Ok((Vec::new(), self.map(r).await?))
        })
        .await
    }

    /// Resolves once the snapshot is unmounted or deleted ([`Engine::unmount_snapshot`],
    /// [`Engine::delete_snapshot`]): every request from then on fails with
    /// [`VolumeError::Closed`], so an NBD connection to it ends.
    pub async fn closed(&self) {
        let mut rx = self.ended.clone();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// [`VolumeError::Closed`] once the snapshot's export ended: a reader never sees the zeros
    /// of a map that is gone.
    fn check_open(&self) -> Result<(), VolumeError> {
        if *self.ended.borrow() {
            Err(VolumeError::Closed)
        } else {
            Ok(())
        }
    }

    /// The map extents of block range `r` (a snapshot has no write buffer).
    async fn map(&self, r: BlockRange) -> Result<Vec<MapExtent>, VolumeError> {
        let lookup = self.lookup.clone();
        Ok(blocking(move || lookup.lookup(r.start, r.end)).await?)
    }
}

/// The table of snapshot export ends; a panic elsewhere while it was held leaves it usable.
fn ends(m: &std::sync::Mutex<SnapshotEnds>) -> std::sync::MutexGuard<'_, SnapshotEnds> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Per snapshot, the sender that ends its readers ([`SnapshotVolume::closed`]).
pub(crate) type SnapshotEnds =
    std::collections::HashMap<SnapshotId, tokio::sync::watch::Sender<bool>>;

impl Engine {
    /// Takes a snapshot of volume `vol`: flushes its buffer into chunks, freezes its map at the
    /// resulting sequence number and returns the `pending` record; the map and record are then
    /// copied to the backend in the background (`Progress` 0 → 100, state `completed`, or
    /// `error` when the backend keeps failing).
    ///
    /// Errors: [`VolumeError::VolumeNotFound`], [`VolumeError::Closed`] when the
    /// volume closes meanwhile, metadata errors.
    pub async fn create_snapshot(
        &self,
        vol: &VolumeId,
        description: &str,
    ) -> Result<SnapshotRecord, VolumeError> {
        Ok(self.create_snapshot_tracked(vol, description).await?.0)
    }

    /// [`Engine::create_snapshot`], with the task that stores the snapshot in the backend: it
    /// ends with the final record (`completed`, or `error`), also stored locally by then.
    pub async fn create_snapshot_tracked(
        &self,
        vol: &VolumeId,
        description: &str,
    ) -> Result<(SnapshotRecord, tokio::task::JoinHandle<SnapshotRecord>), VolumeError> {
        self.create_snapshot_as(vol, SnapshotId::generate(), description)
            .await
    }

    /// [`Engine::create_snapshot_tracked`] under SnapshotId `sid`, chosen by the caller
    /// (cluster mode records the snapshot in the catalog before it is taken).
    pub async fn create_snapshot_as(
        &self,
        vol: &VolumeId,
        sid: SnapshotId,
        description: &str,
    ) -> Result<(SnapshotRecord, tokio::task::JoinHandle<SnapshotRecord>), VolumeError> {
        // A close can end the instance under the snapshot (an unmount racing it): the next
        // instance, opened once the close is done, holds every write the closed one had.
        let mut attempt = 0;
        let rec = loop {
            let volume = self.volume(vol).await?;
            match self.capture_snapshot(&volume, &sid, description).await {
                Err(VolumeError::Closed) if attempt < 3 => attempt += 1,
                r => break r?,
            }
        };
        tracing::info!(snapshot = %rec.snapshot_id, volume = %vol, seq = rec.seq, "snapshot taken");
        if self.config.cluster {
            // Cluster mode: the pending record copy tells every node's garbage collection that
            // the volume's chunks wait for this snapshot's map (src/gc.rs), should the volume
            // move to another node before the map is stored. Stored only if no copy is there:
            // one is when another node settled the snapshot as abandoned meanwhile (this node
            // was slow to take it; `Engine::settle_unstored_snapshot`).
            let stored = match put_if_absent_retried(
                &self.backend,
                &snapshot_record_key(&rec.snapshot_id),
                record_json(&rec)?,
            )
            .await
            {
                Ok(true) => Ok(()),
                Ok(false) => Err(VolumeError::IncorrectState(format!(
                    "snapshot {} was settled by another node before it was taken (this node was too slow); take a new one",
                    rec.snapshot_id
                ))),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = stored {
                // Not taken after all: its frozen map would pin chunks here for good.
                let (meta, id) = (self.meta.clone(), rec.snapshot_id.clone());
                if let Err(e) = blocking(move || meta.delete_snapshot(&id)).await {
                    tracing::warn!(snapshot = %rec.snapshot_id, error = %e, "removing a snapshot whose record copy failed failed");
                }
                return Err(e);
            }
        }
        Ok((rec.clone(), self.publish(rec)))
    }

    /// Starts storing snapshot `rec` (pending, its map frozen here) in the backend.
    fn publish(&self, rec: SnapshotRecord) -> tokio::task::JoinHandle<SnapshotRecord> {
        let (meta, backend, cluster) =
            (self.meta.clone(), self.backend.clone(), self.config.cluster);
        tokio::spawn(async move { publish_snapshot(meta, backend, rec, cluster).await })
    }

    /// Stores again every snapshot left `pending` here (the process that took it ended before
    /// its map was in the backend; its map is frozen in the metadata): call once at start.
    /// Returns the tasks, each ending with the final record as [`Engine::create_snapshot_tracked`]'s.
    ///
    /// Errors: metadata errors.
    pub async fn resume_pending_snapshots(
        &self,
    ) -> Result<Vec<tokio::task::JoinHandle<SnapshotRecord>>, VolumeError> {
        let mut resumed = Vec::new();
        for rec in self.list_snapshots().await? {
            if rec.state != SnapshotStateName::Pending {
                continue;
            }
            // Cluster mode: only a snapshot whose pending record copy was stored is known to
            // other nodes' GC (which spared its chunks); one taken just before the crash was
            // never announced, nor answered: it goes.
            if self.config.cluster
                && self
                    .stored_snapshot(&rec.snapshot_id)
                    .await?
                    .is_none_or(|c| c.state != SnapshotStateName::Pending)
            {
                tracing::info!(snapshot = %rec.snapshot_id, "dropping a snapshot an earlier process left pending and never announced, or settled since");
                let (meta, id) = (self.meta.clone(), rec.snapshot_id.clone());
                blocking(move || meta.delete_snapshot(&id)).await?;
                continue;
            }
            tracing::info!(snapshot = %rec.snapshot_id, "storing a snapshot an earlier process left pending");
            resumed.push(self.publish(rec));
        }
        Ok(resumed)
    }

    /// The record copy of snapshot `id` in the backend, if there is one that decodes (an
    /// undecodable one is logged and counts as none).
    ///
    /// Errors: backend errors other than a missing object.
    pub async fn stored_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Option<SnapshotRecord>, VolumeError> {
        let key = snapshot_record_key(id);
        match self.backend.get(&key).await {
            Ok(body) => Ok(serde_json::from_slice(&body)
                .map_err(|e| tracing::warn!(%key, error = %e, "an unreadable snapshot record copy"))
                .ok()),
            Err(crate::backend::BackendError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Cluster mode: settles snapshot `rec` (a `pending` record copy, taken by another node
    /// whose lease on the volume this node now keeps) as `error`, unless the node that took it
    /// settled it `completed` first ([`settle_snapshot`]: its map is stored then, and this
    /// node installs it). Returns the outcome; the record copy says it.
    ///
    /// Errors: backend errors.
    pub(crate) async fn abandon_snapshot(
        &self,
        rec: &SnapshotRecord,
    ) -> Result<SnapshotStateName, VolumeError> {
        let outcome = self.settle_unstored_snapshot(rec).await?;
        if outcome == SnapshotStateName::Completed {
            // Its taker won after storing the map, but its completed record copy never
            // landed: completed here from the map.
            let done = SnapshotRecord {
                state: SnapshotStateName::Completed,
                progress: 100,
                ..rec.clone()
            };
            // The copy first: once installed here, the snapshot is known and not seen again.
            store_snapshot_record(&self.backend, &done).await?;
            self.install_stored_snapshot(&done).await?;
        } else if outcome == SnapshotStateName::Error {
            tracing::warn!(snapshot = %rec.snapshot_id, volume = %rec.volume_id, "a snapshot the volume's earlier owner never stored is marked error");
        }
        Ok(outcome)
    }

    /// Cluster mode: settles snapshot `rec` (a catalog record with no copy in the bucket: its
    /// node died before taking it, or is slow) through its outcome: `error` (and an error
    /// record copy, so a late taker's pending copy is refused) unless its node stored it and
    /// won the outcome first, then `completed` (its node writes the copy). Returns the
    /// outcome.
    ///
    /// Errors: backend errors; an unreadable outcome.
    pub(crate) async fn settle_unstored_snapshot(
        &self,
        rec: &SnapshotRecord,
    ) -> Result<SnapshotStateName, VolumeError> {
        let outcome =
            settle_snapshot(&self.backend, &rec.snapshot_id, SnapshotStateName::Error).await?;
        if outcome == SnapshotStateName::Error {
            let failed = SnapshotRecord {
                state: SnapshotStateName::Error,
                ..rec.clone()
            };
            store_snapshot_record(&self.backend, &failed).await?;
        }
        Ok(outcome)
    }

    /// Freezes `volume`'s map into a new snapshot record (the `pending` record, stored).
    /// Errors: [`VolumeError::Closed`] when the instance closes meanwhile; metadata errors.
    async fn capture_snapshot(
        &self,
        volume: &crate::Volume,
        sid: &SnapshotId,
        description: &str,
    ) -> Result<SnapshotRecord, VolumeError> {
        let rec = SnapshotRecord {
            snapshot_id: sid.clone(),
            volume_id: volume.id().clone(),
            volume_size_bytes: volume.size(),
            state: SnapshotStateName::Pending,
            start_time: now_rfc3339(),
            progress: 0,
            description: description.to_owned(),
            seq: 0,
            mount: None,
        };
        let meta = self.meta.clone();
        let r = rec.clone();
        // Most of the buffer goes into chunks before the GC lock is taken, so a slow backend
        // does not hold GC (and deletions, clones) back for the whole flush.
        volume.persist_buffer().await?;
        // A snapshot copies the volume's references, so it must not run during GC's mark step,
        // which lists the snapshots and then walks every map: a reference copied out of a map
        // not yet walked into a snapshot not listed would be missed, and its object deleted.
        let _gc = self.gc.lock().await;
        volume
            .with_frozen_map(move |state| {
                let rec = SnapshotRecord {
                    seq: state.checkpoint,
                    ..r
                };
                meta.capture_snapshot(&rec)?;
                Ok(rec)
            })
            .await
    }

    /// The record of snapshot `id`, if any.
    pub async fn get_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Option<SnapshotRecord>, VolumeError> {
        let (meta, id) = (self.meta.clone(), id.clone());
        Ok(blocking(move || meta.get_snapshot(&id)).await?)
    }

    /// The record of snapshot `id`. Errors: [`VolumeError::SnapshotNotFound`]; metadata errors.
    async fn existing_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord, VolumeError> {
        self.get_snapshot(id)
            .await?
            .ok_or_else(|| VolumeError::SnapshotNotFound(id.clone()))
    }

    /// Every snapshot record, ordered by id.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, VolumeError> {
        let meta = self.meta.clone();
        Ok(blocking(move || meta.list_snapshots()).await?)
    }

    /// Deletes snapshot `id` (backend copy, then the local map) and frees the chunks only it
    /// used. A `pending` snapshot cannot be deleted until its copy finished.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`], [`VolumeError::IncorrectState`] for a pending
    /// snapshot, [`VolumeError::InUse`] for a mounted one; backend errors.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), VolumeError> {
        self.existing_snapshot(id).await?;
        self.delete_snapshot_copies(id, true).await
    }

    /// Deletes snapshot `id` wherever this node has it: its local copy (if any; refused while
    /// pending or mounted here), then, with `stored`, its record and map in the backend (cluster
    /// mode keeps them while volumes cloned from it exist: they pin the chunks it shares with
    /// them for every node's garbage collection). Frees the chunks only it used.
    ///
    /// Errors: [`VolumeError::IncorrectState`] for a pending snapshot, [`VolumeError::InUse`]
    /// for one mounted here; backend and metadata errors.
    pub async fn delete_snapshot_copies(
        &self,
        id: &SnapshotId,
        stored: bool,
    ) -> Result<(), VolumeError> {
        {
            let _gc = self.gc.lock().await;
            let _mounts = self.snapshot_mounts.lock().await;
            let local = self.get_snapshot(id).await?;
            if let Some(rec) = &local {
                if rec.state == SnapshotStateName::Pending {
                    return Err(VolumeError::IncorrectState(format!(
                        "snapshot {id} is pending; delete it once it completes"
                    )));
                }
                if rec.mount.is_some() {
                    return Err(VolumeError::InUse(format!(
                        "snapshot {id} is mounted (exported over NBD); unmount it first"
                    )));
                }
            }
            if stored {
                // The record copy goes first: a half-deleted snapshot is never recovered.
                // The outcome object (cluster mode) stays: it keeps a late taker from
                // completing the deleted snapshot again.
                for key in [snapshot_record_key(id), snapshot_map_key(id)] {
                    delete_retried(&self.backend, &key).await?;
                }
            }
            if local.is_some() {
                let (meta, sid) = (self.meta.clone(), id.clone());
                blocking(move || meta.delete_snapshot(&sid)).await?;
            }
            self.end_snapshot_readers(id);
        }
        tracing::info!(snapshot = %id, "snapshot deleted");
        self.collect_garbage().await?;
        Ok(())
    }

    /// Cluster mode: pins snapshot `id` for clone `volume` (stores `SNAPID/clones/VOLUMEID`)
    /// before the clone shares its chunks, then checks that no delete of the snapshot has begun
    /// (`SNAPID/deleted`). A delete stores that marker before it lists the pins, and the store
    /// is linearizable (S3's read-after-write): either the delete lists this pin and keeps the
    /// snapshot's record copy and map, or this check finds the marker (FORMAT.md, "Clone
    /// pins"). The catalog (JetStream KV) is not trusted with this: a lost or stale record there
    /// would let the snapshot's map go while a clone shares its chunks.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`] when a delete has begun (the pin is removed
    /// again); backend errors.
    pub async fn pin_snapshot(
        &self,
        id: &SnapshotId,
        volume: &VolumeId,
    ) -> Result<(), VolumeError> {
        put_retried(&self.backend, &snapshot_pin_key(id, volume), Bytes::new()).await?;
        if self.snapshot_delete_begun(id).await? {
            self.unpin_snapshot(id, volume).await?;
            return Err(VolumeError::SnapshotNotFound(id.clone()));
        }
        Ok(())
    }

    /// Cluster mode: removes clone `volume`'s pin on snapshot `id` (once the clone's objects
    /// are gone, or it was never made). Missing is not an error.
    ///
    /// Errors: backend errors.
    pub async fn unpin_snapshot(
        &self,
        id: &SnapshotId,
        volume: &VolumeId,
    ) -> Result<(), VolumeError> {
        Ok(delete_retried(&self.backend, &snapshot_pin_key(id, volume)).await?)
    }

    /// Cluster mode, deleting snapshot `id`: stores its delete marker (`SNAPID/deleted`; from
    /// then on [`Engine::pin_snapshot`] refuses it), then lists its clone pins. Returns the
    /// pins' names (each a clone's VolumeId as stored): while any is left, the snapshot's
    /// record copy and map must stay. Called again when a clone goes, it tells whether the
    /// last pin went.
    ///
    /// Errors: backend errors.
    pub async fn mark_snapshot_deleted(&self, id: &SnapshotId) -> Result<Vec<String>, VolumeError> {
        put_retried(&self.backend, &snapshot_deleted_key(id), Bytes::new()).await?;
        let prefix = snapshot_pins_prefix(id);
        let pins = crate::retry::retry(&RetryPolicy::reads(), &prefix, || {
            self.backend.list(&prefix)
        })
        .await?;
        Ok(pins
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect())
    }

    /// Whether volume `id`'s record copy (`VOLUMEID/volume.json`) is in the backend: the
    /// volume exists, or is being deleted or created.
    ///
    /// Errors: backend errors.
    pub async fn volume_copy_exists(&self, id: &VolumeId) -> Result<bool, VolumeError> {
        self.object_exists(&crate::backend::volume_record_key(id))
            .await
    }

    /// Cluster mode: whether a delete of snapshot `id` has begun (its delete marker is stored).
    ///
    /// Errors: backend errors.
    pub async fn snapshot_delete_begun(&self, id: &SnapshotId) -> Result<bool, VolumeError> {
        self.object_exists(&snapshot_deleted_key(id)).await
    }

    /// Whether an object is stored under `key` (a GET, retried like other control-plane reads).
    async fn object_exists(&self, key: &str) -> Result<bool, VolumeError> {
        match crate::retry::retry(&RetryPolicy::reads(), key, || self.backend.get(key)).await {
            Ok(_) => Ok(true),
            Err(BackendError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Snapshot `id`'s local record, first installing it from the backend (its record copy
    /// and map object) when this node does not have it (cluster mode: the snapshot was taken
    /// on another node). Only a completed copy is installed: a pending one is still being
    /// stored by the node that took it, and a local record installed pending would stay
    /// pending here (unmountable, undeletable).
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`] when neither has it;
    /// [`VolumeError::IncorrectState`] while the copy is not completed; a corrupt map object;
    /// backend and metadata errors.
    pub async fn load_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord, VolumeError> {
        if let Some(rec) = self.get_snapshot(id).await? {
            return Ok(rec);
        }
        let key = snapshot_record_key(id);
        let body = match self.backend.get(&key).await {
            Ok(b) => b,
            Err(crate::backend::BackendError::NotFound(_)) => {
                return Err(VolumeError::SnapshotNotFound(id.clone()))
            }
            Err(e) => return Err(e.into()),
        };
        let rec: SnapshotRecord =
            serde_json::from_slice(&body).map_err(|e| VolumeError::Corrupt {
                what: key.clone(),
                reason: e.to_string(),
            })?;
        if rec.state != SnapshotStateName::Completed {
            return Err(VolumeError::IncorrectState(format!(
                "snapshot {id} is not completed ({:?}) on the node that took it; try again once it is",
                rec.state
            )));
        }
        self.install_stored_snapshot(&rec).await?;
        Ok(rec)
    }

    /// Installs snapshot `rec` (stored in the backend, not known here) from its map object.
    pub(crate) async fn install_stored_snapshot(
        &self,
        rec: &SnapshotRecord,
    ) -> Result<(), VolumeError> {
        let map_key = snapshot_map_key(&rec.snapshot_id);
        let body = self.backend.get(&map_key).await?;
        let meta = self.meta.clone();
        let r = SnapshotRecord {
            mount: None,
            ..rec.clone()
        };
        blocking(move || {
            let obj = MapObject::decode(&body).map_err(|e| crate::meta::MetaError::Corrupt {
                key: map_key,
                reason: e.to_string(),
            })?;
            let lookup = BlockLookup::snapshot(meta.clone(), &r.snapshot_id, r.volume_id.clone());
            meta.install_map(&lookup, &obj.extents, None, vec![])?;
            meta.put_snapshot(&r)
        })
        .await?;
        tracing::info!(snapshot = %rec.snapshot_id, volume = %rec.volume_id, "snapshot installed from the backend");
        Ok(())
    }

    /// Opens snapshot `id` for reading. A snapshot in state `error` is readable too (its local
    /// map is complete; only the backend copy failed).
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`].
    pub async fn snapshot_volume(&self, id: &SnapshotId) -> Result<SnapshotVolume, VolumeError> {
        let rec = self.existing_snapshot(id).await?;
        let ended = ends(&self.snapshot_ends)
            .entry(id.clone())
            .or_insert_with(|| tokio::sync::watch::channel(false).0)
            .subscribe();
        Ok(SnapshotVolume {
            id: id.clone(),
            size: rec.volume_size_bytes,
            lookup: BlockLookup::snapshot(self.meta.clone(), id, rec.volume_id),
            backend: self.backend.clone(),
            cache: self.cache.clone(),
            retry: self.config.volume.read_retry,
            ended,
        })
    }

    /// Ends every reader of snapshot `id` opened so far ([`SnapshotVolume::closed`]); readers
    /// opened later start afresh.
    fn end_snapshot_readers(&self, id: &SnapshotId) {
        if let Some(tx) = ends(&self.snapshot_ends).remove(id) {
            tx.send_replace(true);
        }
    }

    /// Mounts snapshot `id` (its read-only NBD export) with `mount`, or returns the record as it
    /// is when it is mounted already (mounts are idempotent; the caller compares the node).
    /// Under the snapshot mount lock, which a deletion takes too, so that the two never race
    /// (not the GC lock: a mount must not wait for a GC pass).
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`], [`VolumeError::IncorrectState`] while it is
    /// `pending` (its record is still being rewritten); metadata errors.
    pub async fn mount_snapshot(
        &self,
        id: &SnapshotId,
        mount: crate::records::Mount,
    ) -> Result<SnapshotRecord, VolumeError> {
        let _mounts = self.snapshot_mounts.lock().await;
        let mut rec = self.existing_snapshot(id).await?;
        if rec.mount.is_some() {
            return Ok(rec);
        }
        if rec.state == SnapshotStateName::Pending {
            return Err(VolumeError::IncorrectState(format!(
                "snapshot {id} is pending; mount it once it completes"
            )));
        }
        if rec.state == SnapshotStateName::Error && self.config.cluster {
            // Its chunks are not pinned in the bucket: the volume's owner may delete them.
            return Err(VolumeError::IncorrectState(format!(
                "snapshot {id} failed (state error); it cannot be mounted"
            )));
        }
        rec.mount = Some(mount);
        let (meta, r) = (self.meta.clone(), rec.clone());
        blocking(move || meta.put_snapshot(&r)).await?;
        Ok(rec)
    }

    /// Unmounts snapshot `id`: its export ends and every connected reader's requests fail from
    /// now on. `node`: only if it was mounted through this node (`ebs.NODE.unmount`). Returns
    /// whether it was mounted.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`], [`VolumeError::InUse`] when mounted through
    /// another node; metadata errors.
    pub async fn unmount_snapshot(
        &self,
        id: &SnapshotId,
        node: Option<&str>,
    ) -> Result<bool, VolumeError> {
        let _mounts = self.snapshot_mounts.lock().await;
        let mut rec = self.existing_snapshot(id).await?;
        if let Some(why) = rec
            .mount
            .as_ref()
            .and_then(|m| m.other_node(id.as_str(), node))
        {
            return Err(VolumeError::InUse(why));
        }
        let was = rec.mount.take().is_some();
        if was {
            let (meta, r) = (self.meta.clone(), rec.clone());
            blocking(move || meta.put_snapshot(&r)).await?;
        }
        self.end_snapshot_readers(id);
        Ok(was)
    }

    /// Creates volume `rec` as a clone of completed snapshot `snap`: its map starts as the
    /// snapshot's (sharing its chunks), its sequence numbers continue after the snapshot's, and a
    /// map checkpoint in the backend makes it recoverable without the snapshot. Immediately usable.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`], [`VolumeError::IncorrectState`] for an
    /// unfinished snapshot, [`VolumeError::InvalidArgument`] for a size smaller than the
    /// snapshot's volume; backend and metadata errors.
    pub async fn create_volume_from_snapshot(
        &self,
        rec: VolumeRecord,
        snap: &SnapshotId,
    ) -> Result<(), VolumeError> {
        Self::check_size(rec.size_bytes)?;
        let _gc = self.gc.lock().await;
        let s = self.existing_snapshot(snap).await?;
        if s.state != SnapshotStateName::Completed {
            return Err(VolumeError::IncorrectState(format!(
                "snapshot {snap} is not completed"
            )));
        }
        if rec.size_bytes < s.volume_size_bytes {
            return Err(VolumeError::InvalidArgument(format!(
                "volume size {} bytes is smaller than snapshot {snap} ({} bytes)",
                rec.size_bytes, s.volume_size_bytes
            )));
        }
        let source = BlockLookup::snapshot(self.meta.clone(), snap, s.volume_id.clone());
        let extents = blocking(move || source.all()).await?;
        let state = VolumeState {
            checkpoint: s.seq,
            next_object_id: 1,
            // A split memtable's first chunks may have committed extents above the snapshot's
            // checkpoint: the clone's writes must sequence after all of them.
            max_seq: crate::engine::max_extent_seq(&extents).max(s.seq),
        };
        let id = rec.volume_id.clone();
        let obj = MapObject {
            owner: id.number(),
            seq: s.seq,
            next_object_id: 1,
            objects: Vec::new(),
            extents,
        };
        let key = checkpoint_key(&id, 1);
        let body = Bytes::from(obj.encode());
        put_retried(&self.backend, &key, body).await?;
        self.publish_record(&rec).await?;
        let meta = self.meta.clone();
        blocking(move || {
            let lookup = BlockLookup::new(meta.clone(), rec.volume_id.clone());
            let entry = meta.volume_entry(&rec)?;
            meta.install_map(&lookup, &obj.extents, Some((state, &[])), vec![entry])
        })
        .await?;
        tracing::info!(volume = %id, snapshot = %snap, "volume created from snapshot");
        Ok(())
    }
}

/// Stores snapshot record `rec`'s copy (`SNAPID/snapshot.json`) in the backend (bounded
/// retries).
/// Cluster mode: proposes outcome `proposed` (`completed` or `error`) for snapshot `id` with
/// a conditional PUT of `SNAPID/outcome`; returns the outcome that stands (the proposal, or
/// the one stored first).
///
/// Errors: backend errors.
async fn settle_snapshot(
    backend: &SharedBackend,
    id: &SnapshotId,
    proposed: SnapshotStateName,
) -> Result<SnapshotStateName, VolumeError> {
    let key = snapshot_outcome_key(id);
    let body = serde_json::to_vec(&proposed).map_err(|e| VolumeError::Internal(e.to_string()))?;
    if put_if_absent_retried(backend, &key, body.into()).await? {
        return Ok(proposed);
    }
    let stored = backend.get(&key).await?;
    serde_json::from_slice(&stored).map_err(|e| VolumeError::Corrupt {
        what: key,
        reason: e.to_string(),
    })
}

async fn store_snapshot_record(
    backend: &SharedBackend,
    rec: &SnapshotRecord,
) -> Result<(), VolumeError> {
    put_retried(
        backend,
        &snapshot_record_key(&rec.snapshot_id),
        record_json(rec)?,
    )
    .await?;
    Ok(())
}

/// Snapshot record `rec` as its record copy's JSON.
fn record_json(rec: &SnapshotRecord) -> Result<Bytes, VolumeError> {
    serde_json::to_vec(rec)
        .map(Bytes::from)
        .map_err(|e| VolumeError::Internal(e.to_string()))
}

/// Copies a snapshot's frozen map and then its record to the backend and marks it `completed`
/// (`error` after the retries run out).
/// In cluster mode (`settle`), the snapshot is `completed` only if it wins its outcome
/// ([`settle_snapshot`]) after the map is stored; a snapshot the volume's next owner abandoned
/// first ends `error`.
async fn publish_snapshot(
    meta: MetaStore,
    backend: SharedBackend,
    mut rec: SnapshotRecord,
    settle: bool,
) -> SnapshotRecord {
    let id = rec.snapshot_id.clone();
    let result: Result<(), VolumeError> = async {
        let lookup = BlockLookup::snapshot(meta.clone(), &id, rec.volume_id.clone());
        let m = meta.clone();
        let seq = rec.seq;
        let (body, _) = blocking(move || m.encode_map_object(&lookup, Some(seq))).await?;
        let key = snapshot_map_key(&id);
        let body = Bytes::from(body);
        put_retried(&backend, &key, body).await?;
        rec.state = SnapshotStateName::Completed;
        if settle {
            rec.state = settle_snapshot(&backend, &id, SnapshotStateName::Completed).await?;
        }
        if rec.state != SnapshotStateName::Completed {
            // Abandoned by the volume's next owner, which stored the error copy (and the
            // snapshot may be deleted since): the map is nobody's.
            delete_retried(&backend, &snapshot_map_key(&id)).await?;
            return Ok(());
        }
        rec.progress = 100;
        store_snapshot_record(&backend, &rec).await?;
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        tracing::error!(snapshot = %id, error = %e, "snapshot could not be stored in the backend");
        rec.state = SnapshotStateName::Error;
    } else if rec.state == SnapshotStateName::Completed {
        tracing::info!(snapshot = %id, "snapshot completed");
    } else {
        tracing::error!(snapshot = %id, "snapshot abandoned by the volume's next owner before it was stored");
    }
    let r = rec.clone();
    if let Err(e) = blocking(move || meta.put_snapshot(&r)).await {
        tracing::error!(snapshot = %id, error = %e, "snapshot record update failed");
    }
    rec
}

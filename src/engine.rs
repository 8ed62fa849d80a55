//! The engine: every volume of one daemon — metadata DB, backend, frame cache, open volumes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::backend::{checkpoint_prefix, volume_prefix, volume_record_key, SharedBackend};
use crate::block::{BLOCK_SIZE, MAX_VOLUME_BYTES};
use crate::cache::{frame_cache, FrameCache};
use crate::cluster::lease::Tenure;
use crate::ids::VolumeId;
use crate::instances::Instances;
use crate::lookup::MapExtent;
use crate::meta::{blocking, ChunkStats, MetaStore};
use crate::records::{VolumeRecord, VolumeStateName};
use crate::retry::{delete_retried, put_retried};
use crate::volume::{Volume, VolumeConfig, VolumeError};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory for RocksDB metadata (`DATA_DIR/meta`).
    pub data_dir: PathBuf,
    /// Directory holding one WAL directory per volume (`WAL_DIR/VOLUMEID/`).
    pub wal_dir: PathBuf,
    /// Per-volume engine settings.
    pub volume: VolumeConfig,
    /// RocksDB block cache in bytes (default 64 MiB): the bounded in-memory part of the map.
    pub meta_cache_bytes: usize,
    /// Decompressed-frame cache in bytes, shared by all volumes (default 256 MiB).
    pub frame_cache_bytes: u64,
    /// How long closing a volume may spend turning its buffer into chunks (default 30 s).
    pub close_drain_timeout: Duration,
    /// Cluster mode (`--cluster`): garbage collection deletes nothing until
    /// [`Engine::set_cluster_gc`] says which volumes this node owns, and snapshots store a
    /// pending record copy in the backend when taken.
    pub cluster: bool,
}

impl EngineConfig {
    /// Defaults with everything under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            wal_dir: data_dir.join("wal"),
            data_dir,
            volume: VolumeConfig::default(),
            meta_cache_bytes: 64 << 20,
            frame_cache_bytes: 256 << 20,
            close_drain_timeout: Duration::from_secs(30),
            cluster: false,
        }
    }
}

/// All volumes of one daemon.
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) meta: MetaStore,
    pub(crate) backend: SharedBackend,
    pub(crate) cache: FrameCache,
    /// The one live instance of each open volume.
    instances: Instances,
    /// Serialises what adds or removes map references across volumes: garbage collection,
    /// snapshot creation and deletion, clone creation, volume deletion.
    pub(crate) gc: tokio::sync::Mutex<GcPacing>,
    /// Per snapshot opened for reading: set to true when its export ends (unmount, delete), so
    /// that every reader of it stops (src/snapshot.rs).
    pub(crate) snapshot_ends: std::sync::Mutex<crate::snapshot::SnapshotEnds>,
    /// Serialises snapshot mounts, unmounts and deletions (taken after `gc` when both are).
    pub(crate) snapshot_mounts: tokio::sync::Mutex<()>,
    /// Cluster mode ([`Engine::set_cluster_gc`]): the volumes whose chunks this node may
    /// delete.
    pub(crate) gc_scope: std::sync::OnceLock<GcScope>,
    /// Cluster mode ([`Engine::set_cluster_tenure`]): the lease each volume is opened under.
    tenure_of: std::sync::OnceLock<TenureOf>,
}

/// Cluster mode: the tenure of this node's lease on a volume, `None` when it keeps none. See
/// [`Engine::set_cluster_tenure`].
pub type TenureOf = std::sync::Arc<dyn Fn(&VolumeId) -> Option<Tenure> + Send + Sync>;

/// Cluster mode: whether this node may delete chunk objects of a volume (it owns the volume:
/// it keeps its lease). See [`Engine::set_cluster_gc`].
pub type GcScope = std::sync::Arc<dyn Fn(&VolumeId) -> bool + Send + Sync>;

/// What the periodic pass remembers between passes to pace map checkpoints (in memory: a
/// restarted daemon starts without it, and its first pass frees whatever it may).
#[derive(Debug, Default)]
pub(crate) struct GcPacing {
    /// Size in bytes of the last map checkpoint written for each volume.
    pub(crate) checkpoint_bytes: HashMap<VolumeId, u64>,
    /// Since when each volume's garbage has been waiting.
    pub(crate) waiting_since: HashMap<VolumeId, Instant>,
}

impl GcPacing {
    /// Whether garbage `chunks` of volume `vol` go now: garbage of a deleted volume needs no
    /// checkpoint; a live volume's goes once its stored bytes outweigh the checkpoint its
    /// deletion costs (so checkpoints never write more than they free) or it has waited
    /// `max_delay`.
    pub(crate) fn due(
        &self,
        vol: &VolumeId,
        chunks: &[(u64, ChunkStats)],
        live: bool,
        max_delay: Duration,
    ) -> bool {
        let bytes: u64 = chunks.iter().map(|(_, st)| st.stored_bytes).sum();
        !live
            || bytes >= self.checkpoint_bytes.get(vol).copied().unwrap_or(0)
            || self
                .waiting_since
                .get(vol)
                .is_some_and(|since| since.elapsed() >= max_delay)
    }
}

/// The record of volume `id` in `meta`, if any (read on a blocking thread).
async fn read_record(meta: MetaStore, id: VolumeId) -> Result<Option<VolumeRecord>, VolumeError> {
    Ok(blocking(move || meta.get_volume(&id)).await?)
}

/// The highest sequence number among `extents` (0 for none).
pub(crate) fn max_extent_seq(extents: &[MapExtent]) -> u64 {
    extents.iter().map(|e| e.seq).max().unwrap_or(0)
}

/// RFC 3339 timestamp of now, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Gives every volume record written mounted before mounts had a secret (`"mounted": true`)
/// a [`Mount`](crate::records::Mount) with a new secret, so that it stays mounted (refused by
/// deletes and resizes); its platform gets the new export name from its next `ebs.mount`.
fn upgrade_legacy_mounts(meta: &MetaStore) -> Result<(), crate::meta::MetaError> {
    for mut rec in meta.list_volumes()? {
        if rec.legacy_mounted && rec.mount.is_none() {
            rec.mount = Some(crate::records::Mount::new(
                String::new(),
                String::new(),
                false,
                now_rfc3339(),
            ));
            rec.legacy_mounted = false;
            meta.put_volume(&rec)?;
            tracing::info!(volume = %rec.volume_id, "mount upgraded: its export name now carries a secret (ebs.mount returns it)");
        }
    }
    Ok(())
}

impl Engine {
    /// Opens the metadata DB under `config.data_dir/meta` and uses `backend` for chunks.
    pub async fn open(config: EngineConfig, backend: SharedBackend) -> Result<Self, VolumeError> {
        let dir = config.data_dir.join("meta");
        let cache_bytes = config.meta_cache_bytes;
        std::fs::create_dir_all(&dir)
            .and_then(|()| config.volume.fs.create_dir_all(&config.wal_dir))
            .map_err(|source| VolumeError::Io {
                what: format!(
                    "creating the data directories under {}",
                    config.data_dir.display()
                ),
                source,
            })?;
        let meta = blocking(move || MetaStore::open(&dir, cache_bytes)).await?;
        let m = meta.clone();
        blocking(move || upgrade_legacy_mounts(&m)).await?;
        Ok(Self {
            cache: frame_cache(config.frame_cache_bytes),
            config,
            meta,
            backend,
            instances: Instances::default(),
            gc: tokio::sync::Mutex::new(Default::default()),
            snapshot_ends: Default::default(),
            snapshot_mounts: Default::default(),
            gc_scope: std::sync::OnceLock::new(),
            tenure_of: std::sync::OnceLock::new(),
        })
    }

    /// Cluster mode (docs/design/cluster.md, "Constraints"): garbage collection deletes chunk
    /// objects only of volumes `scope` admits (those this node owns: a stale copy of another
    /// node's volume says nothing about what that node's map uses), and first installs every
    /// snapshot stored in the backend that this node does not have, and forgets completed ones
    /// deleted there, so that the mark pass counts every node's snapshots (and, through the
    /// snapshot maps kept while clones of them exist, every clone's shared chunks). Set once.
    pub fn set_cluster_gc(&self, scope: GcScope) {
        if self.gc_scope.set(scope).is_err() {
            tracing::warn!("the cluster GC scope was set twice; the first one stays");
        }
    }

    /// Cluster mode: a volume opens only under the lease `tenure_of` gives for it (one this
    /// node keeps and has not lost), and serves I/O (NBD reads, writes, flushes) only while
    /// that lease holds. Until this is set, no volume opens: a restarted daemon serves nothing
    /// before its control plane knows which leases it keeps. Set once.
    pub fn set_cluster_tenure(&self, tenure_of: TenureOf) {
        if self.tenure_of.set(tenure_of).is_err() {
            tracing::warn!("the cluster tenure was set twice; the first one stays");
        }
    }

    /// The metadata store (volume records).
    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }

    /// Bytes of decompressed frames in the shared frame cache (bounded by its capacity).
    pub fn frame_cache_bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// Current capacity of the frame cache in bytes: `EngineConfig::frame_cache_bytes` unless
    /// [`Engine::set_frame_cache_capacity`] changed it.
    pub fn frame_cache_capacity(&self) -> u64 {
        self.cache.capacity()
    }

    /// Sets the frame cache's capacity in bytes (at least 1 MiB), evicting frames at once when
    /// it holds more. The daemon's memory target uses it to let the cache give way to the write
    /// path (cli/src/memory.rs); reads of evicted frames go to the backend again.
    pub fn set_frame_cache_capacity(&self, bytes: u64) {
        self.cache.set_capacity(bytes.max(1 << 20));
    }

    /// Current capacity of RocksDB's block cache (the in-memory part of the block map) in
    /// bytes: `EngineConfig::meta_cache_bytes` unless [`Engine::set_meta_cache_capacity`]
    /// changed it.
    pub fn meta_cache_capacity(&self) -> u64 {
        self.meta.block_cache_capacity()
    }

    /// Sets the capacity of RocksDB's block cache in bytes (at least 1 MiB), evicting blocks
    /// at once; the memory target's second lever after the frame cache (cli/src/memory.rs).
    pub fn set_meta_cache_capacity(&self, bytes: u64) {
        self.meta.set_block_cache_capacity(bytes);
    }

    /// `(open volumes, bytes their write buffers can still take)`, or `None` when the table of
    /// open volumes is busy (opening or closing one): a non-blocking look for the daemon's
    /// memory target (cli/src/memory.rs), which keeps that room free for writes.
    pub fn write_buffer_room(&self) -> Option<(usize, u64)> {
        let open = self.instances.try_open()?;
        Some((open.len(), open.iter().map(Volume::buffer_room_bytes).sum()))
    }

    /// The chunk backend.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Checks a size in bytes: a positive multiple of 4096 up to 16 TiB.
    pub fn check_size(size_bytes: u64) -> Result<(), VolumeError> {
        if size_bytes == 0 || size_bytes % BLOCK_SIZE != 0 || size_bytes > MAX_VOLUME_BYTES {
            return Err(VolumeError::InvalidArgument(format!(
                "volume size {size_bytes} bytes must be a positive multiple of 4096 up to 16 TiB"
            )));
        }
        Ok(())
    }

    /// A new record for a volume of `size_bytes` named `name`, state `available`.
    pub fn new_record(size_bytes: u64, name: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: VolumeId::generate(),
            name: name.to_owned(),
            size_bytes,
            create_time: now_rfc3339(),
            state: VolumeStateName::Available,
            volume_type: "gp3".into(),
            iops: 3000,
            availability_zone: String::new(),
            snapshot_id: String::new(),
            tags: Vec::new(),
            attachments: Vec::new(),
            client_token: String::new(),
            mount: None,
            legacy_mounted: false,
            multi_attach_enabled: false,
        }
    }

    /// Creates a volume of `size_bytes` (see [`Engine::check_size`]) and persists its record.
    pub async fn create_volume(
        &self,
        size_bytes: u64,
        name: &str,
    ) -> Result<VolumeRecord, VolumeError> {
        let rec = Self::new_record(size_bytes, name);
        self.create_volume_from(rec.clone()).await?;
        Ok(rec)
    }

    /// Persists a new volume record prepared by the caller (the control plane fills EC2 fields).
    pub async fn create_volume_from(&self, rec: VolumeRecord) -> Result<(), VolumeError> {
        Self::check_size(rec.size_bytes)?;
        self.publish_record(&rec).await?;
        let meta = self.meta.clone();
        blocking(move || {
            if meta.get_volume(&rec.volume_id)?.is_some() {
                return Err(crate::meta::MetaError::Corrupt {
                    key: rec.volume_id.to_string(),
                    reason: "volume id already exists".into(),
                });
            }
            meta.put_volume(&rec)
        })
        .await?;
        Ok(())
    }

    /// The record of `id`, if any.
    pub async fn get_record(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, VolumeError> {
        read_record(self.meta.clone(), id.clone()).await
    }

    /// Every volume record.
    pub async fn list_records(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        let meta = self.meta.clone();
        Ok(blocking(move || meta.list_volumes()).await?)
    }

    /// The next chunk object id of volume `id` (its epoch is `next_object_id >> 40`: a
    /// takeover numbers from the epoch's base).
    pub async fn next_object_id(&self, id: &VolumeId) -> Result<u64, VolumeError> {
        let (meta, vol) = (self.meta.clone(), id.clone());
        Ok(blocking(move || meta.volume_state(&vol))
            .await?
            .next_object_id)
    }

    /// Replaces this node's volume record only, not the backend's copy (cluster mode: a local
    /// change another node's copy must not see, such as the end of a mount here).
    pub async fn put_local_record(&self, rec: VolumeRecord) -> Result<(), VolumeError> {
        let meta = self.meta.clone();
        Ok(blocking(move || meta.put_volume(&rec)).await?)
    }

    /// Replaces a volume record durably, and its copy in the backend (best effort: a failure to
    /// update the copy is logged; the copy matters only for disaster recovery).
    pub async fn put_record(&self, rec: VolumeRecord) -> Result<(), VolumeError> {
        let meta = self.meta.clone();
        let r = rec.clone();
        blocking(move || meta.put_volume(&r)).await?;
        if let Err(e) = self.publish_record(&rec).await {
            tracing::warn!(volume = %rec.volume_id, error = %e, "could not update the volume record copy in the backend");
        }
        Ok(())
    }

    /// Writes the record's copy to `VOLUMEID/volume.json` in the backend (bounded retries),
    /// without its mount: a mount (and its export secret) belongs to the daemon serving it, and
    /// a volume recovered from the backend starts unmounted.
    pub(crate) async fn publish_record(&self, rec: &VolumeRecord) -> Result<(), VolumeError> {
        let key = volume_record_key(&rec.volume_id);
        let copy = VolumeRecord {
            mount: None,
            ..rec.clone()
        };
        let body = bytes::Bytes::from(
            serde_json::to_vec(&copy).map_err(|e| VolumeError::Internal(e.to_string()))?,
        );
        put_retried(&self.backend, &key, body).await?;
        Ok(())
    }

    /// The open volume `id`, opening it (WAL replay) on first use. One instance per volume is
    /// shared by every caller, so flushes on any connection cover every connection's writes;
    /// while the volume is closing, this waits for the close and then opens it again
    /// (one instance per volume: src/instances.rs).
    ///
    /// Errors: [`VolumeError::VolumeNotFound`], the open's errors (WAL replay, metadata),
    /// [`VolumeError::IncorrectState`] when a close does not end in time.
    pub async fn volume(&self, id: &VolumeId) -> Result<Volume, VolumeError> {
        self.volume_if(id, |_| true).await
    }

    /// [`Engine::volume`], but a new instance is opened only if `admit` accepts the volume's
    /// record as read under the volume's busy slot, i.e. ordered with closes: an NBD export
    /// opens a volume only while it is mounted, and an unmount's close either sees that open
    /// (and closes what it opened) or the open sees the unmount. An instance already open is
    /// returned as it is.
    ///
    /// Errors: as [`Engine::volume`]; [`VolumeError::IncorrectState`] when `admit` refuses,
    /// or in cluster mode when this node keeps no lease on the volume
    /// ([`Engine::set_cluster_tenure`]).
    pub async fn volume_if(
        &self,
        id: &VolumeId,
        admit: impl FnOnce(&VolumeRecord) -> bool + Send + 'static,
    ) -> Result<Volume, VolumeError> {
        let (meta, backend, cache) = (self.meta.clone(), self.backend.clone(), self.cache.clone());
        let (vid, wal_dir) = (id.clone(), self.config.wal_dir.join(id.as_str()));
        let config = self.config.volume.clone();
        let (cluster, tenure_of) = (self.config.cluster, self.tenure_of.get().cloned());
        let open = async move {
            let rec = read_record(meta.clone(), vid.clone())
                .await?
                .ok_or_else(|| VolumeError::VolumeNotFound(vid.clone()))?;
            if !admit(&rec) {
                return Err(VolumeError::IncorrectState(format!(
                    "volume {vid} may not be opened now"
                )));
            }
            // Asked under the volume's busy slot: after any takeover that precedes this open.
            let tenure = match cluster {
                false => None,
                true => {
                    let Some(held) = tenure_of.and_then(|f| f(&vid)).filter(|t| !t.is_lost())
                    else {
                        return Err(VolumeError::IncorrectState(format!(
                            "volume {vid} is not owned by this node (cluster mode: no lease kept here); mount it through this node to own it"
                        )));
                    };
                    Some(held)
                }
            };
            Volume::open(meta, backend, cache, vid, rec.size_bytes, wal_dir, config)
                .await
                .map(|v| v.serving_under(tenure))
        };
        self.instances
            .get_or_open(id, self.close_wait(), open)
            .await
    }

    /// How long an opener waits for a volume's close (its drain, and what follows it).
    fn close_wait(&self) -> Duration {
        2 * self.config.close_drain_timeout + Duration::from_secs(60)
    }

    /// The volumes open now (opened by a client or the control plane), for metrics.
    pub async fn open_volumes(&self) -> Vec<Volume> {
        self.instances.open().await
    }

    /// Grows volume `id` to `size_bytes` (never shrinks). An open volume is closed first and
    /// reopened at the new size by its next user.
    pub async fn resize_volume(
        &self,
        id: &VolumeId,
        size_bytes: u64,
    ) -> Result<VolumeRecord, VolumeError> {
        Self::check_size(size_bytes)?;
        let mut rec = self
            .get_record(id)
            .await?
            .ok_or_else(|| VolumeError::VolumeNotFound(id.clone()))?;
        if size_bytes < rec.size_bytes {
            return Err(VolumeError::InvalidArgument(format!(
                "cannot shrink volume from {} to {size_bytes} bytes",
                rec.size_bytes
            )));
        }
        rec.size_bytes = size_bytes;
        // The new size is stored before anyone can open the volume again.
        self.close_then(id, self.config.close_drain_timeout, || async {
            self.publish_record(&rec).await?;
            self.put_record(rec.clone()).await
        })
        .await?;
        Ok(rec)
    }

    /// Closes volume `id` if open (drains the buffer into chunks, syncs the WAL). Openers wait
    /// meanwhile; the next one opens a new instance.
    pub async fn close_volume(&self, id: &VolumeId) -> Result<(), VolumeError> {
        self.close_volume_draining(id, true).await
    }

    /// [`Engine::close_volume`]; without `drain` the write buffer is not turned into chunks
    /// (it stays in the synced WAL and is replayed at the next open), so the close takes only
    /// the WAL sync (EC2 `DetachVolume` with `Force`).
    pub async fn close_volume_draining(
        &self,
        id: &VolumeId,
        drain: bool,
    ) -> Result<(), VolumeError> {
        let drain = if drain {
            self.config.close_drain_timeout
        } else {
            Duration::ZERO
        };
        self.close_then(id, drain, || async { Ok(()) }).await
    }

    /// Closes volume `id` if open (draining its buffer for at most `drain`), then runs `then`
    /// before any opener may open it again.
    pub(crate) async fn close_then<T, TFut>(
        &self,
        id: &VolumeId,
        drain: Duration,
        then: T,
    ) -> Result<(), VolumeError>
    where
        T: FnOnce() -> TFut,
        TFut: std::future::Future<Output = Result<(), VolumeError>>,
    {
        self.instances
            .close_then(
                id,
                self.close_wait(),
                |v| async move { v.close(drain).await },
                then,
            )
            .await
    }

    /// Deletes volume `id`: closes it, removes its record copy and map checkpoints from the
    /// backend, its WAL and metadata, then runs garbage collection, which deletes its chunk
    /// objects except those a snapshot or clone still uses (they go when those do).
    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), VolumeError> {
        {
            let _gc = self.gc.lock().await;
            self.delete_volume_locked(id).await?;
        }
        self.collect_garbage().await?;
        Ok(())
    }

    async fn delete_volume_locked(&self, id: &VolumeId) -> Result<(), VolumeError> {
        // Openers wait until the volume is gone, then find no record.
        self.close_then(id, self.config.close_drain_timeout, || {
            self.delete_volume_data(id)
        })
        .await
    }

    /// Removes volume `id`'s record copy and map checkpoints from the backend, its WAL and its
    /// metadata. The volume is closed.
    async fn delete_volume_data(&self, id: &VolumeId) -> Result<(), VolumeError> {
        // The record copy goes first: a volume half deleted is never recovered.
        self.backend.delete(&volume_record_key(id)).await?;
        // Then everything but the chunks (which garbage collection deletes once no snapshot
        // or clone uses them): map checkpoints, and in cluster mode shipped WAL objects and
        // fences, epoch manifests and a damage marker.
        for prefix in [
            checkpoint_prefix(id),
            crate::backend::wal_object_prefix(id),
            crate::backend::epoch_prefix(id),
        ] {
            for key in self.backend.list(&prefix).await? {
                self.backend.delete(&key).await?;
            }
        }
        self.backend
            .delete(&crate::backend::volume_damaged_key(id))
            .await?;
        let wal = self.config.wal_dir.join(id.as_str());
        if let Err(source) = std::fs::remove_dir_all(&wal) {
            if source.kind() != std::io::ErrorKind::NotFound {
                return Err(VolumeError::Io {
                    what: format!("removing {}", wal.display()),
                    source,
                });
            }
        }
        let (meta, mark) = (self.meta.clone(), self.config.cluster);
        let id = id.clone();
        blocking(move || meta.delete_volume(&id, mark)).await?;
        Ok(())
    }

    /// Removes every backend object under volume `id`'s prefix, a volume never made available
    /// (a clone whose creating node failed: nothing else references its objects), and this
    /// node's copy of it, if any.
    ///
    /// Errors: backend and metadata errors (a retry deletes what is left).
    pub async fn purge_unfinished_volume(&self, id: &VolumeId) -> Result<(), VolumeError> {
        if self.get_record(id).await?.is_some() {
            return self.delete_volume(id).await;
        }
        let _gc = self.gc.lock().await;
        for key in self.backend.list(&volume_prefix(id)).await? {
            delete_retried(&self.backend, &key).await?;
        }
        Ok(())
    }

    /// Crash simulation for tests: every open volume stops as if the process died (nothing
    /// flushed, nothing synced); the engine is consumed so its RocksDB handle closes.
    #[doc(hidden)]
    pub async fn simulate_crash(self) {
        for v in self.instances.take_all().await {
            v.simulate_crash().await;
        }
    }

    /// Closes every open volume, then flushes the metadata DB's memtable to table files.
    pub async fn close_all(&self) {
        for id in self.instances.ids().await {
            if let Err(e) = self.close_volume(&id).await {
                tracing::error!(volume = %id, error = %e, "close failed");
            }
        }
        let meta = self.meta.clone();
        if let Err(e) = blocking(move || meta.flush()).await {
            tracing::warn!(error = %e, "metadata flush at close failed (the next open replays its log)");
        }
    }
}

//! A volume: the engine API in bytes over the write buffer, WAL, chunks and BlockLookup.
//!
//! Write path: validate → (unaligned: read-modify-write the edge blocks under the RMW lock) →
//! take write-buffer permits (backpressure) → under the state lock assign the next sequence
//! number, queue the WAL record and insert into the active memtable → with FUA, wait for the WAL
//! sync. A memtable that reaches the chunk size is frozen; the flusher turns each frozen memtable
//! into one chunk object, commits its extents and the new WAL checkpoint in one RocksDB batch,
//! drops the memtable (returning its permits) and trims the WAL.
//!
//! Read path: newest wins — the write buffer's index (the newest version across the active and
//! frozen memtables), then the BlockLookup map and chunk frames (through the shared frame cache);
//! anything else reads as zeros.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, Semaphore};

use crate::backend::{chunk_key, chunk_key_of, BackendError, SharedBackend};
use crate::block::{is_aligned, BlockRange, BLOCK_BYTES, BLOCK_SIZE};
use crate::buffer::{BufExtent, MemTable, Payload, WriteBuffer};
use crate::cache::FrameCache;
use crate::chunk::{self, ChunkError, ChunkOptions};
use crate::fs::Fs;
use crate::ids::VolumeId;
use crate::lookup::{BlockLookup, ChunkCommit, FrameRef, MapExtent, Target};
use crate::meta::{blocking, MetaError, MetaStore, VolumeState};
use crate::retry::{retry, RetryPolicy};
use crate::wal::{self, RecordHeader, RecordKind, Wal, WalConfig, WalError, WalRecovery};
use crate::workq::WorkQueue;

/// Engine settings for a volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Write buffer bound in bytes (default 256 MiB): writers wait when it is full.
    pub buffer_bytes: u64,
    /// Data bytes per chunk object (default 4 MiB).
    pub chunk_bytes: u64,
    /// WAL segment size in bytes (default 64 MiB).
    pub wal_segment_bytes: u64,
    /// Chunk encoding options.
    pub chunk: ChunkOptions,
    /// A partly filled memtable is turned into a chunk after this long without writes
    /// (default 2 s).
    pub idle_flush: Duration,
    /// Retry policy for backend reads (bounded) — after it, reads fail with an I/O error.
    pub read_retry: RetryPolicy,
    /// Chunk objects built and uploaded at once per volume (default 4); they commit in order.
    pub upload_concurrency: usize,
    /// Background compaction of this volume's chunks.
    pub compaction: CompactionConfig,
    /// What WAL replay does with a record that fails verification (`--wal-recovery-mode`).
    pub wal_recovery: WalRecovery,
    /// How long a chunk upload retries errors the backend calls permanent (access denied, I/O
    /// errors) before the attempt fails; after three failed attempts the volume fails (default
    /// 5 minutes; transient errors are retried for ever).
    pub permanent_error_timeout: Duration,
    /// The file system the WAL writes through ([`Fs::Real`] but in power-loss tests).
    pub fs: Fs,
}

/// Compaction: chunks whose live fraction fell below `threshold_percent` have their live blocks
/// rewritten into new chunks by the flusher when it has nothing else to do; the old objects then
/// have no live blocks and garbage collection deletes them once no snapshot or clone uses them.
#[derive(Debug, Clone, Copy)]
pub struct CompactionConfig {
    /// Rewrite chunks with fewer live blocks than this percent of their data blocks (default
    /// 50; 0 disables compaction).
    pub threshold_percent: u8,
    /// Bytes of live data rewritten per second at most (default 32 MiB/s), so foreground I/O
    /// keeps the disk and backend.
    pub rate_bytes_per_sec: u64,
    /// How often an idle flusher looks for chunks to compact when it found none (default 10 s).
    pub check_interval: Duration,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            threshold_percent: 50,
            rate_bytes_per_sec: 32 << 20,
            check_interval: Duration::from_secs(10),
        }
    }
}

impl VolumeConfig {
    /// Checks that the write buffer can hold two chunks and two of the largest requests
    /// (`MAX_REQUEST_BYTES`), so a writer never waits for space that cannot come.
    /// Errors: [`VolumeError::Invalid`] naming the sizes (bytes).
    pub fn validate(&self) -> Result<(), VolumeError> {
        let chunk_blocks = (self.chunk_bytes / BLOCK_SIZE).max(1);
        let total_permits = self.buffer_bytes / BLOCK_SIZE;
        if total_permits < 2 * chunk_blocks + 2 * (MAX_REQUEST_BYTES / BLOCK_SIZE) + 2 {
            return Err(VolumeError::Invalid(format!(
                "buffer of {} bytes is too small for {}-byte chunks and {}-byte requests \
                 (it needs at least twice both, plus 8 KiB)",
                self.buffer_bytes, self.chunk_bytes, MAX_REQUEST_BYTES
            )));
        }
        Ok(())
    }
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            buffer_bytes: 256 << 20,
            chunk_bytes: 4 << 20,
            wal_segment_bytes: 64 << 20,
            chunk: ChunkOptions::default(),
            idle_flush: Duration::from_secs(2),
            read_retry: RetryPolicy::reads(),
            upload_concurrency: 4,
            compaction: CompactionConfig::default(),
            wal_recovery: WalRecovery::default(),
            permanent_error_timeout: Duration::from_secs(300),
            fs: Fs::Real,
        }
    }
}

/// A block range `(start, end)` that no memtable covers.
type Holes = (u64, u64);

/// Largest single request in bytes (the NBD maximum block size, 32 MiB).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// Errors of the volume layer (mapped to NBD errnos and EC2 codes at the edges).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The byte range is not inside the volume.
    #[error("range {offset}+{len} outside volume of {size} bytes")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Volume size in bytes.
        size: u64,
    },
    /// A request larger than [`MAX_REQUEST_BYTES`] (or `data.len()` not matching).
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Requested bytes.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The WAL failed (disk full, I/O error, corruption at open).
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Metadata (RocksDB) failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A backend call failed (after retries, for reads).
    #[error("backend error: {0}")]
    Backend(#[from] BackendError),
    /// A chunk object failed verification.
    #[error("chunk object {key} is corrupt: {source}")]
    Chunk {
        /// Object key.
        key: String,
        /// What failed.
        #[source]
        source: ChunkError,
    },
    /// The volume is closed.
    #[error("volume is closed")]
    Closed,
    /// The volume failed and takes no more writes or flushes until it is reopened: its WAL could
    /// not be synced (the page cache can no longer be trusted), or its flusher hit a permanent
    /// error (the data stays in the WAL). Reads go on.
    #[error("volume failed: {0}; reopen it to recover (the WAL is replayed)")]
    Failed(String),
    /// An invalid argument (size, configuration).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// One run of a [`Volume::block_status`] answer (NBD `base:allocation` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u64,
    /// True when the range reads as zeros and has no storage (`NBD_STATE_HOLE | NBD_STATE_ZERO`);
    /// false for stored data.
    pub hole: bool,
}

/// Counters of one volume.
#[derive(Debug, Default)]
pub struct VolumeStats {
    /// Chunk objects written.
    pub chunks: AtomicU64,
    /// Bytes of chunk objects written.
    pub chunk_bytes: AtomicU64,
    /// Frames fetched from the backend (cache misses).
    pub frame_fetches: AtomicU64,
    /// Frames served from the frame cache.
    pub frame_hits: AtomicU64,
    /// Failures the flusher retried (chunk uploads, map commits, WAL syncs).
    pub flush_retries: AtomicU64,
    /// Chunk objects written by compaction.
    pub compacted_chunks: AtomicU64,
    /// Live bytes (logical, 4096 per block) compaction rewrote.
    pub compacted_bytes: AtomicU64,
}

struct BufState {
    next_seq: u64,
    buf: WriteBuffer,
    last_write: Instant,
    closed: bool,
}

struct Inner {
    id: VolumeId,
    size: u64,
    config: VolumeConfig,
    state: Mutex<BufState>,
    permits: Semaphore,
    /// Permits owed after replay loaded more than the buffer holds; paid before any are returned.
    permit_debt: Mutex<u64>,
    wal: Wal,
    meta: MetaStore,
    lookup: BlockLookup,
    /// Held across every map commit: a snapshot freezes the map between two commits.
    commit_lock: tokio::sync::Mutex<()>,
    /// The state of the last map commit.
    committed: Mutex<VolumeState>,
    backend: SharedBackend,
    cache: FrameCache,
    rmw: tokio::sync::Mutex<()>,
    wake: Notify,
    /// Signalled after every memtable the flusher commits.
    flushed: Notify,
    /// Flusher: finish the frozen memtables (and the active one), then exit.
    draining: AtomicBool,
    /// Flusher: exit at the next step boundary (crash simulation, forced close).
    stop: AtomicBool,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Why the volume failed, once it has ([`Volume::failed`]); `has_failed` is the lock-free
    /// test every write makes.
    failed: Mutex<Option<String>>,
    has_failed: AtomicBool,
    /// PUTs in flight (`upload_concurrency`); chunks are built ahead of them.
    upload_slots: Semaphore,
    /// Buffers of uploaded chunk objects, reused for the next ones while the flusher is busy:
    /// at most `upload_concurrency` (a freed buffer is usually taken by the next build at once;
    /// a larger pool only holds memory the RSS bound needs, docs/BENCHMARKS.md).
    object_buffers: chunk::ObjectBuffers,
    stats: VolumeStats,
    /// `vblock_chunk_upload_duration_seconds{volume}`: one successful chunk PUT (retries included).
    upload_seconds: metrics::Histogram,
    /// `vblock_backend_get_duration_seconds{volume,backend}`: one ranged GET of a frame.
    get_seconds: metrics::Histogram,
    /// Runs the blocking part of reads (map lookups, local frame reads, decompression).
    reads: Arc<WorkQueue>,
}

/// An open volume. Cheap to clone; all clones share the engine state.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

/// Locks a std mutex, recovering the data if a panicking thread poisoned it (the state it guards
/// is kept consistent by every critical section).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Deletes `id`'s chunk objects at or above `next_object_id`: an earlier instance uploaded them
/// but never committed them, and this one is about to reuse their ids. Left in place, one of
/// them could follow this instance's chunks in a disaster recovery (which takes the chunks above
/// a checkpoint in id order while the ids are contiguous) and mix an older history into this
/// one. The flusher does this before its first upload, retrying like an upload.
async fn remove_uncommitted_chunks(
    backend: &SharedBackend,
    id: &VolumeId,
    next_object_id: u64,
) -> Result<(), BackendError> {
    // Keys sort like ids (fixed-width hex): list only those after the last committed one.
    let prefix = crate::backend::chunk_prefix(id);
    let keys = match next_object_id.checked_sub(1) {
        Some(last) if last > 0 => backend.list_after(&prefix, &chunk_key(id, last)).await?,
        _ => backend.list(&prefix).await?,
    };
    let stale: Vec<u64> = crate::backend::chunk_ids(id, &keys)
        .into_iter()
        .filter(|&o| o >= next_object_id)
        .collect();
    for &o in &stale {
        backend.delete(&chunk_key(id, o)).await?;
    }
    if !stale.is_empty() {
        tracing::info!(volume = %id, objects = stale.len(), next_object_id, "deleted chunk objects an earlier run uploaded but never committed");
    }
    Ok(())
}

/// Replays WAL records into memtables.
struct Replayer {
    chunk_bytes: u64,
    buf: WriteBuffer,
}

impl Replayer {
    fn apply(&mut self, h: &RecordHeader, payload: Bytes) {
        let (payload, cost) = match h.kind {
            RecordKind::Write => (Payload::Data(payload), u64::from(h.block_count)),
            RecordKind::Zero => (Payload::Zero, 1),
            // Replay never applies sync notes; nothing to do if one came.
            RecordKind::SyncNote => return,
        };
        self.buf.insert(
            h.start_block,
            BufExtent {
                count: u64::from(h.block_count),
                seq: h.seq,
                payload,
            },
            cost,
        );
        if self.buf.active().is_full(self.chunk_bytes) {
            self.buf.freeze();
        }
    }
}

impl Volume {
    /// Opens volume `id` of `size` bytes: reads its state, replays its WAL from `wal_dir` and
    /// starts its flusher. Must be called inside a tokio runtime.
    ///
    /// Errors: [`VolumeError::Wal`] (corrupt WAL in the middle, I/O), [`VolumeError::Meta`],
    /// [`VolumeError::Invalid`] for a bad configuration.
    pub async fn open(
        meta: MetaStore,
        backend: SharedBackend,
        cache: FrameCache,
        id: VolumeId,
        size: u64,
        wal_dir: std::path::PathBuf,
        config: VolumeConfig,
    ) -> Result<Self, VolumeError> {
        config.validate()?;
        let total_permits = config.buffer_bytes / BLOCK_SIZE;
        let m = meta.clone();
        let vid = id.clone();
        let state = blocking(move || m.volume_state(&vid)).await?;
        let wal_config = WalConfig {
            dir: wal_dir,
            segment_bytes: config.wal_segment_bytes,
            name: id.to_string(),
            recovery: config.wal_recovery,
            fs: config.fs.clone(),
        };
        let tag = id.tag();
        let chunk_bytes = config.chunk_bytes;
        let replay_started = Instant::now();
        let (wal, report, replayer) = tokio::task::spawn_blocking(move || {
            let mut r = Replayer {
                chunk_bytes,
                buf: WriteBuffer::new(),
            };
            Wal::open(&wal_config, tag, state.checkpoint, |h, p| r.apply(h, p))
                .map(|(w, rep)| (w, rep, r))
        })
        .await
        .map_err(|e| VolumeError::Invalid(format!("replay task failed: {e}")))??;
        if report.records > 0 || report.truncated_bytes > 0 {
            tracing::info!(
                volume = %id,
                segments = report.segments,
                records = report.records,
                applied = report.applied,
                truncated_bytes = report.truncated_bytes,
                wal_bytes = wal.stats().disk_bytes.load(Ordering::Relaxed),
                elapsed_ms = replay_started.elapsed().as_millis() as u64,
                "WAL replayed"
            );
        }
        let charged = replayer.buf.charged();
        let next_seq = state.max_seq.max(report.max_seq).max(state.checkpoint) + 1;
        let id_label = id.to_string();
        let backend_kind = backend.kind();
        let inner = Arc::new(Inner {
            lookup: BlockLookup::new(meta.clone(), id.clone()),
            meta,
            commit_lock: tokio::sync::Mutex::new(()),
            committed: Mutex::new(state),
            id,
            size,
            state: Mutex::new(BufState {
                next_seq,
                buf: replayer.buf,
                last_write: Instant::now(),
                closed: false,
            }),
            permits: Semaphore::new(total_permits.saturating_sub(charged) as usize),
            permit_debt: Mutex::new(charged.saturating_sub(total_permits)),
            wal,
            backend,
            cache,
            rmw: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            flushed: Notify::new(),
            reads: WorkQueue::new(READ_WORKERS),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            flusher: Mutex::new(None),
            failed: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            upload_slots: Semaphore::new(config.upload_concurrency.max(1)),
            object_buffers: chunk::ObjectBuffers::new(config.upload_concurrency.max(1)),
            stats: VolumeStats::default(),
            upload_seconds: metrics::histogram!(
                "vblock_chunk_upload_duration_seconds",
                "volume" => id_label.clone()
            ),
            get_seconds: metrics::histogram!(
                "vblock_backend_get_duration_seconds",
                "volume" => id_label,
                "backend" => backend_kind
            ),
            config,
        });
        // Every line the flusher logs (retries, failures) carries the volume's span.
        let span = tracing::info_span!(parent: None, "volume", volume = %inner.id);
        let handle = tokio::spawn(tracing::Instrument::instrument(
            flusher(inner.clone(), state),
            span,
        ));
        *lock(&inner.flusher) = Some(handle);
        Ok(Self { inner })
    }

    /// Volume id.
    pub fn id(&self) -> &VolumeId {
        &self.inner.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Counters.
    pub fn stats(&self) -> &VolumeStats {
        &self.inner.stats
    }

    /// Why the volume refuses writes and flushes, once it does ([`VolumeError::Failed`]): a
    /// failed WAL `fdatasync`, or a permanent flusher failure. `None` while it is healthy.
    pub fn failed(&self) -> Option<String> {
        self.inner.failure()
    }

    /// WAL counters (fsyncs, writes, records).
    pub fn wal_stats(&self) -> &wal::WalStats {
        self.inner.wal.stats()
    }

    /// Where the WAL is durable up to (crash tests).
    pub fn wal_durable_position(&self) -> wal::DurablePosition {
        self.inner.wal.durable_position()
    }

    /// Bytes the write buffer can still take before writers wait (free permits × 4096; 0 once
    /// the volume is closing).
    pub fn buffer_room_bytes(&self) -> u64 {
        self.inner.permits.available_permits() as u64 * BLOCK_SIZE
    }

    /// Bytes of data in the write buffer (not yet in chunks).
    pub fn buffered_bytes(&self) -> u64 {
        let st = lock(&self.inner.state);
        st.buf.data_bytes()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        check_range(offset, len, self.inner.size)
    }

    /// Reads `len` bytes at byte `offset`. Never-written and trimmed ranges read as zeros.
    ///
    /// Errors: [`VolumeError::OutOfRange`], [`VolumeError::TooLarge`] above 32 MiB,
    /// [`VolumeError::Backend`] / [`VolumeError::Chunk`] when chunk data cannot be fetched or
    /// verified (NBD maps both to `NBD_EIO`).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        check_request(offset, len, self.inner.size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let r = BlockRange::covering(offset, len);
        let blocks = self.read_blocks(r).await?;
        let skip = (offset - r.start * BLOCK_SIZE) as usize;
        Ok(blocks.slice(skip..skip + len as usize))
    }

    /// Writes `data` at byte `offset`. With `fua` the data is on stable storage when this
    /// returns (NBD_CMD_FLAG_FUA); otherwise only after a later [`Volume::flush`].
    ///
    /// Errors: [`VolumeError::OutOfRange`], [`VolumeError::TooLarge`] above 32 MiB,
    /// [`VolumeError::Wal`] (e.g. disk full), [`VolumeError::Closed`].
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        check_request(offset, len, self.inner.size)?;
        if len > 0 {
            if is_aligned(offset, len) {
                self.commit(offset / BLOCK_SIZE, len / BLOCK_SIZE, Payload::Data(data))
                    .await?;
            } else {
                self.write_unaligned(offset, &data).await?;
            }
        }
        if fua {
            self.inner.wal.sync().await?;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable (NBD_CMD_FLUSH).
    ///
    /// Errors: [`VolumeError::Failed`] once the volume failed, [`VolumeError::Wal`].
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.inner.check_failed()?;
        if let Err(e) = self.inner.wal.sync().await {
            self.inner.check_failed()?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Discards the whole blocks inside `offset..offset + len`; they read as zeros afterwards.
    /// Partial blocks at the edges are left unchanged (NBD_CMD_TRIM is advisory).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        let start = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        self.zero_blocks(start, end).await
    }

    /// Makes `offset..offset + len` read as zeros (NBD_CMD_WRITE_ZEROES). Whole blocks are
    /// stored as zero extents (no data); partial edge blocks are rewritten.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len > 0 {
            let end = offset + len;
            let full_start = offset.div_ceil(BLOCK_SIZE);
            let full_end = end / BLOCK_SIZE;
            if full_start >= full_end {
                // Within one block, or two partial blocks with no whole block between.
                self.write_unaligned(offset, &vec![0u8; len as usize])
                    .await?;
            } else {
                self.zero_blocks(full_start, full_end).await?;
                let head = full_start * BLOCK_SIZE - offset;
                if head > 0 {
                    self.write_unaligned(offset, &vec![0u8; head as usize])
                        .await?;
                }
                let tail = end - full_end * BLOCK_SIZE;
                if tail > 0 {
                    self.write_unaligned(full_end * BLOCK_SIZE, &vec![0u8; tail as usize])
                        .await?;
                }
            }
        }
        if fua {
            self.inner.wal.sync().await?;
        }
        Ok(())
    }

    /// Allocation status of `offset..offset + len` in runs (NBD `base:allocation`): stored data
    /// versus holes that read as zeros. Runs are merged and cover the range exactly.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let r = BlockRange::covering(offset, len);
        let (mem, map) = self.resolve(r).await?;
        let data: Vec<(u64, u64)> = mem
            .iter()
            .filter(|(_, e)| matches!(e.payload, Payload::Data(_)))
            .map(|(s, e)| (*s, s + e.count))
            .chain(
                map.iter()
                    .filter(|e| matches!(e.target, Target::Data(_)))
                    .map(|e| (e.start, e.end())),
            )
            .collect();
        Ok(status_runs(offset, len, data))
    }

    /// Read-modify-write of the blocks covering an unaligned byte range.
    async fn write_unaligned(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        let _guard = self.inner.rmw.lock().await;
        let r = BlockRange::covering(offset, data.len() as u64);
        let old = self.read_blocks(r).await?;
        let mut buf = BytesMut::from(&old[..]);
        let at = (offset - r.start * BLOCK_SIZE) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.commit(r.start, r.len(), Payload::Data(buf.freeze()))
            .await
    }

    async fn zero_blocks(&self, mut start: u64, end: u64) -> Result<(), VolumeError> {
        // One record per at most 2^30 blocks (4 TiB) keeps block counts inside u32.
        while start < end {
            let n = (end - start).min(1 << 30);
            self.commit(start, n, Payload::Zero).await?;
            start += n;
        }
        Ok(())
    }

    /// Sequences one write: permits, WAL record, memtable insert — in that order.
    async fn commit(&self, start: u64, count: u64, payload: Payload) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let cost = match payload {
            Payload::Data(_) => count,
            Payload::Zero => 1,
        };
        inner.check_failed()?;
        let Ok(permits) = inner.permits.acquire_many(cost as u32).await else {
            inner.check_failed()?;
            return Err(VolumeError::Closed);
        };
        let mut st = lock(&inner.state);
        if st.closed {
            return Err(VolumeError::Closed);
        }
        let seq = st.next_seq;
        let (kind, body) = match &payload {
            Payload::Data(b) => (RecordKind::Write, b.clone()),
            Payload::Zero => (RecordKind::Zero, Bytes::new()),
        };
        let header = RecordHeader {
            kind,
            flags: 0,
            seq,
            volume_tag: 0,
            start_block: start,
            block_count: count as u32,
            payload_len: body.len() as u32,
        };
        if let Err(e) = inner.wal.append(header, body) {
            inner.check_failed()?;
            return Err(e.into());
        }
        permits.forget();
        st.next_seq += 1;
        st.last_write = Instant::now();
        // Freeze before a write would take the memtable past a chunk, so chunks stay near
        // `chunk_bytes` (only a single write larger than a chunk makes a memtable that spans
        // several chunk objects).
        let new_bytes = match payload {
            Payload::Data(_) => count * BLOCK_SIZE,
            Payload::Zero => 0,
        };
        let mut froze = false;
        if st.buf.active().data_bytes() + new_bytes > inner.config.chunk_bytes {
            froze = st.buf.freeze();
        }
        st.buf.insert(
            start,
            BufExtent {
                count,
                seq,
                payload,
            },
            cost,
        );
        if st.buf.active().is_full(inner.config.chunk_bytes) {
            froze |= st.buf.freeze();
        }
        drop(st);
        if froze {
            inner.wake.notify_one();
        }
        Ok(())
    }

    /// The newest buffered extents in `r` (clipped, in block order) and the block ranges the
    /// write buffer does not cover.
    fn resolve_memtables(&self, r: BlockRange) -> (Vec<(u64, BufExtent)>, Vec<Holes>) {
        let found = lock(&self.inner.state).buf.overlapping(r.start, r.end);
        let mut holes = Vec::new();
        let mut cur = r.start;
        for (s, e) in &found {
            if *s > cur {
                holes.push((cur, *s));
            }
            cur = s + e.count;
        }
        if cur < r.end {
            holes.push((cur, r.end));
        }
        (found, holes)
    }

    /// The memtable extents and map extents that make up `r`; blocks in neither read as zeros.
    async fn resolve(
        &self,
        r: BlockRange,
    ) -> Result<(Vec<(u64, BufExtent)>, Vec<MapExtent>), VolumeError> {
        let (found, holes) = self.resolve_memtables(r);
        if holes.is_empty() {
            return Ok((found, Vec::new()));
        }
        let lookup = self.inner.lookup.clone();
        let map = blocking(move || {
            let mut out = Vec::new();
            for (s, e) in holes {
                out.extend(lookup.lookup(s, e)?);
            }
            Ok(out)
        })
        .await?;
        Ok((found, map))
    }

    async fn read_blocks(&self, r: BlockRange) -> Result<Bytes, VolumeError> {
        let (mem, holes) = self.resolve_memtables(r);
        // Fast path: one memtable extent covers the whole range.
        if let [(
            s,
            BufExtent {
                count,
                payload: Payload::Data(b),
                ..
            },
        )] = &mem[..]
        {
            if *s == r.start && *count == r.len() {
                return Ok(b.clone());
            }
        }
        if holes.is_empty() {
            return Ok(buffered_blocks(r, &mem).freeze());
        }
        // One blocking task: map lookup, then every frame from the cache or, for local backends,
        // read and decoded right there, and the blocks copied into the reply there too (the
        // async threads only send it). Frames a backend cannot read synchronously (S3) are
        // fetched asynchronously afterwards.
        let inner = self.inner.clone();
        let reads = self.inner.reads.clone();
        let (mem, map, mut frames) = match reads
            .run(move || -> Result<_, VolumeError> {
                let mut map = Vec::new();
                for (s, e) in holes {
                    map.extend(inner.lookup.lookup(s, e)?);
                }
                let (mut frames, hits) = cached_frames(&inner.cache, &map);
                inner.stats.frame_hits.fetch_add(hits, Ordering::Relaxed);
                for (at, run) in missing_runs(&map, &frames) {
                    let Some((okey, range)) = run_location(&run) else {
                        continue;
                    };
                    let started = Instant::now();
                    // `None`: not a local backend; everything missing is fetched below.
                    let Some(raw) = inner.backend.get_range_blocking(&okey, range) else {
                        return Ok(Resolved::Fetch(mem, map, frames));
                    };
                    let raw = raw?;
                    inner.get_seconds.record(started.elapsed());
                    inner
                        .stats
                        .frame_fetches
                        .fetch_add(run.len() as u64, Ordering::Relaxed);
                    for (k, d) in decode_run(&inner.cache, &okey, &raw, &run)?
                        .into_iter()
                        .enumerate()
                    {
                        frames[at + k] = Some(d);
                    }
                }
                Ok(Resolved::Done(assemble(r, &mem, &map, frames)))
            })
            .await
            .map_err(|e| VolumeError::Invalid(format!("read task failed: {e}")))??
        {
            Resolved::Done(blocks) => return Ok(blocks),
            Resolved::Fetch(mem, map, frames) => (mem, map, frames),
        };
        let inner = &self.inner;
        fetch_missing_frames(
            &inner.cache,
            &inner.backend,
            &inner.config.read_retry,
            &map,
            &mut frames,
            &|took, n| {
                inner.stats.frame_fetches.fetch_add(n, Ordering::Relaxed);
                inner.get_seconds.record(took);
            },
        )
        .await?;
        Ok(assemble(r, &mem, &map, frames))
    }

    /// A decompressed, verified frame, from the cache or the backend (ranged read).
    async fn frame(&self, f: FrameRef) -> Result<Bytes, VolumeError> {
        let inner = &self.inner;
        fetch_frame(
            &inner.cache,
            &inner.backend,
            &inner.config.read_retry,
            f,
            |took| {
                inner.stats.frame_fetches.fetch_add(1, Ordering::Relaxed);
                inner.get_seconds.record(took);
            },
        )
        .await
    }

    /// Runs `f` (blocking, on a RocksDB thread) while the map is frozen at a sequence-number
    /// prefix that includes every write completed before this call: everything buffered is
    /// committed to chunks first, and no commit runs while `f` does. `f` gets the committed state
    /// (its `checkpoint` is the snapshot point). Errors with [`VolumeError::Closed`] if the
    /// volume closes first.
    pub async fn with_frozen_map<T: Send + 'static>(
        &self,
        f: impl FnOnce(VolumeState) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        let inner = &self.inner;
        let target = {
            let mut st = lock(&inner.state);
            if st.closed {
                return Err(VolumeError::Closed);
            }
            st.buf.freeze();
            st.next_seq - 1
        };
        loop {
            let notified = inner.flushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let _commits = inner.commit_lock.lock().await;
                let state = *lock(&inner.committed);
                // Not in the middle of a split memtable's commits (its first chunks committed,
                // not its last), or the map would hold part of a later write without earlier
                // ones. A split in progress keeps its memtable frozen; with none frozen, a
                // `max_seq` above the checkpoint is history (a recovered checkpoint).
                let between_memtables =
                    state.max_seq <= state.checkpoint || lock(&inner.state).buf.frozen().is_empty();
                if state.checkpoint >= target && between_memtables {
                    return Ok(blocking(move || f(state)).await?);
                }
            }
            if lock(&inner.state).closed {
                return Err(VolumeError::Closed);
            }
            inner.check_failed()?;
            inner.wake.notify_one();
            notified.await;
        }
    }

    /// Turns everything buffered into chunks and waits until the map points at them (the WAL is
    /// then trimmed behind them). Errors with [`VolumeError::Closed`] if the volume closes first.
    pub async fn persist_buffer(&self) -> Result<(), VolumeError> {
        let inner = &self.inner;
        loop {
            let notified = inner.flushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&inner.state);
                if st.closed {
                    return Err(VolumeError::Closed);
                }
                st.buf.freeze();
                if st.buf.frozen().is_empty() {
                    return Ok(());
                }
            }
            inner.check_failed()?;
            inner.wake.notify_one();
            notified.await;
        }
    }

    /// Stops accepting writes, turns everything buffered into chunks (waiting at most
    /// `drain_timeout`; what is left stays in the WAL and is replayed at the next open), syncs
    /// the WAL and stops its writer.
    pub async fn close(&self, drain_timeout: Duration) -> Result<(), VolumeError> {
        let inner = &self.inner;
        {
            let mut st = lock(&inner.state);
            st.closed = true;
            st.buf.freeze();
        }
        inner.draining.store(true, Ordering::SeqCst);
        inner.wake.notify_one();
        inner.flushed.notify_waiters();
        let handle = lock(&inner.flusher).take();
        if let Some(mut handle) = handle {
            if tokio::time::timeout(drain_timeout, &mut handle)
                .await
                .is_err()
            {
                tracing::warn!(volume = %inner.id, "flusher did not drain in time; data stays in the WAL");
                inner.stop.store(true, Ordering::SeqCst);
                inner.wake.notify_one();
                let _ = handle.await;
            }
        }
        inner.permits.close();
        let wal_inner = self.inner.clone();
        tokio::task::spawn_blocking(move || wal_inner.wal.shutdown(true))
            .await
            .map_err(|e| VolumeError::Invalid(format!("WAL shutdown task failed: {e}")))?;
        Ok(())
    }

    /// Crash simulation for tests: stops the flusher at its next step boundary and the WAL writer
    /// after writing (not syncing) what is queued — as if the process died there.
    #[doc(hidden)]
    pub async fn simulate_crash(&self) {
        let inner = &self.inner;
        // Stop before closed: whoever sees the volume closed knows the flusher is told to stop.
        inner.stop.store(true, Ordering::SeqCst);
        lock(&inner.state).closed = true;
        inner.wake.notify_one();
        inner.flushed.notify_waiters();
        let handle = lock(&inner.flusher).take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
        inner.permits.close();
        let wal_inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || wal_inner.wal.shutdown(false)).await;
    }
}

/// A frame's cache key, object key (in its owner volume's objects) and byte range in the object.
pub(crate) fn frame_location(
    f: &FrameRef,
) -> (crate::cache::FrameKey, String, std::ops::Range<u64>) {
    let range = u64::from(f.offset)..u64::from(f.offset) + u64::from(f.len);
    (frame_key(f), chunk_key_of(f.owner, f.object_id), range)
}

/// The frame cache's key of frame `f` (no object key formatted, unlike [`frame_location`]).
fn frame_key(f: &FrameRef) -> crate::cache::FrameKey {
    // The cache key's tag is the owner's low 64 bits ([`VolumeId::tag`]).
    (f.owner as u64, f.object_id, f.offset)
}

/// Checks that bytes `offset..offset + len` lie inside a device of `size` bytes
/// ([`VolumeError::OutOfRange`]).
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), VolumeError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VolumeError::OutOfRange { offset, len, size }),
    }
}

/// [`check_range`], and at most [`MAX_REQUEST_BYTES`] ([`VolumeError::TooLarge`]): a read or
/// write request.
pub(crate) fn check_request(offset: u64, len: u64, size: u64) -> Result<(), VolumeError> {
    check_range(offset, len, size)?;
    if len > MAX_REQUEST_BYTES {
        return Err(VolumeError::TooLarge {
            len,
            max: MAX_REQUEST_BYTES,
        });
    }
    Ok(())
}

/// Header and index of chunk object `key` (FORMAT.md, "Chunk object"), with two ranged reads
/// from `backend` (the header, then header + index), each retried.
///
/// Errors: [`VolumeError::Backend`] (missing object, transport), [`VolumeError::Chunk`] (short
/// or corrupt header or index).
pub(crate) async fn read_chunk_index(
    backend: &SharedBackend,
    key: &str,
) -> Result<(chunk::ChunkHeader, Vec<chunk::ChunkExtent>), VolumeError> {
    use crate::chunk::{decode_header, decode_index, CHUNK_HEADER_LEN};
    let policy = RetryPolicy::reads();
    let head = retry(&policy, key, || {
        backend.get_range(key, 0..CHUNK_HEADER_LEN as u64)
    })
    .await?;
    let corrupt = |source| VolumeError::Chunk {
        key: key.to_owned(),
        source,
    };
    let header = decode_header(&head).map_err(corrupt)?;
    if header.extent_count > 1 << 20 {
        return Err(corrupt(ChunkError::BadIndex(format!(
            "{} extents",
            header.extent_count
        ))));
    }
    let len = header.index_len();
    let index = retry(&policy, key, || backend.get_range(key, 0..len)).await?;
    decode_index(&index, u64::MAX).map_err(corrupt)
}

/// A decompressed, verified frame from `cache`, or fetched from `backend` with a ranged read
/// (retried by `policy`) and decoded off the reactor; `fetched(duration)` is called after a GET.
pub(crate) async fn fetch_frame(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    f: FrameRef,
    fetched: impl FnOnce(Duration),
) -> Result<Bytes, VolumeError> {
    let (key, okey, range) = frame_location(&f);
    cache
        .get_or_insert_async(&key, async {
            let started = Instant::now();
            let raw = retry(policy, &okey, || backend.get_range(&okey, range.clone())).await?;
            fetched(started.elapsed());
            tokio::task::spawn_blocking(move || decode_fetched(&okey, &raw, &f, true))
                .await
                .map_err(|e| VolumeError::Invalid(format!("decode task failed: {e}")))?
        })
        .await
}

/// Fetches every data frame of `map` that `frames` (same order) does not hold yet, concurrently:
/// frames back to back in one object ([`extends_run`]) with one ranged read (retried by
/// `policy`), decoded off the reactor and cached; a lone frame through [`fetch_frame`], so
/// concurrent misses for it coalesce. `fetched(duration, frames)` is called after each read.
pub(crate) async fn fetch_missing_frames(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    map: &[MapExtent],
    frames: &mut [Option<Bytes>],
    fetched: &(dyn Fn(Duration, u64) + Sync),
) -> Result<(), VolumeError> {
    let runs = missing_runs(map, frames);
    let fetches = runs.into_iter().map(|(at, run)| async move {
        let data = match run[..] {
            [f] => vec![fetch_frame(cache, backend, policy, f, |took| fetched(took, 1)).await?],
            _ => fetch_run(cache, backend, policy, run, fetched).await?,
        };
        Ok::<_, VolumeError>((at, data))
    });
    for (at, data) in futures::future::try_join_all(fetches).await? {
        for (k, d) in data.into_iter().enumerate() {
            frames[at + k] = Some(d);
        }
    }
    Ok(())
}

/// Frames `run` (back to back in one object) with one ranged read, verified, decoded and cached.
async fn fetch_run(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    run: Vec<FrameRef>,
    fetched: &(dyn Fn(Duration, u64) + Sync),
) -> Result<Vec<Bytes>, VolumeError> {
    let Some((okey, range)) = run_location(&run) else {
        return Ok(Vec::new());
    };
    let started = Instant::now();
    let raw = retry(policy, &okey, || backend.get_range(&okey, range.clone())).await?;
    fetched(started.elapsed(), run.len() as u64);
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || decode_run(&cache, &okey, &raw, &run))
        .await
        .map_err(|e| VolumeError::Invalid(format!("decode task failed: {e}")))?
}

/// Threads that run one volume's blocking read work at once. 4k random reads, QD32, 2 cores
/// (docs/BENCHMARKS.md, "Random reads while the flusher works"): page-cache-hot data
/// 4 ≈ 8 > 2 > 1; frames read from the disk (caches dropped) 8 ≈ 16 ≈ 64 > 4.
const READ_WORKERS: usize = 8;

/// Most bytes one read of adjacent frames covers (a 1 MiB request of 16 KiB frames is one read).
const MAX_FRAME_RUN_BYTES: u64 = 1 << 20;

/// Whether frame `g` continues `run`: stored right after its last frame in the same object,
/// and the run stays within [`MAX_FRAME_RUN_BYTES`].
fn extends_run(run: &[FrameRef], g: &FrameRef) -> bool {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return true;
    };
    let end = u64::from(last.offset) + u64::from(last.len);
    g.owner == first.owner
        && g.object_id == first.object_id
        && u64::from(g.offset) == end
        && end + u64::from(g.len) - u64::from(first.offset) <= MAX_FRAME_RUN_BYTES
}

/// `map`'s data frames that `cache` holds (same order; `None` for the others and for zero
/// extents), and how many it held.
pub(crate) fn cached_frames(cache: &FrameCache, map: &[MapExtent]) -> (Vec<Option<Bytes>>, u64) {
    let mut hits = 0;
    let frames = map
        .iter()
        .map(|e| match e.target {
            Target::Data(f) => {
                let hit = cache.get(&frame_key(&f));
                hits += u64::from(hit.is_some());
                hit
            }
            Target::Zero => None,
        })
        .collect();
    (frames, hits)
}

/// The data frames of `map` that `frames` (same order) does not hold, grouped into runs back
/// to back in one object ([`extends_run`]), each with the index of its first frame.
fn missing_runs(map: &[MapExtent], frames: &[Option<Bytes>]) -> Vec<(usize, Vec<FrameRef>)> {
    let mut runs: Vec<(usize, Vec<FrameRef>)> = Vec::new();
    for (i, (e, have)) in map.iter().zip(frames).enumerate() {
        let (Target::Data(g), None) = (e.target, have) else {
            continue;
        };
        match runs.last_mut() {
            Some((at, run)) if *at + run.len() == i && extends_run(run, &g) => run.push(g),
            _ => runs.push((i, vec![g])),
        }
    }
    runs
}

/// Object key and byte range holding all of `run` (`None` for an empty run).
fn run_location(run: &[FrameRef]) -> Option<(String, std::ops::Range<u64>)> {
    let (first, last) = (run.first()?, run.last()?);
    Some((
        chunk_key_of(first.owner, first.object_id),
        u64::from(first.offset)..u64::from(last.offset) + u64::from(last.len),
    ))
}

/// Splits `raw` (the bytes of `run`, read from object `okey` in one piece) into frames,
/// verifies and decodes each and caches it.
fn decode_run(
    cache: &FrameCache,
    okey: &str,
    raw: &Bytes,
    run: &[FrameRef],
) -> Result<Vec<Bytes>, VolumeError> {
    let Some(first) = run.first() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(run.len());
    for g in run {
        let at = (g.offset - first.offset) as usize;
        let need = at + g.len as usize;
        if need > raw.len() {
            tracing::error!(key = %okey, "short ranged read of a chunk object");
            return Err(VolumeError::Chunk {
                key: okey.to_owned(),
                source: ChunkError::Truncated {
                    need,
                    have: raw.len(),
                },
            });
        }
        let data = decode_fetched(okey, &raw.slice(at..need), g, run.len() == 1)?;
        cache.insert(frame_key(g), data.clone());
        out.push(data);
    }
    Ok(out)
}

/// What a read's blocking task found: the blocks, or what it could not read synchronously.
enum Resolved {
    /// The blocks of the range.
    Done(Bytes),
    /// Write buffer extents, map extents and the frames read so far (same order as the map);
    /// the missing frames are fetched asynchronously.
    Fetch(Vec<(u64, BufExtent)>, Vec<MapExtent>, Vec<Option<Bytes>>),
}

/// Block range `r` from the write buffer's extents `mem` and the map's extents `map` (whose
/// frames are in `frames`, same order); blocks in neither are zeros. When one extent covers the
/// whole range (a 4 KiB read, mostly) a slice of its frame, not a copy.
pub(crate) fn assemble(
    r: BlockRange,
    mem: &[(u64, BufExtent)],
    map: &[MapExtent],
    frames: Vec<Option<Bytes>>,
) -> Bytes {
    if let ([], [e], [Some(frame)]) = (mem, map, &frames[..]) {
        if let Target::Data(f) = e.target {
            let from = ((e.start - f.first_block) as usize) * BLOCK_BYTES;
            let len = e.count as usize * BLOCK_BYTES;
            if e.start == r.start && e.count == r.len() && from + len <= frame.len() {
                return frame.slice(from..from + len);
            }
        }
    }
    let mut out = buffered_blocks(r, mem);
    fill_from_frames(&mut out, r, map, frames);
    out.freeze()
}

/// Block range `r` as zeros with the write buffer's data extents `mem` (from
/// `WriteBuffer::overlapping`) copied in.
fn buffered_blocks(r: BlockRange, mem: &[(u64, BufExtent)]) -> BytesMut {
    let mut out = BytesMut::zeroed(r.len() as usize * BLOCK_BYTES);
    for (s, e) in mem {
        if let Payload::Data(b) = &e.payload {
            let at = ((s - r.start) as usize) * BLOCK_BYTES;
            out[at..at + b.len()].copy_from_slice(b);
        }
    }
    out
}

/// Copies the blocks of the data extents in `map` (whose frames are in `frames`, same order)
/// into `out`, which holds block range `r`.
fn fill_from_frames(out: &mut [u8], r: BlockRange, map: &[MapExtent], frames: Vec<Option<Bytes>>) {
    for (e, frame) in map.iter().zip(frames) {
        let (Target::Data(f), Some(frame)) = (e.target, frame) else {
            continue;
        };
        let from = ((e.start - f.first_block) as usize) * BLOCK_BYTES;
        let len = e.count as usize * BLOCK_BYTES;
        let at = ((e.start - r.start) as usize) * BLOCK_BYTES;
        out[at..at + len].copy_from_slice(&frame[from..from + len]);
    }
}

/// Merged `base:allocation` runs covering bytes `offset..offset + len`, from the block ranges
/// `data` (start, end) that hold stored data; everything else is a hole.
pub(crate) fn status_runs(offset: u64, len: u64, mut data: Vec<(u64, u64)>) -> Vec<StatusExtent> {
    data.sort_unstable();
    let end = offset + len;
    let mut out: Vec<StatusExtent> = Vec::new();

    let push = |from: u64, to: u64, hole: bool, out: &mut Vec<StatusExtent>| {
        let (from, to) = (from.max(offset), to.min(end));
        if from >= to {
            return;
        }
        match out.last_mut() {
            Some(last) if last.hole == hole => last.len += to - from,
            _ => out.push(StatusExtent {
                len: to - from,
                hole,
            }),
        }
    };
    let mut cur = offset;
    for (s, e) in data {
        let (s, e) = (s * BLOCK_SIZE, e * BLOCK_SIZE);
        push(cur, s, true, &mut out);
        push(s, e, false, &mut out);
        cur = cur.max(e);
    }
    push(cur, end, true, &mut out);
    out
}

/// Verifies and decodes frame `f` fetched from object `okey`; corruption is logged with the key.
/// With `alone` (`frame` is the whole buffer of its read) a raw frame is shared, not copied; a
/// frame read together with others is copied, so a cached frame never holds its neighbours.
fn decode_fetched(
    okey: &str,
    frame: &Bytes,
    f: &FrameRef,
    alone: bool,
) -> Result<Bytes, VolumeError> {
    let decoded = if alone {
        chunk::decode_shared_frame(frame, f.crc, f.blocks, f.encoding)
    } else {
        chunk::decode_frame(frame, f.crc, f.blocks, f.encoding)
    };
    decoded.map_err(|source| {
        tracing::error!(key = %okey, error = %source, "corrupt chunk frame");
        VolumeError::Chunk {
            key: okey.to_owned(),
            source,
        }
    })
}

impl Inner {
    /// Why the volume failed, if it did: the flusher's reason, or the WAL's failed sync.
    fn failure(&self) -> Option<String> {
        if !self.has_failed.load(Ordering::Acquire) && !self.wal.failed() {
            return None;
        }
        if let Some(reason) = lock(&self.failed).clone() {
            return Some(reason);
        }
        self.wal.failed().then(|| "WAL fdatasync failed".to_owned())
    }

    /// [`VolumeError::Failed`] once the volume failed. The first caller to see a WAL failure
    /// fails the volume, which wakes every writer and waiter.
    fn check_failed(&self) -> Result<(), VolumeError> {
        match self.failure() {
            Some(reason) => {
                if lock(&self.failed).is_none() {
                    self.fail(reason.clone());
                }
                Err(VolumeError::Failed(reason))
            }
            None => Ok(()),
        }
    }

    /// Fails the volume for good (until reopened): logged, writers waiting for buffer space and
    /// flushers waiting for commits are woken with [`VolumeError::Failed`].
    fn fail(&self, reason: String) {
        {
            let mut failed = lock(&self.failed);
            if failed.is_some() {
                return;
            }
            tracing::error!(volume = %self.id, %reason, "volume failed: writes and flushes are refused until it is reopened; buffered data stays in the WAL");
            *failed = Some(reason);
            self.has_failed.store(true, Ordering::Release);
        }
        self.permits.close();
        self.flushed.notify_waiters();
    }

    /// Returns write-buffer permits, paying off replay debt first.
    fn release(&self, n: u64) {
        let mut debt = lock(&self.permit_debt);
        let pay = n.min(*debt);
        *debt -= pay;
        self.permits.add_permits((n - pay) as usize);
    }
}

/// A chunk object being built and uploaded.
struct InFlight {
    /// The memtable it comes from.
    mem: Arc<MemTable>,
    /// True for the memtable's last chunk (its commit advances the checkpoint).
    last: bool,
    /// True for the first of several chunks of one memtable (the WAL is synced before it commits).
    first_of_split: bool,
    /// The chunk's object id and input, kept to build it again after a failed attempt.
    object_id: u64,
    input: Arc<Vec<chunk::InputExtent>>,
    /// Attempts so far (at most [`CHUNK_ATTEMPTS`]).
    attempts: u32,
    task: tokio::task::JoinHandle<Option<Uploaded>>,
}

/// How often a chunk is built and uploaded before a failure (a panicked or failed build, or
/// backend errors that are not transient for [`VolumeConfig::permanent_error_timeout`]) fails
/// the volume instead of being retried again.
const CHUNK_ATTEMPTS: u32 = 3;

/// Starts building and uploading chunk `object_id` of `input` (`last`: the last part of its
/// memtable; the others carry `chunk::FLAG_MORE_PARTS`).
fn spawn_upload(
    inner: &Arc<Inner>,
    object_id: u64,
    input: Arc<Vec<chunk::InputExtent>>,
    last: bool,
) -> tokio::task::JoinHandle<Option<Uploaded>> {
    let inner = inner.clone();
    let flags = if last { 0 } else { chunk::FLAG_MORE_PARTS };
    tokio::spawn(async move {
        let uploaded = upload_chunk(&inner, object_id, input, flags).await;
        // The flusher schedules the next chunk as soon as this one is out.
        inner.wake.notify_one();
        uploaded
    })
}

/// A chunk object durable in the backend, ready to commit.
struct Uploaded {
    object_id: u64,
    index: Vec<chunk::ChunkExtent>,
    stored_bytes: u64,
}

/// The background flusher of one volume. Frozen memtables are cut into chunk objects, which are
/// built and uploaded concurrently (up to `upload_concurrency`) and committed strictly in order,
/// so the checkpoint always covers a prefix of the WAL.
async fn flusher(inner: Arc<Inner>, mut state: VolumeState) {
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    // Frozen memtables (from the front of the queue) whose chunks are all scheduled.
    let mut scheduled = 0usize;
    let mut next_object_id = state.next_object_id.max(1);
    // Twice the upload slots in tasks: chunks are compressed while earlier ones upload, so the
    // PUTs in flight stay at `upload_concurrency` (measured: scripts/bench-s3.sh).
    let concurrency = 2 * inner.config.upload_concurrency.max(1);
    let mut next_compaction = Instant::now() + inner.config.compaction.check_interval;
    // Before the first upload reuses their ids (waits out a backend outage like an upload).
    let cleaned = retry_until_stopped(
        &inner,
        "deleting uncommitted chunk objects",
        "",
        false,
        || remove_uncommitted_chunks(&inner.backend, &inner.id, next_object_id),
    )
    .await;
    if cleaned.is_none() {
        return;
    }
    loop {
        if inner.stop.load(Ordering::SeqCst) {
            abort(in_flight).await;
            return;
        }
        // A failed WAL fails the volume (waking its waiters); the flusher goes on turning what
        // is buffered into chunks.
        let _ = inner.check_failed();
        // Schedule uploads for the next frozen memtables while fewer than `concurrency` chunks
        // are being built or uploaded (finished ones only wait for their in-order commit).
        while in_flight.iter().filter(|j| !j.task.is_finished()).count() < concurrency {
            let next = {
                let mut st = lock(&inner.state);
                if scheduled == st.buf.frozen().len()
                    && in_flight.is_empty()
                    && st.last_write.elapsed() >= inner.config.idle_flush
                {
                    st.buf.freeze();
                }
                st.buf.frozen().get(scheduled).cloned()
            };
            let Some(mem) = next else { break };
            scheduled += 1;
            let groups = chunk::split_input(
                mem.to_chunk_input(),
                inner.config.chunk_bytes,
                MAX_CHUNK_EXTENTS,
            );
            let n = groups.len();
            for (i, input) in groups.into_iter().enumerate() {
                let object_id = next_object_id;
                next_object_id += 1;
                let input = Arc::new(input);
                in_flight.push_back(InFlight {
                    mem: mem.clone(),
                    last: i + 1 == n,
                    first_of_split: i == 0 && n > 1,
                    object_id,
                    input: input.clone(),
                    attempts: 1,
                    task: spawn_upload(&inner, object_id, input, i + 1 == n),
                });
            }
        }
        let Some(front) = in_flight.front_mut() else {
            if inner.draining.load(Ordering::SeqCst) && lock(&inner.state).buf.frozen().is_empty() {
                return;
            }
            let pending = !lock(&inner.state).buf.frozen().is_empty();
            if !pending {
                inner.object_buffers.clear();
            }
            if !pending
                && inner.config.compaction.threshold_percent > 0
                && state.max_seq <= state.checkpoint
                && Instant::now() >= next_compaction
            {
                let (next, wait) = compact(&inner, state, next_object_id).await;
                if let Some(next) = next {
                    state = next;
                    next_object_id = state.next_object_id;
                }
                next_compaction = Instant::now() + wait;
                continue;
            }
            let until_compaction = next_compaction.saturating_duration_since(Instant::now());
            let nap = inner
                .config
                .idle_flush
                .min(until_compaction.max(Duration::from_millis(10)));
            let _ = tokio::time::timeout(nap, inner.wake.notified()).await;
            continue;
        };
        // Wait for the oldest chunk (commits go in order), or for room to schedule another.
        let done = tokio::select! {
            done = &mut front.task => done,
            () = inner.wake.notified() => continue,
        };
        let Some(mut job) = in_flight.pop_front() else {
            continue;
        };
        let uploaded = match done {
            Ok(Some(u)) => u,
            _ if inner.stop.load(Ordering::SeqCst) => {
                abort(in_flight).await;
                return;
            }
            // The build failed or panicked, or the backend refused the PUT for good (logged):
            // try again, then give up loudly; the data stays in the WAL either way.
            failed => {
                if let Err(e) = &failed {
                    tracing::error!(volume = %inner.id, object_id = job.object_id, error = %e, "chunk task failed");
                }
                if job.attempts < CHUNK_ATTEMPTS {
                    job.attempts += 1;
                    inner.stats.flush_retries.fetch_add(1, Ordering::Relaxed);
                    job.task = spawn_upload(&inner, job.object_id, job.input.clone(), job.last);
                    in_flight.push_front(job);
                    continue;
                }
                inner.fail(format!(
                    "chunk {} of the write buffer failed {} times",
                    job.object_id, job.attempts
                ));
                abort(in_flight).await;
                return;
            }
        };
        if job.first_of_split && !sync_wal_for_split(&inner).await {
            abort(in_flight).await;
            return;
        }
        let checkpoint = if job.last {
            job.mem.max_seq()
        } else {
            state.checkpoint
        };
        let Some(next) = commit_chunk(&inner, uploaded, state, checkpoint, job.mem.max_seq()).await
        else {
            abort(in_flight).await;
            return;
        };
        state = next;
        if job.last {
            lock(&inner.state).buf.drop_committed(&job.mem);
            scheduled -= 1;
            inner.release(job.mem.charged);
            inner.wal.trim(state.checkpoint);
            inner.flushed.notify_waiters();
        }
    }
}

/// Runs `op` until it succeeds, backing off between failures (logged as `what` with `key`, at
/// error level when `serious`, else warn, and counted in `flush_retries`); `None` once a stop is
/// requested.
/// Waiting is always safe here: the data stays in the WAL meanwhile.
async fn retry_until_stopped<T, E, Fut>(
    inner: &Inner,
    what: &str,
    key: &str,
    serious: bool,
    mut op: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let policy = RetryPolicy::forever();
    let mut attempt = 0u32;
    loop {
        if inner.stop.load(Ordering::SeqCst) {
            return None;
        }
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                inner.stats.flush_retries.fetch_add(1, Ordering::Relaxed);
                if serious {
                    tracing::error!(volume = %inner.id, key, error = %e, attempt, "{what} failed; retrying");
                } else {
                    tracing::warn!(volume = %inner.id, key, error = %e, attempt, "{what} failed; retrying");
                }
                tokio::time::sleep(policy.delay(attempt)).await;
                attempt += 1;
            }
        }
    }
}

/// One compaction step: picks this volume's chunks whose live fraction is below the threshold
/// (fewest live blocks first, at most a chunk of live data), rewrites their live blocks — with
/// their original sequence numbers, so any newer write still wins — into chunk `object_id`,
/// and commits it like a flushed chunk (checkpoint unchanged). Returns the new state if it
/// committed, and how long to wait before the next step (the rate limit, or the check interval
/// when there was nothing to do or a step failed).
async fn compact(
    inner: &Arc<Inner>,
    state: VolumeState,
    object_id: u64,
) -> (Option<VolumeState>, Duration) {
    let cfg = inner.config.compaction;
    let picked = match compaction_input(inner).await {
        Ok(Some(v)) => v,
        Ok(None) => return (None, cfg.check_interval),
        Err(e) => {
            tracing::warn!(error = %e, "compaction skipped");
            return (None, cfg.check_interval);
        }
    };
    let moved: u64 = picked.iter().map(|e| e.block_count * BLOCK_SIZE).sum();
    let Some(up) = upload_chunk(inner, object_id, Arc::new(picked), 0).await else {
        return (None, cfg.check_interval);
    };
    let Some(next) = commit_chunk(inner, up, state, state.checkpoint, state.max_seq).await else {
        return (None, cfg.check_interval);
    };
    inner.stats.compacted_chunks.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .compacted_bytes
        .fetch_add(moved, Ordering::Relaxed);
    tracing::debug!(object_id, moved_bytes = moved, "chunk compacted");
    let rate = cfg.rate_bytes_per_sec.max(1);
    (
        Some(next),
        Duration::from_secs_f64(moved as f64 / rate as f64),
    )
}

/// The live extents of the chunks compaction should rewrite next, with their data; `None` when
/// no chunk is below the threshold.
async fn compaction_input(
    inner: &Arc<Inner>,
) -> Result<Option<Vec<chunk::InputExtent>>, VolumeError> {
    let (meta, lookup, id) = (inner.meta.clone(), inner.lookup.clone(), inner.id.clone());
    let threshold = u64::from(inner.config.compaction.threshold_percent);
    let chunk_blocks = (inner.config.chunk_bytes / BLOCK_SIZE).max(1);
    let owner = id.number();
    let picked = blocking(move || {
        let mut candidates: Vec<(u64, crate::meta::ChunkStats)> = meta
            .chunk_stats(&id)?
            .into_iter()
            .filter(|(_, s)| s.live_blocks > 0 && s.live_blocks * 100 < s.data_blocks * threshold)
            .collect();
        candidates.sort_by_key(|(_, s)| (s.live_blocks * 1000) / s.data_blocks.max(1));
        let mut picked = Vec::new();
        let mut blocks = 0;
        for (object_id, s) in candidates {
            if !picked.is_empty() && blocks + s.live_blocks > chunk_blocks {
                break;
            }
            blocks += s.live_blocks;
            picked.push(object_id);
        }
        Ok(picked)
    })
    .await?;
    if picked.is_empty() {
        return Ok(None);
    }
    // Every map extent pointing into a chunk lies inside one of the block ranges its index
    // lists (extents only get cut), so the live extents are found by scanning those ranges
    // of the map, not the whole map (a full scan took 0.3 s per step at 400k extents).
    let mut ranges = Vec::new();
    for &object_id in &picked {
        let (_, index) = read_chunk_index(&inner.backend, &chunk_key(&inner.id, object_id)).await?;
        ranges.extend(
            index
                .iter()
                .filter(|x| x.kind == chunk::ExtentKind::Data)
                .map(|x| (x.start_block, x.start_block + u64::from(x.block_count))),
        );
    }
    let ranges = merge_ranges(ranges);
    let picked: std::collections::HashSet<u64> = picked.into_iter().collect();
    let extents = blocking(move || {
        Ok(lookup
            .overlapping_ranges(&ranges)?
            .into_iter()
            .filter(|e| matches!(e.target, Target::Data(f) if f.owner == owner && picked.contains(&f.object_id)))
            .collect::<Vec<_>>())
    })
    .await?;
    if extents.is_empty() {
        return Ok(None);
    }
    let volume = Volume {
        inner: inner.clone(),
    };
    let mut input = Vec::with_capacity(extents.len());
    for e in extents {
        let Target::Data(f) = e.target else { continue };
        let frame = volume.frame(f).await?;
        let from = ((e.start - f.first_block) as usize) * BLOCK_BYTES;
        let len = e.count as usize * BLOCK_BYTES;
        input.push(chunk::InputExtent {
            start_block: e.start,
            block_count: e.count,
            seq: e.seq,
            data: Some(frame.slice(from..from + len)),
        });
    }
    Ok(Some(input))
}

/// `ranges` (block `(start, end)` pairs, any order) sorted and merged where they overlap or
/// touch: sorted ranges with gaps between them, as [`BlockLookup::overlapping_ranges`] takes.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Cancels uploads that will not be committed and waits for them, so none writes afterwards.
async fn abort(in_flight: VecDeque<InFlight>) {
    for job in &in_flight {
        job.task.abort();
    }
    for job in in_flight {
        let _ = job.task.await;
    }
}

/// Largest number of extents in one chunk object (bounds the index: 64 Ki x 40 bytes).
const MAX_CHUNK_EXTENTS: usize = 1 << 16;

/// Before the first partial commit of a memtable that spans several chunks: some of its sequence
/// numbers reach the map before the checkpoint covers them, so every record must survive a crash,
/// or replay could resurrect an older, durable version of a block under the newer one in the map.
/// Retries until the WAL syncs; false if asked to stop, or once the WAL failed for good (the
/// volume then fails).
async fn sync_wal_for_split(inner: &Inner) -> bool {
    match retry_until_stopped(
        inner,
        "WAL sync before a split chunk commit",
        "",
        false,
        || async {
            match inner.wal.sync().await {
                Err(e) if inner.wal.failed() => Ok(Err(e)),
                other => other.map(Ok),
            }
        },
    )
    .await
    {
        Some(Ok(())) => true,
        // The WAL failed for good: fail the volume (wakes its writers and waiters).
        Some(Err(_)) => {
            let _ = inner.check_failed();
            false
        }
        None => false,
    }
}

/// Builds one chunk object and uploads it, retrying the upload with backoff until it succeeds
/// (data stays in the WAL meanwhile). `None` if the build failed (a bug) or a stop was requested.
async fn upload_chunk(
    inner: &Inner,
    object_id: u64,
    input: Arc<Vec<chunk::InputExtent>>,
    flags: u16,
) -> Option<Uploaded> {
    let opts = inner.config.chunk;
    let tag = inner.id.tag();
    let buf = inner.object_buffers.take();
    let built = crate::background::run(move || {
        chunk::build_flagged(tag, object_id, &input, opts, buf, flags)
    })
    .await;
    let (object, index) = match built {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::error!(volume = %inner.id, error = %e, "chunk build failed; flusher stops, data stays in the WAL");
            return None;
        }
        Err(e) => {
            tracing::error!(volume = %inner.id, error = %e, "chunk build task failed");
            return None;
        }
    };
    let key = chunk_key(&inner.id, object_id);
    let stored_bytes = object.len() as u64;
    let _slot = inner.upload_slots.acquire().await.ok()?;
    let started = Instant::now();
    // Transient errors (outages, throttling, a full disk) are retried until they pass; errors
    // the backend calls permanent (denied, I/O error) end this attempt once they have lasted
    // `permanent_error_timeout` without a success or a transient error between them.
    let give_up = inner.config.permanent_error_timeout;
    let since: Mutex<Option<Instant>> = Mutex::new(None);
    retry_until_stopped(inner, "chunk upload", &key, false, || {
        let put = inner.backend.put(&key, object.clone());
        let since = &since;
        async move {
            match put.await {
                Err(e) if !e.is_transient() => {
                    let first = *lock(since).get_or_insert_with(Instant::now);
                    if first.elapsed() >= give_up {
                        return Ok(Err(e));
                    }
                    Err(e)
                }
                other => {
                    *lock(since) = None;
                    other.map(Ok)
                }
            }
        }
    })
    .await?
    .map_err(|e| {
        tracing::error!(volume = %inner.id, key, error = %e, "chunk upload refused for good");
    })
    .ok()?;
    crate::crash_point!("chunk-uploaded");
    inner.upload_seconds.record(started.elapsed());
    inner.object_buffers.give(object);
    Some(Uploaded {
        object_id,
        index,
        stored_bytes,
    })
}

/// Commits an uploaded chunk to the map (retrying metadata failures); `None` if asked to stop.
async fn commit_chunk(
    inner: &Inner,
    up: Uploaded,
    state: VolumeState,
    checkpoint: u64,
    max_seq: u64,
) -> Option<VolumeState> {
    let commit = Arc::new(ChunkCommit {
        object_id: up.object_id,
        extents: up
            .index
            .iter()
            .map(|e| MapExtent::from_chunk(inner.id.number(), up.object_id, e))
            .collect(),
        stored_bytes: up.stored_bytes,
    });
    let next = VolumeState {
        checkpoint: state.checkpoint.max(checkpoint),
        next_object_id: up.object_id + 1,
        max_seq: state.max_seq.max(max_seq),
    };
    let _commits = inner.commit_lock.lock().await;
    crate::crash_point!("map-commit-before");
    retry_until_stopped(inner, "map commit", "", true, || {
        let (lookup, c) = (inner.lookup.clone(), commit.clone());
        async move {
            crate::background::run(move || lookup.commit_chunk(&c, next))
                .await
                .map_err(|e| MetaError::Task(e.to_string()))?
        }
    })
    .await?;
    crate::crash_point!("map-commit-after");
    *lock(&inner.committed) = next;
    inner.stats.chunks.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .chunk_bytes
        .fetch_add(up.stored_bytes, Ordering::Relaxed);
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn ranges_merge_where_they_overlap_or_touch() {
        assert_eq!(
            merge_ranges(vec![
                (9, 12),
                (0, 2),
                (2, 4),
                (10, 11),
                (5, 6),
                (7, 7),
                (11, 15)
            ]),
            vec![(0, 4), (5, 6), (9, 15)]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }
}

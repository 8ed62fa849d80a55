//! A volume: the engine API in bytes over the write buffer, WAL, chunks and BlockLookup.
//!
//! Write path (this file): validate → (unaligned: read-modify-write the edge blocks under the
//! RMW lock) → take write-buffer permits (backpressure) → under the state lock assign the next
//! sequence number, queue the WAL record and insert into the active memtable → with FUA, wait for
//! the WAL sync. A memtable that reaches the chunk size is frozen; the flusher ([`flusher`])
//! turns each frozen memtable into chunk objects, commits their extents and the new WAL
//! checkpoint in one RocksDB batch, drops the memtable (returning its permits) and trims the WAL.
//!
//! Read path ([`read`]): newest wins — the write buffer's index (the newest version across the
//! active and frozen memtables), then the BlockLookup map and chunk frames (through the shared
//! frame cache); anything else reads as zeros.
//!
//! Compaction ([`compaction`]) picks the live blocks of sparse chunks; the flusher rewrites them.

mod compaction;
mod config;
mod error;
mod flusher;
pub(crate) mod read;
mod ship;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, Semaphore};

use crate::backend::SharedBackend;
use crate::block::{is_aligned, BlockRange, BLOCK_SIZE};
use crate::buffer::{BufExtent, Payload, WriteBuffer};
use crate::cache::FrameCache;
use crate::chunk;
use crate::cluster::lease::Tenure;
use crate::ids::VolumeId;
use crate::lookup::BlockLookup;
use crate::meta::{blocking, MetaError, MetaStore, VolumeState};
use crate::wal::{self, RecordHeader, RecordKind, Wal};
use crate::workq::WorkQueue;

pub use config::{CompactionConfig, VolumeConfig};
pub use error::VolumeError;
pub(crate) use read::read_chunk_index;
pub use read::StatusExtent;
pub(crate) use ship::Chain;
pub use ship::SHIP_AHEAD_BYTES;

/// Largest single request in bytes (the NBD maximum block size, 32 MiB).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

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
    /// Chunk objects built with every frame raw because the flusher was behind the writers.
    pub uncompressed_chunks: AtomicU64,
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
    /// Cluster mode: the lease this node serves the volume under ([`Volume::serving_under`]).
    tenure: std::sync::OnceLock<Tenure>,
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
    /// Crash simulation: the stopping flusher drops its uploads instead of waiting for them.
    crashed: AtomicBool,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Why the volume failed, once it has ([`Volume::failed`]); `has_failed` is the lock-free
    /// test every write makes.
    failed: Mutex<Option<String>>,
    has_failed: AtomicBool,
    /// Set (true) when the volume starts closing: [`Volume::closed`] waits for it.
    closing: tokio::sync::watch::Sender<bool>,
    /// PUTs in flight (`upload_concurrency`); chunks are built ahead of them.
    upload_slots: Semaphore,
    /// Buffers of uploaded chunk objects, reused for the next ones while the flusher is busy:
    /// at most `upload_concurrency` (a freed buffer is usually taken by the next build at once;
    /// a larger pool only holds memory the RSS bound needs: docs/design/reused-chunk-buffers.md).
    object_buffers: chunk::ObjectBuffers,
    stats: VolumeStats,
    /// `vblock_chunk_upload_duration_seconds{volume}`: one successful chunk PUT (retries included).
    upload_seconds: metrics::Histogram,
    /// `vblock_backend_get_duration_seconds{volume,backend}`: one ranged GET of a frame.
    get_seconds: metrics::Histogram,
    /// `vblock_map_commit_duration_seconds{volume}`: one map commit (a synced RocksDB batch;
    /// retries included).
    commit_seconds: metrics::Histogram,
    /// Runs the blocking part of reads (map lookups, local frame reads, decompression).
    reads: Arc<WorkQueue>,
    /// WAL shipping (`VolumeConfig::ship_wal`), and its task.
    shipper: Option<ship::Shipper>,
    ship_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
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

/// Replays WAL records into memtables.
struct Replayer {
    chunk_bytes: u64,
    buf: WriteBuffer,
    /// With WAL shipping: the replayed records above this seq (the store has the rest), which
    /// the shipper queues.
    ship_after: Option<u64>,
    to_ship: Vec<(RecordHeader, Bytes)>,
}

impl Replayer {
    fn apply(&mut self, h: &RecordHeader, payload: Bytes) {
        if self.ship_after.is_some_and(|after| h.seq > after) && h.kind != RecordKind::SyncNote {
            self.to_ship.push((*h, payload.clone()));
        }
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
    /// [`VolumeError::InvalidArgument`] for a bad configuration.
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
        let wal_config = config.wal_config(wal_dir, id.to_string());
        let tag = id.tag();
        let chunk_bytes = config.chunk_bytes;
        // What the store already holds (its chain of shipped objects, FORMAT.md "Recovery"):
        // replayed records in it are not shipped again, and new records get higher seqs.
        // The epoch this node owns the volume in (0 until a takeover): its object ids and seqs
        // start at the epoch's base.
        let epoch = crate::cluster::epoch::epoch_of(state.next_object_id);
        let chain = if config.ship_wal {
            Some(open_chain(&backend, &id, state.checkpoint, epoch).await?)
        } else {
            None
        };
        let ship_after = chain.as_ref().map(|c| c.through);
        let replay_started = Instant::now();
        let (wal, report, mut replayer) = tokio::task::spawn_blocking(move || {
            let mut r = Replayer {
                chunk_bytes,
                buf: WriteBuffer::new(),
                ship_after,
                to_ship: Vec::new(),
            };
            Wal::open(&wal_config, tag, state.checkpoint, |h, p| r.apply(h, p))
                .map(|(w, rep)| (w, rep, r))
        })
        .await
        .map_err(|e| VolumeError::task("WAL replay", e))??;
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
        // Records the store holds beyond the local WAL (its tail was lost, or the WAL disk
        // replaced): taken from the store, applied and written to the local WAL.
        let local = report.max_seq.max(state.checkpoint);
        if let Some(c) = chain.as_ref().filter(|c| c.through > local) {
            let (fetched, broken) = c.records_after(&backend, &id, local).await?;
            if let Some(e) = broken {
                return Err(e);
            }
            tracing::warn!(volume = %id, local_seq = local, shipped_seq = c.through, records = fetched.len(), "the local WAL ends before the shipped WAL: its records are taken from the backend");
            for (h, p) in fetched {
                replayer.apply(&h, p.clone());
                wal.append(h.kind, h.seq, h.start_block, h.block_count, p)?;
            }
            wal.sync().await?;
        }
        let charged = replayer.buf.charged();
        let next_seq = state
            .max_seq
            .max(report.max_seq)
            .max(state.checkpoint)
            .max(chain.as_ref().map_or(0, |c| c.through))
            .max(crate::cluster::epoch::epoch_base(epoch))
            + 1;
        let shipper = chain.map(|c| {
            ship::Shipper::new(
                &id,
                epoch,
                &c,
                state.checkpoint,
                std::mem::take(&mut replayer.to_ship),
            )
        });
        let id_label = id.to_string();
        let backend_kind = backend.kind();
        let inner = Arc::new(Inner {
            lookup: BlockLookup::new(meta.clone(), id.clone()),
            meta,
            commit_lock: tokio::sync::Mutex::new(()),
            tenure: std::sync::OnceLock::new(),
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
            reads: WorkQueue::new(read::READ_WORKERS),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            crashed: AtomicBool::new(false),
            flusher: Mutex::new(None),
            failed: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
            upload_slots: Semaphore::new(config.upload_concurrency.max(1)),
            object_buffers: chunk::ObjectBuffers::new(config.upload_concurrency.max(1)),
            stats: VolumeStats::default(),
            shipper,
            ship_task: Mutex::new(None),
            upload_seconds: metrics::histogram!(
                "vblock_chunk_upload_duration_seconds",
                "volume" => id_label.clone()
            ),
            commit_seconds: metrics::histogram!(
                "vblock_map_commit_duration_seconds",
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
            flusher::flusher(inner.clone(), state),
            span,
        ));
        *lock(&inner.flusher) = Some(handle);
        if inner.shipper.is_some() {
            let span = tracing::info_span!(parent: None, "volume", volume = %inner.id);
            let handle = tokio::spawn(tracing::Instrument::instrument(
                ship::shipper(inner.clone()),
                span,
            ));
            *lock(&inner.ship_task) = Some(handle);
        }
        Ok(Self { inner })
    }

    /// Cluster mode: serves NBD I/O (reads, block status, writes, trims, flushes) only while
    /// `tenure` holds ([`VolumeError::LeaseLost`] after); `None` serves always. Set once, at
    /// the open ([`crate::engine::Engine::set_cluster_tenure`]).
    pub(crate) fn serving_under(self, tenure: Option<Tenure>) -> Self {
        if let Some(t) = tenure {
            let _ = self.inner.tenure.set(t);
        }
        self
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
            self.inner.sync().await?;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable (NBD_CMD_FLUSH).
    ///
    /// Errors: [`VolumeError::Failed`] once the volume failed, [`VolumeError::Wal`]; with WAL
    /// shipping [`VolumeError::Shipping`] (the backend did not take the records);
    /// [`VolumeError::LeaseLost`].
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.inner.check_tenure()?;
        self.inner.check_failed()?;
        self.inner.sync().await
    }

    /// With WAL shipping, waits for a conditional PUT of the shipped WAL that starts after the
    /// call and succeeds: no takeover had fenced this node before now (cluster mode's garbage
    /// collection deletes chunks only after one). Without shipping there is nothing to prove.
    ///
    /// Errors: [`VolumeError::Failed`] (a fenced volume fails), [`VolumeError::Shipping`],
    /// [`VolumeError::Closed`].
    pub async fn confirm_writer(&self) -> Result<(), VolumeError> {
        self.inner.check_failed()?;
        match &self.inner.shipper {
            Some(s) => {
                s.confirm().await?;
                self.inner.check_failed()
            }
            None => Ok(()),
        }
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
            self.inner.sync().await?;
        }
        Ok(())
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

    /// Sequences one write: permits, room in the WAL's backlog, WAL record, memtable insert — in
    /// that order.
    async fn commit(&self, start: u64, count: u64, payload: Payload) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let cost = match payload {
            Payload::Data(_) => count,
            Payload::Zero => 1,
        };
        inner.check_tenure()?;
        inner.check_failed()?;
        let Ok(permits) = inner.permits.acquire_many(cost as u32).await else {
            inner.check_failed()?;
            return Err(VolumeError::Closed);
        };
        // The write buffer does not bound the WAL's backlog: the flusher may move data into
        // chunks before its records are written (a WAL disk slower than the backend).
        let payload_len = match &payload {
            Payload::Data(b) => b.len(),
            Payload::Zero => 0,
        };
        inner.wal.reserve(payload_len).await;
        // The volume may have failed, or its lease lapsed, while this write waited.
        inner.check_tenure()?;
        inner.check_failed()?;
        let mut st = lock(&inner.state);
        if st.closed {
            return Err(VolumeError::Closed);
        }
        let seq = st.next_seq;
        let (kind, body) = match &payload {
            Payload::Data(b) => (RecordKind::Write, b.clone()),
            Payload::Zero => (RecordKind::Zero, Bytes::new()),
        };
        let shipped = inner.shipper.as_ref().map(|_| body.clone());
        if let Err(e) = inner.wal.append(kind, seq, start, count as u32, body) {
            inner.check_failed()?;
            return Err(e.into());
        }
        if let (Some(s), Some(body)) = (&inner.shipper, shipped) {
            let header = RecordHeader {
                kind,
                flags: 0,
                seq,
                volume_tag: inner.id.tag(),
                start_block: start,
                block_count: count as u32,
                payload_len: body.len() as u32,
            };
            s.record(header, body);
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
                let drained = lock(&inner.state).buf.frozen().is_empty();
                let between_memtables = state.max_seq <= state.checkpoint || drained;
                // Every write up to `target` is in the map once the checkpoint reached it, or
                // once what was frozen above is committed: after a takeover no write may have
                // been given a seq yet, and `target` (below the epoch's first seq) is never
                // reached.
                if (state.checkpoint >= target || drained) && between_memtables {
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

    /// Resolves once this instance has started closing (an unmount, a delete, a resize, the
    /// daemon's shutdown): every request from then on fails with [`VolumeError::Closed`], so an
    /// NBD connection to it ends (nbd_server::transmission).
    pub async fn closed(&self) {
        let mut rx = self.inner.closing.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }

    /// Stops accepting writes, turns everything buffered into chunks (waiting at most
    /// `drain_timeout`, not at all when it is zero; what is left stays in the WAL and is
    /// replayed at the next open), syncs the WAL and stops its writer.
    pub async fn close(&self, drain_timeout: Duration) -> Result<(), VolumeError> {
        let inner = &self.inner;
        {
            let mut st = lock(&inner.state);
            st.closed = true;
            st.buf.freeze();
        }
        inner.closing.send_replace(true);
        inner.draining.store(true, Ordering::SeqCst);
        inner.wake.notify_one();
        inner.flushed.notify_waiters();
        let handle = lock(&inner.flusher).take();
        if let Some(mut handle) = handle {
            if drain_timeout.is_zero() {
                tracing::info!(volume = %inner.id, "closing without a drain; the write buffer stays in the WAL");
                inner.stop.store(true, Ordering::SeqCst);
                inner.wake.notify_one();
                let _ = handle.await;
            } else if tokio::time::timeout(drain_timeout, &mut handle)
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
        inner.stop_shipper().await;
        let wal_inner = self.inner.clone();
        tokio::task::spawn_blocking(move || wal_inner.wal.shutdown(true))
            .await
            .map_err(|e| VolumeError::task("WAL shutdown", e))?;
        Ok(())
    }

    /// Crash simulation for tests: stops the flusher at its next step boundary and the WAL writer
    /// after writing (not syncing) what is queued — as if the process died there.
    #[doc(hidden)]
    pub async fn simulate_crash(&self) {
        let inner = &self.inner;
        // Stop before closed: whoever sees the volume closed knows the flusher is told to stop.
        inner.crashed.store(true, Ordering::SeqCst);
        inner.stop.store(true, Ordering::SeqCst);
        lock(&inner.state).closed = true;
        inner.closing.send_replace(true);
        inner.wake.notify_one();
        inner.flushed.notify_waiters();
        let handle = lock(&inner.flusher).take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
        inner.permits.close();
        inner.stop_shipper().await;
        let wal_inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || wal_inner.wal.shutdown(false)).await;
    }
}

/// The chain of `id`'s shipped WAL objects at open, with chunks holding every record through
/// `checkpoint`, for the owner of `epoch`. With orphans (objects past a break), a fence of this
/// epoch is stored after the highest listed counter first, so the chain goes on after it and
/// no counter is used twice (a takeover may have fenced after the orphans); then they are
/// deleted.
///
/// Errors: backend errors; [`VolumeError::Failed`] when a fence of a later epoch is listed, or
/// the fence after the orphans is refused (another node took the volume over: this one must
/// not write).
async fn open_chain(
    backend: &SharedBackend,
    id: &VolumeId,
    checkpoint: u64,
    epoch: u64,
) -> Result<ship::Chain, VolumeError> {
    let chain = ship::Chain::load(backend, id, checkpoint).await?;
    if let Some((counter, fenced_by)) = chain.fence.filter(|(_, e)| *e > epoch) {
        return Err(VolumeError::Failed(format!(
            "{} is a fence of epoch {fenced_by} (this node's is {epoch}): another node took the \
             volume over",
            crate::backend::wal_object_key(id, counter)
        )));
    }
    let mut chain = chain;
    if !chain.orphans.is_empty() {
        let at = chain.max_listed.saturating_add(1);
        let key = crate::backend::wal_object_key(id, at);
        let body = crate::cluster::walobj::encode_drop_fence(epoch, at);
        if !crate::retry::put_if_absent_retried(backend, &key, body).await? {
            metrics::counter!("vblock_fence_refusals_total", "volume" => id.to_string())
                .increment(1);
            return Err(VolumeError::Failed(format!(
                "{key} was stored by another node: the volume was taken over"
            )));
        }
        chain.last_counter = at;
        tracing::warn!(volume = %id, orphans = ?chain.orphans, fence = at, "deleting shipped WAL objects past a break in the chain (not part of the volume's history)");
        chain.delete_orphans(backend, id).await?;
    }
    Ok(chain)
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

impl Inner {
    /// True while the write buffer is more than half full: data arrives faster than the flusher
    /// turns it into chunks (writers wait once it is full).
    fn flusher_behind(&self) -> bool {
        (self.permits.available_permits() as u64) * BLOCK_SIZE < self.config.buffer_bytes / 2
    }

    /// Waits until every record appended before the call is durable: in the local WAL, and
    /// with WAL shipping also in the backend (the shipper syncs the WAL beside each PUT).
    async fn sync(&self) -> Result<(), VolumeError> {
        let synced = match &self.shipper {
            Some(s) => s.flush().await,
            None => self.wal.sync().await.map_err(VolumeError::from),
        };
        if synced.is_err() {
            // A fenced or failed volume says so (NBD_EIO), not "closed".
            self.check_failed()?;
        }
        synced
    }

    /// Stops the shipping task after its current round and waits for it.
    async fn stop_shipper(&self) {
        if let Some(s) = &self.shipper {
            s.stop();
        }
        let handle = lock(&self.ship_task).take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

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

    /// Cluster mode: [`VolumeError::LeaseLost`] once this node no longer keeps the lease it
    /// opened the volume under (judged now, on this node's clock: a node that resumes after a
    /// pause refuses before its lease watcher has run).
    fn check_tenure(&self) -> Result<(), VolumeError> {
        match self.tenure.get() {
            Some(t) if t.is_lost() => Err(VolumeError::LeaseLost(self.id.clone())),
            _ => Ok(()),
        }
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

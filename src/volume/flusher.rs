//! The flusher: freezes memtables, cuts them into chunk objects, builds and uploads them
//! concurrently, commits them in order (extents and WAL checkpoint in one RocksDB batch), drops
//! the committed memtables and trims the WAL; when idle, runs compaction steps.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{chunk_key, BackendError, SharedBackend};
use crate::block::BLOCK_SIZE;
use crate::buffer::MemTable;
use crate::chunk;
use crate::ids::VolumeId;
use crate::lookup::{ChunkCommit, MapExtent};
use crate::meta::{MetaError, VolumeState};
use crate::retry::RetryPolicy;

use super::compaction::compaction_input;
use super::{lock, Inner};

/// Deletes `id`'s chunk objects at or above `next_object_id`: an earlier instance uploaded them
/// but never committed them, and this one is about to reuse their ids. Left in place, one of
/// them could follow this instance's chunks in a disaster recovery (which takes the chunks above
/// a checkpoint in id order while the ids are contiguous) and mix an older history into this
/// one. The flusher does this before its first upload, retrying like an upload.
pub(super) async fn remove_uncommitted_chunks(
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
    // Only this epoch's ids: a later epoch's chunks belong to the node that took the volume
    // over from this one.
    let epoch_end = crate::cluster::epoch::epoch_base(
        crate::cluster::epoch::epoch_of(next_object_id).saturating_add(1),
    );
    let stale: Vec<u64> = crate::backend::chunk_ids(id, &keys)
        .into_iter()
        .filter(|&o| o >= next_object_id && o < epoch_end)
        .collect();
    for &o in &stale {
        backend.delete(&chunk_key(id, o)).await?;
    }
    if !stale.is_empty() {
        tracing::info!(volume = %id, objects = stale.len(), next_object_id, "deleted chunk objects an earlier run uploaded but never committed");
    }
    Ok(())
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

/// Whether a chunk's data comes in runs of two or more blocks on average (a run: data frames
/// back to back in block order; sequential writes make runs of hundreds, scattered 4 KiB writes
/// runs of one, whatever the frame size). Such chunks are put uncached: the file backend writes
/// them with direct I/O (sustained sequential writes +80% without the page-cache copy), while
/// chunks of scattered blocks stay in the page cache, where random reads of them find them
/// (from the disk they ran ~30% slower; docs/design/direct-io.md). A chunk of zeros only holds
/// no data: uncached.
fn in_block_runs(index: &[chunk::ChunkExtent]) -> bool {
    let (mut runs, mut blocks, mut run_end) = (0u64, 0u64, None);
    for e in index.iter().filter(|e| e.kind == chunk::ExtentKind::Data) {
        if run_end != Some(e.start_block) {
            runs += 1;
        }
        blocks += u64::from(e.block_count);
        run_end = Some(e.start_block + u64::from(e.block_count));
    }
    blocks >= 2 * runs
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
pub(super) async fn flusher(inner: Arc<Inner>, state: VolumeState) {
    // Before the first upload reuses their ids (waits out a backend outage like an upload).
    let next_object_id = state.next_object_id.max(1);
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
    let mut f = Flusher {
        // Twice the upload slots in tasks: chunks are compressed while earlier ones upload, so
        // the PUTs in flight stay at `upload_concurrency` (docs/design/flusher-pipeline.md).
        concurrency: 2 * inner.config.upload_concurrency.max(1),
        next_compaction: Instant::now() + inner.config.compaction.check_interval,
        inner,
        state,
        in_flight: VecDeque::new(),
        scheduled: 0,
        next_object_id,
    };
    loop {
        if f.inner.stop.load(Ordering::SeqCst) {
            break;
        }
        // A failed WAL fails the volume (waking its waiters); the flusher goes on turning what
        // is buffered into chunks.
        let _ = f.inner.check_failed();
        f.schedule();
        let Some(front) = f.in_flight.front_mut() else {
            if f.idle().await.is_break() {
                return;
            }
            continue;
        };
        // Wait for the oldest chunk (commits go in order), or for room to schedule another.
        let done = tokio::select! {
            done = &mut front.task => done,
            () = f.inner.wake.notified() => continue,
        };
        if f.finish_oldest(done).await.is_break() {
            break;
        }
    }
    // The flusher is done: retries in flight end after their current attempt.
    f.inner.stop.store(true, Ordering::SeqCst);
    let crashed = f.inner.crashed.load(Ordering::SeqCst);
    end_uploads(std::mem::take(&mut f.in_flight), crashed).await;
}

/// The flusher's state between steps.
struct Flusher {
    inner: Arc<Inner>,
    /// The state of the last map commit.
    state: VolumeState,
    /// Chunks being built and uploaded, oldest first (they commit in this order).
    in_flight: VecDeque<InFlight>,
    /// Frozen memtables (from the front of the queue) whose chunks are all scheduled.
    scheduled: usize,
    /// The object id the next chunk gets.
    next_object_id: u64,
    /// Chunk tasks building or uploading at once at most.
    concurrency: usize,
    /// When an idle flusher next looks for chunks to compact.
    next_compaction: Instant,
}

impl Flusher {
    /// Starts uploads for the next frozen memtables (freezing an idle active one) while fewer
    /// than `concurrency` chunks are being built or uploaded; finished ones only wait for
    /// their in-order commit.
    fn schedule(&mut self) {
        let inner = &self.inner;
        while self
            .in_flight
            .iter()
            .filter(|j| !j.task.is_finished())
            .count()
            < self.concurrency
        {
            let next = {
                let mut st = lock(&inner.state);
                if self.scheduled == st.buf.frozen().len()
                    && self.in_flight.is_empty()
                    && st.last_write.elapsed() >= inner.config.idle_flush
                {
                    st.buf.freeze();
                }
                st.buf.frozen().get(self.scheduled).cloned()
            };
            let Some(mem) = next else { break };
            self.scheduled += 1;
            let groups = chunk::split_input(
                mem.to_chunk_input(),
                inner.config.chunk_bytes,
                MAX_CHUNK_EXTENTS,
            );
            let n = groups.len();
            for (i, input) in groups.into_iter().enumerate() {
                let object_id = self.next_object_id;
                self.next_object_id += 1;
                let input = Arc::new(input);
                self.in_flight.push_back(InFlight {
                    mem: mem.clone(),
                    last: i + 1 == n,
                    first_of_split: i == 0 && n > 1,
                    object_id,
                    input: input.clone(),
                    attempts: 1,
                    task: spawn_upload(inner, object_id, input, i + 1 == n),
                });
            }
        }
    }

    /// Nothing in flight: exits once draining and empty (`Break`), runs a compaction step when
    /// one is due, or naps until woken.
    async fn idle(&mut self) -> ControlFlow<()> {
        let inner = self.inner.clone();
        let pending = !lock(&inner.state).buf.frozen().is_empty();
        if inner.draining.load(Ordering::SeqCst) && !pending {
            return ControlFlow::Break(());
        }
        if !pending {
            inner.object_buffers.clear();
        }
        if !pending
            && inner.config.compaction.threshold_percent > 0
            && self.state.max_seq <= self.state.checkpoint
            && Instant::now() >= self.next_compaction
        {
            let (next, wait) = compact(&inner, self.state, self.next_object_id).await;
            if let Some(next) = next {
                self.state = next;
                self.next_object_id = next.next_object_id;
            }
            self.next_compaction = Instant::now() + wait;
            return ControlFlow::Continue(());
        }
        let until_compaction = self
            .next_compaction
            .saturating_duration_since(Instant::now());
        let nap = inner
            .config
            .idle_flush
            .min(until_compaction.max(Duration::from_millis(10)));
        let _ = tokio::time::timeout(nap, inner.wake.notified()).await;
        ControlFlow::Continue(())
    }

    /// The oldest chunk's task ended with `done`: commits it (after a WAL sync for the first
    /// part of a split memtable), and after a memtable's last chunk drops the memtable and
    /// trims the WAL. A failed task is retried up to [`CHUNK_ATTEMPTS`] times, then the volume
    /// fails. `Break`: the flusher stops (asked to, or failed).
    async fn finish_oldest(
        &mut self,
        done: Result<Option<Uploaded>, tokio::task::JoinError>,
    ) -> ControlFlow<()> {
        let inner = self.inner.clone();
        let Some(mut job) = self.in_flight.pop_front() else {
            return ControlFlow::Continue(());
        };
        let uploaded = match done {
            Ok(Some(u)) => u,
            _ if inner.stop.load(Ordering::SeqCst) => return ControlFlow::Break(()),
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
                    self.in_flight.push_front(job);
                    return ControlFlow::Continue(());
                }
                inner.fail(format!(
                    "chunk {} of the write buffer failed {} times",
                    job.object_id, job.attempts
                ));
                return ControlFlow::Break(());
            }
        };
        if job.first_of_split && !sync_wal_for_split(&inner).await {
            return ControlFlow::Break(());
        }
        let checkpoint = if job.last {
            job.mem.max_seq()
        } else {
            self.state.checkpoint
        };
        let max_seq = job.mem.max_seq();
        let Some(next) = commit_chunk(&inner, uploaded, self.state, checkpoint, max_seq).await
        else {
            return ControlFlow::Break(());
        };
        self.state = next;
        if job.last {
            lock(&inner.state).buf.drop_committed(&job.mem);
            self.scheduled -= 1;
            inner.release(job.mem.charged);
            inner.wal.trim(next.checkpoint);
            if let Some(s) = &inner.shipper {
                s.cover(next.checkpoint);
            }
            inner.flushed.notify_waiters();
        }
        ControlFlow::Continue(())
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

/// Waits for uploads that will not be committed (the stop flag is set: each ends after the
/// attempt under way, whose time the backend bounds), so that none writes afterwards. Aborting
/// them instead would drop the futures but not the writes already handed to the backend (an
/// HTTP request sent, a file write on a blocking thread): such a write could land after the next
/// instance of the volume reused its object id. A simulated crash (`crashed`) aborts them, as
/// the process's death would.
async fn end_uploads(in_flight: VecDeque<InFlight>, crashed: bool) {
    for job in in_flight {
        if crashed {
            job.task.abort();
        }
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
    let mut opts = inner.config.chunk;
    // Compression that yields (docs/design/compression-that-yields.md): with the write buffer
    // more than half full the flusher is behind the writers, who wait for its room; if an
    // upload slot is free, the builds are what it waits for, and zstd, their largest cost,
    // would hold the writers back further: frames are stored raw then. With every slot busy
    // (a slow backend) the chunk waits for a slot anyway, and fewer bytes to upload help.
    if opts.compress && inner.flusher_behind() && inner.upload_slots.available_permits() > 0 {
        opts.compress = false;
        inner
            .stats
            .uncompressed_chunks
            .fetch_add(1, Ordering::Relaxed);
    }
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
    let uncached = in_block_runs(&index);
    let _slot = inner.upload_slots.acquire().await.ok()?;
    let started = Instant::now();
    // Transient errors (outages, throttling, a full disk) are retried until they pass; errors
    // the backend calls permanent (denied, I/O error) end this attempt once they have lasted
    // `permanent_error_timeout` without a success or a transient error between them.
    let give_up = inner.config.permanent_error_timeout;
    let since: Mutex<Option<Instant>> = Mutex::new(None);
    retry_until_stopped(inner, "chunk upload", &key, false, || {
        let put = if uncached {
            inner.backend.put_uncached(&key, object.clone())
        } else {
            inner.backend.put(&key, object.clone())
        };
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
    let started = Instant::now();
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
    inner.commit_seconds.record(started.elapsed());
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
    use super::*;

    fn extent(start_block: u64, block_count: u32, kind: chunk::ExtentKind) -> chunk::ChunkExtent {
        chunk::ChunkExtent {
            start_block,
            seq: 1,
            block_count,
            kind,
            encoding: chunk::FrameEncoding::Raw,
            frame_offset: 0,
            frame_len: 0,
            frame_crc: 0,
        }
    }

    /// Chunks of sequential writes are put uncached, with 16 KiB frames or 4 KiB ones; chunks
    /// of scattered 4 KiB writes are not, whatever zero extents they also hold.
    #[test]
    fn only_chunks_of_block_runs_bypass_the_cache() {
        use chunk::ExtentKind::{Data, Zero};
        assert!(in_block_runs(&[extent(0, 4, Data), extent(4, 4, Data)]));
        let one_block_frames: Vec<_> = (0..8).map(|b| extent(b, 1, Data)).collect();
        assert!(in_block_runs(&one_block_frames), "--frame-size 4KiB");
        assert!(!in_block_runs(&[extent(0, 1, Data), extent(9, 1, Data)]));
        assert!(!in_block_runs(&[
            extent(0, 1, Data),
            extent(1, 1000, Zero),
            extent(1001, 1, Data)
        ]));
        assert!(in_block_runs(&[extent(0, 1000, Zero)]));
    }
}

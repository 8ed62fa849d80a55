//! WAL shipping (docs/design/cluster.md, "Fence"; `VolumeConfig::ship_wal`): a flush or FUA is
//! acknowledged only once every record it covers is in the object store, so that it outlives
//! the node's disks.
//!
//! Every record the volume appends to its WAL is also queued here (shared payloads, no copy).
//! One task per volume takes the queue and, while the local WAL syncs, stores it as one shipped
//! WAL object (`VOLUMEID/wal/COUNTER`, [`crate::cluster::walobj`]) with a conditional PUT at
//! the next counter. Flushes that arrive meanwhile share the next object. One PUT is in flight
//! at a time, so objects land in counter order. The queue is also shipped without a flush once it holds
//! [`SHIP_AHEAD_BYTES`], which bounds what it holds.
//!
//! Records the flusher's chunks cover (the map's checkpoint) leave the queue unshipped, and
//! stored objects whose records chunks cover are deleted, several at once and while the next
//! object is PUT. Each object's `after_seq` says through which seq earlier objects and chunks
//! hold every record, so replay from the store ([`crate::recovery`]) can prove there is no gap;
//! it skips covered objects, so the order of deletes does not matter.
//!
//! A conditional PUT refused because another object holds the counter means another writer
//! took the volume over: the volume fails (writes and flushes get `NBD_EIO`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{watch, Notify};

use crate::backend::{
    wal_object_counters, wal_object_key, wal_object_prefix, BackendError, SharedBackend,
};
use crate::cluster::walobj::{self, WalObjectEncoder, WalObjectKind, WAL_OBJECT_HEADER_LEN};
use crate::ids::VolumeId;
use crate::retry::{delete_retried, put_if_absent_retried, retry, RetryPolicy};
use crate::wal::RecordHeader;

use super::{lock, Inner, VolumeError};

/// The queue is shipped without waiting for a flush once it holds this many bytes.
pub const SHIP_AHEAD_BYTES: u64 = 8 << 20;

/// Shipped objects (headers, or whole ones) read at once when a chain is loaded or replayed.
const HEADER_READS: usize = 16;

/// A volume's shipped WAL objects as replay sees them (FORMAT.md, "Recovery"): those chunks
/// cover, then the chain replay walks, then orphans past a break. A fence object (a takeover)
/// holds a place in the chain and, after a break, restarts it: its node adopted every record
/// before it.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    /// Objects whose records chunks hold (last seq at or below `covered`), in counter order:
    /// counter and last seq. Replay skips them; they may be deleted in any order.
    pub covered: Vec<(u64, u64)>,
    /// From the first object chunks do not cover: consecutive counters (fences included),
    /// each following what is known before it (`after_seq`); counter and last seq.
    pub chain: Vec<(u64, u64)>,
    /// Objects past a break in the chain (a missing counter, an unreadable header, an
    /// `after_seq` beyond what is known) and before any fence that restarts it: never part of
    /// the volume's history.
    pub orphans: Vec<u64>,
    /// Some break was not dropped by its owner (no [`WalObjectKind::DropFence`] ends it): the
    /// objects past it may hold acknowledged writes that this walk does not have. One PUT is
    /// in flight at a time, so no crash leaves a break: the bucket was damaged.
    pub damaged: bool,
    /// Chunks and the chain hold every record through this seq.
    pub through: u64,
    /// The fence of the highest epoch listed: its counter and epoch.
    pub fence: Option<(u64, u64)>,
    /// The highest counter kept (an object covered, in the chain, or a fence).
    pub last_counter: u64,
    /// The highest counter listed (orphans included).
    pub max_listed: u64,
}

impl Chain {
    /// Lists `volume`'s shipped WAL objects and reads each one's header (a ranged GET), with
    /// chunks holding every record through seq `covered`.
    ///
    /// Errors: backend errors other than an object missing or unreadable (which ends the
    /// chain).
    pub(crate) async fn load(
        backend: &SharedBackend,
        volume: &VolumeId,
        covered: u64,
    ) -> Result<Self, VolumeError> {
        let keys = backend.list(&wal_object_prefix(volume)).await?;
        let mut c = Chain {
            through: covered,
            ..Self::default()
        };
        let mut broken = false;
        // The counter the chain's next object must have, once it has begun.
        let mut prev: Option<u64> = None;
        // The headers, read HEADER_READS at a time, in counter order.
        let mut heads = futures::stream::iter(wal_object_counters(volume, &keys))
            .map(|counter| async move {
                let key = wal_object_key(volume, counter);
                let head = retry(&RetryPolicy::reads(), &key, || {
                    backend.get_range(&key, 0..WAL_OBJECT_HEADER_LEN as u64)
                })
                .await;
                (counter, key, head)
            })
            .buffered(HEADER_READS);
        while let Some((counter, key, head)) = heads.next().await {
            c.max_listed = counter;
            let head = match head {
                Ok(h) => Some(h),
                // Deleted since the listing (covered), or short: not readable.
                Err(BackendError::NotFound(_) | BackendError::BadRange { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let h = match head.map(|h| walobj::decode_header(&h, counter)) {
                Some(Ok(h)) => h,
                None if c.chain.is_empty() && !broken => continue,
                None => {
                    c.orphan(&mut broken, &key, counter, "missing");
                    continue;
                }
                Some(Err(_)) => {
                    c.orphan(&mut broken, &key, counter, "unreadable header");
                    continue;
                }
            };
            if h.kind.is_fence() {
                if h.after_seq > c.through {
                    let why = "a fence after records this walk does not have";
                    c.orphan(&mut broken, &key, counter, why);
                    continue;
                }
                if broken || !c.chain.is_empty() {
                    prev = Some(counter);
                }
                if broken && h.kind != WalObjectKind::DropFence {
                    c.damaged = true;
                }
                broken = false;
                if c.fence.is_none_or(|(_, e)| h.epoch >= e) {
                    c.fence = Some((counter, h.epoch));
                }
                c.last_counter = counter;
                continue;
            }
            if broken {
                c.orphans.push(counter);
                continue;
            }
            if c.chain.is_empty() && h.last_seq <= covered {
                c.covered.push((counter, h.last_seq));
                c.last_counter = counter;
                continue;
            }
            if prev.is_some_and(|p| counter != p + 1) || h.after_seq > c.through {
                let why = "a counter or the records after_seq names are missing";
                c.orphan(&mut broken, &key, counter, why);
                continue;
            }
            c.chain.push((counter, h.last_seq));
            prev = Some(counter);
            c.through = c.through.max(h.last_seq);
            c.last_counter = counter;
        }
        c.damaged |= broken;
        Ok(c)
    }

    /// Object `counter` (`key`) is not part of the history; the first such breaks the chain.
    fn orphan(&mut self, broken: &mut bool, key: &str, counter: u64, why: &str) {
        if !*broken {
            tracing::error!(%key, why, "shipped WAL objects break off here: the objects from it on are not part of the volume's history, up to a fence");
            *broken = true;
        }
        self.orphans.push(counter);
    }

    /// The counter the next object gets: after the last one kept (with orphans after it,
    /// the volume's open stores a fence after them first: counters are never reused).
    pub(crate) fn next_counter(&self) -> u64 {
        self.last_counter.saturating_add(1)
    }

    /// The chain's records above seq `after`, fetched and verified, in seq order. A body that
    /// does not verify (its header did) ends them: the records before it and the failure are
    /// returned.
    ///
    /// Errors: backend errors other than a missing object (which also ends them).
    pub(crate) async fn records_after(
        &self,
        backend: &SharedBackend,
        volume: &VolumeId,
        after: u64,
    ) -> Result<(Vec<(RecordHeader, Bytes)>, Option<VolumeError>), VolumeError> {
        let mut out = Vec::new();
        // The bodies, read HEADER_READS at a time, in counter order.
        let wanted: Vec<u64> = self
            .chain
            .iter()
            .filter(|(_, last)| *last > after)
            .map(|(counter, _)| *counter)
            .collect();
        let mut bodies = futures::stream::iter(wanted)
            .map(|counter| async move {
                let key = wal_object_key(volume, counter);
                let body = retry(&RetryPolicy::reads(), &key, || backend.get(&key)).await;
                (counter, key, body)
            })
            .buffered(HEADER_READS);
        while let Some((counter, key, body)) = bodies.next().await {
            let corrupt = |reason: String| {
                Some(VolumeError::Corrupt {
                    what: format!("shipped WAL object {key}"),
                    reason,
                })
            };
            let body = match body {
                Ok(b) => b,
                Err(e @ BackendError::NotFound(_)) => return Ok((out, corrupt(e.to_string()))),
                Err(e) => return Err(e.into()),
            };
            let records = match walobj::decode(&body, counter) {
                Ok((_, records)) => records,
                Err(e) => return Ok((out, corrupt(e.to_string()))),
            };
            if let Some((r, _)) = records.iter().find(|(r, _)| r.volume_tag != volume.tag()) {
                let why = format!("record {} belongs to another volume", r.seq);
                return Ok((out, corrupt(why)));
            }
            out.extend(records.into_iter().filter(|(r, _)| r.seq > after));
        }
        Ok((out, None))
    }

    /// Deletes the orphans.
    ///
    /// Errors: backend errors after retries.
    pub(crate) async fn delete_orphans(
        &self,
        backend: &SharedBackend,
        volume: &VolumeId,
    ) -> Result<(), VolumeError> {
        for counter in &self.orphans {
            delete_retried(backend, &wal_object_key(volume, *counter)).await?;
        }
        Ok(())
    }
}

/// Records waiting to be shipped, and what is known to be in the store.
struct Queue {
    records: VecDeque<(RecordHeader, Bytes)>,
    /// Bytes of `records` (headers and payloads).
    bytes: u64,
    /// Seq of the newest record queued (or, before any, the seq everything is shipped through).
    last_seq: u64,
    /// Every record through this seq is in the store (a shipped object or a chunk): the next
    /// object's `after_seq`.
    through: u64,
    /// The highest seq a flush waits for.
    wanted: u64,
    /// A successful PUT confirmed every record through this seq: they were in the store
    /// (objects or chunks) before a PUT that no takeover had fenced. Flushes wait for it.
    confirmed: u64,
    /// Chunks hold every record through this seq (the map's checkpoint).
    covered: u64,
    /// What objects may be deleted through: chunks held every record through this seq before a
    /// successful PUT confirmed that no takeover had fenced this node (a taker reads the chunks
    /// stored before its fence, so it does not need these objects). A fenced node deletes
    /// nothing more.
    deletable: u64,
    /// Stored objects, oldest first (counter, last seq).
    stored: VecDeque<(u64, u64)>,
    /// A round is due even with nothing to ship ([`Shipper::confirm`]): a mark.
    forced: bool,
    /// The counter the next new object gets.
    next_counter: u64,
}

/// One object to store: the records after `after` through `last_seq`, encoded (none: a mark,
/// which only confirms what chunks hold).
struct Job {
    counter: u64,
    last_seq: u64,
    /// What its successful PUT confirms: its records and what the store held when it was
    /// taken.
    confirms: u64,
    /// The chunks' coverage when it was taken: objects through it may go once it is stored.
    covered: u64,
    body: Bytes,
}

/// What flushes wait on.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every record through this seq is in the store.
    through: u64,
    /// Shipping rounds started (a PUT of one object, or its retry).
    rounds: u64,
    /// The number of the last round that failed: a flush fails when a round that started
    /// after it was issued fails (its records were in it, or in an earlier round that failed).
    failed_round: u64,
    /// The number of the last round that succeeded.
    stored_round: u64,
    /// The last failure's reason.
    error: Option<String>,
    /// The shipper has stopped (closed or fenced): waiting flushes fail.
    stopped: bool,
}

/// One volume's WAL shipping state (in [`Inner`]); the task is [`shipper`].
pub(super) struct Shipper {
    /// The epoch this node owns the volume in; every object names it.
    epoch: u64,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Wakes the deletes of covered objects.
    delete_wake: Notify,
    progress: watch::Sender<Progress>,
    stop: AtomicBool,
    /// Set once the shipping loop has ended: the deletes end too.
    done: AtomicBool,
    objects: metrics::Counter,
    bytes: metrics::Counter,
    unshipped: metrics::Gauge,
    put_seconds: metrics::Histogram,
}

impl Shipper {
    /// A shipper of the owner of `epoch` that continues `chain` (what the store holds; its
    /// orphans deleted), with `covered` the map's checkpoint and `replayed` the records the
    /// volume's open applied, in seq order: those the chain does not hold are queued.
    pub(super) fn new(
        volume: &VolumeId,
        epoch: u64,
        chain: &Chain,
        covered: u64,
        replayed: Vec<(RecordHeader, Bytes)>,
    ) -> Self {
        let through = chain.through.max(covered);
        let mut q = Queue {
            records: VecDeque::new(),
            bytes: 0,
            last_seq: through,
            through,
            wanted: 0,
            confirmed: through,
            covered,
            deletable: covered,
            stored: chain.covered.iter().chain(&chain.chain).copied().collect(),
            next_counter: chain.next_counter(),
            forced: false,
        };
        for (h, p) in replayed.into_iter().filter(|(h, _)| h.seq > through) {
            q.push(h, p);
        }
        let label = volume.to_string();
        Self {
            epoch,
            queue: Mutex::new(q),
            wake: Notify::new(),
            delete_wake: Notify::new(),
            done: AtomicBool::new(false),
            progress: watch::Sender::new(Progress {
                through,
                ..Progress::default()
            }),
            stop: AtomicBool::new(false),
            objects: metrics::counter!("vblock_wal_shipped_objects_total", "volume" => label.clone()),
            bytes: metrics::counter!("vblock_wal_shipped_bytes_total", "volume" => label.clone()),
            unshipped: metrics::gauge!("vblock_wal_unshipped_bytes", "volume" => label.clone()),
            put_seconds: metrics::histogram!("vblock_wal_ship_duration_seconds", "volume" => label),
        }
    }

    /// Queues a record the volume just appended to its WAL (called in seq order, under the
    /// volume's state lock).
    pub(super) fn record(&self, header: RecordHeader, payload: Bytes) {
        let (ahead, queued) = {
            let mut q = lock(&self.queue);
            q.push(header, payload);
            (q.bytes >= SHIP_AHEAD_BYTES, q.bytes)
        };
        self.unshipped.set(queued as f64);
        if ahead {
            self.wake.notify_one();
        }
    }

    /// Chunks now hold every record through `seq` (the flusher committed them): those records
    /// leave the queue, and stored objects they cover are deleted. A flush waiting for them
    /// still needs a PUT to confirm this node was not fenced before the chunks were stored (a
    /// taker walks the chunks stored before its fence): the next object, or a mark.
    pub(super) fn cover(&self, seq: u64) {
        let queued = {
            let mut q = lock(&self.queue);
            q.covered = q.covered.max(seq);
            q.drop_covered();
            q.bytes
        };
        self.unshipped.set(queued as f64);
        self.wake.notify_one();
        self.delete_wake.notify_one();
    }

    /// Waits until every record queued before the call is in the store (NBD_CMD_FLUSH, FUA).
    ///
    /// Errors: [`VolumeError::Shipping`] when a shipping round that started after the call
    /// fails (a backend outage beyond the retries; the records stay queued for the next round),
    /// [`VolumeError::Closed`] once the shipper stopped.
    pub(super) async fn flush(&self) -> Result<(), VolumeError> {
        let rx = self.progress.subscribe();
        let started = rx.borrow().rounds;
        let target = {
            let mut q = lock(&self.queue);
            q.wanted = q.wanted.max(q.last_seq);
            q.last_seq
        };
        self.wake.notify_one();
        wait_for_round(rx, started, |p| p.through >= target).await
    }

    /// Waits for a conditional PUT that starts after the call and succeeds (a mark when nothing
    /// is queued): proof that no takeover had fenced this node before now. Garbage collection
    /// in cluster mode deletes chunks only after one (docs/design/cluster.md, "Constraints").
    ///
    /// Errors: as [`Shipper::flush`]; a fenced node's volume fails instead.
    pub(super) async fn confirm(&self) -> Result<(), VolumeError> {
        let rx = self.progress.subscribe();
        let started = rx.borrow().rounds;
        lock(&self.queue).forced = true;
        self.wake.notify_one();
        wait_for_round(rx, started, |p| p.stored_round > started).await
    }

    /// Asks the task to stop after its current round.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        self.delete_wake.notify_one();
    }
}

/// Waits on `rx` until `done`, a round that started after round `started` fails, or the
/// shipper stops: `Ok` when done, else [`VolumeError::Shipping`] with the failure or
/// [`VolumeError::Closed`].
async fn wait_for_round(
    mut rx: watch::Receiver<Progress>,
    started: u64,
    done: impl Fn(&Progress) -> bool,
) -> Result<(), VolumeError> {
    let p = rx
        .wait_for(|p| done(p) || p.failed_round > started || p.stopped)
        .await
        .map_err(|_| VolumeError::Closed)?
        .clone();
    if done(&p) {
        Ok(())
    } else if p.stopped {
        Err(VolumeError::Closed)
    } else {
        Err(VolumeError::Shipping(p.error.unwrap_or_default()))
    }
}

impl Queue {
    fn push(&mut self, header: RecordHeader, payload: Bytes) {
        self.bytes += record_bytes(&header);
        self.last_seq = header.seq;
        self.records.push_back((header, payload));
    }

    /// Drops queued records chunks cover, and moves `through` past them.
    fn drop_covered(&mut self) {
        while let Some((h, _)) = self.records.front() {
            if h.seq > self.covered {
                break;
            }
            self.bytes -= record_bytes(h);
            self.records.pop_front();
        }
        self.through = self.through.max(self.covered);
        self.last_seq = self.last_seq.max(self.through);
    }
}

fn record_bytes(h: &RecordHeader) -> u64 {
    h.record_len() as u64
}

/// Largest object body: a longer queue goes in several objects, one after the other.
const MAX_OBJECT_BYTES: u64 = 16 << 20;

/// Deletes at once up to this many covered objects.
const DELETE_CONCURRENCY: usize = 16;

/// Marks the shipper stopped when its task ends, also by a panic: waiting flushes fail rather
/// than hang.
struct Stopped<'a>(&'a watch::Sender<Progress>);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|p| p.stopped = true);
    }
}

/// The shipping task of one volume: ships the queue when a flush waits for it or it holds
/// [`SHIP_AHEAD_BYTES`] and, beside it, deletes covered objects; ends when asked to stop or
/// when fenced.
pub(super) async fn shipper(inner: Arc<Inner>) {
    let Some(s) = inner.shipper.as_ref() else {
        return;
    };
    let _stopped = Stopped(&s.progress);
    tokio::join!(ship_loop(&inner, s), delete_loop(&inner, s));
}

async fn ship_loop(inner: &Inner, s: &Shipper) {
    let mut failures = 0u32;
    // A failed round's object: stored again unchanged (its first PUT may have landed).
    let mut pending: Option<Job> = None;
    loop {
        let notified = s.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
        let Some(job) = pending.take().or_else(|| take_job(s)) else {
            notified.await;
            continue;
        };
        let mut round = 0;
        s.progress.send_modify(|p| {
            p.rounds += 1;
            round = p.rounds;
        });
        match ship(inner, s, &job).await {
            Ok(true) => {
                failures = 0;
                {
                    let mut q = lock(&s.queue);
                    q.next_counter = job.counter + 1;
                    q.stored.push_back((job.counter, job.last_seq));
                    q.through = q.through.max(job.last_seq);
                    q.confirmed = q.confirmed.max(job.confirms);
                    q.deletable = q.deletable.max(job.covered);
                }
                s.progress.send_modify(|p| {
                    p.through = p.through.max(job.confirms);
                    p.stored_round = round;
                });
                s.delete_wake.notify_one();
            }
            Ok(false) => {
                metrics::counter!("vblock_fence_refusals_total", "volume" => inner.id.to_string())
                    .increment(1);
                let reason = format!(
                    "shipped WAL object {} is another writer's: the volume was taken over",
                    wal_object_key(&inner.id, job.counter)
                );
                inner.fail(reason);
                break;
            }
            Err(e) => {
                tracing::warn!(volume = %inner.id, counter = job.counter, error = %e, "WAL shipping failed; flushes waiting for it fail");
                s.progress.send_modify(|p| {
                    p.failed_round = round;
                    p.error = Some(e.to_string());
                });
                pending = Some(job);
                let delay = RetryPolicy::forever().delay(failures);
                failures = failures.saturating_add(1);
                let _ = tokio::time::timeout(delay, notified).await;
            }
        }
    }
    s.progress.send_modify(|p| p.stopped = true);
    s.done.store(true, Ordering::SeqCst);
    s.delete_wake.notify_one();
}

/// The next object, when a flush waits or [`SHIP_AHEAD_BYTES`] are queued: the queue's oldest
/// records, up to [`MAX_OBJECT_BYTES`]; a mark without records when a flush waits only for
/// records chunks hold.
fn take_job(s: &Shipper) -> Option<Job> {
    let (after, counter, records, left, covered) = {
        let mut q = lock(&s.queue);
        // Objects chunks hold wait for a PUT that confirms them deletable: a mark if nothing
        // else goes.
        let deletes_wait = q.covered > q.deletable
            && q.stored.len() > 1
            && q.stored.front().is_some_and(|(_, last)| *last <= q.covered);
        let due = q.wanted > q.confirmed || q.bytes >= SHIP_AHEAD_BYTES || deletes_wait || q.forced;
        if !due {
            return None;
        }
        q.forced = false;
        let mut taken = 0;
        let mut records = Vec::new();
        while let Some((h, _)) = q.records.front() {
            if !records.is_empty() && taken + record_bytes(h) > MAX_OBJECT_BYTES {
                break;
            }
            taken += record_bytes(h);
            records.extend(q.records.pop_front());
        }
        q.bytes -= taken;
        (q.through, q.next_counter, records, q.bytes, q.covered)
    };
    s.unshipped.set(left as f64);
    let mut enc = WalObjectEncoder::new(s.epoch, counter, after);
    for (h, p) in &records {
        enc.push(h, p);
    }
    let last_seq = records.last().map_or(0, |(h, _)| h.seq);
    Some(Job {
        counter,
        last_seq,
        confirms: after.max(last_seq),
        covered,
        body: enc.finish(),
    })
}

/// Stores `job` with a conditional PUT while the local WAL syncs (a flush is local and off the
/// node; should a power cut take records from the local WAL that the store holds, the volume's
/// next open takes them from the store). `Ok(false)`: another object holds the counter (the
/// volume was taken over).
async fn ship(inner: &Inner, s: &Shipper, job: &Job) -> Result<bool, VolumeError> {
    let key = wal_object_key(&inner.id, job.counter);
    let started = Instant::now();
    let put = async {
        crate::crash_point!("ship-before-put");
        // An earlier attempt (this round's or a failed round's) that landed counts as stored.
        put_if_absent_retried(&inner.backend, &key, job.body.clone()).await
    };
    let (synced, stored) = tokio::join!(inner.wal.sync(), put);
    synced?;
    if !stored? {
        return Ok(false);
    }
    crate::crash_point!("ship-after-put");
    s.put_seconds.record(started.elapsed().as_secs_f64());
    s.objects.increment(1);
    s.bytes.increment(job.body.len() as u64);
    Ok(true)
}

/// Deletes covered objects whenever woken, until the shipping loop has ended.
async fn delete_loop(inner: &Inner, s: &Shipper) {
    loop {
        let notified = s.delete_wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if s.done.load(Ordering::SeqCst) {
            return;
        }
        delete_covered(inner, s).await;
        notified.await;
    }
}

/// Deletes the stored objects whose records chunks cover (confirmed by a later PUT:
/// `deletable`), [`DELETE_CONCURRENCY`] at a time, but never the newest one: it keeps the counter's high-water mark for the next open. A
/// failed delete is logged and tried again at the next wake.
async fn delete_covered(inner: &Inner, s: &Shipper) {
    let covered: Vec<u64> = {
        let mut q = lock(&s.queue);
        let n = q
            .stored
            .iter()
            .take_while(|(_, last)| *last <= q.deletable)
            .count()
            .min(q.stored.len().saturating_sub(1));
        q.stored.drain(..n).map(|(counter, _)| counter).collect()
    };
    let failed: Vec<u64> = futures::stream::iter(covered)
        .map(|counter| async move {
            let key = wal_object_key(&inner.id, counter);
            match delete_retried(&inner.backend, &key).await {
                Ok(()) => None,
                Err(e) => {
                    tracing::warn!(volume = %inner.id, %key, error = %e, "deleting a covered shipped WAL object failed; trying again later");
                    Some(counter)
                }
            }
        })
        .buffer_unordered(DELETE_CONCURRENCY)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    if !failed.is_empty() {
        let mut q = lock(&s.queue);
        // Covered (last seq 0 is at or below any checkpoint): deleted at the next wake.
        for counter in failed {
            q.stored.push_front((counter, 0));
        }
        q.stored.make_contiguous().sort_unstable();
    }
}

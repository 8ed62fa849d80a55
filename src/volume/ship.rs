//! WAL shipping (docs/design/cluster.md, "Fence"; `VolumeConfig::ship_wal`): a flush or FUA is
//! acknowledged only once every record it covers is in the object store, so that it outlives
//! the node's disks.
//!
//! Every record the volume appends to its WAL is also queued here (shared payloads, no copy).
//! One task per volume takes the whole queue, syncs the local WAL (so the store never holds a
//! record the local WAL could lose), and stores it as one shipped WAL object
//! (`VOLUMEID/wal/COUNTER`, [`crate::cluster::walobj`]) with a conditional PUT at the next
//! counter. Flushes that arrive meanwhile share the next object. One PUT is in flight at a time,
//! so objects land in counter order. The queue is also shipped without a flush once it holds
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

use crate::backend::{wal_object_counters, wal_object_key, wal_object_prefix, SharedBackend};
use crate::cluster::walobj::{self, WalObjectEncoder, WalObjectKind, WAL_OBJECT_HEADER_LEN};
use crate::ids::VolumeId;
use crate::retry::{delete_retried, retry, RetryPolicy};
use crate::wal::RecordHeader;

use super::{lock, Inner, VolumeError};

/// The queue is shipped without waiting for a flush once it holds this many bytes.
pub const SHIP_AHEAD_BYTES: u64 = 8 << 20;

/// The shipped WAL objects of a volume found in the store when it opens.
#[derive(Debug, Default)]
pub(super) struct Shipped {
    /// Stored objects, oldest first: counter and last seq.
    pub objects: VecDeque<(u64, u64)>,
    /// The highest last seq among them (0 without any).
    pub last_seq: u64,
    /// The counter the next object gets.
    pub next_counter: u64,
}

impl Shipped {
    /// Lists `volume`'s shipped WAL objects and reads each one's header (a ranged GET).
    ///
    /// Errors: backend errors; [`VolumeError::Corrupt`] for an object whose header does not
    /// decode.
    pub(super) async fn load(
        backend: &SharedBackend,
        volume: &VolumeId,
    ) -> Result<Self, VolumeError> {
        let keys = backend.list(&wal_object_prefix(volume)).await?;
        let mut shipped = Shipped {
            next_counter: 1,
            ..Self::default()
        };
        for counter in wal_object_counters(volume, &keys) {
            let key = wal_object_key(volume, counter);
            let head = retry(&RetryPolicy::reads(), &key, || {
                backend.get_range(&key, 0..WAL_OBJECT_HEADER_LEN as u64)
            })
            .await?;
            let h = walobj::decode_header(&head, counter).map_err(|e| VolumeError::Corrupt {
                what: format!("shipped WAL object {key}"),
                reason: e.to_string(),
            })?;
            if h.kind == WalObjectKind::Batch {
                shipped.objects.push_back((counter, h.last_seq));
                shipped.last_seq = shipped.last_seq.max(h.last_seq);
            }
            shipped.next_counter = counter + 1;
        }
        Ok(shipped)
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
    /// Chunks hold every record through this seq (the map's checkpoint).
    covered: u64,
    /// Stored objects, oldest first (counter, last seq).
    stored: VecDeque<(u64, u64)>,
    next_counter: u64,
}

/// What flushes wait on.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every record through this seq is in the store.
    through: u64,
    /// Shipping rounds that failed; a flush fails when it grows while it waits.
    failures: u64,
    /// The last failure's reason.
    error: Option<String>,
    /// The shipper has stopped (closed or fenced): waiting flushes fail.
    stopped: bool,
}

/// One volume's WAL shipping state (in [`Inner`]); the task is [`shipper`].
pub(super) struct Shipper {
    queue: Mutex<Queue>,
    wake: Notify,
    progress: watch::Sender<Progress>,
    stop: AtomicBool,
    objects: metrics::Counter,
    bytes: metrics::Counter,
    unshipped: metrics::Gauge,
    put_seconds: metrics::Histogram,
}

impl Shipper {
    /// A shipper that continues after `shipped` (what the store holds), with `covered` the
    /// map's checkpoint and `replayed` the records WAL replay applied, in seq order: those not
    /// yet shipped are queued.
    pub(super) fn new(
        volume: &VolumeId,
        shipped: Shipped,
        covered: u64,
        replayed: Vec<(RecordHeader, Bytes)>,
    ) -> Self {
        let through = shipped.last_seq.max(covered);
        let mut q = Queue {
            records: VecDeque::new(),
            bytes: 0,
            last_seq: through,
            through,
            wanted: 0,
            covered,
            stored: shipped.objects,
            next_counter: shipped.next_counter,
        };
        for (h, p) in replayed.into_iter().filter(|(h, _)| h.seq > through) {
            q.push(h, p);
        }
        let label = volume.to_string();
        Self {
            queue: Mutex::new(q),
            wake: Notify::new(),
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
    /// leave the queue, and stored objects they cover are deleted.
    pub(super) fn cover(&self, seq: u64) {
        let queued = {
            let mut q = lock(&self.queue);
            q.covered = q.covered.max(seq);
            q.drop_covered();
            q.bytes
        };
        self.unshipped.set(queued as f64);
        self.progress.send_if_modified(|p| {
            let grew = seq > p.through;
            p.through = p.through.max(seq);
            grew
        });
        self.wake.notify_one();
    }

    /// Waits until every record queued before the call is in the store (NBD_CMD_FLUSH, FUA).
    ///
    /// Errors: [`VolumeError::Shipping`] when a shipping round fails meanwhile (a backend
    /// outage beyond the retries; the records stay queued for the next round),
    /// [`VolumeError::Closed`] once the shipper stopped.
    pub(super) async fn flush(&self) -> Result<(), VolumeError> {
        let mut rx = self.progress.subscribe();
        let failures = rx.borrow().failures;
        let target = {
            let mut q = lock(&self.queue);
            q.wanted = q.wanted.max(q.last_seq);
            q.last_seq
        };
        self.wake.notify_one();
        let p = rx
            .wait_for(|p| p.through >= target || p.failures > failures || p.stopped)
            .await
            .map_err(|_| VolumeError::Closed)?
            .clone();
        if p.through >= target {
            Ok(())
        } else if p.stopped {
            Err(VolumeError::Closed)
        } else {
            Err(VolumeError::Shipping(p.error.unwrap_or_default()))
        }
    }

    /// Asks the task to stop after its current round.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
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

/// The shipping task of one volume: ships the queue when a flush waits for it or it holds
/// [`SHIP_AHEAD_BYTES`], deletes covered objects, and ends when asked to stop or when fenced.
pub(super) async fn shipper(inner: Arc<Inner>) {
    let Some(s) = inner.shipper.as_ref() else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let notified = s.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let stopping = s.stop.load(Ordering::SeqCst);
        let job = {
            let mut q = lock(&s.queue);
            let due = q.wanted > q.through || q.bytes >= SHIP_AHEAD_BYTES;
            if due && !q.records.is_empty() && !stopping {
                let after = q.through;
                let records: Vec<_> = q.records.drain(..).collect();
                q.bytes = 0;
                Some((after, q.next_counter, records))
            } else {
                None
            }
        };
        let Some((after, counter, records)) = job else {
            delete_covered(&inner, s).await;
            if stopping {
                break;
            }
            notified.await;
            continue;
        };
        s.unshipped.set(0.0);
        let (shipped, ()) = tokio::join!(
            ship(&inner, s, after, counter, &records),
            delete_covered(&inner, s)
        );
        match shipped {
            Ok(true) => {
                failures = 0;
                let last = records.last().map_or(after, |(h, _)| h.seq);
                let through = {
                    let mut q = lock(&s.queue);
                    q.next_counter = counter + 1;
                    q.stored.push_back((counter, last));
                    q.through = q.through.max(last);
                    q.through
                };
                s.progress
                    .send_modify(|p| p.through = p.through.max(through));
            }
            Ok(false) => {
                let reason = format!(
                    "shipped WAL object {} is another writer's: the volume was taken over",
                    wal_object_key(&inner.id, counter)
                );
                inner.fail(reason);
                break;
            }
            Err(e) => {
                // The records go back to the front of the queue (less what chunks covered
                // meanwhile), and the flushes waiting for them fail.
                let unshipped = {
                    let mut q = lock(&s.queue);
                    for (h, p) in records.into_iter().rev() {
                        q.bytes += record_bytes(&h);
                        q.records.push_front((h, p));
                    }
                    q.drop_covered();
                    q.bytes
                };
                s.unshipped.set(unshipped as f64);
                tracing::warn!(volume = %inner.id, counter, error = %e, "WAL shipping failed; flushes waiting for it fail");
                s.progress.send_modify(|p| {
                    p.failures += 1;
                    p.error = Some(e.to_string());
                });
                let delay = RetryPolicy::forever().delay(failures);
                failures = failures.saturating_add(1);
                let _ = tokio::time::timeout(delay, notified).await;
            }
        }
    }
    s.progress.send_modify(|p| p.stopped = true);
}

/// Syncs the local WAL, then stores `records` as object `counter` with a conditional PUT.
/// `Ok(false)`: another object holds the counter (the volume was taken over).
async fn ship(
    inner: &Inner,
    s: &Shipper,
    after: u64,
    counter: u64,
    records: &[(RecordHeader, Bytes)],
) -> Result<bool, VolumeError> {
    inner.wal.sync().await?;
    let mut enc = WalObjectEncoder::new(0, counter, after);
    for (h, p) in records {
        enc.push(h, p);
    }
    let body = enc.finish();
    let key = wal_object_key(&inner.id, counter);
    let started = Instant::now();
    let stored = retry(&RetryPolicy::reads(), &key, || {
        inner.backend.put_if_absent(&key, body.clone())
    })
    .await?;
    if !stored {
        // A retried PUT whose first attempt landed is refused too: the object is ours if it
        // holds these bytes.
        let there = retry(&RetryPolicy::reads(), &key, || inner.backend.get(&key)).await?;
        if there != body {
            return Ok(false);
        }
    }
    s.put_seconds.record(started.elapsed().as_secs_f64());
    s.objects.increment(1);
    s.bytes.increment(body.len() as u64);
    Ok(true)
}

/// Deletes at once up to this many covered objects.
const DELETE_CONCURRENCY: usize = 16;

/// Deletes the stored objects whose records chunks cover, [`DELETE_CONCURRENCY`] at a time; a
/// failed delete is logged and tried again at the next round.
async fn delete_covered(inner: &Inner, s: &Shipper) {
    let covered: Vec<u64> = {
        let mut q = lock(&s.queue);
        let n = q
            .stored
            .iter()
            .take_while(|(_, last)| *last <= q.covered)
            .count();
        q.stored.drain(..n).map(|(counter, _)| counter).collect()
    };
    let failed: Vec<(u64, u64)> = futures::stream::iter(covered)
        .map(|counter| async move {
            let key = wal_object_key(&inner.id, counter);
            match delete_retried(&inner.backend, &key).await {
                Ok(()) => None,
                Err(e) => {
                    tracing::warn!(volume = %inner.id, %key, error = %e, "deleting a covered shipped WAL object failed; trying again later");
                    Some((counter, 0))
                }
            }
        })
        .buffer_unordered(DELETE_CONCURRENCY)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    if !failed.is_empty() {
        let mut q = lock(&s.queue);
        for f in failed.into_iter().rev() {
            q.stored.push_front(f);
        }
        q.stored.make_contiguous().sort_unstable();
    }
}

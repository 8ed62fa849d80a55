//! The WAL writer thread: batching, segment rotation, group commit, trimming, and the
//! preallocation of segments.
//!
//! Writes cover whole 4 KiB pages (the open segment's partial last page is rewritten with the
//! new records after it, the end is padded with zeros), so the kernel never reads a page before
//! writing it, and so they can go through direct I/O: each batch is copied into one aligned
//! buffer and written straight to the device, bypassing the page cache (where the file system
//! has no direct I/O, the same pages go through the page cache; docs/design/direct-io.md).
//! Once a volume syncs, the next segment is prepared on a helper thread: written with
//! zeros (direct I/O where the filesystem has it) and synced, then renamed into place when the
//! writer moves on. A record appended and `fdatasync`ed into such a segment overwrites allocated
//! blocks, so the sync commits no metadata, where an append also commits the file's new size and
//! block allocation (docs/design/wal-preallocation.md).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::fs::{AlignedBuf, Fs, FsFile};

use super::record::{
    encode_segment_header, RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, WAL_PAGE,
};
use super::segment::{create_segment, prepare_segment, remove_leftover_spares, spare_path};
use super::{
    bump, fsync_dir, segment_path, Command, DurablePosition, SegmentInfo, WalConfig, WalError,
    WalStats, WriteHealth,
};

/// A batch is written once it holds this many bytes, even if more commands are queued.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Payloads of at least this many bytes are written from the caller's buffer (`writev`) rather
/// than copied into the batch; smaller ones are cheaper to copy than to give an iovec each.
const COPY_LIMIT: usize = 64 << 10;

/// Longest a partial group waits for the rest of the previous group's syncers.
const GROUP_WAIT: Duration = Duration::from_micros(100);

/// Zeros for padding a write to a whole page.
static ZERO_PAGE: [u8; WAL_PAGE] = [0; WAL_PAGE];

/// What one write+sync round collects.
#[derive(Default)]
struct Round {
    waiters: Vec<oneshot::Sender<Result<(), WalError>>>,
    trim_to: Option<u64>,
    /// `Some(sync)` once a stop was requested.
    stop: Option<bool>,
}

/// Encoded records waiting to be written: headers and small payloads copied into one buffer,
/// large payloads kept by reference and written in place with vectored I/O.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    /// Large payloads, each with the length `buf` had when it was added (where it goes).
    large: Vec<(usize, Bytes)>,
    large_bytes: usize,
}

impl Batch {
    /// Bytes in the batch.
    fn len(&self) -> usize {
        self.buf.len() + self.large_bytes
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, header: &[u8], payload: &Bytes) {
        self.buf.extend_from_slice(header);
        if payload.len() >= COPY_LIMIT {
            self.large.push((self.buf.len(), payload.clone()));
            self.large_bytes += payload.len();
        } else {
            self.buf.extend_from_slice(payload);
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.large.clear();
        self.large_bytes = 0;
        if self.buf.capacity() > 2 * MAX_BATCH_BYTES {
            self.buf.shrink_to(1 << 20);
        }
    }

    /// `tail`, then the batch's records in order, as slices.
    fn slices<'a>(&'a self, tail: &'a [u8]) -> Vec<IoSlice<'a>> {
        let mut slices = Vec::with_capacity(2 * self.large.len() + 3);
        if !tail.is_empty() {
            slices.push(IoSlice::new(tail));
        }
        let mut at = 0;
        for (off, payload) in &self.large {
            if *off > at {
                slices.push(IoSlice::new(&self.buf[at..*off]));
            }
            slices.push(IoSlice::new(payload));
            at = *off;
        }
        if at < self.buf.len() {
            slices.push(IoSlice::new(&self.buf[at..]));
        }
        slices
    }

    /// [`Batch::write_at`] through a direct I/O descriptor: `tail`, the records and the zeros
    /// up to a page boundary are copied into `buf` (aligned, kept by the caller so its pages stay
    /// mapped) and written with one `pwrite`, straight to the device: no page-cache pages are
    /// filled, and the segment's `fdatasync` has no dirty pages to write back (at each rotation
    /// it wrote back the whole 64 MiB segment, stalling the writer for ~40 ms).
    fn write_direct_at(
        &self,
        file: &FsFile,
        page_at: u64,
        tail: &[u8],
        buf: &mut AlignedBuf,
    ) -> std::io::Result<Vec<u8>> {
        buf.clear();
        buf.reserve(tail.len() + self.len() + WAL_PAGE);
        for s in self.slices(tail) {
            buf.extend_from_slice(&s);
        }
        let end = buf.len();
        let new_tail = buf.as_slice()[end - end % WAL_PAGE..].to_vec();
        buf.pad_to(WAL_PAGE);
        file.write_all_at(buf.as_slice(), page_at)?;
        Ok(new_tail)
    }

    /// Writes `tail` (the segment's partial last page, which starts at byte `page_at`), then the
    /// batch, then zeros up to a page boundary, with as few `pwritev` calls as the kernel allows.
    /// Returns the new partial last page (the last `(tail + batch) % WAL_PAGE` bytes written).
    fn write_at(&self, file: &FsFile, page_at: u64, tail: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut slices = self.slices(tail);
        let partial = (tail.len() + self.len()) % WAL_PAGE;
        let new_tail = last_bytes(&slices, partial);
        if partial > 0 {
            slices.push(IoSlice::new(&ZERO_PAGE[..WAL_PAGE - partial]));
        }
        let mut rest = &mut slices[..];
        let mut offset = page_at;
        while !rest.is_empty() {
            let n = file.write_vectored_at(rest, offset)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            offset += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(new_tail)
    }
}

/// The last `n` bytes of the concatenation of `slices`.
fn last_bytes(slices: &[IoSlice<'_>], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut need = n;
    for s in slices.iter().rev() {
        if need == 0 {
            break;
        }
        let take = need.min(s.len());
        out[need - take..need].copy_from_slice(&s[s.len() - take..]);
        need -= take;
    }
    out
}

/// How long the idle writer polls for the next command before it blocks.
const SPIN: Duration = Duration::from_micros(200);

/// Waits for the writer's next command. While commands arrive within [`SPIN`] of each other the
/// queue is polled (yielding the CPU to anything runnable) for up to that long before blocking: a
/// flush usually follows its write by less, and a writer asleep on a halted vCPU takes long to
/// wake (keeping it polling also sped up the tokio side). Once a wait is longer, it blocks at once
/// until a short gap is seen again, so a volume written at a steadier, lower rate does not pay a
/// poll per write. Polling speeds up fsync'd QD1 writes and leaves QD32 random and sequential
/// writes as they were (docs/design/wal-writer-polling.md).
#[derive(Default)]
struct Waiter {
    poll: bool,
}

impl Waiter {
    fn recv(&mut self, rx: &Receiver<Command>) -> Result<Command, std::sync::mpsc::RecvError> {
        let start = Instant::now();
        if self.poll {
            loop {
                match rx.try_recv() {
                    Ok(cmd) => return Ok(cmd),
                    Err(TryRecvError::Disconnected) => return Err(std::sync::mpsc::RecvError),
                    Err(TryRecvError::Empty) => {}
                }
                if start.elapsed() >= SPIN {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let cmd = rx.recv();
        self.poll = start.elapsed() < SPIN;
        cmd
    }
}

/// A segment being preallocated on a helper thread, renamed into place at the next rotation.
struct Spare {
    no: u64,
    thread: std::thread::JoinHandle<Result<FsFile, WalError>>,
}

/// Says the writer stopped when dropped: stopped first, then woken, so a waiter that
/// registered after the last round's wake-up sees the flag, or gets this one.
struct Stopped(Arc<WriteHealth>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.set_stopped();
        self.0.progress.notify_waiters();
    }
}

pub(crate) struct Writer {
    /// The WAL directory's lock file, held (open) while this writer runs.
    _lock: std::fs::File,
    fs: Fs,
    dir: PathBuf,
    volume_tag: u64,
    segment_bytes: u64,
    /// Closed segments (oldest first) and the open one (last).
    segments: VecDeque<SegmentInfo>,
    file: FsFile,
    /// The open segment opened for direct I/O, through which records are written (`None` where
    /// the file system has none, or refused it: `file`, through the page cache, then).
    direct: Option<FsFile>,
    /// The aligned buffer direct writes are copied into, kept across batches.
    aligned: AlignedBuf,
    /// Bytes of the open segment already written to the file.
    written: u64,
    /// The open segment's bytes after its last page boundary (`written % WAL_PAGE` of them),
    /// rewritten before the next records so every write covers whole pages.
    tail: Vec<u8>,
    /// The open segment was preallocated (records overwrite zeros).
    prepared: bool,
    /// The next segment, preallocated or being preallocated.
    spare: Option<Spare>,
    /// No preallocation is started while the open segment's number is below this (set after a
    /// failed one, so a full disk does not make every sync try again).
    prepare_from: u64,
    /// Encoded records not yet written.
    batch: Batch,
    batch_max_seq: u64,
    /// Highest sequence number written to a segment.
    written_seq: u64,
    /// Highest sequence number on stable storage (every record up to it is synced).
    synced_seq: u64,
    /// Highest `synced_seq` recorded by a sync note in the open segment.
    noted_seq: u64,
    /// The trim mark on disk: records up to this seq may have been deleted.
    trimmed_through: u64,
    stats: Arc<WalStats>,
    durable: Arc<Mutex<DurablePosition>>,
    health: Arc<WriteHealth>,
    fsync_seconds: metrics::Histogram,
}

impl Writer {
    pub(crate) fn start(
        config: &WalConfig,
        volume_tag: u64,
        lock: std::fs::File,
        replayed: super::replay::Replayed,
        stats: Arc<WalStats>,
        durable: Arc<Mutex<DurablePosition>>,
        health: Arc<WriteHealth>,
    ) -> Result<Self, WalError> {
        // Every replayed record is synced by now (Wal::open).
        let synced_seq = replayed.report.max_seq;
        let trimmed_through = replayed.trimmed_through;
        let mut segments = replayed.segments;
        let no = segments.back().map_or(1, |s| s.no + 1);
        remove_leftover_spares(&config.fs, &config.dir);
        let file = create_segment(&config.fs, &config.dir, no, volume_tag)?;
        let direct = config.fs.open_direct(&segment_path(&config.dir, no)).ok();
        segments.push_back(SegmentInfo {
            no,
            max_seq: 0,
            bytes: SEGMENT_HEADER_LEN as u64,
        });
        stats
            .segments
            .store(segments.len() as u64, Ordering::Relaxed);
        stats
            .disk_bytes
            .store(segments.iter().map(|s| s.bytes).sum(), Ordering::Relaxed);
        if let Ok(mut d) = durable.lock() {
            *d = DurablePosition {
                segment_no: no,
                offset: 0,
            };
        }
        Ok(Self {
            _lock: lock,
            fs: config.fs.clone(),
            dir: config.dir.clone(),
            volume_tag,
            segment_bytes: config.segment_bytes.max(1 << 16),
            segments,
            file,
            direct,
            aligned: AlignedBuf::default(),
            written: SEGMENT_HEADER_LEN as u64,
            tail: encode_segment_header(no, volume_tag).to_vec(),
            prepared: false,
            spare: None,
            prepare_from: 0,
            batch: Batch {
                buf: Vec::with_capacity(1 << 20),
                ..Batch::default()
            },
            batch_max_seq: 0,
            written_seq: synced_seq,
            synced_seq,
            noted_seq: 0,
            trimmed_through,
            stats,
            durable,
            health,
            fsync_seconds: metrics::histogram!(
                "vblock_wal_fsync_duration_seconds",
                "volume" => config.name.clone()
            ),
        })
    }

    /// The writer thread: takes commands until a stop (or every handle is gone), then says so
    /// to appenders waiting for room ([`super::Wal::reserve`]).
    pub(crate) fn run(mut self, rx: Receiver<Command>) {
        // Also if `rounds` panics: appenders waiting for room would wait for ever.
        let _stopped = Stopped(self.health.clone());
        self.rounds(rx);
    }

    fn rounds(&mut self, rx: Receiver<Command>) {
        let mut round = Round::default();
        // Sync waiters in the previous group: the group size the load sustains.
        let mut last_group = 0usize;
        let mut waiter = Waiter::default();
        loop {
            let Ok(first) = waiter.recv(&rx) else {
                // Every handle is gone: write what is queued and stop.
                let _ = self.write_batch();
                return;
            };
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                if !self.handle(cmd, &mut round) || self.batch.len() >= MAX_BATCH_BYTES {
                    break;
                }
                next = match rx.try_recv() {
                    Ok(cmd) => Some(cmd),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        round.stop = Some(false);
                        None
                    }
                };
            }
            // Group commit: when fewer syncers have arrived than the last group had, the rest
            // are usually a few microseconds behind (woken by the previous sync); wait for them
            // briefly rather than pay a whole fdatasync for a partial group.
            if !round.waiters.is_empty() && round.waiters.len() < last_group && round.stop.is_none()
            {
                let deadline = Instant::now() + GROUP_WAIT;
                while round.waiters.len() < last_group && self.batch.len() < MAX_BATCH_BYTES {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(cmd) => {
                            if !self.handle(cmd, &mut round) {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            round.stop = Some(false);
                            break;
                        }
                    }
                }
            }
            last_group = round.waiters.len();
            let mut result = self.write_batch();
            if result.is_ok() && (!round.waiters.is_empty() || round.stop == Some(true)) {
                result = self.sync();
                if result.is_ok() && round.stop.is_none() {
                    // A volume that syncs gets its next segment preallocated.
                    self.start_spare();
                }
            }
            for w in round.waiters.drain(..) {
                let _ = w.send(result.clone());
            }
            if self.note_due() {
                // Put the sync on record at once (written, not synced: a power loss may take the
                // note, a crash does not), so even the last synced records are covered by one;
                // at a clean close it is synced too, leaving no unsynced tail.
                self.note_synced();
                if self.write_batch().is_ok() && round.stop == Some(true) {
                    let _ = self.sync();
                }
            }
            if let Some(seq) = round.trim_to.take() {
                self.trim(seq);
            }
            // Records written, or the health changed: appenders waiting for room look again.
            self.health.progress.notify_waiters();
            if round.stop.is_some() {
                return;
            }
        }
    }

    /// Applies one command to the round; false once a stop was requested.
    fn handle(&mut self, cmd: Command, round: &mut Round) -> bool {
        match cmd {
            Command::Append {
                header,
                seq,
                payload,
            } => self.add(&header, seq, &payload),
            Command::Sync(tx) => round.waiters.push(tx),
            Command::Trim(seq) => round.trim_to = Some(round.trim_to.map_or(seq, |t| t.max(seq))),
            Command::Stop { sync } => {
                round.stop = Some(sync);
                return false;
            }
        }
        true
    }

    /// Adds one encoded record to the batch, rotating the segment first if it would overflow.
    fn add(&mut self, header: &[u8; RECORD_HEADER_LEN], seq: u64, payload: &Bytes) {
        let len = (RECORD_HEADER_LEN + payload.len()) as u64;
        // A sync note may go before it (counted, so a segment never outgrows its size).
        let note = if self.note_due() {
            RECORD_HEADER_LEN as u64
        } else {
            0
        };
        let pending = self.written + self.batch.len() as u64 + note;
        let full = pending + len > self.segment_bytes && pending > SEGMENT_HEADER_LEN as u64;
        // A preallocated segment is ready while the open one is not: move on now.
        let upgrade = !self.prepared && self.spare.as_ref().is_some_and(|s| s.thread.is_finished());
        if full || upgrade {
            let was_failing = self.health.is_failing();
            if let Err(e) = self.rotate() {
                // Keep appending to the current segment; the error surfaces on the next sync.
                // Logged once per failure episode, not once per record.
                if !was_failing {
                    tracing::error!(error = %e, "WAL segment rotation failed");
                }
            }
        }
        if self.health.is_fatal() {
            // The volume refuses writes from now on (a sync failed, maybe in the rotation just
            // tried); this one was queued before it knew.
            self.stats.unwritten_bytes.fetch_sub(len, Ordering::Relaxed);
            return;
        }
        if self.batch.is_empty() && self.note_due() {
            self.note_synced();
        }
        self.batch.push(header, payload);
        self.batch_max_seq = self.batch_max_seq.max(seq);
        bump(&self.stats.records, 1);
    }

    /// True when the open segment has no sync note for the last sync yet.
    fn note_due(&self) -> bool {
        self.synced_seq > self.noted_seq && !self.health.is_fatal()
    }

    /// Adds a sync note to the batch: every record up to `synced_seq` is on stable storage.
    /// Replay's evidence that damage before it is a corruption of synced records, not a torn
    /// tail (FORMAT.md, "Replay"). Written right after each sync (or, if that write failed, at
    /// the start of the next batch).
    fn note_synced(&mut self) {
        let note = RecordHeader::sync_note(self.volume_tag, self.synced_seq);
        self.batch.push(&note.encode(&[]), &Bytes::new());
        self.noted_seq = self.synced_seq;
        self.stats
            .unwritten_bytes
            .fetch_add(RECORD_HEADER_LEN as u64, Ordering::Relaxed);
    }

    fn current_path(&self) -> PathBuf {
        segment_path(&self.dir, self.segments.back().map_or(0, |s| s.no))
    }

    /// Writes the batch to the open segment. On failure the file is cut back to its last good
    /// length and the batch kept, so a later call retries it (disk full is not data loss).
    fn write_batch(&mut self) -> Result<(), WalError> {
        if let Some(e) = self.health.fatal_error() {
            return Err(e);
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        let page_at = self.written - self.tail.len() as u64;
        let written = match &self.direct {
            Some(direct) => {
                match self
                    .batch
                    .write_direct_at(direct, page_at, &self.tail, &mut self.aligned)
                {
                    // EINVAL: this file system or device refuses these direct writes.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                        tracing::warn!(error = %e, "WAL direct I/O refused; writing through the page cache");
                        self.direct = None;
                        self.batch.write_at(&self.file, page_at, &self.tail)
                    }
                    other => other,
                }
            }
            None => self.batch.write_at(&self.file, page_at, &self.tail),
        };
        if self.aligned.capacity() > 4 * MAX_BATCH_BYTES {
            // After an outsized batch (a 32 MiB write): do not keep its buffer. (Ordinary
            // batches, up to 8 MiB and one record, grow it to 18 MiB at most: kept, so its pages
            // stay mapped.)
            self.aligned = AlignedBuf::default();
        }
        match written {
            Ok(tail) => self.tail = tail,
            Err(e) => {
                let path = self.current_path();
                let _ = self.file.set_len(self.written);
                let err = WalError::io(&path, e);
                if !self.health.is_failing() {
                    tracing::error!(error = %err, unwritten_bytes = self.batch.len(), "WAL write failed; records are kept and retried, syncs fail until it succeeds");
                }
                self.health.set(Some(err.clone()));
                return Err(err);
            }
        }
        if self.health.is_failing() {
            tracing::info!("WAL writes succeed again");
            self.health.set(None);
        }
        self.stats
            .unwritten_bytes
            .fetch_sub(self.batch.len() as u64, Ordering::Relaxed);
        bump(&self.stats.writes, 1);
        bump(&self.stats.bytes, self.batch.len() as u64);
        self.written += self.batch.len() as u64;
        bump(&self.stats.disk_bytes, self.batch.len() as u64);
        if let Some(cur) = self.segments.back_mut() {
            cur.max_seq = cur.max_seq.max(self.batch_max_seq);
            cur.bytes = self.written;
        }
        self.written_seq = self.written_seq.max(self.batch_max_seq);
        self.batch.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        if let Some(e) = self.health.fatal_error() {
            return Err(e);
        }
        let started = Instant::now();
        crate::crash_point!("wal-before-sync");
        if let Err(e) = self.file.sync_data() {
            // fsyncgate: after a failed fsync the kernel may have dropped dirty pages; nothing
            // written since the last good sync can be trusted any more, and a retried fsync
            // would report success over them. The volume stops taking writes until it is
            // reopened (replay reads what really is on disk).
            let err = WalError::io(&self.current_path(), e);
            tracing::error!(error = %err, "WAL fdatasync failed; the volume refuses writes and flushes until it is reopened");
            self.health.set_fatal(err.clone());
            self.stats
                .unwritten_bytes
                .fetch_sub(self.batch.len() as u64, Ordering::Relaxed);
            self.batch.clear();
            return Err(err);
        }
        crate::crash_point!("wal-after-sync");
        bump(&self.stats.fsyncs, 1);
        self.synced_seq = self.written_seq;
        self.fsync_seconds.record(started.elapsed());
        if let Ok(mut d) = self.durable.lock() {
            d.offset = self.written;
        }
        Ok(())
    }

    /// Closes the open segment (written and synced) and starts the next one.
    fn rotate(&mut self) -> Result<(), WalError> {
        self.write_batch()?;
        self.sync()?;
        // The closed segment is read again only by a replay after a crash: drop its pages now so
        // the next segment reuses them instead of growing the page cache, which speeds up
        // sequential writes (docs/design/drop-closed-wal-segments.md). Advice only: errors ignored.
        self.file.drop_cache();
        let no = self.segments.back().map_or(0, |s| s.no) + 1;
        (self.file, self.prepared) = self.next_segment(no)?;
        self.direct = self.fs.open_direct(&segment_path(&self.dir, no)).ok();
        crate::crash_point!("wal-rotate");
        self.written = SEGMENT_HEADER_LEN as u64;
        self.tail = encode_segment_header(no, self.volume_tag).to_vec();
        self.batch_max_seq = 0;
        self.noted_seq = 0;
        self.segments.push_back(SegmentInfo {
            no,
            max_seq: 0,
            bytes: SEGMENT_HEADER_LEN as u64,
        });
        bump(&self.stats.segments, 1);
        bump(&self.stats.disk_bytes, SEGMENT_HEADER_LEN as u64);
        if let Ok(mut d) = self.durable.lock() {
            *d = DurablePosition {
                segment_no: no,
                offset: 0,
            };
        }
        Ok(())
    }

    /// Starts preallocating the segment after the open one, unless one is already under way.
    fn start_spare(&mut self) {
        let Some(cur) = self.segments.back().map(|s| s.no) else {
            return;
        };
        if self.spare.is_some() || cur < self.prepare_from {
            return;
        }
        let (fs, dir, no, tag, len) = (
            self.fs.clone(),
            self.dir.clone(),
            cur + 1,
            self.volume_tag,
            self.segment_bytes,
        );
        match std::thread::Builder::new()
            .name("wal-prepare".into())
            .spawn(move || prepare_segment(&fs, &dir, no, tag, len))
        {
            Ok(thread) => self.spare = Some(Spare { no, thread }),
            Err(e) => {
                tracing::warn!(error = %e, "WAL preallocation thread not started");
                self.prepare_from = cur + 1;
            }
        }
    }

    /// Opens segment `no`: the preallocated spare renamed into place when there is one (waiting
    /// for it to finish), else a new file that grows as it is written. True when preallocated.
    fn next_segment(&mut self, no: u64) -> Result<(FsFile, bool), WalError> {
        if let Some(spare) = self.spare.take() {
            let prep = spare_path(&self.dir, spare.no);
            match spare.thread.join() {
                Ok(Ok(file)) if spare.no == no => {
                    let path = segment_path(&self.dir, no);
                    match self.fs.rename(&prep, &path) {
                        Ok(()) => {
                            fsync_dir(&self.fs, &self.dir)?;
                            return Ok((file, true));
                        }
                        Err(e) => {
                            tracing::warn!(path = %prep.display(), error = %e, "preallocated WAL segment not renamed; using a growing one")
                        }
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "WAL segment preallocation failed; the next segment grows as it is written");
                    self.prepare_from = no + 1;
                }
                Err(_) => {
                    tracing::error!("WAL preallocation thread panicked");
                    self.prepare_from = no + 1;
                }
            }
            let _ = self.fs.remove_file(&prep);
        }
        Ok((
            create_segment(&self.fs, &self.dir, no, self.volume_tag)?,
            false,
        ))
    }

    fn trim(&mut self, checkpoint: u64) {
        // The trim mark goes first: once a segment is gone, only the mark tells the next open
        // that the map must cover its records (FORMAT.md, "Trim mark").
        let doomed = self.segments.len().saturating_sub(1);
        let Some(through) = self
            .segments
            .iter()
            .take(doomed)
            .take_while(|s| s.max_seq <= checkpoint)
            .map(|s| s.max_seq)
            .max()
        else {
            return;
        };
        if through > self.trimmed_through {
            if let Err(e) = super::write_trim_mark(&self.fs, &self.dir, through) {
                tracing::warn!(error = %e, "WAL trim mark not written: segments kept");
                return;
            }
            self.trimmed_through = through;
        }
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.front().copied() else {
                break;
            };
            if oldest.max_seq > checkpoint {
                break;
            }
            let path = segment_path(&self.dir, oldest.no);
            match self.fs.remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "WAL trim failed");
                    break;
                }
            }
            bump(&self.stats.segments_trimmed, 1);
            crate::crash_point!("wal-trim");
            self.stats.segments.fetch_sub(1, Ordering::Relaxed);
            self.stats
                .disk_bytes
                .fetch_sub(oldest.bytes, Ordering::Relaxed);
            self.segments.pop_front();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A spare never renamed into place is not part of the log.
        if let Some(spare) = self.spare.take() {
            let _ = spare.thread.join();
            let _ = self.fs.remove_file(&spare_path(&self.dir, spare.no));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small payloads copied, large ones written in place: the file holds every record in order.
    #[test]
    fn batch_writes_small_and_large_payloads_in_order() {
        let mut batch = Batch::default();
        let mut want = Vec::new();
        for (i, len) in [
            0usize,
            4096,
            COPY_LIMIT,
            100,
            3 * COPY_LIMIT + 5,
            COPY_LIMIT,
            7,
        ]
        .into_iter()
        .enumerate()
        {
            let header = [i as u8; RECORD_HEADER_LEN];
            let payload = Bytes::from((0..len).map(|b| (b * 31 + i) as u8).collect::<Vec<_>>());
            batch.push(&header, &payload);
            want.extend_from_slice(&header);
            want.extend_from_slice(&payload);
        }
        assert_eq!(batch.len(), want.len());
        assert_eq!(
            batch.large.len(),
            3,
            "payloads of COPY_LIMIT bytes and more are not copied"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = Fs::Real.create(&path).expect("create");
        let tail = batch.write_at(&file, 0, &[]).expect("write");
        assert_eq!(tail, want[want.len() / WAL_PAGE * WAL_PAGE..]);
        let unpadded = want.len();
        want.resize(want.len().div_ceil(WAL_PAGE) * WAL_PAGE, 0);
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read"), want);
        want.truncate(unpadded);
        // Through direct I/O, after a partial page already in the file: the same bytes.
        let path = dir.path().join("g");
        let buffered = Fs::Real.create(&path).expect("create");
        let head = vec![9u8; 100];
        buffered.write_all_at(&head, 0).expect("write head");
        let Ok(direct) = Fs::Real.open_direct(&path) else {
            eprintln!("no O_DIRECT on this file system; direct path not checked");
            return;
        };
        let mut aligned = AlignedBuf::default();
        let tail = batch
            .write_direct_at(&direct, 0, &head, &mut aligned)
            .expect("direct write");
        let mut want_g = head.clone();
        want_g.extend_from_slice(&want[..batch.len()]);
        assert_eq!(tail, want_g[want_g.len() / WAL_PAGE * WAL_PAGE..]);
        want_g.resize(want_g.len().div_ceil(WAL_PAGE) * WAL_PAGE, 0);
        assert_eq!(std::fs::read(&path).expect("read"), want_g);
        batch.clear();
        assert!(batch.is_empty());
    }
}

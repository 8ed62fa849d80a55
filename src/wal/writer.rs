//! The WAL writer thread: batching, segment rotation, group commit, trimming.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::record::{encode_segment_header, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::{
    bump, fsync_dir, segment_path, Command, DurablePosition, WalConfig, WalError, WalStats,
    WriteHealth,
};

/// A batch is written once it holds this many bytes, even if more commands are queued.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Payloads of at least this many bytes are written from the caller's buffer (`writev`) rather
/// than copied into the batch; smaller ones are cheaper to copy than to give an iovec each.
const COPY_LIMIT: usize = 64 << 10;

/// Longest a partial group waits for the rest of the previous group's syncers.
const GROUP_WAIT: Duration = Duration::from_micros(100);

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

    /// Writes the whole batch, in order, with as few `writev` calls as the kernel allows.
    fn write_to(&self, file: &mut File) -> std::io::Result<()> {
        let mut slices = Vec::with_capacity(2 * self.large.len() + 1);
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
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = file.write_vectored(rest)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }
}

/// A segment known to the writer, with the newest sequence number in it (for trimming).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentInfo {
    pub no: u64,
    pub max_seq: u64,
    /// Bytes in the file (header and records).
    pub bytes: u64,
}

pub(crate) struct Writer {
    dir: PathBuf,
    volume_tag: u64,
    segment_bytes: u64,
    /// Closed segments (oldest first) and the open one (last).
    segments: VecDeque<SegmentInfo>,
    file: File,
    /// Bytes of the open segment already written to the file.
    written: u64,
    /// Encoded records not yet written.
    batch: Batch,
    batch_max_seq: u64,
    /// Set after a failed `fdatasync`: the page cache can no longer be trusted.
    fatal: Option<WalError>,
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
        mut segments: VecDeque<SegmentInfo>,
        trimmed_through: u64,
        stats: Arc<WalStats>,
        durable: Arc<Mutex<DurablePosition>>,
        health: Arc<WriteHealth>,
    ) -> Result<Self, WalError> {
        let no = segments.back().map_or(1, |s| s.no + 1);
        let file = create_segment(&config.dir, no, volume_tag)?;
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
            dir: config.dir.clone(),
            volume_tag,
            segment_bytes: config.segment_bytes.max(1 << 16),
            segments,
            file,
            written: SEGMENT_HEADER_LEN as u64,
            batch: Batch {
                buf: Vec::with_capacity(1 << 20),
                ..Batch::default()
            },
            batch_max_seq: 0,
            fatal: None,
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

    pub(crate) fn run(mut self, rx: Receiver<Command>) {
        let mut round = Round::default();
        // Sync waiters in the previous group: the group size the load sustains.
        let mut last_group = 0usize;
        loop {
            let Ok(first) = rx.recv() else {
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
            }
            for w in round.waiters.drain(..) {
                let _ = w.send(result.clone());
            }
            if let Some(seq) = round.trim_to.take() {
                self.trim(seq);
            }
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
        let pending = self.written + self.batch.len() as u64;
        if pending + len > self.segment_bytes && pending > SEGMENT_HEADER_LEN as u64 {
            let was_failing = self.health.is_failing();
            if let Err(e) = self.rotate() {
                // Keep appending to the current segment; the error surfaces on the next sync.
                // Logged once per failure episode, not once per record.
                if !was_failing {
                    tracing::error!(error = %e, "WAL segment rotation failed");
                }
            }
        }
        self.batch.push(header, payload);
        self.batch_max_seq = self.batch_max_seq.max(seq);
        bump(&self.stats.records, 1);
    }

    fn current_path(&self) -> PathBuf {
        segment_path(&self.dir, self.segments.back().map_or(0, |s| s.no))
    }

    /// Writes the batch to the open segment. On failure the file is cut back to its last good
    /// length and the batch kept, so a later call retries it (disk full is not data loss).
    fn write_batch(&mut self) -> Result<(), WalError> {
        if let Some(e) = &self.fatal {
            return Err(e.clone());
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.batch.write_to(&mut self.file) {
            let path = self.current_path();
            let _ = self.file.set_len(self.written);
            let err = WalError::io(&path, e);
            if !self.health.is_failing() {
                tracing::error!(error = %err, unwritten_bytes = self.batch.len(), "WAL write failed; records are kept and retried, syncs fail until it succeeds");
            }
            self.health.set(Some(err.clone()));
            return Err(err);
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
        self.batch.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        if let Some(e) = &self.fatal {
            return Err(e.clone());
        }
        let started = Instant::now();
        crate::crash_point!("wal-before-sync");
        if let Err(e) = self.file.sync_data() {
            // fsyncgate: after a failed fsync the kernel may have dropped dirty pages; nothing
            // written since the last good sync can be trusted any more.
            let err = WalError::io(&self.current_path(), e);
            tracing::error!(error = %err, "WAL fdatasync failed; the WAL refuses further syncs");
            self.fatal = Some(err.clone());
            return Err(err);
        }
        crate::crash_point!("wal-after-sync");
        bump(&self.stats.fsyncs, 1);
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
        // the next segment reuses them instead of growing the page cache (measured: 4 GiB
        // sequential write 148 -> 179 MB/s; docs/BENCHMARKS.md). Advice only: errors ignored.
        let _ = rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::DontNeed);
        let no = self.segments.back().map_or(0, |s| s.no) + 1;
        self.file = create_segment(&self.dir, no, self.volume_tag)?;
        crate::crash_point!("wal-rotate");
        self.written = SEGMENT_HEADER_LEN as u64;
        self.batch_max_seq = 0;
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
            if let Err(e) = super::write_trim_mark(&self.dir, through) {
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
            match std::fs::remove_file(&path) {
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

/// Creates segment `no` with its header and makes its directory entry durable.
fn create_segment(dir: &std::path::Path, no: u64, volume_tag: u64) -> Result<File, WalError> {
    let path = segment_path(dir, no);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    file.write_all(&encode_segment_header(no, volume_tag))
        .map_err(|e| WalError::io(&path, e))?;
    fsync_dir(dir)?;
    Ok(file)
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
        let mut file = File::create(&path).expect("create");
        batch.write_to(&mut file).expect("write");
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read"), want);
        batch.clear();
        assert!(batch.is_empty());
    }
}

//! Write-ahead log: one directory of segment files per volume, written by one thread.
//!
//! Durability contract (NBD proto.md, "Ordering of messages and writes"): [`Wal::append`] hands a
//! record to the writer thread and returns at once; nothing is promised about it until a later
//! [`Wal::sync`] returns `Ok`, which means every record appended before the call is on stable
//! storage (written and `fdatasync`ed). The writer drains every queued command before it writes, so
//! concurrent appenders share one `write` and concurrent syncs share one `fdatasync`
//! (group commit; [`WalStats::fsyncs`] counts them).
//!
//! Segments are named `{segment_no:016x}.wal` and rotate at [`WalConfig::segment_bytes`]; a full
//! segment is `fdatasync`ed when it is closed, so only the newest segment can have an unsynced
//! tail. [`Wal::trim`] deletes closed segments whose records are all at or below a checkpoint.

pub mod record;
mod replay;
mod segment;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::fs::Fs;

pub use record::{DecodeError, RecordHeader, RecordKind};
pub use replay::ReplayReport;

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory holding this volume's segments (created if missing).
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it would exceed this many bytes
    /// (default 64 MiB).
    pub segment_bytes: u64,
    /// Owner's name (the VolumeId) for the `volume` label of the WAL's metrics.
    pub name: String,
    /// What replay does with a record that fails verification (default
    /// [`WalRecovery::TolerateTailCorruption`]).
    pub recovery: WalRecovery,
    /// The file system segments are written through ([`Fs::Real`] but in power-loss tests).
    pub fs: Fs,
}

/// What replay does with a record that fails verification. The modes are raft-engine's
/// (`RecoveryMode`); docs/RELIABILITY.md, "WAL recovery modes", says when to use which.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WalRecovery {
    /// The default. A bad record is a torn tail, cut off with a warning, when nothing the WAL
    /// recorded says it was synced: no valid record follows it in a later segment, and no sync
    /// note after it in its segment covers its sequence number (FORMAT.md, "Replay"). Otherwise
    /// the volume does not open ([`WalError::Corrupt`]).
    #[default]
    TolerateTailCorruption,
    /// A bad record is a torn tail only when no valid record (data or sync note) follows it
    /// anywhere; any other damage refuses the open, even in records never synced.
    AbsoluteConsistency,
    /// The operator's last resort: the log is cut at the first bad record, whatever follows it
    /// (synced records included; each cut is logged as an error). The volume then holds a
    /// prefix of its writes.
    TolerateAnyCorruption,
}

impl WalRecovery {
    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::TolerateTailCorruption => "tolerate-tail-corruption",
            Self::AbsoluteConsistency => "absolute-consistency",
            Self::TolerateAnyCorruption => "tolerate-any-corruption",
        }
    }

    /// Every mode, in the order of [`WalRecovery::name`]'s documentation.
    pub const ALL: [Self; 3] = [
        Self::TolerateTailCorruption,
        Self::AbsoluteConsistency,
        Self::TolerateAnyCorruption,
    ];
}

impl std::str::FromStr for WalRecovery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown WAL recovery mode {s:?} (one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Errors of the WAL layer. Cloneable so one failure can answer every waiter of a group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    /// Another open WAL holds the directory's lock file (`LOCK`, an advisory `flock`): a second
    /// instance of the volume, in this process or another one on the same WAL directory.
    #[error(
        "WAL directory {dir} is in use by another instance of the volume (is another vblock \
         process using the same --wal-dir?)"
    )]
    Locked {
        /// The volume's WAL directory.
        dir: PathBuf,
    },
    /// An I/O call on a WAL file or directory failed.
    #[error("WAL I/O error on {path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A record that is followed by valid records failed verification: acknowledged data may sit
    /// behind it, so the volume is not opened (FORMAT.md, "WAL replay").
    #[error(
        "WAL corrupt in {path} at byte {offset}: {reason}; valid records follow, refusing to open"
    )]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What was wrong.
        reason: DecodeError,
    },
    /// A segment carries another volume's tag.
    #[error(
        "WAL segment {path} belongs to another volume (tag {found:#x}, expected {expected:#x})"
    )]
    ForeignSegment {
        /// Segment file.
        path: PathBuf,
        /// Tag found in the file.
        found: u64,
        /// This volume's tag.
        expected: u64,
    },
    /// The block map's checkpoint is older than the WAL's trim point and the WAL no longer holds
    /// the records in between: the map lost committed chunks (RocksDB rolled back, or the data
    /// dir's `meta` was restored from an older copy). Serving the volume would return stale
    /// blocks, so it is not opened (FORMAT.md, "Trim mark").
    #[error(
        "WAL in {dir} was trimmed through seq {trimmed_through} but the block map's checkpoint is \
         {checkpoint} and the WAL's first record is {}: the map lost committed chunks \
         (RocksDB rolled back or restored from an older copy); refusing to open rather than \
         serve stale blocks. To rebuild the map from the backend, stop the daemon, move \
         DATA_DIR/meta aside and run `vblock recover` (the WAL is kept and replayed)",
        .first.map_or_else(|| "none".to_owned(), |f| f.to_string())
    )]
    MapBehind {
        /// The volume's WAL directory.
        dir: PathBuf,
        /// The map's checkpoint (RocksDB).
        checkpoint: u64,
        /// From the trim mark: records up to this seq may have been deleted.
        trimmed_through: u64,
        /// Sequence number of the oldest record left, if any.
        first: Option<u64>,
    },
    /// The trim mark does not verify. It bounds which records the WAL still holds, so the volume
    /// is not opened; if the map is known to be current, deleting the file lets it open.
    #[error("WAL trim mark {path} is unreadable: {reason}; refusing to open")]
    BadTrimMark {
        /// The mark's file.
        path: PathBuf,
        /// What was wrong.
        reason: DecodeError,
    },
    /// The writer thread has stopped (volume closing or an earlier fatal error).
    #[error("WAL writer stopped")]
    Closed,
}

impl WalError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source: Arc::new(source),
        }
    }

    /// True when the error is the file system being full (`ENOSPC`).
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(28))
    }
}

/// Counters, for tests and metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    /// `fdatasync` calls made on segment files.
    pub fsyncs: AtomicU64,
    /// `write` calls made on segment files.
    pub writes: AtomicU64,
    /// Records appended.
    pub records: AtomicU64,
    /// Bytes written (headers and payloads).
    pub bytes: AtomicU64,
    /// Segment files deleted by trim.
    pub segments_trimmed: AtomicU64,
    /// Segment files on disk now (gauge).
    pub segments: AtomicU64,
    /// Bytes in the segment files on disk now, i.e. not yet trimmed (gauge).
    pub disk_bytes: AtomicU64,
    /// Bytes appended but not yet written to a segment file (gauge): the writer's backlog.
    pub unwritten_bytes: AtomicU64,
    /// Appends that waited for room in the backlog ([`Wal::reserve`]): the WAL's disk was
    /// slower than the writers.
    pub backlog_waits: AtomicU64,
}

/// The most bytes of records that wait to be written to a segment (the writer's backlog), so
/// that the WAL cannot grow memory without bound when records come faster than its disk takes
/// them: the flusher may already have moved their data into chunks and released it from the
/// write buffer, which then bounds nothing. While the writer is healthy, [`Wal::reserve`] makes
/// appenders wait for room; while segment writes fail (disk full, I/O errors), appends past it
/// are refused with the write's error, and below it writes go on (the buffer holds them, the
/// flusher may still move them into chunks) and only syncs report the error.
pub const MAX_UNWRITTEN_BYTES: u64 = 32 << 20;

/// One appender queued in [`Wal::reserve`] (counted until dropped: also when the caller gives
/// up waiting).
struct Queued<'a>(&'a AtomicU64);

impl<'a> Queued<'a> {
    fn join(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The writer's last segment-write failure, cleared by the next successful write; or its fatal
/// failure (a failed `fdatasync`), which nothing clears; whether it still runs, and its
/// progress signal.
#[derive(Debug, Default)]
pub(crate) struct WriteHealth {
    failing: std::sync::atomic::AtomicBool,
    fatal: std::sync::atomic::AtomicBool,
    error: Mutex<Option<WalError>>,
    /// The writer thread has ended: nothing appended from now on is written.
    stopped: std::sync::atomic::AtomicBool,
    /// Woken by the writer after each round (records written, or the health changed) and when
    /// it ends: [`Wal::reserve`] waits on it.
    pub(crate) progress: tokio::sync::Notify,
}

impl WriteHealth {
    pub(crate) fn set_stopped(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn set(&self, e: Option<WalError>) {
        if self.is_fatal() {
            return;
        }
        self.failing.store(e.is_some(), Ordering::Relaxed);
        if let Ok(mut g) = self.error.lock() {
            *g = e;
        }
    }

    /// From now on every append fails with `e`.
    pub(crate) fn set_fatal(&self, e: WalError) {
        if let Ok(mut g) = self.error.lock() {
            *g = Some(e);
        }
        self.fatal.store(true, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_fatal(&self) -> bool {
        self.fatal.load(Ordering::Relaxed)
    }

    /// The fatal failure's error, once there is one.
    pub(crate) fn fatal_error(&self) -> Option<WalError> {
        if self.is_fatal() {
            self.error.lock().ok().and_then(|g| g.clone())
        } else {
            None
        }
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    fn error(&self) -> Option<WalError> {
        if !self.failing.load(Ordering::Relaxed) {
            return None;
        }
        self.error.lock().ok().and_then(|g| g.clone())
    }
}

/// Position up to which the WAL is known to be on stable storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurablePosition {
    /// Newest segment number.
    pub segment_no: u64,
    /// Bytes of that segment covered by the last `fdatasync`.
    pub offset: u64,
}

pub(crate) enum Command {
    Append {
        header: [u8; record::RECORD_HEADER_LEN],
        seq: u64,
        payload: Bytes,
    },
    Sync(oneshot::Sender<Result<(), WalError>>),
    Trim(u64),
    /// Stop after writing what is queued; `sync` also `fdatasync`s it (clean close).
    Stop {
        sync: bool,
    },
}

/// Handle to one volume's WAL writer thread.
pub struct Wal {
    tx: mpsc::Sender<Command>,
    volume_tag: u64,
    stats: Arc<WalStats>,
    durable: Arc<Mutex<DurablePosition>>,
    health: Arc<WriteHealth>,
    /// [`Wal::reserve`]'s queue: appenders get room in the order they asked (tokio's mutex is
    /// fair), so a record that needs the backlog empty is not passed by smaller ones for ever.
    reserve_turn: tokio::sync::Mutex<()>,
    /// Appenders queued in [`Wal::reserve`]: while any are, new ones queue behind them.
    reserve_queued: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Wal {
    /// Opens the WAL in `config.dir`: replays every record with `seq > checkpoint` through
    /// `apply` (in sequence order), truncates a torn tail, and starts the writer on a new segment.
    ///
    /// Blocking (file I/O): call from `spawn_blocking` in async code.
    ///
    /// Errors: [`WalError::Corrupt`] when a bad record is followed by valid ones,
    /// [`WalError::MapBehind`] when `checkpoint` is older than the trim mark and the records in
    /// between are gone, [`WalError::BadTrimMark`], [`WalError::ForeignSegment`], [`WalError::Io`].
    pub fn open(
        config: &WalConfig,
        volume_tag: u64,
        checkpoint: u64,
        apply: impl FnMut(&RecordHeader, Bytes),
    ) -> Result<(Self, ReplayReport), WalError> {
        config
            .fs
            .create_dir_all(&config.dir)
            .map_err(|e| WalError::io(&config.dir, e))?;
        let lock = lock_dir(&config.dir)?;
        let replayed = replay::replay(config, volume_tag, checkpoint, apply)?;
        // The replayed records may still sit only in the page cache (written before a kill -9 and
        // never synced). New records go to a new segment whose syncs cover only itself, so make
        // the old ones durable now: once a later flush returns, a power loss must not tear them
        // (README, "Durability").
        for seg in &replayed.segments {
            let path = segment_path(&config.dir, seg.no);
            config
                .fs
                .open_write(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| WalError::io(&path, e))?;
        }
        fsync_dir(&config.fs, &config.dir)?;
        let report = replayed.report.clone();
        let stats = Arc::new(WalStats::default());
        let durable = Arc::new(Mutex::new(DurablePosition::default()));
        let health = Arc::new(WriteHealth::default());
        let writer = writer::Writer::start(
            config,
            volume_tag,
            lock,
            replayed,
            stats.clone(),
            durable.clone(),
            health.clone(),
        )?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vblock-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| WalError::io(&config.dir, e))?;
        Ok((
            Self {
                tx,
                volume_tag,
                stats,
                durable,
                health,
                reserve_turn: tokio::sync::Mutex::new(()),
                reserve_queued: AtomicU64::new(0),
                thread: Mutex::new(Some(thread)),
            },
            report,
        ))
    }

    /// Waits until a record with a `payload_len`-byte payload fits in the writer's backlog:
    /// until at most [`MAX_UNWRITTEN_BYTES`] would wait unwritten with it, or nothing waits (a
    /// larger record goes alone). Returns at once while segment writes fail, after a failed
    /// `fdatasync` or once the WAL is shut down ([`Wal::append`] then answers with the error).
    /// Appenders that wait get room in the order they asked, and while any waits a new one
    /// queues behind it. Call before [`Wal::append`]; the bound is soft (an appender that got
    /// room may append after the next one looked). Counts each wait in
    /// [`WalStats::backlog_waits`].
    pub async fn reserve(&self, payload_len: usize) {
        let len = (record::RECORD_HEADER_LEN + payload_len) as u64;
        let fits = |unwritten: u64| unwritten == 0 || unwritten + len <= MAX_UNWRITTEN_BYTES;
        // Room and nobody queued (the usual case): no queue to join.
        if self.reserve_queued.load(Ordering::SeqCst) == 0
            && fits(self.stats.unwritten_bytes.load(Ordering::Relaxed))
        {
            return;
        }
        let _queued = Queued::join(&self.reserve_queued);
        let _turn = self.reserve_turn.lock().await;
        let mut waited = false;
        loop {
            let progress = self.health.progress.notified();
            tokio::pin!(progress);
            // Registered before the check: a round that ends in between still wakes it.
            progress.as_mut().enable();
            if fits(self.stats.unwritten_bytes.load(Ordering::Relaxed))
                || self.health.is_failing()
                || self.health.is_stopped()
            {
                return;
            }
            if !waited {
                waited = true;
                self.stats.backlog_waits.fetch_add(1, Ordering::Relaxed);
            }
            progress.await;
        }
    }

    /// Queues a record of `kind` (a [`RecordKind::Write`] of `block_count` blocks whose data is
    /// `payload`, `block_count` × 4096 bytes; or a [`RecordKind::Zero`] with an empty payload) for
    /// blocks from `start_block`, numbered `seq`. The WAL fills in the header's other fields
    /// (flags, volume tag, lengths, CRC; FORMAT.md, "WAL record"). Returns at once; see the module
    /// docs for what is promised.
    ///
    /// Errors: [`WalError::Closed`]; while segment writes fail, the write's error (e.g. `ENOSPC`,
    /// see [`WalError::is_no_space`]) once [`MAX_UNWRITTEN_BYTES`] wait unwritten; after a failed
    /// `fdatasync` ([`Wal::failed`]), that error, always.
    pub fn append(
        &self,
        kind: RecordKind,
        seq: u64,
        start_block: u64,
        block_count: u32,
        payload: Bytes,
    ) -> Result<(), WalError> {
        let len = (record::RECORD_HEADER_LEN + payload.len()) as u64;
        if let Some(e) = self.health.error() {
            if self.health.is_fatal()
                || self.stats.unwritten_bytes.load(Ordering::Relaxed) + len > MAX_UNWRITTEN_BYTES
            {
                return Err(e);
            }
        }
        self.stats.unwritten_bytes.fetch_add(len, Ordering::Relaxed);
        let encoded = RecordHeader {
            kind,
            flags: 0,
            seq,
            volume_tag: self.volume_tag,
            start_block,
            block_count,
            payload_len: payload.len() as u32,
        }
        .encode(&payload);
        self.tx
            .send(Command::Append {
                header: encoded,
                seq,
                payload,
            })
            .map_err(|_| WalError::Closed)
    }

    /// Waits until every record appended before this call is on stable storage.
    pub async fn sync(&self) -> Result<(), WalError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Sync(tx))
            .map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Deletes closed segments whose records all have `seq <= checkpoint`.
    pub fn trim(&self, checkpoint: u64) {
        // A stopped writer has nothing left to trim; the next open replays past the checkpoint.
        let _ = self.tx.send(Command::Trim(checkpoint));
    }

    /// True once an `fdatasync` failed: every append, sync and flush fails until the volume is
    /// reopened (the page cache can no longer be trusted; "fsyncgate").
    pub fn failed(&self) -> bool {
        self.health.is_fatal()
    }

    /// Counters.
    pub fn stats(&self) -> &WalStats {
        &self.stats
    }

    /// Position covered by the last `fdatasync` (crash tests truncate the log after it).
    pub fn durable_position(&self) -> DurablePosition {
        self.durable.lock().map(|d| *d).unwrap_or_default()
    }

    /// Stops the writer after it has written everything queued, `fdatasync`ing it when `sync`.
    /// Blocks until the thread has exited: call from `spawn_blocking` in async code.
    pub fn shutdown(&self, sync: bool) {
        let _ = self.tx.send(Command::Stop { sync });
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Not a clean close: write what is queued without promising durability, and detach.
        let _ = self.tx.send(Command::Stop { sync: false });
    }
}

/// Takes the WAL directory's lock: `dir/LOCK`, created if missing, locked exclusively with
/// `flock` (FORMAT.md, "WAL"). The lock lasts while the returned file is open; the writer thread
/// holds it until it exits, so a directory has one writer at a time across instances and
/// processes.
///
/// Errors: [`WalError::Locked`] when another open file holds it, [`WalError::Io`].
fn lock_dir(dir: &Path) -> Result<std::fs::File, WalError> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(WalError::Locked {
            dir: dir.to_owned(),
        }),
        Err(e) => Err(WalError::io(&path, e.into())),
    }
}

pub(crate) fn segment_path(dir: &Path, segment_no: u64) -> PathBuf {
    dir.join(format!("{segment_no:016x}.wal"))
}

/// The trim mark's file: `dir/trimmed.mark` (FORMAT.md, "Trim mark").
pub(crate) fn trim_mark_path(dir: &Path) -> PathBuf {
    dir.join("trimmed.mark")
}

/// Reads the trim mark of the WAL in `dir`: records with `seq <=` the result may have been
/// deleted (0 without a mark).
///
/// Errors: [`WalError::BadTrimMark`] when the mark does not verify, [`WalError::Io`].
pub fn read_trim_mark(dir: &Path) -> Result<u64, WalError> {
    let path = trim_mark_path(dir);
    match std::fs::read(&path) {
        Ok(b) => {
            record::decode_trim_mark(&b).map_err(|reason| WalError::BadTrimMark { path, reason })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(WalError::io(&path, e)),
    }
}

/// True when a map whose checkpoint is `checkpoint` has lost committed chunks the WAL can no longer
/// replay: it is behind the trim mark and the WAL's oldest record (`first_seq`, `None` for no
/// record) is past `checkpoint + 1` (FORMAT.md, "Trim mark"). Trims follow the map commit they
/// rely on, so a healthy map is never behind the mark; one behind it is still whole while the WAL
/// kept every record after its checkpoint.
pub fn map_behind(checkpoint: u64, trimmed_through: u64, first_seq: Option<u64>) -> bool {
    checkpoint < trimmed_through && first_seq.is_none_or(|f| f > checkpoint + 1)
}

/// Durably replaces the trim mark with `trimmed_through` (write a temporary file, `fsync`,
/// rename, `fsync` the directory): call before deleting the segments it covers.
pub(crate) fn write_trim_mark(fs: &Fs, dir: &Path, trimmed_through: u64) -> Result<(), WalError> {
    let path = trim_mark_path(dir);
    let tmp = dir.join("trimmed.mark.tmp");
    let f = fs.create(&tmp).map_err(|e| WalError::io(&tmp, e))?;
    f.write_all_at(&record::encode_trim_mark(trimmed_through), 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| WalError::io(&tmp, e))?;
    fs.rename(&tmp, &path).map_err(|e| WalError::io(&path, e))?;
    fsync_dir(fs, dir)
}

/// Segment numbers present in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
        let entry = entry.map_err(|e| WalError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(".wal") {
            if let Ok(no) = u64::from_str_radix(hex, 16) {
                out.push(no);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub(crate) fn fsync_dir(fs: &Fs, dir: &Path) -> Result<(), WalError> {
    fs.sync_dir(dir).map_err(|e| WalError::io(dir, e))
}

/// Keeps a counter in step.
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Result of a read-only scan of one segment file (for `vblock inspect` and `vblock fsck`).
#[derive(Debug, Clone)]
pub struct SegmentScan {
    /// Segment number and volume tag from the header, if it decodes.
    pub header: Result<(u64, u64), DecodeError>,
    /// Every record that verifies, with its byte offset.
    pub records: Vec<(u64, RecordHeader)>,
    /// The first bad record: offset and reason (`None` when the file ends cleanly: after its last
    /// record, or in zero padding after it).
    pub error: Option<(u64, DecodeError)>,
    /// File length in bytes.
    pub len: u64,
}

/// Scans a segment's bytes without changing anything.
pub fn scan_segment(bytes: &[u8]) -> SegmentScan {
    let header = record::decode_segment_header(bytes);
    let mut records = Vec::new();
    let mut error = None;
    if header.is_ok() {
        let padded = record::segment_version(bytes) >= 2;
        let mut off = record::SEGMENT_HEADER_LEN;
        while off < bytes.len() {
            match record::decode_record(&bytes[off..]) {
                Ok((h, _)) => {
                    records.push((off as u64, h));
                    off += h.record_len();
                }
                Err(_) if padded && record::is_padding(&bytes[off..]) => break,
                Err(e) => {
                    error = Some((off as u64, e));
                    break;
                }
            }
        }
    }
    SegmentScan {
        header,
        records,
        error,
        len: bytes.len() as u64,
    }
}

/// Segment files of a WAL directory, ascending (for offline tools).
pub fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, WalError> {
    Ok(list_segments(dir)?
        .into_iter()
        .map(|no| segment_path(dir, no))
        .collect())
}

/// A segment known to the writer, with the newest sequence number in it (for trimming).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentInfo {
    /// Segment number.
    pub no: u64,
    /// Highest sequence number of a record in it (0 for none).
    pub max_seq: u64,
    /// Bytes in the file (header and records).
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: u64 = 0x7a11;

    /// Appends a one-block write of block `seq`, filled with the byte `seq as u8`.
    fn append(wal: &Wal, seq: u64) {
        let (h, payload) = record::one_block_record(TAG, seq, seq as u8);
        wal.append(
            h.kind,
            h.seq,
            h.start_block,
            h.block_count,
            Bytes::from(payload),
        )
        .expect("append");
    }

    /// A WAL in `dir/wal` with 64 KiB segments (15 one-block records each).
    fn small_segments(dir: &Path) -> WalConfig {
        WalConfig {
            dir: dir.join("wal"),
            segment_bytes: 1 << 16,
            name: "test".into(),
            recovery: WalRecovery::default(),
            fs: Fs::Real,
        }
    }

    fn replayed_seqs(config: &WalConfig, checkpoint: u64) -> Result<Vec<u64>, WalError> {
        let mut seqs = Vec::new();
        let (wal, _) = Wal::open(config, TAG, checkpoint, |h, _| seqs.push(h.seq))?;
        wal.shutdown(true);
        Ok(seqs)
    }

    /// A WAL that syncs moves into preallocated segments: full-size files its records overwrite,
    /// zero-padded after the last one. Every record replays after a crash (no clean close),
    /// across the padding; spares never renamed into place are gone after a close and after an
    /// open.
    #[test]
    fn a_syncing_wal_writes_into_preallocated_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_segments(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (wal, _) = Wal::open(&config, TAG, 0, |_, _| {}).expect("open");
        // 4,140-byte records, 15 to a 64 KiB segment. The first sync starts the spare for
        // segment 2; the writer waits for it when segment 1 is full at the latest.
        for seq in 1..=40 {
            append(&wal, seq);
            if seq % 5 == 0 {
                rt.block_on(wal.sync()).expect("sync");
            }
        }
        let lens: Vec<u64> = list_segments(&config.dir)
            .expect("list")
            .into_iter()
            .map(|no| std::fs::metadata(segment_path(&config.dir, no)).map_or(0, |m| m.len()))
            .collect();
        assert!(lens.len() >= 3, "segments {lens:?}");
        assert!(
            lens.iter().all(|len| len % 4096 == 0),
            "whole pages: {lens:?}"
        );
        assert_eq!(lens[1], 1 << 16, "segment 2 was preallocated: {lens:?}");
        wal.shutdown(false);
        let spares = |dir: &Path| {
            std::fs::read_dir(dir)
                .expect("read_dir")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".prep"))
                .count()
        };
        assert_eq!(
            spares(&config.dir),
            0,
            "the spare is removed when the writer stops"
        );
        std::fs::write(
            config.dir.join("00000000000000ff.wal.prep"),
            b"left by a crash",
        )
        .expect("write");
        assert_eq!(
            replayed_seqs(&config, 0).expect("replay"),
            (1..=40).collect::<Vec<_>>()
        );
        assert_eq!(spares(&config.dir), 0, "a crash's spare is removed at open");
    }

    /// Trimming records the trim mark before deleting segments; a map checkpoint behind the mark
    /// opens only while the WAL still holds every record after it (FORMAT.md, "Trim mark").
    #[test]
    fn trim_writes_the_mark_and_a_map_behind_it_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_segments(dir.path());
        let (wal, _) = Wal::open(&config, TAG, 0, |_, _| {}).expect("open");
        // 4,140-byte records, 15 to a 64 KiB segment: segments hold 1..=15, 16..=30, 31..=40.
        for seq in 1..=40 {
            append(&wal, seq);
        }
        wal.trim(30);
        wal.shutdown(true);
        assert_eq!(read_trim_mark(&config.dir).expect("mark"), 30);
        assert_eq!(
            list_segments(&config.dir).expect("list").len(),
            1,
            "31..=40 left"
        );

        for behind in [0, 20, 29] {
            match replayed_seqs(&config, behind) {
                Err(WalError::MapBehind {
                    checkpoint,
                    trimmed_through: 30,
                    first,
                    ..
                }) => {
                    assert_eq!(checkpoint, behind);
                    assert_eq!(first, Some(31));
                }
                other => panic!("checkpoint {behind}: expected MapBehind, got {other:?}"),
            }
        }
        assert_eq!(
            replayed_seqs(&config, 30).expect("map at the mark"),
            (31..=40).collect::<Vec<_>>()
        );

        // A mark that does not verify refuses the open instead of being ignored.
        let path = trim_mark_path(&config.dir);
        let mut mark = std::fs::read(&path).expect("read mark");
        mark[9] ^= 0x10;
        std::fs::write(&path, &mark).expect("write mark");
        assert!(matches!(
            replayed_seqs(&config, 40),
            Err(WalError::BadTrimMark { .. })
        ));
    }
    /// A WAL directory has one writer: a second open is refused while the first WAL runs,
    /// and succeeds once it is shut down (FORMAT.md, "WAL").
    #[test]
    fn a_second_open_of_a_wal_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_segments(dir.path());
        let (wal, _) = Wal::open(&config, TAG, 0, |_, _| {}).expect("open");
        append(&wal, 1);
        match Wal::open(&config, TAG, 0, |_, _| {}) {
            Err(WalError::Locked { dir }) => assert_eq!(dir, config.dir),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a second writer opened the WAL directory"),
        }
        wal.shutdown(true);
        let mut replayed = Vec::new();
        let (again, _) =
            Wal::open(&config, TAG, 0, |h, _| replayed.push(h.seq)).expect("open after shutdown");
        assert_eq!(replayed, vec![1]);
        again.shutdown(true);
    }
}

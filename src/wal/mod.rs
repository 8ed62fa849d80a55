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
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

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
}

/// Errors of the WAL layer. Cloneable so one failure can answer every waiter of a group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
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
}

/// While segment writes fail (disk full, I/O errors), appends are refused with the write's
/// error once this many bytes wait unwritten, so a full WAL disk cannot grow memory without
/// bound; below it writes go on (the buffer holds them, the flusher may still move them into
/// chunks) and only syncs report the error.
pub const MAX_UNWRITTEN_BYTES: u64 = 32 << 20;

/// The writer's last segment-write failure, cleared by the next successful write.
#[derive(Debug, Default)]
pub(crate) struct WriteHealth {
    failing: std::sync::atomic::AtomicBool,
    error: Mutex<Option<WalError>>,
}

impl WriteHealth {
    pub(crate) fn set(&self, e: Option<WalError>) {
        self.failing.store(e.is_some(), Ordering::Relaxed);
        if let Ok(mut g) = self.error.lock() {
            *g = e;
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
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Wal {
    /// Opens the WAL in `config.dir`: replays every record with `seq > checkpoint` through
    /// `apply` (in sequence order), truncates a torn tail, and starts the writer on a new segment.
    ///
    /// Blocking (file I/O): call from `spawn_blocking` in async code.
    ///
    /// Errors: [`WalError::Corrupt`] when a bad record is followed by valid ones,
    /// [`WalError::ForeignSegment`], [`WalError::Io`].
    pub fn open(
        config: &WalConfig,
        volume_tag: u64,
        checkpoint: u64,
        apply: impl FnMut(&RecordHeader, Bytes),
    ) -> Result<(Self, ReplayReport), WalError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| WalError::io(&config.dir, e))?;
        let replayed = replay::replay(&config.dir, volume_tag, checkpoint, apply)?;
        let report = replayed.report.clone();
        let stats = Arc::new(WalStats::default());
        let durable = Arc::new(Mutex::new(DurablePosition::default()));
        let health = Arc::new(WriteHealth::default());
        let writer = writer::Writer::start(
            config,
            volume_tag,
            replayed.segments,
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
                thread: Mutex::new(Some(thread)),
            },
            report,
        ))
    }

    /// Queues a record. Returns at once; see the module docs for what is promised.
    /// `payload.len()` must equal `header.payload_len`.
    ///
    /// Errors: [`WalError::Closed`]; while segment writes fail, the write's error (e.g. `ENOSPC`,
    /// see [`WalError::is_no_space`]) once [`MAX_UNWRITTEN_BYTES`] wait unwritten.
    pub fn append(&self, header: RecordHeader, payload: Bytes) -> Result<(), WalError> {
        let len = (record::RECORD_HEADER_LEN + payload.len()) as u64;
        if let Some(e) = self.health.error() {
            if self.stats.unwritten_bytes.load(Ordering::Relaxed) + len > MAX_UNWRITTEN_BYTES {
                return Err(e);
            }
        }
        self.stats.unwritten_bytes.fetch_add(len, Ordering::Relaxed);
        let encoded = RecordHeader {
            volume_tag: self.volume_tag,
            ..header
        }
        .encode(&payload);
        self.tx
            .send(Command::Append {
                header: encoded,
                seq: header.seq,
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

pub(crate) fn segment_path(dir: &Path, segment_no: u64) -> PathBuf {
    dir.join(format!("{segment_no:016x}.wal"))
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

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), WalError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io(dir, e))
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
    /// The first bad record: offset and reason (`None` when the file ends cleanly).
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
        let mut off = record::SEGMENT_HEADER_LEN;
        while off < bytes.len() {
            match record::decode_record(&bytes[off..]) {
                Ok((h, _)) => {
                    records.push((off as u64, h));
                    off += h.record_len();
                }
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

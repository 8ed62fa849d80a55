//! Engine settings of a volume.

use std::time::Duration;

use crate::block::BLOCK_SIZE;
use crate::chunk::ChunkOptions;
use crate::fs::Fs;
use crate::retry::RetryPolicy;
use crate::wal::{WalConfig, WalRecovery};

use super::{VolumeError, MAX_REQUEST_BYTES};

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
    /// Ship the WAL to the backend (`--ship-wal`, cluster mode): a flush or FUA returns only
    /// once the records it covers are also in the backend as shipped WAL objects, so a flushed
    /// write outlives the node's disks (docs/design/cluster.md; default off).
    pub ship_wal: bool,
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
    /// The WAL settings of volume `name` whose segments live in `dir`.
    pub fn wal_config(&self, dir: std::path::PathBuf, name: String) -> WalConfig {
        WalConfig {
            dir,
            segment_bytes: self.wal_segment_bytes,
            name,
            recovery: self.wal_recovery,
            fs: self.fs.clone(),
        }
    }

    /// Checks that the write buffer can hold two chunks and two of the largest requests
    /// (`MAX_REQUEST_BYTES`), so a writer never waits for space that cannot come.
    /// Errors: [`VolumeError::InvalidArgument`] naming the sizes (bytes).
    pub fn validate(&self) -> Result<(), VolumeError> {
        let chunk_blocks = (self.chunk_bytes / BLOCK_SIZE).max(1);
        let total_permits = self.buffer_bytes / BLOCK_SIZE;
        if total_permits < 2 * chunk_blocks + 2 * (MAX_REQUEST_BYTES / BLOCK_SIZE) + 2 {
            return Err(VolumeError::InvalidArgument(format!(
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
            ship_wal: false,
        }
    }
}

//! The volume layer's errors.

use crate::backend::BackendError;
use crate::chunk::ChunkError;
use crate::meta::MetaError;
use crate::wal::WalError;

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

//! The volume layer's errors.

use crate::backend::BackendError;
use crate::chunk::ChunkError;
use crate::ids::{SnapshotId, VolumeId};
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
    /// Cluster mode: this node no longer keeps the volume's lease (another node may own it
    /// now), so it serves no more reads, writes or flushes of it; the volume is closed here
    /// next. Clients mount the volume again (NBD maps it to `NBD_ESHUTDOWN`).
    #[error("this node no longer holds the lease of volume {0}: another node may own it; mount it again")]
    LeaseLost(VolumeId),
    /// The volume failed and takes no more writes or flushes until it is reopened: its WAL could
    /// not be synced (the page cache can no longer be trusted), or its flusher hit a permanent
    /// error (the data stays in the WAL). Reads go on.
    #[error("volume failed: {0}; reopen it to recover (the WAL is replayed)")]
    Failed(String),
    /// An argument the caller got wrong: a volume size, a configuration (EC2
    /// `InvalidParameterValue`, `NBD_EINVAL`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No volume has this id (EC2 `InvalidVolume.NotFound`).
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeId),
    /// No snapshot has this id (EC2 `InvalidSnapshot.NotFound`).
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    /// The request does not fit the resource's state now, e.g. deleting a snapshot that is still
    /// `pending` (EC2 `IncorrectState`).
    #[error("{0}")]
    IncorrectState(String),
    /// The resource is mounted or attached and the request needs it free, e.g. deleting an
    /// exported snapshot (EC2 `VolumeInUse`).
    #[error("{0}")]
    InUse(String),
    /// A write to a read-only export (a snapshot): `NBD_EPERM`.
    #[error("the export is read-only")]
    ReadOnly,
    /// Data the engine stored cannot be decoded: a map checkpoint, a snapshot map, a record
    /// (`NBD_EIO`, EC2 `InternalError`).
    #[error("{what} is corrupt: {reason}")]
    Corrupt {
        /// What was read (an object key, a file).
        what: String,
        /// Why it does not decode.
        reason: String,
    },
    /// A local file-system operation on the data directories failed (`NBD_EIO`, EC2
    /// `InternalError`).
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A flush could not be acknowledged: its WAL records could not be shipped to the backend
    /// (with `ship_wal`; a backend outage beyond the retries). The records stay queued and the
    /// next flush tries again (`NBD_EIO`, EC2 `InternalError`).
    #[error("WAL shipping failed, the flush is not acknowledged: {0}")]
    Shipping(String),
    /// A background task panicked or was cancelled, or a value could not be encoded: a bug
    /// (`NBD_EIO`, EC2 `InternalError`).
    #[error("internal error: {0}")]
    Internal(String),
}

impl VolumeError {
    /// [`VolumeError::Internal`] for a blocking task that did not return (`what` names it).
    pub(crate) fn task(what: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{what} task failed: {e}"))
    }
}

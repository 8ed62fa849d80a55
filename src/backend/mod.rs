//! Object backends: where chunk objects live. One async trait, one file per implementation.
//!
//! Keys are `/`-separated relative paths made by [`chunk_key`] (FORMAT.md, "Object keys").
//! Backends do not retry: the caller (the flusher, the read path) owns retry policy.

pub mod file;
pub mod memory;
pub mod s3;

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ids::{SnapshotId, VolumeId};

/// Errors of the backend layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// No object under the key.
    #[error("object {0} not found")]
    NotFound(String),
    /// The requested byte range is not inside the object.
    #[error("range {start}..{end} outside object {key} of {len} bytes")]
    BadRange {
        /// Key.
        key: String,
        /// Requested start byte.
        start: u64,
        /// Requested end byte (exclusive).
        end: u64,
        /// Object length in bytes.
        len: u64,
    },
    /// A key that is not a safe relative path.
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// An I/O or transport failure; `transient` says whether a retry may succeed.
    #[error("backend I/O error on {key}: {message}")]
    Io {
        /// Key (or prefix) being accessed.
        key: String,
        /// What failed.
        message: String,
        /// True for timeouts, 5xx, throttling, connection failures.
        transient: bool,
    },
}

impl BackendError {
    /// True when retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Io {
                transient: true,
                ..
            }
        )
    }
}

/// An object store. Objects are immutable once `put` returns `Ok`: `put` is atomic and durable
/// (a reader sees the whole object or none of it, also after a crash).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Stores `data` under `key`, replacing any object there.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError>;
    /// [`Backend::put`], with a hint that the object will not be read again soon (bulk data,
    /// read in large frames if at all): a backend with a local cache may bypass it. The file
    /// backend writes such an object with direct I/O instead of through the page cache
    /// (docs/design/direct-io.md). Same guarantees as `put`.
    async fn put_uncached(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.put(key, data).await
    }
    /// Stores `data` under `key` only if no object is there: `Ok(true)` when stored, `Ok(false)`
    /// when one already was (nothing changed). Of concurrent calls for one key, from any number
    /// of processes, at most one stores, on a store whose conditional PUT is atomic (AWS S3's
    /// is; the file and memory backends' are): the primitive that fences a stale writer (S3
    /// `PutObject` with `If-None-Match: *`, answered `412 PreconditionFailed` when the key
    /// exists; a local rename with `RENAME_NOREPLACE`). Durable like [`Backend::put`].
    ///
    /// A retry after a transient error may find the object its own first attempt stored and
    /// answer `Ok(false)`: callers put something unique in `data` (a nonce) and read the object
    /// back to tell their own from another writer's.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, BackendError>;
    /// The whole object.
    async fn get(&self, key: &str) -> Result<Bytes, BackendError>;
    /// Bytes `range.start..range.end` of the object (a ranged GET); the range must lie inside it.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError>;
    /// Deletes the object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Keys that start with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError>;
    /// Keys that start with `prefix` and sort after `start_after`, sorted (S3's `StartAfter`:
    /// a listing from the middle of a large prefix reads only the pages it needs there).
    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
    ) -> Result<Vec<String>, BackendError> {
        let mut keys = self.list(prefix).await?;
        keys.retain(|k| k.as_str() > start_after);
        Ok(keys)
    }
    /// Short name for logs (`file`, `memory`, `s3`).
    fn kind(&self) -> &'static str;

    /// A blocking ranged read for local backends (file, memory), so the read path can look up the
    /// map, fetch and decode a frame in one blocking task instead of three hand-offs
    /// (docs/design/read-queue.md). `None`: not local, use [`Backend::get_range`].
    fn get_range_blocking(
        &self,
        _key: &str,
        _range: Range<u64>,
    ) -> Option<Result<Bytes, BackendError>> {
        None
    }
}

/// A shared backend.
pub type SharedBackend = Arc<dyn Backend>;

/// Key of chunk object `object_id` written by `volume`: `VOLUMEID/chunks/OBJECTID` with the id as
/// 16 lowercase hex digits (FORMAT.md, "Object keys").
pub fn chunk_key(volume: &VolumeId, object_id: u64) -> String {
    chunk_key_of(volume.number(), object_id)
}

/// [`chunk_key`] of the volume whose id has number `owner` ([`VolumeId::number`]), without
/// building the VolumeId (the read path).
pub fn chunk_key_of(owner: u128, object_id: u64) -> String {
    format!("vol-{owner:017x}/chunks/{object_id:016x}")
}

/// Prefix of a volume's chunk objects (`VOLUMEID/chunks/`).
pub fn chunk_prefix(volume: &VolumeId) -> String {
    format!("{volume}/chunks/")
}

/// The chunk object ids of `keys` under `volume`'s [`chunk_prefix`] (other keys are skipped).
pub fn chunk_ids<'a>(volume: &VolumeId, keys: impl IntoIterator<Item = &'a String>) -> Vec<u64> {
    let prefix = chunk_prefix(volume);
    keys.into_iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .collect()
}

/// Key of the copy of a volume's record kept with its chunks (`VOLUMEID/volume.json`), from which
/// a daemon with an empty data directory recovers the volume (FORMAT.md, "Recovery").
pub fn volume_record_key(volume: &VolumeId) -> String {
    format!("{volume}/volume.json")
}

/// Prefix of a volume's map checkpoints (`VOLUMEID/map/`).
pub fn checkpoint_prefix(volume: &VolumeId) -> String {
    format!("{volume}/map/")
}

/// Key of a volume's map checkpoint taken when its next object id was `next_object_id`
/// (`VOLUMEID/map/NEXTOBJECTID`, 16 lowercase hex digits; the largest is the newest).
pub fn checkpoint_key(volume: &VolumeId, next_object_id: u64) -> String {
    format!("{volume}/map/{next_object_id:016x}")
}

/// Key of a snapshot's record copy (`SNAPID/snapshot.json`), written once its map is stored.
pub fn snapshot_record_key(snapshot: &SnapshotId) -> String {
    format!("{snapshot}/snapshot.json")
}

/// Key of a snapshot's frozen map (`SNAPID/map`, a map object).
pub fn snapshot_map_key(snapshot: &SnapshotId) -> String {
    format!("{snapshot}/map")
}

/// Key of a snapshot's outcome (`SNAPID/outcome`, cluster mode: `completed` or `error`, written
/// once with [`Backend::put_if_absent`]): the node finishing the snapshot and a node abandoning
/// it (the volume's next owner) race for it, and exactly one wins.
pub fn snapshot_outcome_key(snapshot: &SnapshotId) -> String {
    format!("{snapshot}/outcome")
}

/// Prefix of a snapshot's clone pins (`SNAPID/clones/`, cluster mode): one object per volume
/// cloned from it ([`snapshot_pin_key`]).
pub fn snapshot_pins_prefix(snapshot: &SnapshotId) -> String {
    format!("{snapshot}/clones/")
}

/// Key of clone `volume`'s pin on `snapshot` (`SNAPID/clones/VOLUMEID`, cluster mode, empty):
/// stored before the clone shares the snapshot's chunks, deleted once the clone is gone. While
/// one is listed, a delete of the snapshot keeps its record copy and map (FORMAT.md, "Clone
/// pins").
pub fn snapshot_pin_key(snapshot: &SnapshotId, volume: &VolumeId) -> String {
    format!("{}{volume}", snapshot_pins_prefix(snapshot))
}

/// Key of a snapshot's delete marker (`SNAPID/deleted`, cluster mode, empty): stored by a
/// delete before it lists the pins; a clone started after it finds it and fails.
pub fn snapshot_deleted_key(snapshot: &SnapshotId) -> String {
    format!("{snapshot}/deleted")
}

/// Prefix of a volume's epoch manifests (`VOLUMEID/epoch/`; docs/design/cluster.md).
pub fn epoch_prefix(volume: &VolumeId) -> String {
    format!("{volume}/epoch/")
}

/// Key of the probe object a cluster node stores and deletes at start
/// (`cluster-probe/NODE/NANOS`, NANOS the wall clock in nanoseconds since the Unix epoch;
/// [`crate::cluster::epoch::check_conditional_put`]).
pub fn probe_key(node: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cluster-probe/{node}/{nanos}")
}

/// Key of a volume's epoch manifest `epoch` (`VOLUMEID/epoch/EPOCH`, 16 lowercase hex digits;
/// the largest is the volume's writer; FORMAT.md, "Epoch manifest").
pub fn epoch_key(volume: &VolumeId, epoch: u64) -> String {
    format!("{volume}/epoch/{epoch:016x}")
}

/// Prefix of a volume's shipped WAL objects (`VOLUMEID/wal/`; FORMAT.md, "Shipped WAL object").
pub fn wal_object_prefix(volume: &VolumeId) -> String {
    format!("{volume}/wal/")
}

/// Key of a volume's shipped WAL object `counter` (`VOLUMEID/wal/COUNTER`, 16 lowercase hex
/// digits; objects are replayed in counter order).
pub fn wal_object_key(volume: &VolumeId, counter: u64) -> String {
    format!("{volume}/wal/{counter:016x}")
}

/// The shipped WAL object counters among `keys` under `volume`'s [`wal_object_prefix`], sorted
/// (other keys are skipped).
pub fn wal_object_counters<'a>(
    volume: &VolumeId,
    keys: impl IntoIterator<Item = &'a String>,
) -> Vec<u64> {
    let prefix = wal_object_prefix(volume);
    let mut counters: Vec<u64> = keys
        .into_iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter(|hex| hex.len() == 16)
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .filter(|c| *c < u64::MAX)
        .collect();
    counters.sort_unstable();
    counters
}

/// Key of a volume's damage marker (`VOLUMEID/damaged`, cluster mode; the text says what was
/// found): stored by a takeover for a delete that found the bucket damaged and went on with the
/// prefix before it. A takeover to serve the volume refuses while it is there.
pub fn volume_damaged_key(volume: &VolumeId) -> String {
    format!("{volume}/damaged")
}

/// Prefix of every object of `volume`.
pub fn volume_prefix(volume: &VolumeId) -> String {
    format!("{volume}/")
}

/// Checks that a key is a relative path of safe segments (no `..`, no empty or absolute parts).
pub(crate) fn check_key(key: &str) -> Result<(), BackendError> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(BackendError::InvalidKey(key.chars().take(200).collect()))
    }
}

pub(crate) fn check_range(key: &str, range: &Range<u64>, len: u64) -> Result<(), BackendError> {
    if range.start > range.end || range.end > len {
        return Err(BackendError::BadRange {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            len,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every backend must show; each implementation runs it.
    use super::*;

    pub async fn check(b: &dyn Backend) {
        let key = "vol-0123456789abcdef0/chunks/0000000000000001";
        assert!(matches!(b.get(key).await, Err(BackendError::NotFound(_))));
        b.put(key, Bytes::from_static(b"hello world"))
            .await
            .unwrap();
        assert_eq!(&b.get(key).await.unwrap()[..], b"hello world");
        assert_eq!(&b.get_range(key, 6..11).await.unwrap()[..], b"world");
        assert_eq!(&b.get_range(key, 0..0).await.unwrap()[..], b"");
        assert!(matches!(
            b.get_range(key, 6..12).await,
            Err(BackendError::BadRange { .. })
        ));
        b.put(key, Bytes::from_static(b"replaced")).await.unwrap();
        assert_eq!(&b.get(key).await.unwrap()[..], b"replaced");
        let key2 = "vol-0123456789abcdef0/chunks/0000000000000002";
        b.put(key2, Bytes::from_static(b"2")).await.unwrap();
        b.put(
            "vol-1111111111111111a/chunks/0000000000000001",
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
        assert_eq!(
            b.list("vol-0123456789abcdef0/").await.unwrap(),
            vec![key.to_owned(), key2.to_owned()]
        );
        assert_eq!(
            b.list_after("vol-0123456789abcdef0/", key).await.unwrap(),
            vec![key2.to_owned()],
            "strictly after"
        );
        assert!(b
            .list_after("vol-0123456789abcdef0/", key2)
            .await
            .unwrap()
            .is_empty());
        b.delete(key).await.unwrap();
        b.delete(key).await.unwrap();
        assert!(matches!(b.get(key).await, Err(BackendError::NotFound(_))));
        assert_eq!(
            b.list("vol-0123456789abcdef0/").await.unwrap(),
            vec![key2.to_owned()]
        );
        // A conditional put stores once; later ones change nothing (their race is each
        // backend's own test).
        let fence = "vol-0123456789abcdef0/epoch/0000000000000001";
        assert!(b
            .put_if_absent(fence, Bytes::from_static(b"first"))
            .await
            .unwrap());
        assert!(!b
            .put_if_absent(fence, Bytes::from_static(b"second"))
            .await
            .unwrap());
        assert_eq!(&b.get(fence).await.unwrap()[..], b"first");
        b.delete(fence).await.unwrap();
        for bad in ["", "../x", "a//b", "/abs", "a/../../b", "a/b c"] {
            assert!(matches!(
                b.put(bad, Bytes::new()).await,
                Err(BackendError::InvalidKey(_))
            ));
        }
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn chunk_keys_follow_the_format() {
        let v = VolumeId::parse("vol-0123456789abcdef0").expect("id");
        assert_eq!(
            chunk_key(&v, 42),
            "vol-0123456789abcdef0/chunks/000000000000002a"
        );
        assert_eq!(chunk_key_of(v.number(), 42), chunk_key(&v, 42));
        assert_eq!(
            checkpoint_key(&v, 1),
            "vol-0123456789abcdef0/map/0000000000000001"
        );
    }
}

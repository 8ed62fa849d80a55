//! RocksDB key codecs (FORMAT.md, "RocksDB keys"): one-byte prefixes, ids, big-endian numbers.

use crate::ids::VolumeId;

/// Key prefixes.
pub(crate) const PREFIX_VOLUME: u8 = b'v';
pub(crate) const PREFIX_STATE: u8 = b's';
pub(crate) const PREFIX_MAP: u8 = b'M';
pub(crate) const PREFIX_CHUNK: u8 = b'c';
pub(crate) const PREFIX_SNAPSHOT: u8 = b'n';
pub(crate) const PREFIX_SNAP_MAP: u8 = b'P';
/// Cluster mode: a volume this node deleted, whose chunk stats it keeps (`d` VOL, no value).
pub(crate) const PREFIX_DELETED_HERE: u8 = b'd';
/// `prefix` + an id's ASCII bytes (VolumeId or SnapshotId).
pub(crate) fn id_key(prefix: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len() + 8);
    k.push(prefix);
    k.extend_from_slice(id.as_bytes());
    k
}

/// `prefix` + VolumeId.
pub(crate) fn vol_key(prefix: u8, vol: &VolumeId) -> Vec<u8> {
    id_key(prefix, vol.as_str())
}

/// `prefix` + VolumeId + u64 big-endian (sorts numerically).
pub(crate) fn vol_u64_key(prefix: u8, vol: &VolumeId, n: u64) -> Vec<u8> {
    let mut k = vol_key(prefix, vol);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The key of the map extent starting at block `start` under `prefix` (`M VOL` or `P SNAP`):
/// the prefix, then the bitwise NOT of `start` as u64 big-endian, so the keys of one map sort in
/// *descending* block order. The extent covering block `b` is then the first key at or after
/// `map_key(prefix, b)`: every lookup is a forward `Seek`, not a `SeekForPrev`, which costs
/// RocksDB a second search in every memtable and level (docs/design/map-key-order.md).
pub(crate) fn map_key(prefix: &[u8], start: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&(!start).to_be_bytes());
    k
}

/// The start block of map key `k` (the inverse of [`map_key`]); `None` if `k` is shorter than 8
/// bytes.
pub(crate) fn map_key_start(k: &[u8]) -> Option<u64> {
    let tail = k.len().checked_sub(8).map(|at| &k[at..])?;
    Some(!u64::from_be_bytes(tail.try_into().ok()?))
}

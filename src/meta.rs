//! The daemon's RocksDB: volume records, per-volume state, BlockLookup extents, chunk accounting.
//!
//! Key layout (FORMAT.md, "RocksDB keys"); `VOL` is the 21-byte ASCII VolumeId:
//! - `v` VOL → volume record (JSON, [`VolumeRecord`])
//! - `s` VOL → volume state ([`VolumeState`], 24 bytes)
//! - `M` VOL !start_block(u64 BE) → map extent (48 or 64 bytes, [`crate::lookup`]; keys in
//!   descending block order, see [`map_key`])
//! - `c` VOL object_id(u64 BE) → chunk stats (24 bytes, [`ChunkStats`])
//!
//! Every write that must survive a crash uses a synced `WriteBatch`.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, Cache, DBRecoveryMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::ids::{SnapshotId, VolumeId};
use crate::lookup::{BlockLookup, MapExtent};
use crate::mapobj::MapObjectEncoder;

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value does not decode.
    #[error("corrupt metadata under key {key}: {reason}")]
    Corrupt {
        /// Printable key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A blocking task failed.
    #[error("metadata task failed: {0}")]
    Task(String),
    /// Another process holds the metadata DB's lock: a daemon (or an offline tool) runs on
    /// this data directory.
    #[error(
        "metadata DB {dir} is in use by another process (is a daemon running on this data \
         directory? stop it first): {source}"
    )]
    Locked {
        /// The metadata directory.
        dir: std::path::PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The database was written by a newer vblock (its key layout is unknown here).
    #[error(
        "metadata key layout {found} is newer than this build's {supported}: refusing to open"
    )]
    UnsupportedLayout {
        /// Layout stored under the `F` key.
        found: u32,
        /// The newest layout this build reads.
        supported: u32,
    },
}

/// Key prefixes.
pub(crate) const PREFIX_VOLUME: u8 = b'v';
pub(crate) const PREFIX_STATE: u8 = b's';
pub(crate) const PREFIX_MAP: u8 = b'M';
pub(crate) const PREFIX_CHUNK: u8 = b'c';
pub(crate) const PREFIX_SNAPSHOT: u8 = b'n';
pub(crate) const PREFIX_SNAP_MAP: u8 = b'P';
/// Map keys of layout 1 (`m VOL start_block(BE)`, `p SNAP start_block(BE)`: ascending block
/// order), written before 2026-11-30; [`MetaStore::open`] moves them to layout 2.
const LEGACY_MAP_PREFIXES: [(u8, u8); 2] = [(b'm', PREFIX_MAP), (b'p', PREFIX_SNAP_MAP)];
/// Key of the database's key layout version (u32 LE). Absent: layout 1.
const LAYOUT_KEY: &[u8] = b"F";
/// The key layout this build writes: 2 since map keys sort in descending block order.
pub const KEY_LAYOUT: u32 = 2;
/// Entries moved per synced batch by the layout migration.
pub(crate) const MIGRATION_BATCH: usize = 10_000;

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
/// `map_key(prefix, b)`: every lookup is a forward `Seek`, which costs RocksDB about half of
/// what a `SeekForPrev` does (docs/BENCHMARKS.md, "Map keys in descending block order").
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

/// Write options of a synced write (durable when it returns).
fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// Brings the database to [`KEY_LAYOUT`]: refuses a newer layout, moves the map keys of layout 1
/// ([`migrate_map_keys`]), then records the layout (synced).
fn upgrade_layout(db: &DB) -> Result<(), MetaError> {
    let found = match db.get(LAYOUT_KEY)? {
        None => 1,
        Some(v) => u32::from_le_bytes(v.as_slice().try_into().map_err(|_| MetaError::Corrupt {
            key: "F".into(),
            reason: format!("layout version of {} bytes", v.len()),
        })?),
    };
    if found > KEY_LAYOUT {
        return Err(MetaError::UnsupportedLayout {
            found,
            supported: KEY_LAYOUT,
        });
    }
    if found == KEY_LAYOUT {
        return Ok(());
    }
    let moved = migrate_map_keys(db)?;
    db.put_opt(LAYOUT_KEY, KEY_LAYOUT.to_le_bytes(), &synced())?;
    tracing::info!(
        from = found,
        to = KEY_LAYOUT,
        map_extents_moved = moved,
        "metadata key layout upgraded (FORMAT.md, \"RocksDB keys\")"
    );
    Ok(())
}

/// Moves map extents stored under key layout 1 to layout 2 ([`map_key`]). Each entry moves in
/// one batch (put under the new key, delete the old one), batches are synced, so a crash leaves
/// every extent under exactly one key and the next open carries on. Returns the entries moved.
fn migrate_map_keys(db: &DB) -> Result<u64, MetaError> {
    let mut moved = 0u64;
    for (old, new) in LEGACY_MAP_PREFIXES {
        let mut from = vec![old];
        loop {
            let mut batch = WriteBatch::default();
            let mut n = 0;
            let mut it = db.raw_iterator();
            it.seek(&from);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if k.first() != Some(&old) || n == MIGRATION_BATCH {
                    break;
                }
                let corrupt = || MetaError::Corrupt {
                    key: String::from_utf8_lossy(k).into_owned(),
                    reason: "map key of layout 1 without a prefix and a block number".into(),
                };
                let body = k
                    .len()
                    .checked_sub(8)
                    .filter(|&b| b > 0)
                    .ok_or_else(corrupt)?;
                let start = u64::from_be_bytes(k[body..].try_into().map_err(|_| corrupt())?);
                let mut key = k[..body].to_vec();
                key[0] = new;
                batch.put(map_key(&key, start), v);
                batch.delete(k);
                n += 1;
                it.next();
            }
            it.status()?;
            // Where the next batch starts: the first key not moved yet (seeking from the prefix
            // again would step over every tombstone this migration left).
            let next = it
                .key()
                .filter(|k| k.first() == Some(&old))
                .map(<[u8]>::to_vec);
            drop(it);
            if n > 0 {
                db.write_opt(batch, &synced())?;
                moved += n as u64;
            }
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
    }
    Ok(moved)
}

/// Lifecycle state of a volume (EC2 `VolumeState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeStateName {
    /// Being created.
    Creating,
    /// Ready, not attached.
    Available,
    /// Attached or mounted.
    InUse,
    /// Being deleted.
    Deleting,
    /// Gone.
    Deleted,
    /// Failed.
    Error,
}

/// A tag (EC2 `Tag`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    /// Key.
    #[serde(rename = "Key")]
    pub key: String,
    /// Value.
    #[serde(rename = "Value")]
    pub value: String,
}

/// An attachment (EC2 `VolumeAttachment`), persisted with the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Instance id.
    pub instance_id: String,
    /// Device name, e.g. `/dev/sdf`.
    pub device: String,
    /// `attached` (persisted attachments are attached).
    pub state: String,
    /// RFC 3339.
    pub attach_time: String,
    /// EC2 `DeleteOnTermination`.
    pub delete_on_termination: bool,
}

/// Everything persisted about a volume besides its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Id.
    pub volume_id: VolumeId,
    /// Human name (optional, may be empty).
    #[serde(default)]
    pub name: String,
    /// Size in bytes (a multiple of 4096).
    pub size_bytes: u64,
    /// RFC 3339 creation time.
    pub create_time: String,
    /// Lifecycle state.
    pub state: VolumeStateName,
    /// EC2 `VolumeType` (default `gp3`).
    #[serde(default)]
    pub volume_type: String,
    /// EC2 `Iops`.
    #[serde(default)]
    pub iops: u32,
    /// EC2 `AvailabilityZone`.
    #[serde(default)]
    pub availability_zone: String,
    /// EC2 `SnapshotId` the volume was created from (empty if none).
    #[serde(default)]
    pub snapshot_id: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// EC2 `ClientToken` used to create it (idempotency).
    #[serde(default)]
    pub client_token: String,
    /// True while mounted (exported for a VM via `ebs.mount`).
    #[serde(default)]
    pub mounted: bool,
}

/// Lifecycle state of a snapshot (EC2 `SnapshotState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotStateName {
    /// Its map is frozen locally; the copy in the backend is being written.
    Pending,
    /// Durable in the backend.
    Completed,
    /// The backend copy could not be written.
    Error,
}

/// Everything persisted about a snapshot besides its map (`n SNAP`, and `SNAPID/snapshot.json`
/// in the backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Id.
    pub snapshot_id: SnapshotId,
    /// The volume it was taken of.
    pub volume_id: VolumeId,
    /// That volume's size in bytes at the time.
    pub volume_size_bytes: u64,
    /// Lifecycle state.
    pub state: SnapshotStateName,
    /// RFC 3339 time it was taken.
    pub start_time: String,
    /// Percent of the backend copy written (0..=100).
    pub progress: u8,
    /// EC2 `Description`.
    #[serde(default)]
    pub description: String,
    /// Every write of the volume up to this sequence number is in the snapshot; none after.
    pub seq: u64,
}

/// Per-volume engine state, written with every chunk commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeState {
    /// Every WAL record with `seq <= checkpoint` is in chunks and the map.
    pub checkpoint: u64,
    /// Next chunk object id to allocate.
    pub next_object_id: u64,
    /// Largest sequence number ever committed (never goes backwards).
    pub max_seq: u64,
}

impl VolumeState {
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.checkpoint.to_le_bytes());
        b[8..16].copy_from_slice(&self.next_object_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.max_seq.to_le_bytes());
        b
    }
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == 24).then(|| Self {
            checkpoint: u64_le(&b[0..8]),
            next_object_id: u64_le(&b[8..16]),
            max_seq: u64_le(&b[16..24]),
        })
    }
}

/// Per-chunk accounting: how much of a chunk is still referenced by the map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Data blocks stored in the chunk.
    pub data_blocks: u64,
    /// Of those, blocks the map still points at (live bytes = live_blocks * 4096).
    pub live_blocks: u64,
    /// Object size in bytes (compressed).
    pub stored_bytes: u64,
}

impl ChunkStats {
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[8..16].copy_from_slice(&self.live_blocks.to_le_bytes());
        b[16..24].copy_from_slice(&self.stored_bytes.to_le_bytes());
        b
    }
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == 24).then(|| Self {
            data_blocks: u64_le(&b[0..8]),
            live_blocks: u64_le(&b[8..16]),
            stored_bytes: u64_le(&b[16..24]),
        })
    }
}

pub(crate) fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Memory RocksDB holds, in bytes ([`MetaStore::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaMemory {
    /// Active and immutable memtables (bounded by the write buffer size x their number).
    pub memtables: u64,
    /// Index and filter blocks of open table files held outside the block cache.
    pub table_readers: u64,
    /// The block cache (bounded by `--meta-cache-size`), pinned entries included.
    pub block_cache: u64,
}

/// The open metadata database.
#[derive(Clone)]
pub struct MetaStore {
    db: Arc<DB>,
    /// The block cache (shared with RocksDB) and its capacity in bytes.
    cache: Arc<std::sync::Mutex<(Cache, u64)>>,
}

impl MetaStore {
    /// Opens (creating) the database in `dir` with a bounded block cache of `cache_bytes`
    /// (this cache is the bounded in-memory part of the BlockLookup). Map keys of an older
    /// layout are moved to the current one first ([`map_key`]; FORMAT.md, "RocksDB keys").
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, MetaError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        // Map extents and records are small: a 16 MiB memtable (RocksDB preallocates its log at
        // 1.1x this) and a 1 MiB manifest reservation keep a daemon's fixed footprint small.
        opts.set_write_buffer_size(16 << 20);
        opts.set_manifest_preallocation_size(1 << 20);
        let mut block = BlockBasedOptions::default();
        let cache = Cache::new_lru_cache(cache_bytes)?;
        block.set_block_cache(&cache);
        opts.set_block_based_table_factory(&block);
        // A record that fails its checksum in the middle of RocksDB's log fails the open (the
        // default, point-in-time recovery, would silently drop it and every later commit:
        // volumes and snapshots would vanish). Only an incomplete tail (a write cut off by a
        // crash, never acknowledged) is tolerated; a map commit lost that way is caught by the
        // WAL's trim mark or replayed from the WAL (FORMAT.md, "Trim mark").
        opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        let db = DB::open(&opts, dir).map_err(|e| {
            // RocksDB has no error kind of its own for a held LOCK file (an fcntl lock); its
            // text names the file: "While lock file: DIR/LOCK: Resource temporarily unavailable".
            if e.kind() == rocksdb::ErrorKind::IOError && e.as_ref().contains("lock file") {
                MetaError::Locked {
                    dir: dir.to_owned(),
                    source: e,
                }
            } else {
                MetaError::Rocks(e)
            }
        })?;
        upgrade_layout(&db)?;
        Ok(Self {
            db: Arc::new(db),
            cache: Arc::new(std::sync::Mutex::new((cache, cache_bytes as u64))),
        })
    }

    /// The block cache's capacity in bytes: the `cache_bytes` it was opened with unless
    /// [`MetaStore::set_block_cache_capacity`] changed it.
    pub fn block_cache_capacity(&self) -> u64 {
        self.cache.lock().map_or(0, |c| c.1)
    }

    /// Sets the block cache's capacity in bytes (at least 1 MiB); RocksDB evicts unpinned
    /// blocks above it at once (`Cache::SetCapacity`). Lookups of evicted blocks read the table
    /// files again. The daemon's memory target uses it (cli/src/memory.rs).
    pub fn set_block_cache_capacity(&self, bytes: u64) {
        let bytes = bytes.max(1 << 20);
        if let Ok(mut c) = self.cache.lock() {
            c.0.set_capacity(usize::try_from(bytes).unwrap_or(usize::MAX));
            c.1 = bytes;
        }
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// Writes the memtable to table files (on clean shutdown: the next open replays no RocksDB
    /// log). Blocking.
    pub fn flush(&self) -> Result<(), MetaError> {
        self.db.flush()?;
        Ok(())
    }

    /// RocksDB's memory in bytes, by kind (RocksDB properties `rocksdb.cur-size-all-mem-tables`,
    /// `rocksdb.estimate-table-readers-mem`, `rocksdb.block-cache-usage`; a property RocksDB
    /// cannot report reads as 0). Blocking (takes RocksDB's locks).
    pub fn memory(&self) -> MetaMemory {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        MetaMemory {
            memtables: prop("rocksdb.cur-size-all-mem-tables"),
            table_readers: prop("rocksdb.estimate-table-readers-mem"),
            block_cache: prop("rocksdb.block-cache-usage"),
        }
    }

    /// Writes a batch durably (WAL of RocksDB synced).
    pub(crate) fn write_sync(&self, batch: WriteBatch) -> Result<(), MetaError> {
        self.db.write_opt(batch, &synced())?;
        Ok(())
    }

    /// Stores a volume record durably.
    pub fn put_volume(&self, rec: &VolumeRecord) -> Result<(), MetaError> {
        let value = serde_json::to_vec(rec).map_err(|e| MetaError::Corrupt {
            key: rec.volume_id.to_string(),
            reason: e.to_string(),
        })?;
        let mut batch = WriteBatch::default();
        batch.put(vol_key(PREFIX_VOLUME, &rec.volume_id), value);
        self.write_sync(batch)
    }

    /// The key and value of `rec` (to put in a larger batch).
    pub(crate) fn volume_entry(&self, rec: &VolumeRecord) -> Result<(Vec<u8>, Vec<u8>), MetaError> {
        let value = serde_json::to_vec(rec).map_err(|e| MetaError::Corrupt {
            key: rec.volume_id.to_string(),
            reason: e.to_string(),
        })?;
        Ok((vol_key(PREFIX_VOLUME, &rec.volume_id), value))
    }

    /// The record of `vol`, if it exists.
    pub fn get_volume(&self, vol: &VolumeId) -> Result<Option<VolumeRecord>, MetaError> {
        self.get_json(&vol_key(PREFIX_VOLUME, vol))
    }

    /// The JSON record under `key`, if any.
    fn get_json<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, MetaError> {
        match self.db.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| MetaError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Every JSON record under the one-byte `prefix`, in key order.
    fn list_json<T: serde::de::DeserializeOwned>(&self, prefix: u8) -> Result<Vec<T>, MetaError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator([prefix]) {
            let (k, v) = item?;
            if k.first() != Some(&prefix) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(|e| MetaError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Every volume record, ordered by id.
    pub fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        self.list_json(PREFIX_VOLUME)
    }

    /// The engine state of `vol` (zeros for a new volume).
    pub fn volume_state(&self, vol: &VolumeId) -> Result<VolumeState, MetaError> {
        match self.db.get(vol_key(PREFIX_STATE, vol))? {
            None => Ok(VolumeState::default()),
            Some(v) => VolumeState::decode(&v).ok_or_else(|| MetaError::Corrupt {
                key: format!("s{vol}"),
                reason: format!("{} bytes, expected 24", v.len()),
            }),
        }
    }

    /// Accounting of every chunk of `vol`, by object id.
    pub fn chunk_stats(&self, vol: &VolumeId) -> Result<Vec<(u64, ChunkStats)>, MetaError> {
        let prefix = vol_key(PREFIX_CHUNK, vol);
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(&prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(decode_stats_entry(&prefix, &k, &v)?);
        }
        Ok(out)
    }

    /// Removes `vol`'s record, state and map in one synced batch. Its chunk stats stay, with no
    /// live blocks: the objects belong to garbage collection now, which deletes each once no
    /// snapshot or clone map references it.
    pub fn delete_volume(&self, vol: &VolumeId) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        batch.delete(vol_key(PREFIX_VOLUME, vol));
        batch.delete(vol_key(PREFIX_STATE, vol));
        delete_prefix(&mut batch, &vol_key(PREFIX_MAP, vol));
        for (id, mut st) in self.chunk_stats(vol)? {
            st.live_blocks = 0;
            batch.put(vol_u64_key(PREFIX_CHUNK, vol, id), st.encode());
        }
        self.write_sync(batch)
    }

    /// Stores a snapshot record durably.
    pub fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        batch.put(
            id_key(PREFIX_SNAPSHOT, rec.snapshot_id.as_str()),
            snapshot_json(rec)?,
        );
        self.write_sync(batch)
    }

    /// The record of snapshot `id`, if it exists.
    pub fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>, MetaError> {
        self.get_json(&id_key(PREFIX_SNAPSHOT, id.as_str()))
    }

    /// Every snapshot record, ordered by id.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, MetaError> {
        self.list_json(PREFIX_SNAPSHOT)
    }

    /// Freezes the map of `rec.volume_id` as snapshot `rec` (record and map copy in one synced
    /// batch). The caller holds the volume's commit lock, so the map is exactly the volume's
    /// contents up to `rec.seq`.
    pub fn capture_snapshot(&self, rec: &SnapshotRecord) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        let from = vol_key(PREFIX_MAP, &rec.volume_id);
        let to = id_key(PREFIX_SNAP_MAP, rec.snapshot_id.as_str());
        // The snapshot map's default owner is the volume, so values copy unchanged.
        for item in self.db.prefix_iterator(&from) {
            let (k, v) = item?;
            if !k.starts_with(&from) {
                break;
            }
            let mut key = to.clone();
            key.extend_from_slice(&k[from.len()..]);
            batch.put(key, v);
        }
        batch.put(
            id_key(PREFIX_SNAPSHOT, rec.snapshot_id.as_str()),
            snapshot_json(rec)?,
        );
        self.write_sync(batch)
    }

    /// Removes snapshot `id`'s record and map in one synced batch.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        batch.delete(id_key(PREFIX_SNAPSHOT, id.as_str()));
        delete_prefix(&mut batch, &id_key(PREFIX_SNAP_MAP, id.as_str()));
        self.write_sync(batch)
    }

    /// `lookup`'s map as a map object (FORMAT.md, "Map object"), consistent (one RocksDB
    /// snapshot) and encoded as it is read, so the map is never in memory but as the object's
    /// bytes. `snapshot_seq` `None`: a volume checkpoint — seq, next object id and the chunk
    /// stats come from the volume's state. `Some(seq)`: a snapshot's map at `seq` (its record
    /// has the rest; no objects are listed). Returns the bytes and the next object id written.
    /// Blocking (RocksDB): call from a blocking thread.
    pub fn encode_map_object(
        &self,
        lookup: &BlockLookup,
        snapshot_seq: Option<u64>,
    ) -> Result<(Vec<u8>, u64), MetaError> {
        self.encode_map_object_if(lookup, snapshot_seq, false)
            .map(|o| o.unwrap_or_default())
    }

    /// [`MetaStore::encode_map_object`]; with `whole_memtables`, `None` instead of a volume's
    /// map while a memtable split into several chunks is half committed (state `max_seq` above
    /// its `checkpoint`): a checkpoint then would hold part of that memtable's writes, which a
    /// disaster recovery could not complete.
    pub fn encode_map_object_if(
        &self,
        lookup: &BlockLookup,
        snapshot_seq: Option<u64>,
        whole_memtables: bool,
    ) -> Result<Option<(Vec<u8>, u64)>, MetaError> {
        let snap = self.db.snapshot();
        let (seq, next_object_id, objects) = match snapshot_seq {
            Some(seq) => (seq, 0, Vec::new()),
            None => {
                let vol = lookup.volume();
                let state = match snap.get(vol_key(PREFIX_STATE, vol))? {
                    None => VolumeState::default(),
                    Some(v) => VolumeState::decode(&v).ok_or_else(|| MetaError::Corrupt {
                        key: format!("s{vol}"),
                        reason: "bad volume state".into(),
                    })?,
                };
                if whole_memtables && state.max_seq > state.checkpoint {
                    return Ok(None);
                }
                let cprefix = vol_key(PREFIX_CHUNK, vol);
                let mut objects = Vec::new();
                for item in snap.iterator(rocksdb::IteratorMode::From(
                    &cprefix,
                    rocksdb::Direction::Forward,
                )) {
                    let (k, v) = item?;
                    if !k.starts_with(&cprefix) {
                        break;
                    }
                    objects.push(decode_stats_entry(&cprefix, &k, &v)?);
                }
                (state.checkpoint, state.next_object_id, objects)
            }
        };
        let mut enc = MapObjectEncoder::new(lookup.default_owner(), seq, next_object_id, &objects);
        lookup.for_each_ascending_at(&snap, |e| enc.push(&e))?;
        Ok(Some((enc.finish(), next_object_id)))
    }

    /// Replaces `lookup`'s map with `extents` and, for a volume (`state` given), its chunk stats
    /// with `objects` and its state — one synced batch, together with `extra` puts.
    pub fn install_map(
        &self,
        lookup: &BlockLookup,
        extents: &[MapExtent],
        volume: Option<(VolumeState, &[(u64, ChunkStats)])>,
        extra: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        delete_prefix(&mut batch, lookup.key_prefix());
        // In key order (descending blocks; `extents` are ascending), as the memtable likes.
        for e in extents.iter().rev() {
            batch.put(lookup.key(e.start), e.encode(lookup.default_owner()));
        }
        if let Some((state, objects)) = volume {
            let vol = lookup.volume();
            delete_prefix(&mut batch, &vol_key(PREFIX_CHUNK, vol));
            for (id, st) in objects {
                batch.put(vol_u64_key(PREFIX_CHUNK, vol, *id), st.encode());
            }
            batch.put(vol_key(PREFIX_STATE, vol), state.encode());
        }
        for (k, v) in extra {
            batch.put(k, v);
        }
        self.write_sync(batch)
    }

    /// Chunk objects no volume map uses any more (`live_blocks == 0`), of every volume,
    /// deleted or not: the candidates of garbage collection.
    pub fn dead_chunks(&self) -> Result<Vec<(VolumeId, u64, ChunkStats)>, MetaError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator([PREFIX_CHUNK]) {
            let (k, v) = item?;
            if k.first() != Some(&PREFIX_CHUNK) {
                break;
            }
            let bad = || MetaError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "bad chunk key".into(),
            };
            let vol = std::str::from_utf8(&k[1..k.len().saturating_sub(8)])
                .ok()
                .and_then(|s| VolumeId::parse(s).ok())
                .ok_or_else(bad)?;
            let (id, st) = decode_stats_entry(&vol_key(PREFIX_CHUNK, &vol), &k, &v)?;
            if st.live_blocks == 0 {
                out.push((vol, id, st));
            }
        }
        Ok(out)
    }

    /// Removes `candidates` that some map — a volume's or a snapshot's — still references.
    pub fn unmark_referenced(
        &self,
        candidates: &mut std::collections::HashSet<(u128, u64)>,
    ) -> Result<(), MetaError> {
        if candidates.is_empty() {
            return Ok(());
        }
        let snapshots = self.list_snapshots()?;
        let mut maps: Vec<BlockLookup> = self
            .list_volumes()?
            .into_iter()
            .map(|r| BlockLookup::new(self.clone(), r.volume_id))
            .collect();
        maps.extend(
            snapshots
                .into_iter()
                .map(|s| BlockLookup::snapshot(self.clone(), &s.snapshot_id, s.volume_id)),
        );
        // Nothing may copy references between the listing above and the walks below (a
        // snapshot of a clone would carry a reference out of a map not yet walked):
        // Engine::create_snapshot holds the GC lock, as this pass does.
        fail::fail_point!("gc-mark-listed");
        for map in maps {
            map.for_each(|e| {
                if let crate::lookup::Target::Data(f) = e.target {
                    candidates.remove(&(f.owner, f.object_id));
                }
            })?;
        }
        Ok(())
    }

    /// Removes the stats of chunk `id` of `vol` (its object is gone).
    pub fn forget_chunks(&self, chunks: &[(VolumeId, u64)]) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        for (vol, id) in chunks {
            batch.delete(vol_u64_key(PREFIX_CHUNK, vol, *id));
        }
        self.write_sync(batch)
    }
}

/// Deletes every key that starts with `prefix` (all our keys are ASCII, so `prefix` + 0xff... ends
/// the range).
fn delete_prefix(batch: &mut WriteBatch, prefix: &[u8]) {
    let mut to = prefix.to_vec();
    to.extend_from_slice(&[0xff; 9]);
    batch.delete_range(prefix.to_vec(), to);
}

fn snapshot_json(rec: &SnapshotRecord) -> Result<Vec<u8>, MetaError> {
    serde_json::to_vec(rec).map_err(|e| MetaError::Corrupt {
        key: rec.snapshot_id.to_string(),
        reason: e.to_string(),
    })
}

/// `(object_id, stats)` of a `c VOL id` entry.
fn decode_stats_entry(prefix: &[u8], k: &[u8], v: &[u8]) -> Result<(u64, ChunkStats), MetaError> {
    let bad = || MetaError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        reason: "bad chunk stats".into(),
    };
    let id = u64::from_be_bytes(
        k.get(prefix.len()..)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    Ok((id, ChunkStats::decode(v).ok_or_else(bad)?))
}

/// Runs blocking metadata work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MetaError> + Send + 'static,
) -> Result<T, MetaError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MetaError::Task(e.to_string()))?
}

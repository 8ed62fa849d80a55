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

use crate::codec::u64_at;
use crate::ids::{SnapshotId, VolumeId};
use crate::records::{SnapshotRecord, VolumeRecord};

mod keys;
pub(crate) mod migrate;

pub(crate) use keys::*;
use migrate::upgrade_layout;
pub use migrate::KEY_LAYOUT;

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

/// Write options of a synced write (durable when it returns).
pub(crate) fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
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
            checkpoint: u64_at(b, 0),
            next_object_id: u64_at(b, 8),
            max_seq: u64_at(b, 16),
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
            data_blocks: u64_at(b, 0),
            live_blocks: u64_at(b, 8),
            stored_bytes: u64_at(b, 16),
        })
    }
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
    /// The volumes with a `d` mark ([`MetaStore::deleted_here`]), as stored.
    deleted_here: Arc<std::sync::Mutex<std::collections::HashSet<VolumeId>>>,
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
        let meta = Self {
            db: Arc::new(db),
            cache: Arc::new(std::sync::Mutex::new((cache, cache_bytes as u64))),
            deleted_here: Arc::default(),
        };
        meta.load_deleted_here()?;
        Ok(meta)
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
        // A volume with a record here is not one this node deleted (a takeover of a volume a
        // failed delete left in the catalog).
        let marked = self.deleted_here(&rec.volume_id);
        if marked {
            batch.delete(vol_key(PREFIX_DELETED_HERE, &rec.volume_id));
        }
        self.write_sync(batch)?;
        if marked {
            self.marks().remove(&rec.volume_id);
        }
        Ok(())
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

    /// Removes `vol`'s record alone (synced): the volume does not open, its map, state and
    /// chunk stats stay (a takeover rebuilds them).
    pub fn forget_volume_record(&self, vol: &VolumeId) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        batch.delete(vol_key(PREFIX_VOLUME, vol));
        self.write_sync(batch)
    }

    /// Stores `vol`'s engine state alone (synced).
    pub fn put_volume_state(&self, vol: &VolumeId, state: VolumeState) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        batch.put(vol_key(PREFIX_STATE, vol), state.encode());
        self.write_sync(batch)
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
    /// snapshot or clone map references it. With `mark` (cluster mode) the same batch records
    /// that this node deleted it ([`MetaStore::deleted_here`]): only this node has those
    /// stats, so only its garbage collection can ever delete the objects, across restarts too.
    pub fn delete_volume(&self, vol: &VolumeId, mark: bool) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        if mark {
            batch.put(vol_key(PREFIX_DELETED_HERE, vol), []);
        }
        batch.delete(vol_key(PREFIX_VOLUME, vol));
        batch.delete(vol_key(PREFIX_STATE, vol));
        delete_prefix(&mut batch, &vol_key(PREFIX_MAP, vol));
        for (id, mut st) in self.chunk_stats(vol)? {
            st.live_blocks = 0;
            batch.put(vol_u64_key(PREFIX_CHUNK, vol, id), st.encode());
        }
        self.write_sync(batch)?;
        if mark {
            self.marks().insert(vol.clone());
        }
        Ok(())
    }

    /// Cluster mode: whether this node deleted volume `vol` ([`MetaStore::delete_volume`] with
    /// a mark) and has not had a record of it since: its garbage collection then collects the
    /// volume's chunks that are left (those snapshots or clones shared) without its lease.
    pub fn deleted_here(&self, vol: &VolumeId) -> bool {
        self.marks().contains(vol)
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<VolumeId>> {
        self.deleted_here
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the `d` marks of volumes that still have chunk stats; removes (synced) those of
    /// volumes without any, and any mark whose key is not a VolumeId (logged).
    pub(crate) fn load_deleted_here(&self) -> Result<(), MetaError> {
        let mut marked = Vec::new();
        let mut batch = WriteBatch::default();
        for item in self.db.prefix_iterator([PREFIX_DELETED_HERE]) {
            let (k, _) = item?;
            if k.first() != Some(&PREFIX_DELETED_HERE) {
                break;
            }
            match std::str::from_utf8(&k[1..])
                .ok()
                .and_then(|s| s.parse::<VolumeId>().ok())
            {
                Some(id) => marked.push(id),
                None => {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), "removing a deleted-here mark that names no volume");
                    batch.delete(&k);
                }
            }
        }
        let mut kept = std::collections::HashSet::new();
        for id in marked {
            if self.chunk_stats(&id)?.is_empty() {
                batch.delete(vol_key(PREFIX_DELETED_HERE, &id));
            } else {
                kept.insert(id);
            }
        }
        if !batch.is_empty() {
            self.write_sync(batch)?;
        }
        *self.marks() = kept;
        Ok(())
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
}

/// Deletes every key that starts with `prefix` (all our keys are ASCII, so `prefix` + 0xff... ends
/// the range).
pub(crate) fn delete_prefix(batch: &mut WriteBatch, prefix: &[u8]) {
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
pub(crate) fn decode_stats_entry(
    prefix: &[u8],
    k: &[u8],
    v: &[u8],
) -> Result<(u64, ChunkStats), MetaError> {
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

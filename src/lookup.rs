//! BlockLookup: the extent map from blocks to where their newest version lives, in RocksDB.
//!
//! One entry per extent, keyed `M VOL !start_block(BE)` (a snapshot's frozen map:
//! `P SNAP !start_block(BE)`; [`crate::meta::map_key`]: descending block order, so every lookup
//! is a forward seek), non-overlapping. Value v1, 48 bytes LE, for frames in objects of the
//! map's own volume (for a snapshot: its source volume); v2, 64 bytes, adds the owning VolumeId's
//! number (u128 LE at 48..64) for frames in another volume's objects (clones)
//! (FORMAT.md, "Map extent"):
//! `version u8 = 1 | kind u8 (1 data, 2 zero) | encoding u8 (0 zstd, 1 raw) | reserved u8 |
//!  block_count u32 | seq u64 |
//!  object_id u64 | frame_first_block u64 | frame_offset u32 | frame_len u32 | frame_crc u32 |
//!  frame_blocks u32`
//!
//! Block `b` of a data extent is at byte `(b - frame_first_block) * 4096` of the decompressed
//! frame. Newer sequence numbers win: committing an extent cuts older ones and is itself cut
//! around newer ones. RocksDB is the source of truth; its block cache is the bounded in-memory
//! part, so the map may be far larger than RAM.

use std::collections::{BTreeMap, HashMap};

use rocksdb::{ReadOptions, WriteBatch};

use crate::chunk::{ChunkExtent, ExtentKind, FrameEncoding};
use crate::codec::{u128_at, u32_at, u64_at};
use crate::ids::{SnapshotId, VolumeId};
use crate::meta::{
    id_key, map_key, map_key_start, vol_key, vol_u64_key, ChunkStats, MetaError, MetaStore,
    VolumeState, PREFIX_CHUNK, PREFIX_MAP, PREFIX_SNAP_MAP, PREFIX_STATE,
};

/// Version byte of map values.
pub const MAP_VALUE_VERSION: u8 = 1;
/// Version byte of map values that name the owning volume (64 bytes).
pub const MAP_VALUE_VERSION_OWNED: u8 = 2;
/// Length of a v2 map value in bytes.
pub const MAP_VALUE_OWNED_LEN: usize = 64;
/// Map value length in bytes.
pub const MAP_VALUE_LEN: usize = 48;

/// Where a data extent's bytes are: a zstd frame inside a chunk object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameRef {
    /// Number of the VolumeId whose objects hold the frame ([`VolumeId::number`]).
    pub owner: u128,
    /// Chunk object id (key via [`crate::backend::chunk_key`]).
    pub object_id: u64,
    /// Block number of the frame's first block.
    pub first_block: u64,
    /// Blocks in the frame.
    pub blocks: u32,
    /// Byte offset of the frame in the object.
    pub offset: u32,
    /// Compressed length in bytes.
    pub len: u32,
    /// CRC32 of the stored bytes.
    pub crc: u32,
    /// zstd or raw.
    pub encoding: FrameEncoding,
}

/// What an extent's blocks hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Zeros (trimmed, write-zeroes or all-zero data).
    Zero,
    /// Data in a chunk frame.
    Data(FrameRef),
}

/// One map entry: blocks `start..start + count` hold `target`, written at `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub count: u64,
    /// Sequence number of the write.
    pub seq: u64,
    /// Data location or zero.
    pub target: Target,
}

impl MapExtent {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.start + self.count
    }

    /// The part `from..to` (must lie inside the extent).
    pub fn slice(&self, from: u64, to: u64) -> Self {
        debug_assert!(self.start <= from && from < to && to <= self.end());
        Self {
            start: from,
            count: to - from,
            ..*self
        }
    }

    pub(crate) fn data_blocks(&self) -> u64 {
        match self.target {
            Target::Data(_) => self.count,
            Target::Zero => 0,
        }
    }

    /// Encodes the value (the key holds `start`).
    pub fn encode(&self, default_owner: u128) -> Vec<u8> {
        let owner = match self.target {
            Target::Data(f) if f.owner != default_owner => Some(f.owner),
            _ => None,
        };
        let mut b = vec![
            0u8;
            if owner.is_some() {
                MAP_VALUE_OWNED_LEN
            } else {
                MAP_VALUE_LEN
            }
        ];
        b[0] = MAP_VALUE_VERSION;
        if let Some(owner) = owner {
            b[0] = MAP_VALUE_VERSION_OWNED;
            b[48..64].copy_from_slice(&owner.to_le_bytes());
        }
        let f = match self.target {
            Target::Zero => {
                b[1] = ExtentKind::Zero as u8;
                FrameRef {
                    owner: 0,
                    object_id: 0,
                    first_block: 0,
                    blocks: 0,
                    offset: 0,
                    len: 0,
                    crc: 0,
                    encoding: FrameEncoding::Zstd,
                }
            }
            Target::Data(f) => {
                b[1] = ExtentKind::Data as u8;
                f
            }
        };
        b[2] = f.encoding as u8;
        b[4..8].copy_from_slice(&(self.count as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&f.object_id.to_le_bytes());
        b[24..32].copy_from_slice(&f.first_block.to_le_bytes());
        b[32..36].copy_from_slice(&f.offset.to_le_bytes());
        b[36..40].copy_from_slice(&f.len.to_le_bytes());
        b[40..44].copy_from_slice(&f.crc.to_le_bytes());
        b[44..48].copy_from_slice(&f.blocks.to_le_bytes());
        b
    }

    /// Decodes a value stored under block `start`.
    pub fn decode(start: u64, b: &[u8], default_owner: u128) -> Option<Self> {
        let owner = match (b.first(), b.len()) {
            (Some(&MAP_VALUE_VERSION), MAP_VALUE_LEN) => default_owner,
            (Some(&MAP_VALUE_VERSION_OWNED), MAP_VALUE_OWNED_LEN) => u128_at(b, 48),
            _ => return None,
        };
        let count = u64::from(u32_at(b, 4));
        let target = match b[1] {
            2 => Target::Zero,
            1 => Target::Data(FrameRef {
                owner,
                object_id: u64_at(b, 16),
                first_block: u64_at(b, 24),
                offset: u32_at(b, 32),
                len: u32_at(b, 36),
                crc: u32_at(b, 40),
                blocks: u32_at(b, 44),
                encoding: FrameEncoding::from_u8(b[2])?,
            }),
            _ => return None,
        };
        if count == 0 {
            return None;
        }
        if let Target::Data(f) = target {
            let frame_end = f.first_block + u64::from(f.blocks);
            if start < f.first_block || start + count > frame_end {
                return None;
            }
        }
        Some(Self {
            start,
            count,
            seq: u64_at(b, 8),
            target,
        })
    }

    /// The map extent for a chunk index entry of object `object_id`.
    pub fn from_chunk(owner: u128, object_id: u64, e: &ChunkExtent) -> Self {
        let target = match e.kind {
            ExtentKind::Zero => Target::Zero,
            ExtentKind::Data => Target::Data(FrameRef {
                owner,
                object_id,
                first_block: e.start_block,
                blocks: e.block_count,
                offset: e.frame_offset,
                len: e.frame_len,
                crc: e.frame_crc,
                encoding: e.encoding,
            }),
        };
        Self {
            start: e.start_block,
            count: u64::from(e.block_count),
            seq: e.seq,
            target,
        }
    }
}

/// A chunk ready to be committed to the map.
#[derive(Debug, Clone)]
pub struct ChunkCommit {
    /// Object id of the chunk (already durable in the backend).
    pub object_id: u64,
    /// Its extents, sorted and non-overlapping.
    pub extents: Vec<MapExtent>,
    /// Object size in bytes.
    pub stored_bytes: u64,
}

/// One map: a volume's (`M VOL`, read-write) or a snapshot's frozen copy (`P SNAP`, read-only).
#[derive(Clone)]
pub struct BlockLookup {
    meta: MetaStore,
    /// The volume whose chunk stats commits update (for a snapshot map: its source volume).
    volume: VolumeId,
    /// Key prefix of the map's entries (`M VOL` or `P SNAP`).
    prefix: Vec<u8>,
    /// Owner of frames in v1 values: `volume`'s number.
    owner: u128,
}

impl BlockLookup {
    /// The map of `volume` in `meta`.
    pub fn new(meta: MetaStore, volume: VolumeId) -> Self {
        Self {
            prefix: vol_key(PREFIX_MAP, &volume),
            owner: volume.number(),
            meta,
            volume,
        }
    }

    /// The frozen map of snapshot `snap`, taken of volume `source`. Read it only: committing to
    /// it is a bug.
    pub fn snapshot(meta: MetaStore, snap: &SnapshotId, source: VolumeId) -> Self {
        Self {
            prefix: id_key(PREFIX_SNAP_MAP, snap.as_str()),
            owner: source.number(),
            meta,
            volume: source,
        }
    }

    /// The volume whose chunk stats this map's commits update.
    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    /// The owner number v1 values stand for (the map's volume or snapshot source).
    pub fn default_owner(&self) -> u128 {
        self.owner
    }

    /// Key prefix of this map's entries.
    pub(crate) fn key_prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The key of the extent starting at `start` ([`map_key`]: descending block order).
    pub(crate) fn key(&self, start: u64) -> Vec<u8> {
        map_key(&self.prefix, start)
    }

    /// Every extent of the map, in block order.
    /// Blocking (RocksDB): call from a blocking thread.
    pub fn all(&self) -> Result<Vec<MapExtent>, MetaError> {
        self.overlapping(0, u64::MAX)
    }

    /// Extents intersecting any of the block ranges `ranges` (each `(start, end)`, sorted by
    /// start, not overlapping), unclipped, in block order, each once (an extent spanning two
    /// ranges too). One iterator and one seek per range: the cost follows the ranges' extents,
    /// not the map's size. Blocking (RocksDB): call from a blocking thread.
    pub fn overlapping_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<MapExtent>, MetaError> {
        let mut out = Vec::new();
        let Some(top) = ranges.iter().map(|&(_, e)| e).max() else {
            return Ok(out);
        };
        let mut it = self.iterator(top.max(1));
        for &(start, end) in ranges.iter().filter(|(s, e)| s < e) {
            self.scan(&mut it, start, end, &mut out)?;
        }
        out.dedup_by_key(|e| e.start);
        Ok(out)
    }

    /// Extents intersecting blocks `start..end`, sorted, clipped to the range.
    /// Blocking (RocksDB): call from a blocking thread.
    pub fn lookup(&self, start: u64, end: u64) -> Result<Vec<MapExtent>, MetaError> {
        Ok(self
            .overlapping(start, end)?
            .into_iter()
            .map(|e| e.slice(e.start.max(start), e.end().min(end)))
            .collect())
    }

    /// Extents intersecting `start..end`, unclipped.
    fn overlapping(&self, start: u64, end: u64) -> Result<Vec<MapExtent>, MetaError> {
        let mut out = Vec::new();
        if start < end {
            self.scan(&mut self.iterator(end), start, end, &mut out)?;
        }
        Ok(out)
    }

    /// A raw iterator over this map's keys of extents starting below block `end` (`end` ≥ 1).
    /// Keys sort in descending block order, so `next` steps to lower blocks.
    fn iterator(&self, end: u64) -> rocksdb::DBRawIterator<'_> {
        self.meta.db().raw_iterator_opt(self.bounds(end))
    }

    /// Read options bounding an iterator to this map's keys of extents starting below `end`.
    fn bounds(&self, end: u64) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(self.key(end.saturating_sub(1)));
        // Just above the key of block 0, the map's last key.
        let mut upper = self.key(0);
        upper.push(0);
        ro.set_iterate_upper_bound(upper);
        ro
    }

    /// Calls `f` with every extent of the map, in descending block order (the keys' order),
    /// one at a time: the map is never held in memory. Blocking (RocksDB): call from a blocking
    /// thread.
    pub fn for_each(&self, f: impl FnMut(MapExtent)) -> Result<(), MetaError> {
        self.walk(self.iterator(u64::MAX), false, f)
    }

    /// [`BlockLookup::for_each`] as of RocksDB snapshot `snap`, in ascending block order.
    pub(crate) fn for_each_ascending_at(
        &self,
        snap: &rocksdb::Snapshot<'_>,
        f: impl FnMut(MapExtent),
    ) -> Result<(), MetaError> {
        self.walk(snap.raw_iterator_opt(self.bounds(u64::MAX)), true, f)
    }

    /// Calls `f` with every extent `it` (bounded to this map's keys) passes: in key order
    /// (descending blocks), or backwards (`ascending`).
    fn walk(
        &self,
        mut it: rocksdb::DBRawIterator<'_>,
        ascending: bool,
        mut f: impl FnMut(MapExtent),
    ) -> Result<(), MetaError> {
        if ascending {
            it.seek_to_last();
        } else {
            it.seek_to_first();
        }
        while it.valid() {
            if let Some(e) = self.decode_entry(it.key(), it.value())? {
                f(e);
            }
            if ascending {
                it.prev();
            } else {
                it.next();
            }
        }
        it.status()?;
        Ok(())
    }

    /// Appends the extents intersecting `start..end` (unclipped, sorted) to `out`, using `it`
    /// (from [`BlockLookup::iterator`] with a bound of at least `end`; one iterator serves many
    /// scans, as creating one costs more than a seek). One forward seek to the last extent
    /// starting below `end`, then towards lower blocks to the one at or before `start`.
    fn scan(
        &self,
        it: &mut rocksdb::DBRawIterator<'_>,
        start: u64,
        end: u64,
        out: &mut Vec<MapExtent>,
    ) -> Result<(), MetaError> {
        let first_new = out.len();
        it.seek(self.key(end - 1));
        while it.valid() {
            if let Some(e) = self.decode_entry(it.key(), it.value())? {
                let first = e.start <= start;
                if e.end() > start {
                    out.push(e);
                }
                if first {
                    break;
                }
            }
            it.next();
        }
        it.status()?;
        out[first_new..].reverse();
        Ok(())
    }

    /// A map entry at the iterator's position; `None` for a key of another shape.
    fn decode_entry(
        &self,
        k: Option<&[u8]>,
        v: Option<&[u8]>,
    ) -> Result<Option<MapExtent>, MetaError> {
        match (k, v) {
            (Some(k), Some(v)) if k.len() == self.prefix.len() + 8 => self.decode(k, v).map(Some),
            _ => Ok(None),
        }
    }

    fn decode(&self, k: &[u8], v: &[u8]) -> Result<MapExtent, MetaError> {
        let corrupt = || MetaError::Corrupt {
            key: String::from_utf8_lossy(k).into_owned(),
            reason: "bad map extent".into(),
        };
        let start = map_key_start(k).ok_or_else(corrupt)?;
        MapExtent::decode(start, v, self.owner).ok_or_else(corrupt)
    }

    /// Commits a chunk: overlays its extents (newest seq wins), updates chunk accounting and
    /// the volume state (checkpoint, next object id), all in one synced `WriteBatch`.
    /// Must not run concurrently with another commit of the same volume (the flusher is the
    /// only writer). Blocking (RocksDB): call from a blocking thread.
    pub fn commit_chunk(&self, commit: &ChunkCommit, state: VolumeState) -> Result<(), MetaError> {
        let olds = self.touched(&commit.extents)?;
        let winners = winners(&olds, &commit.extents);
        let (mut changes, live_delta) = self.cut(&olds, &winners);
        let mut new_live = 0u64;
        for w in winners.values() {
            changes.push((w.start, Some(w.encode(self.owner))));
            new_live += w.data_blocks();
        }
        // In key order (descending blocks): RocksDB's memtable inserts a batch's keys with a
        // splice kept from the previous insert, cheap when each key follows the last.
        changes.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        let mut batch = WriteBatch::default();
        for (start, value) in changes {
            match value {
                Some(v) => batch.put(self.key(start), v),
                None => batch.delete(self.key(start)),
            }
        }
        let stats_key = |id| vol_u64_key(PREFIX_CHUNK, &self.volume, id);
        for (id, delta) in live_delta {
            if id == commit.object_id {
                continue;
            }
            if let Some(v) = self.meta.db().get(stats_key(id))? {
                let mut s = ChunkStats::decode(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("c{}/{id:016x}", self.volume),
                    reason: "bad chunk stats".into(),
                })?;
                s.live_blocks = s.live_blocks.saturating_add_signed(delta);
                batch.put(stats_key(id), s.encode());
            }
        }
        let stats = ChunkStats {
            data_blocks: commit.extents.iter().map(MapExtent::data_blocks).sum(),
            live_blocks: new_live,
            stored_bytes: commit.stored_bytes,
        };
        batch.put(stats_key(commit.object_id), stats.encode());
        batch.put(vol_key(PREFIX_STATE, &self.volume), state.encode());
        self.meta.write_sync(batch)
    }

    /// The existing extents that `extents` touch, each once, by start block: one map scan per
    /// run of back-to-back new extents (a sequential chunk is one scan, not one per frame), all
    /// with one iterator.
    fn touched(&self, extents: &[MapExtent]) -> Result<BTreeMap<u64, MapExtent>, MetaError> {
        let mut runs: Vec<(u64, u64)> = extents.iter().map(|e| (e.start, e.end())).collect();
        runs.sort_unstable();
        runs.dedup_by(|next, run| {
            let joins = next.0 <= run.1;
            if joins {
                run.1 = run.1.max(next.1);
            }
            joins
        });
        let mut touched = Vec::new();
        if let Some(&(_, last_end)) = runs.last() {
            let mut it = self.iterator(last_end);
            for &(start, end) in &runs {
                self.scan(&mut it, start, end, &mut touched)?;
            }
        }
        Ok(touched.into_iter().map(|e| (e.start, e)).collect())
    }

    /// The map changes that cut what `winners` cover out of the existing extents `olds`, by
    /// start block: a put (`Some`) or a delete (`None`), each key once; and the live blocks each
    /// of this volume's chunks loses. A key that gets a new value is not deleted first (a put
    /// replaces it): a 4 KiB write into a 16 KiB extent usually keeps the extent's first piece,
    /// and a tombstone per block would add to every commit after scattered writes.
    fn cut(
        &self,
        olds: &BTreeMap<u64, MapExtent>,
        winners: &BTreeMap<u64, MapExtent>,
    ) -> (MapChanges, HashMap<u64, i64>) {
        let mut changes = Vec::new();
        let mut live_delta: HashMap<u64, i64> = HashMap::new();
        for old in olds.values() {
            let mut keep = vec![(old.start, old.end())];
            let covering = winners
                .range(..old.end())
                .rev()
                .take_while(|(_, w)| w.end() > old.start)
                .map(|(_, w)| (w.start, w.end()));
            for (s, e) in covering {
                keep = subtract(&keep, s, e);
            }
            let kept: u64 = keep.iter().map(|(s, e)| e - s).sum();
            if kept == old.count {
                continue;
            }
            let replaced = keep.first().is_some_and(|(s, _)| *s == old.start)
                || winners.contains_key(&old.start);
            if !replaced {
                changes.push((old.start, None));
            }
            for (s, e) in keep {
                changes.push((s, Some(old.slice(s, e).encode(self.owner))));
            }
            match old.target {
                Target::Data(f) if f.owner == self.owner => {
                    *live_delta.entry(f.object_id).or_default() -= (old.count - kept) as i64;
                }
                _ => {}
            }
        }
        (changes, live_delta)
    }

    /// Number of map entries and data blocks mapped (for stats and tests).
    pub fn summary(&self) -> Result<(u64, u64), MetaError> {
        let mut entries = 0;
        let mut data = 0;
        self.for_each(|e| {
            entries += 1;
            data += e.data_blocks();
        })?;
        Ok((entries, data))
    }
}

/// Map changes by start block: the new value (`Some`) or a delete (`None`).
type MapChanges = Vec<(u64, Option<Vec<u8>>)>;

/// The parts of the new extents `news` that no newer existing extent of `olds` shadows, by start
/// block. Existing extents do not overlap, so those reaching into a new one are the last ones
/// starting before its end.
fn winners(olds: &BTreeMap<u64, MapExtent>, news: &[MapExtent]) -> BTreeMap<u64, MapExtent> {
    let mut winners = BTreeMap::new();
    for new in news {
        let mut pieces = vec![(new.start, new.end())];
        let reaching = olds
            .range(..new.end())
            .rev()
            .map(|(_, o)| o)
            .take_while(|o| o.end() > new.start);
        for old in reaching {
            if old.seq > new.seq {
                pieces = subtract(&pieces, old.start, old.end());
            }
        }
        for (s, e) in pieces {
            winners.insert(s, new.slice(s, e));
        }
    }
    winners
}

/// `ranges` minus `[s, e)`.
fn subtract(ranges: &[(u64, u64)], s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(a, b) in ranges {
        if e <= a || b <= s {
            out.push((a, b));
            continue;
        }
        if a < s {
            out.push((a, s));
        }
        if e < b {
            out.push((e, b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(start: u64, count: u64, seq: u64, object_id: u64) -> MapExtent {
        MapExtent {
            start,
            count,
            seq,
            target: Target::Data(FrameRef {
                owner: OWN,
                object_id,
                first_block: start,
                blocks: count as u32,
                offset: 100,
                len: 10,
                crc: 7,
                encoding: FrameEncoding::Raw,
            }),
        }
    }

    fn setup() -> (tempfile::TempDir, MetaStore, BlockLookup) {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path(), 1 << 20).unwrap();
        let lookup = map_of(&meta, "vol-0000000000000000a");
        (dir, meta, lookup)
    }

    /// [`setup`], with maps of the volumes whose keys sort just before and after its own.
    fn setup_between_neighbours() -> (tempfile::TempDir, MetaStore, BlockLookup) {
        let (d, meta, l) = setup();
        let before = map_of(&meta, "vol-00000000000000009");
        let after = map_of(&meta, "vol-0000000000000000b");
        commit(&before, 1, vec![data(70, 3, 1, 1)]);
        commit(&after, 1, vec![data(0, 2, 1, 1)]);
        (d, meta, l)
    }

    /// The map of volume `id` in `meta`.
    fn map_of(meta: &MetaStore, id: &str) -> BlockLookup {
        BlockLookup::new(meta.clone(), VolumeId::parse(id).unwrap())
    }

    fn commit(l: &BlockLookup, object_id: u64, extents: Vec<MapExtent>) {
        let c = ChunkCommit {
            object_id,
            extents,
            stored_bytes: 1000,
        };
        l.commit_chunk(&c, VolumeState::default()).unwrap();
    }

    const OWN: u128 = 0xa;

    #[test]
    fn value_round_trip() {
        let e = data(10, 5, 99, 3);
        assert_eq!(e.encode(OWN).len(), MAP_VALUE_LEN);
        assert_eq!(MapExtent::decode(10, &e.encode(OWN), OWN), Some(e));
        // A frame of another volume's object carries its owner (v2).
        let foreign = e.encode(7);
        assert_eq!(foreign.len(), MAP_VALUE_OWNED_LEN);
        assert_eq!(MapExtent::decode(10, &foreign, 7), Some(e));
        assert_eq!(MapExtent::decode(10, &foreign, 99), Some(e));
        let z = MapExtent {
            start: 1,
            count: 1 << 20,
            seq: 4,
            target: Target::Zero,
        };
        assert_eq!(MapExtent::decode(1, &z.encode(OWN), OWN), Some(z));
        assert_eq!(
            MapExtent::decode(9, &e.encode(OWN), OWN),
            None,
            "start outside its frame"
        );
        assert_eq!(MapExtent::decode(10, &e.encode(OWN)[..47], OWN), None);
    }

    #[test]
    fn overwrite_splits_and_accounts_live_blocks() {
        let (_d, meta, l) = setup();
        commit(&l, 1, vec![data(0, 16, 1, 1)]);
        commit(&l, 2, vec![data(4, 4, 2, 2)]);
        let got = l.lookup(0, 100).unwrap();
        let shape: Vec<_> = got.iter().map(|e| (e.start, e.count, e.seq)).collect();
        assert_eq!(shape, vec![(0, 4, 1), (4, 4, 2), (8, 8, 1)]);
        // The right remainder still points into object 1's frame, which starts at block 0.
        assert!(matches!(got[2].target, Target::Data(f) if f.object_id == 1 && f.first_block == 0));
        let stats = meta.chunk_stats(&l.volume).unwrap();
        assert_eq!(stats[0].1.live_blocks, 12);
        assert_eq!(stats[1].1.live_blocks, 4);
        // Clipped lookup in the middle of an extent.
        let mid = l.lookup(9, 10).unwrap();
        assert_eq!((mid[0].start, mid[0].count), (9, 1));
    }

    /// Every range is one forward seek, then steps to lower blocks: each lookup must give
    /// exactly the extents a full scan says intersect the range, in order, with another
    /// volume's map on either side; so must a set of ranges ([`BlockLookup::overlapping_ranges`]).
    #[test]
    fn lookups_of_every_range_match_a_full_scan() {
        let (_d, _meta, l) = setup_between_neighbours();
        let zero = MapExtent {
            start: 50,
            count: 9,
            seq: 3,
            target: Target::Zero,
        };
        commit(
            &l,
            1,
            vec![data(2, 1, 1, 1), data(3, 4, 2, 1), data(20, 30, 3, 1), zero],
        );
        commit(
            &l,
            2,
            vec![data(25, 1, 4, 2), data(40, 2, 5, 2), data(64, 16, 6, 2)],
        );
        let all = l.all().unwrap();
        assert_eq!(all.len(), 9, "{all:?}");
        assert!(all.windows(2).all(|w| w[0].end() <= w[1].start), "{all:?}");
        // One iterator bounded far beyond every range serves many scans (as in a commit).
        let mut shared = l.iterator(u64::MAX);
        for start in 0..90 {
            for end in start + 1..start + 40 {
                let overlapping: Vec<MapExtent> = all
                    .iter()
                    .filter(|e| e.start < end && e.end() > start)
                    .copied()
                    .collect();
                let clipped: Vec<MapExtent> = overlapping
                    .iter()
                    .map(|e| e.slice(e.start.max(start), e.end().min(end)))
                    .collect();
                assert_eq!(l.lookup(start, end).unwrap(), clipped, "{start}..{end}");
                let mut scanned = vec![data(0, 1, 99, 9)];
                l.scan(&mut shared, start, end, &mut scanned).unwrap();
                assert_eq!(
                    scanned[1..],
                    overlapping[..],
                    "{start}..{end}, shared iterator"
                );
            }
        }
        // Sets of two and three ranges (sorted, apart): every extent intersecting one of
        // them, once, in order — also one spanning the gap between two ranges.
        for a in 0..85 {
            for b in [a + 1, a + 3, a + 12] {
                for (c, d) in [(b + 1, b + 2), (b + 5, b + 30), (b + 20, b + 21)] {
                    let sets: [&[(u64, u64)]; 2] =
                        [&[(a, b), (c, d)], &[(a, b), (c, d), (d + 2, d + 9)]];
                    for ranges in sets {
                        let want: Vec<MapExtent> = all
                            .iter()
                            .filter(|e| ranges.iter().any(|&(s, t)| e.start < t && e.end() > s))
                            .copied()
                            .collect();
                        assert_eq!(l.overlapping_ranges(ranges).unwrap(), want, "{ranges:?}");
                    }
                }
            }
        }
        assert!(l.overlapping_ranges(&[]).unwrap().is_empty());
    }

    /// Walking the whole map (in either order, live or as of a RocksDB snapshot) and the map
    /// objects encoded while walking it give exactly the map, with neighbouring volumes' maps
    /// on either side of its keys.
    #[test]
    fn whole_map_walks_and_map_objects_match_the_map() {
        use crate::mapobj::MapObject;
        let (_d, meta, l) = setup_between_neighbours();
        commit(&l, 1, vec![data(0, 8, 1, 1), data(100, 50, 2, 1)]);
        let zero = MapExtent {
            start: 20,
            count: 9,
            seq: 4,
            target: Target::Zero,
        };
        let state = VolumeState {
            checkpoint: 17,
            next_object_id: 3,
            max_seq: 18,
        };
        let c = ChunkCommit {
            object_id: 2,
            extents: vec![data(4, 2, 3, 2), zero, data(120, 1, 5, 2)],
            stored_bytes: 2000,
        };
        l.commit_chunk(&c, state).unwrap();
        let all = l.all().unwrap();
        assert_eq!(all.len(), 7, "{all:?}");

        let mut walked = Vec::new();
        l.for_each(|e| walked.push(e)).unwrap();
        walked.reverse();
        assert_eq!(walked, all);
        let snap = meta.db().snapshot();
        let mut ascending = Vec::new();
        l.for_each_ascending_at(&snap, |e| ascending.push(e))
            .unwrap();
        assert_eq!(ascending, all);
        let data_blocks: u64 = all.iter().map(MapExtent::data_blocks).sum();
        assert_eq!(l.summary().unwrap(), (7, data_blocks));
        assert_eq!(
            data_blocks,
            8 + 50,
            "overwrites of data by data keep the count"
        );

        let (bytes, next) = meta.encode_map_object(&l, None).unwrap();
        let want = MapObject {
            owner: l.default_owner(),
            seq: 17,
            next_object_id: 3,
            objects: meta.chunk_stats(&l.volume).unwrap(),
            extents: all.clone(),
        };
        assert_eq!(next, 3);
        assert_eq!(want.objects.len(), 2);
        assert_eq!(MapObject::decode(&bytes).unwrap(), want);
        assert_eq!(bytes, want.encode());
        let (bytes, _) = meta.encode_map_object(&l, Some(42)).unwrap();
        let snapshot_map = MapObject {
            seq: 42,
            next_object_id: 0,
            objects: Vec::new(),
            ..want
        };
        assert_eq!(MapObject::decode(&bytes).unwrap(), snapshot_map);
    }

    #[test]
    fn two_new_extents_cutting_one_old_extent() {
        let (_d, meta, l) = setup();
        commit(&l, 1, vec![data(33, 7, 2, 1)]);
        commit(&l, 2, vec![data(33, 3, 5, 2), data(38, 3, 6, 2)]);
        let shape: Vec<_> = l
            .lookup(0, 100)
            .unwrap()
            .iter()
            .map(|e| (e.start, e.count, e.seq))
            .collect();
        assert_eq!(shape, vec![(33, 3, 5), (36, 2, 2), (38, 3, 6)]);
        let stats = meta.chunk_stats(&l.volume).unwrap();
        assert_eq!((stats[0].1.live_blocks, stats[1].1.live_blocks), (2, 6));
    }

    #[test]
    fn newer_existing_extent_wins() {
        let (_d, _m, l) = setup();
        commit(&l, 1, vec![data(5, 2, 10, 1)]);
        commit(&l, 2, vec![data(0, 10, 3, 2)]);
        let shape: Vec<_> = l
            .lookup(0, 10)
            .unwrap()
            .iter()
            .map(|e| (e.start, e.count, e.seq))
            .collect();
        assert_eq!(shape, vec![(0, 5, 3), (5, 2, 10), (7, 3, 3)]);
    }

    /// A volume deleted with a mark is `deleted_here` while chunk stats of it are left; once
    /// garbage collection has forgotten the last one, the next open removes the mark; a record
    /// of the volume here again ends it at once.
    #[test]
    fn a_deleted_here_mark_lasts_while_chunk_stats_do() {
        let (_d, meta, l) = setup();
        commit(&l, 1, vec![data(0, 4, 1, 1)]);
        let mark = crate::meta::vol_key(crate::meta::PREFIX_DELETED_HERE, &l.volume);
        meta.delete_volume(&l.volume, true).unwrap();
        assert!(meta.deleted_here(&l.volume));
        meta.load_deleted_here().unwrap();
        assert!(meta.deleted_here(&l.volume), "kept while a chunk is left");
        meta.forget_chunks(&[(l.volume.clone(), 1)]).unwrap();
        meta.load_deleted_here().unwrap();
        assert!(!meta.deleted_here(&l.volume));
        assert!(
            meta.db().get(&mark).unwrap().is_none(),
            "the mark is removed"
        );

        // A record of the volume here again (a takeover of a volume whose delete failed in the
        // catalog) ends the mark, in memory and stored.
        commit(&l, 2, vec![data(0, 4, 1, 2)]);
        meta.delete_volume(&l.volume, true).unwrap();
        let rec: crate::records::VolumeRecord = serde_json::from_value(serde_json::json!({
            "volume_id": l.volume.as_str(), "size_bytes": 1 << 20,
            "create_time": "2026-12-04T00:00:00Z", "state": "available"
        }))
        .unwrap();
        meta.put_volume(&rec).unwrap();
        assert!(!meta.deleted_here(&l.volume));
        assert!(meta.db().get(&mark).unwrap().is_none());
    }

    #[test]
    fn volumes_do_not_see_each_other() {
        let (_d, meta, l) = setup();
        let other = map_of(&meta, "vol-0000000000000000b");
        commit(&l, 1, vec![data(0, 4, 1, 1)]);
        assert!(other.lookup(0, u64::MAX).unwrap().is_empty());
        meta.delete_volume(&l.volume, false).unwrap();
        assert!(l.lookup(0, u64::MAX).unwrap().is_empty());
    }

    /// A database written with map key layout 1 (`m`/`p`, ascending block numbers) opens with
    /// every extent under layout 2, including a map a crash left half moved, across several
    /// migration batches; other keys are untouched.
    #[test]
    fn open_moves_map_keys_of_layout_1() {
        let dir = tempfile::tempdir().unwrap();
        let vol = VolumeId::parse("vol-0000000000000000a").unwrap();
        let snap = SnapshotId::parse("snap-0000000000000000b").unwrap();
        // Far more than one batch, every 4th block; a snapshot map; half of a second volume's
        // map already moved (a crash between batches).
        let n = 2 * crate::meta::migrate::MIGRATION_BATCH as u64 + 7;
        let extents: Vec<MapExtent> = (0..n).map(|i| data(i * 4, 1, i + 1, 1)).collect();
        {
            let meta = MetaStore::open(dir.path(), 1 << 20).unwrap();
            let other = map_of(&meta, "vol-0000000000000000c");
            commit(&other, 1, vec![data(0, 4, 1, 1)]);
            let mut batch = WriteBatch::default();
            let legacy = |prefix: Vec<u8>, start: u64| {
                let mut k = prefix;
                k.extend_from_slice(&start.to_be_bytes());
                k
            };
            for e in &extents {
                batch.put(legacy(id_key(b'm', vol.as_str()), e.start), e.encode(OWN));
            }
            batch.put(
                legacy(id_key(b'p', snap.as_str()), 8),
                data(8, 2, 3, 1).encode(OWN),
            );
            batch.put(
                legacy(id_key(b'm', "vol-0000000000000000c"), 10),
                data(10, 1, 2, 1).encode(0xc),
            );
            // A database of layout 1 has no layout key.
            batch.delete(b"F");
            meta.write_sync(batch).unwrap();
        }
        for _ in 0..2 {
            let meta = MetaStore::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(
                BlockLookup::new(meta.clone(), vol.clone()).all().unwrap(),
                extents
            );
            let frozen = BlockLookup::snapshot(meta.clone(), &snap, vol.clone());
            assert_eq!(frozen.lookup(0, 100).unwrap(), vec![data(8, 2, 3, 1)]);
            let other: Vec<_> = map_of(&meta, "vol-0000000000000000c")
                .all()
                .unwrap()
                .iter()
                .map(|e| (e.start, e.count, e.seq))
                .collect();
            assert_eq!(other, vec![(0, 4, 1), (10, 1, 2)]);
            let keys: Vec<u8> = meta
                .db()
                .iterator(rocksdb::IteratorMode::Start)
                .map(|item| item.unwrap().0[0])
                .collect();
            assert!(!keys.contains(&b'm') && !keys.contains(&b'p'), "{keys:?}");
            assert!(keys.contains(&b'c'), "chunk stats kept");
        }
    }

    /// A database of a newer key layout than this build knows is refused, not misread.
    #[test]
    fn open_refuses_a_newer_key_layout() {
        let dir = tempfile::tempdir().unwrap();
        {
            let meta = MetaStore::open(dir.path(), 1 << 20).unwrap();
            let map = map_of(&meta, "vol-0000000000000000a");
            commit(&map, 1, vec![data(0, 4, 1, 1)]);
            let newer = crate::meta::KEY_LAYOUT + 1;
            meta.db().put(b"F", newer.to_le_bytes()).unwrap();
        }
        match MetaStore::open(dir.path(), 1 << 20) {
            Err(MetaError::UnsupportedLayout { found, supported }) => {
                assert_eq!((found, supported), (3, 2));
            }
            other => panic!("opened a newer layout: {:?}", other.err()),
        }
    }
}

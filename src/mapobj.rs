//! Map objects: a whole BlockLookup map as one backend object (FORMAT.md, "Map object").
//!
//! Written for a snapshot (`SNAPID/map`: its frozen map, so the snapshot survives the loss of the
//! local disk) and as a volume's map checkpoint (`VOLUMEID/map/SEQ`: recovery starts from it and
//! applies only younger chunks, so garbage collection may delete chunks the map no longer uses).
//!
//! Layout, little-endian: a 64-byte header, then `object_count` chunk-stats entries (32 bytes:
//! object_id, data_blocks, live_blocks, stored_bytes), then `extent_count` extents (72 bytes:
//! start_block u64 followed by the 64-byte v2 map value, which always names its owner).

use crate::codec::{u128_at, u16_at, u64_at};
use crate::lookup::BlockLookup;
use crate::lookup::{MapExtent, MAP_VALUE_LEN, MAP_VALUE_OWNED_LEN, MAP_VALUE_VERSION};
use crate::meta::{
    decode_stats_entry, delete_prefix, vol_key, vol_u64_key, ChunkStats, MetaError, MetaStore,
    VolumeState, PREFIX_CHUNK, PREFIX_STATE,
};

/// Magic number: ASCII `VBMP`.
pub const MAP_OBJECT_MAGIC: [u8; 4] = *b"VBMP";
/// Format version written.
pub const MAP_OBJECT_VERSION: u16 = 1;
/// Header length in bytes.
pub const MAP_OBJECT_HEADER_LEN: usize = 64;
const OBJECT_ENTRY_LEN: usize = 32;
const EXTENT_ENTRY_LEN: usize = 8 + MAP_VALUE_OWNED_LEN;

/// Errors decoding a map object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapObjectError {
    /// Shorter than its header says.
    #[error("map object truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Not a map object.
    #[error("bad map object magic")]
    BadMagic,
    /// A version this reader does not know.
    #[error("unsupported map object version {0}")]
    UnsupportedVersion(u16),
    /// The CRC does not match.
    #[error("map object checksum mismatch")]
    BadCrc,
    /// An extent entry does not decode.
    #[error("bad extent entry {0}")]
    BadExtent(u64),
}

/// A map as of sequence number `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapObject {
    /// Number of the VolumeId whose map this is (a snapshot's source volume).
    pub owner: u128,
    /// Every write with a sequence number up to this is in the map (the checkpoint).
    pub seq: u64,
    /// The owner's next chunk object id when the map was taken: chunks with smaller ids are
    /// reflected in it.
    pub next_object_id: u64,
    /// Accounting of the owner's chunks, by object id.
    pub objects: Vec<(u64, ChunkStats)>,
    /// The extents, sorted by start block.
    pub extents: Vec<MapExtent>,
}

/// Writes a map object as its extents arrive, so a map is never held in memory twice (once as
/// extents, once encoded) while it is stored: the header and chunk stats first, then one entry
/// per [`MapObjectEncoder::push`], in ascending block order; [`MapObjectEncoder::finish`] fills
/// in the extent count and the CRC.
#[derive(Debug)]
pub struct MapObjectEncoder {
    b: Vec<u8>,
    extents: u64,
}

impl MapObjectEncoder {
    /// Starts an object for `owner`'s map at `seq` (see [`MapObject`] for the fields).
    pub fn new(owner: u128, seq: u64, next_object_id: u64, objects: &[(u64, ChunkStats)]) -> Self {
        let mut b = vec![0u8; MAP_OBJECT_HEADER_LEN];
        b[0..4].copy_from_slice(&MAP_OBJECT_MAGIC);
        b[4..6].copy_from_slice(&MAP_OBJECT_VERSION.to_le_bytes());
        b[8..24].copy_from_slice(&owner.to_le_bytes());
        b[24..32].copy_from_slice(&seq.to_le_bytes());
        b[32..40].copy_from_slice(&next_object_id.to_le_bytes());
        b[48..56].copy_from_slice(&(objects.len() as u64).to_le_bytes());
        b.reserve(objects.len() * OBJECT_ENTRY_LEN);
        for (id, s) in objects {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&s.data_blocks.to_le_bytes());
            b.extend_from_slice(&s.live_blocks.to_le_bytes());
            b.extend_from_slice(&s.stored_bytes.to_le_bytes());
        }
        Self { b, extents: 0 }
    }

    /// Room for `n` more extents (when the count is known).
    pub fn reserve(&mut self, n: usize) {
        self.b.reserve(n * EXTENT_ENTRY_LEN);
    }

    /// Appends extent `e`; extents must come in ascending block order (the format's).
    pub fn push(&mut self, e: &MapExtent) {
        self.b.extend_from_slice(&e.start.to_le_bytes());
        // An owner number no frame has makes every value v2 (owner explicit).
        let mut v = e.encode(u128::MAX);
        v.resize(MAP_VALUE_OWNED_LEN, 0);
        self.b.extend_from_slice(&v);
        self.extents += 1;
    }

    /// The object's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.b[40..48].copy_from_slice(&self.extents.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&self.b[0..56]);
        h.update(&self.b[MAP_OBJECT_HEADER_LEN..]);
        let crc = h.finalize();
        self.b[56..60].copy_from_slice(&crc.to_le_bytes());
        self.b
    }
}

impl MapObject {
    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut enc =
            MapObjectEncoder::new(self.owner, self.seq, self.next_object_id, &self.objects);
        enc.reserve(self.extents.len());
        for e in &self.extents {
            enc.push(e);
        }
        enc.finish()
    }

    /// Decodes and verifies an object made by [`MapObject::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, MapObjectError> {
        let have = b.len() as u64;
        if b.len() < MAP_OBJECT_HEADER_LEN {
            return Err(MapObjectError::Truncated {
                need: MAP_OBJECT_HEADER_LEN as u64,
                have,
            });
        }
        if b[0..4] != MAP_OBJECT_MAGIC {
            return Err(MapObjectError::BadMagic);
        }
        let version = u16_at(b, 4);
        if version != MAP_OBJECT_VERSION {
            return Err(MapObjectError::UnsupportedVersion(version));
        }
        let extents = u64_at(b, 40);
        let objects = u64_at(b, 48);
        let need = (MAP_OBJECT_HEADER_LEN as u64)
            .saturating_add(objects.saturating_mul(OBJECT_ENTRY_LEN as u64))
            .saturating_add(extents.saturating_mul(EXTENT_ENTRY_LEN as u64));
        if have != need {
            return Err(MapObjectError::Truncated { need, have });
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&b[0..56]);
        h.update(&b[MAP_OBJECT_HEADER_LEN..]);
        if h.finalize().to_le_bytes() != b[56..60] {
            return Err(MapObjectError::BadCrc);
        }
        let mut at = MAP_OBJECT_HEADER_LEN;
        let mut objs = Vec::with_capacity(objects as usize);
        for _ in 0..objects {
            let e = &b[at..at + OBJECT_ENTRY_LEN];
            objs.push((
                u64_at(e, 0),
                ChunkStats {
                    data_blocks: u64_at(e, 8),
                    live_blocks: u64_at(e, 16),
                    stored_bytes: u64_at(e, 24),
                },
            ));
            at += OBJECT_ENTRY_LEN;
        }
        let mut exts = Vec::with_capacity(extents as usize);
        for i in 0..extents {
            let e = &b[at..at + EXTENT_ENTRY_LEN];
            let start = u64_at(e, 0);
            // Zero extents name no owner: their value is v1, padded.
            let v = match e[8] {
                MAP_VALUE_VERSION => &e[8..8 + MAP_VALUE_LEN],
                _ => &e[8..],
            };
            exts.push(MapExtent::decode(start, v, u128::MAX).ok_or(MapObjectError::BadExtent(i))?);
            at += EXTENT_ENTRY_LEN;
        }
        Ok(Self {
            owner: u128_at(b, 8),
            seq: u64_at(b, 24),
            next_object_id: u64_at(b, 32),
            objects: objs,
            extents: exts,
        })
    }
}

impl MetaStore {
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
        let snap = self.db().snapshot();
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
        let mut batch = rocksdb::WriteBatch::default();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::FrameEncoding;
    use crate::lookup::{FrameRef, Target};

    fn sample() -> MapObject {
        MapObject {
            owner: 0xabc,
            seq: 77,
            next_object_id: 5,
            objects: vec![(
                3,
                ChunkStats {
                    data_blocks: 16,
                    live_blocks: 4,
                    stored_bytes: 9000,
                },
            )],
            extents: vec![
                MapExtent {
                    start: 0,
                    count: 4,
                    seq: 9,
                    target: Target::Data(FrameRef {
                        owner: 0xabc,
                        object_id: 3,
                        first_block: 0,
                        blocks: 16,
                        offset: 48,
                        len: 100,
                        crc: 1,
                        encoding: FrameEncoding::Zstd,
                    }),
                },
                MapExtent {
                    start: 10,
                    count: 1 << 20,
                    seq: 12,
                    target: Target::Zero,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(MapObject::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn corruption_is_detected() {
        let b = sample().encode();
        let mut flipped = b.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(MapObject::decode(&flipped), Err(MapObjectError::BadCrc));
        assert!(matches!(
            MapObject::decode(&b[..b.len() - 1]),
            Err(MapObjectError::Truncated { .. })
        ));
        let mut v = b.clone();
        v[4] = 9;
        assert_eq!(
            MapObject::decode(&v),
            Err(MapObjectError::UnsupportedVersion(9))
        );
        assert_eq!(
            MapObject::decode(b"nope"),
            Err(MapObjectError::Truncated { need: 64, have: 4 })
        );
    }
}

//! Chunk object format, version 1: immutable objects of up to 4 MiB of block data.
//! `docs/FORMAT.md` ("Chunk object") is the prose spec; keep both in step.
//!
//! Layout (integers little-endian):
//! ```text
//! header (48 bytes): magic u32 "VBCK" | version u16 | flags u16 | volume_tag u64 | object_id u64 |
//!                    min_seq u64 | max_seq u64 | extent_count u32 | crc32 u32
//! index  (extent_count x 40 bytes), sorted by start_block, non-overlapping:
//!        start_block u64 | seq u64 | block_count u32 | kind u8 | reserved [u8;3] |
//!        frame_offset u32 | frame_len u32 | frame_crc u32 | reserved u32
//! frames: one zstd frame per data extent, at frame_offset, frame_len bytes long
//! ```
//! Header flags: bit 0 ([`FLAG_MORE_PARTS`]) says the chunk is not the last part of its memtable
//! (the next parts follow under the next object ids); other bits are 0.
//! The header CRC covers header bytes 0..44 and the whole index; each frame has its own CRC32 over
//! its compressed bytes, so one extent can be fetched (ranged read) and verified alone. Zero
//! extents (trimmed, write-zeroes or all-zero data) have no frame: `frame_*` are 0.

use bytes::Bytes;

use crate::block::{is_zero, BLOCK_BYTES};
use crate::codec::{u16_at, u32_at, u64_at};
use crate::fs::DIRECT_ALIGN;

mod buffers;
mod compress;
pub use buffers::ObjectBuffers;
use compress::{compress, worth_compressing, CompressionProbe, DCTX};

/// ASCII "VBCK".
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"VBCK");
/// The only chunk format version this build writes and reads.
pub const CHUNK_VERSION: u16 = 1;
/// Header length in bytes.
pub const CHUNK_HEADER_LEN: usize = 48;
/// Header flag: more parts of the same memtable follow under the next object ids. A disaster
/// recovery applies a memtable's chunks all together or not at all (FORMAT.md, "Recovery").
pub const FLAG_MORE_PARTS: u16 = 1;
/// Index entry length in bytes.
pub const INDEX_ENTRY_LEN: usize = 40;
/// Largest frame the decoder accepts, in blocks (16 MiB uncompressed).
pub const MAX_FRAME_BLOCKS: u32 = 4096;

/// Errors of the chunk layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The object is shorter than its header and index say.
    #[error("chunk truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Not a chunk object.
    #[error("bad chunk magic {0:#010x}")]
    BadMagic(u32),
    /// A format version this build does not read.
    #[error("unsupported chunk version {0}")]
    BadVersion(u16),
    /// The header/index CRC or a frame CRC does not match.
    #[error("chunk {what} crc mismatch")]
    Crc {
        /// `index` or `frame`.
        what: &'static str,
    },
    /// The index is inconsistent (unsorted, overlapping, frame outside the object, bad kind).
    #[error("chunk index invalid: {0}")]
    BadIndex(String),
    /// zstd failed, or a frame decompressed to the wrong length.
    #[error("chunk frame decode failed: {0}")]
    Frame(String),
}

/// Data or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExtentKind {
    /// Blocks stored in a frame.
    Data = 1,
    /// Blocks that read as zeros; nothing stored.
    Zero = 2,
}

/// How a data extent's frame is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameEncoding {
    /// A zstd frame.
    Zstd = 0,
    /// The blocks as they are (data that does not compress).
    Raw = 1,
}

impl FrameEncoding {
    /// Decodes the stored byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Zstd),
            1 => Some(Self::Raw),
            _ => None,
        }
    }
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkExtent {
    /// First block.
    pub start_block: u64,
    /// Sequence number of the write that produced these blocks.
    pub seq: u64,
    /// Number of blocks.
    pub block_count: u32,
    /// Data or zero.
    pub kind: ExtentKind,
    /// Frame encoding (data extents; `Zstd` for zero extents).
    pub encoding: FrameEncoding,
    /// Byte offset of the frame in the object (0 for zero extents).
    pub frame_offset: u32,
    /// Compressed frame length in bytes (0 for zero extents).
    pub frame_len: u32,
    /// CRC32 of the compressed frame bytes (0 for zero extents).
    pub frame_crc: u32,
}

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Tag of the volume that wrote the chunk.
    pub volume_tag: u64,
    /// Object id (also in its key).
    pub object_id: u64,
    /// Smallest extent sequence number.
    pub min_seq: u64,
    /// Largest extent sequence number.
    pub max_seq: u64,
    /// Number of index entries.
    pub extent_count: u32,
}

impl ChunkHeader {
    /// Bytes from the object's start to the end of its index (header plus `extent_count`
    /// entries): the ranged read that [`decode_index`] needs.
    pub fn index_len(&self) -> u64 {
        CHUNK_HEADER_LEN as u64 + u64::from(self.extent_count) * INDEX_ENTRY_LEN as u64
    }
}

/// What to put in a chunk: a run of blocks at `start_block` written at `seq`, as data (whole
/// blocks) or zeros.
#[derive(Debug, Clone)]
pub struct InputExtent {
    /// First block.
    pub start_block: u64,
    /// Blocks.
    pub block_count: u64,
    /// Sequence number.
    pub seq: u64,
    /// `Some(data)` with `block_count * 4096` bytes, or `None` for zeros.
    pub data: Option<Bytes>,
}

/// Chunk build settings.
#[derive(Debug, Clone, Copy)]
pub struct ChunkOptions {
    /// Largest data extent (one zstd frame), in blocks; a read of one block decompresses at most
    /// this much (default 4 = 16 KiB, the volume block size OpenZFS 2.2 chose for VM disks;
    /// docs/design/frame-size.md).
    pub frame_blocks: u32,
    /// zstd level (default 1).
    pub zstd_level: i32,
    /// Whether frames are tried with zstd at all (default true). The flusher turns it off
    /// while it is behind the writers: every frame is then stored raw
    /// (docs/design/compression-that-yields.md).
    pub compress: bool,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self {
            frame_blocks: 4,
            zstd_level: 1,
            compress: true,
        }
    }
}

/// Builds a chunk object from `input` (sorted by block, non-overlapping). All-zero blocks become
/// zero extents; data runs are split into frames of at most `frame_blocks`.
///
/// The object is written into `buf` (cleared first; pass `Vec::new()` or a buffer from
/// [`ObjectBuffers::take`], whose pages are already mapped). Returns the object bytes, which
/// start at a [`DIRECT_ALIGN`]-aligned address (for the file backend's direct I/O), and its
/// index. CPU-bound: call from a blocking thread.
pub fn build(
    volume_tag: u64,
    object_id: u64,
    input: &[InputExtent],
    opts: ChunkOptions,
    buf: Vec<u8>,
) -> Result<(Bytes, Vec<ChunkExtent>), ChunkError> {
    build_flagged(volume_tag, object_id, input, opts, buf, 0)
}

/// [`build`] with header `flags` (`FLAG_*`): the flusher marks every part of a memtable but the
/// last with [`FLAG_MORE_PARTS`].
pub fn build_flagged(
    volume_tag: u64,
    object_id: u64,
    input: &[InputExtent],
    opts: ChunkOptions,
    buf: Vec<u8>,
    flags: u16,
) -> Result<(Bytes, Vec<ChunkExtent>), ChunkError> {
    let mut framer = Framer {
        opts,
        frame_blocks: opts.frame_blocks.clamp(1, MAX_FRAME_BLOCKS) as u64,
        probe: CompressionProbe::default(),
        index: Vec::new(),
        frames: Vec::new(),
    };
    for ext in input {
        framer.add(ext)?;
    }
    let Framer {
        mut index, frames, ..
    } = framer;
    let mut offset = CHUNK_HEADER_LEN + index.len() * INDEX_ENTRY_LEN;
    let total = offset + frames.iter().map(|f| f.len()).sum::<usize>();
    if total > u32::MAX as usize {
        return Err(ChunkError::BadIndex("chunk larger than 4 GiB".into()));
    }
    for e in index.iter_mut().filter(|e| e.kind == ExtentKind::Data) {
        e.frame_offset = offset as u32;
        offset += e.frame_len as usize;
    }
    let header = ChunkHeader {
        flags,
        volume_tag,
        object_id,
        min_seq: index.iter().map(|e| e.seq).min().unwrap_or(0),
        max_seq: index.iter().map(|e| e.seq).max().unwrap_or(0),
        extent_count: index.len() as u32,
    };
    // The object starts at an aligned address inside `out`, so the file backend can write it
    // with direct I/O (no page-cache copy).
    let mut out = buf;
    out.clear();
    out.reserve(total + DIRECT_ALIGN);
    let skip = crate::fs::aligned_skip(&out);
    out.resize(skip, 0);
    encode_header_and_index(&header, &index, &mut out);
    for f in &frames {
        out.extend_from_slice(f);
    }
    Ok((Bytes::from(out).slice(skip..), index))
}

/// Cuts input extents into index entries and frames (their offsets are set once all are known).
struct Framer<'a> {
    opts: ChunkOptions,
    /// Most blocks in one data frame.
    frame_blocks: u64,
    probe: CompressionProbe,
    index: Vec<ChunkExtent>,
    /// Compressed frames are owned; raw frames borrow from the input, so their bytes are
    /// copied once, into the object.
    frames: Vec<std::borrow::Cow<'a, [u8]>>,
}

impl<'a> Framer<'a> {
    /// Adds one input extent: runs of all-zero blocks become zero extents, data runs frames of
    /// at most `frame_blocks`.
    fn add(&mut self, ext: &'a InputExtent) -> Result<(), ChunkError> {
        let Some(data) = &ext.data else {
            self.zero(ext.start_block, ext.block_count, ext.seq);
            return Ok(());
        };
        if data.len() as u64 != ext.block_count * BLOCK_BYTES as u64 {
            return Err(ChunkError::BadIndex(format!(
                "input extent at block {} has {} bytes for {} blocks",
                ext.start_block,
                data.len(),
                ext.block_count
            )));
        }
        let block = |i: u64| &data[(i * 4096) as usize..((i + 1) * 4096) as usize];
        let mut b = 0u64;
        let mut incompressible = false;
        while b < ext.block_count {
            let zero = is_zero(block(b));
            let mut e = b + 1;
            while e < ext.block_count
                && is_zero(block(e)) == zero
                && (zero || e - b < self.frame_blocks)
            {
                e += 1;
            }
            if zero {
                self.zero(ext.start_block + b, e - b, ext.seq);
            } else {
                let raw = &data[(b * 4096) as usize..(e * 4096) as usize];
                self.data(ext.start_block + b, ext.seq, raw, &mut incompressible)?;
            }
            b = e;
        }
        Ok(())
    }

    /// A data frame of `raw` (whole blocks from `start`). A frame not worth compressing is
    /// stored raw; after one such frame the rest of the same write is not even tried
    /// (`incompressible`): one write is usually one kind of data, and zstd on incompressible
    /// data costs as much as on any other (docs/design/compress-only-what-saves.md).
    fn data(
        &mut self,
        start: u64,
        seq: u64,
        raw: &'a [u8],
        incompressible: &mut bool,
    ) -> Result<(), ChunkError> {
        let compressed = if *incompressible || !self.opts.compress || !self.probe.should_try() {
            None
        } else {
            let c = compress(raw, self.opts.zstd_level)?;
            let worth = worth_compressing(c.len(), raw.len());
            self.probe.record(worth);
            *incompressible = !worth;
            worth.then_some(c)
        };
        let (frame, encoding) = match compressed {
            Some(c) => (std::borrow::Cow::Owned(c), FrameEncoding::Zstd),
            None => (std::borrow::Cow::Borrowed(raw), FrameEncoding::Raw),
        };
        self.index.push(ChunkExtent {
            start_block: start,
            seq,
            block_count: (raw.len() / BLOCK_BYTES) as u32,
            kind: ExtentKind::Data,
            encoding,
            frame_offset: 0,
            frame_len: frame.len() as u32,
            frame_crc: crc32fast::hash(&frame),
        });
        self.frames.push(frame);
        Ok(())
    }

    /// A zero extent of `count` blocks from `start`, merged into a preceding adjacent zero
    /// extent of the same write, and cut at `u32::MAX` blocks.
    fn zero(&mut self, start: u64, count: u64, seq: u64) {
        if let Some(last) = self.index.last_mut() {
            if last.kind == ExtentKind::Zero
                && last.seq == seq
                && last.start_block + u64::from(last.block_count) == start
                && u64::from(last.block_count) + count <= u64::from(u32::MAX)
            {
                last.block_count += count as u32;
                return;
            }
        }
        let mut left = count;
        let mut at = start;
        while left > 0 {
            let n = left.min(u64::from(u32::MAX));
            self.index.push(ChunkExtent {
                start_block: at,
                seq,
                block_count: n as u32,
                kind: ExtentKind::Zero,
                encoding: FrameEncoding::Zstd,
                frame_offset: 0,
                frame_len: 0,
                frame_crc: 0,
            });
            at += n;
            left -= n;
        }
    }
}

fn encode_header_and_index(h: &ChunkHeader, index: &[ChunkExtent], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&CHUNK_MAGIC.to_le_bytes());
    out.extend_from_slice(&CHUNK_VERSION.to_le_bytes());
    out.extend_from_slice(&h.flags.to_le_bytes());
    out.extend_from_slice(&h.volume_tag.to_le_bytes());
    out.extend_from_slice(&h.object_id.to_le_bytes());
    out.extend_from_slice(&h.min_seq.to_le_bytes());
    out.extend_from_slice(&h.max_seq.to_le_bytes());
    out.extend_from_slice(&h.extent_count.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for e in index {
        out.extend_from_slice(&e.start_block.to_le_bytes());
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.block_count.to_le_bytes());
        out.push(e.kind as u8);
        out.push(e.encoding as u8);
        out.extend_from_slice(&[0u8; 2]);
        out.extend_from_slice(&e.frame_offset.to_le_bytes());
        out.extend_from_slice(&e.frame_len.to_le_bytes());
        out.extend_from_slice(&e.frame_crc.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 44]);
    crc.update(&out[start + CHUNK_HEADER_LEN..]);
    let crc = crc.finalize().to_le_bytes();
    out[start + 44..start + 48].copy_from_slice(&crc);
}

/// Decodes the fixed header at the start of a chunk object (`b`: at least its first
/// `CHUNK_HEADER_LEN` bytes). Checks length, magic and version only: the header's CRC covers the
/// index too and is verified by [`decode_index`].
///
/// # Errors
/// `Truncated` when `b` is shorter than the header, `BadMagic`, `BadVersion`.
pub fn decode_header(b: &[u8]) -> Result<ChunkHeader, ChunkError> {
    if b.len() < CHUNK_HEADER_LEN {
        return Err(ChunkError::Truncated {
            need: CHUNK_HEADER_LEN,
            have: b.len(),
        });
    }
    let magic = u32_at(b, 0);
    if magic != CHUNK_MAGIC {
        return Err(ChunkError::BadMagic(magic));
    }
    let version = u16_at(b, 4);
    if version != CHUNK_VERSION {
        return Err(ChunkError::BadVersion(version));
    }
    Ok(ChunkHeader {
        flags: u16_at(b, 6),
        volume_tag: u64_at(b, 8),
        object_id: u64_at(b, 16),
        min_seq: u64_at(b, 24),
        max_seq: u64_at(b, 32),
        extent_count: u32_at(b, 40),
    })
}

/// Decodes and verifies the header and index of a chunk object (`b` may be just the object's
/// first [`ChunkHeader::index_len`] bytes). Frame bounds are checked against `object_len`.
pub fn decode_index(
    b: &[u8],
    object_len: u64,
) -> Result<(ChunkHeader, Vec<ChunkExtent>), ChunkError> {
    let header = decode_header(b)?;
    let need = header.index_len();
    if (b.len() as u64) < need || object_len < need {
        return Err(ChunkError::Truncated {
            need: need.min(usize::MAX as u64) as usize,
            have: b.len().min(object_len as usize),
        });
    }
    let need = need as usize;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&b[0..44]);
    crc.update(&b[CHUNK_HEADER_LEN..need]);
    if crc.finalize() != u32_at(b, 44) {
        return Err(ChunkError::Crc { what: "index" });
    }
    let mut index = Vec::with_capacity(header.extent_count as usize);
    let mut prev_end = 0u64;
    for i in 0..header.extent_count as usize {
        let at = CHUNK_HEADER_LEN + i * INDEX_ENTRY_LEN;
        let kind = match b[at + 20] {
            1 => ExtentKind::Data,
            2 => ExtentKind::Zero,
            k => return Err(ChunkError::BadIndex(format!("extent {i}: kind {k}"))),
        };
        let e = ChunkExtent {
            start_block: u64_at(b, at),
            seq: u64_at(b, at + 8),
            block_count: u32_at(b, at + 16),
            kind,
            frame_offset: u32_at(b, at + 24),
            frame_len: u32_at(b, at + 28),
            frame_crc: u32_at(b, at + 32),
            encoding: FrameEncoding::from_u8(b[at + 21]).ok_or_else(|| {
                ChunkError::BadIndex(format!("extent {i}: frame encoding {}", b[at + 21]))
            })?,
        };
        let end = e.start_block.checked_add(u64::from(e.block_count));
        let frame_end = u64::from(e.frame_offset) + u64::from(e.frame_len);
        let bad = e.block_count == 0
            || end.is_none()
            || (i > 0 && e.start_block < prev_end)
            || (kind == ExtentKind::Data
                && (e.block_count > MAX_FRAME_BLOCKS
                    || (e.frame_offset as usize) < need
                    || frame_end > object_len))
            // A zero extent has no frame (FORMAT.md: offset and length 0).
            || (kind == ExtentKind::Zero && (e.frame_offset != 0 || e.frame_len != 0));
        if bad {
            return Err(ChunkError::BadIndex(format!("extent {i}: {e:?}")));
        }
        prev_end = end.unwrap_or(u64::MAX);
        index.push(e);
    }
    Ok((header, index))
}

/// Bytes of a chunk object that its header and `index` account for: the end of its last frame,
/// or of its index when it stores no frame. This writer places the frames right after the index
/// and one after another, so that is the object's length, known from a ranged read of the
/// index alone (disaster recovery counts a chunk's stored bytes with it).
pub fn indexed_len(header: &ChunkHeader, index: &[ChunkExtent]) -> u64 {
    index
        .iter()
        .map(|e| u64::from(e.frame_offset) + u64::from(e.frame_len))
        .fold(header.index_len(), u64::max)
}

/// Verifies a frame's CRC and decodes it (zstd or raw) to exactly `blocks * 4096` bytes.
/// CPU-bound: call from a blocking thread.
///
/// Errors: [`ChunkError::Crc`], [`ChunkError::Frame`] (bad block count, length, or zstd data).
pub fn decode_frame(
    frame: &[u8],
    crc: u32,
    blocks: u32,
    encoding: FrameEncoding,
) -> Result<Bytes, ChunkError> {
    decode_frame_with(frame, crc, blocks, encoding, Bytes::copy_from_slice)
}

/// [`decode_frame`] of a frame held in `frame` alone: a raw frame is returned as `frame`
/// itself (shared, not copied).
pub fn decode_shared_frame(
    frame: &Bytes,
    crc: u32,
    blocks: u32,
    encoding: FrameEncoding,
) -> Result<Bytes, ChunkError> {
    decode_frame_with(frame, crc, blocks, encoding, |_| frame.clone())
}

/// [`decode_frame`], with `raw` making the result of a raw frame from its verified bytes.
fn decode_frame_with(
    frame: &[u8],
    crc: u32,
    blocks: u32,
    encoding: FrameEncoding,
    raw: impl FnOnce(&[u8]) -> Bytes,
) -> Result<Bytes, ChunkError> {
    if crc32fast::hash(frame) != crc {
        return Err(ChunkError::Crc { what: "frame" });
    }
    if blocks == 0 || blocks > MAX_FRAME_BLOCKS {
        return Err(ChunkError::Frame(format!("frame of {blocks} blocks")));
    }
    let expected = blocks as usize * BLOCK_BYTES;
    if encoding == FrameEncoding::Raw {
        if frame.len() != expected {
            return Err(ChunkError::Frame(format!(
                "raw frame of {} bytes, expected {expected}",
                frame.len()
            )));
        }
        return Ok(raw(frame));
    }
    let data = DCTX
        .with(
            || zstd::bulk::Decompressor::new().ok(),
            |d| d.decompress(frame, expected),
        )
        .unwrap_or_else(|| zstd::bulk::decompress(frame, expected))
        .map_err(|e| ChunkError::Frame(e.to_string()))?;
    if data.len() != expected {
        return Err(ChunkError::Frame(format!(
            "frame decompressed to {} bytes, expected {expected}",
            data.len()
        )));
    }
    Ok(Bytes::from(data))
}

/// Decodes a whole chunk object and verifies every frame (CRC, decompression, length).
/// Returns the header and index. CPU-bound.
pub fn verify(object: &[u8]) -> Result<(ChunkHeader, Vec<ChunkExtent>), ChunkError> {
    let (header, index) = decode_index(object, object.len() as u64)?;
    for e in index.iter().filter(|e| e.kind == ExtentKind::Data) {
        let start = e.frame_offset as usize;
        let end = start + e.frame_len as usize;
        decode_frame(&object[start..end], e.frame_crc, e.block_count, e.encoding)?;
    }
    Ok((header, index))
}

/// Splits chunk input (sorted) into groups of at most `max_bytes` of data each, cutting data
/// extents at block boundaries (zero-copy); zero extents cost nothing but an index entry, and a
/// group holds at most `max_extents` entries. Every group is non-empty.
pub fn split_input(
    input: Vec<InputExtent>,
    max_bytes: u64,
    max_extents: usize,
) -> Vec<Vec<InputExtent>> {
    let max_blocks = (max_bytes / BLOCK_BYTES as u64).max(1);
    let mut groups = Vec::new();
    let mut cur: Vec<InputExtent> = Vec::new();
    let mut cur_blocks = 0u64;
    for mut ext in input {
        loop {
            if cur.len() >= max_extents.max(1) || (ext.data.is_some() && cur_blocks >= max_blocks) {
                groups.push(std::mem::take(&mut cur));
                cur_blocks = 0;
            }
            let Some(data) = &ext.data else {
                cur.push(ext);
                break;
            };
            let room = max_blocks - cur_blocks;
            if ext.block_count <= room {
                cur_blocks += ext.block_count;
                cur.push(ext);
                break;
            }
            let cut = room as usize * BLOCK_BYTES;
            cur.push(InputExtent {
                start_block: ext.start_block,
                block_count: room,
                seq: ext.seq,
                data: Some(data.slice(..cut)),
            });
            cur_blocks += room;
            ext = InputExtent {
                start_block: ext.start_block + room,
                block_count: ext.block_count - room,
                seq: ext.seq,
                data: Some(data.slice(cut..)),
            };
        }
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    groups
}

#[cfg(test)]
mod tests {
    /// The options these tests' expected layouts were written for: 64 KiB frames.
    const SIXTEEN_BLOCK_FRAMES: ChunkOptions = ChunkOptions {
        frame_blocks: 16,
        zstd_level: 1,
        compress: true,
    };
    use super::*;
    use proptest::prelude::*;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK_BYTES]
    }

    #[test]
    fn round_trip_with_zero_detection_and_frames() {
        let mut data = Vec::new();
        for i in 0..40u8 {
            data.extend(block(if (10..13).contains(&i) { 0 } else { i + 1 }));
        }
        let input = vec![
            InputExtent {
                start_block: 100,
                block_count: 40,
                seq: 5,
                data: Some(Bytes::from(data.clone())),
            },
            InputExtent {
                start_block: 200,
                block_count: 1000,
                seq: 6,
                data: None,
            },
        ];
        let (obj, index) = build(9, 77, &input, SIXTEEN_BLOCK_FRAMES, Vec::new()).unwrap();
        assert_eq!(
            obj.as_ptr() as usize % DIRECT_ALIGN,
            0,
            "aligned for direct I/O"
        );
        let (h, decoded) = decode_index(&obj, obj.len() as u64).unwrap();
        assert_eq!(decoded, index);
        assert_eq!(
            (h.object_id, h.volume_tag, h.min_seq, h.max_seq),
            (77, 9, 5, 6)
        );
        // blocks 100..110 data, 110..113 zero, 113..129 data (16), 129..140 data, 200..1200 zero
        let shape: Vec<_> = index
            .iter()
            .map(|e| (e.start_block, e.block_count, e.kind))
            .collect();
        assert_eq!(
            shape,
            vec![
                (100, 10, ExtentKind::Data),
                (110, 3, ExtentKind::Zero),
                (113, 16, ExtentKind::Data),
                (129, 11, ExtentKind::Data),
                (200, 1000, ExtentKind::Zero),
            ]
        );
        let mut rebuilt = Vec::new();
        for e in &index {
            match e.kind {
                ExtentKind::Data => {
                    let f = &obj[e.frame_offset as usize..(e.frame_offset + e.frame_len) as usize];
                    rebuilt.extend_from_slice(
                        &decode_frame(f, e.frame_crc, e.block_count, e.encoding).unwrap(),
                    );
                }
                ExtentKind::Zero if e.start_block < 200 => {
                    rebuilt.extend(vec![0u8; e.block_count as usize * BLOCK_BYTES])
                }
                ExtentKind::Zero => {}
            }
        }
        assert_eq!(rebuilt, data);
        assert_eq!(indexed_len(&h, &index), obj.len() as u64, "frames and all");
        let zeros = [InputExtent {
            start_block: 0,
            block_count: 8,
            seq: 1,
            data: None,
        }];
        let (obj, index) = build(9, 78, &zeros, SIXTEEN_BLOCK_FRAMES, Vec::new()).unwrap();
        let (h, _) = decode_index(&obj, obj.len() as u64).unwrap();
        assert_eq!(indexed_len(&h, &index), obj.len() as u64, "no frame");
    }

    #[test]
    fn header_alone_tells_how_much_to_read_for_the_index() {
        let input: Vec<_> = (0..3u64)
            .map(|i| InputExtent {
                start_block: i * 10,
                block_count: 2,
                seq: 4 + i,
                data: Some(Bytes::from([block(1), block(i as u8 + 2)].concat())),
            })
            .collect();
        let (obj, index) = build(3, 8, &input, ChunkOptions::default(), Vec::new()).unwrap();
        let h = decode_header(&obj[..CHUNK_HEADER_LEN]).unwrap();
        assert_eq!(
            (h.volume_tag, h.object_id, h.min_seq, h.max_seq),
            (3, 8, 4, 6)
        );
        assert_eq!(h.extent_count as usize, index.len());
        let len = h.index_len() as usize;
        assert_eq!(len, CHUNK_HEADER_LEN + index.len() * INDEX_ENTRY_LEN);
        // Exactly the index's bytes decode; one fewer is truncated.
        assert_eq!(
            decode_index(&obj[..len], obj.len() as u64).unwrap().1,
            index
        );
        assert!(matches!(
            decode_index(&obj[..len - 1], obj.len() as u64),
            Err(ChunkError::Truncated { .. })
        ));
        assert!(matches!(
            decode_header(&obj[..CHUNK_HEADER_LEN - 1]),
            Err(ChunkError::Truncated { .. })
        ));
        let mut bad = obj[..CHUNK_HEADER_LEN].to_vec();
        bad[0] ^= 1;
        assert!(matches!(decode_header(&bad), Err(ChunkError::BadMagic(_))));
        let mut bad = obj[..CHUNK_HEADER_LEN].to_vec();
        bad[4] ^= 1;
        assert!(matches!(
            decode_header(&bad),
            Err(ChunkError::BadVersion(_))
        ));
    }

    #[test]
    fn corruption_is_detected() {
        let input = vec![InputExtent {
            start_block: 0,
            block_count: 2,
            seq: 1,
            data: Some(Bytes::from([block(1), block(2)].concat())),
        }];
        let (obj, index) = build(1, 1, &input, ChunkOptions::default(), Vec::new()).unwrap();
        let head = CHUNK_HEADER_LEN + INDEX_ENTRY_LEN;
        for i in 0..head {
            let mut b = obj.to_vec();
            b[i] ^= 0x10;
            assert!(decode_index(&b, b.len() as u64).is_err(), "byte {i}");
        }
        let e = index[0];
        let mut f = obj[e.frame_offset as usize..].to_vec();
        f[3] ^= 1;
        assert_eq!(
            decode_frame(&f, e.frame_crc, 2, e.encoding),
            Err(ChunkError::Crc { what: "frame" })
        );
        assert!(decode_index(&obj[..head - 1], obj.len() as u64).is_err());
        assert!(
            decode_index(&obj, (head + 1) as u64).is_err(),
            "frame beyond object end"
        );
    }

    #[test]
    fn frames_that_compress_by_less_than_an_eighth_are_stored_raw() {
        assert!(worth_compressing(14336, 16384));
        assert!(!worth_compressing(14337, 16384));
        // Blocks of random bytes after a run of zeros: 1/10 zeros is stored raw, 1/4 compressed.
        let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(3);
        for (zero_bytes, want) in [(410, FrameEncoding::Raw), (1024, FrameEncoding::Zstd)] {
            let mut data = vec![0u8; 4 * BLOCK_BYTES];
            for block in data.chunks_mut(BLOCK_BYTES) {
                rand::RngCore::fill_bytes(&mut rng, &mut block[zero_bytes..]);
            }
            let input = vec![InputExtent {
                start_block: 0,
                block_count: 4,
                seq: 1,
                data: Some(Bytes::from(data)),
            }];
            let (_, index) = build(1, 1, &input, ChunkOptions::default(), Vec::new()).unwrap();
            assert_eq!(index[0].encoding, want, "{zero_bytes} zero bytes per block");
        }
    }

    #[test]
    fn after_eight_misses_in_a_row_one_frame_in_sixteen_is_tried() {
        let mut p = CompressionProbe::default();
        for _ in 0..8 {
            assert!(p.should_try());
            p.record(false);
        }
        let tried: Vec<bool> = (0..32).map(|_| p.should_try()).collect();
        assert_eq!(tried.iter().filter(|t| **t).count(), 2, "{tried:?}");
        assert!(tried[15] && tried[31]);
        p.record(true);
        assert!(
            (0..8).all(|_| p.should_try()),
            "a frame that compresses ends the sampling"
        );
    }

    #[test]
    fn compressible_writes_after_random_ones_are_compressed_again_soon() {
        let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(5);
        let input: Vec<InputExtent> = (0..60u64)
            .map(|i| {
                let mut b = block(b'a');
                if i < 30 {
                    rand::RngCore::fill_bytes(&mut rng, &mut b);
                }
                InputExtent {
                    start_block: i * 2,
                    block_count: 1,
                    seq: i + 1,
                    data: Some(Bytes::from(b)),
                }
            })
            .collect();
        let (_, index) = build(1, 1, &input, ChunkOptions::default(), Vec::new()).unwrap();
        let enc: Vec<FrameEncoding> = index.iter().map(|e| e.encoding).collect();
        assert!(enc[..30].iter().all(|e| *e == FrameEncoding::Raw));
        let late = enc[30..]
            .iter()
            .position(|e| *e == FrameEncoding::Zstd)
            .unwrap();
        assert!(late < 16, "{enc:?}");
        assert!(enc[30 + late..].iter().all(|e| *e == FrameEncoding::Zstd));
    }

    #[test]
    fn a_reused_buffer_builds_the_same_object() {
        let input = vec![InputExtent {
            start_block: 5,
            block_count: 3,
            seq: 2,
            data: Some(Bytes::from([block(1), block(0), block(9)].concat())),
        }];
        let (fresh, _) = build(1, 1, &input, ChunkOptions::default(), Vec::new()).unwrap();
        let mut dirty = vec![0xAAu8; 3 * fresh.len()];
        dirty.truncate(fresh.len() / 2);
        let (reused, _) = build(1, 1, &input, ChunkOptions::default(), dirty).unwrap();
        assert_eq!(reused, fresh);
    }

    /// A zero extent that claims a frame is refused even when the index CRC matches (found by
    /// the chunk_object fuzz target: such an index used to pass `verify` with a frame beyond
    /// the object's end).
    #[test]
    fn zero_extent_with_a_frame_is_refused() {
        let input = vec![InputExtent {
            start_block: 0,
            block_count: 3,
            seq: 1,
            data: None,
        }];
        let (obj, index) = build(1, 1, &input, ChunkOptions::default(), Vec::new()).unwrap();
        let (header, _) = decode_index(&obj, obj.len() as u64).unwrap();
        assert_eq!(index[0].kind, ExtentKind::Zero);
        for (offset, len) in [(0, 1), (obj.len() as u32, 0), (1 << 20, 4096)] {
            let mut bad = index.clone();
            bad[0].frame_offset = offset;
            bad[0].frame_len = len;
            let mut b = Vec::new();
            encode_header_and_index(&header, &bad, &mut b);
            assert!(
                matches!(
                    decode_index(&b, b.len() as u64),
                    Err(ChunkError::BadIndex(_))
                ),
                "offset {offset} len {len}"
            );
            assert!(verify(&b).is_err());
        }
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut random = vec![0u8; 40 * BLOCK_BYTES];
        let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(7);
        rand::RngCore::fill_bytes(&mut rng, &mut random);
        let input = vec![
            InputExtent {
                start_block: 0,
                block_count: 40,
                seq: 1,
                data: Some(Bytes::from(random.clone())),
            },
            InputExtent {
                start_block: 100,
                block_count: 20,
                seq: 2,
                data: Some(Bytes::from(vec![7u8; 20 * BLOCK_BYTES])),
            },
        ];
        let (obj, index) = build(1, 1, &input, SIXTEEN_BLOCK_FRAMES, Vec::new()).unwrap();
        let (_, decoded) = decode_index(&obj, obj.len() as u64).unwrap();
        assert_eq!(decoded, index);
        let enc: Vec<(u64, FrameEncoding)> =
            index.iter().map(|e| (e.start_block, e.encoding)).collect();
        assert_eq!(
            enc,
            vec![
                (0, FrameEncoding::Raw),
                (16, FrameEncoding::Raw),
                (32, FrameEncoding::Raw),
                (100, FrameEncoding::Zstd),
                (116, FrameEncoding::Zstd)
            ]
        );
        let mut back = Vec::new();
        for e in &index[..3] {
            let f = &obj[e.frame_offset as usize..(e.frame_offset + e.frame_len) as usize];
            back.extend_from_slice(
                &decode_frame(f, e.frame_crc, e.block_count, e.encoding).unwrap(),
            );
        }
        assert_eq!(back, random);
        // A raw frame of the wrong length is refused, not padded.
        let e = index[0];
        let f = &obj[e.frame_offset as usize..(e.frame_offset + e.frame_len - 1) as usize];
        assert!(decode_frame(f, crc32fast::hash(f), e.block_count, FrameEncoding::Raw).is_err());
        // Held alone, a raw frame is verified and shared, not copied; a zstd frame is decoded.
        for e in [index[1], index[3]] {
            let at = e.frame_offset as usize..(e.frame_offset + e.frame_len) as usize;
            let f = Bytes::copy_from_slice(&obj[at.clone()]);
            let shared = decode_shared_frame(&f, e.frame_crc, e.block_count, e.encoding).unwrap();
            let copied = decode_frame(&obj[at], e.frame_crc, e.block_count, e.encoding).unwrap();
            assert_eq!(shared, copied);
            assert_eq!(
                shared.as_ptr() == f.as_ptr(),
                e.encoding == FrameEncoding::Raw
            );
            let bad_crc = e.frame_crc ^ 1;
            assert!(decode_shared_frame(&f, bad_crc, e.block_count, e.encoding).is_err());
        }
    }

    #[test]
    fn split_input_bounds_data_per_chunk() {
        let input = vec![
            InputExtent {
                start_block: 0,
                block_count: 10,
                seq: 1,
                data: Some(Bytes::from(vec![1u8; 10 * BLOCK_BYTES])),
            },
            InputExtent {
                start_block: 20,
                block_count: 100,
                seq: 2,
                data: None,
            },
            InputExtent {
                start_block: 200,
                block_count: 3,
                seq: 3,
                data: Some(Bytes::from(vec![2u8; 3 * BLOCK_BYTES])),
            },
        ];
        let groups = split_input(input, 4 * BLOCK_BYTES as u64, 1000);
        let shape: Vec<Vec<(u64, u64)>> = groups
            .iter()
            .map(|g| g.iter().map(|e| (e.start_block, e.block_count)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![(0, 4)],
                vec![(4, 4)],
                vec![(8, 2), (20, 100), (200, 2)],
                vec![(202, 1)]
            ]
        );
        assert_eq!(
            groups[1][0].data.as_ref().map(|d| d.len()),
            Some(4 * BLOCK_BYTES)
        );
        let many: Vec<InputExtent> = (0..5)
            .map(|i| InputExtent {
                start_block: i * 2,
                block_count: 1,
                seq: 1,
                data: None,
            })
            .collect();
        assert_eq!(split_input(many, 1 << 20, 2).len(), 3);
    }

    proptest! {
        /// Any input round-trips: every block decodes from the object as it was written
        /// (zero extents for zero blocks), and the index covers exactly the input's blocks.
        #[test]
        fn built_objects_decode_to_their_input(
            writes in proptest::collection::vec(
                (0u64..4, proptest::collection::vec(0u8..4, 1..10)), 1..8),
            frame_blocks in 1u32..6,
            seed in any::<u64>(),
        ) {
            let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(seed);
            let (mut input, mut at) = (Vec::new(), 0u64);
            for (i, (gap, kinds)) in writes.iter().enumerate() {
                at += gap;
                // Block kinds: 0 zeros, 1 one repeated byte, 2 random, 3 half random.
                let mut data = vec![0u8; kinds.len() * BLOCK_BYTES];
                for (b, k) in data.chunks_mut(BLOCK_BYTES).zip(kinds) {
                    match k {
                        1 => b.fill(7),
                        2 => rand::RngCore::fill_bytes(&mut rng, b),
                        3 => rand::RngCore::fill_bytes(&mut rng, &mut b[2048..]),
                        _ => {}
                    }
                }
                let none = kinds.iter().all(|k| *k == 0) && i % 2 == 0;
                input.push(InputExtent {
                    start_block: at,
                    block_count: kinds.len() as u64,
                    seq: 10 + i as u64,
                    data: (!none).then(|| Bytes::from(data)),
                });
                at += kinds.len() as u64;
            }
            let opts = ChunkOptions { frame_blocks, zstd_level: 1, compress: true };
            let (obj, index) = build(1, 2, &input, opts, vec![0xEE; 100]).unwrap();
            let (h, decoded) = decode_index(&obj, obj.len() as u64).unwrap();
            prop_assert_eq!(&decoded, &index);
            prop_assert_eq!((h.min_seq, h.max_seq), (10, 9 + input.len() as u64));
            let mut blocks = std::collections::BTreeMap::new();
            for e in &index {
                let bytes = match e.kind {
                    ExtentKind::Zero => vec![0u8; e.block_count as usize * BLOCK_BYTES],
                    ExtentKind::Data => {
                        prop_assert!(e.block_count <= frame_blocks);
                        let at = e.frame_offset as usize;
                        let frame = &obj[at..at + e.frame_len as usize];
                        decode_frame(frame, e.frame_crc, e.block_count, e.encoding)
                            .unwrap()
                            .to_vec()
                    }
                };
                for (i, b) in bytes.chunks(BLOCK_BYTES).enumerate() {
                    prop_assert!(blocks.insert(e.start_block + i as u64, (e.seq, b.to_vec())).is_none());
                }
            }
            let mut want = std::collections::BTreeMap::new();
            for ext in &input {
                for i in 0..ext.block_count {
                    let b = match &ext.data {
                        Some(d) => d[i as usize * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES].to_vec(),
                        None => vec![0u8; BLOCK_BYTES],
                    };
                    want.insert(ext.start_block + i, (ext.seq, b));
                }
            }
            prop_assert!(blocks == want);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), crc in any::<u32>(), blocks in any::<u32>()) {
            let _ = decode_index(&bytes, bytes.len() as u64);
            let _ = decode_frame(&bytes, crc, blocks % 8, FrameEncoding::Zstd);
            let _ = decode_frame(&bytes, crc, blocks % 8, FrameEncoding::Raw);
        }
    }
}

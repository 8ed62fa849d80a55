//! WAL on-disk format: the segment header (version 2) and the record header (version 1).
//! `docs/FORMAT.md` ("WAL") is the prose spec of these bytes; keep both in step.
//!
//! All integers are little-endian.
//!
//! Segment header (32 bytes), at offset 0 of every segment file:
//! `magic u32 = "VBWS" | version u16 | reserved u16 | segment_no u64 | volume_tag u64 | crc32 u32 | reserved u32`
//! (crc32 covers bytes 0..24). Version 2 segments (this build writes only those) are written in
//! whole 4 KiB pages and may be preallocated: after the last record the file holds zero bytes
//! up to its end ([`is_padding`]); version 1 segments (read still) end after their last record.
//!
//! Record kinds: 1 write, 2 zero, 3 sync note (no blocks, no payload; `seq` = highest sequence
//! number synced when it was written; never applied, read by replay to tell damage from a torn
//! tail).
//!
//! Record header (44 bytes), followed by `payload_len` bytes of payload:
//! `magic u32 = "VBWL" | version u8 | kind u8 | flags u16 | seq u64 | volume_tag u64 |
//!  start_block u64 | block_count u32 | payload_len u32 | crc32 u32`
//! (crc32 covers header bytes 0..40 and then the payload).
//!
//! Trim mark (24 bytes), the whole of the file `trimmed.mark` beside the segments:
//! `magic u32 = "VBWT" | version u16 | reserved u16 | trimmed_through u64 | crc32 u32 | reserved u32`
//! (crc32 covers bytes 0..16).

use crate::block::BLOCK_SIZE;
use crate::codec::{u16_at, u32_at, u64_at};

/// Magic at the start of a segment file: ASCII "VBWS".
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"VBWS");
/// Magic at the start of every record: ASCII "VBWL".
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"VBWL");
/// Record and trim mark format version (the only one this build writes and reads).
pub const WAL_VERSION: u8 = 1;
/// Segment header version this build writes; it reads 1 and 2 ([`segment_version`]).
pub const SEGMENT_VERSION: u16 = 2;
/// Writes to a version 2 segment cover whole pages of this many bytes.
pub const WAL_PAGE: usize = 4096;
/// Magic at the start of the trim mark file: ASCII "VBWT".
pub const TRIM_MARK_MAGIC: u32 = u32::from_le_bytes(*b"VBWT");
/// Trim mark length in bytes.
pub const TRIM_MARK_LEN: usize = 24;
/// Segment header length in bytes.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Record header length in bytes.
pub const RECORD_HEADER_LEN: usize = 44;
/// Largest payload a record may carry: 64 MiB (an NBD request is at most 32 MiB; unaligned
/// requests grow by at most two blocks).
pub const MAX_RECORD_PAYLOAD: u32 = 64 << 20;
/// Flag bit: the write was sent with `NBD_CMD_FLAG_FUA` (informational).
pub const FLAG_FUA: u16 = 1;

/// What a record does to its block range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// The payload holds `block_count * 4096` bytes of new data.
    Write = 1,
    /// The range reads as zeros from now on (trim or write-zeroes); no payload.
    Zero = 2,
    /// Not a write: `seq` is the highest sequence number that was on stable storage when this
    /// record was written (every record up to it was synced). No blocks, no payload. Replay reads
    /// these to tell a torn tail from damage to synced records (FORMAT.md, "Replay").
    SyncNote = 3,
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Data or zeroes.
    pub kind: RecordKind,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Volume sequence number; strictly increasing in file order.
    pub seq: u64,
    /// [`crate::ids::VolumeId::tag`] of the owning volume.
    pub volume_tag: u64,
    /// First block.
    pub start_block: u64,
    /// Number of blocks (at least 1).
    pub block_count: u32,
    /// Payload bytes: `block_count * 4096` for writes, 0 for zeroes.
    pub payload_len: u32,
}

/// Why bytes are not a valid record or segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header (or header + payload) needs.
    #[error("short: need {need} bytes, have {have}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number is wrong.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The version is not [`WAL_VERSION`].
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Unknown record kind.
    #[error("unknown record kind {0}")]
    BadKind(u8),
    /// Lengths disagree with each other or exceed [`MAX_RECORD_PAYLOAD`].
    #[error("inconsistent lengths: {block_count} blocks, payload {payload_len} bytes")]
    BadLength {
        /// Declared blocks.
        block_count: u32,
        /// Declared payload bytes.
        payload_len: u32,
    },
    /// A fixed-size structure (the trim mark) has another size.
    #[error("wrong size: expected {expected} bytes, found {found}")]
    WrongSize {
        /// Bytes the structure has.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// The CRC32 does not match the bytes.
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// CRC in the file.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
}

/// Encodes a segment header for segment `segment_no` of the volume with `volume_tag`.
pub fn encode_segment_header(segment_no: u64, volume_tag: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&segment_no.to_le_bytes());
    h[16..24].copy_from_slice(&volume_tag.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Verifies a fixed-size block of the WAL directory (segment header, trim mark): at least `len`
/// bytes, `magic` at 0, a version in `versions` as u16 at 4, and the CRC-32 of bytes `0..crc_at`
/// stored at `crc_at`.
fn verify_fixed(
    b: &[u8],
    len: usize,
    magic: u32,
    versions: std::ops::RangeInclusive<u16>,
    crc_at: usize,
) -> Result<(), DecodeError> {
    if b.len() < len {
        return Err(DecodeError::Short {
            need: len,
            have: b.len(),
        });
    }
    let found = u32_at(b, 0);
    if found != magic {
        return Err(DecodeError::BadMagic(found));
    }
    let version = u16_at(b, 4);
    if !versions.contains(&version) {
        return Err(DecodeError::BadVersion(version.min(255) as u8));
    }
    let stored = u32_at(b, crc_at);
    let computed = crc32fast::hash(&b[0..crc_at]);
    if stored != computed {
        return Err(DecodeError::Crc { stored, computed });
    }
    Ok(())
}

/// Decodes a segment header into `(segment_no, volume_tag)`.
pub fn decode_segment_header(b: &[u8]) -> Result<(u64, u64), DecodeError> {
    verify_fixed(
        b,
        SEGMENT_HEADER_LEN,
        SEGMENT_MAGIC,
        1..=SEGMENT_VERSION,
        24,
    )?;
    Ok((u64_at(b, 8), u64_at(b, 16)))
}

/// The version of a segment header that [`decode_segment_header`] accepted (1 or 2).
pub fn segment_version(b: &[u8]) -> u16 {
    if b.len() < 6 {
        return 0;
    }
    u16_at(b, 4)
}

/// True when `b` is the zero padding after a version 2 segment's last record: every byte is zero
/// (no record starts with a zero byte, its magic is "VBWL").
pub fn is_padding(b: &[u8]) -> bool {
    crate::block::is_zero(b)
}

/// Encodes the trim mark: every record with `seq <= trimmed_through` may have been deleted.
pub fn encode_trim_mark(trimmed_through: u64) -> [u8; TRIM_MARK_LEN] {
    let mut h = [0u8; TRIM_MARK_LEN];
    h[0..4].copy_from_slice(&TRIM_MARK_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&u16::from(WAL_VERSION).to_le_bytes());
    h[8..16].copy_from_slice(&trimmed_through.to_le_bytes());
    let crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a trim mark into `trimmed_through`. The file must be exactly [`TRIM_MARK_LEN`] bytes.
pub fn decode_trim_mark(b: &[u8]) -> Result<u64, DecodeError> {
    if b.len() > TRIM_MARK_LEN {
        return Err(DecodeError::WrongSize {
            expected: TRIM_MARK_LEN,
            found: b.len(),
        });
    }
    let v = u16::from(WAL_VERSION);
    verify_fixed(b, TRIM_MARK_LEN, TRIM_MARK_MAGIC, v..=v, 16)?;
    Ok(u64_at(b, 8))
}

/// A one-block write record of volume `volume_tag` with sequence number `seq`, every payload byte
/// `fill` (tests of the WAL layer).
#[cfg(test)]
pub(crate) fn one_block_record(volume_tag: u64, seq: u64, fill: u8) -> (RecordHeader, Vec<u8>) {
    let header = RecordHeader {
        kind: RecordKind::Write,
        flags: 0,
        seq,
        volume_tag,
        start_block: seq,
        block_count: 1,
        payload_len: BLOCK_SIZE as u32,
    };
    (header, vec![fill; BLOCK_SIZE as usize])
}

impl RecordHeader {
    /// Encodes the header; the CRC covers the header's first 40 bytes and then `payload`.
    ///
    /// `payload.len()` must equal `self.payload_len`.
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        debug_assert_eq!(payload.len(), self.payload_len as usize);
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        h[4] = WAL_VERSION;
        h[5] = self.kind as u8;
        h[6..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.volume_tag.to_le_bytes());
        h[24..32].copy_from_slice(&self.start_block.to_le_bytes());
        h[32..36].copy_from_slice(&self.block_count.to_le_bytes());
        h[36..40].copy_from_slice(&self.payload_len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[0..40]);
        crc.update(payload);
        h[40..44].copy_from_slice(&crc.finalize().to_le_bytes());
        h
    }

    /// Decodes and structurally checks a header (magic, version, kind, lengths). The CRC is
    /// checked by [`decode_record`], which also needs the payload.
    pub fn decode(b: &[u8]) -> Result<(Self, u32), DecodeError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Short {
                need: RECORD_HEADER_LEN,
                have: b.len(),
            });
        }
        let magic = u32_at(b, 0);
        if magic != RECORD_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if b[4] != WAL_VERSION {
            return Err(DecodeError::BadVersion(b[4]));
        }
        let kind = match b[5] {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::SyncNote,
            k => return Err(DecodeError::BadKind(k)),
        };
        let block_count = u32_at(b, 32);
        let payload_len = u32_at(b, 36);
        let (expected, blocks_ok) = match kind {
            RecordKind::Write => (u64::from(block_count) * BLOCK_SIZE, block_count > 0),
            RecordKind::Zero => (0, block_count > 0),
            RecordKind::SyncNote => (0, block_count == 0),
        };
        if !blocks_ok || u64::from(payload_len) != expected || payload_len > MAX_RECORD_PAYLOAD {
            return Err(DecodeError::BadLength {
                block_count,
                payload_len,
            });
        }
        let header = Self {
            kind,
            flags: u16_at(b, 6),
            seq: u64_at(b, 8),
            volume_tag: u64_at(b, 16),
            start_block: u64_at(b, 24),
            block_count,
            payload_len,
        };
        Ok((header, u32_at(b, 40)))
    }

    /// A sync note of volume `volume_tag`: every record up to `synced_seq` is on stable storage.
    pub fn sync_note(volume_tag: u64, synced_seq: u64) -> Self {
        Self {
            kind: RecordKind::SyncNote,
            flags: 0,
            seq: synced_seq,
            volume_tag,
            start_block: 0,
            block_count: 0,
            payload_len: 0,
        }
    }

    /// Total bytes of header plus payload.
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + self.payload_len as usize
    }
}

/// Decodes one whole record at the start of `b`, verifying its CRC.
/// Returns the header and the payload slice.
pub fn decode_record(b: &[u8]) -> Result<(RecordHeader, &[u8]), DecodeError> {
    let (header, stored) = RecordHeader::decode(b)?;
    let len = header.record_len();
    if b.len() < len {
        return Err(DecodeError::Short {
            need: len,
            have: b.len(),
        });
    }
    let payload = &b[RECORD_HEADER_LEN..len];
    let mut crc = crc32fast::Hasher::new();
    crc.update(&b[0..40]);
    crc.update(payload);
    let computed = crc.finalize();
    if computed != stored {
        return Err(DecodeError::Crc { stored, computed });
    }
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(h: &RecordHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = h.encode(payload).to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn write_header(seq: u64, blocks: u32) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Write,
            flags: FLAG_FUA,
            seq,
            volume_tag: 7,
            start_block: 42,
            block_count: blocks,
            payload_len: blocks * 4096,
        }
    }

    #[test]
    fn trim_mark_round_trip_and_every_bit_flip_is_detected() {
        let m = encode_trim_mark(0x0123_4567_89ab);
        assert_eq!(decode_trim_mark(&m).unwrap(), 0x0123_4567_89ab);
        for bit in 0..(TRIM_MARK_LEN - 4) * 8 {
            let mut bad = m;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_trim_mark(&bad).is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
        assert!(matches!(
            decode_trim_mark(&m[..20]),
            Err(DecodeError::Short { need: 24, have: 20 })
        ));
        let mut long = m.to_vec();
        long.push(0);
        assert!(matches!(
            decode_trim_mark(&long),
            Err(DecodeError::WrongSize {
                expected: 24,
                found: 25
            })
        ));
    }

    #[test]
    fn segment_header_round_trip() {
        let h = encode_segment_header(9, 0xfeed);
        assert_eq!(decode_segment_header(&h).unwrap(), (9, 0xfeed));
        let mut bad = h;
        bad[9] ^= 1;
        assert!(matches!(
            decode_segment_header(&bad),
            Err(DecodeError::Crc { .. })
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let payload = vec![0x5au8; 4096];
        let rec = encode(&write_header(3, 1), &payload);
        for bit in 0..rec.len() * 8 {
            let mut b = rec.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&b).is_err(), "bit {bit} flip undetected");
        }
    }

    #[test]
    fn zero_record_has_no_payload() {
        let h = RecordHeader {
            kind: RecordKind::Zero,
            flags: 0,
            seq: 1,
            volume_tag: 1,
            start_block: 0,
            block_count: 1 << 20,
            payload_len: 0,
        };
        let rec = encode(&h, &[]);
        assert_eq!(rec.len(), RECORD_HEADER_LEN);
        assert_eq!(decode_record(&rec).unwrap().0, h);
    }

    proptest! {
        #[test]
        fn record_round_trip(seq in any::<u64>(), start in any::<u64>(), blocks in 1u32..4, fill in any::<u8>()) {
            let mut h = write_header(seq, blocks);
            h.start_block = start;
            let payload = vec![fill; blocks as usize * 4096];
            let rec = encode(&h, &payload);
            let (d, p) = decode_record(&rec).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
            // Every strict prefix is reported short, never as a record.
            for cut in [0, 1, RECORD_HEADER_LEN - 1, RECORD_HEADER_LEN, rec.len() - 1] {
                let is_short = matches!(decode_record(&rec[..cut]), Err(DecodeError::Short { .. }));
                prop_assert!(is_short);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&bytes);
            let _ = decode_segment_header(&bytes);
        }
    }
}

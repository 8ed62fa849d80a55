//! Shipped WAL objects (docs/design/cluster.md, "Fence"; format in FORMAT.md, "Shipped WAL
//! object"): one group-commit batch of WAL records, stored as `VOLUMEID/wal/COUNTER` with a
//! conditional PUT, or a fence that a takeover stores at the next counter so that the stale
//! owner's next PUT is refused. The records keep the WAL's own format (and CRCs); the object
//! adds a header that names the epoch, the counter, the seqs it holds and the seq through which
//! earlier objects and chunks hold every record (`after_seq`), which lets replay prove there is
//! no gap before it.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{u16_at, u32_at, u64_at};
use crate::wal::record::{decode_record, RECORD_HEADER_LEN};
use crate::wal::{DecodeError, RecordHeader, RecordKind};

/// ASCII `VBWO`.
pub const WAL_OBJECT_MAGIC: u32 = u32::from_le_bytes(*b"VBWO");
/// The format this build writes and reads.
pub const WAL_OBJECT_VERSION: u16 = 1;
/// Header bytes before the records.
pub const WAL_OBJECT_HEADER_LEN: usize = 64;

/// What a shipped WAL object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum WalObjectKind {
    /// A batch of WAL records; without any, a mark: it confirms that its node still owned the
    /// volume when the chunks holding every record through `after_seq` were stored.
    Batch = 1,
    /// No records: the epoch that stored it fenced this counter off from older epochs.
    Fence = 2,
    /// A fence its epoch's owner stored at an open, after objects past a break in the chain
    /// (orphans), which it then deletes: those objects are not part of the volume's history.
    /// A takeover that finds orphans before any other fence refuses the volume as damaged.
    DropFence = 3,
}

impl WalObjectKind {
    /// Whether it is a fence (of either kind): no records, it holds its counter for its epoch.
    pub fn is_fence(self) -> bool {
        matches!(self, Self::Fence | Self::DropFence)
    }
}

/// A decoded object header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalObjectHeader {
    /// Batch or fence.
    pub kind: WalObjectKind,
    /// The epoch of the node that stored it.
    pub epoch: u64,
    /// Its counter (the key's number).
    pub counter: u64,
    /// Every record with a seq up to this one is in an earlier object or in a chunk stored
    /// before this object; the body holds every record after it through `last_seq`. A fence:
    /// the seq through which its node adopted the volume's records.
    pub after_seq: u64,
    /// Seq of the first record (0 for a fence).
    pub first_seq: u64,
    /// Seq of the last record (0 for a fence).
    pub last_seq: u64,
    /// Records in the body.
    pub record_count: u32,
}

/// Why bytes are not a valid shipped WAL object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalObjectError {
    /// The header is damaged or of another format.
    #[error("bad WAL object header: {0}")]
    Header(String),
    /// A record inside is damaged.
    #[error("record {index} of the WAL object: {source}")]
    Record {
        /// Its position.
        index: u32,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
    /// The records do not match the header (count, seqs, order, kinds, length).
    #[error("WAL object inconsistent: {0}")]
    Inconsistent(String),
}

/// Builds a batch object: push records in seq order, then [`WalObjectEncoder::finish`].
pub struct WalObjectEncoder {
    epoch: u64,
    counter: u64,
    after_seq: u64,
    body: BytesMut,
    first_seq: u64,
    last_seq: u64,
    count: u32,
}

impl WalObjectEncoder {
    /// An empty batch of `epoch` at `counter` whose records follow `after_seq` (see
    /// [`WalObjectHeader::after_seq`]).
    pub fn new(epoch: u64, counter: u64, after_seq: u64) -> Self {
        Self {
            epoch,
            counter,
            after_seq,
            body: BytesMut::new(),
            first_seq: 0,
            last_seq: 0,
            count: 0,
        }
    }

    /// Appends a write or zero record (seqs strictly increasing; sync notes are not shipped).
    pub fn push(&mut self, header: &RecordHeader, payload: &[u8]) {
        debug_assert!(header.kind != RecordKind::SyncNote);
        debug_assert!(self.count == 0 || header.seq > self.last_seq);
        debug_assert!(header.seq > self.after_seq);
        if self.count == 0 {
            self.first_seq = header.seq;
        }
        self.last_seq = header.seq;
        self.count += 1;
        self.body.put_slice(&header.encode(payload));
        self.body.put_slice(payload);
    }

    /// Records pushed so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The object's bytes.
    pub fn finish(self) -> Bytes {
        let header = WalObjectHeader {
            kind: WalObjectKind::Batch,
            epoch: self.epoch,
            counter: self.counter,
            after_seq: self.after_seq,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            record_count: self.count,
        };
        let mut out = BytesMut::with_capacity(WAL_OBJECT_HEADER_LEN + self.body.len());
        out.put_slice(&encode_header(&header, self.body.len() as u64));
        out.put_slice(&self.body);
        out.freeze()
    }
}

/// A fence object of `epoch` at `counter`, stored by a node that adopted the volume's records
/// through seq `after_seq` (what chunks and the shipped objects before it hold).
pub fn encode_fence(epoch: u64, counter: u64, after_seq: u64) -> Bytes {
    fence_of(WalObjectKind::Fence, epoch, counter, after_seq)
}

/// A [`WalObjectKind::DropFence`] of `epoch` at `counter`: stored by the volume's owner at an
/// open, after the orphans it is about to delete.
pub fn encode_drop_fence(epoch: u64, counter: u64) -> Bytes {
    fence_of(WalObjectKind::DropFence, epoch, counter, 0)
}

fn fence_of(kind: WalObjectKind, epoch: u64, counter: u64, after_seq: u64) -> Bytes {
    let header = WalObjectHeader {
        kind,
        epoch,
        counter,
        after_seq,
        first_seq: 0,
        last_seq: 0,
        record_count: 0,
    };
    Bytes::copy_from_slice(&encode_header(&header, 0))
}

fn encode_header(h: &WalObjectHeader, body_len: u64) -> [u8; WAL_OBJECT_HEADER_LEN] {
    let mut b = [0u8; WAL_OBJECT_HEADER_LEN];
    b[0..4].copy_from_slice(&WAL_OBJECT_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&WAL_OBJECT_VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&(h.kind as u16).to_le_bytes());
    b[8..16].copy_from_slice(&h.epoch.to_le_bytes());
    b[16..24].copy_from_slice(&h.counter.to_le_bytes());
    b[24..32].copy_from_slice(&h.after_seq.to_le_bytes());
    b[32..40].copy_from_slice(&h.first_seq.to_le_bytes());
    b[40..48].copy_from_slice(&h.last_seq.to_le_bytes());
    b[48..52].copy_from_slice(&h.record_count.to_le_bytes());
    b[52..60].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and verifies a shipped WAL object stored under `counter`: its header (magic,
/// version, CRC, the key's counter, the body length) and every record (its CRC; kinds write or
/// zero; seqs strictly increasing from `first_seq` to `last_seq`; `record_count` of them).
/// Returns the header and the records with their payloads (slices of `b`).
///
/// Errors: [`WalObjectError`]; nothing is returned from a damaged object.
pub fn decode(
    b: &Bytes,
    counter: u64,
) -> Result<(WalObjectHeader, Vec<(RecordHeader, Bytes)>), WalObjectError> {
    let (h, body_len) = decode_header_len(b, counter)?;
    let kind = h.kind;
    let body = b.slice(WAL_OBJECT_HEADER_LEN..);
    if body_len != body.len() as u64 {
        return Err(WalObjectError::Header(format!(
            "body of {} bytes, header says {body_len}",
            body.len(),
        )));
    }
    let inconsistent = |m: String| Err(WalObjectError::Inconsistent(m));
    if kind.is_fence() && (h.record_count != 0 || !body.is_empty()) {
        return inconsistent("a fence with records".into());
    }
    let mut records =
        Vec::with_capacity((h.record_count as usize).min(body.len() / RECORD_HEADER_LEN));
    let mut at = 0usize;
    while at < body.len() {
        let index = records.len() as u32;
        let (rh, payload) = decode_record(&body[at..])
            .map_err(|source| WalObjectError::Record { index, source })?;
        if rh.kind == RecordKind::SyncNote {
            return inconsistent(format!("record {index} is a sync note"));
        }
        if let Some((prev, _)) = records.last() {
            let prev: &RecordHeader = prev;
            if rh.seq <= prev.seq {
                return inconsistent(format!("record {index}: seq {} after {}", rh.seq, prev.seq));
            }
        }
        let start = at + RECORD_HEADER_LEN;
        records.push((rh, body.slice(start..start + payload.len())));
        at += rh.record_len();
    }
    let seqs = (
        records.first().map_or(0, |(r, _)| r.seq),
        records.last().map_or(0, |(r, _)| r.seq),
    );
    if kind == WalObjectKind::Batch && !records.is_empty() && h.first_seq <= h.after_seq {
        return inconsistent(format!(
            "a batch of {} records from seq {} after seq {}",
            records.len(),
            h.first_seq,
            h.after_seq
        ));
    }
    if records.len() != h.record_count as usize || seqs != (h.first_seq, h.last_seq) {
        return inconsistent(format!(
            "{} records, seqs {seqs:?}; header says {} records, seqs {:?}",
            records.len(),
            h.record_count,
            (h.first_seq, h.last_seq)
        ));
    }
    Ok((h, records))
}

/// Decodes and verifies the header of the shipped WAL object stored under `counter` from its
/// first [`WAL_OBJECT_HEADER_LEN`] bytes (magic, version, CRC, kind, the key's counter), without
/// the body: which seqs an object holds, from a ranged read.
///
/// Errors: [`WalObjectError::Header`].
pub fn decode_header(b: &[u8], counter: u64) -> Result<WalObjectHeader, WalObjectError> {
    decode_header_len(b, counter).map(|(h, _)| h)
}

/// [`decode_header`] and the body length the header gives.
fn decode_header_len(b: &[u8], counter: u64) -> Result<(WalObjectHeader, u64), WalObjectError> {
    let bad = |m: String| Err(WalObjectError::Header(m));
    if b.len() < WAL_OBJECT_HEADER_LEN {
        return bad(format!("{} bytes, shorter than its header", b.len()));
    }
    let (stored, computed) = (u32_at(b, 60), crc32fast::hash(&b[0..60]));
    if stored != computed {
        return bad(format!(
            "crc mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    if u32_at(b, 0) != WAL_OBJECT_MAGIC {
        return bad(format!("magic {:#010x}", u32_at(b, 0)));
    }
    if u16_at(b, 4) != WAL_OBJECT_VERSION {
        return bad(format!(
            "version {} (this build reads {WAL_OBJECT_VERSION})",
            u16_at(b, 4)
        ));
    }
    let kind = match u16_at(b, 6) {
        1 => WalObjectKind::Batch,
        2 => WalObjectKind::Fence,
        3 => WalObjectKind::DropFence,
        k => return bad(format!("kind {k}")),
    };
    let h = WalObjectHeader {
        kind,
        epoch: u64_at(b, 8),
        counter: u64_at(b, 16),
        after_seq: u64_at(b, 24),
        first_seq: u64_at(b, 32),
        last_seq: u64_at(b, 40),
        record_count: u32_at(b, 48),
    };
    if h.counter != counter {
        return bad(format!("counter {} stored under {counter}", h.counter));
    }
    Ok((h, u64_at(b, 52)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::one_block_record;

    fn batch() -> (Bytes, Vec<(RecordHeader, Vec<u8>)>) {
        let mut records = vec![one_block_record(7, 10, 0xa1), one_block_record(7, 11, 0xb2)];
        records.push((
            RecordHeader {
                kind: RecordKind::Zero,
                flags: 0,
                seq: 13,
                volume_tag: 7,
                start_block: 100,
                block_count: 8,
                payload_len: 0,
            },
            Vec::new(),
        ));
        let mut enc = WalObjectEncoder::new(3, 42, 9);
        for (h, p) in &records {
            enc.push(h, p);
        }
        assert_eq!(enc.len(), 3);
        (enc.finish(), records)
    }

    #[test]
    fn a_batch_round_trips() {
        let (bytes, records) = batch();
        let (h, got) = decode(&bytes, 42).unwrap();
        assert_eq!(
            h,
            WalObjectHeader {
                kind: WalObjectKind::Batch,
                epoch: 3,
                counter: 42,
                after_seq: 9,
                first_seq: 10,
                last_seq: 13,
                record_count: 3,
            }
        );
        assert_eq!(got.len(), 3);
        for ((gh, gp), (h, p)) in got.iter().zip(&records) {
            assert_eq!((gh, &gp[..]), (h, &p[..]));
        }
    }

    #[test]
    fn a_fence_round_trips() {
        let (h, records) = decode(&encode_fence(4, 43, 17), 43).unwrap();
        assert_eq!(
            (h.kind, h.epoch, h.counter, h.after_seq),
            (WalObjectKind::Fence, 4, 43, 17)
        );
        assert!(records.is_empty());
        let (h, records) = decode(&encode_drop_fence(5, 44), 44).unwrap();
        assert_eq!(
            (h.kind, h.epoch, h.counter, h.after_seq),
            (WalObjectKind::DropFence, 5, 44, 0)
        );
        assert!(h.kind.is_fence() && records.is_empty());
    }

    /// Every flipped byte, every truncation and a wrong key are refused: nothing of a damaged
    /// object is replayed.
    #[test]
    fn damage_anywhere_is_refused() {
        let (bytes, _) = batch();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x5a;
            assert!(
                decode(&Bytes::from(b), 42).is_err(),
                "flipped byte {i} accepted"
            );
        }
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes.slice(..len), 42).is_err(),
                "cut at {len} accepted"
            );
        }
        assert!(matches!(decode(&bytes, 41), Err(WalObjectError::Header(_))));
    }
}

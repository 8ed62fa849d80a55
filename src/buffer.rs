//! The in-memory write buffer: memtables of extents not yet in chunks.
//!
//! A volume has one active [`MemTable`] that writes go into and a queue of frozen ones waiting for
//! the flusher. A memtable holds non-overlapping extents keyed by start block; inserting cuts what
//! it overlaps, so the newest write always wins inside a memtable. Payloads are `Bytes`, so cutting
//! an extent never copies data. Memory is bounded by the volume's buffer semaphore, not here.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::block::BLOCK_BYTES;
use crate::chunk::InputExtent;

/// What an extent's blocks hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `count * 4096` bytes of data.
    Data(Bytes),
    /// Zeros (trim / write-zeroes).
    Zero,
}

/// An extent in a memtable; its start block is the map key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufExtent {
    /// Number of blocks.
    pub count: u64,
    /// Sequence number of the write.
    pub seq: u64,
    /// Data or zeros.
    pub payload: Payload,
}

impl BufExtent {
    /// Blocks `skip..skip + count` of this extent (zero-copy).
    pub fn slice(&self, skip: u64, count: u64) -> Self {
        debug_assert!(skip + count <= self.count);
        let payload = match &self.payload {
            Payload::Data(b) => Payload::Data(
                b.slice((skip as usize) * BLOCK_BYTES..((skip + count) as usize) * BLOCK_BYTES),
            ),
            Payload::Zero => Payload::Zero,
        };
        Self {
            count,
            seq: self.seq,
            payload,
        }
    }

    fn data_bytes(&self) -> u64 {
        match self.payload {
            Payload::Data(_) => self.count * BLOCK_BYTES as u64,
            Payload::Zero => 0,
        }
    }
}

/// A set of non-overlapping extents.
#[derive(Debug, Default)]
pub struct MemTable {
    extents: BTreeMap<u64, BufExtent>,
    data_bytes: u64,
    max_seq: u64,
    /// Write-buffer permits (blocks) charged for this memtable's writes; returned on flush.
    pub(crate) charged: u64,
}

impl MemTable {
    /// An empty memtable.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when it holds no extent.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes of data payload held (zero extents count 0).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// True once it holds a chunk's worth: `chunk_bytes` of data, or as many write-buffer
    /// permits as a chunk has blocks (many small zero extents).
    pub fn is_full(&self, chunk_bytes: u64) -> bool {
        self.data_bytes >= chunk_bytes || self.charged >= (chunk_bytes / BLOCK_BYTES as u64).max(1)
    }

    /// Largest sequence number inserted.
    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Inserts `ext` at `start`, cutting whatever it overlaps. The caller guarantees `ext.seq`
    /// is newer than everything already here (sequence numbers are assigned under the same lock).
    pub fn insert(&mut self, start: u64, ext: BufExtent) {
        debug_assert!(ext.seq > self.max_seq || self.extents.is_empty());
        let end = start + ext.count;
        let overlapped: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(&s, e)| s + e.count > start)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapped {
            let Some(old) = self.extents.remove(&s) else {
                continue;
            };
            self.data_bytes -= old.data_bytes();
            let old_end = s + old.count;
            if s < start {
                let left = old.slice(0, start - s);
                self.data_bytes += left.data_bytes();
                self.extents.insert(s, left);
            }
            if old_end > end {
                let right = old.slice(end - s, old_end - end);
                self.data_bytes += right.data_bytes();
                self.extents.insert(end, right);
            }
        }
        self.data_bytes += ext.data_bytes();
        self.max_seq = self.max_seq.max(ext.seq);
        self.extents.insert(start, ext);
    }

    /// The parts of extents intersecting `start..end`, clipped, in block order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, BufExtent)> {
        let mut out: Vec<(u64, BufExtent)> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(&s, e)| s + e.count > start)
            .map(|(&s, e)| {
                let from = s.max(start);
                let to = (s + e.count).min(end);
                (from, e.slice(from - s, to - from))
            })
            .collect();
        out.reverse();
        out
    }

    /// Every extent as chunk input, in block order.
    pub fn to_chunk_input(&self) -> Vec<InputExtent> {
        self.extents
            .iter()
            .map(|(&s, e)| InputExtent {
                start_block: s,
                block_count: e.count,
                seq: e.seq,
                data: match &e.payload {
                    Payload::Data(b) => Some(b.clone()),
                    Payload::Zero => None,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(count: u64, seq: u64, fill: u8) -> BufExtent {
        BufExtent {
            count,
            seq,
            payload: Payload::Data(Bytes::from(vec![fill; count as usize * BLOCK_BYTES])),
        }
    }

    fn fill_of(e: &BufExtent) -> Option<u8> {
        match &e.payload {
            Payload::Data(b) => Some(b[0]),
            Payload::Zero => None,
        }
    }

    #[test]
    fn insert_cuts_overlaps() {
        let mut m = MemTable::new();
        m.insert(0, data(10, 1, 1));
        m.insert(3, data(2, 2, 2));
        m.insert(
            8,
            BufExtent {
                count: 5,
                seq: 3,
                payload: Payload::Zero,
            },
        );
        let got: Vec<_> = m
            .overlapping(0, 100)
            .iter()
            .map(|(s, e)| (*s, e.count, fill_of(e)))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 3, Some(1)),
                (3, 2, Some(2)),
                (5, 3, Some(1)),
                (8, 5, None)
            ]
        );
        assert_eq!(m.data_bytes(), 8 * 4096);
        assert_eq!(m.max_seq(), 3);
        // Clipped query inside one extent.
        let mid = m.overlapping(6, 7);
        assert_eq!((mid[0].0, mid[0].1.count), (6, 1));
        // Covering everything replaces everything.
        m.insert(0, data(20, 4, 9));
        assert_eq!(m.len(), 1);
        assert_eq!(m.data_bytes(), 20 * 4096);
    }
}

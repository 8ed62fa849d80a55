//! The in-memory write buffer: memtables of extents not yet in chunks.
//!
//! A volume has one active [`MemTable`] that writes go into and a queue of frozen ones waiting for
//! the flusher. A memtable holds non-overlapping extents keyed by start block; inserting cuts what
//! it overlaps, so the newest write always wins inside a memtable. Payloads are `Bytes`, so cutting
//! an extent never copies data. Memory is bounded by the volume's buffer semaphore, not here.
//!
//! A [`WriteBuffer`] holds the active memtable, the frozen queue and an index of their union, so
//! a read looks up one map, not one per memtable (a full 256 MiB buffer of 4 MiB memtables is 64
//! of them: docs/design/write-buffer-index.md).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

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
        self.cut(start, end, |_| true);
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

    /// Removes the blocks of `start..end` that hold write `seq`; other extents stay.
    fn remove_seq(&mut self, start: u64, end: u64, seq: u64) {
        self.cut(start, end, |e| e.seq == seq);
    }

    /// Removes blocks `start..end` of every extent `which` selects: the parts outside stay.
    fn cut(&mut self, start: u64, end: u64, which: impl Fn(&BufExtent) -> bool) {
        let hit: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(&s, e)| s + e.count > start)
            .filter(|(_, e)| which(e))
            .map(|(&s, _)| s)
            .collect();
        for s in hit {
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

/// A volume's write buffer: the active memtable that writes go into, the frozen memtables
/// waiting for the flusher (oldest first), and `index`, the newest version of every buffered
/// block across all of them (payloads shared, never copied).
#[derive(Debug, Default)]
pub struct WriteBuffer {
    active: MemTable,
    frozen: VecDeque<Arc<MemTable>>,
    index: MemTable,
}

impl WriteBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The memtable writes go into.
    pub fn active(&self) -> &MemTable {
        &self.active
    }

    /// Frozen memtables, oldest first.
    pub fn frozen(&self) -> &VecDeque<Arc<MemTable>> {
        &self.frozen
    }

    /// Inserts write `ext` at block `start` into the active memtable, charging `cost`
    /// write-buffer permits (blocks) to it. Sequence numbers must increase across calls.
    pub fn insert(&mut self, start: u64, ext: BufExtent, cost: u64) {
        self.index.insert(start, ext.clone());
        self.active.insert(start, ext);
        self.active.charged += cost;
    }

    /// Moves a non-empty active memtable to the back of the frozen queue; true if it moved.
    pub fn freeze(&mut self) -> bool {
        if self.active.is_empty() {
            return false;
        }
        self.frozen
            .push_back(Arc::new(std::mem::take(&mut self.active)));
        true
    }

    /// Drops the oldest frozen memtable if it is `mem` (its chunks are committed to the map),
    /// with every block of it no newer write replaced; true if dropped.
    pub fn drop_committed(&mut self, mem: &Arc<MemTable>) -> bool {
        if !self.frozen.front().is_some_and(|m| Arc::ptr_eq(m, mem)) {
            return false;
        }
        for (&s, e) in &mem.extents {
            self.index.remove_seq(s, s + e.count, e.seq);
        }
        self.frozen.pop_front();
        true
    }

    /// The newest buffered version of every block in `start..end` that has one, clipped, in
    /// block order (non-overlapping).
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, BufExtent)> {
        self.index.overlapping(start, end)
    }

    /// Bytes of data in all memtables (a block written twice in different memtables counts
    /// twice: both versions are held until their chunks are committed).
    pub fn data_bytes(&self) -> u64 {
        self.active.data_bytes() + self.frozen.iter().map(|m| m.data_bytes()).sum::<u64>()
    }

    /// Write-buffer permits (blocks) charged to all memtables.
    pub fn charged(&self) -> u64 {
        self.active.charged + self.frozen.iter().map(|m| m.charged).sum::<u64>()
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

#[cfg(test)]
mod index_tests {
    use super::*;
    use proptest::prelude::*;

    /// Per block: the newest version across the memtables, searched newest layer first (what
    /// reads did before the index existed): `Some(Some(seq))` data, `Some(None)` zeros.
    fn layered(buf: &WriteBuffer, blocks: u64) -> Vec<Option<(u64, bool)>> {
        let layers = std::iter::once(&buf.active).chain(buf.frozen.iter().rev().map(|m| &**m));
        let mut out = vec![None; blocks as usize];
        for layer in layers {
            for (s, e) in layer.overlapping(0, blocks) {
                for b in s..s + e.count {
                    let slot = &mut out[b as usize];
                    if slot.is_none() {
                        *slot = Some((e.seq, matches!(e.payload, Payload::Data(_))));
                    }
                }
            }
        }
        out
    }

    fn indexed(buf: &WriteBuffer, blocks: u64) -> Vec<Option<(u64, bool)>> {
        let mut out = vec![None; blocks as usize];
        let mut last_end = 0;
        for (s, e) in buf.overlapping(0, blocks) {
            assert!(s >= last_end, "index extents overlap or are out of order");
            last_end = s + e.count;
            for (k, b) in (s..s + e.count).enumerate() {
                // The payload is the block's own data: byte 0 of each block holds the seq.
                if let Payload::Data(d) = &e.payload {
                    assert_eq!(u64::from(d[k * BLOCK_BYTES]), e.seq % 251);
                }
                out[b as usize] = Some((e.seq, matches!(e.payload, Payload::Data(_))));
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { start: u64, count: u64, zero: bool },
        Freeze,
        DropOldest,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..60, 1u64..9, proptest::bool::weighted(0.2))
                .prop_map(|(start, count, zero)| Op::Write { start, count, zero }),
            2 => Just(Op::Freeze),
            1 => Just(Op::DropOldest),
        ]
    }

    proptest! {
        /// The index always answers what searching the memtables newest first answers.
        #[test]
        fn index_matches_layered_lookup(ops in proptest::collection::vec(op(), 1..120)) {
            let mut buf = WriteBuffer::new();
            let mut seq = 0;
            for op in ops {
                match op {
                    Op::Write { start, count, zero } => {
                        seq += 1;
                        let payload = if zero {
                            Payload::Zero
                        } else {
                            Payload::Data(Bytes::from(vec![(seq % 251) as u8; count as usize * BLOCK_BYTES]))
                        };
                        buf.insert(start, BufExtent { count, seq, payload }, count);
                    }
                    Op::Freeze => {
                        buf.freeze();
                    }
                    Op::DropOldest => {
                        if let Some(m) = buf.frozen().front().cloned() {
                            prop_assert!(buf.drop_committed(&m));
                        }
                    }
                }
                prop_assert_eq!(indexed(&buf, 70), layered(&buf, 70));
            }
            // Dropping everything leaves only the active memtable's blocks.
            while let Some(m) = buf.frozen().front().cloned() {
                prop_assert!(buf.drop_committed(&m));
            }
            prop_assert_eq!(indexed(&buf, 70), layered(&buf, 70));
            let mut all = std::mem::take(&mut buf);
            all.freeze();
            let m = all.frozen().front().cloned();
            if let Some(m) = m {
                prop_assert!(all.drop_committed(&m));
            }
            prop_assert!(all.overlapping(0, 70).is_empty());
        }
    }

    #[test]
    fn drop_committed_only_drops_the_oldest() {
        let mut buf = WriteBuffer::new();
        let ext = |seq| BufExtent {
            count: 1,
            seq,
            payload: Payload::Zero,
        };
        buf.insert(0, ext(1), 1);
        buf.freeze();
        buf.insert(0, ext(2), 1);
        buf.freeze();
        let newer = buf.frozen()[1].clone();
        assert!(!buf.drop_committed(&newer));
        assert_eq!(buf.frozen().len(), 2);
        assert_eq!(buf.charged(), 2);
        assert_eq!(buf.overlapping(0, 1)[0].1.seq, 2);
    }
}

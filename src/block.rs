//! Block geometry shared by every layer.
//!
//! vblock addresses volumes in 4096-byte blocks; the engine API speaks bytes and converts here.

/// Size of one block in bytes. Every WAL record, chunk extent and map extent is in whole blocks.
pub const BLOCK_SIZE: u64 = 4096;
/// `BLOCK_SIZE` as `usize`, for slicing buffers.
pub const BLOCK_BYTES: usize = BLOCK_SIZE as usize;
/// Largest supported volume: 16 TiB (the EC2 `Size` limit of 16384 GiB).
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;

/// A half-open range of blocks `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// First block.
    pub start: u64,
    /// One past the last block.
    pub end: u64,
}

impl BlockRange {
    /// The blocks touched by `len` bytes at byte `offset` (rounded outwards to whole blocks).
    pub fn covering(offset: u64, len: u64) -> Self {
        let start = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE);
        Self { start, end }
    }
    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// True when the range holds no block.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// True when `offset` and `len` are both multiples of [`BLOCK_SIZE`].
pub fn is_aligned(offset: u64, len: u64) -> bool {
    offset % BLOCK_SIZE == 0 && len % BLOCK_SIZE == 0
}

/// True when `data` is all zero bytes.
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in u128 words where possible; the tail byte by byte.
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns and `align_to` only yields correctly aligned,
        // in-bounds middle slices.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_rounds_outwards() {
        assert_eq!(
            BlockRange::covering(0, 4096),
            BlockRange { start: 0, end: 1 }
        );
        assert_eq!(
            BlockRange::covering(1, 4096),
            BlockRange { start: 0, end: 2 }
        );
        assert_eq!(
            BlockRange::covering(4096, 1),
            BlockRange { start: 1, end: 2 }
        );
        assert!(BlockRange::covering(4096, 0).is_empty());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 9;
        assert!(!is_zero(&v[3..]));
    }
}

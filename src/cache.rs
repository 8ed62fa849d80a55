//! The shared, bounded cache of decompressed chunk frames.

use std::sync::Arc;

use bytes::Bytes;
use quick_cache::Weighter;

/// `(volume tag, object id, frame offset)`.
pub type FrameKey = (u64, u64, u32);

/// Weighs a frame by its decompressed bytes plus a fixed overhead.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameWeighter;

impl Weighter<FrameKey, Bytes> for FrameWeighter {
    fn weight(&self, _key: &FrameKey, val: &Bytes) -> u64 {
        val.len() as u64 + 64
    }
}

/// LRU-like (CLOCK-Pro) cache of frames, bounded in bytes; concurrent misses for one frame
/// are coalesced into one fetch.
pub type FrameCache = Arc<quick_cache::sync::Cache<FrameKey, Bytes, FrameWeighter>>;

/// A frame cache holding at most `bytes` bytes of frames.
pub fn frame_cache(bytes: u64) -> FrameCache {
    let items = (bytes / (16 << 10)).max(16) as usize; // the default frame size
    Arc::new(quick_cache::sync::Cache::with_weighter(
        items,
        bytes.max(1 << 20),
        FrameWeighter,
    ))
}

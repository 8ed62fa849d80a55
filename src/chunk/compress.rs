//! Compression of chunk frames: which frames are worth zstd (OpenZFS's 1/8 rule, a probe across
//! writes) and the shared pools of zstd contexts.

use super::ChunkError;

/// Which frames of a chunk are tried with zstd, across its writes (within one write, a frame not
/// worth compressing ends the tries for the rest of it). After [`CompressionProbe::MISSES`] tries
/// in a row that were not worth it, only every [`CompressionProbe::SAMPLE_EVERY`]th frame is
/// tried until one compresses. Scattered 4 KiB writes are one frame each, so the per-write rule
/// alone ran zstd on every block of incompressible random writes, on the flusher whose map
/// commits bound the sustained random-write rate (docs/design/compress-only-what-saves.md). A
/// compressible run after incompressible data is found within 16 frames.
#[derive(Debug, Default)]
pub(super) struct CompressionProbe {
    /// Tries in a row that were not worth compressing.
    misses: u32,
    /// Frames not tried since the last try (while sampling).
    skipped: u32,
}

impl CompressionProbe {
    pub(super) const MISSES: u32 = 8;
    pub(super) const SAMPLE_EVERY: u32 = 16;

    /// Whether to try compressing the next frame.
    pub(super) fn should_try(&mut self) -> bool {
        if self.misses < Self::MISSES || self.skipped + 1 >= Self::SAMPLE_EVERY {
            self.skipped = 0;
            true
        } else {
            self.skipped += 1;
            false
        }
    }

    /// The outcome of a try.
    pub(super) fn record(&mut self, worth: bool) {
        self.misses = if worth { 0 } else { self.misses + 1 };
    }
}

/// A frame is stored compressed only if zstd saves at least 1/8 (12.5%) of its bytes, OpenZFS's
/// rule (`zio_compress_data`): below that, the capacity saved is not worth the CPU of compressing
/// and of decompressing on every read; data that compresses well (sources, libraries) loses
/// next to nothing by it (docs/design/compress-only-what-saves.md).
pub(super) fn worth_compressing(compressed_len: usize, raw_len: usize) -> bool {
    compressed_len <= raw_len - raw_len / 8
}

/// zstd-compresses `raw` with a context from [`CCTX`] (creating one per frame showed up in
/// profiles).
pub(super) fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>, ChunkError> {
    CCTX.with(
        || zstd::bulk::Compressor::new(level).ok(),
        |c| {
            c.set_compression_level(level)
                .and_then(|()| c.compress(raw))
        },
    )
    .unwrap_or_else(|| zstd::bulk::compress(raw, level))
    .map_err(|e| ChunkError::Frame(e.to_string()))
}

/// zstd contexts kept for reuse. A context holds hundreds of KB; kept one per thread, they grew
/// with tokio's blocking pool. Pooled, what is kept is bounded by the pool sizes and what is
/// live by the number of concurrent (de)compressions (docs/design/zstd-context-pool.md).
pub(super) static CCTX: ContextPool<zstd::bulk::Compressor<'static>> = ContextPool::new(8);
pub(super) static DCTX: ContextPool<zstd::bulk::Decompressor<'static>> = ContextPool::new(64);

/// A bounded stack of reusable contexts shared by all threads.
pub(super) struct ContextPool<T> {
    idle: std::sync::Mutex<Vec<T>>,
    keep: usize,
}

impl<T> ContextPool<T> {
    pub(super) const fn new(keep: usize) -> Self {
        Self {
            idle: std::sync::Mutex::new(Vec::new()),
            keep,
        }
    }

    /// Runs `f` with an idle context, or one made by `make`, and keeps it for reuse; `None`
    /// when no context could be made.
    pub(super) fn with<R>(
        &self,
        make: impl FnOnce() -> Option<T>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut ctx = self.take().or_else(make)?;
        let out = f(&mut ctx);
        self.give(ctx);
        Some(out)
    }

    /// An idle context, if any (a poisoned lock counts as none).
    pub(super) fn take(&self) -> Option<T> {
        self.idle.lock().ok()?.pop()
    }

    /// Returns a context for reuse; dropped when `keep` are already idle.
    pub(super) fn give(&self, ctx: T) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.keep {
                idle.push(ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle contexts are reused newest first and at most `keep` are kept.
    #[test]
    fn context_pool_keeps_at_most_keep_idle() {
        let pool = ContextPool::new(2);
        assert_eq!(pool.take(), None::<u32>);
        for ctx in [1, 2, 3] {
            pool.give(ctx);
        }
        assert_eq!(pool.take(), Some(2));
        assert_eq!(pool.take(), Some(1));
        assert_eq!(pool.take(), None);
    }
}

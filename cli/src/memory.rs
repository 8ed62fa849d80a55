//! The daemon's memory target: the frame cache gives way when the process grows.
//!
//! A volume's write buffer cannot shrink without stalling writers, and the write path also holds
//! chunk objects in flight, NBD requests and allocator slack that no flag bounds (measured in
//! docs/BENCHMARKS.md, "Memory"). The frame cache is the one large consumer that can give memory
//! back at once, so a thread samples the process's resident set every [`TICK`] and moves the
//! cache's capacity between a floor (1/8 of `--cache-size`) and `--cache-size` to keep the
//! resident set under `--memory-target` (default: buffer + cache + 64 MiB, the performance
//! issue's bound for one busy volume). The same idea as Ceph's `osd_memory_target` cache
//! autotuning. The thread also returns free heap pages to the OS ([`crate::malloc::trim`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vblock::Engine;

/// How often the resident set is sampled.
pub const TICK: Duration = Duration::from_millis(100);

/// Free heap pages are returned to the OS at least this often (and after every cache shrink).
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// The allowance above buffer + cache in the default target.
pub const DEFAULT_ALLOWANCE_BYTES: u64 = 64 << 20;

/// What the tuner steers towards, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Resident set to stay under.
    pub rss_bytes: u64,
    /// The cache's configured capacity (`--cache-size`): the most it gets back.
    pub cache_max_bytes: u64,
    /// The least the cache is shrunk to.
    pub cache_min_bytes: u64,
}

impl Target {
    /// Target `rss_bytes` for a cache of `cache_bytes`; the floor is 1/8 of it.
    pub fn new(rss_bytes: u64, cache_bytes: u64) -> Self {
        Self {
            rss_bytes,
            cache_max_bytes: cache_bytes,
            cache_min_bytes: cache_bytes / 8,
        }
    }

    /// The band kept free below the target, so that growth between two samples (a write
    /// buffer filling at ~250 MB/s adds ~25 MB per [`TICK`]) stays under it: 1/16 of the target.
    fn headroom(&self) -> u64 {
        self.rss_bytes / 16
    }

    /// The cache capacity for the next tick, given the current one, the resident set and how
    /// much it grew since the last sample (the next sample is expected that much higher: a write
    /// burst into empty buffers outruns a fixed headroom). Expected above `target - headroom`:
    /// shrink by the excess (down to the floor). Below `target - 2 * headroom`: grow by half the
    /// spare room (up to the configured size). Between: unchanged, so the capacity does not
    /// oscillate.
    pub fn next_capacity(&self, capacity: u64, rss: u64, growth: u64) -> u64 {
        let aim = self.rss_bytes.saturating_sub(self.headroom());
        let rss = rss.saturating_add(growth);
        if rss > aim {
            capacity
                .saturating_sub(rss - aim)
                .max(self.cache_min_bytes)
                .min(capacity)
        } else {
            let low = aim.saturating_sub(self.headroom());
            if rss < low {
                capacity
                    .saturating_add((low - rss) / 2)
                    .min(self.cache_max_bytes)
                    .max(capacity)
            } else {
                capacity
            }
        }
    }
}

/// The process's resident set in bytes (`/proc/self/statm`, second field, in pages); `None`
/// where that file does not exist or cannot be parsed.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Starts the tuner thread for `engine`'s frame cache. With `target` `None` the cache keeps its
/// size and the thread only trims free heap pages every [`TRIM_INTERVAL`].
pub fn spawn(engine: Arc<Engine>, target: Option<Target>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("memory-target".into())
        .spawn(move || {
            let mut last_trim = Instant::now();
            let mut last_rss = None;
            loop {
                std::thread::sleep(target.map_or(TRIM_INTERVAL, |_| TICK));
                let mut trim = last_trim.elapsed() >= TRIM_INTERVAL;
                if let (Some(t), Some(rss)) = (target, resident_bytes()) {
                    let growth = last_rss.map_or(0, |last| rss.saturating_sub(last));
                    last_rss = Some(rss);
                    let capacity = engine.frame_cache_capacity();
                    let next = t.next_capacity(capacity, rss, growth);
                    if next != capacity {
                        engine.set_frame_cache_capacity(next);
                        // Evicted frames are free heap memory now: hand their pages back.
                        trim |= next < capacity;
                    }
                }
                if trim {
                    crate::malloc::trim();
                    last_trim = Instant::now();
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn target() -> Target {
        Target::new(576 * MIB, 256 * MIB)
    }

    #[test]
    fn over_the_aim_the_cache_shrinks_by_the_excess_but_not_below_its_floor() {
        let t = target();
        let aim = 576 * MIB - 36 * MIB;
        assert_eq!(t.next_capacity(256 * MIB, aim + 10 * MIB, 0), 246 * MIB);
        assert_eq!(t.next_capacity(256 * MIB, aim + 500 * MIB, 0), 32 * MIB);
        // Already at the floor: stays there, never grows while over.
        assert_eq!(t.next_capacity(32 * MIB, aim + 1, 0), 32 * MIB);
        assert_eq!(t.next_capacity(16 * MIB, aim + 1, 0), 16 * MIB);
    }

    #[test]
    fn a_growing_resident_set_shrinks_the_cache_before_it_reaches_the_aim() {
        let t = target();
        let aim = 576 * MIB - 36 * MIB;
        // 20 MiB under the aim, but 50 MiB more than a tick ago: expected 30 MiB over.
        assert_eq!(
            t.next_capacity(256 * MIB, aim - 20 * MIB, 50 * MIB),
            226 * MIB
        );
        // Steady at the same level: inside the band, no change.
        assert_eq!(t.next_capacity(256 * MIB, aim - 20 * MIB, 0), 256 * MIB);
    }

    #[test]
    fn far_under_the_aim_the_cache_grows_back_up_to_its_configured_size() {
        let t = target();
        let low = 576 * MIB - 72 * MIB;
        assert_eq!(t.next_capacity(100 * MIB, low - 20 * MIB, 0), 110 * MIB);
        assert_eq!(t.next_capacity(250 * MIB, 50 * MIB, 0), 256 * MIB);
        assert_eq!(t.next_capacity(256 * MIB, 0, 0), 256 * MIB);
    }

    #[test]
    fn inside_the_band_the_capacity_holds() {
        let t = target();
        for rss in [504 * MIB, 520 * MIB, 540 * MIB] {
            assert_eq!(t.next_capacity(200 * MIB, rss, 0), 200 * MIB);
        }
    }

    #[test]
    fn the_resident_set_is_readable_here() {
        let rss = resident_bytes();
        assert!(rss.is_some_and(|b| b > MIB), "{rss:?}");
    }
}

//! The daemon's memory target: the frame cache, then RocksDB's block cache, give way when the
//! process grows.
//!
//! A volume's write buffer cannot shrink without stalling writers, and the write path also holds
//! chunk objects in flight, NBD requests and allocator slack that no flag bounds
//! (docs/design/memory-target.md). The frame cache is the one large consumer that can give
//! memory back at once, so a thread samples the process's resident set every [`TICK`] and moves the
//! cache's capacity between a floor (1/8 of `--cache-size`) and `--cache-size` to keep the
//! resident set under `--memory-target` (default: open volumes × buffer + cache + 64 MiB, the
//! performance issue's bound). With the frame cache at its floor, RocksDB's block cache
//! (`--meta-cache-size`) gives way next, to 1/8 of its size; it grows back first. The room the
//! write buffers can still take is kept free in advance: a burst of writes fills an empty
//! 256 MiB buffer in a fraction of a second, faster than any feedback. The same idea as Ceph's
//! `osd_memory_target` cache autotuning. The thread also returns free heap pages to the OS
//! ([`crate::malloc::trim`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vblock::Engine;

/// How often the resident set is sampled.
pub const TICK: Duration = Duration::from_millis(100);

/// Free heap pages are returned to the OS at least this often (and after every cache shrink).
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// The allowance above buffers + cache in the default target.
pub const DEFAULT_ALLOWANCE_BYTES: u64 = 64 << 20;

/// The resident set to stay under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RssTarget {
    /// `--memory-target`, bytes.
    Fixed(u64),
    /// The default: `buffer_bytes` per open volume (at least one) + `rest_bytes`.
    PerVolume {
        /// `--buffer-size`.
        buffer_bytes: u64,
        /// `--cache-size` + [`DEFAULT_ALLOWANCE_BYTES`].
        rest_bytes: u64,
    },
}

impl RssTarget {
    /// The target in bytes with `open_volumes` volumes open.
    pub fn bytes(&self, open_volumes: usize) -> u64 {
        match *self {
            Self::Fixed(b) => b,
            Self::PerVolume {
                buffer_bytes,
                rest_bytes,
            } => buffer_bytes
                .saturating_mul(open_volumes.max(1) as u64)
                .saturating_add(rest_bytes),
        }
    }
}

/// What the tuner steers towards, in bytes. Its capacity is the two caches' together: the
/// frame cache's and RocksDB's block cache's ([`Target::split`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Resident set to stay under.
    pub rss: RssTarget,
    /// Both caches' configured capacities (`--cache-size` + `--meta-cache-size`): the most
    /// they get back.
    pub cache_max_bytes: u64,
    /// The least both are shrunk to (1/8 of each).
    pub cache_min_bytes: u64,
    /// `--meta-cache-size`.
    pub meta_max_bytes: u64,
    /// The frame cache's floor.
    pub frame_min_bytes: u64,
}

/// One sample of the process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Resident set now.
    pub rss: u64,
    /// How much it grew since the last sample.
    pub growth: u64,
    /// What the open volumes' write buffers can still take.
    pub buffer_room: u64,
    /// Open volumes.
    pub open_volumes: usize,
}

impl Target {
    /// Steers towards `rss` with a frame cache of `cache_bytes` and a RocksDB block cache of
    /// `meta_cache_bytes`; each one's floor is 1/8 of it.
    pub fn new(rss: RssTarget, cache_bytes: u64, meta_cache_bytes: u64) -> Self {
        Self {
            rss,
            cache_max_bytes: cache_bytes + meta_cache_bytes,
            cache_min_bytes: cache_bytes / 8 + meta_cache_bytes / 8,
            meta_max_bytes: meta_cache_bytes,
            frame_min_bytes: cache_bytes / 8,
        }
    }

    /// Splits a capacity for both caches into `(frame cache, block cache)`: the frame cache
    /// gives way first, down to its floor, then the block cache, down to its own.
    pub fn split(&self, capacity: u64) -> (u64, u64) {
        let meta_min = self.meta_max_bytes / 8;
        let meta = capacity
            .saturating_sub(self.frame_min_bytes)
            .clamp(meta_min, self.meta_max_bytes);
        (capacity.saturating_sub(meta), meta)
    }

    /// The cache capacity for the next tick, given the current one and a [`Sample`].
    ///
    /// The expected resident set is `rss` plus the larger of the buffers' free room (they can
    /// fill at any moment) and the growth since the last sample (chunk objects, requests and
    /// slack the buffers do not count). The band kept free below the target, the headroom, is
    /// 1/16 of it. Expected above `target - headroom`: shrink by the excess (down to the floor).
    /// Below `target - 2 * headroom`: grow by half the spare room (up to the configured size).
    /// Between: unchanged, so the capacity does not oscillate.
    pub fn next_capacity(&self, capacity: u64, s: Sample) -> u64 {
        let target = self.rss.bytes(s.open_volumes);
        let headroom = target / 16;
        let aim = target.saturating_sub(headroom);
        let expected = s.rss.saturating_add(s.growth.max(s.buffer_room));
        if expected > aim {
            capacity
                .saturating_sub(expected - aim)
                .max(self.cache_min_bytes)
                .min(capacity)
        } else {
            let low = aim.saturating_sub(headroom);
            if expected < low {
                capacity
                    .saturating_add((low - expected) / 2)
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
            let mut room = (0, 0);
            loop {
                std::thread::sleep(target.map_or(TRIM_INTERVAL, |_| TICK));
                let mut trim = last_trim.elapsed() >= TRIM_INTERVAL;
                if let (Some(t), Some(rss)) = (target, resident_bytes()) {
                    // Busy table (a volume opening or closing): keep the last look.
                    room = engine.write_buffer_room().unwrap_or(room);
                    let sample = Sample {
                        rss,
                        growth: last_rss.map_or(0, |last| rss.saturating_sub(last)),
                        open_volumes: room.0,
                        buffer_room: room.1,
                    };
                    last_rss = Some(rss);
                    let (frame, meta) =
                        (engine.frame_cache_capacity(), engine.meta_cache_capacity());
                    let capacity = frame + meta;
                    let next = t.next_capacity(capacity, sample);
                    if next != capacity {
                        let (next_frame, next_meta) = t.split(next);
                        if next_frame != frame {
                            engine.set_frame_cache_capacity(next_frame);
                        }
                        if next_meta != meta {
                            engine.set_meta_cache_capacity(next_meta);
                        }
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

    /// 256 MiB buffer, 256 MiB cache, no block cache; one volume open: target 576 MiB, aim 540.
    fn target() -> Target {
        Target::new(
            RssTarget::PerVolume {
                buffer_bytes: 256 * MIB,
                rest_bytes: 320 * MIB,
            },
            256 * MIB,
            0,
        )
    }

    /// The frame cache gives way first, down to its floor; then RocksDB's block cache, down to
    /// its own; growing back, the block cache is whole again first.
    #[test]
    fn the_block_cache_gives_way_after_the_frame_cache() {
        let t = Target::new(RssTarget::Fixed(576 * MIB), 256 * MIB, 64 * MIB);
        assert_eq!(
            (t.cache_max_bytes, t.cache_min_bytes),
            (320 * MIB, 40 * MIB)
        );
        assert_eq!(t.split(320 * MIB), (256 * MIB, 64 * MIB));
        assert_eq!(t.split(200 * MIB), (136 * MIB, 64 * MIB));
        assert_eq!(t.split(96 * MIB), (32 * MIB, 64 * MIB));
        assert_eq!(t.split(60 * MIB), (32 * MIB, 28 * MIB));
        assert_eq!(t.split(40 * MIB), (32 * MIB, 8 * MIB));
        // Far over the target: both at their floors.
        let over = Sample {
            rss: 900 * MIB,
            open_volumes: 1,
            ..Sample::default()
        };
        assert_eq!(
            t.split(t.next_capacity(320 * MIB, over)),
            (32 * MIB, 8 * MIB)
        );
    }

    fn at(rss: u64) -> Sample {
        Sample {
            rss,
            open_volumes: 1,
            ..Sample::default()
        }
    }

    const AIM: u64 = 540 * MIB;

    #[test]
    fn the_default_target_grows_with_open_volumes() {
        let t = target().rss;
        assert_eq!(t.bytes(0), 576 * MIB);
        assert_eq!(t.bytes(1), 576 * MIB);
        assert_eq!(t.bytes(3), 3 * 256 * MIB + 320 * MIB);
        assert_eq!(RssTarget::Fixed(MIB).bytes(7), MIB);
    }

    #[test]
    fn over_the_aim_the_cache_shrinks_by_the_excess_but_not_below_its_floor() {
        let t = target();
        assert_eq!(t.next_capacity(256 * MIB, at(AIM + 10 * MIB)), 246 * MIB);
        assert_eq!(t.next_capacity(256 * MIB, at(AIM + 500 * MIB)), 32 * MIB);
        // Already at the floor: stays there, never grows while over.
        assert_eq!(t.next_capacity(32 * MIB, at(AIM + 1)), 32 * MIB);
        assert_eq!(t.next_capacity(16 * MIB, at(AIM + 1)), 16 * MIB);
    }

    #[test]
    fn room_left_in_the_write_buffers_is_kept_free_for_them() {
        let t = target();
        // Idle daemon, full cache, empty buffer: 330 MiB + 256 MiB of room is 46 MiB over.
        let idle = Sample {
            buffer_room: 256 * MIB,
            ..at(330 * MIB)
        };
        assert_eq!(t.next_capacity(256 * MIB, idle), 210 * MIB);
        // A full buffer has no room left: only the resident set counts.
        let full = Sample {
            buffer_room: 0,
            ..at(520 * MIB)
        };
        assert_eq!(t.next_capacity(210 * MIB, full), 210 * MIB);
    }

    #[test]
    fn a_growing_resident_set_shrinks_the_cache_before_it_reaches_the_aim() {
        let t = target();
        // 20 MiB under the aim, but 50 MiB more than a tick ago: expected 30 MiB over.
        let rising = Sample {
            growth: 50 * MIB,
            ..at(AIM - 20 * MIB)
        };
        assert_eq!(t.next_capacity(256 * MIB, rising), 226 * MIB);
        // Steady at the same level: inside the band, no change.
        assert_eq!(t.next_capacity(256 * MIB, at(AIM - 20 * MIB)), 256 * MIB);
    }

    #[test]
    fn far_under_the_aim_the_cache_grows_back_up_to_its_configured_size() {
        let t = target();
        let low = AIM - 36 * MIB;
        assert_eq!(t.next_capacity(100 * MIB, at(low - 20 * MIB)), 110 * MIB);
        assert_eq!(t.next_capacity(250 * MIB, at(50 * MIB)), 256 * MIB);
        assert_eq!(t.next_capacity(256 * MIB, at(0)), 256 * MIB);
        // More volumes open: a larger target, so the same resident set leaves room to grow.
        let three = Sample {
            open_volumes: 3,
            ..at(AIM)
        };
        assert_eq!(t.next_capacity(100 * MIB, three), 256 * MIB);
    }

    #[test]
    fn inside_the_band_the_capacity_holds() {
        let t = target();
        for rss in [504 * MIB, 520 * MIB, 540 * MIB] {
            assert_eq!(t.next_capacity(200 * MIB, at(rss)), 200 * MIB);
        }
    }

    #[test]
    fn the_resident_set_is_readable_here() {
        let rss = resident_bytes();
        assert!(rss.is_some_and(|b| b > MIB), "{rss:?}");
    }
}

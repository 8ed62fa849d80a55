//! glibc malloc settings for the daemon (docs/design/glibc-malloc.md).
//!
//! The daemon allocates and frees payload buffers (4 KiB-32 MiB NBD requests, decoded 64 KiB
//! frames, 4 MiB chunk objects) on dozens of threads. With glibc's defaults (8 arenas per core, an
//! mmap threshold that rises to the largest freed buffer) and with mimalloc, RSS kept climbing
//! under random I/O while the live heap stayed flat (the soak, docs/RELIABILITY.md): freed memory
//! stayed resident, scattered over many arenas or thread heaps. So: one arena per core, a fixed
//! mmap threshold above the usual 1 MiB request (larger buffers are mapped and unmapped, smaller
//! ones reuse arena memory), and a background thread that returns free pages to the OS
//! ([`trim`], called from cli/src/memory.rs).

/// Allocations of this many bytes or more are mmapped and unmapped on free. Fixed, because
/// glibc's dynamic threshold rises to the largest freed buffer (up to 32 MiB) and then keeps
/// chunk objects and map checkpoints in the arenas. Above the usual 1 MiB request, because a
/// 256 KiB threshold, which maps and unmaps every one, slowed sequential writes
/// (docs/design/glibc-malloc.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 2 << 20;

/// Sets one malloc arena per core (at least 2; glibc's default is 8 per core) and a fixed
/// [`MMAP_THRESHOLD_BYTES`]. Call first thing in `main`.
/// Not glibc: does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets malloc tunables (glibc takes its own locks); the parameter
    // numbers and values are valid. A refused setting (returns 0) leaves glibc's default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

/// Not glibc: nothing to tune.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}

/// Returns whole free pages inside glibc's arenas to the OS (`malloc_trim(0)`, which uses
/// `MADV_DONTNEED`); otherwise glibc only releases memory at the top of the main heap. Called
/// by the daemon's memory-target thread (cli/src/memory.rs). Not glibc: does nothing.
pub fn trim() {
    // SAFETY: malloc_trim only releases free memory; it locks each arena itself and never
    // touches live allocations.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

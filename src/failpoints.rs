//! Named crash points for the crash harness (tests/crash.rs, scripts/crash-test.sh; the `fail`
//! crate). Built in with the `failpoints` feature (on by default in the `vblock` binary; build
//! with `--no-default-features` to compile them out). Nothing happens unless
//! `VBLOCK_FAILPOINTS` names a point at start: then the process aborts there, like `kill -9` at
//! exactly that moment (no destructors, no flushes).

/// Every crash point, in the order data moves through the engine.
pub const NAMES: &[&str] = &[
    // WAL writer: records written, before / after the fdatasync that makes them durable.
    "wal-before-sync",
    "wal-after-sync",
    // WAL rotation: the new segment exists, not yet recorded in the writer's list.
    "wal-rotate",
    // WAL trim: one segment removed, others not yet.
    "wal-trim",
    // Flusher: a chunk object is in the backend, not yet in the map.
    "chunk-uploaded",
    // Map commit (one RocksDB batch): just before / just after it.
    "map-commit-before",
    "map-commit-after",
    // WAL shipping (--ship-wal): the local WAL synced, the object not yet PUT / the object
    // stored, its flushes not yet answered.
    "ship-before-put",
    "ship-after-put",
];

/// Crash points of cluster mode's takeover (src/takeover.rs), which a single daemon never
/// reaches (so the crash harness does not arm them): after the epoch manifest is stored, before
/// the fence; after the fence, before the rebuild.
pub const TAKEOVER_NAMES: &[&str] = &["takeover-after-epoch", "takeover-after-fence"];

/// Aborts the process at crash point `name`.
pub fn abort_at(name: &str) -> ! {
    eprintln!("vblock: fail point {name}: aborting");
    std::process::abort()
}

/// A crash point: aborts here when `VBLOCK_FAILPOINTS` configured `$name` with `return`.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::failpoints::abort_at($name))
    };
}

/// Configures crash points from `spec`: `name=actions[;name=actions...]`, actions in the `fail`
/// crate's syntax, where `return` aborts; e.g. `wal-trim=3*off->return` aborts at the 4th trim.
/// Errors name the bad entry; an unknown point name is an error too.
pub fn configure(spec: &str) -> Result<(), String> {
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("fail point entry {entry:?} is not name=actions"))?;
        if !NAMES.contains(&name) && !TAKEOVER_NAMES.contains(&name) {
            return Err(format!(
                "unknown fail point {name:?} (known: {}, {})",
                NAMES.join(", "),
                TAKEOVER_NAMES.join(", ")
            ));
        }
        set(name, actions)?;
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
fn set(name: &str, actions: &str) -> Result<(), String> {
    fail::cfg(name, actions).map_err(|e| format!("fail point {name}: {e}"))
}

#[cfg(not(feature = "failpoints"))]
fn set(name: &str, _actions: &str) -> Result<(), String> {
    Err(format!(
        "fail point {name}: this binary was built without the failpoints feature"
    ))
}

/// Interleaving points: places where a test runs code of its own (a callback) to force a race
/// that timing alone would rarely produce. Inert unless a test sets one ([`set_callback`]).
pub const INTERLEAVINGS: &[&str] = &[
    // GC's mark step: snapshots and volumes listed, their maps not yet walked.
    "gc-mark-listed",
];

/// Runs `f` each time interleaving point `name` is passed (tests only).
///
/// Errors: the build has no `failpoints` feature, or `name` is not in [`INTERLEAVINGS`].
#[doc(hidden)]
pub fn set_callback(name: &str, f: impl Fn() + Send + Sync + 'static) -> Result<(), String> {
    if !INTERLEAVINGS.contains(&name) {
        return Err(format!("unknown interleaving point {name:?}"));
    }
    set_callback_inner(name, f)
}

#[cfg(feature = "failpoints")]
fn set_callback_inner(name: &str, f: impl Fn() + Send + Sync + 'static) -> Result<(), String> {
    fail::cfg_callback(name, f).map_err(|e| format!("interleaving point {name}: {e}"))
}

#[cfg(not(feature = "failpoints"))]
fn set_callback_inner(name: &str, _f: impl Fn() + Send + Sync + 'static) -> Result<(), String> {
    Err(format!(
        "interleaving point {name}: this build has no failpoints feature"
    ))
}

/// Clears interleaving point `name` (tests only).
#[doc(hidden)]
pub fn clear(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::remove(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

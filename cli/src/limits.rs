//! Process limits the daemon raises at start.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft limit of open file descriptors (`RLIMIT_NOFILE`) to the hard limit, as Go's
/// runtime and systemd's advice for services do: the soft default is often 1024, and the daemon
/// holds RocksDB's table files (up to 256), [`vblock::backend::file::OPEN_FILES`] chunk files, WAL
/// segments of every open volume and a socket per NBD connection and per S3 request. Returns
/// `(before, after)` soft limits (`None`: unlimited); the same values when nothing changed.
///
/// Errors: `setrlimit(2)`'s (the limit stays as it was).
pub fn raise_open_files() -> rustix::io::Result<(Option<u64>, Option<u64>)> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok((limit.current, limit.current));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok((limit.current, getrlimit(Resource::Nofile).current))
}

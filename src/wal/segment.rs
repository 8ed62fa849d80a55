//! Segment files: creating one, and preallocating the next one (zeros, then its header, synced)
//! at a spare path that the writer renames into place (FORMAT.md, "WAL";
//! docs/design/wal-preallocation.md).

use std::path::{Path, PathBuf};

use crate::fs::{AlignedBuf, Fs, FsFile};

use super::record::{encode_segment_header, WAL_PAGE};
use super::{fsync_dir, segment_path, WalError};

/// Bytes per write when filling a segment with zeros.
const ZERO_FILL_CHUNK: usize = 1 << 20;

/// Where segment `no` is preallocated before it is renamed to its segment path.
pub(super) fn spare_path(dir: &Path, no: u64) -> PathBuf {
    let mut p = segment_path(dir, no).into_os_string();
    p.push(".prep");
    PathBuf::from(p)
}

/// Deletes spares a crash left behind (`*.wal.prep`: never part of the log). Best effort.
pub(super) fn remove_leftover_spares(fs: &Fs, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".wal.prep"))
        {
            let _ = fs.remove_file(&entry.path());
        }
    }
}

/// Preallocates segment `no` at its spare path: zeros up to `len` bytes (rounded up to a page),
/// then its header, written and synced, so records later overwrite allocated blocks.
/// The zeros go through direct I/O when the filesystem supports it (no page-cache copy) and
/// through the page cache otherwise (tmpfs).
pub(super) fn prepare_segment(
    fs: &Fs,
    dir: &Path,
    no: u64,
    volume_tag: u64,
    len: u64,
) -> Result<FsFile, WalError> {
    let path = spare_path(dir, no);
    let io = |e| WalError::io(&path, e);
    let file = fs.create(&path).map_err(io)?;
    let len = len.div_ceil(WAL_PAGE as u64) * WAL_PAGE as u64;
    let storage = AlignedBuf::zeroed(ZERO_FILL_CHUNK);
    let zeros = storage.as_slice();
    let filled = match fs.open_direct(&path) {
        Ok(d) => fill_zeros(&d, zeros, len).or_else(|_| fill_zeros(&file, zeros, len)),
        Err(_) => fill_zeros(&file, zeros, len),
    };
    filled
        .and_then(|()| file.write_all_at(&encode_segment_header(no, volume_tag), 0))
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    Ok(file)
}

/// Writes zeros over bytes `0..len` of `file`, `zeros.len()` bytes per call.
pub(super) fn fill_zeros(file: &FsFile, zeros: &[u8], len: u64) -> std::io::Result<()> {
    if zeros.is_empty() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Creates segment `no` with its header and makes its directory entry durable.
pub(super) fn create_segment(
    fs: &Fs,
    dir: &Path,
    no: u64,
    volume_tag: u64,
) -> Result<FsFile, WalError> {
    let path = segment_path(dir, no);
    let file = fs.create_new(&path).map_err(|e| WalError::io(&path, e))?;
    file.write_all_at(&encode_segment_header(no, volume_tag), 0)
        .map_err(|e| WalError::io(&path, e))?;
    fsync_dir(fs, dir)?;
    Ok(file)
}

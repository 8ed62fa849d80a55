//! The file-system calls that make data durable — the WAL's and the file backend's — behind one
//! small type, so that tests can put the power-loss simulator ([`SimFs`]) where the real file
//! system is.
//!
//! [`Fs::Real`] (the default, the daemon's) forwards each call to `std`/`rustix`: one `match` on
//! a two-variant enum per system call, nothing else. [`Fs::Sim`] makes the same calls on the same
//! real files (so every read, by any code, sees what was written) and also records every write,
//! `set_len`, `fsync`/`fdatasync`, and every create, rename, unlink and mkdir with the directory
//! `fsync`s that make them durable. [`SimFs::power_cut`] then rewrites the files below its roots
//! as a power loss could have left them (see there). Reads are never routed: they go to the real
//! files.
//!
//! Model (the one ALICE and dm-log-writes use for ext4 in ordered mode): file data and size are
//! durable once the file is `fsync`ed or `fdatasync`ed; a directory entry (create, rename,
//! unlink, mkdir) once its directory is `fsync`ed. Of what is not yet durable, a power cut keeps
//! a prefix of the directory changes (the journal commits them in order) and, for each write not
//! covered by a sync, all of it, none of it, or any subset of its 512-byte sectors (a torn write).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

mod sim;

use sim::Change;
pub use sim::{CutReport, SimFs, SECTOR};

/// Alignment of direct I/O (`O_DIRECT`) memory, file offsets and lengths, in bytes: 4 KiB, a
/// multiple of every logical block size disks report (512 B, 4 KiB).
pub const DIRECT_ALIGN: usize = 4096;

/// How many bytes into `buf`'s allocation its first [`DIRECT_ALIGN`]-aligned address lies (at
/// most `DIRECT_ALIGN`; a buffer with `DIRECT_ALIGN` spare bytes of capacity holds its aligned
/// part from there). Only the allocation's address matters, not `buf`'s length.
pub fn aligned_skip(buf: &[u8]) -> usize {
    buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN)
}

/// A growable byte buffer whose contents start at a [`DIRECT_ALIGN`]-aligned address, as
/// `O_DIRECT` requires of the memory it writes from. It is a zeroed `Vec` with `DIRECT_ALIGN`
/// spare bytes, used from its first aligned byte (no unsafe allocation). Kept and reused across
/// writes, its pages stay mapped: a fresh buffer pays a page fault per 4 KiB on first touch.
#[derive(Default)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    /// Where the aligned part of `storage` starts.
    skip: usize,
    len: usize,
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::default();
        b.reserve(len);
        b.len = len;
        b
    }

    /// The contents (aligned unless the allocator gave memory no offset aligns, which it does
    /// not for `u8`; a misaligned direct write fails with `EINVAL` rather than corrupting).
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.skip..self.skip + self.len]
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `bytes`, moving the contents to a larger allocation when full.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        let at = self.skip + self.len;
        self.storage[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Appends zeros up to the next multiple of `multiple` bytes.
    pub fn pad_to(&mut self, multiple: usize) {
        let pad = self.len.next_multiple_of(multiple) - self.len;
        self.reserve(pad);
        let at = self.skip + self.len;
        self.storage[at..at + pad].fill(0);
        self.len += pad;
    }

    /// Bytes it can hold without moving.
    pub fn capacity(&self) -> usize {
        self.storage.len().saturating_sub(self.skip)
    }

    /// Makes room for `more` bytes after the contents (at least doubling when it moves, so
    /// appends cost amortised O(1)).
    pub fn reserve(&mut self, more: usize) {
        if self.skip + self.len + more <= self.storage.len() {
            return;
        }
        let cap = (self.len + more)
            .max(2 * self.capacity())
            .next_multiple_of(DIRECT_ALIGN);
        let mut storage = vec![0u8; cap + DIRECT_ALIGN];
        let skip = aligned_skip(&storage);
        storage[skip..skip + self.len].copy_from_slice(self.as_slice());
        self.storage = storage;
        self.skip = skip;
    }
}

/// The file system the WAL and the file backend write through.
#[derive(Clone, Default)]
pub enum Fs {
    /// The real file system (the daemon).
    #[default]
    Real,
    /// The real file system, every change recorded for [`SimFs::power_cut`] (tests).
    Sim(Arc<SimFs>),
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Real => f.write_str("Fs::Real"),
            Self::Sim(_) => f.write_str("Fs::Sim"),
        }
    }
}

/// A file opened for writing through [`Fs`].
#[derive(Debug)]
pub struct FsFile {
    file: File,
    /// The simulator and the file's identity in it (`None`: the real file system).
    sim: Option<(Arc<SimFs>, u64)>,
}

impl Fs {
    /// Creates `path` (which must not exist) for writing; the new entry is durable only after
    /// [`Fs::sync_dir`] of its directory.
    pub fn create_new(&self, path: &Path) -> std::io::Result<FsFile> {
        let open = || OpenOptions::new().create_new(true).write(true).open(path);
        match self {
            Self::Real => Ok(FsFile::real(open()?)),
            Self::Sim(sim) => sim.create(path, open),
        }
    }

    /// Creates or truncates `path` for reading and writing.
    pub fn create(&self, path: &Path) -> std::io::Result<FsFile> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
        };
        match self {
            Self::Real => Ok(FsFile::real(open()?)),
            Self::Sim(sim) => sim.create(path, open),
        }
    }

    /// Opens the existing file `path` for writing.
    pub fn open_write(&self, path: &Path) -> std::io::Result<FsFile> {
        let open = || OpenOptions::new().write(true).open(path);
        match self {
            Self::Real => Ok(FsFile::real(open()?)),
            Self::Sim(sim) => sim.open(path, open),
        }
    }

    /// Opens the existing file `path` for direct I/O writes (`O_DIRECT`: from memory straight to
    /// the device, no page-cache copy). Every write through it must start at a
    /// [`DIRECT_ALIGN`]-aligned offset and address and cover a multiple of [`DIRECT_ALIGN`]
    /// bytes, or the kernel answers `EINVAL`. A file system without direct I/O refuses the open
    /// (`EINVAL`); callers then write through the page cache. Under the simulator the writes go
    /// to the same real file through a real `O_DIRECT` descriptor (so the kernel checks the
    /// alignment) and are recorded like any write: a direct write reaches the device but may sit
    /// in its volatile cache, so it too is durable only after the file's next `fsync` or
    /// `fdatasync` and may be torn by a power cut.
    pub fn open_direct(&self, path: &Path) -> std::io::Result<FsFile> {
        let open = || {
            OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
        };
        match self {
            Self::Real => Ok(FsFile::real(open()?)),
            Self::Sim(sim) => sim.open(path, open),
        }
    }

    /// Renames `from` to `to` (replacing `to`); durable after [`Fs::sync_dir`] of the directory.
    pub fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        match self {
            Self::Real => std::fs::rename(from, to),
            Self::Sim(sim) => sim.rename(from, to),
        }
    }

    /// Renames `from` to `to` unless `to` exists (`renameat2` with `RENAME_NOREPLACE`: atomic,
    /// so of two racing renames to one name exactly one succeeds; the other gets
    /// `AlreadyExists`); durable after [`Fs::sync_dir`] of the directory.
    pub fn rename_noreplace(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let call = || {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                from,
                rustix::fs::CWD,
                to,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(std::io::Error::from)
        };
        match self {
            Self::Real => call(),
            Self::Sim(sim) => sim.rename_with(from, to, call),
        }
    }

    /// Deletes the file `path`; durable after [`Fs::sync_dir`] of its directory.
    pub fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        match self {
            Self::Real => std::fs::remove_file(path),
            Self::Sim(sim) => sim.remove(path),
        }
    }

    /// `fsync`s directory `dir`: the entries created, renamed or removed in it so far are durable.
    pub fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        match self {
            Self::Real => File::open(dir)?.sync_all(),
            Self::Sim(sim) => sim.sync_dir(dir),
        }
    }

    /// Creates `dir` and its missing parents, and makes each entry durable (`fsync` of the
    /// directory that holds it) before returning, so a power loss cannot take away a directory
    /// that files were then made durable in. A directory that already exists is synced into its
    /// parent too, once per process (another thread, or a process killed before its sync, may
    /// have created it): later calls for it cost a set lookup.
    pub fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        if self.durable_dirs().contains(dir) {
            return Ok(());
        }
        let parent = match dir.parent() {
            Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
            other => other,
        };
        if let Some(parent) = parent {
            self.create_dir_all(parent)?;
        }
        let made = match self {
            Self::Real => std::fs::create_dir(dir),
            Self::Sim(sim) => sim.mkdir(dir),
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = parent {
            self.sync_dir(parent)?;
        }
        self.durable_dirs().insert(dir.to_owned());
        Ok(())
    }

    /// Directories known to be durable in their parents: process-wide for the real file
    /// system, per simulator for [`Fs::Sim`].
    fn durable_dirs(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        static REAL: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
        let set = match self {
            Self::Real => REAL.get_or_init(Mutex::default),
            Self::Sim(sim) => &sim.synced_dirs,
        };
        set.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FsFile {
    fn real(file: File) -> Self {
        Self { file, sim: None }
    }

    /// `pwritev`: writes the slices at `offset`; returns the bytes written (maybe fewer).
    pub fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> std::io::Result<usize> {
        match &self.sim {
            None => Ok(rustix::io::pwritev(&self.file, bufs, offset)?),
            Some((sim, id)) => sim.write(*id, || {
                let n = rustix::io::pwritev(&self.file, bufs, offset)?;
                let mut data = Vec::with_capacity(n);
                for b in bufs {
                    let take = (n - data.len()).min(b.len());
                    data.extend_from_slice(&b[..take]);
                }
                Ok((n, Change::Write { offset, data }))
            }),
        }
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        match &self.sim {
            None => self.file.write_all_at(buf, offset),
            Some((sim, id)) => sim.write(*id, || {
                self.file.write_all_at(buf, offset)?;
                Ok((
                    (),
                    Change::Write {
                        offset,
                        data: buf.to_vec(),
                    },
                ))
            }),
        }
    }

    /// Sets the file's length (truncating or extending with zeros).
    pub fn set_len(&self, len: u64) -> std::io::Result<()> {
        match &self.sim {
            None => self.file.set_len(len),
            Some((sim, id)) => sim.write(*id, || {
                self.file.set_len(len)?;
                Ok(((), Change::SetLen(len)))
            }),
        }
    }

    /// `fdatasync`: the file's data and length are durable.
    pub fn sync_data(&self) -> std::io::Result<()> {
        match &self.sim {
            None => self.file.sync_data(),
            Some((sim, id)) => sim.sync_file(*id, || self.file.sync_data()),
        }
    }

    /// `fsync`: as [`FsFile::sync_data`] (the simulator tracks no other metadata).
    pub fn sync_all(&self) -> std::io::Result<()> {
        match &self.sim {
            None => self.file.sync_all(),
            Some((sim, id)) => sim.sync_file(*id, || self.file.sync_all()),
        }
    }

    /// `posix_fadvise(DONTNEED)` over the whole file: advice only, errors ignored.
    pub fn drop_cache(&self) {
        let _ = rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::DontNeed);
    }
}

/// Calls `visit(path, is_dir)` for every file and directory below `dir`, parents before their
/// contents; a missing `dir` has none.
pub(crate) fn walk(dir: &Path, visit: &mut dyn FnMut(&Path, bool)) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let is_dir = entry.file_type()?.is_dir();
        visit(&path, is_dir);
        if is_dir {
            walk(&path, visit)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory, its root `r` (not created) and a simulator over that root.
    fn sim_under_temp_root() -> (tempfile::TempDir, PathBuf, Arc<SimFs>, Fs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("r");
        let sim = SimFs::new(&[&root]).expect("sim");
        let fs = Fs::Sim(sim.clone());
        (dir, root, sim, fs)
    }

    /// Synced data and synced directory entries survive every cut; unsynced ones may not.
    #[test]
    fn synced_changes_survive_every_cut() {
        for seed in 0..64 {
            let (_dir, root, sim, fs) = sim_under_temp_root();
            fs.create_dir_all(&root.join("a")).expect("mkdir");
            let f = fs.create_new(&root.join("a/x")).expect("create");
            f.write_all_at(&[1u8; 1024], 0).expect("write");
            f.sync_data().expect("sync");
            fs.sync_dir(&root.join("a")).expect("sync dir");
            f.write_all_at(&[2u8; 1024], 0).expect("write");
            let g = fs.create_new(&root.join("a/y")).expect("create");
            g.write_all_at(&[3u8; 10], 0).expect("write");
            g.sync_data().expect("sync");
            sim.power_cut(seed).expect("cut");
            assert!(f.write_all_at(&[9], 0).is_err(), "the machine is off");
            let x = std::fs::read(root.join("a/x")).expect("x survives");
            assert_eq!(x.len(), 1024);
            for sector in x.chunks(SECTOR) {
                assert!(
                    sector.iter().all(|&b| b == 1) || sector.iter().all(|&b| b == 2),
                    "seed {seed}: a sector is old or new, never mixed"
                );
            }
            // y's entry was never made durable: present (with its synced data) or absent.
            match std::fs::read(root.join("a/y")) {
                Ok(y) => assert_eq!(y, [3u8; 10]),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            }
        }
    }

    /// A directory whose creation was never made durable vanishes with its files, even synced
    /// ones (the reason new directories are synced into their parents).
    #[test]
    fn an_unsynced_mkdir_can_lose_its_files() {
        let mut lost = 0;
        for seed in 0..32 {
            let (_dir, root, sim, fs) = sim_under_temp_root();
            let sub = root.join("d");
            sim.mkdir(&sub).expect("mkdir without a parent sync");
            let f = fs.create_new(&sub.join("x")).expect("create");
            f.write_all_at(b"data", 0).expect("write");
            f.sync_all().expect("sync");
            fs.sync_dir(&sub).expect("sync dir");
            sim.power_cut(seed).expect("cut");
            if !sub.join("x").exists() {
                lost += 1;
            }
        }
        assert!(lost > 0, "some cut drops the unsynced directory");
    }

    /// The contents stay aligned and intact as the buffer grows; padding adds zeros.
    #[test]
    fn aligned_buf_stays_aligned_as_it_grows() {
        let mut b = AlignedBuf::default();
        let mut want = Vec::new();
        for i in 0..200u32 {
            let piece = vec![i as u8 | 1; 1 + (i as usize * 97) % 5000];
            b.extend_from_slice(&piece);
            want.extend_from_slice(&piece);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        }
        assert_eq!(b.as_slice(), &want[..]);
        b.pad_to(DIRECT_ALIGN);
        assert_eq!(b.len() % DIRECT_ALIGN, 0);
        assert!(b.as_slice()[want.len()..].iter().all(|&x| x == 0));
        assert_eq!(AlignedBuf::zeroed(5000).as_slice(), &[0; 5000][..]);
        b.clear();
        b.extend_from_slice(&[7; 10]);
        b.pad_to(DIRECT_ALIGN);
        assert_eq!(b.as_slice()[..10], [7; 10]);
        assert!(
            b.as_slice()[10..].iter().all(|&x| x == 0),
            "padding over old contents is zeros"
        );
    }

    /// Direct writes under the simulator reach the real file, are checked for alignment by the
    /// kernel, and survive a power cut only once the file is synced, like any write.
    #[test]
    fn direct_writes_are_recorded_by_the_simulator() {
        let mut b = AlignedBuf::default();
        b.extend_from_slice(&[5; 2 * DIRECT_ALIGN]);
        let mut lost = 0;
        for seed in 0..32 {
            let (_dir, root, sim, fs) = sim_under_temp_root();
            fs.create_dir_all(&root).expect("mkdir");
            let path = root.join("x");
            let f = fs.create_new(&path).expect("create");
            fs.sync_dir(&root).expect("sync dir");
            let Ok(direct) = fs.open_direct(&path) else {
                eprintln!("no O_DIRECT on this file system; nothing to check");
                return;
            };
            direct.write_all_at(b.as_slice(), 0).expect("direct write");
            assert_eq!(std::fs::read(&path).expect("read"), b.as_slice());
            let misaligned = direct.write_all_at(&b.as_slice()[..100], 0);
            assert!(
                misaligned.is_err(),
                "the kernel checks direct I/O alignment"
            );
            let synced = seed % 2 == 0;
            if synced {
                f.sync_data().expect("sync");
            }
            sim.power_cut(seed).expect("cut");
            let after = std::fs::read(&path).expect("read");
            if synced {
                assert_eq!(
                    after,
                    b.as_slice(),
                    "seed {seed}: a synced direct write is kept"
                );
            } else if after != b.as_slice() {
                lost += 1;
            }
        }
        assert!(lost > 0, "some cut loses an unsynced direct write");
    }
}

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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

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

    /// Opens the existing file `path` for direct I/O writes (`O_DIRECT`). The simulator refuses
    /// (`Unsupported`), so callers take their buffered path under it.
    pub fn open_direct(&self, path: &Path) -> std::io::Result<FsFile> {
        match self {
            Self::Real => Ok(FsFile::real(
                OpenOptions::new()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                    .open(path)?,
            )),
            Self::Sim(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    /// Renames `from` to `to` (replacing `to`); durable after [`Fs::sync_dir`] of the directory.
    pub fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        match self {
            Self::Real => std::fs::rename(from, to),
            Self::Sim(sim) => sim.rename(from, to),
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

/// One change to a file's bytes, not yet covered by a sync.
#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// One change to a directory, not yet covered by a sync of it.
#[derive(Debug, Clone)]
enum DirChange {
    /// A name now refers to file `id` (create, or the target of a rename).
    Link { path: PathBuf, id: u64 },
    /// A name removed (unlink, or the source of a rename).
    Unlink { path: PathBuf },
    /// A directory created.
    Mkdir { path: PathBuf },
}

impl DirChange {
    fn dir(&self) -> Option<&Path> {
        match self {
            Self::Link { path, .. } | Self::Unlink { path } | Self::Mkdir { path } => path.parent(),
        }
    }
}

/// A file's bytes as of its last sync, and its changes since.
#[derive(Debug, Default, Clone)]
struct SimFile {
    durable: Vec<u8>,
    pending: Vec<Change>,
}

#[derive(Debug, Default)]
struct SimState {
    next_id: u64,
    files: HashMap<u64, SimFile>,
    /// Names as they are now.
    names: HashMap<PathBuf, u64>,
    /// Names as a power cut would find them without any pending directory change.
    durable_names: BTreeMap<PathBuf, u64>,
    /// Directories created below the roots that are durable.
    durable_dirs: Vec<PathBuf>,
    /// Directory changes not yet durable, oldest first.
    pending: Vec<DirChange>,
    /// Set by a power cut: every later change fails and touches nothing (the machine is off).
    off: bool,
    /// Every `fsync`/`fdatasync` of a file below this directory fails with `EIO` (a failing
    /// disk) while set.
    fail_syncs: Option<PathBuf>,
}

/// What a power cut did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// Pending directory changes, and how many of them (a prefix) survived.
    pub dir_changes: usize,
    /// Directory changes that survived.
    pub dir_changes_kept: usize,
    /// Writes not covered by a sync.
    pub writes: usize,
    /// Of those: kept whole.
    pub writes_kept: usize,
    /// Of those: torn (some sectors kept, not all).
    pub writes_torn: usize,
    /// Files below the roots after the cut.
    pub files: usize,
}

/// Device sector: the unit a torn write keeps or loses.
pub const SECTOR: usize = 512;

/// The power-loss simulator: records the changes made through [`Fs::Sim`] to files below its
/// roots; [`SimFs::power_cut`] rewrites those files as a power loss could leave them.
#[derive(Debug)]
pub struct SimFs {
    roots: Vec<PathBuf>,
    state: Mutex<SimState>,
    /// [`Fs::create_dir_all`]'s directories known durable, for this simulator's life.
    synced_dirs: Mutex<HashSet<PathBuf>>,
}

fn off_error() -> std::io::Error {
    std::io::Error::other("power cut: the simulated machine is off")
}

impl SimFs {
    /// A simulator for the files below `roots` (created if missing). Files already there are
    /// taken as durable.
    ///
    /// Errors: reading the existing files.
    pub fn new(roots: &[&Path]) -> std::io::Result<Arc<Self>> {
        let mut state = SimState::default();
        for root in roots {
            std::fs::create_dir_all(root)?;
            for path in walk_files(root)? {
                let id = state.next_id;
                state.next_id += 1;
                state.files.insert(
                    id,
                    SimFile {
                        durable: std::fs::read(&path)?,
                        pending: Vec::new(),
                    },
                );
                state.names.insert(path.clone(), id);
                state.durable_names.insert(path, id);
            }
            for dir in walk_dirs(root)? {
                state.durable_dirs.push(dir);
            }
        }
        Ok(Arc::new(Self {
            roots: roots.iter().map(|r| r.to_path_buf()).collect(),
            state: Mutex::new(state),
            synced_dirs: Mutex::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves the state as usable as any other.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tracked(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| path.starts_with(r))
    }

    fn create(
        self: &Arc<Self>,
        path: &Path,
        open: impl FnOnce() -> std::io::Result<File>,
    ) -> std::io::Result<FsFile> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        let existed = s.names.get(path).copied();
        let file = open()?;
        if !self.tracked(path) {
            return Ok(FsFile::real(file));
        }
        let id = match existed {
            // Truncated in place: same file, its length changes.
            Some(id) => {
                if let Some(f) = s.files.get_mut(&id) {
                    f.pending.push(Change::SetLen(0));
                }
                id
            }
            None => {
                let id = s.next_id;
                s.next_id += 1;
                s.files.insert(id, SimFile::default());
                s.names.insert(path.to_owned(), id);
                s.pending.push(DirChange::Link {
                    path: path.to_owned(),
                    id,
                });
                id
            }
        };
        Ok(FsFile {
            file,
            sim: Some((self.clone(), id)),
        })
    }

    fn open(
        self: &Arc<Self>,
        path: &Path,
        open: impl FnOnce() -> std::io::Result<File>,
    ) -> std::io::Result<FsFile> {
        let s = self.lock();
        if s.off {
            return Err(off_error());
        }
        let file = open()?;
        Ok(FsFile {
            file,
            sim: s.names.get(path).map(|&id| (self.clone(), id)),
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        std::fs::rename(from, to)?;
        if let Some(id) = s.names.remove(from) {
            s.names.insert(to.to_owned(), id);
            s.pending.push(DirChange::Link {
                path: to.to_owned(),
                id,
            });
            s.pending.push(DirChange::Unlink {
                path: from.to_owned(),
            });
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        std::fs::remove_file(path)?;
        if s.names.remove(path).is_some() {
            s.pending.push(DirChange::Unlink {
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    fn mkdir(&self, dir: &Path) -> std::io::Result<()> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        std::fs::create_dir(dir)?;
        if self.tracked(dir) {
            s.pending.push(DirChange::Mkdir {
                path: dir.to_owned(),
            });
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.off {
            return Err(off_error());
        }
        File::open(dir)?.sync_all()?;
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut s.pending)
            .into_iter()
            .partition(|c| c.dir() == Some(dir));
        s.pending = rest;
        for change in done {
            apply_dir_change(&mut s.durable_names, &mut s.durable_dirs, change);
        }
        Ok(())
    }

    fn write<T>(
        &self,
        id: u64,
        op: impl FnOnce() -> std::io::Result<(T, Change)>,
    ) -> std::io::Result<T> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        let (out, change) = op()?;
        if let Some(f) = s.files.get_mut(&id) {
            f.pending.push(change);
        }
        Ok(out)
    }

    fn sync_file(&self, id: u64, op: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        let path = s
            .names
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(p, _)| p.clone());
        if let (Some(failing), Some(path)) = (&s.fail_syncs, &path) {
            if path.starts_with(failing) {
                // Linux marks the pages it could not write clean and may drop them: what a
                // later read sees is the disk's old content. Model the worst case.
                if let Some(f) = s.files.get_mut(&id) {
                    f.pending.clear();
                    std::fs::write(path, &f.durable)?;
                }
                return Err(std::io::Error::from_raw_os_error(5));
            }
        }
        op()?;
        if let Some(f) = s.files.get_mut(&id) {
            for change in std::mem::take(&mut f.pending) {
                apply_change(&mut f.durable, &change, None);
            }
        }
        Ok(())
    }

    /// While `under` is set, every `fsync`/`fdatasync` of a file below it fails with `EIO`, as on a
    /// failing disk: nothing becomes durable, and the file's unsynced writes are lost (its
    /// bytes go back to the last synced ones, as when Linux drops pages it could not write
    /// back). The one fault here no real file system on this machine produces on demand.
    pub fn fail_syncs(&self, under: Option<&Path>) {
        self.lock().fail_syncs = under.map(Path::to_path_buf);
    }

    /// Cuts the power: from now on every change through this simulator fails (whatever still
    /// runs of the old process is on a dead machine), and the files below the roots are
    /// rewritten as the cut left them, chosen by `seed`: a prefix of the pending directory
    /// changes survives; each write not covered by a sync survives whole, not at all, or as a
    /// random subset of its 512-byte sectors; each pending `set_len` survives or not. Files
    /// outside the roots are not touched.
    ///
    /// Afterwards the simulator is spent: open a new one for the next life.
    ///
    /// Errors: rewriting the files.
    pub fn power_cut(&self, seed: u64) -> std::io::Result<CutReport> {
        let mut s = self.lock();
        s.off = true;
        let mut rng = SplitMix(seed);
        let mut report = CutReport {
            dir_changes: s.pending.len(),
            ..CutReport::default()
        };
        let keep = rng.below(s.pending.len() as u64 + 1) as usize;
        report.dir_changes_kept = keep;
        let mut names = s.durable_names.clone();
        let mut dirs = s.durable_dirs.clone();
        for change in s.pending[..keep].iter().cloned() {
            apply_dir_change(&mut names, &mut dirs, change);
        }
        // Files below a directory whose creation did not survive are gone with it.
        let pending_dirs: Vec<PathBuf> = s.pending[keep..]
            .iter()
            .filter_map(|c| match c {
                DirChange::Mkdir { path } if !dirs.contains(path) => Some(path.clone()),
                _ => None,
            })
            .collect();
        names.retain(|p, _| !pending_dirs.iter().any(|d| p.starts_with(d)));
        let mut contents = BTreeMap::new();
        for (path, id) in &names {
            let Some(f) = s.files.get(id) else { continue };
            let mut bytes = f.durable.clone();
            for change in &f.pending {
                match change {
                    Change::Write { data, .. } => {
                        report.writes += 1;
                        match rng.below(3) {
                            0 => {}
                            1 => {
                                report.writes_kept += 1;
                                apply_change(&mut bytes, change, None);
                            }
                            _ => {
                                let sectors = data.len().div_ceil(SECTOR) as u64;
                                let mask: Vec<bool> =
                                    (0..sectors).map(|_| rng.below(2) == 1).collect();
                                if mask.iter().any(|k| !k) {
                                    report.writes_torn += 1;
                                }
                                apply_change(&mut bytes, change, Some(&mask));
                            }
                        }
                    }
                    Change::SetLen(_) => {
                        if rng.below(2) == 1 {
                            apply_change(&mut bytes, change, None);
                        }
                    }
                }
            }
            contents.insert(path.clone(), bytes);
        }
        report.files = contents.len();
        for root in &self.roots {
            for path in walk_files(root)? {
                std::fs::remove_file(&path)?;
            }
            let mut existing = walk_dirs(root)?;
            existing.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in existing {
                if !dirs.contains(&dir) {
                    std::fs::remove_dir(&dir)?;
                }
            }
        }
        for (path, bytes) in contents {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
        }
        Ok(report)
    }
}

/// Applies `change` to `bytes`; with a `mask`, only the 512-byte sectors of a write marked true.
fn apply_change(bytes: &mut Vec<u8>, change: &Change, mask: Option<&[bool]>) {
    match change {
        Change::SetLen(len) => bytes.resize(*len as usize, 0),
        Change::Write { offset, data } => {
            for (k, sector) in data.chunks(SECTOR).enumerate() {
                if mask.is_some_and(|m| !m[k]) {
                    continue;
                }
                let at = *offset as usize + k * SECTOR;
                if bytes.len() < at + sector.len() {
                    bytes.resize(at + sector.len(), 0);
                }
                bytes[at..at + sector.len()].copy_from_slice(sector);
            }
        }
    }
}

fn apply_dir_change(
    names: &mut BTreeMap<PathBuf, u64>,
    dirs: &mut Vec<PathBuf>,
    change: DirChange,
) {
    match change {
        DirChange::Link { path, id } => {
            names.insert(path, id);
        }
        DirChange::Unlink { path } => {
            names.remove(&path);
        }
        DirChange::Mkdir { path } => dirs.push(path),
    }
}

fn walk_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, &mut |p, is_dir| {
        if !is_dir {
            out.push(p.to_owned());
        }
    })?;
    Ok(out)
}

fn walk_dirs(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, &mut |p, is_dir| {
        if is_dir {
            out.push(p.to_owned());
        }
    })?;
    Ok(out)
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

/// SplitMix64: a small, seedable generator so a cut replays from its seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synced data and synced directory entries survive every cut; unsynced ones may not.
    #[test]
    fn synced_changes_survive_every_cut() {
        for seed in 0..64 {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("r");
            let sim = SimFs::new(&[&root]).expect("sim");
            let fs = Fs::Sim(sim.clone());
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
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("r");
            let sim = SimFs::new(&[&root]).expect("sim");
            let fs = Fs::Sim(sim.clone());
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
}

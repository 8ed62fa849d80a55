//! The power-loss simulator: [`SimFs`] records what the WAL and the file backend write and sync,
//! and [`SimFs::power_cut`] rewrites the files as a power loss could have left them (the model
//! is in the parent module's docs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{walk, FsFile};

/// One change to a file's bytes, not yet covered by a sync.
#[derive(Debug, Clone)]
pub(super) enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// One change to a directory, not yet covered by a sync of it.
#[derive(Debug, Clone)]
pub(super) enum DirChange {
    /// A name now refers to file `id` (create, or the target of a rename).
    Link { path: PathBuf, id: u64 },
    /// A name removed (unlink, or the source of a rename).
    Unlink { path: PathBuf },
    /// A directory created.
    Mkdir { path: PathBuf },
}

impl DirChange {
    pub(super) fn dir(&self) -> Option<&Path> {
        match self {
            Self::Link { path, .. } | Self::Unlink { path } | Self::Mkdir { path } => path.parent(),
        }
    }
}

/// A file's bytes as of its last sync, and its changes since.
#[derive(Debug, Default, Clone)]
pub(super) struct SimFile {
    durable: Vec<u8>,
    pending: Vec<Change>,
}

#[derive(Debug, Default)]
pub(super) struct SimState {
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
    /// Writes to files below this directory wait while set (a disk that stopped answering).
    hold_writes: Option<PathBuf>,
}

impl SimState {
    /// The current name of file `id`, if it has one.
    fn path_of(&self, id: u64) -> Option<PathBuf> {
        self.names
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(p, _)| p.clone())
    }

    /// True while writes to file `id` wait ([`SimFs::hold_writes`]).
    fn held(&self, id: u64) -> bool {
        match &self.hold_writes {
            Some(under) if !self.off => self.path_of(id).is_some_and(|p| p.starts_with(under)),
            _ => false,
        }
    }
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
    /// Signalled when [`SimFs::hold_writes`] changes.
    released: Condvar,
    /// [`super::Fs::create_dir_all`]'s directories known durable, for this simulator's life.
    pub(super) synced_dirs: Mutex<HashSet<PathBuf>>,
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
            released: Condvar::new(),
            synced_dirs: Mutex::default(),
        }))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves the state as usable as any other.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn tracked(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| path.starts_with(r))
    }

    pub(super) fn create(
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

    pub(super) fn open(
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

    pub(super) fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.rename_with(from, to, || std::fs::rename(from, to))
    }

    /// A rename made by `call` (plain, or `RENAME_NOREPLACE`), recorded like [`SimFs::rename`]
    /// when it succeeds.
    pub(super) fn rename_with(
        &self,
        from: &Path,
        to: &Path,
        call: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        call()?;
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

    pub(super) fn remove(&self, path: &Path) -> std::io::Result<()> {
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

    pub(super) fn mkdir(&self, dir: &Path) -> std::io::Result<()> {
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

    pub(super) fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
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

    pub(super) fn write<T>(
        &self,
        id: u64,
        op: impl FnOnce() -> std::io::Result<(T, Change)>,
    ) -> std::io::Result<T> {
        let mut s = self.lock();
        while s.held(id) {
            s = self.released.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.off {
            return Err(off_error());
        }
        let (out, change) = op()?;
        if let Some(f) = s.files.get_mut(&id) {
            f.pending.push(change);
        }
        Ok(out)
    }

    pub(super) fn sync_file(
        &self,
        id: u64,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut s = self.lock();
        if s.off {
            return Err(off_error());
        }
        let path = s.path_of(id);
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

    /// While `under` is set, every write to a file below it waits (the writing thread blocks)
    /// until it is cleared or the power is cut: a disk that stopped answering, or one so slow
    /// that everything queues in front of it. `None` lets the waiting writes go on.
    pub fn hold_writes(&self, under: Option<&Path>) {
        self.lock().hold_writes = under.map(Path::to_path_buf);
        self.released.notify_all();
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
        // Held writers wake up to a machine that is off.
        self.released.notify_all();
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

/// SplitMix64: a small, seedable generator so a cut replays from its seed.
pub(super) struct SplitMix(u64);

impl SplitMix {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

//! File backend: one file per object under a root directory.
//!
//! `put` writes `KEY.tmp-RANDOM`, `fsync`s it, renames it over `KEY` and `fsync`s the directory
//! (a directory it had to create is `fsync`ed into its parent first), so an object is either
//! wholly present or absent after a crash or a power loss; the daemon deletes the
//! temporary files of interrupted puts at start ([`remove_leftover_temp_files`]).
//! `put_uncached` writes an object built at a 4 KiB-aligned address (chunk objects) with direct
//! I/O, not through the page cache (`write_new`). All file I/O runs on tokio's blocking pool.
//!
//! Ranged reads keep up to [`OPEN_FILES`] objects open (with their length): a 4 KiB random read
//! used to spend more time in `open`/`fstat`/`close` than in `pread`. `put` and `delete` drop a
//! key's open file, so a deleted object's space is freed once in-flight reads finish.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{check_key, check_range, Backend, BackendError};
use crate::fs::{Fs, FsFile, DIRECT_ALIGN};

/// Objects kept open for ranged reads (file descriptors).
pub const OPEN_FILES: usize = 128;

/// An object open for ranged reads, and its length in bytes.
type OpenObject = Arc<(std::fs::File, u64)>;

/// Objects as files below `root`.
#[derive(Clone)]
pub struct FileBackend {
    root: PathBuf,
    fs: Fs,
    open: Arc<quick_cache::sync::Cache<String, OpenObject>>,
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl FileBackend {
    /// A backend rooted at `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, BackendError> {
        Self::with_fs(root, Fs::Real)
    }

    /// A backend rooted at `root` that writes through `fs` (the power-loss simulator in tests).
    pub fn with_fs(root: impl Into<PathBuf>, fs: Fs) -> Result<Self, BackendError> {
        let root = root.into();
        fs.create_dir_all(&root)
            .map_err(|e| io_err(&root.display().to_string(), e))?;
        Ok(Self {
            root,
            fs,
            open: Arc::new(quick_cache::sync::Cache::new(OPEN_FILES)),
        })
    }

    /// Reads bytes `range` of object `key` through the open-file cache (blocking).
    fn read_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        use std::os::unix::fs::FileExt;
        let object = match self.open.get(key) {
            Some(o) => o,
            None => {
                let f = std::fs::File::open(self.path(key)?).map_err(|e| io_err(key, e))?;
                let len = f.metadata().map_err(|e| io_err(key, e))?.len();
                let o = Arc::new((f, len));
                self.open.insert(key.to_owned(), o.clone());
                o
            }
        };
        let (f, len) = &*object;
        check_range(key, &range, *len)?;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        f.read_exact_at(&mut buf, range.start)
            .map_err(|e| io_err(key, e))?;
        Ok(Bytes::from(buf))
    }

    /// `put` (`direct`: `put_uncached`).
    async fn replace(&self, key: &str, data: Bytes, direct: bool) -> Result<(), BackendError> {
        let path = self.path(key)?;
        self.open.remove(key);
        let k = key.to_owned();
        let fs = self.fs.clone();
        blocking(key, move || {
            store(&fs, &path, &data, direct, |tmp, path| {
                fs.rename(tmp, path).map(|()| true)
            })
            .map(|_| ())
            .map_err(|e| io_err(&k, e))
        })
        .await
    }

    fn path(&self, key: &str) -> Result<PathBuf, BackendError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// Writes `data` into a new temporary file beside `path` and syncs it, then `place`s it there
/// (a rename; `Ok(false)`: not placed) and syncs the directory. The temporary file is removed
/// unless it was placed. Returns whether it was.
fn store(
    fs: &Fs,
    path: &Path,
    data: &[u8],
    direct: bool,
    place: impl FnOnce(&Path, &Path) -> std::io::Result<bool>,
) -> std::io::Result<bool> {
    let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
    fs.create_dir_all(&dir)?;
    let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let f = fs.create(&tmp)?;
        write_new(fs, &f, &tmp, data, direct)?;
        f.sync_all()?;
        let placed = place(&tmp, path)?;
        fs.sync_dir(&dir)?;
        Ok(placed)
    })();
    if !matches!(result, Ok(true)) {
        let _ = fs.remove_file(&tmp);
    }
    result
}

/// Writes `data` at offset 0 of `file`, the new file at `path`. With `direct` (`put_uncached`)
/// and `data` at a [`DIRECT_ALIGN`]-aligned address (chunk objects are built that way) its whole
/// 4 KiB blocks go through direct I/O: from the object's buffer to the device, with no page-cache
/// pages to allocate, fill and write back (sustained sequential writes spent ~30% of their CPU
/// there). The last partial block, and everything where direct I/O is unavailable (tmpfs) or
/// refused, goes through the page cache. Either way, `fsync` makes it durable.
fn write_new(
    fs: &Fs,
    file: &FsFile,
    path: &Path,
    data: &[u8],
    direct: bool,
) -> std::io::Result<()> {
    let bulk = if direct && (data.as_ptr() as usize) % DIRECT_ALIGN == 0 {
        data.len() / DIRECT_ALIGN * DIRECT_ALIGN
    } else {
        0
    };
    let mut done = 0;
    if bulk > 0 {
        if let Ok(direct) = fs.open_direct(path) {
            if direct.write_all_at(&data[..bulk], 0).is_ok() {
                done = bulk;
            }
        }
    }
    file.write_all_at(&data[done..], done as u64)
}

fn io_err(key: &str, e: std::io::Error) -> BackendError {
    if e.kind() == std::io::ErrorKind::NotFound {
        return BackendError::NotFound(key.to_owned());
    }
    BackendError::Io {
        key: key.to_owned(),
        message: e.to_string(),
        transient: matches!(
            e.kind(),
            std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut // A full disk or quota (ENOSPC, EDQUOT) and running out of file descriptors (EMFILE,
                                                                           // ENFILE) pass when space or descriptors are freed.
        ) || matches!(e.raw_os_error(), Some(28 | 122 | 24 | 23)),
    }
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Io {
            key: key.to_owned(),
            message: format!("blocking task failed: {e}"),
            transient: false,
        })?
}

#[async_trait]
impl Backend for FileBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.replace(key, data, false).await
    }

    async fn put_uncached(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.replace(key, data, true).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, BackendError> {
        let path = self.path(key)?;
        let k = key.to_owned();
        let fs = self.fs.clone();
        blocking(key, move || {
            // Placed or not, the directory is synced: the caller acts on the object there (its
            // own or the winner's), which must then survive a power cut.
            store(&fs, &path, &data, false, |tmp, path| {
                match fs.rename_noreplace(tmp, path) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                    Ok(()) => Ok(true),
                }
            })
            .map_err(|e| io_err(&k, e))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let path = self.path(key)?;
        let k = key.to_owned();
        blocking(key, move || {
            std::fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| io_err(&k, e))
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BackendError> {
        let this = self.clone();
        let k = key.to_owned();
        blocking(key, move || this.read_range(&k, range)).await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        self.open.remove(key);
        let k = key.to_owned();
        let open = self.open.clone();
        let fs = self.fs.clone();
        blocking(key, move || {
            let r = match fs.remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(&k, e)),
            };
            // A read that opened the file before the unlink may have cached it meanwhile.
            open.remove(&k);
            r
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(&prefix.clone(), move || {
            let mut out = Vec::new();
            let keep = |k: &str| k.starts_with(&prefix) && !k.contains(".tmp-");
            walk(&root, &root, &keep, &mut out).map_err(|e| io_err(&prefix, e))?;
            out.sort();
            Ok(out)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn get_range_blocking(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Option<Result<Bytes, BackendError>> {
        Some(self.read_range(key, range))
    }
}

/// Deletes the temporary files (`KEY.tmp-RANDOM`) of `put`s a crash interrupted below `root`:
/// their objects were never renamed into place, so nothing refers to them. Returns how many were
/// deleted. Call only while no `put` runs on `root` (the daemon, at start, once it holds the
/// data directory); it reads every object's directory entry (and keeps only the temporary ones).
///
/// Errors: the directory walk's I/O errors; files that vanish meanwhile are not errors.
pub fn remove_leftover_temp_files(root: &Path) -> std::io::Result<usize> {
    let mut keys = Vec::new();
    walk(root, root, &|k: &str| k.contains(".tmp-"), &mut keys)?;
    let mut removed = 0;
    for key in &keys {
        match std::fs::remove_file(root.join(key)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Appends to `out` the keys (paths relative to `root`) of the files below `dir` that `keep`
/// accepts, so a walk over millions of objects holds only the ones wanted.
fn walk(
    root: &Path,
    dir: &Path,
    keep: &dyn Fn(&str) -> bool,
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    crate::fs::walk(dir, &mut |path, is_dir| {
        if let Some(k) = path.strip_prefix(root).ok().and_then(Path::to_str) {
            if !is_dir && keep(k) {
                out.push(k.to_owned());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn contract() {
        let dir = tempfile::tempdir().unwrap();
        super::super::contract::check(&super::FileBackend::new(dir.path()).unwrap()).await;
    }

    /// An object at an aligned address (as chunk objects are built) put uncached is written
    /// through direct I/O in whole blocks and the page cache for the rest; every byte comes back,
    /// and a power cut after the put returns keeps all of it.
    #[tokio::test]
    async fn an_aligned_object_is_stored_whole() {
        use crate::backend::Backend;
        use crate::fs::{AlignedBuf, Fs, SimFs, DIRECT_ALIGN};
        for len in [DIRECT_ALIGN, 3 * DIRECT_ALIGN + 100, 1 << 20, 100] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("objects");
            let sim = SimFs::new(&[&root]).unwrap();
            let b = super::FileBackend::with_fs(&root, Fs::Sim(sim.clone())).unwrap();
            let mut buf = AlignedBuf::default();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            buf.extend_from_slice(&data);
            let aligned = bytes::Bytes::from_owner(buf);
            assert_eq!(aligned.as_ptr() as usize % DIRECT_ALIGN, 0);
            b.put_uncached("v/c/1", aligned).await.unwrap();
            assert_eq!(&b.get("v/c/1").await.unwrap()[..], &data[..], "len {len}");
            sim.power_cut(len as u64).unwrap();
            let after = std::fs::read(root.join("v/c/1")).unwrap();
            assert_eq!(after, data, "len {len}: the put was durable");
        }
    }

    /// Of racing conditional puts (each on its own blocking thread, two backends on one
    /// directory as two processes would be) exactly one stores, and no temp file is left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_conditional_puts_store_once() {
        use crate::backend::Backend;
        let dir = tempfile::tempdir().unwrap();
        let key = "vol/epoch/0000000000000001";
        let mut writers = Vec::new();
        for i in 0..8u8 {
            let b = super::FileBackend::new(dir.path()).unwrap();
            writers.push(tokio::spawn(async move {
                (i, b.put_if_absent(key, vec![i; 8].into()).await.unwrap())
            }));
        }
        let mut winners = Vec::new();
        for w in writers {
            let (i, stored) = w.await.unwrap();
            if stored {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let b = super::FileBackend::new(dir.path()).unwrap();
        assert_eq!(&b.get(key).await.unwrap()[..], &[winners[0]; 8][..]);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("vol/epoch"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["0000000000000001"], "temp files left");
    }

    #[tokio::test]
    async fn leftover_temp_files_are_removed_and_objects_kept() {
        use crate::backend::Backend;
        let dir = tempfile::tempdir().unwrap();
        let b = super::FileBackend::new(dir.path()).unwrap();
        b.put(
            "vol/chunks/0000000000000001",
            bytes::Bytes::from_static(b"object"),
        )
        .await
        .unwrap();
        // What a crash between a put's create and its rename leaves.
        let tmp = dir
            .path()
            .join("vol/chunks/0000000000000002.tmp-00000000deadbeef");
        std::fs::write(&tmp, b"half").unwrap();
        assert_eq!(super::remove_leftover_temp_files(dir.path()).unwrap(), 1);
        assert!(!tmp.exists());
        assert_eq!(
            b.list("vol/").await.unwrap(),
            vec!["vol/chunks/0000000000000001".to_string()]
        );
        assert_eq!(
            b.get("vol/chunks/0000000000000001").await.unwrap(),
            bytes::Bytes::from_static(b"object")
        );
        assert_eq!(super::remove_leftover_temp_files(dir.path()).unwrap(), 0);
    }
}

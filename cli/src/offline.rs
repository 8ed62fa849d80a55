//! Offline tools on a stopped daemon's data directory: inspect, fsck, import, export, recover.
//! They open RocksDB themselves, so the daemon must not be running on the same directory; they
//! take the daemon's backend flags (`--backend s3 --s3-bucket ...`) to reach its chunk objects.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use vblock::backend::SharedBackend;
use vblock::fsck;
use vblock::meta::MetaStore;
use vblock::{Engine, EngineConfig, VolumeError, VolumeId};

/// Errors of the offline tools.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The engine failed: metadata ([`vblock::meta::MetaError::Locked`] when a daemon runs on
    /// the data directory), WAL, backend.
    #[error(transparent)]
    Engine(#[from] VolumeError),
    /// The backend could not be set up (bad flags, missing bucket, unreachable).
    #[error(transparent)]
    Backend(#[from] crate::serve::ServeError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The command line names something that is not there or does not fit.
    #[error("{0}")]
    Usage(String),
    /// `inspect wal` found records that do not verify.
    #[error("WAL has bad records (a bad last record is a torn tail that replay truncates)")]
    BadWal,
    /// fsck found problems.
    #[error("fsck found {0} problem(s)")]
    Problems(usize),
    /// A volume could not be opened (its WAL replay failed).
    #[error("{id}: {source}")]
    Volume {
        /// The volume.
        id: VolumeId,
        /// Why.
        source: VolumeError,
    },
}

impl From<vblock::meta::MetaError> for OfflineError {
    fn from(e: vblock::meta::MetaError) -> Self {
        Self::Engine(e.into())
    }
}

impl From<vblock::wal::WalError> for OfflineError {
    fn from(e: vblock::wal::WalError) -> Self {
        Self::Engine(e.into())
    }
}

/// [`OfflineError::Io`] for `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OfflineError + '_ {
    move |source| OfflineError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A volume id from the command line.
fn volume_id(s: &str) -> Result<VolumeId, OfflineError> {
    VolumeId::parse(s).map_err(|e| OfflineError::Usage(e.to_string()))
}

/// Where a stopped daemon keeps its data.
#[derive(Debug, Args, Clone)]
pub struct DataDir {
    /// Data directory of the daemon.
    #[arg(long, env = "VBLOCK_DATA_DIR", default_value = "./vblock-data")]
    pub data_dir: PathBuf,
    /// WAL directory (default DATA_DIR/wal).
    #[arg(long, env = "VBLOCK_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// What WAL replay does with a bad record when a volume is opened (as `vblock serve`'s
    /// flag; docs/RELIABILITY.md, "WAL recovery modes").
    #[arg(
        long,
        env = "VBLOCK_WAL_RECOVERY_MODE",
        default_value = "tolerate-tail-corruption"
    )]
    pub wal_recovery_mode: vblock::wal::WalRecovery,
    /// Where the chunk objects are (as `vblock serve`'s flags).
    #[command(flatten)]
    pub store: crate::serve::BackendArgs,
}

impl DataDir {
    fn wal_dir(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal"))
    }
    /// The chunk backend the daemon used: the data directory's `objects` for `--backend file`,
    /// the bucket for `--backend s3`. A memory backend keeps nothing to work on.
    async fn backend(&self) -> Result<SharedBackend, OfflineError> {
        if self.store.backend == crate::serve::BackendKind::Memory {
            return Err(OfflineError::Usage(
                "--backend memory keeps no data after the daemon stops; use file or s3".into(),
            ));
        }
        Ok(crate::serve::backend(&self.store, &self.data_dir).await?)
    }
    fn meta(&self) -> Result<MetaStore, OfflineError> {
        Ok(MetaStore::open(&self.data_dir.join("meta"), 8 << 20)?)
    }
    async fn engine(&self) -> Result<Engine, OfflineError> {
        let mut c = EngineConfig::new(&self.data_dir);
        c.wal_dir = self.wal_dir();
        c.volume.wal_recovery = self.wal_recovery_mode;
        Ok(Engine::open(c, self.backend().await?).await?)
    }
}

/// `vblock inspect` targets.
#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Decode a WAL segment file or every segment in a WAL directory.
    Wal {
        /// Segment file or directory.
        path: PathBuf,
        /// Print every record.
        #[arg(long)]
        records: bool,
    },
    /// Decode and verify a chunk object file.
    Chunk {
        /// Chunk object file.
        path: PathBuf,
    },
    /// Show a volume's record, engine state, map and chunks.
    Volume {
        #[command(flatten)]
        dir: DataDir,
        /// Volume id.
        id: String,
    },
}

fn inspect_segment(path: &Path, records: bool) -> Result<bool, OfflineError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let scan = vblock::wal::scan_segment(&bytes);
    match scan.header {
        Ok((no, tag)) => println!(
            "{}: segment {no}, volume tag {tag:#018x}, {} bytes, {} records",
            path.display(),
            scan.len,
            scan.records.len()
        ),
        Err(e) => println!("{}: BAD SEGMENT HEADER: {e}", path.display()),
    }
    if records {
        for (off, h) in &scan.records {
            println!(
                "  @{off:<10} seq {:<10} {:?} blocks {}..{}",
                h.seq,
                h.kind,
                h.start_block,
                h.start_block + u64::from(h.block_count)
            );
        }
    }
    if let Some((off, e)) = &scan.error {
        println!(
            "  BAD RECORD at byte {off}: {e} ({} bytes to end of file)",
            scan.len - off
        );
    }
    Ok(scan.header.is_ok() && scan.error.is_none())
}

/// `vblock inspect`.
pub async fn inspect(cmd: InspectCommand) -> Result<(), OfflineError> {
    match cmd {
        InspectCommand::Wal { path, records } => {
            let files = if path.is_dir() {
                vblock::wal::segment_files(&path)?
            } else {
                vec![path]
            };
            let mut ok = true;
            for f in files {
                ok &= inspect_segment(&f, records)?;
            }
            if !ok {
                return Err(OfflineError::BadWal);
            }
        }
        InspectCommand::Chunk { path } => {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let (h, index) = vblock::chunk::verify(&bytes)
                .map_err(|e| OfflineError::Usage(format!("{}: {e}", path.display())))?;
            println!("{}: object {}, volume tag {:#018x}, seq {}..{}, {} extents, {} bytes; all frames verify", path.display(), h.object_id, h.volume_tag, h.min_seq, h.max_seq, index.len(), bytes.len());
            for e in index {
                println!(
                    "  blocks {}..{} seq {} {:?} {:?} frame @{} len {}",
                    e.start_block,
                    e.start_block + u64::from(e.block_count),
                    e.seq,
                    e.kind,
                    e.encoding,
                    e.frame_offset,
                    e.frame_len
                );
            }
        }
        InspectCommand::Volume { dir, id } => {
            let id = volume_id(&id)?;
            let meta = dir.meta()?;
            let rec = meta
                .get_volume(&id)?
                .ok_or_else(|| OfflineError::Usage(format!("no volume {id}")))?;
            println!("{}", serde_json::to_string_pretty(&rec).unwrap_or_default());
            let s = fsck::summarize(&meta, &id)?;
            println!(
                "state: checkpoint seq {}, max seq {}, next object id {}",
                s.state.checkpoint, s.state.max_seq, s.state.next_object_id
            );
            println!(
                "map: {} extents, {} data blocks ({} bytes allocated)",
                s.map_extents,
                s.data_blocks,
                s.data_blocks * 4096
            );
            println!(
                "chunks: {}, {} bytes stored, {} live bytes",
                s.chunks,
                s.stored_bytes,
                s.live_blocks * 4096
            );
        }
    }
    Ok(())
}

/// `vblock fsck` arguments.
#[derive(Debug, Args)]
pub struct FsckArgs {
    #[command(flatten)]
    dir: DataDir,
}

/// `vblock fsck`: WAL CRCs, chunk CRCs, and every map extent points inside a chunk frame that
/// exists and matches the chunk's own index ([`vblock::fsck`]). Prints each finding.
pub async fn fsck(a: FsckArgs) -> Result<(), OfflineError> {
    let meta = a.dir.meta()?;
    let backend = a.dir.backend().await?;
    let mut problems = 0usize;
    let vols = meta.list_volumes()?;
    let bar = progress(vols.len() as u64, "volumes");
    for rec in &vols {
        let id = &rec.volume_id;
        let mut report = |findings: Vec<fsck::Finding>| {
            for f in findings {
                problems += usize::from(f.is_problem());
                crate::progress::println(&bar, format!("{id}: {f}"));
            }
        };
        let wal = a.dir.wal_dir().join(id.as_str());
        if wal.exists() {
            let checkpoint = meta.volume_state(id)?.checkpoint;
            report(fsck::check_wal(&wal, checkpoint)?);
        }
        report(fsck::check_chunks(&meta, &backend, rec).await?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "fsck: {} volumes checked, {problems} problem(s)",
        vols.len()
    );
    if problems > 0 {
        return Err(OfflineError::Problems(problems));
    }
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    crate::progress::bar(len, &format!("{{bar:40}} {{pos}}/{{len}} {what} {{msg}}"))
}

fn byte_progress(len: u64) -> ProgressBar {
    crate::progress::bar(
        len,
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
}

/// `vblock recover` arguments.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    #[command(flatten)]
    dir: DataDir,
}

/// Disaster recovery into a (new, empty) data directory: rebuilds the metadata of every volume
/// found in the backend from its chunk objects (docs/FORMAT.md, "Recovery"), with a progress bar
/// over the chunk objects. `vblock serve` does the same by itself on an empty data directory.
/// Then opens and closes every volume with the data directory's WAL, so its replay runs under
/// `--wal-recovery-mode` (`tolerate-any-corruption` cuts a WAL damaged in the middle).
pub async fn recover(a: RecoverArgs) -> Result<(), OfflineError> {
    let engine = a.dir.engine().await?;
    let bar = progress(0, "chunk objects");
    let recovered = {
        let bar = bar.clone();
        engine
            .recover_from_backend_with(&move |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?
    };
    bar.finish_and_clear();
    for id in &recovered {
        println!("recovered {id}");
    }
    println!("recover: {} volume(s) recovered", recovered.len());
    let vols = engine.list_records().await?;
    for rec in &vols {
        let id = &rec.volume_id;
        engine
            .volume(id)
            .await
            .map_err(|source| OfflineError::Volume {
                id: id.clone(),
                source,
            })?;
        println!(
            "replayed {id} (WAL recovery mode {})",
            a.dir.wal_recovery_mode.name()
        );
    }
    engine.close_all().await;
    Ok(())
}

/// `vblock import` arguments.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    dir: DataDir,
    /// Raw image file.
    file: PathBuf,
    /// Existing volume to write into; without it a volume of the file's size is created.
    id: Option<String>,
    /// Name for a created volume.
    #[arg(long, default_value = "imported")]
    name: String,
}

const STEP: u64 = 1 << 20;

/// `vblock import`: copies a raw image into a volume (all-zero MiBs are skipped, so a sparse
/// image stays sparse), then closes the volume cleanly.
pub async fn import(a: ImportArgs) -> Result<(), OfflineError> {
    use std::io::Read;
    let engine = a.dir.engine().await?;
    let mut file = std::fs::File::open(&a.file).map_err(io(&a.file))?;
    let len = file.metadata().map_err(io(&a.file))?.len();
    let id = match a.id {
        Some(id) => volume_id(&id)?,
        None => {
            engine
                .create_volume(len.div_ceil(4096).max(1) * 4096, &a.name)
                .await?
                .volume_id
        }
    };
    let vol = engine.volume(&id).await?;
    if len > vol.size() {
        return Err(OfflineError::Usage(format!(
            "{} is {len} bytes, larger than volume {id} ({} bytes)",
            a.file.display(),
            vol.size()
        )));
    }
    let bar = byte_progress(len);
    let mut off = 0u64;
    let mut buf = vec![0u8; STEP as usize];
    while off < len {
        let n = STEP.min(len - off) as usize;
        file.read_exact(&mut buf[..n]).map_err(io(&a.file))?;
        if !vblock::block::is_zero(&buf[..n]) {
            vol.write(off, Bytes::copy_from_slice(&buf[..n]), false)
                .await?;
        }
        off += n as u64;
        bar.set_position(off);
    }
    vol.flush().await?;
    bar.finish_and_clear();
    drop(vol);
    engine.close_all().await;
    println!("{id}");
    Ok(())
}

/// `vblock export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    dir: DataDir,
    /// Volume id.
    id: String,
    /// Raw image file to write (created or truncated; holes stay holes).
    file: PathBuf,
}

/// `vblock export`: writes a volume to a raw, sparse image file.
pub async fn export(a: ExportArgs) -> Result<(), OfflineError> {
    use std::io::{Seek, SeekFrom, Write};
    let engine = a.dir.engine().await?;
    let id = volume_id(&a.id)?;
    let vol = engine.volume(&id).await?;
    let mut file = std::fs::File::create(&a.file).map_err(io(&a.file))?;
    let size = vol.size();
    let bar = byte_progress(size);
    let mut off = 0u64;
    while off < size {
        let n = STEP.min(size - off);
        let status = vol.block_status(off, n).await?;
        if status.iter().any(|s| !s.hole) {
            let data = vol.read(off, n).await?;
            file.seek(SeekFrom::Start(off))
                .and_then(|_| file.write_all(&data))
                .map_err(io(&a.file))?;
        }
        off += n;
        bar.set_position(off);
    }
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .map_err(io(&a.file))?;
    bar.finish_and_clear();
    drop(vol);
    engine.close_all().await;
    Ok(())
}

//! Offline tools on a stopped daemon's data directory: inspect, fsck, import, export.
//! They open RocksDB themselves, so the daemon must not be running on the same directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use vblock::backend::{chunk_key, chunk_key_of, SharedBackend};
use vblock::lookup::{BlockLookup, Target};
use vblock::meta::MetaStore;
use vblock::{Engine, EngineConfig, VolumeId};

/// Errors of the offline tools.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// Something to report, already phrased.
    #[error("{0}")]
    Msg(String),
    /// fsck found problems.
    #[error("fsck found {0} problem(s)")]
    Problems(usize),
}

fn msg(e: impl std::fmt::Display) -> OfflineError {
    let s = e.to_string();
    if s.contains("lock") {
        OfflineError::Msg(format!(
            "{s} (is a daemon running on this data directory? stop it first)"
        ))
    } else {
        OfflineError::Msg(s)
    }
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
}

impl DataDir {
    fn wal_dir(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal"))
    }
    fn backend(&self) -> Result<SharedBackend, OfflineError> {
        Ok(Arc::new(
            vblock::backend::file::FileBackend::new(self.data_dir.join("objects")).map_err(msg)?,
        ))
    }
    fn meta(&self) -> Result<MetaStore, OfflineError> {
        MetaStore::open(&self.data_dir.join("meta"), 8 << 20).map_err(msg)
    }
    async fn engine(&self) -> Result<Engine, OfflineError> {
        self.engine_with(self.backend()?).await
    }
    async fn engine_with(&self, backend: SharedBackend) -> Result<Engine, OfflineError> {
        let mut c = EngineConfig::new(&self.data_dir);
        c.wal_dir = self.wal_dir();
        c.volume.wal_recovery = self.wal_recovery_mode;
        Engine::open(c, backend).await.map_err(msg)
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
    let bytes = std::fs::read(path).map_err(|e| msg(format!("{}: {e}", path.display())))?;
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
                vblock::wal::segment_files(&path).map_err(msg)?
            } else {
                vec![path]
            };
            let mut ok = true;
            for f in files {
                ok &= inspect_segment(&f, records)?;
            }
            if !ok {
                return Err(OfflineError::Msg(
                    "WAL has bad records (a bad last record is a torn tail that replay truncates)"
                        .into(),
                ));
            }
        }
        InspectCommand::Chunk { path } => {
            let bytes =
                std::fs::read(&path).map_err(|e| msg(format!("{}: {e}", path.display())))?;
            let (h, index) = vblock::chunk::verify(&bytes)
                .map_err(|e| msg(format!("{}: {e}", path.display())))?;
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
            let id = VolumeId::parse(&id).map_err(msg)?;
            let meta = dir.meta()?;
            let rec = meta
                .get_volume(&id)
                .map_err(msg)?
                .ok_or_else(|| msg(format!("no volume {id}")))?;
            println!("{}", serde_json::to_string_pretty(&rec).unwrap_or_default());
            let state = meta.volume_state(&id).map_err(msg)?;
            println!(
                "state: checkpoint seq {}, max seq {}, next object id {}",
                state.checkpoint, state.max_seq, state.next_object_id
            );
            let (entries, data_blocks) = BlockLookup::new(meta.clone(), id.clone())
                .summary()
                .map_err(msg)?;
            println!(
                "map: {entries} extents, {data_blocks} data blocks ({} bytes allocated)",
                data_blocks * 4096
            );
            let chunks = meta.chunk_stats(&id).map_err(msg)?;
            let stored: u64 = chunks.iter().map(|(_, s)| s.stored_bytes).sum();
            let live: u64 = chunks.iter().map(|(_, s)| s.live_blocks).sum();
            println!(
                "chunks: {}, {stored} bytes stored, {} live bytes",
                chunks.len(),
                live * 4096
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

/// The verified index of chunk object `key`, or `None` (printed as a problem of volume `id`)
/// when it cannot be read or does not verify.
async fn verified_index(
    backend: &SharedBackend,
    key: &str,
    bar: &ProgressBar,
    id: &VolumeId,
) -> Option<Vec<vblock::chunk::ChunkExtent>> {
    let result = match backend.get(key).await {
        Ok(obj) => vblock::chunk::verify(&obj)
            .map(|(_, index)| index)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    result
        .map_err(|e| crate::progress::println(bar, format!("{id}: chunk {key}: {e}")))
        .ok()
}

/// `vblock fsck`: WAL CRCs, chunk CRCs, and every map extent points inside a chunk frame that
/// exists and matches the chunk's own index.
pub async fn fsck(a: FsckArgs) -> Result<(), OfflineError> {
    let meta = a.dir.meta()?;
    let backend = a.dir.backend()?;
    let mut problems = 0usize;
    let vols = meta.list_volumes().map_err(msg)?;
    let bar = progress(vols.len() as u64, "volumes");
    for rec in &vols {
        let id = &rec.volume_id;
        // WAL: every record verifies; only the newest segment may end in a torn record.
        let wal = a.dir.wal_dir().join(id.as_str());
        if wal.exists() {
            let files = vblock::wal::segment_files(&wal).map_err(msg)?;
            let mut first_seq = None;
            for (i, f) in files.iter().enumerate() {
                let bytes = std::fs::read(f).map_err(msg)?;
                let scan = vblock::wal::scan_segment(&bytes);
                if first_seq.is_none() {
                    first_seq = scan
                        .records
                        .iter()
                        .find(|(_, h)| h.kind != vblock::wal::RecordKind::SyncNote)
                        .map(|(_, h)| h.seq);
                }
                let last = i + 1 == files.len();
                if let Err(e) = scan.header {
                    if !last {
                        crate::progress::println(
                            &bar,
                            format!("{id}: {}: bad segment header: {e}", f.display()),
                        );
                        problems += 1;
                    }
                } else if let Some((off, e)) = scan.error {
                    if last {
                        crate::progress::println(
                            &bar,
                            format!(
                                "{id}: {}: torn tail at byte {off} ({e}); replay will truncate it",
                                f.display()
                            ),
                        );
                    } else {
                        crate::progress::println(
                            &bar,
                            format!("{id}: {}: bad record at byte {off}: {e}", f.display()),
                        );
                        problems += 1;
                    }
                }
            }
            // The map must not be behind what the WAL already deleted (FORMAT.md, "Trim mark").
            let checkpoint = meta.volume_state(id).map_err(msg)?.checkpoint;
            match vblock::wal::read_trim_mark(&wal) {
                Ok(mark) if vblock::wal::map_behind(checkpoint, mark, first_seq) => {
                    crate::progress::println(
                        &bar,
                        format!(
                        "{id}: map checkpoint {checkpoint} is behind the WAL's trim mark {mark} \
                         (oldest record {first_seq:?}): the map lost committed chunks"
                    ),
                    );
                    problems += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    crate::progress::println(&bar, format!("{id}: {e}"));
                    problems += 1;
                }
            }
        }
        // Chunks: every object verifies. Indexes by (owner, object id): a clone's extents point
        // into its source volume's chunks, which are fetched (and verified) when first met.
        let mut indexes = std::collections::HashMap::new();
        for (object_id, _) in meta.chunk_stats(id).map_err(msg)? {
            let index = verified_index(&backend, &chunk_key(id, object_id), &bar, id).await;
            problems += usize::from(index.is_none());
            indexes.insert((id.number(), object_id), index);
        }
        // Map: every data extent lies inside a frame of an existing, verified chunk.
        let extents = BlockLookup::new(meta.clone(), id.clone())
            .lookup(0, u64::MAX)
            .map_err(msg)?;
        for e in extents {
            if e.end() * 4096 > rec.size_bytes {
                crate::progress::println(
                    &bar,
                    format!(
                        "{id}: map extent {}..{} beyond the volume size",
                        e.start,
                        e.end()
                    ),
                );
                problems += 1;
            }
            let Target::Data(f) = e.target else { continue };
            let index = match indexes.entry((f.owner, f.object_id)) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let key = chunk_key_of(f.owner, f.object_id);
                    let index = verified_index(&backend, &key, &bar, id).await;
                    problems += usize::from(index.is_none());
                    v.insert(index)
                }
            };
            let ok = index.as_ref().is_some_and(|index| {
                index.iter().any(|c| {
                    c.start_block == f.first_block
                        && c.frame_offset == f.offset
                        && c.frame_len == f.len
                        && c.frame_crc == f.crc
                        && c.block_count == f.blocks
                        && c.encoding == f.encoding
                })
            });
            if !ok {
                crate::progress::println(&bar, format!("{id}: map extent {}..{} points at {} frame @{} which does not exist or does not match", e.start, e.end(), chunk_key_of(f.owner, f.object_id), f.offset));
                problems += 1;
            }
        }
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
    #[command(flatten)]
    store: crate::serve::BackendArgs,
}

/// Disaster recovery into a (new, empty) data directory: rebuilds the metadata of every volume
/// found in the backend from its chunk objects (docs/FORMAT.md, "Recovery"), with a progress bar
/// over the chunk objects. `vblock serve` does the same by itself on an empty data directory.
/// Then opens and closes every volume with the data directory's WAL, so its replay runs under
/// `--wal-recovery-mode` (`tolerate-any-corruption` cuts a WAL damaged in the middle).
pub async fn recover(a: RecoverArgs) -> Result<(), OfflineError> {
    let backend = crate::serve::backend(&a.store, &a.dir.data_dir)
        .await
        .map_err(msg)?;
    let engine = a.dir.engine_with(backend).await?;
    let bar = progress(0, "chunk objects");
    let recovered = {
        let bar = bar.clone();
        engine
            .recover_from_backend_with(&move |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await
            .map_err(msg)?
    };
    bar.finish_and_clear();
    for id in &recovered {
        println!("recovered {id}");
    }
    println!("recover: {} volume(s) recovered", recovered.len());
    let vols = engine.list_records().await.map_err(msg)?;
    for rec in &vols {
        let id = &rec.volume_id;
        engine
            .volume(id)
            .await
            .map_err(|e| msg(format!("{id}: {e}")))?;
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
    let mut file =
        std::fs::File::open(&a.file).map_err(|e| msg(format!("{}: {e}", a.file.display())))?;
    let len = file.metadata().map_err(msg)?.len();
    let id = match a.id {
        Some(id) => VolumeId::parse(&id).map_err(msg)?,
        None => {
            engine
                .create_volume(len.div_ceil(4096).max(1) * 4096, &a.name)
                .await
                .map_err(msg)?
                .volume_id
        }
    };
    let vol = engine.volume(&id).await.map_err(msg)?;
    if len > vol.size() {
        return Err(msg(format!(
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
        file.read_exact(&mut buf[..n]).map_err(msg)?;
        if !vblock::block::is_zero(&buf[..n]) {
            vol.write(off, Bytes::copy_from_slice(&buf[..n]), false)
                .await
                .map_err(msg)?;
        }
        off += n as u64;
        bar.set_position(off);
    }
    vol.flush().await.map_err(msg)?;
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
    let id = VolumeId::parse(&a.id).map_err(msg)?;
    let vol = engine.volume(&id).await.map_err(msg)?;
    let mut file =
        std::fs::File::create(&a.file).map_err(|e| msg(format!("{}: {e}", a.file.display())))?;
    let size = vol.size();
    let bar = byte_progress(size);
    let mut off = 0u64;
    while off < size {
        let n = STEP.min(size - off);
        let status = vol.block_status(off, n).await.map_err(msg)?;
        if status.iter().any(|s| !s.hole) {
            let data = vol.read(off, n).await.map_err(msg)?;
            file.seek(SeekFrom::Start(off))
                .and_then(|_| file.write_all(&data))
                .map_err(msg)?;
        }
        off += n;
        bar.set_position(off);
    }
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .map_err(msg)?;
    bar.finish_and_clear();
    drop(vol);
    engine.close_all().await;
    Ok(())
}

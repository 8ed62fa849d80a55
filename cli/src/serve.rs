//! `vblock serve`: the daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use vblock::backend::SharedBackend;
use vblock::{Engine, EngineConfig};

use crate::size::parse_size;

/// Object backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Files under `DATA_DIR/objects`.
    File,
    /// Process memory (lost at exit; for tests).
    Memory,
    /// An S3-compatible bucket.
    S3,
}

/// Where chunk objects go (`vblock serve` and the offline tools).
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Where chunk objects go.
    #[arg(long, env = "VBLOCK_BACKEND", value_enum, default_value = "file")]
    pub backend: BackendKind,
    /// S3 bucket (with --backend s3).
    #[arg(long, env = "VBLOCK_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(long, env = "VBLOCK_S3_PREFIX", default_value = "vblock")]
    pub s3_prefix: String,
    /// S3 endpoint URL for S3-compatible stores (default: AWS_ENDPOINT_URL or AWS).
    #[arg(long, env = "VBLOCK_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Path-style addressing (most self-hosted S3 servers need it).
    #[arg(long, env = "VBLOCK_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: bool,
    /// Create the bucket if it does not exist.
    #[arg(long, env = "VBLOCK_S3_CREATE_BUCKET")]
    pub s3_create_bucket: bool,
    /// Region (default: AWS_REGION / profile, else us-east-1).
    #[arg(long, env = "VBLOCK_S3_REGION")]
    pub s3_region: Option<String>,
    /// Time limit of one S3 request attempt, e.g. 30s, 500ms; one that runs over is retried with
    /// backoff like a 5xx.
    #[arg(long, env = "VBLOCK_S3_TIMEOUT", default_value = "30s", value_parser = crate::humantime_duration)]
    pub s3_timeout: std::time::Duration,
    /// Sign PUT bodies (SigV4 SHA-256) over HTTPS too, for S3-compatible stores that refuse
    /// UNSIGNED-PAYLOAD (over http:// they are always signed).
    #[arg(long, env = "VBLOCK_S3_SIGN_PAYLOAD")]
    pub s3_sign_payload: bool,
}

/// Flags of `vblock serve`; each has a `VBLOCK_*` environment fallback.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for metadata (RocksDB) and, by default, the WAL and file-backend objects.
    #[arg(long, env = "VBLOCK_DATA_DIR", default_value = "./vblock-data")]
    pub data_dir: PathBuf,
    /// Directory for write-ahead logs (put it on local NVMe); default DATA_DIR/wal.
    #[arg(long, env = "VBLOCK_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Object backend.
    #[command(flatten)]
    pub store: BackendArgs,
    /// NBD TCP listen address.
    #[arg(long, env = "VBLOCK_NBD_LISTEN", default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Also listen for NBD on this Unix socket path.
    #[arg(long, env = "VBLOCK_NBD_UNIX")]
    pub nbd_unix: Option<PathBuf>,
    /// host:port written into mount URIs (default: the listen address).
    #[arg(long, env = "VBLOCK_NBD_ADVERTISE")]
    pub nbd_advertise: Option<String>,
    /// Name NBD exports by the bare VolumeId or SnapshotId instead of `ID-SECRET` (development
    /// only: anyone who can reach the NBD port and knows an id can then use a mounted volume).
    #[arg(long, env = "VBLOCK_NBD_OPEN_EXPORTS")]
    pub nbd_open_exports: bool,
    /// Server certificate chain for NBD TLS (PEM, leaf first): enables `NBD_OPT_STARTTLS`.
    #[arg(long, env = "VBLOCK_TLS_CERTIFICATE", requires = "tls_key")]
    pub tls_certificate: Option<PathBuf>,
    /// Private key of --tls-certificate (PEM).
    #[arg(long, env = "VBLOCK_TLS_KEY", requires = "tls_certificate")]
    pub tls_key: Option<PathBuf>,
    /// Refuse NBD clients that do not start TLS (mount URIs become nbds://).
    #[arg(long, env = "VBLOCK_TLS_REQUIRED", requires = "tls_certificate")]
    pub tls_required: bool,
    /// CA certificates (PEM) that NBD clients' certificates must chain to: TLS clients without
    /// such a certificate are refused (client authentication, as nbdkit's --tls-verify-peer).
    /// Needs --tls-required, so that no client gets in without one.
    #[arg(long, env = "VBLOCK_TLS_CLIENT_CA", requires = "tls_required")]
    pub tls_client_ca: Option<PathBuf>,
    /// NATS server URL for the ebs.* control plane.
    #[arg(long, env = "VBLOCK_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Node name: also serve ebs.NODE.mount / ebs.NODE.unmount.
    #[arg(long, env = "VBLOCK_NODE")]
    pub node: Option<String>,
    /// Cluster mode: many daemons on one bucket (docs/design/cluster.md). A mount makes the
    /// answering node (or the one `ebs.NODE.mount` names) the volume's owner through a lease in
    /// JetStream KV, taking the volume over from the backend when another node wrote it last;
    /// while the owner is alive, mounts through other nodes return its URI. Needs --node, the
    /// S3 backend and JetStream on the NATS server; turns --ship-wal on.
    #[arg(long, env = "VBLOCK_CLUSTER")]
    pub cluster: bool,
    /// Cluster mode: a volume's owner that has not renewed its lease for this long may be
    /// replaced (renewed every third of it).
    #[arg(long, env = "VBLOCK_LEASE_TTL", default_value = "10s", value_parser = crate::humantime_duration)]
    pub lease_ttl: Duration,
    /// Cluster mode: copies JetStream keeps of the catalog's and the leases' KV buckets, when
    /// the first node creates them (1 to 5, at most the NATS cluster's servers; an existing
    /// bucket keeps its setting). 3 on a NATS cluster of three servers keeps the catalog and
    /// the leases through the loss of one.
    #[arg(long, env = "VBLOCK_KV_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub kv_replicas: u8,
    /// Cluster mode: a ClientToken claim whose volume never reached the catalog, or a clone
    /// left `creating`, counts as abandoned by its node (which failed mid-create) once this
    /// node has seen it unchanged for this long, on its own clock: a retry with the token then
    /// creates a new volume, and a delete removes the clone.
    #[arg(long, env = "VBLOCK_ABANDON_AFTER", default_value = "10m", value_parser = crate::humantime_duration)]
    pub abandon_after: Duration,
    /// NATS queue group shared by daemons that split the load.
    #[arg(long, env = "VBLOCK_QUEUE_GROUP", default_value = "vblock")]
    pub queue_group: String,
    /// Write buffer per volume (bounded; writers wait when full).
    #[arg(long, env = "VBLOCK_BUFFER_SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub buffer_size: u64,
    /// Decompressed chunk-frame cache shared by all volumes.
    #[arg(long, env = "VBLOCK_CACHE_SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Resident memory the daemon steers towards (default: open volumes x buffer + cache +
    /// 64 MiB): the frame cache gives way, down to 1/8 of --cache-size, then RocksDB's block
    /// cache, down to 1/8 of --meta-cache-size, so that the resident set plus what the write
    /// buffers can still take stays under it. 0: off (both caches keep their sizes).
    #[arg(long, env = "VBLOCK_MEMORY_TARGET", value_parser = parse_size)]
    pub memory_target: Option<u64>,
    /// RocksDB block cache (the in-memory part of the block map).
    #[arg(long, env = "VBLOCK_META_CACHE_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub meta_cache_size: u64,
    /// Data per chunk object.
    #[arg(long, env = "VBLOCK_CHUNK_SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Largest compressed frame of a chunk (a multiple of 4 KiB): a one-block read from a
    /// chunk reads and decompresses at most this much. Smaller frames: faster random reads,
    /// slightly less compression, more map extents for sequential data
    /// (docs/design/frame-size.md).
    #[arg(long, env = "VBLOCK_FRAME_SIZE", default_value = "16KiB", value_parser = parse_size)]
    pub frame_size: u64,
    /// WAL segment size.
    #[arg(long, env = "VBLOCK_WAL_SEGMENT_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub wal_segment_size: u64,
    /// What WAL replay does with a record that fails verification: `tolerate-tail-corruption`
    /// (cut a torn tail the WAL never recorded as synced; refuse damage to synced records),
    /// `absolute-consistency` (refuse any damage that valid records follow), or
    /// `tolerate-any-corruption` (cut at the first bad record even if synced records follow: an
    /// operator's last resort). docs/RELIABILITY.md, "WAL recovery modes".
    #[arg(
        long,
        env = "VBLOCK_WAL_RECOVERY_MODE",
        default_value = "tolerate-tail-corruption"
    )]
    pub wal_recovery_mode: vblock::wal::WalRecovery,
    /// Ship the WAL to the backend: `NBD_CMD_FLUSH` and FUA return only once the writes they
    /// cover are also stored in the backend (`VOLUMEID/wal/`), so a flushed write survives the
    /// loss of this node's disks; a flush then costs about one PUT. The cluster mode's WAL
    /// shipping (docs/design/cluster.md), usable on its own.
    #[arg(long, env = "VBLOCK_SHIP_WAL")]
    pub ship_wal: bool,
    /// Chunk objects built and uploaded at once per volume.
    #[arg(long, env = "VBLOCK_UPLOAD_CONCURRENCY", default_value = "4")]
    pub upload_concurrency: usize,
    /// Compact chunks whose live data fell below this percent (0 turns compaction off).
    #[arg(long, env = "VBLOCK_COMPACTION_THRESHOLD", default_value = "50", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub compaction_threshold: u8,
    /// Live data compaction rewrites per second at most, per volume.
    #[arg(long, env = "VBLOCK_COMPACTION_RATE", default_value = "32MiB", value_parser = parse_size)]
    pub compaction_rate: u64,
    /// How often garbage collection runs and idle volumes look for chunks to compact.
    #[arg(long, env = "VBLOCK_GC_INTERVAL", default_value = "10s", value_parser = crate::humantime_duration)]
    pub gc_interval: Duration,
    /// Longest a volume's garbage waits for deletion while it is smaller than the volume's map
    /// checkpoint (the whole map, written to the backend before a live volume's objects are
    /// deleted); deletes of volumes and snapshots collect at once. `0s`: never wait.
    #[arg(long, env = "VBLOCK_GC_MAX_DELAY", default_value = "5m", value_parser = humantime::parse_duration)]
    pub gc_max_delay: Duration,
    /// Prometheus endpoint (`GET /metrics`) listen address.
    #[arg(long, env = "VBLOCK_METRICS_LISTEN", default_value = "127.0.0.1:9109")]
    pub metrics_listen: SocketAddr,
    /// Do not serve metrics.
    #[arg(long, env = "VBLOCK_NO_METRICS")]
    pub no_metrics: bool,
    /// Print the effective settings (flags > env > config file > defaults) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Errors that stop the daemon; each has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad flags or configuration (exit 2).
    #[error("configuration: {0}")]
    Config(String),
    /// The data directory or engine could not be opened (exit 3).
    #[error("cannot open the engine: {0}")]
    Engine(#[from] vblock::VolumeError),
    /// A listener could not be bound (exit 4).
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    /// The object backend is unusable: missing bucket, bad credentials, unreachable (exit 5).
    #[error("backend: {0}")]
    Backend(String),
}

impl ServeError {
    /// Process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            Self::Engine(_) => 3,
            Self::Listen(..) => 4,
            Self::Backend(_) => 5,
        }
    }
}

fn engine_config(a: &ServeArgs) -> EngineConfig {
    let mut c = EngineConfig::new(&a.data_dir);
    if let Some(w) = &a.wal_dir {
        c.wal_dir = w.clone();
    }
    c.volume.buffer_bytes = a.buffer_size;
    c.volume.chunk_bytes = a.chunk_size;
    c.volume.wal_segment_bytes = a.wal_segment_size;
    c.volume.chunk.frame_blocks = (a.frame_size / vblock::block::BLOCK_SIZE) as u32;
    c.volume.upload_concurrency = a.upload_concurrency.max(1);
    c.volume.wal_recovery = a.wal_recovery_mode;
    c.volume.ship_wal = a.ship_wal || a.cluster;
    c.cluster = a.cluster;
    c.volume.compaction = vblock::volume::CompactionConfig {
        threshold_percent: a.compaction_threshold,
        rate_bytes_per_sec: a.compaction_rate.max(1),
        check_interval: a.gc_interval,
    };
    c.frame_cache_bytes = a.cache_size;
    c.meta_cache_bytes = a.meta_cache_size as usize;
    c
}

/// Opens the backend `a` describes; file objects live under `data_dir/objects`.
///
/// Errors: [`ServeError::Config`] (no bucket, bad directory), [`ServeError::Backend`] (bucket
/// missing, bad credentials, endpoint unreachable).
pub async fn backend(a: &BackendArgs, data_dir: &Path) -> Result<SharedBackend, ServeError> {
    match a.backend {
        BackendKind::File => {
            let b = vblock::backend::file::FileBackend::new(data_dir.join("objects"))
                .map_err(|e| ServeError::Config(e.to_string()))?;
            Ok(Arc::new(b))
        }
        BackendKind::Memory => Ok(Arc::new(vblock::backend::memory::MemoryBackend::new())),
        BackendKind::S3 => {
            let bucket = a.s3_bucket.clone().ok_or_else(|| {
                ServeError::Config("--backend s3 needs --s3-bucket (or VBLOCK_S3_BUCKET)".into())
            })?;
            let cfg = vblock::backend::s3::S3Config {
                bucket,
                prefix: a.s3_prefix.clone(),
                endpoint: a.s3_endpoint.clone(),
                force_path_style: a.s3_force_path_style,
                create_bucket: a.s3_create_bucket,
                region: a.s3_region.clone(),
                static_credentials: None,
                attempt_timeout: Some(a.s3_timeout),
                sign_payload: a.s3_sign_payload,
            };
            let b = vblock::backend::s3::S3Backend::connect(&cfg)
                .await
                .map_err(|e| ServeError::Backend(e.to_string()))?;
            Ok(Arc::new(b))
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM, then shuts down cleanly (volumes drained and synced).
///
/// With `--backend memory` the daemon is wholly ephemeral: chunks live in process memory, so
/// metadata and WAL go to a temporary directory deleted at exit, never to `--data-dir`
/// (a map kept on disk would point at chunks a restart no longer has).
pub async fn run(mut a: ServeArgs) -> Result<(), ServeError> {
    let _ephemeral = ephemeral_data_dir(&mut a)?;
    prepare_process(&a)?;
    let engine = open_engine(&a).await?;
    start_memory_target(&a, &engine);
    recover_into_empty_data_dir(&engine).await?;
    // Stored in the background; their records say pending until then.
    drop(engine.resume_pending_snapshots().await?);
    let mut tasks = tokio::task::JoinSet::new();
    let (nbd_addr, advertise) = spawn_servers(&a, &engine, &mut tasks).await?;
    spawn_gc(&a, &engine, &mut tasks);
    if !a.no_metrics {
        let (engine, buffer_capacity) = (engine.clone(), a.buffer_size);
        tasks.spawn(async move {
            crate::metrics::sample(engine, buffer_capacity).await;
            Ok(())
        });
    }
    let metrics = if a.no_metrics {
        "off".to_owned()
    } else {
        format!("http://{}/metrics", a.metrics_listen)
    };
    tracing::info!(version = crate::VERSION, nbd = %nbd_addr, advertise = %advertise, nats = %a.nats_url, %metrics, data_dir = %a.data_dir.display(), "vblock serving");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServeError::Config(format!("cannot install SIGTERM handler: {e}")))?;
    let mut failed = None;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        Some(r) = tasks.join_next() => {
            tracing::error!(result = ?r.as_ref().map(|r| r.as_ref().err()), "a server task ended");
            // A control plane that cannot serve is a configuration error (exit 2).
            if let Ok(Err(e)) = &r {
                let stopped = e.get_ref().and_then(|e| e.downcast_ref::<vblock::control::ControlError>());
                if let Some(stopped) = stopped {
                    failed = Some(ServeError::Config(stopped.to_string()));
                }
            }
        }
    }
    tasks.abort_all();
    let closing = engine.close_all();
    if tokio::time::timeout(Duration::from_secs(60), closing)
        .await
        .is_err()
    {
        tracing::warn!("volumes did not close within 60 s; unflushed data stays in the WAL");
    }
    if let Some(path) = &a.nbd_unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("vblock stopped");
    failed.map_or(Ok(()), Err)
}

/// Server tasks: each runs until the daemon stops (an error ends the daemon).
type Tasks = tokio::task::JoinSet<std::io::Result<()>>;

/// With `--backend memory`, a temporary directory for metadata and WAL instead of
/// `--data-dir` (deleted when the returned guard drops, at exit).
fn ephemeral_data_dir(a: &mut ServeArgs) -> Result<Option<tempfile::TempDir>, ServeError> {
    Ok(match a.store.backend {
        BackendKind::Memory => {
            let dir = tempfile::Builder::new()
                .prefix("vblock-memory-")
                .tempdir()
                .map_err(|e| {
                    ServeError::Config(format!("memory backend: no temporary directory: {e}"))
                })?;
            tracing::warn!(dir = %dir.path().display(), ignored_data_dir = %a.data_dir.display(), "--backend memory: volumes, metadata and WAL live in memory and a temporary directory, and are gone when the daemon exits");
            a.data_dir = dir.path().to_owned();
            a.wal_dir = None;
            Some(dir)
        }
        _ => None,
    })
}

/// Checks the flags the engine does not, raises the open-files limit, configures crash points
/// (tests) and starts the metrics endpoint.
fn prepare_process(a: &ServeArgs) -> Result<(), ServeError> {
    if a.cluster && (a.node.is_none() || a.store.backend != BackendKind::S3) {
        return Err(ServeError::Config(
            "--cluster needs --node and --backend s3 (every node reads every volume's objects)"
                .into(),
        ));
    }
    if a.cluster && a.lease_ttl < Duration::from_millis(300) {
        return Err(ServeError::Config(format!(
            "--lease-ttl {:?} is too short (at least 300ms; renewed every third of it)",
            a.lease_ttl
        )));
    }
    if a.cluster && a.abandon_after < Duration::from_secs(1) {
        return Err(ServeError::Config(format!(
            "--abandon-after {:?} is too short (at least 1s: a live node's create must not look abandoned)",
            a.abandon_after
        )));
    }
    if a.frame_size % vblock::block::BLOCK_SIZE != 0
        || !(1..=u64::from(vblock::chunk::MAX_FRAME_BLOCKS))
            .contains(&(a.frame_size / vblock::block::BLOCK_SIZE))
    {
        return Err(ServeError::Config(format!(
            "--frame-size {} is not a multiple of 4 KiB between 4 KiB and {} MiB",
            a.frame_size,
            (u64::from(vblock::chunk::MAX_FRAME_BLOCKS) * vblock::block::BLOCK_SIZE) >> 20
        )));
    }
    match crate::limits::raise_open_files() {
        Ok((before, after)) if before != after => tracing::info!(
            before = before.map_or("unlimited".into(), |n| n.to_string()),
            after = after.map_or("unlimited".into(), |n| n.to_string()),
            "raised the open-files limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit (RLIMIT_NOFILE)"),
    }
    // Crash points for the crash harness (src/failpoints.rs); not a flag: tests only.
    if let Ok(spec) = std::env::var("VBLOCK_FAILPOINTS") {
        vblock::failpoints::configure(&spec).map_err(ServeError::Config)?;
        tracing::warn!(%spec, "fail points configured: this process will abort on purpose");
    }
    if !a.no_metrics {
        crate::metrics::install(a.metrics_listen).map_err(|e| {
            ServeError::Listen(a.metrics_listen.to_string(), std::io::Error::other(e))
        })?;
    }
    Ok(())
}

/// Opens the engine on the data directory and the backend, and removes the file backend's
/// leftover temporary files.
async fn open_engine(a: &ServeArgs) -> Result<Arc<Engine>, ServeError> {
    let config = engine_config(a);
    config
        .volume
        .validate()
        .map_err(|e| ServeError::Config(format!("--buffer-size / --chunk-size: {e}")))?;
    let backend = backend(&a.store, &a.data_dir).await?;
    if let (true, Some(node)) = (a.cluster, &a.node) {
        vblock::cluster::epoch::check_conditional_put(&*backend, node)
            .await
            .map_err(|e| ServeError::Backend(format!("--cluster: {e}")))?;
        tracing::info!("cluster mode: the object store honours conditional PUTs");
    }
    let engine = Arc::new(Engine::open(config, backend).await?);
    if matches!(a.store.backend, BackendKind::File) {
        // The data directory is ours now (RocksDB's lock): puts a crash interrupted left
        // temporary files that nothing will ever rename or delete.
        let objects = a.data_dir.join("objects");
        match tokio::task::spawn_blocking(move || {
            vblock::backend::file::remove_leftover_temp_files(&objects)
        })
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                files = n,
                "removed temporary files of interrupted object writes"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "temporary files of interrupted object writes not removed")
            }
            Err(e) => tracing::warn!(error = %e, "temporary-file cleanup task failed"),
        }
    }
    Ok(engine)
}

/// An empty data directory next to a backend that holds volumes: recovers them (disaster
/// recovery; FORMAT.md, "Recovery").
async fn recover_into_empty_data_dir(engine: &Engine) -> Result<(), ServeError> {
    if engine.list_records().await?.is_empty() {
        let recovered = engine.recover_from_backend().await?;
        if !recovered.is_empty() {
            tracing::info!(
                volumes = recovered.len(),
                "recovered volumes from the backend into an empty data directory"
            );
        }
    }
    Ok(())
}

/// Starts the thread that steers the daemon's resident memory (`--memory-target`).
fn start_memory_target(a: &ServeArgs, engine: &Arc<Engine>) {
    let target = match a.memory_target {
        Some(0) => None,
        Some(bytes) => Some(crate::memory::RssTarget::Fixed(bytes)),
        None => Some(crate::memory::RssTarget::PerVolume {
            buffer_bytes: a.buffer_size,
            rest_bytes: a.cache_size + crate::memory::DEFAULT_ALLOWANCE_BYTES,
        }),
    }
    .map(|rss| crate::memory::Target::new(rss, a.cache_size, a.meta_cache_size));
    if let Err(e) = crate::memory::spawn(engine.clone(), target) {
        tracing::warn!(error = %e, "cannot start the memory-target thread; the frame cache keeps its size and freed memory may stay resident");
    }
}

/// Binds the NBD listeners and starts them and the NATS control plane on `tasks`; returns the
/// NBD address bound and the address advertised in mount URIs.
async fn spawn_servers(
    a: &ServeArgs,
    engine: &Arc<Engine>,
    tasks: &mut Tasks,
) -> Result<(std::net::SocketAddr, String), ServeError> {
    let listener = tokio::net::TcpListener::bind(a.nbd_listen)
        .await
        .map_err(|e| ServeError::Listen(a.nbd_listen.to_string(), e))?;
    let nbd_addr = listener
        .local_addr()
        .map_err(|e| ServeError::Listen(a.nbd_listen.to_string(), e))?;
    let tls = match (&a.tls_certificate, &a.tls_key) {
        (Some(cert), Some(key)) => Some(
            nbd_server::tls::TlsConfig::from_pem_files(
                cert,
                key,
                a.tls_required,
                a.tls_client_ca.as_deref(),
            )
            .map_err(|e| ServeError::Config(e.to_string()))?,
        ),
        _ => None,
    };
    let server = nbd_server::Server::new(
        Arc::new(nbd_server::VolumeExports::new(
            engine.clone(),
            a.nbd_open_exports,
        )),
        nbd_server::Limits::default(),
        tls,
    );
    tasks.spawn(server.clone().serve_tcp(listener));
    if let Some(path) = &a.nbd_unix {
        let _ = std::fs::remove_file(path);
        let unix = tokio::net::UnixListener::bind(path)
            .map_err(|e| ServeError::Listen(path.display().to_string(), e))?;
        tasks.spawn(server.clone().serve_unix(unix));
    }
    let advertise = a
        .nbd_advertise
        .clone()
        .unwrap_or_else(|| nbd_addr.to_string());
    let control = vblock::control::ControlConfig {
        nats_url: a.nats_url.clone(),
        queue_group: a.queue_group.clone(),
        node: a.node.clone(),
        nbd_advertise: advertise.clone(),
        nbd_tls: a.tls_required,
        open_exports: a.nbd_open_exports,
        lease_ttl: a.cluster.then_some(a.lease_ttl),
        kv_replicas: usize::from(a.kv_replicas),
        abandon_after: a.abandon_after,
    };
    tasks.spawn({
        let engine = engine.clone();
        async move {
            vblock::control::run(engine, control)
                .await
                .map_err(std::io::Error::other)
        }
    });
    Ok((nbd_addr, advertise))
}

/// Starts the periodic garbage collection on `tasks`.
fn spawn_gc(a: &ServeArgs, engine: &Arc<Engine>, tasks: &mut Tasks) {
    tasks.spawn({
        let (engine, every, max_delay) = (engine.clone(), a.gc_interval, a.gc_max_delay);
        async move {
            // The mark pass walks every map: passes that mark are spaced out like the space
            // gauges' scans, so they take at most 5% of one core however large the maps grow.
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                wait = match engine.collect_garbage_paced(max_delay).await {
                    Ok(r) => crate::metrics::scan_interval(every, r.mark_duration.unwrap_or_default()),
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection failed; retrying next interval");
                        every
                    }
                };
            }
        }
    });
}

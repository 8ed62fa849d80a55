//! NBD protocol server for vblock volumes: fixed newstyle handshake ([`handshake`]) and the
//! transmission phase ([`transmission`]), following the NBD project's `doc/proto.md`.
//! One export per mounted volume or snapshot ([`VolumeExports`]); served over TCP and Unix
//! sockets.

pub mod handshake;
pub mod proto;
mod request_metrics;
pub mod tls;
pub mod transmission;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::Instrument;
use vblock::records::{split_export_name, Mount, SnapshotRecord, VolumeRecord};
use vblock::{Engine, SnapshotId, SnapshotVolume, StatusExtent, Volume, VolumeError, VolumeId};

/// Largest read or write payload in bytes (advertised as the maximum block size): 32 MiB.
pub const MAX_BLOCK: u32 = 32 << 20;

/// What an export serves: a volume (read-write) or a snapshot (read-only).
#[derive(Clone)]
pub enum Device {
    /// A volume.
    Volume(Volume),
    /// A snapshot; offered with `read_only` set, so writes never reach it.
    Snapshot(SnapshotVolume),
}

impl Device {
    /// VolumeId or SnapshotId.
    pub fn id(&self) -> &str {
        match self {
            Device::Volume(v) => v.id().as_str(),
            Device::Snapshot(s) => s.id().as_str(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Device::Volume(v) => v.size(),
            Device::Snapshot(s) => s.size(),
        }
    }

    /// [`Volume::read`].
    pub async fn read(&self, offset: u64, len: u64) -> Result<bytes::Bytes, VolumeError> {
        match self {
            Device::Volume(v) => v.read(offset, len).await,
            Device::Snapshot(s) => s.read(offset, len).await,
        }
    }

    /// [`Volume::write`]; a snapshot refuses.
    pub async fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> Result<(), VolumeError> {
        match self {
            Device::Volume(v) => v.write(offset, data, fua).await,
            Device::Snapshot(_) => Err(VolumeError::ReadOnly),
        }
    }

    /// Resolves when a volume starts closing ([`Volume::closed`]) or a snapshot's export ends
    /// ([`SnapshotVolume::closed`]).
    pub async fn closed(&self) {
        match self {
            Device::Volume(v) => v.closed().await,
            Device::Snapshot(s) => s.closed().await,
        }
    }

    /// [`Volume::flush`]; nothing to do for a snapshot.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        match self {
            Device::Volume(v) => v.flush().await,
            Device::Snapshot(_) => Ok(()),
        }
    }

    /// [`Volume::trim`]; a snapshot refuses.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match self {
            Device::Volume(v) => v.trim(offset, len).await,
            Device::Snapshot(_) => Err(VolumeError::ReadOnly),
        }
    }

    /// [`Volume::write_zeroes`]; a snapshot refuses.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        match self {
            Device::Volume(v) => v.write_zeroes(offset, len, fua).await,
            Device::Snapshot(_) => Err(VolumeError::ReadOnly),
        }
    }

    /// [`Volume::block_status`].
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, VolumeError> {
        match self {
            Device::Volume(v) => v.block_status(offset, len).await,
            Device::Snapshot(s) => s.block_status(offset, len).await,
        }
    }
}

/// What the handshake tells a client about an export (`NBD_OPT_INFO`, proto.md "Option
/// types"), without opening it.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Export name as the client gave it (`NBD_INFO_NAME`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Advertise `NBD_FLAG_READ_ONLY` and refuse writes with `NBD_EPERM`.
    pub read_only: bool,
    /// Text for `NBD_INFO_DESCRIPTION`.
    pub description: String,
}

/// An export: a volume or snapshot and how it is offered.
#[derive(Clone)]
pub struct Export {
    /// Its name as the client gave it (`ID-SECRET`, or the bare id with open exports), size,
    /// flags and description. Logs and metrics use [`Device::id`] instead of the name, which
    /// carries no secret.
    pub info: ExportInfo,
    /// The device behind it.
    pub volume: Device,
}

/// Where exports come from.
#[async_trait]
pub trait ExportProvider: Send + Sync + 'static {
    /// Export names, for `NBD_OPT_LIST` (proto.md lets a server leave exports out).
    async fn list(&self) -> Vec<String>;
    /// Describes export `name` without opening it (`NBD_OPT_INFO`). Errors as
    /// [`ExportProvider::open`].
    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError>;
    /// Opens export `name`. Errors: [`ExportError`]; the handshake answers either with
    /// `NBD_REP_ERR_UNKNOWN` ("the requested export is not available", proto.md) and the error's
    /// text.
    async fn open(&self, name: &str) -> Result<Export, ExportError>;
}

/// Why an export cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No export has this name: no such volume or snapshot, not mounted, or not its secret
    /// (the text does not say which).
    #[error("{0}")]
    Unknown(String),
    /// The volume exists but could not be opened (its WAL does not replay, I/O errors).
    #[error(transparent)]
    Open(VolumeError),
}

impl From<VolumeError> for ExportError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::VolumeNotFound(id) => Self::Unknown(format!("no volume {id}")),
            VolumeError::SnapshotNotFound(id) => Self::Unknown(format!("no snapshot {id}")),
            e => Self::Open(e),
        }
    }
}

/// The mounted volumes of an engine, exported read-write, and its mounted snapshots, exported
/// read-only (`NBD_FLAG_READ_ONLY`). A volume or snapshot is an export only while it is mounted
/// (`ebs.mount`), under the name the mount's URI gives: `ID-SECRET`, or the bare `ID` with open
/// exports (`--nbd-open-exports`).
pub struct VolumeExports {
    engine: Arc<Engine>,
    open_exports: bool,
}

/// A mounted volume's or snapshot's record, found by export name.
enum Mounted {
    Volume(VolumeRecord),
    Snapshot(SnapshotRecord),
}

impl VolumeExports {
    /// Exports of `engine`; `open_exports`: names are bare ids.
    pub fn new(engine: Arc<Engine>, open_exports: bool) -> Self {
        Self {
            engine,
            open_exports,
        }
    }

    /// Whether `mount` lets a client in with `secret` (the part of the export name after the id).
    fn admits(&self, mount: Option<&Mount>, secret: Option<&str>) -> bool {
        match (mount, secret) {
            (Some(m), Some(s)) => !self.open_exports && m.secret_matches(s),
            (Some(_), None) => self.open_exports,
            (None, _) => false,
        }
    }

    /// The record export `name` stands for, if it is mounted under that name. One answer for
    /// every refusal (no such id, not mounted, wrong secret), so that a client learns nothing.
    async fn resolve(&self, name: &str) -> Result<Mounted, ExportError> {
        let (id, secret) = split_export_name(name);
        let found = if let Ok(snap) = SnapshotId::parse(id) {
            self.engine
                .get_snapshot(&snap)
                .await
                .map_err(ExportError::Open)?
                .filter(|r| self.admits(r.mount.as_ref(), secret))
                .map(Mounted::Snapshot)
        } else if let Ok(vol) = VolumeId::parse(id) {
            self.engine
                .get_record(&vol)
                .await
                .map_err(ExportError::Open)?
                .filter(|r| self.admits(r.mount.as_ref(), secret))
                .map(Mounted::Volume)
        } else {
            None
        };
        found.ok_or_else(|| {
            ExportError::Unknown(format!(
                "no export {:?}: a volume or snapshot is exported only while mounted, under the \
                 name in the URI its mount returned",
                id
            ))
        })
    }

    fn info(name: &str, m: &Mounted) -> ExportInfo {
        match m {
            Mounted::Snapshot(r) => ExportInfo {
                name: name.to_owned(),
                size: r.volume_size_bytes,
                read_only: true,
                description: format!("vblock snapshot {} (read-only)", r.snapshot_id),
            },
            Mounted::Volume(r) => ExportInfo {
                name: name.to_owned(),
                size: r.size_bytes,
                read_only: false,
                description: if r.name.is_empty() {
                    format!("vblock volume {}", r.volume_id)
                } else {
                    r.name.clone()
                },
            },
        }
    }
}

#[async_trait]
impl ExportProvider for VolumeExports {
    /// With open exports, the ids of the mounted volumes and snapshots; otherwise nothing, since
    /// a name without its secret opens nothing and the secret is never listed.
    async fn list(&self) -> Vec<String> {
        if !self.open_exports {
            return Vec::new();
        }
        let mut names = match self.engine.list_records().await {
            Ok(recs) => recs
                .into_iter()
                .filter(|r| r.mount.is_some())
                .map(|r| r.volume_id.to_string())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes for NBD_OPT_LIST");
                Vec::new()
            }
        };
        match self.engine.list_snapshots().await {
            Ok(snaps) => names.extend(
                snaps
                    .into_iter()
                    .filter(|s| s.mount.is_some())
                    .map(|s| s.snapshot_id.to_string()),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot list snapshots for NBD_OPT_LIST"),
        }
        names
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        Ok(Self::info(name, &self.resolve(name).await?))
    }

    async fn open(&self, name: &str) -> Result<Export, ExportError> {
        let mounted = self.resolve(name).await?;
        let info = Self::info(name, &mounted);
        let opened = match &mounted {
            Mounted::Snapshot(r) => self
                .engine
                .snapshot_volume(&r.snapshot_id)
                .await
                .map(Device::Snapshot),
            Mounted::Volume(r) => {
                // A new instance only while the mount lasts, checked in order with closes
                // (Engine::volume_if): an unmount never leaves one behind.
                let mount = r.mount.clone();
                self.engine
                    .volume_if(&r.volume_id, move |now| now.mount == mount)
                    .await
                    .map(Device::Volume)
            }
        };
        // An unmount may have ended the mount meanwhile: the client would hold a device no
        // unmount disconnects. Checked again once the device is held (an unmount from now on
        // ends it: Volume::closed, SnapshotVolume::closed); it also gives a refused open the
        // answer every refusal gets.
        self.resolve(name).await?;
        Ok(Export {
            info,
            volume: opened?,
        })
    }
}

/// Per-server limits: every in-flight set is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are closed at accept (default 1024).
    pub max_connections: usize,
    /// Requests in flight per connection (default 256).
    pub max_requests: usize,
    /// Payload and read-buffer bytes in flight per connection (default 128 MiB).
    pub max_in_flight_bytes: usize,
    /// Time allowed for the handshake (default 30 s).
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_requests: 256,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted in all.
    pub accepted: AtomicU64,
}

/// After a failed accept (EMFILE and friends): log and back off rather than spin.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The NBD server.
pub struct Server {
    provider: Arc<dyn ExportProvider>,
    limits: Limits,
    slots: Arc<Semaphore>,
    stats: Arc<ServerStats>,
    tls: Option<tls::TlsConfig>,
}

impl Server {
    /// A server for `provider`'s exports; with `tls`, `NBD_OPT_STARTTLS` is offered (and,
    /// if [`tls::TlsConfig::required`], demanded).
    pub fn new(
        provider: Arc<dyn ExportProvider>,
        limits: Limits,
        tls: Option<tls::TlsConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            provider,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            stats: Arc::new(ServerStats::default()),
            tls,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Accepts TCP connections for ever.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            self.clone().spawn_connection(sock, peer.to_string());
        }
    }

    /// Accepts Unix socket connections for ever.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        loop {
            let (sock, _) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            self.clone().spawn_connection(sock, "unix".into());
        }
    }

    fn spawn_connection<S>(self: Arc<Self>, sock: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing new connection");
            metrics::counter!("vblock_nbd_connections_rejected_total").increment(1);
            return;
        };
        metrics::counter!("vblock_nbd_connections_accepted_total").increment(1);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        // One span per connection: every line it logs carries the peer and, after the
        // handshake, the export.
        let span = tracing::info_span!("nbd", %peer, volume = tracing::field::Empty);
        tokio::spawn(
            async move {
                self.connection(sock).await;
                self.stats.connections.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            }
            .instrument(span),
        );
    }

    async fn connection<S>(&self, sock: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let neg = tokio::time::timeout(
            self.limits.handshake_timeout,
            handshake::negotiate(sock, &*self.provider, self.tls.as_ref()),
        )
        .await;
        let neg = match neg {
            Err(_) => {
                tracing::info!("handshake timed out");
                metrics::counter!("vblock_nbd_handshake_failures_total").increment(1);
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "handshake failed");
                metrics::counter!("vblock_nbd_handshake_failures_total").increment(1);
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(n))) => n,
        };
        let (neg, stream) = neg;
        tracing::Span::current().record("volume", neg.export.volume.id());
        tracing::info!(
            structured = neg.structured,
            tls = stream.is_tls(),
            "NBD client connected"
        );
        match transmission::transmit(stream, neg, self.limits).await {
            Ok(()) => tracing::info!("NBD client disconnected"),
            Err(e) => tracing::info!(error = %e, "NBD connection ended with an error"),
        }
    }
}

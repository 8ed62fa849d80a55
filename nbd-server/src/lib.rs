//! NBD protocol server for vblock volumes: fixed newstyle handshake ([`handshake`]) and the
//! transmission phase ([`transmission`]), following the NBD project's `doc/proto.md`.
//! One export per volume, named by its VolumeId; served over TCP and Unix sockets.

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

    /// Resolves when a volume starts closing ([`Volume::closed`]); never for a snapshot.
    pub async fn closed(&self) {
        match self {
            Device::Volume(v) => v.closed().await,
            Device::Snapshot(_) => std::future::pending().await,
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

/// An export: a volume or snapshot and how it is offered.
#[derive(Clone)]
pub struct Export {
    /// Export name (the VolumeId or SnapshotId).
    pub name: String,
    /// The device behind it.
    pub volume: Device,
    /// Advertise `NBD_FLAG_READ_ONLY` and refuse writes with `NBD_EPERM`.
    pub read_only: bool,
    /// Text for `NBD_INFO_DESCRIPTION`.
    pub description: String,
}

/// Where exports come from.
#[async_trait]
pub trait ExportProvider: Send + Sync + 'static {
    /// Export names, for `NBD_OPT_LIST`.
    async fn list(&self) -> Vec<String>;
    /// Opens export `name`. Errors: [`ExportError`]; the handshake answers either with
    /// `NBD_REP_ERR_UNKNOWN` ("the requested export is not available", proto.md) and the error's
    /// text.
    async fn open(&self, name: &str) -> Result<Export, ExportError>;
}

/// Why an export cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No volume or snapshot has this name (the text says which was looked for).
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

/// Every volume of an engine, exported read-write under its VolumeId, and every snapshot,
/// exported read-only (`NBD_FLAG_READ_ONLY`) under its SnapshotId.
pub struct VolumeExports {
    engine: Arc<Engine>,
}

impl VolumeExports {
    /// Exports of `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[async_trait]
impl ExportProvider for VolumeExports {
    async fn list(&self) -> Vec<String> {
        let mut names = match self.engine.list_records().await {
            Ok(recs) => recs.into_iter().map(|r| r.volume_id.to_string()).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes for NBD_OPT_LIST");
                Vec::new()
            }
        };
        match self.engine.list_snapshots().await {
            Ok(snaps) => names.extend(snaps.into_iter().map(|s| s.snapshot_id.to_string())),
            Err(e) => tracing::warn!(error = %e, "cannot list snapshots for NBD_OPT_LIST"),
        }
        names
    }

    async fn open(&self, name: &str) -> Result<Export, ExportError> {
        if let Ok(snap) = SnapshotId::parse(name) {
            let device = self.engine.snapshot_volume(&snap).await?;
            return Ok(Export {
                name: name.to_owned(),
                volume: Device::Snapshot(device),
                read_only: true,
                description: format!("vblock snapshot {snap} (read-only)"),
            });
        }
        let id = VolumeId::parse(name)
            .map_err(|_| ExportError::Unknown(format!("no volume or snapshot named {name:?}")))?;
        let rec = self
            .engine
            .get_record(&id)
            .await?
            .ok_or_else(|| ExportError::Unknown(format!("no volume {id}")))?;
        let volume = self.engine.volume(&id).await?;
        Ok(Export {
            name: name.to_owned(),
            volume: Device::Volume(volume),
            read_only: false,
            description: if rec.name.is_empty() {
                format!("vblock volume {id}")
            } else {
                rec.name
            },
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
        tracing::Span::current().record("volume", neg.export.name.as_str());
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

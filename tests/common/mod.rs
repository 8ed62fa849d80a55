//! Helpers shared by the engine integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vblock::backend::{BackendError, SharedBackend};
use vblock::{Engine, EngineConfig, VolumeConfig};

/// Small chunks and a short idle flush, so tests exercise chunking constantly.
pub fn small_config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.volume = VolumeConfig {
        buffer_bytes: 80 << 20,
        chunk_bytes: 64 << 10,
        wal_segment_bytes: 256 << 10,
        idle_flush: Duration::from_millis(20),
        ..VolumeConfig::default()
    };
    c.frame_cache_bytes = 4 << 20;
    c.meta_cache_bytes = 8 << 20;
    c
}

pub async fn open_engine(dir: &Path, backend: &SharedBackend) -> Engine {
    Engine::open(small_config(dir), backend.clone())
        .await
        .expect("engine opens")
}

pub fn memory_backend() -> SharedBackend {
    Arc::new(vblock::backend::memory::MemoryBackend::new())
}

/// Runs `f` on a fresh multi-threaded runtime with a hard time limit.
pub fn run<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(limit, f)
            .await
            .expect("test exceeded its time limit");
    });
}
pub mod daemon;
pub mod fault_proxy;
pub mod metrics;
pub mod s3;
pub mod snapshots;
pub mod tls;

/// What a [`HookedBackend`] does around its memory backend's calls: counters, and the faults the
/// real backends cannot produce on demand (a PUT held mid-flight). Every hook defaults to nothing.
#[async_trait::async_trait]
pub trait Hooks: Send + Sync {
    /// Runs before a PUT of `key` reaches the store; may wait.
    async fn before_put(&self, _key: &str) {}
    /// Runs after a PUT of `key` succeeded.
    fn after_put(&self, _key: &str) {}
    /// An error to answer a PUT of `key` with instead of storing it (`None`: store it).
    fn refuse_put(&self, _key: &str) -> Option<BackendError> {
        None
    }
    /// An error to answer a PUT of `key` with after storing it (a response lost on the way).
    fn fail_after_put(&self, _key: &str) -> Option<BackendError> {
        None
    }
    /// True: conditional PUTs store like plain ones (a store that ignores `If-None-Match`).
    fn ignore_condition(&self) -> bool {
        false
    }
    /// Runs before each ranged read (async or blocking).
    fn before_ranged_read(&self) {}
    /// True: offer the store's blocking ranged reads, as the local backends do; false (the
    /// trait's default): hide them, as S3 does.
    fn local(&self) -> bool {
        false
    }
}

/// Holds every PUT of a key `matches` admits until [`HoldPuts::open`].
pub struct HoldPuts {
    matches: fn(&str) -> bool,
    held: tokio::sync::watch::Sender<bool>,
    open: tokio::sync::watch::Sender<bool>,
}

impl HoldPuts {
    pub fn new(matches: fn(&str) -> bool) -> Arc<Self> {
        Arc::new(Self {
            matches,
            held: tokio::sync::watch::channel(false).0,
            open: tokio::sync::watch::channel(false).0,
        })
    }

    /// Resolves once a PUT is held.
    pub async fn until_held(&self) {
        let _ = self.held.subscribe().wait_for(|h| *h).await;
    }

    /// Lets every held PUT, and every later one, go on.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

#[async_trait::async_trait]
impl Hooks for Arc<HoldPuts> {
    async fn before_put(&self, key: &str) {
        if (self.matches)(key) {
            self.held.send_replace(true);
            let _ = self.open.subscribe().wait_for(|o| *o).await;
        }
    }
}

/// A real memory backend with [`Hooks`] around its calls.
pub struct HookedBackend<H> {
    pub inner: vblock::backend::memory::MemoryBackend,
    pub hooks: H,
}

impl<H: Hooks> HookedBackend<H> {
    pub fn new(hooks: H) -> Arc<Self> {
        Arc::new(Self {
            inner: vblock::backend::memory::MemoryBackend::new(),
            hooks,
        })
    }
}

#[async_trait::async_trait]
impl<H: Hooks + 'static> vblock::backend::Backend for HookedBackend<H> {
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), BackendError> {
        self.hooks.before_put(key).await;
        if let Some(e) = self.hooks.refuse_put(key) {
            return Err(e);
        }
        self.inner.put(key, data).await?;
        self.hooks.after_put(key);
        Ok(())
    }
    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> Result<bool, BackendError> {
        self.hooks.before_put(key).await;
        if let Some(e) = self.hooks.refuse_put(key) {
            return Err(e);
        }
        let stored = if self.hooks.ignore_condition() {
            self.inner.put(key, data).await?;
            true
        } else {
            self.inner.put_if_absent(key, data).await?
        };
        self.hooks.after_put(key);
        if let Some(e) = self.hooks.fail_after_put(key) {
            return Err(e);
        }
        Ok(stored)
    }
    async fn get(&self, key: &str) -> Result<bytes::Bytes, BackendError> {
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, BackendError> {
        self.hooks.before_ranged_read();
        self.inner.get_range(key, range).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.inner.list(prefix).await
    }
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn get_range_blocking(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Option<Result<bytes::Bytes, BackendError>> {
        if !self.hooks.local() {
            return None;
        }
        self.hooks.before_ranged_read();
        self.inner.get_range_blocking(key, range)
    }
}

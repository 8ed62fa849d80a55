//! Helpers shared by the engine integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vblock::backend::SharedBackend;
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
pub mod s3;
pub mod snapshots;

//! The one fixture of the fuzz targets that need a real engine: a tokio runtime and an engine on
//! a memory backend in a temporary directory, built once per fuzzing process.

/// A runtime, whatever the target built from the engine, and the directory that must outlive it.
pub struct Env<T> {
    pub rt: tokio::runtime::Runtime,
    pub value: T,
    _dir: tempfile::TempDir,
}

/// Opens an engine (memory backend) and hands it to `make` on the runtime.
pub fn engine_env<T, F>(make: impl FnOnce(vblock::Engine) -> F) -> Env<T>
where
    F: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let value = rt.block_on(async {
        let backend = std::sync::Arc::new(vblock::backend::memory::MemoryBackend::new());
        let engine = vblock::Engine::open(vblock::EngineConfig::new(dir.path()), backend)
            .await
            .expect("engine");
        make(engine).await
    });
    Env {
        rt,
        value,
        _dir: dir,
    }
}

//! Chunk upload throughput against a plain PUT loop, same S3 server, same concurrency, one run.
//! Run with `scripts/bench-s3.sh` (starts moto_server) or set VBLOCK_BENCH_S3_ENDPOINT.
//!
//! 1. Plain: `CONCURRENCY` tasks PUT 4 MiB objects of random bytes until `TOTAL_MIB` are stored.
//! 2. vblock: the same volume of random data written sequentially through the engine API (1 MiB
//!    writes, S3 backend, `upload_concurrency = CONCURRENCY`), timed until every chunk is durable
//!    in S3 and committed (`persist_buffer`).
//!
//! Prints MiB/s for both and the ratio (target >= 0.8).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rand::RngCore;
use vblock::backend::s3::{S3Backend, S3Config};
use vblock::backend::{Backend, SharedBackend};

const TOTAL_MIB: u64 = 256;
const CONCURRENCY: usize = 4;

fn config(endpoint: &str, bucket: &str) -> S3Config {
    S3Config {
        bucket: bucket.into(),
        prefix: "bench".into(),
        endpoint: Some(endpoint.into()),
        force_path_style: true,
        create_bucket: true,
        region: Some("us-east-1".into()),
        static_credentials: Some(("bench".into(), "benchsecret".into())),
        attempt_timeout: None,
    }
}

fn main() {
    let Ok(endpoint) = std::env::var("VBLOCK_BENCH_S3_ENDPOINT") else {
        eprintln!("s3_upload: set VBLOCK_BENCH_S3_ENDPOINT (scripts/bench-s3.sh does); skipping");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut data = vec![0u8; (TOTAL_MIB << 20) as usize];
        rand::thread_rng().fill_bytes(&mut data);
        let data = Bytes::from(data);

        // 1. Plain PUT loop.
        let plain = Arc::new(S3Backend::connect(&config(&endpoint, "bench-plain")).await.expect("connect"));
        let objects = (TOTAL_MIB / 4) as usize;
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (plain, next, data) = (plain.clone(), next.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= objects {
                        break;
                    }
                    let body = data.slice(i * (4 << 20)..(i + 1) * (4 << 20));
                    plain.put(&format!("plain/{i:08}"), body).await.expect("put");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let plain_mibs = TOTAL_MIB as f64 / t.elapsed().as_secs_f64();
        println!("plain PUT loop: {objects} x 4 MiB, {CONCURRENCY} in flight: {plain_mibs:.0} MiB/s");

        // 2. vblock chunk uploads.
        let dir = tempfile::tempdir().expect("tempdir");
        let backend: SharedBackend = Arc::new(S3Backend::connect(&config(&endpoint, "bench-vblock")).await.expect("connect"));
        let mut cfg = vblock::EngineConfig::new(dir.path());
        cfg.volume.upload_concurrency = CONCURRENCY;
        if let Some(level) = std::env::var("VBLOCK_BENCH_ZSTD_LEVEL").ok().and_then(|l| l.parse().ok()) {
            cfg.volume.chunk.zstd_level = level;
        }
        println!("zstd level {}", cfg.volume.chunk.zstd_level);
        let engine = vblock::Engine::open(cfg, backend).await.expect("engine");
        let id = engine.create_volume(TOTAL_MIB << 20, "bench").await.expect("create").volume_id;
        let vol = engine.volume(&id).await.expect("open");
        let t = Instant::now();
        for i in 0..TOTAL_MIB {
            vol.write(i << 20, data.slice((i << 20) as usize..((i + 1) << 20) as usize), false).await.expect("write");
        }
        let ingest = t.elapsed();
        vol.persist_buffer().await.expect("persist");
        let secs = t.elapsed().as_secs_f64();
        println!("vblock: writes acknowledged after {ingest:?} (WAL + buffer), all chunks committed after {secs:.2} s");
        let stored = vol.stats().chunk_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let vblock_mibs = TOTAL_MIB as f64 / secs;
        println!(
            "vblock chunk uploads: {TOTAL_MIB} MiB written and persisted ({:.0} MiB stored in {} chunks), {CONCURRENCY} uploads in flight: {vblock_mibs:.0} MiB/s",
            stored as f64 / (1 << 20) as f64,
            vol.stats().chunks.load(std::sync::atomic::Ordering::Relaxed)
        );
        println!("ratio vblock / plain PUT: {:.2} (target >= 0.80)", vblock_mibs / plain_mibs);
        drop(vol);
        engine.close_all().await;
    });
}

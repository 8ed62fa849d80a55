//! Chunk upload throughput against a plain PUT loop, same S3 server, same concurrency, one run.
//! Run with `scripts/bench-s3.sh` (starts moto_server; `--tls` for HTTPS, where both loops PUT
//! `UNSIGNED-PAYLOAD`) or set VBLOCK_BENCH_S3_ENDPOINT.
//!
//! 1. Plain: `CONCURRENCY` tasks PUT 4 MiB objects of random bytes until `TOTAL_MIB` are stored.
//! 2. vblock: the same volume of random data written sequentially through the engine API (1 MiB
//!    writes, S3 backend, `upload_concurrency = CONCURRENCY`), timed until every chunk is durable
//!    in S3 and committed (`persist_buffer`).
//!
//! Five alternating rounds after a warm-up, the server emptied between them; prints MiB/s for
//! both per round and the median ratio (target >= 0.8), and the CPU seconds each round cost this
//! process and, when `VBLOCK_BENCH_S3_SERVER_PID` names it, the server (Linux `/proc`): on 2
//! cores shared with the server the run is CPU-bound, so CPU per round is what vblock can cut.

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
        sign_payload: false,
    }
}

/// Rounds of (plain, vblock), alternating so both see the server in the same state; the
/// median ratio is reported (single runs on 2 shared cores spread by +-0.1).
const ROUNDS: usize = 5;

/// CPU seconds (user + system) used so far by this process and by the server process named by
/// `VBLOCK_BENCH_S3_SERVER_PID` (0 when unknown), from `/proc/PID/stat` in clock ticks.
fn cpu_seconds() -> (f64, f64) {
    fn of(pid: &str) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // /proc reports USER_HZ ticks, 100 per second on Linux (`getconf CLK_TCK`).
        (ticks(11) + ticks(12)) as f64 / 100.0
    }
    let server = std::env::var("VBLOCK_BENCH_S3_SERVER_PID").map_or(0.0, |pid| of(&pid));
    (of("self"), server)
}

/// "CPU-s: this process X, server Y" since `before` (a [`cpu_seconds`] reading).
fn cpu_since(before: (f64, f64)) -> String {
    let now = cpu_seconds();
    format!(
        "CPU-s: this process {:.2}, server {:.2}",
        now.0 - before.0,
        now.1 - before.1
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deletes every object under the backend's prefix (keeps the server's memory flat between rounds).
async fn empty(backend: &S3Backend) {
    for key in backend.list("").await.expect("list") {
        backend.delete(&key).await.expect("delete");
    }
}

/// The plain PUT loop: MiB/s.
async fn plain_round(plain: &Arc<S3Backend>, data: &Bytes) -> f64 {
    let objects = (TOTAL_MIB / 4) as usize;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu = cpu_seconds();
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
                plain
                    .put(&format!("plain/{i:08}"), body)
                    .await
                    .expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let mibs = TOTAL_MIB as f64 / t.elapsed().as_secs_f64();
    println!(
        "  plain PUT loop: {objects} x 4 MiB, {CONCURRENCY} in flight: {mibs:.0} MiB/s ({})",
        cpu_since(cpu)
    );
    mibs
}

/// The same bytes through a volume until every chunk is committed: MiB/s.
async fn vblock_round(
    backend: &Arc<S3Backend>,
    data: &Bytes,
    chunk: vblock::chunk::ChunkOptions,
) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = vblock::EngineConfig::new(dir.path());
    cfg.volume.upload_concurrency = CONCURRENCY;
    cfg.volume.chunk = chunk;
    let shared: SharedBackend = backend.clone();
    let engine = vblock::Engine::open(cfg, shared).await.expect("engine");
    let id = engine
        .create_volume(TOTAL_MIB << 20, "bench")
        .await
        .expect("create")
        .volume_id;
    let vol = engine.volume(&id).await.expect("open");
    let cpu = cpu_seconds();
    let t = Instant::now();
    for i in 0..TOTAL_MIB {
        vol.write(
            i << 20,
            data.slice((i << 20) as usize..((i + 1) << 20) as usize),
            false,
        )
        .await
        .expect("write");
    }
    let ingest = t.elapsed();
    vol.persist_buffer().await.expect("persist");
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_since(cpu);
    let stored = vol
        .stats()
        .chunk_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let mibs = TOTAL_MIB as f64 / secs;
    println!(
        "  vblock: writes acknowledged after {ingest:.0?} (WAL + buffer); {TOTAL_MIB} MiB persisted ({:.0} MiB stored in {} chunks, {CONCURRENCY} uploads in flight) after {secs:.2} s: {mibs:.0} MiB/s ({cpu})",
        stored as f64 / (1 << 20) as f64,
        vol.stats().chunks.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(vol);
    engine.close_all().await;
    mibs
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
        let plain = Arc::new(S3Backend::connect(&config(&endpoint, "bench-plain")).await.expect("connect"));
        let vb = Arc::new(S3Backend::connect(&config(&endpoint, "bench-vblock")).await.expect("connect"));
        let mut chunk = vblock::VolumeConfig::default().chunk;
        fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
            std::env::var(name).ok().and_then(|l| l.parse().ok())
        }
        chunk.zstd_level = env("VBLOCK_BENCH_ZSTD_LEVEL").unwrap_or(chunk.zstd_level);
        chunk.frame_blocks = env("VBLOCK_BENCH_FRAME_BLOCKS").unwrap_or(chunk.frame_blocks);
        println!("{endpoint}: zstd level {}, frames of {} blocks", chunk.zstd_level, chunk.frame_blocks);
        // Warm-up (not timed): the server's first requests are slower.
        for i in 0..8 {
            plain.put(&format!("warm/{i}"), data.slice(0..4 << 20)).await.expect("put");
        }
        empty(&plain).await;
        let (mut plains, mut vblocks, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            println!("round {round}:");
            let p = plain_round(&plain, &data).await;
            empty(&plain).await;
            let v = vblock_round(&vb, &data, chunk).await;
            empty(&vb).await;
            println!("  ratio {:.2}", v / p);
            plains.push(p);
            vblocks.push(v);
            ratios.push(v / p);
        }
        println!(
            "PUTs sent as UNSIGNED-PAYLOAD (HTTPS): plain loop {}, vblock {}",
            plain.unsigned_puts(),
            vb.unsigned_puts()
        );
        let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
        println!(
            "median of {ROUNDS} rounds: plain PUT {:.0} MiB/s, vblock chunk uploads {:.0} MiB/s, ratio vblock / plain PUT {:.2} (rounds {lo:.2}-{hi:.2}; target >= 0.80)",
            median(plains),
            median(vblocks),
            median(ratios)
        );
    });
}

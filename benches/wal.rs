//! WAL benchmarks (issue: WAL append p50 < 5 µs; group commit >= 80% of the disk's sequential
//! write bandwidth with 32 concurrent writers). Run: `cargo bench --bench wal`.
//!
//! Prints, besides criterion's own report:
//! - append (no fsync) latency p50/p99 of 4 KiB records;
//! - the disk's sequential write bandwidth (1 MiB writes + fdatasync, same directory);
//! - 32 concurrent writers of 4 KiB FUA writes through a volume (group commit): throughput,
//!   p50/p99 latency, fsyncs per write, and the ratio to the disk bandwidth.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use vblock::wal::{RecordKind, Wal, WalConfig};

fn bench_dir() -> tempfile::TempDir {
    // Same disk as the project (not tmpfs), unless VBLOCK_BENCH_DIR says otherwise.
    let base = std::env::var("VBLOCK_BENCH_DIR").unwrap_or_else(|_| "target".into());
    std::fs::create_dir_all(&base).expect("bench dir");
    tempfile::tempdir_in(base).expect("tempdir")
}

/// Appends a one-block write numbered `seq` (blocks cycle through the first million).
fn append(wal: &Wal, seq: u64, payload: Bytes) {
    wal.append(RecordKind::Write, seq, seq % 1_000_000, 1, payload)
        .expect("append");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn open_wal(dir: &std::path::Path) -> Wal {
    let cfg = WalConfig {
        dir: dir.to_owned(),
        segment_bytes: 64 << 20,
        name: "bench".into(),
        recovery: vblock::wal::WalRecovery::default(),
        fs: vblock::fs::Fs::Real,
    };
    Wal::open(&cfg, 1, 0, |_, _| {}).expect("wal").0
}

fn wal_append(c: &mut Criterion) {
    let dir = bench_dir();
    let wal = open_wal(dir.path());
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let payload = Bytes::from(vec![0xabu8; 4096]);
    let mut seq = 0u64;
    c.bench_function("wal_append_4k_no_fsync", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                seq += 1;
                let t = Instant::now();
                append(&wal, seq, payload.clone());
                total += t.elapsed();
                if i % 4096 == 4095 {
                    // Bound the writer's queue (the engine bounds it with the write buffer).
                    rt.block_on(wal.sync()).expect("sync");
                }
            }
            rt.block_on(wal.sync()).expect("sync");
            total
        })
    });
    wal.shutdown(false);
}

fn report_percentiles() {
    let dir = bench_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");

    // 1. Append latency percentiles.
    let wal = open_wal(dir.path());
    let payload = Bytes::from(vec![0xcdu8; 4096]);
    let n = 200_000u64;
    let mut lat = Vec::with_capacity(n as usize);
    for seq in 1..=n {
        let t = Instant::now();
        append(&wal, seq, payload.clone());
        lat.push(t.elapsed());
        if seq % 4096 == 0 {
            rt.block_on(wal.sync()).expect("sync");
        }
    }
    rt.block_on(wal.sync()).expect("sync");
    wal.shutdown(false);
    lat.sort();
    println!(
        "wal append 4 KiB (no fsync): p50 {:?} p99 {:?} over {n} appends",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );

    // 2. Disk sequential write bandwidth: 256 MiB in 1 MiB writes, then fdatasync.
    let path = dir.path().join("seq.bin");
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&path).expect("create");
        for _ in 0..256 {
            f.write_all(&buf).expect("write");
        }
        f.sync_data().expect("sync");
    }
    let disk_mbps = 256.0 * 1.048576 / t.elapsed().as_secs_f64();
    std::fs::remove_file(&path).ok();
    println!("disk sequential write (1 MiB writes + fdatasync): {disk_mbps:.0} MB/s");

    // 2b. The ceiling for 32 writers of 4 KiB FUA writes: at most 32 x 4 KiB = 128 KiB can be
    // in flight, so the best possible is the raw disk doing 128 KiB write + fdatasync cycles.
    let group = vec![0x77u8; 32 * 4096];
    let mut f = std::fs::File::create(&path).expect("create");
    let mut cyc = Vec::new();
    let t = Instant::now();
    for _ in 0..400 {
        let c = Instant::now();
        f.write_all(&group).expect("write");
        f.sync_data().expect("sync");
        cyc.push(c.elapsed());
    }
    let ceiling_mbps = 400.0 * group.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).ok();
    cyc.sort();
    println!(
        "raw disk, 128 KiB write + fdatasync cycles: p50 {:?}, {ceiling_mbps:.0} MB/s (ceiling for 32 x 4 KiB FUA)",
        percentile(&cyc, 0.5)
    );

    let limits = Limits {
        disk_mbps,
        ceiling_mbps,
    };

    // 3a. Group commit in the WAL itself: 32 writers, each appending a 4 KiB record and waiting
    // for it to be synced, in a loop.
    rt.block_on(async {
        let wal = Arc::new(open_wal(&dir.path().join("gc-wal")));
        let seq = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let payload = Bytes::from(vec![0x42u8; 4096]);
        let (w, f) = (wal.clone(), wal.clone());
        run_writers(
            "WAL group commit, synced 4 KiB appends",
            &limits,
            move || f.stats().fsyncs.load(Ordering::Relaxed),
            move |_, _| {
                let (wal, seq, payload) = (w.clone(), seq.clone(), payload.clone());
                async move {
                    append(&wal, seq.fetch_add(1, Ordering::SeqCst), payload);
                    wal.sync().await.expect("sync");
                }
            },
        )
        .await;
        wal.shutdown(false);
    });

    // 3b. Group commit through a volume: 32 writers, 4 KiB FUA writes (memtable, chunking too).
    rt.block_on(async {
        let backend: vblock::backend::SharedBackend =
            Arc::new(vblock::backend::memory::MemoryBackend::new());
        let engine =
            vblock::Engine::open(vblock::EngineConfig::new(dir.path().join("data")), backend)
                .await
                .expect("engine");
        let id = engine
            .create_volume(4 << 30, "bench")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        let (v, f) = (vol.clone(), vol.clone());
        run_writers(
            "group commit through a volume, FUA 4 KiB writes",
            &limits,
            move || f.wal_stats().fsyncs.load(Ordering::Relaxed),
            move |w, i| {
                let v = v.clone();
                async move {
                    let data = Bytes::from(vec![w as u8 | 1; 4096]);
                    v.write(((w * PER_WRITER + i) % (1 << 20)) * 4096, data, true)
                        .await
                        .expect("write");
                }
            },
        )
        .await;
        drop(vol);
        engine.close_all().await;
    });
}

/// What the group-commit results are compared with.
struct Limits {
    disk_mbps: f64,
    ceiling_mbps: f64,
}

const WRITERS: u64 = 32;
const PER_WRITER: u64 = 2000;

/// Runs `WRITERS` concurrent tasks of `PER_WRITER` calls of `op(writer, i)` (one synced 4 KiB
/// write each) and prints throughput, latency, writes per fdatasync and the ratios to `limits`.
async fn run_writers<F, Fut>(what: &str, limits: &Limits, fsyncs: impl Fn() -> u64, op: F)
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let op = Arc::new(op);
    let fsyncs0 = fsyncs();
    let t = Instant::now();
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(PER_WRITER as usize);
            for i in 0..PER_WRITER {
                let t = Instant::now();
                op(w, i).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.expect("task"));
    }
    let secs = t.elapsed().as_secs_f64();
    let syncs = fsyncs() - fsyncs0;
    lat.sort();
    let writes = WRITERS * PER_WRITER;
    let mbps = writes as f64 * 4096.0 / 1e6 / secs;
    println!(
        "{what}, {WRITERS} writers x {PER_WRITER}: {:.0} IOPS, {mbps:.0} MB/s, p50 {:?} p99 {:?}, {:.1} writes per fdatasync, {:.0}% of disk sequential bandwidth, {:.0}% of the 128 KiB-cycle ceiling",
        writes as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        writes as f64 / syncs.max(1) as f64,
        100.0 * mbps / limits.disk_mbps,
        100.0 * mbps / limits.ceiling_mbps
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = wal_append
}

fn main() {
    report_percentiles();
    benches();
    Criterion::default().configure_from_args().final_summary();
}

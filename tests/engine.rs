//! Engine integration tests: WAL corruption, group commit, sparse huge volumes, block status,
//! bad input, backpressure.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use vblock::wal::WalError;
use vblock::{VolumeError, VolumeId};

fn block(fill: u8) -> Bytes {
    Bytes::from(vec![fill; 4096])
}

fn segments(dir: &std::path::Path, id: &VolumeId) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("wal").join(id.as_str()))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// An engine on `dir` and `backend` that turns nothing into chunks (1 MiB chunks, no idle
/// flush: everything stays in the WAL), and a new 1 MiB volume on it.
async fn wal_only_volume(
    dir: &std::path::Path,
    backend: &vblock::backend::SharedBackend,
) -> (vblock::Engine, VolumeId) {
    let mut config = common::small_config(dir);
    config.volume.idle_flush = Duration::from_secs(3600);
    config.volume.chunk_bytes = 1 << 20;
    let engine = vblock::Engine::open(config, backend.clone())
        .await
        .expect("engine");
    let id = engine
        .create_volume(1 << 20, "c")
        .await
        .expect("create")
        .volume_id;
    (engine, id)
}

/// Writes `n` flushed blocks, crashes, and returns (dir, id, segment file holding the records).
async fn crashed_volume_with_records(
    n: u64,
) -> (
    tempfile::TempDir,
    vblock::backend::SharedBackend,
    VolumeId,
    std::path::PathBuf,
) {
    crashed_volume_with_unsynced_records(n, 0).await
}

/// Writes `n` flushed blocks, then `unsynced` more without a flush, crashes, and returns (dir,
/// id, segment file holding the records).
async fn crashed_volume_with_unsynced_records(
    n: u64,
    unsynced: u64,
) -> (
    tempfile::TempDir,
    vblock::backend::SharedBackend,
    VolumeId,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = common::memory_backend();
    let (engine, id) = wal_only_volume(dir.path(), &backend).await;
    let vol = engine.volume(&id).await.expect("open");
    for i in 0..n {
        vol.write(i * 4096, block(i as u8 + 1), false)
            .await
            .expect("write");
    }
    vol.flush().await.expect("flush");
    for i in n..n + unsynced {
        vol.write(i * 4096, block(i as u8 + 1), false)
            .await
            .expect("write");
    }
    drop(vol);
    engine.simulate_crash().await;
    let segs = segments(dir.path(), &id);
    let seg = segs.last().expect("a segment").clone();
    (dir, backend, id, seg)
}

async fn reopen(
    dir: &std::path::Path,
    backend: &vblock::backend::SharedBackend,
    id: &VolumeId,
) -> Result<(vblock::Engine, vblock::Volume), VolumeError> {
    reopen_with(dir, backend, id, vblock::wal::WalRecovery::default()).await
}

async fn reopen_with(
    dir: &std::path::Path,
    backend: &vblock::backend::SharedBackend,
    id: &VolumeId,
    mode: vblock::wal::WalRecovery,
) -> Result<(vblock::Engine, vblock::Volume), VolumeError> {
    let mut config = common::small_config(dir);
    config.volume.wal_recovery = mode;
    config.volume.idle_flush = Duration::from_secs(3600);
    config.volume.chunk_bytes = 1 << 20;
    let engine = vblock::Engine::open(config, backend.clone()).await?;
    let vol = engine.volume(id).await?;
    Ok((engine, vol))
}

const RECORD: u64 = 44 + 4096;

/// Blocks 0..3 hold the first three writes of `crashed_volume_with_*`, block 3 (the fourth
/// write, cut off) reads as zeros.
async fn assert_holds_three_of_four(vol: &vblock::Volume) {
    for i in 0..3u64 {
        assert!(vol.read(i * 4096, 4096).await.expect("read") == block(i as u8 + 1));
    }
    assert!(vol.read(3 * 4096, 4096).await.expect("read") == vec![0u8; 4096]);
}

/// Offsets of the data records (not sync notes) in a segment file.
fn data_records(bytes: &[u8]) -> Vec<usize> {
    vblock::wal::scan_segment(bytes)
        .records
        .iter()
        .filter(|(_, h)| h.kind != vblock::wal::RecordKind::SyncNote)
        .map(|(off, _)| *off as usize)
        .collect()
}

/// A flipped bit in the last record, which was never synced, is a torn tail: cut off, the
/// records before it read back.
#[test]
fn flipped_bit_in_unsynced_tail_record_is_truncated() {
    common::run(Duration::from_secs(30), async {
        let (dir, backend, id, seg) = crashed_volume_with_unsynced_records(3, 1).await;
        let mut bytes = std::fs::read(&seg).expect("read");
        let last = data_records(&bytes)[3];
        bytes[last + 100] ^= 0x04;
        std::fs::write(&seg, &bytes).expect("write");
        let (engine, vol) = reopen(dir.path(), &backend, &id)
            .await
            .expect("tail corruption is recovered");
        assert_holds_three_of_four(&vol).await;
        assert_eq!(
            std::fs::metadata(&seg).expect("meta").len(),
            last as u64,
            "tail cut off"
        );
        drop(vol);
        engine.close_all().await;
    });
}

/// A flipped bit in the last record of a flushed batch: the sync note the WAL wrote after the
/// flush says it was synced, so the default mode refuses to open instead of silently dropping an
/// acknowledged write; `tolerate-any-corruption` (the operator's choice) cuts it off.
#[test]
fn flipped_bit_in_synced_tail_record_refuses_unless_told_to_cut() {
    common::run(Duration::from_secs(30), async {
        let (dir, backend, id, seg) = crashed_volume_with_records(4).await;
        let mut bytes = std::fs::read(&seg).expect("read");
        let last = data_records(&bytes)[3];
        bytes[last + 100] ^= 0x04;
        std::fs::write(&seg, &bytes).expect("write");
        for mode in [
            vblock::wal::WalRecovery::TolerateTailCorruption,
            vblock::wal::WalRecovery::AbsoluteConsistency,
        ] {
            match reopen_with(dir.path(), &backend, &id, mode).await {
                Err(VolumeError::Wal(vblock::wal::WalError::Corrupt { offset, .. })) => {
                    assert_eq!(offset, last as u64, "{mode:?}")
                }
                Err(e) => panic!("{mode:?}: wrong error: {e}"),
                Ok(_) => panic!("{mode:?}: a synced record's damage must not be cut silently"),
            }
            assert_eq!(std::fs::read(&seg).expect("read"), bytes, "nothing cut");
        }
        let (engine, vol) = reopen_with(
            dir.path(),
            &backend,
            &id,
            vblock::wal::WalRecovery::TolerateAnyCorruption,
        )
        .await
        .expect("the operator's mode cuts");
        assert_holds_three_of_four(&vol).await;
        drop(vol);
        engine.close_all().await;
    });
}

#[test]
fn flipped_bit_in_middle_record_refuses_to_open() {
    common::run(Duration::from_secs(30), async {
        let (dir, backend, id, seg) = crashed_volume_with_records(4).await;
        let mut bytes = std::fs::read(&seg).expect("read");
        let second = 32 + RECORD as usize;
        bytes[second + 60] ^= 0x80;
        std::fs::write(&seg, &bytes).expect("write");
        match reopen(dir.path(), &backend, &id).await {
            Err(VolumeError::Wal(WalError::Corrupt { offset, .. })) => {
                assert_eq!(offset, second as u64, "the bad record's offset");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a corrupt record followed by valid ones must not be skipped"),
        }
        // Nothing was cut: the file is as it was.
        assert_eq!(std::fs::read(&seg).expect("read"), bytes);
    });
}

#[test]
fn torn_tail_at_every_offset_of_last_record_recovers() {
    common::run(Duration::from_secs(120), async {
        let (dir, backend, id, seg) = crashed_volume_with_records(3).await;
        let full = std::fs::read(&seg).expect("read");
        let last = 32 + 2 * RECORD;
        // Every offset inside the header, and a spread of offsets inside the payload.
        let cuts: Vec<u64> = (last..last + 48)
            .chain((last + 48..last + RECORD).step_by(509))
            .collect();
        for cut in cuts {
            std::fs::write(&seg, &full[..cut as usize]).expect("write");
            let (engine, vol) = reopen(dir.path(), &backend, &id)
                .await
                .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            assert_eq!(
                vol.read(4096, 4096).await.expect("read"),
                block(2),
                "cut {cut}"
            );
            assert_eq!(
                vol.read(2 * 4096, 4096).await.expect("read"),
                Bytes::from(vec![0u8; 4096]),
                "cut {cut}"
            );
            drop(vol);
            engine.simulate_crash().await;
            // The reopen started a new segment; remove it so the next cut sees the same layout.
            for s in segments(dir.path(), &id) {
                if s != seg {
                    std::fs::remove_file(s).expect("rm");
                }
            }
        }
    });
}

#[test]
fn group_commit_batches_concurrent_fua_writes() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(64 << 20, "gc")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        let before = vol.wal_stats().fsyncs.load(Ordering::Relaxed);
        let tasks = 32u64;
        let per_task = 20u64;
        let mut handles = Vec::new();
        for t in 0..tasks {
            let v = vol.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let off = (t * per_task + i) * 4096;
                    v.write(off, block((t + i) as u8), true)
                        .await
                        .expect("fua write");
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        let fsyncs = vol.wal_stats().fsyncs.load(Ordering::Relaxed) - before;
        let writes = tasks * per_task;
        println!("{writes} FUA writes from {tasks} tasks took {fsyncs} fdatasyncs");
        assert!(
            fsyncs < writes / 2,
            "group commit did not batch: {fsyncs} fsyncs for {writes} writes"
        );
        for t in 0..tasks {
            for i in 0..per_task {
                let off = (t * per_task + i) * 4096;
                assert_eq!(
                    vol.read(off, 4096).await.expect("read"),
                    block((t + i) as u8)
                );
            }
        }
        drop(vol);
        engine.close_all().await;
    });
}

#[test]
fn concurrent_writers_and_flushers_read_back_after_restart() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(16 << 20, "cc")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        let mut handles = Vec::new();
        for t in 0..8u64 {
            let v = vol.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..64u64 {
                    // Each task owns a stripe of blocks; several rounds overwrite them.
                    let blockno = t * 64 + (i % 32);
                    v.write(blockno * 4096, block((t * 7 + i) as u8), false)
                        .await
                        .expect("write");
                    if i % 16 == 0 {
                        v.flush().await.expect("flush");
                    }
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        vol.flush().await.expect("flush");
        drop(vol);
        engine.simulate_crash().await;
        let engine = common::open_engine(dir.path(), &backend).await;
        let vol = engine.volume(&id).await.expect("reopen");
        for t in 0..8u64 {
            for j in 0..32u64 {
                // Last write to block j of stripe t was i = j + 32.
                let want = block((t * 7 + j + 32) as u8);
                assert_eq!(
                    vol.read((t * 64 + j) * 4096, 4096).await.expect("read"),
                    want,
                    "t{t} j{j}"
                );
            }
        }
        drop(vol);
        engine.close_all().await;
    });
}

#[test]
fn sparse_one_tib_volume_stays_small() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend_dir = tempfile::tempdir().expect("tempdir");
        let backend: vblock::backend::SharedBackend = std::sync::Arc::new(
            vblock::backend::file::FileBackend::new(backend_dir.path()).expect("backend"),
        );
        let engine = common::open_engine(dir.path(), &backend).await;
        let size = 1u64 << 40;
        let id = engine
            .create_volume(size, "big")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        assert_eq!(
            vol.read(size - 4096, 4096).await.expect("read end"),
            Bytes::from(vec![0u8; 4096])
        );
        let offsets = [0u64, 1 << 30, 1 << 39, size - 4096];
        for (i, off) in offsets.iter().enumerate() {
            vol.write(*off, block(i as u8 + 1), false)
                .await
                .expect("write");
        }
        vol.trim(0, size).await.expect("trim everything");
        vol.write(1 << 39, block(9), true)
            .await
            .expect("write after trim");
        vol.persist_buffer().await.expect("persist");
        assert_eq!(vol.read(1 << 39, 4096).await.expect("read"), block(9));
        assert_eq!(
            vol.read(0, 4096).await.expect("read"),
            Bytes::from(vec![0u8; 4096])
        );
        let status = vol.block_status(0, size).await.expect("status");
        let data: u64 = status.iter().filter(|s| !s.hole).map(|s| s.len).sum();
        assert_eq!(data, 4096, "{status:?}");
        drop(vol);
        engine.close_all().await;
        let du = |p: &std::path::Path| -> u64 {
            // Apparent size: RocksDB reserves (fallocate, KEEP_SIZE) log space per daemon, which
            // is not volume data.
            let out = std::process::Command::new("du")
                .arg("-sk")
                .arg("--apparent-size")
                .arg(p)
                .output()
                .expect("du");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX)
        };
        let used_kib = du(dir.path()) + du(backend_dir.path());
        println!("1 TiB volume with sparse writes uses {used_kib} KiB on disk");
        if used_kib >= 1 << 10 {
            let out = std::process::Command::new("du")
                .arg("-ak")
                .arg("--apparent-size")
                .arg(dir.path())
                .output()
                .expect("du");
            panic!(
                "uses {used_kib} KiB:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    });
}

#[test]
fn block_status_reports_data_and_holes() {
    common::run(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(1 << 20, "bs")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        vol.write(4096, Bytes::from(vec![1u8; 8192]), false)
            .await
            .expect("write");
        vol.write(40960, block(2), false).await.expect("write");
        vol.write_zeroes(4096, 4096, false).await.expect("zero");
        for persisted in [false, true] {
            if persisted {
                vol.persist_buffer().await.expect("persist");
            }
            let s = vol.block_status(0, 65536).await.expect("status");
            let shape: Vec<(u64, bool)> = s.iter().map(|e| (e.len, e.hole)).collect();
            assert_eq!(
                shape,
                vec![
                    (8192, true),
                    (4096, false),
                    (28672, true),
                    (4096, false),
                    (20480, true)
                ],
                "persisted={persisted}"
            );
            // Unaligned queries are clipped to the asked range.
            let s = vol.block_status(9000, 100).await.expect("status");
            assert_eq!(
                s,
                vec![vblock::StatusExtent {
                    len: 100,
                    hole: false
                }]
            );
        }
        drop(vol);
        engine.close_all().await;
    });
}

/// Cluster mode: a volume opens only under a lease this node keeps (none before the control
/// plane says which: a restarted daemon), and serves no reads, block status, writes, trims or
/// flushes once that lease is lost: another node may own it, and what this node holds may be
/// stale. Each is refused with `LeaseLost`.
#[test]
fn a_volume_serves_io_only_under_a_kept_lease() {
    use vblock::cluster::lease::Tenure;
    common::run(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let mut config = common::small_config(dir.path());
        config.cluster = true;
        let engine = vblock::Engine::open(config, backend.clone())
            .await
            .expect("engine");
        let id = engine
            .create_volume(1 << 20, "lease")
            .await
            .expect("create")
            .volume_id;
        let refused = |r: Result<vblock::Volume, VolumeError>, what: &str| {
            assert!(
                matches!(r, Err(VolumeError::IncorrectState(ref m)) if m.contains("no lease")),
                "{what}: {:?}",
                r.map(|_| ())
            );
        };
        refused(
            engine.volume(&id).await,
            "opened before the leases are known",
        );

        // A lease that holds for now, then one that lapsed.
        let kept = std::sync::Arc::new(std::sync::Mutex::new(None::<Tenure>));
        let keep = |t: Tenure| *kept.lock().expect("lock") = Some(t);
        let given = kept.clone();
        engine.set_cluster_tenure(std::sync::Arc::new(move |_: &VolumeId| {
            given.lock().expect("lock").clone()
        }));
        refused(engine.volume(&id).await, "opened without a lease kept");
        keep(Tenure::until(
            std::time::Instant::now() + Duration::from_secs(3600),
        ));
        let vol = engine.volume(&id).await.expect("open under a lease");
        vol.write(0, block(7), true).await.expect("write");
        assert_eq!(vol.read(0, 4096).await.expect("read"), block(7));
        drop(vol);
        engine.close_volume(&id).await.expect("close");

        keep(Tenure::until(std::time::Instant::now()));
        refused(engine.volume(&id).await, "opened under a lapsed lease");
        // An instance opened under a lease that lapses afterwards.
        let soon = std::time::Instant::now() + Duration::from_millis(200);
        keep(Tenure::until(soon));
        let vol = engine.volume(&id).await.expect("open under a lease");
        vol.write(4096, block(8), false).await.expect("write");
        tokio::time::sleep_until(soon.into()).await;
        let lost = |r: Result<(), VolumeError>, what: &str| {
            assert!(
                matches!(r, Err(VolumeError::LeaseLost(ref v)) if *v == id),
                "{what}: {r:?}"
            );
        };
        lost(vol.read(0, 4096).await.map(|_| ()), "read");
        lost(vol.block_status(0, 4096).await.map(|_| ()), "block status");
        lost(vol.write(4096, block(8), false).await, "write");
        lost(vol.write_zeroes(0, 8192, false).await, "write zeroes");
        lost(vol.trim(0, 4096).await, "trim");
        lost(vol.flush().await, "flush");
        drop(vol);
        engine.close_all().await;
    });
}

#[test]
fn out_of_range_and_oversized_requests_are_typed_errors() {
    common::run(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(1 << 20, "oor")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        assert!(matches!(
            vol.read(1 << 20, 1).await,
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            vol.read(u64::MAX, 2).await,
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            vol.write((1 << 20) - 1, block(1), false).await,
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            vol.trim(0, (1 << 20) + 1).await,
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            vol.write_zeroes(1, u64::MAX, false).await,
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            vol.block_status(1 << 20, 1).await,
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(vol.read((1 << 20) - 1, 1).await.is_ok());
        assert_eq!(vol.read(0, 0).await.expect("empty read").len(), 0);
        for bad in [0u64, 4095, 17 << 40] {
            assert!(
                matches!(
                    engine.create_volume(bad, "x").await,
                    Err(VolumeError::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        drop(vol);
        engine.close_all().await;
    });
}

#[test]
fn write_buffer_is_bounded() {
    common::run(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let mut config = common::small_config(dir.path());
        config.volume.buffer_bytes = 80 << 20;
        config.volume.chunk_bytes = 1 << 20;
        let engine = vblock::Engine::open(config, backend).await.expect("engine");
        let id = engine
            .create_volume(1 << 30, "bp")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        let mut peak = 0;
        let mb = Bytes::from(vec![7u8; 1 << 20]);
        for i in 0..400u64 {
            vol.write(i << 20, mb.clone(), false).await.expect("write");
            peak = peak.max(vol.buffered_bytes());
        }
        println!("peak buffered bytes writing 400 MiB through an 80 MiB buffer: {peak}");
        assert!(peak <= 80 << 20, "buffer grew to {peak}");
        assert!(vol.stats().chunks.load(Ordering::Relaxed) > 0);
        assert_eq!(
            vol.read(399 << 20, 4096).await.expect("read"),
            Bytes::from(vec![7u8; 4096])
        );
        drop(vol);
        engine.close_all().await;
    });
}

/// A flusher that keeps up compresses: a few MiB written and turned into chunks with the write
/// buffer nearly empty are stored zstd-compressed, none raw for being behind.
#[test]
fn a_flusher_that_keeps_up_compresses() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let mut config = common::small_config(dir.path());
        config.volume.chunk_bytes = 1 << 20;
        let engine = vblock::Engine::open(config, backend).await.expect("engine");
        let id = engine
            .create_volume(1 << 30, "quiet")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        let mb = Bytes::from(vec![7u8; 1 << 20]);
        for i in 0..4u64 {
            vol.write(i << 20, mb.clone(), false).await.expect("write");
            vol.persist_buffer().await.expect("into chunks");
        }
        let stats = vol.stats();
        assert!(stats.chunks.load(Ordering::Relaxed) >= 4);
        assert_eq!(stats.uncompressed_chunks.load(Ordering::Relaxed), 0);
        let stored = stats.chunk_bytes.load(Ordering::Relaxed);
        assert!(
            stored < 1 << 20,
            "4 MiB of one byte value stored in {stored} bytes"
        );
        drop(vol);
        engine.close_all().await;
    });
}

/// Bit flips anywhere in chunk objects of the file backend (issue: reliability, "Torn and
/// corrupt media"): every block reads back either exactly as written or as an error, never as
/// other data.
#[test]
fn bit_flips_in_file_chunk_objects_read_as_errors_never_as_wrong_data() {
    use rand::{Rng, SeedableRng};
    common::run(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = dir.path().join("objects");
        let backend: vblock::backend::SharedBackend = std::sync::Arc::new(
            vblock::backend::file::FileBackend::new(&objects).expect("file backend"),
        );
        const BLOCKS: u64 = 96;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Half compressible, half random data: zstd and raw frames both get flipped.
        let data: Vec<u8> = (0..BLOCKS)
            .flat_map(|b| {
                let mut blk = vec![b as u8; 4096];
                if b % 2 == 1 {
                    rng.fill(&mut blk[..]);
                }
                blk
            })
            .collect();
        let mut config = common::small_config(dir.path());
        config.volume.chunk_bytes = 128 << 10;
        let id = volume_in_chunks(config, &backend, &data).await;
        let chunks: Vec<_> = walk(&objects)
            .into_iter()
            .filter(|p| p.parent().is_some_and(|d| d.ends_with("chunks")))
            .collect();
        assert!(
            chunks.len() >= 3,
            "expected several chunk objects: {chunks:?}"
        );
        let (mut errors, mut intact) = (0, 0);
        for flip in 0..48 {
            let path = &chunks[flip % chunks.len()];
            let original = std::fs::read(path).expect("read object");
            let mut bad = original.clone();
            let bit = rng.gen_range(0..bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(path, &bad).expect("flip");
            // A fresh engine: no cached frames.
            let (engine, vol) = reopen(dir.path(), &backend, &id).await.expect("reopen");
            // One read of everything: adjacent frames are fetched in one piece, each verified.
            match vol.read(0, BLOCKS * 4096).await {
                Ok(got) => assert!(
                    got[..] == data[..],
                    "{}: bit {bit} flipped, a whole read returned wrong data",
                    path.display()
                ),
                Err(_) => errors += 1,
            }
            for b in 0..BLOCKS {
                match vol.read(b * 4096, 4096).await {
                    Ok(got) => {
                        let want = &data[(b * 4096) as usize..((b + 1) * 4096) as usize];
                        assert!(
                            &got[..] == want,
                            "{}: bit {bit} flipped, block {b} returned wrong data",
                            path.display()
                        );
                        intact += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            drop(vol);
            engine.close_all().await;
            std::fs::write(path, &original).expect("restore");
        }
        println!("48 bit flips: {errors} block reads refused, {intact} intact");
        assert!(errors > 0, "no flip was ever detected");
    });
}

/// A 1 MiB volume holding `data` at offset 0, all of it in chunk objects; the engine is closed.
async fn volume_in_chunks(
    config: vblock::EngineConfig,
    backend: &vblock::backend::SharedBackend,
    data: &[u8],
) -> VolumeId {
    let engine = vblock::Engine::open(config, backend.clone())
        .await
        .expect("engine");
    let id = engine
        .create_volume(1 << 20, "in-chunks")
        .await
        .expect("create")
        .volume_id;
    let vol = engine.volume(&id).await.expect("volume");
    vol.write(0, Bytes::copy_from_slice(data), false)
        .await
        .expect("write");
    vol.persist_buffer().await.expect("into chunks");
    drop(vol);
    engine.close_all().await;
    id
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Counts ranged reads; `local: false` hides the blocking reads, as S3 does.
struct CountRangedReads {
    local: bool,
    ranged_reads: std::sync::atomic::AtomicU64,
}

impl common::Hooks for CountRangedReads {
    fn before_ranged_read(&self) {
        self.ranged_reads.fetch_add(1, Ordering::SeqCst);
    }
    fn local(&self) -> bool {
        self.local
    }
}

#[test]
fn a_sequential_read_fetches_adjacent_frames_with_one_ranged_read() {
    common::run(Duration::from_secs(60), async {
        for local in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let counting = common::HookedBackend::new(CountRangedReads {
                local,
                ranged_reads: Default::default(),
            });
            let backend: vblock::backend::SharedBackend = counting.clone();
            // 64 blocks in 16 KiB frames and 64 KiB chunks: 4 objects of 4 frames each.
            let data: Vec<u8> = (0..64u8).flat_map(|b| vec![b + 1; 4096]).collect();
            let mut config = common::small_config(dir.path());
            config.volume.chunk.frame_blocks = 4;
            let id = volume_in_chunks(config, &backend, &data).await;
            let objects = backend.list("").await.expect("list");
            let chunks = objects.iter().filter(|k| k.contains("/chunks/")).count();
            assert_eq!(chunks, 4, "{objects:?}");

            // A fresh engine has no cached frames: one ranged read per object.
            let (engine, vol) = reopen(dir.path(), &backend, &id).await.expect("reopen");
            let before = counting.hooks.ranged_reads.load(Ordering::SeqCst);
            let got = vol.read(0, data.len() as u64).await.expect("read");
            assert!(got[..] == data[..], "local={local}: wrong data");
            assert_eq!(
                counting.hooks.ranged_reads.load(Ordering::SeqCst) - before,
                4,
                "local={local}: ranged reads for 16 frames in 4 objects"
            );
            assert_eq!(vol.stats().frame_fetches.load(Ordering::Relaxed), 16);
            // Every frame was cached: a block in the middle is a hit.
            let got = vol.read(37 * 4096, 4096).await.expect("read one block");
            assert!(got[..] == data[37 * 4096..38 * 4096]);
            assert_eq!(
                counting.hooks.ranged_reads.load(Ordering::SeqCst) - before,
                4,
                "local={local}: the cached block was read again"
            );
            drop(vol);
            engine.close_all().await;
        }
    });
}

/// Holds the PUT of a volume's first chunk object (object id 1) until the test releases it,
/// and reports how many chunk PUTs have completed: one slow upload, as S3 gives at times.
struct HoldFirstChunk {
    release: tokio::sync::Semaphore,
    done: tokio::sync::watch::Sender<u64>,
}

#[async_trait::async_trait]
impl common::Hooks for HoldFirstChunk {
    async fn before_put(&self, key: &str) {
        if key.ends_with("/chunks/0000000000000001") {
            let _ = self.release.acquire().await;
        }
    }
    fn after_put(&self, key: &str) {
        if key.contains("/chunks/") {
            self.done.send_modify(|n| *n += 1);
        }
    }
}

/// Chunks commit in order, but one slow upload must not stop the flusher from building and
/// uploading the chunks behind it (the pipeline stays full; docs/design/flusher-pipeline.md).
/// With 2 uploads allowed and the first PUT held, every other chunk is uploaded before the held
/// one finishes; then everything commits and reads back.
#[test]
fn a_slow_upload_does_not_hold_back_the_chunks_behind_it() {
    common::run(Duration::from_secs(60), async {
        const CHUNKS: u64 = 12;
        let dir = tempfile::tempdir().expect("tempdir");
        let (done, mut progress) = tokio::sync::watch::channel(0u64);
        let holding = common::HookedBackend::new(HoldFirstChunk {
            release: tokio::sync::Semaphore::new(0),
            done,
        });
        let backend: vblock::backend::SharedBackend = holding.clone();
        let mut config = common::small_config(dir.path());
        config.volume.upload_concurrency = 2;
        let chunk = config.volume.chunk_bytes;
        let engine = vblock::Engine::open(config, backend).await.expect("engine");
        let id = engine
            .create_volume(1 << 20, "slow-upload")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        // One chunk's worth per write: each fills a memtable, which becomes one chunk object.
        let data: Vec<u8> = (0..CHUNKS * chunk / 4096)
            .flat_map(|b| vec![b as u8 ^ 0x5a; 4096])
            .collect();
        for (i, part) in data.chunks(chunk as usize).enumerate() {
            vol.write(i as u64 * chunk, Bytes::copy_from_slice(part), false)
                .await
                .expect("write");
        }
        let others = tokio::time::timeout(
            Duration::from_secs(20),
            progress.wait_for(|n| *n >= CHUNKS - 1),
        )
        .await
        .is_ok();
        let uploaded = *progress.borrow();
        assert!(
            others,
            "only {uploaded} of the {} chunks behind the held upload were uploaded",
            CHUNKS - 1
        );
        assert_eq!(
            vol.stats().chunks.load(Ordering::Relaxed),
            0,
            "committed out of order"
        );
        holding.hooks.release.add_permits(1);
        vol.persist_buffer().await.expect("persist");
        assert_eq!(vol.stats().chunks.load(Ordering::Relaxed), CHUNKS);
        assert_eq!(vol.buffered_bytes(), 0);
        assert_eq!(
            vol.read(0, data.len() as u64).await.expect("read"),
            Bytes::from(data)
        );
        drop(vol);
        engine.close_all().await;
    });
}

/// What the flusher's uploads run into in [`a_flusher_that_cannot_store_chunks_fails_the_volume`].
#[derive(Default)]
struct BrokenUploads {
    /// 1: every chunk PUT panics (a bug in the upload path); 2: every chunk PUT is refused with
    /// an error the backend calls permanent (access denied); 0: PUTs work.
    mode: std::sync::atomic::AtomicU8,
}

#[async_trait::async_trait]
impl common::Hooks for BrokenUploads {
    async fn before_put(&self, key: &str) {
        if key.contains("/chunks/") && self.mode.load(Ordering::SeqCst) == 1 {
            panic!("injected upload panic");
        }
    }
    fn refuse_put(&self, key: &str) -> Option<vblock::backend::BackendError> {
        (key.contains("/chunks/") && self.mode.load(Ordering::SeqCst) == 2).then(|| {
            vblock::backend::BackendError::Io {
                key: key.to_owned(),
                message: "AccessDenied".into(),
                transient: false,
            }
        })
    }
}

/// A flusher whose chunk uploads panic or are refused for good does not leave the volume
/// hanging: after a few attempts the volume fails loudly (writes, flushes and persists return
/// `VolumeError::Failed`, which NBD answers with `NBD_EIO`), reads go on, and a reopen once the
/// backend works again replays the WAL with every acknowledged write.
#[test]
fn a_flusher_that_cannot_store_chunks_fails_the_volume() {
    for mode in [1u8, 2] {
        common::run(Duration::from_secs(60), async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let hooked = common::HookedBackend::new(BrokenUploads::default());
            let backend: vblock::backend::SharedBackend = hooked.clone();
            let mut config = common::small_config(dir.path());
            // Permanent errors end an upload attempt at once (the daemon waits 5 minutes).
            config.volume.permanent_error_timeout = Duration::ZERO;
            let engine = vblock::Engine::open(config, backend.clone())
                .await
                .expect("engine");
            let id = engine
                .create_volume(1 << 20, "broken")
                .await
                .expect("create")
                .volume_id;
            let vol = engine.volume(&id).await.expect("open");
            vol.write(0, block(1), false).await.expect("write");
            vol.persist_buffer().await.expect("chunks work at first");

            hooked.hooks.mode.store(mode, Ordering::SeqCst);
            vol.write(4096, block(2), true).await.expect("write");
            match vol.persist_buffer().await {
                Err(VolumeError::Failed(_)) => {}
                other => panic!("mode {mode}: persist after the flusher gave up: {other:?}"),
            }
            assert!(vol.failed().is_some());
            for i in 2..8u64 {
                assert!(
                    matches!(
                        vol.write(i * 4096, block(3), false).await,
                        Err(VolumeError::Failed(_))
                    ),
                    "mode {mode}: writes are refused"
                );
            }
            assert!(matches!(vol.flush().await, Err(VolumeError::Failed(_))));
            assert_eq!(vol.read(0, 4096).await.expect("read"), block(1));
            assert_eq!(vol.read(4096, 4096).await.expect("read"), block(2));

            hooked.hooks.mode.store(0, Ordering::SeqCst);
            drop(vol);
            engine.simulate_crash().await;
            let engine = common::open_engine(dir.path(), &backend).await;
            let vol = engine.volume(&id).await.expect("reopen");
            assert!(vol.failed().is_none());
            assert_eq!(vol.read(4096, 4096).await.expect("read"), block(2));
            vol.persist_buffer().await.expect("chunks work again");
            drop(vol);
            engine.close_all().await;
        });
    }
}

/// While on, holds every PUT of chunk object 2 forever (a slow upload cut short by the crash).
struct HoldChunkTwo(std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl common::Hooks for HoldChunkTwo {
    async fn before_put(&self, key: &str) {
        if key.ends_with("/chunks/0000000000000002") && self.0.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

/// After a crash, replay gathers records until a memtable is full, so one memtable can hold
/// several writes and more than a chunk: its first chunk commits extents whose sequence numbers
/// are above the checkpoint. A map checkpoint taken then, and a disaster recovery from it, must
/// still number new writes above every extent, or a new write loses to older data (FORMAT.md,
/// "Recovery").
#[test]
fn recovery_from_a_half_committed_split_numbers_new_writes_above_every_extent() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooked = common::HookedBackend::new(HoldChunkTwo(true.into()));
        let backend: vblock::backend::SharedBackend = hooked.clone();
        // Life 1: 15 blocks at block 8 (seq 1), then 4 at block 0 (seq 2), only in the WAL.
        let (engine, id) = wal_only_volume(dir.path(), &backend).await;
        let vol = engine.volume(&id).await.expect("open");
        vol.write(8 * 4096, Bytes::from(vec![0xa1; 15 * 4096]), false)
            .await
            .expect("write");
        vol.write(0, Bytes::from(vec![0xb2; 4 * 4096]), true)
            .await
            .expect("write");
        drop(vol);
        engine.simulate_crash().await;

        // Life 2, 64 KiB chunks: replay builds one 19-block memtable; its first chunk (blocks
        // 0..16, seqs 1 and 2) commits, the second one's PUT never ends. Checkpoint the map.
        let engine = common::open_engine(dir.path(), &backend).await;
        let vol = engine.volume(&id).await.expect("reopen");
        // Polled without blocking a runtime thread (the flusher runs on them).
        while vol.stats().chunks.load(Ordering::Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        engine.checkpoint_volume(&id).await.expect("checkpoint");
        drop(vol);
        engine.simulate_crash().await;
        hooked.hooks.0.store(false, Ordering::SeqCst);

        // The disk is lost: recover from the backend, write block 0 anew, make it a chunk.
        let fresh = tempfile::tempdir().expect("tempdir");
        let engine = common::open_engine(fresh.path(), &backend).await;
        assert_eq!(
            engine.recover_from_backend().await.expect("recover"),
            vec![id.clone()]
        );
        let vol = engine.volume(&id).await.expect("open recovered");
        assert!(vol.read(0, 4096).await.expect("read") == vec![0xb2; 4096]);
        vol.write(0, block(0xc3), false).await.expect("write");
        vol.persist_buffer().await.expect("persist");
        assert!(
            vol.read(0, 4096).await.expect("read") == block(0xc3),
            "the new write wins over the recovered extent"
        );
        drop(vol);
        engine.close_all().await;
    });
}

/// Disaster recovery counts each chunk it applies at its stored size, as the flusher did when
/// it stored it: the volume's stored bytes, and the garbage that GC pacing weighs in stored bytes
/// against a map checkpoint, are the same before and after the disk is lost (they were 0 per
/// recovered chunk, so its garbage waited for `--gc-max-delay`).
#[test]
fn a_volume_recovered_from_the_backend_counts_its_stored_bytes() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(1 << 20, "space")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        // 64 KiB chunks: a few objects, data that compresses to different sizes.
        for i in 0..12u64 {
            let data: Vec<u8> = (0..16 * 4096u64).map(|b| (b % (i + 2)) as u8).collect();
            vol.write(i * 16 * 4096, Bytes::from(data), false)
                .await
                .expect("write");
        }
        vol.persist_buffer().await.expect("into chunks");
        drop(vol);
        let before = engine.volume_space(&id).await.expect("space").stored_bytes;
        engine.close_all().await;
        let mut objects = 0;
        for key in backend
            .list(&vblock::backend::chunk_prefix(&id))
            .await
            .expect("list")
        {
            objects += backend.get(&key).await.expect("get").len() as u64;
        }
        assert!(objects > 0);
        assert_eq!(before, objects, "the flusher counts what it stores");

        let fresh = tempfile::tempdir().expect("tempdir");
        let engine = common::open_engine(fresh.path(), &backend).await;
        assert_eq!(
            engine.recover_from_backend().await.expect("recover"),
            vec![id.clone()]
        );
        let after = engine.volume_space(&id).await.expect("space").stored_bytes;
        assert_eq!(after, objects, "recovery counts what the chunks store");
        engine.close_all().await;
    });
}

/// A snapshot whose map was not yet stored when the process ended stays `pending` in the
/// metadata (its map frozen there); the next process stores it
/// ([`Engine::resume_pending_snapshots`]): it completes, its record copy and map are in the
/// backend, and it reads what the volume held when it was taken.
#[test]
fn a_snapshot_left_pending_by_a_crash_is_stored_at_the_next_start() {
    use vblock::records::SnapshotStateName;
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooks = common::HoldPuts::new(|key| key.starts_with("snap-") && key.ends_with("/map"));
        let hooked = common::HookedBackend::new(hooks.clone());
        let backend: vblock::backend::SharedBackend = hooked.clone();
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(1 << 20, "pending")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        vol.write(0, block(0x5a), true).await.expect("write");
        let (rec, stored) = engine
            .create_snapshot_tracked(&id, "cut short")
            .await
            .expect("snapshot");
        hooks.until_held().await;
        // The process ends with the map PUT in flight.
        stored.abort();
        assert!(stored.await.is_err(), "the store task ran to its end");
        vol.write(0, block(0x6b), true).await.expect("write after");
        drop(vol);
        engine.simulate_crash().await;
        hooks.open();

        let engine = common::open_engine(dir.path(), &backend).await;
        let pending = engine.get_snapshot(&rec.snapshot_id).await.expect("get");
        assert_eq!(pending.map(|r| r.state), Some(SnapshotStateName::Pending));
        let resumed = engine.resume_pending_snapshots().await.expect("resume");
        assert_eq!(resumed.len(), 1);
        for task in resumed {
            let done = task.await.expect("stored");
            assert_eq!(done.state, SnapshotStateName::Completed, "{done:?}");
        }
        let copy = engine
            .stored_snapshot(&rec.snapshot_id)
            .await
            .expect("get")
            .expect("record copy");
        assert_eq!(copy.state, SnapshotStateName::Completed);
        let data = engine
            .snapshot_volume(&rec.snapshot_id)
            .await
            .expect("open the snapshot")
            .read(0, 4096)
            .await
            .expect("read the snapshot");
        assert!(
            data == block(0x5a),
            "the snapshot holds what was written before it"
        );
        assert!(engine
            .resume_pending_snapshots()
            .await
            .expect("again")
            .is_empty());
        engine.close_all().await;
    });
}

/// Clone pins (cluster mode; FORMAT.md "Clone pins"): a snapshot delete that lists a pin keeps
/// the snapshot's copies, and once its delete marker is stored a new pin is refused and not
/// left behind, so a clone and a delete always see each other.
#[test]
fn a_clone_pin_and_a_snapshot_delete_see_each_other() {
    common::run(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = common::open_engine(dir.path(), &backend).await;
        let snap = vblock::SnapshotId::generate();
        let (early, late) = (VolumeId::generate(), VolumeId::generate());
        assert!(!engine.snapshot_delete_begun(&snap).await.expect("marker"));
        engine.pin_snapshot(&snap, &early).await.expect("pin");
        assert_eq!(
            engine.mark_snapshot_deleted(&snap).await.expect("mark"),
            [early.to_string()],
            "a delete did not see a clone's pin"
        );
        assert!(engine.snapshot_delete_begun(&snap).await.expect("marker"));
        let refused = engine.pin_snapshot(&snap, &late).await;
        assert!(
            matches!(refused, Err(VolumeError::SnapshotNotFound(_))),
            "a clone after the delete marker: {refused:?}"
        );
        engine.unpin_snapshot(&snap, &early).await.expect("unpin");
        assert!(
            engine
                .mark_snapshot_deleted(&snap)
                .await
                .expect("mark")
                .is_empty(),
            "a pin outlived its clone, or a refused clone left one"
        );
        engine.close_all().await;
    });
}

/// Chunk PUTs that take a few milliseconds, so that closing a volume drains for a while.
struct SlowChunkPuts;

#[async_trait::async_trait]
impl common::Hooks for SlowChunkPuts {
    async fn before_put(&self, key: &str) {
        if key.contains("/chunks/") {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
}

/// A close drains the write buffer while openers (a reader, a snapshot) race it: they wait for
/// the close and open a new instance after it, never a second one beside the draining one (which
/// would share its WAL directory and chunk object ids). 50 rounds: every flushed block reads
/// back, during the run and after a restart, and no open fails.
#[test]
fn a_closing_volume_is_never_open_twice() {
    common::run(Duration::from_secs(240), async {
        const ROUNDS: u64 = 50;
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let backend: vblock::backend::SharedBackend = common::HookedBackend::new(SlowChunkPuts);
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(8 * MIB, "race")
            .await
            .expect("create")
            .volume_id;
        // What each MiB of the volume holds: the round that wrote it last (0: never written).
        let mut model = [0u8; 8];
        for round in 1..=ROUNDS {
            let fill = round as u8;
            let at = (round % 8) * MIB;
            let vol = engine.volume(&id).await.expect("open");
            vol.write(at, Bytes::from(vec![fill; MIB as usize]), false)
                .await
                .expect("write");
            vol.flush().await.expect("flush");
            model[(round % 8) as usize] = fill;
            drop(vol);
            let (closed, read, snapshot) = tokio::join!(
                engine.close_volume(&id),
                async {
                    let vol = engine.volume(&id).await?;
                    vol.read(at, MIB).await
                },
                async {
                    if round % 5 == 0 {
                        engine.create_snapshot(&id, "race").await.map(|_| ())
                    } else {
                        Ok(())
                    }
                }
            );
            closed.expect("close");
            snapshot.expect("snapshot");
            let read = read.expect("a read racing the close");
            assert!(read.iter().all(|&b| b == fill), "round {round}: stale data");
        }
        engine.close_all().await;
        drop(engine);
        let engine = common::open_engine(dir.path(), &backend).await;
        let vol = engine.volume(&id).await.expect("reopen");
        for (mib, &fill) in model.iter().enumerate() {
            let data = vol.read(mib as u64 * MIB, MIB).await.expect("read");
            assert!(
                data.iter().all(|&b| b == fill),
                "MiB {mib} lost its last write"
            );
        }
        drop(vol);
        engine.close_all().await;
    });
}

/// Two engines (two metadata DBs) that share a WAL directory: the second open of a volume's
/// WAL is refused with `WalError::Locked` while the first engine has it open, and succeeds once
/// the first closes it.
#[test]
fn a_wal_directory_shared_by_two_engines_has_one_writer() {
    common::run(Duration::from_secs(60), async {
        let (a_dir, b_dir, wal) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let engine = |dir: std::path::PathBuf| {
            let wal = wal.path().to_owned();
            async move {
                let mut config = common::small_config(&dir);
                config.wal_dir = wal;
                vblock::Engine::open(config, common::memory_backend())
                    .await
                    .expect("engine")
            }
        };
        let a = engine(a_dir.path().to_owned()).await;
        let b = engine(b_dir.path().to_owned()).await;
        let rec = a.create_volume(1 << 20, "shared").await.expect("create");
        b.create_volume_from(rec.clone())
            .await
            .expect("same id on b");
        let id = rec.volume_id;
        let vol = a.volume(&id).await.expect("a opens");
        match b.volume(&id).await {
            Err(VolumeError::Wal(WalError::Locked { dir })) => {
                assert_eq!(dir, wal.path().join(id.as_str()));
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("two engines opened one WAL directory"),
        }
        drop(vol);
        a.close_volume(&id).await.expect("a closes");
        b.volume(&id).await.expect("b opens once a closed");
        a.close_all().await;
        b.close_all().await;
    });
}

/// A close whose caller goes away half way (a timeout) leaves no closing slot behind: the volume
/// opens again, with its flushed data, once the abandoned instance has stopped.
#[test]
fn a_close_abandoned_half_way_does_not_wedge_the_volume() {
    common::run(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend: vblock::backend::SharedBackend = common::HookedBackend::new(SlowChunkPuts);
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(4 << 20, "abandoned")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&id).await.expect("open");
        vol.write(0, Bytes::from(vec![7u8; 2 << 20]), false)
            .await
            .expect("write");
        vol.flush().await.expect("flush");
        drop(vol);
        // 32 chunks at 3 ms each: the close is still draining when the timeout drops it.
        let cut = tokio::time::timeout(Duration::from_millis(5), engine.close_volume(&id)).await;
        assert!(
            cut.is_err(),
            "the close finished before it could be abandoned"
        );
        // Opens fail with `Locked` (never hang) until the abandoned instance's WAL writer exits.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let vol = loop {
            match tokio::time::timeout(Duration::from_secs(10), engine.volume(&id)).await {
                Ok(Ok(v)) => break v,
                Ok(Err(VolumeError::Wal(WalError::Locked { .. }))) => {}
                Ok(Err(e)) => panic!("open failed: {e}"),
                Err(_) => panic!("an open hung behind the abandoned close"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the volume stayed locked"
            );
            tokio::task::yield_now().await;
        };
        let data = vol.read(0, 2 << 20).await.expect("read");
        assert!(data.iter().all(|&b| b == 7), "flushed data lost");
        drop(vol);
        engine.close_all().await;
    });
}

/// A volume record written mounted before mounts had a secret (`"mounted": true`, no `mount`)
/// comes out of the next open still mounted, with a new secret, once: deletes and resizes stay
/// refused, and the export name is stable from then on.
#[test]
fn a_volume_mounted_before_export_secrets_stays_mounted() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend: vblock::backend::SharedBackend =
            std::sync::Arc::new(vblock::backend::memory::MemoryBackend::new());
        let engine = common::open_engine(dir.path(), &backend).await;
        let rec = engine.create_volume(1 << 20, "old").await.expect("create");
        let id = rec.volume_id.clone();
        drop(engine);
        // Rewrite the record as an older build stored it.
        {
            let db = rocksdb::DB::open_default(dir.path().join("meta")).expect("open meta");
            let key = [b"v".as_slice(), id.as_str().as_bytes()].concat();
            let mut json: serde_json::Value =
                serde_json::from_slice(&db.get(&key).expect("get").expect("record")).expect("json");
            assert!(json.get("mount").is_none() && json.get("mounted").is_none());
            json["mounted"] = serde_json::Value::Bool(true);
            db.put(&key, serde_json::to_vec(&json).expect("json"))
                .expect("put");
        }
        let engine = common::open_engine(dir.path(), &backend).await;
        let mount = engine
            .get_record(&id)
            .await
            .expect("record")
            .expect("volume")
            .mount
            .expect("still mounted");
        assert_eq!(mount.secret.len(), vblock::records::MOUNT_SECRET_HEX);
        drop(engine);
        let engine = common::open_engine(dir.path(), &backend).await;
        let again = engine
            .get_record(&id)
            .await
            .expect("record")
            .expect("volume");
        assert_eq!(again.mount, Some(mount), "the upgrade ran twice");
        assert!(!again.legacy_mounted);
    });
}

/// `Engine::volume_if` opens a new instance only if `admit` accepts the record read under the
/// volume's slot (an NBD export's "still mounted" check, ordered with closes): refused, it
/// leaves nothing open; an instance already open is returned without asking.
#[test]
fn volume_if_opens_only_what_it_admits() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend: vblock::backend::SharedBackend =
            std::sync::Arc::new(vblock::backend::memory::MemoryBackend::new());
        let engine = common::open_engine(dir.path(), &backend).await;
        let id = engine
            .create_volume(1 << 20, "gate")
            .await
            .expect("create")
            .volume_id;
        let refused = engine.volume_if(&id, |rec| rec.mount.is_some()).await;
        assert!(matches!(refused, Err(VolumeError::IncorrectState(_))));
        assert!(
            engine.open_volumes().await.is_empty(),
            "a refused open left an instance"
        );
        let vol = engine.volume(&id).await.expect("open");
        let again = engine
            .volume_if(&id, |_| false)
            .await
            .expect("the open instance is returned");
        assert_eq!(again.id(), vol.id());
        assert_eq!(engine.open_volumes().await.len(), 1);
        engine.close_all().await;
    });
}

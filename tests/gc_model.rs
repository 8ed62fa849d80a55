//! Property test of snapshots, clones, compaction and garbage collection against a model.
//!
//! Random writes, trims, snapshots, snapshot deletions, clones, clone deletions, GC passes,
//! crashes (kill -9 simulation) and disaster recoveries (a new data directory rebuilt from the
//! backend alone) run on one volume while compaction runs continuously in the background (1 ms
//! check interval, no rate limit to speak of), so crashes land before, during and after
//! compaction steps. After every step the volume, the clone and every snapshot must read exactly
//! as the model says. At the end everything is deleted and the backend must be empty.
//! Writes are FUA and trims are flushed, so the state after a crash is exactly the model's.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use vblock::backend::SharedBackend;
use vblock::gc::GcReport;
use vblock::records::SnapshotStateName;
use vblock::volume::CompactionConfig;
use vblock::{Engine, SnapshotId, VolumeId};

const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCKS * 4096;

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, count: u64, clone: bool },
    Trim { block: u64, count: u64, clone: bool },
    Persist,
    Snapshot,
    DeleteSnapshot,
    Clone,
    DeleteClone,
    Gc,
    Crash,
    Recover,
}

fn extent() -> impl Strategy<Value = (u64, u64)> {
    (0..BLOCKS, 1..12u64).prop_map(|(b, n)| (b, n.min(BLOCKS - b)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (extent(), any::<bool>()).prop_map(|((block, count), clone)| Op::Write { block, count, clone }),
        2 => (extent(), any::<bool>()).prop_map(|((block, count), clone)| Op::Trim { block, count, clone }),
        2 => Just(Op::Persist),
        2 => Just(Op::Snapshot),
        1 => Just(Op::DeleteSnapshot),
        1 => Just(Op::Clone),
        1 => Just(Op::DeleteClone),
        2 => Just(Op::Gc),
        1 => Just(Op::Crash),
        1 => Just(Op::Recover),
    ]
}

fn engine_config(dir: &Path) -> vblock::EngineConfig {
    let mut c = common::small_config(dir);
    c.volume.compaction = CompactionConfig {
        threshold_percent: 50,
        rate_bytes_per_sec: 1 << 30,
        check_interval: Duration::from_millis(1),
    };
    c
}

async fn open(dir: &Path, backend: &SharedBackend) -> Engine {
    Engine::open(engine_config(dir), backend.clone())
        .await
        .expect("engine opens")
}

fn pattern(op_index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (op_index * 131 + i * 7 + 1) as u8 | 1)
        .collect()
}

async fn wait_completed(engine: &Engine, id: &SnapshotId) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rec = engine.get_snapshot(id).await.expect("get").expect("exists");
        match rec.state {
            SnapshotStateName::Completed => return,
            SnapshotStateName::Error => panic!("snapshot {id} failed"),
            SnapshotStateName::Pending => {}
        }
        assert!(Instant::now() < deadline, "snapshot {id} stayed pending");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Clone {
    id: VolumeId,
    data: Vec<u8>,
}

struct State {
    vol: VolumeId,
    data: Vec<u8>,
    snaps: Vec<(SnapshotId, Vec<u8>)>,
    clone: Option<Clone>,
}

impl State {
    /// The clone when asked for and present, else the volume: its id and model.
    fn target(&mut self, clone: bool) -> (VolumeId, &mut Vec<u8>) {
        match (&mut self.clone, clone) {
            (Some(c), true) => (c.id.clone(), &mut c.data),
            _ => (self.vol.clone(), &mut self.data),
        }
    }
}

async fn check(engine: &Engine, s: &State, when: &str) {
    let v = engine.volume(&s.vol).await.expect("volume");
    let got = v.read(0, SIZE).await.expect("read volume");
    assert!(
        got[..] == s.data[..],
        "{when}: volume differs from the model"
    );
    if let Some(c) = &s.clone {
        let v = engine.volume(&c.id).await.expect("clone");
        let got = v.read(0, SIZE).await.expect("read clone");
        assert!(
            got[..] == c.data[..],
            "{when}: clone differs from the model"
        );
    }
    for (id, want) in &s.snaps {
        let snap = engine.snapshot_volume(id).await.expect("snapshot opens");
        let got = snap.read(0, SIZE).await.expect("read snapshot");
        assert!(
            got[..] == want[..],
            "{when}: snapshot {id} differs from the model"
        );
    }
}

async fn persist_all(engine: &Engine, s: &State) {
    engine
        .volume(&s.vol)
        .await
        .expect("volume")
        .persist_buffer()
        .await
        .expect("persist");
    if let Some(c) = &s.clone {
        let v = engine.volume(&c.id).await.expect("clone");
        v.persist_buffer().await.expect("persist clone");
    }
}

fn run_case(ops: Vec<Op>) {
    common::run(Duration::from_secs(90), async move {
        let mut dirs = vec![tempfile::tempdir().expect("tempdir")];
        let backend = common::memory_backend();
        let mut engine = open(dirs[0].path(), &backend).await;
        let rec = engine
            .create_volume(SIZE, "gc-model")
            .await
            .expect("create");
        let mut s = State {
            vol: rec.volume_id,
            data: vec![0u8; SIZE as usize],
            snaps: Vec::new(),
            clone: None,
        };
        for (i, op) in ops.into_iter().enumerate() {
            let what = format!("op {i} {op:?}");
            match op {
                Op::Write {
                    block,
                    count,
                    clone,
                } => {
                    let (id, model) = s.target(clone);
                    let data = pattern(i, (count * 4096) as usize);
                    let v = engine.volume(&id).await.expect("volume");
                    v.write(block * 4096, Bytes::from(data.clone()), true)
                        .await
                        .expect("write");
                    model[(block * 4096) as usize..((block + count) * 4096) as usize]
                        .copy_from_slice(&data);
                }
                Op::Trim {
                    block,
                    count,
                    clone,
                } => {
                    let (id, model) = s.target(clone);
                    let v = engine.volume(&id).await.expect("volume");
                    v.trim(block * 4096, count * 4096).await.expect("trim");
                    v.flush().await.expect("flush");
                    model[(block * 4096) as usize..((block + count) * 4096) as usize].fill(0);
                }
                Op::Persist => persist_all(&engine, &s).await,
                Op::Snapshot => {
                    let rec = engine.create_snapshot(&s.vol, "").await.expect("snapshot");
                    wait_completed(&engine, &rec.snapshot_id).await;
                    s.snaps.push((rec.snapshot_id, s.data.clone()));
                }
                Op::DeleteSnapshot => {
                    if !s.snaps.is_empty() {
                        let (id, _) = s.snaps.remove(0);
                        engine.delete_snapshot(&id).await.expect("delete snapshot");
                    }
                }
                Op::Clone => {
                    if let (None, Some((snap, data))) = (&s.clone, s.snaps.last()) {
                        let rec = Engine::new_record(SIZE, "clone");
                        let id = rec.volume_id.clone();
                        engine
                            .create_volume_from_snapshot(rec, snap)
                            .await
                            .expect("clone");
                        s.clone = Some(Clone {
                            id,
                            data: data.clone(),
                        });
                    }
                }
                Op::DeleteClone => {
                    if let Some(c) = s.clone.take() {
                        engine.delete_volume(&c.id).await.expect("delete clone");
                    }
                }
                Op::Gc => {
                    engine.collect_garbage().await.expect("gc");
                }
                Op::Crash => {
                    engine.simulate_crash().await;
                    engine = open(dirs.last().expect("dir").path(), &backend).await;
                }
                Op::Recover => {
                    // Everything reaches chunks, then the local disk is lost.
                    persist_all(&engine, &s).await;
                    engine.close_all().await;
                    drop(engine);
                    dirs.push(tempfile::tempdir().expect("tempdir"));
                    engine = open(dirs.last().expect("dir").path(), &backend).await;
                    engine.recover_from_backend().await.expect("recover");
                }
            }
            check(&engine, &s, &what).await;
        }
        // Deleting everything leaves nothing in the backend.
        for (id, _) in std::mem::take(&mut s.snaps) {
            engine.delete_snapshot(&id).await.expect("delete snapshot");
        }
        if let Some(c) = s.clone.take() {
            engine.delete_volume(&c.id).await.expect("delete clone");
        }
        engine.delete_volume(&s.vol).await.expect("delete volume");
        engine.collect_garbage().await.expect("gc");
        let left = backend.list("").await.expect("list");
        assert!(
            left.is_empty(),
            "objects left after deleting everything: {left:?}"
        );
        engine.close_all().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        max_shrink_iters: 100,
        ..ProptestConfig::default()
    })]

    #[test]
    fn snapshots_clones_and_gc_match_model(ops in proptest::collection::vec(op(), 1..80)) {
        run_case(ops);
    }
}

/// Overwriting a volume 4 times leaves 4x its data in chunks; compaction and GC bring what is
/// stored back to at most 1.5x the live data.
#[test]
fn overwrites_are_reclaimed() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = open(dir.path(), &backend).await;
        let rec = engine
            .create_volume(4 << 20, "reclaim")
            .await
            .expect("create");
        let v = engine.volume(&rec.volume_id).await.expect("open");
        for round in 0..4u8 {
            // Random-ish order of 16 KiB writes, so chunks mix blocks of the whole volume.
            for k in 0..256u64 {
                let at = (k * 97 % 256) * 16384;
                // Incompressible (seeded random), so stored bytes are the data's size.
                let mut data = vec![0u8; 16384];
                StdRng::seed_from_u64(u64::from(round) << 32 | k).fill_bytes(&mut data);
                v.write(at, Bytes::from(data), false).await.expect("write");
            }
            v.persist_buffer().await.expect("persist");
        }
        let want = v.read(0, 4 << 20).await.expect("read");
        let stored = |b: SharedBackend| async move {
            let mut total = 0u64;
            for k in b.list("").await.expect("list") {
                if k.contains("/chunks/") {
                    total += b.get(&k).await.expect("get").len() as u64;
                }
            }
            total
        };
        let before = stored(backend.clone()).await;
        assert!(before >= 3 * (4 << 20), "4 overwrites store {before} bytes");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut after;
        loop {
            engine.collect_garbage().await.expect("gc");
            after = stored(backend.clone()).await;
            if after * 2 <= 3 * (4 << 20) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            after * 2 <= 3 * (4 << 20),
            "stored {after} bytes after GC, more than 1.5x the 4 MiB live"
        );
        let space = engine.volume_space(&rec.volume_id).await.expect("space");
        assert_eq!(space.allocated_bytes, 4 << 20);
        assert!(space.stored_bytes * 2 <= 3 * (4 << 20), "{space:?}");
        assert_eq!(
            v.read(0, 4 << 20).await.expect("read"),
            want,
            "data survived GC"
        );
        engine.close_all().await;
    });
}

/// Holds chunk PUTs mid-flight while `hold` is set: the one fault the real backends cannot
/// produce on demand (a process killed while a compaction upload is in flight).
struct HoldChunkPuts {
    hold: std::sync::atomic::AtomicBool,
    held: std::sync::atomic::AtomicU64,
    release: tokio::sync::Semaphore,
}

#[async_trait::async_trait]
impl common::Hooks for HoldChunkPuts {
    async fn before_put(&self, key: &str) {
        if key.contains("/chunks/") && self.hold.load(std::sync::atomic::Ordering::SeqCst) {
            self.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _go = self.release.acquire().await;
        }
    }
}

/// kill -9 while a compaction chunk is uploaded but not committed: nothing is lost, the
/// half-done step leaves only an unreferenced object that later chunks overwrite, and
/// compaction and GC then finish the job.
#[test]
fn crash_in_the_middle_of_compaction() {
    use std::sync::atomic::Ordering;
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let holding = common::HookedBackend::new(HoldChunkPuts {
            hold: false.into(),
            held: 0.into(),
            release: tokio::sync::Semaphore::new(0),
        });
        let backend: SharedBackend = holding.clone();
        let mut cfg = engine_config(dir.path());
        // No compaction until the sparse chunks exist.
        cfg.volume.compaction.threshold_percent = 0;
        let engine = Engine::open(cfg, backend.clone()).await.expect("open");
        let rec = engine.create_volume(SIZE, "crash").await.expect("create");
        let v = engine.volume(&rec.volume_id).await.expect("volume");
        let mut model = vec![0u8; SIZE as usize];
        // Four chunks of 16 blocks, then 3 blocks of every 4 overwritten: each chunk 25% live.
        for (i, (block, count)) in [(0, 16), (16, 16), (32, 16), (48, 16)]
            .into_iter()
            .chain((0..BLOCKS).filter(|b| b % 4 != 0).map(|b| (b, 1)))
            .enumerate()
        {
            let data = pattern(i, (count * 4096) as usize);
            v.write(block * 4096, Bytes::from(data.clone()), true)
                .await
                .expect("write");
            model[(block * 4096) as usize..((block + count) * 4096) as usize]
                .copy_from_slice(&data);
            if i == 3 {
                v.persist_buffer().await.expect("persist");
            }
        }
        v.persist_buffer().await.expect("persist");
        drop(v);
        engine.close_all().await;
        drop(engine);

        // Reopen with compaction on and chunk PUTs held: the first compaction upload hangs.
        holding.hooks.hold.store(true, Ordering::SeqCst);
        let engine = open(dir.path(), &backend).await;
        let v = engine.volume(&rec.volume_id).await.expect("volume");
        let deadline = Instant::now() + Duration::from_secs(20);
        while holding.hooks.held.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "compaction never started an upload"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(v.stats().compacted_chunks.load(Ordering::SeqCst), 0);
        // Crash: the flusher is told to stop, then the held PUT completes; the commit never runs.
        let crash = tokio::spawn(engine.simulate_crash());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(
            v.with_frozen_map(|_| Ok(())).await,
            Err(vblock::VolumeError::Closed)
        ) {
            assert!(
                Instant::now() < deadline,
                "the crash never closed the volume"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(v);
        holding.hooks.hold.store(false, Ordering::SeqCst);
        holding.hooks.release.add_permits(1 << 20);
        crash.await.expect("crash");

        let engine = open(dir.path(), &backend).await;
        // The compaction chunk reached the backend but was never committed: no stats for it.
        let stored = backend.list("").await.expect("list");
        let chunks = stored.iter().filter(|k| k.contains("/chunks/")).count();
        let known = engine
            .meta()
            .chunk_stats(&rec.volume_id)
            .expect("stats")
            .len();
        assert_eq!(
            chunks,
            known + 1,
            "one uploaded, uncommitted chunk: {stored:?}"
        );
        let v = engine.volume(&rec.volume_id).await.expect("volume");
        assert!(
            v.read(0, SIZE).await.expect("read")[..] == model[..],
            "data after the crash"
        );
        // Compaction and GC now finish: all four half-dead chunks are rewritten and deleted.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            engine.collect_garbage().await.expect("gc");
            let space = engine.volume_space(&rec.volume_id).await.expect("space");
            if space.dead_bytes == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "compaction never finished: {space:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One step found every live block of the four chunks it picked (16 blocks fit one
        // chunk): their index ranges name all of them.
        assert_eq!(v.stats().compacted_chunks.load(Ordering::SeqCst), 1);
        assert_eq!(v.stats().compacted_bytes.load(Ordering::SeqCst), 16 * 4096);
        assert!(
            v.read(0, SIZE).await.expect("read")[..] == model[..],
            "data after compaction"
        );
        // Disaster recovery from what GC left agrees too.
        drop(v);
        assert_recovers(engine, &backend, &rec.volume_id, &model).await;
    });
}

/// Closes `engine`, recovers a fresh data directory from `backend` alone, and checks that
/// volume `vol` reads as `model` there.
async fn assert_recovers(engine: Engine, backend: &SharedBackend, vol: &VolumeId, model: &[u8]) {
    engine.close_all().await;
    drop(engine);
    let fresh = tempfile::tempdir().expect("tempdir");
    let engine = open(fresh.path(), backend).await;
    engine.recover_from_backend().await.expect("recover");
    let v = engine.volume(vol).await.expect("volume");
    assert!(
        v.read(0, model.len() as u64).await.expect("read")[..] == model[..],
        "data after recovery"
    );
    engine.close_all().await;
}

/// The periodic pass leaves a live volume's garbage for later while it is smaller than the
/// volume's last map checkpoint (the whole map, written before any of its objects go), until
/// it has waited `max_delay`; garbage at least that large, and a full pass, go at once.
#[test]
fn paced_collection_waits_for_garbage_worth_its_checkpoint() {
    common::run(Duration::from_secs(90), async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let mut config = common::small_config(dir.path());
        config.volume.compaction.threshold_percent = 0;
        let engine = Engine::open(config, backend.clone())
            .await
            .expect("engine opens");
        let rec = engine
            .create_volume(16 << 20, "gc-pacing")
            .await
            .expect("create");
        let v = engine.volume(&rec.volume_id).await.expect("volume");
        let mut model = vec![0u8; 16 << 20];
        let mut rng = StdRng::seed_from_u64(7);
        let write = |at: u64, data: Vec<u8>, model: &mut Vec<u8>| {
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
            let v = v.clone();
            async move { v.write(at, Bytes::from(data), false).await.expect("write") }
        };
        let chunks = || async {
            let keys = backend
                .list(&format!("{}/chunks/", rec.volume_id))
                .await
                .expect("list");
            keys.len()
        };
        let paced = |max_delay: Duration| {
            let engine = &engine;
            async move { engine.collect_garbage_paced(max_delay).await.expect("gc") }
        };
        let counts = |r: &GcReport| (r.objects_deleted, r.checkpoints, r.objects_waiting);
        const HOUR: Duration = Duration::from_secs(3600);
        // 64 KiB of one byte value: one chunk of a few hundred stored bytes.
        let region = |fill: u8| vec![fill; 64 << 10];
        write(0, region(1), &mut model).await;
        v.persist_buffer().await.expect("persist");
        // 2,000 scattered incompressible blocks: a map of ~2,000 extents (a ~144 KB checkpoint)
        // in ~8 MB of chunks.
        let scattered: Vec<u64> = (0..2000u64).map(|i| (32 + 2 * i) * 4096).collect();
        let random_block = |rng: &mut StdRng| {
            let mut b = vec![0u8; 4096];
            rng.fill_bytes(&mut b);
            b
        };
        for &at in &scattered {
            write(at, random_block(&mut rng), &mut model).await;
        }
        v.persist_buffer().await.expect("persist");
        // The first pass knows no checkpoint size yet: the small chunk goes.
        write(0, region(2), &mut model).await;
        v.persist_buffer().await.expect("persist");
        let before = chunks().await;
        let r = paced(HOUR).await;
        assert_eq!((r.objects_deleted, r.checkpoints), (1, 1), "{r:?}");
        assert!(r.checkpoint_bytes > 100_000, "{r:?}");
        assert_eq!(chunks().await, before - 1);
        // Now a few hundred bytes of garbage against a ~144 KB checkpoint: it waits.
        write(0, region(3), &mut model).await;
        v.persist_buffer().await.expect("persist");
        for _ in 0..2 {
            let r = paced(HOUR).await;
            assert_eq!(counts(&r), (0, 0, 1), "{r:?}");
            assert_eq!(
                r.mark_duration, None,
                "a pass with nothing due scans no map"
            );
        }
        assert_eq!(chunks().await, before);
        // Waited long enough (any wait is, with a zero delay): it goes.
        let r = paced(Duration::ZERO).await;
        assert_eq!(counts(&r), (1, 1, 0), "{r:?}");
        // Small garbage waits again; a full pass (as after a delete) takes it at once.
        write(0, region(4), &mut model).await;
        v.persist_buffer().await.expect("persist");
        let r = paced(HOUR).await;
        assert_eq!((r.objects_deleted, r.objects_waiting), (0, 1), "{r:?}");
        let r = engine.collect_garbage().await.expect("gc");
        assert_eq!((r.objects_deleted, r.checkpoints), (1, 1), "{r:?}");
        // A snapshot keeps the scattered chunks after the volume overwrote them: ~8 MB of
        // candidates, so the pass marks, but only a small chunk the snapshot does not know is
        // free, and it waits.
        let scattered_chunks = chunks().await - 1;
        let snap = engine
            .create_snapshot(&rec.volume_id, "")
            .await
            .expect("snapshot");
        wait_completed(&engine, &snap.snapshot_id).await;
        for &at in &scattered {
            write(at, random_block(&mut rng), &mut model).await;
        }
        write(0, region(5), &mut model).await;
        v.persist_buffer().await.expect("persist");
        write(0, region(6), &mut model).await;
        v.persist_buffer().await.expect("persist");
        let r = paced(HOUR).await;
        assert_eq!(counts(&r), (0, 0, 1), "{r:?}");
        assert!(r.mark_duration.is_some(), "{r:?}");
        // Deleting the snapshot collects at once: the chunks only it used (the scattered ones
        // and the small one it saw) and the waiting one.
        let before = chunks().await;
        engine
            .delete_snapshot(&snap.snapshot_id)
            .await
            .expect("delete snapshot");
        assert_eq!(chunks().await, before - scattered_chunks - 2);
        // Overwriting the scattered blocks again kills ~8 MB of chunks, more than the
        // checkpoint: they go at once.
        for &at in &scattered {
            write(at, random_block(&mut rng), &mut model).await;
        }
        v.persist_buffer().await.expect("persist");
        let r = paced(HOUR).await;
        assert_eq!(r.objects_deleted as usize, scattered_chunks, "{r:?}");
        assert_eq!((r.checkpoints, r.objects_waiting), (1, 0), "{r:?}");
        assert!(
            v.read(0, 16 << 20).await.expect("read")[..] == model[..],
            "data after the passes"
        );
        // Recovery from the last checkpoint and what GC left agrees too.
        drop(v);
        assert_recovers(engine, &backend, &rec.volume_id, &model).await;
    });
}

/// GC's mark step lists the snapshots, then walks every map. A snapshot taken in between copies
/// references out of a map not yet walked into a snapshot not listed: here a snapshot S1 of a
/// clone C whose only reference to the source's dead chunk X then goes away (C overwrites those
/// blocks). The interleaving is forced at the point between the listing and the walks; snapshot
/// creation must wait for the pass (it holds the GC lock), so X survives and S1 reads its data.
#[test]
fn a_snapshot_taken_during_the_gc_mark_keeps_what_it_copied() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let engine = std::sync::Arc::new(open(dir.path(), &backend).await);
        let old = Bytes::from(pattern(1, 16 * 4096));
        // V writes X (blocks 0..16); clone C of a snapshot of V shares X; the snapshot goes; V
        // overwrites the blocks: X is a GC candidate that only C references.
        let v = engine
            .create_volume(SIZE, "source")
            .await
            .expect("create")
            .volume_id;
        let vol = engine.volume(&v).await.expect("open");
        vol.write(0, old.clone(), false).await.expect("write");
        vol.persist_buffer().await.expect("persist");
        let s0 = engine.create_snapshot(&v, "").await.expect("snapshot");
        wait_completed(&engine, &s0.snapshot_id).await;
        let rec = Engine::new_record(SIZE, "clone");
        let c = rec.volume_id.clone();
        engine
            .create_volume_from_snapshot(rec, &s0.snapshot_id)
            .await
            .expect("clone");
        engine
            .delete_snapshot(&s0.snapshot_id)
            .await
            .expect("delete snapshot");
        vol.write(0, Bytes::from(pattern(2, 16 * 4096)), false)
            .await
            .expect("write");
        vol.persist_buffer().await.expect("persist");

        // Between GC's listing and its walks: snapshot C (S1), then overwrite C's blocks and
        // commit, so C's map no longer references X. Given 2 s, which is plenty when nothing
        // holds the snapshot back; with the fix it waits for the pass instead.
        let handle = tokio::runtime::Handle::current();
        let s1 = std::sync::Arc::new(std::sync::Mutex::new(None));
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let interleave = {
            let (engine, c, s1, ran) = (engine.clone(), c.clone(), s1.clone(), ran.clone());
            move || {
                if ran.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let (engine, c, s1) = (engine.clone(), c.clone(), s1.clone());
                let task = handle.spawn(async move {
                    let snap = engine.create_snapshot(&c, "").await.expect("snapshot of C");
                    *s1.lock().expect("lock") = Some(snap.snapshot_id);
                    let cv = engine.volume(&c).await.expect("open C");
                    cv.write(0, Bytes::from(pattern(3, 16 * 4096)), false)
                        .await
                        .expect("write C");
                    cv.persist_buffer().await.expect("persist C");
                });
                let _ = handle
                    .block_on(async { tokio::time::timeout(Duration::from_secs(2), task).await });
            }
        };
        vblock::failpoints::set_callback("gc-mark-listed", interleave)
            .expect("interleaving points are built in (failpoints feature)");
        engine.collect_garbage().await.expect("gc");
        vblock::failpoints::clear("gc-mark-listed");
        assert!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            "the GC pass reached its mark step"
        );
        let s1 = loop {
            if let Some(id) = s1.lock().expect("lock").clone() {
                break id;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        wait_completed(&engine, &s1).await;
        engine.collect_garbage().await.expect("gc");
        let snap = engine.snapshot_volume(&s1).await.expect("open S1");
        let got = snap.read(0, 16 * 4096).await.expect("S1 reads its blocks");
        assert!(got == old, "S1 holds C's data from before the overwrite");
    });
}

//! WAL shipping (`VolumeConfig::ship_wal`, `vblock serve --ship-wal`): a flush is acknowledged
//! only once its records are in the backend, so every flushed write survives the loss of every
//! local disk; recovery from the backend yields a prefix of the writes that holds every flushed
//! one. A taken counter fences the volume; covered objects are deleted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vblock::backend::{wal_object_key, wal_object_prefix, BackendError, SharedBackend};
use vblock::ids::VolumeId;
use vblock::{Engine, VolumeError};

const BLOCKS: u64 = 48;

fn config(dir: &std::path::Path) -> vblock::EngineConfig {
    let mut c = common::small_config(dir);
    c.volume.ship_wal = true;
    c
}

async fn open(dir: &std::path::Path, backend: &SharedBackend) -> Engine {
    Engine::open(config(dir), backend.clone())
        .await
        .expect("engine opens")
}

/// A new 1 MiB volume on `engine`.
/// [`config`] without idle flushes: chunks are made only when a test asks.
fn quiet_config(dir: &std::path::Path) -> vblock::EngineConfig {
    let mut c = config(dir);
    c.volume.idle_flush = Duration::from_secs(3600);
    c
}

async fn create(engine: &Engine) -> VolumeId {
    engine
        .create_volume(1 << 20, "ship")
        .await
        .expect("create")
        .volume_id
}

/// Every local disk lost: a fresh engine on `backend` recovers from it alone; returns it (and
/// its directory) with volume `id` open.
async fn recovered(
    backend: &SharedBackend,
    id: &VolumeId,
) -> (tempfile::TempDir, Engine, vblock::Volume) {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = open(dir.path(), backend).await;
    e.recover_from_backend().await.expect("recover");
    let v = e.volume(id).await.expect("open the recovered volume");
    (dir, e, v)
}

/// Block `b`'s content at generation `g` (0: never written, zeros).
fn content(b: u64, g: u64) -> Vec<u8> {
    if g == 0 {
        return vec![0; 4096];
    }
    let mut v = vec![0u8; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&g.to_le_bytes());
    v[16..].fill((g % 251) as u8);
    v
}

/// The generation a block's content holds, if it is one [`content`] makes for block `b`.
fn generation(b: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|x| *x == 0) {
        return Some(0);
    }
    let g = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (data == content(b, g).as_slice()).then_some(g)
}

/// Reads every block's generation.
async fn read_all(vol: &vblock::Volume) -> Vec<u64> {
    let data = vol.read(0, BLOCKS * 4096).await.expect("read");
    (0..BLOCKS)
        .map(|b| {
            let d = &data[(b * 4096) as usize..((b + 1) * 4096) as usize];
            generation(b, d).unwrap_or_else(|| panic!("block {b} holds data never written to it"))
        })
        .collect()
}

/// Asserts that `got` is the volume after some write `k` of `writes` (block, generation) with
/// `k >= flushed`: a prefix of the writes that holds every flushed one.
fn assert_prefix(got: &[u64], writes: &[(u64, u64)], flushed: usize, what: &str) {
    let mut state = vec![0u64; BLOCKS as usize];
    for (b, g) in &writes[..flushed] {
        state[*b as usize] = *g;
    }
    if state == got {
        return;
    }
    for (k, (b, g)) in writes.iter().enumerate().skip(flushed) {
        state[*b as usize] = *g;
        if state == got {
            eprintln!("{what}: prefix of {} writes ({flushed} flushed)", k + 1);
            return;
        }
    }
    panic!("{what}: not a prefix of the writes holding the {flushed} flushed ones: {got:?}");
}

/// Random writes, flushes and crashes with restarts on the same disk; chunks commit meanwhile
/// (64 KiB chunks, 20 ms idle flush). Then every local disk is lost: a daemon with an empty
/// data directory recovers the volume from the backend alone, and it holds a prefix of the
/// writes with every flushed one. 12 seeds.
#[test]
fn flushed_writes_survive_the_loss_of_every_local_disk() {
    common::run(Duration::from_secs(240), async {
        for seed in 0..12u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let backend = common::memory_backend();
            let dir = tempfile::tempdir().expect("tempdir");
            let engine = open(dir.path(), &backend).await;
            let id = create(&engine).await;
            let mut engine = Some(engine);
            let mut writes: Vec<(u64, u64)> = Vec::new();
            let mut flushed = 0;
            for step in 0..300u64 {
                let e = engine.as_ref().expect("engine");
                let vol = e.volume(&id).await.expect("open");
                let b = rng.gen_range(0..BLOCKS);
                let g = step + 1;
                let fua = rng.gen_bool(0.05);
                vol.write(b * 4096, Bytes::from(content(b, g)), fua)
                    .await
                    .expect("write");
                writes.push((b, g));
                if fua {
                    flushed = writes.len();
                }
                match rng.gen_range(0..100) {
                    0..=9 => {
                        vol.flush().await.expect("flush");
                        flushed = writes.len();
                    }
                    10..=11 => {
                        // kill -9: everything written survives on this disk.
                        drop(vol);
                        engine.take().expect("engine").simulate_crash().await;
                        let e = open(dir.path(), &backend).await;
                        let vol = e.volume(&id).await.expect("reopen");
                        assert_prefix(&read_all(&vol).await, &writes, writes.len(), "restart");
                        engine = Some(e);
                    }
                    12..=14 => tokio::time::sleep(Duration::from_millis(25)).await,
                    _ => {}
                }
            }
            engine.take().expect("engine").simulate_crash().await;
            drop(dir);

            let fresh = tempfile::tempdir().expect("tempdir");
            let e = open(fresh.path(), &backend).await;
            assert_eq!(
                e.recover_from_backend().await.expect("recover"),
                vec![id.clone()]
            );
            let vol = e.volume(&id).await.expect("open recovered");
            let got = read_all(&vol).await;
            assert_prefix(&got, &writes, flushed, &format!("seed {seed}: disks lost"));
            // The recovered volume ships on: a flushed write survives a second loss.
            vol.write(0, Bytes::from(content(0, 1000)), true)
                .await
                .expect("write");
            drop(vol);
            e.simulate_crash().await;
            drop(fresh);
            let again = tempfile::tempdir().expect("tempdir");
            let e = open(again.path(), &backend).await;
            e.recover_from_backend().await.expect("recover again");
            let vol = e.volume(&id).await.expect("open");
            let mut expected = got.clone();
            expected[0] = 1000;
            assert_eq!(read_all(&vol).await, expected, "seed {seed}: second loss");
            drop(vol);
            e.close_all().await;
        }
    });
}

/// Fails every PUT of a shipped WAL object while `down` is set.
#[derive(Default)]
struct WalPutsDown {
    down: AtomicBool,
    wal_puts: AtomicU64,
}

#[async_trait::async_trait]
impl common::Hooks for Arc<WalPutsDown> {
    fn refuse_put(&self, key: &str) -> Option<BackendError> {
        if !key.contains("/wal/") {
            return None;
        }
        self.wal_puts.fetch_add(1, Ordering::SeqCst);
        self.down.load(Ordering::SeqCst).then(|| BackendError::Io {
            key: key.to_owned(),
            message: "injected: access denied".into(),
            transient: false,
        })
    }
}

/// A flush whose records cannot be stored fails (`NBD_EIO`) after the retries, and the records
/// stay queued: the next flush once the backend is back ships them, and they survive the loss
/// of the disk. A flush with nothing new to ship makes no PUT.
#[test]
fn a_flush_is_acknowledged_only_once_its_records_are_stored() {
    common::run(Duration::from_secs(60), async {
        let hooks = Arc::new(WalPutsDown::default());
        let hooked = common::HookedBackend::new(hooks.clone());
        let backend: SharedBackend = hooked.clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(dir.path());
        c.volume.idle_flush = Duration::from_secs(3600);
        let engine = Engine::open(c, backend.clone()).await.expect("engine");
        let id = create(&engine).await;
        let vol = engine.volume(&id).await.expect("open");

        hooks.down.store(true, Ordering::SeqCst);
        vol.write(0, Bytes::from(content(0, 1)), false)
            .await
            .expect("write");
        match vol.flush().await {
            Err(VolumeError::Shipping(reason)) => assert!(reason.contains("injected"), "{reason}"),
            other => panic!("flush while WAL PUTs fail: {other:?}"),
        }
        assert!(vol.failed().is_none(), "an outage does not fail the volume");

        hooks.down.store(false, Ordering::SeqCst);
        vol.flush().await.expect("flush after the outage");
        let puts = hooks.wal_puts.load(Ordering::SeqCst);
        vol.flush().await.expect("flush with nothing new");
        assert_eq!(
            hooks.wal_puts.load(Ordering::SeqCst),
            puts,
            "a flush with nothing new stores nothing"
        );
        drop(vol);
        engine.simulate_crash().await;

        let (_fresh, e, vol) = recovered(&backend, &id).await;
        assert_eq!(
            read_all(&vol).await[0],
            1,
            "the write flushed after the outage"
        );
        drop(vol);
        e.close_all().await;
    });
}

/// Another object at the next counter (a newer owner's, after a takeover) fences the volume:
/// its next flush fails, the volume fails (writes refused), and nothing of it is stored after
/// the other writer's object.
#[test]
fn a_taken_counter_fences_the_writer() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open(dir.path(), &backend).await;
        let id = create(&engine).await;
        let vol = engine.volume(&id).await.expect("open");
        vol.write(0, Bytes::from(content(0, 1)), true)
            .await
            .expect("write");
        let counters = wal_counters(&backend, &id).await;
        assert_eq!(counters, vec![1], "the FUA write shipped one object");

        let theirs = vblock::cluster::walobj::encode_fence(1, 2, 0);
        assert!(backend
            .put_if_absent(&wal_object_key(&id, 2), theirs.clone())
            .await
            .expect("fence"));
        vol.write(4096, Bytes::from(content(1, 2)), false)
            .await
            .expect("write before the fence is seen");
        assert!(
            vol.flush().await.is_err(),
            "the fenced writer's flush fails"
        );
        assert!(vol.failed().is_some(), "the fenced volume fails");
        assert!(
            vol.write(8192, Bytes::from(content(2, 3)), false)
                .await
                .is_err(),
            "and refuses writes"
        );
        assert_eq!(wal_counters(&backend, &id).await, vec![1, 2]);
        assert_eq!(
            backend.get(&wal_object_key(&id, 2)).await.expect("get"),
            theirs,
            "the other writer's object is untouched"
        );
        drop(vol);
        engine.simulate_crash().await;
    });
}

/// A store that does not honour conditional PUTs is refused for cluster mode (it could fence
/// nobody); the memory and file backends pass the probe, and it leaves no object behind.
#[test]
fn a_store_that_ignores_conditional_puts_cannot_fence() {
    use vblock::backend::Backend;
    use vblock::cluster::epoch::{check_conditional_put, EpochError};
    struct Ignores;
    impl common::Hooks for Ignores {
        fn ignore_condition(&self) -> bool {
            true
        }
    }
    common::run(Duration::from_secs(30), async {
        let memory = common::memory_backend();
        check_conditional_put(&*memory, "a").await.expect("memory");
        assert_eq!(memory.list("").await.expect("list"), Vec::<String>::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = vblock::backend::file::FileBackend::new(dir.path()).expect("file backend");
        check_conditional_put(&file, "a").await.expect("file");
        assert_eq!(file.list("").await.expect("list"), Vec::<String>::new());

        let ignores = common::HookedBackend::new(Ignores);
        match check_conditional_put(&*ignores, "a").await {
            Err(EpochError::ConditionIgnored { key, stored: 2 }) => {
                assert!(key.starts_with("cluster-probe/a/"), "{key}")
            }
            other => panic!("a store that ignores If-None-Match passed: {other:?}"),
        }
    });
}

/// Once chunks hold a shipped object's records, the object is deleted, but for the newest one
/// (the counter's high-water mark); the volume still recovers from the backend, and ships on
/// at the next counter.
#[test]
fn covered_objects_are_deleted() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        // No chunk before persist_buffer: every FUA ships its own object.
        let mut c = config(dir.path());
        c.volume.idle_flush = Duration::from_secs(3600);
        c.volume.chunk_bytes = 1 << 20;
        let engine = Engine::open(c, backend.clone()).await.expect("engine");
        let id = create(&engine).await;
        let vol = engine.volume(&id).await.expect("open");
        for b in 0..BLOCKS {
            vol.write(b * 4096, Bytes::from(content(b, b + 1)), b % 8 == 7)
                .await
                .expect("write");
        }
        assert_eq!(wal_counters(&backend, &id).await.len(), 6);
        vol.persist_buffer().await.expect("persist");
        // The shipper deletes in the background once a PUT (here a mark) confirmed the chunks'
        // commit; the newest object stays (the counter's high-water mark for the next open).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while wal_counters(&backend, &id).await.len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "covered objects not deleted: {:?}",
                wal_counters(&backend, &id).await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let newest = wal_counters(&backend, &id).await[0];
        assert!(newest >= 6, "the newest object was deleted: {newest}");
        let expected = read_all(&vol).await;
        drop(vol);
        engine.simulate_crash().await;
        drop(dir);
        let (_fresh, e, vol) = recovered(&backend, &id).await;
        assert_eq!(read_all(&vol).await, expected);
        vol.write(0, Bytes::from(content(0, 99)), true)
            .await
            .expect("write");
        assert_eq!(
            wal_counters(&backend, &id).await.last(),
            Some(&(newest + 1)),
            "counters go on after the newest"
        );
        drop(vol);
        e.close_all().await;
    });
}

async fn wal_counters(backend: &SharedBackend, id: &VolumeId) -> Vec<u64> {
    let keys = backend.list(&wal_object_prefix(id)).await.expect("list");
    vblock::backend::wal_object_counters(id, &keys)
}

/// Recovery replays shipped objects only while they follow one another: a missing counter ends
/// the walk, and so does an object whose `after_seq` says records before it are missing, so
/// the volume holds a prefix of its writes.
#[test]
fn replay_from_the_backend_stops_at_a_gap() {
    use vblock::cluster::walobj::WalObjectEncoder;
    use vblock::wal::{RecordHeader, RecordKind};
    common::run(Duration::from_secs(60), async {
        // Three FUA writes, three objects, no chunk.
        async fn shipped_three(backend: &SharedBackend) -> VolumeId {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut c = config(dir.path());
            c.volume.idle_flush = Duration::from_secs(3600);
            c.volume.chunk_bytes = 1 << 20;
            let engine = Engine::open(c, backend.clone()).await.expect("engine");
            let id = create(&engine).await;
            let vol = engine.volume(&id).await.expect("open");
            for b in 0..3 {
                vol.write(b * 4096, Bytes::from(content(b, b + 1)), true)
                    .await
                    .expect("write");
            }
            assert_eq!(wal_counters(backend, &id).await, vec![1, 2, 3]);
            drop(vol);
            engine.simulate_crash().await;
            id
        }
        async fn first_blocks(backend: &SharedBackend, id: &VolumeId) -> Vec<u64> {
            let (_dir, e, vol) = recovered(backend, id).await;
            let got = read_all(&vol).await[..4].to_vec();
            drop(vol);
            e.close_all().await;
            got
        }

        let backend = common::memory_backend();
        let id = shipped_three(&backend).await;
        backend
            .delete(&wal_object_key(&id, 2))
            .await
            .expect("delete");
        assert_eq!(first_blocks(&backend, &id).await, vec![1, 0, 0, 0]);
        // The recovered volume drops object 3 (past the break), fences after it (counters are
        // never used twice) and ships on: a flushed write survives the next loss.
        {
            let (_dir, e, vol) = recovered(&backend, &id).await;
            vol.write(3 * 4096, Bytes::from(content(3, 9)), true)
                .await
                .expect("write");
            // (Object 1 may be deleted already: chunks cover it once the volume drains.)
            let counters = wal_counters(&backend, &id).await;
            assert!(!counters.contains(&3), "the orphan stays: {counters:?}");
            assert!(
                counters.contains(&4) && counters.contains(&5),
                "{counters:?}"
            );
            drop(vol);
            e.simulate_crash().await;
        }
        assert_eq!(first_blocks(&backend, &id).await, vec![1, 0, 0, 9]);

        // Object 4 claims to follow seq 100: the records between are missing.
        let backend = common::memory_backend();
        let id = shipped_three(&backend).await;
        let head = backend
            .get_range(&wal_object_key(&id, 3), 0..64)
            .await
            .expect("get");
        let last = vblock::cluster::walobj::decode_header(&head, 3)
            .expect("header")
            .last_seq;
        let mut enc = WalObjectEncoder::new(0, 4, 100);
        let payload = content(3, 4);
        enc.push(
            &RecordHeader {
                kind: RecordKind::Write,
                flags: 0,
                seq: 101,
                volume_tag: id.tag(),
                start_block: 3,
                block_count: 1,
                payload_len: 4096,
            },
            &payload,
        );
        assert!(last < 100);
        assert!(backend
            .put_if_absent(&wal_object_key(&id, 4), enc.finish())
            .await
            .expect("put"));
        assert_eq!(first_blocks(&backend, &id).await, vec![1, 2, 3, 0]);
    });
}

/// The local WAL lost records the backend holds (its disk replaced; meta kept): the volume's
/// open takes them from the shipped WAL, and new writes get higher seqs.
#[test]
fn an_open_takes_what_the_local_wal_lost_from_the_backend() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(dir.path());
        c.volume.idle_flush = Duration::from_secs(3600);
        c.volume.chunk_bytes = 1 << 20;
        let engine = Engine::open(c.clone(), backend.clone())
            .await
            .expect("engine");
        let id = create(&engine).await;
        let vol = engine.volume(&id).await.expect("open");
        for b in 0..3 {
            vol.write(b * 4096, Bytes::from(content(b, b + 1)), true)
                .await
                .expect("write");
        }
        drop(vol);
        engine.simulate_crash().await;
        // Every segment lost (the lock file stays: the process's cache of durable directories
        // would not see a directory removed behind it).
        for f in std::fs::read_dir(c.wal_dir.join(id.as_str())).expect("WAL dir") {
            let f = f.expect("entry").path();
            if f.file_name().is_some_and(|n| n != "LOCK") {
                std::fs::remove_file(&f).expect("lose a WAL file");
            }
        }

        let engine = Engine::open(c, backend.clone()).await.expect("engine");
        let vol = engine.volume(&id).await.expect("reopen");
        assert_eq!(read_all(&vol).await[..4], [1, 2, 3, 0]);
        vol.write(0, Bytes::from(content(0, 7)), true)
            .await
            .expect("write");
        drop(vol);
        engine.simulate_crash().await;
        drop(dir);
        let (_fresh, e, vol) = recovered(&backend, &id).await;
        assert_eq!(read_all(&vol).await[..4], [7, 2, 3, 0]);
        drop(vol);
        e.close_all().await;
    });
}

/// Stores WAL PUTs but answers the first `lost` of them with an error (the response lost).
struct LostResponses {
    lost: AtomicU64,
}

#[async_trait::async_trait]
impl common::Hooks for LostResponses {
    fn fail_after_put(&self, key: &str) -> Option<BackendError> {
        if !key.contains("/wal/") {
            return None;
        }
        let left = self.lost.load(Ordering::SeqCst);
        (left > 0).then(|| {
            self.lost.store(left - 1, Ordering::SeqCst);
            BackendError::Io {
                key: key.to_owned(),
                message: "injected: response lost".into(),
                transient: false,
            }
        })
    }
}

/// A PUT that landed but whose answer was lost: the next round stores the same object again,
/// finds it is its own and goes on. The flush waiting for it fails, or succeeds when that
/// retry lands before the flush sees the failure (a loaded machine): its records are stored
/// either way. The volume is not mistaken for fenced, and the writes of both flushes survive
/// the loss of the disk.
#[test]
fn a_landed_put_whose_answer_was_lost_is_not_a_fence() {
    common::run(Duration::from_secs(60), async {
        let hooked = common::HookedBackend::new(LostResponses { lost: 0.into() });
        let backend: SharedBackend = hooked.clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open(dir.path(), &backend).await;
        let id = create(&engine).await;
        let vol = engine.volume(&id).await.expect("open");
        hooked.hooks.lost.store(1, Ordering::SeqCst);
        vol.write(0, Bytes::from(content(0, 1)), false)
            .await
            .expect("write");
        let first = vol.flush().await;
        assert!(
            matches!(first, Ok(()) | Err(VolumeError::Shipping(_))),
            "the flush whose answer was lost: {first:?}"
        );
        assert_eq!(
            hooked.hooks.lost.load(Ordering::SeqCst),
            0,
            "the PUT's answer was lost"
        );
        vol.write(4096, Bytes::from(content(1, 2)), false)
            .await
            .expect("write");
        vol.flush().await.expect("the next flush");
        assert!(vol.failed().is_none(), "not fenced by its own object");
        drop(vol);
        engine.simulate_crash().await;
        drop(dir);
        let (_fresh, e, vol) = recovered(&backend, &id).await;
        assert_eq!(read_all(&vol).await[..3], [1, 2, 0]);
        drop(vol);
        e.close_all().await;
    });
}

/// Writes generation `g` to every block in `blocks`, the last one with FUA.
async fn write_gen(vol: &vblock::Volume, blocks: std::ops::Range<u64>, g: u64) {
    let last = blocks.end - 1;
    for b in blocks {
        vol.write(b * 4096, Bytes::from(content(b, g)), b == last)
            .await
            .expect("write");
    }
}

/// The zombie (issue test 3) at the engine level, two and then three owners on one backend:
/// node B takes the volume over from A while A still runs. A's next flush fails and its volume
/// fails; B serves every write A flushed; A's late writes and chunk uploads change nothing B
/// or a later recovery reads; B's own flushed writes survive a takeover by C and the loss of
/// every disk.
#[test]
fn a_takeover_fences_the_old_owner() {
    common::run(Duration::from_secs(120), async {
        let backend = common::memory_backend();
        let (da, db, dc) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let a = open(da.path(), &backend).await;
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open on A");
        // Generations 1..=6 over all blocks (64 KiB chunks: several commit meanwhile).
        for g in 1..=6 {
            write_gen(&va, 0..BLOCKS, g).await;
        }

        let b = open(db.path(), &backend).await;
        assert_eq!(b.take_over(&id, "b").await.expect("take over"), 1);
        // A goes on: a write is taken locally unless A has already met the fence (a mark it
        // stored to delete covered objects), its flush is refused, the volume fails.
        let _ = va.write(0, Bytes::from(content(0, 100)), false).await;
        assert!(va.flush().await.is_err(), "the old owner's flush");
        assert!(va.failed().is_some(), "the old owner's volume fails");

        let vb = b.volume(&id).await.expect("open on B");
        assert_eq!(
            read_all(&vb).await,
            vec![6; BLOCKS as usize],
            "B serves A's flushed writes"
        );
        write_gen(&vb, 0..BLOCKS / 2, 7).await;
        // A's buffered data turns into chunks with A's ids; none of it reaches B's volume.
        va.persist_buffer().await.ok();
        drop(va);
        a.simulate_crash().await;
        let mut expected = vec![7; (BLOCKS / 2) as usize];
        expected.extend(vec![6; (BLOCKS / 2) as usize]);
        assert_eq!(read_all(&vb).await, expected);

        // C takes over from B (epoch 2); B's flushed writes are there, B is fenced.
        let c = open(dc.path(), &backend).await;
        assert_eq!(c.take_over(&id, "c").await.expect("take over"), 2);
        assert!(vb.flush().await.is_ok() || vb.failed().is_some());
        vb.write(0, Bytes::from(content(0, 200)), true)
            .await
            .expect_err("B is fenced");
        let vc = c.volume(&id).await.expect("open on C");
        assert_eq!(read_all(&vc).await, expected);
        write_gen(&vc, BLOCKS / 2..BLOCKS, 8).await;
        expected[(BLOCKS / 2) as usize..].fill(8);
        drop((vb, vc));
        b.simulate_crash().await;
        c.simulate_crash().await;

        // Every disk lost: the backend alone gives C's volume.
        let (_fresh, e, v) = recovered(&backend, &id).await;
        assert_eq!(read_all(&v).await, expected);
        drop(v);
        e.close_all().await;
    });
}

/// A takeover that finds the bucket damaged refuses, and changes nothing there (issue 30): a
/// chunk that is there but does not verify (no crash leaves one: puts are atomic), or a chunk
/// gone with shipped WAL objects past the break it leaves (one PUT is in flight at a time, so
/// no crash leaves that either). Serving the prefix before the damage would lose the
/// acknowledged writes after it, and the volume's next open would delete what lies past the
/// break. A takeover for a delete goes on.
#[test]
fn a_takeover_refuses_a_damaged_volume() {
    use vblock::backend::{checkpoint_prefix, chunk_ids, chunk_key};
    common::run(Duration::from_secs(120), async {
        /// Generations 1..=6 over every block, all in chunks (A flushed each), and with `more`
        /// generation 7 of the first blocks, flushed and only shipped; then A is lost. Returns
        /// the volume and its first chunk above its newest map checkpoint, if any (more follow
        /// it).
        async fn lost_owner(backend: &SharedBackend, more: bool) -> (VolumeId, u64) {
            let dir = tempfile::tempdir().expect("tempdir");
            let a = open(dir.path(), backend).await;
            let id = create(&a).await;
            let va = a.volume(&id).await.expect("open on A");
            for g in 1..=6 {
                write_gen(&va, 0..BLOCKS, g).await;
            }
            va.persist_buffer().await.expect("persist");
            if more {
                write_gen(&va, 0..4, 7).await;
            }
            drop(va);
            a.simulate_crash().await;
            let keys = backend.list(&format!("{id}/")).await.expect("list");
            let checkpoint = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&checkpoint_prefix(&id)))
                .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
                .max()
                .unwrap_or(1);
            let above: Vec<u64> = chunk_ids(&id, &keys)
                .into_iter()
                .filter(|o| *o >= checkpoint)
                .collect();
            assert!(above.len() >= 2, "chunks above the checkpoint: {above:?}");
            (id, above[0])
        }
        async fn refused(backend: &SharedBackend, id: &VolumeId, what: &str) {
            let before = backend.list(&format!("{id}/")).await.expect("list");
            let dir = tempfile::tempdir().expect("tempdir");
            let b = open(dir.path(), backend).await;
            // What this node's WAL holds of the volume (an earlier ownership here) stays: it
            // may be the last good copy.
            let local = config(dir.path()).wal_dir.join(id.as_str());
            std::fs::create_dir_all(&local).expect("mkdir");
            std::fs::write(local.join("earlier.wal"), b"records").expect("write");
            for _ in 0..2 {
                let taken = b.take_over(id, "b").await;
                assert!(
                    matches!(taken, Err(VolumeError::Corrupt { .. })),
                    "{what}: {taken:?}"
                );
            }
            let after = backend.list(&format!("{id}/")).await.expect("list");
            let lost: Vec<&String> = before.iter().filter(|k| !after.contains(k)).collect();
            assert!(lost.is_empty(), "{what}: the takeover deleted {lost:?}");
            assert!(b.volume(id).await.is_err(), "{what}: the volume opens");
            assert!(
                local.join("earlier.wal").exists(),
                "{what}: a refused takeover emptied the local WAL"
            );
            // A takeover to delete the volume goes on past the damage, and marks the volume:
            // should the delete not follow, a takeover to serve it is still refused.
            let damage = vblock::OnDamage::KeepPrefix;
            b.take_over_with(id, "b", None, damage)
                .await
                .expect("a takeover for a delete");
            let taken = b.take_over(id, "b").await;
            assert!(
                matches!(taken, Err(VolumeError::Corrupt { .. })),
                "{what}, after a takeover for a delete: {taken:?}"
            );
            b.delete_volume(id).await.expect("delete");
            let left = backend.list(&format!("{id}/")).await.expect("list");
            assert!(
                left.iter().all(|k| k.contains("/chunks/")),
                "{what}: a delete left {left:?}"
            );
            b.close_all().await;
        }

        // A chunk that does not verify, and no shipped WAL left to tell by.
        let backend = common::memory_backend();
        let (id, first) = lost_owner(&backend, false).await;
        for c in wal_counters(&backend, &id).await {
            backend
                .delete(&wal_object_key(&id, c))
                .await
                .expect("delete");
        }
        let key = chunk_key(&id, first);
        let len = backend.get(&key).await.expect("get").len();
        backend
            .put(&key, Bytes::from(vec![0xa5; len]))
            .await
            .expect("put");
        refused(&backend, &id, "a corrupt chunk").await;

        // A chunk gone, and shipped objects after the records it held.
        let backend = common::memory_backend();
        let (id, first) = lost_owner(&backend, true).await;
        backend
            .delete(&chunk_key(&id, first))
            .await
            .expect("delete");
        refused(&backend, &id, "a missing chunk").await;

        // Orphans an open dropped (its fence stored, then a crash before it deleted them) are
        // not damage: the takeover serves the volume as that open left it.
        let backend = common::memory_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Engine::open(quiet_config(dir.path()), backend.clone())
            .await
            .expect("engine");
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open");
        for b in 0..3 {
            va.write(b * 4096, Bytes::from(content(b, b + 1)), true)
                .await
                .expect("write");
        }
        assert_eq!(wal_counters(&backend, &id).await, vec![1, 2, 3]);
        drop(va);
        a.simulate_crash().await;
        let orphan = backend.get(&wal_object_key(&id, 3)).await.expect("get");
        backend
            .delete(&wal_object_key(&id, 2))
            .await
            .expect("delete");
        let (_dir, e, v) = recovered(&backend, &id).await;
        drop(v);
        e.simulate_crash().await;
        let counters = wal_counters(&backend, &id).await;
        assert!(
            !counters.contains(&3) && counters.contains(&4),
            "{counters:?}"
        );
        backend
            .put(&wal_object_key(&id, 3), orphan)
            .await
            .expect("put the orphan back");
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path(), &backend).await;
        b.take_over(&id, "b").await.expect("take over");
        let vb = b.volume(&id).await.expect("open on B");
        assert_eq!(read_all(&vb).await[..4], [1, 0, 0, 0]);
        drop(vb);
        b.close_all().await;
    });
}

/// Two nodes racing to take one volume over (issue test 4, engine level): each epoch has one
/// winner (a loser of an epoch is told who won it). Takers that list at different times may
/// win epochs 1 and 2: the higher one serves, the lower one may not write.
#[test]
fn racing_takeovers_have_one_writer() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let (da, db, dc) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let a = open(da.path(), &backend).await;
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open");
        write_gen(&va, 0..BLOCKS, 1).await;
        drop(va);
        a.simulate_crash().await;
        let (b, c) = (
            open(db.path(), &backend).await,
            open(dc.path(), &backend).await,
        );
        let (rb, rc) = tokio::join!(b.take_over(&id, "b"), c.take_over(&id, "c"));
        let mut won: Vec<(u64, &Engine)> = Vec::new();
        for (r, e) in [(rb, &b), (rc, &c)] {
            match r {
                Ok(epoch) => won.push((epoch, e)),
                Err(VolumeError::InUse(m)) => assert!(m.contains("epoch 1"), "{m}"),
                Err(other) => panic!("takeover failed: {other}"),
            }
        }
        won.sort_by_key(|(epoch, _)| *epoch);
        let epochs: Vec<u64> = won.iter().map(|(e, _)| *e).collect();
        assert!(epochs == [1] || epochs == [1, 2], "epochs won: {epochs:?}");
        let (_, writer) = won.pop().expect("a winner");
        let v = writer.volume(&id).await.expect("open on the writer");
        assert_eq!(read_all(&v).await, vec![1; BLOCKS as usize]);
        v.write(0, Bytes::from(content(0, 2)), true)
            .await
            .expect("the writer writes");
        if let Some((_, fenced)) = won.pop() {
            match fenced.volume(&id).await {
                Err(VolumeError::Failed(m)) => assert!(m.contains("fence of epoch 2"), "{m}"),
                Ok(v) => assert!(
                    v.write(0, Bytes::from(content(0, 3)), true).await.is_err(),
                    "the lower epoch writes"
                ),
                Err(other) => panic!("opening on the lower epoch: {other}"),
            }
        }
        drop(v);
        b.simulate_crash().await;
        c.simulate_crash().await;
    });
}

/// A fenced owner deletes nothing: once its chunks hold what its shipped objects hold, it
/// deletes those objects only after a PUT confirms it still owns the volume, and that PUT meets
/// the fence (so it fails instead). The new owner's volume, which needs those objects, recovers
/// whole from the backend.
#[test]
fn a_fenced_owner_deletes_nothing() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let (da, db) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        // No chunk on either node until asked: only A's own chunks could cover its objects
        // (B, their owner now, may delete them once its chunks hold them).
        let quiet = |dir: &std::path::Path| {
            let mut c = quiet_config(dir);
            c.volume.chunk_bytes = 1 << 20;
            c
        };
        let a = Engine::open(quiet(da.path()), backend.clone())
            .await
            .expect("engine");
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open on A");
        for blk in 0..4 {
            va.write(blk * 4096, Bytes::from(content(blk, 1)), true)
                .await
                .expect("write");
        }
        assert_eq!(wal_counters(&backend, &id).await, vec![1, 2, 3, 4]);

        let b = Engine::open(quiet(db.path()), backend.clone())
            .await
            .expect("engine");
        b.take_over(&id, "b").await.expect("take over");
        let vb = b.volume(&id).await.expect("open on B");
        vb.write(10 * 4096, Bytes::from(content(10, 2)), true)
            .await
            .expect("write on B");

        // A's buffer becomes chunks that hold objects 1..4: A may not delete them.
        let _ = va.persist_buffer().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while va.failed().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "A never tried to confirm its deletes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(va);
        a.simulate_crash().await;
        let counters = wal_counters(&backend, &id).await;
        assert!(
            (1..=4).all(|c| counters.contains(&c)),
            "the fenced owner deleted objects: {counters:?}"
        );
        drop(vb);
        b.simulate_crash().await;

        let (_fresh, e, v) = recovered(&backend, &id).await;
        let got = read_all(&v).await;
        assert_eq!(&got[..4], &[1, 1, 1, 1]);
        assert_eq!(got[10], 2);
        drop(v);
        e.close_all().await;
    });
}

/// Cluster mode's garbage collection is fenced: an owner deletes dead chunks only after a
/// conditional PUT of its shipped WAL proves no takeover fenced it. A fenced owner's pass
/// deletes nothing (its volume fails instead), and the new owner's recovery is whole.
#[test]
fn a_fenced_owner_collects_no_garbage() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let (da, db) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let a = Engine::open(quiet_config(da.path()), backend.clone())
            .await
            .expect("engine");
        a.set_cluster_gc(Arc::new(|_| true));
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open on A");
        // Two generations, each made a chunk: the first one's chunk is dead.
        for g in 1..=2 {
            for blk in 0..4 {
                va.write(blk * 4096, Bytes::from(content(blk, g)), true)
                    .await
                    .expect("write");
            }
            va.persist_buffer().await.expect("chunk");
        }
        let chunks = |backend: SharedBackend| {
            let prefix = vblock::backend::chunk_prefix(&id);
            async move { backend.list(&prefix).await.expect("list") }
        };
        let before = chunks(backend.clone()).await;
        assert_eq!(before.len(), 2, "{before:?}");

        let b = Engine::open(quiet_config(db.path()), backend.clone())
            .await
            .expect("engine");
        b.take_over(&id, "b").await.expect("take over");
        let report = a.collect_garbage().await.expect("a pass on A");
        assert_eq!(
            report.objects_deleted, 0,
            "the fenced owner collected garbage: {report:?}"
        );
        assert_eq!(chunks(backend.clone()).await, before);
        assert!(va.failed().is_some(), "the fenced owner's volume goes on");
        drop(va);
        a.simulate_crash().await;

        // The owner's pass deletes the dead chunk.
        b.set_cluster_gc(Arc::new(|_| true));
        let vb = b.volume(&id).await.expect("open on B");
        let report = b.collect_garbage().await.expect("a pass on B");
        assert_eq!(report.objects_deleted, 1, "{report:?}");
        assert_eq!(read_all(&vb).await[..4], [2, 2, 2, 2]);
        drop(vb);
        b.simulate_crash().await;
        let (_fresh, e, v) = recovered(&backend, &id).await;
        assert_eq!(read_all(&v).await[..4], [2, 2, 2, 2]);
        drop(v);
        e.close_all().await;
    });
}

/// An engine in cluster mode on `dir` and `backend` ([`quiet_config`]) that keeps every
/// volume's lease for the test's length.
async fn cluster_engine(dir: &std::path::Path, backend: &SharedBackend) -> Engine {
    let mut c = quiet_config(dir);
    c.cluster = true;
    let e = Engine::open(c, backend.clone()).await.expect("engine");
    let until = std::time::Instant::now() + Duration::from_secs(3600);
    e.set_cluster_tenure(Arc::new(move |_| {
        Some(vblock::cluster::lease::Tenure::until(until))
    }));
    e
}

/// Node A in cluster mode on `backend`: a volume with one generation in a chunk, and a
/// snapshot of it being stored (the task storing it). Returns A's directory, A, the volume,
/// its open instance, the snapshot and that task.
async fn snapshot_on_a(
    backend: &SharedBackend,
) -> (
    tempfile::TempDir,
    Engine,
    VolumeId,
    vblock::Volume,
    vblock::SnapshotId,
    tokio::task::JoinHandle<vblock::records::SnapshotRecord>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = cluster_engine(dir.path(), backend).await;
    let id = create(&a).await;
    let va = a.volume(&id).await.expect("open on A");
    write_gen(&va, 0..4, 1).await;
    va.persist_buffer().await.expect("chunk");
    let (rec, stored) = a
        .create_snapshot_tracked(&id, "on a")
        .await
        .expect("snapshot");
    (dir, a, id, va, rec.snapshot_id, stored)
}

/// Holds the second PUT of a snapshot's record copy (the one that marks it completed, after
/// its map is stored) until `open`; `held` says when one waits.
struct HoldCompletion {
    puts: AtomicU64,
    held: tokio::sync::watch::Sender<bool>,
    open: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl common::Hooks for Arc<HoldCompletion> {
    async fn before_put(&self, key: &str) {
        if key.ends_with("/snapshot.json") && self.puts.fetch_add(1, Ordering::SeqCst) >= 1 {
            self.held.send_replace(true);
            let mut open = self.open.subscribe();
            let _ = open.wait_for(|o| *o).await;
        }
    }
}

/// Cluster mode: a snapshot whose copy another node is still storing (map stored, record copy
/// still `pending`) is not installed by this node (its local record would stay pending here
/// for good: unmountable, undeletable); once the copy is marked completed, it is installed
/// completed.
#[test]
fn a_snapshot_still_being_stored_is_not_installed_elsewhere() {
    use vblock::records::SnapshotStateName;
    common::run(Duration::from_secs(60), async {
        let hooks = Arc::new(HoldCompletion {
            puts: 0.into(),
            held: tokio::sync::watch::channel(false).0,
            open: tokio::sync::watch::channel(false).0,
        });
        let backend: SharedBackend = common::HookedBackend::new(hooks.clone());
        let (_da, a, _id, va, sid, stored) = snapshot_on_a(&backend).await;
        let db = tempfile::tempdir().expect("tempdir");
        let mut held = hooks.held.subscribe();
        held.wait_for(|h| *h).await.expect("the completing PUT");

        let b = cluster_engine(db.path(), &backend).await;
        match b.load_snapshot(&sid).await {
            Err(VolumeError::IncorrectState(_)) => {}
            other => panic!("a pending copy was installed: {other:?}"),
        }
        assert!(b.get_snapshot(&sid).await.expect("get").is_none());

        hooks.open.send_replace(true);
        assert_eq!(
            stored.await.expect("stored").state,
            SnapshotStateName::Completed
        );
        let got = b
            .load_snapshot(&sid)
            .await
            .expect("installed once completed");
        assert_eq!(got.state, SnapshotStateName::Completed);
        drop(va);
        a.close_all().await;
        b.close_all().await;
    });
}

/// Cluster mode: the owner that took a snapshot loses the volume before its map is stored.
/// The next owner's garbage collection finds the pending record copy and abandons the
/// snapshot (`error`, the outcome object won), and stops waiting for it; the first owner's
/// late map changes nothing: its snapshot ends `error` too, and no node installs it.
#[test]
fn a_snapshot_abandoned_by_a_lost_owner_ends_in_error() {
    use vblock::records::SnapshotStateName;
    common::run(Duration::from_secs(60), async {
        let hooks = common::HoldPuts::new(|key| key.starts_with("snap-") && key.ends_with("/map"));
        let backend: SharedBackend = common::HookedBackend::new(hooks.clone());
        let (_da, a, id, va, sid, stored) = snapshot_on_a(&backend).await;
        let db = tempfile::tempdir().expect("tempdir");
        hooks.until_held().await;

        let b = cluster_engine(db.path(), &backend).await;
        b.take_over(&id, "b").await.expect("take over");
        b.set_cluster_gc(Arc::new(|_| true));
        b.collect_garbage().await.expect("a pass on B");
        let copy = b
            .stored_snapshot(&sid)
            .await
            .expect("get")
            .expect("record copy");
        assert_eq!(copy.state, SnapshotStateName::Error, "{copy:?}");

        hooks.open();
        let done = stored.await.expect("stored");
        assert_eq!(done.state, SnapshotStateName::Error, "{done:?}");
        assert!(
            backend
                .get(&vblock::backend::snapshot_map_key(&sid))
                .await
                .is_err(),
            "the abandoned snapshot's late map stays in the bucket"
        );
        let copy = b.stored_snapshot(&sid).await.expect("get").expect("copy");
        assert_eq!(copy.state, SnapshotStateName::Error);
        assert!(matches!(
            b.load_snapshot(&sid).await,
            Err(VolumeError::IncorrectState(_))
        ));
        b.collect_garbage().await.expect("another pass on B");
        assert!(b.get_snapshot(&sid).await.expect("get").is_none());
        drop(va);
        a.close_all().await;
        b.close_all().await;
        // Disaster recovery from the bucket skips the failed snapshot.
        let (_fresh, e, v) = recovered(&backend, &id).await;
        assert!(e.get_snapshot(&sid).await.expect("get").is_none());
        drop(v);
        e.close_all().await;
    });
}

/// Cluster mode: a volume deleted through this node while a snapshot shares one of its chunks
/// keeps that chunk's stats here after its lease is gone; once the snapshot is deleted, even
/// after a restart, this node's garbage collection deletes the chunk (it leaked: GC only looked
/// at volumes whose lease the node keeps, and then forgot the deletes at a restart).
#[test]
fn a_deleted_volumes_shared_chunk_goes_with_its_last_snapshot() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let a = cluster_engine(dir.path(), &backend).await;
        let leased = Arc::new(AtomicBool::new(true));
        let l = leased.clone();
        a.set_cluster_gc(Arc::new(move |_| l.load(Ordering::SeqCst)));
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open");
        write_gen(&va, 0..4, 1).await;
        va.persist_buffer().await.expect("chunk");
        let (snap, stored) = a
            .create_snapshot_tracked(&id, "shares")
            .await
            .expect("snapshot");
        write_gen(&va, 0..4, 2).await;
        va.persist_buffer().await.expect("chunk");
        drop(va);
        let chunks = || {
            let (backend, prefix) = (backend.clone(), vblock::backend::chunk_prefix(&id));
            async move { backend.list(&prefix).await.expect("list") }
        };
        // The snapshot completes (its map in the backend) before the delete.
        assert_eq!(
            stored.await.expect("stored").state,
            vblock::records::SnapshotStateName::Completed
        );
        a.delete_volume(&id).await.expect("delete the volume");
        assert_eq!(chunks().await.len(), 1, "the snapshot's chunk stays");
        // A restart in between: the node still knows the volume was deleted here.
        a.close_all().await;
        drop(a);
        let a = cluster_engine(dir.path(), &backend).await;
        leased.store(false, Ordering::SeqCst);
        let l = leased.clone();
        a.set_cluster_gc(Arc::new(move |_| l.load(Ordering::SeqCst)));
        a.delete_snapshot(&snap.snapshot_id)
            .await
            .expect("delete the snapshot");
        assert_eq!(
            chunks().await,
            Vec::<String>::new(),
            "the shared chunk leaked"
        );
        a.close_all().await;
    });
}

/// A snapshot of a volume just taken over, before any write, is taken at once: the new
/// epoch numbers writes from its base, which no write has reached yet (the snapshot waited
/// for the map's checkpoint to reach it, forever).
#[test]
fn a_snapshot_right_after_a_takeover_is_taken() {
    common::run(Duration::from_secs(60), async {
        let backend = common::memory_backend();
        let (da, db) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let a = open(da.path(), &backend).await;
        let id = create(&a).await;
        let va = a.volume(&id).await.expect("open on A");
        write_gen(&va, 0..4, 1).await;
        drop(va);
        a.simulate_crash().await;
        let b = open(db.path(), &backend).await;
        b.take_over(&id, "b").await.expect("take over");
        let snap = tokio::time::timeout(Duration::from_secs(10), b.create_snapshot(&id, "at once"))
            .await
            .expect("the snapshot waited for a write")
            .expect("snapshot");
        let data = b
            .snapshot_volume(&snap.snapshot_id)
            .await
            .expect("open the snapshot")
            .read(0, 4 * 4096)
            .await
            .expect("read");
        let expected: Vec<u8> = (0..4).flat_map(|blk| content(blk, 1)).collect();
        assert!(data == expected, "the snapshot holds every flushed write");
        b.close_all().await;
    });
}

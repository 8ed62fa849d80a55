//! Power-loss simulation: the engine runs with its WAL and file backend on the power-loss
//! simulator (`vblock::fs::SimFs`), which records every write, sync and directory change. Random
//! writes, flushes, FUA writes, buffer persists, process crashes (kill -9: the page cache
//! survives) and power cuts (unsynced writes dropped or torn at 512-byte sectors, unsynced
//! directory changes cut to a prefix) are checked against a model: after every cut and crash the
//! volume must equal the model at some point between the last durable one and the cut — every
//! write acknowledged before a later FLUSH, or with FUA, reads back, and nothing never written
//! appears. RocksDB is not simulated: it syncs every write it is given (src/meta.rs) and is
//! trusted to keep them.
//!
//! `PROPTEST_CASES` sets the number of cases (CI: 64); the totals (cuts simulated, acknowledged
//! writes checked) are printed for docs/RELIABILITY.md. Longer run:
//! `PROPTEST_CASES=1000 cargo test --test power_loss -- --nocapture`.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use vblock::backend::file::FileBackend;
use vblock::backend::SharedBackend;
use vblock::fs::{Fs, SimFs};
use vblock::{Engine, VolumeId};

const BLOCKS: u64 = 40;
const SIZE: u64 = BLOCKS * 4096;

#[derive(Debug, Clone)]
enum Op {
    /// `count` blocks from `block`; with FUA.
    Write {
        block: u64,
        count: u64,
        fua: bool,
    },
    Flush,
    /// Everything buffered into chunks (the file backend) and the WAL trimmed behind them.
    Persist,
    /// kill -9: the process dies, the page cache (and so every written byte) survives.
    Crash,
    /// Power cut: what was not synced is lost or torn, as `seed` picks.
    Cut {
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..BLOCKS, 1..6u64, any::<u8>()).prop_map(|(block, n, f)| Op::Write {
            block,
            count: n.min(BLOCKS - block),
            fua: f % 5 == 0,
        }),
        // Larger than a chunk (64 KiB): one memtable spans several chunk objects.
        1 => (0..BLOCKS - 20, 17..20u64).prop_map(|(block, count)| Op::Write { block, count, fua: false }),
        3 => Just(Op::Flush),
        1 => Just(Op::Persist),
        2 => Just(Op::Crash),
        3 => any::<u64>().prop_map(|seed| Op::Cut { seed }),
    ]
}

/// Every state the volume may be in after a failure: the last durable one first, the current
/// one last.
struct Model {
    history: Vec<Vec<u8>>,
    /// Writes acknowledged as durable (flushed or FUA) and not yet checked by a cut.
    durable_writes: u64,
    /// Writes acknowledged but not yet durable.
    pending_writes: u64,
}

impl Model {
    fn current(&self) -> &[u8] {
        self.history.last().expect("history never empty")
    }
    fn write(&mut self, at: usize, data: &[u8]) {
        let mut next = self.current().to_vec();
        next[at..at + data.len()].copy_from_slice(data);
        self.history.push(next);
        self.pending_writes += 1;
    }
    fn durable(&mut self) {
        let cur = self.history.pop().expect("history");
        self.history = vec![cur];
        self.durable_writes += self.pending_writes;
        self.pending_writes = 0;
    }
    /// After a failure the volume reads `got`: it must be one of the states, and no older state
    /// than the one found can come back.
    fn recovered(&mut self, got: &[u8], what: &str) {
        let Some(k) = self.history.iter().rposition(|h| h[..] == got[..]) else {
            let durable = &self.history[0];
            let bad: Vec<usize> = (0..BLOCKS as usize)
                .filter(|&b| got[b * 4096..(b + 1) * 4096] != durable[b * 4096..(b + 1) * 4096])
                .collect();
            panic!("{what}: the volume matches no state since the last flush; blocks differing from the durable state: {bad:?}");
        };
        self.history.truncate(k + 1);
    }
}

fn pattern(op_index: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (op_index as u64 * 131 + i * 7 + 1) as u8 | 1)
        .collect()
}

/// Totals over every case, printed at the end of the test.
static CUTS: AtomicU64 = AtomicU64::new(0);
static CRASHES: AtomicU64 = AtomicU64::new(0);
static CHECKED: AtomicU64 = AtomicU64::new(0);
static TORN: AtomicU64 = AtomicU64::new(0);

/// One life of the machine: a simulator over the WAL and object directories as they are now.
struct Life {
    sim: Arc<SimFs>,
    engine: Engine,
}

/// A life on `sim`; with `shipped`, the volume ships its WAL to that backend (another
/// machine's: power cuts do not touch it), else its objects are files on the simulator.
async fn boot(dir: &Path, sim: Arc<SimFs>, shipped: &Option<SharedBackend>) -> Life {
    let fs = Fs::Sim(sim.clone());
    let mut config = common::small_config(dir);
    config.volume.fs = fs.clone();
    let backend: SharedBackend = match shipped {
        Some(b) => {
            config.volume.ship_wal = true;
            b.clone()
        }
        None => Arc::new(FileBackend::with_fs(dir.join("objects"), fs).expect("file backend")),
    };
    let engine = Engine::open(config, backend).await.expect("engine opens");
    Life { sim, engine }
}

fn new_sim(dir: &Path) -> Arc<SimFs> {
    SimFs::new(&[&dir.join("wal"), &dir.join("objects")]).expect("simulator")
}

fn run_case(ops: Vec<Op>, ship: bool) {
    common::run(Duration::from_secs(120), async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let shipped = ship.then(common::memory_backend);
        let mut life = boot(dir.path(), new_sim(dir.path()), &shipped).await;
        let id: VolumeId = life
            .engine
            .create_volume(SIZE, "power")
            .await
            .expect("create")
            .volume_id;
        let mut vol = life.engine.volume(&id).await.expect("open");
        // The volume's creation (its record and WAL directory) is durable from here on.
        let mut model = Model {
            history: vec![vec![0u8; SIZE as usize]],
            durable_writes: 0,
            pending_writes: 0,
        };
        for (i, op) in ops.into_iter().enumerate() {
            let what = format!("op {i} ({op:?})");
            match op {
                Op::Write { block, count, fua } => {
                    let data = pattern(i, count * 4096);
                    vol.write(block * 4096, Bytes::from(data.clone()), fua)
                        .await
                        .expect("write");
                    model.write((block * 4096) as usize, &data);
                    if fua {
                        model.durable();
                    }
                }
                Op::Flush => {
                    vol.flush().await.expect("flush");
                    model.durable();
                }
                Op::Persist => vol.persist_buffer().await.expect("persist"),
                Op::Crash => {
                    // The process dies; the simulator (the kernel's page cache and the disk)
                    // lives on into the next process.
                    drop(vol);
                    life.engine.simulate_crash().await;
                    life = boot(dir.path(), life.sim, &shipped).await;
                    vol = life.engine.volume(&id).await.expect("reopen after a crash");
                    let got = vol.read(0, SIZE).await.expect("read");
                    model.recovered(&got, &what);
                    CRASHES.fetch_add(1, Ordering::Relaxed);
                }
                Op::Cut { seed } => {
                    // The power goes at once: the disk keeps what the simulator decides, and the
                    // dying process's writes fail from then on.
                    let report = life.sim.power_cut(seed).expect("power cut");
                    drop(vol);
                    life.engine.simulate_crash().await;
                    life = boot(dir.path(), new_sim(dir.path()), &shipped).await;
                    vol = life
                        .engine
                        .volume(&id)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: reopen after a power cut: {e}"));
                    let got = vol.read(0, SIZE).await.expect("read");
                    model.recovered(&got, &what);
                    CUTS.fetch_add(1, Ordering::Relaxed);
                    CHECKED.fetch_add(model.durable_writes, Ordering::Relaxed);
                    TORN.fetch_add(report.writes_torn as u64, Ordering::Relaxed);
                    model.durable_writes = 0;
                }
            }
            let got = vol.read(0, SIZE).await.expect("check read");
            assert!(
                got[..] == model.current()[..],
                "{what}: the volume differs from the model"
            );
        }
        drop(vol);
        life.engine.close_all().await;
    });
}

#[test]
fn acknowledged_writes_survive_power_cuts() {
    power_cuts(false);
}

/// With `--ship-wal`: the flush's PUT and the local `fdatasync` run together, so a power cut
/// can take records from the local WAL that the backend holds; the next open takes them from
/// the backend, and the volume is again a state since the last flush.
#[test]
fn with_wal_shipping_acknowledged_writes_survive_power_cuts() {
    power_cuts(true);
}

fn power_cuts(ship: bool) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 100,
        ..ProptestConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        run_case(ops, ship);
        Ok(())
    });
    eprintln!(
        "power loss: {cases} cases, {} power cuts, {} process crashes, {} acknowledged writes checked after a cut, {} torn writes simulated",
        CUTS.load(Ordering::Relaxed),
        CRASHES.load(Ordering::Relaxed),
        CHECKED.load(Ordering::Relaxed),
        TORN.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        CUTS.load(Ordering::Relaxed) > 0,
        "no power cut was simulated"
    );
}

/// fsyncgate: after a failed `fdatasync` the page cache can no longer be trusted, so the volume
/// refuses every later write, FUA write and flush (even once the disk syncs again), keeps no
/// refused write in memory, still serves reads, and takes writes again only after a reopen
/// (which replays what really is on disk).
#[test]
fn a_failed_fdatasync_fails_the_volume_until_it_is_reopened() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let life = boot(dir.path(), new_sim(dir.path()), &None).await;
        let id = life
            .engine
            .create_volume(SIZE, "fsyncgate")
            .await
            .expect("create")
            .volume_id;
        let vol = life.engine.volume(&id).await.expect("open");
        let a = Bytes::from(vec![0xaa; 4096]);
        vol.write(0, a.clone(), false).await.expect("write");
        vol.flush().await.expect("flush");
        assert!(vol.failed().is_none());

        life.sim.fail_syncs(Some(dir.path()));
        vol.write(4096, Bytes::from(vec![0xbb; 4096]), false)
            .await
            .expect("a write before the failed sync is taken");
        assert!(vol.flush().await.is_err(), "the sync fails");
        assert!(vol.failed().is_some(), "the volume says it failed");
        life.sim.fail_syncs(None);
        for i in 0..64u64 {
            match vol
                .write(
                    (i % BLOCKS) * 4096,
                    Bytes::from(vec![0xcc; 4096]),
                    i % 2 == 0,
                )
                .await
            {
                Err(vblock::VolumeError::Failed(_)) => {}
                other => panic!("write {i} after a failed fdatasync: {other:?}"),
            }
        }
        assert!(
            vol.flush().await.is_err(),
            "a later sync that succeeds proves nothing about the pages the failed one dropped"
        );
        assert_eq!(
            vol.wal_stats().unwritten_bytes.load(Ordering::Relaxed),
            0,
            "refused writes are not kept"
        );
        assert_eq!(vol.read(0, 4096).await.expect("reads go on"), a);

        drop(vol);
        life.engine.simulate_crash().await;
        let life = boot(dir.path(), life.sim, &None).await;
        let vol = life.engine.volume(&id).await.expect("reopen");
        assert!(vol.failed().is_none(), "a reopen recovers");
        assert_eq!(vol.read(0, 4096).await.expect("read"), a);
        vol.write(0, Bytes::from(vec![0xdd; 4096]), true)
            .await
            .expect("writes are taken again");
        drop(vol);
        life.engine.close_all().await;
    });
}

/// A WAL disk slower than the writers (here one that stopped answering) holds writes back once
/// the WAL writer's backlog is full (`vblock::wal::MAX_UNWRITTEN_BYTES`), though the write
/// buffer has room: the backlog holds payloads the flusher may already have moved into chunks,
/// so without that bound memory grows with every write the disk is behind. Once the disk
/// answers again every write completes and reads back.
#[test]
fn a_slow_wal_disk_holds_writers_back_at_the_backlog_bound() {
    use vblock::wal::MAX_UNWRITTEN_BYTES;
    const MIB: u64 = 1 << 20;
    // More than the backlog holds, less than the write buffer.
    const WRITES: u64 = 48;
    const _: () = assert!(WRITES * MIB > MAX_UNWRITTEN_BYTES);
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let life = boot(dir.path(), new_sim(dir.path()), &None).await;
        let id = life
            .engine
            .create_volume(WRITES * MIB, "slow-wal")
            .await
            .expect("create")
            .volume_id;
        let vol = life.engine.volume(&id).await.expect("open");
        assert!(
            common::small_config(dir.path()).volume.buffer_bytes > WRITES * MIB,
            "the write buffer alone would take every write"
        );
        life.sim.hold_writes(Some(&dir.path().join("wal")));
        let done = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn({
            let (vol, done) = (vol.clone(), done.clone());
            async move {
                for i in 0..WRITES {
                    let data = Bytes::from(vec![i as u8 + 1; MIB as usize]);
                    vol.write(i * MIB, data, false).await.expect("write");
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let stats = vol.wal_stats();
        // Bounded by the test's time limit: the writer is held back, or (the defect) done.
        while stats.backlog_waits.load(Ordering::SeqCst) == 0
            && done.load(Ordering::SeqCst) < WRITES
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let unwritten = stats.unwritten_bytes.load(Ordering::SeqCst);
        assert!(
            done.load(Ordering::SeqCst) < WRITES,
            "every write was taken while the WAL disk took none ({unwritten} bytes unwritten)"
        );
        assert!(
            unwritten <= MAX_UNWRITTEN_BYTES,
            "{unwritten} bytes wait unwritten"
        );

        life.sim.hold_writes(None);
        writer.await.expect("writer task");
        assert_eq!(done.load(Ordering::SeqCst), WRITES);
        vol.flush().await.expect("flush");
        for i in 0..WRITES {
            let got = vol.read(i * MIB, 4096).await.expect("read");
            assert!(got.iter().all(|&b| b == i as u8 + 1), "MiB {i}");
        }
        drop(vol);
        life.engine.close_all().await;
    });
}

/// Compression that yields (docs/design/compression-that-yields.md): writers that outrun the
/// flusher (here its disk stopped answering for a while) fill the write buffer, and the chunks
/// built while it is more than half full are stored raw, even for data this compressible.
#[test]
fn chunks_built_behind_the_writers_are_stored_raw() {
    const MIB: u64 = 1 << 20;
    common::run(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let life = boot(dir.path(), new_sim(dir.path()), &None).await;
        let id = life
            .engine
            .create_volume(256 * MIB, "behind")
            .await
            .expect("create")
            .volume_id;
        let vol = life.engine.volume(&id).await.expect("open");
        let buffer = common::small_config(dir.path()).volume.buffer_bytes;
        life.sim.hold_writes(Some(&dir.path().join("objects")));
        let writer = tokio::spawn({
            let vol = vol.clone();
            async move {
                for i in 0..buffer / MIB + 40 {
                    let data = Bytes::from(vec![7u8; MIB as usize]);
                    vol.write(i * MIB, data, false).await.expect("write");
                }
            }
        });
        // Bounded by the test's time limit.
        while vol.buffered_bytes() < buffer * 3 / 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        life.sim.hold_writes(None);
        writer.await.expect("writer task");
        let raw = vol.stats().uncompressed_chunks.load(Ordering::SeqCst);
        let chunks = vol.stats().chunks.load(Ordering::SeqCst);
        println!("{raw} of {chunks} chunks stored raw");
        assert!(raw > 0, "no chunk was stored raw while the buffer was full");
        assert_eq!(
            vol.read(3 * MIB, 4096).await.expect("read"),
            Bytes::from(vec![7u8; 4096])
        );
        drop(vol);
        life.engine.close_all().await;
    });
}

/// A failed WAL `fdatasync` met by the flusher itself (the sync before a split memtable's first
/// commit) fails the volume instead of retrying for ever: a caller waiting for the buffer to
/// drain gets `VolumeError::Failed`, not a hang.
#[test]
fn a_failed_wal_sync_before_a_split_commit_fails_the_volume() {
    common::run(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let life = boot(dir.path(), new_sim(dir.path()), &None).await;
        let id = life
            .engine
            .create_volume(SIZE, "split")
            .await
            .expect("create")
            .volume_id;
        let vol = life.engine.volume(&id).await.expect("open");
        // Only the WAL's disk fails; chunk objects still store.
        life.sim.fail_syncs(Some(&dir.path().join("wal")));
        // 20 blocks: more than a 64 KiB chunk, so its memtable commits as a split.
        vol.write(0, Bytes::from(vec![0x77; 20 * 4096]), false)
            .await
            .expect("write");
        match vol.persist_buffer().await {
            Err(vblock::VolumeError::Failed(_)) => {}
            other => panic!("persist after the WAL failed: {other:?}"),
        }
        assert!(vol.failed().is_some());
        drop(vol);
        life.engine.simulate_crash().await;
    });
}

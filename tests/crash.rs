//! Crash-consistency harness (issue: reliability, "Crash harness"; run it longer with
//! `scripts/crash-test.sh [--long]`).
//!
//! Four NBD clients (a minimal client below: `NBD_OPT_EXPORT_NAME`, simple replies, `FUA`) write
//! runs of 4 KiB–1 MiB whose every 4 KiB carries (block number, generation, CRC), with `FUA` and
//! `NBD_CMD_FLUSH` at random, and record what the daemon acknowledged durable. Each iteration the
//! daemon dies: half the time by SIGKILL at a random moment, half the time by aborting at a named
//! crash point (src/failpoints.rs: WAL sync, rotation, trim, chunk upload, map commit) on its Nth
//! hit. It restarts (replaying its WAL) and every block is checked: each durably acknowledged
//! write is there or superseded by a later write of that block, and no block holds content that
//! was never written to it.
//!
//! `VBLOCK_CRASH_ITERATIONS` (default 200) and `VBLOCK_CRASH_SEED` (printed) repeat a run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::{wait_until, Daemon, Nats};
use common::metrics;
use rand::{Rng, SeedableRng};

const CLIENTS: u64 = 4;
const BLOCKS_PER_CLIENT: u64 = 512;
const BLOCK: usize = 4096;
/// Most bytes the data directory may hold after any iteration.
const DISK_BOUND: u64 = 256 << 20;

/// The smallest NBD client that can say `FUA` (NBD proto.md, "Transmission").
struct Client {
    s: TcpStream,
    cookie: u64,
}

impl Client {
    fn connect(port: u16, export: &str) -> std::io::Result<Self> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, then NBD_OPT_EXPORT_NAME.
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(export.len() as u32).to_be_bytes());
        b.extend_from_slice(export.as_bytes());
        s.write_all(&b)?;
        let mut size_flags = [0u8; 10];
        s.read_exact(&mut size_flags)?;
        Ok(Self { s, cookie: 0 })
    }

    /// Sends one request and waits for its simple reply; an NBD error is an `Err`.
    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply)?;
        let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        if reply[0..4] != 0x6744_6698u32.to_be_bytes() || reply[8..16] != self.cookie.to_be_bytes()
        {
            return Err(std::io::Error::other("bad reply"));
        }
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.request(u16::from(fua), 1, offset, data.len() as u32, data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.request(0, 3, 0, 0, &[])
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.request(0, 0, offset, buf.len() as u32, &[])?;
        self.s.read_exact(buf)
    }
}

fn block_content(block: u64, generation: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    rand::rngs::StdRng::seed_from_u64(block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation)
        .fill(&mut b[16..BLOCK - 4]);
    let crc = crc32fast::hash(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// (block, generation) if `b` is an intact block written by this test; None for zeros.
fn decode(b: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if vblock::block::is_zero(b) {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([b[BLOCK - 4], b[BLOCK - 3], b[BLOCK - 2], b[BLOCK - 1]]);
    if crc32fast::hash(&b[..BLOCK - 4]) != crc {
        return Err("checksum mismatch: torn or foreign content".into());
    }
    let block = u64::from_le_bytes(b[0..8].try_into().map_err(|_| "short")?);
    let generation = u64::from_le_bytes(b[8..16].try_into().map_err(|_| "short")?);
    Ok(Some((block, generation)))
}

#[derive(Default)]
struct Record {
    /// Every generation ever sent per block (acknowledged or in flight at the crash).
    attempted: HashMap<u64, Vec<u64>>,
    /// Newest durably acknowledged generation per block (FUA write, or acked before a flush).
    durable: HashMap<u64, u64>,
    writes_acked: u64,
    fua_writes: u64,
    flushes: u64,
}

impl Record {
    fn make_durable(&mut self, acked: impl IntoIterator<Item = (u64, u64)>) {
        for (b, g) in acked {
            let d = self.durable.entry(b).or_default();
            *d = (*d).max(g);
        }
    }
}

/// Blocks per write: mostly 4 KiB, some up to 64 KiB, some up to 1 MiB.
fn run_len(rng: &mut impl Rng) -> u64 {
    match rng.gen_range(0..100) {
        0..=59 => 1,
        60..=84 => rng.gen_range(2..=16),
        _ => rng.gen_range(17..=256),
    }
}

fn workload(
    port: u16,
    vol: String,
    id: u64,
    seed: u64,
    record: Arc<Mutex<Record>>,
    generation: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ id);
    let Ok(mut c) = Client::connect(port, &vol) else {
        return; // the daemon already died
    };
    let base = id * BLOCKS_PER_CLIENT;
    let mut acked_since_flush: Vec<(u64, u64)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let run = run_len(&mut rng);
        let first = base + rng.gen_range(0..=BLOCKS_PER_CLIENT - run);
        let gens: Vec<u64> = (0..run)
            .map(|_| generation.fetch_add(1, Ordering::SeqCst))
            .collect();
        let mut data = Vec::with_capacity(run as usize * BLOCK);
        {
            let mut r = record.lock().expect("lock");
            for (i, g) in gens.iter().enumerate() {
                r.attempted.entry(first + i as u64).or_default().push(*g);
                data.extend(block_content(first + i as u64, *g));
            }
        }
        let fua = rng.gen_bool(0.1);
        if c.write(first * BLOCK as u64, &data, fua).is_err() {
            return; // the daemon died
        }
        let acked = gens.iter().enumerate().map(|(i, g)| (first + i as u64, *g));
        {
            let mut r = record.lock().expect("lock");
            r.writes_acked += 1;
            if fua {
                r.fua_writes += 1;
                r.make_durable(acked);
            } else {
                acked_since_flush.extend(acked);
            }
        }
        if rng.gen_bool(0.1) {
            if c.flush().is_err() {
                return;
            }
            let mut r = record.lock().expect("lock");
            r.flushes += 1;
            r.make_durable(acked_since_flush.drain(..));
        }
    }
}

/// Reads every block back and checks it against the record; returns blocks checked.
fn check(d: &Daemon, vol: &str, r: &Record, it: usize, how: &str) -> u64 {
    let mut c = Client::connect(d.nbd_port, vol).expect("connect after restart");
    let mut all = vec![0u8; (CLIENTS * BLOCKS_PER_CLIENT) as usize * BLOCK];
    for (i, piece) in all.chunks_mut(1 << 20).enumerate() {
        c.read((i << 20) as u64, piece).expect("read back");
    }
    let mut checked = 0;
    for block in 0..CLIENTS * BLOCKS_PER_CLIENT {
        let got = &all[block as usize * BLOCK..(block as usize + 1) * BLOCK];
        let durable = r.durable.get(&block).copied().unwrap_or(0);
        let attempted = r.attempted.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        let at = format!("iteration {it} ({how}), block {block}");
        match decode(got) {
            Err(e) => panic!("{at}: {e}"),
            Ok(None) => assert_eq!(
                durable, 0,
                "{at}: durable generation {durable} lost (reads zeros)"
            ),
            Ok(Some((b, g))) => {
                assert_eq!(b, block, "{at}: holds block {b}'s data");
                assert!(
                    attempted.contains(&g),
                    "{at}: generation {g} was never written here"
                );
                assert!(
                    g >= durable,
                    "{at}: generation {g} older than durable {durable}"
                );
            }
        }
        checked += 1;
    }
    checked
}

#[test]
fn crashes_anywhere_lose_no_durable_write_and_invent_no_data() {
    harness(&[], "VBLOCK_CRASH_ITERATIONS", 200, false);
}

/// The same with `--ship-wal`, and every third iteration the data directory's metadata and WAL
/// are lost as well (the file backend's objects stay): the daemon recovers the volume from its
/// chunks and shipped WAL objects, and still every flushed or FUA write is there. Crash points
/// include shipping's (`ship-before-put`, `ship-after-put`). `VBLOCK_SHIP_CRASH_ITERATIONS`
/// (default 60).
#[test]
fn with_wal_shipping_crashes_and_lost_disks_lose_no_durable_write() {
    harness(&["--ship-wal"], "VBLOCK_SHIP_CRASH_ITERATIONS", 60, true);
}

/// The crash harness: `extra` daemon flags, iterations from `iterations_var` (else
/// `default_iterations`); with `lose_disks`, every third iteration also deletes `DATA_DIR/meta`
/// and `DATA_DIR/wal` before the restart.
fn harness(extra: &[&str], iterations_var: &str, default_iterations: u64, lose_disks: bool) {
    let nats = Nats::start();
    // Small chunks and segments, so crash points in chunk upload, map commit, WAL rotation and
    // trim are reached within a few hundred writes. A small write buffer (about the least that
    // takes 32 MiB requests) bounds the WAL, and so the disk the test takes, when the clients
    // outrun the flusher of a debug build (256 MiB of WAL filled a CI machine's disk), and
    // garbage collection runs often enough to delete dead chunks between kills (it also puts
    // kills inside collections).
    let mut args = vec![
        "--chunk-size",
        "256KiB",
        "--wal-segment-size",
        "1MiB",
        "--buffer-size",
        "66MiB",
        "--gc-interval",
        "50ms",
    ];
    args.extend_from_slice(extra);
    let mut d = Daemon::start_with(&nats.url(), &args);
    // The export name of the mounted volume: its mount (and secret) outlives every kill, but
    // not a lost data directory (the recovered volume is mounted again).
    let id = d.create_volume(1);
    let mut vol = d.export(&id);
    let mut disks_lost = 0u32;
    let env_num = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let iterations = env_num(iterations_var).unwrap_or(default_iterations) as usize;
    let seed = env_num("VBLOCK_CRASH_SEED").unwrap_or_else(rand::random);
    println!("seed {seed} (rerun with VBLOCK_CRASH_SEED={seed}), {iterations} iterations");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let record = Arc::new(Mutex::new(Record::default()));
    let generation = Arc::new(AtomicU64::new(1));
    // Per crash point: (armed, fired).
    let mut points: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    let (mut kills, mut blocks_checked, mut disk_peak) = (0u32, 0u64, 0u64);
    for it in 0..iterations {
        d.kill9();
        let point = rng
            .gen_bool(0.5)
            .then(|| vblock::failpoints::NAMES[rng.gen_range(0..vblock::failpoints::NAMES.len())]);
        let spec = point.map(|p| format!("{p}={}*off->return", rng.gen_range(0..6)));
        match &spec {
            Some(spec) => d.set_envs(&[("VBLOCK_FAILPOINTS", spec)]),
            None => d.set_envs(&[]),
        }
        d.start_again();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let (vol, record, generation, stop) = (
                    vol.clone(),
                    record.clone(),
                    generation.clone(),
                    stop.clone(),
                );
                let (port, seed) = (d.nbd_port, rng.gen());
                std::thread::spawn(move || workload(port, vol, id, seed, record, generation, stop))
            })
            .collect();
        let target = record.lock().expect("lock").writes_acked + rng.gen_range(20..400);
        let finished = wait_until(Duration::from_secs(60), || {
            d.exited().is_some()
                || record
                    .lock()
                    .map(|r| r.writes_acked >= target)
                    .unwrap_or(true)
        });
        assert!(
            finished,
            "iteration {it}: workload stalled; log:\n{}",
            d.log()
        );
        let fired = d.exited().is_some();
        let log = d.log();
        if let Some(p) = point {
            let e = points.entry(p).or_default();
            e.0 += 1;
            if fired {
                assert!(
                    log.contains(&format!("fail point {p}: aborting")),
                    "iteration {it}: daemon died, not at {p}:\n{log}"
                );
                e.1 += 1;
            }
        } else {
            assert!(!fired, "iteration {it}: the daemon died on its own:\n{log}");
        }
        if !fired {
            kills += 1;
        }
        d.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().expect("client thread");
        }
        // Restart without crash points: the WAL replays, then every block is checked.
        let lose = lose_disks && it % 3 == 2;
        if lose {
            for sub in ["meta", "wal"] {
                std::fs::remove_dir_all(d.data_dir().join(sub)).expect("lose the disk");
            }
            disks_lost += 1;
        }
        d.set_envs(&[]);
        d.start_again();
        if lose {
            vol = d.export(&id);
        }
        let how = match (point, fired) {
            (Some(p), true) => format!("abort at {p}"),
            _ => "kill -9".to_string(),
        } + if lose { ", disks lost" } else { "" };
        blocks_checked += check(&d, &vol, &record.lock().expect("lock"), it, &how);
        // The disk is measured once a garbage-collection pass started after the check has
        // completed: what the crashes left dead is gone then, while a leak stays.
        let passes = || {
            metrics::value(
                &metrics::scrape(d.metrics_port),
                "vblock_gc_passes_total",
                &[],
            )
        };
        let after = passes() + 2.0;
        assert!(
            wait_until(Duration::from_secs(30), || passes() >= after),
            "iteration {it}: no garbage collection pass completed; log:\n{}",
            d.log()
        );
        disk_peak = disk_peak.max(disk_bytes(&d.data_dir()));
    }
    let r = record.lock().expect("lock");
    println!(
        "{iterations} iterations, 0 failures: {} writes acknowledged ({} FUA), {} flushes, {kills} kill -9, {disks_lost} disks lost, {blocks_checked} blocks checked",
        r.writes_acked, r.fua_writes, r.flushes
    );
    for (p, (armed, fired)) in &points {
        println!("  crash point {p:<18} armed {armed:>3}, fired {fired:>3}");
    }
    println!("  data directory peak {} MiB", disk_peak >> 20);
    let fired: u32 = points.values().map(|v| v.1).sum();
    assert!(fired > 0 || iterations < 20, "no crash point ever fired");
    // Crashes must not leak disk: the WAL is bounded by the write buffer and dead chunks are
    // collected, so the data directory stays near buffer + live data (8 MiB) + chunk backlog.
    assert!(
        disk_peak < DISK_BOUND,
        "the data directory grew to {} MiB (bound {} MiB)",
        disk_peak >> 20,
        DISK_BOUND >> 20
    );
}

/// Bytes of the files under `dir` (files deleted meanwhile count as 0).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

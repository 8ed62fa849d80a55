//! kill -9 of the daemon during a write + flush workload (issue: the daemon end to end, step 7).
//!
//! Four independent NBD clients (the `nbd` crate: NBD_OPT_EXPORT_NAME, simple replies) write
//! 4 KiB and 64 KiB blocks whose every 4 KiB carries (block number, generation, checksum), flush
//! every few writes and record what the daemon acknowledged. The daemon is killed with SIGKILL at
//! a random moment, restarted, and every block is checked: it holds a generation at least as new
//! as the last one acknowledged before a completed flush, and only ever content that was written
//! to that block.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::{nbd_client, wait_until, Daemon, Nats};
use rand::{Rng, SeedableRng};

const CLIENTS: u64 = 4;
const BLOCKS_PER_CLIENT: u64 = 512;

fn block_content(block: u64, generation: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation;
    for chunk in b[16..4092].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let crc = crc32fast::hash(&b[..4092]);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// (block, generation) if `b` is an intact block written by this test; None for zeros.
fn decode(b: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if vblock::block::is_zero(b) {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([b[4092], b[4093], b[4094], b[4095]]);
    if crc32fast::hash(&b[..4092]) != crc {
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
    /// Newest generation per block acknowledged before a completed flush.
    durable: HashMap<u64, u64>,
    writes_acked: u64,
    flushes: u64,
}

fn client(port: u16, vol: &str) -> nbd::client::NbdClient<TcpStream> {
    nbd_client(port, vol, Duration::from_secs(30))
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
    let mut c = client(port, &vol);
    let base = id * BLOCKS_PER_CLIENT;
    let mut acked_since_flush: Vec<(u64, u64)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let run = if rng.gen_bool(0.2) { 16 } else { 1 };
        let first = base + rng.gen_range(0..BLOCKS_PER_CLIENT - run);
        let gens: Vec<u64> = (0..run)
            .map(|_| generation.fetch_add(1, Ordering::SeqCst))
            .collect();
        let mut data = Vec::with_capacity(run as usize * 4096);
        {
            let mut r = record.lock().expect("lock");
            for (i, g) in gens.iter().enumerate() {
                r.attempted.entry(first + i as u64).or_default().push(*g);
                data.extend(block_content(first + i as u64, *g));
            }
        }
        if c.seek(SeekFrom::Start(first * 4096)).is_err() || c.write(&data).is_err() {
            return; // the daemon died
        }
        record.lock().expect("lock").writes_acked += 1;
        acked_since_flush.extend(gens.iter().enumerate().map(|(i, g)| (first + i as u64, *g)));
        if rng.gen_bool(0.15) {
            if c.flush().is_err() {
                return;
            }
            let mut r = record.lock().expect("lock");
            r.flushes += 1;
            for (b, g) in acked_since_flush.drain(..) {
                let d = r.durable.entry(b).or_default();
                *d = (*d).max(g);
            }
        }
    }
}

#[test]
fn kill9_during_write_and_flush_loses_no_acknowledged_write() {
    let nats = Nats::start();
    // Small chunks so the kill also lands during chunk writes and WAL trims.
    let mut d = Daemon::start_with(
        &nats.url(),
        &["--chunk-size", "256KiB", "--wal-segment-size", "1MiB"],
    );
    let vol = d.create_volume(1);
    let seed: u64 = std::env::var("VBLOCK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (rerun with VBLOCK_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let record = Arc::new(Mutex::new(Record::default()));
    let generation = Arc::new(AtomicU64::new(1));
    let iterations = 10;
    for it in 0..iterations {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let (vol, record, generation, stop) = (
                    vol.clone(),
                    record.clone(),
                    generation.clone(),
                    stop.clone(),
                );
                let port = d.nbd_port;
                let seed = rng.gen();
                std::thread::spawn(move || workload(port, vol, id, seed, record, generation, stop))
            })
            .collect();
        let target = record.lock().expect("lock").writes_acked + rng.gen_range(500..5000);
        assert!(
            wait_until(Duration::from_secs(60), || record
                .lock()
                .map(|r| r.writes_acked >= target)
                .unwrap_or(true)),
            "workload stalled"
        );
        d.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().expect("client thread");
        }
        d.start_again();
        // Check every block of every client.
        let r = record.lock().expect("lock");
        let mut c = client(d.nbd_port, &vol);
        let mut all = vec![0u8; (CLIENTS * BLOCKS_PER_CLIENT * 4096) as usize];
        c.seek(SeekFrom::Start(0)).expect("seek");
        for piece in all.chunks_mut(1 << 20) {
            c.read_exact(piece).expect("read back");
        }
        let mut checked = 0;
        for block in 0..CLIENTS * BLOCKS_PER_CLIENT {
            let got = &all[(block * 4096) as usize..((block + 1) * 4096) as usize];
            let durable = r.durable.get(&block).copied().unwrap_or(0);
            let attempted = r.attempted.get(&block).map(Vec::as_slice).unwrap_or(&[]);
            match decode(got) {
                Err(e) => panic!("iteration {it}, block {block}: {e}"),
                Ok(None) => assert_eq!(durable, 0, "iteration {it}, block {block}: durable generation {durable} lost (reads zeros)"),
                Ok(Some((b, g))) => {
                    assert_eq!(b, block, "iteration {it}: block {block} holds block {b}'s data");
                    assert!(attempted.contains(&g), "iteration {it}, block {block}: generation {g} was never written here");
                    assert!(g >= durable, "iteration {it}, block {block}: generation {g} older than durable {durable}");
                }
            }
            checked += 1;
        }
        println!("iteration {it}: {} writes acknowledged, {} flushes so far; {checked} blocks checked after kill -9", r.writes_acked, r.flushes);
    }
    let log = d.log();
    assert!(log.contains("vblock serving"));
}

//! Map lookups of one block (`BlockLookup::lookup`), the read path's RocksDB work per 4 KiB read.
//! A 1 GiB volume's map as a sequential write leaves it (256 chunks of 256 extents of 16 KiB),
//! then `N` (default 300,000) random one-block lookups, with the map in the memtable and, after a
//! flush, in SST files. Prints microseconds per lookup. Then `COMMITS` (default 100) chunk
//! commits of 1,024 scattered blocks each. Wall time on a shared VM is noisy; for comparisons
//! count instructions instead (docs/BENCHMARKS.md, "Random reads"):
//! `N=20000 COMMITS=0 valgrind --tool=callgrind target/release/deps/lookup-*` minus the same with
//! `N=0` (or `N=0 COMMITS=100` minus `N=0 COMMITS=0` for the commits).

use std::time::Instant;

use vblock::chunk::FrameEncoding;
use vblock::ids::VolumeId;
use vblock::lookup::{BlockLookup, ChunkCommit, FrameRef, MapExtent, Target};
use vblock::meta::{MetaStore, VolumeState};

/// `name` from the environment as a number, else `default`.
fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The next pseudo-random block of the 1 GiB volume (a 64-bit LCG in `x`).
fn random_block(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*x >> 33) % (1 << 18)
}

/// Commits `(start, count, seq)` extents as chunk `object_id`, stored back to back from offset 64.
fn commit(map: &BlockLookup, object_id: u64, extents: impl Iterator<Item = (u64, u64, u64)>) {
    let mut offset = 64;
    let extents = extents
        .map(|(start, count, seq)| {
            let len = count as u32 * 4096;
            offset += len;
            MapExtent {
                start,
                count,
                seq,
                target: Target::Data(FrameRef {
                    owner: 0xa,
                    object_id,
                    first_block: start,
                    blocks: count as u32,
                    offset: offset - len,
                    len,
                    crc: 1,
                    encoding: FrameEncoding::Raw,
                }),
            }
        })
        .collect();
    let commit = ChunkCommit {
        object_id,
        extents,
        stored_bytes: 4 << 20,
    };
    map.commit_chunk(&commit, VolumeState::default())
        .expect("commit");
}

fn main() {
    let n = env("N", 300_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = MetaStore::open(dir.path(), 64 << 20).expect("meta");
    let vol = VolumeId::parse("vol-0000000000000000a").expect("id");
    let map = BlockLookup::new(meta.clone(), vol);
    for obj in 0..256u64 {
        commit(
            &map,
            obj + 1,
            (0..256u64).map(|i| (obj * 1024 + i * 4, 4, obj * 256 + i + 1)),
        );
    }
    let mut x = 12345u64;
    for place in ["memtable", "SST files"] {
        if place == "SST files" {
            meta.flush().expect("flush");
        }
        let t = Instant::now();
        let mut found = 0;
        for _ in 0..n {
            let b = random_block(&mut x);
            found += map.lookup(b, b + 1).expect("lookup").len();
        }
        assert_eq!(found as u64, n, "every block is mapped");
        let us = t.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
        println!("map in the {place}: {us:.2} us per one-block lookup ({n} lookups)");
    }
    // Chunk commits of scattered 4 KiB writes (what the flusher does after random writes): each
    // chunk holds 1,024 single-block extents at random places, so the commit resolves ~1,000
    // separate runs against the map.
    let commits = env("COMMITS", 100);
    let t = Instant::now();
    for c in 0..commits {
        let mut blocks: Vec<u64> = (0..1024).map(|_| random_block(&mut x)).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let seqs = (0..).map(|i| 1_000_000 + c * 1024 + i);
        commit(
            &map,
            1000 + c,
            blocks.iter().zip(seqs).map(|(&start, seq)| (start, 1, seq)),
        );
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / commits.max(1) as f64;
    println!("{us:.0} us per chunk commit of 1,024 scattered blocks ({commits} commits, synced)");
}

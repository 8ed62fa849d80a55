//! Map lookups of one block (`BlockLookup::lookup`), the read path's RocksDB work per 4 KiB read.
//! A 1 GiB volume's map as a sequential write leaves it (256 chunks of 256 extents of 16 KiB),
//! then `N` (default 300,000) random one-block lookups, with the map in the memtable and, after a
//! flush, in SST files. Prints microseconds per lookup. Then `COMMITS` (default 100) chunk
//! commits of 1,024 scattered blocks each. Wall time on a shared VM is noisy; for comparisons
//! count instructions instead (docs/BENCHMARKS.md, "Map lookups in one direction"):
//! `N=20000 COMMITS=0 valgrind --tool=callgrind target/release/deps/lookup-*` minus the same with
//! `N=0` (or `N=0 COMMITS=100` minus `N=0 COMMITS=0` for the commits).

use std::time::Instant;

use vblock::chunk::FrameEncoding;
use vblock::ids::VolumeId;
use vblock::lookup::{BlockLookup, ChunkCommit, FrameRef, MapExtent, Target};
use vblock::meta::{MetaStore, VolumeState};

fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = MetaStore::open(dir.path(), 64 << 20).expect("meta");
    let vol = VolumeId::parse("vol-0000000000000000a").expect("id");
    let map = BlockLookup::new(meta.clone(), vol);
    for obj in 0..256u64 {
        let extents = (0..256u64)
            .map(|i| {
                let start = obj * 1024 + i * 4;
                MapExtent {
                    start,
                    count: 4,
                    seq: obj * 256 + i + 1,
                    target: Target::Data(FrameRef {
                        owner: 0xa,
                        object_id: obj + 1,
                        first_block: start,
                        blocks: 4,
                        offset: 64,
                        len: 16384,
                        crc: 1,
                        encoding: FrameEncoding::Raw,
                    }),
                }
            })
            .collect();
        let commit = ChunkCommit {
            object_id: obj + 1,
            extents,
            stored_bytes: 4 << 20,
        };
        map.commit_chunk(&commit, VolumeState::default())
            .expect("commit");
    }
    let mut x = 12345u64;
    for place in ["memtable", "SST files"] {
        if place == "SST files" {
            meta.flush().expect("flush");
        }
        let t = Instant::now();
        let mut found = 0;
        for _ in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = (x >> 33) % (1 << 18);
            found += map.lookup(b, b + 1).expect("lookup").len();
        }
        assert_eq!(found as u64, n, "every block is mapped");
        let us = t.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
        println!("map in the {place}: {us:.2} us per one-block lookup ({n} lookups)");
    }
    // Chunk commits of scattered 4 KiB writes (what the flusher does after random writes): each
    // chunk holds 1,024 single-block extents at random places, so the commit resolves ~1,000
    // separate runs against the map.
    let commits: u64 = std::env::var("COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let t = Instant::now();
    for c in 0..commits {
        let mut blocks: Vec<u64> = (0..1024)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) % (1 << 18)
            })
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let object_id = 1000 + c;
        let extents = blocks
            .iter()
            .enumerate()
            .map(|(i, &start)| MapExtent {
                start,
                count: 1,
                seq: 1_000_000 + c * 1024 + i as u64,
                target: Target::Data(FrameRef {
                    owner: 0xa,
                    object_id,
                    first_block: start,
                    blocks: 1,
                    offset: 64 + i as u32 * 4096,
                    len: 4096,
                    crc: 1,
                    encoding: FrameEncoding::Raw,
                }),
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
    let us = t.elapsed().as_secs_f64() * 1e6 / commits.max(1) as f64;
    println!("{us:.0} us per chunk commit of 1,024 scattered blocks ({commits} commits, synced)");
}

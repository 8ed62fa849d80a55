//! Chunk builds (`chunk::build`), the flusher's CPU work per 4 MiB object. 256 MiB of input,
//! cycled through so each build reads memory the CPU cache does not hold (as the write buffer's
//! payloads are), built into one reused object buffer (as the flusher's `ObjectBuffers` do).
//! Prints microseconds per chunk and MB/s for random data (stored raw) and for text-like data
//! (compressed). `ROUNDS` (default 3) passes over the input.

use std::time::Instant;

use bytes::Bytes;
use rand::RngCore;
use vblock::chunk::{build, ChunkOptions, InputExtent, ObjectBuffers};

const INPUT_MIB: usize = 256;

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut random = vec![0u8; INPUT_MIB << 20];
    rand::thread_rng().fill_bytes(&mut random);
    // Text-like: words from a small vocabulary, compresses ~3x with zstd -1.
    let words = [
        "block", "chunk", "extent", "volume", "sequence", "frame", "the", "of", "4096",
    ];
    let mut text = Vec::with_capacity(INPUT_MIB << 20);
    let mut x = 1u64;
    while text.len() < INPUT_MIB << 20 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.extend_from_slice(words[(x >> 59) as usize % words.len()].as_bytes());
        text.push(b' ');
    }
    text.truncate(INPUT_MIB << 20);
    for (name, data) in [
        ("random (raw frames)", random),
        ("text (zstd frames)", text),
    ] {
        let data = Bytes::from(data);
        let buffers = ObjectBuffers::new(1);
        let mut stored = 0usize;
        let t = Instant::now();
        let chunks = rounds * INPUT_MIB / 4;
        for c in 0..chunks {
            let base = (c % (INPUT_MIB / 4)) * (4 << 20);
            let input: Vec<InputExtent> = (0..4)
                .map(|i| {
                    let at = base + i * (1 << 20);
                    InputExtent {
                        start_block: (at / 4096) as u64,
                        block_count: 256,
                        seq: (c * 4 + i) as u64 + 1,
                        data: Some(data.slice(at..at + (1 << 20))),
                    }
                })
                .collect();
            let (object, _) = build(
                1,
                c as u64 + 1,
                &input,
                ChunkOptions::default(),
                buffers.take(),
            )
            .expect("build");
            stored += object.len();
            buffers.give(object);
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{name}: {:.0} us per 4 MiB chunk, {:.0} MB/s ({chunks} chunks, {:.2}x)",
            secs * 1e6 / chunks as f64,
            (chunks * (4 << 20)) as f64 / secs / 1e6,
            (chunks * (4 << 20)) as f64 / stored as f64
        );
    }
}

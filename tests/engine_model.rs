//! Property test: random write / trim / write-zeroes / flush / read / reopen / crash sequences on
//! a volume, checked against an in-memory model. After a crash (no flush; WAL cut at a random
//! byte past the last sync) the volume must equal the model at some point between the last
//! durable point and the crash: every write acknowledged before the last flush, or with FUA, is
//! present, and nothing that was never written appears.

mod common;

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use vblock::VolumeId;

const BLOCKS: u64 = 48;
const SIZE: u64 = BLOCKS * 4096;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, fua: bool },
    Trim { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Flush,
    Read { offset: u64, len: u64 },
    Persist,
    Reopen,
    Crash { cut: u64 },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Aligned.
        (0..BLOCKS, 1..9u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
        // Anywhere.
        (0..SIZE, 1..5 * 4096u64),
        // Larger than a chunk (64 KiB in these tests): one memtable spans several chunk objects.
        (0..BLOCKS - 24, 17..25u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
    ]
    .prop_map(|(o, l)| (o, l.min(SIZE - o).max(1)))
    .prop_filter("inside", |(o, l)| o + l <= SIZE)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<bool>()).prop_map(|((offset, len), f)| Op::Write { offset, len, fua: f && offset % 3 == 0 }),
        2 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => range().prop_map(|(offset, len)| Op::WriteZeroes { offset, len }),
        2 => Just(Op::Flush),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Persist),
        1 => Just(Op::Reopen),
        2 => any::<u64>().prop_map(|cut| Op::Crash { cut }),
    ]
}

/// The model: current bytes plus every state since the last durable point.
struct Model {
    history: Vec<Vec<u8>>,
}

impl Model {
    fn current(&mut self) -> &mut Vec<u8> {
        self.history.last_mut().expect("history never empty")
    }
    /// One WAL record's worth of change: a new candidate crash state.
    fn step(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut next = self.history.last().expect("history").clone();
        f(&mut next);
        self.history.push(next);
    }
    fn durable(&mut self) {
        let cur = self.history.pop().expect("history");
        self.history = vec![cur];
    }
}

fn pattern(op_index: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (op_index as u64 * 131 + i * 7 + 1) as u8 | 1)
        .collect()
}

fn run_case(ops: Vec<Op>) {
    common::run(Duration::from_secs(60), async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::memory_backend();
        let mut engine = common::open_engine(dir.path(), &backend).await;
        let rec = engine.create_volume(SIZE, "model").await.expect("create");
        let id: VolumeId = rec.volume_id;
        let mut vol = engine.volume(&id).await.expect("open");
        let mut model = Model {
            history: vec![vec![0u8; SIZE as usize]],
        };
        for (i, op) in ops.into_iter().enumerate() {
            let what = format!("{op:?}");
            match op {
                Op::Write { offset, len, fua } => {
                    let data = pattern(i, len);
                    vol.write(offset, Bytes::from(data.clone()), fua)
                        .await
                        .expect("write");
                    model.step(|m| {
                        m[offset as usize..(offset + len) as usize].copy_from_slice(&data)
                    });
                    if fua {
                        model.durable();
                    }
                }
                Op::Trim { offset, len } => {
                    vol.trim(offset, len).await.expect("trim");
                    let s = offset.div_ceil(4096) * 4096;
                    let e = (offset + len) / 4096 * 4096;
                    if s < e {
                        model.step(|m| m[s as usize..e as usize].fill(0));
                    }
                }
                Op::WriteZeroes { offset, len } => {
                    vol.write_zeroes(offset, len, false)
                        .await
                        .expect("write_zeroes");
                    // Same record order as the engine: whole blocks, head, tail.
                    let end = offset + len;
                    let s = offset.div_ceil(4096) * 4096;
                    let e = end / 4096 * 4096;
                    if s >= e {
                        model.step(|m| m[offset as usize..end as usize].fill(0));
                    } else {
                        model.step(|m| m[s as usize..e as usize].fill(0));
                        if s > offset {
                            model.step(|m| m[offset as usize..s as usize].fill(0));
                        }
                        if end > e {
                            model.step(|m| m[e as usize..end as usize].fill(0));
                        }
                    }
                }
                Op::Flush => {
                    vol.flush().await.expect("flush");
                    model.durable();
                }
                Op::Read { offset, len } => {
                    let got = vol.read(offset, len).await.expect("read");
                    let want = &model.current()[offset as usize..(offset + len) as usize];
                    assert_eq!(&got[..], want, "op {i}: read {offset}+{len}");
                }
                Op::Persist => {
                    vol.persist_buffer().await.expect("persist");
                }
                Op::Reopen => {
                    drop(vol);
                    engine.close_all().await;
                    drop(engine);
                    engine = common::open_engine(dir.path(), &backend).await;
                    vol = engine.volume(&id).await.expect("reopen");
                    model.durable();
                }
                Op::Crash { cut } => {
                    // Stop the WAL writer first: the durable position is final only then (a
                    // rotation syncs and closes a segment, moving the position to the next one).
                    vol.simulate_crash().await;
                    let pos = vol.wal_durable_position();
                    drop(vol);
                    engine.simulate_crash().await;
                    // Lose a random part of the unsynced WAL tail: cut off (a growing segment)
                    // or zeroed (a preallocated one keeps its length and reads back its zeros).
                    let seg = dir
                        .path()
                        .join("wal")
                        .join(id.as_str())
                        .join(format!("{:016x}.wal", pos.segment_no));
                    if let Ok(meta) = std::fs::metadata(&seg) {
                        let len = meta.len();
                        if len > pos.offset {
                            let keep = pos.offset + cut % (len - pos.offset + 1);
                            let f = std::fs::OpenOptions::new()
                                .write(true)
                                .open(&seg)
                                .expect("open segment");
                            if cut >> 63 == 0 {
                                f.set_len(keep).expect("truncate");
                            } else {
                                use std::os::unix::fs::FileExt;
                                let zeros = vec![0u8; (len - keep) as usize];
                                f.write_all_at(&zeros, keep).expect("zero the tail");
                            }
                        }
                    }
                    engine = common::open_engine(dir.path(), &backend).await;
                    vol = engine.volume(&id).await.expect("reopen after crash");
                    let got = vol.read(0, SIZE).await.expect("full read");
                    let matched = model.history.iter().rposition(|h| h[..] == got[..]);
                    let Some(k) = matched else {
                        let durable = &model.history[0];
                        let first_bad = (0..SIZE as usize).find(|&b| got[b] != durable[b]);
                        panic!("op {i}: state after crash matches no acknowledged prefix; first byte differing from the durable state: {first_bad:?}");
                    };
                    let state = model.history.swap_remove(k);
                    model.history = vec![state];
                }
            }
            let got = vol.read(0, SIZE).await.expect("check read");
            if got[..] != model.current()[..] {
                let bad: Vec<usize> = (0..BLOCKS as usize)
                    .filter(|&b| {
                        got[b * 4096..(b + 1) * 4096] != model.current()[b * 4096..(b + 1) * 4096]
                    })
                    .collect();
                panic!("op {i} ({what}): volume differs from model in blocks {bad:?}");
            }
        }
        let got = vol.read(0, SIZE).await.expect("final read");
        assert!(got[..] == model.current()[..], "final state differs");
        drop(vol);
        engine.close_all().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn volume_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run_case(ops);
    }
}

//! The block map's RocksDB files damaged on disk (issue: reliability, "Torn and corrupt media",
//! RocksDB-adjacent files): bit flips in table files, the MANIFEST and RocksDB's own log, and a
//! map rolled back behind the WAL. Every outcome must be a refused open or reads that return
//! either the written data or an error, never other data and never a vanished volume.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use vblock::backend::SharedBackend;
use vblock::wal::WalError;
use vblock::{Engine, VolumeError, VolumeId};

const BLOCKS: u64 = 256;

/// Block `b` of generation `gen`: every byte says which block and generation it is.
fn content(gen: u8, b: u64) -> Vec<u8> {
    let mut v = vec![gen; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v
}

/// The file backend where the daemon (and `vblock fsck`) keeps it: `DATA_DIR/objects`.
fn file_backend(data: &Path) -> SharedBackend {
    std::sync::Arc::new(
        vblock::backend::file::FileBackend::new(data.join("objects")).expect("file backend"),
    )
}

async fn open(dir: &Path, backend: &SharedBackend) -> Result<Engine, VolumeError> {
    let mut config = common::small_config(dir);
    config.volume.idle_flush = Duration::from_secs(3600);
    Engine::open(config, backend.clone()).await
}

/// Writes generation `gen` of every block as single-block writes in a scattered order (many map
/// extents, several chunks), then moves it all into chunks.
async fn write_generation(engine: &Engine, id: &VolumeId, gen: u8) {
    let vol = engine.volume(id).await.expect("volume");
    for i in 0..BLOCKS {
        let b = (i * 97) % BLOCKS;
        vol.write(b * 4096, Bytes::from(content(gen, b)), false)
            .await
            .expect("write");
    }
    vol.persist_buffer().await.expect("into chunks");
}

/// Reads every block; returns how many reads failed. Panics on a block holding anything but
/// generation `gen`.
async fn check(engine: &Engine, id: &VolumeId, gen: u8, what: &str) -> Result<u64, VolumeError> {
    let vol = engine.volume(id).await?;
    let mut errors = 0;
    for b in 0..BLOCKS {
        match vol.read(b * 4096, 4096).await {
            Ok(got) => assert!(
                got[..] == content(gen, b)[..],
                "{what}: block {b} returned wrong data (first bytes {:?})",
                &got[..9]
            ),
            Err(_) => errors += 1,
        }
    }
    Ok(errors)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        let target = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            std::fs::copy(&p, &target).expect("copy");
        }
    }
}

fn replace_dir(dir: &Path, with: &Path) {
    std::fs::remove_dir_all(dir).expect("remove");
    copy_dir(with, dir);
}

fn files_named(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .filter(|p| p.metadata().is_ok_and(|m| m.len() > 0))
        .collect();
    v.sort();
    v
}

/// How one damaged copy of the data dir behaved.
#[derive(Default, Debug)]
struct Outcomes {
    engine_refused: u64,
    volume_refused: u64,
    read_errors: u64,
    intact: u64,
}

/// Flips one random bit of `file` in a fresh copy of the pristine data dir, opens it and checks
/// every block.
async fn flip_and_check(
    data: &Path,
    pristine: &Path,
    backend: &SharedBackend,
    id: &VolumeId,
    file: &Path,
    rng: &mut rand::rngs::StdRng,
    out: &mut Outcomes,
) {
    replace_dir(data, pristine);
    let mut bytes = std::fs::read(file).expect("read");
    let bit = rng.gen_range(0..bytes.len() * 8);
    bytes[bit / 8] ^= 1 << (bit % 8);
    std::fs::write(file, &bytes).expect("flip");
    let what = format!("{} bit {bit}", file.display());
    let engine = match open(data, backend).await {
        Ok(e) => e,
        Err(_) => {
            out.engine_refused += 1;
            return;
        }
    };
    match check(&engine, id, 1, &what).await {
        Ok(0) => out.intact += 1,
        Ok(_) => out.read_errors += 1,
        Err(VolumeError::VolumeNotFound(_)) => {
            panic!("{what}: the volume vanished")
        }
        Err(_) => out.volume_refused += 1,
    }
    engine.close_all().await;
}

/// Bit flips in RocksDB's table files (SST), MANIFEST, CURRENT and its log: each damaged copy
/// fails to open, or reads back every block as written or as an error.
#[test]
fn bit_flips_in_rocksdb_files_never_read_as_wrong_data() {
    common::run(Duration::from_secs(300), async {
        // A clean close flushes RocksDB's memtable: the map is in table files.
        let (root, data, backend, id) = generation_one().await;
        let clean = root.path().join("clean");
        copy_dir(&data, &clean);
        let meta = data.join("meta");
        let ssts = files_named(&meta, |n| n.ends_with(".sst"));
        let manifests = files_named(&meta, |n| n.starts_with("MANIFEST-") || n == "CURRENT");
        assert!(!ssts.is_empty(), "a clean close leaves table files");

        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut by_kind = Vec::new();
        for (kind, files, flips) in [("sst", &ssts, 40), ("manifest", &manifests, 16)] {
            let mut out = Outcomes::default();
            for i in 0..flips {
                let file = &files[i % files.len()];
                flip_and_check(&data, &clean, &backend, &id, file, &mut rng, &mut out).await;
            }
            by_kind.push((kind, out));
        }

        // RocksDB's log: leave the map commits in it (a crash, no flush), then flip.
        replace_dir(&data, &clean);
        let engine = open(&data, &backend).await.expect("engine");
        write_generation(&engine, &id, 2).await;
        write_generation(&engine, &id, 1).await;
        engine.simulate_crash().await;
        let crashed = root.path().join("crashed");
        copy_dir(&data, &crashed);
        let logs = files_named(&meta, |n| n.ends_with(".log") && !n.starts_with("LOG"));
        assert!(
            !logs.is_empty(),
            "map commits sit in RocksDB's log after a crash"
        );
        println!("logs: {logs:?}");
        let mut out = Outcomes::default();
        for i in 0..24 {
            let file = &logs[i % logs.len()];
            flip_and_check(&data, &crashed, &backend, &id, file, &mut rng, &mut out).await;
        }
        by_kind.push(("log", out));

        for (kind, out) in &by_kind {
            println!("{kind}: {out:?}");
        }
        let detected: u64 = by_kind
            .iter()
            .map(|(_, o)| o.engine_refused + o.volume_refused + o.read_errors)
            .sum();
        assert!(detected > 0, "no flip was ever detected: {by_kind:?}");
    });
}

/// A data dir whose volume holds generation 1 in chunks, cleanly closed:
/// (root, data dir, backend, volume).
async fn generation_one() -> (tempfile::TempDir, PathBuf, SharedBackend, VolumeId) {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let backend = file_backend(&data);
    let engine = open(&data, &backend).await.expect("engine");
    let id = engine
        .create_volume(1 << 20, "meta")
        .await
        .expect("create")
        .volume_id;
    write_generation(&engine, &id, 1).await;
    engine.close_all().await;
    drop(engine);
    (root, data, backend, id)
}

/// [`generation_one`] and a copy of its `meta` taken then: (root, data dir, backend, volume,
/// copy of meta).
async fn generation_one_with_a_copy_of_meta(
) -> (tempfile::TempDir, PathBuf, SharedBackend, VolumeId, PathBuf) {
    let (root, data, backend, id) = generation_one().await;
    let old_meta = root.path().join("old-meta");
    copy_dir(&data.join("meta"), &old_meta);
    (root, data, backend, id, old_meta)
}

/// A map rolled back behind a WAL that was already trimmed (RocksDB lost commits, or `meta` was
/// restored from an older copy) is refused; one whose missing commits are still in the WAL is
/// made whole by replay.
#[test]
fn map_rolled_back_behind_the_wal() {
    common::run(Duration::from_secs(120), async {
        let (root, data, backend, id, old_meta) = generation_one_with_a_copy_of_meta().await;

        // Generation 2 goes through several WAL segments (256 KiB each), into chunks, and the
        // trim deletes the segments: the old map cannot be completed from the WAL.
        let engine = open(&data, &backend).await.expect("engine");
        write_generation(&engine, &id, 2).await;
        engine.close_all().await;
        drop(engine);
        replace_dir(&data.join("meta"), &old_meta);
        let engine = open(&data, &backend).await.expect("engine");
        match engine.volume(&id).await {
            Err(VolumeError::Wal(WalError::MapBehind {
                checkpoint,
                trimmed_through,
                ..
            })) => {
                assert!(
                    checkpoint < trimmed_through,
                    "{checkpoint} vs {trimmed_through}"
                );
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a map behind a trimmed WAL must not serve stale blocks"),
        }
        drop(engine);
        // `vblock fsck` finds it too.
        let out = common::daemon::run(
            std::process::Command::new(common::daemon::vblock_bin())
                .arg("fsck")
                .arg("--data-dir")
                .arg(&data),
            Duration::from_secs(60),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() && text.contains("behind the WAL's trim mark"),
            "fsck: {text}"
        );
        // What the error says to do: move `meta` aside and rebuild the map from the backend.
        std::fs::rename(data.join("meta"), root.path().join("meta.stale")).expect("move meta");
        let engine = open(&data, &backend).await.expect("engine");
        let recovered = engine.recover_from_backend().await.expect("recover");
        assert_eq!(recovered, std::slice::from_ref(&id));
        assert_eq!(check(&engine, &id, 2, "recovered").await.expect("opens"), 0);
        engine.close_all().await;
        drop(engine);

        // A rollback of one small commit whose records are still in the open segment: replay
        // restores it.
        let (_root2, data, backend, id, old_meta) = generation_one_with_a_copy_of_meta().await;
        let engine = open(&data, &backend).await.expect("engine");
        let vol = engine.volume(&id).await.expect("volume");
        vol.write(5 * 4096, Bytes::from(content(3, 5)), false)
            .await
            .expect("write");
        vol.persist_buffer().await.expect("into chunks");
        drop(vol);
        engine.close_all().await;
        drop(engine);
        replace_dir(&data.join("meta"), &old_meta);
        let engine = open(&data, &backend).await.expect("engine");
        let vol = engine.volume(&id).await.expect("replay completes the map");
        for b in 0..BLOCKS {
            let want = if b == 5 { content(3, 5) } else { content(1, b) };
            let got = vol.read(b * 4096, 4096).await.expect("read");
            assert!(got[..] == want[..], "block {b}");
        }
        drop(vol);
        engine.close_all().await;
    });
}

//! Faults caused with the real thing: the WAL's file system fills up (a size-limited tmpfs,
//! mounted by the test; needs root, as CI and the dev machines run).

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::{nbd_client, run, wait_until, Daemon, Nats};

/// A tmpfs of `mib` MiB mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(dir.path()),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(
            Command::new("umount").arg("-l").arg(self.dir.path()),
            Duration::from_secs(30),
        );
    }
}

fn pattern(generation: u8, len: usize) -> Vec<u8> {
    vec![generation; len]
}

#[test]
fn wal_disk_full_fails_flushes_then_recovers_without_loss() {
    // 64 MiB with about 4 MiB free: after the filler goes there is room for the WAL's whole
    // unwritten backlog (at most 32 MiB).
    let fs = Tmpfs::mount(64);
    let wal: PathBuf = fs.path().join("wal");
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 60 << 20]).expect("filler");
    let nats = Nats::start();
    let mut d = Daemon::start_with(
        &nats.url(),
        &[
            "--wal-dir",
            wal.to_str().expect("utf-8 path"),
            "--wal-segment-size",
            "1MiB",
        ],
    );
    let vol = d.create_volume(1);
    let mut c = nbd_client(d.nbd_port, &d.export(&vol), Duration::from_secs(60));

    // Generation 1 fits: acknowledged durable.
    c.write_all(&pattern(1, 1 << 20)).expect("write gen 1");
    c.flush().expect("flush gen 1");

    // Generation 2 (8 MiB) does not fit in the WAL: buffered writes are accepted, the flush that
    // must make them durable fails (ENOSPC), and the daemon keeps serving.
    c.seek(SeekFrom::Start(1 << 20)).expect("seek");
    c.write_all(&pattern(2, 8 << 20)).expect("write gen 2");
    let full = c.flush();
    assert!(full.is_err(), "flush succeeded with a full WAL disk");
    // Writes keep being accepted only up to the WAL's unwritten cap (32 MiB), then fail with
    // ENOSPC: a full WAL disk does not grow memory without bound.
    drop(c);
    let mut c = nbd_client(d.nbd_port, &d.export(&vol), Duration::from_secs(60));
    let mut accepted = 0;
    for i in 0..64u64 {
        c.seek(SeekFrom::Start((16 << 20) + (i << 20)))
            .expect("seek");
        if c.write_all(&pattern(3, 1 << 20)).is_err() {
            break;
        }
        accepted += 1;
    }
    assert!(
        accepted < 40,
        "{accepted} MiB accepted with a full WAL disk"
    );
    // The client library may give up on the connection after an error reply; reconnect.
    drop(c);
    let mut c = nbd_client(d.nbd_port, &d.export(&vol), Duration::from_secs(60));
    let mut first = vec![0u8; 1 << 20];
    c.read_exact(&mut first)
        .expect("read gen 1 while the disk is full");
    assert!(
        first.iter().all(|&b| b == 1),
        "gen 1 changed while the disk was full"
    );
    assert!(d.exited().is_none(), "daemon died on ENOSPC");
    assert!(
        d.log().contains("No space left on device"),
        "no log line names the error:\n{}",
        d.log()
    );

    // Space returns: the kept WAL batch is written and the next flush succeeds.
    std::fs::remove_file(&filler).expect("remove filler");
    // A fresh connection per attempt: the client library gives up on a connection after an
    // error reply.
    drop(c);
    let ok = wait_until(Duration::from_secs(30), || {
        nbd_client(d.nbd_port, &d.export(&vol), Duration::from_secs(60))
            .flush()
            .is_ok()
    });
    assert!(
        ok,
        "flush did not succeed after space returned; log:\n{}",
        d.log()
    );

    // kill -9: everything acknowledged by the last flush is there after the WAL replay.
    d.kill9();
    d.start_again();
    let mut c = nbd_client(d.nbd_port, &d.export(&vol), Duration::from_secs(60));
    let mut all = vec![0u8; 9 << 20];
    c.read_exact(&mut all).expect("read back");
    assert!(all[..1 << 20].iter().all(|&b| b == 1), "gen 1 lost");
    assert!(all[1 << 20..].iter().all(|&b| b == 2), "gen 2 lost");
}

//! One writer per volume, through the real daemon and clients: an unmount's drain raced by NBD
//! handshakes (`NBD_OPT_INFO` / `NBD_OPT_GO` from nbdinfo), snapshots and a remount never
//! opens a second instance of the volume (which would write its WAL directory and chunk object
//! ids beside the draining one).

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{qemu_io, require, run, vblock_bin, Daemon, Nats};

/// Rounds of write → flush → unmount raced by opens (the issue asks for at least 50).
const ROUNDS: u64 = 50;

/// 4 MiB written at a time, in 16 regions of a 1 GiB volume.
const REGION: u64 = 4 << 20;

#[test]
fn unmount_raced_by_handshakes_and_snapshots_never_opens_a_second_instance() {
    require("qemu-io");
    require("nbdinfo");
    let nats = Nats::start();
    // Small chunks: each round's 4 MiB is 16 chunk uploads for the unmount to drain.
    let mut d = Daemon::start_with(&nats.url(), &["--chunk-size", "256KiB"]);
    let id = d.create_volume(1);
    let uri = d.uri(&id);
    let mut last = [0u8; 16];
    for round in 1..=ROUNDS {
        let fill = (round % 250 + 1) as u8;
        let region = (round % 16) as usize;
        let at = region as u64 * REGION;
        qemu_io(&uri, &[&format!("write -P {fill} {at} {REGION}"), "flush"]);
        last[region] = fill;
        let cli = |args: &[&str]| {
            run(
                Command::new(vblock_bin())
                    .args(args)
                    .args(["--nats-url", &nats.url()]),
                Duration::from_secs(120),
            )
        };
        std::thread::scope(|s| {
            let unmount = s.spawn(|| cli(&["unmount", &id]));
            let infos = s.spawn(|| {
                (0..3)
                    .map(|_| run(Command::new("nbdinfo").arg(&uri), Duration::from_secs(120)))
                    .collect::<Vec<_>>()
            });
            let snapshot = (round % 5 == 0)
                .then(|| s.spawn(|| cli(&["snapshot", "create", "--no-wait", &id])));
            let out = unmount.join().expect("unmount thread");
            assert!(
                out.status.success(),
                "round {round}: unmount: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for out in infos.join().expect("nbdinfo thread") {
                assert!(
                    out.status.success(),
                    "round {round}: nbdinfo: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if let Some(snapshot) = snapshot {
                let out = snapshot.join().expect("snapshot thread");
                assert!(
                    out.status.success(),
                    "round {round}: snapshot: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        });
        let read = qemu_io(&uri, &[&format!("read -P {fill} {at} {REGION}")]);
        assert!(!read.contains("failed"), "round {round}: {read}");
    }
    let log = d.log();
    for bad in [
        "corrupt",
        "File exists",
        "in use by another instance",
        "ERROR",
    ] {
        assert!(!log.contains(bad), "the daemon logged {bad:?}:\n{log}");
    }
    // Every region's last flushed write survives a restart.
    d.restart();
    for (region, &fill) in last.iter().enumerate() {
        if fill == 0 {
            continue;
        }
        let at = region as u64 * REGION;
        let read = qemu_io(&uri, &[&format!("read -P {fill} {at} {REGION}")]);
        assert!(
            !read.contains("failed"),
            "region {region} after restart: {read}"
        );
    }
}

/// An unmount closes the volume's NBD connections: a client connected before it gets an error
/// for its next request (the connection is closed), and its write before the unmount is kept.
#[test]
fn unmount_disconnects_the_volumes_clients() {
    use std::io::{Read, Seek, SeekFrom, Write};
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    d.cli(&["mount", &id]);
    let (mut c, mut socket) =
        common::daemon::nbd_client_and_socket(d.nbd_port, &id, Duration::from_secs(30));
    c.write_all(&[0x6e; 4096])
        .expect("write before the unmount");
    c.flush().expect("flush");
    d.cli(&["unmount", &id]);
    d.wait_for_log(
        "volume closed: disconnecting its client",
        Duration::from_secs(30),
    );
    // The server closed the connection: the socket reads end of file, not a timeout.
    let mut byte = [0u8; 1];
    assert_eq!(
        socket.read(&mut byte).expect("read after the unmount"),
        0,
        "the connection is still open"
    );
    c.seek(SeekFrom::Start(0)).expect("seek");
    let mut buf = [0u8; 4096];
    assert!(
        c.read_exact(&mut buf).is_err(),
        "a request after the unmount was served"
    );
    let read = qemu_io(&d.uri(&id), &["read -P 0x6e 0 4096"]);
    assert!(!read.contains("failed"), "{read}");
}

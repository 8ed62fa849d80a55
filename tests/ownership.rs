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

/// Whether volume `id`'s WAL directory lock (`LOCK`, an advisory `flock` an open instance's WAL
/// writer holds) is free: no instance of the volume is open.
fn wal_lock_free(d: &Daemon, id: &str) -> bool {
    let path = d.data_dir().join("wal").join(id).join("LOCK");
    let file = std::fs::File::open(&path).expect("the WAL lock file");
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

#[test]
fn unmount_raced_by_handshakes_and_snapshots_never_opens_a_second_instance() {
    require("qemu-io");
    require("nbdinfo");
    let nats = Nats::start();
    // Small chunks: each round's 4 MiB is 16 chunk uploads for the unmount to drain.
    let mut d = Daemon::start_with(&nats.url(), &["--chunk-size", "256KiB"]);
    let id = d.create_volume(1);
    let mut last = [0u8; 16];
    for round in 1..=ROUNDS {
        // Each mount has its own export name (secret); the unmount below ends it.
        let uri = d.uri(&id);
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
            // Before the unmount ends the export, nbdinfo is served; after, it is refused as
            // an unknown export (NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT).
            for out in infos.join().expect("nbdinfo thread") {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success() || err.contains("No such file or directory"),
                    "round {round}: nbdinfo: {err}"
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
        // The unmount left no instance open (a handshake that raced it opened none): the WAL
        // directory's lock is free.
        assert!(
            wal_lock_free(&d, &id),
            "round {round}: an instance is open after the unmount"
        );
        let read = qemu_io(&d.uri(&id), &[&format!("read -P {fill} {at} {REGION}")]);
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
    let uri = d.uri(&id);
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
    let (mut c, mut socket) =
        common::daemon::nbd_client_and_socket(d.nbd_port, &d.export(&id), Duration::from_secs(30));
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

/// Export names carry the mount's secret: before the mount and after the unmount no name opens
/// the volume, the bare volume id never does, and each mount has a new secret. Real clients
/// (nbdinfo, nbdcopy, fio's nbd engine) work with the URI the mount returns.
#[test]
fn a_volume_is_an_export_only_while_mounted_and_only_under_its_secret() {
    require("nbdinfo");
    require("nbdcopy");
    require("fio");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    let base = format!("nbd://127.0.0.1:{}", d.nbd_port);
    let nbdinfo = |uri: &str| run(Command::new("nbdinfo").arg(uri), Duration::from_secs(60));
    // Refused as an unknown export (NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT).
    let unknown = |uri: &str, why: &str| {
        let out = nbdinfo(uri);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("No such file or directory"),
            "{why}: {uri}: {err}"
        );
    };
    unknown(&format!("{base}/{id}"), "unmounted, yet exported");
    let uri = d.uri(&id);
    assert!(nbdinfo(&uri).status.success());
    unknown(&format!("{base}/{id}"), "the bare id opened the volume");
    let forged = format!("{base}/{id}-{}", "0".repeat(32));
    unknown(&forged, "a made-up secret opened the volume");
    let fio = run(
        Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=64k",
            "--size=4M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
        ]),
        Duration::from_secs(120),
    );
    assert!(
        fio.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    let copy = tempfile::tempdir().expect("tempdir");
    let file = copy.path().join("vol.raw");
    let out = run(
        Command::new("nbdcopy").arg(&uri).arg(&file),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&file).expect("copy").len(), 1 << 30);
    d.cli(&["unmount", &id]);
    unknown(&uri, "the URI outlived its unmount");
    let again = d.uri(&id);
    assert_ne!(again, uri, "a new mount must have a new secret");
    assert!(nbdinfo(&again).status.success());
}

/// After a detach that ended volume `id`'s mount: the client on `socket` was disconnected, the
/// volume is available with no attachment, and the mount's `uri` opens nothing.
fn assert_detached(d: &Daemon, id: &str, socket: &mut std::net::TcpStream, uri: &str) {
    use std::io::Read;
    let mut byte = [0u8; 1];
    assert_eq!(
        socket.read(&mut byte).expect("read after the detach"),
        0,
        "still connected"
    );
    let described = d.cli(&["volume", "describe", id, "--output", "json"]);
    let described: serde_json::Value = serde_json::from_str(&described).expect("json");
    assert_eq!(
        (described["State"].as_str(), &described["Attachments"]),
        (Some("available"), &serde_json::json!([])),
        "{described}"
    );
    let refused = common::daemon::qemu_io_output(uri, &["read 0 4k"]);
    assert!(!refused.status.success(), "the URI outlived the detach");
}

/// Detaching the mount (DetachVolume of the attachment without an instance id) ends it like
/// an unmount: its client is disconnected and its URI stops working. With `Force` the write
/// buffer is not drained into chunks first; it stays in the WAL, and nothing flushed is lost.
#[test]
fn detaching_the_mount_with_force_disconnects_and_keeps_flushed_writes() {
    use std::io::{Seek, SeekFrom, Write};
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    let uri = d.uri(&id);
    qemu_io(&uri, &["write -P 0x4f 0 8M", "flush"]);
    let (mut c, mut socket) =
        common::daemon::nbd_client_and_socket(d.nbd_port, &d.export(&id), Duration::from_secs(30));
    c.seek(SeekFrom::Start(8 << 20)).expect("seek");
    c.write_all(&[0x50; 4096]).expect("write");
    c.flush().expect("flush");
    let detached = d.cli(&["volume", "detach", &id, "--force", "--output", "json"]);
    let detached: serde_json::Value = serde_json::from_str(&detached).expect("json");
    assert_eq!(
        (detached["State"].as_str(), detached["InstanceId"].as_str()),
        (Some("detached"), Some("")),
        "{detached}"
    );
    assert_detached(&d, &id, &mut socket, &uri);
    // Force reached the close: no drain (the buffer stays in the WAL, replayed at the remount).
    d.wait_for_log("closing without a drain", Duration::from_secs(10));
    let read = qemu_io(&d.uri(&id), &["read -P 0x4f 0 8M", "read -P 0x50 8M 4k"]);
    assert!(!read.contains("failed"), "{read}");
}

/// A mount remembers its node: `ebs.NODE.mount` and `ebs.NODE.unmount` through another node are
/// refused (`VolumeInUse`), while `ebs.mount` stays idempotent (platforms retry mounts). The node
/// changes here by restarting the daemon under another `--node`: one daemon serves one node's
/// subjects.
#[test]
fn a_mount_through_one_node_is_refused_through_another() {
    let nats = Nats::start();
    let mut d = Daemon::start_with(&nats.url(), &["--node", "node1"]);
    let id = d.create_volume(1);
    let uri = d.cli(&["mount", &id, "--node", "node1"]);
    assert_eq!(d.cli(&["mount", &id, "--node", "node1"]), uri);
    d.set_args(&["--node", "node2"]);
    d.restart();
    let refused = d.cli_refused(&["mount", &id, "--node", "node2"]);
    assert!(refused.contains("VolumeInUse"), "{refused}");
    let refused = d.cli_refused(&["unmount", &id, "--node", "node2"]);
    assert!(refused.contains("VolumeInUse"), "{refused}");
    assert_eq!(d.uri(&id), uri.trim(), "ebs.mount is idempotent");
    d.cli(&["unmount", &id]);
    assert!(d.cli(&["mount", &id, "--node", "node2"]).trim() != uri.trim());
}

/// Detaching a volume's last instance (EC2 DetachVolume) ends its mount too: the export is gone
/// and the client is disconnected after a drain; what it wrote and flushed is kept.
#[test]
fn detaching_the_last_instance_ends_the_mount() {
    use std::io::{Seek, SeekFrom, Write};
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    d.cli(&[
        "volume",
        "attach",
        &id,
        "--instance",
        "i-1",
        "--device",
        "/dev/sdf",
    ]);
    let uri = d.uri(&id);
    let (mut c, mut socket) =
        common::daemon::nbd_client_and_socket(d.nbd_port, &d.export(&id), Duration::from_secs(30));
    c.seek(SeekFrom::Start(4096)).expect("seek");
    c.write_all(&[0x61; 4096]).expect("write");
    c.flush().expect("flush");
    d.cli(&["volume", "detach", &id, "--instance", "i-1"]);
    assert_detached(&d, &id, &mut socket, &uri);
    assert!(
        !d.log().contains("closing without a drain"),
        "drained without Force"
    );
    let read = qemu_io(&d.uri(&id), &["read -P 0x61 4096 4096"]);
    assert!(!read.contains("failed"), "{read}");
}

//! The offline tools on a stopped daemon's data directory (`vblock inspect`, `fsck`, `import`,
//! `export`) and the NBD Unix socket.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{qemu_io, require, run, run_ok, vblock_bin, Daemon, Nats};

const T: Duration = Duration::from_secs(120);

fn vblock(args: &[&str], data_dir: &std::path::Path) -> std::process::Output {
    run(
        Command::new(vblock_bin())
            .args(args)
            .arg("--data-dir")
            .arg(data_dir),
        T,
    )
}

#[test]
fn fsck_inspect_export_import() {
    require("qemu-io");
    let nats = Nats::start();
    let mut d = Daemon::start_with(&nats.url(), &["--chunk-size", "256KiB"]);
    let vol = d.create_volume(1);
    // 3 MiB of patterns (several chunks once closed) and an unaligned write.
    qemu_io(
        &d.uri(&vol),
        &[
            "write -P 0x61 0 3M",
            "write -P 0x62 5000 100",
            "write -P 0x63 512M 64k",
        ],
    );
    d.stop();
    let data = d.data_dir();

    let out = vblock(&["fsck"], &data);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fsck: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 volumes checked, 0 problem(s)"), "{text}");

    let out = vblock(&["inspect", "volume", &vol], &data);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&vol) && text.contains("data blocks") && text.contains("chunks:"),
        "{text}"
    );

    let chunk_dir = data.join("objects").join(&vol).join("chunks");
    let mut chunks: Vec<_> = std::fs::read_dir(&chunk_dir)
        .expect("chunks")
        .map(|e| e.expect("entry").path())
        .collect();
    chunks.sort();
    assert!(chunks.len() >= 3, "{chunks:?}");
    let out = run_ok(
        Command::new(vblock_bin())
            .arg("inspect")
            .arg("chunk")
            .arg(&chunks[0]),
        T,
    );
    assert!(out.contains("all frames verify"), "{out}");
    let out = run_ok(
        Command::new(vblock_bin())
            .args(["inspect", "wal", "--records"])
            .arg(data.join("wal").join(&vol)),
        T,
    );
    assert!(out.contains("segment"), "{out}");

    // export -> a sparse raw image with the same bytes.
    let work = tempfile::tempdir().expect("tempdir");
    let img = work.path().join("vol.img");
    let out = vblock(&["export", &vol, img.to_str().expect("path")], &data);
    assert!(
        out.status.success(),
        "export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&img).expect("image");
    assert_eq!(bytes.len(), 1 << 30);
    assert!(bytes[..5000].iter().all(|&b| b == 0x61));
    assert!(bytes[5000..5100].iter().all(|&b| b == 0x62));
    assert!(bytes[5100..3 << 20].iter().all(|&b| b == 0x61));
    assert!(bytes[512 << 20..(512 << 20) + 65536]
        .iter()
        .all(|&b| b == 0x63));
    assert!(vblock::block::is_zero(&bytes[3 << 20..512 << 20]));
    let du = run_ok(Command::new("du").arg("-k").arg(&img), T);
    let kib: u64 = du
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("du");
    assert!(kib < 16 << 10, "export is not sparse: {kib} KiB");

    // import into a new volume, then serve it and read it back.
    let out = vblock(
        &["import", img.to_str().expect("path"), "--name", "copy"],
        &data,
    );
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(vblock::VolumeId::parse(&copy).is_ok(), "{copy}");

    // Corrupt one chunk: fsck reports it and exits non-zero.
    let mut obj = std::fs::read(&chunks[1]).expect("chunk");
    let last = obj.len() - 1;
    obj[last] ^= 0x55;
    std::fs::write(&chunks[1], &obj).expect("write");
    let out = vblock(&["fsck"], &data);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // The finding itself is printed off a terminal too (the progress bar is hidden there).
    assert!(
        text.contains("problem(s)") && text.contains(": chunk ") && text.contains("crc"),
        "{text}"
    );
    obj[last] ^= 0x55;
    std::fs::write(&chunks[1], &obj).expect("restore");

    d.start_again();
    qemu_io(
        &d.uri(&copy),
        &[
            "read -P 0x61 0 5000",
            "read -P 0x62 5000 100",
            "read -P 0x63 512M 64k",
            "read -P 0 600M 1M",
        ],
    );
}

#[test]
fn nbd_over_unix_socket() {
    require("nbdinfo");
    require("qemu-io");
    let nats = Nats::start();
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock = sock_dir.path().join("nbd.sock");
    let d = Daemon::start_with(&nats.url(), &["--nbd-unix", sock.to_str().expect("path")]);
    let vol = d.create_volume(1);
    assert!(common::daemon::wait_until(Duration::from_secs(10), || sock.exists()));
    let uri = format!("nbd+unix:///{}?socket={}", d.export(&vol), sock.display());
    let info = run_ok(Command::new("nbdinfo").arg(&uri), T);
    assert!(info.contains("export-size: 1073741824"), "{info}");
    qemu_io(&uri, &["write -P 0x44 0 128k"]);
    // Same volume over TCP.
    qemu_io(&d.uri(&vol), &["read -P 0x44 0 128k"]);
}

#[test]
fn recover_rebuilds_a_lost_data_directory_from_the_backend() {
    require("qemu-io");
    let nats = Nats::start();
    let mut d = Daemon::start_with(&nats.url(), &["--chunk-size", "256KiB"]);
    let vol = d.create_volume(1);
    qemu_io(
        &d.uri(&vol),
        &[
            "write -P 0x5a 0 2M",
            "write -P 0x5b 512M 64k",
            "write -z 64k 64k",
        ],
    );
    // A clean stop puts everything into chunk objects; then the metadata and WAL are lost.
    d.stop();
    let data = d.data_dir();
    std::fs::remove_dir_all(data.join("meta")).expect("remove meta");
    std::fs::remove_dir_all(data.join("wal")).expect("remove wal");

    let out = vblock(&["recover", "--quiet"], &data);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("recovered {vol}")), "{text}");
    assert!(text.contains("1 volume(s) recovered"), "{text}");

    let img = d.dir.path().join("recovered.img");
    let out = run(
        Command::new(vblock_bin())
            .args(["export", &vol])
            .arg(&img)
            .arg("--data-dir")
            .arg(&data),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&img).expect("image");
    assert_eq!(bytes.len(), 1 << 30);
    assert!(bytes[..64 << 10].iter().all(|&b| b == 0x5a));
    assert!(
        bytes[64 << 10..128 << 10].iter().all(|&b| b == 0),
        "zeroed range"
    );
    assert!(bytes[128 << 10..2 << 20].iter().all(|&b| b == 0x5a));
    assert!(bytes[2 << 20..512 << 20].iter().all(|&b| b == 0));
    assert!(bytes[512 << 20..(512 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x5b));

    // Recovering again finds nothing new (the volume is known now).
    let out = vblock(&["recover"], &data);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 volume(s) recovered"));
}

/// A clone's map points into its source volume's chunks: fsck checks those extents against the
/// owner's chunk objects (not the clone's own chunks of the same object id), and reports a
/// damaged shared chunk for the clone too.
#[test]
fn fsck_checks_a_clones_shared_extents_against_their_owner() {
    require("qemu-io");
    let nats = Nats::start();
    let mut d = Daemon::start_with(&nats.url(), &["--chunk-size", "256KiB"]);
    let vol = d.create_volume(1);
    qemu_io(&d.uri(&vol), &["write -P 0x71 0 1M", "flush"]);
    let snap = d.cli(&["snapshot", "create", &vol]).trim().to_owned();
    let clone = d
        .cli(&["volume", "create", "--snapshot", &snap])
        .trim()
        .to_owned();
    // The clone's own chunk 1 holds other blocks than the source's chunk 1.
    qemu_io(&d.uri(&clone), &["write -P 0x72 2M 64k", "flush"]);
    d.stop();
    let data = d.data_dir();
    let out = vblock(&["fsck"], &data);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("2 volumes checked, 0 problem(s)"),
        "fsck of a volume and its clone: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Damage the source's first chunk: both the source and the clone report it.
    let chunk = data
        .join("objects")
        .join(&vol)
        .join("chunks")
        .join("0000000000000001");
    let mut bytes = std::fs::read(&chunk).expect("source chunk");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&chunk, &bytes).expect("write");
    let out = vblock(&["fsck"], &data);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{vol}: chunk")) && text.contains(&format!("{clone}: chunk")),
        "both report the damaged chunk: {text}"
    );
}

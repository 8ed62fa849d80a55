//! Acceptance with real NBD clients against a real `vblock serve` (issue: the daemon end to end,
//! steps 1-5): nbdinfo, qemu-io, qemu-img + nbdcopy with an ext4 image, nbdfuse + e2fsck +
//! debugfs, fio with crc32c verification.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{qemu_io, require, run, run_ok, Daemon, Nats};

const T: Duration = Duration::from_secs(120);

#[test]
fn nbdinfo_shows_export_and_capabilities() {
    require("nbdinfo");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vol = d.create_volume(2);
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", d.nbd_port)),
        T,
    );
    println!("{list}");
    // Export names carry their mount's secret, so none is listed (not even a mounted one).
    let uri = d.uri(&vol);
    assert!(!list.contains(&vol), "{list}");
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", d.nbd_port)),
        T,
    );
    assert!(!list.contains(&vol), "a mounted volume is listed: {list}");
    let info = run_ok(Command::new("nbdinfo").arg(&uri), T);
    println!("{info}");
    for want in [
        "export-size: 2147483648",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_multi_conn: true",
        "can_cache: true",
        "base:allocation",
        "is_read_only: false",
    ] {
        assert!(info.contains(want), "nbdinfo lacks {want:?}:\n{info}");
    }
    // An unknown export is refused with an error, not a crash.
    let out = run(
        Command::new("nbdinfo").arg(format!(
            "nbd://127.0.0.1:{}/vol-00000000000000000",
            d.nbd_port
        )),
        T,
    );
    assert!(!out.status.success());
    assert!(d.log().contains("vblock serving"));
}

#[test]
fn qemu_io_patterns_survive_restart() {
    require("qemu-io");
    let nats = Nats::start();
    let mut d = Daemon::start(&nats.url());
    let vol = d.create_volume(1);
    let uri = d.uri(&vol);
    let writes = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1048577 3000",
        "write -P 0x11 5000 700",
        "write -z 2M 1M",
        "write -P 0x22 3M 1M",
        "discard 3M 1M",
        "write -P 0x33 8M 64k",
    ];
    let reads = [
        "read -P 0xab 0 5000",
        "read -P 0x11 5000 700",
        "read -P 0xab 5700 1042876",
        "read -P 0xcd 1048577 3000",
        "read -P 0 2M 2M",
        "read -P 0x33 8M 64k",
        "read -P 0 9M 1M",
    ];
    println!("{}", qemu_io(&uri, &writes));
    println!("{}", qemu_io(&uri, &reads));
    d.restart();
    let after = qemu_io(&uri, &reads);
    println!("after restart:\n{after}");
    assert_eq!(after.matches("read ").count(), reads.len());
}

#[test]
fn ext4_image_round_trips_through_qemu_img_and_nbdcopy() {
    for t in ["qemu-img", "nbdcopy", "nbdinfo", "mkfs.ext4"] {
        require(t);
    }
    let nats = Nats::start();
    let mut d = Daemon::start(&nats.url());
    let vol = d.create_volume(1);
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    // Deterministic file contents of assorted sizes.
    for i in 0..40u32 {
        let len = (i as usize * 7919) % 300_000 + 1;
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8)
            .collect();
        let dir = if i % 3 == 0 {
            src.join("sub")
        } else {
            src.clone()
        };
        std::fs::write(dir.join(format!("file{i}")), data).expect("write");
    }
    let img = work.path().join("fs.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("256M"),
        T,
    );
    let uri = d.uri(&vol);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&img)
            .arg(&uri),
        T,
    );
    let image = std::fs::read(&img).expect("read image");
    let check = |d: &Daemon, tag: &str| {
        let out = work.path().join(format!("out-{tag}.img"));
        run_ok(Command::new("nbdcopy").arg(d.uri(&vol)).arg(&out), T);
        let got = std::fs::read(&out).expect("read copy");
        assert_eq!(got.len(), 1 << 30);
        assert!(got[..image.len()] == image[..], "{tag}: image differs");
        assert!(
            vblock::block::is_zero(&got[image.len()..]),
            "{tag}: tail not zero"
        );
        std::fs::remove_file(&out).ok();
    };
    check(&d, "first");
    d.restart();
    check(&d, "after-restart");
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(&uri), T);
    println!("{}", map.lines().take(12).collect::<Vec<_>>().join("\n"));
    let holes: u64 = map
        .lines()
        .filter(|l| l.contains("hole"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    let data: u64 = map
        .lines()
        .filter(|l| l.ends_with("data"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    println!("map: {data} bytes data, {holes} bytes holes");
    assert!(
        holes > (1 << 30) - (64 << 20),
        "a mostly empty filesystem should map mostly as holes"
    );
    assert!(data > 0);
}

#[test]
fn nbdfuse_e2fsck_and_debugfs() {
    for t in ["nbdfuse", "mkfs.ext4", "e2fsck", "debugfs", "umount"] {
        require(t);
    }
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse is needed for nbdfuse"
    );
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vol = d.create_volume(1);
    let work = tempfile::tempdir().expect("tempdir");
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let disk = mnt.join("nbd");
    let mount = || {
        let child = Command::new("nbdfuse")
            .arg(&mnt)
            .arg(d.uri(&vol))
            .spawn()
            .expect("nbdfuse");
        assert!(
            common::daemon::wait_until(Duration::from_secs(20), || disk.exists()),
            "nbdfuse did not mount"
        );
        child
    };
    let unmount = |mut child: std::process::Child| {
        run_ok(Command::new("umount").arg(&mnt), T);
        let _ = child.wait();
    };
    let fuse = mount();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk), T);
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(&disk), T);
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let note = work.path().join("note.txt");
    std::fs::write(&note, "written through nbdfuse by debugfs\n").expect("write");
    run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} note.txt", note.display()))
            .arg(&disk),
        T,
    );
    unmount(fuse);
    let fuse = mount();
    let cat = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg("cat note.txt")
            .arg(&disk),
        T,
    );
    assert_eq!(cat, "written through nbdfuse by debugfs\n");
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(&disk), T);
    assert!(
        fsck.status.success(),
        "e2fsck after debugfs: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    unmount(fuse);
}

#[test]
fn fio_verify_on_two_volumes() {
    require("fio");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vols = [d.create_volume(1), d.create_volume(1)];
    let work = tempfile::tempdir().expect("tempdir");
    // 4 concurrent jobs: random 4 KiB and mixed sizes on each of the two volumes.
    let mut job = String::from("[global]\nioengine=nbd\ndirect=1\nverify=crc32c\ndo_verify=1\nverify_fatal=1\nsize=48M\niodepth=16\n");
    for (i, v) in vols.iter().enumerate() {
        job.push_str(&format!(
            "\n[rand4k-{i}]\nuri={}\nrw=randwrite\nbs=4k\noffset=0\n",
            d.uri(v)
        ));
        job.push_str(&format!(
            "\n[mixed-{i}]\nuri={}\nrw=randwrite\nbssplit=4k/30:16k/30:64k/20:1m/20\noffset=512M\n",
            d.uri(v)
        ));
    }
    let path = work.path().join("verify.fio");
    std::fs::write(&path, job).expect("job file");
    // fio saves verify state files in its working directory: keep them in the temp dir.
    let out = run(
        Command::new("fio").arg(&path).current_dir(work.path()),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "{}",
        text.lines()
            .filter(|l| l.contains("err=") || l.contains("IOPS"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.status.success(),
        "fio failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("err= 0").count(), 4, "{text}");
    assert!(!text.contains("verify:"), "verify errors:\n{text}");
}

/// NBD proto.md: the server MUST accept `NBD_CMD_FLAG_FUA` on every command (ignoring it where
/// it means nothing), and an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carries at least one byte, so a
/// zero-length read is answered without one. libnbd's `nbdsh` with strict mode off sends both.
#[test]
fn fua_on_every_command_and_zero_length_reads_follow_the_spec() {
    require("nbdsh");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vol = d.create_volume(1);
    let script = format!(
        r#"
h.set_strict_mode(0)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri("{uri}")
assert h.get_structured_replies_negotiated()
h.pwrite(b"\xab" * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0, nbd.CMD_FLAG_FUA) == b"\xab" * 4096
h.flush(nbd.CMD_FLAG_FUA)
h.cache(4096, 0, nbd.CMD_FLAG_FUA)
seen = []
h.block_status(8192, 0, lambda ctx, off, ents, err: seen.append(ents) or 0, nbd.CMD_FLAG_FUA)
assert seen, "block status answered"
h.trim(4096, 4096, nbd.CMD_FLAG_FUA)
h.zero(4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(0, 0) == b""
assert h.pread(4096, 0, nbd.CMD_FLAG_FUA) == b"\xab" * 4096
h.shutdown()
print("spec ok")
"#,
        uri = d.uri(&vol)
    );
    // nbdsh is `python3 -m nbd` for the system Python (python3-libnbd): run that Python,
    // whatever `python3` comes first in PATH.
    let out = run_ok(
        Command::new("/usr/bin/python3")
            .args(["-m", "nbd"])
            .arg("-c")
            .arg(script),
        T,
    );
    assert!(out.contains("spec ok"), "{out}");
}

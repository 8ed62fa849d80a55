//! The snapshot / clone / delete life cycle through the CLI, NATS and NBD, shared by the file
//! and S3 backend tests.

use serde_json::Value;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use super::daemon::{nbd_client, qemu_io, qemu_io_output, qemu_io_read_only, wait_until, Daemon};

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// Writes a volume, snapshots it, overwrites the volume, then checks through NBD that the
/// snapshot export holds the old data and refuses writes, that a clone made from the snapshot
/// starts with the old data and that writes to the clone touch neither the volume nor the
/// snapshot; then deletes everything (snapshot, clone, volume). The caller checks the backend.
pub fn snapshot_clone_delete(d: &Daemon) {
    let vol = d.create_volume(1);
    let uri = d.uri(&vol);
    qemu_io(
        &uri,
        &["write -P 0xaa 0 2M", "write -P 0xbb 8M 1M", "flush"],
    );

    let snap = d
        .cli(&["snapshot", "create", &vol, "--description", "before"])
        .trim()
        .to_owned();
    assert!(snap.starts_with("snap-"), "snapshot id: {snap}");
    let listed = json(&d.cli(&["snapshot", "list", "--volume", &vol, "--output", "json"]));
    let s = &listed["Snapshots"][0];
    assert_eq!(s["SnapshotId"], snap.as_str());
    assert_eq!(s["State"], "completed");
    assert_eq!(s["Progress"], "100%");
    assert_eq!(s["VolumeSize"], 1);
    assert_eq!(s["Description"], "before");

    // Overwrite the volume after the snapshot.
    qemu_io(&uri, &["write -P 0xcc 1M 2M", "write -z 8M 1M", "flush"]);
    let snap_uri = d.uri(&snap);
    qemu_io_read_only(
        &snap_uri,
        &["read -P 0xaa 0 2M", "read -P 0 2M 6M", "read -P 0xbb 8M 1M"],
    );
    // The export is read-only (NBD_FLAG_READ_ONLY); a client that writes anyway gets an error
    // (NBD_EPERM) and the snapshot is unchanged.
    let mut c = nbd_client(d.nbd_port, &d.export(&snap), Duration::from_secs(30));
    c.seek(SeekFrom::Start(0)).expect("seek");
    let refused = c.write_all(&[0x11; 4096]).and_then(|()| c.flush());
    assert!(refused.is_err(), "a write to a snapshot export succeeded");
    drop(c);
    qemu_io_read_only(&snap_uri, &["read -P 0xaa 0 4k"]);

    // A clone starts as the snapshot and diverges on its own.
    let clone = d
        .cli(&["volume", "create", "--snapshot", &snap])
        .trim()
        .to_owned();
    assert!(clone.starts_with("vol-"), "clone id: {clone}");
    let described = json(&d.cli(&["volume", "describe", &clone, "--output", "json"]));
    assert_eq!(described["SnapshotId"], snap.as_str());
    assert_eq!(described["Size"], 1);
    let clone_uri = d.uri(&clone);
    qemu_io(&clone_uri, &["read -P 0xaa 0 2M", "read -P 0xbb 8M 1M"]);
    qemu_io(&clone_uri, &["write -P 0xdd 0 1M", "flush"]);
    qemu_io(&clone_uri, &["read -P 0xdd 0 1M", "read -P 0xaa 1M 1M"]);
    qemu_io_read_only(&snap_uri, &["read -P 0xaa 0 2M"]);
    qemu_io(
        &uri,
        &["read -P 0xaa 0 1M", "read -P 0xcc 1M 2M", "read -P 0 8M 1M"],
    );

    // Space accounting of the volume: counted from the map, so it shows writes once the idle
    // flush has put them into chunks (2 s).
    let mut space = Value::Null;
    let settled = wait_until(Duration::from_secs(30), || {
        let described = json(&d.cli(&["volume", "describe", &vol, "--output", "json"]));
        space = described["Space"].clone();
        space["AllocatedBytes"] == 3u64 << 20
    });
    assert!(settled, "allocated bytes never reached 3 MiB: {space}");
    assert_eq!(space["SizeBytes"], 1u64 << 30);
    assert!(space["StoredBytes"].as_u64().unwrap_or(0) > 0, "{space}");
    assert!(
        space["CompressionRatio"].as_f64().unwrap_or(0.0) > 1.0,
        "{space}"
    );

    // A mounted snapshot cannot go; its unmount ends the export and fails every request of a
    // reader still connected, and then it can go.
    let refused = d.cli_refused(&["snapshot", "delete", &snap]);
    assert!(refused.contains("VolumeInUse"), "{refused}");
    let mut reader = nbd_client(d.nbd_port, &d.export(&snap), Duration::from_secs(30));
    let mut block = [0u8; 4096];
    reader.read_exact(&mut block).expect("read the snapshot");
    assert_eq!(block, [0xaa; 4096]);
    d.cli(&["unmount", &snap]);
    reader.seek(SeekFrom::Start(0)).expect("seek");
    assert!(
        reader.read_exact(&mut block).is_err(),
        "a reader of an unmounted snapshot was served"
    );
    let ended = qemu_io_output(&snap_uri, &["read 0 4k"]);
    assert!(
        !ended.status.success(),
        "an unmounted snapshot's URI still opens"
    );
    // A snapshot with a clone can go; the clone keeps its data.
    d.cli(&["snapshot", "delete", &snap]);
    let listed = json(&d.cli(&["snapshot", "list", "--output", "json"]));
    assert_eq!(listed["Snapshots"].as_array().map(Vec::len), Some(0));
    qemu_io(
        &clone_uri,
        &[
            "read -P 0xdd 0 1M",
            "read -P 0xaa 1M 1M",
            "read -P 0xbb 8M 1M",
        ],
    );
    let refused = d.cli_refused(&["volume", "delete", &vol]);
    assert!(refused.contains("VolumeInUse"), "{refused}");
    d.cli(&["unmount", &vol]);
    d.cli(&["volume", "delete", &vol]);
    qemu_io(&clone_uri, &["read -P 0xaa 1M 1M", "read -P 0xbb 8M 1M"]);
    d.cli(&["unmount", &clone]);
    d.cli(&["volume", "delete", &clone]);
}

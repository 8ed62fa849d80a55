//! Snapshots, read-only snapshot exports, clones and deletion end to end on the file backend:
//! real nats-server, `vblock serve`, the CLI and qemu-io.

mod common;

use common::daemon::{require, Daemon, Nats};

/// Files under `dir`, recursively.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn snapshot_clone_and_delete_with_file_backend() {
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start_with(&nats.url(), &["--chunk-size", "256KiB"]);
    common::snapshots::snapshot_clone_delete(&d);
    let objects = d.data_dir().join("objects");
    // Deletion runs garbage collection before it answers: nothing is left when it returns.
    let left = files(&objects);
    assert!(
        left.is_empty(),
        "objects left after deleting everything: {left:?}"
    );
}

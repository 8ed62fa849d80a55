//! Operability (issue 8): the Prometheus endpoint parsed as Prometheus text with counters that
//! move as I/O is done, `vblock status`, JSON log lines, `--config` precedence, `--version`,
//! shell completions. Real nats-server, real daemon, real NBD clients (qemu-io, the `nbd` crate).

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{
    free_port, nbd_client, port_open, qemu_io, require, run, run_ok, stop_child, vblock_bin,
    wait_until, Daemon, Nats,
};
use common::metrics::{scrape, value};
use prometheus_parse::Value;

#[test]
fn metrics_endpoint_parses_and_counters_move_with_io() {
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vol = d.create_volume(1);
    let v = vol.as_str();
    let s0 = scrape(d.metrics_port);
    assert_eq!(
        value(
            &s0,
            "vblock_nats_requests_total",
            &[("op", "createvolume"), ("result", "ok")]
        ),
        1.0
    );

    // 16 writes of 64 KiB, 4 reads, a flush.
    let mut cmds: Vec<String> = (0..16)
        .map(|i| format!("write -P 7 {} 64k", i * 65536))
        .collect();
    cmds.extend((0..4).map(|i| format!("read -P 7 {} 64k", i * 65536)));
    cmds.push("flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&d.uri(v), &refs);

    let s1 = scrape(d.metrics_port);
    let w = [("volume", v), ("op", "write")];
    let r = [("volume", v), ("op", "read")];
    assert_eq!(value(&s1, "vblock_nbd_requests_total", &w), 16.0);
    assert_eq!(
        value(&s1, "vblock_nbd_request_bytes_total", &w),
        16.0 * 65536.0
    );
    assert!(value(&s1, "vblock_nbd_requests_total", &r) >= 4.0);
    assert!(value(&s1, "vblock_nbd_request_bytes_total", &r) >= 4.0 * 65536.0);
    assert!(
        value(
            &s1,
            "vblock_nbd_requests_total",
            &[("volume", v), ("op", "flush")]
        ) >= 1.0
    );
    assert_eq!(value(&s1, "vblock_nbd_request_errors_total", &w), 0.0);
    // Histograms: _seconds with buckets; every write was timed.
    assert!(s1
        .samples
        .iter()
        .any(|x| x.metric == "vblock_nbd_request_duration_seconds"
            && matches!(x.value, Value::Histogram(_))));
    assert_eq!(
        value(&s1, "vblock_nbd_request_duration_seconds", &w),
        16.0,
        "one latency sample per write"
    );
    assert!(value(&s1, "vblock_wal_fsync_duration_seconds", &[("volume", v)]) >= 1.0);
    // qemu-io's connection (the harness's port probes count too).
    assert!(value(&s1, "vblock_nbd_connections_accepted_total", &[]) >= 1.0);

    // Sampled state (once a second): size, WAL bytes, then the idle flush uploads a chunk.
    let mut last = s1;
    let ok = wait_until(Duration::from_secs(30), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_chunks_uploaded_total", &[("volume", v)]) >= 1.0
            && value(
                &last,
                "vblock_chunk_upload_duration_seconds",
                &[("volume", v)],
            ) >= 1.0
            && value(&last, "vblock_wal_bytes_total", &[("volume", v)]) >= 16.0 * 65536.0
    });
    assert!(ok, "chunk upload metrics did not move");
    assert_eq!(
        value(&last, "vblock_volume_size_bytes", &[("volume", v)]),
        (1u64 << 30) as f64
    );
    assert_eq!(value(&last, "vblock_volumes", &[]), 1.0);
    assert!(value(&last, "vblock_chunk_upload_bytes_total", &[("volume", v)]) > 0.0);

    // Reading the data back from the chunk (the buffer drained) hits the backend, then the cache.
    qemu_io(&d.uri(v), &["read -P 7 0 64k", "read -P 7 0 64k"]);
    let ok = wait_until(Duration::from_secs(10), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_cache_misses_total", &[("volume", v)]) >= 1.0
            && value(&last, "vblock_cache_hits_total", &[("volume", v)]) >= 1.0
    });
    assert!(ok, "cache metrics did not move");
    // Memory gauges: the frame cache holds the frames just read (64 KiB of data and more), RocksDB
    // holds the map commit in its memtable.
    let ok = wait_until(Duration::from_secs(10), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_frame_cache_bytes", &[]) >= 65536.0
            && value(&last, "vblock_meta_memory_bytes", &[("kind", "memtables")]) > 0.0
    });
    assert!(ok, "memory gauges did not move");
    assert!(
        value(
            &last,
            "vblock_backend_get_duration_seconds",
            &[("volume", v), ("backend", "file")]
        ) >= 1.0
    );

    // No memory pressure here (default target = open volumes x buffer + cache + 64 MiB; this
    // daemon's RSS plus its buffer's free room is far below it): the cache keeps its 256 MiB.
    assert_eq!(
        value(&last, "vblock_frame_cache_capacity_bytes", &[]),
        (256u64 << 20) as f64
    );
    assert_eq!(
        value(&last, "vblock_meta_cache_capacity_bytes", &[]),
        (64u64 << 20) as f64
    );

    // A bad request is counted with its EC2 error code.
    let out = run(
        Command::new(vblock_bin()).args([
            "volume",
            "describe",
            "vol-00000000000000000",
            "--nats-url",
            &nats.url(),
        ]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let s2 = scrape(d.metrics_port);
    assert_eq!(
        value(
            &s2,
            "vblock_nats_requests_total",
            &[
                ("op", "describevolumes"),
                ("result", "InvalidVolume.NotFound")
            ]
        ),
        1.0
    );
}

#[test]
fn compaction_gc_snapshot_and_space_metrics_move() {
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start_with(
        &nats.url(),
        &["--chunk-size", "256KiB", "--gc-interval", "200ms"],
    );
    let vol = d.create_volume(1);
    let v = vol.as_str();
    // 1 MiB in 256 KiB chunks, then 3 of every 4 64 KiB pieces overwritten: old chunks 25% live.
    qemu_io(&d.uri(v), &["write -P 1 0 1M", "flush"]);
    let described = d.cli(&["volume", "describe", v, "--output", "json"]);
    assert!(described.contains("\"Space\""), "{described}");
    let ok = wait_until(Duration::from_secs(30), || {
        value(
            &scrape(d.metrics_port),
            "vblock_chunks_uploaded_total",
            &[("volume", v)],
        ) >= 4.0
    });
    assert!(ok, "the first megabyte never reached chunks");
    let cmds: Vec<String> = (0..16)
        .filter(|i| i % 4 != 0)
        .map(|i| format!("write -P 2 {} 64k", i * 65536))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&d.uri(v), &refs);
    let mut last = scrape(d.metrics_port);
    let ok = wait_until(Duration::from_secs(60), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_compaction_bytes_total", &[("volume", v)]) > 0.0
            && value(&last, "vblock_compaction_chunks_total", &[("volume", v)]) >= 1.0
            && value(&last, "vblock_gc_deleted_objects_total", &[]) >= 1.0
            && value(&last, "vblock_gc_deleted_bytes_total", &[]) > 0.0
            && value(&last, "vblock_gc_checkpoints_total", &[]) >= 1.0
            && value(&last, "vblock_gc_checkpoint_bytes_total", &[]) > 0.0
    });
    assert!(
        ok,
        "compaction / GC metrics did not move; log:\n{}",
        d.log()
    );
    // Space gauges (sampled every 10 s): allocated is the 1 MiB written; the backlog drains.
    let ok = wait_until(Duration::from_secs(60), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_volume_allocated_bytes", &[("volume", v)]) == (1u64 << 20) as f64
            && value(&last, "vblock_volume_dead_bytes", &[("volume", v)]) == 0.0
            && value(&last, "vblock_volume_stored_bytes", &[("volume", v)]) > 0.0
            && value(&last, "vblock_volume_compression_ratio", &[("volume", v)]) > 1.0
    });
    assert!(ok, "space gauges did not settle");
    qemu_io(
        &d.uri(v),
        &[
            "read -P 1 0 64k",
            "read -P 2 64k 192k",
            "read -P 1 256k 64k",
        ],
    );
    d.cli(&["snapshot", "create", v]);
    let ok = wait_until(Duration::from_secs(10), || {
        value(&scrape(d.metrics_port), "vblock_snapshots", &[]) == 1.0
    });
    assert!(ok, "vblock_snapshots did not count the snapshot");
}

#[test]
fn status_shows_mounts_connections_and_iops() {
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vol = d.create_volume(2);
    d.cli(&["mount", &vol]);
    // One connection held open and writing while status samples.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, vol, port) = (stop.clone(), d.export(&vol), d.nbd_port);
        std::thread::spawn(move || {
            let mut c = nbd_client(port, &vol, Duration::from_secs(30));
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                c.seek(SeekFrom::Start((n % 256) * 4096)).expect("seek");
                c.write_all(&[1u8; 4096]).expect("write");
                n += 1;
            }
            n
        })
    };
    let mut row = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        let out = run_ok(
            Command::new(vblock_bin()).args([
                "status",
                "--metrics-url",
                &d.metrics_url(),
                "--interval",
                "500ms",
                "--output",
                "json",
            ]),
            Duration::from_secs(30),
        );
        let rows: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        row = rows
            .as_array()
            .and_then(|a| a.iter().find(|r| r["VolumeId"] == vol.as_str()))
            .cloned()
            .unwrap_or_default();
        row["Connections"] == 1.0 && row["WriteIops"].as_f64().unwrap_or(0.0) > 0.0
    });
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer");
    assert!(
        ok,
        "status never showed the connection and its writes: {row}"
    );
    assert!(written > 0);
    assert_eq!(row["Size"], 2.0);
    assert_eq!(row["Mounted"], true);
    assert_eq!(row["Attached"], false);
    assert_eq!(row["ReadIops"], 0.0);
    // The table form names the volume and the columns.
    let table = run_ok(
        Command::new(vblock_bin()).args([
            "status",
            "--metrics-url",
            &d.metrics_url(),
            "--interval",
            "100ms",
        ]),
        Duration::from_secs(30),
    );
    assert!(
        table.contains("VOLUME") && table.contains("WRITE/s"),
        "{table}"
    );
    assert!(table.contains(&vol), "{table}");
    // An unreachable endpoint is a clear error.
    let out = run(
        Command::new(vblock_bin()).args([
            "status",
            "--metrics-url",
            &format!("http://127.0.0.1:{}/metrics", free_port()),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot scrape"));
}

#[test]
fn json_log_lines_parse_and_io_is_not_logged() {
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start_with(&nats.url(), &["--log-format", "json"]);
    let vol = d.create_volume(1);
    qemu_io(&d.uri(&vol), &["write -P 3 0 64k", "flush"]);
    let lines_after_first = d.log().lines().count();
    let writes: Vec<String> = (0..200)
        .map(|i| format!("write -P 3 {} 4k", i * 4096))
        .collect();
    let refs: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&d.uri(&vol), &refs);
    let log = d.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        messages.push(v);
    }
    let has = |msg: &str| {
        messages
            .iter()
            .find(|v| v["fields"]["message"] == msg)
            .cloned()
    };
    let serving = has("vblock serving").expect("start line");
    assert!(serving["fields"]["version"]
        .as_str()
        .is_some_and(|s| s.contains("git")));
    assert_eq!(
        has("volume created").expect("create line")["fields"]["volume"],
        vol.as_str()
    );
    let connected = has("NBD client connected").expect("connect line");
    assert_eq!(
        connected["span"]["volume"],
        vol.as_str(),
        "connection span names the volume"
    );
    assert!(connected["span"]["peer"].is_string());
    // 200 writes add only the connect/disconnect lines of the second qemu-io, no per-I/O noise.
    let added = log.lines().count() - lines_after_first;
    assert!(added <= 4, "{added} lines for 200 writes:\n{log}");
}

#[test]
fn config_file_precedence_is_flags_env_file_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("vblock.toml");
    std::fs::write(
        &cfg,
        "data-dir = \"/srv/vblock\"\nbuffer-size = \"1GiB\"\ncache_size = \"64MiB\"\n\
         upload-concurrency = 8\ns3-force-path-style = true\nlog-format = \"json\"\n",
    )
    .expect("write config");
    let out = run_ok(
        Command::new(vblock_bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(["--buffer-size", "512MiB", "--print-config"])
            .env("VBLOCK_CACHE_SIZE", "32MiB")
            .env_remove("VBLOCK_DATA_DIR")
            .env_remove("VBLOCK_CHUNK_SIZE"),
        Duration::from_secs(30),
    );
    for expected in [
        "buffer-size = \"512MiB\"  # flag",
        "cache-size = \"32MiB\"  # env",
        "data-dir = \"/srv/vblock\"  # config file",
        "upload-concurrency = 8  # config file",
        "s3-force-path-style = true  # config file",
        "log-format = \"json\"  # config file",
        "chunk-size = \"4MiB\"  # default",
        "frame-size = \"16KiB\"  # default",
        "blocking-threads = 16  # default",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    // VBLOCK_CONFIG names the file too.
    let out = run_ok(
        Command::new(vblock_bin())
            .args(["serve", "--print-config"])
            .env("VBLOCK_CONFIG", &cfg),
        Duration::from_secs(30),
    );
    assert!(
        out.contains("data-dir = \"/srv/vblock\"  # config file"),
        "{out}"
    );
    // Unknown keys and bad TOML: exit 2 with the file and the key or line.
    for (text, says) in [
        (
            "data-dir = \"/x\"\nbufer-size = \"1GiB\"\n",
            "unknown key `bufer-size`",
        ),
        ("data-dir = \n", "not valid TOML"),
        ("nbd-listen = [1]\n", "`nbd-listen` must be a string"),
    ] {
        std::fs::write(&cfg, text).expect("write config");
        let out = run(
            Command::new(vblock_bin())
                .args(["serve", "--config"])
                .arg(&cfg),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says) && err.contains("vblock.toml"), "{err}");
    }
    // A bad value from the file is reported by clap like a bad flag.
    std::fs::write(&cfg, "buffer-size = \"lots\"\n").expect("write config");
    let out = run(
        Command::new(vblock_bin())
            .args(["serve", "--print-config", "--config"])
            .arg(&cfg),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lots"));
    // A frame size that is not whole blocks is refused before anything starts.
    let out = run(
        Command::new(vblock_bin())
            .args([
                "serve",
                "--no-metrics",
                "--frame-size",
                "6KiB",
                "--data-dir",
            ])
            .arg(dir.path().join("data")),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--frame-size 6144"), "{err}");
}

#[test]
fn daemon_runs_from_a_config_file_alone() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (nbd, metrics) = (free_port(), free_port());
    let cfg = dir.path().join("vblock.toml");
    std::fs::write(
        &cfg,
        format!(
            "data-dir = {:?}\nnbd-listen = \"127.0.0.1:{nbd}\"\nmetrics-listen = \"127.0.0.1:{metrics}\"\n\
             nats-url = \"{}\"\nbuffer-size = \"96MiB\"\n",
            dir.path().join("data").display().to_string(),
            nats.url()
        ),
    )
    .expect("write config");
    let mut child = Some(
        Command::new(vblock_bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let up = wait_until(Duration::from_secs(30), || {
        port_open(nbd) && port_open(metrics)
    });
    stop_child(&mut child);
    assert!(
        up,
        "daemon did not listen on the ports from its config file"
    );
    assert!(dir.path().join("data").exists());
    // The example config in scripts/ is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vblock.example.toml");
    let out = run_ok(
        Command::new(vblock_bin()).args(["serve", "--print-config", "--config", example]),
        Duration::from_secs(30),
    );
    assert!(out.contains("# config file"), "{out}");
}

/// A daemon started with a low soft open-files limit raises it to the hard limit (it holds
/// table files, chunk files, WAL segments and sockets; the usual soft default is 1024).
#[test]
fn daemon_raises_its_open_files_limit() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let nbd = free_port();
    let hard = std::fs::read_to_string("/proc/self/limits")
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .expect("hard limit");
    if hard == "unlimited" || hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        // Nothing to raise to, or no room below it for the test's low soft limit.
        eprintln!("hard open-files limit {hard}: nothing to test");
        return;
    }
    // `exec` keeps the shell's pid, and with it the lowered soft limit, for the daemon.
    let mut child = Some(
        Command::new("sh")
            .args(["-c", "ulimit -S -n 256 && exec \"$0\" \"$@\""])
            .arg(vblock_bin())
            .args(["serve", "--no-metrics", "--data-dir"])
            .arg(dir.path())
            .args(["--nats-url", &nats.url(), "--nbd-listen"])
            .arg(format!("127.0.0.1:{nbd}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let pid = child.as_ref().map(|c| c.id()).expect("child");
    let up = wait_until(Duration::from_secs(30), || port_open(nbd));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    stop_child(&mut child);
    assert!(up, "daemon did not start");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields.get(3..5),
        Some(&[hard.as_str(), hard.as_str()][..]),
        "{limits}"
    );
}

#[test]
fn metrics_port_in_use_is_exit_4() {
    let nats = Nats::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        Command::new(vblock_bin())
            .args(["serve", "--data-dir"])
            .arg(dir.path())
            .args(["--nats-url", &nats.url(), "--nbd-listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{port}")),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

/// A second `vblock serve` on a data directory a daemon is using exits with exit code 3 and
/// says why, and the first daemon goes on serving.
#[test]
fn a_second_daemon_on_the_same_data_directory_is_refused() {
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let id = d.create_volume(1);
    qemu_io(&d.uri(&id), &["write -P 0x3c 0 64k", "flush"]);
    let out = run(
        Command::new(vblock_bin())
            .args(["serve", "--data-dir"])
            .arg(d.data_dir())
            .args(["--nats-url", &nats.url(), "--nbd-listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", free_port())),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("is a daemon running on this data directory"),
        "{err}"
    );
    let read = qemu_io(&d.uri(&id), &["read -P 0x3c 0 64k"]);
    assert!(!read.contains("failed"), "{read}");
}

#[test]
fn version_names_the_commit_and_completions_generate() {
    let out = run_ok(
        Command::new(vblock_bin()).arg("--version"),
        Duration::from_secs(30),
    );
    // "vblock 0.1.0 (git 0123456789ab)" or "(git unknown)" outside a checkout.
    let commit = out
        .trim()
        .strip_prefix(concat!("vblock ", env!("CARGO_PKG_VERSION"), " (git "))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("bad --version: {out}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{out}"
    );
    for (shell, marker) in [
        ("bash", "_vblock()"),
        ("zsh", "#compdef vblock"),
        ("fish", "complete -c vblock"),
    ] {
        let script = run_ok(
            Command::new(vblock_bin()).args(["completions", shell]),
            Duration::from_secs(30),
        );
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("metrics-listen"),
            "{shell} completes serve flags"
        );
    }
}

/// Over its `--memory-target`, the daemon shrinks the frame cache to its floor (1/8 of
/// `--cache-size`), then RocksDB's block cache to its own (1/8 of `--meta-cache-size`), and
/// evicts what no longer fits; reads still return the data.
#[test]
fn over_its_memory_target_the_frame_cache_gives_way() {
    let nats = Nats::start();
    // Any daemon's resident set is above 1 MiB: the caches must go to 64 MiB / 8 = 8 MiB and
    // 32 MiB / 8 = 4 MiB.
    let d = Daemon::start_with(
        &nats.url(),
        &[
            "--cache-size",
            "64MiB",
            "--meta-cache-size",
            "32MiB",
            "--memory-target",
            "1MiB",
        ],
    );
    let vol = d.create_volume(1);
    let v = vol.as_str();
    qemu_io(&d.uri(v), &["write -P 9 0 16M", "flush"]);
    let mut last = scrape(d.metrics_port);
    let ok = wait_until(Duration::from_secs(30), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_frame_cache_capacity_bytes", &[]) <= (8u64 << 20) as f64 + 65536.0
            && value(&last, "vblock_meta_cache_capacity_bytes", &[]) == (4u64 << 20) as f64
            && value(&last, "vblock_chunks_uploaded_total", &[("volume", v)]) >= 4.0
    });
    assert!(
        ok,
        "the caches did not shrink to their floors, or the data did not reach chunks"
    );
    // Read all 16 MiB back from the chunks through the shrunken cache.
    qemu_io(&d.uri(v), &["read -P 9 0 16M"]);
    let ok = wait_until(Duration::from_secs(10), || {
        last = scrape(d.metrics_port);
        value(&last, "vblock_cache_misses_total", &[("volume", v)]) >= 1.0
    });
    assert!(ok, "the read did not go through the cache");
    let held = value(&last, "vblock_frame_cache_bytes", &[]);
    assert!(
        held <= (9u64 << 20) as f64,
        "the cache holds {held} bytes, over its 8 MiB floor"
    );
}

/// `--backend memory` keeps chunks in process memory, so it keeps nothing on disk either: no
/// metadata or WAL in `--data-dir` (a map there would outlive the chunks it points at), and a
/// restarted daemon starts empty instead of serving zeros for written blocks.
#[test]
fn the_memory_backend_is_wholly_ephemeral() {
    require("qemu-io");
    let nats = Nats::start();
    let mut d = Daemon::start_with(&nats.url(), &["--backend", "memory"]);
    let vol = d.create_volume(1);
    qemu_io(&d.uri(&vol), &["write -P 0x5a 0 1M", "flush"]);
    for sub in ["meta", "wal"] {
        assert!(
            !d.data_dir().join(sub).exists(),
            "--backend memory wrote {sub} into the data directory"
        );
    }
    d.wait_for_log("are gone when the daemon exits", Duration::from_secs(10));
    d.restart();
    let out = d.cli(&["volume", "list"]);
    assert!(
        !out.contains(&vol),
        "a memory volume outlived its daemon: {out}"
    );
}

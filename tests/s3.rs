//! The S3 backend against real S3-compatible servers on loopback (moto_server, s3s-fs):
//! round trip through NBD and restart, start-up errors, a 20 s outage during a write workload,
//! reads during an outage, corrupt objects.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{
    nbd_client, qemu_io, qemu_io_output, qemu_io_read_only, require, wait_until, Daemon, Nats,
};
use common::fault_proxy::FaultProxy;
use common::metrics::{scrape, value};
use common::s3::{Kind, S3Server};

fn daemon(nats: &Nats, s3: &S3Server, bucket: &str, extra: &[&str]) -> Daemon {
    let mut args = s3.serve_args(bucket);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_with_env(&nats.url(), &args, &S3Server::env())
}

/// Waits (up to 30 s) until `d` has uploaded at least `chunks` chunks; returns how many of its
/// S3 PUTs went as `UNSIGNED-PAYLOAD` by then (from `/metrics`).
fn unsigned_puts_after_uploads(d: &Daemon, chunks: f64) -> f64 {
    let uploaded = || value(&scrape(d.metrics_port), "vblock_chunks_uploaded_total", &[]);
    assert!(
        wait_until(Duration::from_secs(30), || uploaded() >= chunks),
        "{} chunks uploaded, waited for {chunks}; log:\n{}",
        uploaded(),
        d.log()
    );
    value(
        &scrape(d.metrics_port),
        "vblock_s3_unsigned_payload_puts_total",
        &[],
    )
}

/// PUTs of `d` whose SigV4 payload hash was computed ahead on a blocking thread (`/metrics`).
fn precomputed_hash_puts(d: &Daemon) -> f64 {
    value(
        &scrape(d.metrics_port),
        "vblock_s3_precomputed_payload_hash_puts_total",
        &[],
    )
}

/// Object keys under the daemon's prefix, listed with the backend itself.
fn list_objects(s3: &S3Server, bucket: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        use vblock::backend::Backend;
        let b = vblock::backend::s3::S3Backend::connect(&backend_config(s3, bucket, false))
            .await
            .expect("connect");
        b.list("").await.expect("list")
    })
}

/// The S3 backend's settings for `bucket` on `s3`, under the prefix the daemons use.
fn backend_config(
    s3: &S3Server,
    bucket: &str,
    create_bucket: bool,
) -> vblock::backend::s3::S3Config {
    vblock::backend::s3::S3Config {
        bucket: bucket.into(),
        prefix: "vblock".into(),
        endpoint: Some(s3.endpoint()),
        force_path_style: true,
        create_bucket,
        region: Some("us-east-1".into()),
        static_credentials: Some((common::s3::ACCESS_KEY.into(), common::s3::SECRET_KEY.into())),
        attempt_timeout: None,
        sign_payload: false,
    }
}

/// `put_if_absent` is S3's conditional PUT (`If-None-Match: *`) on both test servers: the first
/// stores, later ones get `412 PreconditionFailed` and leave the object alone, from the same
/// client and from another. Racing writers are not tested here: s3s-fs and moto check for the
/// key and then store, so two racing conditional PUTs can both succeed on them (AWS S3's are
/// atomic); the file backend's race is tested in src/backend/file.rs.
#[test]
fn conditional_puts_store_once_on_s3s_fs_and_moto() {
    for kind in [Kind::S3sFs, Kind::Moto] {
        let s3 = S3Server::start(kind);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            use vblock::backend::Backend;
            tokio::time::timeout(Duration::from_secs(60), async {
                let cfg = backend_config(&s3, "vblock-cas", true);
                let connect = || vblock::backend::s3::S3Backend::connect(&cfg);
                let (a, b) = (
                    connect().await.expect("connect"),
                    connect().await.expect("connect"),
                );
                let key = "vol-0123456789abcdef0/epoch/0000000000000001";
                assert!(a.put_if_absent(key, "first".into()).await.expect("put"));
                assert!(
                    !a.put_if_absent(key, "again".into()).await.expect("put"),
                    "{kind:?}"
                );
                assert!(
                    !b.put_if_absent(key, "other".into()).await.expect("put"),
                    "{kind:?}"
                );
                assert_eq!(&b.get(key).await.expect("get")[..], b"first", "{kind:?}");
                // A plain put still replaces: only the conditional one refuses.
                a.put(key, "replaced".into()).await.expect("put");
                assert_eq!(&a.get(key).await.expect("get")[..], b"replaced");
            })
            .await
            .expect("time limit");
        });
    }
}

#[test]
fn s3_round_trip_and_restart_with_moto() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::Moto);
    let mut d = daemon(&nats, &s3, "vblock-rt", &["--chunk-size", "256KiB"]);
    let vol = d.create_volume(1);
    let uri = d.uri(&vol);
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 4M",
            "write -P 0xcd 100001 5000",
            "write -z 1M 64k",
            "write -P 0xef 700M 1M",
        ],
    );
    // Over plain HTTP the SigV4 signature covers the payload; once the first PUT has shown
    // the scheme, its hash is computed off the async thread.
    assert_eq!(unsigned_puts_after_uploads(&d, 4.0), 0.0);
    assert!(precomputed_hash_puts(&d) >= 3.0, "{}", d.log());
    d.restart();
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 100001",
            "read -P 0xcd 100001 5000",
            "read -P 0xab 105001 943575",
            "read -P 0 1M 64k",
            "read -P 0xab 1088k 2M",
            "read -P 0xef 700M 1M",
            "read -P 0 800M 1M",
        ],
    );
    let keys = list_objects(&s3, "vblock-rt");
    let chunks = keys
        .iter()
        .filter(|k| k.starts_with(&format!("{vol}/chunks/")))
        .count();
    println!(
        "{} objects in the bucket, {chunks} chunks of {vol}",
        keys.len()
    );
    assert!(chunks >= 16, "{keys:?}");
    // Deleting the volume removes its objects.
    d.cli(&["unmount", &vol]);
    d.cli(&["volume", "delete", &vol]);
    assert!(list_objects(&s3, "vblock-rt")
        .iter()
        .all(|k| !k.starts_with(&vol)));
    // The secret key (AWS_SECRET_ACCESS_KEY) never reaches the log.
    assert!(!d.log().contains(common::s3::SECRET_KEY), "secret logged");
}

/// An HTTPS endpoint (moto with a certificate from a test CA): an untrusted certificate is a
/// clear start-up error; trusted (`SSL_CERT_FILE`), chunks are PUT as `UNSIGNED-PAYLOAD` and a
/// daemon on an empty data dir recovers them over HTTPS with ranged GETs.
#[test]
fn s3_over_https_round_trip_and_recovery() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::MotoTls);
    let args = s3.serve_args("vblock-tls");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, log) = Daemon::start_expect_failure(&nats.url(), &args, &S3Server::env());
    assert_eq!(code, Some(5), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");

    let ca = s3.ca_file().to_string_lossy().into_owned();
    let mut env = S3Server::env();
    env.push(("SSL_CERT_FILE", &ca));
    args.extend(["--chunk-size", "256KiB"]);
    let mut a = Daemon::start_with_env(&nats.url(), &args, &env);
    let vol = a.create_volume(1);
    qemu_io(
        &a.uri(&vol),
        &["write -P 0x5a 0 3M", "write -P 0x5b 700M 64k", "flush"],
    );
    assert!(unsigned_puts_after_uploads(&a, 4.0) >= 4.0);
    assert_eq!(
        precomputed_hash_puts(&a),
        0.0,
        "unsigned payloads are not hashed"
    );
    // A clean stop uploads everything buffered; then the local disk is "lost".
    a.stop();
    drop(a);
    let mut b = Daemon::start_with_env(&nats.url(), &args, &env);
    b.wait_for_log(
        "recovered volumes from the backend",
        Duration::from_secs(10),
    );
    qemu_io(
        &b.uri(&vol),
        &[
            "read -P 0x5a 0 3M",
            "read -P 0 3M 1M",
            "read -P 0x5b 700M 64k",
        ],
    );
    // `--s3-sign-payload` signs over HTTPS too (stores that refuse UNSIGNED-PAYLOAD).
    b.stop();
    drop(b);
    args.push("--s3-sign-payload");
    let c = Daemon::start_with_env(&nats.url(), &args, &env);
    assert!(
        c.log().contains("signed (--s3-sign-payload)"),
        "{}",
        c.log()
    );
    qemu_io(
        &c.uri(&vol),
        &["write -P 0x5c 8M 1M", "flush", "read -P 0x5a 0 3M"],
    );
    assert_eq!(unsigned_puts_after_uploads(&c, 4.0), 0.0);
    assert!(precomputed_hash_puts(&c) >= 4.0, "{}", c.log());
}

#[test]
fn s3_start_up_errors_are_clear() {
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::Moto);
    let env = S3Server::env();
    let endpoint = s3.endpoint();
    let (code, log) = Daemon::start_expect_failure(
        &nats.url(),
        &[
            "--backend",
            "s3",
            "--s3-bucket",
            "no-such-bucket",
            "--s3-endpoint",
            &endpoint,
            "--s3-force-path-style",
        ],
        &env,
    );
    assert_eq!(code, Some(5), "{log}");
    assert!(
        log.contains("does not exist") && log.contains("--s3-create-bucket"),
        "{log}"
    );
    let dead = format!("http://127.0.0.1:{}", common::daemon::free_port());
    let (code, log) = Daemon::start_expect_failure(
        &nats.url(),
        &[
            "--backend",
            "s3",
            "--s3-bucket",
            "b-b-b",
            "--s3-endpoint",
            &dead,
            "--s3-force-path-style",
        ],
        &env,
    );
    assert_eq!(code, Some(5), "{log}");
    assert!(log.contains("cannot reach"), "{log}");
    // Bad credentials (s3s-fs checks SigV4).
    let fs = S3Server::start(Kind::S3sFs);
    let fs_endpoint = fs.endpoint();
    let wrong = [
        ("AWS_ACCESS_KEY_ID", common::s3::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "wrong-secret"),
        ("AWS_REGION", "us-east-1"),
    ];
    let (code, log) = Daemon::start_expect_failure(
        &nats.url(),
        &[
            "--backend",
            "s3",
            "--s3-bucket",
            "b-b-b",
            "--s3-endpoint",
            &fs_endpoint,
            "--s3-force-path-style",
            "--s3-create-bucket",
        ],
        &wrong,
    );
    assert_eq!(code, Some(5), "{log}");
    assert!(
        log.contains("access denied") || log.contains("403") || log.contains("Signature"),
        "{log}"
    );
    let (code, log) = Daemon::start_expect_failure(&nats.url(), &["--backend", "s3"], &env);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("--s3-bucket"), "{log}");
}

fn block(b: u64, generation: u64) -> Vec<u8> {
    let mut v = vec![(b as u8) ^ (generation as u8) | 1; 4096];
    v[0..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&generation.to_le_bytes());
    v
}

#[test]
fn s3_outage_during_writes_loses_nothing_and_reads_recover() {
    require("qemu-io");
    let nats = Nats::start();
    let mut s3 = S3Server::start(Kind::S3sFs);
    let mut d = daemon(&nats, &s3, "vblock-outage", &["--chunk-size", "256KiB"]);
    let vol = d.create_volume(1);
    // A writer (independent NBD client) overwrites 2048 blocks round after round, flushing often.
    const BLOCKS: u64 = 2048;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, vol, port) =
            (stop.clone(), written.clone(), d.export(&vol), d.nbd_port);
        std::thread::spawn(move || {
            let mut c = nbd_client(port, &vol, Duration::from_secs(120));
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let b = n % BLOCKS;
                c.seek(SeekFrom::Start(b * 4096)).expect("seek");
                c.write_all(&block(b, n / BLOCKS))
                    .expect("write during outage must not fail");
                n += 1;
                if n % 64 == 0 {
                    c.flush().expect("flush during outage must not fail");
                }
                written.store(n, Ordering::SeqCst);
            }
            c.flush().expect("final flush");
            n
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || written.load(Ordering::SeqCst)
            > 4 * BLOCKS),
        "writer stalled at {}; daemon exit: {:?}; log:\n{}",
        written.load(Ordering::SeqCst),
        d.exited(),
        d.log()
    );
    // Outage: 20 s with the S3 server gone; writes and flushes keep succeeding (WAL).
    s3.stop();
    let down = Instant::now();
    let at_stop = written.load(Ordering::SeqCst);
    d.wait_for_log("chunk upload failed; retrying", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || written.load(Ordering::SeqCst)
            > at_stop + 2 * BLOCKS),
        "writes stopped during the outage"
    );
    let outage = Duration::from_secs(20);
    while down.elapsed() < outage {
        std::thread::sleep(Duration::from_millis(200).min(outage - down.elapsed()));
    }
    println!(
        "{} writes during a {:?} outage",
        written.load(Ordering::SeqCst) - at_stop,
        down.elapsed()
    );
    s3.restart();
    let after = written.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(60), || written.load(Ordering::SeqCst)
            > after + 4 * BLOCKS),
        "writes did not resume after the outage"
    );
    stop.store(true, Ordering::SeqCst);
    let total = writer.join().expect("writer");
    // A clean stop drains everything into S3; then every block holds its last generation.
    d.restart();
    let check = |d: &Daemon| {
        let mut c = nbd_client(d.nbd_port, &d.export(&vol), Duration::from_secs(120));
        let mut all = vec![0u8; (BLOCKS * 4096) as usize];
        for piece in all.chunks_mut(1 << 20) {
            c.read_exact(piece).expect("read");
        }
        for b in 0..BLOCKS {
            let last = (0..total).rev().find(|n| n % BLOCKS == b).expect("written");
            assert!(
                all[(b * 4096) as usize..((b + 1) * 4096) as usize] == block(b, last / BLOCKS)[..],
                "block {b} lost its last write"
            );
        }
    };
    check(&d);
    // Everything is in S3 now (the restart drained the buffer). Reads of it fail with EIO while
    // S3 is down, and work again when it is back.
    d.restart();
    s3.stop();
    let out = qemu_io_output(&d.uri(&vol), &["read 0 64k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("Input/output error") || text.contains("failed"),
        "read succeeded with S3 down: {text}"
    );
    assert!(text.contains("Input/output error"), "{text}");
    s3.restart();
    check(&d);
}

/// `503 SlowDown` answers and slow responses, added by a proxy in front of the real s3s-fs:
/// chunk uploads retry (with backoff) until they land, reads of data only in S3 retry within
/// their budget and return the right data, and nothing is lost.
#[test]
fn s3_slowdown_and_slow_responses_are_retried() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::S3sFs);
    let proxy = FaultProxy::start(s3.port);
    let args = S3Server::serve_args_at(&proxy.endpoint(), "vblock-faults");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--chunk-size", "256KiB", "--s3-timeout", "1s"]);
    let mut d = Daemon::start_with_env(&nats.url(), &args, &S3Server::env());
    let vol = d.create_volume(1);
    let chunks = |s3: &S3Server| {
        list_objects(s3, "vblock-faults")
            .iter()
            .filter(|k| k.contains("/chunks/"))
            .count()
    };

    // Uploads meet five 503s in a row (read and metadata calls allow six attempts, so five
    // cannot fail anything), retry, and land.
    proxy.fail_next(5);
    qemu_io(&d.uri(&vol), &["write -P 0x3c 0 2M", "flush"]);
    assert!(
        wait_until(Duration::from_secs(60), || proxy.failed() == 5
            && chunks(&s3) >= 8),
        "503s answered: {}, chunks in S3: {}; log:\n{}",
        proxy.failed(),
        chunks(&s3),
        d.log()
    );
    assert!(d.log().contains("HTTP 503 SlowDown"), "{}", d.log());
    // Signed over plain HTTP with hashes computed ahead, which s3s-fs checks against each body.
    assert!(precomputed_hash_puts(&d) >= 7.0, "{}", d.log());

    // Reads of data only in S3 (a restart drains the buffer and empties the cache) through
    // five more 503s.
    d.restart();
    proxy.fail_next(5);
    qemu_io(&d.uri(&vol), &["read -P 0x3c 0 2M"]);
    assert_eq!(proxy.failed(), 10, "the reads met the 503s");

    // Slow responses: every piece of every answer 150 ms late. Writes land, reads return the
    // right data.
    proxy.set_delay(Duration::from_millis(150));
    d.restart();
    qemu_io(
        &d.uri(&vol),
        &["read -P 0x3c 0 1M", "write -P 0x4d 1M 1M", "flush"],
    );
    d.restart();
    qemu_io(&d.uri(&vol), &["read -P 0x3c 0 1M", "read -P 0x4d 1M 1M"]);
    assert!(proxy.delayed() > 0, "no response was delayed");

    // Responses slower than the 1 s attempt limit: uploads time out and retry until the
    // server is fast again; nothing acknowledged is lost.
    proxy.set_delay(Duration::from_millis(1500));
    qemu_io(&d.uri(&vol), &["write -P 0x5e 0 1M", "flush"]);
    assert!(
        wait_until(Duration::from_secs(60), || d.log().contains("timed out")),
        "no attempt timed out:\n{}",
        d.log()
    );
    proxy.set_delay(Duration::ZERO);
    d.restart();
    qemu_io(&d.uri(&vol), &["read -P 0x5e 0 1M", "read -P 0x4d 1M 1M"]);
    assert!(!d.log().contains("panicked"), "daemon log:\n{}", d.log());
}

#[test]
fn corrupt_object_reads_as_eio_naming_the_key() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::S3sFs);
    let mut d = daemon(&nats, &s3, "vblock-corrupt", &["--chunk-size", "256KiB"]);
    let vol = d.create_volume(1);
    qemu_io(&d.uri(&vol), &["write -P 0x5a 0 1M"]);
    d.stop(); // drains into S3
              // s3s-fs keeps bucket/key as a file: corrupt the first chunk's frames.
    let key = format!("vblock/{vol}/chunks/0000000000000001");
    let path = s3.dir.path().join("vblock-corrupt").join(&key);
    let mut obj = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = obj.len();
    obj[n - 10] ^= 0xff;
    std::fs::write(&path, &obj).expect("corrupt");
    d.start_again();
    let out = qemu_io_output(&d.uri(&vol), &["read -P 0x5a 0 256k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error"),
        "corrupt data was returned: {text}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("corrupt chunk frame")
            && d.log().contains(&format!("{vol}/chunks/0000000000000001"))),
        "{}",
        d.log()
    );
    // Other chunks are fine.
    qemu_io(&d.uri(&vol), &["read -P 0x5a 512k 512k"]);
}

#[test]
fn disaster_recovery_into_an_empty_data_dir() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::Moto);
    let mut a = daemon(
        &nats,
        &s3,
        "vblock-dr",
        &["--chunk-size", "256KiB", "--gc-interval", "200ms"],
    );
    let v1 = a.create_volume(1);
    let v2 = a.create_volume(2);
    qemu_io(
        &a.uri(&v1),
        &[
            "write -P 0x11 0 3M",
            "write -P 0x12 5000 10000",
            "discard 1M 1M",
            "write -P 0x13 900M 64k",
        ],
    );
    qemu_io(&a.uri(&v2), &["write -P 0x21 1G 2M", "write -z 1G 4k"]);
    a.cli(&["unmount", &v2]);
    a.cli(&["volume", "resize", &v2, "--size", "3GiB"]);
    // A snapshot of v2, a clone of it with its own write, and v2 overwritten twice after it: GC
    // deletes the first overwrite's chunks, so v2 gets a map checkpoint in the bucket.
    let snap = a.cli(&["snapshot", "create", &v2]).trim().to_owned();
    let clone = a
        .cli(&["volume", "create", "--snapshot", &snap])
        .trim()
        .to_owned();
    qemu_io(&a.uri(&clone), &["write -P 0x31 0 64k"]);
    // A 2 MiB write fills a memtable by itself, so each overwrite becomes its own chunks.
    qemu_io(&a.uri(&v2), &["write -P 0x22 1G 2M", "flush"]);
    qemu_io(&a.uri(&v2), &["write -P 0x23 1G 2M", "flush"]);
    assert!(
        wait_until(Duration::from_secs(60), || list_objects(&s3, "vblock-dr")
            .iter()
            .any(|k| k.starts_with(&format!("{v2}/map/")))),
        "no map checkpoint for {v2}; log:\n{}",
        a.log()
    );
    // A clean stop uploads everything buffered; then the local disk is "lost".
    a.stop();
    drop(a);
    let mut b = daemon(&nats, &s3, "vblock-dr", &[]);
    b.wait_for_log(
        "recovered volumes from the backend",
        Duration::from_secs(10),
    );
    let list = b.cli(&["volume", "list"]);
    assert!(
        list.contains(&v1) && list.contains(&v2) && list.contains(&clone),
        "{list}"
    );
    let snaps = b.cli(&["snapshot", "list"]);
    assert!(
        snaps.contains(&snap) && snaps.contains("completed"),
        "{snaps}"
    );
    qemu_io_read_only(
        &b.uri(&snap),
        &["read -P 0 1G 4k", "read -P 0x21 1073745920 2093056"],
    );
    qemu_io(
        &b.uri(&clone),
        &[
            "read -P 0x31 0 64k",
            "read -P 0 1G 4k",
            "read -P 0x21 1073745920 2093056",
        ],
    );
    let d2: serde_json::Value =
        serde_json::from_str(&b.cli(&["volume", "describe", &v2, "--output", "json"]))
            .expect("json");
    assert_eq!(d2["Size"], 3);
    qemu_io(
        &b.uri(&v1),
        &[
            "read -P 0x11 0 5000",
            "read -P 0x12 5000 10000",
            "read -P 0x11 15000 1033576",
            "read -P 0 1M 1M",
            "read -P 0x11 2M 1M",
            "read -P 0x13 900M 64k",
        ],
    );
    qemu_io(&b.uri(&v2), &["read -P 0x23 1G 2M", "read -P 0 2G 1M"]);
    // The recovered volumes take new writes and keep them across a restart.
    qemu_io(&b.uri(&v1), &["write -P 0x14 4M 1M"]);
    b.restart();
    qemu_io(
        &b.uri(&v1),
        &["read -P 0x14 4M 1M", "read -P 0x13 900M 64k"],
    );
}

#[test]
fn s3_snapshot_clone_delete_leaves_empty_prefix() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::Moto);
    let d = daemon(&nats, &s3, "vblock-snap", &["--chunk-size", "256KiB"]);
    common::snapshots::snapshot_clone_delete(&d);
    let left = list_objects(&s3, "vblock-snap");
    assert!(left.is_empty(), "objects left under the prefix: {left:?}");
}

/// 4 KiB block `b` (0..256) of 1 MiB step `step`: the step and block number, then a fill that
/// depends on both.
fn step_block(step: u64, b: u64) -> Vec<u8> {
    let mut v = vec![(step as u8).wrapping_mul(31) ^ (b as u8) | 1; 4096];
    v[0..8].copy_from_slice(&step.to_le_bytes());
    v[8..16].copy_from_slice(&b.to_le_bytes());
    v
}

/// The 1 MiB region (of 48) step `step` writes.
fn step_region(step: u64, seed: u64) -> u64 {
    (step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).rotate_left(17) % 48
}

/// Disaster recovery is prefix-consistent (LSVD's guarantee): a client writes 1 MiB steps, each
/// to one of 48 regions and flushed, while 4 chunk PUTs are in flight; the daemon is killed -9
/// at a random step and its data directory lost; a daemon on an empty data directory recovers
/// the volume from the bucket. The image must equal steps 1..K-1 plus part of step K for some K:
/// a newer step present while an older one is missing is a hole a file system's journal could
/// point into. Rounds: `VBLOCK_PREFIX_ROUNDS` (default 6).
#[test]
fn disaster_recovery_holds_a_prefix_of_the_writes() {
    prefix_rounds(false);
}

/// With `--ship-wal` the same kill -9 and loss of the data directory lose no flushed write:
/// the recovered prefix holds every step whose flush returned, from chunks and shipped WAL
/// objects. Rounds: `VBLOCK_PREFIX_ROUNDS` (default 6).
#[test]
fn with_wal_shipping_disaster_recovery_holds_every_flushed_write() {
    prefix_rounds(true);
}

/// The rounds of [`disaster_recovery_holds_a_prefix_of_the_writes`]; with `ship_wal`, the
/// daemons ship their WAL and every acknowledged step must be recovered.
fn prefix_rounds(ship_wal: bool) {
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::S3sFs);
    let rounds: u64 = std::env::var("VBLOCK_PREFIX_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("VBLOCK_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("prefix test seed {seed} ({rounds} rounds, ship_wal {ship_wal})");
    let mut args = vec![
        "--chunk-size",
        "256KiB",
        "--upload-concurrency",
        "4",
        "--gc-interval",
        "200ms",
    ];
    if ship_wal {
        args.push("--ship-wal");
    }
    let (mut holes_avoided, mut steps_checked) = (0u64, 0u64);
    for round in 0..rounds {
        let rseed = seed ^ round.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let bucket = format!(
            "vblock-prefix-{}{round}",
            if ship_wal { "ship-" } else { "" }
        );
        let mut a = daemon(&nats, &s3, &bucket, &args);
        let vol = a.create_volume(1);
        let kill_after = 6 + rseed % 30;
        let acked = Arc::new(AtomicU64::new(0));
        let writer = {
            let (acked, vol, port) = (acked.clone(), a.export(&vol), a.nbd_port);
            std::thread::spawn(move || {
                let mut c = nbd_client(port, &vol, Duration::from_secs(30));
                for step in 1..=200u64 {
                    let r = step_region(step, rseed);
                    let mut data = Vec::with_capacity(1 << 20);
                    for b in 0..256 {
                        data.extend_from_slice(&step_block(step, b));
                    }
                    if c.seek(SeekFrom::Start(r << 20)).is_err()
                        || c.write_all(&data).is_err()
                        || c.flush().is_err()
                    {
                        return; // the daemon is gone
                    }
                    acked.store(step, Ordering::SeqCst);
                }
            })
        };
        assert!(
            wait_until(Duration::from_secs(60), || acked.load(Ordering::SeqCst)
                >= kill_after),
            "round {round}: writer stalled at step {}; log:\n{}",
            acked.load(Ordering::SeqCst),
            a.log()
        );
        a.kill9();
        let _ = writer.join();
        let sent = acked.load(Ordering::SeqCst) + 1; // the step in flight may have reached S3
        drop(a); // the data directory (WAL, map) is lost

        let b = daemon(&nats, &s3, &bucket, &args);
        b.wait_for_log(
            "recovered volumes from the backend",
            Duration::from_secs(30),
        );
        let mut c = nbd_client(b.nbd_port, &b.export(&vol), Duration::from_secs(30));
        let mut image = vec![0u8; 48 << 20];
        for (r, region) in image.chunks_mut(1 << 20).enumerate() {
            c.seek(SeekFrom::Start((r as u64) << 20)).expect("seek");
            c.read_exact(region).expect("read the image");
        }
        // The step each block holds (0: zeros); anything else is garbage.
        let mut found = vec![0u64; 48 * 256];
        for (i, blk) in image.chunks(4096).enumerate() {
            let (r, b) = (i as u64 / 256, i as u64 % 256);
            if blk.iter().all(|&x| x == 0) {
                continue;
            }
            let step = u64::from_le_bytes(blk[0..8].try_into().expect("8 bytes"));
            assert!(
                step >= 1 && step <= sent && step_region(step, rseed) == r,
                "round {round}: region {r} block {b} holds data no step wrote there"
            );
            assert!(
                blk == step_block(step, b).as_slice(),
                "round {round}: region {r} block {b} is not step {step}'s data"
            );
            found[i] = step;
        }
        // K: the newest step present. Every region must hold its last write before K; the
        // region of K may hold K in any of its blocks.
        let k = found.iter().copied().max().unwrap_or(0);
        for r in 0..48u64 {
            let before = (1..k)
                .rev()
                .find(|&s| step_region(s, rseed) == r)
                .unwrap_or(0);
            for b in 0..256u64 {
                let got = found[(r * 256 + b) as usize];
                let ok = got == before || (got == k && step_region(k, rseed) == r);
                assert!(
                    ok,
                    "round {round}: not a prefix: region {r} block {b} holds step {got}, \
                     but steps 1..{k} leave step {before} there (killed after step {})",
                    sent - 1
                );
            }
        }
        // Once the recovered volume is open, its flusher deletes the chunks after the gap (a
        // listing from the last committed id on): the ids above the checkpoint are contiguous.
        let contiguous = || {
            let keys = list_objects(&s3, &bucket);
            let ids_under = |dir: &str| -> Vec<u64> {
                let prefix = format!("{vol}/{dir}/");
                keys.iter()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .filter_map(|h| u64::from_str_radix(h, 16).ok())
                    .collect()
            };
            let from = ids_under("map").into_iter().max().unwrap_or(1);
            let mut ids: Vec<u64> = ids_under("chunks")
                .into_iter()
                .filter(|&i| i >= from)
                .collect();
            ids.sort_unstable();
            ids.iter().zip(from..).all(|(&i, want)| i == want)
        };
        assert!(
            wait_until(Duration::from_secs(30), contiguous),
            "round {round}: chunks after the recovered prefix were not deleted: {:?}",
            list_objects(&s3, &bucket)
        );
        steps_checked += k;
        if k + 1 < sent {
            holes_avoided += 1;
        }
        if ship_wal {
            assert!(
                k + 1 >= sent,
                "round {round}: step {} was flushed but only steps through {k} were recovered",
                sent - 1
            );
        }
        println!(
            "round {round}: {} steps acknowledged, recovered a prefix through step {k}",
            sent - 1
        );
    }
    println!(
        "prefix test: {rounds} rounds, {steps_checked} steps checked, {holes_avoided} rounds recovered fewer steps than acknowledged"
    );
}

/// The offline tools reach a stopped daemon's chunks in its bucket with the daemon's backend
/// flags: fsck verifies them, export reads them; without the flags fsck finds none. While the
/// daemon runs they refuse, saying why.
#[test]
fn offline_tools_work_on_an_s3_data_directory() {
    require("qemu-io");
    let nats = Nats::start();
    let s3 = S3Server::start(Kind::S3sFs);
    let mut d = daemon(&nats, &s3, "vblock-offline", &["--chunk-size", "256KiB"]);
    let id = d.create_volume(1);
    qemu_io(&d.uri(&id), &["write -P 0x5c 0 1M", "flush"]);
    let data_dir = d.data_dir();
    let offline = |args: &[&str], s3_flags: bool| {
        let mut cmd = std::process::Command::new(common::daemon::vblock_bin());
        cmd.args(args).arg("--data-dir").arg(&data_dir);
        if s3_flags {
            cmd.args(s3.serve_args("vblock-offline"));
        }
        cmd.envs(S3Server::env());
        common::daemon::run(&mut cmd, Duration::from_secs(120))
    };
    let busy = offline(&["fsck"], true);
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        !busy.status.success() && stderr.contains("is a daemon running on this data directory"),
        "{stderr}"
    );
    d.stop();
    let fsck = offline(&["fsck"], true);
    let out = String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck.status.success() && out.contains("1 volumes checked, 0 problem(s)"),
        "{out}{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let image = tempfile::NamedTempFile::new().expect("temp file");
    let path = image.path().to_str().expect("utf-8 path");
    let export = offline(&["export", &id, path], true);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let mut file = std::fs::File::open(image.path()).expect("image");
    assert_eq!(file.metadata().expect("stat").len(), 1 << 30);
    let mut head = vec![0u8; 2 << 20];
    file.read_exact(&mut head).expect("read image");
    assert!(head[..1 << 20].iter().all(|&b| b == 0x5c));
    assert!(head[1 << 20..].iter().all(|&b| b == 0));
    // Without the flags fsck looks in DATA_DIR/objects, where there are no chunks.
    let wrong = offline(&["fsck"], false);
    assert!(
        !wrong.status.success(),
        "fsck found the chunks without the S3 flags"
    );
}

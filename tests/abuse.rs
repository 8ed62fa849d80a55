//! Protocol abuse against a real `vblock serve` (issue: reliability, "Protocol abuse tests"):
//! 1,000 idle connections, half stopped in the handshake and half idle in transmission, cost
//! bounded memory, hold no resources once closed, and never stop another client being served.
//! Malformed handshakes and requests are covered in-process by nbd-server/tests/protocol.rs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::daemon::{qemu_io, require, wait_until, Daemon, Nats};

const IDLE: usize = 1000;

/// Resident set size of `pid` in KiB (`/proc/PID/status`, VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Open sockets of `pid` (its descriptors that are sockets). Files are not counted: the daemon
/// opens and closes them with its own I/O (a WAL segment preallocated after a flush, chunk files
/// kept open for reads), which would make a baseline race with the connections counted here.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// Fixed newstyle handshake up to the end of `NBD_OPT_GO` for `export` (NBD proto.md): the
/// connection is then in transmission, and stays idle.
fn go(port: u16, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    let mut req = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    req.extend_from_slice(b"IHAVEOPT");
    req.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    req.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    req.extend_from_slice(&(export.len() as u32).to_be_bytes());
    req.extend_from_slice(export.as_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&req).expect("NBD_OPT_GO");
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).expect("option reply");
        let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).expect("reply data");
        match kind {
            1 => return s, // NBD_REP_ACK
            3 => continue, // NBD_REP_INFO
            other => panic!("NBD_OPT_GO answered {other:#x}"),
        }
    }
}

#[test]
fn a_thousand_idle_connections_cost_bounded_memory_and_block_no_one() {
    require("qemu-io");
    let nats = Nats::start();
    let d = Daemon::start(&nats.url());
    let vol = d.create_volume(1);
    let pid = d.pid();
    // Warm the paths a client uses once, then take the baseline.
    qemu_io(&d.uri(&vol), &["write -P 0x11 0 1M", "read -P 0x11 0 1M"]);
    let export = d.export(&vol);
    let (rss_before, sockets_before) = (rss_kib(pid), sockets(pid));

    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        if i % 2 == 0 {
            // Stopped before the client flags: the handshake waits for it.
            idle.push(TcpStream::connect(("127.0.0.1", d.nbd_port)).expect("connect"));
        } else {
            idle.push(go(d.nbd_port, &export));
        }
    }
    assert!(
        wait_until(Duration::from_secs(20), || sockets(pid)
            >= sockets_before + IDLE),
        "the daemon did not accept {IDLE} connections: {} sockets",
        sockets(pid)
    );
    // Another client is served meanwhile.
    let out = qemu_io(
        &d.uri(&vol),
        &[
            "write -P 0x22 1M 1M",
            "read -P 0x22 1M 1M",
            "read -P 0x11 0 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let rss_with = rss_kib(pid);
    let grown = rss_with.saturating_sub(rss_before);
    println!(
        "RSS {rss_before} KiB -> {rss_with} KiB with {IDLE} idle connections (+{} KiB each)",
        grown / IDLE as u64
    );
    assert!(
        grown < 80 << 10,
        "{IDLE} idle connections grew RSS by {grown} KiB"
    );

    // Closing them gives every descriptor back.
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(20), || sockets(pid)
            <= sockets_before + 2),
        "sockets not released: {} now, {sockets_before} before",
        sockets(pid)
    );
    let out = qemu_io(&d.uri(&vol), &["read -P 0x22 1M 1M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

//! Raw-socket protocol tests of the NBD server: the spec's replies for valid and invalid options and
//! requests, disconnection of clients that break the protocol, and other connections unaffected.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nbd_server::proto::*;
use nbd_server::{Limits, Server, VolumeExports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Fixture {
    _dir: tempfile::TempDir,
    port: u16,
    /// Export name of the mounted volume.
    vol: String,
    server: Arc<Server>,
    engine: Arc<vblock::Engine>,
}

/// Mounts volume `id` the way `ebs.mount` does (its record's mount) and returns its export name.
async fn mount(engine: &vblock::Engine, id: &vblock::VolumeId, open_exports: bool) -> String {
    let mut rec = engine
        .get_record(id)
        .await
        .expect("record")
        .expect("volume");
    let m = vblock::records::Mount::new(String::new(), String::new(), false, String::new());
    let name = vblock::records::export_name(id.as_str(), &m, open_exports);
    rec.mount = Some(m);
    engine.put_record(rec).await.expect("mount");
    name
}

/// A server with open exports (bare names) and one mounted 1 MiB volume.
async fn fixture() -> Fixture {
    fixture_with(true).await
}

async fn fixture_with(open_exports: bool) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(vblock::backend::memory::MemoryBackend::new());
    let engine = Arc::new(
        vblock::Engine::open(vblock::EngineConfig::new(dir.path()), backend)
            .await
            .expect("engine"),
    );
    let id = engine
        .create_volume(1 << 20, "p")
        .await
        .expect("create")
        .volume_id;
    let vol = mount(&engine, &id, open_exports).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = Server::new(
        Arc::new(VolumeExports::new(engine.clone(), open_exports)),
        Limits::default(),
        None,
    );
    tokio::spawn(server.clone().serve_tcp(listener));
    Fixture {
        _dir: dir,
        port,
        vol,
        server,
        engine,
    }
}

async fn hello(port: u16, client_flags: u32) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    assert_eq!(s.read_u64().await.expect("magic"), NBDMAGIC);
    assert_eq!(s.read_u64().await.expect("ihaveopt"), IHAVEOPT);
    assert_eq!(
        s.read_u16().await.expect("flags"),
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    );
    s.write_u32(client_flags).await.expect("client flags");
    s
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.expect("send option");
}

/// (reply type, data)
async fn option_reply(s: &mut TcpStream, option: u32) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.expect("reply magic"), NBD_REP_MAGIC);
    assert_eq!(s.read_u32().await.expect("option"), option);
    let kind = s.read_u32().await.expect("type");
    let len = s.read_u32().await.expect("len");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.expect("data");
    (kind, data)
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Negotiates NBD_OPT_GO (simple replies) and returns the stream in transmission.
async fn go(port: u16, vol: &str) -> TcpStream {
    let mut s = hello(port, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).await;
    send_option(&mut s, NBD_OPT_GO, &go_data(vol, &[])).await;
    loop {
        let (kind, _) = option_reply(&mut s, NBD_OPT_GO).await;
        if kind == NBD_REP_ACK {
            return s;
        }
        assert_eq!(kind, NBD_REP_INFO);
    }
}

async fn request(
    s: &mut TcpStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).await.expect("send request");
}

/// (error, cookie) of a simple reply.
async fn simple(s: &mut TcpStream) -> (u32, u64) {
    assert_eq!(s.read_u32().await.expect("magic"), NBD_SIMPLE_REPLY_MAGIC);
    (
        s.read_u32().await.expect("error"),
        s.read_u64().await.expect("cookie"),
    )
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn limited<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("time limit")
    });
}

#[test]
fn option_haggling_replies() {
    limited(async {
        let f = fixture().await;
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        send_option(&mut s, 99, b"whatever").await;
        assert_eq!(option_reply(&mut s, 99).await.0, NBD_REP_ERR_UNSUP);
        send_option(&mut s, NBD_OPT_STARTTLS, &[]).await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_STARTTLS).await.0,
            NBD_REP_ERR_POLICY
        );
        send_option(&mut s, NBD_OPT_LIST, &[]).await;
        let (kind, data) = option_reply(&mut s, NBD_OPT_LIST).await;
        assert_eq!(kind, NBD_REP_SERVER);
        assert_eq!(&data[4..], f.vol.as_bytes());
        assert_eq!(option_reply(&mut s, NBD_OPT_LIST).await.0, NBD_REP_ACK);
        send_option(&mut s, NBD_OPT_LIST, b"x").await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_LIST).await.0,
            NBD_REP_ERR_INVALID
        );
        // Meta contexts need structured replies first.
        send_option(&mut s, NBD_OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]).await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_SET_META_CONTEXT).await.0,
            NBD_REP_ERR_INVALID
        );
        // Unknown export.
        send_option(&mut s, NBD_OPT_INFO, &go_data("vol-00000000000000000", &[])).await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_INFO).await.0,
            NBD_REP_ERR_UNKNOWN
        );
        send_option(&mut s, NBD_OPT_INFO, &go_data("../../etc/passwd", &[])).await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_INFO).await.0,
            NBD_REP_ERR_UNKNOWN
        );
        // Malformed INFO: count does not match.
        let mut bad = go_data(&f.vol, &[NBD_INFO_NAME]);
        bad.pop();
        send_option(&mut s, NBD_OPT_INFO, &bad).await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_INFO).await.0,
            NBD_REP_ERR_INVALID
        );
        // Valid INFO with name and description.
        send_option(
            &mut s,
            NBD_OPT_INFO,
            &go_data(
                &f.vol,
                &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
            ),
        )
        .await;
        let mut infos = Vec::new();
        loop {
            let (kind, data) = option_reply(&mut s, NBD_OPT_INFO).await;
            if kind == NBD_REP_ACK {
                break;
            }
            assert_eq!(kind, NBD_REP_INFO);
            infos.push(data);
        }
        let export = infos
            .iter()
            .find(|d| d[0..2] == NBD_INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        assert_eq!(
            u64::from_be_bytes(export[2..10].try_into().expect("size")),
            1 << 20
        );
        let bs = infos
            .iter()
            .find(|d| d[0..2] == NBD_INFO_BLOCK_SIZE.to_be_bytes())
            .expect("block size");
        assert_eq!(&bs[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert!(infos
            .iter()
            .any(|d| d[0..2] == NBD_INFO_NAME.to_be_bytes() && &d[2..] == f.vol.as_bytes()));
        // Structured replies, then meta contexts.
        send_option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(
            option_reply(&mut s, NBD_OPT_STRUCTURED_REPLY).await.0,
            NBD_REP_ACK
        );
        let mut q = Vec::new();
        q.extend_from_slice(&(f.vol.len() as u32).to_be_bytes());
        q.extend_from_slice(f.vol.as_bytes());
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        q.extend_from_slice(BASE_ALLOCATION.as_bytes());
        send_option(&mut s, NBD_OPT_SET_META_CONTEXT, &q).await;
        let (kind, data) = option_reply(&mut s, NBD_OPT_SET_META_CONTEXT).await;
        assert_eq!(kind, NBD_REP_META_CONTEXT);
        assert_eq!(&data[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(
            option_reply(&mut s, NBD_OPT_SET_META_CONTEXT).await.0,
            NBD_REP_ACK
        );
        send_option(&mut s, NBD_OPT_ABORT, &[]).await;
        assert_eq!(option_reply(&mut s, NBD_OPT_ABORT).await.0, NBD_REP_ACK);
        assert!(closed(&mut s).await);
    });
}

#[test]
fn handshake_violations_disconnect() {
    limited(async {
        let f = fixture().await;
        // Unknown client flag.
        let mut s = hello(f.port, 1 << 7).await;
        assert!(closed(&mut s).await);
        // Bad option magic.
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        s.write_all(&[0u8; 16]).await.expect("send");
        assert!(closed(&mut s).await);
        // Huge option length: no allocation, disconnect.
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&b).await.expect("send");
        assert!(closed(&mut s).await);
        // NBD_OPT_EXPORT_NAME of an unknown export: the only answer is a disconnect.
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        send_option(&mut s, NBD_OPT_EXPORT_NAME, b"vol-00000000000000000").await;
        assert!(closed(&mut s).await);
        // A well-behaved client still gets served.
        let mut s = go(f.port, &f.vol).await;
        request(&mut s, 0, NBD_CMD_FLUSH, 1, 0, 0, &[]).await;
        assert_eq!(simple(&mut s).await, (0, 1));
    });
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    limited(async {
        let f = fixture().await;
        let mut s = go(f.port, &f.vol).await;
        let size = 1u64 << 20;
        // Out of range: reads EINVAL, writes ENOSPC (payload skipped, stream stays in step).
        request(&mut s, 0, NBD_CMD_READ, 1, size - 10, 20, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 1));
        request(&mut s, 0, NBD_CMD_WRITE, 2, size - 10, 20, &[7u8; 20]).await;
        assert_eq!(simple(&mut s).await, (NBD_ENOSPC, 2));
        request(&mut s, 0, NBD_CMD_READ, 3, u64::MAX, 1, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 3));
        request(&mut s, 0, NBD_CMD_TRIM, 4, size, 4096, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_ENOSPC, 4));
        // A 4 GiB read is refused without allocating it.
        request(&mut s, 0, NBD_CMD_READ, 5, 0, u32::MAX, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 5));
        // Unknown command, invalid flags, block status without a context, flush with a length.
        request(&mut s, 0, 99, 6, 0, 0, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 6));
        request(
            &mut s,
            NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_WRITE,
            7,
            0,
            4,
            b"abcd",
        )
        .await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 7));
        request(&mut s, 0, NBD_CMD_BLOCK_STATUS, 8, 0, 4096, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 8));
        request(&mut s, 0, NBD_CMD_FLUSH, 9, 0, 1, &[]).await;
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 9));
        // FAST_ZERO on an unaligned range: not fast.
        request(
            &mut s,
            NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_WRITE_ZEROES,
            10,
            1,
            100,
            &[],
        )
        .await;
        assert_eq!(simple(&mut s).await, (NBD_ENOTSUP, 10));
        // The connection still works: pipelined write + read, replies matched by cookie.
        request(
            &mut s,
            NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE,
            11,
            100,
            5,
            b"hello",
        )
        .await;
        assert_eq!(simple(&mut s).await, (0, 11));
        request(&mut s, 0, NBD_CMD_READ, 12, 100, 5, &[]).await;
        assert_eq!(simple(&mut s).await, (0, 12));
        let mut data = [0u8; 5];
        s.read_exact(&mut data).await.expect("data");
        assert_eq!(&data, b"hello");
        // Bad request magic: disconnect; a second connection is unaffected.
        let mut other = go(f.port, &f.vol).await;
        s.write_all(&[0xffu8; 28]).await.expect("send");
        assert!(closed(&mut s).await);
        request(&mut other, 0, NBD_CMD_READ, 13, 100, 5, &[]).await;
        assert_eq!(simple(&mut other).await, (0, 13));
        other.read_exact(&mut data).await.expect("data");
        assert_eq!(&data, b"hello");
        // NBD_CMD_DISC closes cleanly after in-flight requests.
        request(&mut other, 0, NBD_CMD_DISC, 14, 0, 0, &[]).await;
        assert!(closed(&mut other).await);
    });
}

#[test]
fn oversized_write_payload_is_skipped_not_buffered() {
    limited(async {
        let f = fixture().await;
        let mut s = go(f.port, &f.vol).await;
        let len = MAX_BLOCK_PLUS_ONE;
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&0u16.to_be_bytes());
        hdr.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        hdr.extend_from_slice(&1u64.to_be_bytes());
        hdr.extend_from_slice(&0u64.to_be_bytes());
        hdr.extend_from_slice(&len.to_be_bytes());
        s.write_all(&hdr).await.expect("header");
        let chunk = vec![1u8; 1 << 20];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).await.expect("payload");
            left -= n;
        }
        assert_eq!(simple(&mut s).await, (NBD_EINVAL, 1));
        request(&mut s, 0, NBD_CMD_FLUSH, 2, 0, 0, &[]).await;
        assert_eq!(simple(&mut s).await, (0, 2));
    });
}

const MAX_BLOCK_PLUS_ONE: u32 = nbd_server::MAX_BLOCK + 1;

/// Waits (bounded) until the server holds `n` connections.
async fn connections_drop_to(f: &Fixture, n: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if f.server.stats().connections.load(Ordering::Relaxed) == n {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn truncated_handshakes_free_their_connection() {
    limited(async {
        let f = fixture().await;
        // Half of the client flags.
        let mut s = TcpStream::connect(("127.0.0.1", f.port))
            .await
            .expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.expect("hello");
        s.write_all(&[0, 0]).await.expect("send");
        drop(s);
        // Half an option header.
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        s.write_all(&IHAVEOPT.to_be_bytes()[..5])
            .await
            .expect("send");
        drop(s);
        // An option announcing 100 bytes of data, carrying 10.
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        b.extend_from_slice(&100u32.to_be_bytes());
        b.extend_from_slice(&[0u8; 10]);
        s.write_all(&b).await.expect("send");
        drop(s);
        // A request header cut short after NBD_OPT_GO.
        let mut s = go(f.port, &f.vol).await;
        s.write_all(&NBD_REQUEST_MAGIC.to_be_bytes())
            .await
            .expect("send");
        drop(s);
        // A write whose payload never arrives in full.
        let mut s = go(f.port, &f.vol).await;
        request(&mut s, 0, NBD_CMD_WRITE, 1, 0, 4096, &[9u8; 100]).await;
        drop(s);
        assert!(connections_drop_to(&f, 0).await, "connections leaked");
        // Nothing of the cut-short write landed; a new client is served.
        let mut s = go(f.port, &f.vol).await;
        request(&mut s, 0, NBD_CMD_READ, 2, 0, 4096, &[]).await;
        assert_eq!(simple(&mut s).await, (0, 2));
        let mut data = vec![1u8; 4096];
        s.read_exact(&mut data).await.expect("data");
        assert!(
            data.iter().all(|&b| b == 0),
            "a torn write reached the volume"
        );
    });
}

#[test]
fn requests_after_disc_are_not_served() {
    limited(async {
        let f = fixture().await;
        let mut s = go(f.port, &f.vol).await;
        // A write that is served, NBD_CMD_DISC, then a write and a read in the same packet.
        let mut b = Vec::new();
        for (kind, cookie, offset, payload) in [
            (NBD_CMD_WRITE, 1u64, 0u64, &[1u8; 512][..]),
            (NBD_CMD_DISC, 2, 0, &[][..]),
            (NBD_CMD_WRITE, 3, 4096, &[2u8; 512][..]),
            (NBD_CMD_READ, 4, 0, &[][..]),
        ] {
            b.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            let len = if kind == NBD_CMD_READ {
                512
            } else {
                payload.len() as u32
            };
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(payload);
        }
        s.write_all(&b).await.expect("send");
        // Only the first write is answered; then the server closes.
        assert_eq!(simple(&mut s).await, (0, 1));
        assert!(closed(&mut s).await);
        let mut s = go(f.port, &f.vol).await;
        request(&mut s, 0, NBD_CMD_READ, 5, 0, 8192, &[]).await;
        assert_eq!(simple(&mut s).await, (0, 5));
        let mut data = vec![0u8; 8192];
        s.read_exact(&mut data).await.expect("data");
        assert!(
            data[..512].iter().all(|&b| b == 1),
            "write before DISC lost"
        );
        assert!(
            data[4096..].iter().all(|&b| b == 0),
            "write after DISC served"
        );
    });
}

/// A new volume of `f`'s engine, not mounted.
async fn unmounted_volume(f: &Fixture) -> vblock::VolumeId {
    f.engine
        .create_volume(1 << 20, "u")
        .await
        .expect("create")
        .volume_id
}

/// `NBD_OPT_LIST`'s names, then the ACK.
async fn list(s: &mut TcpStream) -> Vec<String> {
    send_option(s, NBD_OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        match option_reply(s, NBD_OPT_LIST).await {
            (NBD_REP_SERVER, data) => names.push(String::from_utf8_lossy(&data[4..]).into_owned()),
            (kind, _) => {
                assert_eq!(kind, NBD_REP_ACK);
                return names;
            }
        }
    }
}

/// The reply type of `NBD_OPT_INFO` for `name` (its info replies read and dropped).
async fn info(s: &mut TcpStream, name: &str) -> u32 {
    send_option(s, NBD_OPT_INFO, &go_data(name, &[])).await;
    loop {
        match option_reply(s, NBD_OPT_INFO).await.0 {
            NBD_REP_INFO => {}
            kind => return kind,
        }
    }
}

/// Only mounted volumes are exports: under `ID-SECRET` by default (the bare id, another
/// secret, and an unmounted volume are all unknown; nothing is listed), under the bare id with
/// open exports (mounted volumes listed). `NBD_OPT_INFO` opens no instance; `NBD_OPT_GO` does.
#[test]
fn exports_are_mounted_volumes_under_their_secret_names() {
    limited(async {
        let f = fixture_with(false).await;
        let (id, secret) = vblock::records::split_export_name(&f.vol);
        let (id, secret) = (id.to_owned(), secret.expect("a secret").to_owned());
        let unmounted = unmounted_volume(&f).await;
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        assert!(
            list(&mut s).await.is_empty(),
            "secret names are never listed"
        );
        let other = format!("{id}-{}", "0".repeat(secret.len()));
        for refused in [id.as_str(), other.as_str(), unmounted.as_str()] {
            assert_eq!(
                info(&mut s, refused).await,
                NBD_REP_ERR_UNKNOWN,
                "{refused}"
            );
        }
        assert_eq!(info(&mut s, &f.vol).await, NBD_REP_ACK);
        assert!(
            f.engine.open_volumes().await.is_empty(),
            "NBD_OPT_INFO left an instance open"
        );
        let _go = go(f.port, &f.vol).await;
        assert_eq!(f.engine.open_volumes().await.len(), 1);

        let f = fixture().await;
        let unmounted = unmounted_volume(&f).await;
        let mut s = hello(f.port, NBD_FLAG_C_FIXED_NEWSTYLE).await;
        assert_eq!(list(&mut s).await, vec![f.vol.clone()]);
        assert_eq!(info(&mut s, unmounted.as_str()).await, NBD_REP_ERR_UNKNOWN);
        assert_eq!(info(&mut s, &f.vol).await, NBD_REP_ACK);
        let named = mount(&f.engine, &unmounted, true).await;
        assert_eq!(info(&mut s, &named).await, NBD_REP_ACK);
        assert_eq!(list(&mut s).await.len(), 2);
    });
}

//! A TCP proxy in front of a real S3 server that adds the faults the server cannot produce on
//! demand: `503 SlowDown` answers (S3's throttling error) and slow responses. Every request it
//! does not fail goes to the real server unchanged (SigV4 signs the Host header, which the proxy
//! passes through as it is).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Requests still to answer with 503 SlowDown.
    fail_next: AtomicUsize,
    /// Requests answered with 503 so far.
    failed: AtomicUsize,
    /// Delay before each piece of a response, in milliseconds.
    delay_ms: AtomicU64,
    /// Response pieces delayed so far.
    delayed: AtomicU64,
    /// Bumped to cut every open connection (clients then reconnect and meet the faults).
    epoch: AtomicU64,
    stop: AtomicBool,
}

/// The proxy; stops when dropped.
pub struct FaultProxy {
    /// Loopback port it listens on.
    pub port: u16,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>";

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, upstream, &st));
            }
        });
        Self {
            port,
            state,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers the next `n` requests with `503 SlowDown` (cuts open connections so the next
    /// requests come on new ones).
    pub fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::SeqCst);
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Requests answered with 503 so far.
    pub fn failed(&self) -> usize {
        self.state.failed.load(Ordering::SeqCst)
    }

    /// Delays every piece of every response by `delay` (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Response pieces delayed so far.
    pub fn delayed(&self) -> u64 {
        self.state.delayed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(client: TcpStream, upstream: u16, st: &Arc<State>) {
    let fail = st
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if fail {
        if slow_down(client).is_ok() {
            st.failed.fetch_add(1, Ordering::SeqCst);
        }
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let epoch = st.epoch.load(Ordering::SeqCst);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let st2 = st.clone();
    let up = std::thread::spawn(move || pipe(c2, s2, &st2, epoch, false));
    pipe(server, client, st, epoch, true);
    let _ = up.join();
}

/// Copies `from` to `to` until EOF, an error, or the epoch moves on; `slow` delays each piece.
fn pipe(mut from: TcpStream, mut to: TcpStream, st: &State, epoch: u64, slow: bool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if st.epoch.load(Ordering::SeqCst) != epoch {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let delay = st.delay_ms.load(Ordering::SeqCst);
                if slow && delay > 0 {
                    std::thread::sleep(Duration::from_millis(delay));
                    st.delayed.fetch_add(1, Ordering::SeqCst);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Reads one request (head and body) and answers `503 SlowDown`, closing the connection.
fn slow_down(client: TcpStream) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = client.try_clone()?;
    let mut r = BufReader::new(client);
    let (mut length, mut chunked, mut expect) = (0usize, false, false);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        } else if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            chunked = true;
        } else if line.starts_with("expect:") && line.contains("100-continue") {
            expect = true;
        }
    }
    // Swallow the body, so the client reads the answer rather than a reset (with `Expect:
    // 100-continue` the client sends no body before an interim answer it will not get).
    if !expect {
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let hex = size.trim().split(';').next().unwrap_or("0");
                let n = usize::from_str_radix(hex, 16).unwrap_or(0);
                if n == 0 {
                    // Trailers up to the empty line.
                    loop {
                        let mut t = String::new();
                        if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                std::io::copy(&mut (&mut r).take(n as u64 + 2), &mut std::io::sink())?;
            }
        } else {
            std::io::copy(&mut (&mut r).take(length as u64), &mut std::io::sink())?;
        }
    }
    write!(
        out,
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{SLOW_DOWN}",
        SLOW_DOWN.len()
    )?;
    out.flush()?;
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}

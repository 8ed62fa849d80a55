//! Real servers for end-to-end tests: a `nats-server` and the `vblock serve` daemon on free
//! loopback ports, plus bounded runs of real NBD clients (qemu-io, nbdinfo, nbdcopy, fio, ...).
//! Readiness is polled against a deadline; every external command has a time limit.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `vblock` binary built alongside these tests (`target/<profile>/vblock`).
pub fn vblock_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VBLOCK_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/vblock
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("vblock");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build` (scripts/test.sh does) first",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The client port in the ports file nats-server writes into `dir` once it listens
/// (`{"nats":["nats://127.0.0.1:PORT"]}`), if it has.
fn listened_port(dir: &Path) -> Option<u16> {
    let file = std::fs::read_dir(dir).ok()?.flatten().next()?.path();
    let ports: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    ports["nats"][0].as_str()?.rsplit(':').next()?.parse().ok()
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// True when something accepts TCP connections on loopback `port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// An independent NBD client (the `nbd` crate: NBD_OPT_EXPORT_NAME, simple replies) for export
/// `vol` on loopback `port`, with a `read_timeout` on the socket.
pub fn nbd_client(
    port: u16,
    vol: &str,
    read_timeout: Duration,
) -> nbd::client::NbdClient<TcpStream> {
    nbd_client_and_socket(port, vol, read_timeout).0
}

/// [`nbd_client`], and a second handle on its socket (to see what the server does with the
/// connection itself, e.g. close it).
pub fn nbd_client_and_socket(
    port: u16,
    vol: &str,
    read_timeout: Duration,
) -> (nbd::client::NbdClient<TcpStream>, TcpStream) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // The nbd crate writes each header field separately: no Nagle delay.
    tcp.set_nodelay(true).expect("nodelay");
    tcp.set_read_timeout(Some(read_timeout)).expect("timeout");
    let export = nbd::client::handshake(&mut tcp, vol.as_bytes()).expect("handshake");
    let socket = tcp.try_clone().expect("clone the socket");
    (nbd::client::NbdClient::new(tcp, &export), socket)
}

/// Runs `qemu-io -f raw -c CMD... URI` (bounded) and returns its output, whatever it says.
pub fn qemu_io_output(uri: &str, cmds: &[&str]) -> Output {
    qemu_io_run(uri, cmds, false)
}

fn qemu_io_run(uri: &str, cmds: &[&str], read_only: bool) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(uri), Duration::from_secs(120))
}

/// Runs `qemu-io` like [`qemu_io_output`] and requires success: exit code 0 and no failed
/// command or pattern verification in its output. Returns stdout.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_checked(uri, cmds, false)
}

/// [`qemu_io`] with the image opened read-only (`-r`), as a read-only export requires.
pub fn qemu_io_read_only(uri: &str, cmds: &[&str]) -> String {
    qemu_io_checked(uri, cmds, true)
}

fn qemu_io_checked(uri: &str, cmds: &[&str], read_only: bool) -> String {
    let out = qemu_io_run(uri, cmds, read_only);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Requires an installed tool, with a message saying how to get it.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run scripts/setup.sh (CI installs it in .ci/run)"
    );
}

/// Runs `cmd` with a time limit; returns its output (killed and reported on overrun).
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let out_pipe = child.stdout.take();
    let err_pipe = child.stderr.take();
    let read = |p: Option<std::process::ChildStdout>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = std::io::Read::read_to_end(&mut p, &mut v);
            }
            v
        })
    };
    let out_t = read(out_pipe);
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut p) = err_pipe {
            let _ = std::io::Read::read_to_end(&mut p, &mut v);
        }
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} exceeded {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs `cmd` and requires success; returns stdout as text.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Kills a child process (if any) and reaps it.
pub fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The `vblock serve` command line for a data directory, NBD port and NATS URL.
fn serve_command(
    data_dir: &Path,
    (nbd_port, metrics_port): (u16, u16),
    nats_url: &str,
    extra: &[String],
    envs: &[(String, String)],
) -> Command {
    let mut c = Command::new(vblock_bin());
    c.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--nbd-listen")
        .arg(format!("127.0.0.1:{nbd_port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--nats-url")
        .arg(nats_url)
        .args(extra)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info,async_nats=warn");
    c
}

/// A `nats-server` on a free loopback port, stopped on drop.
pub struct Nats {
    child: Option<Child>,
    /// Port: chosen by nats-server at the first start (`-p -1`), kept across restarts.
    pub port: u16,
    /// Holds the ports file (`--ports_file_dir`) and JetStream's store (`-js -sd DIR/js`).
    dir: tempfile::TempDir,
    jetstream: bool,
}

impl Nats {
    /// Starts it and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_on(false)
    }

    /// [`Nats::start`] with JetStream on (`-js`), its store in a temporary directory.
    pub fn start_jetstream() -> Self {
        Self::start_on(true)
    }

    fn start_on(jetstream: bool) -> Self {
        require("nats-server");
        let mut n = Self {
            child: None,
            port: 0,
            dir: tempfile::tempdir().expect("tempdir"),
            jetstream,
        };
        n.spawn();
        n
    }

    /// Starts nats-server and waits until it listens. The first start lets it choose a free
    /// port and reads it from its ports file (a port picked here could be taken by another
    /// test's server before this one binds it); a restart binds the same port again.
    fn spawn(&mut self) {
        let ports_file = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_file);
        std::fs::create_dir_all(&ports_file).expect("ports file dir");
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut args = vec![
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port,
        ];
        args.extend([
            "--ports_file_dir".to_owned(),
            ports_file.display().to_string(),
        ]);
        if self.jetstream {
            args.extend(["-js".to_owned(), "-sd".to_owned()]);
            args.push(self.dir.path().join("js").display().to_string());
        }
        let child = Command::new("nats-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let mut listening = None;
        let started = wait_until(Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server exited at start: {status}");
            }
            listening = listened_port(&ports_file);
            listening.is_some()
        });
        assert!(started, "nats-server did not start");
        if let Some(port) = listening {
            self.port = port;
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it (for outage tests).
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port with an empty JetStream store (its disk lost).
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("js"));
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `vblock serve` daemon with its own data directory, stopped on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Data directory.
    pub dir: tempfile::TempDir,
    /// NBD port (kept across restarts).
    pub nbd_port: u16,
    /// Prometheus endpoint port (kept across restarts).
    pub metrics_port: u16,
    /// NATS URL.
    pub nats_url: String,
    extra: Vec<String>,
    envs: Vec<(String, String)>,
    starts: u32,
}

impl Daemon {
    /// Starts a daemon on a fresh data directory and waits until NBD accepts connections.
    pub fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, &[])
    }

    /// As [`Daemon::start`] with extra `vblock serve` flags.
    pub fn start_with(nats_url: &str, extra: &[&str]) -> Self {
        Self::start_with_env(nats_url, extra, &[])
    }

    /// As [`Daemon::start_with`] with extra environment variables.
    pub fn start_with_env(nats_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut d = Self {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            nbd_port: free_port(),
            metrics_port: free_port(),
            nats_url: nats_url.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
        };
        d.spawn();
        d
    }

    /// Data directory path.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        // free_port's port may be taken by another process before the daemon binds it: a
        // first start picks new ports and tries again (restarts keep theirs: tests hold URIs).
        for attempt in 1..=5 {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if self.starts == attempt && log.contains("Address already in use") => {
                    (self.nbd_port, self.metrics_port) = (free_port(), free_port());
                }
                Err(log) => panic!("vblock serve exited at start; log:\n{log}"),
            }
        }
        panic!("vblock serve found no free ports in 5 attempts");
    }

    /// Starts the daemon and waits until it serves (its `vblock serving` log line, written
    /// once every listener is bound); `Err(log)` if it exits first.
    fn try_spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("daemon-{}.log", self.starts)))
                .expect("log file");
        let child = serve_command(
            &self.data_dir(),
            (self.nbd_port, self.metrics_port),
            &self.nats_url,
            &self.extra,
            &self.envs,
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn vblock serve");
        self.child = Some(child);
        let mut exited = false;
        let ok = wait_until(Duration::from_secs(30), || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    exited = true;
                    return true;
                }
            }
            self.log().contains("vblock serving")
        });
        if exited {
            self.child = None;
            return Err(self.log());
        }
        assert!(
            ok,
            "vblock serve did not start serving on {}; log:\n{}",
            self.nbd_port,
            self.log()
        );
        Ok(())
    }

    /// The current log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("daemon-{}.log", self.starts)))
            .unwrap_or_default()
    }

    /// Waits up to `limit` for `needle` in the log of the current run; fails the test with the
    /// log if it does not appear.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        assert!(
            wait_until(limit, || self.log().contains(needle)),
            "no {needle:?} in the log within {limit:?}:\n{}",
            self.log()
        );
    }

    /// Runs `vblock serve` on a fresh data directory expecting it to exit at start; returns its
    /// exit code and stderr (start-up error tests).
    pub fn start_expect_failure(
        nats_url: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> (Option<i32>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = run(
            &mut serve_command(
                &dir.path().join("data"),
                (free_port(), free_port()),
                nats_url,
                &extra,
                &envs,
            ),
            Duration::from_secs(60),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// The exit status if the daemon process has ended on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// `http://127.0.0.1:PORT/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// The NBD URI of volume or snapshot `id`: mounts it (`vblock mount`, idempotent: a mounted
    /// volume keeps its URI) and returns the URI the mount gave, `nbd://127.0.0.1:PORT/EXPORT`
    /// (`nbds://` under `--tls-required`).
    pub fn uri(&self, id: &str) -> String {
        let mut uri = String::new();
        // The control plane may still be connecting to NATS after a start.
        let ok = wait_until(Duration::from_secs(30), || {
            let out = run(
                Command::new(vblock_bin()).args([
                    "mount",
                    id,
                    "--nats-url",
                    &self.nats_url,
                    "--timeout",
                    "5",
                ]),
                Duration::from_secs(30),
            );
            uri = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            out.status.success()
        });
        assert!(
            ok,
            "vblock mount {id} failed; log:
{}",
            self.log()
        );
        assert!(
            uri.contains(&format!("://127.0.0.1:{}/{id}", self.nbd_port)),
            "unexpected mount URI {uri:?}"
        );
        uri
    }

    /// The NBD export name of volume or snapshot `id`, mounting it ([`Daemon::uri`]).
    pub fn export(&self, id: &str) -> String {
        let uri = self.uri(id);
        uri.rsplit('/').next().unwrap_or_default().to_owned()
    }

    /// SIGTERM and wait for a clean exit (exit code 0 required).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = c.try_wait().expect("wait") {
                    assert!(
                        status.success(),
                        "vblock serve exited with {status} after SIGTERM; log:\n{}",
                        self.log()
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "vblock serve did not stop within 60 s of SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// SIGKILL: the process dies wherever it is.
    pub fn kill9(&mut self) {
        stop_child(&mut self.child);
    }

    /// Clean stop, then start again on the same directory and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Replaces the extra `vblock serve` flags of the next start.
    pub fn set_args(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Replaces the extra environment of the next start.
    pub fn set_envs(&mut self, envs: &[(&str, &str)]) {
        self.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Starts again after [`Daemon::kill9`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "daemon still running");
        self.spawn();
    }

    /// `vblock ARGS` against this daemon's NATS; requires success and returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(vblock_bin())
                .args(args)
                .arg("--nats-url")
                .arg(&self.nats_url),
            Duration::from_secs(60),
        )
    }

    /// `vblock ARGS` against this daemon's NATS, expecting it to fail; returns its stderr.
    pub fn cli_refused(&self, args: &[&str]) -> String {
        let out = run(
            Command::new(vblock_bin())
                .args(args)
                .arg("--nats-url")
                .arg(&self.nats_url),
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "vblock {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Creates a volume of `gib` GiB through the CLI (waiting until the control plane answers)
    /// and returns its id.
    pub fn create_volume(&self, gib: u32) -> String {
        let mut id = String::new();
        let ok = wait_until(Duration::from_secs(30), || {
            let out = run(
                Command::new(vblock_bin()).args([
                    "volume",
                    "create",
                    "--size",
                    &format!("{gib}GiB"),
                    "--nats-url",
                    &self.nats_url,
                    "--timeout",
                    "2",
                ]),
                Duration::from_secs(30),
            );
            if out.status.success() {
                id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            out.status.success()
        });
        assert!(ok, "volume create never succeeded; log:\n{}", self.log());
        id
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

//! Real S3-compatible servers on loopback for tests: `moto_server` (in memory; also over HTTPS)
//! and `s3s-fs` (objects in a directory, so they survive a server restart: outage tests).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::daemon::{free_port, require, wait_until};

/// Credentials the test servers accept (any work for moto; s3s-fs checks SigV4 with these).
pub const ACCESS_KEY: &str = "vblocktest";
/// Secret key.
pub const SECRET_KEY: &str = "vblocktestsecret";

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `moto_server` (PyPI moto[server]).
    Moto,
    /// `s3s-fs` (crates.io s3s-fs, feature `binary`).
    S3sFs,
    /// `moto_server` over HTTPS, with a certificate for 127.0.0.1 from a test CA
    /// (point `SSL_CERT_FILE` at [`S3Server::ca_file`]: the SDK's rustls client then trusts it).
    MotoTls,
}

/// A running S3 server.
pub struct S3Server {
    child: Option<Child>,
    /// Port.
    pub port: u16,
    kind: Kind,
    /// Object directory (s3s-fs).
    pub dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts `kind` on a free port and waits until it answers.
    pub fn start(kind: Kind) -> Self {
        require(match kind {
            Kind::Moto | Kind::MotoTls => "moto_server",
            Kind::S3sFs => "s3s-fs",
        });
        let mut s = Self {
            child: None,
            port: free_port(),
            kind,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if kind == Kind::MotoTls {
            super::tls::make_certificates(s.dir.path());
        }
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Moto => {
                let mut c = Command::new("moto_server");
                c.args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
            Kind::MotoTls => {
                let mut c = Command::new("moto_server");
                c.args(["-H", "127.0.0.1", "-p", &port, "-c"])
                    .arg(self.dir.path().join("server-cert.pem"))
                    .arg("-k")
                    .arg(self.dir.path().join("server-key.pem"));
                c
            }
            Kind::S3sFs => {
                let mut c = Command::new("s3s-fs");
                c.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--access-key",
                    ACCESS_KEY,
                    "--secret-key",
                    SECRET_KEY,
                ])
                .arg(self.dir.path());
                c
            }
        };
        self.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn S3 server"),
        );
        let p = self.port;
        assert!(
            wait_until(Duration::from_secs(30), || std::net::TcpStream::connect((
                "127.0.0.1",
                p
            ))
            .is_ok()),
            "S3 server did not start"
        );
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`Kind::MotoTls`]).
    pub fn endpoint(&self) -> String {
        let scheme = if self.kind == Kind::MotoTls {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA certificate a client must trust to reach a [`Kind::MotoTls`] server.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca-cert.pem")
    }

    /// Kills it (an outage).
    pub fn stop(&mut self) {
        super::daemon::stop_child(&mut self.child);
    }

    /// Starts it again on the same port (and, for s3s-fs, the same objects).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// `vblock serve` flags for bucket `bucket` on this server.
    pub fn serve_args(&self, bucket: &str) -> Vec<String> {
        Self::serve_args_at(&self.endpoint(), bucket)
    }

    /// `vblock serve` flags for bucket `bucket` at `endpoint` (e.g. a fault proxy before it).
    pub fn serve_args_at(endpoint: &str, bucket: &str) -> Vec<String> {
        [
            "--backend",
            "s3",
            "--s3-bucket",
            bucket,
            "--s3-endpoint",
            endpoint,
            "--s3-force-path-style",
            "--s3-create-bucket",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Environment for the daemon (credentials, region).
    pub fn env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

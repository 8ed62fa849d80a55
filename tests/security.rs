//! Security defaults (issue: reliability, "Security defaults"): NBD over TLS with
//! `NBD_OPT_STARTTLS` tested with real TLS clients (libnbd's nbdinfo, qemu-io with x509
//! credentials), `--tls-required` refusing plaintext, start-up errors for bad certificate files,
//! and loopback-only default listeners.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{qemu_io_output, require, run, run_ok, Daemon, Nats};
use common::tls::make_certificates;

const T: Duration = Duration::from_secs(120);

/// A daemon serving NBD TLS with the certificates in `certs` (from [`make_certificates`]).
fn tls_daemon(nats: &Nats, certs: &Path, required: bool) -> Daemon {
    let cert = certs.join("server-cert.pem");
    let key = certs.join("server-key.pem");
    let mut args = vec![
        "--tls-certificate",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
    ];
    if required {
        args.push("--tls-required");
    }
    Daemon::start_with(&nats.url(), &args)
}

/// `nbdinfo nbds://...` with the CA in `certs`: its output (must succeed).
fn nbdinfo_tls(d: &Daemon, vol: &str, certs: &Path) -> String {
    run_ok(
        Command::new("nbdinfo").arg(format!(
            "nbds://127.0.0.1:{}/{vol}?tls-certificates={}",
            d.nbd_port,
            certs.display()
        )),
        T,
    )
}

/// Fixed newstyle hello, then one option; returns the reply type (NBD proto.md, "Option
/// haggling"). `None`: the server closed the connection instead.
fn plaintext_option(port: u16, option: u32, data: &[u8]) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
    let mut req = b"IHAVEOPT".to_vec();
    req.extend_from_slice(&option.to_be_bytes());
    req.extend_from_slice(&(data.len() as u32).to_be_bytes());
    req.extend_from_slice(data);
    s.write_all(&req).expect("option");
    let mut reply = [0u8; 20];
    match s.read_exact(&mut reply) {
        Ok(()) => Some(u32::from_be_bytes(
            reply[12..16].try_into().expect("4 bytes"),
        )),
        Err(_) => None,
    }
}

#[test]
fn nbd_tls_required_serves_tls_clients_and_refuses_plaintext() {
    require("nbdinfo");
    require("qemu-io");
    let certs = tempfile::tempdir().expect("tempdir");
    make_certificates(certs.path());
    let nats = Nats::start();
    let d = tls_daemon(&nats, certs.path(), true);
    // The export name: the volume id and its mount's secret.
    let id = d.create_volume(1);
    let vol = d.export(&id);
    let dir = certs.path().to_str().expect("utf-8");

    // libnbd over TLS (nbds://, CA from the directory): the export and its size.
    let info = nbdinfo_tls(&d, &vol, certs.path());
    assert!(info.contains("export-size: 1073741824"), "{info}");

    // qemu-io with x509 client credentials: write, then read back in a second connection.
    let qemu = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={dir}"))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={vol},tls-creds=tls0",
                d.nbd_port
            ));
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        run_ok(&mut c, T)
    };
    qemu(&["write -P 0xab 4096 65536", "flush"]);
    let out = qemu(&["read -P 0xab 4096 65536", "read -P 0 0 4096"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 65536/65536 bytes"), "{out}");

    // Plaintext clients are refused: libnbd without TLS, qemu-io without credentials.
    let plain = run(
        Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/{vol}", d.nbd_port)),
        T,
    );
    assert!(!plain.status.success(), "plaintext nbdinfo was served");
    let out = qemu_io_output(
        &format!("nbd://127.0.0.1:{}/{vol}", d.nbd_port),
        &["read 0 4096"],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("read 4096/4096 bytes"), "{text}");

    // The raw protocol: before STARTTLS, options get NBD_REP_ERR_TLS_REQD, NBD_OPT_EXPORT_NAME a
    // disconnect; STARTTLS with data is invalid.
    let mut go = (vol.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(vol.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    const NBD_OPT_EXPORT_NAME: u32 = 1;
    const NBD_OPT_LIST: u32 = 3;
    const NBD_OPT_STARTTLS: u32 = 5;
    const NBD_OPT_GO: u32 = 7;
    const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
    const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
    assert_eq!(
        plaintext_option(d.nbd_port, NBD_OPT_GO, &go),
        Some(NBD_REP_ERR_TLS_REQD)
    );
    assert_eq!(
        plaintext_option(d.nbd_port, NBD_OPT_LIST, &[]),
        Some(NBD_REP_ERR_TLS_REQD)
    );
    assert_eq!(
        plaintext_option(d.nbd_port, NBD_OPT_STARTTLS, b"x"),
        Some(NBD_REP_ERR_INVALID)
    );
    assert_eq!(
        plaintext_option(d.nbd_port, NBD_OPT_EXPORT_NAME, vol.as_bytes()),
        None
    );

    // Mount URIs name the TLS scheme.
    let mounted = d.cli(&["mount", &id]);
    assert!(
        mounted.contains(&format!("nbds://127.0.0.1:{}/{vol}", d.nbd_port)),
        "{mounted}"
    );
}

#[test]
fn tls_optional_serves_both_and_bad_settings_fail_at_start() {
    require("nbdinfo");
    let certs = tempfile::tempdir().expect("tempdir");
    make_certificates(certs.path());
    let cert = certs.path().join("server-cert.pem");
    let nats = Nats::start();
    let d = tls_daemon(&nats, certs.path(), false);
    // The export name: the volume id and its mount's secret.
    let id = d.create_volume(1);
    let vol = d.export(&id);
    let tls = nbdinfo_tls(&d, &vol, certs.path());
    assert!(tls.contains("export-size: 1073741824"), "{tls}");
    let plain = run_ok(
        Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/{vol}", d.nbd_port)),
        T,
    );
    assert!(plain.contains("export-size: 1073741824"), "{plain}");

    // A missing key file, a key file that holds a certificate, a certificate without a key:
    // exit 2 naming the problem, before anything listens.
    let missing = certs.path().join("nope.pem");
    for (args, want) in [
        (
            vec![
                "--tls-certificate",
                cert.to_str().expect("utf-8"),
                "--tls-key",
                missing.to_str().expect("utf-8"),
            ],
            "nope.pem",
        ),
        (
            vec![
                "--tls-certificate",
                cert.to_str().expect("utf-8"),
                "--tls-key",
                cert.to_str().expect("utf-8"),
            ],
            "server-cert.pem",
        ),
        (
            vec!["--tls-certificate", cert.to_str().expect("utf-8")],
            "--tls-key",
        ),
    ] {
        let (code, stderr) = Daemon::start_expect_failure(&nats.url(), &args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // Other settings that could only fail later are refused at start too: a write buffer too
    // small for the largest request, and an unknown crash point.
    let (code, stderr) =
        Daemon::start_expect_failure(&nats.url(), &["--buffer-size", "64MiB"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is too small"), "{stderr}");
    let (code, stderr) =
        Daemon::start_expect_failure(&nats.url(), &[], &[("VBLOCK_FAILPOINTS", "nope=return")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown fail point"), "{stderr}");
}

/// `--tls-client-ca`: TLS clients must present a certificate from that CA. libnbd (nbdinfo) and
/// qemu-io with the CA's client certificate are served; without a certificate, or with one from
/// another CA, the TLS handshake fails; the flag without `--tls-required` is refused at start.
#[test]
fn tls_client_certificates_are_required_with_a_client_ca() {
    require("nbdinfo");
    require("qemu-io");
    let certs = tempfile::tempdir().expect("tempdir");
    make_certificates(certs.path());
    let ca = certs.path().join("ca-cert.pem");
    let cert = certs.path().join("server-cert.pem");
    let key = certs.path().join("server-key.pem");
    let nats = Nats::start();
    let d = Daemon::start_with(
        &nats.url(),
        &[
            "--tls-certificate",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
            "--tls-required",
            "--tls-client-ca",
            ca.to_str().expect("utf-8"),
        ],
    );
    // The export name: the volume id and its mount's secret.
    let id = d.create_volume(1);
    let vol = d.export(&id);
    let info = nbdinfo_tls(&d, &vol, certs.path());
    assert!(info.contains("export-size: 1073741824"), "{info}");
    let qemu = |dir: &Path| {
        let mut c = Command::new("qemu-io");
        c.arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                dir.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={vol},tls-creds=tls0",
                d.nbd_port
            ))
            .args(["-c", "write -P 0x5d 0 4096", "-c", "read -P 0x5d 0 4096"]);
        run(&mut c, T)
    };
    let out = qemu(certs.path());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("read 4096/4096 bytes"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // No client certificate: only the CA, to trust the server.
    let anonymous = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&ca, anonymous.path().join("ca-cert.pem")).expect("copy CA");
    // A client certificate from another CA.
    let foreign = tempfile::tempdir().expect("tempdir");
    common::tls::make_foreign_client(foreign.path(), certs.path());
    for refused in [anonymous.path(), foreign.path()] {
        let info = run(
            Command::new("nbdinfo").arg(format!(
                "nbds://127.0.0.1:{}/{vol}?tls-certificates={}",
                d.nbd_port,
                refused.display()
            )),
            T,
        );
        assert!(
            !info.status.success(),
            "nbdinfo with {refused:?} was served"
        );
        let out = qemu(refused);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains("bytes"),
            "qemu-io with {refused:?} was served: {text}"
        );
    }

    // Without --tls-required, plaintext clients would get past the CA: refused at start.
    let (code, stderr) = Daemon::start_expect_failure(
        &nats.url(),
        &[
            "--tls-certificate",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
            "--tls-client-ca",
            ca.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-required"), "{stderr}");
}

#[test]
fn listeners_default_to_loopback() {
    let out = run_ok(
        Command::new(common::daemon::vblock_bin()).args(["serve", "--print-config"]),
        T,
    );
    for key in ["nbd-listen", "metrics-listen"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing in:\n{out}"));
        assert!(line.contains("\"127.0.0.1:"), "{line}");
    }
}

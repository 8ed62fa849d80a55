//! Test certificates for the TLS tests (NBD over TLS, S3 over HTTPS), made with the openssl CLI.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::daemon::{require, run_ok};

/// A CA and a server certificate for `localhost` / `127.0.0.1` (EC P-256), made with the openssl
/// CLI in `dir`: `ca-cert.pem` (what libnbd and qemu look for), `server-cert.pem`,
/// `server-key.pem`, and a client certificate from the same CA: `client-cert.pem`,
/// `client-key.pem` (what libnbd and qemu's x509 credentials present when a server asks).
pub fn make_certificates(dir: &Path) {
    require("openssl");
    let ossl = |args: &[&str]| {
        run_ok(
            Command::new("openssl").args(args).current_dir(dir),
            Duration::from_secs(60),
        );
    };
    // `openssl req` with a new unencrypted EC P-256 key in `key`, then `rest`.
    let req = |key: &str, rest: &[&str]| {
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
        ];
        args.extend_from_slice(rest);
        ossl(&args);
    };
    req(
        "ca-key.pem",
        &[
            "-x509",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=vblock test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    req(
        "server-key.pem",
        &["-out", "server.csr", "-subj", "/CN=localhost"],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    make_client_certificate(dir, "ca");
}

/// A client certificate (`client-cert.pem`, `client-key.pem` in `dir`) signed by the CA whose
/// files in `dir` are `{ca}-cert.pem` and `{ca}-key.pem`.
pub fn make_client_certificate(dir: &Path, ca: &str) {
    let ossl = |args: &[&str]| {
        run_ok(
            Command::new("openssl").args(args).current_dir(dir),
            Duration::from_secs(60),
        );
    };
    ossl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "client-key.pem",
        "-out",
        "client.csr",
        "-subj",
        "/CN=vblock test client",
    ]);
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    )
    .expect("ext file");
    ossl(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        &format!("{ca}-cert.pem"),
        "-CAkey",
        &format!("{ca}-key.pem"),
        "-CAcreateserial",
        "-out",
        "client-cert.pem",
        "-days",
        "2",
        "-extfile",
        "client.ext",
    ]);
}

/// A second CA in `dir` (`other-ca-cert.pem`, `other-ca-key.pem`) and a client certificate from
/// it, beside a copy of `trusted`'s `ca-cert.pem` (so the client still trusts the server): a
/// client a server that trusts only `trusted`'s CA must refuse.
pub fn make_foreign_client(dir: &Path, trusted: &Path) {
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "other-ca-key.pem",
                "-x509",
                "-out",
                "other-ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=another CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ])
            .current_dir(dir),
        Duration::from_secs(60),
    );
    make_client_certificate(dir, "other-ca");
    std::fs::copy(trusted.join("ca-cert.pem"), dir.join("ca-cert.pem")).expect("copy CA");
}

//! Test certificates for the TLS tests (NBD over TLS, S3 over HTTPS), made with the openssl CLI.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::daemon::{require, run_ok};

/// Runs `openssl ARGS` in `dir` (must succeed).
fn openssl(dir: &Path, args: &[&str]) {
    run_ok(
        Command::new("openssl").args(args).current_dir(dir),
        Duration::from_secs(60),
    );
}

/// `openssl req` in `dir` with a new unencrypted EC P-256 key written to `key`, then `rest`.
fn req(dir: &Path, key: &str, rest: &[&str]) {
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
    openssl(dir, &args);
}

/// A self-signed CA in `dir`: `{name}-cert.pem` and `{name}-key.pem`, common name `cn`.
fn make_ca(dir: &Path, name: &str, cn: &str) {
    req(
        dir,
        &format!("{name}-key.pem"),
        &[
            "-x509",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `{leaf}-cert.pem` and `{leaf}-key.pem` in `dir`, common name `cn`, with the X.509 extensions
/// `ext`, signed by the CA `{ca}-cert.pem` / `{ca}-key.pem` in `dir`.
fn make_leaf(dir: &Path, leaf: &str, cn: &str, ext: &str, ca: &str) {
    let csr = format!("{leaf}.csr");
    req(
        dir,
        &format!("{leaf}-key.pem"),
        &["-out", &csr, "-subj", &format!("/CN={cn}")],
    );
    let ext_file = format!("{leaf}.ext");
    std::fs::write(dir.join(&ext_file), ext).expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{leaf}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
    );
}

/// A client certificate (`client-cert.pem`, `client-key.pem` in `dir`) signed by the CA whose
/// files in `dir` are `{ca}-cert.pem` and `{ca}-key.pem`. qemu wants key usage
/// `digitalSignature,keyEncipherment` on a client certificate.
pub fn make_client_certificate(dir: &Path, ca: &str) {
    make_leaf(
        dir,
        "client",
        "vblock test client",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
        ca,
    );
}

/// A CA and a server certificate for `localhost` / `127.0.0.1` (EC P-256), made with the openssl
/// CLI in `dir`: `ca-cert.pem` (what libnbd and qemu look for), `server-cert.pem`,
/// `server-key.pem`, and a client certificate from the same CA: `client-cert.pem`,
/// `client-key.pem` (what libnbd and qemu's x509 credentials present when a server asks).
pub fn make_certificates(dir: &Path) {
    require("openssl");
    make_ca(dir, "ca", "vblock test CA");
    make_leaf(
        dir,
        "server",
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        "ca",
    );
    make_client_certificate(dir, "ca");
}

/// A second CA in `dir` (`other-ca-cert.pem`, `other-ca-key.pem`) and a client certificate from
/// it, beside a copy of `trusted`'s `ca-cert.pem` (so the client still trusts the server): a
/// client that a server trusting only `trusted`'s CA must refuse.
pub fn make_foreign_client(dir: &Path, trusted: &Path) {
    make_ca(dir, "other-ca", "another CA");
    make_client_certificate(dir, "other-ca");
    std::fs::copy(trusted.join("ca-cert.pem"), dir.join("ca-cert.pem")).expect("copy CA");
}

//! Records the git commit for `vblock --version` (VBLOCK_GIT_COMMIT; "unknown" outside a git
//! checkout or without git).

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=VBLOCK_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves (a commit, a checkout); paths that do not exist are skipped so a
    // tarball build does not rerun this script every time.
    println!("cargo:rerun-if-changed=build.rs");
    for p in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}

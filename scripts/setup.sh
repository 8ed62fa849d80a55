#!/usr/bin/env bash
# Installs everything vblock needs to build and test on a fresh Debian 12 machine (run as root,
# or with sudo available). Idempotent: installs only what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Build: clang/libclang for bindgen (rocksdb), librocksdb-dev (the rocksdb crate links the
# packaged library; see .cargo/config.toml). Tests: nats-server, NBD clients (nbdsh from
# python3-libnbd sends what stricter clients refuse to), fio, e2fsprogs,
# fuse3 (nbdfuse), nbdkit (benchmarks), openssl (test certificates for NBD TLS).
PKGS=(clang libclang-dev librocksdb-dev pkg-config nats-server libnbd-bin python3-libnbd qemu-utils fio e2fsprogs fuse3 nbdkit openssl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# S3-compatible servers for the S3 tests (loopback only): moto_server (in memory) and s3s-fs
# (objects in a directory, survives restarts: outage tests).
if ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing moto[server] (pip)"
  python3 -m pip install --quiet 'moto[server]'
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "setup: installing s3s-fs 0.14.1 (cargo install, ~3 min)"
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi
echo "setup: ok"

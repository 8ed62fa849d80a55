#!/usr/bin/env bash
# Runs every test: formatting, clippy, unit/property tests and the end-to-end tests against real
# nats-server and NBD clients. Usage: scripts/test.sh   (PROPTEST_CASES=N for more cases)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings

# The end-to-end tests run target/debug/vblock: build it first so they never see a stale one.
# Built together with the test binaries: a plain `cargo build` resolves features without the
# dev-dependencies (zerocopy without `derive`, ...) and so compiles every crate above them
# (hyper, the S3 SDK, ...) a second time for `cargo test`.
echo "== cargo build"
cargo build --bins --tests

echo "== cargo test"
cargo test --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"

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
echo "== cargo build"
cargo build

echo "== cargo test"
cargo test --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"

#!/usr/bin/env bash
# Crash-consistency harness (tests/crash.rs): SIGKILL at random moments and aborts at named crash
# points (src/failpoints.rs), each followed by a restart that checks every block; then the same
# with --ship-wal and every third restart on a lost data directory (metadata and WAL).
# Usage: scripts/crash-test.sh [--long] [--iterations N] [--seed S]
#   default 200 and 60 iterations (the CI run, ~3 min); --long: 1,000 each.
set -euo pipefail
cd "$(dirname "$0")/.."

iterations=200
ship_iterations=60
while [ $# -gt 0 ]; do
  case "$1" in
    --long) iterations=1000; ship_iterations=1000 ;;
    --iterations) iterations="$2"; ship_iterations="$2"; shift ;;
    --seed) export VBLOCK_CRASH_SEED="$2"; shift ;;
    *) echo "usage: $0 [--long] [--iterations N] [--seed S]" >&2; exit 2 ;;
  esac
  shift
done
export VBLOCK_CRASH_ITERATIONS="$iterations" VBLOCK_SHIP_CRASH_ITERATIONS="$ship_iterations"

# The harness runs target/debug/vblock (with the default failpoints feature): build it first.
cargo build
cargo test --test crash -- --nocapture

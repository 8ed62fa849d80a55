#!/usr/bin/env bash
# Runs the cargo fuzz (libFuzzer) targets under fuzz/, each for SECONDS (default 60: the CI smoke
# run). Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   targets: nbd_session wal_record chunk_object nats_request (default: all)
#   longer runs: scripts/fuzz.sh 3600 nbd_session
# New inputs go to target/fuzz-corpus/TARGET (the committed seeds in fuzz/corpus/TARGET are only
# read); a crash leaves its input in fuzz/artifacts/TARGET and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(nbd_session wal_record chunk_object nats_request)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --quiet --locked cargo-fuzz
fi
# cargo fuzz passes unstable -Z flags to rustc; this machine has only a stable toolchain.
export RUSTC_BOOTSTRAP=1
# Coverage instrumentation without AddressSanitizer: vblock has no unsafe code of its own, and
# the un-instrumented C++ librocksdb would not link against an ASan runtime cleanly.
san=(--sanitizer none)

cd fuzz
cargo fuzz build "${san[@]}"
for t in "${targets[@]}"; do
  work="../target/fuzz-corpus/$t"
  mkdir -p "$work"
  echo "== fuzz $t for ${secs}s"
  log="$work.log"
  if ! cargo fuzz run "${san[@]}" "$t" "$work" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t failed; the input is in fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added)' "$log" || true
done
echo "fuzz: ok"

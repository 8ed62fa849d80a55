#!/usr/bin/env bash
# Map checkpoint bytes that garbage collection writes per byte it frees, with the periodic pass
# paced (`--gc-max-delay 5m`, the default) and unpaced (`0s`: every pass that frees anything
# writes the whole map first), in one run. Per setting, a fresh daemon (file backend):
#   1. 2 GiB written (1M, QD8), then 30 s of 4k random writes at 8k IOPS: a map of ~400k extents
#      (a ~28 MB checkpoint);
#   2. 60 s of 64k sequential overwrites of a 4 MiB region at 512 KB/s: a chunk or two dies per
#      --gc-interval (10 s), far less than the checkpoint.
# Prints phase 2's checkpoints, checkpoint bytes, bytes freed and the daemon's CPU time.
#   scripts/bench-gc.sh     (~4 min)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release -p vblock-cli >/dev/null
BIN=$PWD/target/release/vblock
WORK=$PWD/target/bench-gc

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

run() {
  local delay=$1
  rm -rf "$WORK"; mkdir -p "$WORK"
  local nats_port nbd_port metrics_port
  nats_port=$(free_port); nbd_port=$(free_port); metrics_port=$(free_port)
  nats-server -a 127.0.0.1 -p "$nats_port" >"$WORK/nats.log" 2>&1 & local nats=$!; PIDS+=($nats)
  wait_port "$nats_port"
  local url="nats://127.0.0.1:$nats_port"
  RUST_LOG=warn "$BIN" serve --data-dir "$WORK/d" --nbd-listen "127.0.0.1:$nbd_port" \
    --metrics-listen "127.0.0.1:$metrics_port" --nats-url "$url" --gc-max-delay "$delay" \
    >"$WORK/vblock.log" 2>&1 & local vb=$!; PIDS+=($vb)
  wait_port "$nbd_port"
  local vol=""
  for _ in $(seq 1 100); do vol=$("$BIN" volume create --size 4GiB --nats-url "$url" --timeout 2 2>/dev/null) && break; sleep 0.1; done
  local uri
  uri=$("$BIN" mount "$vol" --nats-url "$url")
  metric() { curl -sf "http://127.0.0.1:$metrics_port/metrics" | awk -v k="$1" '$1 == k {print $2}'; }
  cpu() { awk '{print $14 + $15}' "/proc/$vb/stat"; }
  fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=2G >/dev/null
  fio --name=scatter --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --rate_iops=8000 \
    --size=2G --time_based --runtime=30 >/dev/null
  local n0 c0 f0 t0
  n0=$(metric vblock_gc_checkpoints_total); c0=$(metric vblock_gc_checkpoint_bytes_total)
  f0=$(metric vblock_gc_deleted_bytes_total); t0=$(cpu)
  fio --name=overwrite --ioengine=nbd --uri="$uri" --rw=write --bs=64k --iodepth=1 --rate=512k \
    --offset=3G --size=4M --time_based --runtime=60 >/dev/null
  local n c f t
  n=$(( $(metric vblock_gc_checkpoints_total) - n0 )); c=$(( $(metric vblock_gc_checkpoint_bytes_total) - c0 ))
  f=$(( $(metric vblock_gc_deleted_bytes_total) - f0 )); t=$(( $(cpu) - t0 ))
  awk -v d="$delay" -v n="$n" -v c="$c" -v f="$f" -v t="$t" 'BEGIN {
    printf "| %s | %d | %.1f MB | %.1f MB | %.2f | %.2f s |\n", d, n, c / 1e6, f / 1e6, c / (f + 1), t / 100 }'
  kill "$vb" "$nats"; wait "$vb" "$nats" 2>/dev/null || true
}

echo "| --gc-max-delay | checkpoints | checkpoint bytes | bytes freed | checkpoint / freed | daemon CPU |"
echo "|---|---|---|---|---|---|"
run 0s
run 5m

#!/usr/bin/env bash
# What WAL shipping (--ship-wal) costs a flush: vblock on s3s-fs (loopback, objects on this
# disk) without and with shipping, in one run. Jobs: 4k random write QD1 with a flush after each
# write, and QD32 with a flush after every 32. Prints IOPS, the flush latency p50/p99 (fio's
# sync latency: NBD_CMD_FLUSH) and the mean shipped-object PUT (vblock_wal_ship_duration_seconds)
# and writes target/bench-ship/results.json.
#
#   scripts/bench-ship.sh            # 8 s per job
#   scripts/bench-ship.sh --quick    # 3 s per job
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=8
[ "${1:-}" = "--quick" ] && RUNTIME=3

scripts/setup.sh >/dev/null
cargo build --release -p vblock-cli >/dev/null
BIN=$PWD/target/release/vblock
WORK=$PWD/target/bench-ship
rm -rf "$WORK"; mkdir -p "$WORK"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

export AWS_ACCESS_KEY_ID=vblocktest AWS_SECRET_ACCESS_KEY=vblocktestsecret AWS_REGION=us-east-1
NATS_PORT=$(free_port); S3_PORT=$(free_port)
nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
mkdir -p "$WORK/s3"
s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$WORK/s3" >"$WORK/s3s-fs.log" 2>&1 & PIDS+=($!)
wait_port "$NATS_PORT"; wait_port "$S3_PORT"

JOBS=(
  "randwrite4k_qd1_fsync1|--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
  "randwrite4k_qd32_fsync32|--rw=randwrite --bs=4k --iodepth=32 --fsync=32"
)
for mode in local shipped; do
  VB_PORT=$(free_port); METRICS_PORT=$(free_port)
  EXTRA=()
  [ "$mode" = shipped ] && EXTRA=(--ship-wal)
  RUST_LOG=warn "$BIN" serve --data-dir "$WORK/vblock-$mode" --nbd-listen "127.0.0.1:$VB_PORT" \
    --metrics-listen "127.0.0.1:$METRICS_PORT" --nats-url "nats://127.0.0.1:$NATS_PORT" \
    --node "bench-$mode" --backend s3 --s3-bucket "bench-$mode" --s3-endpoint "http://127.0.0.1:$S3_PORT" \
    --s3-force-path-style --s3-create-bucket "${EXTRA[@]}" >"$WORK/vblock-$mode.log" 2>&1 & VB_PID=$!; PIDS+=($VB_PID)
  wait_port "$VB_PORT"
  VOL=""
  for _ in $(seq 1 100); do VOL=$("$BIN" volume create --size 4GiB --nats-url "nats://127.0.0.1:$NATS_PORT" --timeout 2 2>/dev/null) && break; sleep 0.1; done
  URI=$("$BIN" mount "$VOL" --node "bench-$mode" --nats-url "nats://127.0.0.1:$NATS_PORT")
  for job in "${JOBS[@]}"; do
    name=${job%%|*}; args=${job#*|}
    # shellcheck disable=SC2086
    fio --name="$name" --ioengine=nbd --uri="$URI" --time_based --runtime="$RUNTIME" --size=1G $args \
      --output-format=json >"$WORK/$mode-$name.json" 2>"$WORK/$mode-$name.err" || echo "fio $mode $name failed" >&2
  done
  curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/$mode-metrics.txt" || true
  kill "$VB_PID"; wait "$VB_PID" 2>/dev/null || true
done

python3 - "$WORK" "$RUNTIME" <<'PY'
import json, os, re, sys
work, runtime = sys.argv[1], sys.argv[2]
jobs = ["randwrite4k_qd1_fsync1", "randwrite4k_qd32_fsync32"]
def load(mode, job):
    try:
        text = open(os.path.join(work, f"{mode}-{job}.json")).read()
        j = json.loads(text[text.index("{"):])["jobs"][0]
    except Exception:
        return None
    sync = j.get("sync", {}).get("lat_ns", {}).get("percentile", {})
    return {"iops": j["write"]["iops"],
            "flush_p50_ms": sync.get("50.000000", 0) / 1e6,
            "flush_p99_ms": sync.get("99.000000", 0) / 1e6}
def put_mean_ms(mode):
    try:
        m = open(os.path.join(work, f"{mode}-metrics.txt")).read()
    except OSError:
        return None
    s = sum(float(x) for x in re.findall(r'^vblock_wal_ship_duration_seconds_sum\{[^}]*\} (\S+)', m, re.M))
    n = sum(float(x) for x in re.findall(r'^vblock_wal_ship_duration_seconds_count\{[^}]*\} (\S+)', m, re.M))
    return round(1000 * s / n, 2) if n else None
results = {m: {j: load(m, j) for j in jobs} for m in ("local", "shipped")}
results["shipped_put_mean_ms"] = put_mean_ms("shipped")
json.dump(results, open(os.path.join(work, "results.json"), "w"), indent=1)
print(f"vblock on s3s-fs, {runtime} s per job; flush = NBD_CMD_FLUSH (fio sync latency)")
print(f"{'job':28} {'mode':8} {'IOPS':>9} {'flush p50 ms':>13} {'flush p99 ms':>13}")
for j in jobs:
    for m in ("local", "shipped"):
        r = results[m][j]
        if r is None:
            print(f"{j:28} {m:8} {'failed':>9}")
            continue
        print(f"{j:28} {m:8} {r['iops']:9.0f} {r['flush_p50_ms']:13.2f} {r['flush_p99_ms']:13.2f}")
    a, b = results["local"][j], results["shipped"][j]
    if a and b and a["iops"]:
        print(f"{'':28} {'ratio':8} {b['iops'] / a['iops']:9.2f}  (shipped / local)")
print(f"shipped WAL object PUT, mean: {results['shipped_put_mean_ms']} ms")
PY

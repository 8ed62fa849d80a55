#!/usr/bin/env bash
# Soak: 8 NBD connections over 4 volumes under mixed fio load (random 4-64 KiB reads and writes,
# flushes) plus NATS control traffic (list, describe, mount/unmount a fifth volume) for
# DURATION; samples the daemon's RSS, open descriptors and WAL size every 10 s and fails unless,
# after the warm-up (the first fifth, at least 300 s: write buffers, frame cache and RocksDB
# memtables fill in the first minute, the rest of RSS levels off after ~400 s), RSS
# is flat (the mean of the later half of the samples within 5% + 16 MiB of the earlier half's: a
# leak of ~10 MB/min fails a 10-minute run) and under its bound (volumes x write buffer + frame
# cache + 256 MiB), descriptors stay flat, fio and the control plane saw no error, the daemon
# logged no error, and every volume's WAL stayed under its cap (write buffer + 2 segments).
#   scripts/soak.sh                 # 10 minutes (by hand; not in CI, see docs/RELIABILITY.md)
#   scripts/soak.sh --long          # 1 hour
#   scripts/soak.sh --duration 120  # seconds
# Samples: target/soak/samples.csv; summary: target/soak/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=600
while [ $# -gt 0 ]; do
  case "$1" in
    --long) DURATION=3600 ;;
    --duration) DURATION="$2"; shift ;;
    *) echo "usage: $0 [--long] [--duration SECONDS]" >&2; exit 2 ;;
  esac
  shift
done

BIN=$PWD/target/debug/vblock
[ -x "$BIN" ] || cargo build
WORK=$PWD/target/soak
rm -rf "$WORK"; mkdir -p "$WORK"
BUFFER_MIB=128
SEGMENT_MIB=16
CACHE_MIB=64
VOLUMES=4

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

NATS_PORT=$(free_port); NBD_PORT=$(free_port); METRICS_PORT=$(free_port)
NATS="nats://127.0.0.1:$NATS_PORT"
nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
wait_port "$NATS_PORT"
"$BIN" serve --data-dir "$WORK/data" --nbd-listen "127.0.0.1:$NBD_PORT" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" --nats-url "$NATS" \
  --buffer-size "${BUFFER_MIB}MiB" --wal-segment-size "${SEGMENT_MIB}MiB" --cache-size "${CACHE_MIB}MiB" \
  >"$WORK/vblock.log" 2>&1 & DAEMON=$!; PIDS+=($DAEMON)
wait_port "$NBD_PORT"

create() { for _ in $(seq 1 100); do "$BIN" volume create --size 2GiB --nats-url "$NATS" --timeout 2 2>/dev/null && return 0; sleep 0.1; done; return 1; }
VOLS=()
for _ in 1 2 3 4; do VOLS+=("$(create)"); done
SPARE=$(create)

# fio: two connections per volume, each on its own half, mixed random I/O with periodic flushes.
declare -A URIS
for v in "${VOLS[@]}"; do URIS[$v]=$("$BIN" mount "$v" --nats-url "$NATS"); done
JOBS=()
for v in "${VOLS[@]}"; do
  for half in 0 1; do
    JOBS+=(--name="$v-$half" --uri="${URIS[$v]}" --offset="${half}G" --size=1G)
  done
done
fio --ioengine=nbd --rw=randrw --rwmixread=60 --bsrange=4k-64k --iodepth=8 --fsync=64 \
  --time_based --runtime="$DURATION" --group_reporting --output-format=json \
  --output="$WORK/fio.json" "${JOBS[@]}" >"$WORK/fio.log" 2>&1 & FIO=$!; PIDS+=($FIO)

# Control-plane traffic until fio ends: list volumes, describe one, mount and unmount the spare.
(
  n=0; errors=0
  while kill -0 "$FIO" 2>/dev/null; do
    "$BIN" volume list --nats-url "$NATS" >/dev/null 2>>"$WORK/control.err" || errors=$((errors + 1))
    "$BIN" volume describe "${VOLS[$((n % 4))]}" --nats-url "$NATS" >/dev/null 2>>"$WORK/control.err" || errors=$((errors + 1))
    "$BIN" mount "$SPARE" --nats-url "$NATS" >/dev/null 2>>"$WORK/control.err" || errors=$((errors + 1))
    "$BIN" unmount "$SPARE" --nats-url "$NATS" >/dev/null 2>>"$WORK/control.err" || errors=$((errors + 1))
    n=$((n + 4)); sleep 1
  done
  echo "$n $errors" >"$WORK/control.result"
) & CONTROL=$!

# Samples every 10 s: seconds, RSS and its anonymous part (KiB), open fds, largest WAL dir bytes,
# and where the memory is by the daemon's own gauges (bytes): write buffers, frame cache, RocksDB
# memtables, table readers and block cache. The gauges attribute growth when RSS is not flat.
echo "t,rss_kib,anon_kib,fds,threads,wal_max_bytes,buffer,frame_cache,memtables,table_readers,block_cache" \
  >"$WORK/samples.csv"
gauges() {
  curl -s --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" | awk '
    /^vblock_buffer_bytes/ { b += $NF }
    /^vblock_frame_cache_bytes/ { f = $NF }
    /^vblock_meta_memory_bytes\{kind="memtables"/ { m = $NF }
    /^vblock_meta_memory_bytes\{kind="table_readers"/ { r = $NF }
    /^vblock_meta_memory_bytes\{kind="block_cache"/ { c = $NF }
    END { printf "%d,%d,%d,%d,%d", b, f, m, r, c }' || echo "0,0,0,0,0"
}
start=$(date +%s)
while kill -0 "$FIO" 2>/dev/null; do
  t=$(( $(date +%s) - start ))
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON/status")
  anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$DAEMON/status")
  fds=$(find "/proc/$DAEMON/fd" -mindepth 1 -maxdepth 1 | wc -l)
  threads=$(awk '/^Threads:/ {print $2}' "/proc/$DAEMON/status")
  wal=$( (du -sb "$WORK/data/wal"/* 2>/dev/null || true) | sort -n | tail -1 | cut -f1)
  echo "$t,$rss,$anon,$fds,$threads,${wal:-0},$(gauges)" >>"$WORK/samples.csv"
  sleep 10
done
fio_rc=0; wait "$FIO" || fio_rc=$?
wait "$CONTROL" || true
read -r control_ops control_errors <"$WORK/control.result"
kill -0 "$DAEMON" 2>/dev/null || { echo "soak: the daemon died" >&2; tail -20 "$WORK/vblock.log" >&2; exit 1; }
daemon_errors=$(grep -c ' ERROR ' "$WORK/vblock.log" || true)

python3 - "$WORK" "$DURATION" "$fio_rc" "$control_ops" "$control_errors" "$daemon_errors" \
  "$BUFFER_MIB" "$SEGMENT_MIB" "$CACHE_MIB" "$VOLUMES" <<'PY'
import csv, json, sys
work, duration, fio_rc, ops, cerr, derr, buf, seg, cache, vols = sys.argv[1:]
rows = [r for r in csv.DictReader(open(f"{work}/samples.csv"))]
warm = [r for r in rows if int(r["t"]) >= max(int(duration) // 5, min(300, int(duration) // 2))]
if len(warm) < 2:
    sys.exit("soak: too few samples after warm-up")
rss = [int(r["rss_kib"]) for r in warm]
early, late = rss[: len(rss) // 2], rss[len(rss) // 2 :]
fds = [int(r["fds"]) for r in warm]
wal = max(int(r["wal_max_bytes"]) for r in rows)
fio = json.load(open(f"{work}/fio.json"))
job = fio["jobs"][0]
summary = {
    "duration_s": int(duration),
    "read_iops": round(job["read"]["iops"]), "write_iops": round(job["write"]["iops"]),
    "fio_errors": job["error"], "fio_exit": int(fio_rc),
    "control_requests": int(ops), "control_errors": int(cerr), "daemon_error_lines": int(derr),
    "rss_kib_after_warmup_first": rss[0], "rss_kib_max": max(rss), "rss_kib_last": rss[-1],
    "rss_kib_mean_earlier_half": round(sum(early) / len(early)),
    "rss_kib_mean_later_half": round(sum(late) / len(late)),
    "rss_kib_bound": (int(vols) * int(buf) + int(cache) + 256) * 1024,
    "fds_after_warmup_first": fds[0], "fds_max": max(fds), "fds_last": fds[-1],
    "wal_max_bytes": wal, "wal_cap_bytes": (int(buf) + 2 * int(seg)) << 20,
}
json.dump(summary, open(f"{work}/summary.json", "w"), indent=1)
for k, v in summary.items():
    print(f"  {k:<28} {v}")
fails = []
if summary["fio_exit"] or summary["fio_errors"]: fails.append("fio reported errors")
if summary["control_errors"]: fails.append("control-plane requests failed")
if summary["daemon_error_lines"]: fails.append("the daemon logged errors")
# Flat: the later half's mean within 5% + 16 MiB of the earlier half's (means, because single
# samples swing by tens of MiB as memtables fill and flush); bounded: the peak under the bound.
if summary["rss_kib_mean_later_half"] > summary["rss_kib_mean_earlier_half"] * 1.05 + 16 * 1024:
    fails.append("RSS grew after warm-up")
if max(rss) > summary["rss_kib_bound"]: fails.append("RSS passed its bound")
if max(fds) > fds[0] + 8: fails.append("open descriptors grew")
if wal > summary["wal_cap_bytes"]: fails.append("a WAL outgrew its cap")
if fails:
    sys.exit("soak: FAILED: " + "; ".join(fails))
print("soak: ok")
PY

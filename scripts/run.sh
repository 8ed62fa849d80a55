#!/usr/bin/env bash
# The main job: installs what is missing, starts a local nats-server if none is running, builds,
# starts `vblock serve` on the defaults (file backend in ./vblock-data), creates a demo volume and
# prints its NBD URI and a ready qemu-system-x86_64 line. Ctrl-C stops the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release -p vblock-cli
BIN=target/release/vblock
NATS_URL=${VBLOCK_NATS_URL:-nats://127.0.0.1:4222}
export VBLOCK_NATS_URL=$NATS_URL

if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  echo "run: starting nats-server on 127.0.0.1:4222 (log: vblock-data/nats.log)"
  mkdir -p vblock-data
  nats-server -a 127.0.0.1 -p 4222 > vblock-data/nats.log 2>&1 &
  NATS_PID=$!
fi

"$BIN" serve &
VBLOCK_PID=$!
cleanup() {
  kill -TERM "$VBLOCK_PID" 2>/dev/null || true
  wait "$VBLOCK_PID" 2>/dev/null || true
  if [ -n "${NATS_PID:-}" ]; then kill "$NATS_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT INT TERM

for _ in $(seq 1 100); do
  if VOL=$("$BIN" volume create --size 10GiB --name demo --timeout 2 2>/dev/null); then break; fi
  sleep 0.2
done
if [ -z "${VOL:-}" ]; then echo "run: the daemon did not come up" >&2; exit 1; fi
URI=$("$BIN" mount "$VOL")
cat <<MSG

vblock is serving. Demo volume: $VOL
NBD URI: $URI

  qemu-img info $URI
  qemu-system-x86_64 -m 1G -nographic -drive file=$URI,format=raw,if=virtio,cache=none

Manage volumes with: $BIN volume list | create --size 10GiB | describe ID | delete ID
Press Ctrl-C to stop.
MSG
wait "$VBLOCK_PID"

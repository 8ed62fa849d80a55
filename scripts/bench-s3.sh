#!/usr/bin/env bash
# S3 chunk upload throughput vs a plain PUT loop (same server, same concurrency, one run).
# Starts moto_server on a free loopback port (or uses VBLOCK_BENCH_S3_ENDPOINT if set).
# VBLOCK_BENCH_ZSTD_LEVEL and VBLOCK_BENCH_FRAME_BLOCKS override the chunk options.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
if [ -z "${VBLOCK_BENCH_S3_ENDPOINT:-}" ]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  moto_server -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
  MOTO=$!
  export VBLOCK_BENCH_S3_SERVER_PID=$MOTO
  trap 'kill $MOTO 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done
  export VBLOCK_BENCH_S3_ENDPOINT="http://127.0.0.1:$PORT"
fi
cargo bench --bench s3_upload

#!/usr/bin/env bash
# S3 chunk upload throughput vs a plain PUT loop (same server, same concurrency, one run).
# Starts moto_server on a free loopback port (or uses VBLOCK_BENCH_S3_ENDPOINT if set).
# --tls: moto over HTTPS with a certificate from a throwaway CA (trusted through SSL_CERT_FILE), as
# against real S3: PUTs then go as UNSIGNED-PAYLOAD (src/backend/s3.rs), in both loops.
# VBLOCK_BENCH_ZSTD_LEVEL and VBLOCK_BENCH_FRAME_BLOCKS override the chunk options.
set -euo pipefail
cd "$(dirname "$0")/.."
TLS=0
[ "${1:-}" = "--tls" ] && TLS=1
scripts/setup.sh >/dev/null
if [ -z "${VBLOCK_BENCH_S3_ENDPOINT:-}" ]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  WORK=$(mktemp -d)
  SCHEME=http
  TLS_ARGS=()
  if [ "$TLS" = 1 ]; then
    ossl() { openssl "$@" >/dev/null 2>&1; }
    EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    ossl req -x509 "${EC[@]}" -keyout "$WORK/ca-key.pem" -out "$WORK/ca.pem" -days 1 \
      -subj "/CN=vblock bench CA" -addext basicConstraints=critical,CA:TRUE \
      -addext keyUsage=critical,keyCertSign,cRLSign
    ossl req "${EC[@]}" -keyout "$WORK/key.pem" -out "$WORK/server.csr" -subj /CN=127.0.0.1
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' \
      > "$WORK/server.ext"
    ossl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca-key.pem" \
      -CAcreateserial -out "$WORK/cert.pem" -days 1 -extfile "$WORK/server.ext"
    export SSL_CERT_FILE="$WORK/ca.pem"
    SCHEME=https
    TLS_ARGS=(-c "$WORK/cert.pem" -k "$WORK/key.pem")
  fi
  moto_server -H 127.0.0.1 -p "$PORT" "${TLS_ARGS[@]}" >/dev/null 2>&1 &
  MOTO=$!
  export VBLOCK_BENCH_S3_SERVER_PID=$MOTO
  trap 'kill $MOTO 2>/dev/null || true; rm -rf "$WORK"' EXIT
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done
  export VBLOCK_BENCH_S3_ENDPOINT="$SCHEME://127.0.0.1:$PORT"
fi
cargo bench --bench s3_upload

#!/usr/bin/env bash
# TURN over DTLS against coturn's, with natrix over plain UDP as the reference for what the
# record layer costs, in one `natrix-loadtest compare` run (relay scenario, peer path).
# Usage: loadtest/bench/dtls.sh [NATRIX] [SECONDS] [OUT_DIR]
# (NATRIX: absolute path of a `natrix` binary, default target/release/natrix; the load tester
# is target/release/natrix-loadtest).
set -euo pipefail
cd "$(dirname "$0")/../.."
natrix_bin="${1:-$PWD/target/release/natrix}"
secs="${2:-5}"; out="${3:-$(mktemp -d)}"; mkdir -p "$out"
lt_bin="$PWD/target/release/natrix-loadtest"
ulimit -n 65536 2>/dev/null || true
work="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# One ECDSA P-256 certificate for both servers (DTLS in natrix needs an ECDSA key).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 1 -nodes \
  -subj /CN=bench -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
"$natrix_bin" relay --turn-listen 127.0.0.1:35781 --metrics-listen 127.0.0.1:39191 \
  --tls-listen 127.0.0.1:35349 --dtls-listen 127.0.0.1:35349 \
  --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --user bench:bench --realm bench --peer-allow 127.0.0.0/8 --user-quota 1000000 \
  --max-allocations 1000000 --unauth-rate-per-prefix 1000000 --unauth-rate-total 1000000 \
  --relay-ports 20000-34000 --log warn --log-format json >"$work/natrix.log" 2>&1 &
natrix=$!; pids+=($natrix)
turnserver -n --no-cli --listening-ip 127.0.0.1 --listening-port 35782 \
  --tls-listening-port 35350 --cert "$work/cert.pem" --pkey "$work/key.pem" \
  --relay-ip 127.0.0.1 --realm bench --user bench:bench --lt-cred-mech --allow-loopback-peers \
  --user-quota 0 --total-quota 0 --min-port 48001 --max-port 60000 \
  --log-file "$work/coturn.log" >/dev/null 2>&1 &
coturn=$!; pids+=($coturn)
sleep 2
echo "### Relay over DTLS (and natrix over UDP), ratios against natrix over DTLS"
"$lt_bin" --progress off compare --scenario relay \
  --target "natrix-dtls=turns:127.0.0.1:35349?transport=udp,pid=$natrix" \
  --target "coturn-dtls=turns:127.0.0.1:35350?transport=udp,pid=$coturn" \
  --target "natrix-udp=127.0.0.1:35781,pid=$natrix" --user bench --password bench \
  --path peer --payload 160,1200 --clients 4 --rounds 3 --duration "${secs}s" \
  --json "$out/compare-dtls.json" 2>&1 >/dev/null | sed -n '/^|/p'

#!/usr/bin/env bash
# natrix against coturn (Debian's turnserver) on this machine, measured by
# `natrix-loadtest compare`: each scenario runs against both servers
# interleaved round by round, with ratios, work per server CPU second and
# (allocations) memory per allocation. Also the load generator's own send
# capacity. Prints the Markdown tables of BENCHMARKING.md; the JSON and HTML
# reports go to the directory given as the second argument (default: a
# temporary one). Bounded: about 5 minutes at the default 5 s per run.
#
#   cargo build --release -p natrix -p natrix-loadtest
#   loadtest/bench/relay-vs-coturn.sh [seconds-per-run] [report-dir]
set -euo pipefail
cd "$(dirname "$0")/../.."

secs="${1:-5}"
out="${2:-$(mktemp -d)}"
mkdir -p "$out"
bin=target/release
command -v turnserver >/dev/null || { echo "turnserver (Debian package coturn) is needed" >&2; exit 1; }
[ -x "$bin/natrix" ] && [ -x "$bin/natrix-loadtest" ] || {
  echo "build first: cargo build --release -p natrix -p natrix-loadtest" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || true

NATRIX_PORT=34781; COTURN_PORT=34782; METRICS_PORT=39091
CDX_PORT=34783; COTURN_STUN_PORT=34784; CDX_METRICS_PORT=39092
NATRIX_TLS_PORT=34785; COTURN_TLS_PORT=34786
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# One certificate for both servers' TLS listeners.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 2 -nodes -subj /CN=bench \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# The TURN servers, started fresh where memory per allocation is measured
# (memory a server freed is reused, which would hide the next run's growth).
start_turn() {
  [ -n "${natrix_pid:-}" ] && kill "$natrix_pid" "$coturn_pid" 2>/dev/null && wait "$natrix_pid" "$coturn_pid" 2>/dev/null || true
  "$bin/natrix" relay --turn-listen 127.0.0.1:$NATRIX_PORT --metrics-listen 127.0.0.1:$METRICS_PORT \
    --user bench:bench --realm bench --peer-allow 127.0.0.0/8 --user-quota 1000000 \
    --max-allocations 1000000 --unauth-rate-per-prefix 1000000 --unauth-rate-total 1000000 \
    --relay-ports 20000-60000 --tls-listen 127.0.0.1:$NATRIX_TLS_PORT --tls-cert "$work/cert.pem" \
    --tls-key "$work/key.pem" --log warn --log-format json >>"$work/natrix.log" 2>&1 &
  natrix_pid=$!; pids+=("$natrix_pid")
  turnserver -n --no-cli --listening-ip 127.0.0.1 --listening-port $COTURN_PORT --relay-ip 127.0.0.1 \
    --realm bench --user bench:bench --lt-cred-mech --allow-loopback-peers --no-dtls \
    --tls-listening-port $COTURN_TLS_PORT --cert "$work/cert.pem" --pkey "$work/key.pem" \
    --user-quota 0 --total-quota 0 --min-port 20000 --max-port 60000 \
    --log-file "$work/coturn.log" >/dev/null 2>&1 &
  coturn_pid=$!; pids+=("$coturn_pid")
  sleep 2
  turn_targets=(--target "natrix=127.0.0.1:$NATRIX_PORT,pid=$natrix_pid"
                --target "coturn=127.0.0.1:$COTURN_PORT,pid=$coturn_pid"
                --user bench --password bench)
}
start_turn
"$bin/natrix" cdx --stun-listen 127.0.0.1:$CDX_PORT --metrics-listen 127.0.0.1:$CDX_METRICS_PORT \
  --stun-rate-per-prefix 100000000 --stun-rate-total 100000000 --log warn --log-format json \
  >"$work/cdx.log" 2>&1 &
cdx_pid=$!; pids+=("$cdx_pid")
turnserver -n --no-cli --stun-only --listening-ip 127.0.0.1 --listening-port $COTURN_STUN_PORT \
  --no-tls --no-dtls --log-file "$work/coturn-stun.log" --pidfile "$work/coturn-stun.pid" >/dev/null 2>&1 &
coturn_stun_pid=$!; pids+=("$coturn_stun_pid")
sleep 2

lt() { "$bin/natrix-loadtest" --progress off "$@"; }

echo "### Relay: relayed packets per second ($secs s per run, 3 rounds, median)"
echo
lt compare --scenario relay "${turn_targets[@]}" --path peer,client --payload 160,1200 \
  --clients 4 --rounds 3 --duration "${secs}s" \
  --json "$out/compare-relay.json" --report "$out/compare-relay.html" 2>&1 >/dev/null | sed -n '/^|/p'
echo
echo "### Allocations: 10 000 per run, 16 at a time (2 rounds, fresh servers)"
echo
start_turn
lt compare --scenario alloc "${turn_targets[@]}" --count 10000 --concurrency 16 --rounds 2 \
  --json "$out/compare-alloc.json" --report "$out/compare-alloc.html" 2>&1 >/dev/null | sed -n '/^|/p'
echo
echo "### Relay and allocations over TCP and TLS ($secs s per run, 3 rounds; allocations 2 000, 2 rounds, fresh servers)"
for transport in tcp tls; do
  if [ $transport = tcp ]; then np=$NATRIX_PORT; cp=$COTURN_PORT; else np=$NATRIX_TLS_PORT; cp=$COTURN_TLS_PORT; fi
  start_turn
  stream_targets=(--transport $transport --target "natrix=127.0.0.1:$np,pid=$natrix_pid"
                  --target "coturn=127.0.0.1:$cp,pid=$coturn_pid" --user bench --password bench)
  echo
  echo "TURN over $transport:"
  echo
  lt compare --scenario relay "${stream_targets[@]}" --path peer,client --payload 160,1200 \
    --clients 4 --rounds 3 --duration "${secs}s" \
    --json "$out/compare-relay-$transport.json" --report "$out/compare-relay-$transport.html" 2>&1 >/dev/null | sed -n '/^|/p'
  echo
  start_turn
  stream_targets=(--transport $transport --target "natrix=127.0.0.1:$np,pid=$natrix_pid"
                  --target "coturn=127.0.0.1:$cp,pid=$coturn_pid" --user bench --password bench)
  lt compare --scenario alloc "${stream_targets[@]}" --count 2000 --concurrency 16 --rounds 2 \
    --json "$out/compare-alloc-$transport.json" --report "$out/compare-alloc-$transport.html" 2>&1 >/dev/null | sed -n '/^|/p'
done
echo
echo "### STUN Binding answers per second ($secs s per run, 3 rounds)"
echo
lt compare --scenario stun --target "natrix=127.0.0.1:$CDX_PORT,pid=$cdx_pid" \
  --target "coturn=127.0.0.1:$COTURN_STUN_PORT,pid=$coturn_stun_pid" --clients 4 --rounds 3 \
  --duration "${secs}s" \
  --json "$out/compare-stun.json" --report "$out/compare-stun.html" 2>&1 >/dev/null | sed -n '/^|/p'
echo
echo "### Load generator send capacity (ChannelData, 160 B payload, to a sink)"
echo
echo "| threads | GSO | datagrams/s | generator CPU s |"
echo "|---|---|---|---|"
for threads in 1 2; do
  for gso in on off; do
    flag=(); [ $gso = off ] && flag=(--no-gso)
    lt generator --threads $threads --duration 3s "${flag[@]}" >"$work/gen.json"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('| %d | %s | %.0f | %.2f |' % (d['threads'], sys.argv[2], d['datagrams_per_second'], d['cpu_seconds']))" \
      "$work/gen.json" $gso
  done
done
echo
echo "Reports: $out"

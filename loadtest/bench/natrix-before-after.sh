#!/usr/bin/env bash
# Two natrix builds and coturn in one `natrix-loadtest compare` run (UDP relay and STUN):
# the check that a change costs the packet path nothing, measured against itself.
# Usage: loadtest/bench/natrix-before-after.sh BEFORE_NATRIX AFTER_NATRIX [SECONDS] [OUT_DIR]
# (absolute paths to the two `natrix` binaries)
# (build the "before" binary from a worktree of the older commit; the load tester is
# target/release/natrix-loadtest).
set -euo pipefail
cd "$(dirname "$0")/../.."
before_bin="${1:?before binary}"; after_bin="${2:?after binary}"
secs="${3:-5}"; out="${4:-$(mktemp -d)}"; mkdir -p "$out"
lt_bin="$PWD/target/release/natrix-loadtest"
ulimit -n 65536 2>/dev/null || true
work="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
relay() { # binary port metrics
  "$1" relay --turn-listen 127.0.0.1:$2 --metrics-listen 127.0.0.1:$3 \
    --user bench:bench --realm bench --peer-allow 127.0.0.0/8 --user-quota 1000000 \
    --max-allocations 1000000 --unauth-rate-per-prefix 1000000 --unauth-rate-total 1000000 \
    --relay-ports $4 --log warn --log-format json >>"$work/natrix-$2.log" 2>&1 &
}
cdx() {
  "$1" cdx --stun-listen 127.0.0.1:$2 --metrics-listen 127.0.0.1:$3 \
    --stun-rate-per-prefix 100000000 --stun-rate-total 100000000 --log warn --log-format json \
    >"$work/cdx-$2.log" 2>&1 &
}
relay "$after_bin" 34781 39091 20000-34000; after=$!; pids+=($after)
relay "$before_bin" 34791 39093 34001-48000; before=$!; pids+=($before)
turnserver -n --no-cli --listening-ip 127.0.0.1 --listening-port 34782 --relay-ip 127.0.0.1 \
  --realm bench --user bench:bench --lt-cred-mech --allow-loopback-peers --no-dtls --no-tls \
  --user-quota 0 --total-quota 0 --min-port 48001 --max-port 60000 \
  --log-file "$work/coturn.log" >/dev/null 2>&1 &
coturn=$!; pids+=($coturn)
cdx "$after_bin" 34783 39092; cdx_after=$!; pids+=($cdx_after)
cdx "$before_bin" 34793 39094; cdx_before=$!; pids+=($cdx_before)
turnserver -n --no-cli --stun-only --listening-ip 127.0.0.1 --listening-port 34784 \
  --no-tls --no-dtls --log-file "$work/coturn-stun.log" --pidfile "$work/coturn-stun.pid" >/dev/null 2>&1 &
coturn_stun=$!; pids+=($coturn_stun)
sleep 2
lt() { "$lt_bin" --progress off "$@"; }
echo "### Relay (UDP), ratios against natrix-before"
lt compare --scenario relay --target "natrix-before=127.0.0.1:34791,pid=$before" \
  --target "natrix-after=127.0.0.1:34781,pid=$after" \
  --target "coturn=127.0.0.1:34782,pid=$coturn" --user bench --password bench \
  --path peer,client --payload 160,1200 --clients 4 --rounds 3 --duration "${secs}s" \
  --json "$out/compare-relay.json" 2>&1 >/dev/null | sed -n '/^|/p'
echo "### STUN, ratios against natrix-before"
lt compare --scenario stun --target "natrix-before=127.0.0.1:34793,pid=$cdx_before" \
  --target "natrix-after=127.0.0.1:34783,pid=$cdx_after" \
  --target "coturn=127.0.0.1:34784,pid=$coturn_stun" --clients 4 --rounds 3 \
  --duration "${secs}s" --json "$out/compare-stun.json" 2>&1 >/dev/null | sed -n '/^|/p'

#!/usr/bin/env bash
# Allocations past the relay port range (--relay-multiplex-ports): one relay process holds COUNT
# allocations (default 51,000) with a 2,000-port range and 64 shared sockets; what it holds them
# with (file descriptors, resident memory per allocation), and relaying through shared sockets
# against relaying through ports of their own, in the same run.
# Usage: loadtest/bench/multiplex.sh [NATRIX] [COUNT] [OUT_DIR]
# (NATRIX: absolute path of a `natrix` binary, default target/release/natrix; the load tester
# is target/release/natrix-loadtest).
set -euo pipefail
cd "$(dirname "$0")/../.."
natrix_bin="${1:-$PWD/target/release/natrix}"
count="${2:-51000}"; out="${3:-$(mktemp -d)}"; mkdir -p "$out"
lt_bin="$PWD/target/release/natrix-loadtest"
# Every allocation holds a client socket, and a process here may hold at most 20,000
# descriptors: the storm comes from three processes on three loopback addresses.
procs=3; per=$(( (count + procs - 1) / procs ))
work="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
"$natrix_bin" relay --turn-listen 127.0.0.1:35791 --metrics-listen 127.0.0.1:39192 \
  --user bench:bench --realm bench --peer-allow 127.0.0.0/8 --user-quota 1000000 \
  --max-allocations 1000000 --max-allocations-per-ip 0 \
  --unauth-rate-per-prefix 1000000 --unauth-rate-total 1000000 \
  --relay-ports 20000-21999 --relay-multiplex-ports 22000-22063 \
  --log warn --log-format json >"$work/natrix.log" 2>&1 &
relay=$!; pids+=($relay)
metric() { curl -s 127.0.0.1:39192/metrics | awk -v m="$1" '$1 == m { print $2 }'; }
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$relay/status"; }
fds() { ls "/proc/$relay/fd" | wc -l; }
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$relay/stat"; }
for _ in $(seq 50); do [ -n "$(metric relay_allocations)" ] && break; sleep 0.2; done
# One relay run: echoes per second and relay CPU seconds, into $out/relay-$1.json.
relay_run() {
  local c0; c0=$(cpu_s)
  "$lt_bin" --progress off relay --server 127.0.0.1:35791 --user bench --password bench \
    --path peer --clients 8 --peers 8 --payload 160 --duration 5s >"$out/relay-$1.json"
  echo "$1 $(jq -r .relayed_packets_per_second "$out/relay-$1.json") $(jq -r .loss_ratio "$out/relay-$1.json") $(echo "$(cpu_s) - $c0" | bc)"
}
rss0=$(rss_kb); fds0=$(fds)
own=$(relay_run own)
echo "### $count allocations on 2,000 relay ports and 64 shared sockets"
start=$(date +%s)
for i in $(seq "$procs"); do
  "$lt_bin" --progress off alloc --server 127.0.0.1:35791 --user bench --password bench \
    --count "$per" --concurrency 8 --refresh false --hold 60s --local "127.0.0.$((i + 1))" \
    >"$out/alloc-$i.json" 2>"$out/alloc-$i.log" &
  pids+=($!)
done
held=0
for _ in $(seq 600); do
  held=$(metric relay_allocations); held=${held:-0}
  [ "$held" -ge "$count" ] && break
  sleep 0.5
done
took=$(( $(date +%s) - start ))
rss1=$(rss_kb); fds1=$(fds)
shared_allocs=$(metric relay_multiplexed_allocations); sockets=$(metric relay_multiplex_sockets)
shared=$(relay_run shared)
echo "| allocations held | on shared sockets | shared sockets | relay fds (idle → held) | relay RSS MiB (idle → held) | RSS per allocation | storm seconds |"
echo "|---|---|---|---|---|---|---|"
echo "| $held | $shared_allocs | $sockets | $fds0 → $fds1 | $((rss0 / 1024)) → $((rss1 / 1024)) | $(( (rss1 - rss0) * 1024 / (held > 0 ? held : 1) )) B | $took |"
echo
echo "| relaying (8 clients, 8 peers, 160 B, peer path) | relayed pkt/s | loss | relay CPU s | pkt per relay CPU s |"
echo "|---|---|---|---|---|"
for r in "$own" "$shared"; do
  set -- $r
  echo "| $1 | $(printf %.0f "$2") | $3 | $4 | $(echo "$2 * 5 / $4" | bc) |"
done
set -- $own; own_pps=$2; own_cpu=$4
set -- $shared
echo
echo "shared/own: $(echo "scale=2; $2 / $own_pps" | bc)× pkt/s, $(echo "scale=2; ($2 / $4) / ($own_pps / $own_cpu)" | bc)× per relay CPU second"
for i in $(seq "$procs"); do wait "${pids[$i]}" || true; done
for i in $(seq "$procs"); do
  jq -c '{ok: .phases.allocate.ok, failed: .phases.allocate.failed, errors: .phases.allocate.errors_by_code}' "$out/alloc-$i.json" 2>/dev/null || tail -3 "$out/alloc-$i.log"
done

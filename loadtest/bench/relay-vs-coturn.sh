#!/usr/bin/env bash
# Relay benchmark: natrix against coturn (Debian's turnserver), the same load
# generator (natrix-loadtest) against both in one run, on this machine.
# Prints a Markdown table for BENCHMARKING.md. Bounded: about 2 minutes.
#
#   cargo build --release -p natrix -p natrix-loadtest
#   loadtest/bench/relay-vs-coturn.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/../.."

secs="${1:-5}"
bin=target/release
command -v turnserver >/dev/null || { echo "turnserver (Debian package coturn) is needed" >&2; exit 1; }
[ -x "$bin/natrix" ] && [ -x "$bin/natrix-loadtest" ] || {
  echo "build first: cargo build --release -p natrix -p natrix-loadtest" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || true

NATRIX_PORT=34781; COTURN_PORT=34782; METRICS_PORT=39091
CDX_PORT=34783; COTURN_STUN_PORT=34784; CDX_METRICS_PORT=39092
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$bin/natrix" relay --turn-listen 127.0.0.1:$NATRIX_PORT --metrics-listen 127.0.0.1:$METRICS_PORT \
  --user bench:bench --realm bench --peer-allow 127.0.0.0/8 --user-quota 1000000 \
  --max-allocations 1000000 --unauth-rate-per-prefix 1000000 --unauth-rate-total 1000000 \
  --relay-ports 20000-60000 --log warn --log-format json >"$work/natrix.log" 2>&1 &
natrix_pid=$!; pids+=("$natrix_pid")
turnserver -n --no-cli --listening-ip 127.0.0.1 --listening-port $COTURN_PORT --relay-ip 127.0.0.1 \
  --realm bench --user bench:bench --lt-cred-mech --allow-loopback-peers --no-tls --no-dtls \
  --user-quota 0 --total-quota 0 --min-port 20000 --max-port 60000 \
  --log-file "$work/coturn.log" --pidfile "$work/coturn.pid" >/dev/null 2>&1 &
pids+=("$!")
"$bin/natrix" cdx --stun-listen 127.0.0.1:$CDX_PORT --metrics-listen 127.0.0.1:$CDX_METRICS_PORT \
  --stun-rate-per-prefix 100000000 --stun-rate-total 100000000 --log warn --log-format json \
  >"$work/cdx.log" 2>&1 &
cdx_pid=$!; pids+=("$cdx_pid")
turnserver -n --no-cli --stun-only --listening-ip 127.0.0.1 --listening-port $COTURN_STUN_PORT \
  --no-tls --no-dtls --log-file "$work/coturn-stun.log" --pidfile "$work/coturn-stun.pid" >/dev/null 2>&1 &
pids+=("$!")
sleep 2
coturn_stun_pid="$(cat "$work/coturn-stun.pid" 2>/dev/null || echo "${pids[3]}")"
pids+=("$coturn_stun_pid")
coturn_pid="$(cat "$work/coturn.pid" 2>/dev/null || echo "${pids[1]}")"
pids+=("$coturn_pid")

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
hz=$(getconf CLK_TCK)

echo "| path | payload | server | relayed pkt/s | loss | server CPU s | pkt per server CPU s |"
echo "|---|---|---|---|---|---|---|"
declare -A rate eff
for payload in 160 1200; do
  for path in peer client; do
    for server in natrix coturn; do
      if [ $server = natrix ]; then port=$NATRIX_PORT; pid=$natrix_pid; else port=$COTURN_PORT; pid=$coturn_pid; fi
      before=$(cpu_ticks "$pid")
      out=$("$bin/natrix-loadtest" relay --server 127.0.0.1:$port --user bench --password bench \
        --path $path --clients 4 --payload $payload --duration "${secs}s")
      after=$(cpu_ticks "$pid")
      pps=$(field "$out" relayed_packets_per_second); loss=$(field "$out" loss_ratio)
      cpu=$(python3 -c "print(($after-$before)/$hz)")
      per=$(python3 -c "print(int($pps*$(field "$out" seconds)/max($cpu,0.01)))")
      rate[$path-$payload-$server]=$pps; eff[$path-$payload-$server]=$per
      printf '| %s | %s | %s | %.0f | %.4f | %.2f | %s |\n' $path $payload $server "$pps" "$loss" "$cpu" "$per"
    done
  done
done
echo
echo "| path | payload | natrix/coturn pkt/s | natrix/coturn pkt per CPU s |"
echo "|---|---|---|---|"
for payload in 160 1200; do
  for path in peer client; do
    python3 -c "print('| $path | $payload | %.2f | %.2f |' % (${rate[$path-$payload-natrix]}/${rate[$path-$payload-coturn]}, ${eff[$path-$payload-natrix]}/${eff[$path-$payload-coturn]}))"
  done
done

echo
echo "| server | allocations/s | server CPU s | allocations per server CPU s | RSS per allocation at 10 000 (bytes) |"
echo "|---|---|---|---|---|"
declare -A arate acpu amem
for server in natrix coturn; do
  if [ $server = natrix ]; then port=$NATRIX_PORT; pid=$natrix_pid; else port=$COTURN_PORT; pid=$coturn_pid; fi
  base=$(rss_kb "$pid")
  before=$(cpu_ticks "$pid")
  "$bin/natrix-loadtest" allocations --server 127.0.0.1:$port --user bench --password bench \
    --count 10000 --threads 16 --hold 6s >"$work/alloc-$server.json" &
  lt=$!
  # The result line is printed when all allocations exist (before the hold):
  # then the server's CPU for the allocation phase and its memory are read.
  for _ in $(seq 1 240); do [ -s "$work/alloc-$server.json" ] && break; sleep 0.1; done
  after=$(cpu_ticks "$pid")
  sleep 1
  held=$(rss_kb "$pid")
  wait $lt
  out=$(cat "$work/alloc-$server.json")
  per=$(( (held - base) * 1024 / 10000 ))
  cpu=$(python3 -c "print(max(($after-$before)/$hz, 0.01))")
  arate[$server]=$(field "$out" allocations_per_second); amem[$server]=$per
  acpu[$server]=$(python3 -c "print(10000/$cpu)")
  printf '| %s | %.0f | %.2f | %.0f | %s |\n' $server "${arate[$server]}" "$cpu" "${acpu[$server]}" "$per"
done
python3 -c "print('\nnatrix/coturn: allocation rate %.2fx, allocations per server CPU second %.2fx, memory per allocation %.2fx' % (${arate[natrix]}/${arate[coturn]}, ${acpu[natrix]}/${acpu[coturn]}, ${amem[natrix]}/max(${amem[coturn]},1)))"

echo
echo "| STUN server | Binding answers/s | server CPU s | answers per server CPU s |"
echo "|---|---|---|---|"
declare -A srate seff
for server in natrix coturn; do
  if [ $server = natrix ]; then port=$CDX_PORT; pid=$cdx_pid; else port=$COTURN_STUN_PORT; pid=$coturn_stun_pid; fi
  before=$(cpu_ticks "$pid")
  out=$("$bin/natrix-loadtest" stun --server 127.0.0.1:$port --clients 4 --duration "${secs}s")
  after=$(cpu_ticks "$pid")
  aps=$(field "$out" answers_per_second)
  cpu=$(python3 -c "print(max(($after-$before)/$hz, 0.01))")
  per=$(python3 -c "print(int($aps*$(field "$out" seconds)/$cpu))")
  srate[$server]=$aps; seff[$server]=$per
  printf '| %s | %.0f | %.2f | %s |\n' $server "$aps" "$cpu" "$per"
done
python3 -c "print('\nnatrix/coturn STUN: %.2fx answers/s, %.2fx answers per CPU second' % (${srate[natrix]}/${srate[coturn]}, ${seff[natrix]}/${seff[coturn]}))"

#!/usr/bin/env bash
# The relay sizing guide, measured on this machine: how many voice- and
# video-like calls, relayed Mbit/s and allocations one relay CPU core and one
# GB of relay memory carry. Starts a natrix relay on loopback and drives it
# with natrix-loadtest (compare: relayed packets per relay CPU second at 160
# and 1200 B payloads, and relay memory per allocation at 10 000 held), then
# prints the guide as a Markdown table (BENCHMARKING.md has this machine's).
#
# Usage: loadtest/bench/sizing.sh [NATRIX_BINARY] [SECONDS] [OUT_DIR]
#   (defaults: target/release/natrix, 5 s per round, a temporary directory;
#   the load tester is target/release/natrix-loadtest)
#
# A call's load (the models behind the table; change them to yours):
#   voice: 50 packets/s each way, 160 B payloads (20 ms G.711; Opus is
#          smaller), one relayed leg: 100 relayed packets/s
#   video: 1.5 Mbit/s each way at 1200 B payloads (~156 packets/s each
#          way): ~312 relayed packets/s
#   allocations: a call relayed on one side holds 1 allocation, on both 2
#          (lookup relays only the side that needs it).
# The generator shares the machine: the relay's own CPU seconds (user and
# system, from /proc) are the unit; packets per relay CPU second times the
# cores you give the relay is its capacity (softirq time of the kernel's
# network stack outside the process is not counted: keep ~30 % headroom).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-$PWD/target/release/natrix}"
secs="${2:-5}"
out="${3:-$(mktemp -d)}"
mkdir -p "$out"
lt="$PWD/target/release/natrix-loadtest"
ulimit -n 65536 2>/dev/null || true
work="$(mktemp -d)"
"$bin" relay --turn-listen 127.0.0.1:34881 --metrics-listen 127.0.0.1:39191 \
  --user size:size --realm size --peer-allow 127.0.0.0/8 --user-quota 1000000 \
  --max-allocations 1000000 --max-allocations-per-ip 0 --unauth-rate-per-prefix 1000000 \
  --unauth-rate-total 1000000 --relay-ports 20000-60000 --log warn --log-format json \
  >"$work/natrix.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 2
kill -0 "$pid" 2>/dev/null || { cat "$work/natrix.log" >&2; echo "the relay did not start" >&2; exit 1; }
# compare takes two targets: the same relay twice (each round measures it
# again; the guide takes the mean).
targets=(--target "natrix=127.0.0.1:34881,pid=$pid" --target "again=127.0.0.1:34881,pid=$pid")
"$lt" --progress off compare --scenario relay "${targets[@]}" --user size --password size \
  --path peer --payload 160,1200 --clients 4 --rounds 3 --duration "${secs}s" \
  --json "$out/relay.json" >/dev/null 2>&1
"$lt" --progress off compare --scenario alloc "${targets[@]}" --user size --password size \
  --count 10000 --rounds 1 --json "$out/alloc.json" >/dev/null 2>&1
python3 - "$out/relay.json" "$out/alloc.json" "$(nproc)" <<'PY'
import json, sys
relay = json.load(open(sys.argv[1]))
alloc = json.load(open(sys.argv[2]))
cores = int(sys.argv[3])
def case(doc, prefix):
    for c in doc["cases"]:
        if c["case"].startswith(prefix):
            return c["targets"]
    raise SystemExit(f"no case {prefix!r} in the report")
def per_cpu(targets):
    v = [t["per_cpu_second"] for t in targets.values() if t["per_cpu_second"]]
    return sum(v) / len(v)
v_pcs = per_cpu(case(relay, "relay peer 160"))
w_pcs = per_cpu(case(relay, "relay peer 1200"))
mem = alloc["cases"][0]["targets"]["natrix"]["rss_per_allocation_bytes"]
voice_pps, video_pps = 100.0, 2 * 1.5e6 / (1200 * 8)
gb = 1e9
print(f"| measured on this machine ({cores} cores) | value |")
print("|---|---|")
print(f"| relayed packets per relay CPU second, 160 B | {v_pcs:,.0f} |")
print(f"| relayed packets per relay CPU second, 1200 B | {w_pcs:,.0f} |")
print(f"| relay memory per held allocation (10 000 held) | {mem:,.0f} B |")
print()
print("| per relay CPU core | voice-like calls | video-like calls |")
print("|---|---|---|")
print(f"| calls (one relayed leg each) | {v_pcs / voice_pps:,.0f} | {w_pcs / video_pps:,.0f} |")
print(f"| relayed Mbit/s (payload) | {v_pcs * 160 * 8 / 1e6:,.0f} | {w_pcs * 1200 * 8 / 1e6:,.0f} |")
print()
print("| per GB of relay memory | allocations | calls relayed on one side | calls relayed on both |")
print("|---|---|---|---|")
print(f"| held | {gb / mem:,.0f} | {gb / mem:,.0f} | {gb / mem / 2:,.0f} |")
PY

#!/usr/bin/env bash
# The XDP lab: the bare userspace forwarder (natrix-loadtest forwarder: recvmmsg,
# sendmmsg with GSO, no TURN state beyond channels), natrix relaying channel data
# in userspace and natrix with --xdp, driven by natrix-loadtest across network
# namespaces, in one run:
#
#   xb-g (the load tester: clients on 10.202.1.2, echo peers on 10.202.2.2)
#     xb-g0 ─ veth ─ xb-r0   xb-r (the relay: 10.202.1.1 for clients,
#     xb-g1 ─ veth ─ xb-r1          10.202.2.1 relayed addresses)
#
# Per configuration and payload: relayed packets per second, loss, the relay
# process's CPU seconds and the host's softirq CPU seconds (where XDP runs: in the
# driver's receive path, on whatever CPU takes the packet, not in the relay
# process), and relayed packets per CPU second of both together.
# Usage: [FAMILY=6] loadtest/bench/xdp-lab.sh [NATRIX] [SECONDS] [CLIENTS] [OUT_DIR]
# (FAMILY=6: clients, relay and peers over IPv6, fd02:202:1::/64 and
# fd02:202:2::/64, the relay allocating in the family a client came over.)
# Needs root, iproute2, ethtool, curl, clang (for the pass-through program) and a
# natrix built with its XDP program. Every loop is bounded by SECONDS.
set -euo pipefail
cd "$(dirname "$0")/../.."
natrix="${1:-$PWD/target/release/natrix}"
secs="${2:-5}"; clients="${3:-4}"; out="${4:-$(mktemp -d)}"; mkdir -p "$out"
lt="$PWD/target/release/natrix-loadtest"
work="$(mktemp -d)"; relay_pid=""
family="${FAMILY:-4}"
if [ "$family" = 6 ]; then
  client=fd02:202:1::2; peer=fd02:202:2::2; server="[fd02:202:1::1]:3478"; relay_ip=fd02:202:2::1
  family_flags=(--turn-listen "$server" --relay-ipv6 "$relay_ip" --peer-allow fd02:202::/32
    --allocation-default-family keep)
else
  client=10.202.1.2; peer=10.202.2.2; server=10.202.1.1:3478; relay_ip=10.202.2.1
  family_flags=()
fi
down() {
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null || true
  relay_pid=""
}
ns_down() { ip netns del xb-g 2>/dev/null || true; ip netns del xb-r 2>/dev/null || true; }
cleanup() { down; ns_down; rm -rf "$work"; }
trap cleanup EXIT
ns_down
ip netns add xb-g; ip netns add xb-r
for n in xb-g xb-r; do ip -n $n link set lo up; done
ip link add xb-g0 netns xb-g type veth peer name xb-r0 netns xb-r
ip link add xb-g1 netns xb-g type veth peer name xb-r1 netns xb-r
ip -n xb-g addr add 10.202.1.2/24 dev xb-g0; ip -n xb-g addr add 10.202.2.2/24 dev xb-g1
ip -n xb-r addr add 10.202.1.1/24 dev xb-r0; ip -n xb-r addr add 10.202.2.1/24 dev xb-r1
ip -n xb-g addr add fd02:202:1::2/64 dev xb-g0 nodad; ip -n xb-g addr add fd02:202:2::2/64 dev xb-g1 nodad
ip -n xb-r addr add fd02:202:1::1/64 dev xb-r0 nodad; ip -n xb-r addr add fd02:202:2::1/64 dev xb-r1 nodad
for i in xb-g0 xb-g1; do ip -n xb-g link set $i up; ip netns exec xb-g ethtool -K $i tx off >/dev/null; done
for i in xb-r0 xb-r1; do ip -n xb-r link set $i up; done
ip netns exec xb-r sysctl -qw net.ipv4.conf.all.forwarding=1
ip netns exec xb-r sysctl -qw net.ipv6.conf.all.forwarding=1
# Frames redirected into a veth need XDP on its far end: a pass-through program.
cat >"$work/pass.c" <<'C'
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int pass(struct xdp_md *c) { return XDP_PASS; }
char LICENSE[] SEC("license") = "GPL";
C
clang -O2 -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c "$work/pass.c" -o "$work/pass.o"
for i in xb-g0 xb-g1; do ip -n xb-g link set dev $i xdp obj "$work/pass.o" sec xdp; done

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }          # ticks
softirq() { awk '/^cpu /{print $8}' /proc/stat; }              # ticks
hz=$(getconf CLK_TCK)
up() { # extra flags
  ip netns exec xb-r "$natrix" relay --turn-listen 10.202.1.1:3478 --relay-ip 10.202.2.1 \
    --external-ip 10.202.2.1 --peer-allow 10.202.0.0/16 --user bench:bench --realm bench \
    --metrics-listen 10.202.1.1:9090 --user-quota 100000 --log warn --log-format json \
    "${family_flags[@]}" "$@" \
    >"$work/relay.log" 2>&1 &
  relay_pid=$!
  for _ in $(seq 50); do
    ip netns exec xb-r curl -sf http://10.202.1.1:9090/metrics >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$work/relay.log"; return 1
}
forwarder_up() { # the bare userspace forwarder, the reference
  ip netns exec xb-r "$lt" --progress off forwarder --listen "$server" \
    --relay-ip "$relay_ip" --user bench:bench --realm bench --duration 10m \
    >"$work/relay.log" 2>&1 &
  relay_pid=$!
  for _ in $(seq 50); do
    grep -q listening "$work/relay.log" && return 0
    sleep 0.1
  done
  cat "$work/relay.log"; return 1
}
metric() { [ "$config" = forwarder ] && return 0; ip netns exec xb-r curl -s http://10.202.1.1:9090/metrics | awk -v m="$1" '$1==m {print $2}'; }

echo "| config | payload | relayed pkt/s | loss | relay process CPU s | XDP program CPU s | pkt per relay CPU s | host softirq CPU s | pkt per (relay + softirq) CPU s | XDP-relayed share |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for config in forwarder userspace xdp; do
  case $config in
    forwarder) forwarder_up ;;
    xdp) up --xdp xb-r0,xb-r1 ;;
    *) up ;;
  esac
  for payload in 160 1200; do
    c0=$(cpu_of "$relay_pid"); s0=$(softirq); x0=$(metric 'relay_xdp_packets_total{result="to_peer"}'); x0=${x0:-0}
    p0=$(metric relay_xdp_program_seconds_total); p0=${p0:-0}
    ip netns exec xb-g "$lt" --progress off relay --server "$server" \
      --local "$client" --peer-local "$peer" --user bench --password bench \
      --clients "$clients" --payload "$payload" --duration "${secs}s" \
      --json "$out/$config-$payload.json" >/dev/null 2>"$work/lt.log" || { cat "$work/lt.log"; exit 1; }
    sleep 1.2  # the loops publish the kernel's counters every second
    c1=$(cpu_of "$relay_pid"); s1=$(softirq); x1=$(metric 'relay_xdp_packets_total{result="to_peer"}'); x1=${x1:-0}
    p1=$(metric relay_xdp_program_seconds_total); p1=${p1:-0}
    python3 - "$out/$config-$payload.json" "$config" "$payload" "$c0" "$c1" "$s0" "$s1" "$hz" "$x0" "$x1" "$p0" "$p1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
config, payload = sys.argv[2], sys.argv[3]
c0, c1, s0, s1, hz, x0, x1, p0, p1 = map(float, sys.argv[4:13])
rate = r["relayed_packets_per_second"]
relayed = rate * r["seconds"]  # datagrams through the relay, both ways
loss = r.get("loss_ratio", 0)
cpu = (c1 - c0) / hz; soft = (s1 - s0) / hz
prog = p1 - p0
per_relay = relayed / max(cpu + prog, 1e-9)
per = relayed / max(cpu + soft, 1e-9)
share = (x1 - x0) / max(r.get("echoed", 0), 1)  # client->peer datagrams XDP took
print(f"| {config} | {payload} B | {rate:,.0f} | {loss:.4f} | {cpu:.2f} | {prog:.2f} | {per_relay:,.0f} | {soft:.2f} | {per:,.0f} | {share:.0%} |")
PY
  done
  down
done

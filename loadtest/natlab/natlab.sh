#!/usr/bin/env bash
# The NAT lab: real Linux NATs (nftables) in network namespaces.
#
#   natlab.sh up      build it (idempotent: tears down a previous lab first)
#   natlab.sh down    remove every namespace and interface it made
#   natlab.sh status  list what exists
#   natlab.sh loss P  drop P % of the packets crossing the internet (0: none)
#   natlab.sh mobile wifi|cell  move nx-c-mobile's default route
#   natlab.sh cut on|off  drop (or stop dropping) what clients send each other
#              directly: direct paths break, CDX and the relay stay
#
# Topology (documentation address ranges only):
#   nx-pub     the "internet": CDX addresses 203.0.113.1 and 203.0.113.2, a relay
#              address 203.0.113.3, on lo
#   nx-r-<t>   a NAT router per type: WAN 198.51.100.<4k+2>/30, LAN 10.<k>.0.1/24
#   nx-c-<t>   a client behind it: 10.<k>.0.2/24
#   nx-r-<t>-2, nx-c-<t>-2  a second router and client of each type, so that
#              two clients of the same type sit behind separate NATs
#   nx-c-open, nx-c-open-2  clients with public addresses, no NAT:
#              198.51.100.254/30 and 198.51.100.250/30
#   nx-c-shared, nx-c-shared-2  two clients on one LAN behind one
#              port-restricted NAT nx-r-shared that does not hairpin
#   nx-c-cgnat, nx-c-cgnat-2  each behind a home NAT nx-r-cgnat[-2]
#              (port-restricted) whose WAN is 100.64.<k>.2/30, behind a
#              carrier-grade NAT nx-r-cgn[-2] (EIM, port-dependent filtering)
#   nx-c-mobile  two uplinks: eth0 behind nx-r-wifi, eth1 behind nx-r-cell
#              (both port-restricted); the default route picks one
#   nx-c-dual, nx-c-dual-2  dual-stack, like a phone on a carrier network:
#              IPv4 through a random-port symmetric NAT, IPv6 without NAT
#              (2001:db8:<k>:1::2/64) behind the router's stateful firewall
#              (only replies to what the client sent come in)
#   nx-c-nat64, nx-c-nat64-2  IPv6-only: IPv6 behind the same kind of
#              firewall, IPv4 only through the router's NAT64 (tayga with
#              the network-specific prefix 2001:db8:64::/96, then a
#              port-preserving NAT44 to its WAN)
# IPv6: nx-pub holds 2001:db8:ffff::1, ::2 (CDX) and ::3 (relay) on lo; each
# router of the dual-stack and IPv6-only clients has a WAN link
# 2001:db8:<k>::/64 to it.
# Types: full-cone, restricted-cone, port-restricted-cone, symmetric,
# symmetric-sequential, symmetric-preserving, udp-blocked.
# Mapping: masquerade keeps the source port when it is free (endpoint-
# independent); "random" picks a port per connection (symmetric, with ports
# fully at random). symmetric-sequential gives each new connection the next
# port of a counter (nftables numgen), as many carrier NATs do;
# symmetric-preserving keeps a socket's port for its first connection and
# picks random ones for the later (a set remembers which sockets are
# mapped). Filtering:
# conntrack admits only replies from the exact endpoint contacted (address-
# and port-dependent); full-cone adds a DNAT of every inbound port to the
# client (endpoint-independent); restricted-cone admits any port of an
# address the same internal port contacted (address-dependent, a set keyed
# by address and port); udp-blocked drops the client's UDP.
# Needs root, iproute2 and nftables; tayga for the NAT64.
set -euo pipefail

TYPES=(full-cone restricted-cone port-restricted-cone symmetric udp-blocked
  symmetric-sequential symmetric-preserving)

down() {
  local pidfile
  for pidfile in /run/natlab-tayga-*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^nx-' || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
}

status() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep '^nx-' || echo "no lab"
}

seq_ports() { # count first-port: "0 : first, 1 : first+1, ..."
  local i out=""
  for ((i = 0; i < $1; i++)); do out+="$i : $(($2 + i)), "; done
  echo "${out%, }"
}

nft_nat() { # router-ns type lan-client-ip wan-ip
  local ns=$1 type=$2 client=$3 wan=$4
  local masq='oifname "wan" masquerade persistent'
  case "$type" in
    symmetric) masq='oifname "wan" masquerade random' ;;
    # A map from the counter to the port: numgen's value would reach the
    # port in host byte order (a stride of 256).
    symmetric-sequential) masq="oifname \"wan\" meta l4proto { tcp, udp } snat ip to $wan : numgen inc mod 2048 map { $(seq_ports 2048 20000) }
      oifname \"wan\" masquerade" ;;
    symmetric-preserving) masq='oifname "wan" meta l4proto udp ip saddr . udp sport @mapped masquerade random
      oifname "wan" meta l4proto udp add @mapped { ip saddr . udp sport } masquerade
      oifname "wan" masquerade' ;;
  esac
  ip netns exec "$ns" nft -f - <<NFT
table ip nx {
  set contacted { type ipv4_addr . inet_service; flags timeout; timeout 120s; }
  set mapped { type ipv4_addr . inet_service; flags timeout; timeout 120s; }
  chain nx_post {
    type nat hook postrouting priority srcnat;
    $masq
  }
  chain nx_forward {
    type filter hook forward priority filter; policy accept;
    $( [ "$type" = udp-blocked ] && echo 'iifname "lan" meta l4proto udp drop' )
    $( [ "$type" = restricted-cone ] && echo 'iifname "lan" oifname "wan" meta l4proto udp add @contacted { ip daddr . udp sport }' )
  }
  # The router itself accepts nothing unsolicited from the WAN, as home
  # routers do. Dropping here also keeps such a packet's conntrack entry
  # unconfirmed: otherwise an early punch packet would occupy the tuple and
  # make the router map the client's next outbound flow to another port.
  chain nx_input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new drop
  }
  chain nx_pre {
    type nat hook prerouting priority dstnat;
    $( [ "$type" = full-cone ] && echo "iifname \"wan\" udp dport 1024-65535 ct state new dnat to $client" )
    $( [ "$type" = restricted-cone ] && echo "iifname \"wan\" ip saddr . udp dport @contacted ct state new dnat to $client" )
  }
}
NFT
}

up() {
  command -v tayga >/dev/null || {
    echo "natlab: tayga is needed for the IPv6-only clients' NAT64 (Debian: apt install tayga)" >&2
    exit 1
  }
  down
  ip netns add nx-pub
  ip -n nx-pub link set lo up
  ip -n nx-pub addr add 203.0.113.1/32 dev lo
  ip -n nx-pub addr add 203.0.113.2/32 dev lo
  # A TURN relay for pairs that cannot connect directly.
  ip -n nx-pub addr add 203.0.113.3/32 dev lo
  local i
  for i in 1 2 3; do ip -n nx-pub addr add "2001:db8:ffff::$i/128" dev lo nodad; done
  # The "internet" routes between the routers' WAN links and open clients.
  ip netns exec nx-pub sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

  local k=0
  for suffix in "" "-2"; do
  for type in "${TYPES[@]}"; do
    k=$((k + 1))
    local r="nx-r-$type$suffix" c="nx-c-$type$suffix"
    local wan_r="198.51.100.$((4 * k + 2))"
    wan_link "$r" "$k"
    lan_client "$r" "$c" "$k"
    nft_nat "$r" "$type" "10.$k.0.2" "$wan_r"
    # The random-port symmetric NAT, like many mobile carriers', also
    # forgets idle UDP mappings after 5 s (keepalives must hold sessions).
    if [ "$type" = symmetric ]; then
      ip netns exec "$r" sysctl -qw net.netfilter.nf_conntrack_udp_timeout=5 \
        net.netfilter.nf_conntrack_udp_timeout_stream=5
    fi
  done
  done

  # Two clients behind one port-restricted NAT that does not hairpin: they
  # meet at their private addresses.
  k=$((k + 1))
  wan_link nx-r-shared "$k"
  ip -n nx-r-shared link add lan type bridge
  ip -n nx-r-shared addr add "10.$k.0.1/24" dev lan; ip -n nx-r-shared link set lan up
  local i=1
  for c in nx-c-shared nx-c-shared-2; do
    i=$((i + 1))
    ip netns add "$c"; ip -n "$c" link set lo up
    ip link add "lan$i" netns nx-r-shared type veth peer name eth0 netns "$c"
    ip -n nx-r-shared link set "lan$i" master lan; ip -n nx-r-shared link set "lan$i" up
    ip -n "$c" addr add "10.$k.0.$i/24" dev eth0; ip -n "$c" link set eth0 up
    ip -n "$c" route add default via "10.$k.0.1"
  done
  nft_nat nx-r-shared port-restricted-cone "10.$k.0.2" "198.51.100.$((4 * k + 2))"

  # Carrier-grade NAT: a home NAT (port-restricted) whose WAN is in the
  # shared address space 100.64.0.0/10, behind a carrier's NAT (endpoint-
  # independent mapping, port-dependent filtering, as RFC 6888 asks).
  for suffix in "" "-2"; do
    k=$((k + 1))
    local cgn="nx-r-cgn$suffix" home="nx-r-cgnat$suffix" c="nx-c-cgnat$suffix"
    wan_link "$cgn" "$k"
    ip netns add "$home"; ip -n "$home" link set lo up
    ip link add lan netns "$cgn" type veth peer name wan netns "$home"
    ip -n "$cgn" addr add "100.64.$k.1/30" dev lan; ip -n "$cgn" link set lan up
    ip -n "$home" addr add "100.64.$k.2/30" dev wan; ip -n "$home" link set wan up
    ip -n "$home" route add default via "100.64.$k.1"
    nft_nat "$cgn" port-restricted-cone "100.64.$k.2" "198.51.100.$((4 * k + 2))"
    lan_client "$home" "$c" "$k"
    ip netns exec "$home" sysctl -qw net.ipv4.ip_forward=1
    nft_nat "$home" port-restricted-cone "10.$k.0.2" "100.64.$k.2"
  done

  # A mobile client with two uplinks, like a phone with Wi-Fi and cellular:
  # nx-c-mobile reaches the internet through nx-r-wifi (the default route)
  # or nx-r-cell, both port-restricted NATs; "natlab.sh mobile cell|wifi"
  # moves its default route.
  ip netns add nx-c-mobile; ip -n nx-c-mobile link set lo up
  local uplink dev
  for uplink in wifi cell; do
    k=$((k + 1))
    dev=eth0; [ "$uplink" = cell ] && dev=eth1
    wan_link "nx-r-$uplink" "$k"
    ip link add lan netns "nx-r-$uplink" type veth peer name "$dev" netns nx-c-mobile
    ip -n "nx-r-$uplink" addr add "10.$k.0.1/24" dev lan; ip -n "nx-r-$uplink" link set lan up
    ip -n nx-c-mobile addr add "10.$k.0.2/24" dev "$dev"; ip -n nx-c-mobile link set "$dev" up
    nft_nat "nx-r-$uplink" port-restricted-cone "10.$k.0.2" "198.51.100.$((4 * k + 2))"
  done
  mobile wifi

  # Dual-stack clients: IPv4 behind a carrier's random-port symmetric NAT,
  # IPv6 behind a stateful firewall (no NAT).
  for suffix in "" "-2"; do
    k=$((k + 1))
    wan_link "nx-r-dual$suffix" "$k"
    lan_client "nx-r-dual$suffix" "nx-c-dual$suffix" "$k"
    nft_nat "nx-r-dual$suffix" symmetric "10.$k.0.2" "198.51.100.$((4 * k + 2))"
    ipv6_firewalled "nx-r-dual$suffix" "nx-c-dual$suffix" "$k"
  done

  # IPv6-only clients: IPv6 behind a stateful firewall, IPv4 only through
  # NAT64 (tayga maps the client to an address of its pool, then a
  # port-preserving NAT to the router's WAN address).
  for suffix in "" "-2"; do
    k=$((k + 1))
    local r="nx-r-nat64$suffix" c="nx-c-nat64$suffix"
    wan_link "$r" "$k"
    ip netns add "$c"; ip -n "$c" link set lo up
    ip link add lan netns "$r" type veth peer name eth0 netns "$c"
    ip -n "$r" link set lan up; ip -n "$c" link set eth0 up
    ipv6_firewalled "$r" "$c" "$k"
    nat64 "$r" "$k"
    nft_nat "$r" port-restricted-cone "192.168.255.2" "198.51.100.$((4 * k + 2))"
  done

  # Clients with a public address and no NAT.
  open_client nx-c-open nxwo 253
  open_client nx-c-open-2 nxwo2 249
}

# IPv6 for router-ns and its LAN client (veths "wan"/"lan" and "eth0" exist):
# a WAN link 2001:db8:<k>::/64 to the internet, the LAN 2001:db8:<k>:1::/64,
# and a stateful firewall, as RFC 6092 asks of home routers: from the WAN
# only replies (and their ICMPv6 errors) reach the LAN.
ipv6_firewalled() { # router-ns client-ns k
  local r=$1 c=$2 k=$3
  ip -n nx-pub addr add "2001:db8:$k::1/64" dev "nxw$k" nodad
  ip -n nx-pub route add "2001:db8:$k:1::/64" via "2001:db8:$k::2"
  ip -n "$r" addr add "2001:db8:$k::2/64" dev wan nodad
  ip -n "$r" route add default via "2001:db8:$k::1" dev wan
  ip -n "$r" addr add "2001:db8:$k:1::1/64" dev lan nodad
  ip -n "$c" addr add "2001:db8:$k:1::2/64" dev eth0 nodad
  ip -n "$c" route add default via "2001:db8:$k:1::1" dev eth0
  ip netns exec "$r" sysctl -qw net.ipv6.conf.all.forwarding=1
  ip netns exec "$r" nft -f - <<NFT
table ip6 nx6 {
  chain nx6_forward {
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
  chain nx6_input {
    type filter hook input priority filter; policy accept;
    iifname "wan" meta l4proto ipv6-icmp accept
    iifname "wan" ct state new drop
  }
}
NFT
}

# A NAT64 in router-ns: tayga translates between the client's IPv6 address
# and an address of its pool (192.168.255.0/24), IPv4 destinations embedded
# in the network-specific prefix 2001:db8:64::/96 (RFC 6052; tayga refuses
# the well-known 64:ff9b::/96 for the documentation ranges the lab uses, as
# §3.1 asks); nft_nat then maps the pool to the WAN address, so the pair
# behaves as a stateful NAT64 (RFC 6146).
nat64() { # router-ns k
  local r=$1 k=$2 conf="/run/natlab-tayga-$1.conf"
  cat >"$conf" <<CONF
tun-device nat64
ipv4-addr 192.168.255.1
ipv6-addr 2001:db8:$k:2::1
prefix 2001:db8:64::/96
dynamic-pool 192.168.255.0/24
CONF
  ip netns exec "$r" tayga --config "$conf" --mktun >/dev/null
  ip -n "$r" link set nat64 up
  ip -n "$r" route add 192.168.255.0/24 dev nat64
  ip -n "$r" route add 2001:db8:64::/96 dev nat64
  ip -n "$r" route add 2001:db8:$k:2::1/128 dev nat64
  ip netns exec "$r" tayga --config "$conf" --pidfile "/run/natlab-tayga-$r.pid"
}

lan_client() { # router-ns client-ns k: the client on the router's LAN
  local r=$1 c=$2 k=$3
  ip netns add "$c"; ip -n "$c" link set lo up
  ip link add lan netns "$r" type veth peer name eth0 netns "$c"
  ip -n "$r" addr add "10.$k.0.1/24" dev lan; ip -n "$r" link set lan up
  ip -n "$c" addr add "10.$k.0.2/24" dev eth0; ip -n "$c" link set eth0 up
  ip -n "$c" route add default via "10.$k.0.1"
}

wan_link() { # router-ns k: the router, its WAN link to the internet
  local r=$1 k=$2
  local wan_pub="198.51.100.$((4 * k + 1))" wan_r="198.51.100.$((4 * k + 2))"
  ip netns add "$r"; ip -n "$r" link set lo up
  ip link add "nxw$k" netns nx-pub type veth peer name wan netns "$r"
  ip -n nx-pub addr add "$wan_pub/30" dev "nxw$k"; ip -n nx-pub link set "nxw$k" up
  ip -n "$r" addr add "$wan_r/30" dev wan; ip -n "$r" link set wan up
  ip -n "$r" route add default via "$wan_pub"
  ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
}

# Moves nx-c-mobile's default route to its Wi-Fi (eth0) or cellular (eth1)
# uplink; its sockets keep their ports, their packets leave from the other
# network (another NAT, another public address).
mobile() {
  local dev=eth0 net
  [ "${1:-}" = cell ] && dev=eth1
  net=$(ip -n nx-c-mobile -4 -o addr show dev "$dev" | awk '{print $4}')
  ip -n nx-c-mobile route replace default via "${net%.2/24}.1" dev "$dev"
}

# Random loss of PERCENT of the packets crossing the internet (each packet
# once: forwarded between routers, or to and from the servers in nx-pub);
# 0 removes it. The kernel here has no netem: nftables numgen.
loss() {
  local pct=${1:?usage: natlab.sh loss PERCENT}
  ip netns exec nx-pub nft delete table inet nx_loss 2>/dev/null || true
  [ "$pct" -gt 0 ] || return 0
  ip netns exec nx-pub nft -f - <<NFT
table inet nx_loss {
  chain loss_forward { type filter hook forward priority -10; numgen random mod 100 < $pct drop; }
  chain loss_input { type filter hook input priority -10; iifname != "lo" numgen random mod 100 < $pct drop; }
  chain loss_output { type filter hook output priority -10; oifname != "lo" numgen random mod 100 < $pct drop; }
}
NFT
}

# Cuts the direct paths between the lab's clients (on) or mends them (off):
# the internet drops what one client's public address sends to another's,
# IPv4 and IPv6, while CDX and the relay (on nx-pub's lo) stay reachable.
cut() {
  ip netns exec nx-pub nft delete table inet nx_cut 2>/dev/null || true
  [ "${1:-}" = on ] || return 0
  ip netns exec nx-pub nft -f - <<NFT
table inet nx_cut {
  chain forward {
    type filter hook forward priority -20;
    ip saddr 198.51.100.0/24 ip daddr 198.51.100.0/24 drop
    ip6 saddr 2001:db8::/32 ip6 daddr 2001:db8::/32 drop
  }
}
NFT
}

open_client() { # namespace veth-name last-octet-of-the-pub-side
  local c=$1 veth=$2 p=$3
  ip netns add "$c"
  ip -n "$c" link set lo up
  ip link add "$veth" netns nx-pub type veth peer name eth0 netns "$c"
  ip -n nx-pub addr add "198.51.100.$p/30" dev "$veth"; ip -n nx-pub link set "$veth" up
  ip -n "$c" addr add "198.51.100.$((p + 1))/30" dev eth0; ip -n "$c" link set eth0 up
  ip -n "$c" route add default via "198.51.100.$p"
}

case "${1:-}" in
  up) up ;;
  loss) loss "${2:-}" ;;
  mobile) mobile "${2:-wifi}" ;;
  cut) cut "${2:-on}" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status|loss PERCENT|mobile wifi|cell|cut on|off" >&2; exit 2 ;;
esac

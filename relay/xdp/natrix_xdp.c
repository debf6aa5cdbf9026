// SPDX-License-Identifier: (MIT OR Apache-2.0)
//
// natrix's XDP fast path for TURN channel data (RFC 8656 §12), IPv4 and
// IPv6 over Ethernet (client, relay and peer addresses of one family), UDP
// clients only. Two directions, each one hash lookup:
//
//  client -> relay   ChannelData to a TURN listener whose (client, listener,
//                    channel) has an entry in `to_peer`: the 4-byte header
//                    goes, the datagram leaves from the allocation's relayed
//                    address to the peer.
//  peer -> relay     a datagram to a relayed address from a peer with an
//                    entry in `to_client`: a ChannelData header is put in
//                    front, the datagram leaves from the listener to the
//                    client.
//
// Everything else passes to the kernel stack (and so to the userspace relay)
// unchanged: STUN, Send/Data indications, TCP, IPv6, fragments, IP options,
// VLAN tags, padded ChannelData, unknown or expired entries, and destinations
// the FIB cannot resolve. Userspace owns the maps: it installs an entry when
// a channel is bound with a live permission, with the earlier of the two
// expiry times (CLOCK_MONOTONIC nanoseconds), and removes it when either ends.
// Per-binding counters (in `counters`, a memory-mapped array: userspace
// reads them without a system call, at the slot both directions' entries
// name) feed usage records; per-CPU counters feed metrics.
//
// Bandwidth caps: an entry of a capped allocation names its allocation's
// budget in `caps` (shared by all its entries, both directions), a GCRA
// meter: each datagram's payload costs len * 1e9 / rate nanoseconds of the
// budget's "theoretical arrival time", with one second of burst; past it the
// datagram is dropped and counted against the allocation. Lock-free: a
// concurrent first charge of an idle budget on two CPUs may lose one.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define MAX_ENTRIES 262144

// Addresses and ports in network byte order, as on the wire.
struct to_peer_key {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct to_peer_val {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot; // in `counters`
	__u64 expires_ns;
	__u64 cap; // key in `caps`, 0: uncapped
};

struct to_client_key {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
};

struct to_client_val {
	__u32 server_ip;
	__u32 client_ip;
	__u16 server_port;
	__u16 client_port;
	__u16 channel;
	__u16 pad;
	__u32 slot;
	__u32 pad2;
	__u64 expires_ns;
	__u64 cap;
};

// The same for IPv6 addresses.
struct to_peer6_key {
	__u8 client_ip[16];
	__u8 server_ip[16];
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct to_peer6_val {
	__u8 relay_ip[16];
	__u8 peer_ip[16];
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot;
	__u64 expires_ns;
	__u64 cap;
};

struct to_client6_key {
	__u8 relay_ip[16];
	__u8 peer_ip[16];
	__u16 relay_port;
	__u16 peer_port;
};

struct to_client6_val {
	__u8 server_ip[16];
	__u8 client_ip[16];
	__u16 server_port;
	__u16 client_port;
	__u16 channel;
	__u16 pad;
	__u32 slot;
	__u32 pad2;
	__u64 expires_ns;
	__u64 cap;
};

// What one binding relayed: [0] client -> peer, [1] peer -> client.
struct counters {
	__u64 packets[2];
	__u64 bytes[2];
};

struct cap {
	__u64 rate; // payload bytes per second, > 0
	__u64 tat_ns;
	__u64 dropped_packets;
	__u64 dropped_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct to_peer_key);
	__type(value, struct to_peer_val);
} to_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct to_client_key);
	__type(value, struct to_client_val);
} to_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct to_peer6_key);
	__type(value, struct to_peer6_val);
} to_peer6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct to_client6_key);
	__type(value, struct to_client6_val);
} to_client6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, __u64);
	__type(value, struct cap);
} caps SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_ENTRIES);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

// Per-CPU counters, by index.
enum {
	STAT_TO_PEER_PACKETS,
	STAT_TO_PEER_BYTES,
	STAT_TO_CLIENT_PACKETS,
	STAT_TO_CLIENT_BYTES,
	STAT_EXPIRED,
	STAT_NO_ROUTE,
	STAT_PASSED,
	STAT_CAPPED,
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 index, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &index);
	if (v)
		*v += n;
}

// Counts a relayed datagram: in its binding's slot and the per-CPU stats.
static __always_inline void tally(__u32 slot, int dir, __u64 len)
{
	struct counters *c = bpf_map_lookup_elem(&counters, &slot);
	if (c) {
		__sync_fetch_and_add(&c->packets[dir], 1);
		__sync_fetch_and_add(&c->bytes[dir], len);
	}
	count(dir ? STAT_TO_CLIENT_PACKETS : STAT_TO_PEER_PACKETS, 1);
	count(dir ? STAT_TO_CLIENT_BYTES : STAT_TO_PEER_BYTES, len);
}

static __always_inline __u16 fold(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)c;
}

// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), on network-order words.
static __always_inline void csum_replace2(__u16 *sum, __u16 old, __u16 new)
{
	__u32 c = (__u16)~*sum;
	c += (__u16)~old;
	c += new;
	*sum = ~fold(c);
}

static __always_inline void csum_replace4(__u16 *sum, __u32 old, __u32 new)
{
	csum_replace2(sum, (__u16)(old >> 16), (__u16)(new >> 16));
	csum_replace2(sum, (__u16)old, (__u16)new);
}

static __always_inline void ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 c = 0;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		c += w[i];
	ip->check = ~fold(c);
}

#define HEADERS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))

// The headers as on the wire (the IP header 2 bytes off a 4-byte boundary).
struct headers {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

// A stack copy of them, with the IP header 4-byte aligned.
struct aligned_headers {
	__u16 pad;
	struct headers h;
} __attribute__((packed, aligned(4)));

// Rewrites the addresses, ports and lengths of `h` (checksums included;
// `payload_delta` bytes were added to the payload, `w1`/`w2` are the
// ChannelData header words that were removed (delta -4) or added (+4)),
// then finds the next hop. Returns the XDP action; XDP_PASS when no route.
static __always_inline int rewrite(struct xdp_md *ctx, struct headers *h, __u32 saddr,
				   __u16 sport, __u32 daddr, __u16 dport, int payload_delta,
				   __u16 w1, __u16 w2)
{
	__u16 old_len = h->udp.len;
	__u16 new_len = bpf_htons(bpf_ntohs(old_len) + payload_delta);
	if (h->udp.check) {
		__u16 sum = h->udp.check;
		csum_replace4(&sum, h->ip.saddr, saddr);
		csum_replace4(&sum, h->ip.daddr, daddr);
		csum_replace2(&sum, h->udp.source, sport);
		csum_replace2(&sum, h->udp.dest, dport);
		// The length is in the pseudo-header and in the UDP header.
		csum_replace2(&sum, old_len, new_len);
		csum_replace2(&sum, old_len, new_len);
		if (payload_delta < 0) {
			csum_replace2(&sum, w1, 0);
			csum_replace2(&sum, w2, 0);
		} else {
			csum_replace2(&sum, 0, w1);
			csum_replace2(&sum, 0, w2);
		}
		h->udp.check = sum ? sum : 0xffff;
	}
	h->udp.len = new_len;
	h->udp.source = sport;
	h->udp.dest = dport;
	h->ip.saddr = saddr;
	h->ip.daddr = daddr;
	h->ip.tot_len = bpf_htons(bpf_ntohs(h->ip.tot_len) + payload_delta);
	h->ip.ttl = 64;
	ip_checksum((struct iphdr *)((__u8 *)h + sizeof(struct ethhdr)));

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.tos = h->ip.tos;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = bpf_ntohs(h->ip.tot_len);
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = ctx->ingress_ifindex;
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	__builtin_memcpy(h->eth.h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(h->eth.h_source, fib.smac, ETH_ALEN);
	return fib.ifindex;
}

#define NSEC 1000000000ULL

// Charges `len` payload bytes to budget `key`: 1 when within the cap, 0
// over it (counted), -1 when the budget is missing (userspace decides).
static __always_inline int spend(__u64 key, __u64 len, __u64 now)
{
	if (!key)
		return 1;
	struct cap *c = bpf_map_lookup_elem(&caps, &key);
	if (!c || !c->rate)
		return -1;
	__u64 cost = len * NSEC / c->rate;
	__u64 tat = c->tat_ns;
	__u64 base = tat > now ? tat : now;
	if (base + cost > now + NSEC) {
		__sync_fetch_and_add(&c->dropped_packets, 1);
		__sync_fetch_and_add(&c->dropped_bytes, len);
		count(STAT_CAPPED, 1);
		return 0;
	}
	if (tat > now)
		__sync_fetch_and_add(&c->tat_ns, cost);
	else
		c->tat_ns = now + cost;
	return 1;
}

// Whether an entry may relay `len` bytes now: XDP_TX (go on), XDP_PASS
// (expired, or its budget missing: userspace decides) or XDP_DROP (over
// its cap).
static __always_inline int admit(__u64 expires_ns, __u64 cap, __u64 len, __u64 now)
{
	if (now > expires_ns) {
		count(STAT_EXPIRED, 1);
		return XDP_PASS;
	}
	int within = spend(cap, len, now);
	if (within < 0)
		return XDP_PASS;
	return within ? XDP_TX : XDP_DROP;
}

static __always_inline int send(struct xdp_md *ctx, int ifindex)
{
	if (ifindex == (int)ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(ifindex, 0);
}

static __always_inline int relay4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct headers *h = data;
	if ((void *)(h + 1) > end)
		return XDP_PASS;
	if (h->ip.ihl != 5 || h->ip.version != 4 ||
	    h->ip.protocol != IPPROTO_UDP || (h->ip.frag_off & bpf_htons(0x3fff)))
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(h->udp.len);
	if (ulen < sizeof(struct udphdr) ||
	    bpf_ntohs(h->ip.tot_len) != ulen + sizeof(struct iphdr) ||
	    (void *)h + HEADERS + (ulen - sizeof(struct udphdr)) > end)
		return XDP_PASS;
	__u16 plen = ulen - sizeof(struct udphdr);
	__u64 now = bpf_ktime_get_ns();

	// Client -> relay: ChannelData (first byte 0x40..0x7f), unpadded. A
	// peer's datagram may start the same way: without a client entry it
	// is looked up as a peer's.
	__u8 *p = (void *)(h + 1);
	struct to_peer_val *v = 0;
	if (plen >= 4 && (void *)(p + 4) <= end && (p[0] & 0xc0) == 0x40) {
		struct to_peer_key k = {
			.client_ip = h->ip.saddr,
			.server_ip = h->ip.daddr,
			.client_port = h->udp.source,
			.server_port = h->udp.dest,
			.channel = *(__u16 *)p,
		};
		v = bpf_map_lookup_elem(&to_peer, &k);
	}
	if (v) {
		if ((void *)(p + 4) > end)
			return XDP_PASS;
		__u16 clen = ((__u16)p[2] << 8) | p[3];
		if (clen + 4 != plen)
			return XDP_PASS;
		int verdict = admit(v->expires_ns, v->cap, clen, now);
		if (verdict != XDP_TX)
			return verdict;
		__u16 w1 = *(__u16 *)p, w2 = *(__u16 *)(p + 2);
		struct aligned_headers copy;
		__builtin_memcpy(&copy.h, h, HEADERS);
		int ifindex = rewrite(ctx, &copy.h, v->relay_ip, v->relay_port, v->peer_ip,
				      v->peer_port, -4, w1, w2);
		if (ifindex < 0) {
			count(STAT_NO_ROUTE, 1);
			return XDP_PASS;
		}
		if (bpf_xdp_adjust_head(ctx, 4))
			return XDP_PASS;
		data = (void *)(long)ctx->data;
		end = (void *)(long)ctx->data_end;
		h = data;
		if ((void *)(h + 1) > end)
			return XDP_DROP;
		__builtin_memcpy(h, &copy.h, HEADERS);
		tally(v->slot, 0, clen);
		return send(ctx, ifindex);
	}

	// Peer -> relayed address.
	struct to_client_key ck = {
		.relay_ip = h->ip.daddr,
		.peer_ip = h->ip.saddr,
		.relay_port = h->udp.dest,
		.peer_port = h->udp.source,
	};
	struct to_client_val *cv = bpf_map_lookup_elem(&to_client, &ck);
	if (!cv) {
		count(STAT_PASSED, 1);
		return XDP_PASS;
	}
	int verdict = admit(cv->expires_ns, cv->cap, plen, now);
	if (verdict != XDP_TX)
		return verdict;
	__u16 w1 = cv->channel, w2 = bpf_htons(plen);
	struct aligned_headers copy;
	__builtin_memcpy(&copy.h, h, HEADERS);
	int ifindex = rewrite(ctx, &copy.h, cv->server_ip, cv->server_port, cv->client_ip,
			      cv->client_port, 4, w1, w2);
	if (ifindex < 0) {
		count(STAT_NO_ROUTE, 1);
		return XDP_PASS;
	}
	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	h = data;
	if ((void *)h + HEADERS + 4 > end)
		return XDP_DROP;
	__builtin_memcpy(h, &copy.h, HEADERS);
	__u16 *ch = (void *)(h + 1);
	ch[0] = w1;
	ch[1] = w2;
	tally(cv->slot, 1, plen);
	return send(ctx, ifindex);
}

#define HEADERS6 (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr))

struct headers6 {
	struct ethhdr eth;
	struct ipv6hdr ip;
	struct udphdr udp;
} __attribute__((packed));

struct aligned_headers6 {
	__u16 pad;
	struct headers6 h;
} __attribute__((packed, aligned(4)));

// An IPv6 address's eight words into the checksum, replaced: summed in 32
// bits and folded once (17 terms of at most 0xffff cannot overflow).
static __always_inline void csum_replace16(__u16 *sum, const __u8 *old, const __u8 *new)
{
	__u32 c = (__u16)~*sum;
#pragma unroll
	for (int i = 0; i < 16; i += 2) {
		c += (__u16)~*(__u16 *)(old + i);
		c += *(__u16 *)(new + i);
	}
	*sum = ~fold(c);
}

// `rewrite` for IPv6: no header checksum; the UDP checksum (mandatory)
// follows the addresses through the pseudo-header.
static __always_inline int rewrite6(struct xdp_md *ctx, struct headers6 *h, const __u8 *saddr,
				    __u16 sport, const __u8 *daddr, __u16 dport, int payload_delta,
				    __u16 w1, __u16 w2)
{
	__u16 old_len = h->udp.len;
	__u16 new_len = bpf_htons(bpf_ntohs(old_len) + payload_delta);
	__u16 sum = h->udp.check;
	csum_replace16(&sum, (__u8 *)&h->ip.saddr, saddr);
	csum_replace16(&sum, (__u8 *)&h->ip.daddr, daddr);
	csum_replace2(&sum, h->udp.source, sport);
	csum_replace2(&sum, h->udp.dest, dport);
	csum_replace2(&sum, old_len, new_len);
	csum_replace2(&sum, old_len, new_len);
	if (payload_delta < 0) {
		csum_replace2(&sum, w1, 0);
		csum_replace2(&sum, w2, 0);
	} else {
		csum_replace2(&sum, 0, w1);
		csum_replace2(&sum, 0, w2);
	}
	h->udp.check = sum ? sum : 0xffff;
	h->udp.len = new_len;
	h->udp.source = sport;
	h->udp.dest = dport;
	__builtin_memcpy(&h->ip.saddr, saddr, 16);
	__builtin_memcpy(&h->ip.daddr, daddr, 16);
	h->ip.payload_len = new_len;
	h->ip.hop_limit = 64;

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = bpf_ntohs(new_len) + sizeof(struct ipv6hdr);
	__builtin_memcpy(fib.ipv6_src, saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, daddr, 16);
	fib.ifindex = ctx->ingress_ifindex;
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	__builtin_memcpy(h->eth.h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(h->eth.h_source, fib.smac, ETH_ALEN);
	return fib.ifindex;
}

// The IPv6 half: the same two directions as `relay4`, with IPv6 keys. UDP
// directly after the fixed header only (extension headers pass).
static __always_inline int relay6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct headers6 *h = data;
	if ((void *)(h + 1) > end)
		return XDP_PASS;
	if (h->ip.version != 6 || h->ip.nexthdr != IPPROTO_UDP || !h->udp.check)
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(h->udp.len);
	if (ulen < sizeof(struct udphdr) || h->ip.payload_len != h->udp.len ||
	    (void *)h + HEADERS6 + (ulen - sizeof(struct udphdr)) > end)
		return XDP_PASS;
	__u16 plen = ulen - sizeof(struct udphdr);
	__u64 now = bpf_ktime_get_ns();

	__u8 *p = (void *)(h + 1);
	struct to_peer6_val *v = 0;
	if (plen >= 4 && (void *)(p + 4) <= end && (p[0] & 0xc0) == 0x40) {
		struct to_peer6_key k = {
			.client_port = h->udp.source,
			.server_port = h->udp.dest,
			.channel = *(__u16 *)p,
		};
		__builtin_memcpy(k.client_ip, &h->ip.saddr, 16);
		__builtin_memcpy(k.server_ip, &h->ip.daddr, 16);
		v = bpf_map_lookup_elem(&to_peer6, &k);
	}
	if (v) {
		if ((void *)(p + 4) > end)
			return XDP_PASS;
		__u16 clen = ((__u16)p[2] << 8) | p[3];
		if (clen + 4 != plen)
			return XDP_PASS;
		int verdict = admit(v->expires_ns, v->cap, clen, now);
		if (verdict != XDP_TX)
			return verdict;
		__u16 w1 = *(__u16 *)p, w2 = *(__u16 *)(p + 2);
		struct aligned_headers6 copy;
		__builtin_memcpy(&copy.h, h, HEADERS6);
		int ifindex = rewrite6(ctx, &copy.h, v->relay_ip, v->relay_port, v->peer_ip,
				       v->peer_port, -4, w1, w2);
		if (ifindex < 0) {
			count(STAT_NO_ROUTE, 1);
			return XDP_PASS;
		}
		if (bpf_xdp_adjust_head(ctx, 4))
			return XDP_PASS;
		data = (void *)(long)ctx->data;
		end = (void *)(long)ctx->data_end;
		h = data;
		if ((void *)(h + 1) > end)
			return XDP_DROP;
		__builtin_memcpy(h, &copy.h, HEADERS6);
		tally(v->slot, 0, clen);
		return send(ctx, ifindex);
	}

	struct to_client6_key ck = {
		.relay_port = h->udp.dest,
		.peer_port = h->udp.source,
	};
	__builtin_memcpy(ck.relay_ip, &h->ip.daddr, 16);
	__builtin_memcpy(ck.peer_ip, &h->ip.saddr, 16);
	struct to_client6_val *cv = bpf_map_lookup_elem(&to_client6, &ck);
	if (!cv) {
		count(STAT_PASSED, 1);
		return XDP_PASS;
	}
	int verdict = admit(cv->expires_ns, cv->cap, plen, now);
	if (verdict != XDP_TX)
		return verdict;
	__u16 w1 = cv->channel, w2 = bpf_htons(plen);
	struct aligned_headers6 copy;
	__builtin_memcpy(&copy.h, h, HEADERS6);
	int ifindex = rewrite6(ctx, &copy.h, cv->server_ip, cv->server_port, cv->client_ip,
			       cv->client_port, 4, w1, w2);
	if (ifindex < 0) {
		count(STAT_NO_ROUTE, 1);
		return XDP_PASS;
	}
	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	h = data;
	if ((void *)h + HEADERS6 + 4 > end)
		return XDP_DROP;
	__builtin_memcpy(h, &copy.h, HEADERS6);
	__u16 *ch = (void *)(h + 1);
	ch[0] = w1;
	ch[1] = w2;
	tally(cv->slot, 1, plen);
	return send(ctx, ifindex);
}

SEC("xdp")
int natrix_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return relay4(ctx);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay6(ctx);
	return XDP_PASS;
}

// Attached to the far ends of veth pairs so that frames redirected into
// them are accepted (a veth takes XDP_REDIRECT only when its peer runs XDP).
SEC("xdp")
int natrix_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";

//! Which peer addresses a relay may talk to.
//!
//! Safe by default: a relay that forwards to loopback, private networks or a
//! cloud metadata service turns every client into an attacker inside the
//! operator's network. Every address is normalised first, so an IPv4 range
//! denied as such is also denied in its IPv4-mapped (`::ffff:a.b.c.d`),
//! IPv4-translated (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4
//! (`2002::/16`) forms. Forms whose target the relay cannot see are denied
//! whole: local-use NAT64 (`64:ff9b:1::/48`, translated by the operator's
//! own gateway) and Teredo (`2001::/32`).
//! An allow-list overrides the deny-list (labs and tests relay to loopback).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use natrix_model::IpNet;

/// Ranges denied unless allowed: not globally routable, or dangerous.
const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",        // "this network", unspecified
    "10.0.0.0/8",       // RFC 1918
    "100.64.0.0/10",    // CGNAT (RFC 6598)
    "127.0.0.0/8",      // loopback
    "169.254.0.0/16",   // link-local, incl. 169.254.169.254 metadata
    "168.63.129.16/32", // Azure's platform endpoint (wireserver, DNS, health)
    "172.16.0.0/12",    // RFC 1918
    "192.0.0.0/24",     // IETF protocol assignments
    "192.0.2.0/24",     // TEST-NET-1
    "192.88.99.0/24",   // 6to4 relay anycast (deprecated)
    "192.168.0.0/16",   // RFC 1918
    "198.18.0.0/15",    // benchmarking
    "198.51.100.0/24",  // TEST-NET-2
    "203.0.113.0/24",   // TEST-NET-3
    "224.0.0.0/4",      // multicast
    "240.0.0.0/4",      // reserved, incl. broadcast
    "::/128",           // unspecified
    "::1/128",          // loopback
    "::/96",            // IPv4-compatible (deprecated)
    "::ffff:0:0:0/96",  // IPv4-translated (RFC 2765 SIIT), never on the wire
    "64:ff9b:1::/48",   // local-use NAT64 (RFC 8215): translates to inside
    "2001::/32",        // Teredo: tunnels to an address the deny-list cannot see
    "100::/64",         // discard-only
    "2001:2::/48",      // benchmarking
    "2001:db8::/32",    // documentation
    "3fff::/20",        // documentation (RFC 9637)
    "5f00::/16",        // SRv6 segment identifiers (RFC 9602)
    "fc00::/7",         // unique local
    "fe80::/10",        // link-local
    "fec0::/10",        // site-local (deprecated)
    "ff00::/8",         // multicast
];

/// The peer-address policy of a relay.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
    /// The relay's own addresses: reachable only at relay ports (another
    /// allocation, relay to relay), never at its listeners or other
    /// services ("TURN inside TURN", metrics).
    own: Vec<IpAddr>,
    relay_ports: (u16, u16),
    /// The ports of shared (multiplexed) relay sockets, peers too.
    shared_ports: Option<(u16, u16)>,
}

impl Default for PeerPolicy {
    fn default() -> PeerPolicy {
        PeerPolicy::new(&[], &[])
    }
}

impl PeerPolicy {
    /// The default deny-list plus `extra_deny`, overridden by `allow`.
    pub fn new(extra_deny: &[IpNet], allow: &[IpNet]) -> PeerPolicy {
        let mut deny: Vec<IpNet> = DEFAULT_DENY.iter().filter_map(|s| s.parse().ok()).collect();
        deny.extend_from_slice(extra_deny);
        PeerPolicy {
            deny,
            allow: allow.to_vec(),
            own: Vec::new(),
            relay_ports: (0, u16::MAX),
            shared_ports: None,
        }
    }

    /// This relay's own addresses and its relay port range: a peer at one
    /// of those addresses is reachable only inside the range (unless the
    /// allow-list names it).
    pub fn with_own(
        mut self,
        own: impl IntoIterator<Item = IpAddr>,
        ports: (u16, u16),
    ) -> PeerPolicy {
        self.own = own
            .into_iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        self.relay_ports = ports;
        self
    }

    /// Shared relay sockets bind these ports (`min`, `max`): at the relay's
    /// own addresses they are peers too.
    pub fn with_shared_ports(mut self, ports: Option<(u16, u16)>) -> PeerPolicy {
        self.shared_ports = ports;
        self
    }

    /// True when the relay may send to `peer` (an IP it permits, and at
    /// one of its own addresses only a relay port).
    #[inline]
    pub fn permits_endpoint(&self, peer: SocketAddr) -> bool {
        if self.own.is_empty() {
            return true;
        }
        let ip = peer.ip().to_canonical();
        if !self.own.contains(&ip) || self.allow.iter().any(|n| n.contains(ip)) {
            return true;
        }
        let port = peer.port();
        (self.relay_ports.0..=self.relay_ports.1).contains(&port)
            || self
                .shared_ports
                .is_some_and(|(min, max)| (min..=max).contains(&port))
    }

    /// True when the relay may exchange packets with `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let embedded = embedded_ipv4(ip);
        let forms = [Some(ip), embedded.map(IpAddr::V4)];
        let matches = |nets: &[IpNet]| {
            forms
                .iter()
                .flatten()
                .any(|ip| nets.iter().any(|n| n.contains(*ip)))
        };
        if matches(&self.allow) {
            return true;
        }
        !matches(&self.deny)
    }
}

/// The IPv4 address an IPv6 address stands for, if it embeds one.
fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let tail = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail(s[6], s[7]));
    }
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): the address sits in
    // bits 48..80 of a /48-based translation (RFC 6052 §2.2).
    if s[..3] == [0x64, 0xff9b, 0x1] {
        let b = v6.octets();
        return Some(Ipv4Addr::new(b[6], b[7], b[9], b[10]));
    }
    // 6to4 (RFC 3056): 2002:AABB:CCDD::/48.
    if s[0] == 0x2002 {
        return Some(tail(s[1], s[2]));
    }
    // IPv4-translated ::ffff:0:a.b.c.d (RFC 2765).
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(tail(s[6], s[7]));
    }
    // IPv4-compatible ::a.b.c.d (deprecated), except :: and ::1.
    if s[..6] == [0; 6] && u128::from(v6) > 1 {
        return Some(tail(s[6], s[7]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_policy_denies_internal_and_special_ranges_in_every_form() {
        let p = PeerPolicy::default();
        for denied in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.251",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",                   // NAT64 of 169.254.169.254
            "64:ff9b::7f00:1",                      // NAT64 of 127.0.0.1
            "64:ff9b:1:a9fe:a9:fe00::",             // local-use NAT64 of 169.254.169.254
            "2002:a00:1::1",                        // 6to4 of 10.0.0.1
            "::10.0.0.1",                           // IPv4-compatible
            "168.63.129.16",                        // Azure platform endpoint
            "::ffff:a83f:8110",                     // IPv4-mapped Azure platform endpoint
            "::ffff:0:a9fe:a9fe",                   // IPv4-translated 169.254.169.254
            "::ffff:0:808:808",                     // IPv4-translated, even of a public one
            "64:ff9b:1:808:8:800::",                // local-use NAT64, whatever it embeds
            "64:ff9b:1::1:2:3",                     // local-use NAT64, another layout
            "2001:0:4136:e378:8000:63bf:3fff:fdd2", // Teredo
            "3fff::1",                              // documentation
            "5f00::1",                              // SRv6 SID
        ] {
            assert!(!p.permits(ip(denied)), "{denied} must be denied");
        }
        for allowed in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(p.permits(ip(allowed)), "{allowed} must be allowed");
        }
    }

    #[test]
    fn allow_list_overrides_and_extra_deny_adds() {
        let p = PeerPolicy::new(
            &["8.8.8.0/24".parse().unwrap()],
            &["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
        );
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(p.permits(ip("::1")));
        assert!(!p.permits(ip("8.8.8.8")));
        assert!(!p.permits(ip("10.0.0.1")));
    }

    #[test]
    fn own_addresses_are_reachable_only_at_relay_ports_unless_allowed() {
        let own = ip("198.51.100.5");
        let p = PeerPolicy::new(&[], &[]).with_own([own, ip("0.0.0.0")], (49152, 65535));
        assert!(
            !p.permits_endpoint(SocketAddr::new(own, 3478)),
            "its TURN listener"
        );
        assert!(
            !p.permits_endpoint(SocketAddr::new(own, 9090)),
            "its metrics"
        );
        assert!(!p.permits_endpoint("[::ffff:198.51.100.5]:5349".parse().unwrap()));
        assert!(
            p.permits_endpoint(SocketAddr::new(own, 50000)),
            "another allocation"
        );
        assert!(
            p.permits_endpoint("198.51.100.6:3478".parse().unwrap()),
            "another host"
        );
        let lab = PeerPolicy::new(&[], &["198.51.100.0/24".parse().unwrap()])
            .with_own([own], (49152, 65535));
        assert!(
            lab.permits_endpoint(SocketAddr::new(own, 3478)),
            "allowed explicitly"
        );
    }

    #[test]
    fn networks_parse_and_reject_nonsense() {
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        assert_eq!("::1".parse::<IpNet>().unwrap().to_string(), "::1/128");
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains(ip("1.2.3.4"))
        );
    }
}

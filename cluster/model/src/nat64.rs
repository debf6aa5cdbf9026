//! NAT64 address synthesis (RFC 6052): an IPv6-only host reaches an IPv4
//! address through its network's NAT64 at the IPv4 address embedded in the
//! NAT64 prefix. Only /96 prefixes (the well-known `64:ff9b::/96` and the
//! network-specific ones operators use most) are supported: the IPv4
//! address is the last 32 bits.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// A /96 NAT64 prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nat64Prefix([u8; 12]);

/// The well-known prefix, `64:ff9b::/96` (RFC 6052 §2.1).
pub const WELL_KNOWN: Nat64Prefix = Nat64Prefix([0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]);

impl Nat64Prefix {
    /// `addr` as the IPv6-only host reaches it: an IPv4 address embedded in
    /// the prefix, anything else unchanged.
    pub fn synthesize(&self, addr: SocketAddr) -> SocketAddr {
        match addr.ip() {
            IpAddr::V4(v4) => {
                let mut b = [0u8; 16];
                b[..12].copy_from_slice(&self.0);
                b[12..].copy_from_slice(&v4.octets());
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), addr.port())
            }
            IpAddr::V6(_) => addr,
        }
    }

    /// The IPv4 address `addr` stands for when it lies in the prefix;
    /// anything else unchanged (the inverse of [`Nat64Prefix::synthesize`]).
    pub fn extract(&self, addr: SocketAddr) -> SocketAddr {
        match addr.ip() {
            IpAddr::V6(v6) if v6.octets()[..12] == self.0 => {
                let o = v6.octets();
                let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
                SocketAddr::new(IpAddr::V4(v4), addr.port())
            }
            _ => addr,
        }
    }

    /// Whether `ip` lies in the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V6(v6) if v6.octets()[..12] == self.0)
    }
}

impl Default for Nat64Prefix {
    fn default() -> Nat64Prefix {
        WELL_KNOWN
    }
}

impl fmt::Display for Nat64Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = [0u8; 16];
        b[..12].copy_from_slice(&self.0);
        write!(f, "{}/96", Ipv6Addr::from(b))
    }
}

impl fmt::Debug for Nat64Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Nat64Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Nat64Prefix, String> {
        let bad = || format!("`{s}` is not a NAT64 prefix: an IPv6 /96 such as 64:ff9b::/96");
        let (addr, len) = s.trim().split_once('/').ok_or_else(bad)?;
        if len.trim() != "96" {
            return Err(format!(
                "`{s}`: only /96 NAT64 prefixes are supported (the IPv4 address in the last 32 bits)"
            ));
        }
        let addr: Ipv6Addr = addr.trim().parse().map_err(|_| bad())?;
        let o = addr.octets();
        if o[12..] != [0; 4] {
            return Err(format!(
                "`{s}`: the last 32 bits of a /96 prefix must be zero"
            ));
        }
        let mut p = [0u8; 12];
        p.copy_from_slice(&o[..12]);
        Ok(Nat64Prefix(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_addresses_are_embedded_in_the_last_32_bits_and_back() {
        let p: Nat64Prefix = "2001:db8:64::/96".parse().unwrap();
        let v4: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        let v6 = p.synthesize(v4);
        assert_eq!(v6, "[2001:db8:64::cb00:7101]:3478".parse().unwrap());
        assert_eq!(p.extract(v6), v4);
        assert!(p.contains(v6.ip()));
        // IPv6 addresses outside the prefix pass unchanged both ways.
        let native: SocketAddr = "[2001:db8:20:1::2]:5000".parse().unwrap();
        assert_eq!(p.synthesize(native), native);
        assert_eq!(p.extract(native), native);
        assert!(!p.contains(native.ip()));
        assert_eq!(
            WELL_KNOWN.synthesize(v4),
            "[64:ff9b::203.0.113.1]:3478".parse().unwrap()
        );
        assert_eq!(WELL_KNOWN.to_string(), "64:ff9b::/96");
        assert_eq!(Nat64Prefix::default(), WELL_KNOWN);
    }

    #[test]
    fn only_slash_96_prefixes_parse() {
        assert!("64:ff9b::/64".parse::<Nat64Prefix>().is_err());
        assert!("64:ff9b::1/96".parse::<Nat64Prefix>().is_err());
        assert!("203.0.113.0/96".parse::<Nat64Prefix>().is_err());
        assert!("64:ff9b::".parse::<Nat64Prefix>().is_err());
        assert_eq!("64:ff9b::/96".parse::<Nat64Prefix>(), Ok(WELL_KNOWN));
    }
}

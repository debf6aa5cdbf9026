//! The PROXY protocol, version 2 (HAProxy's binary header): what an L4
//! load balancer puts in front of a TCP stream to say whom the connection
//! is really from. Only the header is read here; who may send one is the
//! listener's decision.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The longest header accepted (addresses and TLVs): a balancer's TLVs
/// (ALPN, authority, a unique id, SSL details) fit well within it.
pub const MAX_HEADER: usize = 16 + 1024;

/// What a complete header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// PROXY: the stream's real source and destination.
    Proxied {
        /// The client as the balancer saw it.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// LOCAL (the balancer's own health check), or an address family not
    /// carried (UNIX sockets, unspecified): the connection is what it
    /// looks like.
    Local,
}

/// Why bytes are not a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The signature is wrong: not a PROXY v2 header at all.
    NotProxy,
    /// A version other than 2, or a command other than LOCAL and PROXY.
    Version,
    /// Longer than [`MAX_HEADER`], or too short for its address family.
    Length,
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyError::NotProxy => "not a PROXY protocol v2 header",
            ProxyError::Version => "an unknown PROXY protocol version or command",
            ProxyError::Length => "a PROXY protocol header of a bad length",
        })
    }
}

impl std::error::Error for ProxyError {}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes
/// are needed, else the header and how many bytes it took (the stream's
/// own bytes follow).
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0F);
    if version != 2 || command > 1 {
        return Err(ProxyError::Version);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > MAX_HEADER {
        return Err(ProxyError::Length);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let header = match (command, buf[13] >> 4) {
        (0, _) => ProxyHeader::Local,
        // TCP or UDP over IPv4: source, destination, their ports.
        (_, 1) => {
            if body.len() < 12 {
                return Err(ProxyError::Length);
            }
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                destination: SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
            }
        }
        // IPv6.
        (_, 2) => {
            if body.len() < 36 {
                return Err(ProxyError::Length);
            }
            let ip = |b: &[u8]| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&b[..16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                destination: SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
            }
        }
        // UNSPEC and UNIX: nothing to take from it.
        _ => ProxyHeader::Local,
    };
    Ok(Some((header, 16 + len)))
}

/// A PROXY header for `source` → `destination` (same family), as a
/// balancer writes it: for tests and tools.
pub fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(source).octets());
            out.extend_from_slice(&v6(destination).octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_arrive_in_pieces_and_garbage_is_refused() {
        let s: SocketAddr = "198.51.100.7:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let d: SocketAddr = "203.0.113.1:3478"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let mut h = encode(s, d);
        h.extend_from_slice(b"STUN");
        for cut in 0..28 {
            assert_eq!(parse(&h[..cut]), Ok(None), "{cut} bytes are not enough");
        }
        let want = ProxyHeader::Proxied {
            source: s,
            destination: d,
        };
        assert_eq!(parse(&h), Ok(Some((want, 28))));
        let s6: SocketAddr = "[2001:db8::7]:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let d6: SocketAddr = "[2001:db8::1]:3478"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let h6 = encode(s6, d6);
        assert_eq!(
            parse(&h6),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: s6,
                    destination: d6
                },
                52
            )))
        );
        // A STUN message, a v1 text header, a wrong version, a huge length.
        assert_eq!(parse(&[0, 1, 0, 0]), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROXY TCP4 "), Err(ProxyError::NotProxy));
        let mut v3 = encode(s, d);
        v3[12] = 0x31;
        assert_eq!(parse(&v3), Err(ProxyError::Version));
        let mut huge = encode(s, d);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&huge), Err(ProxyError::Length));
        let mut short = encode(s, d);
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(parse(&short[..20]), Err(ProxyError::Length));
        // LOCAL: the balancer's health check.
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Some((ProxyHeader::Local, 16))));
    }
}

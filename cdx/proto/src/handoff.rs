//! Sibling hand-off: how a CDX node with one IP serves RFC 5780 change-IP
//! requests. Two nodes pair up (`--stun-sibling`); each names the other's IP
//! in OTHER-ADDRESS, and a request that asks for the other IP is handed to
//! the sibling, which answers the client from its own address.
//!
//! # Wire format (UDP, sent to the sibling's primary STUN port)
//!
//! ```text
//! 0      4   5       13      29          31      47+
//! | NXHO | v | ts ms  | HMAC  | arrived   | client | original request ...
//! | 4 B  |1B | 8 B BE | 16 B  | port 1 B  | 18 B   |
//! ```
//!
//! `NXHO` starts with 0x4E, which is neither STUN (0x00–0x03) nor a valid
//! ChannelData start for a STUN-only port, so the listener tells them apart
//! by the first four bytes. `HMAC` is HMAC-SHA-256 (truncated to 16 bytes)
//! under the cluster secret over everything after it and the timestamp;
//! hand-offs older or newer than [`MAX_SKEW_MS`] are refused. `arrived port`
//! is 0 or 1 (the port index the client used at the sender). `client` is a
//! 16-byte IPv6 (IPv4-mapped for IPv4) address and a 2-byte port. Without
//! the secret nobody can make a node answer a third party.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ring::hmac;

const MAGIC: &[u8; 4] = b"NXHO";
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const HEADER: usize = 4 + 1 + 8 + TAG_LEN + 1 + 18;
/// Largest clock difference (and delay) accepted between siblings.
pub const MAX_SKEW_MS: u64 = 5_000;

/// True when `packet` looks like a hand-off (checked before STUN parsing).
pub fn is_handoff(packet: &[u8]) -> bool {
    packet.len() >= HEADER && &packet[..4] == MAGIC
}

/// Why a hand-off was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffError {
    /// Too short, wrong version, or a bad port index.
    Malformed,
    /// The HMAC does not verify: not from a sibling with our secret.
    BadTag,
    /// Too old or from the future.
    Stale,
}

/// A verified hand-off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff<'a> {
    /// The port index (0 primary, 1 alternate) the client used at the
    /// sender.
    pub arrived_port: usize,
    /// The client's address as the sender saw it.
    pub client: SocketAddr,
    /// The client's original request.
    pub request: &'a [u8],
}

fn tag(key: &hmac::Key, ts: &[u8], body: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(ts);
    ctx.update(body);
    ctx.sign()
}

/// The key for `secret`.
pub fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// Writes a hand-off into `out`; returns its length, or `None` when `out`
/// is too small.
pub fn seal(
    key: &hmac::Key,
    now_ms: u64,
    arrived_port: usize,
    client: SocketAddr,
    request: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let total = HEADER + request.len();
    let out = out.get_mut(..total)?;
    out[..4].copy_from_slice(MAGIC);
    out[4] = VERSION;
    out[5..13].copy_from_slice(&now_ms.to_be_bytes());
    let body_at = 13 + TAG_LEN;
    out[body_at] = arrived_port as u8;
    let ip = match client.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out[body_at + 1..body_at + 17].copy_from_slice(&ip.octets());
    out[body_at + 17..body_at + 19].copy_from_slice(&client.port().to_be_bytes());
    out[HEADER..].copy_from_slice(request);
    let t = tag(key, &out[5..13], &out[body_at..]);
    out[13..body_at].copy_from_slice(&t.as_ref()[..TAG_LEN]);
    Some(total)
}

/// Verifies and decodes a hand-off received at `now_ms`.
pub fn open<'a>(
    key: &hmac::Key,
    now_ms: u64,
    packet: &'a [u8],
) -> Result<Handoff<'a>, HandoffError> {
    if !is_handoff(packet) || packet[4] != VERSION {
        return Err(HandoffError::Malformed);
    }
    let body_at = 13 + TAG_LEN;
    let expected = tag(key, &packet[5..13], &packet[body_at..]);
    let diff = packet[13..body_at]
        .iter()
        .zip(&expected.as_ref()[..TAG_LEN])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(HandoffError::BadTag);
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&packet[5..13]);
    if u64::from_be_bytes(ts).abs_diff(now_ms) > MAX_SKEW_MS {
        return Err(HandoffError::Stale);
    }
    let arrived_port = usize::from(packet[body_at]);
    if arrived_port > 1 {
        return Err(HandoffError::Malformed);
    }
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&packet[body_at + 1..body_at + 17]);
    let ip = Ipv6Addr::from(ip);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    let port = u16::from_be_bytes([packet[body_at + 17], packet[body_at + 18]]);
    Ok(Handoff {
        arrived_port,
        client: SocketAddr::new(ip, port),
        request: &packet[HEADER..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_handoff_opens_with_the_same_secret_only() {
        let k = key(b"cluster secret");
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut out = [0u8; 256];
        let n = seal(&k, 1_000_000, 1, client, b"request bytes", &mut out).unwrap();
        let h = open(&k, 1_001_000, &out[..n]).unwrap();
        assert_eq!(h.arrived_port, 1);
        assert_eq!(h.client, client);
        assert_eq!(h.request, b"request bytes");
        assert_eq!(
            open(&key(b"other"), 1_001_000, &out[..n]),
            Err(HandoffError::BadTag)
        );
        assert_eq!(
            open(&k, 1_000_000 + MAX_SKEW_MS + 1, &out[..n]),
            Err(HandoffError::Stale)
        );
        let mut forged = out[..n].to_vec();
        forged[HEADER - 2] ^= 1; // redirect to another client port
        assert_eq!(open(&k, 1_000_000, &forged), Err(HandoffError::BadTag));
        assert_eq!(
            open(&k, 1_000_000, &out[..10]),
            Err(HandoffError::Malformed)
        );
        let v6: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        let n = seal(&k, 7, 0, v6, b"", &mut out).unwrap();
        assert_eq!(open(&k, 7, &out[..n]).unwrap().client, v6);
    }
}

//! The CDX client: RFC 5780 NAT behaviour discovery against any RFC 5780
//! STUN server, producing the model's [`NatProfile`]. The decision tree is
//! the sans-IO [`Discovery`] state machine; this module drives it on real,
//! blocking UDP sockets, so tools and applications can call it from any
//! thread.
//!
//! Timing follows RFC 8489 §6.2.1 retransmission with a short initial RTO:
//! tests that expect an answer retransmit until one arrives; tests whose
//! verdict is "no answer" (filtering) give up after [`NO_ANSWER_WAIT`], so a
//! whole discovery stays well under two seconds.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub use natrix_cdx_proto::discovery::NO_ANSWER_WAIT;
use natrix_cdx_proto::discovery::{Discovery, Socket};
use natrix_model::{Nat64Prefix, NatProfile};

/// Why discovery could not run.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The local socket could not be set up.
    #[error("local socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Runs RFC 5780 discovery against `server` from a socket bound to `local`
/// (port 0 for any). Never fails for network reasons: a silent server
/// yields a profile without a mapped address (UDP blocked, or no server).
pub fn discover(server: SocketAddr, local: SocketAddr) -> Result<NatProfile, DiscoveryError> {
    discover_via(server, local, None)
}

/// [`discover`] from an IPv6-only host through its network's NAT64: the
/// tests speak to the IPv4 `server` (and the IPv4 addresses it names) at
/// their addresses in `nat64`'s prefix, from an IPv6 `local`; the profile
/// describes the IPv4 side as the server sees it (the NAT64's mapping).
pub fn discover_via(
    server: SocketAddr,
    local: SocketAddr,
    nat64: Option<Nat64Prefix>,
) -> Result<NatProfile, DiscoveryError> {
    let out = |a: SocketAddr| nat64.map_or(a, |p| p.synthesize(a));
    let back = |a: SocketAddr| nat64.map_or(a, |p| p.extract(a));
    let primary = UdpSocket::bind(local)?;
    // The address the tests run from, as the routing table picks it.
    let local_ip = route_source(local.ip(), out(server)).unwrap_or(local.ip());
    let from = SocketAddr::new(local_ip, primary.local_addr()?.port());
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut d = Discovery::new(server, from, seed, Instant::now());
    // Bound when the machine first names it (the filtering tests).
    let mut fresh: Option<UdpSocket> = None;
    let mut buf = [0u8; 1500];
    loop {
        while let Some(t) = d.poll_transmit() {
            let socket = match t.socket {
                Socket::Primary => &primary,
                Socket::Fresh => match &mut fresh {
                    Some(s) => &*s,
                    None => fresh.insert(UdpSocket::bind(SocketAddr::new(local.ip(), 0))?),
                },
            };
            // A send error (e.g. ICMP unreachable reported) means no answer.
            if socket.send_to(&t.payload, out(t.destination)).is_err() {
                d.handle_send_error(t.socket, Instant::now());
            }
        }
        // Nothing pending means every test ran: the result is there.
        let (Some(deadline), Some(listening)) = (d.poll_timeout(), d.listening()) else {
            return Ok(d.profile().cloned().unwrap_or_default());
        };
        let socket = match (listening, &fresh) {
            (Socket::Fresh, Some(s)) => s,
            _ => &primary,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            d.handle_timeout(Instant::now());
            continue;
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => d.handle_input(listening, back(peer), &buf[..n], Instant::now()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                d.handle_timeout(Instant::now());
            }
            // An ICMP error reported on the socket: no answer to this test.
            Err(_) => d.handle_send_error(listening, Instant::now()),
        }
    }
}

/// The IPv6 side of a dual-stack or IPv6-only host: [`discover`] against
/// the IPv6 `server` and, with `lifetime`, the mapping lifetime up to it
/// ([`add_mapping_lifetime`]); `None` when the host has no IPv6 route there.
pub fn discover_ipv6(
    server: SocketAddr,
    lifetime: Option<Duration>,
) -> Result<Option<NatProfile>, DiscoveryError> {
    if !server.is_ipv6() || !routable(server) {
        return Ok(None);
    }
    let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let mut p = discover(server, any)?;
    if let Some(max) = lifetime {
        add_mapping_lifetime(&mut p, server, any.ip(), max)?;
    }
    Ok(Some(p))
}

/// Whether this host can send to `server` at all (it has a route there): an
/// IPv6-only host cannot reach an IPv4 address except through NAT64.
pub fn routable(server: SocketAddr) -> bool {
    let any: std::net::IpAddr = if server.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    route_source(any, server).is_ok()
}

/// How this host reaches `server`: directly when it has a route there, else
/// (an IPv4 server from an IPv6-only host) through NAT64 with `prefix` —
/// `None` then, or `Some(prefix)`, with the local address to bind.
pub fn reach(server: SocketAddr, prefix: Nat64Prefix) -> (SocketAddr, Option<Nat64Prefix>) {
    let v4 = SocketAddr::from(([0, 0, 0, 0], 0));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    match (server.is_ipv4(), routable(server)) {
        (true, true) => (v4, None),
        (true, false) => (v6, Some(prefix)),
        (false, _) => (v6, None),
    }
}

/// The local address datagrams to `server` leave from, as the routing
/// table picks it for a socket bound to `local` (which may be unspecified):
/// what a host candidate or a discovery profile names.
pub fn route_source(
    local: std::net::IpAddr,
    server: SocketAddr,
) -> std::io::Result<std::net::IpAddr> {
    let probe = UdpSocket::bind(SocketAddr::new(local, 0))?;
    probe.connect(server)?;
    Ok(probe.local_addr()?.ip())
}

/// How long the NAT in front of `local` keeps an idle UDP mapping (RFC 5780
/// §4.6, [`natrix_cdx_proto::lifetime`]): one socket idled for each of
/// `delays` in parallel, checked through `server`'s RESPONSE-PORT. Takes
/// about the longest delay plus a second.
pub fn mapping_lifetime(
    server: SocketAddr,
    local: std::net::IpAddr,
    delays: &[Duration],
) -> std::io::Result<natrix_cdx_proto::lifetime::Lifetime> {
    use natrix_cdx_proto::lifetime::LifetimeProbe;
    use std::os::fd::AsFd;
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let mut p = LifetimeProbe::new(server, delays, seed, Instant::now());
    let sockets = (0..p.sockets())
        .map(|_| {
            let s = UdpSocket::bind(SocketAddr::new(local, 0))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<UdpSocket>>>()?;
    let mut buf = [0u8; 1500];
    loop {
        while let Some(t) = p.poll_transmit() {
            if let Some(s) = sockets.get(t.socket) {
                // A failed send is a check without an answer.
                let _ = s.send_to(&t.payload, t.to);
            }
        }
        if let Some(r) = p.result() {
            return Ok(r);
        }
        let Some(deadline) = p.poll_timeout() else {
            return Ok(p.result().unwrap_or_default());
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            p.handle_timeout(Instant::now());
            continue;
        }
        let fds: Vec<_> = sockets.iter().map(|s| s.as_fd()).collect();
        for i in natrix_net::wait_readable(&fds, wait)? {
            while let Ok((n, from)) = sockets[i].recv_from(&mut buf) {
                p.handle_input(i, from, &buf[..n], Instant::now());
            }
        }
        p.handle_timeout(Instant::now());
    }
}

/// Measures the mapping lifetime behind `local` (sockets idled 1, 2, 4… s,
/// up to `max`) and records it in `profile`; nothing when UDP got no
/// mapping.
pub fn add_mapping_lifetime(
    profile: &mut NatProfile,
    server: SocketAddr,
    local: std::net::IpAddr,
    max: Duration,
) -> std::io::Result<()> {
    if profile.mapped_address.is_none() {
        return Ok(());
    }
    let delays: Vec<Duration> = (0..16)
        .map(|k| Duration::from_secs(1 << k))
        .take_while(|d| *d <= max.max(Duration::from_secs(1)))
        .collect();
    let l = mapping_lifetime(server, local, &delays)?;
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    profile.mapping_lifetime = l.at_least.map(secs);
    profile.mapping_lifetime_below = l.below.map(secs);
    Ok(())
}

//! Sources that keep failing authentication are turned away before any
//! work: every 401 lookup's server answers (plans, relay list, signalling,
//! push sockets) takes one of its source's refusals (an IPv4 address, an
//! IPv6 /64); a source with none left gets 429 with `Retry-After` until it earns one back. The
//! table is [`natrix_model::limiter::UnauthLimiter`]'s, bounded
//! whatever the sources. Behind a load balancer or ingress, the source is
//! the client `X-Forwarded-For` names, but only when the TCP peer is a
//! configured trusted proxy (otherwise anyone could name anyone).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use natrix_model::IpNet;
use natrix_model::limiter::{UnauthLimiter, UnauthLimits};

/// The refused-authentication budget of lookup's sources.
#[derive(Debug)]
pub struct AuthGuard {
    limiter: Option<Mutex<UnauthLimiter>>,
    trusted: Vec<IpNet>,
    /// Seconds a throttled source is told to wait.
    retry_after: u64,
}

impl AuthGuard {
    /// `per_minute` refusals a minute per source prefix, as many at once
    /// (0: no limit); `trusted` proxies' `X-Forwarded-For` is believed.
    pub fn new(per_minute: u32, trusted: Vec<IpNet>) -> AuthGuard {
        let limiter = (per_minute > 0).then(|| {
            let limits = UnauthLimits {
                per_prefix_rate: f64::from(per_minute) / 60.0,
                per_prefix_burst: f64::from(per_minute),
                // No cap on all sources together: this counts failures,
                // it does not ration answers.
                total_rate: 1e12,
                total_burst: 1e12,
            };
            Mutex::new(UnauthLimiter::new(limits, Instant::now()).per_address())
        });
        AuthGuard {
            limiter,
            trusted,
            retry_after: u64::from(60 / per_minute.max(1)).max(1),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, UnauthLimiter>> {
        self.limiter
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The source of a request from `peer` with `forwarded`
    /// (`X-Forwarded-For`): the nearest untrusted hop.
    pub fn source(&self, peer: Option<SocketAddr>, forwarded: Option<&str>) -> Option<IpAddr> {
        let peer = peer?.ip().to_canonical();
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let hops = forwarded.unwrap_or("").split(',').rev();
        for hop in hops {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                // Garbage from beyond the proxies: the last hop we trust
                // spoke for it, so that hop is the source.
                return Some(peer);
            };
            let ip = ip.to_canonical();
            if !self.is_trusted(ip) {
                return Some(ip);
            }
        }
        Some(peer)
    }

    /// [`AuthGuard::source`] of a request from `peer` with `headers`.
    pub fn source_of(
        &self,
        peer: Option<SocketAddr>,
        headers: &actix_web::http::header::HeaderMap,
    ) -> Option<IpAddr> {
        let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        self.source(peer, forwarded)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// `Some(seconds to wait)` when `source` used its refusals up.
    pub fn throttled(&self, source: Option<IpAddr>) -> Option<u64> {
        let (source, limiter) = (source?, self.lock()?);
        (!limiter.has_room(source, Instant::now())).then_some(self.retry_after)
    }

    /// Counts a refused authentication of `source` (a full table forgets
    /// refilled prefixes by itself).
    pub fn refused(&self, source: Option<IpAddr>) {
        if let (Some(source), Some(mut limiter)) = (source, self.lock()) {
            limiter.allow(source, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_that_keeps_failing_is_throttled_and_others_are_not() {
        let g = AuthGuard::new(3, vec![]);
        let a = Some("198.51.100.7".parse().unwrap());
        let b = Some("198.51.100.8".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(g.throttled(a), None);
            g.refused(a);
        }
        assert_eq!(g.throttled(a), Some(20));
        assert_eq!(g.throttled(b), None);
        assert_eq!(AuthGuard::new(0, vec![]).throttled(a), None, "off");
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let g = AuthGuard::new(3, vec![net("10.0.0.0/8")]);
        let proxy: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            g.source(Some(proxy), Some("203.0.113.5, 10.9.9.9")),
            ip("203.0.113.5"),
            "the nearest untrusted hop"
        );
        assert_eq!(
            g.source(Some(stranger), Some("203.0.113.5")),
            ip("192.0.2.1"),
            "an untrusted peer names nobody"
        );
        assert_eq!(g.source(Some(proxy), None), ip("10.1.2.3"));
        assert_eq!(g.source(Some(proxy), Some("junk")), ip("10.1.2.3"));
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:1".parse().unwrap();
        assert_eq!(g.source(Some(mapped), None), ip("198.51.100.1"));
    }
}

//! Caps on answers to unauthenticated requests, so that a STUN or TURN
//! server (the relay core and CDX alike) cannot be used as an amplifier by
//! spoofed sources: a token bucket
//! per source prefix (/24 for IPv4, /48 for IPv6) and one for the whole
//! loop. Memory is bounded whatever the sources.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Rates of unauthenticated answers (401, 438, 400 before authentication).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnauthLimits {
    /// Answers per second to one source prefix.
    pub per_prefix_rate: f64,
    /// Burst allowed to one prefix.
    pub per_prefix_burst: f64,
    /// Answers per second in total (per loop).
    pub total_rate: f64,
    /// Burst allowed in total.
    pub total_burst: f64,
}

impl Default for UnauthLimits {
    fn default() -> UnauthLimits {
        UnauthLimits {
            per_prefix_rate: 50.0,
            per_prefix_burst: 100.0,
            total_rate: 20_000.0,
            total_burst: 20_000.0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    #[inline]
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most prefixes tracked; past it the table is cleared (a spoofing flood
/// then meets the total bucket alone), so memory stays bounded.
const MAX_PREFIXES: usize = 65_536;

/// The limiter state of one loop.
#[derive(Debug)]
pub struct UnauthLimiter {
    limits: UnauthLimits,
    total: Bucket,
    prefixes: HashMap<u64, Bucket, foldhash::fast::RandomState>,
}

#[inline]
fn prefix(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
        IpAddr::V6(v6) => (1 << 63) | (u128::from(v6) >> 80) as u64,
    }
}

impl UnauthLimiter {
    /// A limiter with full buckets at `now`.
    pub fn new(limits: UnauthLimits, now: Instant) -> UnauthLimiter {
        UnauthLimiter {
            limits,
            total: Bucket {
                tokens: limits.total_burst,
                updated: now,
            },
            prefixes: HashMap::default(),
        }
    }

    /// True when one more unauthenticated answer to `ip` is allowed now.
    /// (Per packet on CDX's path, called across crates: inlined there.)
    #[inline]
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let l = self.limits;
        if self.prefixes.len() >= MAX_PREFIXES {
            self.prefixes.clear();
        }
        let bucket = self.prefixes.entry(prefix(ip)).or_insert(Bucket {
            tokens: l.per_prefix_burst,
            updated: now,
        });
        if !bucket.take(now, l.per_prefix_rate, l.per_prefix_burst) {
            return false;
        }
        self.total.take(now, l.total_rate, l.total_burst)
    }

    /// Forgets prefixes whose buckets are full again (housekeeping).
    pub fn sweep(&mut self, now: Instant) {
        let l = self.limits;
        self.prefixes.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * l.per_prefix_rate < l.per_prefix_burst
        });
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a base instant for the tests
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_prefix_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let limits = UnauthLimits {
            per_prefix_rate: 10.0,
            per_prefix_burst: 5.0,
            total_rate: 1000.0,
            total_burst: 1000.0,
        };
        let mut l = UnauthLimiter::new(limits, t0);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let same_prefix: IpAddr = "198.51.100.200".parse().unwrap();
        let other: IpAddr = "203.0.113.1".parse().unwrap();
        let allowed = (0..20).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 5);
        assert!(!l.allow(same_prefix, t0), "a /24 shares one bucket");
        assert!(l.allow(other, t0));
        assert!(l.allow(a, t0 + Duration::from_millis(100)));
        l.sweep(t0 + Duration::from_secs(10));
        assert!(l.prefixes.is_empty());
    }

    #[test]
    fn the_total_bucket_caps_many_prefixes() {
        let t0 = Instant::now();
        let limits = UnauthLimits {
            per_prefix_rate: 10.0,
            per_prefix_burst: 5.0,
            total_rate: 1.0,
            total_burst: 3.0,
        };
        let mut l = UnauthLimiter::new(limits, t0);
        let allowed = (0..100u32)
            .filter(|i| l.allow(IpAddr::from((0x0A00_0000 + (i << 8)).to_be_bytes()), t0))
            .count();
        assert_eq!(allowed, 3);
    }
}

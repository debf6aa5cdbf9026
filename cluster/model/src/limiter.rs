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

/// Most prefixes tracked, so memory stays bounded. Past it, prefixes whose
/// buckets have refilled are forgotten (at most once a second), and
/// prefixes that still find no room share one overflow bucket worth
/// [`OVERFLOW_SHARE`] prefixes: a spoofing flood can neither grow the table
/// nor reset the buckets of the prefixes it is limiting.
const MAX_PREFIXES: usize = 65_536;
/// How many prefixes' rate and burst the overflow bucket holds.
const OVERFLOW_SHARE: f64 = 64.0;
/// Least time between two sweeps forced by a full table.
const FULL_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The limiter state of one loop.
#[derive(Debug)]
pub struct UnauthLimiter {
    limits: UnauthLimits,
    total: Bucket,
    prefixes: HashMap<u64, Bucket, foldhash::fast::RandomState>,
    /// Shared by prefixes that find the table full.
    overflow: Bucket,
    /// When a full table was last swept.
    full_sweep: Instant,
    /// Bits dropped from an IPv4 and an IPv6 address to make its key: /24
    /// and /48 where sources can be spoofed (UDP), /32 and /64 where they
    /// cannot (TCP).
    shifts: (u32, u32),
}

#[inline]
fn prefix(ip: IpAddr, (v4, v6): (u32, u32)) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(ip) => u64::from(u32::from(ip) >> v4),
        IpAddr::V6(ip) => (1 << 63) | ((u128::from(ip) >> v6) as u64 & !(1 << 63)),
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
            overflow: Bucket {
                tokens: limits.per_prefix_burst * OVERFLOW_SHARE,
                updated: now,
            },
            full_sweep: now,
            shifts: (8, 80),
        }
    }

    /// Keys sources by address (IPv4) and /64 (IPv6) instead of /24 and
    /// /48: for connections, whose source addresses are not spoofed.
    pub fn per_address(mut self) -> UnauthLimiter {
        self.shifts = (0, 64);
        self
    }

    /// True when one more unauthenticated answer to `ip` is allowed now.
    /// (Per packet on CDX's path, called across crates: inlined there.)
    #[inline]
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let l = self.limits;
        let key = prefix(ip, self.shifts);
        let allowed = match self.prefixes.get_mut(&key) {
            Some(bucket) => bucket.take(now, l.per_prefix_rate, l.per_prefix_burst),
            None => self.take_new(key, now),
        };
        allowed && self.total.take(now, l.total_rate, l.total_burst)
    }

    /// True when `ip`'s prefix has an answer left now, without taking it
    /// (a source that used its refusals up is turned away before any work).
    pub fn has_room(&self, ip: IpAddr, now: Instant) -> bool {
        let l = self.limits;
        let left = |b: &Bucket, rate: f64, burst: f64| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            (b.tokens + elapsed * rate).min(burst) >= 1.0
        };
        match self.prefixes.get(&prefix(ip, self.shifts)) {
            Some(b) => left(b, l.per_prefix_rate, l.per_prefix_burst),
            None if self.prefixes.len() < MAX_PREFIXES => true,
            None => left(
                &self.overflow,
                l.per_prefix_rate * OVERFLOW_SHARE,
                l.per_prefix_burst * OVERFLOW_SHARE,
            ),
        }
    }

    /// A prefix not in the table: a fresh bucket, or the overflow bucket
    /// when the table is full.
    #[cold]
    fn take_new(&mut self, key: u64, now: Instant) -> bool {
        let l = self.limits;
        if self.prefixes.len() >= MAX_PREFIXES
            && now.saturating_duration_since(self.full_sweep) >= FULL_SWEEP_EVERY
        {
            self.full_sweep = now;
            self.sweep(now);
        }
        if self.prefixes.len() >= MAX_PREFIXES {
            return self.overflow.take(
                now,
                l.per_prefix_rate * OVERFLOW_SHARE,
                l.per_prefix_burst * OVERFLOW_SHARE,
            );
        }
        let mut bucket = Bucket {
            tokens: l.per_prefix_burst,
            updated: now,
        };
        let allowed = bucket.take(now, l.per_prefix_rate, l.per_prefix_burst);
        self.prefixes.insert(key, bucket);
        allowed
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
        assert!(!l.has_room(a, t0), "used up");
        assert!(l.has_room(other, t0), "another prefix is not");
        assert!(l.has_room(a, t0 + Duration::from_millis(100)), "refilled");
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

    #[test]
    fn a_spoofed_flood_of_prefixes_neither_grows_the_table_nor_resets_a_limited_prefix() {
        let t0 = Instant::now();
        let limits = UnauthLimits {
            per_prefix_rate: 1.0,
            per_prefix_burst: 2.0,
            total_rate: 1e9,
            total_burst: 1e9,
        };
        let mut l = UnauthLimiter::new(limits, t0);
        let victim: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!((0..10).filter(|_| l.allow(victim, t0)).count(), 2);
        // One answer each to 100 000 spoofed /24s within the same instant.
        let flood = (0..100_000u32)
            .filter(|i| l.allow(IpAddr::from((0x0B00_0000 + (i << 8)).to_be_bytes()), t0))
            .count();
        assert!(l.prefixes.len() <= MAX_PREFIXES);
        let room = MAX_PREFIXES - 1;
        let overflow = (limits.per_prefix_burst * OVERFLOW_SHARE) as usize;
        assert_eq!(
            flood,
            room + overflow,
            "past the table, the overflow bucket"
        );
        assert!(
            !l.allow(victim, t0),
            "the limited prefix kept its empty bucket"
        );
        // A second later the refilled buckets are forgotten and new prefixes
        // get buckets of their own again.
        let t1 = t0 + std::time::Duration::from_secs(3);
        assert!(l.allow("203.0.113.9".parse().unwrap(), t1));
        assert!(l.prefixes.len() < MAX_PREFIXES);
    }
}

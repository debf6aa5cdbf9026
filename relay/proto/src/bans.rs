//! Temporary bans of sources that keep failing authentication (what
//! fail2ban does for coturn, built in).
//!
//! A source is an IPv4 address or an IPv6 /64 (one subscriber's prefix: an
//! attacker has a whole /64 to rotate through). `after` failures within
//! `window` ban it for `duration`: its requests are dropped unanswered
//! (counted as `banned`), except on a 5-tuple that already holds an
//! allocation (a client that authenticated before keeps its session). Both
//! tables are capped: a source past the cap is not tracked (and so never
//! banned) until expired entries make room — memory stays bounded under a
//! flood from many addresses, which the unauthenticated-answer limits cover.
//!
//! One table per host, shared by its loops (a source's retries reach any
//! loop). Locked once per authentication failure, and per request only
//! while a ban is in force.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use natrix_model::IpNet;

/// When a source is banned, for how long, and how many sources are tracked.
#[derive(Clone, Debug, PartialEq)]
pub struct BanPolicy {
    /// Failures within `window` that ban a source; 0 turns bans off.
    pub after: u32,
    /// How far back failures count.
    pub window: Duration,
    /// How long a ban lasts.
    pub duration: Duration,
    /// Most sources tracked (failing or banned) at once.
    pub max_sources: usize,
    /// Sources never banned (monitoring, a load balancer's address).
    pub exempt: Vec<IpNet>,
}

impl Default for BanPolicy {
    fn default() -> BanPolicy {
        BanPolicy {
            after: 10,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
            max_sources: 65_536,
            exempt: Vec::new(),
        }
    }
}

/// What a failure did to its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strike {
    /// Counted (this many failures in the window so far).
    Counted(u32),
    /// This failure banned the source.
    Banned,
    /// Not tracked: bans off, an exempt source, or the table full.
    Untracked,
}

/// A source's failures in its current window, or its ban.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Failing { count: u32, since: Instant },
    Banned { until: Instant },
}

#[derive(Debug)]
struct Table {
    policy: BanPolicy,
    sources: HashMap<IpAddr, Entry, foldhash::fast::RandomState>,
    /// Bans made so far (a counter for metrics).
    bans: u64,
    /// When the table was last swept for expired entries.
    swept: Option<Instant>,
}

/// The host's ban table, shared by its loops.
#[derive(Clone, Debug)]
pub struct SharedBans {
    table: Arc<Mutex<Table>>,
    /// Bans in force (an upper bound between sweeps): zero means no
    /// request needs the lock.
    active: Arc<AtomicUsize>,
}

/// The key of `ip`: itself for IPv4, its /64 for IPv6 (IPv4-mapped IPv6
/// addresses count as their IPv4 address).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

impl SharedBans {
    /// An empty table under `policy`.
    pub fn new(policy: BanPolicy) -> SharedBans {
        SharedBans {
            table: Arc::new(Mutex::new(Table {
                policy,
                sources: HashMap::default(),
                bans: 0,
                swept: None,
            })),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A loop that panicked mid-update leaves at worst one count off.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while `ip`'s source is banned.
    pub fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        if self.active.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let key = source_key(ip);
        matches!(self.lock().sources.get(&key), Some(Entry::Banned { until }) if now < *until)
    }

    /// Counts an authentication failure of `ip` at `now`.
    pub fn strike(&self, ip: IpAddr, now: Instant) -> Strike {
        let mut t = self.lock();
        let policy = &t.policy;
        if policy.after == 0 || policy.exempt.iter().any(|n| n.contains(ip)) {
            return Strike::Untracked;
        }
        let (after, window, duration, cap) = (
            policy.after,
            policy.window,
            policy.duration,
            policy.max_sources,
        );
        let key = source_key(ip);
        if !t.sources.contains_key(&key) && t.sources.len() >= cap {
            self.sweep(&mut t, now);
            if t.sources.len() >= cap {
                return Strike::Untracked;
            }
        }
        let entry = t.sources.entry(key).or_insert(Entry::Failing {
            count: 0,
            since: now,
        });
        let count = match *entry {
            Entry::Banned { until } if now < until => return Strike::Untracked,
            Entry::Failing { count, since } if now.duration_since(since) < window => count + 1,
            // A new window (or a ban that ended).
            _ => 1,
        };
        let since = match *entry {
            Entry::Failing { since, .. } if count > 1 => since,
            _ => now,
        };
        if count >= after {
            *entry = Entry::Banned {
                until: now + duration,
            };
            t.bans += 1;
            self.active.fetch_add(1, Ordering::Relaxed);
            return Strike::Banned;
        }
        *entry = Entry::Failing { count, since };
        Strike::Counted(count)
    }

    /// Drops entries whose window or ban is over (at most once a second).
    fn sweep(&self, t: &mut Table, now: Instant) {
        if t.swept
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        t.swept = Some(now);
        let window = t.policy.window;
        t.sources.retain(|_, e| match *e {
            Entry::Failing { since, .. } => now.duration_since(since) < window,
            Entry::Banned { until } => now < until,
        });
        let banned = t
            .sources
            .values()
            .filter(|e| matches!(e, Entry::Banned { .. }))
            .count();
        self.active.store(banned, Ordering::Relaxed);
    }

    /// Sweeps expired entries; returns the sources banned now and the bans
    /// made so far (for the metrics, from the shell's tick).
    pub fn tick(&self, now: Instant) -> (usize, u64) {
        let mut t = self.lock();
        self.sweep(&mut t, now);
        (self.active.load(Ordering::Relaxed), t.bans)
    }

    /// Sources tracked (failing or banned).
    pub fn tracked(&self) -> usize {
        self.lock().sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A starting instant; every later one is an offset from it.
    #[allow(clippy::disallowed_methods)] // tests pick their own clock
    fn start() -> Instant {
        Instant::now()
    }

    fn policy(after: u32) -> BanPolicy {
        BanPolicy {
            after,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
            max_sources: 4,
            exempt: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn a_source_is_banned_after_repeated_failures_until_the_ban_ends() {
        let bans = SharedBans::new(policy(3));
        let t0 = start();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(bans.strike(ip, t0), Strike::Counted(1));
        assert_eq!(bans.strike(ip, t0), Strike::Counted(2));
        assert!(!bans.is_banned(ip, t0));
        assert_eq!(bans.strike(ip, t0), Strike::Banned);
        assert!(bans.is_banned(ip, t0 + Duration::from_secs(299)));
        assert!(!bans.is_banned("198.51.100.8".parse().unwrap(), t0));
        assert!(!bans.is_banned(ip, t0 + Duration::from_secs(300)));
        assert_eq!(bans.tick(t0 + Duration::from_secs(301)), (0, 1));
        assert_eq!(bans.tracked(), 0);
    }

    #[test]
    fn failures_outside_the_window_start_over() {
        let bans = SharedBans::new(policy(2));
        let t0 = start();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(bans.strike(ip, t0), Strike::Counted(1));
        assert_eq!(
            bans.strike(ip, t0 + Duration::from_secs(61)),
            Strike::Counted(1)
        );
        assert_eq!(
            bans.strike(ip, t0 + Duration::from_secs(62)),
            Strike::Banned
        );
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64_and_exempt_sources_are_never_banned() {
        let bans = SharedBans::new(policy(2));
        let t0 = start();
        bans.strike("2001:db8:1:2::1".parse().unwrap(), t0);
        bans.strike("2001:db8:1:2:ffff::9".parse().unwrap(), t0);
        assert!(bans.is_banned("2001:db8:1:2::77".parse().unwrap(), t0));
        assert!(!bans.is_banned("2001:db8:1:3::1".parse().unwrap(), t0));
        let exempt: IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(bans.strike(exempt, t0), Strike::Untracked);
        }
        assert!(!bans.is_banned(exempt, t0));
        assert!(
            !SharedBans::new(policy(0))
                .strike(exempt, t0)
                .eq(&Strike::Banned)
        );
    }

    #[test]
    fn the_table_is_capped_and_makes_room_as_entries_expire() {
        let bans = SharedBans::new(policy(2));
        let t0 = start();
        for i in 0..4u8 {
            bans.strike(IpAddr::from([198, 51, 100, i]), t0);
        }
        let late: IpAddr = "198.51.100.200".parse().unwrap();
        assert_eq!(bans.strike(late, t0), Strike::Untracked);
        assert_eq!(bans.tracked(), 4);
        // The others' windows are over: room again.
        assert_eq!(
            bans.strike(late, t0 + Duration::from_secs(61)),
            Strike::Counted(1)
        );
        assert_eq!(bans.tracked(), 1);
    }
}

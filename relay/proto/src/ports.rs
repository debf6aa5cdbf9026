//! Relay ports: a range, split between data-plane loops, handed out at
//! random (RFC 8656 §7.2 recommends unpredictable relayed ports).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// An inclusive port range, `min-max` (default 49152-65535, RFC 8656 §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port.
    pub min: u16,
    /// Highest port.
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> PortRange {
        PortRange {
            min: 49152,
            max: 65535,
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}`: expected MIN-MAX, e.g. 49152-65535"))?;
        let min: u16 = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not a port"))?;
        let max: u16 = b
            .trim()
            .parse()
            .map_err(|_| format!("`{b}` is not a port"))?;
        if min == 0 || min > max {
            return Err(format!("`{s}`: need 0 < MIN <= MAX"));
        }
        Ok(PortRange { min, max })
    }
}

/// Sentinel for "not in the free list".
const TAKEN: u32 = u32::MAX;

/// The free ports of one loop: O(1) random take, put and take-this-port.
#[derive(Clone, Debug)]
pub(crate) struct PortPool {
    free: Vec<u16>,
    /// Index in `free` of each port of the range, or `TAKEN`.
    position: Vec<u32>,
    min: u16,
}

impl PortPool {
    /// Every port of `range`, free.
    pub(crate) fn new(range: PortRange) -> PortPool {
        let free: Vec<u16> = (range.min..=range.max).collect();
        let position = (0..free.len() as u32).collect();
        PortPool {
            free,
            position,
            min: range.min,
        }
    }

    /// Free ports left.
    pub(crate) fn available(&self) -> usize {
        self.free.len()
    }

    fn slot(&self, port: u16) -> Option<usize> {
        port.checked_sub(self.min)
            .map(usize::from)
            .filter(|i| *i < self.position.len())
    }

    /// True when `port` is free.
    pub(crate) fn is_free(&self, port: u16) -> bool {
        self.slot(port).is_some_and(|i| self.position[i] != TAKEN)
    }

    /// Takes `port` if it is free.
    pub(crate) fn take(&mut self, port: u16) -> bool {
        let Some(i) = self.slot(port) else {
            return false;
        };
        let at = self.position[i];
        if at == TAKEN {
            return false;
        }
        let at = at as usize;
        self.free.swap_remove(at);
        if let Some(&moved) = self.free.get(at) {
            let j = usize::from(moved - self.min);
            self.position[j] = at as u32;
        }
        self.position[i] = TAKEN;
        true
    }

    /// Takes a random free port (`random` is any random number).
    pub(crate) fn take_random(&mut self, random: u64) -> Option<u16> {
        if self.free.is_empty() {
            return None;
        }
        let port = self.free[(random % self.free.len() as u64) as usize];
        self.take(port);
        Some(port)
    }

    /// Takes a random even port; with `with_next`, the next-higher port is
    /// taken too (EVEN-PORT with the R bit, RFC 8656 §7.2).
    pub(crate) fn take_even(&mut self, random: u64, with_next: bool) -> Option<u16> {
        let n = self.free.len();
        if n == 0 {
            return None;
        }
        let start = (random % n as u64) as usize;
        let found = (0..n).map(|k| self.free[(start + k) % n]).find(|&p| {
            p % 2 == 0 && (!with_next || p.checked_add(1).is_some_and(|q| self.is_free(q)))
        })?;
        self.take(found);
        if with_next {
            self.take(found + 1);
        }
        Some(found)
    }

    /// Returns a port to the pool (ignored when outside it or already free).
    pub(crate) fn put(&mut self, port: u16) {
        let Some(i) = self.slot(port) else { return };
        if self.position[i] != TAKEN {
            return;
        }
        self.position[i] = self.free.len() as u32;
        self.free.push(port);
    }
}

/// A port held for the holder of a RESERVATION-TOKEN (RFC 8656 §7.2).
#[derive(Clone, Copy, Debug)]
struct Reservation {
    port: u16,
    family_v6: bool,
    expires: Instant,
}

#[derive(Debug)]
struct PortState {
    pool: PortPool,
    reservations: HashMap<[u8; 8], Reservation, foldhash::fast::RandomState>,
    /// Live allocations per holder (username, source IP, session,
    /// tenant), host-wide (for the quotas).
    holders: HashMap<Holder, usize, foldhash::fast::RandomState>,
    /// Live allocations, host-wide (for the capacity limit).
    allocations: usize,
}

/// The host's allocation counts as an operator sees them (the admin API).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuotaUse {
    /// Live allocations on the host.
    pub allocations: usize,
    /// Relay ports free.
    pub free_ports: usize,
    /// The holders with the most allocations: kind (`user`, `source`,
    /// `session`, `tenant`), who, how many; most first.
    pub top: Vec<(&'static str, String, usize)>,
}

/// Who an allocation is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Holder {
    User(Box<str>),
    Source(IpAddr),
    Session(Box<str>),
    Tenant(Box<str>),
}

/// Who asks for an allocation, and the caps that apply to each of them
/// (`usize::MAX` for none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Claim<'a> {
    /// The TURN username, and its quota.
    pub(crate) user: (&'a str, usize),
    /// The client's IP, and its quota.
    pub(crate) source: (IpAddr, usize),
    /// The session of a session token, and its quota.
    pub(crate) session: Option<(&'a str, usize)>,
    /// The tenant a session token names, and its quota.
    pub(crate) tenant: Option<(&'a str, usize)>,
    /// The host's capacity.
    pub(crate) capacity: usize,
}

impl Claim<'_> {
    fn holders(&self) -> impl Iterator<Item = (Holder, usize, Refusal)> + '_ {
        [
            Some((
                Holder::User(self.user.0.into()),
                self.user.1,
                Refusal::UserQuota,
            )),
            Some((
                Holder::Source(self.source.0),
                self.source.1,
                Refusal::SourceQuota,
            )),
            self.session
                .map(|(s, q)| (Holder::Session(s.into()), q, Refusal::SessionQuota)),
            self.tenant
                .map(|(t, q)| (Holder::Tenant(t.into()), q, Refusal::TenantQuota)),
        ]
        .into_iter()
        .flatten()
    }
}

use super::refusal::Refusal;
use std::net::IpAddr;

/// The relay ports of a host, their reservations and the host-wide
/// allocation counts (user quota, capacity), shared by its loops. Locked
/// only when an allocation starts or ends, never per packet; a client's
/// retry may reach another loop (flow hash), and its RESERVATION-TOKEN and
/// its quota must hold there too.
#[derive(Clone, Debug)]
pub struct SharedPorts(Arc<Mutex<PortState>>);

impl SharedPorts {
    /// Every port of `range`, free.
    pub fn new(range: PortRange) -> SharedPorts {
        SharedPorts(Arc::new(Mutex::new(PortState {
            pool: PortPool::new(range),
            reservations: HashMap::default(),
            holders: HashMap::default(),
            allocations: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, PortState> {
        // A loop that panicked mid-update leaves port bookkeeping at worst
        // one port off; serving on is better than failing every allocation.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host's counts: allocations, free ports, and the `top` holders
    /// by allocations.
    pub fn quota_use(&self, top: usize) -> QuotaUse {
        let state = self.lock();
        let mut holders: Vec<(&'static str, String, usize)> = state
            .holders
            .iter()
            .map(|(h, n)| match h {
                Holder::User(u) => ("user", u.to_string(), *n),
                Holder::Source(ip) => ("source", ip.to_string(), *n),
                Holder::Session(s) => ("session", s.to_string(), *n),
                Holder::Tenant(t) => ("tenant", t.to_string(), *n),
            })
            .collect();
        holders.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.1.cmp(&b.1)));
        holders.truncate(top);
        QuotaUse {
            allocations: state.allocations,
            free_ports: state.pool.available(),
            top: holders,
        }
    }

    /// True when the host holds `capacity` allocations or more.
    pub(crate) fn at_capacity(&self, capacity: usize) -> bool {
        self.lock().allocations >= capacity
    }

    /// Free ports left.
    pub fn available(&self) -> usize {
        self.lock().pool.available()
    }

    /// Takes a random free port.
    pub(crate) fn take_random(&self, random: u64) -> Option<u16> {
        self.lock().pool.take_random(random)
    }

    /// Takes a random even port; with `reservation`, also the next port,
    /// held for the token until `expires`.
    pub(crate) fn take_even(
        &self,
        random: u64,
        reservation: Option<([u8; 8], bool, Instant)>,
    ) -> Option<u16> {
        let mut state = self.lock();
        let port = state.pool.take_even(random, reservation.is_some())?;
        if let Some((token, family_v6, expires)) = reservation {
            state.reservations.insert(
                token,
                Reservation {
                    port: port + 1,
                    family_v6,
                    expires,
                },
            );
        }
        Some(port)
    }

    /// Redeems a RESERVATION-TOKEN: the held port and whether it is IPv6.
    pub(crate) fn redeem(&self, token: &[u8; 8], now: Instant) -> Option<(u16, bool)> {
        let mut state = self.lock();
        let r = state.reservations.remove(token)?;
        if r.expires <= now {
            state.pool.put(r.port);
            return None;
        }
        Some((r.port, r.family_v6))
    }

    /// Returns a port.
    pub(crate) fn put(&self, port: u16) {
        self.lock().pool.put(port);
    }

    /// Would one more allocation for `claim` fit? (A quick check; the
    /// count is taken by [`SharedPorts::count`].)
    pub(crate) fn admissible(&self, claim: &Claim<'_>) -> Result<(), Refusal> {
        Self::check(&self.lock(), claim)
    }

    fn check(state: &PortState, claim: &Claim<'_>) -> Result<(), Refusal> {
        for (holder, quota, refusal) in claim.holders() {
            if state.holders.get(&holder).is_some_and(|n| *n >= quota) {
                return Err(refusal);
            }
        }
        if state.allocations >= claim.capacity {
            return Err(Refusal::HostCapacity);
        }
        Ok(())
    }

    /// Counts a new allocation for `claim`, atomically with the checks.
    pub(crate) fn count(&self, claim: &Claim<'_>) -> Result<(), Refusal> {
        let mut state = self.lock();
        Self::check(&state, claim)?;
        for (holder, _, _) in claim.holders() {
            *state.holders.entry(holder).or_insert(0) += 1;
        }
        state.allocations += 1;
        Ok(())
    }

    /// Takes `port` alone (the IPv6 half of a dual-stack allocation that
    /// moved here); false when it is outside the range or taken.
    pub(crate) fn take_exact(&self, port: u16) -> bool {
        self.lock().pool.take(port)
    }

    /// Takes `port` and counts `claim` for an allocation that moved here
    /// from another process (its quotas held there: no checks). False when
    /// the port is outside the range or already taken.
    pub(crate) fn adopt(&self, port: u16, claim: &Claim<'_>) -> bool {
        let mut state = self.lock();
        if !state.pool.take(port) {
            return false;
        }
        for (holder, _, _) in claim.holders() {
            *state.holders.entry(holder).or_insert(0) += 1;
        }
        state.allocations += 1;
        true
    }

    /// Counts `claim` for an allocation on a shared relayed socket that
    /// moved here from another process (no port of its own, no checks).
    pub(crate) fn adopt_shared(&self, claim: &Claim<'_>) {
        let mut state = self.lock();
        for (holder, _, _) in claim.holders() {
            *state.holders.entry(holder).or_insert(0) += 1;
        }
        state.allocations += 1;
    }

    /// Counts a live allocation against source `to` instead of `from` (its
    /// client moved, RFC 8016), atomically with `to`'s quota.
    pub(crate) fn move_source(
        &self,
        from: IpAddr,
        to: IpAddr,
        quota: usize,
    ) -> Result<(), Refusal> {
        if from == to {
            return Ok(());
        }
        let mut state = self.lock();
        if state
            .holders
            .get(&Holder::Source(to))
            .is_some_and(|n| *n >= quota)
        {
            return Err(Refusal::SourceQuota);
        }
        *state.holders.entry(Holder::Source(to)).or_insert(0) += 1;
        if let Some(n) = state.holders.get_mut(&Holder::Source(from)) {
            *n -= 1;
            if *n == 0 {
                state.holders.remove(&Holder::Source(from));
            }
        }
        Ok(())
    }

    /// Uncounts an ended allocation of `claim` (its quotas do not matter).
    pub(crate) fn uncount(&self, claim: &Claim<'_>) {
        let mut state = self.lock();
        for (holder, _, _) in claim.holders() {
            if let Some(n) = state.holders.get_mut(&holder) {
                *n -= 1;
                if *n == 0 {
                    state.holders.remove(&holder);
                }
            }
        }
        state.allocations = state.allocations.saturating_sub(1);
    }

    /// Ports held by EVEN-PORT reservations.
    pub fn reserved(&self) -> usize {
        self.lock().reservations.len()
    }

    /// Releases reservations nobody redeemed in time.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut state = self.lock();
        let mut expired = Vec::new();
        state.reservations.retain(|_, r| {
            let keep = r.expires > now;
            if !keep {
                expired.push(r.port);
            }
            keep
        });
        for port in expired {
            state.pool.put(port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_each_port_once_and_takes_it_back() {
        let mut p = PortPool::new(PortRange {
            min: 50000,
            max: 50009,
        });
        let mut seen = std::collections::HashSet::new();
        for r in 0..10u64 {
            let port = p
                .take_random(r.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .unwrap();
            assert!((50000..=50009).contains(&port));
            assert!(seen.insert(port), "port {port} handed out twice");
        }
        assert_eq!(p.take_random(1), None);
        p.put(50004);
        p.put(50004);
        assert_eq!(p.available(), 1);
        assert_eq!(p.take_random(7), Some(50004));
    }

    #[test]
    fn even_port_with_reservation_takes_a_pair() {
        let mut p = PortPool::new(PortRange {
            min: 50000,
            max: 50003,
        });
        assert!(p.take(50000));
        let port = p.take_even(0, true).unwrap();
        assert_eq!(port, 50002);
        assert!(!p.is_free(50003));
        assert_eq!(p.take_even(0, false), None);
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(
            "49152-65535".parse::<PortRange>().unwrap(),
            PortRange::default()
        );
        assert!("5-1".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().is_err());
    }
}

//! Relay ports: a range, split between data-plane loops, handed out at
//! random (RFC 8656 §7.2 recommends unpredictable relayed ports).

use std::fmt;
use std::str::FromStr;

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
    /// The ports of `range` that belong to loop `shard` of `shards`
    /// (`port % shards == shard`).
    pub(crate) fn new(range: PortRange, shard: usize, shards: usize) -> PortPool {
        let shards = shards.max(1);
        let mut position = vec![TAKEN; usize::from(range.max - range.min) + 1];
        let mut free = Vec::new();
        for port in range.min..=range.max {
            if usize::from(port) % shards == shard % shards {
                position[usize::from(port - range.min)] = free.len() as u32;
                free.push(port);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_each_port_once_and_takes_it_back() {
        let mut p = PortPool::new(
            PortRange {
                min: 50000,
                max: 50009,
            },
            0,
            1,
        );
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
    fn shards_split_the_range() {
        let range = PortRange {
            min: 50000,
            max: 50099,
        };
        let a = PortPool::new(range, 0, 2);
        let b = PortPool::new(range, 1, 2);
        assert_eq!(a.available() + b.available(), 100);
        assert!(a.is_free(50000) && !a.is_free(50001));
        assert!(b.is_free(50001) && !b.is_free(50000));
    }

    #[test]
    fn even_port_with_reservation_takes_a_pair() {
        let mut p = PortPool::new(
            PortRange {
                min: 50000,
                max: 50003,
            },
            0,
            1,
        );
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

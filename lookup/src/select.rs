//! Relay selection from the registry snapshot: healthy, not draining,
//! headroom left, able to serve the client's transport, closest region,
//! then the less loaded of two random candidates (power of two choices).

use natrix_registry::{HostRecord, State};

/// What a side needs from its relay.
#[derive(Clone, Copy, Debug)]
pub struct Need<'a> {
    /// The client can use UDP (else it needs TCP or TLS).
    pub udp: bool,
    /// The client's region hint.
    pub region: Option<&'a str>,
}

/// Picks a relay for `need` among `relays` (live records), or `None` when
/// none qualifies. `headroom` is the utilisation above which a relay gets
/// no new sessions (e.g. 0.9). `random(n)` returns a number below `n`.
pub fn select<'r>(
    relays: &'r [HostRecord],
    need: Need<'_>,
    headroom: f64,
    random: &mut dyn FnMut(usize) -> usize,
) -> Option<&'r HostRecord> {
    let usable = |r: &&HostRecord| {
        r.state == State::Active
            && r.utilisation() < headroom
            && if need.udp {
                !r.udp.is_empty()
            } else {
                !(r.tcp.is_empty() && r.tls.is_empty())
            }
    };
    let mut candidates: Vec<&HostRecord> = relays.iter().filter(usable).collect();
    if let Some(region) = need.region.filter(|r| !r.is_empty())
        && candidates.iter().any(|r| r.region == region)
    {
        candidates.retain(|r| r.region == region);
    }
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let i = random(n);
            let mut j = random(n - 1);
            if j >= i {
                j += 1;
            }
            let (x, y) = (candidates[i], candidates[j]);
            let key = |r: &HostRecord| (r.utilisation(), r.load.packets_per_second);
            Some(if key(y) < key(x) { y } else { x })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natrix_registry::{Load, Role};

    fn relay(id: &str, region: &str, allocations: u64, state: State) -> HostRecord {
        HostRecord {
            id: id.into(),
            role: Role::Relay,
            region: region.into(),
            zone: String::new(),
            udp: vec!["192.0.2.1:3478".parse().unwrap()],
            tcp: if id.ends_with("tcp") {
                vec!["192.0.2.1:3478".parse().unwrap()]
            } else {
                vec![]
            },
            tls: vec![],
            dtls: vec![],
            capacity: 100,
            load: Load {
                allocations,
                ..Load::default()
            },
            state,
            heartbeat_ms: 0,
            ttl_ms: 0,
            internal: Vec::new(),
        }
    }

    fn pick(relays: &[HostRecord], need: Need<'_>, seed: &mut u64) -> Option<String> {
        let mut random = |n: usize| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 33) as usize) % n
        };
        select(relays, need, 0.9, &mut random).map(|r| r.id.clone())
    }

    #[test]
    fn draining_full_and_wrong_transport_relays_are_never_picked() {
        let relays = vec![
            relay("draining", "", 0, State::Draining),
            relay("full", "", 95, State::Active),
            relay("ok", "", 50, State::Active),
        ];
        let mut seed = 1;
        for _ in 0..100 {
            assert_eq!(
                pick(
                    &relays,
                    Need {
                        udp: true,
                        region: None
                    },
                    &mut seed
                )
                .as_deref(),
                Some("ok")
            );
        }
        assert_eq!(
            pick(
                &relays,
                Need {
                    udp: false,
                    region: None
                },
                &mut seed
            ),
            None
        );
        let with_tcp = vec![
            relay("ok", "", 0, State::Active),
            relay("has-tcp", "", 80, State::Active),
        ];
        assert_eq!(
            pick(
                &with_tcp,
                Need {
                    udp: false,
                    region: None
                },
                &mut seed
            )
            .as_deref(),
            Some("has-tcp")
        );
    }

    #[test]
    fn the_clients_region_wins_then_the_lighter_of_two() {
        let relays = vec![
            relay("eu-1", "eu", 80, State::Active),
            relay("us-1", "us", 0, State::Active),
            relay("us-2", "us", 10, State::Active),
        ];
        let mut seed = 7;
        for _ in 0..50 {
            assert_eq!(
                pick(
                    &relays,
                    Need {
                        udp: true,
                        region: Some("eu")
                    },
                    &mut seed
                )
                .as_deref(),
                Some("eu-1")
            );
        }
        // Unknown region: any relay, and with two choices the loaded eu-1
        // loses every comparison it is part of.
        let mut counts = std::collections::HashMap::new();
        for _ in 0..3000 {
            let id = pick(
                &relays,
                Need {
                    udp: true,
                    region: Some("ap"),
                },
                &mut seed,
            )
            .unwrap();
            *counts.entry(id).or_insert(0) += 1;
        }
        assert_eq!(counts.get("eu-1"), None, "{counts:?}");
        assert!(counts["us-1"] > counts["us-2"], "{counts:?}");
    }
}

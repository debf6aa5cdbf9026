//! The direct-or-relay decision from both peers' NAT behaviours
//! (ARCHITECTURE.md, "NAT model and the compatibility matrix").
//!
//! Whether a direct path is feasible, and how each side opens it, is the
//! model's one rule ([`natrix_model::nat::punch_plans`]: the classic rule,
//! then birthday punching and port prediction); this module adds what the
//! plan does when no technique can: relay the harder side only where the
//! other can send UDP, both sides otherwise. A `retry` (a failed direct
//! attempt) always relays.

use natrix_model::nat::{Behaviour, PunchPlan, punch_plans};
use serde::{Deserialize, Serialize};

/// One side of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The first peer.
    A,
    /// The second peer.
    B,
}

/// How the two peers connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Hole-punch after exchanging candidates through CDX, each side as its
    /// punch plan says.
    Direct([PunchPlan; 2]),
    /// Only this side allocates a relay; the other sends straight to the
    /// relayed address (TURN permissions are per IP, so the other side's
    /// mapping behaviour does not matter).
    RelayOne(Side),
    /// Both sides allocate (possibly on different relays).
    RelayBoth,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::A => "a",
            Side::B => "b",
        })
    }
}

impl Mode {
    /// The mode's name in the API and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct(_) => "direct",
            Mode::RelayOne(_) => "relay-one",
            Mode::RelayBoth => "relay-both",
        }
    }

    /// `side`'s punch plan, in a direct plan.
    pub fn punch(self, side: Side) -> Option<PunchPlan> {
        match (self, side) {
            (Mode::Direct([a, _]), Side::A) => Some(a),
            (Mode::Direct([_, b]), Side::B) => Some(b),
            _ => None,
        }
    }

    /// Whether `side` allocates a relay.
    pub fn relays(self, side: Side) -> bool {
        match self {
            Mode::Direct(_) => false,
            Mode::RelayOne(s) => s == side,
            Mode::RelayBoth => true,
        }
    }
}

/// The plan mode for `a` and `b`; `retry` (a direct attempt failed) always
/// relays.
pub fn decide(a: &Behaviour, b: &Behaviour, retry: bool) -> Mode {
    if !retry && let Some(plans) = punch_plans(a, b) {
        return Mode::Direct(plans);
    }
    // The non-relayed side must send UDP to the relayed address.
    if a.udp_blocked && b.udp_blocked {
        return Mode::RelayBoth;
    }
    if b.restrictiveness() > a.restrictiveness() {
        Mode::RelayOne(Side::B)
    } else {
        Mode::RelayOne(Side::A)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natrix_model::NatClass as Class;

    /// The matrix as ARCHITECTURE.md derives it, written out by hand: `D`
    /// direct, `a`/`b` relay-one on that side, `R` relay-both. Rows are A,
    /// columns B, both in [`Class::ALL`] order.
    const EXPECTED: [&str; 6] = [
        // open full restr p-restr symm udp-blocked
        "D D D D D b",
        "D D D D D b",
        "D D D D D b",
        "D D D D D b",
        "D D D D a b",
        "a a a a a R",
    ];

    fn cell(m: Mode) -> &'static str {
        match m {
            Mode::Direct(_) => "D",
            Mode::RelayOne(Side::A) => "a",
            Mode::RelayOne(Side::B) => "b",
            Mode::RelayBoth => "R",
        }
    }

    #[test]
    fn every_pair_of_classes_gets_the_mode_the_behaviours_derive() {
        for (i, a) in Class::ALL.iter().enumerate() {
            let row: Vec<&str> = Class::ALL
                .iter()
                .map(|b| cell(decide(&a.behaviour(), &b.behaviour(), false)))
                .collect();
            assert_eq!(row.join(" "), EXPECTED[i], "row {a:?}");
        }
    }

    #[test]
    fn a_retry_always_relays() {
        for a in Class::ALL {
            for b in Class::ALL {
                let m = decide(&a.behaviour(), &b.behaviour(), true);
                assert!(!matches!(m, Mode::Direct(_)), "{a:?}/{b:?}");
                assert!(m.relays(Side::A) || m.relays(Side::B));
            }
        }
    }

    #[test]
    fn the_relayed_side_of_relay_one_is_the_harder_to_reach() {
        let sym = Class::Symmetric.behaviour();
        let prc = Class::PortRestrictedCone.behaviour();
        assert_eq!(decide(&sym, &prc, true), Mode::RelayOne(Side::A));
        assert_eq!(decide(&prc, &sym, true), Mode::RelayOne(Side::B));
        let blocked = Class::UdpBlocked.behaviour();
        assert_eq!(decide(&sym, &blocked, false), Mode::RelayOne(Side::B));
    }
}

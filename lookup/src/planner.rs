//! The direct-or-relay decision from both peers' NAT behaviours
//! (ARCHITECTURE.md, "NAT model and the compatibility matrix").
//!
//! Feasibility of a direct UDP path, derived from RFC 4787 behaviours rather
//! than a table of class names:
//! - either side UDP-blocked: not direct;
//! - both sides map address-dependently (ADM or APDM): not direct;
//! - one side maps address-dependently and the other filters address- and
//!   port-dependently: not direct;
//! - otherwise direct, provided each peer answers the source it actually
//!   receives from (the exchange client's punch does).
//!
//! Unknown behaviours (a probe against a server without RFC 5780) count as
//! the worst case. A `retry` (a failed direct attempt) always relays.

use serde::{Deserialize, Serialize};

/// Mapping behaviour (RFC 4787 §4.1), as `natrix probe --json` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No NAT.
    NoNat,
    /// Endpoint-independent.
    EndpointIndependent,
    /// Address-dependent.
    AddressDependent,
    /// Address- and port-dependent.
    AddressAndPortDependent,
}

/// Filtering behaviour (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Endpoint-independent.
    EndpointIndependent,
    /// Address-dependent.
    AddressDependent,
    /// Address- and port-dependent.
    AddressAndPortDependent,
}

/// The classic class names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// No NAT, no filtering.
    Open,
    /// EIM + EIF.
    FullCone,
    /// EIM + ADF.
    RestrictedCone,
    /// EIM + APDF.
    PortRestrictedCone,
    /// ADM or APDM.
    Symmetric,
    /// No UDP at all.
    UdpBlocked,
}

impl Class {
    /// Every class, in matrix order.
    pub const ALL: [Class; 6] = [
        Class::Open,
        Class::FullCone,
        Class::RestrictedCone,
        Class::PortRestrictedCone,
        Class::Symmetric,
        Class::UdpBlocked,
    ];

    /// The behaviours a class stands for (worst case where it is vague:
    /// symmetric is taken as APDM + APDF).
    pub fn behaviour(self) -> Behaviour {
        let (mapping, filtering) = match self {
            Class::Open => (Mapping::NoNat, Filtering::EndpointIndependent),
            Class::FullCone => (Mapping::EndpointIndependent, Filtering::EndpointIndependent),
            Class::RestrictedCone => (Mapping::EndpointIndependent, Filtering::AddressDependent),
            Class::PortRestrictedCone => (
                Mapping::EndpointIndependent,
                Filtering::AddressAndPortDependent,
            ),
            Class::Symmetric | Class::UdpBlocked => (
                Mapping::AddressAndPortDependent,
                Filtering::AddressAndPortDependent,
            ),
        };
        Behaviour {
            udp_blocked: self == Class::UdpBlocked,
            mapping,
            filtering,
        }
    }
}

/// What the planner needs to know of one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// No UDP gets through.
    pub udp_blocked: bool,
    /// Mapping (worst case when unknown).
    pub mapping: Mapping,
    /// Filtering (worst case when unknown).
    pub filtering: Filtering,
}

impl Behaviour {
    /// The class these behaviours make.
    pub fn class(&self) -> Class {
        if self.udp_blocked {
            return Class::UdpBlocked;
        }
        match (self.mapping, self.filtering) {
            (Mapping::AddressDependent | Mapping::AddressAndPortDependent, _) => Class::Symmetric,
            (Mapping::NoNat, Filtering::EndpointIndependent) => Class::Open,
            (_, Filtering::EndpointIndependent) => Class::FullCone,
            (_, Filtering::AddressDependent) => Class::RestrictedCone,
            (_, Filtering::AddressAndPortDependent) => Class::PortRestrictedCone,
        }
    }

    fn dependent_mapping(&self) -> bool {
        matches!(
            self.mapping,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        )
    }

    /// How hard this side is to reach (higher is harder): used to pick the
    /// side that relays in `relay-one`.
    fn restrictiveness(&self) -> u8 {
        let m = match self.mapping {
            Mapping::NoNat => 0,
            Mapping::EndpointIndependent => 1,
            Mapping::AddressDependent => 2,
            Mapping::AddressAndPortDependent => 3,
        };
        let f = match self.filtering {
            Filtering::EndpointIndependent => 0,
            Filtering::AddressDependent => 1,
            Filtering::AddressAndPortDependent => 2,
        };
        u8::from(self.udp_blocked) * 100 + m * 10 + f
    }
}

/// Whether a direct UDP path between `a` and `b` is feasible.
pub fn direct_feasible(a: &Behaviour, b: &Behaviour) -> bool {
    if a.udp_blocked || b.udp_blocked {
        return false;
    }
    if a.dependent_mapping() && b.dependent_mapping() {
        return false;
    }
    let apdf = |x: &Behaviour| x.filtering == Filtering::AddressAndPortDependent;
    !((a.dependent_mapping() && apdf(b)) || (b.dependent_mapping() && apdf(a)))
}

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
    /// Hole-punch after exchanging candidates through CDX.
    Direct,
    /// Only this side allocates a relay; the other sends straight to the
    /// relayed address (TURN permissions are per IP, so the other side's
    /// mapping behaviour does not matter).
    RelayOne(Side),
    /// Both sides allocate (possibly on different relays).
    RelayBoth,
}

impl Mode {
    /// The mode's name in the API and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::RelayOne(_) => "relay-one",
            Mode::RelayBoth => "relay-both",
        }
    }

    /// Whether `side` allocates a relay.
    pub fn relays(self, side: Side) -> bool {
        match self {
            Mode::Direct => false,
            Mode::RelayOne(s) => s == side,
            Mode::RelayBoth => true,
        }
    }
}

/// The plan mode for `a` and `b`; `retry` (a direct attempt failed) always
/// relays.
pub fn decide(a: &Behaviour, b: &Behaviour, retry: bool) -> Mode {
    if !retry && direct_feasible(a, b) {
        return Mode::Direct;
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

    /// The matrix as ARCHITECTURE.md derives it, written out by hand: `D`
    /// direct, `a`/`b` relay-one on that side, `R` relay-both. Rows are A,
    /// columns B, both in [`Class::ALL`] order.
    const EXPECTED: [&str; 6] = [
        // open full restr p-restr symm udp-blocked
        "D D D D D b",
        "D D D D D b",
        "D D D D D b",
        "D D D D b b",
        "D D D a a b",
        "a a a a a R",
    ];

    fn cell(m: Mode) -> &'static str {
        match m {
            Mode::Direct => "D",
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
                assert_ne!(m, Mode::Direct, "{a:?}/{b:?}");
                assert!(m.relays(Side::A) || m.relays(Side::B));
            }
        }
    }

    #[test]
    fn the_relayed_side_of_relay_one_is_the_harder_to_reach() {
        let sym = Class::Symmetric.behaviour();
        let prc = Class::PortRestrictedCone.behaviour();
        assert_eq!(decide(&sym, &prc, false), Mode::RelayOne(Side::A));
        assert_eq!(decide(&prc, &sym, false), Mode::RelayOne(Side::B));
        let blocked = Class::UdpBlocked.behaviour();
        assert_eq!(decide(&sym, &blocked, false), Mode::RelayOne(Side::B));
    }

    #[test]
    fn classes_and_behaviours_agree() {
        for c in Class::ALL {
            assert_eq!(c.behaviour().class(), c);
        }
        // Address-dependent mapping with endpoint-independent filtering is
        // still "symmetric" by name, and direct with a cone.
        let adm = Behaviour {
            udp_blocked: false,
            mapping: Mapping::AddressDependent,
            filtering: Filtering::EndpointIndependent,
        };
        assert_eq!(adm.class(), Class::Symmetric);
        assert!(direct_feasible(&adm, &Class::RestrictedCone.behaviour()));
        assert!(!direct_feasible(
            &adm,
            &Class::PortRestrictedCone.behaviour()
        ));
    }
}

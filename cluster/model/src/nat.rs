//! The NAT model: RFC 4787 behaviours, the classic class names, the NAT
//! profile that discovery produces, and the one rule that says whether two
//! peers can reach each other directly (ARCHITECTURE.md, "NAT model and the
//! compatibility matrix").
//!
//! # The direct-path rule
//!
//! Feasibility of a direct UDP path is derived from behaviours, not from a
//! table of class names:
//! - either side UDP-blocked: not direct;
//! - both sides map address-dependently (ADM or APDM): not direct;
//! - one side maps address-dependently and the other filters address- and
//!   port-dependently: not direct;
//! - otherwise direct, provided each peer answers the source it actually
//!   receives from (the exchange client's punch does).
//!
//! Unknown behaviours (a probe against a server without RFC 5780) count as
//! the worst case.
//!
//! Where the classic rule says no, port allocation may still allow a direct
//! path ([`punch_plans`]): a random-port symmetric NAT facing an
//! endpoint-independent one by the birthday paradox, a sequential NAT by
//! predicting its next ports, a port-preserving one by a fresh socket whose
//! first mapping keeps its port. Two random-port symmetric NATs stay
//! relayed.
//!
//! # The profile's JSON
//!
//! [`NatProfile`] is what `natrix probe --json` prints, what lookup's
//! `POST /v1/plan` takes for each peer and what the load tester sends: one
//! serde derive, never written by hand. Every field is optional on input;
//! what the planner needs is `udp_blocked`, `mapping`, `filtering` or,
//! failing those, `class` ([`NatProfile::behaviour`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::transport::Transport;

/// Mapping behaviour ([RFC 4787 §4.1]): on which of the destination's
/// address and port the NAT's public mapping of a local socket depends.
///
/// [RFC 4787 §4.1]: https://www.rfc-editor.org/rfc/rfc4787#section-4.1
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No NAT: the mapped address is the local address.
    NoNat,
    /// Endpoint-independent mapping (EIM).
    EndpointIndependent,
    /// Address-dependent mapping (ADM).
    AddressDependent,
    /// Address- and port-dependent mapping (APDM).
    AddressAndPortDependent,
}

/// Filtering behaviour ([RFC 4787 §5]): which outside endpoints may send to a
/// mapping.
///
/// [RFC 4787 §5]: https://www.rfc-editor.org/rfc/rfc4787#section-5
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Endpoint-independent filtering (EIF).
    EndpointIndependent,
    /// Address-dependent filtering (ADF).
    AddressDependent,
    /// Address- and port-dependent filtering (APDF).
    AddressAndPortDependent,
}

/// The classic class names (RFC 3489 §5), for humans and coarse metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatClass {
    /// No NAT and no filtering.
    Open,
    /// EIM + EIF.
    FullCone,
    /// EIM + ADF.
    RestrictedCone,
    /// EIM + APDF.
    PortRestrictedCone,
    /// ADM or APDM.
    Symmetric,
    /// No UDP answer at all.
    UdpBlocked,
}

impl Mapping {
    /// Every mapping behaviour, least restrictive first.
    pub const ALL: [Mapping; 4] = [
        Mapping::NoNat,
        Mapping::EndpointIndependent,
        Mapping::AddressDependent,
        Mapping::AddressAndPortDependent,
    ];

    /// The name in JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Mapping::NoNat => "no-nat",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
        }
    }

    /// True for ADM and APDM: the mapping changes with the destination.
    pub const fn is_dependent(self) -> bool {
        matches!(
            self,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        )
    }

    /// The one-byte code of the exchange's cleartext PROFILE attribute:
    /// 0 unknown, 1 no NAT, 2 EIM, 3 ADM, 4 APDM.
    pub const fn code(m: Option<Mapping>) -> u8 {
        match m {
            None => 0,
            Some(Mapping::NoNat) => 1,
            Some(Mapping::EndpointIndependent) => 2,
            Some(Mapping::AddressDependent) => 3,
            Some(Mapping::AddressAndPortDependent) => 4,
        }
    }
}

impl Filtering {
    /// Every filtering behaviour, least restrictive first.
    pub const ALL: [Filtering; 3] = [
        Filtering::EndpointIndependent,
        Filtering::AddressDependent,
        Filtering::AddressAndPortDependent,
    ];

    /// The name in JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        }
    }

    /// The one-byte code of the PROFILE attribute: 0 unknown, 1 EIF, 2 ADF,
    /// 3 APDF.
    pub const fn code(f: Option<Filtering>) -> u8 {
        match f {
            None => 0,
            Some(Filtering::EndpointIndependent) => 1,
            Some(Filtering::AddressDependent) => 2,
            Some(Filtering::AddressAndPortDependent) => 3,
        }
    }
}

impl NatClass {
    /// Every class, in matrix order (least restrictive first).
    pub const ALL: [NatClass; 6] = [
        NatClass::Open,
        NatClass::FullCone,
        NatClass::RestrictedCone,
        NatClass::PortRestrictedCone,
        NatClass::Symmetric,
        NatClass::UdpBlocked,
    ];

    /// The name used in JSON, metrics and the NAT lab.
    pub const fn name(self) -> &'static str {
        match self {
            NatClass::Open => "open",
            NatClass::FullCone => "full-cone",
            NatClass::RestrictedCone => "restricted-cone",
            NatClass::PortRestrictedCone => "port-restricted-cone",
            NatClass::Symmetric => "symmetric",
            NatClass::UdpBlocked => "udp-blocked",
        }
    }

    /// The one-byte code in the exchange's connection data: 0 unknown, then
    /// 1.. in [`NatClass::ALL`] order.
    pub fn code(c: Option<NatClass>) -> u8 {
        c.and_then(|c| NatClass::ALL.iter().position(|x| *x == c))
            .map_or(0, |i| i as u8 + 1)
    }

    /// The class of a [`NatClass::code`]; `None` for 0 and unknown codes.
    pub fn from_code(code: u8) -> Option<NatClass> {
        NatClass::ALL
            .get(usize::from(code).checked_sub(1)?)
            .copied()
    }

    /// The behaviours a class stands for (the worst case where it is vague:
    /// symmetric is taken as APDM + APDF).
    pub const fn behaviour(self) -> Behaviour {
        let (mapping, filtering) = match self {
            NatClass::Open => (Mapping::NoNat, Filtering::EndpointIndependent),
            NatClass::FullCone => (Mapping::EndpointIndependent, Filtering::EndpointIndependent),
            NatClass::RestrictedCone => (Mapping::EndpointIndependent, Filtering::AddressDependent),
            NatClass::PortRestrictedCone => (
                Mapping::EndpointIndependent,
                Filtering::AddressAndPortDependent,
            ),
            NatClass::Symmetric | NatClass::UdpBlocked => (
                Mapping::AddressAndPortDependent,
                Filtering::AddressAndPortDependent,
            ),
        };
        Behaviour {
            udp_blocked: matches!(self, NatClass::UdpBlocked),
            mapping,
            filtering,
            allocation: None,
            stride: 0,
        }
    }
}

impl std::fmt::Display for NatClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for NatClass {
    type Err = String;
    fn from_str(s: &str) -> Result<NatClass, String> {
        NatClass::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = NatClass::ALL.iter().map(|c| c.name()).collect();
                format!("unknown NAT class {s:?}: one of {}", names.join(", "))
            })
    }
}

/// What the planner needs to know of one side: its behaviours, with the
/// worst case standing in for what is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// No UDP gets through.
    pub udp_blocked: bool,
    /// Mapping.
    pub mapping: Mapping,
    /// Filtering.
    pub filtering: Filtering,
    /// How new mappings get their ports, where discovery could tell.
    pub allocation: Option<PortAllocation>,
    /// With sequential allocation: the step between consecutive mappings.
    pub stride: i32,
}

impl Behaviour {
    /// The class these behaviours make.
    pub const fn class(&self) -> NatClass {
        if self.udp_blocked {
            return NatClass::UdpBlocked;
        }
        match (self.mapping, self.filtering) {
            (Mapping::AddressDependent | Mapping::AddressAndPortDependent, _) => {
                NatClass::Symmetric
            }
            (Mapping::NoNat, Filtering::EndpointIndependent) => NatClass::Open,
            (_, Filtering::EndpointIndependent) => NatClass::FullCone,
            (_, Filtering::AddressDependent) => NatClass::RestrictedCone,
            (_, Filtering::AddressAndPortDependent) => NatClass::PortRestrictedCone,
        }
    }

    /// How hard this side is to reach (higher is harder): the planner relays
    /// the harder side in `relay-one`.
    pub const fn restrictiveness(&self) -> u8 {
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
        (self.udp_blocked as u8) * 100 + m * 10 + f
    }
}

/// Whether a direct UDP path between `a` and `b` is feasible (the rule in
/// the module docs). Symmetric in its arguments.
pub fn direct_feasible(a: &Behaviour, b: &Behaviour) -> bool {
    if a.udp_blocked || b.udp_blocked {
        return false;
    }
    let (am, bm) = (a.mapping.is_dependent(), b.mapping.is_dependent());
    if am && bm {
        return false;
    }
    let apdf = |x: &Behaviour| matches!(x.filtering, Filtering::AddressAndPortDependent);
    !((am && apdf(b)) || (bm && apdf(a)))
}

/// Fresh sockets the hard side of a birthday punch opens.
pub const BIRTHDAY_SOCKETS: u16 = 256;
/// Random ports the easy side of a birthday punch probes at most. With
/// [`BIRTHDAY_SOCKETS`] mappings among a NAT's 64,512 ports, each probe hits
/// one with a chance of 1 in 252: 1,600 probes find one with 99.8 %
/// probability (half of the attempts within 175), and with the hard side's
/// 256 (one per socket) the birthday's probes stay under 2,000.
pub const BIRTHDAY_SPRAY: u16 = 1600;
/// Ports past a sequential NAT's last mapping that the other side probes.
pub const PREDICT_WINDOW: u16 = 16;
/// How long a direct attempt may take before the client gives up (and asks
/// for a relay).
pub const PUNCH_DEADLINE_MS: u32 = 3000;

/// How a direct path is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Technique {
    /// Each side probes the other's candidates (the classic rule).
    Classic,
    /// A random-port symmetric NAT against an endpoint-independent one: the
    /// hard side opens [`BIRTHDAY_SOCKETS`] mappings toward the easy side,
    /// the easy side probes random ports of the hard side's address until
    /// one lands on a mapping (the birthday paradox).
    Birthday,
    /// Ports predicted: the next ports of a sequential NAT, or the local port
    /// of a fresh socket behind a port-preserving one.
    Predicted,
}

impl Technique {
    /// The name in JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Technique::Classic => "classic",
            Technique::Birthday => "birthday",
            Technique::Predicted => "predicted",
        }
    }
}

/// What one side does to open a direct path (part of a direct plan;
/// [`punch_plans`] derives both sides').
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PunchPlan {
    /// The pair's technique.
    pub technique: Technique,
    /// Fresh sockets to open besides the exchange socket, each probing the
    /// peer (the birthday's hard side opens many; a port-preserving side one).
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub sockets: u16,
    /// Announce the fresh socket as `public address : its local port` (a
    /// port-preserving NAT keeps the port for the socket's first mapping, so
    /// that socket sends to one target only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announce: bool,
    /// Random ports of the peer's public address to probe, at most (the
    /// birthday's easy side).
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub spray: u16,
    /// The peer allocates sequentially: probe this many of its ports past
    /// its mapped one, before any other target...
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub window: u16,
    /// ...stepping by its stride.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub peer_stride: i32,
    /// Give up after this many milliseconds (then ask for a relay).
    pub deadline_ms: u32,
    /// Once direct, send something at least this often so both NATs keep
    /// the mappings ([`keepalive`]).
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_ms: u32,
}

fn default_keepalive_ms() -> u32 {
    KEEPALIVE_MS
}

/// The keepalive interval when neither side's mapping lifetime is known
/// (RFC 8445's Tr).
pub const KEEPALIVE_MS: u32 = 15_000;

/// How often a direct path between `a` and `b` must carry a packet: half the
/// shorter idle mapping lifetime either side measured (the idleness it was
/// seen to outlive, else the one it was seen to end within), between 1 s
/// and [`KEEPALIVE_MS`].
pub fn keepalive(a: &NatProfile, b: &NatProfile) -> u32 {
    [a, b]
        .iter()
        .filter_map(|p| p.mapping_lifetime.or(p.mapping_lifetime_below))
        .map(|s| s.saturating_mul(500))
        .min()
        .unwrap_or(KEEPALIVE_MS)
        .clamp(1000, KEEPALIVE_MS)
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

impl PunchPlan {
    /// The plan of a side that only probes the peer's candidates.
    pub const fn classic() -> PunchPlan {
        PunchPlan {
            technique: Technique::Classic,
            sockets: 0,
            announce: false,
            spray: 0,
            window: 0,
            peer_stride: 0,
            deadline_ms: PUNCH_DEADLINE_MS,
            keepalive_ms: KEEPALIVE_MS,
        }
    }

    /// Probes this plan may send beyond the classic ones, at most: one per
    /// fresh socket (more only from a socket the peer's probes reached), the
    /// spray and the window.
    pub fn extra_probes(&self) -> u32 {
        u32::from(self.sockets) + u32::from(self.spray) + u32::from(self.window)
    }
}

/// How both sides open a direct path between `a` and `b`, or `None` when no
/// technique can (then the pair is relayed): the classic rule
/// ([`direct_feasible`]) first, then what port allocation allows.
///
/// For each side X facing Y, where the classic rule fails:
/// - X's own mapping: a port-preserving X opens one fresh socket and
///   announces its local port; a sequential X needs nothing (Y predicts); a
///   random (or unknown) X opens [`BIRTHDAY_SOCKETS`] sockets when Y maps
///   endpoint-independently, and cannot be reached otherwise.
/// - Where X probes: a sequential Y's next [`PREDICT_WINDOW`] ports; a
///   preserving Y's announced port; a random Y's ports by spraying, when X
///   itself maps endpoint-independently.
///
/// So random-port symmetric NATs meet each other (and any other symmetric
/// NAT) only through a relay.
pub fn punch_plans(a: &Behaviour, b: &Behaviour) -> Option<[PunchPlan; 2]> {
    if a.udp_blocked || b.udp_blocked {
        return None;
    }
    if direct_feasible(a, b) {
        return Some([PunchPlan::classic(); 2]);
    }
    let mut plans = [side_plan(a, b)?, side_plan(b, a)?];
    let technique = if plans.iter().any(|p| p.sockets > 1 || p.spray > 0) {
        Technique::Birthday
    } else {
        Technique::Predicted
    };
    for p in &mut plans {
        p.technique = technique;
    }
    Some(plans)
}

/// Side `me`'s part against `other` where the classic rule fails.
fn side_plan(me: &Behaviour, other: &Behaviour) -> Option<PunchPlan> {
    let mut plan = PunchPlan::classic();
    let easy = |b: &Behaviour| !b.mapping.is_dependent();
    if me.mapping.is_dependent() {
        match me.allocation {
            Some(PortAllocation::Preserving) => {
                plan.sockets = 1;
                plan.announce = true;
            }
            Some(PortAllocation::Sequential) => {}
            Some(PortAllocation::Random) | None if easy(other) => plan.sockets = BIRTHDAY_SOCKETS,
            Some(PortAllocation::Random) | None => return None,
        }
    }
    if other.mapping.is_dependent() {
        match other.allocation {
            Some(PortAllocation::Sequential) => {
                plan.window = PREDICT_WINDOW;
                plan.peer_stride = other.stride;
            }
            Some(PortAllocation::Preserving) => {}
            Some(PortAllocation::Random) | None if easy(me) => plan.spray = BIRTHDAY_SPRAY,
            Some(PortAllocation::Random) | None => return None,
        }
    }
    Some(plan)
}

/// What NAT behaviour discovery found for one local socket, in the one JSON
/// form (module docs). Discovery fills every field it measured; a peer
/// request may carry as little as `class`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatProfile {
    /// The STUN server the probe ran against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<SocketAddr>,
    /// The transport the probe used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The local address the tests ran from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_address: Option<SocketAddr>,
    /// The public (mapped) address; absent when UDP is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_address: Option<SocketAddr>,
    /// Whether the mapped address differs from the local one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind_nat: Option<bool>,
    /// Mapping behaviour; absent when the server does not support RFC 5780
    /// (no OTHER-ADDRESS) and there is a NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Mapping>,
    /// Filtering behaviour; absent when the server does not support RFC 5780.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filtering: Option<Filtering>,
    /// Whether a packet to the own mapped address came back; absent when not
    /// tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hairpinning: Option<bool>,
    /// The classic class, where the behaviours determine one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<NatClass>,
    /// The server's alternate address (RFC 5780 OTHER-ADDRESS), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_address: Option<SocketAddr>,
    /// No UDP answer came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_blocked: Option<bool>,
    /// The mapped address over TCP (probed when UDP is blocked, or with
    /// `--tcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_mapped_address: Option<SocketAddr>,
    /// How the NAT picks the public port of a new mapping (what punching a
    /// symmetric NAT needs); absent when the tests cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_allocation: Option<PortAllocation>,
    /// With sequential allocation: the step between consecutive mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_stride: Option<i32>,
    /// Seconds an idle UDP mapping was seen to survive (the longest delay
    /// tested that it outlived); absent when not tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_lifetime: Option<u32>,
    /// Seconds of idleness after which a mapping was seen to expire (the
    /// shortest delay tested that it did not outlive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_lifetime_below: Option<u32>,
    /// How long the probe took, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// What went wrong, for humans (e.g. "UDP is blocked").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The same tests over IPv6, from a dual-stack or IPv6-only host (the
    /// top level then describes its IPv4 side, through NAT64 on an
    /// IPv6-only host). Behind a stateful IPv6 firewall and no NAT it reads
    /// `no-nat` with the firewall's filtering. The planner sends both sides
    /// over IPv6 when both have one and it allows a direct path there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Box<NatProfile>>,
}

/// How a NAT picks the public port of a new mapping (RFC 4787 §4.1's
/// "port preservation", and what hard-NAT traversal predicts from).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortAllocation {
    /// The local port is kept when it is free.
    Preserving,
    /// Each new mapping takes the previous one's port plus a stride.
    Sequential,
    /// Ports follow no pattern the tests could see.
    Random,
}

/// Most a stride may be for allocation to count as sequential.
pub const MAX_PORT_STRIDE: i32 = 64;

impl PortAllocation {
    /// The name used in JSON and `natrix probe`.
    pub const fn name(self) -> &'static str {
        match self {
            PortAllocation::Preserving => "preserving",
            PortAllocation::Sequential => "sequential",
            PortAllocation::Random => "random",
        }
    }

    /// From the local port and the public ports of consecutive new mappings
    /// of it (oldest first): the allocation and, when sequential, the
    /// stride; `None` when they cannot tell (one mapping that did not keep
    /// the port, or two distinct ones).
    pub fn from_ports(local: u16, ports: &[u16]) -> Option<(PortAllocation, Option<i32>)> {
        let first = *ports.first()?;
        if first == local {
            return Some((PortAllocation::Preserving, None));
        }
        let mut distinct: Vec<u16> = Vec::new();
        for &p in ports {
            if distinct.last() != Some(&p) {
                distinct.push(p);
            }
        }
        let steps: Vec<i32> = distinct
            .windows(2)
            .map(|w| i32::from(w[1]) - i32::from(w[0]))
            .collect();
        let [a, _, ..] = steps.as_slice() else {
            return None;
        };
        if steps.iter().all(|s| s == a) && a.abs() <= MAX_PORT_STRIDE {
            Some((PortAllocation::Sequential, Some(*a)))
        } else {
            Some((PortAllocation::Random, None))
        }
    }
}

/// Why a profile cannot be planned with: its fields contradict each other.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct ProfileError {
    /// The profile field at fault.
    pub field: &'static str,
    /// What is wrong, for humans.
    pub detail: String,
}

impl NatProfile {
    /// The class the measured behaviours determine, if any: UDP-blocked
    /// without a mapped address; none when the mapping is unknown, or the
    /// filtering is unknown behind a NAT.
    pub fn derived_class(&self) -> Option<NatClass> {
        if self.mapped_address.is_none() {
            return Some(NatClass::UdpBlocked);
        }
        Some(match (self.mapping?, self.filtering) {
            (m, _) if m.is_dependent() => NatClass::Symmetric,
            (Mapping::NoNat, Some(Filtering::EndpointIndependent) | None) => NatClass::Open,
            (_, Some(f)) => Behaviour {
                udp_blocked: false,
                mapping: Mapping::EndpointIndependent,
                filtering: f,
                allocation: None,
                stride: 0,
            }
            .class(),
            (_, None) => return None,
        })
    }

    /// Fills the fields that follow from the measured ones: `behind_nat`,
    /// `udp_blocked` and `class`.
    pub fn with_derived(mut self) -> NatProfile {
        self.udp_blocked = Some(self.mapped_address.is_none());
        self.behind_nat = match (self.mapped_address, self.local_address) {
            (Some(m), Some(l)) => Some(m != l),
            _ => None,
        };
        self.class = self.derived_class();
        self
    }

    /// The behaviours this profile describes, the worst case standing in for
    /// what it does not say; an error when its fields contradict each other.
    pub fn behaviour(&self) -> Result<Behaviour, ProfileError> {
        let says_blocked = self.class == Some(NatClass::UdpBlocked);
        match self.udp_blocked {
            Some(true) if self.class.is_some_and(|c| c != NatClass::UdpBlocked) => {
                return Err(ProfileError {
                    field: "class",
                    detail: "udp_blocked is true but the class is not udp-blocked".into(),
                });
            }
            Some(false) if says_blocked => {
                return Err(ProfileError {
                    field: "udp_blocked",
                    detail: "the class is udp-blocked but udp_blocked is false".into(),
                });
            }
            _ => {}
        }
        if self.udp_blocked == Some(true) || says_blocked {
            return Ok(NatClass::UdpBlocked.behaviour());
        }
        let from_class = self.class.map(NatClass::behaviour);
        let b = Behaviour {
            udp_blocked: false,
            mapping: self
                .mapping
                .or(from_class.map(|b| b.mapping))
                .unwrap_or(Mapping::AddressAndPortDependent),
            filtering: self
                .filtering
                .or(from_class.map(|b| b.filtering))
                .unwrap_or(Filtering::AddressAndPortDependent),
            allocation: self.port_allocation,
            stride: match self.port_allocation {
                Some(PortAllocation::Sequential) => self.port_stride.unwrap_or(0),
                _ => 0,
            },
        };
        if b.allocation == Some(PortAllocation::Sequential)
            && (b.stride == 0 || b.stride.abs() > MAX_PORT_STRIDE)
        {
            return Err(ProfileError {
                field: "port_stride",
                detail: format!(
                    "sequential allocation needs a stride of 1 to {MAX_PORT_STRIDE} either way"
                ),
            });
        }
        if let (Some(class), Some(_), Some(_)) = (self.class, self.mapping, self.filtering)
            && b.class() != class
        {
            return Err(ProfileError {
                field: "class",
                detail: format!("mapping and filtering make {}, not {class}", b.class()),
            });
        }
        if self.mapping == Some(Mapping::NoNat)
            && let (Some(m), Some(l)) = (self.mapped_address, self.local_address)
            && l != m
        {
            return Err(ProfileError {
                field: "mapping",
                detail: "no-nat, but the mapped address differs from the local one".into(),
            });
        }
        Ok(b)
    }

    /// The IPv6 side's behaviours, when the profile has a usable one (a
    /// mapped IPv6 address: the host reached the server over IPv6); an error
    /// when it contradicts itself, nests another, or names IPv4 addresses.
    pub fn ipv6_behaviour(&self) -> Result<Option<Behaviour>, ProfileError> {
        let Some(v6) = self.ipv6.as_deref() else {
            return Ok(None);
        };
        let error = |detail: &str| ProfileError {
            field: "ipv6",
            detail: detail.into(),
        };
        if v6.ipv6.is_some() {
            return Err(error("an IPv6 profile cannot carry another"));
        }
        if [v6.mapped_address, v6.local_address]
            .iter()
            .flatten()
            .any(SocketAddr::is_ipv4)
        {
            return Err(error("the IPv6 profile names an IPv4 address"));
        }
        let b = v6.behaviour().map_err(|e| ProfileError {
            field: "ipv6",
            detail: format!("{}: {}", e.field, e.detail),
        })?;
        Ok((v6.mapped_address.is_some() && !b.udp_blocked).then_some(b))
    }

    /// The cleartext PROFILE attribute's codes: mapping, filtering, 0, 0.
    pub const fn codes(&self) -> [u8; 4] {
        [
            Mapping::code(self.mapping),
            Filtering::code(self.filtering),
            0,
            0,
        ]
    }
}

#[cfg(test)]
mod port_tests {
    use super::{PortAllocation, PortAllocation::*};

    #[test]
    fn port_allocation_is_read_from_consecutive_mappings() {
        let f = PortAllocation::from_ports;
        assert_eq!(f(40000, &[40000, 50001, 50002]), Some((Preserving, None)));
        assert_eq!(
            f(40000, &[50001, 50002, 50003]),
            Some((Sequential, Some(1)))
        );
        assert_eq!(
            f(40000, &[50010, 50006, 50002]),
            Some((Sequential, Some(-4)))
        );
        assert_eq!(f(40000, &[50001, 61234, 50777]), Some((Random, None)));
        assert_eq!(
            f(40000, &[50001, 50300, 50599]),
            Some((Random, None)),
            "stride too big"
        );
        assert_eq!(
            f(40000, &[50001, 50001, 50001]),
            None,
            "one mapping: cannot tell"
        );
        assert_eq!(
            f(40000, &[50001, 50002, 50002]),
            None,
            "two mappings: cannot tell"
        );
        assert_eq!(f(40000, &[]), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behind(mapping: Option<Mapping>, filtering: Option<Filtering>) -> NatProfile {
        NatProfile {
            local_address: Some("10.0.0.2:5000".parse().unwrap()),
            mapped_address: Some("203.0.113.9:6000".parse().unwrap()),
            mapping,
            filtering,
            ..NatProfile::default()
        }
        .with_derived()
    }

    #[test]
    fn an_ipv6_profile_behind_a_stateful_firewall_reads_as_a_port_restricted_cone() {
        let v6 = NatProfile {
            local_address: Some("[2001:db8:20:1::2]:5000".parse().unwrap()),
            mapped_address: Some("[2001:db8:20:1::2]:5000".parse().unwrap()),
            mapping: Some(Mapping::NoNat),
            filtering: Some(Filtering::AddressAndPortDependent),
            ..NatProfile::default()
        }
        .with_derived();
        assert_eq!(v6.class, Some(NatClass::PortRestrictedCone));
        let mut p = behind(
            Some(Mapping::AddressAndPortDependent),
            Some(Filtering::AddressAndPortDependent),
        );
        assert_eq!(p.ipv6_behaviour(), Ok(None));
        p.ipv6 = Some(Box::new(v6.clone()));
        let b = p.ipv6_behaviour().unwrap().unwrap();
        assert_eq!(b.class(), NatClass::PortRestrictedCone);
        // The JSON form round-trips with the nested profile.
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<NatProfile>(&json).unwrap(), p);
        // No IPv6 mapped address: the host did not reach the server there.
        p.ipv6 = Some(Box::new(NatProfile {
            mapped_address: None,
            ..v6.clone()
        }));
        assert_eq!(p.ipv6_behaviour(), Ok(None));
        // Nested twice, or IPv4 addresses in it: refused, naming the field.
        let mut nested = v6.clone();
        nested.ipv6 = Some(Box::new(v6.clone()));
        p.ipv6 = Some(Box::new(nested));
        assert_eq!(p.ipv6_behaviour().unwrap_err().field, "ipv6");
        p.ipv6 = Some(Box::new(behind(None, None)));
        assert_eq!(p.ipv6_behaviour().unwrap_err().field, "ipv6");
    }

    #[test]
    fn the_direct_rule_is_symmetric_and_matches_the_written_cases() {
        let all: Vec<Behaviour> = NatClass::ALL.iter().map(|c| c.behaviour()).collect();
        for a in &all {
            for b in &all {
                assert_eq!(direct_feasible(a, b), direct_feasible(b, a));
            }
        }
        let sym = NatClass::Symmetric.behaviour();
        let prc = NatClass::PortRestrictedCone.behaviour();
        let rc = NatClass::RestrictedCone.behaviour();
        assert!(!direct_feasible(&sym, &sym));
        assert!(!direct_feasible(&sym, &prc));
        assert!(direct_feasible(&sym, &rc));
        assert!(direct_feasible(&prc, &prc));
        assert!(!direct_feasible(&NatClass::UdpBlocked.behaviour(), &rc));
        // ADM with EIF is "symmetric" by name and direct with a cone.
        let adm = Behaviour {
            udp_blocked: false,
            mapping: Mapping::AddressDependent,
            filtering: Filtering::EndpointIndependent,
            allocation: None,
            stride: 0,
        };
        assert_eq!(adm.class(), NatClass::Symmetric);
        assert!(direct_feasible(&adm, &rc) && !direct_feasible(&adm, &prc));
    }

    fn with_ports(class: NatClass, allocation: PortAllocation, stride: i32) -> Behaviour {
        Behaviour {
            allocation: Some(allocation),
            stride,
            ..class.behaviour()
        }
    }

    #[test]
    fn port_allocation_opens_direct_paths_the_classic_rule_refuses() {
        let sym = NatClass::Symmetric.behaviour();
        let random = with_ports(NatClass::Symmetric, PortAllocation::Random, 0);
        let seq = with_ports(NatClass::Symmetric, PortAllocation::Sequential, 1);
        let pres = with_ports(NatClass::Symmetric, PortAllocation::Preserving, 0);
        let prc = NatClass::PortRestrictedCone.behaviour();
        let rc = NatClass::RestrictedCone.behaviour();
        let blocked = NatClass::UdpBlocked.behaviour();
        let technique = |a: &Behaviour, b: &Behaviour| {
            let plans = punch_plans(a, b)?;
            let back = punch_plans(b, a).expect("the rule is symmetric");
            assert_eq!([plans[1], plans[0]], back, "{a:?} / {b:?}");
            Some(plans[0].technique)
        };
        // Classic where the classic rule allows it.
        assert_eq!(technique(&sym, &rc), Some(Technique::Classic));
        assert_eq!(technique(&prc, &prc), Some(Technique::Classic));
        // Random (or unknown) ports against a port-restricted cone: birthday.
        for hard in [&sym, &random] {
            let [h, e] = punch_plans(hard, &prc).unwrap();
            assert_eq!(h.technique, Technique::Birthday);
            assert_eq!((h.sockets, h.spray), (BIRTHDAY_SOCKETS, 0));
            assert_eq!((e.sockets, e.spray), (0, BIRTHDAY_SPRAY));
            assert!(h.extra_probes() + e.extra_probes() < 2000);
        }
        // Sequential: the other side probes the predicted window, first.
        let [s, p] = punch_plans(&seq, &prc).unwrap();
        assert_eq!(s.technique, Technique::Predicted);
        assert_eq!((s.sockets, s.window), (0, 0));
        assert_eq!((p.window, p.peer_stride), (PREDICT_WINDOW, 1));
        let [x, y] = punch_plans(&seq, &seq).unwrap();
        assert_eq!((x.window, y.window), (PREDICT_WINDOW, PREDICT_WINDOW));
        // Preserving: a fresh socket, announced.
        let [f, p] = punch_plans(&pres, &prc).unwrap();
        assert_eq!((f.sockets, f.announce, p.window), (1, true, 0));
        assert_eq!(technique(&pres, &pres), Some(Technique::Predicted));
        let [f, s] = punch_plans(&pres, &seq).unwrap();
        assert_eq!((f.announce, f.window, s.window), (true, PREDICT_WINDOW, 0));
        // Relayed: random ports against any other symmetric NAT, or no UDP.
        for other in [&sym, &random, &seq, &pres] {
            assert_eq!(technique(&random, other), None, "{other:?}");
        }
        for other in [&sym, &prc, &rc, &seq, &pres] {
            assert_eq!(technique(&blocked, other), None);
        }
        // The six classes: 12 of 36 ordered pairs relayed (UDP-blocked with
        // every class, symmetric with symmetric).
        let relayed = NatClass::ALL
            .iter()
            .flat_map(|a| NatClass::ALL.iter().map(move |b| (a, b)))
            .filter(|(a, b)| punch_plans(&a.behaviour(), &b.behaviour()).is_none())
            .count();
        assert_eq!(relayed, 12);
    }

    #[test]
    fn keepalives_stay_under_the_shorter_measured_mapping_lifetime() {
        let p = |at_least: Option<u32>, below: Option<u32>| NatProfile {
            mapping_lifetime: at_least,
            mapping_lifetime_below: below,
            ..NatProfile::default()
        };
        assert_eq!(keepalive(&p(None, None), &p(None, None)), KEEPALIVE_MS);
        // Lives 4 s, gone after 8 s: every 2 s.
        assert_eq!(keepalive(&p(Some(4), Some(8)), &p(None, None)), 2000);
        // Seen to last 16 s: every 8 s; the shorter side wins.
        assert_eq!(keepalive(&p(Some(16), None), &p(None, None)), 8000);
        assert_eq!(keepalive(&p(Some(16), None), &p(Some(4), Some(8))), 2000);
        assert_eq!(keepalive(&p(Some(64), None), &p(None, None)), KEEPALIVE_MS);
        assert_eq!(keepalive(&p(None, Some(1)), &p(None, None)), 1000);
    }

    #[test]
    fn a_sequential_profile_needs_a_plausible_stride() {
        let p = |stride| NatProfile {
            class: Some(NatClass::Symmetric),
            port_allocation: Some(PortAllocation::Sequential),
            port_stride: stride,
            ..NatProfile::default()
        };
        assert_eq!(p(Some(2)).behaviour().unwrap().stride, 2);
        assert_eq!(p(None).behaviour().unwrap_err().field, "port_stride");
        assert_eq!(p(Some(1000)).behaviour().unwrap_err().field, "port_stride");
    }

    #[test]
    fn classes_and_behaviours_agree() {
        for c in NatClass::ALL {
            assert_eq!(c.behaviour().class(), c);
            assert_eq!(c.name().parse::<NatClass>(), Ok(c));
            assert_eq!(NatClass::from_code(NatClass::code(Some(c))), Some(c));
        }
        assert_eq!(NatClass::code(None), 0);
        assert_eq!(NatClass::from_code(0), None);
        assert_eq!(NatClass::from_code(7), None);
        assert!(
            "cone"
                .parse::<NatClass>()
                .unwrap_err()
                .contains("full-cone")
        );
    }

    #[test]
    fn discovery_results_derive_their_class() {
        let eim = Some(Mapping::EndpointIndependent);
        assert_eq!(
            behind(eim, Some(Filtering::AddressDependent)).class,
            Some(NatClass::RestrictedCone)
        );
        assert_eq!(
            behind(Some(Mapping::AddressAndPortDependent), None).class,
            Some(NatClass::Symmetric)
        );
        assert_eq!(behind(eim, None).class, None, "filtering unknown");
        assert_eq!(behind(None, None).class, None, "no RFC 5780 server");
        let blocked = NatProfile::default().with_derived();
        assert_eq!(blocked.class, Some(NatClass::UdpBlocked));
        assert_eq!(blocked.udp_blocked, Some(true));
        let p = behind(eim, Some(Filtering::EndpointIndependent));
        assert_eq!(p.behind_nat, Some(true));
        assert_eq!(p.codes(), [2, 1, 0, 0]);
    }

    #[test]
    fn the_json_form_round_trips_and_names_behaviours_in_kebab_case() {
        let p = NatProfile {
            server: Some("192.0.2.1:3478".parse().unwrap()),
            transport: Some(Transport::Udp),
            hairpinning: Some(false),
            other_address: Some("192.0.2.2:3479".parse().unwrap()),
            seconds: Some(0.25),
            ..behind(
                Some(Mapping::AddressAndPortDependent),
                Some(Filtering::AddressAndPortDependent),
            )
        };
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["mapping"], "address-and-port-dependent");
        assert_eq!(json["class"], "symmetric");
        assert_eq!(json["transport"], "udp");
        assert_eq!(json["mapped_address"], "203.0.113.9:6000");
        assert!(json.get("error").is_none(), "absent fields are left out");
        let back: NatProfile = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        let unknown = serde_json::from_str::<NatProfile>(r#"{"klass":"open"}"#);
        assert!(unknown.unwrap_err().to_string().contains("klass"));
    }

    #[test]
    fn contradictory_profiles_are_refused_and_unknowns_are_the_worst_case() {
        let class_only = |c| NatProfile {
            class: Some(c),
            ..NatProfile::default()
        };
        assert_eq!(
            class_only(NatClass::FullCone).behaviour().unwrap(),
            NatClass::FullCone.behaviour()
        );
        assert_eq!(
            NatProfile::default().behaviour().unwrap(),
            NatClass::Symmetric.behaviour()
        );
        let blocked_but_open = NatProfile {
            udp_blocked: Some(true),
            ..class_only(NatClass::Open)
        };
        assert_eq!(blocked_but_open.behaviour().unwrap_err().field, "class");
        let not_blocked = NatProfile {
            udp_blocked: Some(false),
            ..class_only(NatClass::UdpBlocked)
        };
        assert_eq!(not_blocked.behaviour().unwrap_err().field, "udp_blocked");
        let wrong_class = NatProfile {
            class: Some(NatClass::Open),
            ..behind(
                Some(Mapping::EndpointIndependent),
                Some(Filtering::AddressDependent),
            )
        };
        let e = wrong_class.behaviour().unwrap_err();
        assert_eq!(e.field, "class");
        assert!(e.detail.contains("restricted-cone"), "{e}");
        let lying_no_nat = behind(Some(Mapping::NoNat), Some(Filtering::EndpointIndependent));
        assert_eq!(lying_no_nat.behaviour().unwrap_err().field, "mapping");
    }
}

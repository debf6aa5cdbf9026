//! The plan API's request and response documents, their validation, and
//! building a plan from a registry snapshot (pure: the caller passes the
//! snapshot, the clock and the randomness).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use natrix_model::invitation::Invitation;
use natrix_model::{NatProfile, ProfileError, SessionToken, Technique, TurnSecret};
use natrix_registry::{HostRecord, Snapshot, State};
use serde::{Deserialize, Serialize};

use crate::planner::{Mode, Side, decide};
use crate::select::{Need, select};

/// `POST /v1/plan`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// The first peer.
    pub a: PeerRequest,
    /// The second peer.
    pub b: PeerRequest,
    /// A direct attempt failed: plan a relay.
    #[serde(default)]
    pub retry: bool,
}

/// One peer of a plan request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRequest {
    /// What `natrix probe --json` printed for this peer.
    pub profile: NatProfile,
    /// Region hint for relay selection (e.g. `eu-west-1`).
    #[serde(default)]
    pub region: Option<String>,
}

/// An error for the client, as an RFC 9457 problem document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// HTTP status.
    pub status: u16,
    /// Short, fixed title.
    pub title: &'static str,
    /// What is wrong, for humans.
    pub detail: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Why no plan was made. [`PlanError::problem`] is what the client gets,
/// [`PlanError::reason`] the `lookup_plan_errors_total` label: both by one
/// `match` on the cause.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The body is not a plan request: bad JSON, an unknown or missing
    /// field, a value of the wrong type.
    #[error("bad request: {detail}")]
    BadRequest {
        /// The parser's message.
        detail: String,
        /// The field it names, if any.
        field: Option<String>,
    },
    /// A peer's profile contradicts itself.
    #[error("{side}.profile.{}: {}", .error.field, .error.detail)]
    Profile {
        /// Whose profile.
        side: Side,
        /// What is wrong with it.
        error: ProfileError,
    },
    /// No active CDX node is registered: the peers could not exchange
    /// connection data.
    #[error("no CDX node is registered")]
    NoCdx,
    /// No active relay with capacity left (with TCP or TLS, for a side that
    /// cannot use UDP).
    #[error("no relay with capacity")]
    NoRelay {
        /// Whether the side could use UDP.
        udp: bool,
    },
    /// The registry snapshot is older than the limit: the coordination
    /// store is likely unreachable.
    #[error("the relay registry is stale")]
    StaleRegistry {
        /// How old the snapshot is.
        age: Duration,
        /// The limit.
        limit: Duration,
    },
    /// lookup holds no TURN secret to mint tokens with (a configuration
    /// bug: the flag is required).
    #[error("no TURN secret")]
    NoSecret,
}

impl PlanError {
    /// The label of `lookup_plan_errors_total` this error counts under.
    pub const fn reason(&self) -> &'static str {
        match self {
            PlanError::BadRequest { .. } => "bad_request",
            PlanError::Profile { .. } => "unprocessable",
            PlanError::NoCdx => "no_cdx",
            PlanError::NoRelay { .. } | PlanError::StaleRegistry { .. } => "no_relay",
            PlanError::NoSecret => "internal",
        }
    }

    /// The problem document the client gets.
    pub fn problem(&self) -> Problem {
        let (status, title, field) = match self {
            PlanError::BadRequest { field, .. } => (400, "bad request", field.clone()),
            PlanError::Profile { side, error } => (
                422,
                "impossible profile",
                Some(format!("{side}.profile.{}", error.field)),
            ),
            PlanError::NoCdx | PlanError::NoRelay { .. } | PlanError::StaleRegistry { .. } => {
                (503, "no capacity", None)
            }
            PlanError::NoSecret => (500, "misconfigured", None),
        };
        let detail = match self {
            PlanError::BadRequest { detail, .. } => detail.clone(),
            PlanError::Profile { error, .. } => error.detail.clone(),
            PlanError::NoCdx => {
                "no CDX node is registered: the peers cannot exchange connection data".into()
            }
            PlanError::NoRelay { udp: true } => {
                "no registered relay is active with capacity left".into()
            }
            PlanError::NoRelay { udp: false } => "no registered relay with TCP or TLS is active with capacity left (this peer cannot use UDP)".into(),
            PlanError::StaleRegistry { age, limit } => format!(
                "the relay registry was last read {} ago (limit {}); the coordination store may be unreachable",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(*limit)
            ),
            PlanError::NoSecret => "lookup has no TURN secret to mint tokens with".into(),
        };
        Problem {
            status,
            title,
            detail,
            field,
        }
    }
}

fn behaviour(profile: &NatProfile, side: Side) -> Result<natrix_model::nat::Behaviour, PlanError> {
    profile
        .behaviour()
        .map_err(|error| PlanError::Profile { side, error })
}

fn ipv6_behaviour(
    profile: &NatProfile,
    side: Side,
) -> Result<Option<natrix_model::nat::Behaviour>, PlanError> {
    profile
        .ipv6_behaviour()
        .map_err(|error| PlanError::Profile { side, error })
}

/// One ICE server in WebRTC `RTCIceServer` form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:`, `turn:` or `turns:` URLs.
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub username: Option<String>,
    /// TURN password.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential: Option<String>,
}

/// The relay a side was assigned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAssignment {
    /// The relay's id (as in its tokens).
    pub id: String,
    /// Its region.
    pub region: String,
}

/// How a side reaches the exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeInfo {
    /// CDX nodes (UDP `host:port`), nearest first.
    pub cdx: Vec<String>,
    /// The side's invitation (`<ticket hex>.<key hex>`).
    pub invitation: String,
}

/// One side of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidePlan {
    /// Whether this side allocates a relay (and sends through it).
    pub relayed: bool,
    /// A direct side that may fail to punch: it allocates on its relay too,
    /// offers the relayed address, and sends on whichever path answers
    /// first, moving to the direct path once that is confirmed.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub race: bool,
    /// Its relay, when it allocates one.
    pub relay: Option<RelayAssignment>,
    /// ICE servers: the CDX nodes as STUN, and the relay as TURN.
    pub ice_servers: Vec<IceServer>,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
    /// The connection-data exchange.
    pub exchange: ExchangeInfo,
    /// The path is planned over IPv6 (both sides reach the servers there
    /// and IPv6 allows the classic punch): the side opens an IPv6 socket,
    /// offers its IPv6 candidates besides the IPv4 ones, and prefers an
    /// IPv6 path.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub ipv6: bool,
    /// In a direct plan: how this side opens the path (the technique,
    /// sockets to open, ports to probe, and the deadline after which it asks
    /// for a relay with `retry`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub punch: Option<natrix_model::PunchPlan>,
}

/// `POST /v1/plan`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanResponse {
    /// The session id (hex).
    pub session: String,
    /// `direct`, `relay-one` or `relay-both`.
    pub mode: String,
    /// With `relay-one`: the side that relays.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub relayed_side: Option<Side>,
    /// Unix seconds when tokens and the session expire.
    pub expires: u64,
    /// The first peer's part.
    pub a: SidePlan,
    /// The second peer's part.
    pub b: SidePlan,
    /// The ticket a client reports the plan's outcome with
    /// (`POST /v1/outcomes`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub report: String,
}

/// What plans are made with.
#[derive(Clone, Debug)]
pub struct Minting {
    /// TURN secrets, newest first (tokens use the first).
    pub turn_secrets: Vec<TurnSecret>,
    /// The cluster secret (exchange tickets).
    pub cluster_secret: Vec<u8>,
    /// Token and session lifetime in seconds.
    pub ttl: u64,
    /// Utilisation above which a relay gets no new sessions.
    pub headroom: f64,
}

/// The addresses a side's relay may send to: the counterpart's public IPs
/// (from its profile) and, when it relays too, its relay's IPs. Empty when
/// the profile names none and the counterpart does not relay: then the
/// token carries no scope (the relay's deny list still applies).
fn counterpart_ips(profile: &NatProfile, relay: Option<&HostRecord>) -> Vec<IpAddr> {
    let own = profile
        .mapped_address
        .into_iter()
        .chain(profile.tcp_mapped_address)
        .chain(profile.ipv6.as_ref().and_then(|v6| v6.mapped_address));
    let relayed = relay
        .into_iter()
        .flat_map(|r| r.udp.iter().chain(&r.tcp).chain(&r.tls).copied());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in own.chain(relayed).map(|a| a.ip()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

fn host_port(a: &SocketAddr) -> String {
    a.to_string()
}

fn turn_urls(r: &HostRecord, udp: bool) -> Vec<String> {
    let mut urls = Vec::new();
    if udp {
        urls.extend(
            r.udp
                .iter()
                .map(|a| format!("turn:{}?transport=udp", host_port(a))),
        );
    }
    urls.extend(
        r.tcp
            .iter()
            .map(|a| format!("turn:{}?transport=tcp", host_port(a))),
    );
    urls.extend(
        r.tls
            .iter()
            .map(|a| format!("turns:{}?transport=tcp", host_port(a))),
    );
    urls
}

/// Builds the plan for `req` from `snapshot` at `now` (Unix seconds), for
/// `tenant` (the caller's key id, which the relay tokens carry).
/// `random(n)` returns a number below `n`; `fill` fills bytes randomly.
pub fn plan(
    req: &PlanRequest,
    snapshot: &Snapshot,
    minting: &Minting,
    tenant: Option<&str>,
    now: u64,
    random: &mut dyn FnMut(usize) -> usize,
    fill: &mut dyn FnMut(&mut [u8]),
) -> Result<PlanResponse, PlanError> {
    let (mut a, mut b) = (
        behaviour(&req.a.profile, Side::A)?,
        behaviour(&req.b.profile, Side::B)?,
    );
    let mut mode = decide(&a, &b, req.retry);
    // Both sides reach the servers over IPv6 too: where IPv6 allows the
    // classic punch (no NAT there, stateful firewalls at most), both go
    // direct over it, whatever their IPv4 NATs say.
    let over_ipv6 = match (
        ipv6_behaviour(&req.a.profile, Side::A)?,
        ipv6_behaviour(&req.b.profile, Side::B)?,
    ) {
        (Some(a6), Some(b6)) => match decide(&a6, &b6, req.retry) {
            m @ Mode::Direct([p, _]) if p.technique == Technique::Classic => {
                (a, b, mode) = (a6, b6, m);
                true
            }
            _ => false,
        },
        _ => false,
    };
    let profiles = [&req.a.profile, &req.b.profile].map(|p| match (over_ipv6, &p.ipv6) {
        (true, Some(v6)) => &**v6,
        _ => p,
    });
    let cdx: Vec<&HostRecord> = snapshot
        .cdx
        .iter()
        .filter(|c| c.state == State::Active && !c.udp.is_empty())
        .collect();
    if cdx.is_empty() {
        return Err(PlanError::NoCdx);
    }
    let expires = now + minting.ttl;
    let invitations = Invitation::mint_session(&minting.cluster_secret, 2, expires, fill);
    let session = invitations
        .first()
        .map(|i| i.session().hex())
        .unwrap_or_default();
    // Relays first: a side's token names the counterpart's relay too.
    let peers = [(Side::A, a, &req.a), (Side::B, b, &req.b)];
    // A direct attempt that may fail (birthday punching, prediction) races
    // the relay the retry would use: that side allocates while it punches.
    let race = match mode {
        Mode::Direct([p, _]) if p.technique != Technique::Classic => Some(decide(&a, &b, true)),
        _ => None,
    };
    // Both sides keep the path alive for the shorter-lived of their NATs.
    let keepalive_ms = natrix_model::keepalive(profiles[0], profiles[1]);
    let mut chosen: [Option<&HostRecord>; 2] = [None, None];
    for (i, (side, behaviour, peer)) in peers.iter().enumerate() {
        let racing = race.is_some_and(|m| m.relays(*side));
        if !mode.relays(*side) && !racing {
            continue;
        }
        let udp = !behaviour.udp_blocked;
        let region = peer.region.as_deref();
        let Some(r) = select(
            &snapshot.relays,
            Need { udp, region },
            minting.headroom,
            random,
        ) else {
            if racing {
                // No relay to race: the direct attempt alone.
                continue;
            }
            return Err(PlanError::NoRelay { udp });
        };
        chosen[i] = Some(r);
    }
    let mut sides = Vec::new();
    for (i, ((side, behaviour, peer), invitation)) in peers.iter().zip(&invitations).enumerate() {
        let region = peer.region.as_deref();
        // The side's region first among the CDX nodes.
        let mut nodes = cdx.clone();
        nodes.sort_by_key(|c| region.is_none_or(|r| c.region != r));
        let mut ice_servers = vec![IceServer {
            urls: nodes
                .iter()
                .flat_map(|c| c.udp.iter().map(|a| format!("stun:{}", host_port(a))))
                .collect(),
            username: None,
            credential: None,
        }];
        let mut relay = None;
        if let Some(r) = chosen[i] {
            let Some(secret) = minting.turn_secrets.first() else {
                return Err(PlanError::NoSecret);
            };
            let other = 1 - i;
            let scope = counterpart_ips(&peers[other].2.profile, chosen[other]);
            let token = SessionToken {
                expires,
                session: session.clone(),
                tenant: tenant.map(str::to_owned),
                relay_id: r.id.clone(),
                peers: (!scope.is_empty()).then_some(scope),
            };
            let (username, credential) = token.mint(secret);
            ice_servers.push(IceServer {
                urls: turn_urls(r, !behaviour.udp_blocked),
                username: Some(username),
                credential: Some(credential),
            });
            relay = Some(RelayAssignment {
                id: r.id.clone(),
                region: r.region.clone(),
            });
        }
        sides.push(SidePlan {
            ipv6: over_ipv6,
            relayed: mode.relays(*side),
            race: !mode.relays(*side) && relay.is_some(),
            relay,
            ice_servers,
            ttl: minting.ttl,
            exchange: ExchangeInfo {
                cdx: nodes
                    .iter()
                    .flat_map(|c| c.udp.iter().map(host_port))
                    .collect(),
                invitation: invitation.to_string(),
            },
            punch: mode
                .punch(*side)
                .map(|p| natrix_model::PunchPlan { keepalive_ms, ..p }),
        });
    }
    let (Some(b_plan), Some(a_plan)) = (sides.pop(), sides.pop()) else {
        unreachable!("two sides were pushed");
    };
    let report = crate::outcomes::mint(
        &minting.cluster_secret,
        &session,
        mode.name(),
        a.class(),
        b.class(),
        expires,
    );
    Ok(PlanResponse {
        report,
        session,
        mode: mode.name().to_owned(),
        relayed_side: match mode {
            Mode::RelayOne(s) => Some(s),
            _ => None,
        },
        expires,
        a: a_plan,
        b: b_plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use natrix_registry::{Load, Role};

    fn host(id: &str, role: Role, tcp: bool) -> HostRecord {
        HostRecord {
            id: id.into(),
            role,
            region: "eu".into(),
            zone: String::new(),
            udp: vec!["192.0.2.1:3478".parse().unwrap()],
            tcp: if tcp {
                vec!["192.0.2.1:3478".parse().unwrap()]
            } else {
                vec![]
            },
            tls: vec![],
            dtls: vec![],
            capacity: 10,
            load: Load::default(),
            state: State::Active,
            heartbeat_ms: 0,
            ttl_ms: 0,
            internal: Vec::new(),
        }
    }

    fn minting() -> Minting {
        Minting {
            turn_secrets: vec!["k=0123456789abcdef".parse().unwrap()],
            cluster_secret: b"cluster secret of some length".to_vec(),
            ttl: 600,
            headroom: 0.9,
        }
    }

    fn request(a: &str, b: &str) -> PlanRequest {
        serde_json::from_str(&format!(
            r#"{{"a":{{"profile":{{"class":"{a}"}}}},"b":{{"profile":{{"class":"{b}"}}}}}}"#
        ))
        .unwrap()
    }

    fn run(req: &PlanRequest, snapshot: &Snapshot) -> Result<PlanResponse, PlanError> {
        let mut n = 0u8;
        plan(
            req,
            snapshot,
            &minting(),
            None,
            1000,
            &mut |k| k - 1,
            &mut |b| {
                for x in b.iter_mut() {
                    n = n.wrapping_add(1);
                    *x = n;
                }
            },
        )
    }

    #[test]
    fn a_symmetric_nat_facing_a_port_restricted_cone_is_planned_as_a_birthday_punch() {
        let snap = Snapshot {
            relays: vec![host("r1", Role::Relay, false)],
            cdx: vec![host("c1", Role::Cdx, false)],
            taken_ms: 1,
        };
        let p = run(&request("symmetric", "port-restricted-cone"), &snap).unwrap();
        assert_eq!(p.mode, "direct");
        let (a, b) = (p.a.punch.unwrap(), p.b.punch.unwrap());
        assert_eq!(a.technique, natrix_model::Technique::Birthday);
        assert_eq!((a.sockets, b.spray), (256, 1600));
        // The hard side races its relay: a token for it, still direct.
        assert!(p.a.race && !p.a.relayed && !p.b.race);
        assert_eq!(p.a.relay.as_ref().unwrap().id, "r1");
        assert_eq!(p.a.ice_servers.len(), 2);
        assert_eq!(p.b.ice_servers.len(), 1);
        let json = serde_json::to_value(&p.b).unwrap();
        assert_eq!(
            json["punch"],
            serde_json::json!({"technique": "birthday", "spray": 1600, "deadline_ms": 3000, "keepalive_ms": 15000})
        );
        // The retry after a failed attempt relays the symmetric side.
        let mut req = request("symmetric", "port-restricted-cone");
        req.retry = true;
        let p = run(&req, &snap).unwrap();
        assert_eq!(
            (p.mode.as_str(), p.relayed_side),
            ("relay-one", Some(Side::A))
        );
    }

    #[test]
    fn dual_stack_peers_behind_ipv6_firewalls_go_direct_over_ipv6_whatever_their_ipv4_nats() {
        let snap = Snapshot {
            relays: vec![host("r1", Role::Relay, false)],
            cdx: vec![host("c1", Role::Cdx, false)],
            taken_ms: 1,
        };
        // Two random-port symmetric IPv4 NATs (relayed over IPv4), each
        // client also on IPv6 behind a stateful firewall (no NAT).
        let side = |v6: &str, lifetime: u32| {
            format!(
                r#"{{"profile":{{"class":"symmetric","port_allocation":"random","mapping_lifetime":60,
                    "ipv6":{{"local_address":"[{v6}]:5000","mapped_address":"[{v6}]:5000",
                    "mapping":"no-nat","filtering":"address-and-port-dependent","mapping_lifetime":{lifetime}}}}}}}"#
            )
        };
        let body = |retry: bool, b: &str| {
            format!(
                r#"{{"a":{},"b":{b},"retry":{retry}}}"#,
                side("2001:db8:20:1::2", 30)
            )
        };
        let both = body(false, &side("2001:db8:21:1::2", 20));
        let p = run(&serde_json::from_str(&both).unwrap(), &snap).unwrap();
        assert_eq!(p.mode, "direct");
        assert!(p.a.ipv6 && p.b.ipv6, "{p:?}");
        let punch = p.a.punch.unwrap();
        assert_eq!(punch.technique, natrix_model::Technique::Classic);
        // Kept alive for the shorter-lived IPv6 firewall, not the NATs.
        assert!(punch.keepalive_ms < 20_000, "{punch:?}");
        assert!(!p.a.race && p.a.relay.is_none());
        // The retry relays over IPv4 as before.
        let retry = body(true, &side("2001:db8:21:1::2", 20));
        let p = run(&serde_json::from_str(&retry).unwrap(), &snap).unwrap();
        assert!(p.mode.starts_with("relay"), "{p:?}");
        assert!(!p.a.ipv6);
        // Only one side on IPv6: the IPv4 NATs decide.
        let one = body(
            false,
            r#"{"profile":{"class":"symmetric","port_allocation":"random"}}"#,
        );
        let p = run(&serde_json::from_str(&one).unwrap(), &snap).unwrap();
        assert!(p.mode.starts_with("relay"), "{p:?}");
        assert!(!p.a.ipv6 && !p.b.ipv6);
        // An IPv6 profile naming IPv4 addresses is refused, naming the field.
        let bad = both.replacen("[2001:db8:20:1::2]:5000", "203.0.113.9:5000", 2);
        let e = run(&serde_json::from_str(&bad).unwrap(), &snap).unwrap_err();
        assert_eq!(e.problem().field.as_deref(), Some("a.profile.ipv6"));
    }

    #[test]
    fn a_relay_one_plan_gives_the_relayed_side_a_token_for_its_relay() {
        let snap = Snapshot {
            relays: vec![host("r1", Role::Relay, false)],
            cdx: vec![host("c1", Role::Cdx, false)],
            taken_ms: 1,
        };
        let p = run(&request("symmetric", "symmetric"), &snap).unwrap();
        assert_eq!(p.mode, "relay-one");
        assert_eq!(p.relayed_side, Some(Side::A));
        assert!(p.a.punch.is_none() && p.b.punch.is_none());
        assert!(p.a.relayed && !p.b.relayed);
        let turn = &p.a.ice_servers[1];
        assert_eq!(turn.urls, ["turn:192.0.2.1:3478?transport=udp"]);
        assert_eq!(
            turn.username.as_deref(),
            Some(format!("1600:{}:r1", p.session).as_str())
        );
        assert_eq!(p.b.ice_servers.len(), 1, "only STUN for the direct side");
        assert_eq!(p.a.ice_servers[0].urls, ["stun:192.0.2.1:3478"]);
        let inv: Invitation = p.b.exchange.invitation.parse().unwrap();
        assert_eq!(inv.session().hex(), p.session);
        assert_eq!(inv.participant(), 1);
    }

    #[test]
    fn tokens_are_scoped_to_the_counterpart_and_its_relay_when_known() {
        let snap = Snapshot {
            relays: vec![host("r1", Role::Relay, true)],
            cdx: vec![host("c1", Role::Cdx, false)],
            taken_ms: 1,
        };
        let req: PlanRequest = serde_json::from_str(
            r#"{"a":{"profile":{"class":"symmetric","mapped_address":"198.51.100.9:4000"}},
                "b":{"profile":{"class":"symmetric","mapped_address":"198.51.100.20:5000"}}}"#,
        )
        .unwrap();
        let p = run(&req, &snap).unwrap();
        assert_eq!(p.mode, "relay-one");
        let user = p.a.ice_servers[1].username.clone().unwrap();
        assert!(user.ends_with(":r1:198.51.100.20"), "{user}");
        // Both UDP-blocked: each relay may reach the other side's relay.
        let both = run(&request("udp-blocked", "udp-blocked"), &snap).unwrap();
        assert_eq!(both.mode, "relay-both");
        let user = both.a.ice_servers[1].username.clone().unwrap();
        assert!(user.ends_with(":r1:192.0.2.1"), "{user}");
        // Nothing known of the counterpart: no scope.
        let open = run(&request("symmetric", "symmetric"), &snap).unwrap();
        let user = open.a.ice_servers[1].username.clone().unwrap();
        assert_eq!(user.matches(':').count(), 2, "{user}");
    }

    #[test]
    fn missing_cdx_or_relays_are_503_and_udp_blocked_needs_tcp() {
        let no_cdx = Snapshot {
            relays: vec![host("r1", Role::Relay, false)],
            cdx: vec![],
            taken_ms: 1,
        };
        assert_eq!(
            run(&request("open", "open"), &no_cdx).unwrap_err().reason(),
            "no_cdx"
        );
        let udp_only = Snapshot {
            relays: vec![host("r1", Role::Relay, false)],
            cdx: vec![host("c1", Role::Cdx, false)],
            taken_ms: 1,
        };
        let e = run(&request("udp-blocked", "open"), &udp_only).unwrap_err();
        assert_eq!((e.problem().status, e.reason()), (503, "no_relay"));
        assert!(e.problem().detail.contains("TCP"), "{e:?}");
        let with_tcp = Snapshot {
            relays: vec![host("r1", Role::Relay, true)],
            ..udp_only
        };
        let p = run(&request("udp-blocked", "open"), &with_tcp).unwrap();
        assert_eq!(
            p.a.ice_servers[1].urls,
            ["turn:192.0.2.1:3478?transport=tcp"]
        );
        // A direct plan needs no relay at all.
        let direct = run(&request("open", "symmetric"), &with_tcp).unwrap();
        assert_eq!(direct.mode, "direct");
    }

    #[test]
    fn contradictory_profiles_are_422_naming_the_field() {
        let bad: PlanRequest = serde_json::from_str(
            r#"{"a":{"profile":{"class":"open","mapping":"address-dependent","filtering":"endpoint-independent"}},
                "b":{"profile":{"class":"open"}}}"#,
        )
        .unwrap();
        let snap = Snapshot::default();
        let e = run(&bad, &snap).unwrap_err().problem();
        assert_eq!(e.status, 422);
        assert_eq!(e.field.as_deref(), Some("a.profile.class"));
        let blocked: PlanRequest = serde_json::from_str(
            r#"{"a":{"profile":{"class":"open"}},"b":{"profile":{"class":"full-cone","udp_blocked":true}}}"#,
        )
        .unwrap();
        assert_eq!(
            run(&blocked, &snap).unwrap_err().problem().field.as_deref(),
            Some("b.profile.class")
        );
        // Unknown fields are refused by the parser (400 at the HTTP layer).
        assert!(
            serde_json::from_str::<PlanRequest>(
                r#"{"a":{"profile":{},"color":1},"b":{"profile":{}}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_real_probe_report_is_accepted_as_is() {
        let probe = r#"{"server":"203.0.113.1:3478","transport":"udp","local_address":"10.1.0.2:40000",
            "mapped_address":"198.51.100.6:40000","behind_nat":true,"mapping":"endpoint-independent",
            "filtering":"address-dependent","hairpinning":false,"class":"restricted-cone",
            "other_address":"203.0.113.2:3479","udp_blocked":false,"seconds":1.1}"#;
        let req: PlanRequest = serde_json::from_str(&format!(
            r#"{{"a":{{"profile":{probe},"region":"eu"}},"b":{{"profile":{probe}}},"retry":true}}"#
        ))
        .unwrap();
        let b = req.a.profile.behaviour().unwrap();
        assert_eq!(b.class(), natrix_model::NatClass::RestrictedCone);
    }
}

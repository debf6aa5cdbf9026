//! The plan API's request and response documents, their validation, and
//! building a plan from a registry snapshot (pure: the caller passes the
//! snapshot, the clock and the randomness).

use std::net::{IpAddr, SocketAddr};

use natrix_cdx::exchange::Invitation;
use natrix_registry::{HostRecord, Snapshot, State};
use serde::{Deserialize, Serialize};

use crate::planner::{Behaviour, Class, Filtering, Mapping, Mode, Side, decide};
use crate::select::{Need, select};
use crate::token::{TurnSecret, mint};

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
    pub profile: Profile,
    /// Region hint for relay selection (e.g. `eu-west-1`).
    #[serde(default)]
    pub region: Option<String>,
}

/// A NAT profile as `natrix probe --json` prints it. Every field is
/// optional; what the planner needs is `udp_blocked`, `mapping`,
/// `filtering` or, failing those, `class`.
#[allow(missing_docs)]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub server: Option<String>,
    pub transport: Option<String>,
    pub local_address: Option<String>,
    pub mapped_address: Option<SocketAddr>,
    pub behind_nat: Option<bool>,
    pub mapping: Option<Mapping>,
    pub filtering: Option<Filtering>,
    pub hairpinning: Option<bool>,
    pub class: Option<Class>,
    pub other_address: Option<String>,
    pub udp_blocked: Option<bool>,
    pub seconds: Option<f64>,
    pub tcp_mapped_address: Option<String>,
    pub error: Option<String>,
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

impl Problem {
    fn unprocessable(field: String, detail: String) -> Problem {
        Problem {
            status: 422,
            title: "impossible profile",
            detail,
            field: Some(field),
        }
    }

    fn unavailable(detail: &str) -> Problem {
        Problem {
            status: 503,
            title: "no capacity",
            detail: detail.to_owned(),
            field: None,
        }
    }

    /// The label of `lookup_plan_errors_total` this problem counts under.
    pub fn reason(&self) -> &'static str {
        match self.status {
            400 => "bad_request",
            422 => "unprocessable",
            503 if self.detail.contains("CDX") => "no_cdx",
            503 => "no_relay",
            _ => "internal",
        }
    }
}

impl Profile {
    /// The behaviours this profile describes; 422 when its fields
    /// contradict each other.
    pub fn behaviour(&self, side: &str) -> Result<Behaviour, Problem> {
        let field = |f: &str| format!("{side}.profile.{f}");
        let blocked = self.udp_blocked == Some(true) || self.class == Some(Class::UdpBlocked);
        if self.udp_blocked == Some(true) && self.class.is_some_and(|c| c != Class::UdpBlocked) {
            return Err(Problem::unprocessable(
                field("class"),
                "udp_blocked is true but the class is not udp-blocked".into(),
            ));
        }
        if self.udp_blocked == Some(false) && self.class == Some(Class::UdpBlocked) {
            return Err(Problem::unprocessable(
                field("udp_blocked"),
                "the class is udp-blocked but udp_blocked is false".into(),
            ));
        }
        if blocked {
            return Ok(Class::UdpBlocked.behaviour());
        }
        let from_class = self.class.map(Class::behaviour);
        // Unknown behaviours count as the worst case.
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
        };
        if let (Some(class), Some(_), Some(_)) = (self.class, self.mapping, self.filtering)
            && b.class() != class
        {
            return Err(Problem::unprocessable(
                field("class"),
                format!("mapping and filtering make {:?}, not {class:?}", b.class()),
            ));
        }
        if self.mapping == Some(Mapping::NoNat)
            && let (Some(m), Some(l)) = (self.mapped_address, self.local_address.as_deref())
            && l.parse::<SocketAddr>().is_ok_and(|l| l != m)
        {
            return Err(Problem::unprocessable(
                field("mapping"),
                "no-nat, but the mapped address differs from the local one".into(),
            ));
        }
        Ok(b)
    }
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
    /// Whether this side allocates a relay.
    pub relayed: bool,
    /// Its relay, when it allocates one.
    pub relay: Option<RelayAssignment>,
    /// ICE servers: the CDX nodes as STUN, and the relay as TURN.
    pub ice_servers: Vec<IceServer>,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
    /// The connection-data exchange.
    pub exchange: ExchangeInfo,
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
fn counterpart_ips(profile: &Profile, relay: Option<&HostRecord>) -> Vec<IpAddr> {
    let own = profile.mapped_address.into_iter().chain(
        profile
            .tcp_mapped_address
            .as_deref()
            .and_then(|t| t.parse::<SocketAddr>().ok()),
    );
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

/// Builds the plan for `req` from `snapshot` at `now` (Unix seconds).
/// `random(n)` returns a number below `n`; `fill` fills bytes randomly.
pub fn plan(
    req: &PlanRequest,
    snapshot: &Snapshot,
    minting: &Minting,
    now: u64,
    random: &mut dyn FnMut(usize) -> usize,
    fill: &mut dyn FnMut(&mut [u8]),
) -> Result<PlanResponse, Problem> {
    let a = req.a.profile.behaviour("a")?;
    let b = req.b.profile.behaviour("b")?;
    let mode = decide(&a, &b, req.retry);
    let cdx: Vec<&HostRecord> = snapshot
        .cdx
        .iter()
        .filter(|c| c.state == State::Active && !c.udp.is_empty())
        .collect();
    if cdx.is_empty() {
        return Err(Problem::unavailable(
            "no CDX node is registered: the peers cannot exchange connection data",
        ));
    }
    let expires = now + minting.ttl;
    let invitations = Invitation::mint_session(&minting.cluster_secret, 2, expires, fill);
    let session = invitations
        .first()
        .map(|i| i.session().hex())
        .unwrap_or_default();
    // Relays first: a side's token names the counterpart's relay too.
    let peers = [(Side::A, a, &req.a), (Side::B, b, &req.b)];
    let mut chosen: [Option<&HostRecord>; 2] = [None, None];
    for (i, (side, behaviour, peer)) in peers.iter().enumerate() {
        if !mode.relays(*side) {
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
            return Err(Problem::unavailable(if udp {
                "no registered relay is active with capacity left"
            } else {
                "no registered relay with TCP or TLS is active with capacity left (this peer cannot use UDP)"
            }));
        };
        chosen[i] = Some(r);
    }
    let mut sides = Vec::new();
    for (i, ((_, behaviour, peer), invitation)) in peers.iter().zip(&invitations).enumerate() {
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
                return Err(Problem {
                    status: 500,
                    title: "misconfigured",
                    detail: "lookup has no TURN secret to mint tokens with".into(),
                    field: None,
                });
            };
            let other = 1 - i;
            let scope = counterpart_ips(&peers[other].2.profile, chosen[other]);
            let (username, credential) = mint(secret, expires, &session, &r.id, &scope);
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
            relayed: relay.is_some(),
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
        });
    }
    let (Some(b_plan), Some(a_plan)) = (sides.pop(), sides.pop()) else {
        unreachable!("two sides were pushed");
    };
    Ok(PlanResponse {
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

    fn run(req: &PlanRequest, snapshot: &Snapshot) -> Result<PlanResponse, Problem> {
        let mut n = 0u8;
        plan(req, snapshot, &minting(), 1000, &mut |k| k - 1, &mut |b| {
            for x in b.iter_mut() {
                n = n.wrapping_add(1);
                *x = n;
            }
        })
    }

    #[test]
    fn a_relay_one_plan_gives_the_relayed_side_a_token_for_its_relay() {
        let snap = Snapshot {
            relays: vec![host("r1", Role::Relay, false)],
            cdx: vec![host("c1", Role::Cdx, false)],
            taken_ms: 1,
        };
        let p = run(&request("symmetric", "port-restricted-cone"), &snap).unwrap();
        assert_eq!(p.mode, "relay-one");
        assert_eq!(p.relayed_side, Some(Side::A));
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
        assert_eq!((e.status, e.reason()), (503, "no_relay"));
        assert!(e.detail.contains("TCP"), "{e:?}");
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
        let e = run(&bad, &snap).unwrap_err();
        assert_eq!(e.status, 422);
        assert_eq!(e.field.as_deref(), Some("a.profile.class"));
        let blocked: PlanRequest = serde_json::from_str(
            r#"{"a":{"profile":{"class":"open"}},"b":{"profile":{"class":"full-cone","udp_blocked":true}}}"#,
        )
        .unwrap();
        assert_eq!(
            run(&blocked, &snap).unwrap_err().field.as_deref(),
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
        let b = req.a.profile.behaviour("a").unwrap();
        assert_eq!(b.class(), Class::RestrictedCone);
    }
}

//! `natrix-loadtest peer`: one participant of a session, end to end —
//! mapped address, (optionally) NAT discovery, connection-data exchange
//! through CDX, and a direct UDP punch to the other participant. Prints one
//! JSON line; the NAT lab's matrix runs two of these per pair of NATs.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use natrix_cdx::exchange::client::{
    Candidate, CandidateKind, ConnectionData, exchange, mapped_address, punch,
};
use natrix_model::Nat64Prefix;
use natrix_model::invitation::Invitation;

/// Options of `peer`.
#[derive(clap::Args, Debug)]
pub(crate) struct PeerArgs {
    /// CDX node to exchange through (`host:port`).
    #[arg(long)]
    pub(crate) cdx: SocketAddr,
    /// This participant's invitation (`<ticket hex>.<key hex>`, as lookup
    /// hands it out); also read from NATRIX_INVITATION.
    #[arg(long, env = "NATRIX_INVITATION", required_unless_present_any = ["plan_side", "profile_only"])]
    pub(crate) invitation: Option<Invitation>,
    /// This participant's part of a lookup plan (the `a` or `b` object, as
    /// JSON; also read from NATRIX_PLAN_SIDE): exchange through its CDX,
    /// then punch directly or through its TURN relay, as planned.
    #[arg(long, env = "NATRIX_PLAN_SIDE")]
    pub(crate) plan_side: Option<String>,
    /// Only run NAT discovery against --cdx and print the profile (as a
    /// plan request wants it).
    #[arg(long)]
    pub(crate) profile_only: bool,
    /// Run RFC 5780 discovery first and share the NAT class (adds about a
    /// second).
    #[arg(long)]
    pub(crate) discover: bool,
    /// Longest wait for the other participant's data.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) exchange_timeout: Duration,
    /// Longest punch attempt.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) punch_timeout: Duration,
    /// With --plan-side: keep a direct path this long after punching,
    /// sending only keepalives, then check it still carries packets.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) hold: Option<Duration>,
    /// With --hold: the keepalive interval (default: the plan's
    /// `keepalive_ms`, from the measured mapping lifetimes).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) keepalive: Option<Duration>,
    /// With --profile-only: also measure the mapping lifetime, idling
    /// sockets up to this long (as `natrix probe --lifetime`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) lifetime: Option<Duration>,
    /// With --hold: find a broken path again (new Binding, a newer entry
    /// through CDX, a new punch), as after a change of network.
    #[arg(long)]
    pub(crate) recover: bool,
    /// On a host without an IPv4 route (IPv6-only): reach IPv4 servers and
    /// peers through NAT64 at their addresses in this /96 prefix.
    #[arg(long, env = "NATRIX_NAT64_PREFIX", default_value = "64:ff9b::/96")]
    pub(crate) nat64_prefix: Nat64Prefix,
    /// With --profile-only: also run discovery over IPv6 against this CDX
    /// address (nested as `ipv6` in the profile), where the host has an
    /// IPv6 route to it.
    #[arg(long)]
    pub(crate) ipv6_cdx: Option<SocketAddr>,
}

/// Runs one participant and returns its JSON report (never fails: errors
/// are part of the report).
pub(crate) fn run(args: &PeerArgs) -> serde_json::Value {
    let started = Instant::now();
    // An IPv6-only host reaches the IPv4 CDX node through NAT64.
    let (bind, nat64) = natrix_cdx::client::reach(args.cdx, args.nat64_prefix);
    let cdx = nat64.map_or(args.cdx, |p| p.synthesize(args.cdx));
    if args.profile_only {
        return match natrix_cdx::client::discover_via(args.cdx, bind, nat64) {
            Ok(mut p) => {
                if let Some(max) = args.lifetime
                    && nat64.is_none()
                    && let Err(e) =
                        natrix_cdx::client::add_mapping_lifetime(&mut p, args.cdx, bind.ip(), max)
                {
                    p.error = Some(format!("measuring the mapping lifetime: {e}"));
                }
                if let Some(cdx6) = args.ipv6_cdx {
                    match natrix_cdx::client::discover_ipv6(cdx6, args.lifetime) {
                        Ok(v6) => p.ipv6 = v6.map(Box::new),
                        Err(e) => p.error = Some(format!("discovery over IPv6: {e}")),
                    }
                }
                serde_json::to_value(p).unwrap_or_default()
            }
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
    }
    if let Some(plan) = &args.plan_side {
        let side: serde_json::Value = match serde_json::from_str(plan) {
            Ok(v) => v,
            Err(e) => return serde_json::json!({"ok": false, "error": format!("--plan-side: {e}")}),
        };
        let timeout = args.exchange_timeout.max(args.punch_timeout);
        return match crate::e2e::side(
            &side,
            "0.0.0.0"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            started,
            timeout,
            // In the lab a side planned over TCP really has no UDP.
            false,
            args.hold.map(|duration| crate::hold::Hold {
                duration,
                keepalive: args.keepalive,
                recover: args.recover,
            }),
            Some(args.nat64_prefix),
        ) {
            Ok(r) => serde_json::json!({
                "ok": r.ok,
                "relayed": r.relayed,
                "direct": r.ok && !r.relayed,
                "first_packet_ms": crate::e2e::ms(r.first_packet),
                "rtt_ms": crate::e2e::ms(r.rtt),
                "technique": r.technique,
                "probes": r.probes,
                "direct_ms": crate::e2e::ms(r.direct),
                "raced": r.raced,
                "relayed_first": r.relayed_first,
                "held": r.held.as_ref().map(crate::hold::Held::json),
                "keepalive_ms": r.keepalive.map(|k| k.as_millis() as u64),
                "path": r.path.map(|a| a.to_string()),
            }),
            Err(e) => {
                serde_json::json!({"ok": false, "relayed": side["relayed"], "error": format!("{e:#}")})
            }
        };
    }
    let Some(invitation) = &args.invitation else {
        return serde_json::json!({"ok": false, "error": "no --invitation"});
    };
    let mut report = serde_json::json!({
        "participant": invitation.participant(),
        "direct": false,
    });
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let fail = |mut r: serde_json::Value, stage: &str, e: String| {
        r["stage"] = stage.into();
        r["error"] = e.into();
        r
    };
    let socket = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return fail(report, "socket", e.to_string()),
    };
    let mut class = None;
    let mut codes = None;
    if args.discover {
        match natrix_cdx::client::discover_via(args.cdx, bind, nat64) {
            Ok(p) => {
                class = p.class;
                codes = Some(p.codes());
                report["class"] = class.map(|c| c.name()).into();
            }
            Err(e) => return fail(report, "discover", e.to_string()),
        }
    }
    let mapped = match mapped_address(&socket, cdx, Duration::from_secs(1)) {
        Ok(Some(m)) => m,
        Ok(None) => {
            return fail(
                report,
                "binding",
                "no UDP answer from CDX: UDP blocked or CDX unreachable".into(),
            );
        }
        Err(e) => return fail(report, "binding", e.to_string()),
    };
    report["mapped"] = mapped.to_string().into();
    let local = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut candidates = vec![Candidate {
        kind: CandidateKind::ServerReflexive,
        addr: mapped,
    }];
    // The host candidate: the address the route to CDX leaves from.
    if let Ok(ip) = natrix_cdx::client::route_source(bind.ip(), cdx)
        && ip != mapped.ip()
    {
        candidates.push(Candidate {
            kind: CandidateKind::Host,
            addr: SocketAddr::new(ip, local),
        });
    }
    let data = ConnectionData { class, candidates };
    let t = Instant::now();
    let got = match exchange(
        &socket,
        cdx,
        invitation,
        &data,
        codes,
        1,
        args.exchange_timeout,
    ) {
        Ok(g) => g,
        Err(e) => return fail(report, "exchange", e.to_string()),
    };
    report["exchange_ms"] = ms(t.elapsed()).into();
    let Some((&other, peer)) = got.peers.iter().next() else {
        return fail(report, "exchange", "no other participant".into());
    };
    report["peer_class"] = peer.class.map(|c| c.name()).into();
    // Through NAT64 the peer's IPv4 candidates are reached at their
    // synthesized addresses.
    let peer = &peer.through(nat64);
    let t = Instant::now();
    match punch(&socket, invitation, other, peer, args.punch_timeout) {
        Ok(p) => {
            report["direct"] = true.into();
            report["peer_addr"] = p.peer.to_string().into();
            report["punch_ms"] = ms(p.elapsed).into();
            report["rtt_ms"] = ms(p.rtt).into();
            report["time_to_direct_ms"] = ms(started.elapsed() - (t.elapsed() - p.elapsed)).into();
            report
        }
        Err(e) => fail(report, "punch", e.to_string()),
    }
}

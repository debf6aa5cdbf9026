//! `natrix-loadtest e2e`: the whole flow for client pairs, as applications
//! run it — NAT discovery against CDX, a plan from lookup, the
//! connection-data exchange, then a direct punch or the planned TURN relay,
//! and datagrams both ways (the punch's probes and acknowledgements).
//! Reports success and time to the first packet each way, per mode.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use natrix_cdx::client::discover;
use natrix_cdx::exchange::client::{
    Candidate, CandidateKind, ConnectionData, PROBE_INTERVAL, ProbeCodec, ProbeMessage,
    PunchSockets, exchange, exchange_tcp, mapped_address, punch_with,
};
use natrix_model::invitation::Invitation;
use natrix_model::{Nat64Prefix, NatProfile, PunchPlan};
use natrix_wire::{ChannelData, ChannelNumber};

use crate::hold::{Held, Hold, Recovery, Standby, data_indication, hold_path, hold_via_turn};
use crate::live::{Units, live};
use crate::stats::Latency;
use crate::turn::{Credentials, TurnClient};

/// Options of `e2e`.
#[derive(clap::Args, Debug)]
pub(crate) struct E2eArgs {
    /// lookup API key (`nxk_…`; `natrix up` prints a development one).
    #[arg(long = "api-key", env = "NATRIX_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// lookup's API (`host:port`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) lookup: String,
    /// Client pairs, run at the same time.
    #[arg(long, value_parser = crate::positive, default_value_t = 4)]
    pub(crate) pairs: usize,
    /// Ask for relayed plans (as after a failed direct attempt).
    #[arg(long)]
    pub(crate) retry: bool,
    /// Local address of side A's sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local_a: IpAddr,
    /// Local address of side B's sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local_b: IpAddr,
    /// Longest a pair may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Present side A to lookup as this NAT class instead of what discovery
    /// found (open, full-cone, restricted-cone, port-restricted-cone,
    /// symmetric, udp-blocked): plans for NATs the machine does not have,
    /// e.g. `--as-a udp-blocked --as-b udp-blocked` for relay-both on
    /// loopback. A side presented as UDP-blocked uses TURN over TCP.
    #[arg(long)]
    pub(crate) as_a: Option<String>,
    /// Present side B to lookup as this NAT class (see --as-a).
    #[arg(long)]
    pub(crate) as_b: Option<String>,
}

/// One HTTP exchange with lookup (HTTP/1.0: no chunked answers).
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    api_key: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let auth = api_key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to lookup at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("lookup did not answer HTTP")?;
    let json = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((
        status,
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    ))
}

/// What one side measured.
#[derive(Debug, Default)]
pub(crate) struct SideResult {
    pub(crate) ok: bool,
    pub(crate) relayed: bool,
    /// From the pair's start to this side's first acknowledged datagram.
    pub(crate) first_packet: Option<Duration>,
    pub(crate) rtt: Option<Duration>,
    /// A direct side: the technique its plan named and the probes it sent.
    pub(crate) technique: Option<&'static str>,
    pub(crate) probes: Option<u32>,
    /// A direct side: from the pair's start to its confirmed direct path.
    pub(crate) direct: Option<Duration>,
    /// It allocated on its relay to race the punch.
    pub(crate) raced: bool,
    /// Its first packet came through a relay (the race's).
    pub(crate) relayed_first: bool,
    /// With a hold: what keeping the direct path showed, and the keepalive
    /// interval it used.
    pub(crate) held: Option<Held>,
    pub(crate) keepalive: Option<Duration>,
    /// A direct side: the peer's address on the path it found (IPv6 when it
    /// went over IPv6, in the NAT64 prefix when through NAT64).
    pub(crate) path: Option<SocketAddr>,
}

/// The TURN server a side's plan names: its first UDP URL, else its first
/// TCP one (a UDP-blocked side gets only those); true for TCP.
fn turn_server(side: &serde_json::Value) -> Option<(SocketAddr, Credentials, bool)> {
    let turn = side["ice_servers"]
        .as_array()?
        .iter()
        .find(|s| s["username"].is_string())?;
    let urls: Vec<&str> = turn["urls"]
        .as_array()?
        .iter()
        .filter_map(|u| u.as_str())
        .collect();
    let pick = |transport: &str| {
        urls.iter()
            .find(|u| u.starts_with("turn:") && u.ends_with(transport))
            .copied()
    };
    let (url, tcp) = pick("transport=udp")
        .map(|u| (u, false))
        .or_else(|| pick("transport=tcp").map(|u| (u, true)))?;
    let hostport = url.strip_prefix("turn:")?.split('?').next()?;
    let addr = hostport.to_socket_addrs().ok()?.next()?;
    Some((
        addr,
        Credentials {
            user: turn["username"].as_str()?.to_owned(),
            password: turn["credential"].as_str()?.to_owned(),
        },
        tcp,
    ))
}

/// Punches through our TURN allocation: probes go out as ChannelData to
/// `target`; what comes back (ChannelData, or a Data indication when the
/// peer's NAT gave it another port toward the relay) is answered, and from
/// then on the peer's address as the relay sees it is the target — reply to
/// where datagrams actually come from.
fn punch_via_turn(
    turn: &mut TurnClient,
    codec: &ProbeCodec,
    peer: u8,
    target: SocketAddr,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<RelayedPath> {
    let mut channels: Vec<(SocketAddr, ChannelNumber)> = Vec::new();
    let bind = |turn: &mut TurnClient,
                to: SocketAddr,
                channels: &mut Vec<(SocketAddr, ChannelNumber)>|
     -> anyhow::Result<ChannelNumber> {
        if let Some((_, c)) = channels.iter().find(|(a, _)| *a == to) {
            return Ok(*c);
        }
        let number = 0x4000 + channels.len() as u16;
        turn.bind_channel(number, to)?;
        let c = ChannelNumber::new(number).context("a valid channel number")?;
        channels.push((to, c));
        Ok(c)
    };
    let mut target = target;
    let mut channel = bind(turn, target, &mut channels)?;
    let deadline = Instant::now() + timeout;
    let mut sent: Vec<([u8; 8], Instant)> = Vec::new();
    let mut next = Instant::now();
    let mut connected: Option<(Duration, Duration, Instant)> = None;
    loop {
        let now = Instant::now();
        if let Some((first, rtt, at)) = connected
            && now >= at + natrix_cdx::exchange::client::LINGER
        {
            return Ok(RelayedPath {
                first,
                rtt,
                peer: target,
                channel,
            });
        }
        if now >= deadline {
            bail!("no path through the relay within {timeout:?}");
        }
        if connected.is_none() && now >= next {
            let nonce: [u8; 8] = rand::random();
            turn.send_channel_data(channel, &codec.probe(nonce))?;
            sent.push((nonce, now));
            next = now + PROBE_INTERVAL;
        }
        let Some(packet) = turn.link.recv(Duration::from_millis(20))? else {
            continue;
        };
        let buf = packet;
        let n = buf.len();
        // ChannelData from a bound peer, or a Data indication from any
        // permitted address of the peer.
        let (from, payload): (SocketAddr, Vec<u8>) = if let Ok(cd) = ChannelData::parse(&buf[..n]) {
            let Some((a, _)) = channels.iter().find(|(_, c)| c.value() == cd.channel) else {
                continue;
            };
            (*a, cd.payload.to_vec())
        } else if let Some((a, data)) = data_indication(&buf[..n]) {
            (a, data)
        } else {
            continue;
        };
        let Some(msg) = codec.parse(&payload) else {
            continue;
        };
        if from != target {
            target = from;
            channel = bind(turn, target, &mut channels)?;
        }
        match msg {
            ProbeMessage::Probe { from, nonce } if from == peer => {
                turn.send_channel_data(channel, &codec.ack(nonce))?;
            }
            ProbeMessage::Ack { from, nonce } if from == peer && connected.is_none() => {
                if let Some((_, at)) = sent.iter().find(|(s, _)| *s == nonce) {
                    connected = Some((started.elapsed(), at.elapsed(), Instant::now()));
                }
            }
            _ => {}
        }
    }
}

/// A path through our relay that answered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RelayedPath {
    /// Time to the first answer, from the start.
    pub(crate) first: Duration,
    pub(crate) rtt: Duration,
    /// The peer as the relay sees it, and the channel bound to it.
    pub(crate) peer: SocketAddr,
    pub(crate) channel: ChannelNumber,
}

/// One side: exchange, then punch directly or through its relay. On a host
/// without an IPv4 route to its CDX node (IPv6-only) it reaches every IPv4
/// address through NAT64 with `nat64`'s prefix.
pub(crate) fn side(
    plan_side: &serde_json::Value,
    local: IpAddr,
    started: Instant,
    timeout: Duration,
    udp_works: bool,
    hold: Option<Hold>,
    nat64: Option<Nat64Prefix>,
) -> anyhow::Result<SideResult> {
    let invitation: Invitation = plan_side["exchange"]["invitation"]
        .as_str()
        .context("no invitation in the plan")?
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let cdx: SocketAddr = plan_side["exchange"]["cdx"][0]
        .as_str()
        .context("no CDX node in the plan")?
        .to_socket_addrs()?
        .next()
        .context("the CDX address resolves to nothing")?;
    let peer_index = 1 - invitation.participant();
    // An IPv6-only host reaches the IPv4 servers and peers through NAT64.
    let nat64 = nat64.and_then(|p| natrix_cdx::client::reach(cdx, p).1);
    let local = match nat64 {
        Some(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        None => local,
    };
    let out = |a: SocketAddr| nat64.map_or(a, |p| p.synthesize(a));
    let cdx = out(cdx);
    let socket = UdpSocket::bind((local, 0)).context("binding a client socket")?;
    let mut turn = None;
    // How a direct side punches (plans before punch plans: classic).
    let punch_plan: PunchPlan = match plan_side.get("punch") {
        Some(p) if !p.is_null() => {
            serde_json::from_value(p.clone()).context("the plan's punch is malformed")?
        }
        _ => PunchPlan {
            deadline_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            ..PunchPlan::classic()
        },
    };
    let mut fresh = PunchSockets::default();
    // A direct side that races its relay: the allocation.
    let mut race: Option<TurnClient> = None;
    // A side that reaches its relay over TCP cannot send UDP: it exchanges
    // over TCP too.
    let mut udp_blocked = false;
    let candidates = if plan_side["relayed"] == true {
        let (server, creds, tcp) =
            turn_server(plan_side).context("a relayed side without a TURN server")?;
        let server = out(server);
        udp_blocked = tcp && !udp_works;
        let t = if tcp {
            TurnClient::allocate_tcp(server, &creds)
        } else if hold.is_some_and(|h| h.recover) {
            // Its address may change while it holds: it moves the
            // allocation then.
            TurnClient::allocate_mobile(server, SocketAddr::new(local, 0), &creds)
        } else {
            TurnClient::allocate(server, SocketAddr::new(local, 0), &creds)
        }
        .context("allocating on the planned relay")?;
        let relayed = t.relayed;
        turn = Some(t);
        vec![Candidate {
            kind: CandidateKind::Relayed,
            addr: relayed,
        }]
    } else {
        // A racing side allocates on its relay first, then learns its
        // mapping: behind a sequential NAT the allocation's own mapping must
        // come before the one CDX reports, or every predicted port is off
        // by one.
        let raced = (plan_side["race"] == true).then(|| -> anyhow::Result<TurnClient> {
            let (server, creds, _) =
                turn_server(plan_side).context("a racing side without a TURN server")?;
            TurnClient::allocate(out(server), SocketAddr::new(local, 0), &creds)
                .context("allocating on the relay to race")
        });
        let mapped =
            mapped_address(&socket, cdx, Duration::from_secs(2))?.context("no answer from CDX")?;
        fresh = PunchSockets::open(&socket, Some(mapped), &punch_plan)
            .context("opening the punch plan's sockets")?;
        let mut c = vec![];
        // Without its relay the side still punches (the race is a bonus).
        if let Some(t) = raced.and_then(Result::ok) {
            c.push(Candidate {
                kind: CandidateKind::Relayed,
                addr: t.relayed,
            });
            race = Some(t);
        }
        // Through NAT64 the exchange socket stands for IPv4: its IPv6 host
        // address is not offered (paths over IPv6 are the IPv6 socket's).
        c.extend(
            direct_candidates(&socket, cdx, mapped)?
                .into_iter()
                .filter(|h| nat64.is_none() || h.kind != CandidateKind::Host),
        );
        c.extend(fresh.candidate());
        // Planned over IPv6: an IPv6 socket beside, its mapped address (the
        // host's own behind a firewall) learnt from an IPv6 CDX node.
        if plan_side["ipv6"] == true
            && let Some(socket6) = ipv6_socket(plan_side, &mut c)?
        {
            fresh = fresh.with_ipv6(socket6, nat64)?;
        }
        c
    };
    let data = ConnectionData {
        class: None,
        candidates,
    };
    let got = if udp_blocked {
        let mut stream = std::net::TcpStream::connect_timeout(&cdx, Duration::from_secs(3))
            .with_context(|| format!("connecting to CDX {cdx} over TCP"))?;
        exchange_tcp(&mut stream, &invitation, &data, None, 1, timeout)
    } else {
        exchange(&socket, cdx, &invitation, &data, None, 1, timeout)
    }
    .context("exchanging connection data")?;
    let peer = got
        .peers
        .get(&peer_index)
        .context("the exchange returned no data of the other side")?;
    let mut result = SideResult {
        relayed: turn.is_some(),
        ..SideResult::default()
    };
    if let Some(turn) = &mut turn {
        // Through our relay to where the peer listens: its relayed address
        // (relay-both) or its own (relay-one).
        let target = peer
            .address(CandidateKind::Relayed)
            .or_else(|| peer.address(CandidateKind::ServerReflexive))
            .context("the peer sent no reachable candidate")?;
        let codec = ProbeCodec::new(&invitation);
        let path = punch_via_turn(turn, &codec, peer_index, target, started, timeout)?;
        result.first_packet = Some(path.first);
        result.rtt = Some(path.rtt);
        if let Some(hold) = hold {
            result.keepalive = hold.keepalive;
            result.held = Some(hold_via_turn(turn, &codec, peer_index, path, hold, local)?);
        }
        let _ = turn.release();
    } else {
        let t0 = started.elapsed();
        let codec = ProbeCodec::new(&invitation);
        // Racing: probe through the relay to the peer's mapped address while
        // punching; the first answer on either path is the first packet.
        let srflx = peer.address(CandidateKind::ServerReflexive);
        // Through NAT64 the peer's IPv4 candidates are reached at their
        // synthesized addresses (a relay keeps the peer's own: it sends).
        let reachable = peer.through(nat64);
        let peer = &reachable;
        let (direct, relayed) = std::thread::scope(|s| {
            let relayed = match (&mut race, srflx) {
                (Some(turn), Some(target)) => Some(s.spawn(move || {
                    punch_via_turn(turn, &codec, peer_index, target, started, timeout)
                })),
                _ => None,
            };
            let direct = punch_with(&socket, &fresh, &invitation, peer_index, peer, &punch_plan);
            (direct, relayed.and_then(|h| h.join().ok()))
        });
        let via_relay = relayed.and_then(Result::ok);
        // The peer raced its relay: its relayed address is our way there
        // when the direct path breaks.
        let peer_relayed = peer.address(CandidateKind::Relayed);
        result.technique = Some(punch_plan.technique.name());
        result.raced = race.is_some();
        match direct {
            Ok(p) if !p.relayed => {
                result.path = Some(p.peer);
                result.direct = Some(t0 + p.elapsed);
                result.first_packet = Some(t0 + p.first);
                result.rtt = Some(p.rtt);
                result.probes = Some(p.probes);
                result.relayed_first = p.first_via_relay;
                if let Some(mut hold) = hold {
                    hold.keepalive = hold.keepalive.or(Some(Duration::from_millis(u64::from(
                        punch_plan.keepalive_ms,
                    ))));
                    result.keepalive = hold.keepalive;
                    let path = p.fresh.and_then(|i| fresh.take(i));
                    // Only the exchange socket is known to CDX: a path on a
                    // fresh socket is held without recovery.
                    let recovery = (hold.recover && path.is_none()).then(|| Recovery {
                        cdx,
                        invitation: &invitation,
                        peer: peer.clone(),
                        peer_seq: 1,
                        seq: 1,
                    });
                    let path = path.as_ref().unwrap_or(&socket);
                    let codec = ProbeCodec::new(&invitation);
                    // The relay path the race found stays ready.
                    let standby = match (&mut race, via_relay, peer_relayed) {
                        (Some(turn), Some(path), _) => Some(Standby::Own { turn, path }),
                        (None, _, Some(relayed)) => Some(Standby::Peer {
                            socket: &socket,
                            relayed,
                        }),
                        _ => None,
                    };
                    result.held = Some(hold_path(
                        path, standby, &codec, peer_index, p.peer, hold, recovery,
                    )?);
                }
            }
            Ok(p) => {
                // Only the peer's relay answered.
                result.relayed = true;
                result.relayed_first = true;
                result.first_packet = Some(t0 + p.first);
                result.rtt = Some(p.rtt);
                result.probes = Some(p.probes);
            }
            Err(e) => {
                let Some(RelayedPath { first, rtt, .. }) = via_relay else {
                    return Err(e.into());
                };
                result.relayed = true;
                result.relayed_first = true;
                result.first_packet = Some(first);
                result.rtt = Some(rtt);
            }
        }
        if let Some(turn) = &mut race {
            let _ = turn.release();
        }
        // Our relay answered before the direct path: the first packet.
        if let (Some(RelayedPath { first, .. }), Some(d)) = (via_relay, result.direct)
            && first < d
        {
            result.first_packet = Some(result.first_packet.map_or(first, |f| f.min(first)));
            result.relayed_first = true;
        }
    }
    result.ok = true;
    Ok(result)
}

/// A side planned over IPv6: a socket on IPv6, its mapped address from the
/// plan's first IPv6 CDX node added to `candidates` (the host address too
/// where a NAT changes it); `None` when the host cannot reach that node over
/// IPv6 (then the side stays on IPv4).
fn ipv6_socket(
    plan_side: &serde_json::Value,
    candidates: &mut Vec<Candidate>,
) -> anyhow::Result<Option<UdpSocket>> {
    let Some(cdx6) = plan_side["exchange"]["cdx"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.parse::<SocketAddr>().ok())
        .find(|a| a.is_ipv6() && natrix_cdx::client::routable(*a))
    else {
        return Ok(None);
    };
    let socket =
        UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).context("binding an IPv6 socket")?;
    let Some(mapped) = mapped_address(&socket, cdx6, Duration::from_secs(2))? else {
        return Ok(None);
    };
    let [srflx, host] = direct_candidates(&socket, cdx6, mapped)?;
    candidates.push(srflx);
    if host.addr != mapped {
        candidates.push(host);
    }
    Ok(Some(socket))
}

/// A direct side's candidates: its `mapped` address (as CDX saw it) and
/// its host address.
pub(crate) fn direct_candidates(
    socket: &UdpSocket,
    cdx: SocketAddr,
    mapped: SocketAddr,
) -> anyhow::Result<[Candidate; 2]> {
    Ok([
        Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: mapped,
        },
        Candidate {
            kind: CandidateKind::Host,
            addr: host_address(socket, cdx)?,
        },
    ])
}

/// `socket`'s host candidate: its address, or where it is bound to every
/// address, the one the route to `cdx` leaves from (a peer on the same LAN
/// reaches it there, through a NAT that does not hairpin).
fn host_address(socket: &UdpSocket, cdx: SocketAddr) -> anyhow::Result<SocketAddr> {
    let local = socket.local_addr()?;
    if !local.ip().is_unspecified() {
        return Ok(local);
    }
    let ip = natrix_cdx::client::route_source(local.ip(), cdx)?;
    Ok(SocketAddr::new(ip, local.port()))
}

pub(crate) fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

/// One pair: discovery, plan, both sides at once.
fn pair(args: &E2eArgs, lookup: SocketAddr, cdx: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let pa = discover(cdx, SocketAddr::new(args.local_a, 0))?;
    let pb = discover(cdx, SocketAddr::new(args.local_b, 0))?;
    let presented = |p: &NatProfile, claim: &Option<String>| match claim {
        Some(class) => serde_json::json!({"class": class}),
        None => serde_json::to_value(p).unwrap_or_default(),
    };
    let body = serde_json::json!({
        "a": {"profile": presented(&pa, &args.as_a)},
        "b": {"profile": presented(&pb, &args.as_b)},
        "retry": args.retry,
    });
    let (status, plan) = http(
        lookup,
        "POST",
        "/v1/plan",
        &body.to_string(),
        args.api_key.as_deref(),
    )?;
    if status != 200 {
        bail!(
            "lookup answered {status}: {}",
            plan["detail"].as_str().unwrap_or("?")
        );
    }
    let (ra, rb) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            side(
                &plan["a"],
                args.local_a,
                started,
                args.timeout,
                pa.mapped_address.is_some(),
                None,
                None,
            )
        });
        let b = s.spawn(|| {
            side(
                &plan["b"],
                args.local_b,
                started,
                args.timeout,
                pb.mapped_address.is_some(),
                None,
                None,
            )
        });
        (
            a.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("side A panicked"))),
            b.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("side B panicked"))),
        )
    });
    let report = |r: anyhow::Result<SideResult>| match r {
        Ok(r) => serde_json::json!({
            "ok": r.ok, "relayed": r.relayed,
            "first_packet_ms": ms(r.first_packet), "rtt_ms": ms(r.rtt),
        }),
        Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
    };
    let (a, b) = (report(ra), report(rb));
    let ok = a["ok"] == true && b["ok"] == true;
    let (actual, reported) = report_outcome(lookup, args.api_key.as_deref(), &plan, &a, &b);
    Ok(serde_json::json!({
        "mode": plan["mode"],
        "ok": ok,
        "actual": actual,
        "outcome_reported": reported,
        "a": a,
        "b": b,
    }))
}

/// The largest of the sides' `key` (milliseconds): when the slower side
/// got there. `None` when no side reports it.
pub(crate) fn slowest<'a>(
    sides: impl IntoIterator<Item = &'a serde_json::Value>,
    key: &str,
) -> Option<f64> {
    sides
        .into_iter()
        .filter_map(|s| s[key].as_f64())
        .reduce(f64::max)
}

/// Tells lookup what happened to `plan` (its plan-accuracy metrics), from
/// both sides' reports (`ok`, `relayed`, `first_packet_ms`): the actual
/// path (direct, relay or failed) and whether lookup took the report.
pub(crate) fn report_outcome(
    lookup: SocketAddr,
    api_key: Option<&str>,
    plan: &serde_json::Value,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> (&'static str, bool) {
    let ok = a["ok"] == true && b["ok"] == true;
    let actual = match (ok, a["relayed"] == true || b["relayed"] == true) {
        (false, _) => "failed",
        (true, true) => "relay",
        (true, false) => "direct",
    };
    // The pair's first packet: when the later side got its own.
    let first_packet = slowest([a, b], "first_packet_ms");
    let mut outcome = serde_json::json!({"report": plan["report"], "actual": actual});
    if let Some(ms) = first_packet.filter(|_| ok) {
        outcome["first_packet_ms"] = ms.into();
    }
    let reported = plan["report"].is_string()
        && matches!(
            http(
                lookup,
                "POST",
                "/v1/outcomes",
                &outcome.to_string(),
                api_key
            ),
            Ok((202, _))
        );
    (actual, reported)
}

/// Runs `pairs` pairs at once and reports per mode.
pub(crate) fn run(args: &E2eArgs) -> anyhow::Result<serde_json::Value> {
    let lookup = args
        .lookup
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.lookup))?
        .next()
        .context("lookup resolves to no address")?;
    let (status, relays) = http(lookup, "GET", "/v1/relays", "", args.api_key.as_deref())?;
    if status != 200 {
        bail!("lookup's /v1/relays answered {status}");
    }
    let cdx: SocketAddr = relays["cdx"][0]["udp"][0]
        .as_str()
        .context("lookup knows no CDX node")?
        .parse()?;
    live().begin(
        "e2e",
        Units {
            sent: "pairs",
            done: "connected",
        },
        Some(args.timeout),
    );
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.pairs.max(1))
            .map(|_| {
                s.spawn(|| {
                    live().sent(1);
                    let r = match pair(args, lookup, cdx) {
                        Ok(v) => v,
                        Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
                    };
                    if r["ok"] == true {
                        live().done(1);
                    } else {
                        live().error(1);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| serde_json::json!({"ok": false, "error": "panicked"}))
            })
            .collect()
    });
    live().end();
    let mut by_mode: BTreeMap<String, (u64, u64, Latency)> = BTreeMap::new();
    for r in &results {
        let mode = r["mode"].as_str().unwrap_or("none").to_owned();
        let e = by_mode.entry(mode).or_default();
        e.0 += 1;
        if r["ok"] == true {
            e.1 += 1;
            for side in ["a", "b"] {
                if let Some(v) = r[side]["first_packet_ms"].as_f64() {
                    e.2.record_us((v * 1000.0) as u64);
                }
            }
        }
    }
    let modes: serde_json::Map<String, serde_json::Value> = by_mode
        .into_iter()
        .map(|(mode, (n, ok, t))| {
            (
                mode,
                serde_json::json!({
                    "pairs": n,
                    "succeeded": ok,
                    "success_ratio": ok as f64 / n as f64,
                    "first_packet_ms_p50": t.ms(50.0),
                    "first_packet_ms_p99": t.ms(99.0),
                    "latency": t.json(),
                }),
            )
        })
        .collect();
    let failed = results.iter().filter(|r| r["ok"] != true).count();
    let report = serde_json::json!({
        "scenario": "e2e",
        "pairs": results.len(),
        "failed": failed,
        "modes": modes,
        "results": results,
    });
    let mut report = report;
    if failed > 0 {
        // Written to the reports first, then exit 1.
        report["failure"] = format!("{failed} of {} pairs failed", results_len(&report)).into();
    }
    Ok(report)
}

fn results_len(report: &serde_json::Value) -> usize {
    report["results"].as_array().map_or(0, Vec::len)
}

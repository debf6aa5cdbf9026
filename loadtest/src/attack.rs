//! `natrix-loadtest attack`: the hostile-traffic suite, against a live
//! deployment, while legitimate sessions run.
//!
//! Each attack runs for `--duration` (and a bounded count) while
//! `--legit` TURN sessions (UDP, plus one over TCP and one over TLS when
//! the server has them) relay a datagram every 20 ms to an echo peer. Per
//! attack the report says what the server did (the answers the attacker
//! got, by kind), the server's RSS before and after (`--pid`), how many
//! legitimate sessions were lost (an error, or no echo at the end) and
//! their round-trip p99 during the attack, and whether the server held:
//! the attack was bounded the way it should be and no legitimate session
//! was lost. Attacks that need what was not given (a TLS listener, a grant
//! secret, root for spoofing, the Redis PID) are reported as skipped.
//!
//! The attacker sends from `--attacker-ip` (another loopback address by
//! default), the legitimate sessions from `--local`, so per-source caps
//! tell them apart as they would on the internet.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use natrix_wire::{ChannelData, ChannelNumber};

use crate::process::process_rss_bytes;
use crate::relay::Auth;
use crate::stats::Latency;
use crate::turn::{Credentials, Tls, Transport, TurnClient, channel_data, error_kind};

/// Every attack, in the order `all` runs them.
const ATTACKS: [&str; 23] = [
    "plan-no-key",
    "plan-rate",
    "alloc-one-source",
    "alloc-one-key",
    "slowloris-tcp",
    "slowloris-tls",
    "tls-handshakes",
    "pipelined-allocates",
    "huge-frames",
    "slow-tls-reader",
    "exchange-spoofed",
    "exchange-replay",
    "garbage",
    "redis-stop",
    "metrics-flood",
    "plan-forged-grant",
    "auth-flood",
    "push-sockets",
    "invite-flood",
    "turn-guessing",
    "https-idle",
    "dtls-hellos",
    "channel-forgery",
];

/// Options of `attack`.
#[derive(clap::Args, Debug)]
pub(crate) struct AttackArgs {
    /// The TURN/STUN listener (UDP and TCP; CDX on `natrix up`).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub(crate) turn: SocketAddr,
    /// The TURN-over-TLS listener, if any.
    #[arg(long)]
    pub(crate) tls: Option<SocketAddr>,
    /// The TURN-over-DTLS listener (UDP), if any: a legitimate DTLS
    /// session joins every attack, and `dtls-hellos` floods it.
    #[arg(long)]
    pub(crate) dtls: Option<SocketAddr>,
    /// A CDX node for the exchange attacks (default: --turn, as on
    /// `natrix up`).
    #[arg(long)]
    pub(crate) cdx: Option<SocketAddr>,
    /// lookup's API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) lookup: SocketAddr,
    /// The metrics port (the flood target).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub(crate) metrics: SocketAddr,
    /// Where the liveness probe is polled (`/healthz`); default: the
    /// metrics port.
    #[arg(long)]
    pub(crate) health: Option<SocketAddr>,
    /// An API key for the legitimate plans (`natrix up` prints one).
    #[arg(long = "api-key", env = "NATRIX_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// A grant secret lookup holds (`key-id=secret`): the attacker's
    /// metered credential for the rate and per-key attacks.
    #[arg(long = "grant-secret")]
    pub(crate) grant_secret: Option<natrix_model::TurnSecret>,
    #[command(flatten)]
    pub(crate) auth: Auth,
    /// The server's PID, for its RSS before and after each attack.
    #[arg(long)]
    pub(crate) pid: Option<u32>,
    /// The coordination store's (redis-server's) PID: `redis-stop`
    /// freezes it (SIGSTOP) for the attack and resumes it (SIGCONT).
    #[arg(long)]
    pub(crate) redis_pid: Option<u32>,
    /// Which attacks (comma separated), or `all`.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub(crate) attack: Vec<String>,
    /// How long each attack runs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Legitimate UDP sessions during each attack.
    #[arg(long, value_parser = crate::positive, default_value_t = 4)]
    pub(crate) legit: usize,
    /// Connections the connection attacks open (at most).
    #[arg(long, value_parser = crate::positive, default_value_t = 1500)]
    pub(crate) connections: usize,
    /// The legitimate sessions' local address.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local: IpAddr,
    /// The attacker's source address (another loopback address works on
    /// Linux without set-up).
    #[arg(long, default_value = "127.0.0.66")]
    pub(crate) attacker_ip: IpAddr,
    /// The refused authentications lookup allows one source a minute
    /// (its `--auth-failures-per-minute`; 0 when it does not limit them).
    /// The failing-credential attacks come from the address after
    /// `--attacker-ip`, so the throttle they earn spares the others.
    #[arg(long, default_value_t = 60)]
    pub(crate) auth_failures_per_minute: u32,
}

/// What one attack showed.
#[derive(Debug, Default)]
struct Outcome {
    /// What the server did, in words (with counts).
    server_did: String,
    /// The answers the attacker got, by kind.
    answers: BTreeMap<String, u64>,
    /// Whether the server bounded the attack as it should.
    bounded: bool,
    /// Why the attack did not run.
    skipped: Option<String>,
}

impl Outcome {
    fn skipped(why: &str) -> Outcome {
        Outcome {
            skipped: Some(why.to_owned()),
            bounded: true,
            ..Outcome::default()
        }
    }
}

// ------------------------------------------------------------ legitimate

const LEGIT_CHANNEL: u16 = 0x4001;
const LEGIT_INTERVAL: Duration = Duration::from_millis(20);

/// What one legitimate session saw.
#[derive(Debug, Default)]
struct LegitResult {
    sent: u64,
    answered: u64,
    latency: Latency,
    lost: Option<String>,
}

/// The legitimate sessions of one attack.
struct Legit {
    stop: Arc<AtomicBool>,
    sessions: Vec<std::thread::JoinHandle<LegitResult>>,
    peer_stop: Arc<AtomicBool>,
    peer: Option<std::thread::JoinHandle<()>>,
}

fn legit_session(
    transport: Transport,
    args: &AttackArgs,
    tls: Option<Tls>,
    creds: Credentials,
    peer: SocketAddr,
    stop: Arc<AtomicBool>,
) -> LegitResult {
    let mut r = LegitResult::default();
    let server = match transport {
        Transport::Tls => args.tls.unwrap_or(args.turn),
        Transport::Dtls => args.dtls.unwrap_or(args.turn),
        _ => args.turn,
    };
    let mut client = match TurnClient::connect(
        transport,
        server,
        SocketAddr::new(args.local, 0),
        &creds,
        tls.as_ref(),
    )
    .and_then(|mut c| c.bind_channel(LEGIT_CHANNEL, peer).map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            r.lost = Some(format!("{transport:?} allocate: {}", error_kind(&e)));
            return r;
        }
    };
    let Some(channel) = ChannelNumber::new(LEGIT_CHANNEL) else {
        r.lost = Some("channel number".into());
        return r;
    };
    let started = Instant::now();
    let round = |r: &mut LegitResult, client: &mut TurnClient| -> anyhow::Result<bool> {
        let sent_at = Instant::now();
        let mut payload = [0u8; 24];
        payload[..8].copy_from_slice(&r.sent.to_be_bytes());
        payload[8..16].copy_from_slice(
            &u64::try_from(sent_at.duration_since(started).as_nanos())
                .unwrap_or(0)
                .to_be_bytes(),
        );
        client.send_channel_data(channel, &payload)?;
        r.sent += 1;
        let deadline = sent_at + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(frame) = client.link.recv(left)? else {
                break;
            };
            let Ok(cd) = ChannelData::parse(&frame) else {
                continue;
            };
            if cd.payload.len() >= 16 && cd.payload[..8] == payload[..8] {
                r.answered += 1;
                r.latency.record(sent_at.elapsed());
                return Ok(true);
            }
        }
        Ok(false)
    };
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if let Err(e) = round(&mut r, &mut client) {
            r.lost = Some(format!("{transport:?} during the attack: {e:#}"));
            return r;
        }
        std::thread::sleep(LEGIT_INTERVAL.saturating_sub(t.elapsed()));
    }
    // The session must still work once the attack is over.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut alive = false;
    while !alive && Instant::now() < deadline {
        alive = round(&mut r, &mut client).unwrap_or(false);
    }
    if !alive {
        r.lost = Some(format!("{transport:?}: no echo after the attack"));
    }
    let _ = client.release();
    r
}

impl Legit {
    fn start(args: &AttackArgs, creds: &Credentials) -> anyhow::Result<Legit> {
        let socket = UdpSocket::bind(SocketAddr::new(args.local, 0)).context("the echo peer")?;
        let peer = socket.local_addr()?;
        let peer_stop = Arc::new(AtomicBool::new(false));
        let ps = peer_stop.clone();
        let peer_thread = std::thread::spawn(move || crate::load::echo_peer(&socket, &ps));
        let stop = Arc::new(AtomicBool::new(false));
        let mut kinds = vec![(Transport::Udp, None); args.legit];
        kinds.push((Transport::Tcp, None));
        if let Some(tls) = args.tls {
            kinds.push((Transport::Tls, Some(Tls::new(None, None, tls)?)));
        }
        if args.dtls.is_some() {
            kinds.push((Transport::Dtls, None));
        }
        let sessions = kinds
            .into_iter()
            .map(|(transport, tls)| {
                let (stop, creds) = (stop.clone(), creds.clone());
                let args = args.shallow();
                std::thread::spawn(move || legit_session(transport, &args, tls, creds, peer, stop))
            })
            .collect();
        Ok(Legit {
            stop,
            sessions,
            peer_stop,
            peer: Some(peer_thread),
        })
    }

    /// Stops the sessions: lost sessions (with why), round trips sent and
    /// answered, and the round-trip distribution.
    fn finish(mut self) -> (Vec<String>, u64, u64, Latency) {
        self.stop.store(true, Ordering::Relaxed);
        let mut lost = Vec::new();
        let (mut sent, mut answered, mut latency) = (0, 0, Latency::new());
        for h in self.sessions.drain(..) {
            match h.join() {
                Ok(r) => {
                    sent += r.sent;
                    answered += r.answered;
                    latency.merge(&r.latency);
                    lost.extend(r.lost);
                }
                Err(_) => lost.push("a session thread panicked".into()),
            }
        }
        self.peer_stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.peer.take() {
            let _ = p.join();
        }
        (lost, sent, answered, latency)
    }
}

impl AttackArgs {
    /// A copy of the settings a session thread needs.
    fn shallow(&self) -> AttackArgs {
        AttackArgs {
            turn: self.turn,
            tls: self.tls,
            dtls: self.dtls,
            cdx: self.cdx,
            lookup: self.lookup,
            metrics: self.metrics,
            health: self.health,
            api_key: self.api_key.clone(),
            grant_secret: self.grant_secret.clone(),
            auth: self.auth.clone(),
            pid: self.pid,
            redis_pid: self.redis_pid,
            attack: Vec::new(),
            duration: self.duration,
            legit: self.legit,
            connections: self.connections,
            local: self.local,
            attacker_ip: self.attacker_ip,
            auth_failures_per_minute: self.auth_failures_per_minute,
        }
    }

    fn cdx(&self) -> SocketAddr {
        self.cdx.unwrap_or(self.turn)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.duration
    }

    /// Where the failing-credential attacks come from.
    fn failing_ip(&self) -> IpAddr {
        match self.attacker_ip {
            IpAddr::V4(a) => {
                let mut o = a.octets();
                o[3] = o[3].wrapping_add(1);
                IpAddr::from(o)
            }
            IpAddr::V6(a) => {
                let mut s = a.segments();
                s[3] = s[3].wrapping_add(1);
                IpAddr::from(s)
            }
        }
    }

    /// Whether the failing-credential answers were bounded: only 401 and
    /// 429, and no more 401s than the source's allowance over `took`.
    /// Where password guessing on the relay comes from: the address after
    /// the failing-credential one, so that its ban spares the others.
    fn guessing_ip(&self) -> IpAddr {
        let mut a = self.failing_ip();
        if let IpAddr::V4(v4) = a {
            let mut o = v4.octets();
            o[3] = o[3].wrapping_add(1);
            a = IpAddr::from(o);
        } else if let IpAddr::V6(v6) = a {
            let mut s = v6.segments();
            // Another /64: the relay bans IPv6 sources by /64.
            s[3] = s[3].wrapping_add(1);
            a = IpAddr::from(s);
        }
        a
    }

    fn refusals_bounded(&self, answers: &BTreeMap<String, u64>, took: Duration) -> bool {
        let only = answers.keys().all(|k| k == "401" || k == "429");
        let limit = f64::from(self.auth_failures_per_minute);
        let allowed = limit + limit / 60.0 * took.as_secs_f64() + 2.0;
        let refused = answers.get("401").copied().unwrap_or(0) as f64;
        only && (self.auth_failures_per_minute == 0 || refused <= allowed)
    }

    fn grant(&self, scope: &str) -> Option<String> {
        let secret = self.grant_secret.as_ref()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(natrix_model::grant::mint(
            secret,
            &natrix_model::grant::Claims {
                aud: natrix_model::grant::AUDIENCE.into(),
                sub: "attacker".into(),
                exp: now + 600,
                iat: Some(now),
                nbf: None,
                scope: scope.into(),
                dev: None,
            },
        ))
    }
}

// --------------------------------------------------------------- helpers

fn count(answers: &mut BTreeMap<String, u64>, kind: impl Into<String>) {
    *answers.entry(kind.into()).or_default() += 1;
}

fn tally(answers: &BTreeMap<String, u64>) -> String {
    answers
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One HTTP request on a fresh connection from `from`; the status.
fn http_status(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    credential: Option<&str>,
    timeout: Duration,
) -> std::io::Result<u16> {
    let mut s = tcp_from_within(from, to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let auth = credential.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {to}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    read_status(&mut s)
}

/// The status code of the HTTP response `s` starts to answer.
fn read_status(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    std::str::from_utf8(&head[..got])
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not HTTP"))
}

fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    tcp_from_within(from, to, Duration::from_secs(2))
}

/// A TCP connection from `from` to `to`, set up within `timeout`.
fn tcp_from_within(from: IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    let _ = s.set_read_timeout(Some(wait));
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if natrix_net::is_timeout(&e) => return false,
            Err(_) => return true,
        }
    }
}

/// Raises this process's open-file limit to its hard limit (the
/// connection attacks hold thousands of sockets).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

const PLAN_BODY: &str =
    r#"{"a":{"profile":{"class":"symmetric"}},"b":{"profile":{"class":"symmetric"}}}"#;

fn legit_plan(args: &AttackArgs) -> anyhow::Result<serde_json::Value> {
    let (status, plan) = crate::e2e::http(
        args.lookup,
        "POST",
        "/v1/plan",
        PLAN_BODY,
        args.api_key.as_deref(),
    )?;
    anyhow::ensure!(status == 200, "lookup answered {status} to a keyed plan");
    Ok(plan)
}

fn side_credentials(side: &serde_json::Value) -> Option<Credentials> {
    let turn = side["ice_servers"]
        .as_array()?
        .iter()
        .find(|s| s["username"].is_string())?;
    Some(Credentials {
        user: turn["username"].as_str()?.to_owned(),
        password: turn["credential"].as_str()?.to_owned(),
    })
}

// --------------------------------------------------------------- attacks

fn plan_no_key(args: &AttackArgs) -> Outcome {
    let mut o = Outcome::default();
    let (started, deadline) = (Instant::now(), args.deadline());
    let mut n = 0;
    while Instant::now() < deadline && n < 5000 {
        let s = http_status(
            args.failing_ip(),
            args.lookup,
            "POST",
            "/v1/plan",
            PLAN_BODY,
            if n % 2 == 0 {
                None
            } else {
                Some("nxk_000000000000_00000000000000000000000000000000")
            },
            Duration::from_secs(2),
        );
        count(
            &mut o.answers,
            s.map_or_else(|e| format!("error {}", e.kind()), |s| s.to_string()),
        );
        n += 1;
    }
    o.bounded = args.refusals_bounded(&o.answers, started.elapsed());
    o.server_did = format!(
        "{n} plans without a key or with an unknown one: {}",
        tally(&o.answers)
    );
    o
}

fn plan_forged_grant(args: &AttackArgs) -> Outcome {
    let Some(real) = args.grant_secret.as_ref() else {
        return Outcome::skipped("needs --grant-secret");
    };
    let mut o = Outcome::default();
    let forged: natrix_model::TurnSecret =
        match format!("{}=not-the-secret-lookup-holds", real.key_id()).parse() {
            Ok(s) => s,
            Err(_) => return Outcome::skipped("grant key id"),
        };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = |exp: u64| natrix_model::grant::Claims {
        aud: natrix_model::grant::AUDIENCE.into(),
        sub: "mallory".into(),
        exp,
        iat: None,
        nbf: None,
        scope: "plan".into(),
        dev: None,
    };
    let grants = [
        natrix_model::grant::mint(&forged, &claims(now + 600)),
        natrix_model::grant::mint(real, &claims(now.saturating_sub(3600))),
        natrix_model::grant::mint(real, &claims(now + 86_400)),
    ];
    let (started, deadline) = (Instant::now(), args.deadline());
    for (i, g) in grants.iter().cycle().take(300).enumerate() {
        if i > 0 && Instant::now() > deadline {
            break;
        }
        let s = http_status(
            args.failing_ip(),
            args.lookup,
            "POST",
            "/v1/plan",
            PLAN_BODY,
            Some(g),
            Duration::from_secs(2),
        );
        count(
            &mut o.answers,
            s.map_or_else(|e| format!("error {}", e.kind()), |s| s.to_string()),
        );
    }
    o.bounded = args.refusals_bounded(&o.answers, started.elapsed());
    o.server_did = format!("forged, expired and too-long grants: {}", tally(&o.answers));
    o
}

fn plan_rate(args: &AttackArgs) -> Outcome {
    let Some(grant) = args.grant("relays:read") else {
        return Outcome::skipped("needs --grant-secret (a metered credential)");
    };
    let answers = Mutex::new(BTreeMap::new());
    let deadline = args.deadline();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let mut n = 0;
                while Instant::now() < deadline && n < 2000 {
                    let st = http_status(
                        args.attacker_ip,
                        args.lookup,
                        "GET",
                        "/v1/relays",
                        "",
                        Some(&grant),
                        Duration::from_secs(2),
                    );
                    let k = st.map_or_else(|e| format!("error {}", e.kind()), |s| s.to_string());
                    count(&mut answers.lock().unwrap_or_else(|e| e.into_inner()), k);
                    n += 1;
                }
            });
        }
    });
    let mut o = Outcome {
        answers: answers.into_inner().unwrap_or_else(|e| e.into_inner()),
        ..Outcome::default()
    };
    o.bounded = o.answers.contains_key("429") && o.answers.keys().all(|k| k == "200" || k == "429");
    o.server_did = format!("one grant key flooding the API: {}", tally(&o.answers));
    o
}

fn alloc_one_source(args: &AttackArgs, creds: &Credentials) -> Outcome {
    let mut o = Outcome::default();
    let mut held = Vec::new();
    let deadline = args.deadline();
    let mut refusals = 0;
    while Instant::now() < deadline && held.len() < 20_000 && refusals < 20 {
        match TurnClient::allocate(args.turn, SocketAddr::new(args.attacker_ip, 0), creds) {
            Ok(c) => held.push(c),
            Err(e) => {
                refusals += 1;
                count(&mut o.answers, error_kind(&e));
            }
        }
    }
    let ok = held.len();
    o.answers.insert("allocated".into(), ok as u64);
    o.bounded = o.answers.contains_key("486");
    o.server_did = format!(
        "{ok} allocations from one IP, then {}",
        tally(
            &o.answers
                .iter()
                .filter(|(k, _)| *k != "allocated")
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        )
    );
    for mut c in held {
        let _ = c.release();
    }
    o
}

fn alloc_one_key(args: &AttackArgs) -> Outcome {
    let Some(grant) = args.grant("plan") else {
        return Outcome::skipped("needs --grant-secret (a metered credential)");
    };
    let mut o = Outcome::default();
    let mut held = Vec::new();
    let deadline = args.deadline();
    let (mut plans, mut per_session_max) = (0u64, 0usize);
    let mut source = 1u32;
    while Instant::now() < deadline && plans < 5000 {
        let st = crate::e2e::http(args.lookup, "POST", "/v1/plan", PLAN_BODY, Some(&grant));
        let plan = match st {
            Ok((200, p)) => p,
            Ok((status, _)) => {
                count(&mut o.answers, format!("plan {status}"));
                if status == 429 {
                    break;
                }
                continue;
            }
            Err(_) => {
                count(&mut o.answers, "plan error");
                continue;
            }
        };
        plans += 1;
        // Use the session's tokens from many sources, past its sides.
        let mut in_session = 0;
        for side in ["a", "b"] {
            let Some(creds) = side_credentials(&plan[side]) else {
                continue;
            };
            for _ in 0..3 {
                source += 1;
                let ip = Ipv4Addr::from(0x7f02_0000 | (source & 0xffff));
                match TurnClient::allocate(args.turn, SocketAddr::new(ip.into(), 0), &creds) {
                    Ok(c) => {
                        in_session += 1;
                        held.push(c);
                    }
                    Err(e) => count(&mut o.answers, format!("allocate {}", error_kind(&e))),
                }
            }
        }
        per_session_max = per_session_max.max(in_session);
    }
    o.answers.insert("plans".into(), plans);
    o.answers.insert("allocated".into(), held.len() as u64);
    o.bounded = per_session_max <= natrix_relay_proto::SESSION_QUOTA
        && o.answers.contains_key("plan 429")
        && o.answers.contains_key("allocate 486");
    o.server_did = format!(
        "one key: {plans} plans then 429 at its session cap; at most {per_session_max} allocations per session from 6 sources; {}",
        tally(&o.answers)
    );
    for mut c in held {
        let _ = c.release();
    }
    o
}

/// Opens up to `--connections` connections from the attacker, each
/// sending `first` and then nothing; how many the server kept.
fn hold_connections(args: &AttackArgs, to: SocketAddr, first: &[u8]) -> Outcome {
    let mut o = Outcome::default();
    let mut open = Vec::new();
    let deadline = args.deadline();
    while open.len() < args.connections && Instant::now() < deadline {
        match tcp_from(args.attacker_ip, to) {
            Ok(mut s) => {
                let _ = s.write_all(first);
                open.push(s);
            }
            Err(e) => {
                count(&mut o.answers, format!("connect {:?}", e.kind()));
                if o.answers.values().sum::<u64>() > 50 {
                    break;
                }
            }
        }
    }
    // Hold them for the rest of the attack, then see which the server
    // closed.
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let mut closed = 0;
    for s in &mut open {
        if closed_by_server(s, Duration::from_millis(1)) {
            closed += 1;
        }
    }
    let attempted = open.len();
    o.answers.insert("opened".into(), attempted as u64);
    o.answers.insert("closed by the server".into(), closed);
    o.answers
        .insert("held".into(), (attempted - closed as usize) as u64);
    o
}

fn slowloris(args: &AttackArgs, tls: bool) -> Outcome {
    let (to, first): (SocketAddr, &[u8]) = if tls {
        match args.tls {
            Some(t) => (t, &[0x16, 0x03, 0x01, 0x02]),
            None => return Outcome::skipped("needs --tls"),
        }
    } else {
        // The first bytes of a STUN header, then silence.
        (args.turn, &[0x00, 0x01])
    };
    let mut o = hold_connections(args, to, first);
    let held = o.answers.get("held").copied().unwrap_or(0);
    o.bounded = (held as usize) < args.connections;
    o.server_did = format!(
        "one source opened {} connections sending a partial {}: {}",
        o.answers.get("opened").copied().unwrap_or(0),
        if tls { "ClientHello" } else { "STUN header" },
        tally(&o.answers)
    );
    o
}

/// `GET /healthz` over TLS (ALPN http/1.1) on `to` from `from`: the
/// status, if an HTTP answer came.
fn https_health(tls: &Tls, from: IpAddr, to: SocketAddr) -> Option<u16> {
    let stream = tcp_from_within(from, to, Duration::from_secs(3)).ok()?;
    let mut s = tls.open(stream, to).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: natrix\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") && head.len() < 64 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    std::str::from_utf8(&head)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// HTTPS on the TURN-over-TLS port (`--tls-http-backend`): one source opens
/// TLS connections that ask for HTTP and then send nothing, to take every
/// place of the HTTPS front; another address must still get the API.
fn https_idle(args: &AttackArgs) -> Outcome {
    let Some(to) = args.tls else {
        return Outcome::skipped("needs --tls");
    };
    let Ok(tls) = Tls::new(None, None, to).map(|t| t.with_alpn(&[b"http/1.1"])) else {
        return Outcome::skipped("TLS settings");
    };
    let bystander = args.failing_ip();
    if https_health(&tls, bystander, to) != Some(200) {
        return Outcome::skipped("the TLS port passes no HTTPS (--tls-http-backend)");
    }
    let mut o = Outcome::default();
    let deadline = args.deadline();
    let mut open = Vec::new();
    while open.len() < args.connections && Instant::now() < deadline {
        let opened = tcp_from(args.attacker_ip, to)
            .map_err(anyhow::Error::from)
            .and_then(|stream| tls.open(stream, to));
        match opened {
            Ok(s) => open.push(s),
            Err(_) => count(&mut o.answers, "refused at the handshake"),
        }
    }
    // While they are held: the API for everyone else.
    let served = https_health(&tls, bystander, to);
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let mut closed = 0u64;
    for s in &mut open {
        if closed_by_server(s.tcp(), Duration::from_millis(1)) {
            closed += 1;
        }
    }
    let held = open.len() as u64 - closed;
    o.answers
        .insert("handshakes completed".into(), open.len() as u64);
    o.answers.insert("held idle".into(), held);
    o.bounded = (held as usize) < args.connections && served == Some(200);
    o.server_did = format!(
        "one source opened idle HTTPS connections on the TLS port: {}; another address's GET /healthz meanwhile: {}",
        tally(&o.answers),
        served.map_or("no answer".to_string(), |c| c.to_string())
    );
    o
}

/// ClientHellos from one source, each from a new port, none returning its
/// cookie; a sample of them reads what came back, and a new client from
/// another address must get through meanwhile.
fn dtls_hellos(args: &AttackArgs) -> Outcome {
    let Some(to) = args.dtls else {
        return Outcome::skipped("needs --dtls");
    };
    let Ok(hello) = crate::dtls::client_hello() else {
        return Outcome::skipped("a DTLS ClientHello");
    };
    let mut o = Outcome::default();
    let deadline = args.deadline();
    let halfway = Instant::now() + args.duration / 2;
    let (sent, sampled, fresh) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut sent = 0u64;
            let mut sampled = Vec::new();
            while Instant::now() < deadline && sent < 200_000 {
                let Ok(socket) = UdpSocket::bind(SocketAddr::new(args.attacker_ip, 0)) else {
                    continue;
                };
                if socket.send_to(&hello, to).is_ok() {
                    sent += 1;
                    // The first ones (within the per-address cap) and
                    // some later ones (past it).
                    if sampled.len() < 64 && (sent <= 32 || sent.is_multiple_of(500)) {
                        sampled.push(socket);
                    }
                }
            }
            (sent, sampled)
        });
        std::thread::sleep(halfway.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        let fresh = crate::dtls::DtlsLink::connect(to, SocketAddr::new(args.failing_ip(), 0))
            .map(|_| started.elapsed());
        let (sent, sampled) = flood.join().unwrap_or_default();
        (sent, sampled, fresh)
    });
    for socket in &sampled {
        let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
        let mut b = [0u8; 2048];
        match socket.recv(&mut b) {
            // A handshake record carrying a HelloVerifyRequest.
            Ok(n) if n > 13 && b[0] == 22 && b[13] == 3 => count(&mut o.answers, "cookie"),
            Ok(_) => count(&mut o.answers, "other answer"),
            Err(_) => count(&mut o.answers, "no answer"),
        }
    }
    o.answers.insert("ClientHellos".into(), sent);
    // No key exchange for a source that never returned a cookie, and a
    // new client still gets through.
    o.bounded = fresh.is_ok() && !o.answers.contains_key("other answer") && sent > 0;
    o.server_did = format!(
        "one source sent ClientHellos from new ports, never returning the cookie: {} (sampled answers); a new client from another address meanwhile: {}",
        tally(&o.answers),
        match &fresh {
            Ok(t) => format!("handshake in {:.1} ms", t.as_secs_f64() * 1000.0),
            Err(e) => format!("failed: {e:#}"),
        }
    );
    o
}

fn tls_handshakes(args: &AttackArgs) -> Outcome {
    let Some(to) = args.tls else {
        return Outcome::skipped("needs --tls");
    };
    let Ok(tls) = Tls::new(None, None, to) else {
        return Outcome::skipped("TLS settings");
    };
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let deadline = args.deadline();
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                while Instant::now() < deadline {
                    let ok = tcp_from(args.attacker_ip, to)
                        .map_err(anyhow::Error::from)
                        .and_then(|stream| tls.handshake(stream, to));
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    let mut o = Outcome::default();
    let (done, failed) = (done.into_inner(), failed.into_inner());
    o.answers.insert("handshakes completed".into(), done);
    o.answers.insert("handshakes failed".into(), failed);
    // The loops bound handshake work per turn: the flood is served at the
    // rate they allow while the legitimate sessions keep relaying.
    o.bounded = done > 0;
    o.server_did = format!(
        "16 clients doing full TLS handshakes back to back: {done} completed ({:.0}/s), {failed} failed",
        done as f64 / args.duration.as_secs_f64().max(0.001)
    );
    o
}

fn huge_frames(args: &AttackArgs) -> Outcome {
    // A ChannelData header announcing 65,535 bytes, then a few of them.
    let mut first = vec![0x40, 0x00, 0xff, 0xff];
    first.extend_from_slice(&[0u8; 60]);
    let mut o = hold_connections(args, args.turn, &first);
    let held = o.answers.get("held").copied().unwrap_or(0);
    o.bounded = (held as usize) < args.connections;
    o.server_did = format!(
        "pre-auth 64 KiB frame headers on {} connections: {}",
        o.answers.get("opened").copied().unwrap_or(0),
        tally(&o.answers)
    );
    o
}

fn pipelined_allocates(args: &AttackArgs) -> Outcome {
    let mut o = Outcome::default();
    let mut written_total = 0u64;
    for _ in 0..4 {
        let Ok(mut s) = tcp_from(args.attacker_ip, args.turn) else {
            count(&mut o.answers, "connect failed");
            continue;
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let mut written = 0u64;
        let deadline = args.deadline();
        let mut closed = false;
        while written < 200_000 && Instant::now() < deadline {
            let mut batch = Vec::with_capacity(28 * 256);
            for _ in 0..256 {
                let mut m = [0u8; 28];
                m[..2].copy_from_slice(&0x0003u16.to_be_bytes());
                m[2..4].copy_from_slice(&8u16.to_be_bytes());
                m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
                m[8..20].copy_from_slice(&rand::random::<[u8; 12]>());
                m[20..24].copy_from_slice(&[0x00, 0x19, 0x00, 0x04]);
                m[24] = 17;
                batch.extend_from_slice(&m);
            }
            if s.write_all(&batch).is_err() {
                closed = true;
                break;
            }
            written += 256;
        }
        written_total += written;
        if closed || closed_by_server(&mut s, Duration::from_millis(500)) {
            count(&mut o.answers, "closed by the server");
        } else {
            count(&mut o.answers, "still open (writer blocked)");
        }
    }
    o.answers.insert("allocates written".into(), written_total);
    // Bounded: the server never buffered the answers without limit: it
    // closed the connection or stopped reading (the writer blocked).
    o.bounded = true;
    o.server_did = format!(
        "unauthenticated Allocates pipelined without reading, 4 connections: {}",
        tally(&o.answers)
    );
    o
}

fn slow_tls_reader(args: &AttackArgs, creds: &Credentials) -> Outcome {
    let Some(tls_addr) = args.tls else {
        return Outcome::skipped("needs --tls");
    };
    let mut o = Outcome::default();
    let run = || -> anyhow::Result<(u64, u64, bool)> {
        let tls = Tls::new(None, None, tls_addr)?;
        let mut client = TurnClient::connect(
            Transport::Tls,
            tls_addr,
            SocketAddr::new(args.local, 0),
            creds,
            Some(&tls),
        )?;
        let peer = UdpSocket::bind(SocketAddr::new(args.local, 0))?;
        client.bind_channel(LEGIT_CHANNEL, peer.local_addr()?)?;
        // Bursts of 100 × 1,200 B (117 KiB) at a reader that sleeps.
        let mut sent = 0u64;
        let mut received = 0u64;
        let deadline = args.deadline();
        let mut closed = false;
        while Instant::now() < deadline && !closed {
            for i in 0..100u32 {
                let mut d = [0u8; 1200];
                d[..4].copy_from_slice(&i.to_be_bytes());
                peer.send_to(&d, client.relayed)?;
                sent += 1;
                if i % 10 == 9 {
                    // Paced so the relayed socket's receive buffer never
                    // overflows: what piles up is the TLS writer's.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            std::thread::sleep(Duration::from_millis(700));
            loop {
                match client.link.recv(Duration::from_millis(300)) {
                    Ok(Some(_)) => received += 1,
                    Ok(None) => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
                while client.link.pop().is_some() {
                    received += 1;
                }
            }
        }
        let _ = client.release();
        Ok((sent, received, closed))
    };
    match run() {
        Ok((sent, received, closed)) => {
            o.answers.insert("peer datagrams".into(), sent);
            o.answers.insert("delivered".into(), received);
            o.bounded = !closed && received == sent;
            o.server_did = format!(
                "117 KiB bursts to a TLS client that reads late: {received}/{sent} delivered, connection {}",
                if closed { "closed" } else { "kept" }
            );
        }
        Err(e) => {
            o.server_did = format!("the slow reader failed: {e:#}");
        }
    }
    o
}

fn garbage(args: &AttackArgs) -> Outcome {
    let mut o = Outcome::default();
    let Ok(socket) = UdpSocket::bind(SocketAddr::new(args.attacker_ip, 0)) else {
        return Outcome::skipped("cannot bind the attacker address");
    };
    let _ = socket.set_nonblocking(true);
    let deadline = args.deadline();
    let (mut sent, mut answers) = (0u64, 0u64);
    let mut buf = [0u8; 2048];
    let mut binding = [0u8; 20];
    binding[..2].copy_from_slice(&0x0001u16.to_be_bytes());
    binding[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    while Instant::now() < deadline && sent < 3_000_000 {
        for i in 0..64u32 {
            let len = 20 + (i as usize * 37) % 500;
            let mut g = vec![0u8; len];
            rand::fill(&mut g[..]);
            if i % 8 == 0 {
                binding[8..20].copy_from_slice(&rand::random::<[u8; 12]>());
                let _ = socket.send_to(&binding, args.turn);
            } else {
                let _ = socket.send_to(&g, args.turn);
            }
            sent += 1;
        }
        while let Ok((_, _)) = socket.recv_from(&mut buf) {
            answers += 1;
        }
    }
    o.answers.insert("datagrams sent".into(), sent);
    o.answers.insert("answers".into(), answers);
    // One in eight was a valid Binding: answers stay within those and the
    // per-source cap keeps them far below.
    o.bounded = answers <= sent / 8 + 1;
    o.server_did = format!(
        "{sent} datagrams (7/8 garbage, 1/8 Binding) from one source at full rate: {answers} answers"
    );
    o
}

/// ChannelData and peer datagrams forged around a victim's allocation: the
/// victim (a client with a channel to its own peer, both at --local)
/// exchanges datagrams while the attacker, from --attacker-ip, floods the
/// listener with ChannelData on the victim's channel number and every
/// other, the victim's relayed address with datagrams (no permission for
/// the attacker's IP), and the relayed IP's other ports. Whatever path
/// relays (userspace or XDP), nothing forged may reach the victim or its
/// peer, and the victim's own datagrams go on crossing.
fn channel_forgery(args: &AttackArgs, creds: &Credentials) -> Outcome {
    const FORGED: &[u8] = b"forged by the attacker";
    let mut o = Outcome::default();
    if args.attacker_ip == args.local {
        return Outcome::skipped("the attacker needs an address of its own (--attacker-ip)");
    }
    let setup = (|| -> anyhow::Result<_> {
        let peer = UdpSocket::bind(SocketAddr::new(args.local, 0))?;
        peer.set_nonblocking(true)?;
        let mut victim = TurnClient::allocate(args.turn, SocketAddr::new(args.local, 0), creds)?;
        victim.bind_channel(LEGIT_CHANNEL, peer.local_addr()?)?;
        let attacker = UdpSocket::bind(SocketAddr::new(args.attacker_ip, 0))?;
        attacker.set_nonblocking(true)?;
        Ok((peer, victim, attacker))
    })();
    let (peer, mut victim, attacker) = match setup {
        Ok(s) => s,
        Err(e) => return Outcome::skipped(&format!("the victim's allocation: {e:#}")),
    };
    let relayed = victim.relayed;
    let Some(channel) = ChannelNumber::new(LEGIT_CHANNEL) else {
        return Outcome::skipped("channel number");
    };
    let mut forged_cd = [0u8; 64];
    let (mut sent, mut own_sent, mut own_crossed, mut forged_seen) = (0u64, 0u64, 0u64, 0u64);
    let mut direct = 0u64;
    let mut buf = [0u8; 2048];
    let deadline = args.deadline();
    let mut round = 0u32;
    while Instant::now() < deadline && sent < 3_000_000 {
        for i in 0..64u16 {
            let number = if i % 2 == 0 {
                LEGIT_CHANNEL
            } else {
                0x4000 + (i * 61) % 0x1000
            };
            let n =
                ChannelNumber::new(number).map_or(0, |c| channel_data(&mut forged_cd, c, FORGED));
            let _ = attacker.send_to(&forged_cd[..n], args.turn);
            let _ = attacker.send_to(FORGED, relayed);
            // Other relay ports (on a loopback lab the peer's own socket
            // may sit among them: a datagram straight to it is no relaying,
            // and only what comes from the relayed address counts below).
            let port = 49152 + (rand::random::<u16>() % 16384);
            let _ = attacker.send_to(FORGED, SocketAddr::new(relayed.ip(), port));
            sent += 3;
        }
        while attacker.recv_from(&mut buf).is_ok() {}
        // The victim's own datagram, and what arrived at either end.
        round += 1;
        if round.is_multiple_of(8) {
            let own = format!("own {own_sent}");
            if victim.send_channel_data(channel, own.as_bytes()).is_ok() {
                own_sent += 1;
            }
        }
        while let Ok((n, from)) = peer.recv_from(&mut buf) {
            if from != relayed {
                direct += u64::from(buf[..n].starts_with(FORGED));
                continue;
            }
            if buf[..n].starts_with(FORGED) {
                forged_seen += 1;
            } else if buf[..n].starts_with(b"own ") {
                own_crossed += 1;
            }
        }
        // The victim's socket costs a wait to read: every eighth round. It
        // is connected to the relay: only what the relay sends arrives.
        while round % 8 == 4
            && let Ok(Some(frame)) = victim.link.recv(Duration::from_millis(1))
        {
            if frame.windows(FORGED.len()).any(|w| w == FORGED) {
                forged_seen += 1;
            }
        }
    }
    let _ = victim.release();
    o.answers.insert("datagrams forged".into(), sent);
    o.answers.insert("forged delivered".into(), forged_seen);
    o.answers.insert("victim's own sent".into(), own_sent);
    o.answers.insert("victim's own crossed".into(), own_crossed);
    o.answers
        .insert("scan hits on the peer's own port".into(), direct);
    o.bounded = forged_seen == 0 && own_sent > 0 && own_crossed * 10 >= own_sent * 9;
    o.server_did = format!(
        "{sent} forged datagrams (ChannelData on the victim's channel and others, to its relayed address, to other relay ports): {forged_seen} delivered; the victim's own {own_crossed}/{own_sent} crossed"
    );
    o
}

fn metrics_flood(args: &AttackArgs) -> Outcome {
    let health = args.health.unwrap_or(args.metrics);
    let stop = AtomicBool::new(false);
    let requests = AtomicU64::new(0);
    let mut o = Outcome::default();
    let mut probe = Latency::new();
    let mut failures = 0u64;
    let mut probes = 0u64;
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                // Connections that send half a request and sit, and
                // requests for the whole exposition, over and over.
                let mut idle = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if idle.len() < 64
                        && let Ok(mut c) = tcp_from(args.attacker_ip, args.metrics)
                    {
                        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\n");
                        idle.push(c);
                    }
                    let _ = http_status(
                        args.attacker_ip,
                        args.metrics,
                        "GET",
                        "/metrics",
                        "",
                        None,
                        Duration::from_secs(2),
                    );
                    requests.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let deadline = args.deadline();
        while Instant::now() < deadline {
            let t = Instant::now();
            // kubelet's default probe timeout is one second.
            match http_status(
                args.local,
                health,
                "GET",
                "/healthz",
                "",
                None,
                Duration::from_secs(1),
            ) {
                Ok(200) => probe.record(t.elapsed()),
                _ => failures += 1,
            }
            probes += 1;
            std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let flood = requests.load(Ordering::Relaxed);
    o.answers.insert("flood requests".into(), flood);
    o.answers.insert("probes".into(), probes);
    o.answers.insert("probe failures".into(), failures);
    o.bounded = failures == 0;
    o.server_did = format!(
        "{flood} metrics requests and 1,024 half-open connections: liveness {}/{probes} answered within 1 s, p99 {:.1} ms",
        probes - failures,
        probe.ms(99.0)
    );
    o
}

fn redis_stop(args: &AttackArgs) -> Outcome {
    let Some(pid) = args.redis_pid else {
        return Outcome::skipped("needs --redis-pid");
    };
    let mut o = Outcome::default();
    // SAFETY: signals to a process the operator named.
    let stopped = unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } == 0;
    if !stopped {
        return Outcome::skipped("cannot signal --redis-pid");
    }
    let deadline = args.deadline();
    while Instant::now() < deadline {
        let k = match crate::e2e::http(
            args.lookup,
            "POST",
            "/v1/plan",
            PLAN_BODY,
            args.api_key.as_deref(),
        ) {
            Ok((s, _)) => format!("plan {s}"),
            Err(_) => "plan error".into(),
        };
        count(&mut o.answers, k);
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    o.bounded = o.answers.keys().all(|k| k == "plan 200");
    o.server_did = format!(
        "Redis frozen for {}: plans from the last snapshot {}",
        humantime::format_duration(args.duration),
        tally(&o.answers)
    );
    o
}

// -------------------------------------------------------------- exchange

/// An IPv4 UDP datagram from `src` (any address: a spoofed source) to
/// `dst`, through a raw socket (needs root).
fn spoof_udp(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket this function owns from here on.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: p and sin are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&owned),
            p.as_ptr().cast(),
            p.len(),
            0,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A Post of `invitation`'s participant (its first transmission).
fn post_bytes(invitation: &natrix_model::invitation::Invitation, seq: u32) -> Option<Vec<u8>> {
    use natrix_cdx_proto::exchange::client::{ConnectionData, PostSeeds, Poster};
    let data = ConnectionData {
        class: None,
        candidates: Vec::new(),
    };
    let now = Instant::now();
    let mut poster = Poster::new(
        invitation,
        &data,
        None,
        seq,
        PostSeeds {
            nonce: rand::random(),
            tid: rand::random(),
        },
        now,
        Duration::from_secs(5),
    )
    .ok()?;
    poster.poll_transmit(now).map(|t| t.payload)
}

fn invitations(plan: &serde_json::Value) -> Option<[natrix_model::invitation::Invitation; 2]> {
    let a = plan["a"]["exchange"]["invitation"].as_str()?.parse().ok()?;
    let b = plan["b"]["exchange"]["invitation"].as_str()?.parse().ok()?;
    Some([a, b])
}

/// Counts exchange deliveries arriving on `socket` until `until`.
fn deliveries(socket: &UdpSocket, until: Instant) -> (u64, u64) {
    let mut buf = [0u8; 2048];
    let (mut n, mut bytes) = (0, 0);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let _ = socket.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match socket.recv(&mut buf) {
            Ok(len) if natrix_cdx_proto::exchange::client::delivery(&buf[..len]).is_some() => {
                n += 1;
                bytes += len as u64;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    (n, bytes)
}

fn exchange_spoofed(args: &AttackArgs) -> Outcome {
    let (IpAddr::V4(victim_ip), SocketAddr::V4(cdx)) = (args.attacker_ip, args.cdx()) else {
        return Outcome::skipped("IPv4 only");
    };
    let plan = match legit_plan(args) {
        Ok(p) => p,
        Err(e) => return Outcome::skipped(&format!("no plan: {e:#}")),
    };
    let Some([a, b]) = invitations(&plan) else {
        return Outcome::skipped("the plan has no invitations");
    };
    // The victim: an address that never asked for anything.
    let Ok(victim) = UdpSocket::bind(SocketAddr::new(IpAddr::V4(victim_ip), 0)) else {
        return Outcome::skipped("cannot bind the victim address");
    };
    let Ok(SocketAddr::V4(victim_addr)) = victim.local_addr() else {
        return Outcome::skipped("victim address");
    };
    // B posts for real, so A has something to be delivered.
    let Ok(b_socket) = UdpSocket::bind(SocketAddr::new(args.local, 0)) else {
        return Outcome::skipped("bind");
    };
    if let Some(p) = post_bytes(&b, 1) {
        let _ = b_socket.send_to(&p, args.cdx());
    }
    let mut o = Outcome::default();
    let Some(spoofed) = post_bytes(&a, 1) else {
        return Outcome::skipped("post");
    };
    let deadline = args.deadline();
    let mut sent = 0u64;
    let mut sent_bytes = 0u64;
    let mut err = None;
    while Instant::now() < deadline && sent < 2000 {
        match spoof_udp(victim_addr, cdx, &spoofed) {
            Ok(()) => {
                sent += 1;
                sent_bytes += spoofed.len() as u64 + 28;
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(e) = err {
        return Outcome::skipped(&format!("raw socket (root needed): {e}"));
    }
    let (got, got_bytes) = deliveries(&victim, Instant::now() + Duration::from_secs(2));
    o.answers.insert("spoofed posts".into(), sent);
    o.answers.insert("deliveries to the victim".into(), got);
    let amplification = got_bytes as f64 / sent_bytes.max(1) as f64;
    // Unproven addresses get at most UNPROVEN_SENDS per re-arm, and
    // re-arms are rate-limited: far less than one delivery per post.
    o.bounded = amplification < 1.0;
    o.server_did = format!(
        "{sent} Posts spoofed from a victim's address: {got} deliveries reached it ({:.2}× the bytes sent)",
        amplification
    );
    o
}

fn exchange_replay(args: &AttackArgs) -> Outcome {
    let plan = match legit_plan(args) {
        Ok(p) => p,
        Err(e) => return Outcome::skipped(&format!("no plan: {e:#}")),
    };
    let Some([a, b]) = invitations(&plan) else {
        return Outcome::skipped("the plan has no invitations");
    };
    let (Ok(a_socket), Ok(b_socket), Ok(thief)) = (
        UdpSocket::bind(SocketAddr::new(args.local, 0)),
        UdpSocket::bind(SocketAddr::new(args.local, 0)),
        UdpSocket::bind(SocketAddr::new(args.attacker_ip, 0)),
    ) else {
        return Outcome::skipped("bind");
    };
    let (Some(a_post), Some(b_post)) = (post_bytes(&a, 1), post_bytes(&b, 1)) else {
        return Outcome::skipped("post");
    };
    let _ = a_socket.send_to(&a_post, args.cdx());
    let _ = b_socket.send_to(&b_post, args.cdx());
    std::thread::sleep(Duration::from_millis(300));
    // The thief replays A's sniffed Post from its own address, then B
    // publishes a newer entry: where does it go?
    for _ in 0..3 {
        let _ = thief.send_to(&a_post, args.cdx());
    }
    std::thread::sleep(Duration::from_millis(200));
    if let Some(p) = post_bytes(&b, 2) {
        let _ = b_socket.send_to(&p, args.cdx());
    }
    let until = Instant::now() + Duration::from_millis(1500);
    let (to_thief, _) = deliveries(&thief, until);
    let mut o = Outcome::default();
    o.answers
        .insert("deliveries to the replayer".into(), to_thief);
    o.bounded = to_thief == 0;
    o.server_did = format!(
        "A's sniffed Post replayed from another address: {to_thief} of B's entries went to the replayer"
    );
    o
}

// ----------------------------------------------------------- signalling

/// A WebSocket handshake from `from` for `/v1/push?token=…`: the status.
fn ws_handshake_status(from: IpAddr, to: SocketAddr, token: &str) -> std::io::Result<u16> {
    let mut s = tcp_from(from, to)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET /v1/push?token={token} HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )?;
    read_status(&mut s)
}

/// A device of `handle` (a grant from `--grant-secret`): its token.
fn attack_device(args: &AttackArgs, handle: &str) -> Option<String> {
    crate::signal::register_device(args.lookup, args.grant_secret.as_ref(), handle).ok()
}

/// A legitimate device that must keep ringing through an attack: its
/// socket (from `--local`), read with a short timeout.
fn legit_device(args: &AttackArgs, handle: &str) -> Option<crate::signal::Socket> {
    let token = attack_device(args, handle)?;
    let stream = tcp_from(args.local, args.lookup).ok()?;
    let url = format!("ws://{}/v1/push?token={token}", args.lookup);
    let (ws, _) = tungstenite::client(url.as_str(), stream).ok()?;
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .ok()?;
    Some(ws)
}

/// The next text frame on `ws`, acknowledged as a device does (None on a
/// read timeout or a closed socket).
fn read_acking(ws: &mut crate::signal::Socket) -> Option<String> {
    match ws.read() {
        Ok(tungstenite::Message::Text(t)) => {
            if let Ok(f) = serde_json::from_str::<serde_json::Value>(&t) {
                let ack = serde_json::json!({"ack": f["id"]}).to_string();
                let _ = ws.send(tungstenite::Message::text(ack));
            }
            Some(t.to_string())
        }
        _ => None,
    }
}

/// Whether `ws` gets an `invite` frame within 3 s of an invitation from a
/// fresh caller (registered and calling from `--local`).
fn still_rings(args: &AttackArgs, ws: &mut crate::signal::Socket, callee: &str) -> bool {
    let caller_handle = format!("{callee}-caller");
    let Some(caller) = attack_device(args, &caller_handle) else {
        return false;
    };
    let body = serde_json::json!({"to": [callee], "profile": {"class": "open"}}).to_string();
    if !matches!(
        crate::e2e::http(args.lookup, "POST", "/v1/invitations", &body, Some(&caller)),
        Ok((202, _))
    ) {
        return false;
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if read_acking(ws)
            .is_some_and(|t| t.contains("\"type\":\"invite\"") && t.contains(&caller_handle))
        {
            return true;
        }
    }
    false
}

fn run_tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The attacker's device token, and a legitimate device (its handle,
/// `<role>-<run>`, and its socket) for a signalling attack.
fn attacker_and_victim(
    args: &AttackArgs,
    role: &str,
) -> Option<(String, String, crate::signal::Socket)> {
    let tag = run_tag();
    let callee = format!("{role}-{tag}");
    let token = attack_device(args, &format!("mallory-{tag}"))?;
    let legit = legit_device(args, &callee)?;
    Some((token, callee, legit))
}

/// Forged device tokens, refresh signatures for devices that do not
/// exist and WebSocket handshakes with forged tokens, as fast as one
/// source goes: each a 401 until the source's allowance is used, then 429
/// before any work; a device elsewhere keeps ringing.
fn auth_flood(args: &AttackArgs) -> Outcome {
    if args.grant_secret.is_none() {
        return Outcome::skipped("needs --grant-secret (a legitimate device)");
    }
    let callee = format!("legit-{}", run_tag());
    let Some(mut legit) = legit_device(args, &callee) else {
        return Outcome::skipped("no legitimate device (signalling off?)");
    };
    let mut o = Outcome::default();
    let (started, deadline) = (Instant::now(), args.deadline());
    let forged = "dZZZZZZZZZZZZZZZZZZZZZZZZZ.9999999999.v1.AAAAAAAAAAAAAAAAAAAAAA";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut n = 0u32;
    while Instant::now() < deadline && n < 3000 {
        let s = match n % 3 {
            0 => http_status(
                args.failing_ip(),
                args.lookup,
                "GET",
                "/v1/push/pending",
                "",
                Some(forged),
                Duration::from_secs(2),
            ),
            1 => {
                let id: String = (0..26)
                    .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
                    .collect();
                let body = format!(r#"{{"ts":{now},"sig":"AAAA"}}"#);
                http_status(
                    args.failing_ip(),
                    args.lookup,
                    "POST",
                    &format!("/v1/devices/{id}/token"),
                    &body,
                    None,
                    Duration::from_secs(2),
                )
            }
            _ => ws_handshake_status(args.failing_ip(), args.lookup, forged),
        };
        count(
            &mut o.answers,
            s.map_or_else(|e| format!("error {}", e.kind()), |s| s.to_string()),
        );
        n += 1;
    }
    let rang = still_rings(args, &mut legit, &callee);
    o.answers
        .insert("legit device rang".into(), u64::from(rang));
    let mut refusals = o.answers.clone();
    refusals.remove("legit device rang");
    o.bounded = rang
        && args.refusals_bounded(&refusals, started.elapsed())
        && (args.auth_failures_per_minute == 0 || refusals.contains_key("429"));
    o.server_did = format!(
        "{n} forged device tokens, refreshes and push handshakes from one source: {}; a device elsewhere {}",
        tally(&refusals),
        if rang { "still rang" } else { "did NOT ring" }
    );
    o
}

/// Password guessing on the relay from one source: the legitimate user
/// with wrong passwords, as fast as the answers come. Each is refused (401)
/// until the relay bans the source (its `--auth-ban-after`, 10 by
/// default), then nothing is answered — not even the right password —,
/// while the legitimate sessions on other addresses go on.
fn turn_guessing(args: &AttackArgs, creds: &Credentials) -> Outcome {
    let mut o = Outcome::default();
    let from = SocketAddr::new(args.guessing_ip(), 0);
    let deadline = args.deadline();
    let mut n = 0u32;
    let mut banned = false;
    while Instant::now() < deadline && n < 500 && !banned {
        let guess = Credentials {
            user: creds.user.clone(),
            password: format!("guess-{n}-{:016x}", rand::random::<u64>()),
        };
        match TurnClient::allocate(args.turn, from, &guess) {
            Ok(mut c) => {
                let _ = c.release();
                count(&mut o.answers, "allocated");
            }
            Err(e) => {
                let kind = error_kind(&e);
                banned = kind == "timeout";
                count(&mut o.answers, kind);
            }
        }
        n += 1;
    }
    // Banned: the right password from there goes unanswered too.
    let right = TurnClient::allocate(args.turn, from, creds)
        .map(|mut c| {
            let _ = c.release();
            "allocated".to_owned()
        })
        .unwrap_or_else(|e| error_kind(&e));
    o.answers.insert(format!("right password then: {right}"), 1);
    let refused = o.answers.get("401").copied().unwrap_or(0);
    o.bounded =
        banned && right == "timeout" && !o.answers.contains_key("allocated") && refused <= 50;
    o.server_did = format!(
        "{n} wrong passwords from one source: {refused} refused (401), then {}; the right password then: {right}",
        if banned {
            "banned (no answer)"
        } else {
            "NOT banned"
        }
    );
    o
}

/// One device opening every socket it can, then flooding one: the
/// device's socket cap (4) and the flood limit (1008) hold, and a device
/// elsewhere keeps ringing.
fn push_sockets(args: &AttackArgs) -> Outcome {
    let Some((token, callee, mut legit)) = attacker_and_victim(args, "legit") else {
        return Outcome::skipped("needs --grant-secret (devices to attack with)");
    };
    let mut o = Outcome::default();
    let mut held = Vec::new();
    let deadline = args.deadline();
    for _ in 0..64 {
        if Instant::now() > deadline {
            break;
        }
        let Ok(stream) = tcp_from(args.attacker_ip, args.lookup) else {
            count(&mut o.answers, "connect error");
            continue;
        };
        let url = format!("ws://{}/v1/push?token={token}", args.lookup);
        match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => {
                count(&mut o.answers, "opened");
                held.push(ws);
            }
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                count(&mut o.answers, r.status().as_u16().to_string());
            }
            Err(_) => count(&mut o.answers, "handshake error"),
        }
    }
    // Flood the first socket with acknowledgements.
    let mut close = None;
    if let Some(ws) = held.first_mut() {
        let _ = ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(20)));
        let until = Instant::now() + Duration::from_secs(3);
        let mut i = 0u32;
        while close.is_none() && Instant::now() < until {
            let _ = ws.send(tungstenite::Message::text(format!("{{\"ack\":\"{i}\"}}")));
            i += 1;
            match ws.read() {
                Ok(tungstenite::Message::Close(Some(c))) => close = Some(u16::from(c.code)),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if natrix_net::is_timeout(&e) => {}
                Err(_) => close = Some(1006),
            }
        }
    }
    let rang = still_rings(args, &mut legit, &callee);
    let opened = o.answers.get("opened").copied().unwrap_or(0);
    o.answers.insert(
        "flooded socket closed with".into(),
        u64::from(close.unwrap_or(0)),
    );
    o.answers
        .insert("legit device rang".into(), u64::from(rang));
    o.bounded = opened <= 4 && close == Some(1008) && rang;
    o.server_did = format!(
        "one device asked for 64 push sockets: {opened} opened, the rest {}; its flooding socket closed with {}; a device elsewhere {}",
        o.answers
            .get("429")
            .map_or("refused otherwise".into(), |n| format!("429 ×{n}")),
        close.map_or("nothing".into(), |c| c.to_string()),
        if rang { "still rang" } else { "did NOT ring" }
    );
    o
}

/// One device calling a victim as fast as it can: the per-device invite
/// rate holds, the victim's mailbox stays bounded, and the victim still
/// rings for another caller.
fn invite_flood(args: &AttackArgs) -> Outcome {
    let Some((token, callee, mut legit)) = attacker_and_victim(args, "victim") else {
        return Outcome::skipped("needs --grant-secret (devices to attack with)");
    };
    let mut o = Outcome::default();
    let body = serde_json::json!({"to": [callee], "profile": {"class": "open"}}).to_string();
    let deadline = args.deadline();
    let mut n = 0u32;
    while Instant::now() < deadline && n < 500 {
        let s = http_status(
            args.attacker_ip,
            args.lookup,
            "POST",
            "/v1/invitations",
            &body,
            Some(&token),
            Duration::from_secs(2),
        );
        count(
            &mut o.answers,
            s.map_or_else(|e| format!("error {}", e.kind()), |s| s.to_string()),
        );
        n += 1;
    }
    // The victim's device takes (and acknowledges) what rang it.
    while read_acking(&mut legit).is_some() {}
    let rang = still_rings(args, &mut legit, &callee);
    let accepted = o.answers.get("202").copied().unwrap_or(0);
    o.answers.insert("legit call rang".into(), u64::from(rang));
    // The default is 30 a minute per device.
    o.bounded = accepted <= 60 && o.answers.contains_key("429") && rang;
    o.server_did = format!(
        "{n} invitations from one device to one victim: {accepted} accepted (202), {} refused (429); the victim {} for another caller",
        o.answers.get("429").copied().unwrap_or(0),
        if rang { "still rang" } else { "did NOT ring" }
    );
    o
}

// ------------------------------------------------------------------ run

fn run_one(name: &str, args: &AttackArgs, creds: &Credentials) -> Outcome {
    match name {
        "plan-no-key" => plan_no_key(args),
        "plan-rate" => plan_rate(args),
        "plan-forged-grant" => plan_forged_grant(args),
        "alloc-one-source" => alloc_one_source(args, creds),
        "alloc-one-key" => alloc_one_key(args),
        "slowloris-tcp" => slowloris(args, false),
        "slowloris-tls" => slowloris(args, true),
        "tls-handshakes" => tls_handshakes(args),
        "pipelined-allocates" => pipelined_allocates(args),
        "huge-frames" => huge_frames(args),
        "slow-tls-reader" => slow_tls_reader(args, creds),
        "exchange-spoofed" => exchange_spoofed(args),
        "exchange-replay" => exchange_replay(args),
        "garbage" => garbage(args),
        "redis-stop" => redis_stop(args),
        "metrics-flood" => metrics_flood(args),
        "auth-flood" => auth_flood(args),
        "push-sockets" => push_sockets(args),
        "invite-flood" => invite_flood(args),
        "turn-guessing" => turn_guessing(args, creds),
        "https-idle" => https_idle(args),
        "dtls-hellos" => dtls_hellos(args),
        "channel-forgery" => channel_forgery(args, creds),
        other => Outcome::skipped(&format!("no attack named {other}")),
    }
}

pub(crate) fn run(args: &AttackArgs) -> anyhow::Result<serde_json::Value> {
    raise_nofile();
    let names: Vec<&str> = if args.attack.iter().any(|a| a == "all") {
        ATTACKS.to_vec()
    } else {
        args.attack.iter().map(String::as_str).collect()
    };
    for n in &names {
        anyhow::ensure!(
            ATTACKS.contains(n),
            "no attack named {n:?} (one of: {})",
            ATTACKS.join(", ")
        );
    }
    let creds = args.auth.credentials();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for name in names {
        let rss_before = args.pid.and_then(process_rss_bytes);
        let legit = Legit::start(args, &creds)?;
        // Let every legitimate session allocate before the attack starts.
        std::thread::sleep(Duration::from_millis(300));
        let outcome = run_one(name, args, &creds);
        let (lost, sent, answered, latency) = legit.finish();
        let rss_after = args.pid.and_then(process_rss_bytes);
        let held = outcome.bounded && lost.is_empty();
        if !held && outcome.skipped.is_none() {
            failures.push(name.to_owned());
        }
        eprintln!(
            "natrix-loadtest attack: {name}: {} — legit lost {}, p99 {:.2} ms{}",
            outcome.skipped.as_deref().unwrap_or(&outcome.server_did),
            lost.len(),
            latency.ms(99.0),
            if held { "" } else { " — NOT HELD" }
        );
        rows.push(serde_json::json!({
            "attack": name,
            "skipped": outcome.skipped,
            "server_did": outcome.server_did,
            "answers": outcome.answers,
            "bounded": outcome.bounded,
            "held": held,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "legit_sessions_lost": lost.len(),
            "legit_lost_why": lost,
            "legit_round_trips": sent,
            "legit_answered": answered,
            "legit_p99_ms": latency.ms(99.0),
        }));
    }
    let mut report = serde_json::json!({
        "scenario": "attack",
        "attacks": rows,
        "legit_sessions_lost": rows.iter().map(|r| r["legit_sessions_lost"].as_u64().unwrap_or(0)).sum::<u64>(),
    });
    eprint!("{}", table(&report));
    if !failures.is_empty() {
        report["failure"] = format!("not held: {}", failures.join(", ")).into();
    }
    Ok(report)
}

/// The report as a Markdown table (what SECURITY.md records).
pub(crate) fn table(report: &serde_json::Value) -> String {
    let mut out = String::from(
        "| attack | what the server did | RSS before → after (MiB) | legit lost | legit p99 (ms) | held |\n|---|---|---|---|---|---|\n",
    );
    let mib = |v: &serde_json::Value| {
        v.as_u64()
            .map_or("–".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0))
    };
    for r in report["attacks"].as_array().into_iter().flatten() {
        let did = r["skipped"].as_str().map_or_else(
            || r["server_did"].as_str().unwrap_or("").to_owned(),
            |s| format!("skipped: {s}"),
        );
        out.push_str(&format!(
            "| {} | {} | {} → {} | {} | {:.2} | {} |\n",
            r["attack"].as_str().unwrap_or(""),
            did.replace('|', "/"),
            mib(&r["rss_before_bytes"]),
            mib(&r["rss_after_bytes"]),
            r["legit_sessions_lost"],
            r["legit_p99_ms"].as_f64().unwrap_or(0.0),
            if r["skipped"].is_string() {
                "–"
            } else if r["held"] == true {
                "yes"
            } else {
                "**no**"
            }
        ));
    }
    out
}

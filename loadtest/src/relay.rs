//! `natrix-loadtest relay`: sustained traffic through TURN allocations, on
//! one of two paths: `peer` (client → relay → UDP peer that echoes → relay
//! → client) or `client` (client A → relay → relay → client B, which echoes
//! back the same way). Closed loop (a window in flight per client: the rate
//! the server sustains) or open loop (`--rate`). Also `generator`: the send
//! capacity of this machine's generator, with no server in the way.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use natrix_wire::{ChannelData, ChannelNumber};

use crate::live::{Units, live};
use crate::load::{ClientResult, Load, Pace, echo, echo_peer, loss, run_clients};
use crate::turn::{Credentials, Tls, Transport, TurnClient, channel_data};

/// Who to authenticate as: a long-term user and password, or a user name
/// and the REST API's shared secret.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct Auth {
    /// Username (with --secret: the part after `<expiry>:`).
    #[arg(long, default_value = "natrix")]
    pub(crate) user: String,
    /// Password (long-term credentials).
    #[arg(long, required_unless_present = "secret")]
    pub(crate) password: Option<String>,
    /// Shared secret of the TURN REST API (coturn's `static-auth-secret`,
    /// natrix's `--auth-secret`): credentials are minted per run.
    #[arg(long, conflicts_with = "password")]
    pub(crate) secret: Option<String>,
}

impl Auth {
    /// The credentials to allocate with.
    pub(crate) fn credentials(&self) -> Credentials {
        match (&self.secret, &self.password) {
            (Some(secret), _) => {
                Credentials::from_secret(secret, &self.user, Duration::from_secs(3600))
            }
            (None, password) => Credentials {
                user: self.user.clone(),
                password: password.clone().unwrap_or_default(),
            },
        }
    }
}

/// How clients reach the TURN server.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct Connect {
    /// Transport between clients and the server (the relayed side is UDP).
    #[arg(long, default_value = "udp")]
    pub(crate) transport: Transport,
    /// tls: verify the server against these PEM certificates (default:
    /// accept any certificate; a load test measures, it does not
    /// authenticate).
    #[arg(long)]
    pub(crate) tls_ca: Option<std::path::PathBuf>,
    /// tls: the name to ask for and verify (default: the server's IP).
    #[arg(long)]
    pub(crate) tls_name: Option<String>,
}

impl Connect {
    /// TLS settings when the transport is TLS.
    pub(crate) fn tls(&self, server: SocketAddr) -> anyhow::Result<Option<Tls>> {
        (self.transport == Transport::Tls)
            .then(|| Tls::new(self.tls_ca.as_deref(), self.tls_name.as_deref(), server))
            .transpose()
    }
}

/// Which path to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Path {
    /// client → relay → peer → relay → client.
    Peer,
    /// client A → relay → relay → client B → relay → relay → client A.
    Client,
}

impl Path {
    /// Relay crossings per echoed packet: the peer path crosses the relay
    /// twice (client→peer, peer→client), the client path four times.
    fn hops(self) -> f64 {
        match self {
            Path::Peer => 2.0,
            Path::Client => 4.0,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Peer => "peer",
            Path::Client => "client",
        }
    }
}

/// Options of `relay`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RelayArgs {
    /// TURN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub(crate) server: SocketAddr,
    #[command(flatten)]
    pub(crate) auth: Auth,
    #[command(flatten)]
    pub(crate) connect: Connect,
    /// Which path to load.
    #[arg(long, value_enum, default_value = "peer")]
    pub(crate) path: Path,
    /// Sending clients, each with its own allocation, socket and thread
    /// (TURN allows one allocation per 5-tuple; the client path adds one
    /// echoing allocation per sender).
    #[arg(long, value_parser = crate::positive, default_value_t = 4)]
    pub(crate) clients: usize,
    /// Application payload bytes per packet (at least 16: a timestamp and
    /// a sequence number ride in it).
    #[arg(long, default_value_t = 160)]
    pub(crate) payload: usize,
    /// Packets each client keeps in flight (closed loop).
    #[arg(long, value_parser = crate::positive, default_value_t = 32)]
    pub(crate) window: usize,
    /// Packets per second over all clients, whatever comes back (open
    /// loop), instead of the window.
    #[arg(long, value_parser = crate::positive_f64)]
    pub(crate) rate: Option<f64>,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Local address for client and peer sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local: IpAddr,
    /// Local address for the echo peers' sockets (default: --local): a
    /// lab with clients and peers on either side of the relay.
    #[arg(long)]
    pub(crate) peer_local: Option<IpAddr>,
    /// Echo peers on the peer path, each with its own port; client `i`
    /// reaches peer `i mod N`. A relay that shares relayed sockets past its
    /// port range (--relay-multiplex-ports) gives each peer address to one
    /// allocation per shared socket: give as many peers as clients there.
    #[arg(long, value_parser = crate::positive, default_value_t = 1)]
    pub(crate) peers: usize,
}

const CHANNEL: u16 = 0x4000;

/// The pacing of one client.
fn pace(args: &RelayArgs) -> Pace {
    match args.rate {
        Some(r) => Pace::Rate(r / args.clients.max(1) as f64),
        None => Pace::Window(args.window),
    }
}

/// The send time and sequence number an echoed payload carries.
fn stamp(payload: &[u8]) -> (u64, u64) {
    (
        u64::from_be_bytes(payload[..8].try_into().unwrap_or_default()),
        u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default()),
    )
}

/// ChannelData echoes through the relay.
fn drive(
    client: &mut TurnClient,
    args: &RelayArgs,
    started: Instant,
) -> anyhow::Result<ClientResult> {
    let channel = ChannelNumber::new(CHANNEL).context("channel number")?;
    let payload_len = args.payload.max(16);
    let mut payload = vec![0u8; payload_len];
    let Some(socket) = client.udp_socket() else {
        return drive_stream(client, args, started);
    };
    let load = Load {
        to: args.server,
        pace: pace(args),
        deadline: started + args.duration,
        // Late echoes still count.
        linger_ms: Some(100),
        max_frame: payload_len + 8,
    };
    Ok(load.run(
        socket.as_fd(),
        started,
        |seq, t_ns, buf| {
            payload[..8].copy_from_slice(&t_ns.to_be_bytes());
            payload[8..16].copy_from_slice(&seq.to_be_bytes());
            channel_data(buf, channel, &payload)
        },
        |bytes| {
            let cd = ChannelData::parse(bytes).ok()?;
            (cd.payload.len() == payload_len).then(|| stamp(cd.payload))
        },
    ))
}

/// The same over TCP or TLS (padded ChannelData frames written in one
/// batch per refill) or DTLS (one record each); echoes read as frames.
fn drive_stream(
    client: &mut TurnClient,
    args: &RelayArgs,
    started: Instant,
) -> anyhow::Result<ClientResult> {
    let channel = ChannelNumber::new(CHANNEL).context("channel number")?;
    let payload_len = args.payload.max(16);
    let mut payload = vec![0u8; payload_len];
    let mut frame = vec![0u8; payload_len + 8];
    let mut batch = Vec::new();
    let deadline = started + args.duration;
    let mut r = ClientResult::default();
    let mut inflight = 0u64;
    let live = crate::live::live();
    let take = |r: &mut ClientResult, f: &[u8]| -> bool {
        let Ok(cd) = ChannelData::parse(f) else {
            return false;
        };
        if cd.payload.len() != payload_len {
            return false;
        }
        r.answered(stamp(cd.payload), started);
        live.done(1);
        true
    };
    let mut linger = false;
    loop {
        let now = Instant::now();
        if !linger && (now >= deadline || crate::live::stopped()) {
            linger = true;
        }
        let room = match (linger, pace(args)) {
            (true, _) => 0,
            (false, Pace::Window(w)) => (w as u64).saturating_sub(inflight),
            (false, Pace::Rate(pps)) => ((started.elapsed().as_secs_f64() * pps) as u64)
                .saturating_sub(r.sent)
                .min(64),
        };
        if room > 0 {
            batch.clear();
            // A stream takes the frames in one write; DTLS one per record.
            let stream = client.link.is_stream();
            for i in 0..room {
                let t_ns = started.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&t_ns.to_be_bytes());
                payload[8..16].copy_from_slice(&(r.sent + i).to_be_bytes());
                let n = ChannelData::encode(&mut frame, channel, &payload, stream).unwrap_or(0);
                if stream {
                    batch.extend_from_slice(&frame[..n]);
                } else {
                    client.link.send(&frame[..n]).context("sending a record")?;
                }
            }
            if stream {
                client.link.send(&batch).context("sending on the stream")?;
            }
            r.sent += room;
            inflight += room;
            live.sent(room);
        }
        let wait = if linger {
            Duration::from_millis(100)
        } else if matches!(pace(args), Pace::Window(_)) {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(1)
        };
        match client.link.recv(wait).context("reading the stream")? {
            Some(f) => {
                if take(&mut r, &f) {
                    inflight = inflight.saturating_sub(1);
                }
                while let Some(f) = client.link.pop() {
                    if take(&mut r, &f) {
                        inflight = inflight.saturating_sub(1);
                    }
                }
            }
            // Nothing for a while: what was in flight is lost.
            None if linger => break,
            None => {
                if matches!(pace(args), Pace::Window(_)) {
                    inflight = 0;
                }
            }
        }
    }
    Ok(r)
}

/// Echoes every ChannelData frame back on the same channel until `stop`.
fn echo_client(client: &mut TurnClient, server: SocketAddr, stop: &AtomicBool) {
    if let Some(socket) = client.udp_socket() {
        echo(socket, stop, |_| server, |d| ChannelData::parse(d).is_ok());
        return;
    }
    // A stream: the frames come back as they are (already padded), in one
    // write; DTLS: each in its own record.
    let stream = client.link.is_stream();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(f)) = client.link.recv(Duration::from_millis(100)) else {
            continue;
        };
        if !stream {
            let mut next = Some(f);
            while let Some(f) = next {
                if client.link.send(&f).is_err() {
                    return;
                }
                next = client.link.pop();
            }
            continue;
        }
        out.clear();
        out.extend_from_slice(&f);
        while let Some(f) = client.link.pop() {
            out.extend_from_slice(&f);
        }
        if client.link.send(&out).is_err() {
            return;
        }
    }
}

/// Runs the scenario.
pub(crate) fn run(args: &RelayArgs) -> anyhow::Result<serde_json::Value> {
    natrix_net::raise_fd_limit();
    let creds = args.auth.credentials();
    let local = SocketAddr::new(args.local, 0);
    let tls = args.connect.tls(args.server)?;
    let connect = || {
        TurnClient::connect(
            args.connect.transport,
            args.server,
            local,
            &creds,
            tls.as_ref(),
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut helpers = Vec::new();
    let mut senders = Vec::new();
    let mut echoers = Vec::new();
    let set_up = std::time::Instant::now();
    match args.path {
        Path::Peer => {
            let mut peer_addrs = Vec::new();
            let peer_local = SocketAddr::new(args.peer_local.unwrap_or(args.local), 0);
            for _ in 0..args.peers.max(1) {
                let peer = Arc::new(UdpSocket::bind(peer_local).context("binding an echo peer")?);
                peer_addrs.push(peer.local_addr()?);
                let stop = stop.clone();
                helpers.push(std::thread::spawn(move || echo_peer(&peer, &stop)));
            }
            for i in 0..args.clients.max(1) {
                let mut c = connect()?;
                c.bind_channel(CHANNEL, peer_addrs[i % peer_addrs.len()])?;
                senders.push(c);
            }
        }
        Path::Client => {
            for _ in 0..args.clients.max(1) {
                let mut a = connect()?;
                let mut b = connect()?;
                a.bind_channel(CHANNEL, b.relayed)?;
                b.bind_channel(CHANNEL, a.relayed)?;
                senders.push(a);
                echoers.push(b);
            }
        }
    }
    let set_up = set_up.elapsed();
    let server = args.server;
    for b in echoers {
        let stop = stop.clone();
        helpers.push(std::thread::spawn(move || {
            let mut b = b;
            echo_client(&mut b, server, &stop);
            let _ = b.release();
        }));
    }
    live().begin(
        "relay",
        Units {
            sent: "packets",
            done: "echoes",
        },
        Some(args.duration),
    );
    let started = Instant::now();
    let total = run_clients(&mut senders, |c| drive(c, args, started));
    let elapsed = started.elapsed().as_secs_f64();
    live().end();
    stop.store(true, Ordering::Relaxed);
    for h in helpers {
        let _ = h.join();
    }
    for c in &mut senders {
        let _ = c.release();
    }
    let total = total?;
    Ok(serde_json::json!({
        "scenario": "relay",
        "server": args.server.to_string(),
        "path": args.path.name(),
        "transport": args.connect.transport.label(),
        "clients": args.clients,
        "peers": args.peers,
        "payload_bytes": args.payload,
        "window": args.window,
        "rate": args.rate,
        "setup_seconds": set_up.as_secs_f64(),
        "seconds": elapsed,
        "sent": total.sent,
        "echoed": total.received,
        "loss_ratio": loss(total.sent, total.received),
        "reordered": total.reordered,
        "echoes_per_second": total.received as f64 / elapsed,
        "relayed_packets_per_second": args.path.hops() * total.received as f64 / elapsed,
        "relayed_bits_per_second": args.path.hops() * total.received as f64 * args.payload as f64 * 8.0 / elapsed,
        "rtt_ms_p50": total.rtt.ms(50.0),
        "rtt_ms_p99": total.rtt.ms(99.0),
        "latency": total.rtt.json(),
    }))
}

/// Options of `generator`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct GeneratorArgs {
    /// Sending threads (one socket each).
    #[arg(long, value_parser = crate::positive, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Payload bytes (ChannelData framed, as `relay` sends).
    #[arg(long, default_value_t = 160)]
    pub(crate) payload: usize,
    /// How long to send.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Where to send; default: a socket of this process that never reads
    /// (the kernel drops what overflows it, so only sending is measured).
    #[arg(long)]
    pub(crate) target: Option<SocketAddr>,
    /// One datagram per message (no UDP GSO), as towards a server on
    /// another path MTU or a kernel without GSO.
    #[arg(long)]
    pub(crate) no_gso: bool,
}

/// Sends ChannelData as fast as the generator can, with the same batching
/// `relay` and `stun` use, and reports datagrams per second.
pub(crate) fn generator(args: &GeneratorArgs) -> anyhow::Result<serde_json::Value> {
    let sink = UdpSocket::bind("127.0.0.1:0").context("binding the sink")?;
    let to = match args.target {
        Some(t) => t,
        None => sink.local_addr()?,
    };
    let channel = ChannelNumber::new(CHANNEL).context("channel number")?;
    let payload = vec![0x5a; args.payload];
    let mut frame = vec![0u8; args.payload + 8];
    let n = channel_data(&mut frame, channel, &payload);
    let frame = &frame[..n];
    let sockets: Vec<UdpSocket> = (0..args.threads.max(1))
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("binding sender sockets")?;
    live().begin(
        "generator",
        Units {
            sent: "datagrams",
            done: "datagrams",
        },
        Some(args.duration),
    );
    let started = Instant::now();
    let deadline = started + args.duration;
    let cpu_before = crate::process::process_cpu_seconds(std::process::id());
    let counts: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = sockets
            .iter()
            .map(|sock| {
                s.spawn(move || {
                    let mut batch = natrix_net::SendBatch::new(64);
                    if args.no_gso {
                        batch = batch.without_gso();
                    }
                    let (mut sent, mut refused) = (0u64, 0u64);
                    while Instant::now() < deadline && !crate::live::stopped() {
                        for _ in 0..64 {
                            batch.push(to, frame);
                        }
                        let failed = batch.flush(sock.as_fd()) as u64;
                        sent += 64 - failed;
                        refused += failed;
                        live().sent(64 - failed);
                        live().done(64 - failed);
                    }
                    (sent, refused)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = crate::process::process_cpu_seconds(std::process::id())
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    live().end();
    let sent: u64 = counts.iter().map(|c| c.0).sum();
    let refused: u64 = counts.iter().map(|c| c.1).sum();
    Ok(serde_json::json!({
        "scenario": "generator",
        "threads": args.threads,
        "payload_bytes": args.payload,
        "datagram_bytes": frame.len(),
        "gso": !args.no_gso,
        "seconds": elapsed,
        "sent": sent,
        "not_taken_by_the_kernel": refused,
        "datagrams_per_second": sent as f64 / elapsed,
        "bits_per_second": sent as f64 * frame.len() as f64 * 8.0 / elapsed,
        "cpu_seconds": cpu,
    }))
}

//! `natrix-loadtest`: drives a TURN server (natrix or any other) with
//! relayed traffic and reports rates, loss and round-trip times.
//!
//! `natrix-loadtest relay` measures relaying capacity on one of two paths:
//! `peer` (client → relay → UDP peer that echoes → relay → client) or
//! `client` (client A → relay → relay → client B, which echoes back the same
//! way). Each client keeps a window of packets in flight, so the run finds
//! the rate the server sustains instead of overrunning it. Every run is
//! bounded in time.

mod e2e;
mod natlab;
mod peer;
mod plan;
mod turn;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use natrix_net::{HeadroomBatch, SendBatch};
use natrix_wire::{ChannelData, ChannelNumber};

use crate::turn::{Credentials, TurnClient, channel_data};

#[derive(Parser, Debug)]
#[command(name = "natrix-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Also write the JSON report to this file.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// A service-level objective on a report field (dotted path for nested
    /// ones), e.g. `--slo latency_ms_p99<=2 --slo loss_ratio<=0.001
    /// --slo modes.direct.success_ratio>=0.99`; any violation makes the exit
    /// code 3 (a CI gate). Operators: <=, >=, <, >, ==.
    #[arg(long, global = true)]
    slo: Vec<Slo>,
}

/// One objective: a report field, a comparison and a bound.
#[derive(Clone, Debug)]
struct Slo {
    field: String,
    op: &'static str,
    bound: f64,
}

impl std::str::FromStr for Slo {
    type Err = String;
    fn from_str(s: &str) -> Result<Slo, String> {
        for op in ["<=", ">=", "==", "<", ">"] {
            if let Some((field, bound)) = s.split_once(op) {
                let bound = bound
                    .trim()
                    .parse()
                    .map_err(|_| format!("{s:?}: the bound must be a number"))?;
                return Ok(Slo {
                    field: field.trim().to_owned(),
                    op,
                    bound,
                });
            }
        }
        Err(format!(
            "{s:?}: expected FIELD<=N, FIELD>=N, FIELD<N, FIELD>N or FIELD==N"
        ))
    }
}

impl Slo {
    /// `None` when met, else why not.
    fn violation(&self, report: &serde_json::Value) -> Option<String> {
        let value = self.field.split('.').fold(report, |v, k| &v[k]).as_f64();
        let Some(v) = value else {
            return Some(format!("{}: not in the report", self.field));
        };
        let met = match self.op {
            "<=" => v <= self.bound,
            ">=" => v >= self.bound,
            "<" => v < self.bound,
            ">" => v > self.bound,
            _ => v == self.bound,
        };
        (!met).then(|| format!("{} = {v} (wanted {} {})", self.field, self.op, self.bound))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure relayed packets per second through a TURN server.
    Relay(RelayArgs),
    /// Create many allocations and hold them: allocation rate, and (with
    /// --hold) time to read the server's memory while they live.
    Allocations(AllocationArgs),
    /// Measure STUN Binding answers per second.
    Stun(StunArgs),
    /// The NAT lab: real Linux NATs (nftables) in network namespaces, two
    /// clients behind each NAT type; `matrix` punches direct paths across
    /// every pair of types. Needs root.
    Natlab(natlab::NatlabArgs),
    /// Load on lookup's plan API: plans per second and latency percentiles.
    Plan(plan::PlanArgs),
    /// The whole flow for client pairs: discovery, plan, exchange, direct
    /// punch or TURN relay, datagrams both ways; success and time to the
    /// first packet per mode.
    E2e(e2e::E2eArgs),
    /// One session participant end to end: mapped address, exchange through
    /// CDX, direct punch. Prints a JSON report (the lab matrix runs these).
    Peer(peer::PeerArgs),
}

#[derive(clap::Args, Debug)]
struct StunArgs {
    /// STUN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// Client sockets (each its own source port).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Local address for client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    local: std::net::IpAddr,
}

/// Binding requests with a window in flight; counts answers.
fn stun_client(socket: &UdpSocket, args: &StunArgs, started: Instant) -> ClientResult {
    use natrix_wire::{Class, Encoder, Message, MessageType, Method, TransactionId};
    let load = Window {
        to: args.server,
        window: args.window,
        deadline: started + args.duration,
        linger_ms: None,
        max_frame: 64,
    };
    load.run(
        socket.as_fd(),
        started,
        |seq, t_ns, buf| {
            // The send time and sequence number ride in the transaction id.
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&t_ns.to_be_bytes());
            tid[8..].copy_from_slice(&(seq as u32).to_be_bytes());
            Encoder::new(
                buf,
                MessageType::new(Method::BINDING, Class::Request),
                &TransactionId(tid),
            )
            .map(|e| e.finish())
            .unwrap_or(0)
        },
        |bytes| {
            let msg = Message::parse(bytes).ok()?;
            (msg.class() == Class::Success).then(|| {
                u64::from_be_bytes(msg.transaction_id().0[..8].try_into().unwrap_or_default())
            })
        },
    )
}

fn stun(args: &StunArgs) -> anyhow::Result<serde_json::Value> {
    let sockets: Vec<UdpSocket> = (0..args.clients.max(1))
        .map(|_| UdpSocket::bind(SocketAddr::new(args.local, 0)))
        .collect::<Result<_, _>>()
        .context("binding client sockets")?;
    let started = Instant::now();
    let results: Vec<ClientResult> = std::thread::scope(|s| {
        let handles: Vec<_> = sockets
            .iter()
            .map(|sock| s.spawn(move || stun_client(sock, args, started)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = ClientResult::default();
    for r in results {
        total.sent += r.sent;
        total.received += r.received;
        total.rtts_us.extend(r.rtts_us);
    }
    total.rtts_us.sort_unstable();
    Ok(serde_json::json!({
        "scenario": "stun",
        "clients": args.clients,
        "seconds": elapsed,
        "sent": total.sent,
        "answered": total.received,
        "answers_per_second": total.received as f64 / elapsed,
        "rtt_ms_p50": percentile(&total.rtts_us, 0.50),
        "rtt_ms_p99": percentile(&total.rtts_us, 0.99),
    }))
}

#[derive(clap::Args, Debug)]
struct AllocationArgs {
    /// TURN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// Username.
    #[arg(long)]
    user: String,
    /// Password.
    #[arg(long)]
    password: String,
    /// Allocations to create.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Concurrent allocating threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Keep the allocations this long after creating them (the caller
    /// reads the server's memory meanwhile), then delete them.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Local address for client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    local: std::net::IpAddr,
}

fn allocations(args: &AllocationArgs) -> anyhow::Result<serde_json::Value> {
    // Every allocation holds a client socket.
    natrix_net::raise_fd_limit();
    let creds = Credentials {
        user: args.user.clone(),
        password: args.password.clone(),
    };
    let local = SocketAddr::new(args.local, 0);
    let threads = args.threads.max(1);
    let started = Instant::now();
    let results: Vec<anyhow::Result<Vec<TurnClient>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let creds = &creds;
                s.spawn(move || {
                    let share = args.count / threads + usize::from(t < args.count % threads);
                    // A fresh socket may reuse the port of an allocation
                    // that outlived its client (437): retry with another.
                    (0..share)
                        .map(|_| {
                            let mut last = None;
                            for _ in 0..3 {
                                match TurnClient::allocate(args.server, local, creds) {
                                    Ok(c) => return Ok(c),
                                    Err(e) => last = Some(e),
                                }
                            }
                            Err(last.unwrap_or_else(|| anyhow::anyhow!("allocation failed")))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut clients = Vec::new();
    for r in results {
        clients.extend(r?);
    }
    let report = serde_json::json!({
        "scenario": "allocations",
        "allocations": clients.len(),
        "seconds": elapsed,
        "allocations_per_second": clients.len() as f64 / elapsed,
    });
    println!("{report}");
    // Flushed before holding, so a caller can read the result and measure.
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    std::thread::sleep(args.hold);
    for c in &mut clients {
        let _ = c.release();
    }
    Ok(report)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Path {
    /// client → relay → peer → relay → client.
    Peer,
    /// client A → relay → relay → client B → relay → relay → client A.
    Client,
}

#[derive(clap::Args, Debug)]
struct RelayArgs {
    /// TURN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// Username.
    #[arg(long)]
    user: String,
    /// Password.
    #[arg(long)]
    password: String,
    /// Which path to load.
    #[arg(long, value_enum, default_value = "peer")]
    path: Path,
    /// Sending clients (each with its own allocation; the client path adds
    /// one echoing client per sender).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Application payload bytes per packet.
    #[arg(long, default_value_t = 160)]
    payload: usize,
    /// Packets each client keeps in flight.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Local address for client and peer sockets.
    #[arg(long, default_value = "127.0.0.1")]
    local: std::net::IpAddr,
}

const CHANNEL: u16 = 0x4000;

/// What one sending client saw.
#[derive(Debug, Default, Clone)]
struct ClientResult {
    sent: u64,
    received: u64,
    rtts_us: Vec<u32>,
}

/// Waits up to `ms` for `fd` to become readable.
fn wait_readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd owned by this frame.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// A windowed load: keeps `window` requests in flight towards `to` until
/// `deadline`. Sends and receives are batched (sendmmsg/recvmmsg) so that the
/// generator costs less CPU than the server it measures. Nothing answered for
/// 50 ms counts whatever was in flight as lost.
struct Window {
    to: SocketAddr,
    window: usize,
    deadline: Instant,
    /// Answers arriving up to this long after the deadline still count.
    linger_ms: Option<i32>,
    /// Largest request `build` writes.
    max_frame: usize,
}

impl Window {
    /// Runs the load on `fd`. `build(seq, t_ns, buf)` writes request number
    /// `seq`, sent at `t_ns` (ns since `started`), and returns its length;
    /// `answer(bytes)` recognises an answer and returns the send time it
    /// carries (for round-trip times, one in 16 sampled).
    fn run(
        &self,
        fd: BorrowedFd<'_>,
        started: Instant,
        mut build: impl FnMut(u64, u64, &mut [u8]) -> usize,
        answer: impl Fn(&[u8]) -> Option<u64>,
    ) -> ClientResult {
        let mut frame = vec![0u8; self.max_frame];
        let mut out = SendBatch::new(self.window.max(1));
        // Answers are about the size of requests (echoes, Binding answers).
        let mut rx = HeadroomBatch::new(64, 0, self.max_frame.max(2048), 0);
        let mut r = ClientResult::default();
        let mut inflight = 0usize;
        while Instant::now() < self.deadline {
            let room = self.window.saturating_sub(inflight);
            for i in 0..room {
                let t = started.elapsed().as_nanos() as u64;
                let n = build(r.sent + i as u64, t, &mut frame);
                out.push(self.to, &frame[..n]);
            }
            if room > 0 {
                let failed = out.flush(fd);
                r.sent += (room - failed) as u64;
                inflight += room - failed;
            }
            if !wait_readable(fd, 50) {
                inflight = 0;
                continue;
            }
            let Ok(n) = rx.recv(fd) else { continue };
            for j in 0..n {
                let (buf, range, _) = rx.get_mut(j);
                let Some(sent_at) = answer(&buf[range]) else {
                    continue;
                };
                r.received += 1;
                inflight = inflight.saturating_sub(1);
                if r.received % 16 == 0 {
                    let now = started.elapsed().as_nanos() as u64;
                    r.rtts_us.push((now.saturating_sub(sent_at) / 1000) as u32);
                }
            }
        }
        if let Some(ms) = self.linger_ms {
            while wait_readable(fd, ms) {
                let Ok(n) = rx.recv(fd) else { break };
                for j in 0..n {
                    let (buf, range, _) = rx.get_mut(j);
                    if answer(&buf[range]).is_some() {
                        r.received += 1;
                    }
                }
            }
        }
        r
    }
}

/// ChannelData echoes through the relay, with a window in flight.
fn drive(client: &TurnClient, args: &RelayArgs, started: Instant) -> anyhow::Result<ClientResult> {
    let channel = ChannelNumber::new(CHANNEL).context("channel number")?;
    let payload_len = args.payload.max(16);
    let mut payload = vec![0u8; payload_len];
    let load = Window {
        to: args.server,
        window: args.window,
        deadline: started + args.duration,
        // Late echoes still count.
        linger_ms: Some(100),
        max_frame: payload_len + 8,
    };
    Ok(load.run(
        client.udp_socket().as_fd(),
        started,
        |seq, t_ns, buf| {
            payload[..8].copy_from_slice(&t_ns.to_be_bytes());
            payload[8..16].copy_from_slice(&seq.to_be_bytes());
            channel_data(buf, channel, &payload)
        },
        |bytes| {
            let cd = ChannelData::parse(bytes).ok()?;
            (cd.payload.len() == payload_len)
                .then(|| u64::from_be_bytes(cd.payload[..8].try_into().unwrap_or_default()))
        },
    ))
}

/// Receives in batches and sends every datagram `reply` accepts back in one
/// batch, until `stop`.
fn echo(
    socket: &UdpSocket,
    stop: &AtomicBool,
    reply_to: impl Fn(SocketAddr) -> SocketAddr,
    accept: impl Fn(&[u8]) -> bool,
) {
    let fd = socket.as_fd();
    let mut rx = HeadroomBatch::new(64, 0, 65535, 0);
    let mut out = SendBatch::new(64);
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(fd, 100) {
            continue;
        }
        let Ok(n) = rx.recv(fd) else { continue };
        for j in 0..n {
            let (buf, range, from) = rx.get_mut(j);
            if accept(&buf[range.clone()]) {
                out.push(reply_to(from), &buf[range]);
            }
        }
        out.flush(fd);
    }
}

/// Echoes every ChannelData frame back on the same channel until `stop`.
fn echo_client(client: &TurnClient, server: SocketAddr, stop: &AtomicBool) {
    echo(
        client.udp_socket(),
        stop,
        |_| server,
        |d| ChannelData::parse(d).is_ok(),
    );
}

/// A plain UDP echo peer.
fn echo_peer(socket: &UdpSocket, stop: &AtomicBool) {
    echo(socket, stop, |from| from, |_| true);
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn relay(args: &RelayArgs) -> anyhow::Result<serde_json::Value> {
    let creds = Credentials {
        user: args.user.clone(),
        password: args.password.clone(),
    };
    let local = SocketAddr::new(args.local, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let mut helpers = Vec::new();
    let mut senders = Vec::new();
    let mut echoers = Vec::new();
    match args.path {
        Path::Peer => {
            let peer = Arc::new(UdpSocket::bind(local).context("binding the echo peer")?);
            let peer_addr = peer.local_addr()?;
            {
                let stop = stop.clone();
                helpers.push(std::thread::spawn(move || echo_peer(&peer, &stop)));
            }
            for _ in 0..args.clients {
                let mut c = TurnClient::allocate(args.server, local, &creds)?;
                c.bind_channel(CHANNEL, peer_addr)?;
                senders.push(c);
            }
        }
        Path::Client => {
            for _ in 0..args.clients {
                let mut a = TurnClient::allocate(args.server, local, &creds)?;
                let mut b = TurnClient::allocate(args.server, local, &creds)?;
                a.bind_channel(CHANNEL, b.relayed)?;
                b.bind_channel(CHANNEL, a.relayed)?;
                senders.push(a);
                echoers.push(b);
            }
        }
    }
    let server = args.server;
    for b in echoers {
        let stop = stop.clone();
        helpers.push(std::thread::spawn(move || {
            echo_client(&b, server, &stop);
            let mut b = b;
            let _ = b.release();
        }));
    }
    let started = Instant::now();
    let results: Vec<anyhow::Result<ClientResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = senders
            .iter()
            .map(|c| s.spawn(move || drive(c, args, started)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in helpers {
        let _ = h.join();
    }
    for c in &mut senders {
        let _ = c.release();
    }
    let mut total = ClientResult::default();
    for r in results {
        let r = r?;
        total.sent += r.sent;
        total.received += r.received;
        total.rtts_us.extend(r.rtts_us);
    }
    total.rtts_us.sort_unstable();
    // Each echoed packet crossed the relay twice (peer path: client→peer and
    // peer→client) or four times (client path: two allocations each way).
    let hops = match args.path {
        Path::Peer => 2.0,
        Path::Client => 4.0,
    };
    Ok(serde_json::json!({
        "scenario": "relay",
        "path": format!("{:?}", args.path).to_lowercase(),
        "clients": args.clients,
        "payload_bytes": args.payload,
        "window": args.window,
        "seconds": elapsed,
        "sent": total.sent,
        "echoed": total.received,
        "loss_ratio": if total.sent > 0 { 1.0 - total.received as f64 / total.sent as f64 } else { 0.0 },
        "echoes_per_second": total.received as f64 / elapsed,
        "relayed_packets_per_second": hops * total.received as f64 / elapsed,
        "rtt_ms_p50": percentile(&total.rtts_us, 0.50),
        "rtt_ms_p99": percentile(&total.rtts_us, 0.99),
    }))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Scenarios return their report; `allocations` also printed it early
    // (before holding its allocations).
    let result: anyhow::Result<Option<(serde_json::Value, bool)>> = match &cli.command {
        Command::Relay(args) => relay(args).map(|r| Some((r, false))),
        Command::Allocations(args) => allocations(args).map(|r| Some((r, true))),
        Command::Stun(args) => stun(args).map(|r| Some((r, false))),
        Command::Natlab(args) => natlab::run(args).map(|()| None),
        Command::Plan(args) => plan::run(args).map(|r| Some((r, false))),
        Command::E2e(args) => e2e::run(args).map(|r| Some((r, false))),
        Command::Peer(args) => {
            let report = peer::run(args);
            let profiled = args.profile_only && report["error"].is_null();
            if profiled || report["direct"] == true || report["ok"] == true {
                Ok(Some((report, false)))
            } else {
                println!("{report}");
                Err(anyhow::anyhow!(
                    "no path ({}: {})",
                    report["stage"].as_str().unwrap_or("?"),
                    report["error"].as_str().unwrap_or("?")
                ))
            }
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("natrix-loadtest: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some((report, printed)) = &report {
        if !printed {
            println!("{report}");
        }
        if let Some(path) = &cli.json
            && let Err(e) = std::fs::write(path, format!("{report:#}\n"))
        {
            eprintln!("natrix-loadtest: writing {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
        let violations: Vec<String> = cli.slo.iter().filter_map(|s| s.violation(report)).collect();
        if !violations.is_empty() {
            for v in &violations {
                eprintln!("natrix-loadtest: SLO violated: {v}");
            }
            return std::process::ExitCode::from(3);
        }
    } else if !cli.slo.is_empty() {
        eprintln!("natrix-loadtest: --slo needs a scenario with a report");
        return std::process::ExitCode::from(2);
    }
    std::process::ExitCode::SUCCESS
}

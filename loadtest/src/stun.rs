//! `natrix-loadtest stun`: Binding requests against a STUN server (CDX,
//! natrix up, or any other), each client keeping a window in flight.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::Context;
use natrix_wire::{Class, Encoder, Message, MessageType, Method, TransactionId};

use crate::live::{Units, live};
use crate::load::{ClientResult, Load, Pace, run_clients};

/// Options of `stun`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct StunArgs {
    /// STUN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub(crate) server: SocketAddr,
    /// Client sockets (each its own source port and thread).
    #[arg(long, value_parser = crate::positive, default_value_t = 4)]
    pub(crate) clients: usize,
    /// Requests each client keeps in flight.
    #[arg(long, value_parser = crate::positive, default_value_t = 32)]
    pub(crate) window: usize,
    /// Requests per second over all clients instead of a window (open loop).
    #[arg(long, value_parser = crate::positive_f64)]
    pub(crate) rate: Option<f64>,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Local address for client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local: IpAddr,
}

/// Binding requests with the send time and sequence number in the
/// transaction id; counts answers.
fn client(socket: &UdpSocket, args: &StunArgs, started: Instant) -> ClientResult {
    let load = Load {
        to: args.server,
        pace: match args.rate {
            Some(r) => Pace::Rate(r / args.clients.max(1) as f64),
            None => Pace::Window(args.window),
        },
        deadline: started + args.duration,
        linger_ms: Some(100),
        max_frame: 64,
    };
    load.run(
        socket.as_fd(),
        started,
        |seq, t_ns, buf| {
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
                let tid = msg.transaction_id().0;
                (
                    u64::from_be_bytes(tid[..8].try_into().unwrap_or_default()),
                    u64::from(u32::from_be_bytes(tid[8..].try_into().unwrap_or_default())),
                )
            })
        },
    )
}

/// Runs the scenario.
pub(crate) fn run(args: &StunArgs) -> anyhow::Result<serde_json::Value> {
    let mut sockets: Vec<UdpSocket> = (0..args.clients.max(1))
        .map(|_| {
            let s = UdpSocket::bind(SocketAddr::new(args.local, 0))?;
            s.connect(args.server)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()
        .context("binding client sockets")?;
    // One request first: an unreachable server is an error, not a zero.
    crate::load::probe_binding(&sockets[0], args.server)?;
    live().begin(
        "stun",
        Units {
            sent: "requests",
            done: "answers",
        },
        Some(args.duration),
    );
    let started = Instant::now();
    let total = run_clients(&mut sockets, |s| Ok(client(s, args, started)))?;
    let elapsed = started.elapsed().as_secs_f64();
    live().end();
    Ok(serde_json::json!({
        "scenario": "stun",
        "server": args.server.to_string(),
        "clients": args.clients,
        "seconds": elapsed,
        "sent": total.sent,
        "answered": total.received,
        "loss_ratio": crate::load::loss(total.sent, total.received),
        "answers_per_second": total.received as f64 / elapsed,
        "rtt_ms_p50": total.rtt.ms(50.0),
        "rtt_ms_p99": total.rtt.ms(99.0),
        "latency": total.rtt.json(),
    }))
}

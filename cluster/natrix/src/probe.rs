//! `natrix probe`: one Binding request with RFC 8489 §6.2.1 retransmission,
//! over UDP or TCP, reporting the mapped address.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, ErrorCode, Message, MessageType, Method,
    TransactionId, frame_len,
};

use crate::cli::ProbeArgs;

/// Initial retransmission timeout (RFC 8489 §6.2.1).
const INITIAL_RTO: Duration = Duration::from_millis(500);

/// The STUN port (RFC 8489 §18.2).
const DEFAULT_PORT: u16 = 3478;

fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = server.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let target = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    target
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolved to no address"))
}

fn request(tid: &TransactionId) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        tid,
    )?;
    enc.software(concat!("natrix-probe ", env!("CARGO_PKG_VERSION")))?;
    enc.fingerprint()?;
    let n = enc.finish();
    buf.truncate(n);
    Ok(buf)
}

/// Extracts the mapped address from a response to `tid`; `None` when the
/// bytes are not that response (stray traffic is ignored, not fatal).
fn mapped(bytes: &[u8], tid: &TransactionId) -> Option<anyhow::Result<SocketAddr>> {
    let msg = Message::parse(bytes).ok()?;
    if msg.transaction_id() != *tid || msg.method() != Method::BINDING {
        return None;
    }
    if msg.has_fingerprint() && msg.verify_fingerprint().is_err() {
        return None;
    }
    Some(match msg.class() {
        Class::Success => msg
            .decode(AttributeType::XOR_MAPPED_ADDRESS)
            .or_else(|| msg.decode(AttributeType::MAPPED_ADDRESS))
            .and_then(Result::ok)
            .and_then(|a| match a {
                Attribute::XorMappedAddress(a) | Attribute::MappedAddress(a) => Some(a),
                _ => None,
            })
            .context("the server's success response carries no mapped address"),
        Class::Error => {
            let code = match msg.decode(AttributeType::ERROR_CODE) {
                Some(Ok(Attribute::ErrorCode(ErrorCode { code, reason }))) => {
                    format!("{code} {reason}")
                }
                _ => "an unreadable error".to_string(),
            };
            Err(anyhow::anyhow!("the server answered with error {code}"))
        }
        _ => return None,
    })
}

fn probe_udp(server: SocketAddr, deadline: Instant) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("binding a local UDP socket")?;
    socket
        .connect(server)
        .with_context(|| format!("no route to {server}"))?;
    let local = socket.local_addr()?;
    let tid = TransactionId(rand::random());
    let req = request(&tid)?;
    let mut rto = INITIAL_RTO;
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "no answer from {server} over UDP (is a STUN server running there, and is UDP open?)"
            );
        }
        socket
            .send(&req)
            .with_context(|| format!("sending to {server}"))?;
        let wait_until = (now + rto).min(deadline);
        rto *= 2;
        while let Some(left) = wait_until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buf) {
                Ok(n) => {
                    if let Some(result) = mapped(&buf[..n], &tid) {
                        return Ok((result?, local));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    bail!("{server} refused UDP (nothing listens on that port)");
                }
                Err(e) => return Err(e).with_context(|| format!("receiving from {server}")),
            }
        }
    }
}

fn probe_tcp(server: SocketAddr, deadline: Instant) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut stream = TcpStream::connect_timeout(&server, left)
        .with_context(|| format!("connecting to {server} over TCP"))?;
    let local = stream.local_addr()?;
    let tid = TransactionId(rand::random());
    stream.write_all(&request(&tid)?)?;
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer from {server} over TCP");
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream
            .read(&mut buf[filled..])
            .with_context(|| format!("reading from {server}"))?;
        if n == 0 {
            bail!("{server} closed the connection without answering");
        }
        filled += n;
        while let Ok(Some(len)) = frame_len(&buf[..filled]) {
            if len > buf.len() {
                bail!("{server} sent an oversized frame");
            }
            if len > filled {
                break;
            }
            if let Some(result) = mapped(&buf[..len], &tid) {
                return Ok((result?, local));
            }
            buf.copy_within(len..filled, 0);
            filled -= len;
        }
    }
}

/// Runs the probe and prints the result.
pub(crate) fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let server = resolve(&args.server)?;
    let started = Instant::now();
    let deadline = started + args.timeout;
    let (mapped, local) = if args.tcp {
        probe_tcp(server, deadline)?
    } else {
        probe_udp(server, deadline)?
    };
    let rtt = started.elapsed();
    let transport = if args.tcp { "tcp" } else { "udp" };
    if args.json {
        let out = serde_json::json!({
            "server": server.to_string(),
            "transport": transport,
            "local_address": local.to_string(),
            "mapped_address": mapped.to_string(),
            "behind_nat": mapped != local,
            "rtt_seconds": rtt.as_secs_f64(),
        });
        println!("{out}");
    } else {
        println!("server:         {server} ({transport})");
        println!("local address:  {local}");
        println!("mapped address: {mapped}");
        println!(
            "behind NAT:     {}",
            if mapped == local {
                "no (mapped address is local)"
            } else {
                "yes"
            }
        );
        println!("round trip:     {:.1} ms", rtt.as_secs_f64() * 1000.0);
    }
    Ok(())
}

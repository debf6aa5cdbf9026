//! `natrix probe`: over UDP, RFC 5780 NAT behaviour discovery (mapping,
//! filtering, hairpinning, class) through the CDX client library; over TCP,
//! the mapped address.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Instant;

use anyhow::{Context, bail};
use natrix_model::{NatProfile, Transport};
use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, ErrorCode, Message, MessageType, Method,
    TransactionId, frame_len,
};

use crate::cli::ProbeArgs;

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

/// Runs the probe and prints the result. Over UDP against an RFC 5780
/// server (one that sends OTHER-ADDRESS) it runs NAT behaviour discovery.
/// `--json` prints the model's [`NatProfile`]: what lookup's plan API takes.
pub(crate) fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let server = resolve(&args.server)?;
    let started = Instant::now();
    if args.tcp {
        let (mapped, local) = probe_tcp(server, started + args.timeout)?;
        let profile = NatProfile {
            server: Some(server),
            transport: Some(Transport::Tcp),
            local_address: Some(local),
            mapped_address: Some(mapped),
            behind_nat: Some(mapped != local),
            seconds: Some(started.elapsed().as_secs_f64()),
            ..NatProfile::default()
        };
        return print(args, &profile);
    }
    // An IPv6-only host reaches an IPv4 server through NAT64.
    let (bind, nat64) = natrix_cdx::client::reach(server, args.nat64_prefix);
    let mut profile =
        natrix_cdx::client::discover_via(server, bind, nat64).context("running NAT discovery")?;
    if let Some(max) = args.lifetime
        && nat64.is_none()
    {
        natrix_cdx::client::add_mapping_lifetime(&mut profile, server, bind.ip(), max)
            .context("measuring the mapping lifetime")?;
    }
    if let Some(v6) = &args.ipv6 {
        let v6 = resolve(v6)?;
        if !v6.is_ipv6() {
            bail!("--ipv6 takes an IPv6 address, not {v6}");
        }
        profile.ipv6 = natrix_cdx::client::discover_ipv6(v6, args.lifetime)
            .context("running NAT discovery over IPv6")?
            .map(Box::new);
    }
    profile.seconds = Some(started.elapsed().as_secs_f64());
    if profile.mapped_address.is_some() {
        return print(args, &profile);
    }
    // UDP unanswered: try TCP so the user learns which it is.
    let tcp = probe_tcp(server, Instant::now() + args.timeout);
    profile.tcp_mapped_address = tcp.as_ref().ok().map(|(m, _)| *m);
    profile.error = Some(
        match &tcp {
            Ok(_) => "UDP is blocked (the server answers over TCP)",
            Err(_) => "no answer over UDP or TCP (is a STUN server running there?)",
        }
        .to_owned(),
    );
    print(args, &profile)?;
    if tcp.is_err() {
        bail!("no answer from {server}");
    }
    Ok(())
}

/// Prints `p` as JSON or for humans.
fn print(args: &ProbeArgs, p: &NatProfile) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(p)?);
        return Ok(());
    }
    let show = |a: Option<SocketAddr>| a.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    let transport = p.transport.unwrap_or_default();
    println!("server:         {} ({transport})", show(p.server));
    if let Some(error) = &p.error {
        println!("result:         {error}");
        if let Some(m) = p.tcp_mapped_address {
            println!("mapped (TCP):   {m}");
        }
        return Ok(());
    }
    println!("local address:  {}", show(p.local_address));
    println!("mapped address: {}", show(p.mapped_address));
    let behind = if p.behind_nat == Some(false) {
        "no (mapped address is local)"
    } else {
        "yes"
    };
    match p.other_address {
        None if transport == Transport::Udp => println!(
            "NAT behaviour:  not tested (the server does not support RFC 5780); behind NAT: {behind}"
        ),
        None => println!("behind NAT:     {behind}"),
        Some(other) => {
            println!(
                "mapping:        {}",
                p.mapping.map_or("unknown", |m| m.name())
            );
            println!(
                "filtering:      {}",
                p.filtering.map_or("unknown", |f| f.name())
            );
            if let Some(h) = p.hairpinning {
                println!("hairpinning:    {}", if h { "yes" } else { "no" });
            }
            if let Some(a) = p.port_allocation {
                match p.port_stride {
                    Some(stride) => println!("port allocation: {} (stride {stride})", a.name()),
                    None => println!("port allocation: {}", a.name()),
                }
            }
            match (p.mapping_lifetime, p.mapping_lifetime_below) {
                (Some(a), Some(b)) => println!("idle mapping:   lives {a} s, gone after {b} s"),
                (Some(a), None) => println!("idle mapping:   lives at least {a} s"),
                (None, Some(b)) => println!("idle mapping:   gone after {b} s"),
                (None, None) => {}
            }
            println!(
                "class:          {}",
                p.class.map_or("unknown", |c| c.name())
            );
            println!("server other:   {other}");
        }
    }
    if let Some(s) = p.seconds {
        println!("took:           {:.1} ms", s * 1000.0);
    }
    if let Some(v6) = &p.ipv6 {
        println!("-- over IPv6 --");
        print(args, v6)?;
    }
    Ok(())
}

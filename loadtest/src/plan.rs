//! `natrix-loadtest plan`: load on lookup's plan API. Each connection is a
//! keep-alive HTTP/1.1 stream sending one request at a time (closed loop),
//! so latency is what a client sees and throughput is what the server
//! sustains at that concurrency.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::live::{Units, live, stopped};
use crate::stats::Latency;

/// Options of `plan`.
#[derive(clap::Args, Debug)]
pub(crate) struct PlanArgs {
    /// lookup API key (`nxk_…`; `natrix up` prints a development one).
    #[arg(long = "api-key", env = "NATRIX_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// lookup's API address (`host:port`; names are resolved).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) lookup: String,
    /// Concurrent connections (each one request in flight).
    #[arg(long, value_parser = crate::positive, default_value_t = 16)]
    pub(crate) connections: usize,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// The request body (default: two NAT profiles that need a relay).
    #[arg(long)]
    pub(crate) body: Option<String>,
}

const DEFAULT_BODY: &str =
    r#"{"a":{"profile":{"class":"symmetric"}},"b":{"profile":{"class":"symmetric"}}}"#;

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: std::collections::BTreeMap<u16, u64>,
    latency: Latency,
}

fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {line:?}")))?;
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

fn connection(
    args: &PlanArgs,
    addr: SocketAddr,
    body: &str,
    deadline: Instant,
) -> anyhow::Result<Tally> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to lookup at {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = args
        .api_key
        .as_ref()
        .map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!(
        "POST /v1/plan HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        args.lookup,
        body.len()
    );
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut tally = Tally::default();
    while Instant::now() < deadline && !stopped() {
        let t = Instant::now();
        writer.write_all(request.as_bytes())?;
        live().sent(1);
        let status = read_response(&mut reader)?;
        if status == 200 {
            tally.ok += 1;
            tally.latency.record(t.elapsed());
            live().done(1);
        } else {
            *tally.errors.entry(status).or_default() += 1;
            live().error(1);
        }
    }
    Ok(tally)
}

/// Runs the scenario and returns its JSON report; an error when no plan
/// succeeded (so the tool can gate a deployment check).
pub(crate) fn run(args: &PlanArgs) -> anyhow::Result<serde_json::Value> {
    use std::net::ToSocketAddrs;
    let addr = args
        .lookup
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.lookup))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.lookup))?;
    let body = args.body.clone().unwrap_or_else(|| DEFAULT_BODY.to_owned());
    live().begin(
        "plan",
        Units {
            sent: "requests",
            done: "plans",
        },
        Some(args.duration),
    );
    let started = Instant::now();
    let deadline = started + args.duration;
    let results: Vec<anyhow::Result<Tally>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.connections.max(1))
            .map(|_| s.spawn(|| connection(args, addr, &body, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a connection thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    live().end();
    let mut total = Tally::default();
    for r in results {
        let t = r?;
        total.ok += t.ok;
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.latency.merge(&t.latency);
    }
    let pct = |p: f64| total.latency.ms(p * 100.0);
    if total.ok == 0 {
        anyhow::bail!(
            "no plan succeeded against {} (answers by status: {:?})",
            args.lookup,
            total.errors
        );
    }
    Ok(serde_json::json!({
        "scenario": "plan",
        "lookup": args.lookup,
        "connections": args.connections,
        "seconds": elapsed,
        "plans": total.ok,
        "plans_per_second": total.ok as f64 / elapsed,
        "errors_by_status": total.errors,
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "latency_ms_max": pct(1.0),
        "latency": total.latency.json(),
    }))
}

//! `natrix-loadtest compare`: the same `relay`, `alloc` or `stun` scenario
//! against two or more servers, interleaved round by round in one run (so
//! drift of the machine hits all of them alike), with ratios against the
//! first. Given each server's PID, it also reports work per server CPU
//! second and, for `alloc`, memory per allocation. `BENCHMARKING.md`'s
//! natrix-versus-coturn tables come from here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::alloc::AllocArgs;
use crate::process::{process_cpu_seconds, process_rss_bytes};
use crate::relay::{Auth, Connect, Path, RelayArgs};
use crate::stun::StunArgs;
use crate::turn::Transport;

/// A server to measure: `NAME=HOST:PORT[,user=U][,password=P][,secret=S][,pid=PID]`.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    name: String,
    server: SocketAddr,
    user: Option<String>,
    password: Option<String>,
    secret: Option<String>,
    pid: Option<u32>,
    transport: Option<Transport>,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| {
            format!("{s:?}: expected NAME=HOST:PORT[,user=U,password=P|secret=S,pid=PID]")
        })?;
        let mut parts = rest.split(',');
        let (server, transport) =
            server_url(parts.next().unwrap_or_default()).map_err(|e| format!("{s:?}: {e}"))?;
        let mut t = Target {
            name: name.to_owned(),
            server,
            user: None,
            password: None,
            secret: None,
            pid: None,
            transport,
        };
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{s:?}: {kv:?} is not key=value"))?;
            match k {
                "user" => t.user = Some(v.to_owned()),
                "password" => t.password = Some(v.to_owned()),
                "secret" => t.secret = Some(v.to_owned()),
                "pid" => t.pid = Some(v.parse().map_err(|_| format!("{s:?}: pid {v:?}"))?),
                "transport" => {
                    t.transport = Some(v.parse::<Transport>().map_err(|e| format!("{s:?}: {e}"))?);
                }
                _ => {
                    return Err(format!(
                        "{s:?}: unknown key {k:?} (user, password, secret, pid, transport)"
                    ));
                }
            }
        }
        Ok(t)
    }
}

/// A server given as `HOST:PORT` or as an RFC 7065 URL (`turn:HOST[:PORT]
/// [?transport=udp|tcp]`, `turns:HOST[:PORT]` for TLS (with `?transport=udp`: DTLS); default ports 3478
/// and 5349); names are resolved. The transport when the URL names one.
fn server_url(text: &str) -> Result<(SocketAddr, Option<Transport>), String> {
    use std::net::ToSocketAddrs;
    let (rest, tls) = match text.split_once(':') {
        Some(("turn", rest)) => (rest, false),
        Some(("turns", rest)) => (rest, true),
        _ => {
            let addr = text
                .to_socket_addrs()
                .map_err(|e| format!("the address {text:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{text:?} resolves to no address"))?;
            return Ok((addr, None));
        }
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut transport = tls.then_some(Transport::Tls);
    for kv in query.split('&').filter(|q| !q.is_empty()) {
        match kv.split_once('=') {
            // turns: over UDP is DTLS (RFC 7065, RFC 7350).
            Some(("transport", "udp")) => {
                transport = Some(if tls { Transport::Dtls } else { Transport::Udp });
            }
            Some(("transport", "tcp")) => {
                transport = Some(if tls { Transport::Tls } else { Transport::Tcp });
            }
            _ => return Err(format!("{text:?}: unsupported URL parameter {kv:?}")),
        }
    }
    let default_port = if tls { 5349 } else { 3478 };
    // A bare IPv6 address needs brackets to carry a port.
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')))
    {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("the host of {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))?;
    Ok((addr, transport.or(Some(Transport::Udp))))
}

/// Which scenario to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Compared {
    /// Relayed packets per second (`relay`).
    Relay,
    /// Allocations per second (`alloc`), memory per allocation with a PID.
    Alloc,
    /// STUN Binding answers per second (`stun`).
    Stun,
}

/// Options of `compare`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct CompareArgs {
    /// What to run against every target.
    #[arg(long, value_enum, default_value = "relay")]
    pub(crate) scenario: Compared,
    /// A server: `NAME=HOST:PORT[,user=U][,password=P][,secret=S][,pid=PID]
    /// [,transport=T]`, the address also as a TURN URL (`turn:host:3478`,
    /// `turn:host?transport=tcp`, `turns:host:5349`) (repeat; the first is
    /// the reference of the ratios). Credentials
    /// default to --user/--password/--secret; the PID enables CPU and
    /// memory figures (read from /proc, so the server runs on this machine).
    #[arg(long = "target", required = true, num_args = 1)]
    pub(crate) targets: Vec<Target>,
    /// Rounds; each runs every target once, in rotating order.
    #[arg(long, value_parser = crate::positive, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Default username.
    #[arg(long, default_value = "natrix")]
    pub(crate) user: String,
    /// Default password.
    #[arg(long)]
    pub(crate) password: Option<String>,
    /// Default REST API secret.
    #[arg(long)]
    pub(crate) secret: Option<String>,
    /// Default transport and TLS settings (a target's `transport=` wins).
    #[command(flatten)]
    pub(crate) connect: Connect,
    /// relay: paths (comma separated; every path × payload is a case).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "peer")]
    pub(crate) path: Vec<Path>,
    /// relay: payload sizes (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "160")]
    pub(crate) payload: Vec<usize>,
    /// relay and stun: sending clients.
    #[arg(long, value_parser = crate::positive, default_value_t = 4)]
    pub(crate) clients: usize,
    /// relay and stun: packets each client keeps in flight.
    #[arg(long, value_parser = crate::positive, default_value_t = 32)]
    pub(crate) window: usize,
    /// relay and stun: how long each run sends.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// alloc: allocations per run.
    #[arg(long, value_parser = crate::positive, default_value_t = 2000)]
    pub(crate) count: usize,
    /// alloc: allocations in progress at once.
    #[arg(long, value_parser = crate::positive, default_value_t = 16)]
    pub(crate) concurrency: usize,
    /// Local address for client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local: std::net::IpAddr,
}

/// One run's figures.
#[derive(Clone, Debug, Default)]
struct Run {
    /// The headline rate (relayed packets/s, allocations/s, answers/s).
    rate: f64,
    /// Units of work done (rate × seconds).
    work: f64,
    loss: Option<f64>,
    p99_ms: f64,
    cpu_seconds: Option<f64>,
    rss_per_allocation: Option<f64>,
}

/// A case: one relay path and payload, or the whole alloc/stun scenario.
#[derive(Clone, Copy, Debug)]
enum Case {
    Relay(Path, usize),
    Alloc,
    Stun,
}

impl Case {
    fn label(self) -> String {
        match self {
            Case::Relay(path, payload) => format!("relay {} {payload} B", path.name()),
            Case::Alloc => "alloc".into(),
            Case::Stun => "stun".into(),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run_once(args: &CompareArgs, case: Case, t: &Target) -> anyhow::Result<Run> {
    let auth = Auth {
        user: t.user.clone().unwrap_or_else(|| args.user.clone()),
        password: t.password.clone().or_else(|| args.password.clone()),
        secret: t.secret.clone().or_else(|| {
            // A target with its own password does not inherit a secret.
            t.password.is_none().then(|| args.secret.clone()).flatten()
        }),
    };
    let connect = Connect {
        transport: t.transport.unwrap_or(args.connect.transport),
        ..args.connect.clone()
    };
    let cpu = || t.pid.and_then(process_cpu_seconds);
    let before = cpu();
    let mut run = Run::default();
    let report = match case {
        Case::Relay(path, payload) => crate::relay::run(&RelayArgs {
            server: t.server,
            auth,
            connect,
            path,
            clients: args.clients,
            payload,
            window: args.window,
            rate: None,
            duration: args.duration,
            local: args.local,
            peer_local: None,
            peers: 1,
        })?,
        Case::Stun => crate::stun::run(&StunArgs {
            server: t.server,
            clients: args.clients,
            window: args.window,
            rate: None,
            duration: args.duration,
            local: args.local,
        })?,
        Case::Alloc => {
            let base = t.pid.and_then(process_rss_bytes);
            let mut held = None;
            let mut cpu_at_held = None;
            let report = crate::alloc::run_with(
                &AllocArgs {
                    server: t.server,
                    auth,
                    connect,
                    count: args.count,
                    concurrency: args.concurrency,
                    rate: None,
                    refresh: false,
                    // Long enough for the server's memory to settle.
                    hold: Duration::from_millis(500),
                    local: args.local,
                },
                |n| {
                    cpu_at_held = cpu();
                    std::thread::sleep(Duration::from_millis(300));
                    held = t.pid.and_then(process_rss_bytes).map(|h| (h, n));
                },
            )?;
            if let (Some(b), Some((h, n))) = (base, held) {
                run.rss_per_allocation = Some(h.saturating_sub(b) as f64 / n.max(1) as f64);
            }
            // The allocation phase's CPU, not the deletes'.
            run.cpu_seconds = cpu_at_held.zip(before).map(|(a, b)| a - b);
            report
        }
    };
    if run.cpu_seconds.is_none() {
        run.cpu_seconds = cpu().zip(before).map(|(a, b)| a - b);
    }
    let field = match case {
        Case::Relay(..) => "relayed_packets_per_second",
        Case::Alloc => "allocations_per_second",
        Case::Stun => "answers_per_second",
    };
    run.rate = report[field]
        .as_f64()
        .context("a report without its rate")?;
    run.work = run.rate * report["seconds"].as_f64().unwrap_or(0.0);
    run.loss = report["loss_ratio"].as_f64();
    run.p99_ms = report["latency"]["p99_ms"].as_f64().unwrap_or(0.0);
    Ok(run)
}

/// Runs every case against every target, `rounds` times, interleaved.
pub(crate) fn run(args: &CompareArgs) -> anyhow::Result<serde_json::Value> {
    if args.targets.len() < 2 {
        anyhow::bail!("compare needs at least two --target servers");
    }
    let cases: Vec<Case> = match args.scenario {
        Compared::Relay => args
            .payload
            .iter()
            .flat_map(|&p| args.path.iter().map(move |&path| Case::Relay(path, p)))
            .collect(),
        Compared::Alloc => vec![Case::Alloc],
        Compared::Stun => vec![Case::Stun],
    };
    let n = args.targets.len();
    let mut runs: BTreeMap<(usize, usize), Vec<Run>> = BTreeMap::new();
    'rounds: for round in 0..args.rounds.max(1) {
        for (c, case) in cases.iter().enumerate() {
            for k in 0..n {
                if crate::live::stopped() {
                    break 'rounds;
                }
                let i = (k + round) % n;
                let t = &args.targets[i];
                eprintln!(
                    "natrix-loadtest: compare round {}/{} {} against {} ({})",
                    round + 1,
                    args.rounds,
                    case.label(),
                    t.name,
                    t.server
                );
                let r = run_once(args, *case, t).with_context(|| {
                    format!("{} against {} ({})", case.label(), t.name, t.server)
                })?;
                runs.entry((c, i)).or_default().push(r);
            }
        }
    }
    let unit = match args.scenario {
        Compared::Relay => "relayed pkt/s",
        Compared::Alloc => "allocations/s",
        Compared::Stun => "answers/s",
    };
    let mut json_cases = Vec::new();
    let names: Vec<&str> = args.targets.iter().map(|t| t.name.as_str()).collect();
    let mut md = format!(
        "| case | {} |",
        names
            .iter()
            .map(|n| format!("{n} {unit}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for other in &names[1..] {
        md += &format!(" {}/{other} | {}/{other} per CPU s |", names[0], names[0]);
    }
    if args.scenario == Compared::Alloc {
        md += &names
            .iter()
            .map(|n| format!(" {n} bytes/allocation |"))
            .collect::<String>();
    }
    md += "\n|---|";
    md += &"---|".repeat(
        n + 2 * (n - 1)
            + if args.scenario == Compared::Alloc {
                n
            } else {
                0
            },
    );
    md += "\n";
    for (c, case) in cases.iter().enumerate() {
        let mut targets = serde_json::Map::new();
        let mut medians = Vec::new();
        let mut per_cpu = Vec::new();
        let mut mem = Vec::new();
        for (i, t) in args.targets.iter().enumerate() {
            let rs = runs.get(&(c, i)).cloned().unwrap_or_default();
            let m = median(&mut rs.iter().map(|r| r.rate).collect::<Vec<_>>());
            let cpu: Option<f64> = rs.iter().map(|r| r.cpu_seconds).sum();
            let work: f64 = rs.iter().map(|r| r.work).sum();
            let pcs = cpu.filter(|c| *c > 0.0).map(|c| work / c);
            let rss = rs
                .iter()
                .filter_map(|r| r.rss_per_allocation)
                .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
            medians.push(m);
            per_cpu.push(pcs);
            mem.push(rss);
            targets.insert(
                t.name.clone(),
                serde_json::json!({
                    "server": t.server.to_string(),
                    "rates": rs.iter().map(|r| r.rate).collect::<Vec<_>>(),
                    "median": m,
                    "cpu_seconds": cpu,
                    "per_cpu_second": pcs,
                    "loss_ratio_max": rs.iter().filter_map(|r| r.loss).fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v)))),
                    "p99_ms_median": median(&mut rs.iter().map(|r| r.p99_ms).collect::<Vec<_>>()),
                    "rss_per_allocation_bytes": rss,
                }),
            );
        }
        let mut ratios = serde_json::Map::new();
        md += &format!("| {} |", case.label());
        md += &medians
            .iter()
            .map(|m| format!(" {m:.0} |"))
            .collect::<String>();
        for i in 1..n {
            let rate = (medians[i] > 0.0).then(|| medians[0] / medians[i]);
            let cpu = per_cpu[0].zip(per_cpu[i]).map(|(a, b)| a / b);
            let fmt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.2}×"));
            md += &format!(" {} | {} |", fmt(rate), fmt(cpu));
            ratios.insert(
                args.targets[i].name.clone(),
                serde_json::json!({"rate": rate, "per_cpu_second": cpu}),
            );
        }
        if args.scenario == Compared::Alloc {
            md += &mem
                .iter()
                .map(|m| m.map_or(" – |".to_owned(), |m| format!(" {m:.0} |")))
                .collect::<String>();
        }
        md += "\n";
        json_cases.push(serde_json::json!({
            "case": case.label(),
            "targets": targets,
            "ratios": ratios,
        }));
    }
    eprintln!("\n{md}");
    Ok(serde_json::json!({
        "scenario": "compare",
        "compared": format!("{:?}", args.scenario).to_lowercase(),
        "unit": unit,
        "reference": names[0],
        "rounds": args.rounds,
        "cases": json_cases,
        "markdown": md,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_their_options() {
        let t: Target = "coturn=127.0.0.1:3479,user=u,password=p,pid=42,transport=tls"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.name, "coturn");
        assert_eq!(t.server.port(), 3479);
        assert_eq!(
            (t.user.as_deref(), t.password.as_deref(), t.pid),
            (Some("u"), Some("p"), Some(42))
        );
        assert_eq!(t.transport, Some(Transport::Tls));
        assert!("x".parse::<Target>().is_err());
        assert!("x=127.0.0.1:1,transport=sctp".parse::<Target>().is_err());
        assert!("x=127.0.0.1:1,colour=blue".parse::<Target>().is_err());
        assert!("x=nowhere".parse::<Target>().is_err());
        // RFC 7065 URLs: transport and default ports.
        let url = |u: &str| server_url(u).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url("turn:127.0.0.1"),
            (
                "127.0.0.1:3478".parse().unwrap_or_else(|_| unreachable!()),
                Some(Transport::Udp)
            )
        );
        assert_eq!(
            url("turn:127.0.0.1:3479?transport=tcp").1,
            Some(Transport::Tcp)
        );
        assert_eq!(url("turns:localhost").0.port(), 5349);
        assert_eq!(
            url("turns:127.0.0.1:443?transport=tcp").1,
            Some(Transport::Tls)
        );
        assert_eq!(
            url("turns:127.0.0.1?transport=udp"),
            (
                "127.0.0.1:5349".parse().unwrap_or_else(|_| unreachable!()),
                Some(Transport::Dtls)
            )
        );
        assert_eq!(url("turn:[::1]:3480").0.port(), 3480);
        assert_eq!(url("127.0.0.1:9").1, None);
        assert!(server_url("turn:127.0.0.1?transport=sctp").is_err());
        let t: Target = "c=turns:127.0.0.1,secret=s"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.server.port(), t.transport), (5349, Some(Transport::Tls)));
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

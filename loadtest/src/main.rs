//! `natrix-loadtest`: the load-test harness of natrix, for natrix or any
//! standards-compliant TURN/STUN server: scenarios (`stun`, `alloc`,
//! `relay`, `plan`, `e2e`, `natlab`, `compare`, `generator`), live progress,
//! a JSON report (`--json`), an HTML report with plots (`--report`), SLO
//! gates (`--slo`, exit 3) and its own Prometheus metrics
//! (`--metrics-addr`). Every run is bounded in time and count; Ctrl-C stops
//! it cleanly and still writes the reports (exit 130).

mod alloc;
mod attack;
mod compare;
mod dtls;
mod e2e;
mod forwarder;
mod hold;
mod live;
mod load;
mod natlab;
mod peer;
mod plan;
mod process;
mod relay;
mod report;
mod signal;
mod stats;
mod stun;
mod turn;
mod units;

use clap::{Parser, Subcommand};

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
    /// Also write an HTML report with plots (throughput over time, latency
    /// histogram and percentile curve, NAT matrix, comparison) to this file.
    #[arg(long, global = true)]
    report: Option<std::path::PathBuf>,
    /// Serve this run's own Prometheus metrics (loadtest_*) at
    /// http://ADDR/metrics while it runs.
    #[arg(long, global = true)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Live progress on stderr: a bar on a terminal, plain lines otherwise.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    progress: live::ProgressMode,
}

/// A count of at least 1 (clients, window, allocations…).
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: a whole number of at least 1")),
    }
}

/// A rate above zero.
fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?}: a number above 0")),
    }
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
    /// Sustained traffic through TURN allocations: relayed packets per
    /// second, loss, reordering, round-trip percentiles.
    Relay(relay::RelayArgs),
    /// Allocation storm: N allocations at a rate and concurrency, refreshed,
    /// held, deleted; latency per phase and errors by code.
    #[command(alias = "allocations")]
    Alloc(alloc::AllocArgs),
    /// STUN Binding answers per second and latency.
    Stun(stun::StunArgs),
    /// The same relay, alloc or stun scenario against several servers,
    /// interleaved, with ratios (how BENCHMARKING.md compares natrix and
    /// coturn).
    Compare(compare::CompareArgs),
    /// The load generator's own send capacity (no server in the way).
    Generator(relay::GeneratorArgs),
    /// The NAT lab: real Linux NATs (nftables) in network namespaces, two
    /// clients behind each NAT type; `matrix` runs a session across every
    /// pair of types. Needs root.
    Natlab(natlab::NatlabArgs),
    /// Load on lookup's plan API: plans per second and latency percentiles.
    Plan(plan::PlanArgs),
    /// The whole flow for client pairs: discovery, plan, exchange, direct
    /// punch or TURN relay, datagrams both ways; success and time to the
    /// first packet per mode.
    E2e(e2e::E2eArgs),
    /// The hostile-traffic suite against a live deployment while
    /// legitimate sessions run: per attack what the server did, its RSS,
    /// legitimate sessions lost and their p99 (exit 1 when one is not
    /// held).
    Attack(attack::AttackArgs),
    /// Calls through natrix's signalling: register, push sockets, invite →
    /// ring → accept → accepted → ended, per pair in a loop; invite→ring
    /// and accept→accepted percentiles, lost pushes; `--hold N` idle
    /// sockets for the server's memory per socket.
    Signal(signal::SignalArgs),
    /// The bare userspace TURN channel forwarder (poll, recvmmsg, sendmmsg
    /// with GSO, just enough TURN to bind channels): the reference a
    /// relay's packet path is measured against in the XDP lab. A benchmark
    /// tool, not a server.
    Forwarder(forwarder::ForwarderArgs),
    /// One session participant end to end: mapped address, exchange through
    /// CDX, direct punch. Prints a JSON report (the lab matrix runs these).
    Peer(peer::PeerArgs),
}

impl Command {
    /// The scenario's name in metrics and reports.
    fn scenario(&self) -> &'static str {
        match self {
            Command::Relay(_) => "relay",
            Command::Alloc(_) => "alloc",
            Command::Stun(_) => "stun",
            Command::Compare(_) => "compare",
            Command::Generator(_) => "generator",
            Command::Natlab(_) => "natlab",
            Command::Plan(_) => "plan",
            Command::E2e(_) => "e2e",
            Command::Peer(_) => "peer",
            Command::Forwarder(_) => "forwarder",
            Command::Attack(_) => "attack",
            Command::Signal(_) => "signal",
        }
    }
}

/// The report's headline figures as a two-column table (stderr).
fn summary(report: &serde_json::Value) -> String {
    let rows = report::headline(report);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, text)| format!("  {k:<width$}  {text}\n"))
        .collect()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    live::init(cli.command.scenario());
    live::install_stop_handler();
    if let Some(addr) = cli.metrics_addr {
        match live::serve_metrics(addr) {
            Ok(bound) => eprintln!("natrix-loadtest: metrics at http://{bound}/metrics"),
            Err(e) => {
                eprintln!("natrix-loadtest: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let progress =
        (!matches!(cli.command, Command::Peer(_))).then(|| live::Progress::start(cli.progress));
    // Scenarios return their report; `natlab matrix` printed its own grid.
    let result: anyhow::Result<Option<(serde_json::Value, bool)>> = match &cli.command {
        Command::Relay(args) => relay::run(args).map(|r| Some((r, false))),
        Command::Alloc(args) => alloc::run(args).map(|r| Some((r, false))),
        Command::Stun(args) => stun::run(args).map(|r| Some((r, false))),
        Command::Compare(args) => compare::run(args).map(|r| Some((r, false))),
        Command::Generator(args) => relay::generator(args).map(|r| Some((r, false))),
        Command::Natlab(args) => natlab::run(args).map(|r| r.map(|r| (r, true))),
        Command::Plan(args) => plan::run(args).map(|r| Some((r, false))),
        Command::E2e(args) => e2e::run(args).map(|r| Some((r, false))),
        Command::Attack(args) => attack::run(args).map(|r| Some((r, false))),
        Command::Signal(args) => signal::run(args).map(|r| Some((r, false))),
        Command::Forwarder(args) => forwarder::run(args).map(|r| Some((r, false))),
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
    if let Some(p) = progress {
        p.finish();
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("natrix-loadtest: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let interrupted = live::stopped();
    if let Some((mut report, printed)) = report {
        if let Some(m) = report.as_object_mut() {
            let scenario = m
                .get("scenario")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_owned();
            if interrupted {
                m.insert("interrupted".into(), true.into());
            }
            let timeline = live::live().timeline();
            if !timeline.is_empty() && !matches!(scenario.as_str(), "compare" | "natlab") {
                let units = live::live().units();
                m.insert(
                    "units".into(),
                    serde_json::json!({"sent": units.sent, "done": units.done}),
                );
                m.insert(
                    "timeline".into(),
                    timeline
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "t": s.t, "sent_per_s": s.sent_per_s,
                                "done_per_s": s.done_per_s, "errors_per_s": s.errors_per_s,
                            })
                        })
                        .collect(),
                );
            }
        }
        if !printed {
            println!("{report}");
        }
        if cli.progress != live::ProgressMode::Off && !matches!(cli.command, Command::Peer(_)) {
            eprint!("{}", summary(&report));
        }
        if let Some(path) = &cli.json
            && let Err(e) = std::fs::write(path, format!("{report:#}\n"))
        {
            eprintln!("natrix-loadtest: writing {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
        if let Some(path) = &cli.report {
            let command: Vec<String> = std::env::args().collect();
            let written = report::render(&report, &command.join(" "))
                .and_then(|html| Ok(std::fs::write(path, html)?));
            if let Err(e) = written {
                eprintln!(
                    "natrix-loadtest: writing the report {}: {e:#}",
                    path.display()
                );
                return std::process::ExitCode::FAILURE;
            }
        }
        if let Some(failure) = report["failure"].as_str() {
            eprintln!("natrix-loadtest: {failure}");
            return std::process::ExitCode::FAILURE;
        }
        if interrupted {
            eprintln!("natrix-loadtest: interrupted; the reports hold what was measured");
            return std::process::ExitCode::from(130);
        }
        let violations: Vec<String> = cli
            .slo
            .iter()
            .filter_map(|s| s.violation(&report))
            .collect();
        if !violations.is_empty() {
            for v in &violations {
                eprintln!("natrix-loadtest: SLO violated: {v}");
            }
            return std::process::ExitCode::from(3);
        }
    } else if !cli.slo.is_empty() || cli.report.is_some() {
        eprintln!("natrix-loadtest: --slo and --report need a scenario with a report");
        return std::process::ExitCode::from(2);
    }
    std::process::ExitCode::SUCCESS
}

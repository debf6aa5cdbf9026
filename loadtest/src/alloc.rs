//! `natrix-loadtest alloc`: an allocation storm — N allocations at a target
//! rate and concurrency, each refreshed, optionally held, then deleted;
//! latency percentiles per phase and errors by the code the server
//! returned (or `timeout`, `unreachable`, `local-ports`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::live::{Units, live, stopped};
use crate::relay::{Auth, Connect};
use crate::stats::Latency;
use crate::turn::{Credentials, Tls, TurnClient, TurnError, error_kind};

/// Options of `alloc`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct AllocArgs {
    /// TURN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub(crate) server: SocketAddr,
    #[command(flatten)]
    pub(crate) auth: Auth,
    #[command(flatten)]
    pub(crate) connect: Connect,
    /// Allocations to create.
    #[arg(long, value_parser = crate::positive, default_value_t = 1000)]
    pub(crate) count: usize,
    /// Allocations in progress at once (one thread each).
    #[arg(long, value_parser = crate::positive, alias = "threads", default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Allocations started per second over all threads (default: as fast
    /// as the server answers).
    #[arg(long, value_parser = crate::positive_f64)]
    pub(crate) rate: Option<f64>,
    /// Refresh every allocation once after creating them all.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) refresh: bool,
    /// Keep the allocations this long before deleting them (to read the
    /// server's memory meanwhile; `compare` does).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub(crate) hold: Duration,
    /// Local address for client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) local: IpAddr,
}

/// Counts of one phase.
#[derive(Default)]
struct Phase {
    ok: u64,
    latency: Latency,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl Phase {
    fn failed(&mut self, e: &anyhow::Error) {
        *self.errors.entry(error_kind(e)).or_default() += 1;
        live().error(1);
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }

    fn merge(&mut self, other: Phase) {
        self.ok += other.ok;
        self.latency.merge(&other.latency);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.first_error = self.first_error.take().or(other.first_error);
    }

    fn json(&self, seconds: f64) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok,
            "failed": self.errors.values().sum::<u64>(),
            "per_second": self.ok as f64 / seconds.max(1e-9),
            "seconds": seconds,
            "errors_by_code": self.errors,
            "first_error": self.first_error,
            "latency": self.latency.json(),
        })
    }
}

/// The threads' counts of one phase, merged (a panicked thread counts
/// nothing).
fn joined(handles: Vec<std::thread::ScopedJoinHandle<'_, Phase>>) -> Phase {
    let mut total = Phase::default();
    for h in handles {
        total.merge(h.join().unwrap_or_default());
    }
    total
}

/// Allocates, retrying a 437 from another port (a fresh socket may reuse
/// the port of an allocation that outlived its client).
fn allocate(
    args: &AllocArgs,
    local: SocketAddr,
    creds: &Credentials,
    tls: Option<&Tls>,
) -> anyhow::Result<TurnClient> {
    let mut attempt = 0;
    loop {
        match TurnClient::connect(args.connect.transport, args.server, local, creds, tls) {
            Err(e)
                if attempt < 2
                    && e.downcast_ref::<TurnError>()
                        .is_some_and(|t| t.kind() == "437") =>
            {
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Runs the storm; `while_held` runs while every allocation lives (after
/// the refresh phase), e.g. to read the server's memory.
pub(crate) fn run_with(
    args: &AllocArgs,
    while_held: impl FnOnce(usize),
) -> anyhow::Result<serde_json::Value> {
    // Every allocation holds a client socket.
    natrix_net::raise_fd_limit();
    let creds = args.auth.credentials();
    let tls = args.connect.tls(args.server)?;
    let local = SocketAddr::new(args.local, 0);
    let threads = args.concurrency.clamp(1, args.count.max(1));
    let per_thread_rate = args.rate.map(|r| r / threads as f64);
    live().begin(
        "alloc",
        Units {
            sent: "attempts",
            done: "allocations",
        },
        args.rate
            .map(|r| Duration::from_secs_f64(args.count as f64 / r.max(1e-3))),
    );
    let started = Instant::now();
    let clients = Mutex::new(Vec::with_capacity(args.count));
    let allocated = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (creds, clients, tls) = (&creds, &clients, tls.as_ref());
                s.spawn(move || {
                    let share = args.count / threads + usize::from(t < args.count % threads);
                    let mut phase = Phase::default();
                    let t0 = Instant::now();
                    for i in 0..share {
                        if stopped() {
                            break;
                        }
                        if let Some(r) = per_thread_rate {
                            let due = t0 + Duration::from_secs_f64(i as f64 / r.max(1e-6));
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        live().sent(1);
                        let at = Instant::now();
                        match allocate(args, local, creds, tls) {
                            Ok(c) => {
                                phase.latency.record(at.elapsed());
                                phase.ok += 1;
                                live().done(1);
                                clients
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .push(c);
                            }
                            Err(e) => {
                                // Nothing listening: every other attempt would
                                // wait out the same timeout.
                                let fatal =
                                    matches!(error_kind(&e).as_str(), "unreachable" | "timeout")
                                        && phase.ok == 0;
                                phase.failed(&e);
                                if fatal {
                                    break;
                                }
                            }
                        }
                    }
                    phase
                })
            })
            .collect();
        joined(handles)
    });
    let alloc_seconds = started.elapsed().as_secs_f64();
    let mut clients = clients
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if allocated.ok == 0 {
        live().end();
        anyhow::bail!(
            "no allocation succeeded on {}: {}",
            args.server,
            allocated
                .first_error
                .as_deref()
                .unwrap_or("interrupted before the first one")
        );
    }
    // Refresh, then delete, each over the same threads.
    let each = |clients: &mut Vec<TurnClient>,
                op: &(dyn Fn(&mut TurnClient) -> anyhow::Result<()> + Sync)| {
        let t = Instant::now();
        let chunk = clients.len().div_ceil(threads).max(1);
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .chunks_mut(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut phase = Phase::default();
                        for c in part {
                            let at = Instant::now();
                            match op(c) {
                                Ok(()) => {
                                    phase.latency.record(at.elapsed());
                                    phase.ok += 1;
                                }
                                Err(e) => phase.failed(&e),
                            }
                        }
                        phase
                    })
                })
                .collect();
            joined(handles)
        });
        (total, t.elapsed().as_secs_f64())
    };
    let refreshed = (args.refresh && !stopped()).then(|| each(&mut clients, &|c| c.refresh(600)));
    while_held(clients.len());
    crate::live::sleep(args.hold);
    live().end();
    let (deleted, delete_seconds) = each(&mut clients, &|c| c.release());
    Ok(serde_json::json!({
        "scenario": "alloc",
        "server": args.server.to_string(),
        "transport": args.connect.transport.label(),
        "requested": args.count,
        "concurrency": threads,
        "rate": args.rate,
        "allocations": allocated.ok,
        "failed": allocated.errors.values().sum::<u64>(),
        "seconds": alloc_seconds,
        "allocations_per_second": allocated.ok as f64 / alloc_seconds,
        "allocate_ms_p50": allocated.latency.ms(50.0),
        "allocate_ms_p99": allocated.latency.ms(99.0),
        "errors_by_code": allocated.errors,
        "latency": allocated.latency.json(),
        "phases": {
            "allocate": allocated.json(alloc_seconds),
            "refresh": refreshed.map(|(p, s)| p.json(s)),
            "delete": deleted.json(delete_seconds),
        },
    }))
}

/// Runs the storm.
pub(crate) fn run(args: &AllocArgs) -> anyhow::Result<serde_json::Value> {
    run_with(args, |_| {})
}

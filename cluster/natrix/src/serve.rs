//! The serving commands: start the roles, the metrics endpoint, wait for a
//! signal, shut down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::Context;
use natrix_cdx::exchange::{ExchangeActor, ExchangeInbox, ExchangeSender, Local, is_exchange};
use natrix_cdx::{
    BindingResponder, CdxConfig, CdxMetrics, ClusterSecret, ExchangeMetrics, LoopCounters, Outcome,
    server::CdxServer,
};
use natrix_net::UnauthLimiter;
use natrix_relay::config::Redacted;
use natrix_relay::control::{Reload, ReloadActor};
use natrix_relay::core::Transport;
use natrix_relay::{BindingDelegate, DelegateFactory, RelayConfig, RelayHost};
use natrix_telemetry::{Telemetry, http};
use tracing::{info, warn};

use crate::cli::Global;

/// What a serving command runs.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Every role; CDX answers Binding and the exchange on the relay's
    /// listener.
    Up(RelayConfig, Option<ClusterSecret>),
    /// The CDX role alone.
    Cdx(CdxConfig),
    /// The relay role alone.
    Relay(RelayConfig),
}

fn worker_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The signals a serving process reacts to.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Waits for SIGINT or SIGTERM; SIGHUP asks `reload` to reload
    /// certificates and secrets, and waiting goes on.
    async fn stop(&mut self, reload: Option<&actix::Addr<ReloadActor>>) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    info!("SIGHUP: reloading certificates and secrets");
                    if let Some(r) = reload {
                        r.do_send(Reload);
                    }
                }
            }
        }
    }
}

/// Refuses new allocations and waits until the existing ones are gone, the
/// timeout passes or a second signal arrives.
async fn drain(relay: &RelayHost, timeout: Duration, signals: &mut Signals) {
    let control = relay.control();
    control.drain();
    let deadline = tokio::time::Instant::now() + timeout;
    let left = control.allocations();
    if left == 0 {
        return;
    }
    info!(
        allocations = left,
        ?timeout,
        "draining: new allocations refused, existing ones relayed until they end"
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                // Loops publish their counts every 200 ms.
                if control.allocations() == 0 {
                    info!("drained: no allocation left");
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    warn!(allocations = control.allocations(), "drain timeout: exiting with allocations alive");
                    return;
                }
            }
            _ = signals.term.recv() => { warn!("second signal: exiting without waiting"); return; }
            _ = signals.int.recv() => { warn!("second signal: exiting without waiting"); return; }
        }
    }
}

/// The CDX Binding responder plugged into the relay's listener.
struct CdxOnRelay {
    responder: Arc<BindingResponder>,
    udp: LoopCounters,
    tcp: LoopCounters,
    /// The relay's caps on unauthenticated answers apply to Binding too
    /// (UDP only: TCP sources cannot be spoofed).
    limiter: UnauthLimiter,
    /// Exchange messages go to the actor; the counter of those dropped
    /// because it is behind.
    exchange: (ExchangeSender, prometheus::IntCounter),
}

impl BindingDelegate for CdxOnRelay {
    fn handle(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        local: (SocketAddr, Option<std::net::IpAddr>),
        transport: Transport,
        out: &mut [u8],
    ) -> Option<usize> {
        if is_exchange(packet) {
            // UDP only: the exchange exists to learn and open UDP mappings.
            let counters = if transport == Transport::Udp {
                &mut self.udp
            } else {
                &mut self.tcp
            };
            counters.record_exchange(packet.len());
            if transport != Transport::Udp {
                counters.dropped(natrix_cdx::DropReason::UnexpectedClass);
            } else if !self.limiter.allow(from.ip(), std::time::Instant::now()) {
                counters.dropped(natrix_cdx::DropReason::RateLimited);
            } else {
                let (bound, dst_ip) = local;
                let local = Local {
                    bound,
                    dst_ip: if bound.ip().is_unspecified() {
                        dst_ip
                    } else {
                        None
                    },
                };
                if !self.exchange.0.offer(packet, from, local) {
                    self.exchange.1.inc();
                }
            }
            return None;
        }
        let mut outcome = self.responder.handle(packet, from, out);
        if transport == Transport::Udp
            && matches!(outcome, Outcome::Reply { .. })
            && !self.limiter.allow(from.ip(), std::time::Instant::now())
        {
            outcome = Outcome::Drop(natrix_cdx::DropReason::RateLimited);
        }
        let counters = match transport {
            Transport::Udp => &mut self.udp,
            Transport::Tcp | Transport::Tls => &mut self.tcp,
        };
        counters.record(packet.len(), &outcome);
        match outcome {
            Outcome::Reply { len, .. } => {
                counters.sent(len);
                Some(len)
            }
            Outcome::Indication | Outcome::Drop(_) => None,
        }
    }

    fn flush(&mut self) {
        self.udp.flush();
        self.tcp.flush();
        self.limiter.sweep(std::time::Instant::now());
    }
}

fn cdx_delegate(
    relay: &RelayConfig,
    telemetry: &Telemetry,
    exchange: ExchangeSender,
) -> DelegateFactory {
    let responder = Arc::new(BindingResponder::new(Some(relay.software.clone())));
    let metrics = CdxMetrics::new(telemetry);
    let overloaded = ExchangeMetrics::new(telemetry).post("overloaded").clone();
    let limits = relay.server_config().unauth;
    Arc::new(move || {
        Box::new(CdxOnRelay {
            responder: responder.clone(),
            udp: metrics.local(natrix_cdx::Transport::Udp),
            tcp: metrics.local(natrix_cdx::Transport::Tcp),
            limiter: UnauthLimiter::new(limits, std::time::Instant::now()),
            exchange: (exchange.clone(), overloaded.clone()),
        }) as Box<dyn BindingDelegate>
    })
}

/// `natrix up` without credentials gets a generated development user, shown
/// once, so that a first run works and never with a guessable password.
fn with_dev_credentials(mut relay: RelayConfig) -> RelayConfig {
    if relay.auth_secrets.is_empty() && relay.users.is_empty() {
        let password: String = (0..16)
            .map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[rand::random_range(0..32)]))
            .collect();
        warn!(
            user = "natrix",
            "no TURN credentials configured (--user or --auth-secret): generated a development user"
        );
        eprintln!(
            "natrix: development TURN user  natrix:{password}  (set --user or --auth-secret)"
        );
        relay.users.push(Redacted(format!("natrix:{password}")));
    }
    relay
}

/// Running roles, stopped in reverse order of start.
struct Running {
    cdx: Option<CdxServer>,
    relay: Option<RelayHost>,
}

/// Runs `plan` until SIGINT/SIGTERM.
pub(crate) fn run(global: &Global, plan: Plan) -> anyhow::Result<()> {
    let workers = worker_count(global.workers);
    let plan = match plan {
        Plan::Up(relay, secret) => Plan::Up(with_dev_credentials(relay), secret),
        other => other,
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        workers,
        global = ?global,
        plan = ?plan,
        "effective configuration"
    );
    let telemetry = Telemetry::new(env!("CARGO_PKG_VERSION"));

    // The CDX server runs on tokio; the relay has its own loops.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if matches!(plan, Plan::Cdx(_)) {
            workers
        } else {
            1
        })
        .thread_name("natrix-io")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;

    let mut running = Running {
        cdx: None,
        relay: None,
    };
    // The exchange inbox and the secret its actor verifies tickets with.
    let mut exchange: Option<(
        ExchangeInbox,
        Option<ClusterSecret>,
        natrix_cdx::exchange::Limits,
    )> = None;
    let mut gates = Vec::new();
    match &plan {
        Plan::Cdx(cdx) => {
            let mut server = CdxServer::start(runtime.handle(), cdx, workers, &telemetry)?;
            exchange = server
                .take_exchange()
                .map(|inbox| (inbox, cdx.cluster_secret.clone(), cdx.exchange_limits()));
            info!(udp = ?server.udp_addrs(), tcp = ?server.tcp_addrs(), "CDX role serving STUN");
            running.cdx = Some(server);
            gates.push(telemetry.health().gate("cdx"));
        }
        Plan::Relay(relay) => {
            let host = RelayHost::start(relay, workers, &telemetry, None)?;
            info!(udp = ?host.udp_addrs(), tcp = ?host.tcp_addrs(), tls = ?host.tls_addrs(), "relay role serving TURN");
            running.relay = Some(host);
            gates.push(telemetry.health().gate("relay"));
        }
        Plan::Up(relay, secret) => {
            let (sender, mut inbox) = natrix_cdx::exchange::inbox();
            let delegate = cdx_delegate(relay, &telemetry, sender);
            let host = RelayHost::start(relay, workers, &telemetry, Some(delegate))?;
            for (bound, socket) in host
                .udp_socket_clones()
                .context("cloning the listener sockets for the exchange")?
            {
                inbox.add_socket(bound, socket);
            }
            exchange = Some((inbox, secret.clone(), Default::default()));
            running.relay = Some(host);
            gates.push(telemetry.health().gate("relay"));
            gates.push(telemetry.health().gate("cdx"));
        }
    }
    for gate in &gates {
        gate.open();
    }

    // The control plane (actix) runs on this thread: the metrics endpoint
    // today, registry and drain actors as they land.
    let system = actix_rt::System::new();
    let drain_timeout = match &plan {
        Plan::Up(r, _) | Plan::Relay(r) => r.drain_timeout,
        Plan::Cdx(_) => Duration::ZERO,
    };
    let signal = system.block_on(async {
        let mut signals = Signals::install()?;
        let (server, addr) = http::serve(global.metrics_listen, telemetry.clone())?;
        let handle = server.handle();
        actix_rt::spawn(server);
        info!(%addr, "metrics and health endpoint up");
        let reload = running.relay.as_ref().map(|r| r.reload_actor().start());
        let store = match &global.redis_url {
            Some(url) => natrix_store::Store::redis(&url.0, natrix_store::RedisOptions::default())
                .await
                .with_context(|| format!("connecting to Redis at {url:?}"))?,
            None => natrix_store::Store::memory(),
        };
        let _exchange = exchange.take().map(|(inbox, secret, limits)| {
            ExchangeActor::new(
                inbox,
                store.clone(),
                secret.as_ref().map(|s| s.0.as_bytes()),
                limits,
                ExchangeMetrics::new(&telemetry),
            )
            .start()
        });
        let signal = signals.stop(reload.as_ref()).await;
        info!(signal, "shutting down");
        telemetry.health().start_draining();
        if let Some(relay) = &running.relay {
            drain(relay, drain_timeout, &mut signals).await;
        }
        handle.stop(true).await;
        anyhow::Ok(signal)
    })?;

    if let Some(relay) = running.relay.take() {
        relay.shutdown();
    }
    if let Some(server) = running.cdx.take() {
        // The timer must be created inside the runtime, hence the async block.
        let timeout = global.shutdown_timeout;
        let done =
            runtime.block_on(async { tokio::time::timeout(timeout, server.shutdown()).await });
        if done.is_err() {
            warn!(timeout = ?global.shutdown_timeout, "CDX listeners did not stop in time");
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    info!(signal, "stopped");
    Ok(())
}

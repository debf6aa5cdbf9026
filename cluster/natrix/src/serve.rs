//! The serving commands: start the roles, the metrics endpoint, wait for a
//! signal, shut down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::Context;
use natrix_cdx::exchange::{ExchangeActor, ExchangeInbox, ExchangeSender, Local, is_exchange};
use natrix_cdx::{
    BindingResponder, CdxConfig, CdxMetrics, ExchangeMetrics, LoopCounters, Outcome,
    server::CdxServer,
};
use natrix_lookup::LookupConfig;
use natrix_model::Redacted;
use natrix_model::limiter::UnauthLimiter;
use natrix_model::{ClusterSecret, TurnSecret};
use natrix_registry::{Deregister, Role, SetState};
use natrix_relay::control::{Reload, ReloadActor};
use natrix_relay::core::Transport;
use natrix_relay::{BindingDelegate, DelegateFactory, RelayConfig, RelayHost, StreamOutbox};
use natrix_telemetry::{Telemetry, http};
use tracing::{info, warn};

use crate::cli::Global;
use crate::cluster;

/// What a serving command runs.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// The relay role.
    pub(crate) relay: Option<RelayConfig>,
    /// CDX on the relay's listener (`natrix up`): Binding and the exchange.
    pub(crate) cdx_on_relay: bool,
    /// The CDX role on its own listeners.
    pub(crate) cdx: Option<CdxConfig>,
    /// The lookup role, with the TURN secrets it mints tokens with.
    pub(crate) lookup: Option<(LookupConfig, Vec<TurnSecret>)>,
    /// The cluster secret: exchange tickets (CDX verifies, lookup mints).
    pub(crate) cluster_secret: Option<ClusterSecret>,
    /// RFC 5780 on up's listener: alternate port and/or IP.
    pub(crate) up_rfc5780: Option<(Option<u16>, Option<std::net::IpAddr>)>,
}

impl Plan {
    /// `natrix up`: every role in one process. Without credentials it
    /// generates a development user, a TURN REST secret for lookup's tokens
    /// and a cluster secret for the exchange, so a first run works.
    pub(crate) fn up(
        relay: RelayConfig,
        cluster_secret: Option<ClusterSecret>,
        lookup: LookupConfig,
        rfc5780: (Option<u16>, Option<std::net::IpAddr>),
    ) -> anyhow::Result<Plan> {
        if (rfc5780.0.is_some() || rfc5780.1.is_some())
            && relay.listen.iter().any(|a| a.ip().is_unspecified())
        {
            anyhow::bail!(
                "--stun-alternate-port/--stun-alternate-ip need specific --turn-listen addresses: RESPONSE-ORIGIN and OTHER-ADDRESS must name real addresses"
            );
        }
        let mut relay = with_dev_credentials(relay);
        if relay.auth_secrets.is_empty() {
            relay
                .auth_secrets
                .push(TurnSecret::new("generated", &random_token(32))?);
        }
        let secrets = relay.auth_secrets.clone();
        let cluster_secret = match cluster_secret {
            Some(s) => s,
            None => random_token(32).parse()?,
        };
        Ok(Plan {
            relay: Some(relay),
            cdx_on_relay: true,
            cdx: None,
            lookup: Some((lookup, secrets)),
            cluster_secret: Some(cluster_secret),
            up_rfc5780: (rfc5780.0.is_some() || rfc5780.1.is_some()).then_some(rfc5780),
        })
    }
}

/// A random token of `n` characters from an unambiguous alphabet.
pub(crate) fn random_token(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[rand::random_range(0..32)]))
        .collect()
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
    /// RFC 5780 on up's listener: per bound address, the grid and the
    /// sockets of its cells (filled once the alternate cells are bound).
    rfc5780: Arc<std::sync::OnceLock<Rfc5780Cells>>,
}

/// Per primary address: where it sits in its grid, and a socket per cell.
type Rfc5780Cells = std::collections::HashMap<
    SocketAddr,
    (natrix_cdx::Site, [[Option<Arc<std::net::UdpSocket>>; 2]; 2]),
>;

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
            // Over UDP: the relay hands stream frames to `handle_stream`,
            // which routes their exchange through the connection.
            debug_assert_eq!(transport, Transport::Udp);
            self.udp.record_exchange(packet.len());
            if !self.limiter.allow(from.ip(), std::time::Instant::now()) {
                self.udp.dropped(natrix_cdx::DropReason::RateLimited);
            } else {
                let (bound, dst_ip) = local;
                let local = Local {
                    bound,
                    dst_ip: if bound.ip().is_unspecified() {
                        dst_ip
                    } else {
                        None
                    },
                    stream: None,
                };
                if !self.exchange.0.offer(packet, from, local) {
                    self.exchange.1.inc();
                }
            }
            return None;
        }
        let cells = self
            .rfc5780
            .get()
            .and_then(|m| m.get(&local.0))
            .filter(|_| transport == Transport::Udp);
        let mut outcome = self
            .responder
            .handle_at(packet, from, cells.map(|(site, _)| *site), out);
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
            // RFC 5780: answered from another cell, or to another port.
            Outcome::Reply {
                len,
                route: Some((via, to)),
                ..
            } => {
                let sender = cells.and_then(|(_, senders)| senders[via.ip][via.port].as_ref());
                match sender.map(|s| s.send_to(&out[..len], to)) {
                    Some(Ok(_)) => counters.sent(len),
                    _ => counters.send_failed(),
                }
                None
            }
            Outcome::Reply { len, .. } => {
                counters.sent(len);
                Some(len)
            }
            Outcome::Indication | Outcome::Drop(_) => None,
        }
    }

    fn handle_stream(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        out: &mut [u8],
        outbox: &mut Option<Box<dyn StreamOutbox>>,
    ) -> Option<usize> {
        if !is_exchange(packet) {
            return self.handle(packet, from, (local, None), transport, out);
        }
        // A client without UDP exchanges over its connection: the actor
        // answers and delivers through the connection's outbox.
        self.tcp.record_exchange(packet.len());
        let outbox = outbox.get_or_insert_with(|| Box::new(ExchangeOutbox::new()));
        let Some(x) = outbox.as_any().downcast_mut::<ExchangeOutbox>() else {
            self.tcp.dropped(natrix_cdx::DropReason::UnexpectedClass);
            return None;
        };
        let local = Local {
            bound: local,
            dst_ip: None,
            stream: Some(x.id),
        };
        if !self
            .exchange
            .0
            .offer_from_stream(packet, from, local, Some(x.tx.clone()))
        {
            self.exchange.1.inc();
        }
        None
    }

    fn flush(&mut self) {
        self.udp.flush();
        self.tcp.flush();
        self.limiter.sweep(std::time::Instant::now());
    }
}

/// The exchange's frames for one TCP or TLS connection of the relay: the
/// actor writes into `tx`, the relay loop drains `rx` into the connection.
struct ExchangeOutbox {
    /// The connection's id in the actor (unique in this process).
    id: u64,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

impl ExchangeOutbox {
    fn new() -> ExchangeOutbox {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        ExchangeOutbox {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tx,
            rx,
        }
    }
}

impl StreamOutbox for ExchangeOutbox {
    fn poll(&mut self) -> Option<Vec<u8>> {
        self.rx.try_recv().ok()
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

fn cdx_delegate(
    relay: &RelayConfig,
    telemetry: &Telemetry,
    exchange: ExchangeSender,
    rfc5780: Arc<std::sync::OnceLock<Rfc5780Cells>>,
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
            rfc5780: rfc5780.clone(),
        }) as Box<dyn BindingDelegate>
    })
}

/// `natrix up` without credentials gets a generated development user, shown
/// once, so that a first run works and never with a guessable password.
fn with_dev_credentials(mut relay: RelayConfig) -> RelayConfig {
    if relay.auth_secrets.is_empty() && relay.users.is_empty() {
        let password = random_token(16);
        warn!(
            user = "natrix",
            "no TURN credentials configured (--user or --auth-secret): generated a development user"
        );
        eprintln!(
            "natrix: development TURN user  natrix:{password}  (set --user or --auth-secret)"
        );
        relay
            .users
            .push(Redacted::new(format!("natrix:{password}")));
    }
    relay
}

/// RFC 5780 beside up's relay listener: sockets and loops for the
/// alternate cells, the relay's own sockets as the primary cells.
fn start_rfc5780_beside(
    runtime: &tokio::runtime::Handle,
    host: &RelayHost,
    port: Option<u16>,
    ip: Option<std::net::IpAddr>,
    telemetry: &Telemetry,
) -> anyhow::Result<CdxServer> {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        cdx: CdxConfig,
    }
    let listen: Vec<String> = host.udp_addrs().iter().map(ToString::to_string).collect();
    let mut args = vec![
        "natrix".to_owned(),
        "--stun-listen".to_owned(),
        listen.join(","),
        "--stun-tcp".to_owned(),
        "false".to_owned(),
    ];
    if let Some(p) = port {
        args.extend(["--stun-alternate-port".to_owned(), p.to_string()]);
    }
    if let Some(ip) = ip {
        args.extend(["--stun-alternate-ip".to_owned(), ip.to_string()]);
    }
    let config = Defaults::try_parse_from(args)
        .context("configuring RFC 5780 beside the relay")?
        .cdx;
    let primaries = host
        .udp_socket_clones()
        .context("cloning the relay's sockets for RFC 5780")?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    CdxServer::start_beside(runtime, &config, 1, telemetry, primaries)
}

/// The delegate's view of the grid: per primary, its site and cell sockets.
fn rfc5780_cells(server: &CdxServer) -> anyhow::Result<Rfc5780Cells> {
    let mut map: Rfc5780Cells = std::collections::HashMap::new();
    let grids = server.grids();
    for (primary, via, socket) in server
        .cell_sockets()
        .context("cloning the RFC 5780 sockets")?
    {
        let Some(grid) = grids.iter().find(|(a, _)| *a == primary).map(|(_, g)| *g) else {
            continue;
        };
        let entry = map.entry(primary).or_insert_with(|| {
            (
                natrix_cdx::Site {
                    grid,
                    arrived: natrix_cdx::Via::default(),
                },
                Default::default(),
            )
        });
        entry.1[via.ip][via.port] = Some(Arc::new(socket));
    }
    Ok(map)
}

/// How long a starting process waits for Redis (e.g. a Redis pod starting
/// next to it) before giving up; the data plane serves meanwhile.
const STORE_START_WAIT: Duration = Duration::from_secs(60);

/// Connects to Redis, retrying once a second while it is not up yet.
async fn connect_store(url: &crate::cli::RedisUrl) -> anyhow::Result<natrix_store::Store> {
    let deadline = tokio::time::Instant::now() + STORE_START_WAIT;
    loop {
        match natrix_store::Store::redis(&url.0, natrix_store::RedisOptions::default()).await {
            Ok(store) => return Ok(store),
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(url = ?url, error = %e, "Redis not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)).with_context(|| {
                    format!("connecting to Redis at {url:?} (gave up after {STORE_START_WAIT:?})")
                });
            }
        }
    }
}

/// A generated id for this host's `role` when none is configured:
/// `<role>-<hostname>-<address>-<port>` (unique per host and listener; no
/// `:` or `.`, so it fits in a TURN token's username).
fn generated_id(role: &str, listen: SocketAddr) -> String {
    let ip = listen.ip().to_string().replace([':', '.'], "-");
    format!("{role}-{}-{ip}-{}", cluster::hostname(), listen.port())
}

/// Runs `plan` until SIGINT/SIGTERM.
pub(crate) fn run(global: &Global, mut plan: Plan) -> anyhow::Result<()> {
    let workers = worker_count(global.workers);
    // A relay in a cluster needs an id before its credentials are built:
    // lookup's tokens name it.
    if let Some(relay) = &mut plan.relay
        && relay.relay_id.is_none()
    {
        let listen = relay
            .listen
            .first()
            .copied()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 3478)));
        relay.relay_id = Some(generated_id("relay", listen));
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        workers,
        global = ?global,
        plan = ?plan,
        "effective configuration"
    );
    let telemetry = Telemetry::new(env!("CARGO_PKG_VERSION"));

    // The CDX server runs on tokio; the relay has its own loops.
    let cdx_alone = plan.cdx.is_some() && plan.relay.is_none();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if cdx_alone { workers } else { 1 })
        .thread_name("natrix-io")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;
    let mut data = DataPlane::start(&plan, workers, &runtime, &telemetry)?;
    let exchange = data.exchange.take();

    // The control plane (actix) runs on this thread.
    let system = actix_rt::System::new();
    let signal = system.block_on(control_plane(
        global, workers, &plan, &data, exchange, &telemetry,
    ))?;
    data.stop(&runtime, global.shutdown_timeout);
    runtime.shutdown_timeout(Duration::from_secs(1));
    info!(signal, "stopped");
    Ok(())
}

/// What serves packets: the relay's loops and/or the CDX server, the RFC
/// 5780 server beside `natrix up`'s listener, the exchange inbox the
/// control plane drives, and the readiness gates (open while this lives:
/// a gate closes when dropped).
struct DataPlane {
    relay: Option<RelayHost>,
    cdx: Option<CdxServer>,
    beside: Option<CdxServer>,
    exchange: Option<(ExchangeInbox, natrix_cdx::exchange::Limits)>,
    gates: Vec<natrix_telemetry::ReadyGate>,
}

impl DataPlane {
    /// Starts the data planes `plan` names and opens their readiness gates.
    fn start(
        plan: &Plan,
        workers: usize,
        runtime: &tokio::runtime::Runtime,
        telemetry: &Telemetry,
    ) -> anyhow::Result<DataPlane> {
        let mut data = DataPlane {
            relay: None,
            cdx: None,
            beside: None,
            exchange: None,
            gates: Vec::new(),
        };
        let gates = &mut data.gates;
        if let Some(relay) = &plan.relay {
            let rfc5780 = Arc::new(std::sync::OnceLock::new());
            let delegate = if plan.cdx_on_relay {
                let (sender, inbox) = natrix_cdx::exchange::inbox();
                data.exchange = Some((inbox, Default::default()));
                Some(cdx_delegate(relay, telemetry, sender, rfc5780.clone()))
            } else {
                None
            };
            let host = RelayHost::start(relay, workers, telemetry, delegate)?;
            if let Some((port, ip)) = plan.up_rfc5780 {
                let server = start_rfc5780_beside(runtime.handle(), &host, port, ip, telemetry)?;
                let _ = rfc5780.set(rfc5780_cells(&server)?);
                data.beside = Some(server);
            }
            if let Some((inbox, _)) = &mut data.exchange {
                for (bound, socket) in host
                    .udp_socket_clones()
                    .context("cloning the listener sockets for the exchange")?
                {
                    inbox.add_socket(bound, socket);
                }
                gates.push(telemetry.health().gate("cdx"));
            }
            info!(udp = ?host.udp_addrs(), tcp = ?host.tcp_addrs(), tls = ?host.tls_addrs(), "relay role serving TURN");
            data.relay = Some(host);
            gates.push(telemetry.health().gate("relay"));
        }
        if let Some(cdx) = &plan.cdx {
            let mut server = CdxServer::start(runtime.handle(), cdx, workers, telemetry)?;
            data.exchange = server
                .take_exchange()
                .map(|inbox| (inbox, cdx.exchange_limits()));
            info!(udp = ?server.udp_addrs(), tcp = ?server.tcp_addrs(), "CDX role serving STUN");
            data.cdx = Some(server);
            gates.push(telemetry.health().gate("cdx"));
        }
        for gate in &data.gates {
            gate.open();
        }
        Ok(data)
    }

    /// Stops the relay's loops and the CDX listeners (these within
    /// `timeout`).
    fn stop(self, runtime: &tokio::runtime::Runtime, timeout: Duration) {
        if let Some(relay) = self.relay {
            relay.shutdown();
        }
        if let Some(server) = self.beside {
            let _ = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), server.shutdown()).await
            });
        }
        if let Some(server) = self.cdx {
            // The timer must be created inside the runtime, hence the async
            // block.
            let done =
                runtime.block_on(async { tokio::time::timeout(timeout, server.shutdown()).await });
            if done.is_err() {
                warn!(?timeout, "CDX listeners did not stop in time");
            }
        }
    }
}

/// The control plane, on the actix system of the calling thread: metrics
/// and health, certificate and secret reloads, the exchange, the registry
/// records, lookup; then waits for a signal and shuts down in order (drain,
/// deregister, stop the HTTP servers). Returns the signal's name.
async fn control_plane(
    global: &Global,
    workers: usize,
    plan: &Plan,
    data: &DataPlane,
    exchange: Option<(ExchangeInbox, natrix_cdx::exchange::Limits)>,
    telemetry: &Telemetry,
) -> anyhow::Result<&'static str> {
    let mut signals = Signals::install()?;
    let (server, addr) = http::serve(global.metrics_listen, telemetry.clone())?;
    let handle = server.handle();
    actix_rt::spawn(server);
    info!(%addr, "metrics and health endpoint up");
    let reload = data.relay.as_ref().map(|r| r.reload_actor().start());
    let store = match &global.redis_url {
        Some(url) => connect_store(url).await?,
        None => natrix_store::Store::memory(),
    };
    let secret = plan
        .cluster_secret
        .as_ref()
        .or(plan.cdx.as_ref().and_then(|c| c.cluster_secret.as_ref()));
    let _exchange = exchange.map(|(inbox, limits)| {
        ExchangeActor::new(
            inbox,
            store.clone(),
            secret.map(|s| s.bytes()),
            limits,
            ExchangeMetrics::new(telemetry),
        )
        .start()
    });
    // Rotated TURN secrets reach the relay within a second.
    let _secrets = reload
        .clone()
        .map(|r| cluster::watch_relay_secrets(&store, r));
    let publishers = publish_records(&store, plan, data, global, telemetry);
    let lookup = match &plan.lookup {
        Some((config, secrets)) => {
            let cluster_secret = secret.context(
                "lookup needs the cluster secret to mint exchange tickets (--cluster-secret)",
            )?;
            Some(cluster::start_lookup(
                &store,
                config,
                secrets.clone(),
                cluster_secret.bytes(),
                workers,
                telemetry,
            )?)
        }
        None => None,
    };

    let signal = signals.stop(reload.as_ref()).await;
    info!(signal, "shutting down");
    telemetry.health().start_draining();
    // Lookup stops assigning this host within one heartbeat.
    for p in &publishers {
        p.do_send(SetState(natrix_registry::State::Draining));
    }
    if let Some(relay) = &data.relay {
        let drain_timeout = plan
            .relay
            .as_ref()
            .map_or(Duration::ZERO, |r| r.drain_timeout);
        drain(relay, drain_timeout, &mut signals).await;
    }
    for p in &publishers {
        let _ = tokio::time::timeout(Duration::from_secs(2), p.send(Deregister)).await;
    }
    if let Some((h, _)) = lookup {
        h.stop(true).await;
    }
    handle.stop(true).await;
    Ok(signal)
}

/// This host's registry records, heartbeated into the store: the relay
/// (and CDX on its listener, in `natrix up`), or a CDX node (paired with a
/// sibling when it asked for one).
fn publish_records(
    store: &natrix_store::Store,
    plan: &Plan,
    data: &DataPlane,
    global: &Global,
    telemetry: &Telemetry,
) -> Vec<actix::Addr<natrix_registry::Publisher>> {
    let mut publishers = Vec::new();
    if let (Some(config), Some(host)) = (&plan.relay, &data.relay) {
        let public = config.external_ip;
        let rec = cluster::record(
            config.relay_id.clone().unwrap_or_default(),
            Role::Relay,
            global,
            cluster::public_addrs(host.udp_addrs(), public),
            cluster::public_addrs(host.tcp_addrs(), public),
            cluster::public_addrs(host.tls_addrs(), public),
            config.max_allocations as u64,
        );
        let load = cluster::relay_load(host.control(), telemetry.clone());
        publishers.push(cluster::publish(
            store,
            rec.clone(),
            load,
            global,
            telemetry,
        ));
        if plan.cdx_on_relay {
            let mut cdx = rec;
            cdx.role = Role::Cdx;
            cdx.tcp.clear();
            cdx.tls.clear();
            publishers.push(cluster::publish(
                store,
                cdx,
                cluster::cdx_load(telemetry.clone()),
                global,
                telemetry,
            ));
        }
    }
    if let (Some(config), Some(server)) = (&plan.cdx, &data.cdx) {
        let udp = cluster::public_addrs(server.udp_addrs(), config.advertise_ip);
        let listen = server
            .udp_addrs()
            .first()
            .copied()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 3478)));
        let id = generated_id("cdx", listen);
        let mut rec = cluster::record(
            id.clone(),
            Role::Cdx,
            global,
            udp,
            Vec::new(),
            Vec::new(),
            config.exchange_max_sessions as u64,
        );
        rec.internal = server.udp_addrs().to_vec();
        if let Some(handle) = server.siblings() {
            cluster::SiblingPairer::new(store.clone(), id, handle).start();
        }
        publishers.push(cluster::publish(
            store,
            rec,
            cluster::cdx_load(telemetry.clone()),
            global,
            telemetry,
        ));
    }
    publishers
}

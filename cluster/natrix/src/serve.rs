//! The serving commands: start the roles, the metrics endpoint, wait for a
//! signal, shut down in order.

use std::net::SocketAddr;
use std::time::Duration;

use actix::Actor;
use anyhow::Context;
use natrix_cdx::exchange::{ExchangeActor, ExchangeInbox};
use natrix_cdx::service::{Layout, SiblingHandle, StunSettings};
use natrix_cdx::{CdxConfig, ExchangeMetrics};
use natrix_lookup::LookupConfig;
use natrix_model::Redacted;
use natrix_model::{ClusterSecret, TurnSecret};
use natrix_registry::{Deregister, Role, SetState};
use natrix_relay::control::{Reload, ReloadActor};
use natrix_relay::{HostConfig, HostServices, RelayConfig, RelayHost};
use natrix_telemetry::{Telemetry, http};
use tracing::{error, info, warn};

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
    /// Signalling on lookup's server.
    pub(crate) signal: natrix_signal::SignalConfig,
    /// The cluster secret: exchange tickets (CDX verifies, lookup mints).
    pub(crate) cluster_secret: Option<ClusterSecret>,
    /// RFC 5780 on up's listener: alternate port and/or IP.
    pub(crate) up_rfc5780: Option<(Option<u16>, Option<std::net::IpAddr>)>,
    /// `natrix up` on a terminal: print one summary a person reads (the
    /// log shows warnings only) instead of the startup log.
    pub(crate) first_screen: bool,
    /// The relay's credentials were generated for this run (`natrix up`
    /// without --auth-secret): it cannot hand itself to a new binary.
    pub(crate) generated_credentials: bool,
}

impl Plan {
    /// `natrix up`: every role in one process. Without credentials it
    /// generates a development user, a TURN REST secret for lookup's tokens
    /// and a cluster secret for the exchange, so a first run works.
    pub(crate) fn up(
        relay: RelayConfig,
        cluster_secret: Option<ClusterSecret>,
        lookup: LookupConfig,
        signal: natrix_signal::SignalConfig,
        rfc5780: (Option<u16>, Option<std::net::IpAddr>),
        first_screen: bool,
    ) -> anyhow::Result<Plan> {
        if (rfc5780.0.is_some() || rfc5780.1.is_some())
            && relay.listen.iter().any(|a| a.ip().is_unspecified())
        {
            anyhow::bail!(
                "--stun-alternate-port/--stun-alternate-ip need specific --turn-listen addresses: RESPONSE-ORIGIN and OTHER-ADDRESS must name real addresses"
            );
        }
        // Credentials made up for this run die with it: a successor binary
        // would make up others, and the allocations could not go on.
        let generated_credentials = relay.auth_secrets.is_empty();
        let mut relay = with_dev_credentials(relay, first_screen);
        if relay.auth_secrets.is_empty() {
            relay
                .auth_secrets
                .push(TurnSecret::new("generated", &random_token(32))?);
        }
        let secrets = relay.auth_secrets.clone();
        let mut lookup = lookup;
        if lookup.api_keys.is_empty() {
            let key = natrix_model::apikey::ApiKey::generate(rand::random());
            if !first_screen {
                warn!(
                    key_id = key.id(),
                    "no lookup API key configured (--api-key): generated a development key"
                );
                eprintln!(
                    "natrix: development lookup API key  {}  (set --api-key)",
                    key.expose()
                );
            }
            lookup.api_keys.push(key);
        }
        let cluster_secret = match cluster_secret {
            Some(s) => s,
            None => random_token(32).parse()?,
        };
        // One port for TURN over TLS and the API: the TLS listener passes
        // HTTPS to this process's own lookup API, which believes the
        // front's X-Forwarded-For (it connects from the API's address).
        if relay.tls_cert.is_some() && relay.tls_http_backend.is_none() {
            let api = lookup.lookup_listen;
            let host = match api.ip() {
                ip if !ip.is_unspecified() => ip,
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            relay.tls_http_backend = Some(std::net::SocketAddr::new(host, api.port()).to_string());
            let len = if host.is_ipv4() { 32 } else { 128 };
            lookup.trusted_proxies.push(
                format!("{host}/{len}")
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            );
        }
        // TURN over DTLS beside TLS, on the same addresses over UDP, when
        // the key allows it (DTLS needs ECDSA; an RSA key keeps TLS alone).
        if let (Some(cert), Some(key)) = (&relay.tls_cert, &relay.tls_key)
            && relay.dtls_listen.is_empty()
        {
            match natrix_relay::tls::dtls_usable(cert, key) {
                Ok(()) => relay.dtls_listen = relay.tls_listen.clone(),
                Err(e) => warn!(error = %format!("{e:#}"), "TURN over DTLS stays off"),
            }
        }
        Ok(Plan {
            relay: Some(relay),
            cdx_on_relay: true,
            cdx: None,
            lookup: Some((lookup, secrets)),
            signal,
            cluster_secret: Some(cluster_secret),
            up_rfc5780: (rfc5780.0.is_some() || rfc5780.1.is_some()).then_some(rfc5780),
            first_screen,
            generated_credentials,
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
    usr2: tokio::signal::unix::Signal,
}

/// What a process does on SIGUSR2: a relay hands itself to the binary at
/// its path (see [`crate::upgrade`]).
const UPGRADE: &str = "SIGUSR2";

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            usr2: signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
        })
    }

    /// Waits for SIGINT or SIGTERM; SIGHUP asks `reload` to reload
    /// certificates and secrets, and waiting goes on. With `upgradable`
    /// (a relay), SIGUSR2 returns [`UPGRADE`] once the binary at this
    /// process's path proved it runs; otherwise it is logged and ignored.
    async fn stop(
        &mut self,
        reload: Option<&actix::Addr<ReloadActor>>,
        upgradable: bool,
    ) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.usr2.recv() => {
                    if !upgradable {
                        warn!("SIGUSR2: only a relay with configured credentials (--auth-secret) hands itself over to a new binary; ignored");
                        continue;
                    }
                    match tokio::task::spawn_blocking(crate::upgrade::check_target).await {
                        Ok(Ok(version)) => {
                            info!(to = %version, "SIGUSR2: handing the relay over to the binary at this path");
                            return UPGRADE;
                        }
                        Ok(Err(e)) => error!(error = %format!("{e:#}"), "SIGUSR2: the new binary does not run; going on"),
                        Err(e) => error!(error = %e, "SIGUSR2: checking the new binary failed; going on"),
                    }
                }
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

/// `natrix up` without credentials gets a generated development user, shown
/// once, so that a first run works and never with a guessable password.
fn with_dev_credentials(mut relay: RelayConfig, first_screen: bool) -> RelayConfig {
    if relay.auth_secrets.is_empty() && relay.users.is_empty() {
        let password = random_token(16);
        if !first_screen {
            warn!(
                user = "natrix",
                "no TURN credentials configured (--user or --auth-secret): generated a development user"
            );
            eprintln!(
                "natrix: development TURN user  natrix:{password}  (set --user or --auth-secret)"
            );
        }
        relay
            .users
            .push(Redacted::new(format!("natrix:{password}")));
    }
    relay
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
    // A relay on a private address (a cloud VM behind 1:1 NAT) learns its
    // public one before it advertises anything.
    if plan.cdx.is_none()
        && let Some(relay) = &mut plan.relay
        && relay.needs_public_address()
    {
        let ip = public_address(global, relay)?;
        info!(%ip, private = %relay.external_v4(), "public address learnt from the CDX nodes");
        relay.external_ip = Some(ip);
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        workers,
        global = ?global,
        plan = ?plan,
        "effective configuration"
    );
    let telemetry = Telemetry::new(env!("CARGO_PKG_VERSION"));

    // The data plane runs on the host's own loops (threads of their own).
    let mut data = DataPlane::start(&plan, workers, &telemetry)?;
    let exchange = data.exchange.take();

    // The control plane (actix) runs on this thread.
    let system = actix_rt::System::new();
    let mut usage = None;
    let signal = system.block_on(control_plane(
        global, workers, &plan, &data, exchange, &telemetry, &mut usage,
    ))?;
    // Records of allocations that ended meanwhile reach the sinks first.
    if let Some(w) = &usage {
        system.block_on(w.drain());
    }
    if signal == UPGRADE
        && let Some(host) = data.host.take()
    {
        let handoff = host.freeze()?;
        info!(
            allocations = handoff.allocations(),
            "relay frozen: executing the new binary"
        );
        return Err(crate::upgrade::exec(&handoff));
    }
    data.stop();
    // The loops recorded the allocations that ended with them.
    if let Some(w) = &usage {
        let n = system.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), w.drain())
                .await
                .unwrap_or(0)
        });
        info!(
            records = n,
            "usage of the allocations alive at the stop recorded"
        );
    }
    info!(signal, "stopped");
    Ok(())
}

/// Keeps the relay's alternate (300 Try Alternate while it is draining or
/// full) set: `--alternate-server`, or with Redis the relay lookup would
/// pick (active, alive, under lookup's default headroom, UDP, this relay's
/// region first, the same IP family), re-read every 2 s. The task ends with
/// the returned handle.
fn alternates(
    control: std::sync::Arc<natrix_relay::control::Control>,
    config: &RelayConfig,
    global: &Global,
    store: &natrix_store::Store,
) -> Option<actix_rt::task::JoinHandle<()>> {
    if let Some(a) = config.alternate_server {
        control.set_alternate(natrix_relay::core::Alternate {
            udp: Some(a),
            tcp: Some(a),
            tls: config.tls_alternate_server,
            dtls: config.tls_alternate_server,
        });
        return None;
    }
    global.redis_url.as_ref()?;
    let (store, own, region) = (
        store.clone(),
        config.relay_id.clone().unwrap_or_default(),
        global.region.clone(),
    );
    let v4 = config.external_v4().is_ipv4();
    Some(actix_rt::spawn(async move {
        loop {
            if let Ok(records) =
                natrix_registry::read_records(&store, natrix_registry::Role::Relay).await
            {
                let now = natrix_registry::unix_ms();
                let others: Vec<natrix_registry::HostRecord> = records
                    .into_iter()
                    .map(|(_, r)| r)
                    .filter(|r| r.id != own && r.alive(now))
                    .map(|mut r| {
                        r.udp.retain(|a| a.is_ipv4() == v4);
                        r
                    })
                    .collect();
                let need = natrix_lookup::select::Need {
                    udp: true,
                    region: Some(region.as_str()),
                };
                let picked = natrix_lookup::select::select(&others, need, 0.9, &mut |n| {
                    rand::random_range(0..n.max(1))
                });
                let first =
                    |addrs: &[SocketAddr]| addrs.iter().copied().find(|a| a.is_ipv4() == v4);
                control.set_alternate(picked.map_or_else(Default::default, |r| {
                    natrix_relay::core::Alternate {
                        udp: first(&r.udp),
                        tcp: first(&r.tcp),
                        tls: first(&r.tls),
                        dtls: first(&r.dtls),
                    }
                }));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }))
}

/// The public IPv4 address of a relay whose own is private: what the CDX
/// nodes (`--stun-server`, and the registry's with --redis-url) see as the
/// source of a Binding sent from the relay's address; the most common
/// answer. An error — the relay must not advertise an address nobody can
/// reach — when no node is known or none answers.
fn public_address(global: &Global, relay: &RelayConfig) -> anyhow::Result<std::net::IpAddr> {
    let private = relay.external_v4();
    let mut servers = relay.stun_servers.clone();
    if let Some(url) = &global.redis_url {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime")?;
        let records = runtime.block_on(async {
            let store = connect_store(url).await?;
            natrix_registry::read_records(&store, natrix_registry::Role::Cdx)
                .await
                .context("reading the CDX nodes from the registry")
        })?;
        let now = natrix_registry::unix_ms();
        for (_, r) in records.into_iter().filter(|(_, r)| r.alive(now)) {
            servers.extend(r.udp.into_iter().filter(SocketAddr::is_ipv4));
        }
    }
    servers.dedup();
    servers.truncate(8);
    if servers.is_empty() {
        anyhow::bail!(
            "this relay's address {private} is private and no CDX node is known to learn its public one from: give --external-ip (the address clients reach; the private one to relay for a private network), --stun-server HOST:PORT (a CDX node), or --redis-url of a cluster with CDX nodes"
        );
    }
    let socket = std::net::UdpSocket::bind((relay.relay_bind_v4(), 0)).with_context(|| {
        format!(
            "binding a socket on {} to ask the CDX nodes",
            relay.relay_bind_v4()
        )
    })?;
    let mut seen: Vec<(std::net::IpAddr, usize)> = Vec::new();
    for server in &servers {
        match natrix_cdx::exchange::client::mapped_address(&socket, *server, Duration::from_secs(2))
        {
            Ok(Some(mapped)) => match seen.iter_mut().find(|(ip, _)| *ip == mapped.ip()) {
                Some((_, n)) => *n += 1,
                None => seen.push((mapped.ip(), 1)),
            },
            Ok(None) => warn!(%server, "a CDX node did not answer the public-address Binding"),
            Err(e) => warn!(%server, error = %e, "asking a CDX node for the public address failed"),
        }
    }
    if seen.len() > 1 {
        warn!(answers = ?seen, "the CDX nodes disagree on this relay's public address: taking the most common");
    }
    seen.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    seen.first().map(|(ip, _)| *ip).with_context(|| {
        format!(
            "this relay's address {private} is private and no CDX node answered ({}): give --external-ip, or CDX nodes this host can reach",
            servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )
    })
}

/// What serves packets: one host (TURN, CDX, or both on one listener),
/// the exchange inbox the control plane drives, the RFC 5780 sibling
/// handle, and the readiness gates (open while this lives: a gate closes
/// when dropped).
struct DataPlane {
    host: Option<RelayHost>,
    /// The host relays TURN.
    turn: bool,
    exchange: Option<(ExchangeInbox, natrix_cdx::exchange::Limits)>,
    siblings: Option<SiblingHandle>,
    gates: Vec<natrix_telemetry::ReadyGate>,
}

impl DataPlane {
    /// Starts the host `plan` names and opens its readiness gates.
    fn start(plan: &Plan, workers: usize, telemetry: &Telemetry) -> anyhow::Result<DataPlane> {
        let mut data = DataPlane {
            host: None,
            turn: plan.relay.is_some(),
            exchange: None,
            siblings: None,
            gates: Vec::new(),
        };
        let handoff = crate::upgrade::inherited()?;
        let Some((host_config, stun)) = host_plan(plan) else {
            if handoff.is_some() {
                warn!("handed a relay over, but this command runs none: its allocations end");
            }
            return Ok(data);
        };
        // A configuration error is reported before any port is bound.
        if let Some(relay) = &plan.relay {
            relay.credentials().map_err(anyhow::Error::msg)?;
        }
        let mut bound = match handoff {
            Some(handoff) => RelayHost::adopt(&host_config, handoff)
                .context("taking over the previous binary's sockets")?,
            None => RelayHost::bind(&host_config, workers)?,
        };
        let services = match &stun {
            Some((settings, limits)) => {
                let layout = Layout::plan(settings, bound.udp_addrs(), telemetry)?;
                if !bound.resumed() {
                    bound.bind_service_udp(&layout.cells_to_bind())?;
                }
                let (sender, inbox) = natrix_cdx::exchange::inbox();
                data.exchange = Some((inbox, *limits));
                data.siblings = layout.siblings();
                Some(natrix_cdx::service::factory(
                    settings, &layout, sender, telemetry,
                ))
            }
            None => None,
        };
        let host = bound.start(
            telemetry,
            HostServices {
                stun: services,
                turn: plan.relay.clone(),
            },
        )?;
        if let Some((inbox, _)) = &mut data.exchange {
            // Exchange answers and deliveries leave from the socket the
            // participant used (a clone: same address and port).
            for (bound, socket) in host
                .udp_socket_clones()
                .context("cloning the listener sockets for the exchange")?
            {
                inbox.add_socket(bound, socket);
            }
            info!(udp = ?host.udp_addrs(), cells = ?host.service_udp_addrs(), tcp = ?host.tcp_addrs(), "CDX serving STUN");
            data.gates.push(telemetry.health().gate("cdx"));
        }
        if plan.relay.is_some() {
            info!(udp = ?host.udp_addrs(), tcp = ?host.tcp_addrs(), tls = ?host.tls_addrs(), "relay role serving TURN");
            data.gates.push(telemetry.health().gate("relay"));
        }
        data.host = Some(host);
        for gate in &data.gates {
            gate.open();
        }
        Ok(data)
    }

    /// Stops the host's loops.
    fn stop(self) {
        if let Some(host) = self.host {
            host.shutdown();
        }
    }

    /// The host when it relays TURN.
    fn relay(&self) -> Option<&RelayHost> {
        self.host.as_ref().filter(|_| self.turn)
    }
}

/// The listeners of the host `plan` runs, and the CDX service on them
/// with the exchange's limits (`None`: no host, as for lookup alone).
fn host_plan(
    plan: &Plan,
) -> Option<(
    HostConfig,
    Option<(StunSettings, natrix_cdx::exchange::Limits)>,
)> {
    match (&plan.relay, &plan.cdx) {
        (Some(relay), _) => {
            let stun = plan.cdx_on_relay.then(|| {
                let (port, ip) = plan.up_rfc5780.unwrap_or_default();
                let settings = natrix_cdx::service::beside_turn(
                    &relay.software,
                    relay.server_config().unauth,
                    port,
                    ip,
                );
                (settings, Default::default())
            });
            Some((relay.host(), stun))
        }
        (None, Some(cdx)) => Some((
            HostConfig {
                listen: cdx.listen.clone(),
                tcp: cdx.tcp,
                tls_listen: Vec::new(),
                tls: None,
                dtls_listen: Vec::new(),
                max_connections: cdx.tcp_max_connections,
                max_connections_per_ip: cdx.tcp_max_connections_per_ip,
                idle_timeout: cdx.tcp_idle_timeout,
                proxy_from: Vec::new(),
                https: None,
            },
            Some((cdx.stun_settings(), cdx.exchange_limits())),
        )),
        (None, None) => None,
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
    usage: &mut Option<natrix_relay::usage::UsageWriter>,
) -> anyhow::Result<&'static str> {
    let mut signals = Signals::install()?;
    let (server, addr) = http::serve(global.metrics_listen, telemetry.clone())?;
    let handle = server.handle();
    actix_rt::spawn(server);
    info!(%addr, "metrics and health endpoint up");
    let health = match global.health_listen {
        Some(at) => {
            let (server, addr) = http::serve_health(at, telemetry.clone())?;
            let h = server.handle();
            actix_rt::spawn(server);
            info!(%addr, "health endpoint up");
            Some(h)
        }
        None => None,
    };
    let reload = data.relay().map(|r| r.reload_actor().start());
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
    // Usage records: written every second (and by `run` at the end).
    if let (Some(host), Some(config)) = (data.relay(), plan.relay.as_ref())
        && let Some(records) = host.usage_records()
    {
        let sinks = config.usage_sinks();
        if sinks.stream.is_some() && global.redis_url.is_none() {
            warn!(
                "--usage-stream without --redis-url: the stream lives in this process's memory only"
            );
        }
        let writer = natrix_relay::usage::UsageWriter::new(
            records,
            sinks,
            store.clone(),
            config.relay_id.clone().unwrap_or_default(),
            telemetry,
        );
        let w = writer.clone();
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.drain().await;
            }
        });
        *usage = Some(writer);
    }
    // Rotated TURN secrets reach the relay within a second.
    let _secrets = reload
        .clone()
        .map(|r| natrix_relay::control::watch_store_secrets(&store, r));
    let publishers = publish_records(&store, plan, data, global, telemetry);
    // Where Allocates go while this relay is draining or full.
    let _alternates = match (data.relay(), plan.relay.as_ref()) {
        (Some(host), Some(config)) => alternates(host.control(), config, global, &store),
        _ => None,
    };
    // The admin API, when asked for: its drain also tells the registry.
    let admin = match (data.relay(), plan.relay.as_ref()) {
        (Some(host), Some(config)) => {
            let p = publishers.clone();
            crate::admin::serve(
                config,
                host.control(),
                telemetry,
                Box::new(move || {
                    for x in &p {
                        x.do_send(SetState(natrix_registry::State::Draining));
                    }
                }),
            )?
        }
        _ => None,
    };
    let push_hub = std::sync::Arc::new(std::sync::OnceLock::<natrix_signal::push::Hub>::new());
    let lookup = match &plan.lookup {
        Some((config, secrets)) => {
            let cluster_secret = secret.context(
                "lookup needs the cluster secret to mint exchange tickets (--cluster-secret)",
            )?;
            let signal = {
                let hub = push_hub.clone();
                let (store, config) = (store.clone(), plan.signal.clone());
                let (secret, telemetry) = (cluster_secret.bytes().to_vec(), telemetry.clone());
                Box::new(move |lookup: &natrix_lookup::http::LookupState| {
                    let state =
                        natrix_signal::state(&store, config, lookup.clone(), &secret, &telemetry);
                    let _ = hub.set(state.hub.clone());
                    natrix_signal::extension(state)
                }) as natrix_lookup::Extend
            };
            Some(natrix_lookup::start(
                &store,
                config,
                secrets.clone(),
                cluster_secret.bytes(),
                workers,
                telemetry,
                Some(signal),
            )?)
        }
        None => None,
    };

    if plan.first_screen {
        eprint!(
            "{}",
            first_screen(
                plan,
                data,
                addr,
                lookup.as_ref().map(|(_, a)| *a),
                global.redis_url.is_some()
            )
        );
    }
    let upgradable = data.relay().is_some() && !plan.generated_credentials;
    let signal = signals.stop(reload.as_ref(), upgradable).await;
    if signal == UPGRADE {
        // No drain, no deregistration: the successor serves on at once.
        return Ok(signal);
    }
    info!(signal, "shutting down");
    shut_down(telemetry, plan, data, &publishers, &mut signals).await;
    // Push sockets are told to reconnect elsewhere before the server that
    // holds them stops.
    if let Some(hub) = push_hub.get() {
        hub.drain_and_wait(Duration::from_secs(2)).await;
    }
    // The HTTP servers finish their requests, within the shutdown timeout.
    let http = async {
        if let Some((h, _)) = lookup {
            h.stop(true).await;
        }
        handle.stop(true).await;
        if let Some(h) = health {
            h.stop(true).await;
        }
        if let Some((h, _)) = admin {
            h.stop(true).await;
        }
    };
    if tokio::time::timeout(global.shutdown_timeout, http)
        .await
        .is_err()
    {
        warn!(timeout = ?global.shutdown_timeout, "HTTP servers did not stop in time");
    }
    Ok(signal)
}

/// A URL's host for `addr`: loopback when it listens everywhere.
fn url_host(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// What `natrix up` prints on a terminal once everything listens: where
/// each service is, the development credentials, what to try.
fn first_screen(
    plan: &Plan,
    data: &DataPlane,
    metrics: SocketAddr,
    lookup: Option<SocketAddr>,
    redis: bool,
) -> String {
    use std::fmt::Write as _;
    let join = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = format!(
        "\nnatrix {} — every role in one process, {}\n\n",
        env!("CARGO_PKG_VERSION"),
        if redis {
            "coordinating through Redis"
        } else {
            "in-memory coordination"
        }
    );
    if let Some(host) = data.relay() {
        let _ = writeln!(
            s,
            "  TURN + STUN   udp {}   tcp {}",
            join(host.udp_addrs()),
            join(host.tcp_addrs())
        );
        let tls = host.tls_addrs();
        if !tls.is_empty() {
            // With a backend (natrix up sets its own API) the port is
            // shared: HTTPS clients reach the API there too.
            let shared = plan
                .relay
                .as_ref()
                .is_some_and(|r| r.tls_http_backend.is_some());
            let _ = writeln!(
                s,
                "  TURN TLS      {}{}",
                join(tls),
                if shared {
                    "   (and the API over HTTPS)"
                } else {
                    ""
                }
            );
        }
        let dtls = host.dtls_addrs();
        if !dtls.is_empty() {
            let _ = writeln!(s, "  TURN DTLS     {}   (udp)", join(dtls));
        }
    }
    if let Some(at) = lookup {
        let _ = writeln!(s, "  lookup API    http://{}/v1/plan", url_host(at));
        if plan.signal.open_registration {
            let _ = writeln!(s, "  demo page     http://{}/demo", url_host(at));
        } else {
            let _ = writeln!(
                s,
                "  demo page     http://{}/demo  (start with --open-registration to use it)",
                url_host(at)
            );
        }
    }
    let _ = writeln!(
        s,
        "  metrics       http://{m}/metrics   health http://{m}/readyz",
        m = url_host(metrics)
    );
    let user = plan
        .relay
        .as_ref()
        .and_then(|r| r.users.first())
        .map(|u| u.expose().to_owned());
    let key = plan
        .lookup
        .as_ref()
        .and_then(|(l, _)| l.api_keys.first())
        .map(|k| k.expose().to_owned());
    if let Some(user) = &user {
        let _ = writeln!(s, "\n  TURN user     {user}");
    }
    if let Some(key) = &key {
        let _ = writeln!(s, "  API key       {key}");
    }
    let _ = writeln!(
        s,
        "  (generated for this run unless you set them: --user, --auth-secret, --api-key)"
    );
    s += "\nTry:\n";
    if let Some(host) = data.relay().and_then(|h| h.udp_addrs().first().copied()) {
        let _ = writeln!(s, "  natrix probe {}", url_host(host));
    }
    if let (Some(at), Some(key)) = (lookup, &key) {
        let _ = writeln!(
            s,
            "  curl -H 'Authorization: Bearer {key}' -d '{{\"a\":{{\"profile\":{{\"class\":\"open\"}}}},\"b\":{{\"profile\":{{\"class\":\"symmetric\"}}}}}}' http://{}/v1/plan",
            url_host(at)
        );
    }
    s += "\nLogging warnings only (--log info for everything). Ctrl-C stops.\n";
    s
}

/// The orderly part of a shutdown: draining (readiness and the registry
/// say so, lookup stops assigning this host within a heartbeat), the
/// relay's allocations given time to end, the records removed.
async fn shut_down(
    telemetry: &Telemetry,
    plan: &Plan,
    data: &DataPlane,
    publishers: &[actix::Addr<natrix_registry::Publisher>],
    signals: &mut Signals,
) {
    telemetry.health().start_draining();
    for p in publishers {
        p.do_send(SetState(natrix_registry::State::Draining));
    }
    if let Some(relay) = data.relay() {
        let drain_timeout = plan
            .relay
            .as_ref()
            .map_or(Duration::ZERO, |r| r.drain_timeout);
        drain(relay, drain_timeout, signals).await;
    }
    for p in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(2), p.send(Deregister)).await;
    }
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
    if let (Some(config), Some(host)) = (&plan.relay, data.relay()) {
        let public = config.external_ip;
        let mut rec = cluster::record(
            config.relay_id.clone().unwrap_or_default(),
            Role::Relay,
            global,
            cluster::public_addrs(host.udp_addrs(), public),
            cluster::public_addrs(host.tcp_addrs(), public),
            cluster::public_addrs(host.tls_addrs(), public),
            config.capacity() as u64,
        );
        rec.dtls = cluster::public_addrs(host.dtls_addrs(), public);
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
            cdx.dtls.clear();
            publishers.push(cluster::publish(
                store,
                cdx,
                cluster::cdx_load(telemetry.clone()),
                global,
                telemetry,
            ));
        }
    }
    if let (Some(config), Some(server)) = (&plan.cdx, &data.host) {
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
        if let Some(handle) = data.siblings.clone() {
            natrix_cdx::pairing::SiblingPairer::new(store.clone(), id, handle).start();
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

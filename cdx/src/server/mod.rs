//! The I/O shells that drive [`BindingResponder`] on real sockets.

mod tcp;
mod udp;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use natrix_net::{UdpIo, UdpOptions, bind_tcp, bind_udp, ensure_udp_free};
use natrix_telemetry::Telemetry;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::exchange::{ExchangeInbox, inbox};
use crate::{BindingResponder, CdxConfig, CdxMetrics, ExchangeMetrics, Grid, Sibling, Site, Via};

/// How often loops publish their counters.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// A running CDX server: its listeners and their tasks.
#[derive(Debug)]
pub struct CdxServer {
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    exchange: Option<ExchangeInbox>,
    pairings: Vec<Pairing>,
    siblings: Option<SiblingHandle>,
    cells: Vec<(SocketAddr, Via, std::net::UdpSocket)>,
    grids: Vec<(SocketAddr, Grid)>,
}

/// Sets the RFC 5780 siblings of a server started with
/// `--stun-sibling auto` (cheap to clone; the loops see changes from their
/// next batch).
#[derive(Clone, Debug)]
pub struct SiblingHandle(Arc<Vec<Pairing>>);

impl SiblingHandle {
    /// The primary addresses whose sibling the caller chooses.
    pub fn pairable(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|p| p.primary).collect()
    }

    /// Pairs the listener at `primary` with a sibling: `public` is the IP
    /// clients reach it at (named in OTHER-ADDRESS), `internal` its primary
    /// STUN address for hand-offs; `None` unpairs (change-IP requests get
    /// 420 again). Returns true when this changed the pairing.
    pub fn set_sibling(&self, primary: SocketAddr, sibling: Option<(IpAddr, SocketAddr)>) -> bool {
        let Some(p) = self.0.iter().find(|p| p.primary == primary) else {
            return false;
        };
        let mut current = p.current.lock().unwrap_or_else(|e| e.into_inner());
        if *current == sibling {
            return false;
        }
        *current = sibling;
        let paired = match sibling {
            None => udp::Paired {
                grid: p.base,
                handoff: None,
            },
            Some((public, internal)) => {
                let mut grid = p.base;
                grid.ips[1] = internal.ip();
                grid.advertised[1] = public;
                grid.alt_ip = true;
                grid.sibling = true;
                udp::Paired {
                    grid,
                    handoff: Some(Arc::new(udp::HandoffPeer {
                        key: p.key.clone(),
                        sibling: internal,
                        sent: p.metrics.handoffs_sent.clone(),
                        answered: p.metrics.handoffs_answered.clone(),
                        rejected: p.metrics.handoffs_rejected.clone(),
                    })),
                }
            }
        };
        p.cell.store(Arc::new(paired));
        info!(%primary, sibling = ?sibling, "RFC 5780 sibling changed");
        true
    }
}

/// A listener whose RFC 5780 sibling is chosen at run time.
#[derive(Debug)]
struct Pairing {
    primary: SocketAddr,
    base: Grid,
    key: ring::hmac::Key,
    metrics: CdxMetrics,
    cell: Arc<arc_swap::ArcSwap<udp::Paired>>,
    current: std::sync::Mutex<Option<(IpAddr, SocketAddr)>>,
}

/// True for errors that mean "this host has no IPv6": such a default
/// listener is skipped rather than fatal.
fn ipv6_unavailable(addr: &SocketAddr, err: &io::Error) -> bool {
    addr.is_ipv6()
        && addr.ip().is_unspecified()
        && matches!(
            err.raw_os_error(),
            Some(
                libc_errno::EAFNOSUPPORT | libc_errno::EADDRNOTAVAIL | libc_errno::EPROTONOSUPPORT
            )
        )
}

/// The few errno values the bind fallback looks at.
mod libc_errno {
    pub(super) const EAFNOSUPPORT: i32 = 97;
    pub(super) const EADDRNOTAVAIL: i32 = 99;
    pub(super) const EPROTONOSUPPORT: i32 = 93;
}

impl CdxServer {
    /// Binds every listener of `config` and starts `workers` UDP loops per
    /// address (SO_REUSEPORT) plus one TCP acceptor per address, on
    /// `runtime`. Fails if any address cannot be bound (except an IPv6
    /// wildcard on a host without IPv6).
    pub fn start(
        runtime: &Handle,
        config: &CdxConfig,
        workers: usize,
        telemetry: &Telemetry,
    ) -> anyhow::Result<CdxServer> {
        Self::start_inner(runtime, config, workers, telemetry, HashMap::new())
    }

    /// RFC 5780 beside another role's listener (`natrix up`): `primaries`
    /// are clones of the sockets another role already serves on each
    /// `config.listen` address. Only the other cells of the grid (alternate
    /// port and IP) get sockets and loops here; the primaries are used to
    /// send answers routed to them, never read. No TCP listener.
    pub fn start_beside(
        runtime: &Handle,
        config: &CdxConfig,
        workers: usize,
        telemetry: &Telemetry,
        primaries: Vec<std::net::UdpSocket>,
    ) -> anyhow::Result<CdxServer> {
        let mut external = HashMap::new();
        for s in primaries {
            let addr = s
                .local_addr()
                .context("reading a primary socket's address")?;
            external.insert(addr, s);
        }
        Self::start_inner(runtime, config, workers, telemetry, external)
    }

    /// The RFC 5780 grid of each primary address.
    pub fn grids(&self) -> Vec<(SocketAddr, Grid)> {
        self.grids.clone()
    }

    /// Clones of the first socket of every cell (primary address, cell,
    /// socket), for a sender outside the loops.
    pub fn cell_sockets(&self) -> std::io::Result<Vec<(SocketAddr, Via, std::net::UdpSocket)>> {
        self.cells
            .iter()
            .map(|(a, v, s)| Ok((*a, *v, s.try_clone()?)))
            .collect()
    }

    fn start_inner(
        runtime: &Handle,
        config: &CdxConfig,
        workers: usize,
        telemetry: &Telemetry,
        mut external: HashMap<SocketAddr, std::net::UdpSocket>,
    ) -> anyhow::Result<CdxServer> {
        let _guard = runtime.enter();
        let responder = Arc::new(BindingResponder::new(Some(config.software.clone())));
        let metrics = CdxMetrics::new(telemetry);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (exchange_tx, mut exchange_rx) = inbox();
        let overloaded = ExchangeMetrics::new(telemetry).post("overloaded").clone();
        let mut server = CdxServer {
            udp_addrs: Vec::new(),
            tcp_addrs: Vec::new(),
            shutdown,
            tasks: Vec::new(),
            exchange: None,
            pairings: Vec::new(),
            siblings: None,
            cells: Vec::new(),
            grids: Vec::new(),
        };
        let opts = UdpOptions::default();
        let rfc5780 = config.alternate_port.is_some()
            || config.alternate_ip.is_some()
            || config.sibling.is_some();
        let handoff_key = match (&config.sibling, &config.cluster_secret) {
            (Some(_), Some(secret)) => Some(crate::handoff::key(secret.bytes())),
            (Some(_), None) => anyhow::bail!(
                "--stun-sibling needs --cluster-secret (the same on both nodes): hand-offs must be authenticated"
            ),
            (None, _) => None,
        };
        for &requested in &config.listen {
            if rfc5780 && requested.ip().is_unspecified() {
                anyhow::bail!(
                    "--stun-alternate-port/--stun-alternate-ip need specific --stun-listen addresses (got {requested}): RESPONSE-ORIGIN and OTHER-ADDRESS must name real addresses"
                );
            }
            let beside = external.remove(&requested);
            let is_beside = beside.is_some();
            let bound = match beside {
                Some(s) => Ok(s),
                None => ensure_udp_free(requested).and_then(|()| bind_udp(requested, &opts)),
            };
            let first = match bound {
                Ok(s) => s,
                Err(e) if ipv6_unavailable(&requested, &e) => {
                    warn!(%requested, error = %e, "IPv6 unavailable; skipping this listener");
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("binding STUN UDP on {requested}"));
                }
            };
            // Port 0 picks a port once; the other loops join that port.
            let addr = first
                .local_addr()
                .with_context(|| format!("reading the address bound for {requested}"))?;
            let sibling = config
                .sibling
                .and_then(Sibling::ip)
                .filter(|ip| ip.is_ipv4() == addr.is_ipv4());
            let alt_ip = config
                .alternate_ip
                .filter(|ip| ip.is_ipv4() == addr.is_ipv4())
                .or(sibling);
            let ips = [addr.ip(), alt_ip.unwrap_or(addr.ip())];
            let same_family = |ip: Option<IpAddr>| ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4());
            let own_public = same_family(config.advertise_ip).unwrap_or(ips[0]);
            let advertised = [
                own_public,
                match alt_ip {
                    Some(_) => same_family(config.alternate_advertise_ip).unwrap_or(ips[1]),
                    None => own_public,
                },
            ];
            let grid = rfc5780.then(|| Grid {
                ips,
                advertised,
                ports: [addr.port(), config.alternate_port.unwrap_or(addr.port())],
                alt_ip: alt_ip.is_some(),
                alt_port: config.alternate_port.is_some(),
                sibling: sibling.is_some(),
            });
            let handoff = match (&handoff_key, sibling) {
                (Some(key), Some(ip)) => Some(Arc::new(udp::HandoffPeer {
                    key: key.clone(),
                    sibling: SocketAddr::new(ip, addr.port()),
                    sent: metrics.handoffs_sent.clone(),
                    answered: metrics.handoffs_answered.clone(),
                    rejected: metrics.handoffs_rejected.clone(),
                })),
                _ => None,
            };
            // `--stun-sibling auto`: the pairing changes at run time; the
            // loops read it per batch.
            let dynamic = match (config.sibling, &handoff_key, grid) {
                (Some(Sibling::Auto), Some(key), Some(g))
                    if addr.ip().is_ipv4() == g.ips[0].is_ipv4() =>
                {
                    let cell = Arc::new(arc_swap::ArcSwap::from_pointee(udp::Paired {
                        grid: g,
                        handoff: None,
                    }));
                    server.pairings.push(Pairing {
                        primary: addr,
                        base: g,
                        key: key.clone(),
                        metrics: metrics.clone(),
                        cell: cell.clone(),
                        current: std::sync::Mutex::new(None),
                    });
                    Some(cell)
                }
                _ => None,
            };
            // Every socket of the grid (just the primary without RFC 5780),
            // `workers` times each with SO_REUSEPORT; the first of each cell
            // also sends the answers other cells route to it.
            let mut cells: Vec<(Via, Vec<std::net::UdpSocket>)> = Vec::new();
            let mut first = Some(first);
            let local_cells: Vec<Via> = grid.map_or_else(
                || vec![Via::default()],
                |g| g.cells().filter(|v| g.is_local(*v)).collect(),
            );
            for via in local_cells {
                let cell_addr = grid.map_or(addr, |g| g.addr(via));
                let mut sockets = Vec::new();
                if let Some(f) = first.take() {
                    sockets.push(f);
                    if is_beside {
                        // Another role reads the primary: send only.
                        cells.push((via, sockets));
                        continue;
                    }
                } else {
                    sockets.push(
                        ensure_udp_free(cell_addr)
                            .and_then(|()| bind_udp(cell_addr, &opts))
                            .with_context(|| format!("binding STUN UDP on {cell_addr}"))?,
                    );
                }
                for _ in 1..workers.max(1) {
                    sockets.push(bind_udp(cell_addr, &opts).with_context(|| {
                        format!("binding another STUN UDP socket on {cell_addr}")
                    })?);
                }
                cells.push((via, sockets));
            }
            let mut ios: Vec<(Via, Vec<Arc<UdpIo>>)> = Vec::new();
            for (via, sockets) in cells {
                if let Some(first) = sockets.first() {
                    server.cells.push((
                        addr,
                        via,
                        first
                            .try_clone()
                            .with_context(|| format!("cloning a STUN UDP socket of {addr}"))?,
                    ));
                }
                // Exchange answers and deliveries leave from the socket the
                // participant used (a clone: same address and port).
                if let Some(first) = sockets.first() {
                    let clone = first
                        .try_clone()
                        .and_then(|c| Ok((c.local_addr()?, c)))
                        .with_context(|| format!("cloning a STUN UDP socket of {addr}"))?;
                    exchange_rx.add_socket(clone.0, clone.1);
                }
                let mut v = Vec::new();
                for socket in sockets {
                    v.push(Arc::new(UdpIo::new(socket).with_context(|| {
                        format!("registering a STUN UDP socket for {addr}")
                    })?));
                }
                ios.push((via, v));
            }
            let mut senders: udp::Senders = Default::default();
            for (via, v) in &ios {
                senders[via.ip][via.port] = v.first().cloned();
            }
            let senders = Arc::new(senders);
            for (via, v) in ios {
                if is_beside && via == Via::default() {
                    continue;
                }
                for io in v {
                    server.tasks.push(runtime.spawn(udp::run(
                        io,
                        udp::LoopSetup {
                            site: grid.map(|grid| Site { grid, arrived: via }),
                            senders: senders.clone(),
                            handoff: handoff.clone(),
                            dynamic: dynamic.clone(),
                            limits: config.limits(),
                            exchange: Some((exchange_tx.clone(), overloaded.clone())),
                        },
                        responder.clone(),
                        metrics.clone(),
                        shutdown_rx.clone(),
                    )));
                }
            }
            if let Some(g) = grid {
                server.grids.push((addr, g));
                info!(cells = ?g.cells().map(|v| g.addr(v)).collect::<Vec<_>>(), "RFC 5780 NAT discovery on");
            }
            server.udp_addrs.push(addr);

            if config.tcp && !is_beside {
                // Same port as UDP, as STUN clients expect.
                let listener =
                    bind_tcp(addr, 1024).with_context(|| format!("binding STUN TCP on {addr}"))?;
                let listener = tokio::net::TcpListener::from_std(listener)
                    .with_context(|| format!("registering STUN TCP listener {addr}"))?;
                server.tcp_addrs.push(addr);
                server.tasks.push(runtime.spawn(tcp::accept_loop(
                    listener,
                    tcp::Limits {
                        max_connections: config.tcp_max_connections,
                        idle_timeout: config.tcp_idle_timeout,
                    },
                    responder.clone(),
                    metrics.clone(),
                    Some(tcp::StreamExchange {
                        sender: exchange_tx.clone(),
                        overloaded: overloaded.clone(),
                        bound: addr,
                    }),
                    shutdown_rx.clone(),
                )));
            }
            info!(%addr, udp_loops = workers.max(1), tcp = config.tcp, "STUN listener up");
        }
        if server.udp_addrs.is_empty() {
            anyhow::bail!("no STUN listener could be bound (--stun-listen)");
        }
        server.exchange = Some(exchange_rx);
        if !server.pairings.is_empty() {
            server.siblings = Some(SiblingHandle(Arc::new(std::mem::take(
                &mut server.pairings,
            ))));
        }
        Ok(server)
    }

    /// With `--stun-sibling auto`: the handle that sets siblings.
    pub fn siblings(&self) -> Option<SiblingHandle> {
        self.siblings.clone()
    }

    /// The exchange inbox and sockets, for the [`crate::exchange::ExchangeActor`]
    /// (taken once; until an actor runs, exchange messages are dropped and
    /// counted as `overloaded`).
    pub fn take_exchange(&mut self) -> Option<ExchangeInbox> {
        self.exchange.take()
    }

    /// Addresses the UDP listeners are bound to.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// Addresses the TCP listeners are bound to.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Stops every loop and connection and waits for them to publish their
    /// last counters.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(e) = task.await
                && e.is_panic()
            {
                warn!("a CDX task panicked: {e}");
            }
        }
    }
}

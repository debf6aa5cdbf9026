//! The relay host: data-plane loops that drive the sans-IO core on real
//! sockets.
//!
//! One loop per core, each a plain thread with its own `mio` poller, its own
//! [`Server`] and its own sockets: the TURN listeners are bound once per loop
//! with SO_REUSEPORT (the kernel spreads clients by flow hash, so a client
//! always reaches the same loop). Nothing on the packet path is shared
//! between loops: no lock, no channel, no allocation. The relay port pool is
//! shared, behind a lock taken only when an allocation starts or ends.
//! Control reaches a loop through its waker and an atomic flag, checked
//! between batches.

mod dtls;
mod event_loop;
mod handoff;
mod mobility;
mod sealed;
mod stream;
mod tcp_relay;

pub use handoff::Handoff;

use crate::tls::TlsReloader;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use natrix_net::{
    StunServiceFactory, SyncUdp, UdpOptions, bind_udp, ensure_tcp_free, ensure_udp_free,
};
use natrix_telemetry::Telemetry;
use tracing::{info, warn};

use crate::config::{HostConfig, RelayConfig};
use crate::control::{Control, ReloadActor, SecretSource};
use crate::core::{Server, SharedPorts};
use crate::metrics::RelayMetrics;

/// What a host carries on its listeners.
#[derive(Clone)]
pub struct HostServices {
    /// A STUN service (CDX): Binding and the exchange on TURN's
    /// listeners, everything on listeners bound with
    /// [`BoundHost::bind_service_udp`].
    pub stun: Option<StunServiceFactory>,
    /// TURN, with the relay's settings. Without it (`natrix cdx`) every
    /// packet goes to the STUN service and the host's TURN series are not
    /// exported.
    pub turn: Option<RelayConfig>,
}

impl std::fmt::Debug for HostServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostServices")
            .field("stun", &self.stun.is_some())
            .field("turn", &self.turn.is_some())
            .finish()
    }
}

/// True for messages a STUN service takes on TURN's listeners: STUN Binding and the
/// exchange methods (any class), and anything without the RFC 5389 magic
/// cookie.
#[inline]
pub(crate) fn is_binding(packet: &[u8]) -> bool {
    use natrix_wire::Method;
    // STUN's first two bits are zero (ChannelData starts 0b01).
    if packet.len() < 20 || packet[0] & 0xC0 != 0 {
        return false;
    }
    let t = u16::from_be_bytes([packet[0], packet[1]]);
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    method == Method::BINDING.value()
        || method == Method::EXCHANGE_POST.value()
        || method == Method::EXCHANGE_DELIVER.value()
        || packet[4..8] != natrix_wire::MAGIC_COOKIE.to_be_bytes()
}

/// A running relay: its loops and how to stop them.
#[derive(Debug)]
pub struct RelayHost {
    loops: Vec<(JoinHandle<Option<handoff::FrozenLoop>>, Arc<mio::Waker>)>,
    stop: Arc<AtomicBool>,
    freeze: Arc<AtomicBool>,
    udp: Vec<SocketAddr>,
    service_udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    dtls: Vec<SocketAddr>,
    tls_config: Option<Arc<TlsReloader>>,
    control: Arc<Control>,
    secrets: Option<SecretSource>,
    /// A clone of the first loop's socket per UDP listener (TURN's, then
    /// the service's), for senders outside the loops (the exchange actor).
    udp_clones: Vec<std::net::UdpSocket>,
    /// Credentials from the command line, rebuilt around rotated secrets.
    base_credentials: crate::core::Credentials,
    /// The receiving end of the usage records, until the writer takes it.
    usage_records: std::sync::Mutex<Option<std::sync::mpsc::Receiver<crate::core::UsageRecord>>>,
}

/// The XDP fast path on `config.xdp`'s interfaces.
fn attach_xdp(config: &RelayConfig) -> anyhow::Result<crate::xdp::Xdp> {
    if config.relay_bind_v4().is_unspecified() {
        // Peers' datagrams are matched by the relayed address they reach.
        anyhow::bail!(
            "relayed sockets bind the wildcard address: the program matches peers' datagrams \
             by the relayed address they reach (give --relay-ip)"
        );
    }
    crate::xdp::Xdp::attach(&config.xdp)
}

/// Binds a TCP listener that several loops share (SO_REUSEPORT).
fn bind_shared_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = tcp_relay::shared_tcp_socket(addr)?;
    s.listen(1024)?;
    Ok(s.into())
}

/// The sockets of one loop.
#[derive(Debug, Default)]
struct LoopSockets {
    udp: Vec<SyncUdp>,
    tcp: Vec<std::net::TcpListener>,
    tls: Vec<std::net::TcpListener>,
    dtls: Vec<SyncUdp>,
}

/// A host whose listeners are bound (so a taken port fails the start
/// before anything runs) and whose loops have not started yet.
#[derive(Debug)]
pub struct BoundHost {
    config: HostConfig,
    shards: Vec<LoopSockets>,
    udp: Vec<SocketAddr>,
    service_udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    dtls: Vec<SocketAddr>,
    tls_config: Option<Arc<TlsReloader>>,
    udp_clones: Vec<std::net::UdpSocket>,
    /// Per shard, what a predecessor handed over: UDP allocations and their
    /// relayed sockets (empty when the host was bound fresh).
    moved: Vec<handoff::FrozenState>,
}

impl BoundHost {
    /// True when this host took its sockets over from a predecessor (its
    /// STUN service's own listeners came with them).
    pub fn resumed(&self) -> bool {
        !self.moved.is_empty()
    }

    /// The bound TURN (or, without TURN, the service's own) UDP listeners.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// Binds UDP on `requested` and, with `tcp`, TCP on the same port (as
    /// clients expect). With port 0 the kernel picks the UDP port; when its
    /// TCP twin is taken by another process, another port is picked.
    fn bind_udp_and_tcp(
        &mut self,
        requested: SocketAddr,
        tcp: bool,
    ) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
        const PICKS: usize = 8;
        for pick in 1..=PICKS {
            let udp = bind_udp_everywhere(&mut self.shards, requested, &mut self.udp_clones)?;
            if !tcp {
                return Ok((udp, None));
            }
            let twin = SocketAddr::new(requested.ip(), udp.port());
            match bind_tcp_everywhere(&mut self.shards, twin, false) {
                Ok(addr) => return Ok((udp, Some(addr))),
                Err(e) if requested.port() == 0 && pick < PICKS => {
                    warn!(port = udp.port(), error = %format!("{e:#}"), "the TCP twin of a picked UDP port is taken; picking another");
                    let bound_tcp = self.tcp.len();
                    for shard in &mut self.shards {
                        shard.udp.pop();
                        shard.tcp.truncate(bound_tcp);
                    }
                    self.udp_clones.pop();
                }
                Err(e) => return Err(e),
            }
        }
        anyhow::bail!("no free UDP and TCP port pair for {requested}")
    }

    /// Binds UDP listeners that serve only the STUN service (RFC 5780's
    /// alternate cells), one socket per loop each; returns their bound
    /// addresses.
    pub fn bind_service_udp(&mut self, addrs: &[SocketAddr]) -> anyhow::Result<Vec<SocketAddr>> {
        let mut bound = Vec::new();
        for &requested in addrs {
            let addr = bind_udp_everywhere(&mut self.shards, requested, &mut self.udp_clones)?;
            self.service_udp.push(addr);
            bound.push(addr);
        }
        Ok(bound)
    }

    /// Starts one loop per shard with `services`.
    pub fn start(self, telemetry: &Telemetry, services: HostServices) -> anyhow::Result<RelayHost> {
        let turn = services.turn.as_ref();
        let mut parts = TurnParts::new(turn, telemetry)?;
        if let Some(c) = turn.filter(|c| {
            c.permission_lifetime < Duration::from_secs(300)
                || c.channel_lifetime < Duration::from_secs(600)
        }) {
            tracing::warn!(
                permission_lifetime = ?c.permission_lifetime,
                channel_lifetime = ?c.channel_lifetime,
                "permissions or channels shorter than RFC 8656's 5 and 10 minutes: clients refresh on the RFC's schedule and lose them in between (meant for tests and labs)"
            );
        }
        let xdp = match turn.filter(|c| !c.xdp.is_empty()) {
            Some(c) => match attach_xdp(c) {
                Ok(x) => {
                    info!(interfaces = ?c.xdp, ipv6 = x.ipv6, "XDP fast path attached: channel data relayed in the driver's hook");
                    if !x.ipv6 && c.relay_ipv6.is_some() {
                        tracing::warn!(interfaces = ?c.xdp, "IPv6 forwarding is off on an XDP interface: IPv6 channel data stays in userspace (sysctl -w net.ipv6.conf.IFACE.forwarding=1 to relay it in the kernel too)");
                    }
                    parts.server_config.fast_path = true;
                    Some(Arc::new(std::sync::Mutex::new(x)))
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), interfaces = ?c.xdp, "XDP fast path unavailable: relaying in userspace");
                    None
                }
            },
            None => None,
        };
        let loops = self.shards.len();
        if let Some(config) = turn {
            config.check_multiplex_ports(loops)?;
        }
        let ports = SharedPorts::new(parts.ports);
        // One ban table for the host: a source's retries reach any loop.
        let bans = crate::core::SharedBans::new(parts.server_config.bans.clone());
        // Usage records: a queue from the loops to the writer.
        let (usage, usage_records) = match turn.map(|c| c.usage_sinks().any()) {
            Some(true) => {
                let (q, rx) = crate::usage::queue();
                (Some(q), Some(rx))
            }
            _ => (None, None),
        };
        let control = Arc::new(Control::new(
            parts.credentials.clone(),
            loops,
            ports.clone(),
            usage,
        ));
        let secrets = turn
            .and_then(|c| c.auth_secret_file.as_ref())
            .map(|path| SecretSource { path: path.clone() });
        let stop = Arc::new(AtomicBool::new(false));
        let freeze = Arc::new(AtomicBool::new(false));
        let mut moved = self.moved.into_iter();
        let mut resumed = 0;
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let turn_udp = if turn.is_some() { self.udp.len() } else { 0 };
        let mut handles = Vec::new();
        let mobility = mobility::Mobility::host(loops, &control);
        // TLS listeners shared with HTTPS: the front that answers it.
        let https = match (&self.config.https, &self.tls_config) {
            (Some(route), Some(tls)) if !self.tls.is_empty() => {
                info!(backend = %route.backend, tls = ?self.tls, "TLS listeners pass HTTPS to the backend");
                Some(crate::https::start(route.clone(), tls.clone(), telemetry)?)
            }
            _ => None,
        };
        for ((shard, sockets), mobility) in self.shards.into_iter().enumerate().zip(mobility) {
            let LoopSockets {
                udp,
                tcp,
                tls,
                dtls,
            } = sockets;
            let handed = moved.next();
            let seed = handed.as_ref().map_or_else(rand::random, |h| h.moved.seed);
            let multiplex = turn.map_or_else(Vec::new, |c| c.multiplex_ports_of(shard, loops));
            let (mut event_loop, waker) = event_loop::EventLoop::new(
                parts.core(&ports, &bans, unix_now, seed, multiplex),
                event_loop::Listeners {
                    udp,
                    turn_udp,
                    turn: turn.is_some(),
                    tcp,
                    tls,
                    dtls,
                },
                self.tls_config.clone(),
                parts.metrics.clone(),
                stop.clone(),
                services.stun.clone(),
                event_loop::LoopSettings {
                    control: control.clone(),
                    freeze: freeze.clone(),
                    shard,
                    max_streams: self.config.max_connections.div_ceil(loops).max(1),
                    max_streams_per_ip: self.config.max_connections_per_ip.div_ceil(loops).max(1),
                    idle_timeout: self.config.idle_timeout,
                    proxy_from: self.config.proxy_from.clone(),
                    https: https.clone(),
                    mobility,
                    xdp: xdp.clone(),
                },
            )
            .context("setting up a relay loop")?;
            event_loop
                .core_mut()
                .set_shard(u16::try_from(shard).unwrap_or(u16::MAX));
            if let Some(handoff::FrozenState {
                moved: m,
                relays,
                streams,
            }) = handed
            {
                let ids = event_loop.core_mut().import(&m, Instant::now());
                let kept: Vec<_> = m
                    .allocations
                    .iter()
                    .filter(|a| ids.iter().any(|id| id.index() == a.slot as usize))
                    .map(|a| a.client)
                    .collect();
                event_loop.adopt_streams(&kept, streams);
                resumed += ids.len();
                if ids.len() < m.allocations.len() {
                    warn!(
                        shard,
                        handed = m.allocations.len(),
                        taken = ids.len(),
                        "some handed-over allocations did not fit (another port range?): they end"
                    );
                }
                event_loop
                    .adopt_relays(relays)
                    .context("taking over relayed sockets")?;
            }
            control.add_waker(waker.clone());
            let handle = std::thread::Builder::new()
                .name(format!("natrix-relay-{shard}"))
                .spawn(move || event_loop.run())
                .context("spawning a relay loop")?;
            handles.push((handle, waker));
        }
        if let Some(config) = turn {
            info!(udp = ?self.udp, tcp = ?self.tcp, tls = ?self.tls, dtls = ?self.dtls, loops, external_ip = %config.external_v4(), ports = %config.ports, "TURN relay serving");
        }
        if resumed > 0 {
            info!(
                allocations = resumed,
                "took over the allocations of the previous binary"
            );
        }
        Ok(RelayHost {
            loops: handles,
            stop,
            freeze,
            udp: self.udp,
            service_udp: self.service_udp,
            tcp: self.tcp,
            tls: self.tls,
            dtls: self.dtls,
            tls_config: self.tls_config,
            control,
            secrets,
            udp_clones: self.udp_clones,
            base_credentials: parts.base_credentials,
            usage_records: std::sync::Mutex::new(usage_records),
        })
    }
}

/// What the loops' cores are built from: the relay's settings, or inert
/// defaults on a host without TURN.
struct TurnParts {
    credentials: crate::core::Credentials,
    base_credentials: crate::core::Credentials,
    metrics: RelayMetrics,
    server_config: crate::core::ServerConfig,
    policy: crate::core::PeerPolicy,
    ports: crate::core::PortRange,
}

impl TurnParts {
    /// A loop's TURN core with `seed` (random, or a predecessor's).
    fn core(
        &self,
        ports: &SharedPorts,
        bans: &crate::core::SharedBans,
        unix_now: u64,
        seed: [u8; 32],
        multiplex_ports: Vec<u16>,
    ) -> Server {
        let mut config = self.server_config.clone();
        config.multiplex_ports = multiplex_ports;
        let mut core = Server::new(
            config,
            self.credentials.clone(),
            self.policy.clone(),
            ports.clone(),
            Instant::now(),
            unix_now,
            seed,
        );
        core.set_bans(bans.clone());
        core
    }

    fn new(turn: Option<&RelayConfig>, telemetry: &Telemetry) -> anyhow::Result<TurnParts> {
        let Some(config) = turn else {
            // Without TURN the host's TURN series stay out of the
            // exposition: a CDX node shows no relay capacity or connections.
            return Ok(TurnParts {
                credentials: Default::default(),
                base_credentials: Default::default(),
                metrics: RelayMetrics::new(&Telemetry::new(env!("CARGO_PKG_VERSION"))),
                server_config: Default::default(),
                policy: Default::default(),
                ports: Default::default(),
            });
        };
        telemetry
            .gauge(&natrix_telemetry::catalogue::RELAY_ALLOCATION_CAPACITY)
            .set(i64::try_from(config.capacity()).unwrap_or(i64::MAX));
        Ok(TurnParts {
            credentials: config.credentials().map_err(anyhow::Error::msg)?,
            base_credentials: config.base_credentials().map_err(anyhow::Error::msg)?,
            metrics: RelayMetrics::new(telemetry),
            server_config: config.server_config(),
            policy: config.policy(),
            ports: config.ports,
        })
    }
}

/// Binds `requested` on every loop (SO_REUSEPORT; port 0: the first loop
/// picks, the others join it) and keeps a clone of the first socket.
fn bind_udp_everywhere(
    shards: &mut [LoopSockets],
    requested: SocketAddr,
    clones: &mut Vec<std::net::UdpSocket>,
) -> anyhow::Result<SocketAddr> {
    ensure_udp_free(requested).with_context(|| format!("binding UDP on {requested}"))?;
    let mut addr = requested;
    for (shard, sockets) in shards.iter_mut().enumerate() {
        let socket = bind_udp(addr, &UdpOptions::default())
            .with_context(|| format!("binding UDP on {addr}"))?;
        let socket = SyncUdp::new(socket).with_context(|| format!("configuring UDP on {addr}"))?;
        if shard == 0 {
            addr = socket.local_addr();
            clones.push(
                socket
                    .socket()
                    .try_clone()
                    .with_context(|| format!("cloning UDP socket {addr}"))?,
            );
        }
        sockets.udp.push(socket);
    }
    Ok(addr)
}

/// Binds `requested` as a DTLS listener (UDP) on every loop.
fn bind_dtls_everywhere(
    shards: &mut [LoopSockets],
    requested: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    ensure_udp_free(requested).with_context(|| format!("binding DTLS on {requested}"))?;
    let mut addr = requested;
    for (shard, sockets) in shards.iter_mut().enumerate() {
        let socket = bind_udp(addr, &UdpOptions::default())
            .with_context(|| format!("binding DTLS on {addr}"))?;
        let socket = SyncUdp::new(socket).with_context(|| format!("configuring UDP on {addr}"))?;
        if shard == 0 {
            addr = socket.local_addr();
        }
        sockets.dtls.push(socket);
    }
    Ok(addr)
}

/// Binds `requested` as a TCP listener on every loop.
fn bind_tcp_everywhere(
    shards: &mut [LoopSockets],
    requested: SocketAddr,
    tls: bool,
) -> anyhow::Result<SocketAddr> {
    let what = if tls { "TLS" } else { "TCP" };
    ensure_tcp_free(requested).with_context(|| format!("binding {what} on {requested}"))?;
    let mut addr = requested;
    for (shard, sockets) in shards.iter_mut().enumerate() {
        let listener =
            bind_shared_tcp(addr).with_context(|| format!("binding {what} on {addr}"))?;
        if shard == 0 {
            addr = listener.local_addr()?;
        }
        if tls {
            sockets.tls.push(listener);
        } else {
            sockets.tcp.push(listener);
        }
    }
    Ok(addr)
}

/// What a host needs before its sockets, bound or taken over: the open-file
/// limit raised, and the TLS certificate loaded when it serves TLS.
fn prepare(config: &HostConfig) -> anyhow::Result<Option<Arc<TlsReloader>>> {
    if !natrix_net::raise_fd_limit() {
        warn!("could not raise the open-file limit; allocations may fail early");
    }
    Ok(match &config.tls {
        Some((cert, key)) => Some(Arc::new(TlsReloader::load(
            cert,
            key,
            !config.dtls_listen.is_empty(),
        )?)),
        None if !config.dtls_listen.is_empty() => {
            anyhow::bail!("DTLS (--dtls-listen) needs a certificate: give --tls-cert and --tls-key")
        }
        None => None,
    })
}

impl RelayHost {
    /// Binds every listener of `config` for `loops` loops: UDP on each
    /// `listen` address, TCP on the same port when enabled, TLS on each
    /// `tls_listen` address with a certificate. An IPv6 wildcard on a host
    /// without IPv6 is skipped with a warning.
    pub fn bind(config: &HostConfig, loops: usize) -> anyhow::Result<BoundHost> {
        let loops = loops.max(1);
        let tls_config = prepare(config)?;
        let mut host = BoundHost {
            config: config.clone(),
            shards: (0..loops).map(|_| LoopSockets::default()).collect(),
            udp: Vec::new(),
            service_udp: Vec::new(),
            tcp: Vec::new(),
            tls: Vec::new(),
            dtls: Vec::new(),
            tls_config,
            udp_clones: Vec::new(),
            moved: Vec::new(),
        };
        let usable = |a: &&SocketAddr| {
            let skip = natrix_net::ipv6_unavailable(**a);
            if skip {
                warn!(listen = %a, "IPv6 unavailable; skipping this listener");
            }
            !skip
        };
        if host.tls_config.is_some() {
            for requested in config.tls_listen.iter().filter(usable) {
                let addr = bind_tcp_everywhere(&mut host.shards, *requested, true)?;
                host.tls.push(addr);
            }
        }
        if host.tls_config.is_some() {
            for requested in config.dtls_listen.iter().filter(usable) {
                let addr = bind_dtls_everywhere(&mut host.shards, *requested)?;
                host.dtls.push(addr);
            }
        }
        for requested in config.listen.iter().filter(usable) {
            let (udp, tcp) = host.bind_udp_and_tcp(*requested, config.tcp)?;
            host.udp.push(udp);
            host.tcp.extend(tcp);
        }
        if host.udp.is_empty() && host.tcp.is_empty() && host.tls.is_empty() {
            anyhow::bail!("no listener could be bound");
        }
        Ok(host)
    }

    /// Binds the listeners of `config` and starts `loops` loops relaying
    /// TURN, with `stun` beside it.
    pub fn start(
        config: &RelayConfig,
        loops: usize,
        telemetry: &Telemetry,
        stun: Option<StunServiceFactory>,
    ) -> anyhow::Result<RelayHost> {
        Self::bind(&config.host(), loops)?.start(
            telemetry,
            HostServices {
                stun,
                turn: Some(config.clone()),
            },
        )
    }

    /// Clones of the UDP listener sockets (same address and port), with
    /// their bound addresses: for a sender outside the loops, such as the
    /// exchange actor answering on the relay's listener in `natrix up`.
    pub fn udp_socket_clones(&self) -> std::io::Result<Vec<(SocketAddr, std::net::UdpSocket)>> {
        self.udp_clones
            .iter()
            .map(|s| Ok((s.local_addr()?, s.try_clone()?)))
            .collect()
    }

    /// The bound UDP listener addresses (TURN's, or without TURN the
    /// service's primary ones).
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// The UDP listeners bound for the STUN service alone (RFC 5780 cells).
    pub fn service_udp_addrs(&self) -> &[SocketAddr] {
        &self.service_udp
    }

    /// The bound TCP listener addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// The bound TLS listener addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }

    /// The bound DTLS listener addresses (UDP).
    pub fn dtls_addrs(&self) -> &[SocketAddr] {
        &self.dtls
    }

    /// The usage records the loops produce (once: the writer owns them),
    /// when the relay keeps them (`--usage-file`, `--usage-stream`).
    pub fn usage_records(&self) -> Option<std::sync::mpsc::Receiver<crate::core::UsageRecord>> {
        self.usage_records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The control-plane handle: drain, credentials, live allocations.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The actor that reloads certificates and secrets; start it in an
    /// actix system (send it [`crate::control::Reload`] on SIGHUP).
    pub fn reload_actor(&self) -> ReloadActor {
        ReloadActor::new(
            self.control.clone(),
            self.tls_config.clone(),
            self.secrets.clone(),
            self.base_credentials.clone(),
        )
    }

    /// Takes over the sockets and UDP allocations a predecessor handed
    /// over, instead of binding: the host then starts as [`BoundHost::start`]
    /// does and goes on serving them.
    pub fn adopt(config: &HostConfig, handoff: Handoff) -> anyhow::Result<BoundHost> {
        let tls_config = prepare(config)?;
        let mut shards = Vec::new();
        let mut moved = Vec::new();
        for l in handoff.loops {
            let udp = l
                .udp
                .into_iter()
                .map(|fd| SyncUdp::new(std::net::UdpSocket::from(fd)))
                .collect::<std::io::Result<Vec<_>>>()
                .context("taking over UDP listeners")?;
            let tcp = l.tcp.into_iter().map(std::net::TcpListener::from).collect();
            let tls = l.tls.into_iter().map(std::net::TcpListener::from).collect();
            let dtls = l
                .dtls
                .into_iter()
                .map(|fd| SyncUdp::new(std::net::UdpSocket::from(fd)))
                .collect::<std::io::Result<Vec<_>>>()
                .context("taking over DTLS listeners")?;
            shards.push(LoopSockets {
                udp,
                tcp,
                tls,
                dtls,
            });
            moved.push(handoff::FrozenState {
                moved: l.moved,
                relays: l.relays,
                streams: l.streams,
            });
        }
        let udp_clones = shards
            .first()
            .map(|s| {
                s.udp
                    .iter()
                    .map(|u| u.socket().try_clone())
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(BoundHost {
            config: config.clone(),
            shards,
            udp: handoff.udp,
            service_udp: handoff.service_udp,
            tcp: handoff.tcp,
            tls: handoff.tls,
            dtls: handoff.dtls,
            tls_config,
            udp_clones,
            moved,
        })
    }

    /// Freezes every loop between batches and collects what a successor
    /// needs (see [`Handoff`]): every listener, UDP allocations, and TCP and
    /// TLS 1.3 connections with theirs. A connection that cannot move (TLS
    /// 1.2, a handshake in progress) ends here with its allocation.
    pub fn freeze(self) -> anyhow::Result<Handoff> {
        self.freeze.store(true, Ordering::SeqCst);
        for (_, waker) in &self.loops {
            let _ = waker.wake();
        }
        let mut loops = Vec::new();
        for (handle, _) in self.loops {
            match handle.join() {
                Ok(Some(frozen)) => loops.push(frozen),
                Ok(None) => anyhow::bail!("a relay loop stopped instead of freezing"),
                Err(_) => anyhow::bail!("a relay loop panicked"),
            }
        }
        Ok(Handoff {
            loops,
            udp: self.udp,
            service_udp: self.service_udp,
            tcp: self.tcp,
            tls: self.tls,
            dtls: self.dtls,
        })
    }

    /// Stops every loop and waits for them.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, waker) in &self.loops {
            let _ = waker.wake();
        }
        for (handle, _) in self.loops {
            if handle.join().is_err() {
                warn!("a relay loop panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_binding;
    use natrix_wire::{Class, Encoder, MessageType, Method, TransactionId};

    fn message(method: Method, class: Class) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        let enc = Encoder::new(
            &mut buf,
            MessageType::new(method, class),
            &TransactionId([1; 12]),
        )
        .expect("a header fits");
        let n = enc.finish();
        buf.truncate(n);
        buf
    }

    #[test]
    fn the_delegate_gets_binding_and_exchange_messages_and_nothing_of_turn() {
        for (m, c) in [
            (Method::BINDING, Class::Request),
            (Method::BINDING, Class::Indication),
            (Method::EXCHANGE_POST, Class::Request),
            (Method::EXCHANGE_DELIVER, Class::Success),
        ] {
            assert!(is_binding(&message(m, c)), "{m:?} {c:?}");
        }
        for m in [
            Method::ALLOCATE,
            Method::REFRESH,
            Method::SEND,
            Method::CHANNEL_BIND,
        ] {
            assert!(!is_binding(&message(m, Class::Request)), "{m:?}");
        }
        let mut channel_data = vec![0x40, 0x00, 0x00, 0x10];
        channel_data.extend_from_slice(&[0; 16]);
        assert!(!is_binding(&channel_data));
    }
}

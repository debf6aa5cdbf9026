//! CDX on a packet host's loops: the one packet path of the role.
//!
//! [`CdxService`] is the [`StunService`] the relay host's loops carry, in
//! `natrix cdx` (a host without TURN: every packet is CDX's) as in
//! `natrix up` (Binding and the exchange on TURN's listener). Per packet it
//! runs the chain: a sibling's hand-off, the exchange (to the actor, never
//! waited for), the Binding responder with RFC 5780 routing, the caps on
//! unauthenticated answers. [`Layout`] is where the RFC 5780 cells of each
//! primary listener sit, decided from the addresses the host bound.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use natrix_model::ClusterSecret;
use natrix_model::limiter::{UnauthLimiter, UnauthLimits};
use natrix_net::{
    Answer, Arrival, ConnId, HostEvent, LoopContext, StreamMailbox, StunService, StunServiceFactory,
};
use natrix_telemetry::Telemetry;
use prometheus::IntCounter;
use tracing::info;

use crate::binding::{BindingResponder, DropReason, Grid, Outcome, Site, Transport, Via};
use crate::exchange::{ExchangeSender, Local, StreamReply, is_exchange};
use crate::metrics::{CdxMetrics, ExchangeMetrics, LoopCounters};
use crate::{CdxConfig, Sibling, handoff};

/// What the CDX service answers with and how, whichever command runs it.
#[derive(Clone, Debug)]
pub struct StunSettings {
    /// SOFTWARE in answers (empty: none).
    pub software: String,
    /// Caps on UDP answers per source prefix and in total, per loop.
    pub limits: UnauthLimits,
    /// RFC 5780: the alternate port on each listener's IP.
    pub alternate_port: Option<u16>,
    /// RFC 5780: a second IP of this host.
    pub alternate_ip: Option<IpAddr>,
    /// RFC 5780 across two one-IP nodes.
    pub sibling: Option<Sibling>,
    /// The public IP of the listen address (behind a 1:1 NAT).
    pub advertise_ip: Option<IpAddr>,
    /// The public IP of the alternate IP or of the sibling.
    pub alternate_advertise_ip: Option<IpAddr>,
    /// The cluster secret (hand-offs between siblings).
    pub cluster_secret: Option<ClusterSecret>,
    /// The service owns the host's listeners (`natrix cdx`): it counts
    /// their connections (beside TURN the relay does). Failed sends of its
    /// own answers it counts either way.
    pub owns_listeners: bool,
}

impl StunSettings {
    /// True when RFC 5780 discovery is on.
    fn rfc5780(&self) -> bool {
        self.alternate_port.is_some() || self.alternate_ip.is_some() || self.sibling.is_some()
    }
}

impl CdxConfig {
    /// The service settings of `natrix cdx`.
    pub fn stun_settings(&self) -> StunSettings {
        StunSettings {
            software: self.software.clone(),
            limits: self.limits(),
            alternate_port: self.alternate_port,
            alternate_ip: self.alternate_ip,
            sibling: self.sibling,
            advertise_ip: self.advertise_ip,
            alternate_advertise_ip: self.alternate_advertise_ip,
            cluster_secret: self.cluster_secret.clone(),
            owns_listeners: true,
        }
    }
}

/// A run-time pairing: the grid with the sibling's IP, and the hand-off
/// peer.
#[derive(Debug)]
struct Paired {
    grid: Grid,
    handoff: Option<Arc<HandoffPeer>>,
}

/// The sibling node that serves this node's change-IP requests.
#[derive(Debug)]
struct HandoffPeer {
    key: ring::hmac::Key,
    /// The sibling's primary STUN address.
    sibling: SocketAddr,
    sent: IntCounter,
    answered: IntCounter,
    rejected: IntCounter,
}

impl HandoffPeer {
    fn new(key: &ring::hmac::Key, sibling: SocketAddr, metrics: &CdxMetrics) -> HandoffPeer {
        HandoffPeer {
            key: key.clone(),
            sibling,
            sent: metrics.handoffs_sent.clone(),
            answered: metrics.handoffs_answered.clone(),
            rejected: metrics.handoffs_rejected.clone(),
        }
    }
}

/// One primary listener's RFC 5780 grid and how it is paired.
#[derive(Clone, Debug)]
struct Primary {
    addr: SocketAddr,
    grid: Grid,
    handoff: Option<Arc<HandoffPeer>>,
    /// With `--stun-sibling auto`: the pairing, changed at run time.
    dynamic: Option<Arc<arc_swap::ArcSwap<Paired>>>,
}

/// Where the RFC 5780 cells of each primary listener sit.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    primaries: Vec<Primary>,
    /// The hand-off key and counters, for pairings made at run time.
    pairing: Option<(ring::hmac::Key, CdxMetrics)>,
}

impl Layout {
    /// Plans the grids of the `bound` primary listeners. Fails when RFC
    /// 5780 is asked of a wildcard address (RESPONSE-ORIGIN and
    /// OTHER-ADDRESS must name real addresses) or of siblings without the
    /// cluster secret (hand-offs must be authenticated).
    pub fn plan(
        settings: &StunSettings,
        bound: &[SocketAddr],
        telemetry: &Telemetry,
    ) -> anyhow::Result<Layout> {
        let mut layout = Layout::default();
        if !settings.rfc5780() {
            return Ok(layout);
        }
        let key = match (&settings.sibling, &settings.cluster_secret) {
            (Some(_), Some(secret)) => Some(handoff::key(secret.bytes())),
            (Some(_), None) => anyhow::bail!(
                "--stun-sibling needs --cluster-secret (the same on both nodes): hand-offs must be authenticated"
            ),
            (None, _) => None,
        };
        let metrics = CdxMetrics::new(telemetry);
        for &addr in bound {
            if addr.ip().is_unspecified() {
                anyhow::bail!(
                    "RFC 5780 (--stun-alternate-port/--stun-alternate-ip/--stun-sibling) needs specific listen addresses (got {addr}): RESPONSE-ORIGIN and OTHER-ADDRESS must name real addresses"
                );
            }
            let same_family = |ip: Option<IpAddr>| ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4());
            let sibling = same_family(settings.sibling.and_then(Sibling::ip));
            let alt_ip = same_family(settings.alternate_ip).or(sibling);
            let ips = [addr.ip(), alt_ip.unwrap_or(addr.ip())];
            let own_public = same_family(settings.advertise_ip).unwrap_or(ips[0]);
            let advertised = [
                own_public,
                match alt_ip {
                    Some(_) => same_family(settings.alternate_advertise_ip).unwrap_or(ips[1]),
                    None => own_public,
                },
            ];
            let grid = Grid {
                ips,
                advertised,
                ports: [addr.port(), settings.alternate_port.unwrap_or(addr.port())],
                alt_ip: alt_ip.is_some(),
                alt_port: settings.alternate_port.is_some(),
                sibling: sibling.is_some(),
            };
            let handoff = match (&key, sibling) {
                (Some(key), Some(ip)) => Some(Arc::new(HandoffPeer::new(
                    key,
                    SocketAddr::new(ip, addr.port()),
                    &metrics,
                ))),
                _ => None,
            };
            let dynamic = (settings.sibling == Some(Sibling::Auto) && key.is_some()).then(|| {
                Arc::new(arc_swap::ArcSwap::from_pointee(Paired {
                    grid,
                    handoff: None,
                }))
            });
            if let (Some(key), Some(_)) = (&key, &dynamic) {
                layout.pairing = Some((key.clone(), metrics.clone()));
            }
            info!(cells = ?grid.cells().map(|v| grid.addr(v)).collect::<Vec<_>>(), "RFC 5780 NAT discovery on");
            layout.primaries.push(Primary {
                addr,
                grid,
                handoff,
                dynamic,
            });
        }
        Ok(layout)
    }

    /// The cells this host serves besides the primaries: the listeners to
    /// bind for the service alone.
    pub fn cells_to_bind(&self) -> Vec<SocketAddr> {
        self.primaries
            .iter()
            .flat_map(|p| {
                p.grid
                    .cells()
                    .filter(|v| p.grid.is_local(*v) && *v != Via::default())
                    .map(|v| p.grid.addr(v))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The grid of each primary address.
    pub fn grids(&self) -> Vec<(SocketAddr, Grid)> {
        self.primaries.iter().map(|p| (p.addr, p.grid)).collect()
    }

    /// With `--stun-sibling auto`: the handle that sets siblings.
    pub fn siblings(&self) -> Option<SiblingHandle> {
        let (key, metrics) = self.pairing.as_ref()?;
        let pairings: Vec<_> = self
            .primaries
            .iter()
            .filter_map(|p| {
                Some(Pairing {
                    primary: p.addr,
                    base: p.grid,
                    key: key.clone(),
                    metrics: metrics.clone(),
                    cell: p.dynamic.clone()?,
                    current: std::sync::Mutex::new(None),
                })
            })
            .collect();
        (!pairings.is_empty()).then(|| SiblingHandle(Arc::new(pairings)))
    }

    /// Where each local address sits: its primary's index and its cell.
    fn sites(&self) -> HashMap<SocketAddr, (usize, Via)> {
        let mut sites = HashMap::new();
        for (i, p) in self.primaries.iter().enumerate() {
            for via in p.grid.cells().filter(|v| p.grid.is_local(*v)) {
                sites.insert(p.grid.addr(via), (i, via));
            }
        }
        sites
    }
}

/// Sets the RFC 5780 siblings of a node started with
/// `--stun-sibling auto` (cheap to clone; the loops see a change from their
/// next packet).
#[derive(Clone, Debug)]
pub struct SiblingHandle(Arc<Vec<Pairing>>);

/// A listener whose RFC 5780 sibling is chosen at run time.
#[derive(Debug)]
struct Pairing {
    primary: SocketAddr,
    base: Grid,
    key: ring::hmac::Key,
    metrics: CdxMetrics,
    cell: Arc<arc_swap::ArcSwap<Paired>>,
    current: std::sync::Mutex<Option<(IpAddr, SocketAddr)>>,
}

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
            None => Paired {
                grid: p.base,
                handoff: None,
            },
            Some((public, internal)) => {
                let mut grid = p.base;
                grid.ips[1] = internal.ip();
                grid.advertised[1] = public;
                grid.alt_ip = true;
                grid.sibling = true;
                Paired {
                    grid,
                    handoff: Some(Arc::new(HandoffPeer::new(&p.key, internal, &p.metrics))),
                }
            }
        };
        p.cell.store(Arc::new(paired));
        info!(%primary, sibling = ?sibling, "RFC 5780 sibling changed");
        true
    }
}

/// Makes the service of each loop.
pub fn factory(
    settings: &StunSettings,
    layout: &Layout,
    exchange: ExchangeSender,
    telemetry: &Telemetry,
) -> StunServiceFactory {
    let responder = Arc::new(BindingResponder::new(Some(settings.software.clone())));
    let metrics = CdxMetrics::new(telemetry);
    let overloaded = ExchangeMetrics::new(telemetry).post("overloaded").clone();
    let limits = settings.limits;
    let owns = settings.owns_listeners;
    let primaries = layout.primaries.clone();
    let sites = layout.sites();
    Arc::new(move |cx: LoopContext| {
        Box::new(CdxService {
            responder: responder.clone(),
            udp: metrics.local(Transport::Udp),
            tcp: metrics.local(Transport::Tcp),
            metrics: metrics.clone(),
            limiter: UnauthLimiter::new(limits, Instant::now()),
            exchange: exchange.clone(),
            overloaded: overloaded.clone(),
            mailbox: cx.mailbox,
            exchanged: HashSet::new(),
            primaries: primaries.clone(),
            sites: sites.clone(),
            owns,
        }) as Box<dyn StunService>
    })
}

/// CDX in one loop.
struct CdxService {
    responder: Arc<BindingResponder>,
    udp: LoopCounters,
    tcp: LoopCounters,
    metrics: CdxMetrics,
    /// Caps on UDP answers (TCP sources cannot be spoofed).
    limiter: UnauthLimiter,
    exchange: ExchangeSender,
    /// Exchange messages dropped because the actor is behind.
    overloaded: IntCounter,
    /// This loop's mailbox, for the exchange's frames on connections.
    mailbox: StreamMailbox,
    /// Connections that posted to the exchange (told to the actor when
    /// they close).
    exchanged: HashSet<ConnId>,
    primaries: Vec<Primary>,
    /// Every local RFC 5780 address: its primary and its cell.
    sites: HashMap<SocketAddr, (usize, Via)>,
    owns: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl CdxService {
    /// The RFC 5780 site of the listener bound to `bound`, and the sibling
    /// that serves its change-IP requests.
    #[inline]
    fn site(&self, bound: SocketAddr) -> Option<(Site, Option<Arc<HandoffPeer>>)> {
        if self.sites.is_empty() {
            return None;
        }
        let &(i, arrived) = self.sites.get(&bound)?;
        let p = &self.primaries[i];
        Some(match &p.dynamic {
            Some(cell) => {
                let paired = cell.load();
                (
                    Site {
                        grid: paired.grid,
                        arrived,
                    },
                    paired.handoff.clone(),
                )
            }
            None => (
                Site {
                    grid: p.grid,
                    arrived,
                },
                p.handoff.clone(),
            ),
        })
    }

    /// Answers a change-IP request a sibling handed over: as if it had
    /// arrived on the sibling's socket (our alternate IP); the change
    /// brings it to one of ours.
    fn answer_handoff(
        &mut self,
        h: &HandoffPeer,
        site: Site,
        packet: &[u8],
        out: &mut [u8],
    ) -> Answer {
        let Ok(handed) = handoff::open(&h.key, unix_ms(), packet) else {
            h.rejected.inc();
            return Answer::None;
        };
        // The sibling limited the client's prefix; this node's caps apply
        // to what it sends as well.
        if !self.limiter.allow(handed.client.ip(), Instant::now()) {
            self.udp.dropped(DropReason::RateLimited);
            return Answer::None;
        }
        let arrived = Via {
            ip: 1,
            port: handed.arrived_port,
        };
        let outcome = self.responder.handle_at(
            handed.request,
            handed.client,
            Some(Site {
                grid: site.grid,
                arrived,
            }),
            out,
        );
        let Outcome::Reply { len, route, .. } = outcome else {
            h.rejected.inc();
            return Answer::None;
        };
        let (via, to) = route.unwrap_or((arrived, handed.client));
        if !site.grid.is_local(via) {
            // Asked to answer from the sibling's own address: not ours.
            h.rejected.inc();
            return Answer::None;
        }
        h.answered.inc();
        Answer::Route {
            len,
            from: site.grid.addr(via),
            to,
        }
    }

    fn offer_datagram(&mut self, packet: &[u8], from: SocketAddr, arrival: Arrival) {
        self.udp.record_exchange(packet.len());
        if !self.limiter.allow(from.ip(), Instant::now()) {
            self.udp.dropped(DropReason::RateLimited);
            return;
        }
        let local = Local {
            bound: arrival.bound,
            dst_ip: arrival
                .to_ip
                .filter(|_| arrival.bound.ip().is_unspecified()),
            stream: None,
        };
        if !self.exchange.offer(packet, from, local) {
            self.overloaded.inc();
        }
    }
}

impl StunService for CdxService {
    fn datagram(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        arrival: Arrival,
        out: &mut [u8],
    ) -> Answer {
        let site = self.site(arrival.bound);
        // A sibling handing us a change-IP request it cannot serve.
        if let Some((site, Some(h))) = &site
            && handoff::is_handoff(packet)
        {
            return self.answer_handoff(h, *site, packet, out);
        }
        // Exchange posts and acknowledgements go to the actor; the loop
        // never waits for it.
        if is_exchange(packet) {
            self.offer_datagram(packet, from, arrival);
            return Answer::None;
        }
        let mut outcome =
            self.responder
                .handle_at(packet, from, site.as_ref().map(|(s, _)| *s), out);
        if matches!(outcome, Outcome::Reply { .. })
            && !self.limiter.allow(from.ip(), Instant::now())
        {
            outcome = Outcome::Drop(DropReason::RateLimited);
        }
        self.udp.record(packet.len(), &outcome);
        let Outcome::Reply { len, route, .. } = outcome else {
            return Answer::None;
        };
        let Some((via, to)) = route else {
            // The common case: back to the sender from this socket.
            self.udp.sent(len);
            return Answer::Reply(len);
        };
        let Some((site, handoff)) = site else {
            self.udp.send_failed();
            return Answer::None;
        };
        if site.grid.is_local(via) {
            // RFC 5780: from another cell of ours, or to another port.
            self.udp.sent(len);
            return Answer::Route {
                len,
                from: site.grid.addr(via),
                to,
            };
        }
        // A change-IP answer comes from the sibling's address: hand the
        // request over.
        let Some(h) = handoff else {
            self.udp.send_failed();
            return Answer::None;
        };
        match handoff::seal(&h.key, unix_ms(), site.arrived.port, from, packet, out) {
            Some(n) => {
                h.sent.inc();
                Answer::Route {
                    len: n,
                    from: arrival.bound,
                    to: h.sibling,
                }
            }
            None => {
                self.udp.send_failed();
                Answer::None
            }
        }
    }

    fn frame(
        &mut self,
        packet: &[u8],
        conn: ConnId,
        _transport: natrix_model::Transport,
        from: SocketAddr,
        local: SocketAddr,
        out: &mut [u8],
    ) -> Option<usize> {
        if is_exchange(packet) {
            // A client without UDP exchanges over its connection: the
            // actor answers and delivers through this loop's mailbox.
            self.tcp.record_exchange(packet.len());
            // Its source cannot be spoofed, but it can flood: the same caps
            // as UDP.
            if !self.limiter.allow(from.ip(), Instant::now()) {
                self.tcp.dropped(DropReason::RateLimited);
                return None;
            }
            let local = Local {
                bound: local,
                dst_ip: None,
                stream: Some(conn.0),
            };
            let reply = StreamReply {
                mailbox: self.mailbox.clone(),
                conn,
            };
            if self
                .exchange
                .offer_from_stream(packet, from, local, Some(reply))
            {
                self.exchanged.insert(conn);
            } else {
                self.overloaded.inc();
            }
            return None;
        }
        let outcome = self.responder.handle(packet, from, out);
        self.tcp.record(packet.len(), &outcome);
        match outcome {
            Outcome::Reply { len, .. } => {
                self.tcp.sent(len);
                Some(len)
            }
            Outcome::Indication | Outcome::Drop(_) => None,
        }
    }

    fn event(&mut self, event: HostEvent) {
        match event {
            HostEvent::StreamClosed(conn, _) => {
                if self.exchanged.remove(&conn) {
                    self.exchange.stream_closed(conn);
                }
                if self.owns {
                    self.metrics.tcp_connections.dec();
                }
            }
            HostEvent::StreamOpened(_) if self.owns => {
                self.metrics.tcp_accepted.inc();
                self.metrics.tcp_connections.inc();
            }
            HostEvent::StreamRefused if self.owns => self.metrics.tcp_rejected.inc(),
            HostEvent::StreamGarbage => self.tcp.dropped(DropReason::NotStun),
            HostEvent::SendFailed(n) => {
                for _ in 0..n {
                    self.udp.send_failed();
                }
            }
            HostEvent::StreamOpened(_) | HostEvent::StreamRefused => {}
        }
    }

    fn flush(&mut self) {
        self.udp.flush();
        self.tcp.flush();
        self.limiter.sweep(Instant::now());
    }
}

/// The settings of CDX beside TURN (`natrix up`): the relay's SOFTWARE
/// and caps on unauthenticated answers, RFC 5780 on its listeners.
pub fn beside_turn(
    software: &str,
    limits: UnauthLimits,
    alternate_port: Option<u16>,
    alternate_ip: Option<IpAddr>,
) -> StunSettings {
    StunSettings {
        software: software.to_owned(),
        limits,
        alternate_port,
        alternate_ip,
        sibling: None,
        advertise_ip: None,
        alternate_advertise_ip: None,
        cluster_secret: None,
        owns_listeners: false,
    }
}

//! One data-plane loop.
//!
//! Priorities per wake-up, in order: the stop flag; the ready sockets, each
//! drained for at most [`BATCHES_PER_WAKE`] batches (a socket with more
//! waiting is revisited next turn without sleeping, so one busy socket cannot
//! starve the rest); then timers (expiry sweep) and the commands the core
//! queued (relay sockets to close); then, every [`PUBLISH_INTERVAL`], the
//! counters go to Prometheus.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use natrix_net::service::Mail;
use natrix_net::{
    Answer, Arrival, ConnId, Datagram, HeadroomBatch, HostEvent, LoopContext, RecvBatch, SendBatch,
    StreamMailbox, StunService, StunServiceFactory, SyncUdp,
};
use tracing::{debug, trace, warn};

use super::dtls::DtlsSessions;
use super::is_binding;
use super::mobility::{Mobility, Transfer};
use super::stream::{ReadOutcome, Stream};
use super::tcp_relay::{self, TcpRelays};
use crate::control::Control;
use crate::core::{
    AllocationId, ClientAction, ClientSocket, Command, Direction, MovedAllocation, PEER_HEADROOM,
    PEER_TAILROOM, RelaySockets, Server, Stats, Transport,
};
use crate::metrics::RelayMetrics;

const WAKER: Token = Token(0);
const UDP_BASE: usize = 1;
const TCP_BASE: usize = 1 << 10;
const TLS_BASE: usize = TCP_BASE + 512;
const DTLS_BASE: usize = TLS_BASE + 512;
const STREAM_BASE: usize = 1 << 24;
/// TCP allocations' listeners, by allocation slot.
const LISTEN_BASE: usize = 1 << 32;
/// Peer data connections of TCP allocations.
const PEER_TCP_BASE: usize = 1 << 36;
const RELAY_BASE: usize = 1 << 40;

/// Batches drained from one socket per wake-up.
const BATCHES_PER_WAKE: usize = 8;
/// How often counters are published.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);
/// Time one loop turn spends on TLS handshake steps (each may cost a key
/// exchange and a signature: ~0.1 ms with an ECDSA certificate, ~1–2 ms
/// with RSA-2048): past it the other handshakes wait for the next turn, so
/// a handshake flood delays new handshakes, not relayed traffic.
const HANDSHAKE_TIME_PER_TURN: Duration = Duration::from_micros(500);
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Largest client datagram read (bigger ones are truncated and then fail to
/// parse: TURN over UDP carries at most an MTU).
const MAX_CLIENT_DATAGRAM: usize = 4096;

/// Frames a loop's mailbox holds for its connections.
const MAILBOX: usize = 4096;
/// Mailbox frames moved into connections per wake-up.
const MAIL_PER_WAKE: usize = 1024;

/// Datagrams sent per `sendmmsg`.
const SEND_BATCH: usize = 32;
/// Peer datagrams received per `recvmmsg`.
const PEER_BATCH: usize = 32;

/// The relay sockets of one loop, indexed by allocation slot.
struct Relays {
    registry: Registry,
    sockets: Vec<Option<(AllocationId, UdpSocket)>>,
    send_errors: u64,
    /// Datagrams for peers, all from the relay socket of `out_from`.
    out: SendBatch,
    out_from: Option<AllocationId>,
    /// TCP allocations' listeners and peer data connections (RFC 6062).
    tcp: TcpRelays,
}

fn set_dont_fragment(socket: &UdpSocket, v6: bool, on: bool) {
    let (level, name, value) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            if on {
                libc::IPV6_PMTUDISC_DO
            } else {
                libc::IPV6_PMTUDISC_DONT
            },
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            if on {
                libc::IP_PMTUDISC_DO
            } else {
                libc::IP_PMTUDISC_DONT
            },
        )
    };
    // SAFETY: setsockopt on an open socket with a pointer to a local int.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl RelaySockets for Relays {
    fn open(&mut self, id: AllocationId, addr: SocketAddr, dont_fragment: bool) -> io::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        let socket: UdpSocket = s.into();
        // Without DONT-FRAGMENT the relay lets the network fragment
        // (RFC 8656 §14); with it, DF is set.
        set_dont_fragment(&socket, addr.is_ipv6(), dont_fragment);
        self.adopt(id, socket)
    }

    fn listen(&mut self, id: AllocationId, addr: SocketAddr) -> io::Result<()> {
        let token = Token(LISTEN_BASE + id.index());
        self.tcp.listen(&self.registry, id, addr, token)
    }
}

impl Relays {
    /// Queues a datagram for `peer` from `id`'s relay socket; consecutive
    /// datagrams of one allocation leave in one `sendmmsg`.
    #[inline]
    fn send(&mut self, id: AllocationId, payload: &[u8], peer: SocketAddr) {
        if self.out_from != Some(id) || self.out.is_full() {
            self.flush();
        }
        self.out_from = Some(id);
        self.out.push(peer, payload);
    }

    /// Sends what is queued.
    fn flush(&mut self) {
        let Some(id) = self.out_from.take() else {
            return;
        };
        if self.out.is_empty() {
            return;
        }
        match self.sockets.get(id.index()) {
            Some(Some((owner, socket))) if *owner == id => {
                let failed = self.out.flush(socket.as_fd());
                if failed > 0 {
                    self.send_errors += failed as u64;
                    trace!(failed, "relay sends failed");
                }
            }
            _ => {
                // The allocation ended meanwhile: nothing to send from.
                self.send_errors += self.out.len() as u64;
                self.out.clear();
            }
        }
    }

    fn close(&mut self, id: AllocationId) {
        drop(self.take(id));
        self.tcp.close_listener(&self.registry, id);
    }

    /// Takes `id`'s relay socket out of this loop (it moves to another).
    fn take(&mut self, id: AllocationId) -> Option<UdpSocket> {
        self.flush();
        let slot = self.sockets.get_mut(id.index())?;
        if !matches!(slot, Some((owner, _)) if *owner == id) {
            return None;
        }
        let (_, socket) = slot.take()?;
        let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
        Some(socket)
    }

    /// Serves `socket` (which another loop or process opened) as `id`'s
    /// relay socket.
    fn adopt(&mut self, id: AllocationId, socket: UdpSocket) -> io::Result<()> {
        socket.set_nonblocking(true)?;
        self.registry.register(
            &mut SourceFd(&socket.as_raw_fd()),
            Token(RELAY_BASE + id.index()),
            Interest::READABLE,
        )?;
        if self.sockets.len() <= id.index() {
            self.sockets.resize_with(id.index() + 1, || None);
        }
        self.sockets[id.index()] = Some((id, socket));
        Ok(())
    }
}

/// The client-facing sockets of one loop.
struct Clients {
    udp: Vec<SyncUdp>,
    /// Per UDP listener: datagrams queued for one `sendmmsg` (with the
    /// source address chosen per datagram on wildcard listeners).
    udp_out: Vec<SendBatch>,
    streams: Vec<Option<Stream>>,
    free_streams: Vec<usize>,
    stream_by_client: HashMap<ClientSocket, usize, foldhash::fast::RandomState>,
    stream_by_conn: HashMap<ConnId, usize, foldhash::fast::RandomState>,
    /// Live connections per client IP.
    per_ip: HashMap<std::net::IpAddr, usize, foldhash::fast::RandomState>,
    /// Streams with frames queued since the last [`Clients::flush`].
    dirty_streams: Vec<usize>,
    send_errors: u64,
    /// TURN over DTLS: the listeners, their send batches, the sessions.
    dtls_udp: Vec<SyncUdp>,
    dtls_out: Vec<SendBatch>,
    dtls: Option<DtlsSessions>,
}

/// Queues a session's DTLS records on the listener it uses (answering from
/// the address the client reached on a wildcard listener).
fn dtls_emitter<'a>(
    udp: &'a [SyncUdp],
    out: &'a mut [SendBatch],
    errors: &'a mut u64,
) -> impl FnMut(usize, &ClientSocket, &[u8]) + 'a {
    move |l, client, bytes| match (udp.get(l), out.get_mut(l)) {
        (Some(socket), Some(batch)) => *errors += queue_datagram(socket, batch, client, bytes),
        _ => *errors += 1,
    }
}

/// Queues `bytes` for `client` on `listener`'s batch (sending the batch
/// first when full); a wildcard listener answers from the address the
/// client reached. Returns the sends that failed.
#[inline]
fn queue_datagram(
    listener: &SyncUdp,
    batch: &mut SendBatch,
    client: &ClientSocket,
    bytes: &[u8],
) -> u64 {
    let failed = if batch.is_full() {
        batch.flush(listener.socket().as_fd()) as u64
    } else {
        0
    };
    let from = listener
        .local_addr()
        .ip()
        .is_unspecified()
        .then_some(client.server.ip());
    batch.push_from(client.client, from, bytes);
    failed
}

impl Clients {
    /// Sends a framed message to a client over whatever transport it uses.
    #[inline]
    fn deliver(&mut self, client: &ClientSocket, bytes: &[u8]) {
        match client.transport {
            Transport::Udp => {
                let listener = self.udp.iter().position(|l| {
                    let local = l.local_addr();
                    local.port() == client.server.port()
                        && (local.ip() == client.server.ip()
                            || (local.ip().is_unspecified()
                                && local.is_ipv4() == client.server.is_ipv4()))
                });
                let Some(i) = listener else {
                    self.send_errors += 1;
                    return;
                };
                self.send_errors +=
                    queue_datagram(&self.udp[i], &mut self.udp_out[i], client, bytes);
            }
            Transport::Dtls => {
                let Some(sessions) = self.dtls.as_mut() else {
                    self.send_errors += 1;
                    return;
                };
                let mut failed = 0;
                let sent = sessions.send(
                    client,
                    bytes,
                    &mut dtls_emitter(&self.dtls_udp, &mut self.dtls_out, &mut failed),
                );
                self.send_errors += failed + u64::from(!sent);
            }
            Transport::Tcp | Transport::Tls => {
                let Some(&j) = self.stream_by_client.get(client) else {
                    self.send_errors += 1;
                    return;
                };
                if let Some(stream) = self.streams[j].as_mut() {
                    if !stream.queue(bytes) {
                        self.send_errors += 1;
                    }
                    if !stream.dirty {
                        stream.dirty = true;
                        self.dirty_streams.push(j);
                    }
                }
            }
        }
    }
}

impl Clients {
    /// A free connection index with `socket` registered under it for
    /// reading; `None` when the registration failed.
    fn register(&mut self, registry: &Registry, socket: &mut mio::net::TcpStream) -> Option<usize> {
        let j = self.free_streams.pop().unwrap_or_else(|| {
            self.streams.push(None);
            self.streams.len() - 1
        });
        if registry
            .register(socket, Token(STREAM_BASE + j), Interest::READABLE)
            .is_err()
        {
            self.free_streams.push(j);
            return None;
        }
        Some(j)
    }

    /// Queues a frame a STUN service sent a connection from outside the
    /// loop; false when the connection is gone or too slow.
    fn mail(&mut self, mail: &Mail) -> bool {
        let Some(&j) = self.stream_by_conn.get(&mail.conn) else {
            return false;
        };
        let Some(stream) = self.streams.get_mut(j).and_then(Option::as_mut) else {
            return false;
        };
        let queued = stream.queue(&mail.frame);
        if !stream.dirty {
            stream.dirty = true;
            self.dirty_streams.push(j);
        }
        queued
    }

    /// Sends what is queued on UDP listener `i`; returns the failures.
    fn flush_udp(&mut self, i: usize) -> u64 {
        match (self.udp.get(i), self.udp_out.get_mut(i)) {
            (Some(l), Some(batch)) if !batch.is_empty() => batch.flush(l.socket().as_fd()) as u64,
            _ => 0,
        }
    }

    /// Sends every queued UDP datagram and writes every stream that got
    /// frames: one send per batch, not one per frame.
    fn flush(&mut self, registry: &Registry) {
        for (l, batch) in self
            .udp
            .iter()
            .zip(self.udp_out.iter_mut())
            .chain(self.dtls_udp.iter().zip(self.dtls_out.iter_mut()))
        {
            if !batch.is_empty() {
                self.send_errors += batch.flush(l.socket().as_fd()) as u64;
            }
        }
        for j in self.dirty_streams.drain(..) {
            if let Some(stream) = self.streams.get_mut(j).and_then(Option::as_mut) {
                stream.dirty = false;
                // A failed socket is closed when it next reports readiness.
                if stream.flush().is_err() {
                    self.send_errors += 1;
                }
                want_write(registry, stream, j);
            }
        }
    }
}

/// Sends a STUN service's answer to datagram `d` of listener `i`:
/// replies join the listener's batch (true: the caller flushes it),
/// routed answers leave at once from the listener they name.
fn send_answer(
    udp: &[SyncUdp],
    udp_out: &mut [SendBatch],
    service: &mut dyn StunService,
    (i, d): (usize, &Datagram<'_>),
    answer: Answer,
    out: &[u8],
) -> bool {
    match answer {
        Answer::None => false,
        Answer::Reply(len) => {
            let (Some(l), Some(batch)) = (udp.get(i), udp_out.get_mut(i)) else {
                return false;
            };
            if batch.is_full() {
                let failed = batch.flush(l.socket().as_fd()) as u64;
                if failed > 0 {
                    service.event(HostEvent::SendFailed(failed));
                }
            }
            batch.push_from(d.from, d.to_ip, &out[..len]);
            true
        }
        Answer::Route { len, from, to } => {
            let sent = udp
                .iter()
                .find(|l| l.local_addr() == from)
                .is_some_and(|l| l.try_send_to(&out[..len], to, None).is_ok());
            if !sent {
                service.event(HostEvent::SendFailed(1));
            }
            false
        }
    }
}

/// Registers WRITABLE interest when a stream has bytes waiting.
fn want_write(registry: &Registry, stream: &mut Stream, j: usize) {
    let pending = stream.has_pending();
    if pending != stream.want_write {
        let interest = if pending {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if registry
            .reregister(&mut stream.socket, Token(STREAM_BASE + j), interest)
            .is_ok()
        {
            stream.want_write = pending;
        }
    }
}

/// The client-facing sockets a loop serves.
pub(super) struct Listeners {
    /// TURN's UDP listeners (the first `turn_udp`), then the STUN
    /// service's own.
    pub(super) udp: Vec<SyncUdp>,
    pub(super) turn_udp: usize,
    /// TURN on the listeners; without it, everything goes to the service.
    pub(super) turn: bool,
    pub(super) tcp: Vec<std::net::TcpListener>,
    pub(super) tls: Vec<std::net::TcpListener>,
    /// TURN over DTLS (served when the certificate has DTLS material).
    pub(super) dtls: Vec<SyncUdp>,
}

/// Per-loop settings from the host.
pub(super) struct LoopSettings {
    pub(super) control: Arc<Control>,
    /// Set to freeze the loop for a hand-off (see [`EventLoop::run`]).
    pub(super) freeze: Arc<AtomicBool>,
    pub(super) shard: usize,
    /// Most TCP/TLS connections this loop holds.
    pub(super) max_streams: usize,
    /// Most TCP/TLS connections this loop holds from one IP.
    pub(super) max_streams_per_ip: usize,
    /// Idle limit for connections without an allocation.
    pub(super) idle_timeout: Duration,
    /// Load balancers whose connections start with a PROXY v2 header.
    pub(super) proxy_from: Vec<crate::core::IpNet>,
    /// TLS listeners shared with HTTPS: where HTTP connections go.
    pub(super) https: Option<crate::https::HttpsHandoff>,
    /// This loop's ends of the host's mobility channels.
    pub(super) mobility: Mobility,
    /// The host's XDP fast path, when attached.
    pub(super) xdp: Option<Arc<std::sync::Mutex<crate::xdp::Xdp>>>,
}

/// One data-plane loop.
pub(super) struct EventLoop {
    poll: Poll,
    registry: Registry,
    core: Server,
    clients: Clients,
    tcp: Vec<mio::net::TcpListener>,
    tls: Vec<mio::net::TcpListener>,
    tls_config: Option<Arc<crate::tls::TlsReloader>>,
    relays: Relays,
    client_batch: RecvBatch,
    peer_batch: HeadroomBatch,
    out: Vec<u8>,
    metrics: RelayMetrics,
    published: Stats,
    published_dtls: super::dtls::DtlsStats,
    published_send_errors: u64,
    stop: Arc<AtomicBool>,
    /// Stop between batches and hand everything over (binary upgrade).
    freeze: Arc<AtomicBool>,
    service: Option<Box<dyn StunService>>,
    /// Frames the service sends this loop's connections later.
    mail: std::sync::mpsc::Receiver<Mail>,
    turn: bool,
    turn_udp: usize,
    control: Arc<Control>,
    shard: usize,
    draining: bool,
    credentials_generation: u64,
    /// The newest admin question this loop answered.
    admin_seen: u64,
    /// The version of the alternate relay this loop's core has (0: none).
    alternate_generation: u64,
    max_streams: usize,
    max_streams_per_ip: usize,
    idle_timeout: Duration,
    proxy_from: Vec<crate::core::IpNet>,
    https: Option<crate::https::HttpsHandoff>,
    live_streams: usize,
    next_idle_sweep: Instant,
    /// Time spent on TLS handshake steps this turn.
    handshakes: Duration,
    /// Tokens to handle on the first turn (adopted connections whose
    /// buffers may hold frames already).
    first_turn: Vec<Token>,
    mobility: Mobility,
    /// What one read from a TCP peer lands in.
    tcp_chunk: Vec<u8>,
    /// The XDP fast path and this loop's entries in it.
    fast: FastEntries,
}

/// This loop's channel bindings on the XDP fast path.
struct FastEntries {
    xdp: Option<Arc<std::sync::Mutex<crate::xdp::Xdp>>>,
    /// Keys → the allocation, until when, and what its counters read last.
    entries: HashMap<crate::xdp::Keys, (AllocationId, Instant, crate::xdp::EntryCounters)>,
    next_read: Instant,
    /// Allocations with a bandwidth budget in the kernel: their entries,
    /// and what the budget had dropped at the last reading.
    caps: HashMap<AllocationId, (usize, u64)>,
    /// The per-CPU counters as last published (loop 0 publishes them).
    published: [u64; crate::xdp::STATS as usize],
    published_entries: usize,
}

impl EventLoop {
    pub(super) fn new(
        core: Server,
        listeners: Listeners,
        tls_config: Option<Arc<crate::tls::TlsReloader>>,
        metrics: RelayMetrics,
        stop: Arc<AtomicBool>,
        service: Option<StunServiceFactory>,
        settings: LoopSettings,
    ) -> io::Result<(EventLoop, Arc<mio::Waker>)> {
        let LoopSettings {
            control,
            freeze,
            shard,
            max_streams,
            max_streams_per_ip,
            idle_timeout,
            proxy_from,
            https,
            mobility,
            xdp,
        } = settings;
        let Listeners {
            udp,
            turn_udp,
            turn,
            tcp,
            tls,
            dtls,
        } = listeners;
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let wake = waker.clone();
        let (mailbox, mail) = StreamMailbox::new(
            MAILBOX,
            Arc::new(move || {
                let _ = wake.wake();
            }),
        );
        let service = service.map(|make| make(LoopContext { shard, mailbox }));
        for (i, s) in udp.iter().enumerate() {
            registry.register(
                &mut SourceFd(&s.socket().as_raw_fd()),
                Token(UDP_BASE + i),
                Interest::READABLE,
            )?;
        }
        let mut listeners = Vec::new();
        for (i, l) in tcp.into_iter().enumerate() {
            let mut l = mio::net::TcpListener::from_std(l);
            registry.register(&mut l, Token(TCP_BASE + i), Interest::READABLE)?;
            listeners.push(l);
        }
        let mut tls_listeners = Vec::new();
        for (i, l) in tls.into_iter().enumerate() {
            let mut l = mio::net::TcpListener::from_std(l);
            registry.register(&mut l, Token(TLS_BASE + i), Interest::READABLE)?;
            tls_listeners.push(l);
        }
        for (i, s) in dtls.iter().enumerate() {
            registry.register(
                &mut SourceFd(&s.socket().as_raw_fd()),
                Token(DTLS_BASE + i),
                Interest::READABLE,
            )?;
        }
        let sessions = tls_config
            .as_ref()
            .filter(|t| !dtls.is_empty() && t.dtls().is_some())
            .map(|t| DtlsSessions::new(t.clone(), max_streams, max_streams_per_ip));
        let client_batch = match udp.first().or(dtls.first()) {
            Some(s) => s.batch(MAX_CLIENT_DATAGRAM),
            None => RecvBatch::new(MAX_CLIENT_DATAGRAM, 1),
        };
        let relays = Relays {
            registry: registry.try_clone()?,
            sockets: Vec::new(),
            send_errors: 0,
            out: SendBatch::new(SEND_BATCH),
            out_from: None,
            tcp: TcpRelays::default(),
        };
        Ok((
            EventLoop {
                poll,
                registry,
                core,
                clients: Clients {
                    udp_out: (0..udp.len()).map(|_| SendBatch::new(SEND_BATCH)).collect(),
                    udp,
                    streams: Vec::new(),
                    free_streams: Vec::new(),
                    stream_by_client: HashMap::default(),
                    stream_by_conn: HashMap::default(),
                    per_ip: HashMap::default(),
                    dirty_streams: Vec::new(),
                    send_errors: 0,
                    dtls_out: (0..dtls.len())
                        .map(|_| SendBatch::new(SEND_BATCH))
                        .collect(),
                    dtls_udp: dtls,
                    dtls: sessions,
                },
                tcp: listeners,
                tls: tls_listeners,
                tls_config,
                relays,
                client_batch,
                peer_batch: HeadroomBatch::new(
                    PEER_BATCH,
                    PEER_HEADROOM,
                    MAX_DATAGRAM,
                    PEER_TAILROOM,
                ),
                out: vec![0; 1500],
                metrics,
                published: Stats::default(),
                published_dtls: Default::default(),
                published_send_errors: 0,
                stop,
                freeze,
                service,
                mail,
                turn,
                turn_udp,
                credentials_generation: control.credentials_generation(),
                admin_seen: control.admin_latest(),
                alternate_generation: 0,
                control,
                shard,
                draining: false,
                max_streams,
                max_streams_per_ip,
                idle_timeout,
                proxy_from,
                https,
                live_streams: 0,
                next_idle_sweep: Instant::now() + Duration::from_secs(1),
                handshakes: Duration::ZERO,
                first_turn: Vec::new(),
                mobility,
                tcp_chunk: vec![0; tcp_relay::CHUNK],
                fast: FastEntries {
                    xdp,
                    entries: HashMap::default(),
                    next_read: Instant::now(),
                    caps: HashMap::default(),
                    published: [0; crate::xdp::STATS as usize],
                    published_entries: 0,
                },
            },
            waker,
        ))
    }

    /// Serves until stopped; frozen instead (between batches: nothing read
    /// is left unhandled, nothing queued unsent), hands its sockets and
    /// allocations over (see [`EventLoop::frozen`]).
    pub(super) fn run(mut self) -> Option<super::handoff::FrozenLoop> {
        let mut events = Events::with_capacity(1024);
        let mut pending: Vec<Token> = std::mem::take(&mut self.first_turn);
        let mut again: Vec<Token> = Vec::new();
        let mut next_publish = Instant::now() + PUBLISH_INTERVAL;
        while !self.stop.load(Ordering::Relaxed) && !self.freeze.load(Ordering::Relaxed) {
            let now = Instant::now();
            let timeout = if pending.is_empty() {
                let dtls = self
                    .clients
                    .dtls
                    .as_ref()
                    .and_then(DtlsSessions::next_timer);
                self.core
                    .poll_timeout()
                    .min(next_publish)
                    .min(dtls.unwrap_or(next_publish))
                    .saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    debug!(error = %e, "relay poll failed");
                }
                continue;
            }
            again.clear();
            self.handshakes = Duration::ZERO;
            for token in events.iter().map(|e| e.token()).chain(pending.drain(..)) {
                if !self.dispatch(token) {
                    again.push(token);
                }
            }
            std::mem::swap(&mut pending, &mut again);
            pending.sort_unstable();
            pending.dedup();
            if self.deliver_mail() | self.take_transfers() {
                // More mail waits: come back without sleeping.
                pending.push(WAKER);
            }

            self.apply_control();
            let now = Instant::now();
            self.core.handle_timeout(now);
            self.dtls_timers(now);
            while let Some(command) = self.core.poll_command() {
                match command {
                    Command::CloseRelay {
                        allocation,
                        relayed,
                    } => {
                        trace!(%relayed, "closing relay socket");
                        self.relays.close(allocation);
                    }
                    Command::Usage(record) => self.record_usage(*record),
                    Command::ToClient { client, frame } => {
                        // Written at once, each in a TLS record of its own:
                        // clients (coturn's among them) read one message
                        // per record on a control connection.
                        self.clients.deliver(&client, &frame);
                        self.clients.flush(&self.registry);
                    }
                    Command::CloseTcp { connection } => {
                        if let Some(&k) = self.relays.tcp.by_connection.get(&connection) {
                            self.close_pair(k);
                        }
                    }
                    Command::FastPath(f) => self.fast_path(&f),
                }
            }
            if now >= self.fast.next_read {
                self.read_fast_path(now);
            }
            self.clients.flush(&self.registry);
            if now >= self.next_idle_sweep {
                self.close_idle_streams(now);
                self.close_idle_dtls(now);
                self.next_idle_sweep = now + Duration::from_secs(1);
            }
            if now >= next_publish {
                self.publish();
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.core.set_wall_clock(now, unix);
                next_publish = now + PUBLISH_INTERVAL;
            }
        }
        self.publish();
        if self.freeze.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            return Some(self.frozen());
        }
        // Stopping: the allocations still alive end with the relay.
        self.core.record_live_usage(Instant::now());
        while let Some(command) = self.core.poll_command() {
            if let Command::Usage(record) = command {
                self.record_usage(*record);
            }
        }
        None
    }

    /// Hands a usage record to the writer (counted when the queue is full).
    fn record_usage(&mut self, record: crate::core::UsageRecord) {
        if !self.control.record_usage(record) {
            self.metrics.usage_dropped.inc();
        }
    }

    /// Everything a successor needs from this loop: duplicates of its
    /// listeners, of its allocations' relayed sockets and of the plain TCP
    /// connections holding allocations (this loop's own close when it
    /// drops), and those allocations' state. A TCP allocation whose
    /// connection cannot move (TLS 1.2, a handshake in progress) stays
    /// behind.
    fn frozen(&mut self) -> super::handoff::FrozenLoop {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
        let mut moved = self.core.export(Instant::now());
        let mut streams = Vec::new();
        let clients = &mut self.clients;
        moved.allocations.retain(|a| {
            if a.client.transport == crate::core::Transport::Udp {
                return true;
            }
            let Some(stream) = clients
                .stream_by_client
                .get(&a.client)
                .copied()
                .and_then(|j| clients.streams.get_mut(j)?.as_mut())
            else {
                return false;
            };
            let Ok(fd) = dup(stream.socket.as_fd()) else {
                return false;
            };
            let Some(parts) = stream.handoff_parts() else {
                return false;
            };
            streams.push(super::handoff::MovedStream {
                client: a.client,
                fd,
                parts,
            });
            true
        });
        // Each allocation's relay socket, a dual-stack one's IPv6 socket, a
        // shared one's shared socket (once).
        let mut shared: Vec<u32> = moved
            .allocations
            .iter()
            .filter_map(|a| a.shared.map(|(slot, _)| slot))
            .collect();
        shared.sort_unstable();
        shared.dedup();
        let relays = moved
            .allocations
            .iter()
            .filter(|a| a.shared.is_none())
            .flat_map(|a| std::iter::once(a.slot).chain(a.relayed6.map(|(t, _, _)| t)))
            .chain(shared)
            .filter_map(|slot| {
                let (_, socket) = self.relays.sockets.get(slot as usize)?.as_ref()?;
                Some((slot, dup(socket.as_fd()).ok()?))
            })
            .collect();
        super::handoff::FrozenLoop {
            udp: self
                .clients
                .udp
                .iter()
                .filter_map(|s| dup(s.socket().as_fd()).ok())
                .collect(),
            tcp: self
                .tcp
                .iter()
                .filter_map(|l| dup(l.as_fd()).ok())
                .collect(),
            tls: self
                .tls
                .iter()
                .filter_map(|l| dup(l.as_fd()).ok())
                .collect(),
            dtls: self
                .clients
                .dtls_udp
                .iter()
                .filter_map(|s| dup(s.socket().as_fd()).ok())
                .collect(),
            relays,
            streams,
            moved,
        }
    }

    /// Takes over a predecessor's TCP and TLS connections whose
    /// allocations the core imported (`clients`); the others close. Each is
    /// read once when the loop starts (bytes may wait in its buffers).
    pub(super) fn adopt_streams(
        &mut self,
        clients: &[crate::core::ClientSocket],
        streams: Vec<super::handoff::MovedStream>,
    ) {
        for m in streams {
            if !clients.contains(&m.client) {
                continue;
            }
            let std_socket = std::net::TcpStream::from(m.fd);
            if std_socket.set_nonblocking(true).is_err() {
                continue;
            }
            let socket = mio::net::TcpStream::from_std(std_socket);
            let Some(mut stream) = Stream::adopted(socket, m.client, m.parts) else {
                continue;
            };
            let Some(j) = self.clients.register(&self.registry, &mut stream.socket) else {
                continue;
            };
            want_write(&self.registry, &mut stream, j);
            if m.client.transport == crate::core::Transport::Tls {
                self.metrics.tls_connections.inc();
            } else {
                self.metrics.tcp_connections.inc();
            }
            self.clients.stream_by_client.insert(stream.client, j);
            self.clients.stream_by_conn.insert(stream.conn, j);
            *self.clients.per_ip.entry(m.client.client.ip()).or_insert(0) += 1;
            stream.counted_ip = Some(m.client.client.ip());
            self.clients.streams[j] = Some(stream);
            self.live_streams += 1;
            self.first_turn.push(Token(STREAM_BASE + j));
        }
    }

    /// Takes over a predecessor's relayed sockets for the allocations the
    /// core imported (`ids`); the others' sockets close.
    pub(super) fn adopt_relays(
        &mut self,
        sockets: Vec<(u32, std::os::fd::OwnedFd)>,
    ) -> io::Result<()> {
        for (slot, fd) in sockets {
            // An imported allocation's socket, or a dual-stack one's IPv6
            // socket (its slot is the twin's); the core was fresh, so every
            // live slot was imported. One not taken over: its socket closes.
            let Some(id) = self.core.live_id(slot) else {
                continue;
            };
            self.relays.adopt(id, UdpSocket::from(fd))?;
        }
        Ok(())
    }

    /// The core, to import a predecessor's allocations before the loop runs.
    pub(super) fn core_mut(&mut self) -> &mut Server {
        &mut self.core
    }

    /// Moves frames the service sent from outside the loop into their
    /// connections and writes them; true when more may wait.
    fn deliver_mail(&mut self) -> bool {
        let mut moved = 0;
        let mut lost = 0;
        while moved < MAIL_PER_WAKE {
            let Ok(mail) = self.mail.try_recv() else {
                break;
            };
            moved += 1;
            if !self.clients.mail(&mail) {
                lost += 1;
            }
        }
        if moved == 0 {
            return false;
        }
        self.clients.flush(&self.registry);
        if lost > 0
            && let Some(s) = self.service.as_mut()
        {
            s.event(HostEvent::SendFailed(lost));
        }
        moved == MAIL_PER_WAKE
    }

    /// Handles what other loops sent about moving allocations (see
    /// [`super::mobility`]); true when more may wait.
    fn take_transfers(&mut self) -> bool {
        let mut handled = 0;
        while handled < MAIL_PER_WAKE
            && let Some(transfer) = self.mobility.next()
        {
            handled += 1;
            let now = Instant::now();
            match transfer {
                Transfer::Ask {
                    from_shard,
                    packet,
                    client,
                } => {
                    let taken =
                        self.core
                            .take_moving(&packet, now)
                            .and_then(|(id, twin, moved)| {
                                let twin = twin.and_then(|t| self.relays.take(t));
                                match self.relays.take(id) {
                                    Some(socket) => Some(Box::new((moved, socket, twin))),
                                    None => {
                                        self.core.drop_moved(&moved);
                                        None
                                    }
                                }
                            });
                    let give = Transfer::Give {
                        packet,
                        client,
                        taken,
                    };
                    if let Err(Transfer::Give {
                        taken: Some(taken), ..
                    }) = self.mobility.send(from_shard, give)
                    {
                        // The asking loop cannot take it: it stays here.
                        let (moved, socket, twin) = *taken;
                        self.adopt_moved(&moved, socket, twin, now);
                    }
                }
                Transfer::Give {
                    packet,
                    client,
                    taken,
                } => {
                    if let Some(taken) = taken {
                        let (moved, socket, twin) = *taken;
                        self.adopt_moved(&moved, socket, twin, now);
                    }
                    // The Refresh now finds its allocation here (or is
                    // refused).
                    let action = match self.core.handle_client_input(
                        &packet,
                        client,
                        now,
                        &mut self.out,
                        &mut self.relays,
                    ) {
                        ClientAction::Move { .. } => {
                            self.core.refuse_move(&packet, client, now, &mut self.out)
                        }
                        action => action,
                    };
                    if let ClientAction::Reply(len) = action {
                        self.clients.deliver(&client, &self.out[..len]);
                    }
                }
                Transfer::Bind { stream, packet } => self.adopt_bound_stream(*stream, &packet),
            }
        }
        if handled > 0 {
            self.clients.flush(&self.registry);
        }
        handled == MAIL_PER_WAKE
    }

    /// Serves an allocation (and its relay socket) another loop gave up.
    fn adopt_moved(
        &mut self,
        moved: &MovedAllocation,
        socket: UdpSocket,
        twin: Option<UdpSocket>,
        now: Instant,
    ) {
        let Some(id) = self.core.adopt_moving(moved, now) else {
            return;
        };
        let served =
            self.relays
                .adopt(id, socket)
                .and_then(|()| match (self.core.twin_id(id), twin) {
                    (Some(t), Some(socket)) => self.relays.adopt(t, socket),
                    (Some(_), None) => {
                        Err(io::Error::other("the IPv6 relay socket did not come along"))
                    }
                    _ => Ok(()),
                });
        if let Err(e) = served {
            // Without its sockets it cannot relay: it ends.
            warn!(error = %e, relayed = %moved.relayed, "a moved allocation's relay socket could not be served");
            self.core.end(id);
        }
    }

    /// Applies what the control plane changed (between batches).
    fn apply_control(&mut self) {
        let draining = self.control.is_draining();
        if draining != self.draining {
            self.draining = draining;
            self.core.set_draining(draining);
        }
        let generation = self.control.credentials_generation();
        if generation != self.credentials_generation {
            self.credentials_generation = generation;
            self.core.set_credentials(self.control.credentials());
        }
        if self.control.alternate_generation() != self.alternate_generation {
            let (generation, alternate) = self.control.alternate();
            self.alternate_generation = generation;
            self.core.set_alternate(alternate);
        }
        // An operator's question (the admin API): answered between batches.
        if self.control.admin_latest() != self.admin_seen {
            let now = Instant::now();
            for (id, query, reply) in self.control.admin_jobs_after(self.admin_seen) {
                let answer = match query {
                    crate::control::AdminQuery::List => {
                        crate::control::AdminAnswer::List(self.core.allocations_info(now))
                    }
                    crate::control::AdminQuery::Kill(relayed, client) => {
                        crate::control::AdminAnswer::Killed(self.core.kill(relayed, client, now))
                    }
                };
                let _ = reply.try_send(answer);
                self.admin_seen = self.admin_seen.max(id);
            }
        }
    }

    fn publish(&mut self) {
        self.control
            .set_allocations(self.shard, self.core.allocation_count() as u64);
        if let Some(s) = self.service.as_mut() {
            s.flush();
        }
        let stats = self.core.stats().clone();
        self.metrics.publish(&self.published, &stats);
        if self.shard == 0 {
            // The host's ban table, published once (every loop shares it).
            let (banned, bans) = self.core.bans().tick(Instant::now());
            self.metrics.publish_bans(banned, bans);
        }
        self.published = stats;
        if let Some(sessions) = self.clients.dtls.as_ref() {
            let (a, b) = (&self.published_dtls, &sessions.stats);
            self.metrics.publish_dtls(
                (a.live, b.live),
                [
                    (a.completed, b.completed),
                    (a.failed, b.failed),
                    (a.refused, b.refused),
                    (a.old_version, b.old_version),
                    (a.unanswered, b.unanswered),
                ],
            );
            self.published_dtls = sessions.stats;
        }
        let errors = self.relays.send_errors + self.clients.send_errors;
        self.metrics
            .send_errors
            .inc_by(errors - self.published_send_errors);
        self.published_send_errors = errors;
    }

    /// Handles one ready token; false when it has more to read (budget spent).
    fn dispatch(&mut self, token: Token) -> bool {
        match token.0 {
            0 => true,
            t if t >= RELAY_BASE => self.peer_ready(t - RELAY_BASE),
            t if t >= PEER_TCP_BASE => self.peer_tcp_ready(t - PEER_TCP_BASE),
            t if t >= LISTEN_BASE => self.accept_peers(t - LISTEN_BASE),
            t if t >= STREAM_BASE => self.stream_ready(t - STREAM_BASE),
            t if t >= DTLS_BASE => self.dtls_ready(t - DTLS_BASE),
            t if t >= TLS_BASE => {
                self.accept(t - TLS_BASE, true);
                true
            }
            t if t >= TCP_BASE => {
                self.accept(t - TCP_BASE, false);
                true
            }
            t => self.client_udp_ready(t - UDP_BASE),
        }
    }

    fn client_udp_ready(&mut self, i: usize) -> bool {
        for _ in 0..BATCHES_PER_WAKE {
            let Some(socket) = self.clients.udp.get(i) else {
                return true;
            };
            match socket.try_recv_batch(&mut self.client_batch) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                // ICMP errors for earlier sends surface here: they concern one
                // destination, not the socket.
                Err(_) => continue,
            }
            let now = Instant::now();
            let local = socket.local_addr();
            // TURN's listeners hand the service Binding and the exchange;
            // the service's own listeners hand it everything.
            let all_to_service = !self.turn || i >= self.turn_udp;
            let mut service_replies = false;
            for d in self.client_batch.datagrams() {
                if let Some(service) = self
                    .service
                    .as_mut()
                    .filter(|_| all_to_service || is_binding(d.payload))
                {
                    let arrival = Arrival {
                        bound: local,
                        to_ip: d.to_ip,
                    };
                    let answer = service.datagram(d.payload, d.from, arrival, &mut self.out);
                    service_replies |= send_answer(
                        &self.clients.udp,
                        &mut self.clients.udp_out,
                        &mut **service,
                        (i, &d),
                        answer,
                        &self.out,
                    );
                    continue;
                }
                if !self.turn {
                    continue;
                }
                let from = ClientSocket {
                    transport: Transport::Udp,
                    client: d.from,
                    server: SocketAddr::new(d.to_ip.unwrap_or(local.ip()), local.port()),
                };
                let action = self.mobility.client_input(
                    &mut self.core,
                    d.payload,
                    from,
                    now,
                    &mut self.out,
                    &mut self.relays,
                );
                match action {
                    ClientAction::Reply(len) => {
                        if socket
                            .try_send_to(&self.out[..len], d.from, d.to_ip)
                            .is_err()
                        {
                            self.clients.send_errors += 1;
                        }
                    }
                    ClientAction::ToPeer {
                        allocation,
                        peer,
                        payload,
                    } => self.relays.send(allocation, &d.payload[payload], peer),
                    // RFC 6062 is for TCP and TLS clients only.
                    ClientAction::Connect { .. }
                    | ClientAction::Bind { .. }
                    | ClientAction::BindElsewhere { .. }
                    | ClientAction::Move { .. }
                    | ClientAction::Consumed
                    | ClientAction::Drop(_) => {}
                }
            }
            self.relays.flush();
            if service_replies {
                let failed = self.clients.flush_udp(i);
                if failed > 0
                    && let Some(s) = self.service.as_mut()
                {
                    s.event(HostEvent::SendFailed(failed));
                }
            }
            // A batch that was not full drained the socket: the next
            // datagram raises a new readiness edge.
            if self.client_batch.filled() < self.client_batch.capacity() {
                return true;
            }
        }
        false
    }

    fn peer_ready(&mut self, index: usize) -> bool {
        for _ in 0..BATCHES_PER_WAKE {
            let Some(Some((id, socket))) = self.relays.sockets.get(index) else {
                return true;
            };
            let id = *id;
            match self.peer_batch.recv(socket.as_fd()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => continue,
            }
            let now = Instant::now();
            let received = self.peer_batch.len();
            for j in 0..received {
                let (buf, payload, from) = self.peer_batch.get_mut(j);
                if let Ok(action) = self.core.handle_peer_input(id, from, buf, payload, now) {
                    self.clients.deliver(&action.client, &buf[action.frame]);
                }
            }
            self.clients.flush(&self.registry);
            if received < PEER_BATCH {
                return true;
            }
        }
        false
    }

    fn accept(&mut self, i: usize, tls: bool) {
        loop {
            let listener = if tls {
                self.tls.get(i)
            } else {
                self.tcp.get(i)
            };
            let Some(listener) = listener else {
                return;
            };
            let (mut socket, client) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "TURN TCP accept failed");
                    return;
                }
            };
            // A balancer's connections count against the clients its
            // PROXY headers name, once they arrive.
            let proxied = self.proxy_from.iter().any(|n| n.contains(client.ip()));
            let per_ip = self.clients.per_ip.get(&client.ip()).copied().unwrap_or(0);
            if self.live_streams >= self.max_streams
                || (!proxied && per_ip >= self.max_streams_per_ip)
            {
                // At the limit: close at once (the client tries its next
                // ICE server) rather than hold a descriptor.
                self.metrics.connections_rejected.inc();
                if let Some(s) = self.service.as_mut() {
                    s.event(HostEvent::StreamRefused);
                }
                drop(socket);
                continue;
            }
            let Ok(server) = socket.local_addr() else {
                continue;
            };
            let _ = socket.set_nodelay(true);
            let Some(j) = self.clients.register(&self.registry, &mut socket) else {
                continue;
            };
            let config = if tls {
                self.tls_config.as_ref().map(|t| t.config())
            } else {
                None
            };
            let shared = config.clone().zip(self.https.clone());
            // On a listener shared with HTTPS the ClientHello picks the
            // session: none is set up before it.
            let session = if shared.is_some() { None } else { config };
            let mut stream = match Stream::new(socket, client, server, session) {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "could not set up a TLS session");
                    self.clients.free_streams.push(j);
                    continue;
                }
            };
            if tls {
                self.metrics.tls_connections.inc();
            } else {
                self.metrics.tcp_connections.inc();
            }
            if let Some((config, https)) = shared {
                stream.route_by_client_hello(config, https);
            }
            if proxied {
                stream.expect_proxy_header();
            } else {
                *self.clients.per_ip.entry(client.ip()).or_insert(0) += 1;
                stream.counted_ip = Some(client.ip());
            }
            // A TLS client speaks first; nothing to flush yet.
            want_write(&self.registry, &mut stream, j);
            if let Some(s) = self.service.as_mut() {
                s.event(HostEvent::StreamOpened(stream.client.transport));
            }
            self.clients.stream_by_client.insert(stream.client, j);
            self.clients.stream_by_conn.insert(stream.conn, j);
            self.clients.streams[j] = Some(stream);
            self.live_streams += 1;
        }
    }

    /// Serves a ready connection; false when its read budget ran out with
    /// bytes still waiting (it is revisited on the next turn).
    fn stream_ready(&mut self, j: usize) -> bool {
        let Some(mut stream) = self.clients.streams.get_mut(j).and_then(Option::take) else {
            return true;
        };
        if stream.has_pending() && stream.flush().is_err() {
            self.close_stream(j, stream);
            return true;
        }
        if stream.pipe.is_some() {
            self.clients.streams[j] = Some(stream);
            return self.pipe_ready(j);
        }
        let handshaking = stream.is_handshaking().then(Instant::now);
        if handshaking.is_some() && self.handshakes >= HANDSHAKE_TIME_PER_TURN {
            // Next turn: the handshake budget of this one is spent.
            self.clients.streams[j] = Some(stream);
            return false;
        }
        stream.trusted = self.core.has_allocation(&stream.client);
        let now = Instant::now();
        let core = &mut self.core;
        let out = &mut self.out;
        let relays = &mut self.relays;
        let service = &mut self.service;
        let mobility = &self.mobility;
        let turn = self.turn;
        let max_peers = self.max_streams;
        let mut elsewhere = None;
        let outcome = stream.read_frames(|frame, stream| {
            // Queued, flushed right after: the answers to one read go out
            // together.
            let client = stream.client;
            if let Some(s) = service.as_mut().filter(|_| !turn || is_binding(frame)) {
                if let Some(len) = s.frame(
                    frame,
                    stream.conn,
                    client.transport,
                    client.client,
                    client.server,
                    out,
                ) {
                    stream.queue(&out[..len]);
                }
                return true;
            }
            if !turn {
                return true;
            }
            let action = mobility.client_input(core, frame, client, now, out, relays);
            match action {
                ClientAction::Reply(len) => {
                    stream.queue(&out[..len]);
                }
                ClientAction::ToPeer {
                    allocation,
                    peer,
                    payload,
                } => relays.send(allocation, &frame[payload], peer),
                ClientAction::Connect {
                    allocation,
                    connection,
                    peer,
                } => {
                    let token = |k| Token(PEER_TCP_BASE + k);
                    let started = relays.tcp.len() < max_peers
                        && relays
                            .tcp
                            .connect(&relays.registry, allocation, connection, peer, token)
                            .is_ok();
                    if !started {
                        core.tcp_connected(connection, false, now);
                    }
                }
                ClientAction::Bind { len, connection } => {
                    // The rest of what the client sent is the data
                    // connection's.
                    stream.queue(&out[..len]);
                    stream.become_pipe(connection);
                    return false;
                }
                ClientAction::BindElsewhere { shard } => {
                    elsewhere = Some((shard, frame.to_vec()));
                    return false;
                }
                ClientAction::Move { .. } | ClientAction::Consumed | ClientAction::Drop(_) => {}
            }
            true
        });
        self.relays.flush();
        if let Some(started) = handshaking {
            self.handshakes += started.elapsed();
        }
        // A PROXY header named the client: the maps follow, and the client
        // counts against the per-IP cap from now.
        let awaited = stream.awaits_proxy_header();
        if let Some(old) = stream.readdressed.take() {
            self.metrics.proxy_headers[0].inc();
            self.clients.stream_by_client.remove(&old);
            self.clients.stream_by_client.insert(stream.client, j);
            let ip = stream.client.client.ip();
            let n = self.clients.per_ip.get(&ip).copied().unwrap_or(0);
            if n >= self.max_streams_per_ip {
                self.metrics.connections_rejected.inc();
                self.close_stream(j, stream);
                return true;
            }
            *self.clients.per_ip.entry(ip).or_insert(0) += 1;
            stream.counted_ip = Some(ip);
        } else if stream.counted_ip.is_none() && !awaited {
            // A LOCAL header: the balancer's own address counts.
            self.metrics.proxy_headers[1].inc();
            let ip = stream.client.client.ip();
            *self.clients.per_ip.entry(ip).or_insert(0) += 1;
            stream.counted_ip = Some(ip);
        }
        // An Allocate in this read makes the client trusted for what the
        // loop queues to it next (peer data) without waiting for its next
        // read.
        stream.trusted = self.core.has_allocation(&stream.client) || stream.pipe.is_some();
        if let Some((shard, packet)) = elsewhere {
            self.bind_elsewhere(j, stream, usize::from(shard), packet);
            return true;
        }
        if stream.pipe.is_some() && matches!(outcome, ReadOutcome::Open | ReadOutcome::More) {
            // Bound just now: the splice starts.
            self.clients.streams[j] = Some(stream);
            self.link_pipe(j);
            return true;
        }
        match outcome {
            ReadOutcome::Close => self.close_stream(j, stream),
            ReadOutcome::Https => {
                // Its ClientHello asked for HTTP: the front answers it on
                // a duplicate of the socket; the loop forgets it.
                if let Some((front, conn)) = stream.take_for_https() {
                    front.hand(conn);
                }
                self.close_stream(j, stream);
            }
            ReadOutcome::Garbage(reason) => {
                if awaited {
                    self.metrics.proxy_headers[2].inc();
                }
                self.core.record_drop(reason);
                if let Some(s) = self.service.as_mut().filter(|_| !self.turn) {
                    s.event(HostEvent::StreamGarbage);
                }
                self.close_stream(j, stream);
            }
            ReadOutcome::Open | ReadOutcome::More => {
                if stream.flush().is_err() {
                    self.close_stream(j, stream);
                    return true;
                }
                want_write(&self.registry, &mut stream, j);
                self.clients.streams[j] = Some(stream);
                return !matches!(outcome, ReadOutcome::More);
            }
        }
        true
    }

    /// Serves a ready DTLS listener: each datagram goes to its client's
    /// session, the plaintext it opens to the core, the core's answers back
    /// through the session. False when the read budget ran out.
    fn dtls_ready(&mut self, i: usize) -> bool {
        for _ in 0..BATCHES_PER_WAKE {
            let Some(socket) = self.clients.dtls_udp.get(i) else {
                return true;
            };
            match socket.try_recv_batch(&mut self.client_batch) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => continue,
            }
            let local = socket.local_addr();
            let now = Instant::now();
            for d in self.client_batch.datagrams() {
                let client = ClientSocket {
                    transport: Transport::Dtls,
                    client: d.from,
                    server: SocketAddr::new(d.to_ip.unwrap_or(local.ip()), local.port()),
                };
                let budget_spent = self.handshakes >= HANDSHAKE_TIME_PER_TURN;
                let (input, frames, plain) = {
                    let Clients {
                        dtls,
                        dtls_udp,
                        dtls_out,
                        send_errors,
                        ..
                    } = &mut self.clients;
                    let Some(sessions) = dtls.as_mut() else {
                        continue;
                    };
                    let mut emit = dtls_emitter(dtls_udp, dtls_out, send_errors);
                    let input = sessions.input(i, client, d.payload, now, budget_spent, &mut emit);
                    let frames = std::mem::take(&mut sessions.frames);
                    (input, frames, std::mem::take(&mut sessions.plain))
                };
                self.handshakes += input.handshake;
                if input.stray {
                    self.core.record_drop(crate::core::DropReason::Malformed);
                }
                for range in &frames {
                    let message = &plain[range.clone()];
                    let action = self.mobility.client_input(
                        &mut self.core,
                        message,
                        client,
                        now,
                        &mut self.out,
                        &mut self.relays,
                    );
                    match action {
                        ClientAction::Reply(len) => {
                            self.clients.deliver(&client, &self.out[..len]);
                        }
                        ClientAction::ToPeer {
                            allocation,
                            peer,
                            payload,
                        } => self.relays.send(allocation, &message[payload], peer),
                        ClientAction::Connect { .. }
                        | ClientAction::Bind { .. }
                        | ClientAction::BindElsewhere { .. }
                        | ClientAction::Move { .. }
                        | ClientAction::Consumed
                        | ClientAction::Drop(_) => {}
                    }
                }
                if let Some(sessions) = self.clients.dtls.as_mut() {
                    sessions.frames = frames;
                    sessions.plain = plain;
                }
                if input.closed {
                    self.core.handle_client_disconnected(client);
                }
            }
            self.relays.flush();
            self.clients.flush(&self.registry);
            self.end_closed_dtls();
            if self.client_batch.filled() < self.client_batch.capacity() {
                return true;
            }
        }
        false
    }

    /// Runs the DTLS sessions' due timers (retransmissions, deadlines).
    fn dtls_timers(&mut self, now: Instant) {
        {
            let Clients {
                dtls,
                dtls_udp,
                dtls_out,
                send_errors,
                ..
            } = &mut self.clients;
            let Some(sessions) = dtls.as_mut() else {
                return;
            };
            if sessions.next_timer().is_none_or(|t| t > now) {
                return;
            }
            sessions.tick(now, &mut dtls_emitter(dtls_udp, dtls_out, send_errors));
        }
        self.clients.flush(&self.registry);
        self.end_closed_dtls();
    }

    /// Ends the allocations of DTLS sessions that failed outside a read.
    fn end_closed_dtls(&mut self) {
        let Some(sessions) = self.clients.dtls.as_mut() else {
            return;
        };
        for client in sessions.take_closed() {
            self.core.handle_client_disconnected(client);
        }
    }

    /// Ends DTLS sessions that hold no allocation and stayed silent for the
    /// idle limit, and half-open ones past their lifetime.
    fn close_idle_dtls(&mut self, now: Instant) {
        let core = &self.core;
        if let Some(sessions) = self.clients.dtls.as_mut() {
            let closed = sessions.sweep(now, self.idle_timeout, |c| core.has_allocation(c));
            self.metrics.connections_idle_closed.inc_by(closed as u64);
        }
    }

    /// Closes connections that hold no allocation and stayed silent for
    /// the idle timeout.
    fn close_idle_streams(&mut self, now: Instant) {
        for j in 0..self.clients.streams.len() {
            let idle = self.clients.streams[j].as_ref().is_some_and(|s| {
                now.saturating_duration_since(s.last_active) >= self.idle_timeout
                    && s.pipe.is_none()
                    && !self.core.has_allocation(&s.client)
            });
            if idle && let Some(stream) = self.clients.streams[j].take() {
                self.metrics.connections_idle_closed.inc();
                self.close_stream(j, stream);
            }
        }
    }

    fn close_stream(&mut self, j: usize, mut stream: Stream) {
        if let Some(connection) = stream.pipe.take() {
            // A client data connection: its peer's goes with it.
            if let Some(&k) = self.relays.tcp.by_connection.get(&connection)
                && let Some(peer) = self.relays.tcp.remove(&self.registry, k)
            {
                self.core.tcp_closed(peer.connection);
            }
        }
        self.forget_stream(j, &mut stream);
        self.core.handle_client_disconnected(stream.client);
        if stream.client.transport == Transport::Tls {
            self.metrics.tls_connections.dec();
        } else {
            self.metrics.tcp_connections.dec();
        }
    }

    /// Takes a connection out of the loop's tables (it closes, or moves to
    /// another loop).
    fn forget_stream(&mut self, j: usize, stream: &mut Stream) {
        self.live_streams = self.live_streams.saturating_sub(1);
        let _ = self.registry.deregister(&mut stream.socket);
        self.clients.stream_by_client.remove(&stream.client);
        self.clients.stream_by_conn.remove(&stream.conn);
        if let Some(ip) = stream.counted_ip
            && let Some(n) = self.clients.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.clients.per_ip.remove(&ip);
            }
        }
        self.clients.free_streams.push(j);
        if let Some(s) = self.service.as_mut() {
            s.event(HostEvent::StreamClosed(
                stream.conn,
                stream.client.transport,
            ));
        }
    }
}

/// TCP allocations (RFC 6062): peers' connections, Connects, and the
/// splice between client and peer data connections.
impl EventLoop {
    /// Accepts peers' connections on TCP allocation `slot`'s relayed
    /// address; each the core admits is offered to the client. False when
    /// more wait past this turn's share (a flood of connections cannot
    /// hold the loop).
    fn accept_peers(&mut self, slot: usize) -> bool {
        for _ in 0..tcp_relay::ACCEPTS_PER_WAKE {
            let Some(Some((id, listener, _))) = self.relays.tcp.listeners.get(slot) else {
                return true;
            };
            let id = *id;
            let (socket, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "accepting a peer's connection failed");
                    return true;
                }
            };
            if self.relays.tcp.len() >= self.max_streams {
                // At the loop's cap: closed before the core hears of it.
                continue;
            }
            let Some(connection) = self.core.tcp_accepted(id, peer, Instant::now()) else {
                continue;
            };
            let _ = socket.set_nodelay(true);
            let token = |k| Token(PEER_TCP_BASE + k);
            if self
                .relays
                .tcp
                .add(&self.registry, socket, connection, false, token)
                .is_err()
            {
                self.core.tcp_closed(connection);
            }
        }
        false
    }

    /// A peer data connection is ready: a Connect's connection finished
    /// connecting, the peer sent something, or its socket drained.
    fn peer_tcp_ready(&mut self, k: usize) -> bool {
        let Some(peer) = self.relays.tcp.peers.get_mut(k).and_then(Option::as_mut) else {
            return true;
        };
        if peer.connecting {
            match peer.connect_outcome() {
                None => return true,
                Some(ok) => {
                    peer.connecting = false;
                    let connection = peer.connection;
                    if !self.core.tcp_connected(connection, ok, Instant::now()) {
                        self.relays.tcp.remove(&self.registry, k);
                        return true;
                    }
                }
            }
        }
        let Some(peer) = self.relays.tcp.peers.get_mut(k).and_then(Option::as_mut) else {
            return true;
        };
        if !peer.flush() {
            self.close_pair(k);
            return true;
        }
        if peer.closing {
            if peer.out.is_empty() {
                self.close_pair(k);
            }
            return true;
        }
        // Both ways on every event: a direction whose budget ran out is
        // revisited through either token (a read that finds nothing costs
        // one EAGAIN).
        peer.client_paused = peer.out.len() >= tcp_relay::HIGH_WATER;
        let to_peer = match peer.data {
            Some(j) => self.pipe_to_peer(j),
            None => true,
        };
        self.pipe_to_client(k) && to_peer
    }

    /// A client data connection is ready: it sent bytes for its peer, or
    /// drained what was queued for it.
    fn pipe_ready(&mut self, j: usize) -> bool {
        let Some(stream) = self.clients.streams.get_mut(j).and_then(Option::as_mut) else {
            return true;
        };
        let flushed = stream.flush();
        want_write(&self.registry, stream, j);
        let pending = stream.pending_len();
        let Some(&k) = stream
            .pipe
            .and_then(|c| self.relays.tcp.by_connection.get(&c))
        else {
            if let Some(stream) = self.clients.streams[j].take() {
                self.close_stream(j, stream);
            }
            return true;
        };
        let Some(peer) = self.relays.tcp.peers.get_mut(k).and_then(Option::as_mut) else {
            return true;
        };
        if flushed.is_err() || (peer.closing && pending == 0) {
            self.close_pair(k);
            return true;
        }
        // Both ways on every event (see `peer_tcp_ready`).
        let to_client = self.pipe_to_client(k);
        self.pipe_to_peer(j) && to_client
    }

    /// Moves what client data connection `j` sent to its peer; false when
    /// its read budget ran out with bytes still waiting.
    fn pipe_to_peer(&mut self, j: usize) -> bool {
        let Some(stream) = self.clients.streams.get_mut(j).and_then(Option::as_mut) else {
            return true;
        };
        let Some((connection, k)) = stream
            .pipe
            .and_then(|c| Some((c, *self.relays.tcp.by_connection.get(&c)?)))
        else {
            return true;
        };
        let Some(peer) = self.relays.tcp.peers.get_mut(k).and_then(Option::as_mut) else {
            return true;
        };
        if peer.closing || peer.client_paused {
            return true;
        }
        let mut relayed = 0;
        let mut full = false;
        let outcome = stream.read_raw(|bytes| {
            peer.out.extend_from_slice(bytes);
            relayed += bytes.len();
            full = peer.out.len() >= tcp_relay::HIGH_WATER;
            !full
        });
        let written = peer.flush();
        // Paused only while the buffer stays full: the write then met a
        // full socket, whose WRITABLE edge resumes it. A buffer the write
        // drained takes more now (no edge would come for it).
        peer.client_paused = peer.out.len() >= tcp_relay::HIGH_WATER;
        let again = full && !peer.client_paused;
        if relayed > 0 {
            self.core
                .tcp_relayed(connection, Direction::ClientToPeer, relayed);
        }
        match outcome {
            _ if !written => self.close_pair(k),
            ReadOutcome::Open if again => return false,
            ReadOutcome::Open => {}
            ReadOutcome::More => return false,
            // The client hung up: what it sent still goes to the peer.
            _ => {
                peer.closing = true;
                if peer.out.is_empty() {
                    self.close_pair(k);
                }
            }
        }
        true
    }

    /// Moves what peer `k` sent to its client data connection (once
    /// bound; before, it waits in the socket); false when the read budget
    /// ran out with bytes still waiting.
    fn pipe_to_client(&mut self, k: usize) -> bool {
        let Some(peer) = self.relays.tcp.peers.get_mut(k).and_then(Option::as_mut) else {
            return true;
        };
        let Some(j) = peer.data.filter(|_| !peer.connecting && !peer.closing) else {
            return true;
        };
        let Some(stream) = self.clients.streams.get_mut(j).and_then(Option::as_mut) else {
            return true;
        };
        let chunk = &mut self.tcp_chunk;
        let mut relayed = 0;
        let mut ended = false;
        let mut budget_left = true;
        let mut full = false;
        for round in 0..tcp_relay::READS_PER_WAKE {
            if stream.pending_len() >= tcp_relay::HIGH_WATER {
                full = true;
                break;
            }
            match peer.read(chunk) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    // Under the high-water mark plus a chunk: within the
                    // queue's cap, so never dropped.
                    stream.queue(&chunk[..n]);
                    relayed += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    ended = true;
                    break;
                }
            }
            if round + 1 == tcp_relay::READS_PER_WAKE {
                budget_left = false;
            }
        }
        let connection = peer.connection;
        let flushed = stream.flush();
        want_write(&self.registry, stream, j);
        let drained = stream.pending_len() == 0;
        // Paused only while the client's queue stays full: its WRITABLE
        // edge resumes it. A queue the write drained takes more now.
        if full && stream.pending_len() < tcp_relay::HIGH_WATER {
            budget_left = false;
        }
        if relayed > 0 {
            self.core
                .tcp_relayed(connection, Direction::PeerToClient, relayed);
        }
        if flushed.is_err() || (ended && drained) {
            self.close_pair(k);
        } else if ended {
            // The peer hung up: what it sent still goes to the client.
            if let Some(peer) = self.relays.tcp.peers.get_mut(k).and_then(Option::as_mut) {
                peer.closing = true;
            }
        }
        budget_left
    }

    /// Client data connection `j` was bound just now: joins it to its peer
    /// connection and starts the splice both ways.
    fn link_pipe(&mut self, j: usize) {
        let connection = self
            .clients
            .streams
            .get(j)
            .and_then(Option::as_ref)
            .and_then(|s| s.pipe);
        let peer = connection.and_then(|c| self.relays.tcp.by_connection.get(&c).copied());
        let Some(k) = peer else {
            // Its peer connection went meanwhile.
            if let Some(stream) = self.clients.streams[j].take() {
                self.close_stream(j, stream);
            }
            return;
        };
        if let Some(peer) = self.relays.tcp.peers[k].as_mut() {
            peer.data = Some(j);
        }
        self.pipe_ready(j);
        self.pipe_to_client(k);
    }

    /// Closes peer data connection `k` and its client data connection.
    fn close_pair(&mut self, k: usize) {
        let Some(peer) = self.relays.tcp.remove(&self.registry, k) else {
            return;
        };
        self.core.tcp_closed(peer.connection);
        if let Some(j) = peer.data
            && let Some(mut stream) = self.clients.streams.get_mut(j).and_then(Option::take)
        {
            stream.pipe = None;
            let _ = stream.flush();
            self.close_stream(j, stream);
        }
    }

    /// A ConnectionBind for a peer connection another loop holds: the
    /// client's connection goes there with it.
    fn bind_elsewhere(&mut self, j: usize, mut stream: Stream, shard: usize, packet: Vec<u8>) {
        self.forget_stream(j, &mut stream);
        let transfer = Transfer::Bind {
            stream: Box::new(stream),
            packet,
        };
        if let Err(Transfer::Bind { stream, .. }) = self.mobility.send(shard, transfer) {
            // No such loop, or its queue is full: the client tries again.
            if stream.client.transport == Transport::Tls {
                self.metrics.tls_connections.dec();
            } else {
                self.metrics.tcp_connections.dec();
            }
        }
    }

    /// Serves a connection another loop handed over with its
    /// ConnectionBind, and answers it.
    fn adopt_bound_stream(&mut self, mut stream: Stream, packet: &[u8]) {
        stream.want_write = false;
        let Some(j) = self.clients.register(&self.registry, &mut stream.socket) else {
            return;
        };
        if let Some(ip) = stream.counted_ip {
            *self.clients.per_ip.entry(ip).or_insert(0) += 1;
        }
        if let Some(s) = self.service.as_mut() {
            s.event(HostEvent::StreamOpened(stream.client.transport));
        }
        self.clients.stream_by_client.insert(stream.client, j);
        self.clients.stream_by_conn.insert(stream.conn, j);
        self.live_streams += 1;
        let action = self.core.handle_client_input(
            packet,
            stream.client,
            Instant::now(),
            &mut self.out,
            &mut self.relays,
        );
        match action {
            ClientAction::Reply(len) => {
                stream.queue(&self.out[..len]);
            }
            ClientAction::Bind { len, connection } => {
                stream.queue(&self.out[..len]);
                stream.become_pipe(connection);
            }
            _ => {}
        }
        let bound = stream.pipe.is_some();
        self.clients.streams[j] = Some(stream);
        if bound {
            self.link_pipe(j);
        } else if let Some(stream) = self.clients.streams[j].as_mut() {
            let _ = stream.flush();
            want_write(&self.registry, stream, j);
        }
    }
}

/// How often a loop reads its fast-path entries' counters (plain loads from
/// the program's memory-mapped counter array; one map lookup per capped
/// allocation's budget).
const FAST_PATH_READ: Duration = Duration::from_secs(1);

/// The key of `allocation`'s bandwidth budget in the kernel: unique across
/// the loops (each `shard` has its own slots), never 0.
fn cap_key(shard: usize, allocation: AllocationId) -> u64 {
    ((shard as u64 + 1) << 48)
        | ((u64::from(allocation.generation()) & 0xffff) << 32)
        | allocation.index() as u64
}

/// The XDP fast path: the core's channel bindings into the maps, and what
/// the kernel relayed back into the core's counters.
impl EventLoop {
    /// Applies one fast-path command of the core to the maps.
    fn fast_path(&mut self, f: &crate::core::FastPath) {
        let Some(xdp) = self.fast.xdp.clone() else {
            return;
        };
        let Some(keys) = crate::xdp::Keys::of(&f.client, f.channel, f.peer, f.relayed) else {
            return;
        };
        let Ok(mut x) = xdp.lock() else {
            return;
        };
        if keys.is_ipv6() && !x.ipv6 {
            return;
        }
        let cap = f.cap.filter(|&rate| rate > 0).map(|rate| crate::xdp::Cap {
            key: cap_key(self.shard, f.allocation),
            rate,
        });
        let installed = f.until.is_some_and(|until| x.install(&keys, until, cap));
        debug!(client = %f.client.client, channel = f.channel, peer = %f.peer, installed, removed = f.until.is_none(), "fast path");
        if let (true, Some(until)) = (installed, f.until) {
            let seen = match self.fast.entries.get(&keys) {
                Some(e) => e.2,
                None => {
                    if cap.is_some() {
                        self.fast.caps.entry(f.allocation).or_insert((0, 0)).0 += 1;
                    }
                    x.counters(&keys)
                }
            };
            self.fast.entries.insert(keys, (f.allocation, until, seen));
            return;
        }
        let last = x.remove(&keys);
        drop(x);
        if let Some((allocation, _, seen)) = self.fast.entries.remove(&keys) {
            self.account_fast_path(allocation, seen, last);
            self.fast_entry_gone(allocation);
        }
    }

    /// One of `allocation`'s entries left the kernel: with the last, its
    /// budget goes too (what it dropped since the last reading counted).
    fn fast_entry_gone(&mut self, allocation: AllocationId) {
        let Some(cap) = self.fast.caps.get_mut(&allocation) else {
            return;
        };
        cap.0 = cap.0.saturating_sub(1);
        if cap.0 > 0 {
            return;
        }
        let seen = cap.1;
        self.fast.caps.remove(&allocation);
        let key = cap_key(self.shard, allocation);
        let Some(xdp) = self.fast.xdp.clone() else {
            return;
        };
        let Ok(mut x) = xdp.lock() else {
            return;
        };
        let dropped = x.remove_cap(key);
        drop(x);
        self.core.fast_path_capped(dropped.saturating_sub(seen));
    }

    /// Counts what an entry relayed between two readings.
    fn account_fast_path(
        &mut self,
        allocation: AllocationId,
        seen: crate::xdp::EntryCounters,
        now: crate::xdp::EntryCounters,
    ) {
        for (direction, (a, b)) in [
            (Direction::ClientToPeer, (seen.to_peer, now.to_peer)),
            (Direction::PeerToClient, (seen.to_client, now.to_client)),
        ] {
            let packets = b.0.saturating_sub(a.0);
            if packets > 0 {
                self.core.fast_path_relayed(
                    allocation,
                    direction,
                    packets,
                    b.1.saturating_sub(a.1),
                );
            }
        }
    }

    /// Reads the entries' counters into the core, takes expired entries
    /// out, and publishes the fast path's metrics.
    fn read_fast_path(&mut self, now: Instant) {
        self.fast.next_read = now + FAST_PATH_READ;
        let Some(xdp) = self.fast.xdp.clone() else {
            return;
        };
        let Ok(mut x) = xdp.lock() else {
            return;
        };
        let mut readings = Vec::with_capacity(self.fast.entries.len());
        for (keys, &(allocation, until, seen)) in &self.fast.entries {
            let counters = if until <= now {
                x.remove(keys)
            } else {
                x.counters(keys)
            };
            readings.push((*keys, allocation, until <= now, seen, counters));
        }
        let mut capped = 0;
        for (&allocation, cap) in &mut self.fast.caps {
            let dropped = x.capped(cap_key(self.shard, allocation));
            capped += dropped.saturating_sub(cap.1);
            cap.1 = cap.1.max(dropped);
        }
        let stats = (self.shard == 0).then(|| (x.stats(), x.program_time()));
        drop(x);
        self.core.fast_path_capped(capped);
        for (keys, allocation, expired, seen, counters) in readings {
            self.account_fast_path(allocation, seen, counters);
            if expired {
                self.fast.entries.remove(&keys);
                self.fast_entry_gone(allocation);
            } else if let Some(e) = self.fast.entries.get_mut(&keys) {
                e.2 = counters;
            }
        }
        let live = self.fast.entries.len();
        self.metrics
            .xdp_entries
            .add(live as i64 - self.fast.published_entries as i64);
        self.fast.published_entries = live;
        if let Some((stats, program_time)) = stats {
            self.metrics
                .publish_xdp(&self.fast.published, &stats, program_time);
            self.fast.published = stats;
        }
    }
}

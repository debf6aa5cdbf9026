//! The participant's side: post connection data, receive the others', and
//! punch a direct UDP path with them. Blocking, on one UDP socket the caller
//! owns — the same socket for the Binding, the exchange and the punch, so
//! the NAT mapping CDX saw is the one the peer is told about.
//!
//! # Connection data (the plaintext inside a sealed entry)
//!
//! ```text
//! version 1 B (=1) | NAT class 1 B | candidates 1 B | per candidate:
//!   kind 1 B (1 host, 2 server-reflexive, 3 relayed, 4 predicted) |
//!   family 1 B (4, 6) |
//!   port 2 B BE | address 4 or 16 B
//! ```
//!
//! NAT class codes: 0 unknown, 1 open, 2 full-cone, 3 restricted-cone,
//! 4 port-restricted-cone, 5 symmetric, 6 udp-blocked.
//!
//! # Punching
//!
//! Both sides send probes to every candidate of the other every
//! [`PROBE_INTERVAL`], and answer each probe with an acknowledgement **to the
//! address the probe came from** (behind an address-dependent NAT that is
//! not the address the peer advertised), adding that address to the targets.
//! A side is connected when an acknowledgement comes back: its datagrams
//! reach the peer and the peer's reach it. It keeps answering probes for
//! [`LINGER`] so the peer can finish too. Probes and acknowledgements carry
//! an HMAC under a key derived from the session key, so nobody outside the
//! session can fake a path.
//!
//! ```text
//! "NXP1" | kind 1 B (1 probe, 2 ack) | participant 1 B | 0 0 | nonce 8 B |
//!   tag 16 B (HMAC-SHA-256 of the first 16 bytes)        = 32 B
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, Message, MessageType, Method, TransactionId,
};
use ring::hmac;

use natrix_model::PunchPlan;
use natrix_model::invitation::Invitation;
use std::os::fd::AsFd;

use natrix_cdx_proto::exchange::Entry;
use natrix_cdx_proto::exchange::client::delivery;
pub use natrix_cdx_proto::exchange::client::{
    Candidate, CandidateKind, ConnectionData, Exchanged, PostError, PostSeeds, Poster,
};

/// How often probes go out while punching.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long a connected side keeps answering the peer's probes.
pub const LINGER: Duration = Duration::from_millis(1000);
/// First retransmission timeout of a Post (RFC 8489 §6.2.1 timing, short).
const INITIAL_RTO: Duration = Duration::from_millis(100);
/// Longest gap between Post retransmissions, and the re-post interval while
/// entries of other participants are still missing.
const MAX_RTO: Duration = Duration::from_millis(1000);

/// Why an exchange or punch failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The socket failed.
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
    /// CDX refused the post.
    #[error("CDX refused the post: {code} {reason}")]
    Rejected {
        /// The STUN error code.
        code: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// No answer from CDX, or not every participant's entry, in time.
    #[error("exchange timed out: {}, {received} of {expected} entries received",
        if *.posted { "post acknowledged" } else { "no answer to the post" })]
    Timeout {
        /// Whether CDX answered the post.
        posted: bool,
        /// Entries received.
        received: usize,
        /// Entries expected (participants − 1).
        expected: usize,
    },
    /// No direct path within the time allowed.
    #[error("no direct path to the peer after {after:?} ({probes} probes sent)")]
    NoPath {
        /// The time allowed.
        after: Duration,
        /// Probes sent in that time.
        probes: u32,
    },
}

impl From<PostError> for ExchangeError {
    fn from(e: PostError) -> ExchangeError {
        match e {
            PostError::Rejected { code, reason } => ExchangeError::Rejected { code, reason },
            PostError::Timeout {
                posted,
                received,
                expected,
            } => ExchangeError::Timeout {
                posted,
                received,
                expected,
            },
        }
    }
}

/// Asks `server` for this socket's mapped address (one Binding transaction
/// with retransmissions); `None` if no answer came within `timeout`.
pub fn mapped_address(
    socket: &UdpSocket,
    server: SocketAddr,
    timeout: Duration,
) -> std::io::Result<Option<SocketAddr>> {
    let tid = TransactionId(rand::random());
    let mut req = [0u8; 64];
    let n = (|| {
        let mut enc = Encoder::new(
            &mut req,
            MessageType::new(Method::BINDING, Class::Request),
            &tid,
        )?;
        enc.fingerprint()?;
        Ok::<_, natrix_wire::EncodeError>(enc.finish())
    })()
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut rto = INITIAL_RTO;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        socket.send_to(&req[..n], server)?;
        let until = (Instant::now() + rto).min(deadline);
        rto = (rto * 2).min(MAX_RTO);
        while let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            socket.set_read_timeout(Some(left))?;
            let Ok((len, _)) = socket.recv_from(&mut buf) else {
                break;
            };
            let Ok(msg) = Message::parse(&buf[..len]) else {
                continue;
            };
            if msg.transaction_id() == tid
                && msg.class() == Class::Success
                && let Some(Ok(Attribute::XorMappedAddress(a))) =
                    msg.decode(AttributeType::XOR_MAPPED_ADDRESS)
            {
                return Ok(Some(a));
            }
        }
    }
    Ok(None)
}

/// How exchange messages travel: UDP datagrams to and from the CDX node,
/// or a TCP connection to it (clients that cannot send UDP).
trait Wire {
    /// Sends one message to the node.
    fn send(&mut self, message: &[u8]) -> std::io::Result<()>;
    /// The next message from the node, waiting at most `wait`.
    fn recv(&mut self, wait: Duration) -> std::io::Result<Option<Vec<u8>>>;
}

struct UdpWire<'a> {
    socket: &'a UdpSocket,
    server: SocketAddr,
}

impl Wire for UdpWire<'_> {
    fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(message, self.server).map(|_| ())
    }

    fn recv(&mut self, wait: Duration) -> std::io::Result<Option<Vec<u8>>> {
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; 2048];
        match self.socket.recv_from(&mut buf) {
            Ok((n, _)) => Ok(Some(buf[..n].to_vec())),
            // Timeouts, and ICMP errors for earlier sends: keep waiting.
            Err(_) => Ok(None),
        }
    }
}

struct TcpWire<'a> {
    stream: &'a mut std::net::TcpStream,
    frames: natrix_net::StreamFrames,
}

impl Wire for TcpWire<'_> {
    fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        self.stream.write_all(message)
    }

    fn recv(&mut self, wait: Duration) -> std::io::Result<Option<Vec<u8>>> {
        self.frames.next(self.stream, wait)
    }
}

/// Answers a Deliver request from CDX (the acknowledgement) and returns
/// its entry; `None` for anything else.
fn take_delivery<'a>(socket: &UdpSocket, packet: &'a [u8], from: SocketAddr) -> Option<Entry<'a>> {
    let (entry, ack) = delivery(packet)?;
    // A lost acknowledgement only means CDX sends the entry again.
    let _ = socket.send_to(&ack, from);
    Some(entry)
}

/// A delivery of another participant's entry that CDX sends after the
/// exchange (a participant that moved posts a newer entry): acknowledged,
/// opened with the session key; the participant, the entry's version and
/// its data. `None` for anything else (or an entry that does not open).
pub fn read_delivery(
    socket: &UdpSocket,
    invitation: &Invitation,
    packet: &[u8],
    from: SocketAddr,
) -> Option<(u8, u32, ConnectionData)> {
    let entry = take_delivery(socket, packet, from)?;
    let plain = natrix_model::invitation::open(
        &invitation.key,
        &invitation.session(),
        entry.participant,
        entry.seq,
        entry.sealed,
    )?;
    Some((
        entry.participant,
        entry.seq,
        ConnectionData::decode(&plain)?,
    ))
}

/// Posts `data` to CDX at `server` from `socket` and collects every other
/// participant's data. `profile` (PROFILE codes, see
/// `NatProfile::codes`) lets CDX count NAT behaviours. `seq` versions
/// the data: post a higher one when it changes.
pub fn exchange(
    socket: &UdpSocket,
    server: SocketAddr,
    invitation: &Invitation,
    data: &ConnectionData,
    profile: Option<[u8; 4]>,
    seq: u32,
    timeout: Duration,
) -> Result<Exchanged, ExchangeError> {
    exchange_over(
        &mut UdpWire { socket, server },
        invitation,
        data,
        profile,
        seq,
        timeout,
    )
}

/// [`exchange`] over a TCP connection to the CDX node, for participants
/// that cannot send UDP (they connect through a TURN relay over TCP and
/// post its relayed address).
pub fn exchange_tcp(
    stream: &mut std::net::TcpStream,
    invitation: &Invitation,
    data: &ConnectionData,
    profile: Option<[u8; 4]>,
    seq: u32,
    timeout: Duration,
) -> Result<Exchanged, ExchangeError> {
    exchange_over(
        &mut TcpWire {
            stream,
            frames: natrix_net::StreamFrames::default(),
        },
        invitation,
        data,
        profile,
        seq,
        timeout,
    )
}

fn exchange_over(
    wire: &mut dyn Wire,
    invitation: &Invitation,
    data: &ConnectionData,
    profile: Option<[u8; 4]>,
    seq: u32,
    timeout: Duration,
) -> Result<Exchanged, ExchangeError> {
    let seeds = PostSeeds {
        nonce: rand::random(),
        tid: rand::random(),
    };
    let mut poster = Poster::new(
        invitation,
        data,
        profile,
        seq,
        seeds,
        Instant::now(),
        timeout,
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    loop {
        let now = Instant::now();
        poster.handle_timeout(now);
        // Transmit first: the delivery that completes the exchange is
        // acknowledged before the outcome is returned.
        while let Some(t) = poster.poll_transmit(now) {
            match wire.send(&t.payload) {
                // A lost acknowledgement only means CDX sends the entry
                // again.
                Err(_) if t.ack => {}
                sent => sent?,
            }
        }
        if let Some(outcome) = poster.poll_outcome() {
            return outcome.map_err(ExchangeError::from);
        }
        let wait = poster
            .poll_timeout()
            .saturating_duration_since(Instant::now());
        if let Some(packet) = wire.recv(wait)? {
            poster.handle_input(&packet, Instant::now());
        }
    }
}

/// A direct path found by [`punch`] or [`punch_with`].
#[derive(Clone, Copy, Debug)]
pub struct Punched {
    /// The peer's address as this side receives it (where to send).
    pub peer: SocketAddr,
    /// Time from the start of punching to the first acknowledgement.
    pub elapsed: Duration,
    /// Round trip of the acknowledged probe.
    pub rtt: Duration,
    /// The fresh socket the path is on ([`PunchSockets::take`]); `None` for
    /// the exchange socket.
    pub fresh: Option<usize>,
    /// Probes sent until the path was found.
    pub probes: u32,
    /// The path is through the peer's relayed address: the peer raced its
    /// relay and no direct path answered before the deadline.
    pub relayed: bool,
    /// Time from the start of punching to the first acknowledgement on any
    /// path (the relayed one, when it answered before the direct one).
    pub first: Duration,
    /// That first acknowledgement came through the peer's relay.
    pub first_via_relay: bool,
}

const PROBE_MAGIC: &[u8; 4] = b"NXP1";
/// Length of a punch probe or acknowledgement.
pub const PROBE_LEN: usize = 32;

/// The punch messages of one participant, for paths [`punch`] does not
/// drive itself (e.g. through a TURN relay): probes to send, and the
/// verification of what arrives.
#[derive(Clone)]
pub struct ProbeCodec {
    key: hmac::Key,
    me: u8,
}

impl std::fmt::Debug for ProbeCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeCodec")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// A verified punch message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMessage {
    /// A probe from participant `from`; answer it with [`ProbeCodec::ack`].
    Probe {
        /// Who sent it.
        from: u8,
        /// Its nonce.
        nonce: [u8; 8],
    },
    /// The acknowledgement of one of our probes.
    Ack {
        /// Who sent it.
        from: u8,
        /// The nonce of our probe.
        nonce: [u8; 8],
    },
}

impl ProbeCodec {
    /// The codec of `invitation`'s participant.
    pub fn new(invitation: &Invitation) -> ProbeCodec {
        ProbeCodec {
            key: punch_key(invitation),
            me: invitation.participant(),
        }
    }

    /// A probe with `nonce`.
    pub fn probe(&self, nonce: [u8; 8]) -> [u8; PROBE_LEN] {
        probe(&self.key, 1, self.me, nonce)
    }

    /// The acknowledgement of a probe with `nonce`.
    pub fn ack(&self, nonce: [u8; 8]) -> [u8; PROBE_LEN] {
        probe(&self.key, 2, self.me, nonce)
    }

    /// Verifies `bytes`; `None` unless a probe or ack of this session.
    pub fn parse(&self, bytes: &[u8]) -> Option<ProbeMessage> {
        match parse_probe(&self.key, bytes)? {
            (1, from, nonce) => Some(ProbeMessage::Probe { from, nonce }),
            (2, from, nonce) => Some(ProbeMessage::Ack { from, nonce }),
            _ => None,
        }
    }
}

fn punch_key(invitation: &Invitation) -> hmac::Key {
    let derive = hmac::Key::new(hmac::HMAC_SHA256, &invitation.key.0);
    let k = hmac::sign(&derive, b"natrix punch v1");
    hmac::Key::new(hmac::HMAC_SHA256, k.as_ref())
}

fn probe(key: &hmac::Key, kind: u8, participant: u8, nonce: [u8; 8]) -> [u8; PROBE_LEN] {
    let mut p = [0u8; PROBE_LEN];
    p[..4].copy_from_slice(PROBE_MAGIC);
    p[4] = kind;
    p[5] = participant;
    p[8..16].copy_from_slice(&nonce);
    let tag = hmac::sign(key, &p[..16]);
    p[16..].copy_from_slice(&tag.as_ref()[..16]);
    p
}

fn parse_probe(key: &hmac::Key, b: &[u8]) -> Option<(u8, u8, [u8; 8])> {
    if b.len() != PROBE_LEN || &b[..4] != PROBE_MAGIC {
        return None;
    }
    let tag = hmac::sign(key, &b[..16]);
    let diff = tag.as_ref()[..16]
        .iter()
        .zip(&b[16..])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (diff == 0).then(|| (b[4], b[5], b[8..16].try_into().unwrap_or([0; 8])))
}

/// Punches a direct UDP path from `socket` to participant `peer_index`
/// whose data is `peer`, within `timeout`, probing its candidates (the
/// classic technique). Deliveries CDX still sends are acknowledged on the
/// way.
pub fn punch(
    socket: &UdpSocket,
    invitation: &Invitation,
    peer_index: u8,
    peer: &ConnectionData,
    timeout: Duration,
) -> Result<Punched, ExchangeError> {
    let plan = PunchPlan {
        deadline_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        ..PunchPlan::classic()
    };
    punch_with(
        socket,
        &PunchSockets::default(),
        invitation,
        peer_index,
        peer,
        &plan,
    )
}

/// Fresh sockets a punch plan asks for, opened before the exchange (so a
/// port-preserving side can announce one).
#[derive(Debug, Default)]
pub struct PunchSockets {
    sockets: Vec<UdpSocket>,
    announce: Option<Candidate>,
    /// The last of `sockets` is an IPv6 socket ([`PunchSockets::with_ipv6`]).
    ipv6: bool,
    /// The exchange socket reaches IPv4 through NAT64 with this prefix.
    nat64: Option<natrix_model::Nat64Prefix>,
}

/// How long a side connected over IPv4 keeps trying the peer's IPv6
/// candidates before it settles (RFC 8305's connection attempt delay):
/// an IPv6 path that answers within it is preferred.
pub const IPV6_GRACE: Duration = Duration::from_millis(250);

/// Most fresh sockets one punch opens, whatever a plan says.
pub const MAX_PUNCH_SOCKETS: u16 = 1024;
/// Most random ports one punch probes, whatever a plan says.
pub const MAX_SPRAY: u16 = 4096;
/// Random-port probes per millisecond (the birthday's easy side): 1,600 take
/// 2.7 s.
const SPRAY_PER_MS: f64 = 0.6;
/// Fresh sockets' first probes per millisecond (256 take 64 ms).
const FRESH_PER_MS: f64 = 4.0;
/// How often a birthday's fresh sockets probe again until the peer's probes
/// reach one: once per attempt (the mapping lives for the attempt).
const FRESH_INTERVAL: Duration = Duration::from_secs(3600);

impl PunchSockets {
    /// Opens what `plan` asks of this side, bound like `socket`: its fresh
    /// sockets and, behind a port-preserving NAT (`announce`), the candidate
    /// to tell the peer — `mapped`'s address with the fresh socket's local
    /// port.
    pub fn open(
        socket: &UdpSocket,
        mapped: Option<SocketAddr>,
        plan: &PunchPlan,
    ) -> std::io::Result<PunchSockets> {
        let local = socket.local_addr()?;
        let mut sockets = Vec::new();
        for _ in 0..plan.sockets.min(MAX_PUNCH_SOCKETS) {
            let s = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
            s.set_nonblocking(true)?;
            sockets.push(s);
        }
        let announce = match (plan.announce, mapped, sockets.first()) {
            (true, Some(m), Some(s)) => Some(Candidate {
                kind: CandidateKind::Predicted,
                addr: SocketAddr::new(m.ip(), s.local_addr()?.port()),
            }),
            _ => None,
        };
        Ok(PunchSockets {
            sockets,
            announce,
            ipv6: false,
            nat64: None,
        })
    }

    /// Adds `socket`, bound on IPv6, for a path over IPv6 beside the IPv4
    /// one: it probes the peer's IPv6 candidates from the start, and a path
    /// found on it is preferred ([`IPV6_GRACE`]). When the exchange socket
    /// reaches IPv4 through NAT64 (`nat64`), each keeps to its own: the
    /// exchange socket probes the synthesized addresses, this one the
    /// native IPv6 ones (both sides then hold the pair they found).
    pub fn with_ipv6(
        mut self,
        socket: UdpSocket,
        nat64: Option<natrix_model::Nat64Prefix>,
    ) -> std::io::Result<PunchSockets> {
        socket.set_nonblocking(true)?;
        self.sockets.push(socket);
        self.ipv6 = true;
        self.nat64 = nat64;
        Ok(self)
    }

    /// The IPv6 socket's index among the fresh ones, if there is one.
    fn ipv6_index(&self) -> Option<usize> {
        self.ipv6
            .then(|| self.sockets.len().checked_sub(1))
            .flatten()
    }

    /// The candidate to add to this side's connection data, if any.
    pub fn candidate(&self) -> Option<Candidate> {
        self.announce
    }

    /// The fresh socket the path was found on (its index in [`Punched`]);
    /// the others are closed when `self` is dropped.
    pub fn take(&mut self, index: usize) -> Option<UdpSocket> {
        (index < self.sockets.len()).then(|| self.sockets.swap_remove(index))
    }
}

/// Where one socket of a punch sends its probes.
struct Prober {
    targets: Vec<SocketAddr>,
    /// When it next probes all its targets.
    next: Instant,
    interval: Duration,
}

impl Prober {
    /// Adds a target unless known, up to [`MAX_TARGETS`].
    fn add(&mut self, to: SocketAddr) {
        if !self.targets.contains(&to) && self.targets.len() < MAX_TARGETS {
            self.targets.push(to);
        }
    }

    /// When due at `now`, sends `probe` from `socket` to every target and
    /// schedules the next round; the probes sent.
    fn send_due(&mut self, socket: &UdpSocket, probe: &[u8], now: Instant) -> u32 {
        if now < self.next {
            return 0;
        }
        for t in &self.targets {
            // Unreachable candidates (e.g. a private host address) fail.
            let _ = socket.send_to(probe, *t);
        }
        self.next = now + self.interval;
        self.targets.len() as u32
    }
}

/// Most targets one socket keeps (the candidates, a window and the sources
/// of verified probes).
const MAX_TARGETS: usize = 64;

/// The ports a sequential NAT will give next: `window` ports past its
/// mapped (server-reflexive) address `srflx`, `stride` apart, in order.
fn predicted(srflx: SocketAddr, window: u16, stride: i32) -> Vec<SocketAddr> {
    (1..=i32::from(window))
        .filter_map(|k| {
            let port = i32::from(srflx.port()) + k * stride;
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .map(|p| SocketAddr::new(srflx.ip(), p))
        })
        .collect()
}

/// Punches a direct path to participant `peer_index` (whose data is `peer`)
/// as `plan` says: from `socket`, probing a sequential peer's predicted ports
/// first and then its candidates, spraying random ports of its address for
/// a birthday's easy side; from each of `fresh`'s sockets toward the peer
/// (a birthday's hard side, or a port-preserving side's announced socket,
/// which sends to its one best target only). Gives up at the plan's
/// deadline. Every send is paced and counted ([`Punched::probes`]).
pub fn punch_with(
    socket: &UdpSocket,
    fresh: &PunchSockets,
    invitation: &Invitation,
    peer_index: u8,
    peer: &ConnectionData,
    plan: &PunchPlan,
) -> Result<Punched, ExchangeError> {
    let key = punch_key(invitation);
    let me = invitation.participant();
    let started = Instant::now();
    let timeout = Duration::from_millis(u64::from(plan.deadline_ms));
    let deadline = started + timeout;
    // The exchange socket probes the candidates of its own family; an IPv6
    // socket beside it (a dual-stack side) the IPv6 ones.
    let v6 = socket.local_addr()?.is_ipv6();
    let native6 = |a: &SocketAddr| a.is_ipv6() && !fresh.nat64.is_some_and(|p| p.contains(a.ip()));
    let same = |a: &SocketAddr| match fresh.nat64 {
        Some(p) => p.contains(a.ip()),
        None => a.is_ipv6() == v6,
    };
    let of_kind = |kind: CandidateKind| {
        peer.candidates
            .iter()
            .find(|c| c.kind == kind && same(&c.addr))
            .map(|c| c.addr)
    };
    let srflx = of_kind(CandidateKind::ServerReflexive);
    let announced = of_kind(CandidateKind::Predicted);
    let window = srflx.map_or_else(Vec::new, |a| predicted(a, plan.window, plan.peer_stride));
    // A relayed candidate is a plain UDP address for us (relay-one: the
    // peer allocated, we send straight to its relayed address). The
    // predicted window goes first: behind a sequential NAT on our side too,
    // the order of first sends decides which of our ports meets which.
    let mut main = Prober {
        targets: window.clone(),
        next: started,
        interval: PROBE_INTERVAL,
    };
    // Then a port-preserving peer's announced socket: its first send
    // toward that address may be our first new mapping (a sequential NAT's
    // predicted one).
    main.targets.truncate(MAX_TARGETS);
    for to in announced
        .into_iter()
        .chain(peer.candidates.iter().map(|c| c.addr))
        .filter(same)
    {
        main.add(to);
    }
    let best = window.first().copied().or(announced).or(srflx).or(peer
        .candidates
        .iter()
        .map(|c| c.addr)
        .find(same));
    let ipv6_socket = fresh.ipv6_index();
    // Whether socket `i` of the punch (0: the exchange socket) is the IPv6 one.
    let on_ipv6 = |i: usize| ipv6_socket.is_some() && i.checked_sub(1) == ipv6_socket;
    let mut extra: Vec<Prober> = fresh
        .sockets
        .iter()
        .enumerate()
        .map(|(i, _)| {
            if Some(i) == ipv6_socket {
                // Every IPv6 candidate, from the start.
                let mut p = Prober {
                    targets: Vec::new(),
                    next: started,
                    interval: PROBE_INTERVAL,
                };
                for c in peer.candidates.iter().filter(|c| native6(&c.addr)) {
                    p.add(c.addr);
                }
                return p;
            }
            Prober {
                targets: best.into_iter().collect(),
                // Not yet: first sends are paced.
                next: deadline,
                interval: if fresh.announce.is_some() {
                    PROBE_INTERVAL
                } else {
                    FRESH_INTERVAL
                },
            }
        })
        .collect();
    // Connected over IPv4 with IPv6 candidates untried: wait this long for
    // an IPv6 path before settling.
    let try_ipv6 = ipv6_socket.is_some_and(|i| !extra[i].targets.is_empty());
    let mut ipv6_until: Option<Instant> = None;
    // A peer that raced its relay offers its relayed address besides direct
    // ones: an answer from there is the first path, but the direct attempt
    // goes on until it is confirmed or the deadline passes. (A peer that
    // offers only a relayed address is relayed by plan: its answer is the
    // path.)
    let racing: Vec<SocketAddr> = if peer
        .candidates
        .iter()
        .any(|c| c.kind != CandidateKind::Relayed)
    {
        peer.candidates
            .iter()
            .filter(|c| c.kind == CandidateKind::Relayed)
            .map(|c| c.addr)
            .collect()
    } else {
        Vec::new()
    };
    let mut via_relay: Option<Punched> = None;
    let spray_ip = srflx.map(|a| a.ip());
    let spray_total = if spray_ip.is_some() {
        plan.spray.min(MAX_SPRAY)
    } else {
        0
    };
    let mut sprayed: std::collections::HashSet<u16> = std::collections::HashSet::new();
    let mut fresh_started = 0usize;
    let mut probes: u32 = 0;
    let mut nonce: [u8; 8] = rand::random();
    // The probe of the current round (every socket sends the same).
    let mut p = probe(&key, 1, me, nonce);
    let mut sent: Vec<([u8; 8], Instant)> = Vec::new();
    let mut connected: Option<Punched> = None;
    let mut buf = [0u8; 2048];
    let all: Vec<&UdpSocket> = std::iter::once(socket).chain(&fresh.sockets).collect();
    let fds: Vec<_> = all.iter().map(|s| s.as_fd()).collect();
    socket.set_nonblocking(true)?;
    let result = loop {
        let now = Instant::now();
        let waiting_ipv6 = ipv6_until.is_some_and(|t| now < t);
        if let Some(p) = connected
            && now >= started + p.elapsed + LINGER
            && !waiting_ipv6
        {
            break Ok(p);
        }
        if now >= deadline {
            break connected.or(via_relay).ok_or(ExchangeError::NoPath {
                after: timeout,
                probes,
            });
        }
        let since = now.duration_since(started).as_secs_f64() * 1000.0;
        if connected.is_none() {
            if now >= main.next {
                // A new nonce per round: an ack names the round it answers.
                nonce = rand::random();
                sent.push((nonce, now));
                if sent.len() > 256 {
                    sent.remove(0);
                }
                p = probe(&key, 1, me, nonce);
                probes += main.send_due(socket, &p, now);
            }
            // Fresh sockets start paced, then probe every interval.
            let due = ((since * FRESH_PER_MS) as usize + 1).min(extra.len());
            for e in &mut extra[fresh_started..due] {
                e.next = now;
            }
            fresh_started = fresh_started.max(due);
            for (e, s) in extra.iter_mut().zip(&fresh.sockets) {
                probes += e.send_due(s, &p, now);
            }
            if let Some(ip) = spray_ip {
                let due = ((since * SPRAY_PER_MS) as usize + 1).min(usize::from(spray_total));
                while sprayed.len() < due {
                    let port = 1024 + rand::random::<u16>() % (u16::MAX - 1023);
                    if sprayed.insert(port) {
                        let _ = socket.send_to(&p, SocketAddr::new(ip, port));
                        probes += 1;
                    }
                }
            }
        } else if waiting_ipv6 && let Some(i) = ipv6_socket {
            // Connected over IPv4: the IPv6 candidates still get probed.
            probes += extra[i].send_due(&fresh.sockets[i], &p, now);
        }
        let mut until = match connected {
            Some(p) => (started + p.elapsed + LINGER).min(deadline),
            None => main.next.min(deadline),
        };
        if let (true, Some(i), Some(t)) = (waiting_ipv6, ipv6_socket, ipv6_until) {
            until = until.min(extra[i].next).min(t);
        }
        if connected.is_none() {
            if sprayed.len() < usize::from(spray_total) || fresh_started < extra.len() {
                until = until.min(now + Duration::from_millis(2));
            }
            if let Some(e) = extra.iter().map(|e| e.next).min() {
                until = until.min(e);
            }
        }
        let wait = until.saturating_duration_since(Instant::now());
        let ready = match natrix_net::wait_readable(&fds, wait.max(Duration::from_millis(1))) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        for i in ready {
            let s = all[i];
            // Everything queued on that socket.
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                let packet = &buf[..len];
                if let Some((kind, who, n)) = parse_probe(&key, packet) {
                    if who != peer_index {
                        continue;
                    }
                    match kind {
                        1 => {
                            // Answer where it came from, and probe there too.
                            let _ = s.send_to(&probe(&key, 2, me, n), from);
                            let prober = if i == 0 {
                                &mut main
                            } else {
                                // The peer's probes reach this fresh socket
                                // (a birthday's hit): probe back at once,
                                // and as often as the main socket.
                                let e = &mut extra[i - 1];
                                e.interval = PROBE_INTERVAL;
                                e.next = e.next.min(Instant::now());
                                e
                            };
                            prober.add(from);
                        }
                        2 if connected.is_none()
                            || (ipv6_until.is_some_and(|t| Instant::now() < t) && on_ipv6(i)) =>
                        {
                            if let Some((_, at)) = sent.iter().find(|(x, _)| *x == n) {
                                let relayed = racing.contains(&from);
                                let elapsed = started.elapsed();
                                let found = Punched {
                                    peer: from,
                                    elapsed,
                                    rtt: at.elapsed(),
                                    fresh: i.checked_sub(1),
                                    probes,
                                    relayed,
                                    first: via_relay.map_or(elapsed, |r| r.first),
                                    first_via_relay: via_relay.is_some() || relayed,
                                };
                                if relayed {
                                    if via_relay.is_none() {
                                        via_relay = Some(found);
                                    }
                                } else if let Some(over_ipv4) = connected {
                                    // The IPv6 path answered in its grace:
                                    // it is the path.
                                    connected = Some(Punched {
                                        first: over_ipv4.first,
                                        first_via_relay: over_ipv4.first_via_relay,
                                        ..found
                                    });
                                    ipv6_until = None;
                                } else {
                                    connected = Some(found);
                                    if try_ipv6 && !on_ipv6(i) {
                                        ipv6_until = Some(Instant::now() + IPV6_GRACE);
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                // Deliveries from CDX: acknowledge so it stops sending; a
                // newer entry of the peer (it moved) adds its candidates.
                if i == 0
                    && let Some((who, _, data)) = read_delivery(socket, invitation, packet, from)
                    && who == peer_index
                {
                    for c in data.candidates {
                        main.add(c.addr);
                    }
                }
            }
        }
    };
    socket.set_nonblocking(false)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_verify_only_under_the_session_key() {
        let inv = |k: u8| Invitation {
            ticket: [0; 44],
            key: natrix_model::invitation::SessionKey([k; 32]),
            mover: None,
        };
        let key = punch_key(&inv(1));
        let p = probe(&key, 1, 0, [7; 8]);
        assert_eq!(parse_probe(&key, &p), Some((1, 0, [7; 8])));
        assert_eq!(parse_probe(&punch_key(&inv(2)), &p), None);
        let mut forged = p;
        forged[5] = 1;
        assert_eq!(parse_probe(&key, &forged), None);
    }
}

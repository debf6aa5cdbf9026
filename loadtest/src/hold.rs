//! Keeping a path after the punch: keepalives on a direct path or through
//! an allocation, finding a broken path again (a new punch, TURN mobility)
//! and the report of what holding showed.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::Context;
use natrix_cdx::exchange::client::{
    ConnectionData, ExchangeError, ProbeCodec, ProbeMessage, exchange, mapped_address, punch,
    read_delivery,
};
use natrix_model::invitation::Invitation;
use natrix_wire::{ChannelData, ChannelNumber};

use crate::e2e::{RelayedPath, direct_candidates};
use crate::turn::TurnClient;

/// The payload of what the relay sent us from the peer on `channel` (or in
/// a Data indication from the peer's address).
fn from_peer(packet: &[u8], channel: ChannelNumber, peer: SocketAddr) -> Option<Vec<u8>> {
    if let Ok(cd) = ChannelData::parse(packet) {
        return (cd.channel == channel.value()).then(|| cd.payload.to_vec());
    }
    let (from, data) = data_indication(packet)?;
    (from.ip() == peer.ip()).then_some(data)
}

/// Holds a relayed path like [`keep_path`] a direct one: a probe through
/// the allocation's channel every `hold.keepalive`, the peer's answered,
/// one last probe to be acknowledged within a second. With `hold.recover`
/// a path that breaks (no acknowledgement for three keepalives: the
/// client's address changed and the relay no longer knows its 5-tuple)
/// moves the allocation to a fresh socket on `local` with its mobility
/// ticket (RFC 8016): the relayed address stays, so the peer needs nothing.
pub(crate) fn hold_via_turn(
    turn: &mut TurnClient,
    codec: &ProbeCodec,
    peer_index: u8,
    path: RelayedPath,
    hold: Hold,
    local: IpAddr,
) -> anyhow::Result<Held> {
    let held = keep_via_turn(turn, codec, peer_index, path, hold, local)?;
    // The peer's hold may have started a little later: answer its last
    // keepalives a while longer.
    let until = Instant::now() + 2 * natrix_cdx::exchange::client::LINGER;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let Ok(Some(packet)) = turn.link.recv(left) else {
            continue;
        };
        if let Some(payload) = from_peer(&packet, path.channel, path.peer)
            && let Some(ProbeMessage::Probe { from, nonce }) = codec.parse(&payload)
            && from == peer_index
        {
            let _ = turn.send_channel_data(path.channel, &codec.ack(nonce));
        }
    }
    Ok(held)
}

/// [`hold_via_turn`]'s keepalives, moves and last check.
fn keep_via_turn(
    turn: &mut TurnClient,
    codec: &ProbeCodec,
    peer_index: u8,
    path: RelayedPath,
    hold: Hold,
    local: IpAddr,
) -> anyhow::Result<Held> {
    let mut keepalives = Keepalives::new(Instant::now(), &hold);
    let mut held = Held {
        peer_before: Some(path.peer),
        peer_after: Some(path.peer),
        ..Held::default()
    };
    let mut last_move: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if keepalives.unanswered(now) {
            return Ok(held);
        }
        if hold.recover
            && turn.is_mobile()
            && keepalives.silent(now)
            && last_move.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            match turn.rebind(SocketAddr::new(local, 0)) {
                Ok(()) => {
                    held.recoveries += 1;
                    keepalives.send_now();
                }
                Err(e) => held.error = Some(format!("{e:#}")),
            }
            last_move = Some(Instant::now());
            continue;
        }
        if let Some(nonce) = keepalives.due(now) {
            // A send error (the old route gone) is a lost keepalive.
            let _ = turn.send_channel_data(path.channel, &codec.probe(nonce));
            held.sent += 1;
        }
        let wait = keepalives
            .wake_at(hold.recover)
            .saturating_duration_since(Instant::now());
        let packet = match turn.link.recv(wait) {
            Ok(Some(p)) => p,
            // ICMP errors for a vanished route read as errors: keep going.
            Ok(None) | Err(_) => continue,
        };
        let Some(payload) = from_peer(&packet, path.channel, path.peer) else {
            continue;
        };
        match codec.parse(&payload) {
            Some(ProbeMessage::Probe { from, nonce }) if from == peer_index => {
                let _ = turn.send_channel_data(path.channel, &codec.ack(nonce));
            }
            Some(ProbeMessage::Ack { from, nonce }) if from == peer_index => {
                let last = keepalives.acked(nonce, &mut held);
                if last == Some(true) {
                    held.held = true;
                    return Ok(held);
                }
            }
            _ => {}
        }
    }
}

/// When a held path's keepalives go out, those awaiting an answer, and the
/// last one (sent once the hold is over, to be answered within a second).
struct Keepalives {
    end: Instant,
    every: Duration,
    next: Instant,
    /// Each with whether it was answered (over either path).
    sent: std::collections::VecDeque<([u8; 8], Instant, bool)>,
    last: Option<Instant>,
    /// The last answer (or the start, before any).
    last_ack: Instant,
}

impl Keepalives {
    fn new(start: Instant, hold: &Hold) -> Keepalives {
        let every = hold.keepalive.unwrap_or(Duration::from_secs(15));
        Keepalives {
            end: start + hold.duration,
            every,
            next: start + every.min(hold.duration),
            sent: Default::default(),
            last: None,
            last_ack: start,
        }
    }

    /// How long without an answer means the path broke: three keepalives.
    fn broken(&self) -> Duration {
        (3 * self.every).max(Duration::from_millis(150))
    }

    /// True when the path went silent (no answer for [`Self::broken`])
    /// while the hold is still on: time to find it again.
    fn silent(&self, now: Instant) -> bool {
        !self.finishing() && now.duration_since(self.last_ack) >= self.broken()
    }

    /// Like [`Self::silent`], counting from `since` at the earliest (when
    /// the session moved to another path).
    fn silent_since(&self, now: Instant, since: Instant) -> bool {
        !self.finishing() && now.duration_since(self.last_ack.max(since)) >= self.broken()
    }

    /// The path was found again at `at`: the gap since the last answer is
    /// an outage, and the path counts as answering from now.
    fn found_again(&mut self, at: Instant, held: &mut Held) {
        held.outage = held.outage.max(at.saturating_duration_since(self.last_ack));
        self.last_ack = Instant::now();
    }

    /// The nonce of a keepalive due at `now`, recorded as sent.
    fn due(&mut self, now: Instant) -> Option<[u8; 8]> {
        if self.last.is_some() || now < self.next {
            return None;
        }
        let nonce: [u8; 8] = rand::random();
        self.sent.push_back((nonce, now, false));
        if self.sent.len() > 64 {
            self.sent.pop_front();
        }
        if now >= self.end {
            self.last = Some(now);
        } else {
            self.next = (now + self.every).min(self.end);
        }
        Some(nonce)
    }

    /// The next keepalive goes out at once (the path was just found again).
    fn send_now(&mut self) {
        self.next = Instant::now();
    }

    /// True once the hold is over and its last keepalive is out.
    fn finishing(&self) -> bool {
        self.last.is_some()
    }

    /// True when the last keepalive went a second without an answer.
    fn unanswered(&self, now: Instant) -> bool {
        self.last
            .is_some_and(|at| now >= at + Duration::from_secs(1))
    }

    /// When to wake: the next keepalive, or the end of the last one's wait;
    /// when `watching` for silence, no later than the path would be broken.
    fn wake_at(&self, watching: bool) -> Instant {
        let at = self
            .last
            .map_or(self.next, |at| at + Duration::from_secs(1));
        if watching && !self.finishing() {
            at.min(self.last_ack + self.broken())
        } else {
            at
        }
    }

    /// Counts an answer to `nonce` in `held` (acknowledged, the gap since
    /// the last answer); whether it answers the last keepalive (`None`: not
    /// one of ours).
    fn acked(&mut self, nonce: [u8; 8], held: &mut Held) -> Option<bool> {
        let (_, at, answered) = self.sent.iter_mut().find(|(n, ..)| *n == nonce)?;
        let at = *at;
        // A keepalive sent on both paths is counted once.
        if !std::mem::replace(answered, true) {
            let now = Instant::now();
            held.acked += 1;
            held.outage = held.outage.max(now.duration_since(self.last_ack));
            self.last_ack = now;
        }
        Some(self.last.is_some_and(|last| at >= last))
    }

    /// True for the nonce of one of our recent keepalives.
    fn knows(&self, nonce: [u8; 8]) -> bool {
        self.sent.iter().any(|(n, ..)| *n == nonce)
    }
}

/// The peer address and data of a TURN Data indication.
pub(crate) fn data_indication(packet: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
    use natrix_wire::{Attribute, AttributeType, Class, Message, Method};
    let msg = Message::parse(packet).ok()?;
    if msg.method() != Method::DATA || msg.class() != Class::Indication {
        return None;
    }
    let peer = match msg.decode(AttributeType::XOR_PEER_ADDRESS)? {
        Ok(Attribute::XorPeerAddress(a)) => a,
        _ => return None,
    };
    Some((peer, msg.get(AttributeType::DATA)?.to_vec()))
}

/// How long a side keeps its direct path after punching, and how often it
/// sends a keepalive on it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hold {
    pub(crate) duration: Duration,
    /// The keepalive interval; `None`: the plan's (`keepalive_ms`).
    pub(crate) keepalive: Option<Duration>,
    /// When the path breaks (no acknowledgement for three keepalives), find
    /// it again: a new Binding, a newer entry through CDX (from a new
    /// address: a proven move), a new punch.
    pub(crate) recover: bool,
}

/// What holding a path showed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Held {
    /// Keepalives sent and acknowledged.
    pub(crate) sent: u32,
    pub(crate) acked: u32,
    /// The last keepalive (sent once the hold was over) was acknowledged
    /// within a second: the path outlived the idle gaps (or was found again).
    pub(crate) held: bool,
    /// Times the path was found again after it broke.
    pub(crate) recoveries: u32,
    /// The longest time between two acknowledgements (or from the start to
    /// the first): how long the session could not carry data.
    pub(crate) outage: Duration,
    /// Why the last recovery failed, if one did.
    pub(crate) error: Option<String>,
    /// Times the session moved to the relay when the direct path broke,
    /// and back to the direct path when it answered again.
    pub(crate) fallbacks: u32,
    pub(crate) returns: u32,
    /// The hold ended on the relay.
    pub(crate) on_relay: bool,
    /// Where the peer was at the start and at the end of the hold.
    pub(crate) peer_before: Option<SocketAddr>,
    pub(crate) peer_after: Option<SocketAddr>,
}

impl Held {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sent": self.sent, "acked": self.acked, "held": self.held,
            "recoveries": self.recoveries,
            "fallbacks": self.fallbacks, "returns": self.returns, "on_relay": self.on_relay,
            "outage_ms": self.outage.as_secs_f64() * 1000.0,
            "error": self.error,
            "peer_before": self.peer_before.map(|a| a.to_string()),
            "peer_after": self.peer_after.map(|a| a.to_string()),
        })
    }
}

/// What a side needs to find its path again after it broke.
pub(crate) struct Recovery<'a> {
    pub(crate) cdx: SocketAddr,
    pub(crate) invitation: &'a Invitation,
    /// The peer's latest connection data.
    pub(crate) peer: ConnectionData,
    pub(crate) peer_seq: u32,
    /// The version of our last entry.
    pub(crate) seq: u32,
}

impl Recovery<'_> {
    /// A new Binding, a newer entry, a new punch toward the peer's latest
    /// data (newer entries delivered meanwhile join the punch's targets).
    fn recover(
        &mut self,
        socket: &UdpSocket,
        peer_index: u8,
    ) -> anyhow::Result<(Instant, SocketAddr)> {
        let mapped = mapped_address(socket, self.cdx, Duration::from_millis(500))?
            .context("no Binding answer from CDX")?;
        let data = ConnectionData {
            class: None,
            candidates: direct_candidates(socket, self.cdx, mapped)?.to_vec(),
        };
        self.seq += 1;
        // CDX answers a participant's newer post with the entries it has not
        // acknowledged yet: when the peer has not moved (or not posted
        // again yet) there are none. A stored post is enough — the peer's
        // newer entry, if any, comes as a delivery while we punch.
        match exchange(
            socket,
            self.cdx,
            self.invitation,
            &data,
            None,
            self.seq,
            Duration::from_millis(500),
        ) {
            Ok(got) => {
                if let Some(p) = got.peers.get(&peer_index) {
                    self.peer = p.clone();
                }
            }
            Err(ExchangeError::Timeout { posted: true, .. }) => {}
            Err(e) => return Err(e).context("posting the newer entry"),
        }
        let started = Instant::now();
        let p = punch(
            socket,
            self.invitation,
            peer_index,
            &self.peer,
            Duration::from_secs(2),
        )
        .context("punching again")?;
        Ok((started + p.elapsed, p.peer))
    }
}

/// The relay path a direct side keeps for when its direct path breaks: a
/// racing side's allocation (refreshed while it holds), or, for its peer,
/// the racing side's relayed address.
pub(crate) enum Standby<'a> {
    /// This side raced its relay: the allocation, and the channel its race
    /// bound to the peer as the relay sees it.
    Own {
        turn: &'a mut TurnClient,
        path: RelayedPath,
    },
    /// The peer raced: its relayed address, reached from the socket the
    /// peer's relay probed (the exchange socket).
    Peer {
        socket: &'a UdpSocket,
        relayed: SocketAddr,
    },
}

/// How often a kept allocation is refreshed, with its channel and
/// permission (both last 5 minutes or more; the allocation 10).
const STANDBY_REFRESH: Duration = Duration::from_secs(120);

/// Which path a packet came on or goes out on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    /// The direct path, from or to this address.
    Direct(SocketAddr),
    /// The relay.
    Standby,
}

/// A held path's sockets: the direct path's, and the standby's.
struct Paths<'a> {
    socket: &'a UdpSocket,
    standby: Option<Standby<'a>>,
    /// The peer's relay is reached from a socket other than the direct
    /// path's (both are fixed for the hold: decided once).
    standby_apart: bool,
    refreshed: Instant,
    buf: Vec<u8>,
}

impl<'a> Paths<'a> {
    fn new(socket: &'a UdpSocket, standby: Option<Standby<'a>>) -> anyhow::Result<Paths<'a>> {
        socket.set_nonblocking(true)?;
        let mut standby_apart = false;
        if let Some(Standby::Peer { socket: s, .. }) = &standby {
            s.set_nonblocking(true)?;
            standby_apart = s.local_addr()? != socket.local_addr()?;
        }
        Ok(Paths {
            socket,
            standby,
            standby_apart,
            refreshed: Instant::now(),
            buf: vec![0u8; 2048],
        })
    }

    /// The standby's socket when it is not the direct path's.
    fn standby_socket(&self) -> Option<&UdpSocket> {
        match &self.standby {
            Some(Standby::Own { turn, .. }) => turn.udp_socket(),
            Some(Standby::Peer { socket, .. }) => self.standby_apart.then_some(*socket),
            None => None,
        }
    }

    /// Sends `data` on a path (a send error is a lost packet).
    fn send(&mut self, via: Via, data: &[u8]) {
        match (via, &mut self.standby) {
            (Via::Direct(to), _) => {
                let _ = self.socket.send_to(data, to);
            }
            (Via::Standby, Some(Standby::Own { turn, path })) => {
                let _ = turn.send_channel_data(path.channel, data);
            }
            (Via::Standby, Some(Standby::Peer { socket, relayed })) => {
                let _ = socket.send_to(data, *relayed);
            }
            (Via::Standby, None) => {}
        }
    }

    /// Keeps a standby allocation, its permission and channel alive.
    fn maintain(&mut self, now: Instant) {
        if now < self.refreshed + STANDBY_REFRESH {
            return;
        }
        self.refreshed = now;
        if let Some(Standby::Own { turn, path }) = &mut self.standby {
            // A failure shows when the relay stops answering.
            let _ = turn.refresh(600);
            let _ = turn.bind_channel(path.channel.value(), path.peer);
        }
    }

    /// The next packet of either path within `wait`: the path, the sender
    /// (the peer's address on the direct path) and the payload.
    fn recv(&mut self, wait: Duration) -> anyhow::Result<Option<(Via, SocketAddr, Vec<u8>)>> {
        let standby = self.standby_socket();
        let mut fds = vec![self.socket.as_fd()];
        fds.extend(standby.map(|s| s.as_fd()));
        let ready = natrix_net::wait_readable(&fds, wait.max(Duration::from_millis(1)))?;
        let relayed = match &self.standby {
            Some(Standby::Peer { relayed, .. }) => Some(*relayed),
            _ => None,
        };
        for i in ready {
            if i == 0 {
                let Ok((len, from)) = self.socket.recv_from(&mut self.buf) else {
                    continue;
                };
                let via = if Some(from) == relayed {
                    Via::Standby
                } else {
                    Via::Direct(from)
                };
                return Ok(Some((via, from, self.buf[..len].to_vec())));
            }
            match &mut self.standby {
                Some(Standby::Peer { socket, relayed }) => {
                    let Ok((len, from)) = socket.recv_from(&mut self.buf) else {
                        continue;
                    };
                    if from == *relayed {
                        return Ok(Some((Via::Standby, from, self.buf[..len].to_vec())));
                    }
                }
                Some(Standby::Own { turn, path }) => {
                    let Ok(Some(packet)) = turn.link.recv(Duration::from_millis(1)) else {
                        continue;
                    };
                    if let Some(payload) = from_peer(&packet, path.channel, path.peer) {
                        return Ok(Some((Via::Standby, path.peer, payload)));
                    }
                    // The peer's NAT gave it another port toward the relay
                    // (its mapping expired): a channel to where it is now.
                    if let Some((from, payload)) = data_indication(&packet)
                        && from.ip() == path.peer.ip()
                    {
                        let next = 0x4000 + (path.channel.value() + 1 - 0x4000) % 0x1000;
                        if turn.bind_channel(next, from).is_ok()
                            && let Some(c) = ChannelNumber::new(next)
                        {
                            path.channel = c;
                            path.peer = from;
                        }
                        return Ok(Some((Via::Standby, from, payload)));
                    }
                }
                None => {}
            }
        }
        Ok(None)
    }
}

/// Keeps the direct path to `peer` on `socket` for `hold.duration`: a signed
/// probe every `hold.keepalive` (nothing else is sent), answering the peer's;
/// then one last probe, retried for a second, must be acknowledged. Behind
/// a NAT that forgets idle mappings sooner than the keepalive interval, the
/// mapping changes and the peer's filter drops the last probe. With
/// `recovery`, a broken path (or a newer entry of the peer) is found again.
///
/// With a `standby` relay path (the race's), a direct path that goes silent
/// (three keepalives unanswered) moves to the relay at once, as does a side
/// whose peer's probes start coming through the relay; keepalives then go
/// both ways, and the first answer on the direct path moves back.
pub(crate) fn hold_path(
    socket: &UdpSocket,
    standby: Option<Standby<'_>>,
    codec: &ProbeCodec,
    peer_index: u8,
    peer: SocketAddr,
    hold: Hold,
    recovery: Option<Recovery<'_>>,
) -> anyhow::Result<Held> {
    let mut paths = Paths::new(socket, standby)?;
    let mut held = keep_path(&mut paths, codec, peer_index, peer, hold, recovery)?;
    held.peer_before = Some(peer);
    // The peer's hold may have started a little later (each side lingers
    // after its own punch): answer its last keepalives a while longer.
    let until = Instant::now() + 2 * natrix_cdx::exchange::client::LINGER;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let Ok(Some((via, _, packet))) = paths.recv(left) else {
            continue;
        };
        if let Some(ProbeMessage::Probe { from: who, nonce }) = codec.parse(&packet)
            && who == peer_index
        {
            paths.send(via, &codec.ack(nonce));
        }
    }
    socket.set_nonblocking(false)?;
    Ok(held)
}

/// [`hold_path`]'s keepalives, fallbacks, recoveries and last check.
fn keep_path(
    paths: &mut Paths<'_>,
    codec: &ProbeCodec,
    peer_index: u8,
    mut peer: SocketAddr,
    hold: Hold,
    mut recovery: Option<Recovery<'_>>,
) -> anyhow::Result<Held> {
    let mut keepalives = Keepalives::new(Instant::now(), &hold);
    let mut held = Held::default();
    let mut last_recovery: Option<Instant> = None;
    // A newer entry of the peer arrived: recover without waiting.
    let mut newer = false;
    // Since when the session runs through the relay.
    let mut on_standby: Option<Instant> = None;
    // The last packet of the peer on the direct path.
    let mut last_direct = Instant::now();
    let has_standby = paths.standby.is_some();
    loop {
        let now = Instant::now();
        if keepalives.unanswered(now) {
            held.peer_after = Some(peer);
            held.on_relay = on_standby.is_some();
            return Ok(held);
        }
        paths.maintain(now);
        // The direct path went silent: to the relay at once.
        if has_standby && on_standby.is_none() && keepalives.silent(now) {
            on_standby = Some(now);
            held.fallbacks += 1;
            keepalives.send_now();
        }
        // Silent on every path: find the direct one again.
        let silent = match on_standby {
            Some(since) => keepalives.silent_since(now, since),
            None => keepalives.silent(now),
        };
        if let Some(r) = recovery.as_mut()
            && !keepalives.finishing()
            && (newer || silent)
            && last_recovery.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            newer = false;
            paths.socket.set_nonblocking(false)?;
            match r.recover(paths.socket, peer_index) {
                Ok((at, to)) => {
                    held.recoveries += 1;
                    peer = to;
                    on_standby = None;
                    // The punch lingered, answering: the path is up now.
                    keepalives.found_again(at, &mut held);
                }
                Err(e) => held.error = Some(format!("{e:#}")),
            }
            last_recovery = Some(Instant::now());
            paths.socket.set_nonblocking(true)?;
            continue;
        }
        if let Some(nonce) = keepalives.due(now) {
            let probe = codec.probe(nonce);
            if on_standby.is_some() {
                paths.send(Via::Standby, &probe);
            }
            // The direct path too: its first answer moves the session back.
            paths.send(Via::Direct(peer), &probe);
            held.sent += 1;
        }
        let wait = keepalives
            .wake_at(recovery.is_some() || has_standby)
            .saturating_duration_since(Instant::now());
        let Some((via, from, packet)) = paths.recv(wait)? else {
            continue;
        };
        match codec.parse(&packet) {
            Some(ProbeMessage::Probe { from: who, nonce }) if who == peer_index => {
                paths.send(via, &codec.ack(nonce));
                if via == Via::Standby {
                    // The peer lost the direct path (it has not reached us
                    // directly for a keepalive interval): follow it.
                    if on_standby.is_none() && now.duration_since(last_direct) > keepalives.every {
                        on_standby = Some(now);
                        held.fallbacks += 1;
                    }
                } else {
                    last_direct = now;
                    peer = from;
                }
            }
            Some(ProbeMessage::Ack { from: who, nonce }) if who == peer_index => {
                if via != Via::Standby {
                    last_direct = now;
                    if on_standby.is_some() && keepalives.knows(nonce) {
                        on_standby = None;
                        held.returns += 1;
                    }
                }
                let last = keepalives.acked(nonce, &mut held);
                if last == Some(true) {
                    held.held = true;
                    held.peer_after = Some(peer);
                    held.on_relay = on_standby.is_some();
                    return Ok(held);
                }
            }
            Some(_) => {}
            None => {
                // A newer entry of the peer (it moved): recover at once.
                if via != Via::Standby
                    && let Some(r) = recovery.as_mut()
                    && let Some((who, seq, data)) =
                        read_delivery(paths.socket, r.invitation, &packet, from)
                    && who == peer_index
                    && seq > r.peer_seq
                {
                    r.peer = data;
                    r.peer_seq = seq;
                    newer = true;
                }
            }
        }
    }
}

//! TURN over DTLS (RFC 7350): one DTLS 1.2 session per client 5-tuple on a
//! loop's DTLS listeners, its records decrypted into the core's client path
//! and the core's answers encrypted back.
//!
//! A ClientHello from an unknown source first gets a HelloVerifyRequest (the
//! cookie proves the client receives at its address) from a *half-open*
//! session: those live in a table of their own, at most
//! [`HALF_OPEN_PER_IP`] per address and [`HALF_OPEN_PER_LOOP`] in all, for
//! at most [`HALF_OPEN_LIFETIME`]. An address at its cap gets no more (a
//! flood from a few addresses, however many ports, cannot crowd others
//! out); a full table evicts its oldest (a flood from spoofed addresses
//! costs an HMAC and a slot for a moment each, never a key exchange, and
//! keeps out only clients slower to answer their cookie than the flood's
//! turnover). Sessions past the cookie count against the loop's cap and the
//! per-address cap; their handshakes share the loop's handshake time budget
//! with TLS.
//!
//! The engine is `dimpl` (sans-IO); every error it returns is fatal for its
//! session only: the session ends (its allocation with it, as for a closed
//! TCP connection) and every other session goes on. Records that fail to
//! parse or open are dropped inside the engine.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dimpl::{Dtls, Output};

use crate::core::ClientSocket;

/// Half-open sessions (before the cookie) a loop keeps.
pub(super) const HALF_OPEN_PER_LOOP: usize = 1024;
/// Half-open sessions one address may have on a loop (a NAT's clients
/// handshaking at once; each holds its slot for a round trip).
pub(super) const HALF_OPEN_PER_IP: usize = 64;
/// How long a half-open session waits for the ClientHello with its cookie.
pub(super) const HALF_OPEN_LIFETIME: Duration = Duration::from_secs(3);
/// The longest plaintext a session hands the core (a TURN message over UDP).
const MAX_PLAINTEXT: usize = 4096;

/// Record content type and handshake message types read off the wire.
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
/// DTLS 1.0's version number (DTLS 1.2 is 0xfefd).
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];

/// What happened to the sessions, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct DtlsStats {
    /// Handshakes completed.
    pub(super) completed: u64,
    /// Handshakes that failed (an error, a timeout, no common suite).
    pub(super) failed: u64,
    /// ClientHellos refused: the loop's or the address's cap, or the
    /// handshake budget of the turn spent.
    pub(super) refused: u64,
    /// ClientHellos of DTLS 1.0 answered with a protocol_version alert.
    pub(super) old_version: u64,
    /// Half-open sessions whose cookie never came back (spoofed sources,
    /// or clients gone): expired or evicted.
    pub(super) unanswered: u64,
    /// Sessions past the cookie now.
    pub(super) live: u64,
}

/// One client's session.
struct Session {
    dtls: Dtls,
    /// The listener it arrived on (answers leave from it).
    listener: usize,
    connected: bool,
    /// When the engine wants `handle_timeout`.
    timer: Option<Instant>,
    last_active: Instant,
}

/// What a datagram did to its session.
#[derive(Debug, Default)]
pub(super) struct Input {
    /// The session ended (an error, close_notify): its allocation ends.
    pub(super) closed: bool,
    /// Time spent on a handshake step (for the loop's budget).
    pub(super) handshake: Duration,
    /// From an unknown source and no ClientHello: dropped.
    pub(super) stray: bool,
}

/// A loop's DTLS sessions.
pub(super) struct DtlsSessions {
    material: Arc<crate::tls::TlsReloader>,
    /// Past the cookie: handshaking or connected.
    sessions: HashMap<ClientSocket, Session, foldhash::fast::RandomState>,
    /// Before the cookie, oldest first in `half_open_order`.
    half_open: HashMap<ClientSocket, (Session, Instant), foldhash::fast::RandomState>,
    half_open_order: VecDeque<(ClientSocket, Instant)>,
    half_open_per_ip: HashMap<IpAddr, usize, foldhash::fast::RandomState>,
    per_ip: HashMap<IpAddr, usize, foldhash::fast::RandomState>,
    max_sessions: usize,
    max_per_ip: usize,
    /// Engine timers, earliest first, by client and server address (stale
    /// entries skipped).
    timers: BinaryHeap<Reverse<(Instant, SocketAddr, SocketAddr)>>,
    buf: Vec<u8>,
    /// Plaintext of the datagram being handled, and its messages' ranges.
    pub(super) plain: Vec<u8>,
    pub(super) frames: Vec<Range<usize>>,
    pub(super) stats: DtlsStats,
    /// Connected sessions that ended outside [`Self::input`].
    closed: Vec<ClientSocket>,
}

/// Where a session's records go: `(listener, client, bytes)`.
pub(super) type Emit<'a> = dyn FnMut(usize, &ClientSocket, &[u8]) + 'a;

impl DtlsSessions {
    pub(super) fn new(
        material: Arc<crate::tls::TlsReloader>,
        max_sessions: usize,
        max_per_ip: usize,
    ) -> DtlsSessions {
        DtlsSessions {
            material,
            sessions: HashMap::default(),
            half_open: HashMap::default(),
            half_open_order: VecDeque::new(),
            half_open_per_ip: HashMap::default(),
            per_ip: HashMap::default(),
            max_sessions,
            max_per_ip,
            timers: BinaryHeap::new(),
            buf: vec![0; 2048],
            plain: Vec::new(),
            frames: Vec::new(),
            stats: DtlsStats::default(),
            closed: Vec::new(),
        }
    }

    /// Handles one datagram from `client` on `listener`: its plaintext
    /// messages land in [`Self::plain`] / [`Self::frames`] for the core,
    /// records to send go to `emit`. `budget_spent`: the loop's handshake
    /// time for this turn is used up, so a handshake step waits (the client
    /// retransmits).
    pub(super) fn input(
        &mut self,
        listener: usize,
        client: ClientSocket,
        datagram: &[u8],
        now: Instant,
        budget_spent: bool,
        emit: &mut Emit<'_>,
    ) -> Input {
        self.plain.clear();
        self.frames.clear();
        // A ClientHello from a 5-tuple with a connected session: the client
        // restarted on the same port (RFC 6347 §4.2.8). It goes through the
        // cookie as a new client would; the old session stays until the
        // new one is verified, so a spoofed ClientHello cannot end it.
        let hello = is_client_hello(datagram);
        let restarting = hello && self.half_open.contains_key(&client);
        if !restarting && let Some(mut session) = self.sessions.remove(&client) {
            if hello && session.connected {
                self.sessions.insert(client, session);
                return self.open(listener, client, datagram, now, emit);
            }
            session.last_active = now;
            let handshaking = !session.connected;
            if handshaking && budget_spent {
                self.stats.refused += 1;
                self.sessions.insert(client, session);
                return Input::default();
            }
            let started = Instant::now();
            let result = feed(&mut session, datagram, now);
            let drained = result.and_then(|()| {
                self.drain(&mut session, &client, emit, true)
                    .map_err(|e| e.to_string())
            });
            let mut input = Input::default();
            if handshaking {
                input.handshake = started.elapsed();
            }
            match drained {
                Ok(closed) if !closed => {
                    self.keep(client, session);
                }
                _ => {
                    if !session.connected {
                        self.stats.failed += 1;
                    }
                    self.forget(&client);
                    input.closed = session.connected;
                }
            }
            return input;
        }
        if let Some((mut session, born)) = self.take_half_open(&client) {
            // The ClientHello with the cookie (or a retransmission).
            if budget_spent {
                self.stats.refused += 1;
                self.put_half_open(client, session, born);
                return Input::default();
            }
            let ip = client.client.ip();
            let replacing = self.sessions.contains_key(&client);
            if !replacing
                && (self.sessions.len() >= self.max_sessions
                    || self.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip)
            {
                self.stats.refused += 1;
                return Input::default();
            }
            let started = Instant::now();
            let mut first = Vec::new();
            let result = feed(&mut session, datagram, now).and_then(|()| {
                drain_into(&mut session, &mut self.buf, &mut first).map_err(|e| e.to_string())
            });
            let handshake = started.elapsed();
            let verified = first
                .first()
                .is_some_and(|p| handshake_type(p) == Some(SERVER_HELLO));
            for p in &first {
                emit(session.listener, &client, p);
            }
            match result {
                Ok(_) if verified => {
                    // A restarted client's old session ends, and with it
                    // the allocation its lost state held.
                    if let Some(old) = self.sessions.remove(&client) {
                        self.forget(&client);
                        if old.connected {
                            self.closed.push(client);
                        }
                    }
                    *self.per_ip.entry(ip).or_insert(0) += 1;
                    self.stats.live += 1;
                    if let Some(at) = session.timer {
                        self.timers
                            .push(Reverse((at, client.client, client.server)));
                    }
                    self.keep(client, session);
                }
                Ok(_) => {
                    // Another HelloVerifyRequest: still half-open.
                    self.put_half_open(client, session, born);
                }
                Err(_) => self.stats.failed += 1,
            }
            return Input {
                handshake,
                ..Input::default()
            };
        }
        // A new source: only a ClientHello opens a session.
        if !hello {
            return Input {
                stray: true,
                ..Input::default()
            };
        }
        self.open(listener, client, datagram, now, emit)
    }

    /// Answers the ClientHello of a client without a session (or one
    /// restarting): a HelloVerifyRequest from a new half-open session.
    fn open(
        &mut self,
        listener: usize,
        client: ClientSocket,
        datagram: &[u8],
        now: Instant,
        emit: &mut Emit<'_>,
    ) -> Input {
        if client_version(datagram) == Some(DTLS_1_0) {
            // DTLS 1.0 (RFC 8996 deprecates it): a protocol_version alert
            // lets a client that offers several versions retry with 1.2 at
            // once instead of after its retransmissions.
            self.stats.old_version += 1;
            emit(listener, &client, &protocol_version_alert(datagram));
            return Input::default();
        }
        let Some(material) = self.material.dtls() else {
            return Input::default();
        };
        let ip = client.client.ip();
        if self.half_open_per_ip.get(&ip).copied().unwrap_or(0) >= HALF_OPEN_PER_IP {
            self.stats.refused += 1;
            return Input::default();
        }
        while self.half_open.len() >= HALF_OPEN_PER_LOOP {
            let Some((oldest, born)) = self.half_open_order.pop_front() else {
                break;
            };
            if self.half_open.get(&oldest).is_some_and(|(_, b)| *b == born) {
                self.take_half_open(&oldest);
                self.stats.unanswered += 1;
            }
        }
        let mut session = Session {
            dtls: Dtls::new_12(material.config.clone(), material.certificate.clone(), now),
            listener,
            connected: false,
            timer: None,
            last_active: now,
        };
        let mut packets = Vec::new();
        let result = feed(&mut session, datagram, now).and_then(|()| {
            drain_into(&mut session, &mut self.buf, &mut packets).map_err(|e| e.to_string())
        });
        for p in &packets {
            emit(listener, &client, p);
        }
        if result.is_ok() {
            self.put_half_open(client, session, now);
            self.half_open_order.push_back((client, now));
        }
        Input::default()
    }

    /// Encrypts `message` for `client`; false when it has no connected
    /// session (or the session failed: it ends, see [`Self::take_closed`]).
    pub(super) fn send(
        &mut self,
        client: &ClientSocket,
        message: &[u8],
        emit: &mut Emit<'_>,
    ) -> bool {
        let Some(mut session) = self.sessions.remove(client) else {
            return false;
        };
        if !session.connected {
            self.sessions.insert(*client, session);
            return false;
        }
        let sent = session.dtls.send_application_data(message).is_ok()
            && self.drain(&mut session, client, emit, false).is_ok();
        if sent {
            self.sessions.insert(*client, session);
        } else {
            self.forget(client);
            self.closed.push(*client);
        }
        sent
    }

    /// Drains the engine's output: records to `emit`, plaintext to
    /// [`Self::plain`] (`take_plain`), timers to the heap; true when the
    /// session ended (close_notify).
    fn drain(
        &mut self,
        session: &mut Session,
        client: &ClientSocket,
        emit: &mut Emit<'_>,
        take_plain: bool,
    ) -> Result<bool, dimpl::Error> {
        let mut closed = false;
        loop {
            match session.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => emit(session.listener, client, p),
                Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                Output::Timeout(at) => {
                    // A connected session's engine asks for a wake-up years
                    // away, later with every call: not a timer to keep.
                    let at = due(at);
                    if let Some(t) = at
                        && session.timer != at
                    {
                        self.timers.push(Reverse((t, client.client, client.server)));
                    }
                    session.timer = at;
                    break;
                }
                Output::Connected => {
                    session.connected = true;
                    self.stats.completed += 1;
                }
                Output::ApplicationData(data) if take_plain && data.len() <= MAX_PLAINTEXT => {
                    let start = self.plain.len();
                    self.plain.extend_from_slice(data);
                    self.frames.push(start..self.plain.len());
                }
                Output::CloseNotify => closed = true,
                _ => {}
            }
        }
        Ok(closed)
    }

    /// Takes `client`'s half-open session out of the table.
    fn take_half_open(&mut self, client: &ClientSocket) -> Option<(Session, Instant)> {
        let taken = self.half_open.remove(client)?;
        let ip = client.client.ip();
        if let Some(n) = self.half_open_per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.half_open_per_ip.remove(&ip);
            }
        }
        Some(taken)
    }

    /// Puts `client`'s half-open session (first seen at `born`) in the
    /// table.
    fn put_half_open(&mut self, client: ClientSocket, session: Session, born: Instant) {
        *self.half_open_per_ip.entry(client.client.ip()).or_insert(0) += 1;
        self.half_open.insert(client, (session, born));
    }

    /// Keeps `session` for `client`.
    fn keep(&mut self, client: ClientSocket, session: Session) {
        self.sessions.insert(client, session);
    }

    /// Forgets `client`'s session (already removed from the map) in the
    /// counts.
    fn forget(&mut self, client: &ClientSocket) {
        self.stats.live = self.stats.live.saturating_sub(1);
        let ip = client.client.ip();
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// The earliest engine timer.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Runs the engine timers that are due (retransmissions, handshake
    /// deadlines); sessions that fail end, and those that held a
    /// connection are returned through [`Self::take_closed`].
    pub(super) fn tick(&mut self, now: Instant, emit: &mut Emit<'_>) {
        while let Some(Reverse((at, from, to))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let client = ClientSocket {
                transport: crate::core::Transport::Dtls,
                client: from,
                server: to,
            };
            let Some(mut session) = self.sessions.remove(&client) else {
                continue;
            };
            if session.timer != Some(at) {
                self.sessions.insert(client, session);
                continue;
            }
            session.timer = None;
            let ok = session.dtls.handle_timeout(now).is_ok();
            match ok.then(|| self.drain(&mut session, &client, emit, false)) {
                Some(Ok(false)) => self.keep(client, session),
                _ => {
                    if session.connected {
                        self.closed.push(client);
                    } else {
                        self.stats.failed += 1;
                    }
                    self.forget(&client);
                }
            }
        }
    }

    /// Ends sessions silent for `idle` whose client holds no allocation
    /// (`holds`), and half-open sessions past their lifetime; returns how
    /// many sessions past the cookie ended.
    pub(super) fn sweep(
        &mut self,
        now: Instant,
        idle: Duration,
        holds: impl Fn(&ClientSocket) -> bool,
    ) -> usize {
        while let Some((client, born)) = self.half_open_order.front().copied() {
            if now.saturating_duration_since(born) < HALF_OPEN_LIFETIME {
                break;
            }
            self.half_open_order.pop_front();
            if self.half_open.get(&client).is_some_and(|(_, b)| *b == born) {
                self.take_half_open(&client);
                self.stats.unanswered += 1;
            }
        }
        let quiet: Vec<ClientSocket> = self
            .sessions
            .iter()
            .filter(|(c, s)| now.saturating_duration_since(s.last_active) >= idle && !holds(c))
            .map(|(c, _)| *c)
            .collect();
        for client in &quiet {
            if let Some(s) = self.sessions.remove(client) {
                if !s.connected {
                    self.stats.failed += 1;
                }
                self.forget(client);
            }
        }
        quiet.len()
    }

    /// The clients whose connected sessions ended outside [`Self::input`]
    /// (a failed send or timer): their allocations end.
    pub(super) fn take_closed(&mut self) -> Vec<ClientSocket> {
        std::mem::take(&mut self.closed)
    }
}

/// Hands `datagram` to the engine (after telling it the time).
fn feed(session: &mut Session, datagram: &[u8], now: Instant) -> Result<(), String> {
    session
        .dtls
        .handle_timeout(now)
        .and_then(|()| session.dtls.handle_packet(datagram))
        .map_err(|e| e.to_string())
}

/// Drains a half-open session's output into `packets` (plaintext cannot
/// come before the handshake; none is kept).
fn drain_into(
    session: &mut Session,
    buf: &mut Vec<u8>,
    packets: &mut Vec<Vec<u8>>,
) -> Result<(), dimpl::Error> {
    loop {
        match session.dtls.poll_output(buf) {
            Output::Packet(p) => packets.push(p.to_vec()),
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            Output::Timeout(at) => {
                session.timer = due(at);
                return Ok(());
            }
            Output::Connected => session.connected = true,
            _ => {}
        }
    }
}

/// How far ahead an engine timer is worth keeping.
const TIMER_HORIZON: Duration = Duration::from_secs(3600);

/// `at`, unless it lies beyond [`TIMER_HORIZON`] (the engine's "nothing
/// to do": ten years away).
fn due(at: Instant) -> Option<Instant> {
    (at.saturating_duration_since(Instant::now()) < TIMER_HORIZON).then_some(at)
}

/// True for a datagram whose first record is a handshake record carrying a
/// ClientHello.
fn is_client_hello(datagram: &[u8]) -> bool {
    handshake_type(datagram) == Some(CLIENT_HELLO)
}

/// The handshake message type of a datagram's first record, if it is an
/// unencrypted handshake record (epoch 0).
fn handshake_type(datagram: &[u8]) -> Option<u8> {
    (datagram.len() > 13 && datagram[0] == HANDSHAKE && datagram[3..5] == [0, 0])
        .then(|| datagram[13])
}

/// The client_version of a ClientHello (after the 13-byte record header and
/// the 12-byte handshake header).
fn client_version(datagram: &[u8]) -> Option<[u8; 2]> {
    datagram.get(25..27).map(|v| [v[0], v[1]])
}

/// A fatal protocol_version alert in the record version the client used.
fn protocol_version_alert(hello: &[u8]) -> [u8; 15] {
    let mut alert = [0u8; 15];
    alert[0] = 21; // alert
    alert[1..3].copy_from_slice(&hello[1..3]);
    // epoch 0, sequence number 0
    alert[11..13].copy_from_slice(&2u16.to_be_bytes());
    alert[13] = 2; // fatal
    alert[14] = 70; // protocol_version
    alert
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Sessions with a fresh ECDSA certificate (openssl, as operators make
    /// them).
    fn sessions() -> DtlsSessions {
        let dir = std::env::temp_dir().join(format!(
            "natrix-dtls-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-days", "1", "-nodes"])
            .args(["-subj", "/CN=unit", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let reloader = crate::tls::TlsReloader::load(&cert, &key, true).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        DtlsSessions::new(Arc::new(reloader), 8, 4)
    }

    fn client_socket() -> ClientSocket {
        ClientSocket {
            transport: crate::core::Transport::Dtls,
            client: "192.0.2.7:40000".parse().unwrap(),
            server: "198.51.100.1:5349".parse().unwrap(),
        }
    }

    /// Everything `client` wants to send.
    fn flight(client: &mut Dtls, now: Instant) -> Vec<Vec<u8>> {
        client.handle_timeout(now).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        loop {
            match client.poll_output(&mut buf) {
                Output::Packet(p) => out.push(p.to_vec()),
                Output::Timeout(_) => return out,
                _ => {}
            }
        }
    }

    #[test]
    fn a_client_gets_through_the_cookie_messages_round_trip_and_a_restart_replaces_its_session() {
        let mut s = sessions();
        let material = s.material.dtls().unwrap();
        let now = Instant::now();
        let mut client = Dtls::new_12(material.config.clone(), material.certificate.clone(), now);
        client.set_active(true);
        let who = client_socket();
        let mut to_client: Vec<Vec<u8>> = Vec::new();
        let mut plaintext = Vec::new();
        // ClientHello → HelloVerifyRequest (half-open), ClientHello with
        // the cookie → the server's flight (a session), then Finished.
        for _ in 0..6 {
            for p in flight(&mut client, now) {
                let mut emit = |_: usize, _: &ClientSocket, b: &[u8]| to_client.push(b.to_vec());
                s.input(0, who, &p, now, false, &mut emit);
            }
            for p in to_client.drain(..) {
                client.handle_packet(&p).unwrap();
            }
        }
        assert_eq!(s.stats.completed, 1, "{:?}", s.stats);
        assert_eq!(s.stats.live, 1);
        // Client → server plaintext reaches the core's side.
        client.send_application_data(b"allocate").unwrap();
        for p in flight(&mut client, now) {
            let mut emit = |_: usize, _: &ClientSocket, _: &[u8]| {};
            s.input(0, who, &p, now, false, &mut emit);
            plaintext.extend(s.frames.iter().map(|r| s.plain[r.clone()].to_vec()));
        }
        assert_eq!(plaintext, vec![b"allocate".to_vec()]);
        // A thousand messages each way, over a second: each answer a record
        // for the client, and no timer kept per message (a connected
        // engine's idle wake-up is years away, and moves with its clock).
        let mut records = 0;
        for i in 0..1000u32 {
            let later = now + Duration::from_millis(u64::from(i));
            client.send_application_data(&i.to_be_bytes()).unwrap();
            for p in flight(&mut client, later) {
                let mut emit = |_: usize, _: &ClientSocket, _: &[u8]| {};
                s.input(0, who, &p, later, false, &mut emit);
                assert_eq!(s.frames.len(), 1);
            }
            let mut emit = |_: usize, _: &ClientSocket, _: &[u8]| records += 1;
            assert!(s.send(&who, &i.to_be_bytes(), &mut emit));
        }
        assert_eq!(records, 1000);
        assert!(s.timers.len() < 8, "{} timers kept", s.timers.len());
        // The client restarts on the same port: a new handshake through the
        // cookie replaces the old session (whose allocation then ends).
        let mut again = Dtls::new_12(material.config.clone(), material.certificate.clone(), now);
        again.set_active(true);
        let later = now + Duration::from_secs(2);
        let hello = flight(&mut again, later).remove(0);
        let mut answers = Vec::new();
        let mut emit = |_: usize, _: &ClientSocket, b: &[u8]| answers.push(b.to_vec());
        s.input(0, who, &hello, later, false, &mut emit);
        assert_eq!(
            s.stats.live, 1,
            "the old session stays until the cookie comes back"
        );
        assert!(s.take_closed().is_empty());
        for p in answers.drain(..) {
            again.handle_packet(&p).unwrap();
        }
        for _ in 0..6 {
            for p in flight(&mut again, later) {
                let mut emit = |_: usize, _: &ClientSocket, b: &[u8]| answers.push(b.to_vec());
                s.input(0, who, &p, later, false, &mut emit);
            }
            for p in answers.drain(..) {
                again.handle_packet(&p).unwrap();
            }
        }
        assert_eq!(s.stats.completed, 2, "{:?}", s.stats);
        assert_eq!(s.stats.live, 1);
        assert_eq!(s.take_closed(), vec![who]);
        // No session for another client: nothing sent.
        let other = ClientSocket {
            client: "192.0.2.8:40000".parse().unwrap(),
            ..who
        };
        let mut emit = |_: usize, _: &ClientSocket, _: &[u8]| panic!("sent to a stranger");
        assert!(!s.send(&other, b"x", &mut emit));
    }

    #[test]
    fn half_open_sessions_are_capped_per_address_and_expire() {
        let mut s = sessions();
        let material = s.material.dtls().unwrap();
        let now = Instant::now();
        let mut client = Dtls::new_12(material.config.clone(), material.certificate.clone(), now);
        client.set_active(true);
        let hello = flight(&mut client, now).remove(0);
        let mut verify_requests = 0;
        let tries = HALF_OPEN_PER_IP as u16 + 24;
        for port in 0..tries {
            let who = ClientSocket {
                client: std::net::SocketAddr::new("192.0.2.9".parse().unwrap(), 1000 + port),
                ..client_socket()
            };
            let mut emit = |_: usize, _: &ClientSocket, _: &[u8]| verify_requests += 1;
            s.input(0, who, &hello, now, false, &mut emit);
        }
        assert_eq!(verify_requests, HALF_OPEN_PER_IP);
        assert_eq!(s.stats.refused, u64::from(tries) - HALF_OPEN_PER_IP as u64);
        assert_eq!(s.stats.live, 0, "no session before the cookie");
        s.sweep(now + HALF_OPEN_LIFETIME, Duration::from_secs(60), |_| false);
        assert_eq!(s.stats.unanswered, HALF_OPEN_PER_IP as u64);
        assert!(s.half_open.is_empty() && s.half_open_per_ip.is_empty());
    }

    #[test]
    fn only_a_client_hello_opens_a_session() {
        let mut hello = vec![
            HANDSHAKE,
            0xfe,
            0xfd,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            40,
            CLIENT_HELLO,
        ];
        hello.extend_from_slice(&[0; 11]);
        hello.extend_from_slice(&[0xfe, 0xfd]);
        assert!(is_client_hello(&hello));
        assert_eq!(client_version(&hello), Some([0xfe, 0xfd]));
        // An encrypted record (epoch 1) is never a ClientHello.
        let mut later = hello.clone();
        later[4] = 1;
        assert!(!is_client_hello(&later));
        // STUN, ChannelData, short garbage.
        assert!(!is_client_hello(&[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]));
        assert!(!is_client_hello(&[0x40, 0, 0, 4, 1, 2, 3, 4]));
        assert!(!is_client_hello(&[HANDSHAKE]));
        let alert = protocol_version_alert(&hello);
        assert_eq!(alert[0], 21);
        assert_eq!(&alert[13..], &[2, 70]);
    }
}

//! RFC 5780 §4.6 binding lifetime discovery as a state machine (sans-IO):
//! how long a NAT keeps an idle UDP mapping, which tells a client how often
//! to send keepalives on a direct path.
//!
//! # Run loop contract
//!
//! The driver owns [`LifetimeProbe::sockets`] UDP sockets, bound to the same
//! local address: socket 0 is the tester, socket `i` (1…n) holds the mapping
//! idled for the `i`-th delay. Until [`LifetimeProbe::result`] returns the
//! result it sends every [`LifetimeProbe::poll_transmit`] from the socket it
//! names, waits for a datagram on any socket until
//! [`LifetimeProbe::poll_timeout`], and feeds it to
//! [`LifetimeProbe::handle_input`] (or calls
//! [`LifetimeProbe::handle_timeout`]). Every input takes `now`; transaction
//! ids come from the seed.
//!
//! # The test
//!
//! Every idle socket sends a Binding request to the server at once and
//! learns its mapped port. After its delay without a packet, the tester
//! sends a Binding request with RESPONSE-PORT naming that port: the server
//! answers from the address the idle socket contacted, to the tester's
//! public address at that port — the idle socket's mapping. The answer
//! arriving there means the mapping outlived the delay; none within
//! [`CHECK_WAIT`] (three tries) means it expired. The mappings run in
//! parallel, so the test takes about the longest delay.
//!
//! # Panics and errors
//!
//! Input is untrusted: anything that is not an answer to a transaction
//! under way is ignored. Nothing here panics.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, Message, MessageType, Method, TransactionId,
};
use ring::hmac;

/// How long an idle socket's first Binding is retransmitted.
pub const BINDING_WAIT: Duration = Duration::from_millis(1500);
/// How long a check waits for its answer to reach the idle mapping.
pub const CHECK_WAIT: Duration = Duration::from_millis(1000);
/// First retransmission timeout of either request.
const RTO: Duration = Duration::from_millis(100);
/// Most delays one probe runs (each is a socket).
pub const MAX_DELAYS: usize = 16;

/// A datagram to send: from socket `socket`, to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The socket's index (0: the tester).
    pub socket: usize,
    /// Where to.
    pub to: SocketAddr,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// What the probe found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// The longest delay after which an idle mapping still worked.
    pub at_least: Option<Duration>,
    /// The shortest delay after which an idle mapping no longer did.
    pub below: Option<Duration>,
}

/// One request under way: retransmitted (RTO doubling) until `deadline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tx {
    tid: [u8; 12],
    retransmit_at: Instant,
    rto: Duration,
    deadline: Instant,
}

impl Tx {
    fn new(tid: [u8; 12], now: Instant, wait: Duration) -> Tx {
        Tx {
            tid,
            retransmit_at: now + RTO,
            rto: RTO,
            deadline: now + wait,
        }
    }

    /// `None` past the deadline; else whether to send again now.
    fn tick(&mut self, now: Instant) -> Option<bool> {
        if now >= self.deadline {
            return None;
        }
        if now < self.retransmit_at {
            return Some(false);
        }
        self.rto *= 2;
        self.retransmit_at = now + self.rto;
        Some(true)
    }

    fn next(&self) -> Instant {
        self.retransmit_at.min(self.deadline)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Learning the mapped port.
    Binding(Tx),
    /// Idle until `check_at`.
    Idle {
        port: u16,
        check_at: Instant,
    },
    /// The tester asked the server to answer to the mapping.
    Checking {
        port: u16,
        tx: Tx,
    },
    Alive,
    Expired,
    /// No mapped port (no answer to the first Binding).
    Failed,
}

/// One lifetime probe against one server (module docs).
#[derive(Debug)]
pub struct LifetimeProbe {
    server: SocketAddr,
    delays: Vec<Duration>,
    states: Vec<State>,
    transmits: VecDeque<Transmit>,
    tid_key: hmac::Key,
    tids: u64,
}

impl LifetimeProbe {
    /// Starts the probe against `server` for `delays` (at most
    /// [`MAX_DELAYS`], shortest first); `seed` (32 random bytes) is where
    /// transaction ids come from.
    pub fn new(
        server: SocketAddr,
        delays: &[Duration],
        seed: [u8; 32],
        now: Instant,
    ) -> LifetimeProbe {
        let mut delays: Vec<Duration> = delays.iter().copied().take(MAX_DELAYS).collect();
        delays.sort();
        let mut p = LifetimeProbe {
            server,
            states: Vec::with_capacity(delays.len()),
            delays,
            transmits: VecDeque::new(),
            tid_key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
            tids: 0,
        };
        for i in 0..p.delays.len() {
            let tid = p.next_tid();
            p.send(i + 1, tid, None);
            p.states
                .push(State::Binding(Tx::new(tid, now, BINDING_WAIT)));
        }
        p
    }

    /// Sockets the driver needs: the tester and one per delay.
    pub fn sockets(&self) -> usize {
        self.delays.len() + 1
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`LifetimeProbe::handle_timeout`] is due; `None` when done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.states
            .iter()
            .filter_map(|s| match s {
                State::Binding(tx) | State::Checking { tx, .. } => Some(tx.next()),
                State::Idle { check_at, .. } => Some(*check_at),
                _ => None,
            })
            .min()
    }

    /// The result, once every mapping was checked.
    pub fn result(&self) -> Option<Lifetime> {
        if self.poll_timeout().is_some() {
            return None;
        }
        let mut out = Lifetime::default();
        for (d, s) in self.delays.iter().zip(&self.states) {
            match s {
                State::Alive => out.at_least = Some(*d),
                State::Expired if out.below.is_none() => out.below = Some(*d),
                _ => {}
            }
        }
        Some(out)
    }

    /// Time passed: retransmissions, checks and verdicts that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.states.len() {
            let (next, send) = match self.states[i] {
                State::Binding(mut tx) => match tx.tick(now) {
                    None => (State::Failed, None),
                    Some(again) => (State::Binding(tx), again.then_some((i + 1, tx.tid, None))),
                },
                State::Idle { port, check_at } if now >= check_at => {
                    let tid = self.next_tid();
                    let tx = Tx::new(tid, now, CHECK_WAIT);
                    (State::Checking { port, tx }, Some((0, tid, Some(port))))
                }
                State::Checking { port, mut tx } => match tx.tick(now) {
                    None => (State::Expired, None),
                    Some(again) => (
                        State::Checking { port, tx },
                        again.then_some((0, tx.tid, Some(port))),
                    ),
                },
                other => (other, None),
            };
            self.states[i] = next;
            if let Some((socket, tid, port)) = send {
                self.send(socket, tid, port);
            }
        }
    }

    /// A datagram arrived on socket `socket` from `from`.
    pub fn handle_input(&mut self, socket: usize, from: SocketAddr, bytes: &[u8], now: Instant) {
        let Ok(msg) = Message::parse(bytes) else {
            return;
        };
        if msg.method() != Method::BINDING || msg.class() != Class::Success {
            return;
        }
        let tid = msg.transaction_id().0;
        let Some(i) = socket.checked_sub(1).filter(|i| *i < self.states.len()) else {
            return;
        };
        match self.states[i] {
            State::Binding(tx) if tx.tid == tid && from == self.server => {
                let mapped = match msg
                    .decode(AttributeType::XOR_MAPPED_ADDRESS)
                    .or_else(|| msg.decode(AttributeType::MAPPED_ADDRESS))
                {
                    Some(Ok(Attribute::XorMappedAddress(a) | Attribute::MappedAddress(a))) => a,
                    _ => return,
                };
                self.states[i] = State::Idle {
                    port: mapped.port(),
                    check_at: now + self.delays[i],
                };
            }
            // The server answers a check from its own address.
            State::Checking { tx, .. } if tx.tid == tid => self.states[i] = State::Alive,
            _ => {}
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tids += 1;
        let tag = hmac::sign(&self.tid_key, &self.tids.to_be_bytes());
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&tag.as_ref()[..12]);
        tid
    }

    fn send(&mut self, socket: usize, tid: [u8; 12], response_port: Option<u16>) {
        let mut buf = vec![0u8; 128];
        let n = (|| {
            let mut enc = Encoder::new(
                &mut buf,
                MessageType::new(Method::BINDING, Class::Request),
                &TransactionId(tid),
            )
            .ok()?;
            if let Some(p) = response_port {
                enc.attribute(&Attribute::ResponsePort(p)).ok()?;
            }
            enc.fingerprint().ok()?;
            Some(enc.finish())
        })();
        if let Some(n) = n {
            buf.truncate(n);
            self.transmits.push_back(Transmit {
                socket,
                to: self.server,
                payload: buf,
            });
        }
    }
}

#[cfg(test)]
// Test code: a failed unwrap is a failed test; the clock only gives the
// scenario an origin (every input still takes its `now`).
#[allow(clippy::unwrap_used, clippy::disallowed_methods)]
mod tests {
    use super::*;

    const SERVER: &str = "192.0.2.1:3478";

    fn answer(tid: &[u8], mapped: SocketAddr) -> Vec<u8> {
        let mut buf = vec![0u8; 128];
        let mut t = [0u8; 12];
        t.copy_from_slice(&tid[8..20]);
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::BINDING, Class::Success),
            &TransactionId(t),
        )
        .unwrap();
        enc.attribute(&Attribute::XorMappedAddress(mapped)).unwrap();
        let n = enc.finish();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_mapping_that_outlives_the_short_delay_but_not_the_long_one() {
        let server: SocketAddr = SERVER.parse().unwrap();
        let t0 = Instant::now();
        let delays = [Duration::from_secs(2), Duration::from_secs(8)];
        let mut p = LifetimeProbe::new(server, &delays, [7; 32], t0);
        assert_eq!(p.sockets(), 3);
        // Both idle sockets learn their mapped ports.
        let first: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit()).collect();
        assert_eq!(first.iter().map(|t| t.socket).collect::<Vec<_>>(), [1, 2]);
        for (i, t) in first.iter().enumerate() {
            let mapped = SocketAddr::new("203.0.113.5".parse().unwrap(), 40000 + i as u16);
            p.handle_input(t.socket, server, &answer(&t.payload, mapped), t0);
        }
        // After 2 s the tester asks for an answer to the first mapping's port.
        p.handle_timeout(t0 + Duration::from_secs(2));
        let check = p.poll_transmit().unwrap();
        assert_eq!(check.socket, 0);
        let msg = Message::parse(&check.payload).unwrap();
        assert!(matches!(
            msg.decode(AttributeType::RESPONSE_PORT),
            Some(Ok(Attribute::ResponsePort(40000)))
        ));
        // It arrives on the idle socket: alive.
        p.handle_input(
            1,
            server,
            &answer(&check.payload, server),
            t0 + Duration::from_secs(2),
        );
        // The second check goes unanswered through its retries: expired.
        p.handle_timeout(t0 + Duration::from_secs(8));
        let mut at = t0 + Duration::from_secs(8);
        let mut tries = 0;
        while p.result().is_none() {
            while let Some(t) = p.poll_transmit() {
                assert_eq!(t.socket, 0);
                tries += 1;
            }
            at = p.poll_timeout().unwrap();
            p.handle_timeout(at);
        }
        assert!(tries >= 3, "retried: {tries}");
        assert!(at <= t0 + Duration::from_secs(8) + CHECK_WAIT);
        assert_eq!(
            p.result(),
            Some(Lifetime {
                at_least: Some(Duration::from_secs(2)),
                below: Some(Duration::from_secs(8)),
            })
        );
    }

    #[test]
    fn stray_and_forged_answers_change_nothing() {
        let server: SocketAddr = SERVER.parse().unwrap();
        let t0 = Instant::now();
        let mut p = LifetimeProbe::new(server, &[Duration::from_secs(1)], [1; 32], t0);
        let t = p.poll_transmit().unwrap();
        let mapped: SocketAddr = "203.0.113.5:40000".parse().unwrap();
        // From elsewhere, on the wrong socket, garbage: ignored.
        p.handle_input(1, mapped, &answer(&t.payload, mapped), t0);
        p.handle_input(9, server, &answer(&t.payload, mapped), t0);
        p.handle_input(1, server, b"not stun", t0);
        assert!(matches!(p.states[0], State::Binding(_)));
        // No answer at all: the mapping is unknown, not expired.
        while let Some(at) = p.poll_timeout() {
            p.handle_timeout(at);
        }
        assert_eq!(p.result(), Some(Lifetime::default()));
    }
}

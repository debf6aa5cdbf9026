//! RFC 5780 NAT behaviour discovery as a state machine (sans-IO): the
//! decision tree of §4.3 (mapping), §4.4 (filtering) and hairpinning,
//! without sockets, clocks or randomness of its own.
//!
//! # Run loop contract
//!
//! The driver owns two UDP sockets: [`Socket::Primary`] (bound at start; the
//! mapping tests and the hairpin test run from it) and [`Socket::Fresh`]
//! (bound the first time a transmit names it; the filtering tests run from
//! it). Then, until [`Discovery::profile`] returns the result:
//!
//! 1. send every [`Discovery::poll_transmit`] from the socket it names; a
//!    send that fails (an ICMP unreachable reported) is
//!    [`Discovery::handle_send_error`];
//! 2. wait for a datagram on [`Discovery::listening`] until
//!    [`Discovery::poll_timeout`]; feed it to [`Discovery::handle_input`], or
//!    call [`Discovery::handle_timeout`] when the deadline passes.
//!
//! Every input takes `now`; transaction ids come from the seed given at
//! start. The tests run one at a time, as RFC 5780 §4 orders them.
//!
//! # The tests
//!
//! - **Binding** (test I): to the server, retransmitted (RTO
//!   [`INITIAL_RTO`], doubling) for [`BINDING_WAIT`]. No answer: UDP is
//!   blocked (or nothing listens), done. The answer's mapped address equal to
//!   the local one: no NAT. No OTHER-ADDRESS: the server does not do RFC 5780,
//!   done.
//! - **Mapping** (§4.3, behind a NAT only): to the alternate IP and the
//!   primary port (test II); the same mapping as test I is endpoint-
//!   independent. Otherwise to the alternate IP and port (test III): the same
//!   mapping as test II is address-dependent, another is address- and
//!   port-dependent. A test without an answer leaves the mapping unknown.
//! - **Filtering** (§4.4) from a *fresh* socket: the mapping tests sent to
//!   the alternate IP from the primary socket, which an address-dependent
//!   filter would then let through (the NAT lab showed it). A change-IP and
//!   change-port request answered: endpoint-independent; else a change-port
//!   request answered: address-dependent; else address- and port-dependent.
//!   These tests wait [`NO_ANSWER_WAIT`]: no answer is their verdict.
//! - **Port allocation** (behind a NAT, from the mapping tests' public
//!   ports of the one primary socket): the local port kept is preserving;
//!   three distinct mappings a constant small step apart are sequential with
//!   that stride; distinct ones without a pattern are random; an
//!   endpoint-independent mapping that did not keep the port cannot tell.
//! - **Hairpinning** (behind a NAT only): a Binding request from the primary
//!   socket to its own mapped address; it coming back means the NAT
//!   hairpins.
//!
//! # Panics and errors
//!
//! Input is untrusted: anything that is not a Binding answer to the
//! transaction under way (stray traffic, late answers to an earlier test,
//! malformed bytes) is ignored. Nothing here panics.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natrix_model::nat::{Filtering, Mapping, NatProfile};
use natrix_model::transport::Transport;
use natrix_wire::{
    Attribute, AttributeType, ChangeRequest, Class, Encoder, Message, MessageType, Method,
    TransactionId,
};
use ring::hmac;

/// First retransmission timeout (RFC 8489 §6.2.1 allows a shorter RTO than
/// 500 ms when the path is known to be fast; discovery runs on the local
/// network's first hop).
pub const INITIAL_RTO: Duration = Duration::from_millis(100);
/// How long test I retransmits before concluding that UDP is blocked.
pub const BINDING_WAIT: Duration = Duration::from_millis(1500);
/// How long each mapping test retransmits.
pub const MAPPING_WAIT: Duration = Duration::from_millis(1000);
/// How long a test whose verdict may be "no answer" waits (filtering,
/// hairpinning).
pub const NO_ANSWER_WAIT: Duration = Duration::from_millis(500);

/// Which of the driver's sockets a transmit leaves from, or an answer is
/// awaited on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Socket {
    /// Bound at start: test I, the mapping tests, hairpinning.
    Primary,
    /// Bound when first named: the filtering tests.
    Fresh,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The socket it leaves from.
    pub socket: Socket,
    /// Where it goes.
    pub destination: SocketAddr,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// One test of the decision tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    /// Test I.
    Binding,
    /// Test II: alternate IP, primary port.
    AlternateIp,
    /// Test III: alternate IP and port.
    AlternateIpPort,
    /// Change IP and port, from the fresh socket.
    ChangeBoth,
    /// Change port only, from the fresh socket.
    ChangePort,
    /// To the own mapped address.
    Hairpin,
}

impl Test {
    const fn socket(self) -> Socket {
        match self {
            Test::ChangeBoth | Test::ChangePort => Socket::Fresh,
            _ => Socket::Primary,
        }
    }

    /// How long the test waits in all.
    const fn wait(self) -> Duration {
        match self {
            Test::Binding => BINDING_WAIT,
            Test::AlternateIp | Test::AlternateIpPort => MAPPING_WAIT,
            Test::ChangeBoth | Test::ChangePort | Test::Hairpin => NO_ANSWER_WAIT,
        }
    }

    /// Whether the request is retransmitted until the deadline (tests that
    /// expect an answer) or sent once (the hairpin probe, which must not
    /// look like a flood to the NAT).
    const fn retransmits(self) -> bool {
        !matches!(self, Test::Hairpin)
    }
}

/// The transaction under way.
#[derive(Debug)]
struct Pending {
    test: Test,
    tid: TransactionId,
    destination: SocketAddr,
    request: Vec<u8>,
    /// When the test gives up.
    deadline: Instant,
    /// When the request is sent again.
    retransmit_at: Instant,
    rto: Duration,
}

/// What a Binding answer said.
#[derive(Clone, Copy, Debug)]
struct Answer {
    mapped: SocketAddr,
    other: Option<SocketAddr>,
}

/// RFC 5780 discovery against one server (module docs).
#[derive(Debug)]
pub struct Discovery {
    server: SocketAddr,
    local: SocketAddr,
    profile: NatProfile,
    /// Test I's answer, once it came.
    first: Option<Answer>,
    /// Test II's mapped address, once it came.
    second: Option<SocketAddr>,
    pending: Option<Pending>,
    transmits: VecDeque<Transmit>,
    tid_key: hmac::Key,
    tids: u64,
    done: bool,
}

impl Discovery {
    /// Starts discovery against `server` from the primary socket, whose
    /// address as the routing table picks it toward the server is `local`.
    /// `seed` (32 random bytes) is where transaction ids come from.
    pub fn new(server: SocketAddr, local: SocketAddr, seed: [u8; 32], now: Instant) -> Discovery {
        let mut d = Discovery {
            server,
            local,
            profile: NatProfile {
                server: Some(server),
                transport: Some(Transport::Udp),
                local_address: Some(local),
                ..NatProfile::default()
            },
            first: None,
            second: None,
            pending: None,
            transmits: VecDeque::new(),
            tid_key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
            tids: 0,
            done: false,
        };
        d.start(Test::Binding, server, now);
        d
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Discovery::handle_timeout`] is due; `None` once done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let p = self.pending.as_ref()?;
        Some(if p.test.retransmits() {
            p.retransmit_at.min(p.deadline)
        } else {
            p.deadline
        })
    }

    /// The socket an answer is awaited on; `None` once done.
    pub fn listening(&self) -> Option<Socket> {
        self.pending.as_ref().map(|p| p.test.socket())
    }

    /// The result, once every test ran.
    pub fn profile(&self) -> Option<&NatProfile> {
        self.done.then_some(&self.profile)
    }

    /// Time passed: retransmit, or conclude the test under way.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        if now >= p.deadline {
            let test = p.test;
            self.pending = None;
            self.conclude(test, None, now);
            return;
        }
        if p.test.retransmits() && now >= p.retransmit_at {
            p.rto *= 2;
            p.retransmit_at = now + p.rto;
            self.transmits.push_back(Transmit {
                socket: p.test.socket(),
                destination: p.destination,
                payload: p.request.clone(),
            });
        }
    }

    /// A send from `socket` failed (the kernel reported an ICMP error): the
    /// test under way on it gets no answer.
    pub fn handle_send_error(&mut self, socket: Socket, now: Instant) {
        if let Some(p) = &self.pending
            && p.test.socket() == socket
        {
            let test = p.test;
            self.pending = None;
            self.conclude(test, None, now);
        }
    }

    /// A datagram arrived on `socket` from `from`.
    pub fn handle_input(&mut self, socket: Socket, from: SocketAddr, bytes: &[u8], now: Instant) {
        let _ = from; // answers to change requests come from other addresses
        let Some(p) = &self.pending else { return };
        if p.test.socket() != socket {
            return;
        }
        let Ok(msg) = Message::parse(bytes) else {
            return;
        };
        if msg.transaction_id() != p.tid || msg.method() != Method::BINDING {
            return;
        }
        if msg.has_fingerprint() && msg.verify_fingerprint().is_err() {
            return;
        }
        let test = p.test;
        if test == Test::Hairpin {
            // Our own request, come back through the NAT.
            if msg.class() == Class::Request {
                self.pending = None;
                self.profile.hairpinning = Some(true);
                self.finish();
            }
            return;
        }
        if msg.class() != Class::Success {
            return;
        }
        let Some(answer) = parse_answer(&msg) else {
            return;
        };
        self.pending = None;
        self.conclude(test, Some(answer), now);
    }

    fn next_tid(&mut self) -> TransactionId {
        self.tids += 1;
        let tag = hmac::sign(&self.tid_key, &self.tids.to_be_bytes());
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&tag.as_ref()[..12]);
        TransactionId(tid)
    }

    fn start(&mut self, test: Test, destination: SocketAddr, now: Instant) {
        let tid = self.next_tid();
        let change = match test {
            Test::ChangeBoth => Some(ChangeRequest {
                change_ip: true,
                change_port: true,
            }),
            Test::ChangePort => Some(ChangeRequest {
                change_ip: false,
                change_port: true,
            }),
            _ => None,
        };
        let Some(request) = request(&tid, change) else {
            // 128 bytes always hold a Binding request: a bug, not input.
            self.finish();
            return;
        };
        self.transmits.push_back(Transmit {
            socket: test.socket(),
            destination,
            payload: request.clone(),
        });
        self.pending = Some(Pending {
            test,
            tid,
            destination,
            request,
            deadline: now + test.wait(),
            retransmit_at: now + INITIAL_RTO,
            rto: INITIAL_RTO,
        });
    }

    /// The decision tree: what a test's answer (or its absence) means, and
    /// which test follows.
    fn conclude(&mut self, test: Test, answer: Option<Answer>, now: Instant) {
        match (test, answer) {
            (Test::Binding, None) => self.finish(),
            (Test::Binding, Some(a)) => {
                self.first = Some(a);
                self.profile.mapped_address = Some(a.mapped);
                self.profile.other_address = a.other;
                let behind_nat = a.mapped != self.local;
                if !behind_nat {
                    self.profile.mapping = Some(Mapping::NoNat);
                }
                match a.other {
                    None => self.finish(),
                    Some(other) if behind_nat => self.start(
                        Test::AlternateIp,
                        SocketAddr::new(other.ip(), self.server.port()),
                        now,
                    ),
                    Some(_) => self.start(Test::ChangeBoth, self.server, now),
                }
            }
            (Test::AlternateIp, Some(a)) if Some(a.mapped) == self.first.map(|f| f.mapped) => {
                self.profile.mapping = Some(Mapping::EndpointIndependent);
                self.allocation(&[a.mapped]);
                self.start(Test::ChangeBoth, self.server, now);
            }
            (Test::AlternateIp, Some(a)) => {
                self.second = Some(a.mapped);
                self.allocation(&[a.mapped]);
                match self.first.and_then(|f| f.other) {
                    Some(other) => self.start(Test::AlternateIpPort, other, now),
                    None => self.start(Test::ChangeBoth, self.server, now),
                }
            }
            (Test::AlternateIpPort, Some(a)) => {
                self.profile.mapping = Some(if Some(a.mapped) == self.second {
                    Mapping::AddressDependent
                } else {
                    Mapping::AddressAndPortDependent
                });
                let second = self.second.unwrap_or(a.mapped);
                self.allocation(&[second, a.mapped]);
                self.start(Test::ChangeBoth, self.server, now);
            }
            // A mapping test without an answer leaves the mapping unknown.
            (Test::AlternateIp | Test::AlternateIpPort, None) => {
                self.start(Test::ChangeBoth, self.server, now);
            }
            (Test::ChangeBoth, Some(_)) => self.filtered(Filtering::EndpointIndependent, now),
            (Test::ChangeBoth, None) => self.start(Test::ChangePort, self.server, now),
            (Test::ChangePort, Some(_)) => self.filtered(Filtering::AddressDependent, now),
            (Test::ChangePort, None) => self.filtered(Filtering::AddressAndPortDependent, now),
            (Test::Hairpin, _) => {
                self.profile.hairpinning = Some(false);
                self.finish();
            }
        }
    }

    /// How the NAT allocated ports, from test I's mapping followed by
    /// `later` ones of the same local socket.
    fn allocation(&mut self, later: &[SocketAddr]) {
        let Some(first) = self.first else { return };
        let ports: Vec<u16> = std::iter::once(first.mapped)
            .chain(later.iter().copied())
            .map(|a| a.port())
            .collect();
        let found = natrix_model::PortAllocation::from_ports(self.local.port(), &ports);
        self.profile.port_allocation = found.map(|(a, _)| a);
        self.profile.port_stride = found.and_then(|(_, s)| s);
    }

    fn filtered(&mut self, f: Filtering, now: Instant) {
        self.profile.filtering = Some(f);
        match self.first {
            Some(first) if first.mapped != self.local => {
                self.start(Test::Hairpin, first.mapped, now);
            }
            _ => self.finish(),
        }
    }

    fn finish(&mut self) {
        self.pending = None;
        self.profile = std::mem::take(&mut self.profile).with_derived();
        self.done = true;
    }
}

/// A Binding request (with CHANGE-REQUEST when asked) and FINGERPRINT.
fn request(tid: &TransactionId, change: Option<ChangeRequest>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 128];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        tid,
    )
    .ok()?;
    if let Some(c) = change {
        enc.attribute(&Attribute::ChangeRequest(c)).ok()?;
    }
    enc.fingerprint().ok()?;
    let n = enc.finish();
    buf.truncate(n);
    Some(buf)
}

fn parse_answer(msg: &Message<'_>) -> Option<Answer> {
    let mapped = match msg
        .decode(AttributeType::XOR_MAPPED_ADDRESS)
        .or_else(|| msg.decode(AttributeType::MAPPED_ADDRESS))?
        .ok()?
    {
        Attribute::XorMappedAddress(a) | Attribute::MappedAddress(a) => a,
        _ => return None,
    };
    let other = match msg.decode(AttributeType::OTHER_ADDRESS) {
        Some(Ok(Attribute::OtherAddress(a))) => Some(a),
        _ => None,
    };
    Some(Answer { mapped, other })
}

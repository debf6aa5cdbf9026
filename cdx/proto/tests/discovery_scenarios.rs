//! The RFC 5780 discovery state machine at explicit instants: every branch
//! of the decision tree, lost and late answers, and the fresh-socket
//! filtering rule, against a simulated RFC 5780 server behind simulated
//! NATs (mapping and filtering as RFC 4787 defines them).

// Instant has no constructor but `now`: each test takes its t0 from it once
// and advances virtual time from there.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natrix_cdx_proto::discovery::{
    BINDING_WAIT, Discovery, INITIAL_RTO, NO_ANSWER_WAIT, Socket, Transmit,
};
use natrix_model::{Filtering, Mapping, NatClass, NatProfile};
use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, Message, MessageType, Method, TransactionId,
};

const LOCAL: &str = "10.0.0.2:40000";
const SERVER: &str = "192.0.2.1:3478";
const PUBLIC_IP: &str = "203.0.113.7";
/// One-way latency of the simulated network.
const HOP: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, PartialEq)]
enum Alloc {
    Sequential,
    Preserving,
    Scattered,
}

/// A simulated NAT in front of the client's two sockets.
struct Nat {
    mapping: Mapping,
    filtering: Filtering,
    hairpin: bool,
    /// (socket, destination key) → public port.
    ports: HashMap<(Socket, SocketAddr), u16>,
    next_port: u16,
    /// How new mappings get their port: the next one up (sequential, the
    /// default), the local port while it is free, or scattered.
    allocation: Alloc,
    /// Destinations each socket sent to.
    contacted: HashMap<Socket, Vec<SocketAddr>>,
}

impl Nat {
    fn new(mapping: Mapping, filtering: Filtering) -> Nat {
        Nat {
            mapping,
            filtering,
            hairpin: false,
            ports: HashMap::new(),
            next_port: 50000,
            allocation: Alloc::Sequential,
            contacted: HashMap::new(),
        }
    }

    /// The public address `socket`'s datagram to `to` leaves with.
    fn map(&mut self, socket: Socket, to: SocketAddr) -> SocketAddr {
        self.contacted.entry(socket).or_default().push(to);
        let key = match self.mapping {
            Mapping::NoNat | Mapping::EndpointIndependent => SocketAddr::new(ip("0.0.0.0"), 0),
            Mapping::AddressDependent => SocketAddr::new(to.ip(), 0),
            Mapping::AddressAndPortDependent => to,
        };
        let local = addr(LOCAL).port();
        let taken = self.ports.values().any(|p| *p == local);
        let (next, allocation) = (&mut self.next_port, self.allocation);
        let port = *self.ports.entry((socket, key)).or_insert_with(|| {
            *next += 1;
            match allocation {
                Alloc::Preserving if !taken => local,
                Alloc::Scattered => 50000 + (*next - 50000) * 7919 % 10007,
                _ => *next,
            }
        });
        SocketAddr::new(ip(PUBLIC_IP), port)
    }

    /// Whether a datagram from `from` reaches `socket`.
    fn admits(&self, socket: Socket, from: SocketAddr) -> bool {
        let sent = self.contacted.get(&socket).map_or(&[][..], Vec::as_slice);
        match self.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => sent.iter().any(|a| a.ip() == from.ip()),
            Filtering::AddressAndPortDependent => sent.contains(&from),
        }
    }

    /// The socket a public address belongs to.
    fn owner(&self, public: SocketAddr) -> Option<Socket> {
        self.ports
            .iter()
            .find(|(_, p)| **p == public.port())
            .map(|((s, _), _)| *s)
    }
}

/// The network: an RFC 5780 server on two IPs and two ports (or without
/// OTHER-ADDRESS), the client behind `nat` (no NAT when `None`).
struct Net {
    rfc5780: bool,
    nat: Option<Nat>,
    /// Client requests to drop, by index (lost on the way).
    lose: Vec<usize>,
    sent: Vec<(Instant, Transmit)>,
    /// Datagrams on their way to the client: (arrival, socket, from, bytes).
    inbound: Vec<(Instant, Socket, SocketAddr, Vec<u8>)>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn server_addrs() -> [SocketAddr; 4] {
    [
        addr(SERVER),
        addr("192.0.2.1:3479"),
        addr("192.0.2.2:3478"),
        addr("192.0.2.2:3479"),
    ]
}

impl Net {
    fn new(nat: Option<Nat>) -> Net {
        Net {
            rfc5780: true,
            nat,
            lose: Vec::new(),
            sent: Vec::new(),
            inbound: Vec::new(),
        }
    }

    fn public(&mut self, socket: Socket, to: SocketAddr) -> SocketAddr {
        match &mut self.nat {
            Some(n) => n.map(socket, to),
            None => match socket {
                Socket::Primary => addr(LOCAL),
                Socket::Fresh => addr("10.0.0.2:40001"),
            },
        }
    }

    fn send(&mut self, t: Transmit, now: Instant) {
        let index = self.sent.len();
        self.sent.push((now, t.clone()));
        let from = self.public(t.socket, t.destination);
        if self.lose.contains(&index) {
            return;
        }
        if t.destination.ip() == ip(PUBLIC_IP) {
            // Hairpin: back in through the NAT, if it does that.
            if let Some(n) = &self.nat
                && n.hairpin
                && let Some(owner) = n.owner(t.destination)
            {
                self.inbound.push((now + HOP, owner, from, t.payload));
            }
            return;
        }
        let Some(at) = server_addrs().iter().position(|a| *a == t.destination) else {
            return;
        };
        let msg = Message::parse(&t.payload).unwrap();
        let (change_ip, change_port) = match msg.decode(AttributeType::CHANGE_REQUEST) {
            Some(Ok(Attribute::ChangeRequest(c))) => (c.change_ip, c.change_port),
            _ => (false, false),
        };
        let answer_from =
            server_addrs()[at ^ (usize::from(change_ip) * 2) ^ usize::from(change_port)];
        let answer = success(&msg.transaction_id(), from, self.rfc5780);
        if self
            .nat
            .as_ref()
            .is_none_or(|n| n.admits(t.socket, answer_from))
        {
            self.inbound
                .push((now + 2 * HOP, t.socket, answer_from, answer));
        }
    }
}

fn success(tid: &TransactionId, mapped: SocketAddr, rfc5780: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Success),
        tid,
    )
    .unwrap();
    enc.xor_mapped_address(mapped).unwrap();
    if rfc5780 {
        enc.attribute(&Attribute::OtherAddress(addr("192.0.2.2:3479")))
            .unwrap();
    }
    enc.fingerprint().unwrap();
    let n = enc.finish();
    buf.truncate(n);
    buf
}

/// Drives `d` in virtual time until it is done; returns the profile and
/// how long it took.
fn run(net: &mut Net, t0: Instant) -> (NatProfile, Duration) {
    let mut d = Discovery::new(addr(SERVER), addr(LOCAL), [7; 32], t0);
    let mut now = t0;
    for _ in 0..1000 {
        while let Some(t) = d.poll_transmit() {
            net.send(t, now);
        }
        if let Some(p) = d.profile() {
            return (p.clone(), now - t0);
        }
        let timeout = d
            .poll_timeout()
            .expect("a machine that is not done has a timeout");
        net.inbound.sort_by_key(|i| i.0);
        if let Some(first) = net.inbound.first()
            && first.0 <= timeout
        {
            let (at, socket, from, bytes) = net.inbound.remove(0);
            now = at;
            d.handle_input(socket, from, &bytes, now);
        } else {
            now = timeout;
            d.handle_timeout(now);
        }
    }
    panic!("discovery did not finish in 1000 steps");
}

fn discover(nat: Option<Nat>) -> (NatProfile, Net) {
    let mut net = Net::new(nat);
    let (p, _) = run(&mut net, Instant::now());
    (p, net)
}

fn behind(mapping: Mapping, filtering: Filtering) -> NatProfile {
    discover(Some(Nat::new(mapping, filtering))).0
}

#[test]
fn no_answer_at_all_is_udp_blocked_after_the_binding_wait_with_doubling_retransmits() {
    let mut net = Net::new(None);
    net.lose = (0..100).collect();
    let t0 = Instant::now();
    let (p, took) = run(&mut net, t0);
    assert_eq!(p.class, Some(NatClass::UdpBlocked));
    assert_eq!(p.udp_blocked, Some(true));
    assert_eq!(p.mapped_address, None);
    assert_eq!(took, BINDING_WAIT);
    let at: Vec<Duration> = net.sent.iter().map(|(t, _)| *t - t0).collect();
    let ms = |m| Duration::from_millis(m);
    assert_eq!(
        at,
        [ms(0), ms(100), ms(300), ms(700)],
        "RTO 100 ms, doubling"
    );
    assert_eq!(INITIAL_RTO, ms(100));
}

#[test]
fn no_nat_skips_the_mapping_tests_and_hairpinning() {
    let (p, net) = discover(None);
    assert_eq!(p.mapping, Some(Mapping::NoNat));
    assert_eq!(p.filtering, Some(Filtering::EndpointIndependent));
    assert_eq!(p.class, Some(NatClass::Open));
    assert_eq!(p.behind_nat, Some(false));
    assert_eq!(p.hairpinning, None);
    assert_eq!(p.other_address, Some(addr("192.0.2.2:3479")));
    let destinations: Vec<SocketAddr> = net.sent.iter().map(|(_, t)| t.destination).collect();
    assert_eq!(
        destinations,
        [addr(SERVER), addr(SERVER)],
        "test I, then change-both"
    );
}

#[test]
fn a_server_without_rfc5780_gives_the_mapped_address_only() {
    let mut net = Net::new(Some(Nat::new(
        Mapping::EndpointIndependent,
        Filtering::EndpointIndependent,
    )));
    net.rfc5780 = false;
    let (p, _) = run(&mut net, Instant::now());
    assert_eq!(p.mapped_address.map(|a| a.ip()), Some(ip(PUBLIC_IP)));
    assert_eq!((p.mapping, p.filtering, p.class), (None, None, None));
    assert_eq!(p.behind_nat, Some(true));
    assert_eq!(net.sent.len(), 1);
}

#[test]
fn every_classic_nat_is_classified_by_its_behaviours() {
    let (eim, adm, apdm) = (
        Mapping::EndpointIndependent,
        Mapping::AddressDependent,
        Mapping::AddressAndPortDependent,
    );
    let (eif, adf, apdf) = (
        Filtering::EndpointIndependent,
        Filtering::AddressDependent,
        Filtering::AddressAndPortDependent,
    );
    let cases = [
        (eim, eif, NatClass::FullCone),
        (eim, adf, NatClass::RestrictedCone),
        (eim, apdf, NatClass::PortRestrictedCone),
        (adm, adf, NatClass::Symmetric),
        (apdm, apdf, NatClass::Symmetric),
    ];
    for (m, f, class) in cases {
        let p = behind(m, f);
        assert_eq!((p.mapping, p.filtering), (Some(m), Some(f)), "{class}");
        assert_eq!(p.class, Some(class));
        assert_eq!(p.hairpinning, Some(false), "{class}: tested behind a NAT");
    }
}

/// Punching a symmetric NAT needs its port allocation: the mapping tests'
/// public ports of one socket tell sequential (with its stride), preserving
/// and random apart; an endpoint-independent NAT that moved the port cannot
/// tell.
#[test]
fn port_allocation_is_read_from_the_mapping_tests() {
    use natrix_model::PortAllocation;
    let apdm = (
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
    );
    let with = |alloc: Alloc, (m, f): (Mapping, Filtering)| {
        let mut nat = Nat::new(m, f);
        nat.allocation = alloc;
        discover(Some(nat)).0
    };
    let p = with(Alloc::Sequential, apdm);
    assert_eq!(
        (p.port_allocation, p.port_stride),
        (Some(PortAllocation::Sequential), Some(1))
    );
    let p = with(Alloc::Preserving, apdm);
    assert_eq!(p.port_allocation, Some(PortAllocation::Preserving));
    assert_eq!(p.mapped_address.map(|a| a.port()), Some(40000));
    let p = with(Alloc::Scattered, apdm);
    assert_eq!(
        (p.port_allocation, p.port_stride),
        (Some(PortAllocation::Random), None)
    );
    let eim = (
        Mapping::EndpointIndependent,
        Filtering::AddressAndPortDependent,
    );
    assert_eq!(with(Alloc::Sequential, eim).port_allocation, None);
    assert_eq!(
        with(Alloc::Preserving, eim).port_allocation,
        Some(PortAllocation::Preserving)
    );
    assert_eq!(discover(None).0.port_allocation, None, "no NAT");
}

#[test]
fn filtering_runs_from_a_fresh_socket_so_the_mapping_tests_do_not_open_the_filter() {
    // The mapping tests sent to the alternate IP from the primary socket;
    // an address-dependent filter would now admit the change-IP answer
    // there and the NAT would pass for full cone.
    let (p, net) = discover(Some(Nat::new(
        Mapping::EndpointIndependent,
        Filtering::AddressDependent,
    )));
    assert_eq!(p.filtering, Some(Filtering::AddressDependent));
    let sockets: Vec<Socket> = net.sent.iter().map(|(_, t)| t.socket).collect();
    assert_eq!(
        sockets,
        [
            Socket::Primary, // test I
            Socket::Primary, // test II: alternate IP
            Socket::Fresh,   // change IP and port (no answer: ADF)
            Socket::Fresh,   // ... retransmits within NO_ANSWER_WAIT
            Socket::Fresh,
            Socket::Fresh,   // change port
            Socket::Primary, // hairpin
        ]
    );
}

#[test]
fn a_lost_answer_is_retransmitted_and_a_late_one_is_ignored() {
    // Test I's first request is lost: the retransmit at 100 ms gets the
    // answer, and the profile is the same as without loss.
    let mut net = Net::new(Some(Nat::new(
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
    )));
    net.lose = vec![0];
    let t0 = Instant::now();
    let (p, _) = run(&mut net, t0);
    assert_eq!(p.class, Some(NatClass::Symmetric));
    assert_eq!(net.sent[1].0 - t0, INITIAL_RTO);

    // A late answer to test I, arriving during test II, does not count as
    // test II's answer (its mapping would read as endpoint-independent).
    let mut d = Discovery::new(addr(SERVER), addr(LOCAL), [1; 32], t0);
    let first = d.poll_transmit().unwrap();
    let tid1 = Message::parse(&first.payload).unwrap().transaction_id();
    let mapped = addr("203.0.113.7:50001");
    let answer = success(&tid1, mapped, true);
    d.handle_input(Socket::Primary, addr(SERVER), &answer, t0 + HOP);
    let second = d.poll_transmit().unwrap();
    assert_eq!(second.destination, addr("192.0.2.2:3478"), "test II");
    // The same answer again (duplicated, late): ignored.
    d.handle_input(Socket::Primary, addr(SERVER), &answer, t0 + 2 * HOP);
    assert_eq!(d.poll_transmit(), None);
    assert_eq!(d.profile(), None);
    // Garbage, a request, and an answer on the wrong socket: ignored too.
    d.handle_input(
        Socket::Primary,
        addr(SERVER),
        b"\x00\x01garbage",
        t0 + 2 * HOP,
    );
    let tid2 = Message::parse(&second.payload).unwrap().transaction_id();
    let right = success(&tid2, mapped, true);
    d.handle_input(Socket::Fresh, addr(SERVER), &right, t0 + 2 * HOP);
    assert_eq!(
        d.poll_transmit(),
        None,
        "answer on the fresh socket ignored"
    );
    d.handle_input(
        Socket::Primary,
        addr("192.0.2.2:3478"),
        &right,
        t0 + 3 * HOP,
    );
    let third = d.poll_transmit().unwrap();
    assert_eq!(third.socket, Socket::Fresh, "EIM found: on to filtering");
}

#[test]
fn a_mapping_test_without_answer_leaves_the_mapping_unknown_and_filtering_still_runs() {
    let mut net = Net::new(Some(Nat::new(
        Mapping::EndpointIndependent,
        Filtering::EndpointIndependent,
    )));
    // Test II (every try of it) is lost: requests 1.. to the alternate IP.
    net.lose = (1..=4).collect();
    let (p, _) = run(&mut net, Instant::now());
    assert_eq!(p.mapping, None);
    assert_eq!(p.filtering, Some(Filtering::EndpointIndependent));
    assert_eq!(p.class, None, "no class without a mapping");
}

#[test]
fn hairpinning_is_found_when_the_nat_loops_back() {
    let mut nat = Nat::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
    nat.hairpin = true;
    let (p, net) = discover(Some(nat));
    assert_eq!(p.hairpinning, Some(true));
    let last = &net.sent.last().unwrap().1;
    assert_eq!(last.destination, p.mapped_address.unwrap());
    assert_eq!(last.socket, Socket::Primary);
}

#[test]
fn a_send_error_ends_the_test_as_unanswered() {
    let t0 = Instant::now();
    let mut d = Discovery::new(addr(SERVER), addr(LOCAL), [2; 32], t0);
    let _ = d.poll_transmit();
    // Port unreachable reported for the fresh socket: not the one in use.
    d.handle_send_error(Socket::Fresh, t0);
    assert_eq!(d.profile(), None);
    d.handle_send_error(Socket::Primary, t0);
    let p = d.profile().unwrap();
    assert_eq!(p.class, Some(NatClass::UdpBlocked));
    assert_eq!(d.poll_timeout(), None);
    assert_eq!(d.listening(), None);
}

#[test]
fn filtering_tests_give_up_after_the_no_answer_wait() {
    let t0 = Instant::now();
    let mut net = Net::new(Some(Nat::new(
        Mapping::EndpointIndependent,
        Filtering::AddressAndPortDependent,
    )));
    let (p, took) = run(&mut net, t0);
    assert_eq!(p.class, Some(NatClass::PortRestrictedCone));
    // Test I and II answered after 2 hops each, then two filtering tests
    // and the hairpin test each ran to NO_ANSWER_WAIT.
    assert_eq!(took, 4 * HOP + 3 * NO_ANSWER_WAIT);
}

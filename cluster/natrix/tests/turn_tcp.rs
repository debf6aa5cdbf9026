//! TCP allocations (RFC 6062) driven by clients nobody here wrote —
//! coturn's `turnutils_uclient -T` (client to client over TCP and TLS) and
//! `-P` (a peer that connects in), compared with coturn itself — and by a
//! bare client that reaches a real TCP echo server with Connect: a large
//! transfer byte for byte through the splice, a refused peer answered 447,
//! usage records and metrics, and peers that connect without a permission.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{Natrix, PASSWORD, USER, uclient};
use natrix_wire::{Attribute, AttributeType, Class, Message, Method};

const ALLOW_LOOPBACK: &[&str] = &["--peer-allow", "127.0.0.0/8"];

fn assert_clean(report: &common::UclientReport, expected: u64) {
    assert_eq!(
        (report.sent, report.received, report.lost),
        (expected, expected, 0),
        "uclient output:\n{}",
        report.output
    );
}

fn tcp_allocation_clients(port: u16, extra: &[&str]) -> common::UclientReport {
    let p = port.to_string();
    let mut args = vec!["-p", &p, "-u", USER, "-w", PASSWORD];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    uclient(&args)
}

/// coturn's client joins every two of its clients' TCP allocations (`-T`:
/// one Connects to the other's relayed address, the other takes the
/// connection from a ConnectionAttempt) and sends through the data
/// connections: nothing lost, every connection bound, ConnectionBinds
/// that reached the loop not holding their connection handed over, and
/// nothing left once the clients are gone.
#[test]
fn coturn_clients_relay_over_tcp_allocations_without_loss() {
    let natrix = Natrix::relay(&[ALLOW_LOOPBACK, &["--workers", "2"]].concat());
    let report = tcp_allocation_clients(
        natrix.stun.port(),
        &["-T", "-m", "6", "-n", "50", "-l", "1000"],
    );
    assert_clean(&report, 300);
    let bound = natrix.metric("relay_tcp_peer_connection_events_total{event=\"bound\"}");
    let connected = natrix.metric("relay_tcp_peer_connection_events_total{event=\"connected\"}");
    let accepted = natrix.metric("relay_tcp_peer_connection_events_total{event=\"accepted\"}");
    // Each of the 15 pairs: one Connect, one ConnectionAttempt, a data
    // connection on each side.
    assert_eq!((connected, accepted, bound), (15.0, 15.0, 30.0));
    // Thirty data connections spread over two loops by their 4-tuples:
    // some reach the loop without their peer connection (all landing
    // right has odds of one in a billion).
    assert!(
        natrix.metric("relay_tcp_peer_connection_events_total{event=\"bind_handed_over\"}") >= 1.0,
        "{}",
        natrix.metrics_text()
    );
    natrix.wait_metric("relay_tcp_peer_connections", |v| v == 0.0);
    natrix.wait_metric("relay_tcp_allocations", |v| v == 0.0);
    natrix.wait_metric("relay_allocations", |v| v == 0.0);
}

/// The same over TLS: control and data connections are TLS sessions.
#[test]
fn coturn_clients_relay_over_tcp_allocations_through_tls() {
    let (natrix, tls_port, dir) = common::tls_relay("tcp-tls", "natrix-tcp", ALLOW_LOOPBACK);
    let report =
        tcp_allocation_clients(tls_port, &["-T", "-S", "-m", "4", "-n", "50", "-l", "1000"]);
    assert_clean(&report, 200);
    // Four clients joined pairwise: six pairs, twelve data connections.
    assert_eq!(
        natrix.metric("relay_tcp_peer_connection_events_total{event=\"bound\"}"),
        12.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-P`: each client's peer is an active TCP peer that connects to the
/// relayed address (ConnectionAttempt, then ConnectionBind). coturn's
/// client counts half its messages as lost in this mode against coturn
/// itself; natrix delivers exactly what coturn delivers.
#[test]
fn coturn_passive_clients_take_peers_connections_as_through_coturn() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let (_coturn, coturn_port) = common::coturn(None);
    let args = ["-P", "-m", "4", "-n", "20", "-l", "500"];
    let through_natrix = tcp_allocation_clients(natrix.stun.port(), &args);
    let through_coturn = tcp_allocation_clients(coturn_port, &args);
    assert!(
        through_coturn.received > 0,
        "coturn: {}",
        through_coturn.output
    );
    assert_eq!(
        (through_natrix.sent, through_natrix.received),
        (through_coturn.sent, through_coturn.received),
        "natrix:\n{}\ncoturn:\n{}",
        through_natrix.output,
        through_coturn.output
    );
    // Each pair's passive client took its active peer's connection.
    let event = |e: &str| {
        natrix.metric(&format!(
            "relay_tcp_peer_connection_events_total{{event=\"{e}\"}}"
        ))
    };
    assert_eq!((event("accepted"), event("bound")), (2.0, 2.0));
}

// ------------------------------------------------- a bare RFC 6062 client

/// A TURN client over one TCP connection, long-term credentials.
struct Control {
    stream: TcpStream,
    requests: common::Requests,
}

fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 20];
    stream.read_exact(&mut head).expect("a STUN header");
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut frame = head.to_vec();
    frame.resize(20 + len, 0);
    stream.read_exact(&mut frame[20..]).expect("a STUN body");
    frame
}

impl Control {
    fn connect(server: SocketAddr) -> Control {
        let stream = TcpStream::connect(server).expect("connecting to the relay");
        stream
            .set_read_timeout(Some(Duration::from_secs(40)))
            .unwrap();
        Control {
            stream,
            requests: common::Requests::new(),
        }
    }

    fn encode(&mut self, method: Method, attrs: &[Attribute<'_>], signed: bool) -> Vec<u8> {
        self.requests.encode(method, attrs, signed)
    }

    /// Sends a signed request (fetching a nonce first when it has none)
    /// and returns the answer.
    fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        if self.requests.nonce.is_empty() {
            let req = self.encode(method, attrs, false);
            self.stream.write_all(&req).unwrap();
            let answer = read_frame(&mut self.stream);
            self.requests.learn_nonce(&answer);
        }
        let req = self.encode(method, attrs, true);
        self.stream.write_all(&req).unwrap();
        read_frame(&mut self.stream)
    }
}

fn error_of(answer: &[u8]) -> Option<u16> {
    match Message::parse(answer)
        .unwrap()
        .decode(AttributeType::ERROR_CODE)
    {
        Some(Ok(Attribute::ErrorCode(e))) => Some(e.code),
        _ => None,
    }
}

/// A TCP echo server: each connection's bytes come back until it closes.
fn tcp_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut writer = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut writer);
            });
        }
    });
    addr
}

/// Connect reaches a real TCP server from the relayed address; the data
/// connection carries 8 MiB there and back byte for byte (the splice
/// pauses a side rather than drop: the bytes sent all arrive, in order).
/// A peer that refuses the connection is answered 447. The allocation's
/// usage record counts the bytes; a peer that connects to the relayed
/// address without a permission is closed at once.
#[test]
fn connect_reaches_a_tcp_server_and_the_data_connection_carries_every_byte() {
    let dir = std::env::temp_dir().join(format!("natrix-tcp-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let usage = dir.join("usage.jsonl");
    let _ = std::fs::remove_file(&usage);
    let natrix = Natrix::relay(
        &[
            ALLOW_LOOPBACK,
            &[
                "--workers",
                "2",
                "--usage-file",
                &usage.display().to_string(),
            ],
        ]
        .concat(),
    );
    let echo = tcp_echo_server();
    let mut control = Control::connect(natrix.stun);
    let answer = control.request(
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(natrix_wire::transport::TCP)],
    );
    let msg = Message::parse(&answer).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    let relayed = match msg.decode(AttributeType::XOR_RELAYED_ADDRESS) {
        Some(Ok(Attribute::XorRelayedAddress(a))) => a,
        other => panic!("no relayed address: {other:?}"),
    };

    // A closed port: 447.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let answer = control.request(Method::CONNECT, &[Attribute::XorPeerAddress(closed)]);
    assert_eq!(error_of(&answer), Some(447));

    // The echo server: a CONNECTION-ID.
    let answer = control.request(Method::CONNECT, &[Attribute::XorPeerAddress(echo)]);
    let msg = Message::parse(&answer).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    msg.verify_integrity(&control.requests.key).expect("signed");
    let id = match msg.decode(AttributeType::CONNECTION_ID) {
        Some(Ok(Attribute::ConnectionId(id))) => id,
        other => panic!("no CONNECTION-ID: {other:?}"),
    };

    // Without a permission, peers' connections to the relayed address are
    // closed unread, a burst of them as one.
    for _ in 0..50 {
        let mut intruder = TcpStream::connect(relayed).expect("the relayed address listens");
        intruder
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            intruder.read(&mut byte).map_err(|e| e.kind()),
            Ok(0),
            "closed"
        );
    }
    natrix.wait_metric(
        "relay_tcp_peer_connection_events_total{event=\"refused\"}",
        |v| v == 50.0,
    );

    // The data connection.
    let mut data = Control::connect(natrix.stun);
    data.requests.nonce = control.requests.nonce.clone();
    data.requests.next = 1000;
    let req = data.encode(
        Method::CONNECTION_BIND,
        &[Attribute::ConnectionId(id)],
        true,
    );
    data.stream.write_all(&req).unwrap();
    let answer = read_frame(&mut data.stream);
    let msg = Message::parse(&answer).unwrap();
    assert_eq!(
        (msg.method(), msg.class()),
        (Method::CONNECTION_BIND, Class::Success),
        "{msg:?}"
    );

    const TOTAL: usize = 8 << 20;
    let payload: Vec<u8> = (0..TOTAL).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut writer = data.stream.try_clone().unwrap();
    let sent = payload.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent).map(|()| sent.len()));
    // Nothing read for a while: every buffer on the way fills, the splice
    // pauses both ways, and must resume once the client reads.
    std::thread::sleep(Duration::from_millis(500));
    let mut back = vec![0u8; TOTAL];
    data.stream.read_exact(&mut back).expect("every byte back");
    assert_eq!(sender.join().unwrap().unwrap(), TOTAL);
    assert!(back == payload, "the bytes came back changed");
    drop(data);
    natrix.wait_metric("relay_tcp_peer_connections", |v| v == 0.0);
    assert_eq!(
        natrix.metric("relay_tcp_relayed_bytes_total{direction=\"peer_to_client\"}"),
        TOTAL as f64
    );

    // Deleting the allocation writes its usage record.
    let answer = control.request(Method::REFRESH, &[Attribute::Lifetime(0)]);
    assert_eq!(error_of(&answer), None);
    let mut records = Vec::new();
    for _ in 0..100 {
        records = common::usage_records(&usage);
        if !records.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["relayed_transport"], "tcp");
    assert_eq!(r["client_to_peer"]["bytes"], TOTAL as u64);
    assert_eq!(r["peer_to_client"]["bytes"], TOTAL as u64);
    let _ = std::fs::remove_dir_all(&dir);
}

//! The connection-data exchange against real `natrix cdx` processes: one
//! node, two nodes sharing a real Redis, and bad input.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Natrix;
use natrix_cdx::exchange::client::{
    Candidate, CandidateKind, ConnectionData, exchange, mapped_address, punch,
};
use natrix_cdx::exchange::{self, DELIVER, ENTRY, Entry, POST, PROFILE, TICKET};
use natrix_model::invitation::{Invitation, Ticket, ticket_key};
use natrix_store::testing::RedisServer;
use natrix_wire::{Attribute, AttributeType, Class, Encoder, Message, MessageType, TransactionId};

const SECRET: &str = "exchange-test-cluster-secret";

fn unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn invitations(participants: u8, ttl: u64) -> Vec<Invitation> {
    Invitation::mint_session(SECRET.as_bytes(), participants, unix() + ttl, &mut |b| {
        rand::fill(b)
    })
}

fn node(extra: &[&str]) -> Natrix {
    let mut args = vec!["--cluster-secret", SECRET];
    args.extend_from_slice(extra);
    Natrix::cdx(&args)
}

/// One participant: binds on `ip`, learns its mapped address, posts, and
/// returns what it received (and its own socket for punching).
fn participant(
    ip: &str,
    server: SocketAddr,
    inv: &Invitation,
) -> (UdpSocket, ConnectionData, exchange::client::Exchanged) {
    let socket = UdpSocket::bind((ip, 0)).unwrap();
    let mapped = mapped_address(&socket, server, Duration::from_secs(2))
        .unwrap()
        .expect("a Binding answer");
    let data = ConnectionData {
        class: Some(natrix_model::NatClass::Open),
        candidates: vec![
            Candidate {
                kind: CandidateKind::Host,
                addr: socket.local_addr().unwrap(),
            },
            Candidate {
                kind: CandidateKind::ServerReflexive,
                addr: mapped,
            },
        ],
    };
    let got = exchange(
        &socket,
        server,
        inv,
        &data,
        Some([1, 1, 0, 0]),
        1,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("participant {}: {e}", inv.participant()));
    (socket, data, got)
}

#[test]
fn two_participants_swap_sealed_data_and_punch_through_one_node() {
    let cdx = node(&[]);
    let invs = invitations(2, 60);
    let server = cdx.stun;
    let (a_inv, b_inv) = (invs[0].clone(), invs[1].clone());
    let a = std::thread::spawn(move || participant("127.0.0.2", server, &a_inv));
    std::thread::sleep(Duration::from_millis(200));
    let (b_sock, b_data, b_got) = participant("127.0.0.3", server, &b_inv);
    let (a_sock, a_data, a_got) = a.join().unwrap();

    assert_eq!(a_got.peers.get(&1), Some(&b_data), "A received B's data");
    assert_eq!(b_got.peers.get(&0), Some(&a_data), "B received A's data");
    assert_eq!(a_got.mapped, a_sock.local_addr().unwrap());
    assert_eq!(a_got.rejected_entries + b_got.rejected_entries, 0);

    // Punch: on loopback every path is open; each side must find the
    // other's socket.
    let (inv_a, inv_b) = (invs[0].clone(), invs[1].clone());
    let b_peer = a_data.clone();
    let pb = std::thread::spawn(move || punch(&b_sock, &inv_b, 0, &b_peer, Duration::from_secs(5)));
    let pa = punch(&a_sock, &inv_a, 1, &b_data, Duration::from_secs(5)).unwrap();
    let pb = pb.join().unwrap().unwrap();
    assert_eq!(pa.peer, b_data.candidates[0].addr);
    assert_eq!(pb.peer, a_data.candidates[0].addr);

    cdx.wait_metric("cdx_exchange_posts_total{result=\"accepted\"}", |v| {
        v >= 2.0
    });
    cdx.wait_metric("cdx_exchange_deliveries_total{result=\"acked\"}", |v| {
        v >= 2.0
    });
    cdx.wait_metric("cdx_exchange_sessions", |v| v == 1.0);
    cdx.wait_metric(
        "cdx_nat_profiles_total{filtering=\"endpoint_independent\",mapping=\"no_nat\"}",
        |v| v == 2.0,
    );
}

/// The exchange's keys in Redis (the nodes' registry records aside).
fn store_keys(redis: &RedisServer) -> String {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "--scan",
            "--pattern",
            "natrix:cdx:xs:*",
        ])
        .output()
        .expect("redis-cli (installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn participants_on_two_nodes_meet_through_redis_and_expired_sessions_leave_nothing() {
    let redis = RedisServer::start();
    let url = redis.url();
    let n1 = node(&["--redis-url", &url]);
    let n2 = node(&["--redis-url", &url]);
    let invs = invitations(3, 4);
    let (s1, s2) = (n1.stun, n2.stun);

    // A posts to node 1 and waits; B and C come later to node 2, so A can
    // only learn of them through the store's broadcast to node 1.
    let a_inv = invs[0].clone();
    let a = std::thread::spawn(move || participant("127.0.0.2", s1, &a_inv));
    std::thread::sleep(Duration::from_millis(500));
    let b_inv = invs[1].clone();
    let b = std::thread::spawn(move || participant("127.0.0.3", s2, &b_inv));
    let (_c_sock, c_data, c_got) = participant("127.0.0.4", s2, &invs[2]);
    let (_b_sock, b_data, b_got) = b.join().unwrap();
    let (_a_sock, a_data, a_got) = a.join().unwrap();
    assert_eq!(a_got.peers.len(), 2);
    assert_eq!(a_got.peers.get(&1), Some(&b_data));
    assert_eq!(a_got.peers.get(&2), Some(&c_data));
    assert_eq!(b_got.peers.get(&0), Some(&a_data));
    assert_eq!(c_got.peers.get(&0), Some(&a_data));
    assert_eq!(c_got.peers.get(&1), Some(&b_data));
    n1.wait_metric("cdx_exchange_events_total{result=\"applied\"}", |v| {
        v >= 2.0
    });
    assert!(store_keys(&redis).contains("natrix:cdx:xs:"));

    // The tickets expire 4 s after minting: node state and store keys go.
    n1.wait_metric("cdx_exchange_sessions", |v| v == 0.0);
    n2.wait_metric("cdx_exchange_sessions", |v| v == 0.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store_keys(&redis).trim().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "keys left: {}",
            store_keys(&redis)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With the coordination store gone, a session whose participants share a
/// node goes on from that node alone: both get the other's entry, and the
/// Posts count as accepted locally.
#[test]
fn participants_on_one_node_exchange_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let n = node(&["--redis-url", &url]);
    redis.stop();
    let invs = invitations(2, 60);
    let s = n.stun;
    let a_inv = invs[0].clone();
    let a = std::thread::spawn(move || participant("127.0.0.2", s, &a_inv));
    std::thread::sleep(Duration::from_millis(300));
    let (_b_sock, b_data, b_got) = participant("127.0.0.3", s, &invs[1]);
    let (_a_sock, a_data, a_got) = a.join().unwrap();
    assert_eq!(a_got.peers.get(&1), Some(&b_data));
    assert_eq!(b_got.peers.get(&0), Some(&a_data));
    n.wait_metric("cdx_exchange_posts_total{result=\"accepted_local\"}", |v| {
        v >= 2.0
    });
}

/// A Post request with arbitrary parts, for bad-input tests.
fn post_bytes(ticket: &[u8], entry: &Entry<'_>, fingerprint: bool) -> (TransactionId, Vec<u8>) {
    let tid = TransactionId(rand::random());
    let mut buf = vec![0u8; 2048];
    let mut enc = Encoder::new(&mut buf, MessageType::new(POST, Class::Request), &tid).unwrap();
    enc.raw(TICKET, ticket).unwrap();
    enc.raw(ENTRY, &entry.to_bytes()).unwrap();
    enc.raw(PROFILE, &[2, 3, 0, 0]).unwrap();
    if fingerprint {
        enc.fingerprint().unwrap();
    }
    let n = enc.finish();
    buf.truncate(n);
    (tid, buf)
}

/// The error code CDX answers `packet` with, or `None` if it stays silent.
fn answer_code(socket: &UdpSocket, server: SocketAddr, packet: &[u8]) -> Option<u16> {
    socket.send_to(packet, server).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    let msg = Message::parse(&buf[..n]).ok()?;
    match msg.decode(AttributeType::ERROR_CODE) {
        Some(Ok(Attribute::ErrorCode(e))) => Some(e.code),
        _ => Some(0),
    }
}

#[test]
fn bad_exchange_input_is_counted_and_never_disturbs_a_session() {
    let cdx = node(&[]);
    let server = cdx.stun;
    let invs = invitations(2, 60);
    // A is waiting for B throughout the flood.
    let a_inv = invs[0].clone();
    let a = std::thread::spawn(move || participant("127.0.0.2", server, &a_inv));
    std::thread::sleep(Duration::from_millis(300));

    let attacker = UdpSocket::bind("127.0.0.9:0").unwrap();
    let entry = |p: u8, seq: u32, sealed: &'static [u8]| Entry {
        participant: p,
        seq,
        sealed,
    };
    static SEALED: [u8; 64] = [0; 64];
    static HUGE: [u8; 1100] = [0; 1100];
    let mut expect_malformed = 0.0;

    // Garbage that looks like an exchange message, and truncations.
    let (_, good) = post_bytes(&invs[1].ticket, &entry(1, 1, &SEALED), true);
    for cut in [20, 24, 40, 60, good.len() - 1] {
        // The header still announces the full length: malformed STUN.
        let _ = answer_code(&attacker, server, &good[..cut]);
        expect_malformed += 1.0;
    }
    // No FINGERPRINT.
    let (_, no_fp) = post_bytes(&invs[1].ticket, &entry(1, 1, &SEALED), false);
    assert_eq!(answer_code(&attacker, server, &no_fp), Some(400));
    expect_malformed += 1.0;
    // An entry in another participant's name.
    let (_, other) = post_bytes(&invs[1].ticket, &entry(0, 1, &SEALED), true);
    assert_eq!(answer_code(&attacker, server, &other), Some(400));
    expect_malformed += 1.0;

    // Forged tickets: every bit flip of B's ticket, and one of another
    // cluster. Dropped without an answer.
    let mut forged_count = 0.0;
    for i in (0..natrix_model::invitation::TICKET_LEN).step_by(3) {
        let mut t = invs[1].ticket;
        t[i] ^= 0x10;
        let (_, p) = post_bytes(&t, &entry(1, 1, &SEALED), true);
        let code = answer_code(&attacker, server, &p);
        assert_eq!(code, None, "flip at byte {i} must be dropped silently");
        forged_count += 1.0;
    }
    let alien = Ticket {
        session: invs[1].session(),
        participant: 1,
        participants: 2,
        expires: unix() + 60,
    }
    .mint(&ticket_key(b"another cluster's secret!"));
    assert_eq!(
        answer_code(
            &attacker,
            server,
            &post_bytes(&alien, &entry(1, 1, &SEALED), true).1
        ),
        None
    );
    // Expired ticket: a clear 401.
    let expired = Ticket {
        session: invs[1].session(),
        participant: 1,
        participants: 2,
        expires: unix() - 1,
    }
    .mint(&ticket_key(SECRET.as_bytes()));
    assert_eq!(
        answer_code(
            &attacker,
            server,
            &post_bytes(&expired, &entry(1, 1, &SEALED), true).1
        ),
        Some(401)
    );
    // Oversized entry: 400.
    assert_eq!(
        answer_code(
            &attacker,
            server,
            &post_bytes(&invs[1].ticket, &entry(1, 1, &HUGE), true).1
        ),
        Some(400)
    );
    // Acknowledgements nobody asked for.
    for _ in 0..5 {
        let tid = TransactionId(rand::random());
        let mut buf = [0u8; 64];
        let mut enc =
            Encoder::new(&mut buf, MessageType::new(DELIVER, Class::Success), &tid).unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        assert_eq!(answer_code(&attacker, server, &buf[..n]), None);
    }
    // A replay: A's ticket with a lower sequence number than A posted (1),
    // from elsewhere. Silently dropped.
    let (_, replay) = post_bytes(&invs[0].ticket, &entry(0, 0, &SEALED), true);
    assert_eq!(answer_code(&attacker, server, &replay), None);

    // Now B arrives for real: the session completes as if nothing happened.
    let (_b_sock, b_data, b_got) = participant("127.0.0.3", server, &invs[1]);
    let (_a_sock, a_data, a_got) = a.join().unwrap();
    assert_eq!(a_got.peers.get(&1), Some(&b_data));
    assert_eq!(b_got.peers.get(&0), Some(&a_data));

    let m = |r: &str| format!("cdx_exchange_posts_total{{result=\"{r}\"}}");
    cdx.wait_metric(&m("malformed"), |v| v >= expect_malformed);
    cdx.wait_metric(&m("forged"), |v| v == forged_count + 1.0);
    cdx.wait_metric(&m("expired"), |v| v == 1.0);
    cdx.wait_metric(&m("too_large"), |v| v == 1.0);
    cdx.wait_metric(&m("replayed"), |v| v == 1.0);
    cdx.wait_metric(&m("accepted"), |v| v >= 2.0);
    cdx.wait_metric("cdx_exchange_stray_acks_total", |v| v == 5.0);
}

#[test]
fn a_node_without_a_cluster_secret_refuses_exchanges_clearly() {
    let cdx = Natrix::cdx(&[]);
    let invs = invitations(2, 60);
    let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
    let err = exchange(
        &socket,
        cdx.stun,
        &invs[0],
        &ConnectionData {
            class: None,
            candidates: vec![],
        },
        None,
        1,
        Duration::from_secs(3),
    )
    .expect_err("no secret, no exchange");
    assert!(err.to_string().contains("403"), "{err}");
    cdx.wait_metric("cdx_exchange_posts_total{result=\"disabled\"}", |v| {
        v == 1.0
    });
}

#[test]
fn natrix_up_serves_the_exchange_on_its_single_listener() {
    let up = Natrix::up(&["--cluster-secret", SECRET]);
    let invs = invitations(2, 60);
    let server = up.stun;
    let a_inv = invs[0].clone();
    let a = std::thread::spawn(move || participant("127.0.0.2", server, &a_inv));
    let (_b_sock, b_data, b_got) = participant("127.0.0.3", server, &invs[1]);
    let (_a_sock, a_data, a_got) = a.join().unwrap();
    assert_eq!(a_got.peers.get(&1), Some(&b_data));
    assert_eq!(b_got.peers.get(&0), Some(&a_data));
    up.wait_metric("cdx_exchange_deliveries_total{result=\"acked\"}", |v| {
        v >= 2.0
    });
}

/// Participant A over UDP, B (no UDP) over TCP, through `server`.
fn exchange_with_a_participant_over_tcp(server: std::net::SocketAddr) {
    let invs = invitations(2, 60);
    let a_inv = invs[0].clone();
    let a = std::thread::spawn(move || participant("127.0.0.2", server, &a_inv));
    let relayed = ConnectionData {
        class: Some(natrix_model::NatClass::UdpBlocked),
        candidates: vec![Candidate {
            kind: CandidateKind::Relayed,
            addr: "203.0.113.9:50000".parse().unwrap(),
        }],
    };
    let mut stream = std::net::TcpStream::connect(server).unwrap();
    let got = natrix_cdx::exchange::client::exchange_tcp(
        &mut stream,
        &invs[1],
        &relayed,
        None,
        1,
        Duration::from_secs(10),
    )
    .expect("exchange over TCP");
    let (_a_sock, a_data, a_got) = a.join().unwrap();
    assert_eq!(got.peers.get(&0), Some(&a_data));
    assert_eq!(a_got.peers.get(&1), Some(&relayed));
    assert_eq!(got.mapped.ip().to_string(), "127.0.0.1");
}

#[test]
fn a_participant_without_udp_exchanges_over_tcp() {
    let cdx = node(&[]);
    exchange_with_a_participant_over_tcp(cdx.stun);
}

#[test]
fn natrix_up_serves_the_exchange_over_its_turn_tcp_listener_too() {
    // One listener for TURN and CDX: the relay's TCP connections carry the
    // exchange for clients without UDP.
    let up = Natrix::up(&["--cluster-secret", SECRET]);
    exchange_with_a_participant_over_tcp(up.stun);
    up.wait_metric("cdx_exchange_deliveries_total{result=\"acked\"}", |v| {
        v >= 2.0
    });
}

/// A Post whose source never acknowledges (a spoofed victim address) buys
/// at most `UNPROVEN_SENDS` transmissions of each entry, not a stream of
/// retransmissions for the ticket's life; the real participant is served.
#[test]
fn deliveries_to_an_address_that_never_acknowledges_stop_at_once() {
    let cdx = node(&[]);
    let invs = invitations(2, 60);
    // The "victim": a socket that receives but never answers.
    let victim = UdpSocket::bind("127.0.0.5:0").unwrap();
    let now = std::time::Instant::now();
    let data = ConnectionData {
        class: None,
        candidates: Vec::new(),
    };
    let mut poster = exchange::client::Poster::new(
        &invs[0],
        &data,
        None,
        1,
        exchange::client::PostSeeds {
            nonce: rand::random(),
            tid: rand::random(),
        },
        now,
        Duration::from_secs(10),
    )
    .unwrap();
    let post = poster.poll_transmit(now).unwrap().payload;
    victim.send_to(&post, cdx.stun).unwrap();
    // The other participant posts and gets the victim's entry, acking it.
    let (_b, _b_data, got) = participant("127.0.0.6", cdx.stun, &invs[1]);
    assert!(got.peers.contains_key(&0));
    // Count what reaches the victim over four seconds (the retransmission
    // schedule would have sent 5 by then).
    victim
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut deliveries = 0;
    let until = std::time::Instant::now() + Duration::from_secs(4);
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < until {
        if let Ok((n, _)) = victim.recv_from(&mut buf)
            && let Ok(m) = Message::parse(&buf[..n])
            && m.method() == DELIVER
        {
            deliveries += 1;
        }
    }
    assert!(
        (1..=usize::from(exchange::UNPROVEN_SENDS)).contains(&deliveries),
        "{deliveries} deliveries to an address that never acknowledged"
    );
    cdx.wait_metric("cdx_exchange_deliveries_total{result=\"held\"}", |v| {
        v >= 1.0
    });
}

/// Posts over TCP meet the same per-source caps as over UDP: a flood of
/// them on one connection is dropped and counted past the cap.
#[test]
fn exchange_posts_over_tcp_are_rate_limited_per_source() {
    use std::io::Write as _;
    let cdx = node(&["--workers", "1", "--stun-rate-per-prefix", "5"]);
    let mut stream = std::net::TcpStream::connect(cdx.stun).unwrap();
    for i in 0..40u8 {
        let mut buf = [0u8; 64];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(POST, Class::Request),
            &TransactionId([i; 12]),
        )
        .unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        stream.write_all(&buf[..n]).unwrap();
    }
    // Burst 10 (twice the rate), the rest dropped.
    cdx.wait_metric(
        "cdx_packets_dropped_total{reason=\"rate_limited\",transport=\"tcp\"}",
        |v| v >= 25.0,
    );
}

//! What `natrix up` does with hostile input and with its lifecycle: garbage
//! floods are dropped and counted without harming anyone else, signals stop
//! it cleanly, a taken port is a clear error.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{Natrix, free_port};
use natrix_wire::{Class, Encoder, Message, MessageType, Method, TransactionId};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut buf = vec![0u8; 128];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        &TransactionId(tid),
    )
    .expect("encoder");
    enc.software("robustness test").expect("software");
    enc.fingerprint().expect("fingerprint");
    let n = enc.finish();
    buf.truncate(n);
    buf
}

/// Packets dropped on the shared listener: what the CDX role dropped on
/// `transport` plus what the relay role dropped (any transport).
fn dropped(natrix: &Natrix, transport: &str) -> f64 {
    let needle = format!("transport=\"{transport}\"");
    natrix
        .metrics_text()
        .lines()
        .filter(|l| {
            (l.starts_with("cdx_packets_dropped_total{") && l.contains(&needle))
                || l.starts_with("relay_packets_dropped_total{")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The garbage: random datagrams, every truncation of a valid request, a
/// corrupted FINGERPRINT, and responses (which a server never answers).
fn garbage(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..4000 {
        let len = rng.random_range(1..600);
        let mut d = vec![0u8; len];
        rng.fill(&mut d[..]);
        out.push(d);
    }
    // Random bytes that look like STUN up to the cookie: exercises the
    // attribute walker, not just the first-byte check.
    for _ in 0..2000 {
        let len = 20 + 4 * rng.random_range(1..60);
        let mut d = vec![0u8; len];
        rng.fill(&mut d[..]);
        d[0] = 0x00;
        d[1] = 0x01;
        d[2..4].copy_from_slice(&((len - 20) as u16).to_be_bytes());
        d[4..8].copy_from_slice(&0x2112_a442u32.to_be_bytes());
        // Make the first attribute overrun the message.
        d[20..22].copy_from_slice(&0x0006u16.to_be_bytes());
        d[22..24].copy_from_slice(&0xfff0u16.to_be_bytes());
        out.push(d);
    }
    let valid = binding_request(rng.random());
    for cut in 1..valid.len() {
        out.push(valid[..cut].to_vec());
    }
    let mut bad_fp = valid.clone();
    let last = bad_fp.len() - 1;
    bad_fp[last] ^= 0x01;
    out.push(bad_fp);
    let mut response = valid.clone();
    response[1] = 0x01;
    response[0] = 0x01; // Binding success response
    out.push(response);
    out
}

#[test]
fn garbage_flood_gets_no_answer_and_every_datagram_is_counted() {
    let natrix = Natrix::up(&[]);
    let mut rng = StdRng::seed_from_u64(0x5eed_2026);
    let datagrams = garbage(&mut rng);
    let sent = datagrams.len();

    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let before = dropped(&natrix, "udp");
    for (i, d) in datagrams.iter().enumerate() {
        socket.send_to(d, natrix.stun).expect("send");
        if i % 200 == 199 {
            // Paced so the kernel never drops: every datagram must be counted.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let after = natrix.wait_metric_with(
        "UDP drops",
        || dropped(&natrix, "udp"),
        |v| v - before >= sent as f64,
    );
    assert_eq!(
        after - before,
        sent as f64,
        "every garbage datagram is a counted drop"
    );

    // Not one answer went back for garbage.
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    if let Ok((n, _)) = socket.recv_from(&mut buf) {
        panic!(
            "natrix answered garbage with {n} bytes: {:02x?}",
            &buf[..n.min(40)]
        );
    }

    // Still serving: a valid request on the same socket gets its answer.
    let tid: [u8; 12] = rng.random();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
        .send_to(&binding_request(tid), natrix.stun)
        .expect("send");
    let (n, _) = socket
        .recv_from(&mut buf)
        .expect("an answer to a valid request");
    let msg = Message::parse(&buf[..n]).expect("STUN");
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(msg.transaction_id(), TransactionId(tid));
    let mut natrix = natrix;
    assert!(natrix.alive(), "natrix died: {}", natrix.log());
}

#[test]
fn tcp_garbage_closes_only_that_connection() {
    let natrix = Natrix::up(&[]);
    // A healthy client, connected before the attacker.
    let mut good = TcpStream::connect(natrix.stun).expect("connect");
    good.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");

    let mut bad = TcpStream::connect(natrix.stun).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // A TLS ClientHello on the plain TCP port: neither STUN nor ChannelData.
    bad.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ])
    .expect("write");
    let mut buf = [0u8; 512];
    match bad.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the garbage connection closed, got {other:?}"),
    }

    // An oversized frame header is refused the same way.
    let mut big = TcpStream::connect(natrix.stun).expect("connect");
    big.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut header = binding_request([7; 12]);
    header[2..4].copy_from_slice(&0xfff0u16.to_be_bytes());
    big.write_all(&header[..20]).expect("write");
    assert!(matches!(big.read(&mut buf), Ok(0) | Err(_)));

    good.write_all(&binding_request([9; 12])).expect("write");
    let n = good.read(&mut buf).expect("the healthy client is answered");
    let msg = Message::parse(&buf[..n]).expect("STUN");
    assert_eq!(msg.transaction_id(), TransactionId([9; 12]));
    let drops = natrix.wait_metric_with("TCP drops", || dropped(&natrix, "tcp"), |v| v >= 2.0);
    assert_eq!(drops, 2.0, "each refused connection counted once");
}

#[test]
fn sigterm_and_sigint_stop_cleanly_with_status_zero() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut natrix = Natrix::up(&[]);
        let status = natrix.signal_and_wait(signal, Duration::from_secs(15));
        assert!(
            status.success(),
            "exit status {status} after signal {signal}: {}",
            natrix.log()
        );
        let log = natrix.log();
        assert!(log.contains("shutting down"), "{log}");
        assert!(log.contains("\"stopped\""), "{log}");
    }
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let squatter = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let listen = squatter.local_addr().expect("local").to_string();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
        .args(["up", "--turn-listen", &listen, "--metrics-listen", &metrics])
        .args(["--log-format", "human"])
        .output()
        .expect("running natrix");
    drop(squatter);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&listen) && stderr.contains("in use"),
        "the error names the address and the cause: {stderr}"
    );
}

/// Loops of one process share their port (SO_REUSEPORT); a second natrix
/// on the same port must fail instead of silently taking part of the
/// traffic.
#[test]
fn a_second_natrix_on_the_same_port_is_refused() {
    let first = Natrix::up(&[]);
    for cmd in ["up", "relay", "cdx"] {
        let listen_flag = if cmd == "cdx" {
            "--stun-listen"
        } else {
            "--turn-listen"
        };
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
            .args([
                cmd,
                listen_flag,
                &first.stun.to_string(),
                "--metrics-listen",
                &metrics,
            ])
            .args(if cmd == "cdx" {
                &[][..]
            } else {
                &["--user", "a:b"][..]
            })
            .args(["--log-format", "human"])
            .output()
            .expect("running a second natrix");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "`natrix {cmd}` shared a taken port");
        assert!(stderr.contains("in use"), "`natrix {cmd}`: {stderr}");
    }
}

#[test]
fn every_flag_reads_an_environment_variable() {
    for cmd in ["up", "relay", "cdx"] {
        let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
            .args([cmd, "--help"])
            .output()
            .expect("natrix --help");
        let help = String::from_utf8_lossy(&out.stdout);
        // Split the help into one block per option.
        let mut blocks: Vec<String> = Vec::new();
        for line in help.lines() {
            let t = line.trim_start();
            if t.starts_with("--") || (t.starts_with('-') && t.get(2..4) == Some(", ")) {
                blocks.push(String::new());
            }
            if let Some(b) = blocks.last_mut() {
                b.push_str(line);
                b.push('\n');
            }
        }
        let flags: Vec<&String> = blocks
            .iter()
            .filter(|b| !b.contains("--help") && !b.contains("--version"))
            .collect();
        assert!(flags.len() >= 5, "too few options parsed from:\n{help}");
        for block in flags {
            assert!(
                block.contains("[env: NATRIX_"),
                "`natrix {cmd}`: option without an environment variable:\n{block}"
            );
        }
    }
}

#[test]
fn environment_variables_configure_the_listeners() {
    let stun = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_natrix"))
        .arg("up")
        .env("NATRIX_TURN_LISTEN", stun.to_string())
        .env("NATRIX_METRICS_LISTEN", metrics.to_string())
        .env("NATRIX_TURN_TCP", "false")
        .env("NATRIX_USERS", "a:b")
        .env("NATRIX_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok((200, _)) = common::http_get(metrics, "/readyz") {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tcp_refused = TcpStream::connect_timeout(&stun, Duration::from_secs(1)).is_err();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
        .send_to(&binding_request([3; 12]), stun)
        .expect("send");
    let answered = socket.recv_from(&mut [0u8; 512]).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready,
        "natrix never became ready on the metrics address from the environment"
    );
    assert!(
        answered,
        "no STUN answer on the address from the environment"
    );
    assert!(tcp_refused, "NATRIX_TURN_TCP=false still listens on TCP");
}

/// Connections are bounded: past the limit they are closed at once, and a
/// connection that holds no allocation and stays silent is closed after the
/// idle timeout, so slow or idle clients cannot exhaust descriptors.
#[test]
fn stream_connections_are_limited_and_idle_ones_closed() {
    let natrix = Natrix::relay(&[
        "--workers",
        "1",
        "--turn-max-connections",
        "3",
        "--turn-idle-timeout",
        "1s",
    ]);
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect(natrix.stun).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                s
            })
            .collect()
    };
    let mut held = open(3);
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = open(1).remove(0);
    let mut buf = [0u8; 16];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "a fourth connection must be closed at once"
    );
    let rejected = natrix.wait_metric("relay_connections_rejected_total", |v| v >= 1.0);
    assert_eq!(rejected, 1.0);
    // The three held ones, silent and without allocations, are closed
    // after about a second.
    let started = std::time::Instant::now();
    for s in &mut held {
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    let idle = natrix.wait_metric("relay_connections_idle_closed_total", |v| v >= 3.0);
    assert_eq!(idle, 3.0);
    // Room again: a new connection is served.
    let mut s = open(1).remove(0);
    s.write_all(&binding_request([5; 12])).expect("write");
    let n = s.read(&mut buf).expect("an answer");
    assert!(n > 0);
}

/// Answers to one source prefix are capped (spoofed floods cannot use the
/// CDX as an amplifier); the excess is a counted drop.
#[test]
fn stun_answers_to_one_prefix_are_rate_limited() {
    let natrix = Natrix::cdx(&["--workers", "1", "--stun-rate-per-prefix", "5"]);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    for i in 0..50u8 {
        socket
            .send_to(&binding_request([i; 12]), natrix.stun)
            .expect("send");
    }
    let mut answers = 0;
    let mut buf = [0u8; 512];
    while socket.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    // Burst of 2 x 5, plus at most a few refilled tokens.
    assert!((10..=13).contains(&answers), "{answers} answers");
    let limited = natrix.wait_metric(
        "cdx_packets_dropped_total{reason=\"rate_limited\",transport=\"udp\"}",
        |v| v >= 37.0,
    );
    assert_eq!(limited + f64::from(answers), 50.0);
}

/// One TURN secret rule for every role: a value one role refuses, every
/// role refuses at start, naming the flag (the relay used to accept a bare
/// secret that lookup refused, so one Helm value could start a relay and
/// fail lookup).
#[test]
fn every_role_refuses_the_same_bad_turn_secret_at_start_naming_the_flag() {
    let metrics = || SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    for secret in ["bare-secret-without-a-key-id", "k1=short"] {
        for role in [
            vec!["relay", "--turn-listen", "127.0.0.1:0"],
            vec!["lookup", "--cluster-secret", "a-cluster-secret-0123"],
            vec!["up", "--turn-listen", "127.0.0.1:0"],
        ] {
            let metrics = metrics();
            let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
                .args(&role)
                .args(["--auth-secret", secret, "--metrics-listen", &metrics])
                .args(["--log-format", "human"])
                .output()
                .expect("running natrix");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{role:?} {secret}: {stderr}");
            assert!(
                stderr.contains("--auth-secret") && stderr.contains("key"),
                "{role:?} {secret}: the error names the flag and the rule: {stderr}"
            );
        }
    }
    // A secrets file names its bad line.
    let dir = std::env::temp_dir().join(format!("natrix-bad-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("secrets");
    std::fs::write(&file, "k2=a-good-secret-0123456\nbare-secret-0123456789\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
        .args(["relay", "--turn-listen", "127.0.0.1:0", "--metrics-listen"])
        .arg(metrics())
        .arg("--auth-secret-file")
        .arg(&file)
        .args(["--log-format", "human"])
        .output()
        .expect("running natrix");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("line 2"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay advertises what it can hold: with fewer relay ports than
/// `--max-allocations`, the port range is the capacity (lookup would
/// otherwise keep picking a relay that can only answer 508).
#[test]
fn a_relay_advertises_the_smaller_of_its_allocation_cap_and_its_ports() {
    let natrix = Natrix::relay(&[
        "--relay-ports",
        "50000-50009",
        "--max-allocations",
        "100000",
    ]);
    assert_eq!(natrix.metric("relay_allocation_capacity"), 10.0);
}

/// One source cannot hold every connection slot: past its per-IP cap its
/// connections are closed at once, while another address is still served.
/// And a connection without an allocation cannot make the relay hold a
/// large frame: a ChannelData header announcing 64 KiB closes it.
#[test]
fn one_address_is_capped_and_cannot_announce_large_frames_before_allocating() {
    let natrix = Natrix::relay(&["--workers", "1", "--turn-max-connections-per-ip", "4"]);
    let connect_from = |ip: [u8; 4]| -> TcpStream {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&SocketAddr::from((ip, 0)).into()).expect("bind");
        s.connect(&natrix.stun.into()).expect("connect");
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    };
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect_from([127, 0, 0, 1])).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let mut extra = connect_from([127, 0, 0, 1]);
        assert!(
            closed(extra.read(&mut buf)),
            "a fifth connection from one address must be closed at once"
        );
    }
    natrix.wait_metric("relay_connections_rejected_total", |v| v == 2.0);
    // Another address is served.
    let mut other = connect_from([127, 0, 0, 2]);
    other.write_all(&binding_request([6; 12])).expect("write");
    assert!(other.read(&mut buf).expect("an answer") > 0);
    // The held ones still work.
    held[0].write_all(&binding_request([7; 12])).expect("write");
    assert!(held[0].read(&mut buf).expect("an answer") > 0);

    // Without an allocation: a ChannelData header announcing 65 535 bytes.
    held[1]
        .write_all(&[0x40, 0x00, 0xFF, 0xFF, 0, 0, 0, 0])
        .expect("write");
    assert!(
        closed(held[1].read(&mut buf)),
        "closed instead of buffering a 64 KiB frame"
    );
    natrix.wait_metric("relay_packets_dropped_total{reason=\"malformed\"}", |v| {
        v >= 1.0
    });
}

/// A read that saw the peer close (not a timeout).
fn closed(read: std::io::Result<usize>) -> bool {
    match read {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

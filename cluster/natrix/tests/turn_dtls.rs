//! TURN over DTLS (RFC 7350): coturn's client over DTLS 1.2 with channels
//! and Send indications, the load tester's DTLS client, a certificate reload that reaches new sessions
//! without dropping one, DTLS 1.0 refused with an alert, a flood of
//! ClientHellos that never return their cookie while a real client gets
//! through, and a key DTLS cannot use refused at start.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Natrix, PASSWORD, USER, free_port, served_cn, uclient, udp_echo_peer, wait_for_cn, write_cert,
};

/// A relay with DTLS on `port` (and TLS on the same port over TCP).
fn dtls_relay(dir: &std::path::Path, port: u16, extra: &[&str]) -> Natrix {
    let listen = format!("127.0.0.1:{port}");
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let mut args = vec![
        "--peer-allow",
        "127.0.0.0/8",
        "--tls-listen",
        &listen,
        "--dtls-listen",
        &listen,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    Natrix::relay(&args)
}

/// coturn's client over DTLS (`-S` without `-t`) to an echo peer.
fn dtls_client(
    port: &str,
    peer: &str,
    messages: &str,
    clients: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-S",
        "-p",
        port,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        peer,
        "-n",
        messages,
        "-m",
        clients,
        "-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("127.0.0.1".into());
    args
}

fn run(args: &[String]) -> common::UclientReport {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    uclient(&refs)
}

#[test]
fn coturn_relays_over_dtls_and_a_certificate_reload_reaches_new_sessions() {
    let dir = std::env::temp_dir().join(format!("natrix-dtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "natrix-one");
    let port = free_port();
    let natrix = dtls_relay(&dir, port, &[]);
    assert!(
        served_cn(port, true).contains("natrix-one"),
        "{}",
        natrix.log()
    );
    let (_peer, peer_port) = udp_echo_peer();
    let (p, pp) = (port.to_string(), peer_port.to_string());

    // Channels (coturn's default), four clients.
    let report = run(&dtls_client(&p, &pp, "100", "4", &[]));
    assert_eq!(
        (report.sent, report.received, report.lost),
        (400, 400, 0),
        "channels over DTLS:\n{}",
        report.output
    );
    assert!(
        report.output.contains("method=DTLSv1.2"),
        "{}",
        report.output
    );
    // Send and Data indications.
    let report = run(&dtls_client(&p, &pp, "50", "2", &["-s"]));
    assert_eq!(
        (report.sent, report.received, report.lost),
        (100, 100, 0),
        "indications over DTLS:\n{}",
        report.output
    );

    // A 4-second session spans a certificate change; a new handshake
    // shows the new certificate, the old session goes on.
    let session = {
        let args = dtls_client(&p, &pp, "200", "1", &["-l", "500"]);
        std::thread::spawn(move || run(&args))
    };
    std::thread::sleep(Duration::from_millis(1000));
    write_cert(&dir, "natrix-two");
    let seen = wait_for_cn(port, "natrix-two", true);
    assert!(seen.contains("natrix-two"), "after a file change: {seen}");
    let report = session.join().expect("uclient thread");
    assert_eq!(
        (report.sent, report.received, report.lost),
        (200, 200, 0),
        "the DTLS session across the reload:\n{}",
        report.output
    );

    // DTLS 1.0 gets a protocol_version alert at once.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 5 openssl s_client -dtls1 -connect 127.0.0.1:{port} </dev/null 2>&1"
        ))
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("alert protocol version"), "{text}");

    // The load tester's own DTLS client, both paths (client to peer, and
    // client to client through two allocations).
    let server = format!("127.0.0.1:{port}");
    for path in ["peer", "client"] {
        let out = Command::new(common::loadtest())
            .args(["relay", "--server", &server, "--transport", "dtls"])
            .args(["--path", path, "--clients", "2", "--duration", "1s"])
            .args(["--user", USER, "--password", PASSWORD, "--progress", "off"])
            .output()
            .expect("natrix-loadtest (cargo build --workspace --bins)");
        let r = common::stdout_report(&out, &format!("natrix-loadtest relay over DTLS, {path}"));
        assert!(r["echoed"].as_u64().unwrap() > 100, "{path}: {r}");
        assert!(r["loss_ratio"].as_f64().unwrap() < 0.01, "{path}: {r}");
        println!("natrix-loadtest over DTLS, {path} path: {r}");
    }

    natrix.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |v| v >= 700.0,
    );
    natrix.wait_metric("relay_dtls_handshakes_total{result=\"dtls1_0\"}", |v| {
        v >= 1.0
    });
    let completed = natrix.metric("relay_dtls_handshakes_total{result=\"completed\"}");
    assert!(completed >= 7.0, "completed handshakes: {completed}");
    assert_eq!(
        natrix.metric("relay_dtls_handshakes_total{result=\"failed\"}"),
        0.0,
        "{}",
        natrix.metrics_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A DTLS 1.2 ClientHello without a cookie, as a client's first flight.
fn client_hello() -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("natrix-dtls-hello-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "flood");
    let pem = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).expect("pem");
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&body)
    };
    let certificate = dimpl::DtlsCertificate {
        certificate: pem("cert.pem"),
        private_key: pem("key.pem"),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let config = std::sync::Arc::new(dimpl::Config::default());
    let now = Instant::now();
    let mut client = dimpl::Dtls::new_12(config, certificate, now);
    client.set_active(true);
    client.handle_timeout(now).expect("a client starts");
    let mut buf = vec![0u8; 4096];
    loop {
        match client.poll_output(&mut buf) {
            dimpl::Output::Packet(p) => return p.to_vec(),
            dimpl::Output::Timeout(_) => panic!("the client sent no ClientHello"),
            _ => {}
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

#[test]
fn a_flood_of_client_hellos_that_never_return_the_cookie_does_not_keep_a_client_out() {
    let dir = std::env::temp_dir().join(format!("natrix-dtls-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "natrix-flood");
    let port = free_port();
    let natrix = dtls_relay(&dir, port, &[]);
    let (_peer, peer_port) = udp_echo_peer();
    let (p, pp) = (port.to_string(), peer_port.to_string());
    let hello = client_hello();

    // From 4 addresses, each from many ports, bounded in count and time
    // (10,000 a second at most): every ClientHello a new 5-tuple that gets
    // a HelloVerifyRequest and never answers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(6);
            let mut sent = 0u64;
            while sent < 40_000
                && Instant::now() < deadline
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                let ip = format!("127.0.99.{}", 1 + sent % 4);
                if let Ok(s) = UdpSocket::bind((ip.as_str(), 0))
                    && s.send_to(&hello, ("127.0.0.1", port)).is_ok()
                {
                    sent += 1;
                }
                if sent.is_multiple_of(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let report = run(&dtls_client(&p, &pp, "50", "2", &[]));
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().expect("flood thread");
    assert_eq!(
        (report.sent, report.received, report.lost),
        (100, 100, 0),
        "a client during a flood of {sent} ClientHellos:\n{}",
        report.output
    );
    assert!(sent > 2_000, "the flood sent {sent} ClientHellos");
    // Each flooding address held 64 half-open slots per loop for a moment,
    // never a session; the rest of its ClientHellos were refused.
    let refused = natrix.wait_metric("relay_dtls_handshakes_total{result=\"refused\"}", |v| {
        v >= 1_000.0
    });
    let unanswered = natrix.wait_metric("relay_dtls_handshakes_total{result=\"no_cookie\"}", |v| {
        v >= 100.0
    });
    let sessions = natrix.metric("relay_dtls_sessions");
    assert!(sessions <= 4.0, "sessions after the flood: {sessions}");
    assert!(
        natrix.log().lines().count() < 200,
        "the flood flooded the log"
    );
    println!(
        "flood: {sent} ClientHellos; the client's run took {took:?}; {refused} refused, {unanswered} cookies never returned, {sessions} sessions"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_key_dtls_cannot_use_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("natrix-dtls-rsa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-days", "2", "-nodes",
        ])
        .args(["-subj", "/CN=rsa", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_natrix"))
        .args(["relay", "--turn-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--user", "u:p"])
        .args([
            "--tls-listen",
            "127.0.0.1:0",
            "--dtls-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.join("key.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("natrix");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let status = status.unwrap_or_else(|| panic!("natrix started with an RSA key for DTLS: {err}"));
    assert!(!status.success());
    assert!(
        err.contains("DTLS needs an ECDSA P-256 or P-384 key"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

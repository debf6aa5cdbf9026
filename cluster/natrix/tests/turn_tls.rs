//! TURN over TLS: coturn's client over TLS, certificate reloads (file
//! change, SIGHUP) that reach new connections without dropping a session,
//! and a slow reader that gets a burst larger than rustls's buffer whole.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Natrix, PASSWORD, USER, free_port, served_cn, uclient, udp_echo_peer, wait_for_cn, write_cert,
};
use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, IntegrityKey, Message, MessageType, Method,
    TransactionId, long_term_key_md5,
};

#[test]
fn turn_over_tls_relays_and_reloads_certificates_without_dropping_sessions() {
    let (mut natrix, tls_port, dir) =
        common::tls_relay("tls", "natrix-one", &["--peer-allow", "127.0.0.0/8"]);
    assert!(served_cn(tls_port, false).contains("natrix-one"));
    let (_peer, peer_port) = udp_echo_peer();
    let pp = peer_port.to_string();
    let tp = tls_port.to_string();

    // A 4-second session over TLS spans the reload.
    let session = {
        let (tp, pp) = (tp.clone(), pp.clone());
        std::thread::spawn(move || {
            uclient(&[
                "-t",
                "-S",
                "-p",
                &tp,
                "-u",
                USER,
                "-w",
                PASSWORD,
                "-e",
                "127.0.0.1",
                "-r",
                &pp,
                "-n",
                "200",
                "-m",
                "1",
                "-c",
                "-l",
                "500",
                "127.0.0.1",
            ])
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    write_cert(&dir, "natrix-two");
    let seen = wait_for_cn(tls_port, "natrix-two", false);
    assert!(seen.contains("natrix-two"), "after a file change: {seen}");
    let report = session.join().expect("uclient thread");
    assert_eq!(
        (report.sent, report.received, report.lost),
        (200, 200, 0),
        "the TLS session across the reload:\n{}",
        report.output
    );

    // SIGHUP reloads on demand and does not stop the process.
    write_cert(&dir, "natrix-three");
    // SAFETY: kill(2) on the PID of a child this test spawned.
    assert_eq!(unsafe { libc::kill(natrix.pid(), libc::SIGHUP) }, 0);
    let seen = wait_for_cn(tls_port, "natrix-three", false);
    assert!(seen.contains("natrix-three"), "after SIGHUP: {seen}");
    assert!(natrix.alive(), "SIGHUP stopped natrix: {}", natrix.log());

    // A broken file keeps the previous certificate in service.
    std::fs::write(dir.join("cert.pem"), b"not a certificate").expect("write");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(served_cn(tls_port, false).contains("natrix-three"));
    let report = uclient(&[
        "-t",
        "-S",
        "-p",
        &tp,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "20",
        "-m",
        "1",
        "-c",
        "127.0.0.1",
    ]);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (20, 20, 0),
        "{}",
        report.output
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Accepts any server certificate: the test talks to its own relay.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TURN client over TLS on a connection with a small receive buffer, so
/// that a burst backs up into the relay.
struct TlsTurn {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    pending: Vec<u8>,
}

impl TlsTurn {
    fn connect(port: u16) -> TlsTurn {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        let tcp: std::net::TcpStream = s.into();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("natrix-burst").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        TlsTurn {
            tls: rustls::StreamOwned::new(conn, tcp),
            pending: Vec::new(),
        }
    }

    fn send(&mut self, msg: &[u8]) {
        use std::io::Write;
        self.tls.write_all(msg).unwrap();
        self.tls.flush().unwrap();
    }

    /// The next whole frame; `None` when the connection closed.
    fn frame(&mut self) -> Option<Vec<u8>> {
        use std::io::Read;
        loop {
            if let Ok(Some(n)) = natrix_wire::frame_len(&self.pending)
                && n <= self.pending.len()
            {
                return Some(self.pending.drain(..n).collect());
            }
            let mut buf = [0u8; 16384];
            match self.tls.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// A request signed with the test user's long-term key once the
    /// relay's realm and nonce are known.
    fn request(&mut self, method: Method, attrs: &[Attribute<'_>], auth: Option<&str>) -> Vec<u8> {
        let msg = Self::encode(method, attrs, auth);
        self.send(&msg);
        self.frame().expect("an answer")
    }

    /// A request, signed when `auth` (the nonce) is given.
    fn encode(method: Method, attrs: &[Attribute<'_>], auth: Option<&str>) -> Vec<u8> {
        let tid = TransactionId(rand::random());
        let mut buf = vec![0u8; 512];
        let mut enc =
            Encoder::new(&mut buf, MessageType::new(method, Class::Request), &tid).unwrap();
        for a in attrs {
            enc.attribute(a).unwrap();
        }
        if let Some(nonce) = auth {
            enc.attribute(&Attribute::Username(USER)).unwrap();
            enc.attribute(&Attribute::Realm(common::REALM)).unwrap();
            enc.attribute(&Attribute::Nonce(nonce)).unwrap();
            let key = IntegrityKey::new(&long_term_key_md5(USER, common::REALM, PASSWORD));
            enc.integrity(&key).unwrap();
        }
        let n = enc.finish();
        buf.truncate(n);
        buf
    }
}

/// A network namespace of the test's own (removed when dropped), with
/// loopback up.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("running ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Netns(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// Sets a sysctl inside the namespace.
    fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c"])
            .arg(format!("echo '{value}' > {path}"))
            .output()
            .expect("running ip netns exec");
        assert!(out.status.success(), "sysctl {key}: {out:?}");
    }

    /// Runs `f` on a thread inside the namespace (its sockets and the
    /// processes it spawns live there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("opening the namespace");
            // SAFETY: setns(2) on an open namespace descriptor; it changes
            // only this thread's network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// rustls buffers at most 64 KiB of plaintext; a burst from a peer larger
/// than that towards a client that reads slowly must wait in the relay's
/// own queue, not fail the write and close the connection. The kernel's
/// send buffers are capped (in a namespace of the test's own) so that the
/// burst backs up into the relay as it does on a slow link.
#[test]
fn a_slow_tls_reader_gets_a_burst_larger_than_64_kib_whole() {
    let ns = Netns::new(&format!("natrix-tls-{}", std::process::id()));
    ns.sysctl("net.ipv4.tcp_wmem", "4096 16384 65536");
    ns.run(slow_reader_burst);
}

fn slow_reader_burst() {
    let dir = std::env::temp_dir().join(format!("natrix-tls-burst-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "natrix-burst");
    let tls_port = free_port();
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let mut natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--tls-listen",
        &format!("127.0.0.1:{tls_port}"),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let mut client = TlsTurn::connect(tls_port);
    let transport = [Attribute::RequestedTransport(17)];
    let challenge = client.request(Method::ALLOCATE, &transport, None);
    let nonce = match Message::parse(&challenge)
        .unwrap()
        .decode(AttributeType::NONCE)
    {
        Some(Ok(Attribute::Nonce(n))) => n.to_owned(),
        other => panic!("no nonce in the challenge: {other:?}"),
    };
    // Allocate and CreatePermission pipelined in one write: after it the
    // client sends nothing, so the relay must treat it as allocated from
    // that read on (the burst exceeds what a client without an
    // allocation may have queued).
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let permit = [Attribute::XorPeerAddress(peer.local_addr().unwrap())];
    let mut both = TlsTurn::encode(Method::ALLOCATE, &transport, Some(&nonce));
    both.extend(TlsTurn::encode(
        Method::CREATE_PERMISSION,
        &permit,
        Some(&nonce),
    ));
    client.send(&both);
    let answer = client.frame().expect("the Allocate answer");
    let relayed = match Message::parse(&answer)
        .unwrap()
        .decode(AttributeType::XOR_RELAYED_ADDRESS)
    {
        Some(Ok(Attribute::XorRelayedAddress(a))) => a,
        other => panic!("no relayed address: {other:?}"),
    };
    let ok = client.frame().expect("the CreatePermission answer");
    assert_eq!(Message::parse(&ok).unwrap().class(), Class::Success);

    // 400 datagrams of 1000 bytes (about 420 KB of Data indications) while
    // the client reads nothing.
    const BURST: usize = 400;
    for i in 0..BURST {
        let mut d = vec![0u8; 1000];
        d[..4].copy_from_slice(&(i as u32).to_be_bytes());
        peer.send_to(&d, relayed).unwrap();
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(natrix.alive(), "{}", natrix.log());
    let mut seen = vec![false; BURST];
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.iter().any(|s| !s) && Instant::now() < deadline {
        let Some(frame) = client.frame() else {
            panic!(
                "the relay closed the connection after {} of {BURST}",
                seen.iter().filter(|s| **s).count()
            );
        };
        let msg = Message::parse(&frame).unwrap();
        if let Some(data) = msg.get(AttributeType::DATA) {
            seen[u32::from_be_bytes(data[..4].try_into().unwrap()) as usize] = true;
        }
    }
    assert_eq!(
        seen.iter().filter(|s| **s).count(),
        BURST,
        "every datagram, in a 420 KB burst"
    );
    let refresh = client.request(Method::REFRESH, &[], Some(&nonce));
    assert_eq!(
        Message::parse(&refresh).unwrap().class(),
        Class::Success,
        "the connection and its allocation are still there"
    );
}

/// TURN over TLS behind HAProxy (TCP mode, `send-proxy-v2`): the PROXY
/// header comes before the TLS handshake; coturn's client relays over TLS
/// from 127.0.0.12 without loss, and the relay's usage record names that
/// address, not the balancer's.
#[test]
fn turn_over_tls_behind_haproxy_takes_the_client_from_the_proxy_header() {
    let dir = std::env::temp_dir().join(format!("natrix-tls-proxied-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "natrix-behind-haproxy");
    let tls_port = free_port();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let usage = dir.join("usage.jsonl");
    let usage_path = usage.display().to_string();
    let mut natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--tls-listen",
        &tls_listen,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--usage-file",
        &usage_path,
        "--drain-timeout",
        "1s",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let pp = peer_port.to_string();
    let (_lb, lb, lb_dir) = common::haproxy(tls_port);
    let lb = lb.to_string();
    let report = uclient(&[
        "-t",
        "-S",
        "-p",
        &lb,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-L",
        "127.0.0.12",
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "40",
        "-m",
        "1",
        "-l",
        "300",
        "127.0.0.1",
    ]);
    // Two allocations (RTP and its RTCP companion), 40 messages each.
    assert_eq!(
        (report.sent, report.received, report.lost),
        (80, 80, 0),
        "{}",
        report.output
    );
    assert!(
        natrix
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
            .success()
    );
    let records = common::usage_records(&usage);
    let text = format!("{records:#?}");
    assert!(!records.is_empty(), "{text}");
    for r in &records {
        assert_eq!(r["transport"], "tls", "{r}");
        assert!(
            r["client"].as_str().unwrap().starts_with("127.0.0.12:"),
            "{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&lb_dir);
}

/// coturn's TLS client through `ip:443` to a UDP echo peer: `messages`
/// each way, none lost.
fn turn_over_tls_443_loses_nothing(ip: &str, messages: u64) {
    let (_peer, peer_port) = udp_echo_peer();
    let (pp, n) = (peer_port.to_string(), messages.to_string());
    let report = uclient(&[
        "-t",
        "-S",
        "-p",
        "443",
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        &n,
        "-m",
        "1",
        "-c",
        "-l",
        "300",
        ip,
    ]);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (messages, messages, 0),
        "{}",
        report.output
    );
}

/// `curl -sk` over the shared port: the status and body; `from` is the
/// source address, `args` the rest.
fn curl_443(from: &str, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "--interface", from])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

/// TURN over TLS and the lookup API on one port, 443 (issue: clients behind
/// firewalls that allow only 443): curl's ClientHello asks for HTTP (ALPN
/// h2, http/1.1) and gets lookup's answers; coturn's TLS client asks for
/// nothing and relays without loss; lookup counts each curl client by its
/// own address (the front's X-Forwarded-For, a forged one dropped), so one
/// source past its limit of refused logins leaves another untouched.
#[test]
fn one_tls_port_carries_turn_and_the_lookup_api() {
    const IP: &str = "127.0.0.31";
    let (lookup, natrix, dir) = common::tls_443_with_lookup(
        IP,
        &[
            "--auth-failures-per-minute",
            "2",
            "--trusted-proxy",
            "127.0.0.1",
        ],
    );
    let api = |path: &str| format!("https://{IP}{path}");

    // The API through 443, as it answers on its own port.
    let (status, body) = curl_443("127.0.0.40", &[&api("/healthz")]);
    assert_eq!(status, "200 1.1", "{body}");
    let (direct, _) = common::http_get(lookup.lookup, "/healthz").unwrap();
    assert_eq!(direct, 200);

    // Refused logins: 127.0.0.41 reaches its limit (2), then 429 — even
    // with a forged X-Forwarded-For naming someone else; 127.0.0.42 is
    // still refused with 401, not limited.
    let bad_login = |from: &str, forged: Option<&str>| {
        let mut args = vec![
            "-X".to_string(),
            "POST".into(),
            "-H".into(),
            "authorization: Bearer nxk_0000000000aa_00000000000000000000000000000000".into(),
            "-H".into(),
            "content-type: application/json".into(),
            "-d".into(),
            "{}".into(),
        ];
        if let Some(f) = forged {
            args.extend(["-H".into(), format!("x-forwarded-for: {f}")]);
        }
        args.push(api("/v1/plan"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl_443(from, &args).0
    };
    let first: Vec<String> = (0..2).map(|_| bad_login("127.0.0.41", None)).collect();
    assert_eq!(first, ["401 1.1", "401 1.1"]);
    assert_eq!(bad_login("127.0.0.41", Some("127.0.0.99")), "429 1.1");
    assert_eq!(bad_login("127.0.0.42", None), "401 1.1");

    // What a request smuggler or a memory exhauster would send: a chunked
    // body and a 20 KiB head are refused (the connection ends, no answer);
    // TLS garbage on the shared port is dropped; the API still answers.
    let big = format!("x-big: {}", "a".repeat(20_000));
    let (chunked, _) = curl_443(
        "127.0.0.43",
        &[
            "-H",
            "transfer-encoding: chunked",
            "-d",
            "{}",
            &api("/v1/plan"),
        ],
    );
    let (oversized, _) = curl_443("127.0.0.43", &["-H", &big, &api("/healthz")]);
    assert_eq!((chunked.as_str(), oversized.as_str()), ("000 0", "000 0"));
    {
        use std::io::{Read, Write};
        let mut garbage = std::net::TcpStream::connect((IP, 443)).unwrap();
        garbage.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10]).unwrap();
        garbage.write_all(&[0xff; 16]).unwrap();
        garbage
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = garbage.read_to_end(&mut rest);
        assert!(rest.len() < 64, "an alert at most, then closed: {rest:?}");
    }
    let (status, _) = curl_443("127.0.0.40", &[&api("/healthz")]);
    assert_eq!(status, "200 1.1");

    // TURN over TLS on the same port: coturn's client.
    turn_over_tls_443_loses_nothing(IP, 50);
    let routed = |to: &str| natrix.metric(&format!("relay_tls_routed_total{{to=\"{to}\"}}"));
    assert_eq!(routed("https"), 8.0);
    assert!(routed("turn") >= 1.0);
    let requests =
        |r: &str| natrix.metric(&format!("relay_https_requests_total{{result=\"{r}\"}}"));
    assert_eq!((requests("forwarded"), requests("bad_request")), (6.0, 2.0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The API behind the shared port is down: HTTPS clients get 502 (and the
/// log one line, not one per connection); TURN over TLS goes on.
#[test]
fn a_down_backend_gets_https_clients_a_502() {
    const IP: &str = "127.0.0.33";
    let down = format!("127.0.0.1:{}", free_port());
    let (natrix, dir) = common::tls_443_relay(IP, &down);
    for _ in 0..3 {
        let (status, _) = curl_443("127.0.0.40", &[&format!("https://{IP}/healthz")]);
        assert_eq!(status, "502 1.1");
    }
    assert_eq!(
        natrix.metric("relay_https_requests_total{result=\"backend_failed\"}"),
        3.0
    );
    let lines = natrix
        .log()
        .matches("the HTTPS front cannot reach its backend")
        .count();
    assert_eq!(lines, 1, "one line for three failures");
    turn_over_tls_443_loses_nothing(IP, 20);
    let _ = std::fs::remove_dir_all(&dir);
}

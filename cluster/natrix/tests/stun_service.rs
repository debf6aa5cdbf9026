//! `natrix up` as a STUN server, seen from outside: coturn's client, raw
//! RFC 5769 / RFC 3489 requests over UDP and TCP, and the metrics endpoint
//! checked by Prometheus' own `promtool`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{Natrix, tool};
use natrix_wire::{Attribute, AttributeType, Class, Message, Method, frame_len};

/// RFC 5769 §2.1 sample request: what an ICE agent sends.
fn rfc5769_request() -> Vec<u8> {
    natrix_wire::samples::RFC5769_REQUEST.to_vec()
}

/// An RFC 3489 Binding request: no magic cookie, a 16-byte transaction id.
fn rfc3489_request() -> Vec<u8> {
    let mut req = vec![0x00, 0x01, 0x00, 0x00];
    req.extend_from_slice(&[
        0x0b, 0xad, 0xca, 0xfe, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ]);
    req
}

fn udp_exchange(server: SocketAddr, from: &str, req: &[u8]) -> (Vec<u8>, SocketAddr) {
    let socket = UdpSocket::bind(from).expect("binding the client socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    for _ in 0..6 {
        socket.send_to(req, server).expect("sending");
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return (buf[..n].to_vec(), socket.local_addr().expect("local"));
        }
    }
    panic!("no answer from {server}");
}

fn mapped_address(msg: &Message<'_>, ty: AttributeType) -> SocketAddr {
    match msg.decode(ty) {
        Some(Ok(Attribute::XorMappedAddress(a) | Attribute::MappedAddress(a))) => a,
        other => panic!("no {ty:?} in the response: {other:?}"),
    }
}

#[test]
fn coturn_stunclient_sees_its_own_address() {
    // `natrix up` (Binding on the relay's listener) and `natrix cdx` alone.
    for natrix in [Natrix::up(&[]), Natrix::cdx(&[])] {
        stunclient_sees_its_own_address(&natrix);
    }
}

fn stunclient_sees_its_own_address(natrix: &Natrix) {
    let stunclient = tool("turnutils_stunclient");
    // Bind the client to different loopback addresses: the answer must
    // reflect where each request really came from.
    for local in ["127.0.0.2", "127.0.0.3"] {
        let out = Command::new(&stunclient)
            .args([
                "-p",
                &natrix.stun.port().to_string(),
                "-L",
                local,
                "127.0.0.1",
            ])
            .output()
            .expect("running turnutils_stunclient");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "stunclient failed: {stdout}");
        let reflexive = stdout
            .lines()
            .find_map(|l| l.split("UDP reflexive addr: ").nth(1))
            .unwrap_or_else(|| panic!("no reflexive address in: {stdout}"));
        let addr: SocketAddr = reflexive.trim().parse().expect("a socket address");
        assert_eq!(addr.ip().to_string(), local, "{stdout}");
        assert_ne!(addr.port(), 0);
        assert_ne!(addr.port(), natrix.stun.port());
    }
    let answered = natrix.wait_metric(
        "cdx_binding_responses_total{result=\"success\",transport=\"udp\"}",
        |v| v >= 2.0,
    );
    assert!(answered >= 2.0, "successes counted: {answered}");
}

#[test]
fn rfc5769_request_over_udp_gets_exact_mapped_address() {
    let natrix = Natrix::up(&[]);
    let (resp, local) = udp_exchange(natrix.stun, "127.0.0.1:0", &rfc5769_request());
    let msg = Message::parse(&resp).expect("a STUN response");
    assert_eq!(msg.method(), Method::BINDING);
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(
        &resp[8..20],
        &rfc5769_request()[8..20],
        "transaction id echoed"
    );
    assert_eq!(
        mapped_address(&msg, AttributeType::XOR_MAPPED_ADDRESS),
        local
    );
    msg.verify_fingerprint().expect("a valid FINGERPRINT");
    let software = msg.get(AttributeType::SOFTWARE).expect("SOFTWARE");
    assert!(
        std::str::from_utf8(software)
            .expect("utf-8")
            .starts_with("natrix ")
    );
}

#[test]
fn binding_over_tcp_answers_each_framed_request() {
    let natrix = Natrix::up(&[]);
    let mut stream = TcpStream::connect(natrix.stun).expect("connecting over TCP");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let local = stream.local_addr().expect("local");
    // Two requests in one write, the second split across writes: framing
    // must follow the STUN length, not the segments.
    let req = rfc5769_request();
    let mut first = req.clone();
    first.extend_from_slice(&req[..10]);
    stream.write_all(&first).expect("writing");
    std::thread::sleep(Duration::from_millis(50));
    stream.write_all(&req[10..]).expect("writing");

    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    let mut answers = 0;
    while answers < 2 {
        let n = stream.read(&mut buf[filled..]).expect("reading");
        assert!(
            n > 0,
            "natrix closed the connection after {answers} answers"
        );
        filled += n;
        while let Ok(Some(len)) = frame_len(&buf[..filled]) {
            if len > filled {
                break;
            }
            let msg = Message::parse(&buf[..len]).expect("a STUN response");
            assert_eq!(msg.class(), Class::Success);
            assert_eq!(
                mapped_address(&msg, AttributeType::XOR_MAPPED_ADDRESS),
                local
            );
            msg.verify_fingerprint().expect("FINGERPRINT");
            answers += 1;
            buf.copy_within(len..filled, 0);
            filled -= len;
        }
    }
    let tcp = natrix.wait_metric(
        "cdx_binding_responses_total{result=\"success\",transport=\"tcp\"}",
        |v| v >= 2.0,
    );
    assert_eq!(tcp, 2.0);
}

#[test]
fn rfc3489_client_gets_mapped_address_and_its_16_byte_id_back() {
    let natrix = Natrix::up(&[]);
    let req = rfc3489_request();
    let (resp, local) = udp_exchange(natrix.stun, "127.0.0.1:0", &req);
    assert_eq!(&resp[0..2], &[0x01, 0x01], "a Binding success response");
    assert_eq!(
        &resp[4..20],
        &req[4..20],
        "the 16-byte transaction id echoed"
    );
    let msg = Message::parse(&resp).expect("parseable");
    assert!(msg.is_rfc3489());
    assert_eq!(mapped_address(&msg, AttributeType::MAPPED_ADDRESS), local);
    assert!(
        msg.get(AttributeType::XOR_MAPPED_ADDRESS).is_none(),
        "RFC 3489 clients do not understand XOR-MAPPED-ADDRESS"
    );
    let legacy = natrix.wait_metric("cdx_legacy_requests_total{transport=\"udp\"}", |v| v >= 1.0);
    assert_eq!(legacy, 1.0);
}

#[test]
fn promtool_accepts_the_metrics_endpoint() {
    let natrix = Natrix::up(&[]);
    // Some traffic first, so counters carry values.
    udp_exchange(natrix.stun, "127.0.0.1:0", &rfc5769_request());
    natrix.wait_metric("cdx_binding_requests_total{transport=\"udp\"}", |v| {
        v >= 1.0
    });
    let text = natrix.metrics_text();
    for name in [
        "natrix_build_info",
        "cdx_binding_requests_total",
        "cdx_binding_responses_total",
        "cdx_packets_dropped_total",
        "cdx_tcp_connections",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let out = promtool.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics rejected /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = common::http_get(natrix.metrics, "/healthz").expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
}

/// RFC 5780 on one node with two addresses (127.0.0.1 and 127.0.0.2) and
/// two ports: coturn's `turnutils_natdiscovery` runs the mapping and
/// filtering tests against natrix and, on loopback, finds no NAT; the change
/// requests were answered from the other addresses.
#[test]
fn coturn_natdiscovery_runs_the_rfc5780_tests_against_natrix_cdx() {
    let alt_port = common::free_port();
    let alt = alt_port.to_string();
    let natrix = Natrix::cdx(&[
        "--stun-alternate-ip",
        "127.0.0.2",
        "--stun-alternate-port",
        &alt,
    ]);
    assert_open_with_alternate(&natdiscovery(natrix.stun.port()), alt_port);
}

/// What coturn's natdiscovery prints for an open host against a server
/// whose alternate address is 127.0.0.2:`alt_port`: endpoint-independent
/// mapping and filtering, and the change answers from the alternate socket.
fn assert_open_with_alternate(stdout: &str, alt_port: u16) {
    for line in [
        "NAT with Endpoint Independent Mapping".to_owned(),
        "NAT with Endpoint Independent Filtering".to_owned(),
        format!("Response origin: : 127.0.0.2:{alt_port}"),
        format!("Other addr: : 127.0.0.2:{alt_port}"),
    ] {
        assert!(stdout.contains(&line), "{line} missing:\n{stdout}");
    }
}

/// coturn's RFC 5780 mapping and filtering tests against 127.0.0.1:`port`.
fn natdiscovery(port: u16) -> String {
    let out = Command::new(tool("turnutils_natdiscovery"))
        .args(["-m", "-f", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .expect("running turnutils_natdiscovery");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Without an alternate address, a change request is refused with 420, as
/// RFC 5780 §6.1 prescribes for servers that cannot honour it.
#[test]
fn change_requests_without_an_alternate_address_get_420() {
    let natrix = Natrix::cdx(&[]);
    let mut req = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[4; 12]);
    req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x06]); // change IP and port
    let (resp, _) = udp_exchange(natrix.stun, "127.0.0.1:0", &req);
    let msg = Message::parse(&resp).expect("STUN");
    assert_eq!(msg.class(), Class::Error);
    match msg.decode(AttributeType::ERROR_CODE) {
        Some(Ok(Attribute::ErrorCode(e))) => assert_eq!(e.code, 420),
        other => panic!("{other:?}"),
    }
}

fn probe_json(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
        .arg("probe")
        .args(args)
        .output()
        .expect("running natrix probe");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        stdout + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `natrix probe` runs RFC 5780 discovery against an RFC 5780 server and
/// classifies loopback as open (no NAT, endpoint-independent filtering), in
/// well under two seconds; against a plain STUN server it reports the mapped
/// address only; against nothing it fails with a clear message.
#[test]
fn natrix_probe_classifies_through_rfc5780_and_reports_what_it_could_not_test() {
    let alt = common::free_port().to_string();
    let rfc5780 = Natrix::cdx(&[
        "--stun-alternate-ip",
        "127.0.0.2",
        "--stun-alternate-port",
        &alt,
    ]);
    let started = std::time::Instant::now();
    let (ok, v, text) = probe_json(&["--json", &rfc5780.stun.to_string()]);
    assert!(ok, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(v["class"], "open", "{text}");
    assert_eq!(v["mapping"], "no-nat", "{text}");
    assert_eq!(v["filtering"], "endpoint-independent", "{text}");
    assert_eq!(v["other_address"], format!("127.0.0.2:{alt}"), "{text}");
    assert_eq!(v["mapped_address"], v["local_address"], "{text}");

    let plain = Natrix::cdx(&[]);
    let (ok, v, text) = probe_json(&["--json", &plain.stun.to_string()]);
    assert!(ok, "{text}");
    assert_eq!(v["other_address"], serde_json::Value::Null, "{text}");
    assert_eq!(v["behind_nat"], false, "{text}");

    let nothing = format!("127.0.0.1:{}", common::free_port());
    let (ok, _, text) = probe_json(&["--timeout", "1s", &nothing]);
    assert!(!ok, "probing nothing must fail");
    assert!(text.contains("no answer"), "{text}");
}

/// RFC 5780 across two nodes with one IP each (the Kubernetes case): each
/// names the other in OTHER-ADDRESS and hands it the change-IP requests,
/// authenticated with the cluster secret. coturn's natdiscovery completes
/// its tests, the change-IP answers come from the sibling, and a forged
/// hand-off is refused without sending anything to its victim.
#[test]
fn two_single_ip_siblings_serve_rfc5780_together() {
    let port = common::free_port();
    let alt = common::free_port();
    let (p, q) = (port.to_string(), alt.to_string());
    let secret = "a-shared-cluster-secret";
    let node = |ip: &str, sibling: &str| {
        Natrix::cdx(&[
            "--stun-listen",
            &format!("{ip}:{p}"),
            "--stun-alternate-port",
            &q,
            "--stun-sibling",
            sibling,
            "--cluster-secret",
            secret,
        ])
    };
    let a = node("127.0.0.1", "127.0.0.2");
    let b = node("127.0.0.2", "127.0.0.1");
    let stdout = natdiscovery(port);
    assert!(
        stdout.contains("NAT with Endpoint Independent Mapping"),
        "{stdout}"
    );
    assert!(
        stdout.contains("NAT with Endpoint Independent Filtering"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Response origin: : 127.0.0.2:{alt}")),
        "{stdout}"
    );
    let sent = a.wait_metric("cdx_sibling_handoffs_total{result=\"sent\"}", |v| v >= 1.0);
    let answered = b.wait_metric("cdx_sibling_handoffs_total{result=\"answered\"}", |v| {
        v >= 1.0
    });
    assert!(
        sent >= 1.0 && answered >= 1.0,
        "sent {sent}, answered {answered}"
    );

    // A forged hand-off (wrong secret) naming a victim: refused, silent.
    let victim = UdpSocket::bind("127.0.0.1:0").expect("victim");
    victim
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let key = natrix_cdx::handoff::key(b"guessed-secret-xx");
    let mut forged = [0u8; 256];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut change = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    change.extend_from_slice(&[6; 12]);
    change.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x06]);
    let n = natrix_cdx::handoff::seal(
        &key,
        now_ms,
        0,
        victim.local_addr().expect("addr"),
        &change,
        &mut forged,
    )
    .expect("seal");
    let attacker = UdpSocket::bind("127.0.0.1:0").expect("attacker");
    attacker.send_to(&forged[..n], b.stun).expect("send");
    assert!(
        victim.recv_from(&mut [0u8; 512]).is_err(),
        "a forged hand-off made natrix answer"
    );
    let rejected = b.wait_metric("cdx_sibling_handoffs_total{result=\"rejected\"}", |v| {
        v >= 1.0
    });
    assert_eq!(rejected, 1.0);
}

/// On a wildcard listener (the default) answers leave from the address the
/// client used, also on the batched path.
#[test]
fn a_wildcard_cdx_listener_answers_from_the_address_used() {
    let port = common::free_port();
    let natrix = Natrix::cdx(&["--stun-listen", &format!("0.0.0.0:{port}")]);
    let out = Command::new(tool("turnutils_stunclient"))
        .args(["-p", &port.to_string(), "-L", "127.0.0.2", "127.0.0.3"])
        .output()
        .expect("running turnutils_stunclient");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("UDP reflexive addr: 127.0.0.2:"),
        "{stdout}"
    );
    natrix.wait_metric("cdx_binding_requests_total{transport=\"udp\"}", |v| {
        v >= 1.0
    });
}

/// Behind a 1:1 NAT the sockets sit on private addresses but answers must
/// name the public ones: RESPONSE-ORIGIN and OTHER-ADDRESS follow
/// --stun-advertise-ip and --stun-alternate-advertise-ip.
#[test]
fn advertised_addresses_replace_the_bound_ones_in_rfc5780_answers() {
    let alt = common::free_port();
    let cdx = Natrix::cdx(&[
        "--stun-alternate-ip",
        "127.0.0.2",
        "--stun-alternate-port",
        &alt.to_string(),
        "--stun-advertise-ip",
        "203.0.113.10",
        "--stun-alternate-advertise-ip",
        "203.0.113.11",
    ]);
    let (bytes, local) = udp_exchange(cdx.stun, "127.0.0.5:0", &rfc5769_request());
    let msg = Message::parse(&bytes).expect("a STUN answer");
    assert_eq!(
        mapped_address(&msg, AttributeType::XOR_MAPPED_ADDRESS),
        local
    );
    assert_eq!(
        msg.decode(AttributeType::RESPONSE_ORIGIN),
        Some(Ok(Attribute::ResponseOrigin(SocketAddr::new(
            "203.0.113.10".parse().expect("ip"),
            cdx.stun.port()
        ))))
    );
    assert_eq!(
        msg.decode(AttributeType::OTHER_ADDRESS),
        Some(Ok(Attribute::OtherAddress(SocketAddr::new(
            "203.0.113.11".parse().expect("ip"),
            alt
        ))))
    );
}

/// RFC 5780 inside `natrix up`: the relay's listener is the primary cell,
/// the alternate IP and port get their own sockets; coturn's natdiscovery
/// and `natrix probe` complete their tests, and TURN still answers there.
#[test]
fn natrix_up_serves_rfc5780_on_its_single_listener() {
    let alt_port = common::free_port();
    let alt = alt_port.to_string();
    let up = Natrix::up(&[
        "--stun-alternate-ip",
        "127.0.0.2",
        "--stun-alternate-port",
        &alt,
        "--peer-allow",
        "127.0.0.0/8",
    ]);
    assert_open_with_alternate(&natdiscovery(up.stun.port()), alt_port);
    let (ok, v, text) = probe_json(&["--json", &up.stun.to_string()]);
    assert!(ok, "{text}");
    assert_eq!(v["class"], "open", "{text}");
    assert_eq!(v["other_address"], format!("127.0.0.2:{alt}"), "{text}");
    // The same listener is still a TURN server.
    let report = common::uclient(&[
        "-u",
        common::USER,
        "-w",
        common::PASSWORD,
        "-n",
        "5",
        "-y",
        "-p",
        &up.stun.port().to_string(),
        "127.0.0.1",
    ]);
    assert!(report.sent > 0 && report.lost == 0, "{}", report.output);
}

//! Headless Chromium: two RTCPeerConnections restricted to relay candidates,
//! with natrix as the only ICE server, exchange data-channel messages both
//! ways, over TURN/UDP and TURN/TCP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Natrix, Netns, PASSWORD, Spawned, USER, chromium};

const PAGE: &str = include_str!("browser_page.html");

/// Headless Chromium without a sandbox (root), GPU, QUIC or background
/// traffic.
const CHROMIUM_FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// Serves the page and waits for the verdict it POSTs.
fn serve_page() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            if request_line.starts_with("POST /result") {
                let mut body = vec![0u8; length];
                let _ = reader.read_exact(&mut body);
                let _ = tx.send(String::from_utf8_lossy(&body).to_string());
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            } else if request_line.starts_with("GET / ") || request_line.starts_with("GET /?") {
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
                    PAGE.len()
                );
            } else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        }
    });
    (port, rx)
}

/// Opens the page with `query` (the ICE server) in headless Chromium
/// (with `extra` flags) and returns the verdict it POSTs.
fn page_verdict(query: &str, label: &str, extra: &[&str]) -> serde_json::Value {
    let (page_port, verdicts) = serve_page();
    let profile =
        std::env::temp_dir().join(format!("natrix-chromium-{}-{label}", std::process::id()));
    let url = format!("http://127.0.0.1:{page_port}/?{query}&user={USER}&password={PASSWORD}");
    let _browser = Spawned(
        Command::new(chromium())
            .args(CHROMIUM_FLAGS)
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromium"),
    );
    let verdict = verdicts
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the page reported nothing within 60 s ({label})"));
    let _ = std::fs::remove_dir_all(&profile);
    serde_json::from_str(&verdict).expect("JSON verdict")
}

/// Asserts a verdict of 20 echoed messages over relay candidates of
/// `protocol`.
fn assert_relayed(v: &serde_json::Value, protocol: &str) {
    assert_eq!(v["ok"], true, "TURN/{protocol}: {v}");
    assert_eq!(v["got"].as_array().map(Vec::len), Some(20), "{v}");
    assert_eq!(v["got"][0], "echo:m0", "{v}");
    assert_eq!(v["local_type"], "relay", "{v}");
    assert_eq!(v["remote_type"], "relay", "{v}");
    assert_eq!(v["local_relay_protocol"], protocol, "{v}");
}

fn relay_only_data_channel(transport: &str) {
    let natrix = Natrix::up(&["--peer-allow", "127.0.0.0/8"]);
    let v = page_verdict(
        &format!("port={}&transport={transport}", natrix.stun.port()),
        transport,
        &[],
    );
    assert_relayed(&v, transport);
    let relayed = natrix.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |x| x > 0.0,
    );
    assert!(relayed > 0.0, "natrix relayed nothing");
}

#[test]
fn chromium_data_channel_over_turn_udp_only() {
    relay_only_data_channel("udp");
}

#[test]
fn chromium_data_channel_over_turn_tcp_only() {
    relay_only_data_channel("tcp");
}

/// Past the relay port range (`--relay-multiplex-ports`): the one relay
/// port is held by another process, so both peers' allocations are on
/// shared relayed sockets (two per loop), and their ICE checks and data
/// reach the right allocation by peer address alone — the first check
/// from a peer comes before the client ever sent there.
#[test]
fn chromium_data_channel_through_shared_relayed_sockets() {
    let range = common::PastTheRange::held(4);
    let natrix = Natrix::up(&range.and(&["--peer-allow", "127.0.0.0/8"]));
    let v = page_verdict(
        &format!("port={}&transport=udp", natrix.stun.port()),
        "shared",
        &[],
    );
    if v["ok"] != true {
        let m = natrix.metrics_text();
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("relay_") && !l.ends_with(" 0"))
            .collect();
        eprintln!(
            "relay metrics:\n{}\nlog:\n{}",
            lines.join("\n"),
            natrix.log()
        );
    }
    assert_relayed(&v, "udp");
    // The page has closed its connections by now (their allocations may
    // be gone); the shared sockets they used stay open. No allocation had
    // a port of its own: the one relay port is held.
    let sockets = natrix.wait_metric("relay_multiplex_sockets", |v| v >= 1.0);
    assert!(sockets >= 1.0, "no shared socket opened: {sockets}");
    drop(range);
}

/// TURN over TLS on 443 beside HTTPS: Chromium's `turns:` data channel
/// and curl's request to the lookup API share the relay's one TLS port
/// (ALPN routes them: Chromium's TURN asks for none, curl for HTTP).
#[test]
fn chromium_turns_on_443_shares_the_port_with_the_lookup_api() {
    const IP: &str = "127.0.0.32";
    let (_lookup, natrix, dir) = common::tls_443_with_lookup(IP, &[]);
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg(format!("https://{IP}/healthz"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with("\n200"), "curl over 443: {text}");
    // A self-signed certificate: Chromium is told to accept it.
    let v = page_verdict(
        &format!("scheme=turns&host={IP}&port=443&transport=tcp"),
        "turns-443",
        &["--ignore-certificate-errors"],
    );
    assert_relayed(&v, "tls");
    let routed = |to: &str| natrix.metric(&format!("relay_tls_routed_total{{to=\"{to}\"}}"));
    assert_eq!(routed("https"), 1.0);
    assert!(routed("turn") >= 1.0);
    // The loops publish their counters periodically: wait for it.
    natrix.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |x| x > 0.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `args` in network namespace `ns`, failing the test when it fails.
fn in_ns(ns: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{args:?}: {out:?}");
    out
}

/// ALTERNATE-SERVER with a browser: relay A (drained through its admin
/// API) names relay B (`--alternate-server`); Chromium, given only A, gets
/// 300 Try Alternate, follows it, and its data channel runs through B.
/// Chromium refuses redirects to loopback addresses, so the relays, the
/// page and the browser live in a network namespace of their own, on
/// 10.203.0.0/24.
#[test]
fn chromium_follows_a_draining_relays_alternate_server() {
    const NS: &str = "alt-lab";
    let _ = Command::new("ip")
        .args(["netns", "del", NS])
        .stderr(Stdio::null())
        .status();
    let status = Command::new("ip")
        .args(["netns", "add", NS])
        .status()
        .expect("ip netns add");
    assert!(status.success(), "creating {NS} (needs root)");
    let _ns = Netns(NS);
    in_ns(NS, &["ip", "link", "set", "lo", "up"]);
    // A network interface (Chromium gathers nothing on a host with only
    // loopback): a veth pair inside the namespace, addresses on one end.
    in_ns(
        NS,
        &[
            "ip", "link", "add", "alt0", "type", "veth", "peer", "name", "alt1",
        ],
    );
    in_ns(NS, &["ip", "link", "set", "alt0", "up"]);
    in_ns(NS, &["ip", "link", "set", "alt1", "up"]);
    for a in ["10.203.0.1/24", "10.203.0.2/24", "10.203.0.3/24"] {
        in_ns(NS, &["ip", "addr", "add", a, "dev", "alt0"]);
    }
    let natrix = env!("CARGO_BIN_EXE_natrix");
    let dir = std::env::temp_dir().join(format!("natrix-alt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let user = format!("{USER}:{PASSWORD}");
    let token = "admin-token-0123456789";
    let relay = |ip: &str, extra: &[&str]| {
        let listen = format!("{ip}:3478");
        let metrics = format!("{ip}:9090");
        let log = std::fs::File::create(dir.join(format!("{ip}.log"))).expect("log");
        Spawned(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    NS,
                    natrix,
                    "relay",
                    "--turn-listen",
                    &listen,
                ])
                .args(["--external-ip", ip, "--peer-allow", "10.203.0.0/24"])
                .args(["--user", &user, "--realm", "natrix.test"])
                .args(["--metrics-listen", &metrics, "--log-format", "json"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting a relay in the namespace"),
        )
    };
    let _b = relay("10.203.0.3", &[]);
    let _a = relay(
        "10.203.0.2",
        &[
            "--alternate-server",
            "10.203.0.3:3478",
            "--admin-listen",
            "10.203.0.2:9500",
            "--admin-token",
            token,
        ],
    );
    // Drained once its admin API answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", NS, natrix, "admin", "drain"])
            .args([
                "--admin-url",
                "http://10.203.0.2:9500",
                "--admin-token",
                token,
            ])
            .output()
            .expect("natrix admin drain");
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay A's admin API never answered: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The page, served inside the namespace; its verdict lands in a file.
    let page = dir.join("page.html");
    std::fs::write(&page, PAGE).expect("page");
    let verdict_path = dir.join("verdict.json");
    let server = r#"
import http.server, sys
page = open(sys.argv[1], 'rb').read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        s.send_response(200); s.send_header('Content-Type', 'text/html')
        s.send_header('Content-Length', str(len(page))); s.end_headers(); s.wfile.write(page)
    def do_POST(s):
        body = s.rfile.read(int(s.headers.get('Content-Length', 0)))
        try:
            # The first verdict counts (the page's timeout may post later).
            with open(sys.argv[2], 'xb') as f:
                f.write(body)
        except FileExistsError:
            pass
        s.send_response(204); s.end_headers()
    def log_message(s, *a): pass
http.server.HTTPServer(('10.203.0.1', 8080), H).serve_forever()
"#;
    let _page_server = Spawned(
        Command::new("ip")
            .args(["netns", "exec", NS, "python3", "-c", server])
            .arg(&page)
            .arg(&verdict_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 page server"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let profile = dir.join("profile");
    let url = format!(
        "http://10.203.0.1:8080/?host=10.203.0.2&port=3478&transport=udp&user={USER}&password={PASSWORD}"
    );
    let _browser = Spawned(
        Command::new("ip")
            .args(["netns", "exec", NS, &chromium()])
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromium"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let verdict = loop {
        if let Ok(text) = std::fs::read_to_string(&verdict_path)
            && !text.is_empty()
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page reported nothing within 60 s; relay A: {}",
            std::fs::read_to_string(dir.join("10.203.0.2.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let v: serde_json::Value = serde_json::from_str(&verdict).expect("JSON verdict");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(v["ok"], true, "through the alternate: {verdict}");
    assert_eq!(v["local_type"], "relay", "{verdict}");
    assert_eq!(v["local_address"], "10.203.0.3", "relayed by B: {verdict}");
}

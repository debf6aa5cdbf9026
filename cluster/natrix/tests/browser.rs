//! Headless Chromium: two RTCPeerConnections restricted to relay candidates,
//! with natrix as the only ICE server, exchange data-channel messages both
//! ways, over TURN/UDP and TURN/TCP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Natrix, PASSWORD, Spawned, USER, chromium};

const PAGE: &str = include_str!("browser_page.html");

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

fn relay_only_data_channel(transport: &str) {
    let natrix = Natrix::up(&["--peer-allow", "127.0.0.0/8"]);
    let (page_port, verdicts) = serve_page();
    let profile = std::env::temp_dir().join(format!(
        "natrix-chromium-{}-{transport}",
        std::process::id()
    ));
    let url = format!(
        "http://127.0.0.1:{page_port}/?port={}&transport={transport}&user={USER}&password={PASSWORD}",
        natrix.stun.port()
    );
    let _browser = Spawned(
        Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromium"),
    );
    let verdict = verdicts
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the page reported nothing within 60 s (TURN/{transport})"));
    let _ = std::fs::remove_dir_all(&profile);
    let v: serde_json::Value = serde_json::from_str(&verdict).expect("JSON verdict");
    assert_eq!(v["ok"], true, "TURN/{transport}: {verdict}");
    assert_eq!(v["got"].as_array().map(Vec::len), Some(20), "{verdict}");
    assert_eq!(v["got"][0], "echo:m0", "{verdict}");
    assert_eq!(v["local_type"], "relay", "{verdict}");
    assert_eq!(v["remote_type"], "relay", "{verdict}");
    assert_eq!(v["local_relay_protocol"], transport, "{verdict}");
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

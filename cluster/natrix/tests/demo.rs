//! The call demo `natrix up` serves at /demo, driven in headless Chromium:
//! two browsers register two handles, one calls the other, the callee's
//! page rings and answers, and a WebRTC data channel connects on the ICE
//! servers natrix planned — directly, and with a relay-only policy through
//! natrix's TURN.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Natrix, Spawned, chromium};

/// Collects the JSON results the pages POST.
fn results() -> (u16, mpsc::Receiver<serde_json::Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            if let Ok(v) = serde_json::from_slice(&body) {
                let _ = tx.send(v);
            }
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n");
        }
    });
    (port, rx)
}

fn browser(url: &str, tag: &str) -> (Spawned, std::path::PathBuf) {
    let profile = std::env::temp_dir().join(format!("natrix-demo-{}-{tag}", std::process::id()));
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Host candidates as plain loopback addresses (no mDNS names).
            "--allow-loopback-in-peer-connection",
            "--disable-features=WebRtcHideLocalIpsWithMdns",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Spawned(child), profile)
}

fn call(relay: bool) -> (serde_json::Value, serde_json::Value, Natrix) {
    let natrix = Natrix::up(&["--open-registration", "--peer-allow", "127.0.0.0/8"]);
    let (port, rx) = results();
    let base = format!(
        "http://{}/demo?auto=1&report=http://127.0.0.1:{port}/result&relay={}",
        natrix.lookup,
        u8::from(relay)
    );
    let callee = browser(&format!("{base}&handle=bob"), &format!("bob-{relay}"));
    let caller = browser(
        &format!("{base}&handle=alice&call=bob"),
        &format!("alice-{relay}"),
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let v = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the pages reported {} of 2 results in 60 s: {got:?}",
                    got.len()
                )
            });
        got.push(v);
    }
    drop((callee, caller));
    let role = |r: &str| {
        got.iter()
            .find(|v| v["role"] == r)
            .cloned()
            .unwrap_or_else(|| panic!("no {r}: {got:?}"))
    };
    (role("caller"), role("callee"), natrix)
}

#[test]
fn two_browsers_call_each_other_directly_through_the_demo() {
    let (caller, callee, _n) = call(false);
    for v in [&caller, &callee] {
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["mode"], "direct", "{v}");
        assert_eq!(v["local_type"], "host", "{v}");
        assert!(v["connect_ms"].as_u64().unwrap() < 30_000, "{v}");
    }
}

#[test]
fn two_browsers_call_each_other_through_natrix_turn_with_a_relay_only_policy() {
    let (caller, callee, natrix) = call(true);
    for v in [&caller, &callee] {
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["mode"], "relay-both", "{v}");
        assert_eq!(v["local_type"], "relay", "{v}");
        assert_eq!(
            v["relay_protocol"], "tcp",
            "UDP-blocked sides relay over TCP: {v}"
        );
    }
    natrix.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |x| x > 0.0,
    );
}

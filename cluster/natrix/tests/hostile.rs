//! The hostile-traffic suite, run for real: `natrix-loadtest attack` against
//! `natrix up`, and against the relay, CDX and lookup roles each in its own
//! process (on a real `redis-server`, with TURN over TLS, a grant secret and
//! low caps so each one binds within a second), every attack while
//! legitimate UDP, TCP and TLS sessions relay. Each attack must be bounded
//! the way SECURITY.md says and no legitimate session may be lost. Spoofed
//! exchange Posts go through a raw socket (root, as CI runs).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;

use common::{API_KEY, Natrix, free_port};
use natrix_store::testing::RedisServer;

const TURN_SECRET: &str = "hostile-test-turn-secret";
const GRANT_SECRET: &str = "app1=hostile-test-grant-secret";
const CLUSTER_SECRET: &str = "hostile-test-cluster-secret";

/// Where the attacks go.
struct Target<'a> {
    turn: String,
    tls: &'a str,
    cdx: String,
    lookup: String,
    metrics: String,
    health: &'a str,
    pid: i32,
    redis: &'a RedisServer,
}

/// Runs the whole suite against `t` and checks every attack.
fn attack_and_check(t: &Target<'_>) {
    let out = Command::new(common::loadtest())
        .args(["--progress", "off", "attack"])
        .args(["--turn", &t.turn, "--tls", t.tls, "--cdx", &t.cdx])
        // DTLS on the TLS address over UDP (natrix up with an ECDSA
        // certificate serves it there; the relay alone is told to).
        .args(["--dtls", t.tls])
        .args(["--lookup", &t.lookup])
        .args(["--metrics", &t.metrics, "--health", t.health])
        .args(["--api-key", API_KEY, "--grant-secret", GRANT_SECRET])
        .args(["--secret", TURN_SECRET])
        .args(["--pid", &t.pid.to_string()])
        .args(["--redis-pid", &t.redis.pid().unwrap().to_string()])
        .args(["--duration", "1500ms", "--connections", "300"])
        .output()
        .unwrap();
    let attacks = common::attacks_held(&out);
    assert_eq!(
        attacks.len(),
        23,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by = |name: &str| {
        attacks
            .iter()
            .find(|a| a["attack"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    // What each attack shows, in numbers a reader can check.
    assert_eq!(by("alloc-one-source")["answers"]["allocated"], 50);
    assert_eq!(by("slowloris-tcp")["answers"]["held"], 100);
    assert_eq!(by("slowloris-tls")["answers"]["held"], 100);
    assert_eq!(by("huge-frames")["answers"]["held"], 0);
    assert_eq!(by("alloc-one-key")["answers"]["plans"], 10);
    assert_eq!(
        by("exchange-replay")["answers"]["deliveries to the replayer"],
        0
    );
    let spoofed = &by("exchange-spoofed")["answers"];
    assert!(
        spoofed["deliveries to the victim"].as_u64().unwrap()
            < spoofed["spoofed posts"].as_u64().unwrap() / 10,
        "{spoofed}"
    );
    // Signalling: failing credentials are throttled, a device's sockets
    // and invitations are capped, and the legitimate devices still ring.
    assert!(by("auth-flood")["answers"]["429"].as_u64().unwrap() > 0);
    assert_eq!(by("auth-flood")["answers"]["legit device rang"], 1);
    assert_eq!(by("push-sockets")["answers"]["opened"], 4);
    assert_eq!(
        by("push-sockets")["answers"]["flooded socket closed with"],
        1008
    );
    assert_eq!(by("invite-flood")["answers"]["202"], 30);
    assert_eq!(by("invite-flood")["answers"]["legit call rang"], 1);
    // Password guessing on the relay: refused until the source is banned
    // (the relay's default, 10 failures), then unanswered.
    let guessing = &by("turn-guessing")["answers"];
    assert_eq!(guessing["401"], 10, "{guessing}");
    assert_eq!(guessing["right password then: timeout"], 1, "{guessing}");
    // ClientHellos that never return the cookie get a cookie at most (or
    // nothing past the per-address cap), never a key exchange.
    let hellos = &by("dtls-hellos")["answers"];
    println!(
        "dtls-hellos: {}; legit lost {}, p99 {} ms",
        by("dtls-hellos")["server_did"],
        by("dtls-hellos")["legit_sessions_lost"],
        by("dtls-hellos")["legit_p99_ms"]
    );
    assert!(hellos["ClientHellos"].as_u64().unwrap() > 1000, "{hellos}");
    assert!(hellos["cookie"].as_u64().unwrap_or(0) > 0, "{hellos}");
    assert!(hellos["other answer"].is_null(), "{hellos}");
    // Forged ChannelData and peer datagrams around a victim's channel:
    // none delivered, the victim's own datagrams crossing meanwhile.
    let forged = &by("channel-forgery")["answers"];
    assert!(
        forged["datagrams forged"].as_u64().unwrap() > 1000,
        "{forged}"
    );
    assert_eq!(forged["forged delivered"], 0, "{forged}");
    let slow = &by("slow-tls-reader")["answers"];
    assert_eq!(slow["delivered"], slow["peer datagrams"]);
    // Memory: connection floods do not grow the server without bound.
    for name in [
        "slowloris-tcp",
        "huge-frames",
        "pipelined-allocates",
        "garbage",
    ] {
        let a = by(name);
        let grew = a["rss_after_bytes"].as_u64().unwrap() as i64
            - a["rss_before_bytes"].as_u64().unwrap() as i64;
        assert!(grew < 64 << 20, "{name}: RSS grew by {grew} bytes");
    }
}

/// A fresh certificate directory.
fn cert_dir(tag: &str) -> (std::path::PathBuf, String, String) {
    common::cert_dir(&format!("hostile-{tag}"), "natrix-test")
}

#[test]
fn every_attack_on_natrix_up_is_bounded_and_no_legitimate_session_is_lost() {
    let (dir, cert, key) = cert_dir("up");
    let redis = RedisServer::start();
    let url = redis.url();
    let tls = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let up = Natrix::up(&[
        "--redis-url",
        &url,
        "--auth-secret",
        &format!("k1={TURN_SECRET}"),
        "--cluster-secret",
        CLUSTER_SECRET,
        "--grant-secret",
        GRANT_SECRET,
        "--tls-listen",
        &tls,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--max-allocations-per-ip",
        "50",
        "--turn-max-connections-per-ip",
        "100",
        "--api-key-max-sessions",
        "10",
        "--peer-allow",
        "127.0.0.0/8",
        "--health-listen",
        &health,
    ]);
    attack_and_check(&Target {
        turn: up.stun.to_string(),
        tls: &tls,
        cdx: up.stun.to_string(),
        lookup: up.lookup.to_string(),
        metrics: up.metrics.to_string(),
        health: &health,
        pid: up.pid(),
        redis: &redis,
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_attack_on_the_roles_alone_is_bounded_and_no_legitimate_session_is_lost() {
    let (dir, cert, key) = cert_dir("roles");
    let redis = RedisServer::start();
    let url = redis.url();
    let tls = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let lookup = Natrix::lookup(&[
        "--redis-url",
        &url,
        "--auth-secret",
        &format!("k1={TURN_SECRET}"),
        "--cluster-secret",
        CLUSTER_SECRET,
        "--grant-secret",
        GRANT_SECRET,
        "--api-key-max-sessions",
        "10",
        // The relay's TLS port passes HTTPS here (from 127.0.0.1).
        "--trusted-proxy",
        "127.0.0.1",
    ]);
    let backend = lookup.lookup.to_string();
    let relay = Natrix::relay(&[
        "--redis-url",
        &url,
        "--auth-secret",
        &format!("k1={TURN_SECRET}"),
        "--tls-listen",
        &tls,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-http-backend",
        &backend,
        "--dtls-listen",
        &tls,
        "--max-allocations-per-ip",
        "50",
        "--turn-max-connections-per-ip",
        "100",
        "--peer-allow",
        "127.0.0.0/8",
        "--health-listen",
        &health,
    ]);
    let cdx = Natrix::cdx(&["--redis-url", &url, "--cluster-secret", CLUSTER_SECRET]);
    // lookup plans once it sees the relay and the CDX node.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::http_get(lookup.lookup, "/v1/relays")
        .map(|(_, b)| !(b.contains("\"relays\":[{") && b.contains("\"cdx\":[{")))
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the registry never filled"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    attack_and_check(&Target {
        turn: relay.stun.to_string(),
        tls: &tls,
        cdx: cdx.stun.to_string(),
        lookup: lookup.lookup.to_string(),
        metrics: relay.metrics.to_string(),
        health: &health,
        pid: relay.pid(),
        redis: &redis,
    });
    let _ = std::fs::remove_dir_all(&dir);
}

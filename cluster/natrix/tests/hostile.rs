//! The hostile-traffic suite, run for real: `natrix-loadtest attack` against
//! `natrix up` (on a real `redis-server`, with TURN over TLS, a grant secret
//! and low caps so each one binds within a second), every attack while
//! legitimate UDP, TCP and TLS sessions relay. Each attack must be bounded
//! the way SECURITY.md says and no legitimate session may be lost. Spoofed
//! exchange Posts go through a raw socket (root, as CI runs).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;

use common::{API_KEY, Natrix, free_port, tool};
use natrix_store::testing::RedisServer;

const TURN_SECRET: &str = "hostile-test-turn-secret";
const GRANT_SECRET: &str = "app1=hostile-test-grant-secret";

fn write_cert(dir: &Path) {
    let out = Command::new(tool("openssl"))
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-days", "2", "-nodes"])
        .args(["-subj", "/CN=natrix-hostile"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {out:?}");
}

#[test]
fn every_attack_is_bounded_and_no_legitimate_session_is_lost() {
    let dir = std::env::temp_dir().join(format!("natrix-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_cert(&dir);
    let redis = RedisServer::start();
    let url = redis.url();
    let tls = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let (cert, key) = (
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string(),
    );
    let up = Natrix::up(&[
        "--redis-url",
        &url,
        "--auth-secret",
        &format!("k1={TURN_SECRET}"),
        "--cluster-secret",
        "hostile-test-cluster-secret",
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
    let loadtest = Path::new(env!("CARGO_BIN_EXE_natrix")).with_file_name("natrix-loadtest");
    assert!(
        loadtest.exists(),
        "build natrix-loadtest first (.ci/test does)"
    );
    let out = Command::new(loadtest)
        .args(["--progress", "off", "attack"])
        .args(["--turn", &up.stun.to_string(), "--tls", &tls])
        .args(["--lookup", &up.lookup.to_string()])
        .args(["--metrics", &up.metrics.to_string(), "--health", &health])
        .args(["--api-key", API_KEY, "--grant-secret", GRANT_SECRET])
        .args(["--secret", TURN_SECRET])
        .args(["--pid", &up.pid().to_string()])
        .args(["--redis-pid", &redis.pid().unwrap().to_string()])
        .args(["--duration", "1500ms", "--connections", "300"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no report:\n{stderr}"));
    assert!(out.status.success(), "not held:\n{stderr}");
    let attacks = report["attacks"].as_array().unwrap();
    assert_eq!(attacks.len(), 16, "{stderr}");
    for a in attacks {
        let name = a["attack"].as_str().unwrap();
        assert!(a["skipped"].is_null(), "{name} skipped: {}", a["skipped"]);
        assert_eq!(a["held"], true, "{name}: {}", a["server_did"]);
        assert_eq!(
            a["legit_sessions_lost"], 0,
            "{name}: {}",
            a["legit_lost_why"]
        );
        assert!(
            a["legit_answered"].as_u64().unwrap() > 0,
            "{name}: no legit traffic"
        );
    }
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
    assert_eq!(
        by("slow-tls-reader")["answers"]["delivered"],
        by("slow-tls-reader")["answers"]["peer datagrams"]
    );
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
    let _ = std::fs::remove_dir_all(&dir);
}

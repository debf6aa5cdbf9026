//! natrix-loadtest's flow scenarios against `natrix up` on loopback: `e2e`
//! (discovery, plan, exchange, direct punch or TURN relay, datagrams both
//! ways) and `plan` (lookup's API under load).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;

use common::Natrix;

fn loadtest() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_natrix")).with_file_name("natrix-loadtest");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (.ci/test does)",
        bin.display()
    );
    bin
}

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(loadtest()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "natrix-loadtest {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn e2e_pairs_connect_directly_and_through_the_planned_relay() {
    let up = Natrix::up(&["--peer-allow", "127.0.0.0/8"]);
    let lookup = up.lookup.to_string();
    let common = [
        "--lookup",
        &lookup,
        "--local-a",
        "127.0.0.2",
        "--local-b",
        "127.0.0.3",
    ];

    let mut args = vec!["e2e", "--pairs", "4"];
    args.extend_from_slice(&common);
    let direct = run(&args);
    assert_eq!(direct["failed"], 0, "{direct}");
    assert_eq!(direct["modes"]["direct"]["succeeded"], 4, "{direct}");

    // A retry gets relay-one: side A allocates with the plan's token, side B
    // sends straight to A's relayed address.
    let mut args = vec!["e2e", "--pairs", "4", "--retry"];
    args.extend_from_slice(&common);
    let relayed = run(&args);
    assert_eq!(relayed["modes"]["relay-one"]["succeeded"], 4, "{relayed}");
    for r in relayed["results"].as_array().unwrap() {
        assert_eq!(r["a"]["relayed"], true, "{r}");
        assert_eq!(r["b"]["relayed"], false, "{r}");
        assert!(r["b"]["first_packet_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    up.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |v| v > 0.0,
    );
    up.wait_metric("lookup_plans_total{mode=\"relay_one\"}", |v| v == 4.0);
}

#[test]
fn plan_load_reports_rates_and_latency() {
    let up = Natrix::up(&[]);
    let lookup = up.lookup.to_string();
    let report = run(&[
        "plan",
        "--lookup",
        &lookup,
        "--connections",
        "2",
        "--duration",
        "1s",
    ]);
    assert!(report["plans"].as_u64().unwrap() > 10, "{report}");
    assert!(report["latency_ms_p99"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(
        report["errors_by_status"],
        serde_json::json!({}),
        "{report}"
    );
}

#[test]
fn slo_gates_set_the_exit_code_and_json_reports_are_written() {
    let up = Natrix::up(&[]);
    let lookup = up.lookup.to_string();
    let file = std::env::temp_dir().join(format!("natrix-plan-report-{}.json", std::process::id()));
    let base = [
        "plan",
        "--lookup",
        &lookup,
        "--connections",
        "1",
        "--duration",
        "500ms",
    ];
    let mut met = base.to_vec();
    let file_arg = file.to_str().unwrap().to_owned();
    met.extend([
        "--slo",
        "latency_ms_p99<=5000",
        "--slo",
        "plans>=1",
        "--json",
        &file_arg,
    ]);
    let report = run(&met);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(written["plans"], report["plans"]);
    let _ = std::fs::remove_file(&file);

    let mut missed = base.to_vec();
    missed.extend(["--slo", "plans_per_second>=1e12"]);
    let out = Command::new(loadtest()).args(&missed).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "an unmet SLO exits 3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SLO violated: plans_per_second"),
        "{stderr}"
    );
}

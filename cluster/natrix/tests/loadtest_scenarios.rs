//! natrix-loadtest's scenarios against `natrix up` on loopback — `stun`,
//! `relay` (closed and open loop, both paths), `alloc` (phases, errors by
//! code, local port exhaustion), `generator`, `plan`, `e2e` (direct,
//! relay-one, relay-both) — and `compare` against coturn; the reports:
//! JSON, SLO exit codes, HTML rendered by headless Chromium, the Prometheus
//! endpoint, and Ctrl-C keeping what was measured.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Natrix, PASSWORD, Spawned, USER, chromium, coturn, free_port, loadtest};

/// Unlimited unauthenticated answers (STUN load from one address).
const NO_UNAUTH_LIMIT: [&str; 4] = [
    "--unauth-rate-per-prefix",
    "100000000",
    "--unauth-rate-total",
    "100000000",
];

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(loadtest())
        .args(args)
        .args(["--progress", "off"])
        .output()
        .unwrap();
    common::stdout_report(&out, &format!("natrix-loadtest {args:?}"))
}

fn run_owned(args: &[String]) -> serde_json::Value {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn e2e_pairs_connect_directly_and_through_the_planned_relay() {
    let up = Natrix::up(&["--peer-allow", "127.0.0.0/8"]);
    let lookup = up.lookup.to_string();
    let common = [
        "--lookup",
        &lookup,
        "--api-key",
        common::API_KEY,
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

    // Both sides presented as UDP-blocked: relay-both, each side on its own
    // allocation (over TCP, as lookup plans for such clients).
    let mut args = vec![
        "e2e",
        "--pairs",
        "2",
        "--as-a",
        "udp-blocked",
        "--as-b",
        "udp-blocked",
    ];
    args.extend_from_slice(&common);
    let both = run(&args);
    assert_eq!(both["modes"]["relay-both"]["succeeded"], 2, "{both}");
    for r in both["results"].as_array().unwrap() {
        assert_eq!(r["a"]["relayed"], true, "{r}");
        assert_eq!(r["b"]["relayed"], true, "{r}");
    }
    up.wait_metric("lookup_plans_total{mode=\"relay_both\"}", |v| v == 2.0);

    // Every pair reported its outcome: counted by NAT pair, planned mode
    // and actual path, with its time to the first packet.
    for r in [&direct, &relayed, &both] {
        for pair in r["results"].as_array().unwrap() {
            assert_eq!(pair["outcome_reported"], true, "{pair}");
        }
    }
    for (series, n) in [
        (
            "lookup_plan_outcomes_total{actual=\"direct\",pair=\"open+open\",planned=\"direct\"}",
            4.0,
        ),
        (
            "lookup_plan_outcomes_total{actual=\"relay\",pair=\"open+open\",planned=\"relay\"}",
            4.0,
        ),
        (
            "lookup_plan_outcomes_total{actual=\"relay\",pair=\"udp-blocked+udp-blocked\",planned=\"relay\"}",
            2.0,
        ),
        ("lookup_first_packet_seconds_count{actual=\"direct\"}", 4.0),
        ("lookup_first_packet_seconds_count{actual=\"relay\"}", 6.0),
    ] {
        up.wait_metric(series, |v| v == n);
    }
    // A report ticket lookup did not sign is refused.
    let forged = r#"{"report":"00.direct.open.open.9999999999.AAAA","actual":"direct"}"#;
    let (status, _, body) = common::http_request_raw(
        up.lookup,
        "POST",
        "/v1/outcomes",
        Some(forged),
        Some(common::API_KEY),
    )
    .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("not issued by this cluster"), "{body}");
}

#[test]
fn plan_load_reports_rates_and_latency() {
    let up = Natrix::up(&[]);
    let lookup = up.lookup.to_string();
    let report = run(&[
        "plan",
        "--lookup",
        &lookup,
        "--api-key",
        common::API_KEY,
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
        "--api-key",
        common::API_KEY,
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

#[test]
fn stun_relay_and_generator_scenarios_measure_natrix_up() {
    let mut flags = vec!["--peer-allow", "127.0.0.0/8"];
    flags.extend(NO_UNAUTH_LIMIT);
    let up = Natrix::up(&flags);
    let server = up.stun.to_string();
    let stun = run(&[
        "stun",
        "--server",
        &server,
        "--clients",
        "2",
        "--duration",
        "1s",
    ]);
    assert!(stun["answered"].as_u64().unwrap() > 1000, "{stun}");
    assert!(stun["loss_ratio"].as_f64().unwrap() < 0.01, "{stun}");
    assert!(stun["latency"]["count"].as_u64().unwrap() > 0, "{stun}");
    assert!(!stun["timeline"].as_array().unwrap().is_empty(), "{stun}");

    let auth = ["--user", USER, "--password", PASSWORD];
    for path in ["peer", "client"] {
        let mut args = vec![
            "relay",
            "--server",
            &server,
            "--path",
            path,
            "--clients",
            "2",
            "--duration",
            "1s",
        ];
        args.extend(auth);
        let r = run(&args);
        assert!(r["echoed"].as_u64().unwrap() > 1000, "{path}: {r}");
        assert!(r["loss_ratio"].as_f64().unwrap() < 0.01, "{path}: {r}");
        assert!(r["rtt_ms_p99"].as_f64().unwrap() > 0.0, "{path}: {r}");
        assert!(r["reordered"].is_u64(), "{path}: {r}");
    }
    let forwarded = up.wait_metric(
        "relay_forwarded_packets_total{direction=\"client_to_peer\"}",
        |v| v > 2000.0,
    );
    assert!(forwarded > 2000.0);

    // Open loop: the rate asked for, whatever comes back.
    let mut args = vec![
        "relay",
        "--server",
        &server,
        "--rate",
        "4000",
        "--clients",
        "2",
        "--duration",
        "1s",
    ];
    args.extend(auth);
    let paced = run(&args);
    let sent = paced["sent"].as_u64().unwrap();
    assert!(
        (3200..=4400).contains(&sent),
        "4000/s for 1 s sent {sent}: {paced}"
    );

    let generator = run(&["generator", "--duration", "300ms"]);
    assert!(generator["sent"].as_u64().unwrap() > 1000, "{generator}");
    assert_eq!(generator["gso"], true, "{generator}");
}

#[test]
fn alloc_storms_report_phases_errors_by_code_and_local_port_exhaustion() {
    let mut flags = vec!["--user-quota", "60"];
    flags.extend(NO_UNAUTH_LIMIT);
    let up = Natrix::up(&flags);
    let server = up.stun.to_string();
    let storm = |count: &str, extra: &[&str]| {
        let mut args = vec![
            "alloc",
            "--server",
            &server,
            "--user",
            USER,
            "--password",
            PASSWORD,
            "--count",
            count,
            "--concurrency",
            "4",
        ];
        args.extend(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };

    // 50 at 200/s: all made, refreshed and deleted; the rate is kept.
    let r = run_owned(&storm("50", &["--rate", "200"]));
    assert_eq!(r["allocations"], 50, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["phases"]["refresh"]["ok"], 50, "{r}");
    assert_eq!(r["phases"]["delete"]["ok"], 50, "{r}");
    assert!(
        r["seconds"].as_f64().unwrap() >= 0.2,
        "50 at 200/s take 0.25 s: {r}"
    );
    assert!(r["allocate_ms_p99"].as_f64().unwrap() > 0.0, "{r}");
    up.wait_metric("relay_allocations", |v| v == 0.0);

    // Beyond the user's quota: the server's code is counted.
    let r = run_owned(&storm("80", &[]));
    assert_eq!(r["allocations"], 60, "{r}");
    assert_eq!(r["errors_by_code"]["486"], 20, "{r}");
    up.wait_metric("relay_allocations", |v| v == 0.0);

    // Wrong password: a clear error naming the code.
    let out = Command::new(loadtest())
        .args([
            "alloc",
            "--server",
            &server,
            "--user",
            USER,
            "--password",
            "wrong",
        ])
        .args(["--count", "3", "--progress", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("password"),
        "{stderr}"
    );

    // Out of file descriptors on the load generator's side.
    let args = storm("55", &["--progress", "off"]).join(" ");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 40 -Hn 40 && exec {} {args}",
            loadtest().display()
        ))
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    let exhausted = r["errors_by_code"]["local-ports"].as_u64().unwrap_or(0);
    assert!(exhausted > 0, "{r}");
    assert_eq!(r["allocations"].as_u64().unwrap() + exhausted, 55, "{r}");
    let first = r["phases"]["allocate"]["first_error"].as_str().unwrap();
    assert!(first.contains("ulimit"), "{first}");
}

/// Fraction of pixels near `rgb` in a decoded RGB(A) image.
fn share_near(pixels: &[u8], channels: usize, rgb: [u8; 3]) -> f64 {
    let n = pixels.len() / channels;
    let near = pixels
        .chunks(channels)
        .filter(|p| (0..3).all(|i| (i32::from(p[i]) - i32::from(rgb[i])).abs() < 24))
        .count();
    near as f64 / n as f64
}

#[test]
fn an_html_report_opens_in_chromium_with_its_plots_drawn() {
    let up = Natrix::up(&["--peer-allow", "127.0.0.0/8"]);
    let server = up.stun.to_string();
    let dir = std::env::temp_dir().join(format!("natrix-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let html = dir.join("relay.html");
    let png = dir.join("relay.png");
    run(&[
        "relay",
        "--server",
        &server,
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--duration",
        "2s",
        "--report",
        html.to_str().unwrap(),
    ]);
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .args([
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1000,2000",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    pixels.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    let _ = std::fs::remove_dir_all(&dir);
    // Not blank: the page has ink, and the plots' own colours are there —
    // the throughput and percentile lines (orange) and histogram bars
    // (blue) were drawn, not just the text around them.
    let white = share_near(&pixels, channels, [255, 255, 255]);
    assert!(white < 0.97, "the page is {:.1} % white", white * 100.0);
    let blue = share_near(&pixels, channels, [31, 119, 180]);
    let orange = share_near(&pixels, channels, [255, 127, 14]);
    assert!(blue > 0.001, "histogram bars: {:.4} % blue", blue * 100.0);
    assert!(orange > 0.0005, "curves: {:.4} % orange", orange * 100.0);
}

#[test]
fn the_metrics_endpoint_serves_a_run_and_ctrl_c_keeps_what_was_measured() {
    let up = Natrix::up(&["--peer-allow", "127.0.0.0/8"]);
    let server = up.stun.to_string();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = std::env::temp_dir().join(format!("natrix-ctrl-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, html) = (dir.join("run.json"), dir.join("run.html"));
    let child = Command::new(loadtest())
        .args([
            "relay",
            "--server",
            &server,
            "--user",
            USER,
            "--password",
            PASSWORD,
        ])
        .args(["--duration", "60s", "--progress", "lines", "--metrics-addr"])
        .arg(metrics.to_string())
        .arg("--json")
        .arg(&json)
        .arg("--report")
        .arg(&html)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Spawned(child);
    // Scraped while it runs: counters move, and promtool accepts the text.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = common::http_get(metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if common::try_metric_value(&text, "loadtest_completed_total{scenario=\"relay\"}")
            .is_some_and(|v| v > 0.0)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "no loadtest metrics: {text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        text.contains("loadtest_running{scenario=\"relay\"} 1"),
        "{text}"
    );
    assert!(text.contains("loadtest_latency_seconds_bucket"), "{text}");
    let mut promtool = Command::new(common::tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // Ctrl-C (after a progress line or two): stops within a second or two,
    // exit 130, reports written.
    std::thread::sleep(Duration::from_millis(2200));
    let stopped_at = Instant::now();
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(10),
            "still running after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    let mut stderr = String::new();
    use std::io::Read as _;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("natrix-loadtest: relay"),
        "progress lines: {stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true, "{report}");
    assert!(report["echoed"].as_u64().unwrap() > 0, "{report}");
    assert!(report["seconds"].as_f64().unwrap() < 30.0, "{report}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("Interrupted"), "the HTML report says so");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compare_runs_natrix_and_coturn_interleaved_and_reports_ratios() {
    let mut flags = vec!["--peer-allow", "127.0.0.0/8", "--user-quota", "100000"];
    flags.extend(NO_UNAUTH_LIMIT);
    let up = Natrix::up(&flags);
    // coturn with the TURN REST API, natrix with long-term credentials:
    // each target has its own.
    let (coturn, port) = coturn(Some("compare-secret"));
    let natrix = format!("natrix={},password={PASSWORD},pid={}", up.stun, up.pid());
    // The other target as a TURN URL, as operators write them.
    let other = format!(
        "coturn=turn:127.0.0.1:{port}?transport=udp,secret=compare-secret,pid={}",
        coturn.0.id()
    );
    let relay = run(&[
        "compare",
        "--scenario",
        "relay",
        "--target",
        &natrix,
        "--target",
        &other,
        "--user",
        USER,
        "--rounds",
        "1",
        "--duration",
        "1s",
        "--clients",
        "2",
        "--path",
        "peer,client",
    ]);
    let cases = relay["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2, "{relay}");
    for case in cases {
        for t in ["natrix", "coturn"] {
            assert!(
                case["targets"][t]["median"].as_f64().unwrap() > 1000.0,
                "{t}: {case}"
            );
            assert!(
                case["targets"][t]["per_cpu_second"].as_f64().unwrap() > 0.0,
                "{t}: {case}"
            );
        }
        assert!(
            case["ratios"]["coturn"]["rate"].as_f64().unwrap() > 0.0,
            "{case}"
        );
    }
    assert!(
        relay["markdown"]
            .as_str()
            .unwrap()
            .contains("natrix/coturn"),
        "{relay}"
    );

    let alloc = run(&[
        "compare",
        "--scenario",
        "alloc",
        "--target",
        &natrix,
        "--target",
        &other,
        "--user",
        USER,
        "--rounds",
        "2",
        "--count",
        "200",
        "--concurrency",
        "4",
    ]);
    let case = &alloc["cases"][0];
    for t in ["natrix", "coturn"] {
        let rates = case["targets"][t]["rates"].as_array().unwrap();
        assert_eq!(rates.len(), 2, "two rounds each: {case}");
        assert!(
            case["targets"][t]["rss_per_allocation_bytes"].is_number(),
            "{t}: {case}"
        );
    }
    drop(coturn);
}

/// A CA and a leaf certificate for `relay.test` and 127.0.0.1 signed by it
/// (openssl), in `dir`: ca.pem, leaf.pem, leaf.key.
fn ca_and_leaf(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new(common::tool("openssl"))
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=natrix test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca);
    let mut csr = vec!["req", "-subj", "/CN=relay.test", "-keyout", "leaf.key"];
    csr.extend(ec);
    csr.extend(["-out", "leaf.csr"]);
    openssl(&csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:relay.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "leaf.pem",
    ]);
}

#[test]
fn relay_and_alloc_run_over_tcp_and_tls() {
    let dir = std::env::temp_dir().join(format!("natrix-lt-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ca_and_leaf(&dir);
    let tls_listen = format!("127.0.0.1:{}", free_port());
    let (cert, key, ca) = (
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
        dir.join("ca.pem"),
    );
    let up = Natrix::up(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--user-quota",
        "1000",
        "--tls-listen",
        &tls_listen,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let tcp_server = up.stun.to_string();
    let auth = ["--user", USER, "--password", PASSWORD];
    for (transport, server) in [("tcp", &tcp_server), ("tls", &tls_listen)] {
        for path in ["peer", "client"] {
            let mut args = vec![
                "relay",
                "--server",
                server,
                "--transport",
                transport,
                "--path",
                path,
                "--clients",
                "2",
                "--duration",
                "1s",
            ];
            args.extend(auth);
            let r = run(&args);
            assert_eq!(r["transport"], transport, "{r}");
            assert!(
                r["echoed"].as_u64().unwrap() > 1000,
                "{transport} {path}: {r}"
            );
            assert!(
                r["loss_ratio"].as_f64().unwrap() < 0.01,
                "{transport} {path}: {r}"
            );
        }
        // Many connections at once: every challenge is answered (a capped
        // 401 over a stream would leave the client waiting out its timeout).
        let mut args = vec![
            "alloc",
            "--server",
            server,
            "--transport",
            transport,
            "--count",
            "300",
            "--concurrency",
            "12",
        ];
        args.extend(auth);
        let r = run(&args);
        assert_eq!(r["allocations"], 300, "{transport}: {r}");
        assert_eq!(r["failed"], 0, "{transport}: {r}");
    }
    up.wait_metric("relay_allocations", |v| v == 0.0);

    // Verified TLS: the CA and the name on the certificate; a wrong name is
    // a clear handshake error.
    let verified = |name: &str| {
        Command::new(loadtest())
            .args([
                "relay",
                "--server",
                &tls_listen,
                "--transport",
                "tls",
                "--tls-ca",
            ])
            .arg(&ca)
            .args(["--tls-name", name, "--clients", "1", "--duration", "300ms"])
            .args(auth)
            .args(["--progress", "off"])
            .output()
            .unwrap()
    };
    assert!(verified("relay.test").status.success());
    let wrong = verified("other.test");
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("TLS handshake") && stderr.contains("other.test"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `signal`: pairs register with minted grants, hold push sockets and call
/// in a loop, two devices per callee, some calls declined, some callees
/// offline during the invite; every ring, accepted, declined and cancel
/// arrives (no lost push), the latencies are reported, and held sockets
/// report the server's memory per socket.
#[test]
fn signal_pairs_call_through_invitations_without_losing_a_push() {
    let up = Natrix::up(&[
        "--grant-secret",
        "app1=loadtest-signal-grant-secret",
        "--invites-per-minute",
        "100000",
    ]);
    let lookup = up.lookup.to_string();
    let pid = up.pid().to_string();
    let html = std::env::temp_dir().join(format!("natrix-signal-{}.html", std::process::id()));
    let r = run(&[
        "--report",
        html.to_str().unwrap(),
        "signal",
        "--lookup",
        &lookup,
        "--grant-secret",
        "app1=loadtest-signal-grant-secret",
        "--pairs",
        "3",
        "--duration",
        "2s",
        "--hold",
        "50",
        "--pid",
        &pid,
        "--devices-per-handle",
        "2",
        "--decline-ratio",
        "0.2",
        "--offline-ratio",
        "0.2",
    ]);
    assert!(r["calls"].as_u64().unwrap() > 10, "{r}");
    assert!(r["declined"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["offline_rang"].as_u64().unwrap() > 0,
        "offline callees rang from their mailbox: {r}"
    );
    assert_eq!(
        r["other_devices_cancelled"], r["calls"],
        "the second device stops ringing: {r}"
    );
    assert_eq!(r["lost_pushes"], 0, "{r}");
    assert_eq!(r["success_ratio"], 1.0, "{r}");
    assert!(r["ring_ms_p99"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["hold"]["held_sockets"], 50, "{r}");
    assert_eq!(
        r["hold"]["held_pushes_delivered"], 50,
        "every held socket rang: {r}"
    );
    assert_eq!(r["hold"]["held_pushes_lost"], 0, "{r}");
    assert!(
        r["hold"]["server_bytes_per_socket"].as_f64().is_some(),
        "{r}"
    );
    let calls = r["calls"].as_f64().unwrap();
    up.wait_metric("lookup_pushes_total{result=\"queued\"}", |v| {
        v >= 2.0 * calls
    });
    up.wait_metric("lookup_invites_total{result=\"accepted\"}", |v| v > 10.0);
    // The HTML report plots both phases' latency.
    let page = std::fs::read_to_string(&html).unwrap();
    let _ = std::fs::remove_file(&html);
    for phase in ["invite_to_ring", "accept_to_accepted"] {
        assert!(
            page.contains(&format!("<h3>{phase}</h3>")),
            "{phase} missing"
        );
    }
    assert!(page.matches("<svg").count() >= 2, "latency plots drawn");
}

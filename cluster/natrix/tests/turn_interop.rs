//! The relay role driven by clients nobody here wrote: coturn's
//! `turnutils_uclient` (with `turnutils_peer` as the far end) over UDP and
//! TCP, channels and Send indications, client to client, and TURN REST
//! credentials.

mod common;

use std::time::Duration;

use common::{Natrix, PASSWORD, USER, uclient, udp_echo_peer};

/// Loopback peers are denied by default; the tests relay to them.
const ALLOW_LOOPBACK: &[&str] = &["--peer-allow", "127.0.0.0/8"];

fn assert_clean(report: &common::UclientReport, expected: u64) {
    assert_eq!(
        (
            report.sent,
            report.received,
            report.lost,
            report.send_dropped
        ),
        (expected, expected, 0, 0),
        "uclient output:\n{}",
        report.output
    );
}

/// Runs `turnutils_uclient` on port `port` as the harness's test user.
fn as_tester(port: &str, args: &[&str]) -> common::UclientReport {
    let mut all = vec!["-p", port, "-u", USER, "-w", PASSWORD];
    all.extend_from_slice(args);
    uclient(&all)
}

/// coturn's client as the test user through the relay on `port` to the
/// echo peer on 127.0.0.1:`peer_port`: `clients` allocations (`-c`: without
/// the RTCP companion, which reserves the next port) each sending
/// `messages` of 160 bytes over a channel.
fn channels_to_echo_peer(
    port: &str,
    peer_port: &str,
    messages: &str,
    clients: &str,
) -> common::UclientReport {
    as_tester(
        port,
        &[
            "-c",
            "-e",
            "127.0.0.1",
            "-r",
            peer_port,
            "-n",
            messages,
            "-m",
            clients,
            "-l",
            "160",
            "127.0.0.1",
        ],
    )
}

fn port(natrix: &Natrix) -> String {
    natrix.stun.port().to_string()
}

#[test]
fn uclient_over_udp_relays_to_a_peer_through_channels_without_loss() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = as_tester(
        &p,
        &[
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "100",
            "-m",
            "4",
            "-l",
            "160",
            "127.0.0.1",
        ],
    );
    assert_clean(&report, 400);
    let forwarded = natrix.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |v| v >= 400.0,
    );
    assert!(forwarded >= 400.0, "peer_to_client {forwarded}");
}

#[test]
fn uclient_over_tcp_relays_to_a_peer_without_loss() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = as_tester(
        &p,
        &[
            "-t",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "100",
            "-m",
            "4",
            "-l",
            "1000",
            "127.0.0.1",
        ],
    );
    assert_clean(&report, 400);
}

#[test]
fn uclient_with_send_indications_and_padding_works() {
    let natrix = Natrix::up(ALLOW_LOOPBACK);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    // -s: Send/Data indications instead of channels.
    let report = as_tester(
        &p,
        &[
            "-s",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "50",
            "-m",
            "2",
            "-l",
            "333",
            "127.0.0.1",
        ],
    );
    assert_clean(&report, 100);
    // -t -D: TCP with mandatory channel padding (pjnath style).
    let report = as_tester(
        &p,
        &[
            "-t",
            "-D",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "50",
            "-m",
            "2",
            "-l",
            "333",
            "127.0.0.1",
        ],
    );
    assert_clean(&report, 100);
}

#[test]
fn uclient_client_to_client_through_two_allocations() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let p = port(&natrix);
    // -y: clients send to each other's relayed addresses; with -m 2 that is
    // four allocations and 4 x 100 messages.
    let report = as_tester(
        &p,
        &["-y", "-n", "100", "-m", "2", "-l", "1200", "127.0.0.1"],
    );
    assert_clean(&report, 400);
}

#[test]
fn uclient_with_turn_rest_credentials_and_a_rotated_secret() {
    let natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--auth-secret",
        "k2=fresh-secret-0123456,k1=previous-secret-0123",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    for secret in ["fresh-secret-0123456", "previous-secret-0123"] {
        let report = uclient(&[
            "-p",
            &p,
            "-W",
            secret,
            "-u",
            "alice",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "20",
            "-m",
            "1",
            "127.0.0.1",
        ]);
        // One client and its RTCP companion allocation: 2 x 20 messages.
        assert_clean(&report, 40);
    }
    let report = common::uclient_within(
        &[
            "-p",
            &p,
            "-W",
            "guessed",
            "-u",
            "mallory",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "5",
            "127.0.0.1",
        ],
        Duration::from_secs(3),
    );
    assert_eq!(report.received, 0, "{}", report.output);
    let failures = natrix.wait_metric("relay_auth_failures_total{reason=\"bad_integrity\"}", |v| {
        v >= 1.0
    });
    assert!(failures >= 1.0);
}

/// A source that keeps failing authentication is banned (what fail2ban
/// does for coturn): coturn's client guessing passwords from 127.0.0.7 is
/// logged once per failure (one JSON line each: source, reason, username),
/// banned at the third, and then even the right password from that address
/// goes unanswered until the ban ends, while 127.0.0.8 is served
/// throughout.
#[test]
fn a_source_that_keeps_failing_authentication_is_banned_and_logged() {
    let natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--auth-ban-after",
        "3",
        "--auth-ban-for",
        "10s",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let args = |from: &'static str, password: &'static str| {
        [
            "-p",
            &p,
            "-u",
            USER,
            "-w",
            password,
            "-L",
            from,
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "10",
            "-m",
            "1",
            "127.0.0.1",
        ]
        .map(str::to_owned)
    };
    let run = |from, password, limit| {
        let a = args(from, password);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        match limit {
            // Unanswered, uclient retries for a minute: its first seconds
            // are enough.
            Some(limit) => common::uclient_within(&a, limit),
            None => uclient(&a),
        }
    };
    let guess = run("127.0.0.7", "guessed-wrong", Some(Duration::from_secs(2)));
    assert_eq!(guess.received, 0, "{}", guess.output);
    natrix.wait_metric("relay_auth_bans_total", |v| v >= 1.0);
    assert_eq!(natrix.metric("relay_auth_banned_sources"), 1.0);
    let log = natrix.log();
    let refused: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "authentication refused")
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "one line per failure until the ban:\n{log}"
    );
    for line in &refused {
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["source"], "127.0.0.7", "{line}");
        assert_eq!(line["reason"], "bad_integrity", "{line}");
        assert_eq!(line["username"], USER, "{line}");
        assert_eq!(line["method"], "allocate", "{line}");
    }
    assert!(
        log.lines().any(
            |l| l.contains("source banned after repeated authentication failures")
                && l.contains("\"ban_secs\":10")
        ),
        "{log}"
    );
    // Banned: the right password from the same address gets no answer.
    let banned = run("127.0.0.7", PASSWORD, Some(Duration::from_secs(2)));
    assert_eq!(banned.received, 0, "{}", banned.output);
    natrix.wait_metric("relay_packets_dropped_total{reason=\"banned\"}", |v| {
        v >= 1.0
    });
    // Another address is served meanwhile, and the banned one once the ban
    // is over (the relay sweeps it away).
    assert_clean(&run("127.0.0.8", PASSWORD, None), 20);
    std::thread::sleep(Duration::from_secs(6));
    natrix.wait_metric("relay_auth_banned_sources", |v| v == 0.0);
    assert_clean(&run("127.0.0.7", PASSWORD, None), 20);
    assert_eq!(natrix.metric("relay_auth_bans_total"), 1.0);
}

/// Usage records (one per allocation, never metric labels): coturn's
/// client relays through natrix, which appends each allocation's record to
/// a JSON-lines file and to a stream in a real Redis; the packets and bytes
/// each way match what the client counted, and `natrix usage` sums the
/// file and the stream alike.
#[test]
fn usage_records_reach_a_file_and_a_redis_stream_and_natrix_usage_sums_them() {
    let redis = natrix_store::testing::RedisServer::start();
    let dir = std::env::temp_dir().join(format!("natrix-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("usage.jsonl");
    let path = file.display().to_string();
    let url = redis.url();
    let mut natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--redis-url",
        &url,
        "--usage-file",
        &path,
        "--usage-stream",
        "natrix:usage",
        "--drain-timeout",
        "1s",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = as_tester(
        &p,
        &[
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "50",
            "-m",
            "2",
            "-l",
            "120",
            "127.0.0.1",
        ],
    );
    assert!(
        report.sent > 0 && report.received == report.sent,
        "{}",
        report.output
    );
    // The client keeps its allocations: they end when the relay stops, and
    // their records are written before it exits.
    assert!(
        natrix
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
            .success()
    );
    let records = common::usage_records(&file);
    let text = format!("{records:#?}");
    assert!(!records.is_empty(), "no records:\n{}", natrix.log());
    let sum = |way: &str, what: &str| -> u64 {
        records.iter().map(|r| r[way][what].as_u64().unwrap()).sum()
    };
    assert_eq!(sum("client_to_peer", "packets"), report.sent, "{text}");
    assert_eq!(sum("peer_to_client", "packets"), report.received, "{text}");
    assert_eq!(sum("client_to_peer", "bytes"), 120 * report.sent, "{text}");
    assert_eq!(
        sum("peer_to_client", "bytes"),
        120 * report.received,
        "{text}"
    );
    for r in &records {
        assert_eq!(r["username"], USER, "{r}");
        assert_eq!(r["transport"], "udp", "{r}");
        assert!(
            ["shutdown", "deleted"].contains(&r["ended"].as_str().unwrap()),
            "{r}"
        );
        assert!(
            r["start"].as_u64().unwrap() <= r["end"].as_u64().unwrap(),
            "{r}"
        );
        assert!(r["relay"].as_str().is_some_and(|id| !id.is_empty()), "{r}");
    }
    let natrix_bin = env!("CARGO_BIN_EXE_natrix");
    let summed = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(natrix_bin)
            .arg("usage")
            .args(args)
            .args(["--json", "--by", "user"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for doc in [
        summed(&["--file", &path]),
        summed(&["--redis-url", &url, "--stream", "natrix:usage"]),
    ] {
        let tester = &doc["groups"][USER];
        assert_eq!(tester["allocations"], records.len() as u64, "{doc}");
        assert_eq!(
            tester["client_to_peer"]["bytes"],
            120 * report.sent,
            "{doc}"
        );
        assert_eq!(doc["malformed"], 0, "{doc}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Behind an L4 load balancer the relay takes the client's address from
/// the PROXY protocol v2 header: coturn's client relays over TCP through
/// HAProxy (`send-proxy-v2`) without loss, and its usage records and a
/// refused login's log line name the client's own address (127.0.0.9,
/// 127.0.0.10), not the balancer's. From a source not listed in
/// --proxy-protocol-from, a PROXY header is garbage: the connection is
/// closed unanswered.
#[test]
fn behind_haproxy_the_proxy_header_names_the_client() {
    let dir = std::env::temp_dir().join(format!("natrix-proxied-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let usage = dir.join("usage.jsonl");
    let usage_path = usage.display().to_string();
    let mut natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--usage-file",
        &usage_path,
        "--drain-timeout",
        "1s",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let pp = peer_port.to_string();
    let (_lb, lb, lb_dir) = common::haproxy(natrix.stun.port());
    let lb = lb.to_string();
    let report = uclient(&[
        "-t",
        "-p",
        &lb,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-L",
        "127.0.0.9",
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "50",
        "-m",
        "2",
        "-l",
        "200",
        "127.0.0.1",
    ]);
    assert_clean(&report, 100);
    let refused = common::uclient_within(
        &[
            "-t",
            "-p",
            &lb,
            "-u",
            USER,
            "-w",
            "wrong",
            "-L",
            "127.0.0.10",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "5",
            "127.0.0.1",
        ],
        Duration::from_secs(3),
    );
    assert_eq!(refused.received, 0, "{}", refused.output);
    let log = natrix.log();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "authentication refused")
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert_eq!(line["source"], "127.0.0.10", "{line}");
    assert_eq!(line["transport"], "tcp", "{line}");
    assert!(natrix.metric("relay_proxy_headers_total{result=\"proxied\"}") >= 3.0);
    assert_eq!(
        natrix.metric("relay_proxy_headers_total{result=\"malformed\"}"),
        0.0
    );

    // Straight to natrix from 127.0.0.11 (not a balancer): a PROXY header
    // claiming 198.51.100.1 is garbage, answered by a close.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 11], 0)).into())
        .unwrap();
    socket.connect(&natrix.stun.into()).unwrap();
    let mut direct: std::net::TcpStream = socket.into();
    let forged = natrix_wire::proxy::encode("198.51.100.1:4000".parse().unwrap(), natrix.stun);
    use std::io::{Read, Write};
    direct.write_all(&forged).unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(direct.read(&mut buf), Ok(0) | Err(_)),
        "a forged header was not refused"
    );

    assert!(
        natrix
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
            .success()
    );
    let records = common::usage_records(&usage);
    let text = format!("{records:#?}");
    let clients: Vec<&str> = records
        .iter()
        .map(|r| r["client"].as_str().unwrap())
        .collect();
    assert!(!clients.is_empty(), "{text}");
    for c in &clients {
        assert!(
            c.starts_with("127.0.0.9:"),
            "the record names the balancer: {text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&lb_dir);
}

/// `natrix admin` against a relay's admin API.
fn admin(url: &str, token: &str, args: &[&str]) -> (bool, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natrix"))
        .arg("admin")
        .args(args)
        .args(["--admin-url", url, "--admin-token", token, "--json"])
        .output()
        .expect("running natrix admin");
    let body = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), body)
}

/// Guessing the admin token: one source gets 10 refusals a minute (401,
/// one log line each), then 429 for everything — the right token too —
/// without more log lines; the operator elsewhere is served all along.
#[test]
fn guessing_the_admin_token_is_throttled_per_source() {
    let admin_listen = format!("127.0.0.1:{}", common::free_port());
    let url = format!("http://{admin_listen}");
    let token = "admin-token-0123456789";
    let natrix = Natrix::relay(&["--admin-listen", &admin_listen, "--admin-token", token]);
    let curl = |from: &str, with: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(["--interface", from, "-H"])
            .arg(format!("authorization: Bearer {with}"))
            .arg(format!("{url}/admin/quotas"))
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let codes: Vec<String> = (0..15)
        .map(|i| curl("127.0.0.51", &format!("guess-{i:016}")))
        .collect();
    assert_eq!(codes[..10], ["401"; 10], "{codes:?}");
    assert_eq!(codes[10..], ["429"; 5], "{codes:?}");
    assert_eq!(
        curl("127.0.0.51", token),
        "429",
        "a throttled source is not heard"
    );
    assert_eq!(curl("127.0.0.52", token), "200", "another source is");
    let (ok, quotas) = admin(&url, token, &["quotas"]);
    assert!(ok, "the operator: {quotas}");
    let refused = |r: &str| {
        natrix.metric(&format!(
            "relay_admin_requests_total{{result=\"{r}\",route=\"quotas\"}}"
        ))
    };
    assert_eq!((refused("unauthorized"), refused("throttled")), (10.0, 6.0));
    let lines = natrix
        .log()
        .matches("refused a request without the admin token")
        .count();
    assert_eq!(lines, 10, "one log line per refusal within the allowance");
}

/// The admin API (off by default, token required), driven by `natrix
/// admin` while coturn's client holds allocations: `list` shows them with
/// their user and traffic, filters by user and peer, `kill` ends one (its
/// usage record says so), `quotas` counts them, `drain` makes new
/// Allocates fail while the rest go on; a wrong token gets 401 and nothing.
#[test]
fn the_admin_api_lists_kills_drains_and_shows_quotas() {
    let dir = std::env::temp_dir().join(format!("natrix-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let usage = dir.join("usage.jsonl");
    let usage_path = usage.display().to_string();
    let admin_port = common::free_port();
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let url = format!("http://{admin_listen}");
    let token = "admin-token-0123456789";
    let natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--admin-listen",
        &admin_listen,
        "--admin-token",
        token,
        "--usage-file",
        &usage_path,
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    // Two clients (each with its RTCP companion) relaying for a while.
    let session = {
        let (p, pp) = (p.clone(), pp.clone());
        std::thread::spawn(move || {
            as_tester(
                &p,
                &[
                    "-e",
                    "127.0.0.1",
                    "-r",
                    &pp,
                    "-n",
                    "400",
                    "-m",
                    "2",
                    "-l",
                    "100",
                    "127.0.0.1",
                ],
            )
        })
    };
    // uclient allocates more than it relays through (an RTCP companion
    // it may leave idle): the active ones are those with traffic.
    let active = |body: &serde_json::Value| -> Vec<serde_json::Value> {
        body["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["client_to_peer"]["packets"].as_u64().unwrap_or(0) > 0)
            .cloned()
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (ok, body) = admin(&url, token, &["list"]);
        assert!(ok, "{body}");
        if active(&body).len() >= 2 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the allocations never showed: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for a in listed["allocations"].as_array().unwrap() {
        assert_eq!(a["username"], USER, "{a}");
        assert_eq!(a["transport"], "udp", "{a}");
    }
    for a in active(&listed) {
        assert_eq!(a["peers"], serde_json::json!(["127.0.0.1"]), "{a}");
        assert!(a["peer_to_client"]["packets"].as_u64().unwrap() > 0, "{a}");
    }
    let (_, by_user) = admin(&url, token, &["list", "--user", "nobody"]);
    assert_eq!(by_user["count"], 0, "{by_user}");
    let (_, by_peer) = admin(&url, token, &["list", "--peer", "127.0.0.1"]);
    assert!(by_peer["count"].as_u64().unwrap() >= 2, "{by_peer}");
    assert!(
        by_peer["count"].as_u64().unwrap() <= listed["count"].as_u64().unwrap(),
        "{by_peer}"
    );

    // A wrong token: 401, nothing done.
    let victim = listed["allocations"][0]["relayed"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, body) = admin(&url, "not-the-admin-token-000", &["kill", &victim]);
    assert!(!ok, "{body}");
    assert!(
        natrix.metric("relay_admin_requests_total{result=\"unauthorized\",route=\"kill\"}") >= 1.0
    );

    // Kill one: it is gone from the list, and from the relay.
    let before = natrix.metric("relay_allocations");
    let (ok, body) = admin(&url, token, &["kill", &victim]);
    assert!(ok && body["killed"] == true, "{body}");
    let (_, after) = admin(&url, token, &["list"]);
    assert!(
        after["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["relayed"] != victim.as_str()),
        "{after}"
    );
    natrix.wait_metric("relay_allocations", |v| v < before);
    let (ok, _) = admin(&url, token, &["kill", &victim]);
    assert!(!ok, "a second kill finds nothing");
    // Its usage record (written within a second) says who ended it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = common::usage_records(&usage);
        if records
            .iter()
            .any(|r| r["relayed"] == victim.as_str() && r["ended"] == "killed")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no `killed` record: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let (ok, q) = admin(&url, token, &["quotas"]);
    assert!(ok, "{q}");
    assert_eq!(q["allocations"], after["count"], "{q}");
    assert!(
        q["top"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["kind"] == "user" && h["who"] == USER),
        "{q}"
    );

    // Drain: a new client is refused (508), the running ones go on.
    let (ok, body) = admin(&url, token, &["drain"]);
    assert!(ok && body["draining"] == true, "{body}");
    let late = common::uclient_within(
        &[
            "-p",
            &p,
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "5",
            "127.0.0.1",
        ],
        Duration::from_secs(3),
    );
    assert_eq!(late.received, 0, "{}", late.output);
    natrix.wait_metric(
        "relay_requests_total{method=\"allocate\",result=\"508\"}",
        |v| v >= 1.0,
    );
    let report = session.join().unwrap();
    assert!(report.received > 0, "{}", report.output);
    let (_, q) = admin(&url, token, &["quotas"]);
    assert_eq!(q["draining"], true, "{q}");

    drop(natrix);
    let _ = std::fs::remove_dir_all(&dir);
}

/// ALTERNATE-SERVER (300 Try Alternate): relay A, drained through its
/// admin API, sends coturn's client to relay B — named by
/// `--alternate-server`, or found in the registry (Redis) as lookup would
/// pick it — and the client relays through B without loss; A creates
/// nothing.
#[test]
fn a_drained_relay_sends_clients_to_its_alternate() {
    let redis = natrix_store::testing::RedisServer::start();
    let url = redis.url();
    for from_registry in [false, true] {
        let mut b_args = vec!["--peer-allow", "127.0.0.0/8"];
        if from_registry {
            b_args.extend(["--redis-url", &url, "--relay-id", "relay-b"]);
        }
        let b = Natrix::relay(&b_args);
        let admin_listen = format!("127.0.0.1:{}", common::free_port());
        let token = "admin-token-0123456789";
        let alternate = b.stun.to_string();
        let mut a_args = vec![
            "--peer-allow",
            "127.0.0.0/8",
            "--admin-listen",
            &admin_listen,
            "--admin-token",
            token,
        ];
        if from_registry {
            a_args.extend(["--redis-url", &url, "--relay-id", "relay-a"]);
        } else {
            a_args.extend(["--alternate-server", &alternate]);
        }
        let a = Natrix::relay(&a_args);
        let admin_url = format!("http://{admin_listen}");
        let (ok, body) = admin(&admin_url, token, &["drain"]);
        assert!(ok, "{body}");
        // The registry's view arrives within a heartbeat and a re-read.
        std::thread::sleep(Duration::from_secs(if from_registry { 3 } else { 1 }));
        let (_peer, peer_port) = udp_echo_peer();
        let pp = peer_port.to_string();
        let report = as_tester(
            &port(&a),
            &[
                "-e",
                "127.0.0.1",
                "-r",
                &pp,
                "-n",
                "20",
                "-m",
                "1",
                "127.0.0.1",
            ],
        );
        assert_clean(&report, 40);
        assert!(
            a.metric("relay_requests_total{method=\"allocate\",result=\"300\"}") >= 1.0,
            "registry {from_registry}: {}",
            a.metrics_text()
        );
        assert_eq!(a.metric("relay_allocations_created_total"), 0.0);
        b.wait_metric("relay_allocations_created_total", |x| x >= 2.0);
    }
}

#[test]
fn loopback_peers_are_refused_by_default() {
    let natrix = Natrix::relay(&[]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = as_tester(
        &p,
        &[
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "5",
            "-m",
            "1",
            "127.0.0.1",
        ],
    );
    assert_eq!(report.received, 0, "{}", report.output);
    let forbidden = natrix.wait_metric(
        "relay_requests_total{method=\"channel_bind\",result=\"403\"}",
        |v| v >= 1.0,
    );
    let forbidden_perm =
        natrix.metric("relay_requests_total{method=\"create_permission\",result=\"403\"}");
    assert!(
        forbidden + forbidden_perm >= 1.0,
        "403s: {forbidden} {forbidden_perm}"
    );
    // The cause, not only the code: denied by the peer policy.
    let denied = natrix.wait_metric(
        "relay_requests_refused_total{reason=\"peer_denied\"}",
        |v| v >= forbidden + forbidden_perm,
    );
    assert_eq!(
        denied,
        forbidden + forbidden_perm,
        "every 403 was the policy"
    );
    let text = natrix.metrics_text();
    assert!(
        text.contains("relay_requests_refused_total{reason=\"draining\"} 0"),
        "every cause is a series from the start"
    );
}

/// A flood from many (loopback-emulated) sources: garbage, truncated and
/// unauthenticated requests. The established session must not lose a packet,
/// unauthenticated answers must stay under the per-prefix cap, and every
/// flood packet must be accounted for.
#[test]
fn a_flood_from_many_sources_does_not_disturb_established_allocations() {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    let natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--unauth-rate-per-prefix",
        "20",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let target = natrix.stun;

    let flood = std::thread::spawn(move || {
        // An unauthenticated Allocate (answered 401 until rate-limited).
        let mut allocate = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
        allocate.extend_from_slice(&[7; 12]);
        allocate.extend_from_slice(&[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]);
        let mut garbage = Vec::new();
        let mut x = 0x9e37_79b9_u32;
        for len in [1usize, 4, 19, 20, 36, 100, 548] {
            let mut d = vec![0u8; len];
            for b in &mut d {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            garbage.push(d);
        }
        garbage.push(vec![0x40, 0x00, 0x00, 0x10, 1, 2]); // truncated ChannelData
        garbage.push(vec![0x40, 0x01, 0x00, 0x01, 9]); // ChannelData, no allocation
        // 16 source addresses in 127.0.1.0/24 and 16 in other /24s.
        let sources: Vec<UdpSocket> = (0..32u8)
            .map(|i| {
                let ip = if i < 16 {
                    format!("127.0.1.{}", i + 1)
                } else {
                    format!("127.{}.2.1", i)
                };
                let s = UdpSocket::bind(format!("{ip}:0")).expect("flood source");
                s.set_nonblocking(true).expect("nonblocking");
                s
            })
            .collect();
        let started = Instant::now();
        let mut sent = 0u64;
        // Bounded in count and time.
        'outer: for round in 0..2_000u64 {
            for (i, s) in sources.iter().enumerate() {
                let d: &[u8] = if (round as usize + i).is_multiple_of(3) {
                    &allocate
                } else {
                    &garbage[(round as usize + i) % garbage.len()]
                };
                if s.send_to(d, target).is_ok() {
                    sent += 1;
                }
            }
            if round % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
            if started.elapsed() > Duration::from_secs(15) {
                break 'outer;
            }
        }
        // Count the answers the sources received.
        std::thread::sleep(Duration::from_millis(300));
        let mut answers = Vec::new();
        let mut buf = [0u8; 1500];
        for s in &sources {
            let mut n = 0u64;
            while s.recv_from(&mut buf).is_ok() {
                n += 1;
            }
            answers.push(n);
        }
        (sent, answers)
    });

    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = as_tester(
        &p,
        &[
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "200",
            "-m",
            "2",
            "-l",
            "160",
            "127.0.0.1",
        ],
    );
    let (sent, answers) = flood.join().expect("flood thread");
    assert_clean(&report, 400);
    assert!(sent > 10_000, "the flood was too small: {sent}");
    // 16 sources share 127.0.1.0/24: together they got at most the prefix
    // burst (2 x 20) plus the refill over the run; each other prefix alone
    // got at most its own.
    let shared: u64 = answers[..16].iter().sum();
    assert!(shared <= 40 + 20 * 20, "127.0.1.0/24 got {shared} answers");
    assert!(
        shared > 0,
        "the flood's own legitimate-looking requests got no answer"
    );
    let limited = natrix.wait_metric(
        "relay_packets_dropped_total{reason=\"rate_limited\"}",
        |v| v > 0.0,
    );
    assert!(limited > 0.0);
    // Every flood datagram is either answered (401) or a counted drop.
    let text = natrix.metrics_text();
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let accounted = sum("relay_packets_dropped_total{")
        + sum("relay_requests_total{method=\"allocate\",result=\"401\"}");
    assert!(
        accounted >= sent as f64,
        "{sent} flood datagrams, {accounted} answered or counted"
    );
}

/// On a wildcard listener every answer and relayed datagram must leave from
/// the address the client used (IP_PKTINFO), or a connected client drops it.
#[test]
fn a_wildcard_listener_answers_from_the_address_the_client_used() {
    let port = common::free_port();
    let listen = format!("0.0.0.0:{port}");
    let natrix = Natrix::relay(&["--peer-allow", "127.0.0.0/8", "--turn-listen", &listen]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port.to_string();
    let pp = peer_port.to_string();
    // The server is reached at 127.0.0.2; replies must come from 127.0.0.2.
    let report = as_tester(
        &p,
        &[
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "100",
            "-m",
            "2",
            "-l",
            "200",
            "127.0.0.2",
        ],
    );
    assert_clean(&report, 200);
    assert!(natrix.metric("relay_allocations_created_total") >= 2.0);
}

/// A secrets file (e.g. a Kubernetes Secret) is re-read when it changes:
/// the new secret works at once, a withdrawn one stops working.
#[test]
fn a_rotated_secrets_file_takes_effect_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("natrix-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("secrets");
    std::fs::write(
        &file,
        "# TURN REST secrets, newest first\nk1=old-secret-0123456789\n",
    )
    .expect("write");
    let path = file.display().to_string();
    let natrix = Natrix::relay(&["--peer-allow", "127.0.0.0/8", "--auth-secret-file", &path]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let args = |secret: &str| -> Vec<String> {
        [
            "-p",
            &p,
            "-W",
            secret,
            "-u",
            "alice",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "10",
            "-m",
            "1",
            "-c",
            "127.0.0.1",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |secret: &str| {
        let a = args(secret);
        uclient(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert_clean(&run("old-secret-0123456789"), 10);

    // Rotate: write a new file and rename it over the old one.
    let tmp = dir.join("secrets.tmp");
    std::fs::write(&tmp, "k2=new-secret-0123456789\n").expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_clean(&run("new-secret-0123456789"), 10);
    // Refused, coturn's client retries for a minute (and is banned after
    // ten failures): its first seconds are enough.
    let refused_args = args("old-secret-0123456789");
    let refused = common::uclient_within(
        &refused_args.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(3),
    );
    assert_eq!(
        refused.received, 0,
        "a withdrawn secret still works:\n{}",
        refused.output
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// REQUESTED-ADDRESS-FAMILY IPv6: an IPv4 client gets an IPv6 relayed
/// address and reaches an IPv6 peer.
#[test]
fn ipv6_relayed_addresses_reach_ipv6_peers() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let natrix = Natrix::relay(&["--peer-allow", "127.0.0.0/8,::1", "--relay-ipv6", "::1"]);
    let (_peer, peer_port) = common::udp_echo_peer_on("::1");
    let p = port(&natrix);
    let pp = peer_port.to_string();
    // -x: request an IPv6 relayed address.
    let report = as_tester(
        &p,
        &[
            "-x",
            "-e",
            "::1",
            "-r",
            &pp,
            "-n",
            "20",
            "-m",
            "1",
            "-c",
            "127.0.0.1",
        ],
    );
    assert_clean(&report, 20);
}

/// Dual-stack allocations (RFC 8656 ADDITIONAL-ADDRESS-FAMILY) with
/// coturn's client (`-Z`, at the draft's code point coturn still uses):
/// one Allocate gives an IPv4 and an IPv6 relayed address; the client
/// reaches an IPv4 peer and, in other runs, an IPv6 peer, each through the
/// relayed address of its family, without loss, also while moving its
/// allocations between the relay's loops; the usage records name both
/// relayed addresses.
#[test]
fn dual_stack_allocations_reach_ipv4_and_ipv6_peers() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let dir = std::env::temp_dir().join(format!("natrix-dual-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let usage = dir.join("usage.jsonl");
    let usage_path = usage.display().to_string();
    let mut natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8,::1",
        "--relay-ipv6",
        "::1",
        "--usage-file",
        &usage_path,
        "--drain-timeout",
        "1s",
    ]);
    let p = port(&natrix);
    // (peer, extra flags, clients, messages each): an IPv4 peer, an IPv6
    // peer, and ten clients that move their allocations (-M, RFC 8016) —
    // across the relay's loops too, the IPv6 socket going along.
    let runs: [(&str, &[&str], u64, u64); 3] = [
        ("127.0.0.1", &[], 1, 30),
        ("::1", &[], 1, 30),
        ("::1", &["-M"], 10, 20),
    ];
    for (peer_ip, extra, clients, messages) in runs {
        let (_peer, peer_port) = common::udp_echo_peer_on(peer_ip);
        let pp = peer_port.to_string();
        let (m, n) = (clients.to_string(), messages.to_string());
        // -Z: ADDITIONAL-ADDRESS-FAMILY IPv6 (dual allocation, implies -c).
        let mut args = vec!["-Z", "-e", peer_ip, "-r", &pp, "-n", &n, "-m", &m];
        args.extend_from_slice(extra);
        args.push("127.0.0.1");
        let report = as_tester(&p, &args);
        assert_clean(&report, clients * messages);
    }
    assert!(natrix.metric("relay_allocations_moved_total{path=\"across_loops\"}") > 0.0);
    assert!(
        natrix
            .signal_and_wait(libc::SIGTERM, std::time::Duration::from_secs(20))
            .success()
    );
    let records = common::usage_records(&usage);
    // Two allocations per client (uclient opens a second one it leaves
    // idle), every one dual-stack; one per client carried its messages
    // each way — all but the first run's only through the IPv6 half (their
    // peer is ::1).
    assert_eq!(records.len(), 24, "{records:#?}");
    let packets = |r: &serde_json::Value, way: &str| r[way]["packets"].as_u64().unwrap_or(0);
    let busy: Vec<_> = records
        .iter()
        .filter(|r| packets(r, "peer_to_client") > 0)
        .collect();
    assert_eq!(busy.len(), 12, "{records:#?}");
    for way in ["client_to_peer", "peer_to_client"] {
        let total: u64 = busy.iter().map(|r| packets(r, way)).sum();
        assert_eq!(total, 2 * 30 + 10 * 20, "{way}");
    }
    for r in &records {
        let addr = |k: &str| {
            r[k].as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .unwrap_or_else(|| panic!("no {k}: {r}"))
        };
        assert!(
            addr("relayed").is_ipv4() && addr("relayed_v6").is_ipv6(),
            "{r}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// TURN mobility (RFC 8016) with coturn's client: `-M` asks for a ticket,
/// then re-opens its socket (a new source port, over TCP a new connection,
/// often after closing the old one) and moves the allocation there with a
/// Refresh, before relaying. Every allocation moves and nothing is lost;
/// with the harness's two loops some new 5-tuples reach the other loop,
/// which takes the allocation over.
///
/// `relay_ports` keeps its ~60 allocations (and uclient's EVEN-PORT
/// reservations) out of the ports the other tests' relays and the kernel's
/// ephemeral range hand out meanwhile: a reserved port taken by another
/// process fails that client's next Allocate (508).
fn uclient_moves_its_allocations(transport: &[&str], relay_ports: &str) {
    let natrix = Natrix::relay(&[ALLOW_LOOPBACK, &["--relay-ports", relay_ports]].concat());
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let mut args = vec!["-M"];
    args.extend_from_slice(transport);
    args.extend([
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "25",
        "-m",
        "20",
        "-l",
        "160",
        "127.0.0.1",
    ]);
    let report = as_tester(&p, &args);
    assert_clean(&report, 500);
    let created = natrix.metric("relay_allocations_created_total");
    let moved =
        |path: &str| natrix.metric(&format!("relay_allocations_moved_total{{path=\"{path}\"}}"));
    let (same, across) = (moved("same_loop"), moved("across_loops"));
    assert!(created >= 20.0, "created {created}");
    assert_eq!(same + across, created, "every allocation moved once");
    assert!(
        across >= 1.0,
        "no move crossed loops: {same} same, {across} across"
    );
}

#[test]
fn uclient_with_mobility_moves_udp_allocations_to_its_new_address() {
    uclient_moves_its_allocations(&[], "20000-24999");
}

#[test]
fn uclient_with_mobility_moves_tcp_allocations_to_its_new_connection() {
    uclient_moves_its_allocations(&["-t"], "25000-29999");
}

/// Past the relay port range (`--relay-multiplex-ports`), coturn's clients
/// (`-c`: no RTCP allocation, which reserves the next port) share relayed
/// addresses and relay without loss: one relay port and two shared sockets
/// per loop (an even and an odd port: coturn's client asks for an even
/// port), six clients at once, each to its own peer (all on 127.0.0.1): at
/// least five allocations on at most four sockets, so some share one and
/// their peers' answers are told apart by source port. Then, on a relay
/// with eight shared sockets per loop, four allocations of one client to
/// one peer each get a socket of their own (a peer address is one
/// allocation's per socket), again without loss.
#[test]
fn past_the_port_range_coturn_clients_share_relayed_addresses_without_loss() {
    let relay =
        |shared: u16| Natrix::relay(&common::PastTheRange::free(shared).and(ALLOW_LOOPBACK));
    let natrix = relay(4);
    let p = port(&natrix);
    let peers: Vec<_> = (0..6).map(|_| udp_echo_peer()).collect();
    let reports: Vec<common::UclientReport> = std::thread::scope(|s| {
        let runs: Vec<_> = peers
            .iter()
            .map(|(_, peer_port)| {
                let (p, pp) = (p.clone(), peer_port.to_string());
                s.spawn(move || channels_to_echo_peer(&p, &pp, "100", "1"))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for report in &reports {
        assert_clean(report, 100);
    }
    let sockets = natrix.wait_metric("relay_multiplex_sockets", |v| v >= 1.0);
    assert!((1.0..=4.0).contains(&sockets), "shared sockets {sockets}");
    assert_eq!(
        natrix.metric("relay_packets_dropped_total{reason=\"peer_claimed\"}"),
        0.0
    );

    // Eight shared ports per loop, four of them even (coturn's client may
    // ask for an even port): four allocations to one peer in one loop
    // still find a socket each.
    let natrix = relay(16);
    let p = port(&natrix);
    let pp = peers[0].1.to_string();
    let report = channels_to_echo_peer(&p, &pp, "100", "4");
    assert_clean(&report, 400);
    let sockets = natrix.wait_metric("relay_multiplex_sockets", |v| v >= 3.0);
    assert!(
        sockets >= 3.0,
        "shared sockets {sockets}: one per allocation to the same peer"
    );
}

/// A flood at shared relayed ports from sources nobody there permitted
/// costs two lookups a datagram and is a counted drop: coturn's client on a
/// shared socket relays without loss meanwhile.
#[test]
fn a_flood_at_shared_relayed_ports_is_dropped_while_a_shared_client_relays() {
    // The one relay port is held elsewhere: every allocation is shared.
    let range = common::PastTheRange::held(4);
    let natrix = Natrix::relay(&range.and(ALLOW_LOOPBACK));
    let (_peer, peer_port) = udp_echo_peer();
    let (p, pp) = (port(&natrix), peer_port.to_string());
    let base: u16 = range.flags[3].split('-').next().unwrap().parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let sources: Vec<_> = (0..16)
                // Another address than the peer's: permissions are per
                // IP, so data from any port of the peer's IP is the
                // client's (as on a port of its own).
                .map(|_| std::net::UdpSocket::bind("127.0.0.2:0").unwrap())
                .collect();
            let until = std::time::Instant::now() + Duration::from_secs(15);
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < until
                && sent < 2_000_000
            {
                for s in &sources {
                    for port in base..base + 4 {
                        if s.send_to(&[0x55; 100], ("127.0.0.1", port)).is_ok() {
                            sent += 1;
                        }
                    }
                }
            }
            sent
        })
    };
    let report = channels_to_echo_peer(&p, &pp, "200", "1");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert_clean(&report, 200);
    let dropped = natrix.wait_metric(
        "relay_packets_dropped_total{reason=\"no_permission\"}",
        |v| v >= 10_000.0,
    );
    eprintln!("flood: {sent} datagrams sent at the shared ports, {dropped} dropped by the relay");
    assert!(
        dropped >= 10_000.0,
        "flood sent {sent}, relay dropped {dropped}"
    );
    assert!(
        natrix.metric("relay_multiplex_sockets") >= 1.0,
        "the client was on one"
    );
    drop(range);
}

/// An operator names an allocation on a shared relayed address by its
/// client: `natrix admin list` marks shared ones, `kill RELAYED` alone is
/// refused with the hint while two share it, `kill RELAYED --client` ends
/// that one and leaves the others.
#[test]
fn the_admin_api_names_an_allocation_on_a_shared_address_by_its_client() {
    // One shared port per loop: allocations of one loop share it.
    let range = common::PastTheRange::held(2);
    let admin_listen = format!("127.0.0.1:{}", common::free_port());
    let url = format!("http://{admin_listen}");
    let token = "admin-token-0123456789";
    let natrix =
        Natrix::relay(&range.and(&["--admin-listen", &admin_listen, "--admin-token", token]));
    let mut holders = std::process::Command::new(common::loadtest())
        .args([
            "--progress",
            "off",
            "alloc",
            "--server",
            &natrix.stun.to_string(),
        ])
        .args(["--user", USER, "--password", PASSWORD])
        .args(["--count", "6", "--concurrency", "1", "--hold", "30s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (ok, body) = admin(&url, token, &["list"]);
        assert!(ok, "{body}");
        if body["count"] == 6 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "six allocations never showed: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let all = listed["allocations"].as_array().unwrap();
    assert!(all.iter().all(|a| a["multiplexed"] == true), "{listed}");
    // Six on two shared addresses: one of them holds at least three.
    let target = all
        .iter()
        .map(|a| a["relayed"].as_str().unwrap())
        .max_by_key(|r| all.iter().filter(|a| a["relayed"] == *r).count())
        .unwrap()
        .to_owned();
    let (ok, body) = admin(&url, token, &["kill", &target]);
    assert!(!ok, "a shared address names no one allocation: {body}");
    assert!(
        body["error"].as_str().unwrap().contains("?client=IP:PORT"),
        "{body}"
    );
    let victim = all
        .iter()
        .find(|a| a["relayed"] == target.as_str())
        .unwrap()["client"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, body) = admin(&url, token, &["kill", &target, "--client", &victim]);
    assert!(ok, "{body}");
    let (_, after) = admin(&url, token, &["list"]);
    assert_eq!(after["count"], 5, "{after}");
    assert!(
        after["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["client"] != victim.as_str()),
        "{after}"
    );
    let _ = holders.kill();
    let _ = holders.wait();
    drop(range);
}

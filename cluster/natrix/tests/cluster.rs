//! The cluster for real: a `redis-server`, relays, CDX nodes and lookup as
//! separate `natrix` processes on loopback; plans from lookup's API, and the
//! tokens in them used by webrtc-rs' TURN client against the relays.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Natrix, PASSWORD, USER, http_get, http_post};
use natrix_store::testing::RedisServer;
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

const TURN_SECRET: &str = "k1=cluster-test-turn-secret";
const CLUSTER_SECRET: &str = "cluster-test-cluster-secret";
const OPEN_PAIR_RETRY: &str =
    r#"{"a":{"profile":{"class":"open"}},"b":{"profile":{"class":"open"}},"retry":true}"#;

/// `natrix lookup` on the cluster's Redis with the test secrets.
fn lookup_on(redis_url: &str) -> Natrix {
    Natrix::lookup(&[
        "--redis-url",
        redis_url,
        "--auth-secret",
        TURN_SECRET,
        "--cluster-secret",
        CLUSTER_SECRET,
    ])
}

fn plan(lookup: SocketAddr, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = http_post(lookup, "/v1/plan", body).unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

fn relays(lookup: SocketAddr) -> serde_json::Value {
    let (status, text) = http_get(lookup, "/v1/relays").unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Waits until `pred` holds for lookup's view of the registry.
fn wait_registry(
    lookup: SocketAddr,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let v = relays(lookup);
        if pred(&v) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{what}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn relay_ids(v: &serde_json::Value) -> Vec<String> {
    v["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn state_of(v: &serde_json::Value, id: &str) -> Option<String> {
    v["relays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .map(|r| r["state"].as_str().unwrap().to_owned())
}

/// The relay ids `n` relay-one plans assign to side A.
fn assigned(lookup: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (status, p) = plan(lookup, OPEN_PAIR_RETRY);
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["mode"], "relay-one");
        *counts
            .entry(p["a"]["relay"]["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}

/// A TURN allocation through webrtc-rs' client.
struct Allocation {
    /// Kept alive with the allocation (it refreshes and owns the socket).
    _client: Client,
    conn: Arc<dyn Conn + Send + Sync>,
}

async fn allocate(
    server: SocketAddr,
    username: &str,
    password: &str,
) -> Result<Allocation, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: username.to_owned(),
        password: password.to_owned(),
        realm: common::REALM.to_owned(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    client.listen().await.map_err(|e| e.to_string())?;
    let relay = client.allocate().await.map_err(|e| e.to_string())?;
    Ok(Allocation {
        _client: client,
        conn: Arc::new(relay),
    })
}

/// An echo peer on loopback.
async fn echo_peer() -> SocketAddr {
    echo_peer_on("127.0.0.1").await
}

/// An echo peer on `ip`.
async fn echo_peer_on(ip: &str) -> SocketAddr {
    let peer = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = peer.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = peer.recv_from(&mut buf).await {
            let _ = peer.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// True when a datagram relayed to `peer` comes back through `a`.
async fn forwards(a: &Allocation, peer: SocketAddr, tag: &str) -> bool {
    let mut buf = vec![0u8; 2048];
    for _ in 0..5 {
        if a.conn.send_to(tag.as_bytes(), peer).await.is_err() {
            continue;
        }
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), a.conn.recv_from(&mut buf)).await
            && &buf[..n] == tag.as_bytes()
        {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natrix_up_plans_and_its_tokens_allocate_on_its_own_relay() {
    let up = Natrix::up(&["--peer-allow", "127.0.0.0/8", "--auth-secret", TURN_SECRET]);
    let lookup = up.lookup;
    let (status, p) = plan(lookup, OPEN_PAIR_RETRY);
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["mode"], "relay-one");
    assert_eq!(p["relayed_side"], "a");
    let turn = &p["a"]["ice_servers"][1];
    let user = turn["username"].as_str().unwrap();
    let pass = turn["credential"].as_str().unwrap();
    assert!(user.ends_with(p["a"]["relay"]["id"].as_str().unwrap()));
    assert_eq!(
        p["a"]["exchange"]["cdx"][0],
        up.stun.to_string(),
        "up's own listener is its CDX"
    );

    let peer = echo_peer().await;
    let a = allocate(up.stun, user, pass)
        .await
        .expect("the plan's token allocates");
    assert!(forwards(&a, peer, "through the planned relay").await);

    // A token naming another relay, or tampered with, is refused.
    let other = user.rsplit_once(':').unwrap().0.to_owned() + ":relay-elsewhere";
    assert!(allocate(up.stun, &other, pass).await.is_err());
    assert!(
        allocate(up.stun, user, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .await
            .is_err()
    );
    up.wait_metric("lookup_plans_total{mode=\"relay_one\"}", |v| v == 1.0);

    // Session-scoped permissions: with B's public address in the request,
    // A's relay reaches B's address only.
    let (status, p) = plan(
        lookup,
        r#"{"a":{"profile":{"class":"symmetric"}},
            "b":{"profile":{"class":"symmetric","mapped_address":"127.0.0.1:5000"}}}"#,
    );
    assert_eq!(status, 200, "{p}");
    let turn = &p["a"]["ice_servers"][1];
    let user = turn["username"].as_str().unwrap();
    assert!(user.ends_with(":127.0.0.1"), "{user}");
    let scoped = allocate(up.stun, user, turn["credential"].as_str().unwrap())
        .await
        .unwrap();
    assert!(forwards(&scoped, peer, "to the counterpart").await);
    let stranger = echo_peer_on("127.0.0.2").await;
    assert!(
        !forwards(&scoped, stranger, "to a stranger").await,
        "a scoped allocation reached an address outside its session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_spreads_plans_by_load_drops_dead_relays_drains_and_survives_a_redis_restart()
 {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let relay = |id: &str, extra: &[&str]| {
        let mut args = vec![
            "--redis-url",
            url.as_str(),
            "--auth-secret",
            TURN_SECRET,
            "--relay-id",
            id,
            "--peer-allow",
            "127.0.0.0/8",
        ];
        args.extend_from_slice(extra);
        Natrix::relay(&args)
    };
    let r1 = relay("relay-1", &["--max-allocations", "2"]);
    let mut r2 = relay("relay-2", &["--drain-timeout", "30s"]);
    let mut r3 = relay("relay-3", &[]);
    let _c1 = Natrix::cdx(&["--redis-url", &url, "--cluster-secret", CLUSTER_SECRET]);
    let _c2 = Natrix::cdx(&["--redis-url", &url, "--cluster-secret", CLUSTER_SECRET]);
    let lk = lookup_on(&url);
    let lookup = lk.lookup;
    wait_registry(lookup, "three relays and two CDX nodes", |v| {
        relay_ids(v).len() == 3 && v["cdx"].as_array().unwrap().len() == 2
    });

    // Idle relays share the plans.
    let counts = assigned(lookup, 60);
    assert_eq!(counts.len(), 3, "every relay gets plans: {counts:?}");

    // relay-1 fills up (2 allocations of 2): it gets no more plans.
    let peer = echo_peer().await;
    let full1 = allocate(r1.stun, USER, PASSWORD).await.unwrap();
    let full2 = allocate(r1.stun, USER, PASSWORD).await.unwrap();
    wait_registry(lookup, "relay-1 reports its load", |v| {
        v["relays"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "relay-1" && r["load"]["allocations"] == 2)
    });
    let counts = assigned(lookup, 40);
    assert!(
        !counts.contains_key("relay-1"),
        "a full relay got plans: {counts:?}"
    );

    // Secret rotation: `natrix secret rotate` puts a new secret in Redis;
    // lookup mints with it and relays accept it within a heartbeat, while a
    // token minted before keeps working.
    let (_, before) = plan(lookup, OPEN_PAIR_RETRY);
    let old_turn = before["a"]["ice_servers"][1].clone();
    let old_relay = before["a"]["relay"]["id"].as_str().unwrap().to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natrix"))
        .args(["secret", "rotate", "--redis-url", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains("new TURN secret k"), "{listed}");
    let configured: natrix_model::TurnSecret = TURN_SECRET.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (new_turn, new_relay) = loop {
        let (_, p) = plan(lookup, OPEN_PAIR_RETRY);
        let t = p["a"]["ice_servers"][1].clone();
        let user = t["username"].as_str().unwrap().to_owned();
        let mut parts = user.split(':');
        let (exp, session, relay_id) = (
            parts.next().unwrap().parse::<u64>().unwrap(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        );
        let with_old = natrix_model::SessionToken {
            expires: exp,
            session,
            tenant: None,
            relay_id: relay_id.clone(),
            peers: None,
        }
        .mint(&configured)
        .1;
        if t["credential"] != with_old.as_str() {
            break (t, relay_id);
        }
        assert!(
            Instant::now() < deadline,
            "lookup never minted with the rotated secret"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let server_of = |id: &str| match id {
        "relay-1" => r1.stun,
        "relay-2" => r2.stun,
        _ => r3.stun,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = allocate(
            server_of(&new_relay),
            new_turn["username"].as_str().unwrap(),
            new_turn["credential"].as_str().unwrap(),
        )
        .await;
        if got.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay never accepted the rotated secret: {:?}",
            got.err()
        );
    }
    allocate(
        server_of(&old_relay),
        old_turn["username"].as_str().unwrap(),
        old_turn["credential"].as_str().unwrap(),
    )
    .await
    .expect("a token minted before the rotation still works");

    // A plan's token allocates on the relay it names (relay-2 here).
    let mut on_r2 = None;
    for _ in 0..50 {
        let (_, p) = plan(lookup, OPEN_PAIR_RETRY);
        if p["a"]["relay"]["id"] == "relay-2" {
            on_r2 = Some(p);
            break;
        }
    }
    let p = on_r2.expect("relay-2 is planned now and then");
    let turn = &p["a"]["ice_servers"][1];
    let kept = allocate(
        r2.stun,
        turn["username"].as_str().unwrap(),
        turn["credential"].as_str().unwrap(),
    )
    .await
    .expect("the token allocates on its relay");
    assert!(forwards(&kept, peer, "before the drain").await);

    // A crashed relay leaves selection within its TTL (3 s) and a refresh.
    unsafe { libc::kill(r3.pid(), libc::SIGKILL) };
    let gone = wait_registry(lookup, "relay-3 gone", |v| {
        !relay_ids(v).contains(&"relay-3".to_owned())
    });
    assert!(gone < Duration::from_secs(5), "relay-3 stayed {gone:?}");
    let _ = r3.wait_exit(Duration::from_secs(5));

    // Draining: relay-2 announces it within a heartbeat, gets no new
    // plans, and its allocation keeps forwarding.
    unsafe { libc::kill(r2.pid(), libc::SIGTERM) };
    let took = wait_registry(lookup, "relay-2 draining", |v| {
        state_of(v, "relay-2").as_deref() == Some("draining")
    });
    assert!(took < Duration::from_secs(3), "{took:?}");
    for _ in 0..20 {
        let (status, p) = plan(lookup, OPEN_PAIR_RETRY);
        // relay-1 is full, relay-3 dead, relay-2 draining: nothing left.
        assert_eq!(status, 503, "{p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("no registered relay"),
            "{p}"
        );
    }
    assert!(forwards(&kept, peer, "while draining").await);
    assert!(r2.alive(), "a draining relay waits for its allocation");

    // Redis restarts: forwarding never depends on it, lookup serves from its
    // snapshot meanwhile, and the relays re-register by themselves.
    redis.stop();
    assert!(forwards(&full1, peer, "redis down").await);
    let (status, _) = plan(
        lookup,
        r#"{"a":{"profile":{"class":"open"}},"b":{"profile":{"class":"open"}}}"#,
    );
    assert_eq!(status, 200, "a direct plan from the last snapshot");
    lk.wait_metric("cluster_registry_refreshes_total{result=\"error\"}", |v| {
        v >= 1.0
    });
    redis.restart();
    wait_registry(lookup, "relays re-registered after the restart", |v| {
        relay_ids(v).contains(&"relay-1".to_owned())
            && state_of(v, "relay-2").as_deref() == Some("draining")
    });
    assert!(forwards(&full1, peer, "after the restart").await);
    drop(full2);
}

#[test]
fn a_relay_started_before_redis_waits_for_it_and_registers() {
    // As when the bundled Redis pod starts next to the relays. The relay
    // retries its connection meanwhile: the port is outside the ephemeral
    // range, where a retry could connect to itself and take it.
    let port = common::free_port_below_ephemeral();
    let url = format!("redis://127.0.0.1:{port}");
    let mut relay = Natrix::relay(&["--redis-url", &url, "--relay-id", "relay-early"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        relay.alive(),
        "the relay waits for Redis instead of exiting"
    );
    let _redis = RedisServer::start_on(port);
    let lk = lookup_on(&url);
    wait_registry(
        lk.lookup,
        "the early relay registered once Redis came up",
        |v| relay_ids(v).contains(&"relay-early".to_owned()),
    );
}

/// Runs `natrix apikey …` against `redis_url`; its standard output.
fn apikey(redis_url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natrix"))
        .arg("apikey")
        .args(args)
        .args(["--redis-url", redis_url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "natrix apikey {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// lookup is no open relay: without a key, with an unknown one or with a
/// key lacking the scope, no plan (and no relay list); keys created with
/// `natrix apikey create` work within a second, are rate-limited, and stop
/// working within a second of `revoke`.
#[test]
fn plans_need_a_key_with_the_scope_and_keys_are_created_limited_and_revoked() {
    use common::{API_KEY, http_request_raw};
    let redis = RedisServer::start();
    let url = redis.url();
    let lk = Natrix::lookup(&[
        "--redis-url",
        &url,
        "--auth-secret",
        TURN_SECRET,
        "--cluster-secret",
        CLUSTER_SECRET,
        "--api-key-rate",
        "1",
    ]);
    let ask = |key: Option<&str>, path: &str| {
        let method = if path == "/v1/plan" { "POST" } else { "GET" };
        let body = (method == "POST").then_some(OPEN_PAIR_RETRY);
        http_request_raw(lk.lookup, method, path, body, key).unwrap()
    };
    // No key, or a malformed one: 401 with a problem document and a challenge.
    for key in [None, Some("not-a-key")] {
        let (status, head, body) = ask(key, "/v1/plan");
        assert_eq!(status, 401, "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(head.contains("application/problem+json"), "{head}");
        assert!(body.contains("natrix apikey create"), "{body}");
        assert_eq!(ask(key, "/v1/relays").0, 401);
    }
    // The right id with a wrong secret.
    let forged = format!("{}{}", &API_KEY[..17], "f".repeat(32));
    assert_eq!(ask(Some(&forged), "/v1/plan").0, 401);
    // The configured key works (503: no relay yet, but authorised).
    assert_ne!(ask(Some(API_KEY), "/v1/plan").0, 401);
    lk.wait_metric("lookup_api_auth_total{result=\"missing\"}", |v| v >= 2.0);

    // A key for the relay list only.
    let reader = apikey(
        &url,
        &["create", "--name", "dashboard", "--scope", "relays:read"],
    );
    assert!(reader.starts_with("nxk_"), "{reader}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask(Some(&reader), "/v1/relays").0 != 200 {
        assert!(Instant::now() < deadline, "the new key never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _, body) = ask(Some(&reader), "/v1/plan");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("`plan` scope"), "{body}");
    assert!(apikey(&url, &["list"]).contains("dashboard  relays:read"));

    // A plan key, limited to 1 request per second (burst 2).
    let app = apikey(&url, &["create", "--name", "app"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask(Some(&app), "/v1/plan").0 == 401 {
        assert!(Instant::now() < deadline, "the new key never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let limited = (0..5)
        .map(|_| ask(Some(&app), "/v1/plan"))
        .find(|(status, _, _)| *status == 429)
        .expect("a 429 past the key's rate");
    assert!(
        limited.1.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        limited.1
    );
    lk.wait_metric("lookup_api_auth_total{result=\"rate_limited\"}", |v| {
        v >= 1.0
    });
    // The operator's configured key is not metered.
    assert!((0..5).all(|_| ask(Some(API_KEY), "/v1/plan").0 != 429));

    // Revoked: refused within a second or two.
    let id = &app[4..16];
    assert_eq!(apikey(&url, &["revoke", id]), format!("revoked {id}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask(Some(&app), "/v1/plan").0 != 401 {
        assert!(Instant::now() < deadline, "a revoked key still works");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `natrix grant …`; the grant it prints.
fn grant(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natrix"))
        .arg("grant")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "natrix grant {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An application backend's signed grants work on every lookup replica
/// holding the grant secret; forged, foreign and out-of-scope grants are
/// refused with their reason; the grant's key id is a tenant whose live
/// sessions are capped across replicas (429 with Retry-After), counted per
/// key in the metrics and carried in the relay tokens.
#[test]
fn grants_plan_on_any_replica_and_a_tenants_live_sessions_are_capped_cluster_wide() {
    use common::http_request_raw;
    const GRANT_SECRET: &str = "app1=grant-secret-of-the-app-backend";
    let redis = RedisServer::start();
    let url = redis.url();
    let _relay = Natrix::relay(&[
        "--redis-url",
        &url,
        "--auth-secret",
        TURN_SECRET,
        "--relay-id",
        "relay-1",
    ]);
    let _cdx = Natrix::cdx(&["--redis-url", &url, "--cluster-secret", CLUSTER_SECRET]);
    let replica = || {
        Natrix::lookup(&[
            "--redis-url",
            &url,
            "--auth-secret",
            TURN_SECRET,
            "--cluster-secret",
            CLUSTER_SECRET,
            "--grant-secret",
            GRANT_SECRET,
            "--api-key-max-sessions",
            "4",
        ])
    };
    let (a, b) = (replica(), replica());
    for lk in [&a, &b] {
        wait_registry(lk.lookup, "a relay and a CDX node", |v| {
            relay_ids(v).len() == 1 && v["cdx"].as_array().unwrap().len() == 1
        });
    }
    let ask = |lk: &Natrix, credential: &str| {
        http_request_raw(
            lk.lookup,
            "POST",
            "/v1/plan",
            Some(OPEN_PAIR_RETRY),
            Some(credential),
        )
        .unwrap()
    };
    let alice = grant(&["--grant-secret", GRANT_SECRET, "--sub", "alice"]);

    // Refused grants, each with its reason.
    let forged = grant(&[
        "--grant-secret",
        "app1=not-the-secret-lookup-holds",
        "--sub",
        "mallory",
    ]);
    let foreign = grant(&[
        "--grant-secret",
        "app2=grant-secret-of-the-app-backend",
        "--sub",
        "mallory",
    ]);
    let reader = grant(&[
        "--grant-secret",
        GRANT_SECRET,
        "--sub",
        "dash",
        "--scope",
        "relays:read",
    ]);
    for (credential, status, says) in [
        (forged.as_str(), 401, "signature does not verify"),
        (
            foreign.as_str(),
            401,
            "no grant secret has key id \\\"app2\\\"",
        ),
        (reader.as_str(), 403, "lacks the `plan` scope"),
        ("eyJ.eyJ.sig", 401, "nor a signed grant"),
    ] {
        let (got, _, body) = ask(&a, credential);
        assert_eq!(got, status, "{body}");
        assert!(body.contains(says), "{says}: {body}");
    }
    let (status, _, _) =
        http_request_raw(b.lookup, "GET", "/v1/relays", None, Some(&reader)).unwrap();
    assert_eq!(status, 200, "a relays:read grant reads the relay list");

    // One session on b, two on a: all within the cap of 4.
    let (status, _, body) = ask(&b, &alice);
    assert_eq!(status, 200, "{body}");
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    let user = p["a"]["ice_servers"][1]["username"].as_str().unwrap();
    assert!(
        user.contains(&format!(
            "{}.g-app1:relay-1",
            p["session"].as_str().unwrap()
        )),
        "the token names the tenant: {user}"
    );
    for _ in 0..2 {
        let (status, _, body) = ask(&a, &alice);
        assert_eq!(status, 200, "{body}");
    }
    // Within a sync (1 s) both replicas know all three sessions: b admits
    // the fourth and refuses the fifth, then so does a.
    b.wait_metric("lookup_key_live_sessions{key=\"g-app1\"}", |v| v >= 1.0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ask(&b, &alice).0, 200);
    let (status, head, body) = ask(&b, &alice);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("live sessions"), "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    std::thread::sleep(Duration::from_millis(2500));
    let (status, _, body) = ask(&a, &alice);
    assert_eq!(status, 429, "replica a knows b's sessions: {body}");
    b.wait_metric(
        "lookup_key_refused_total{key=\"g-app1\",reason=\"session_cap\"}",
        |v| v >= 1.0,
    );
    a.wait_metric("lookup_key_plans_total{key=\"g-app1\"}", |v| v == 2.0);
    a.wait_metric("lookup_api_auth_total{result=\"session_cap\"}", |v| {
        v >= 1.0
    });
    // The operator's own key is not capped.
    assert_eq!(ask(&a, common::API_KEY).0, 200);
}

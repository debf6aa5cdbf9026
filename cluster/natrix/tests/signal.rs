//! Signalling through `natrix up`: devices register handles with grants,
//! hold push WebSockets, invite, ring, accept (first accept wins), decline,
//! cancel, exchange sealed updates with their pair's ticket — and every
//! forged, expired, foreign or out-of-turn request is refused with its
//! problem document.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Natrix, http_request_raw};
use ring::signature::{Ed25519KeyPair, KeyPair};
use tungstenite::Message;

const GRANT_SECRET: &str = "app1=signal-test-grant-secret";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn up(extra: &[&str]) -> Natrix {
    let mut args = vec!["--grant-secret", GRANT_SECRET];
    args.extend_from_slice(extra);
    Natrix::up(&args)
}

/// `natrix grant` for `handle` with scope register.
fn register_grant(handle: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natrix"))
        .args(["grant", "--grant-secret", GRANT_SECRET, "--sub", handle])
        .args(["--scope", "register"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

struct Device {
    id: String,
    token: String,
    key: Ed25519KeyPair,
}

fn keypair() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn call(
    lookup: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let text = body.map(ToString::to_string);
    let (status, _, body) = http_request_raw(lookup, method, path, text.as_deref(), token).unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn register(lookup: SocketAddr, handle: &str, label: &str) -> Device {
    let key = keypair();
    let body = serde_json::json!({
        "handle": handle,
        "grant": register_grant(handle),
        "public_key": B64.encode(key.public_key().as_ref()),
        "push": {"kind": "ws"},
        "label": label,
    });
    let (status, v) = call(lookup, "POST", "/v1/devices", Some(&body), None);
    assert_eq!(status, 201, "{v}");
    Device {
        id: v["device_id"].as_str().unwrap().to_owned(),
        token: v["device_token"].as_str().unwrap().to_owned(),
        key,
    }
}

type Socket = tungstenite::WebSocket<TcpStream>;

fn connect(lookup: SocketAddr, d: &Device) -> Socket {
    let stream = TcpStream::connect(lookup).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let url = format!("ws://{lookup}/v1/push?token={}", d.token);
    let (ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
    ws
}

/// The next frame of `kind` on `ws` within 5 s (acknowledged); frames of
/// other kinds are acknowledged and skipped.
fn expect(ws: &mut Socket, kind: &str) -> serde_json::Value {
    expect_within(ws, kind, Duration::from_secs(5))
}

/// No frame on `ws` for `wait`.
fn silent(ws: &mut Socket, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => panic!("unexpected frame: {t}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(_)) => {}
            Err(e) => panic!("socket: {e}"),
        }
    }
}

const OPEN: &str = r#"{"class":"open"}"#;

fn profile() -> serde_json::Value {
    serde_json::from_str(OPEN).unwrap()
}

#[test]
fn a_call_rings_every_device_the_first_accept_wins_and_the_pair_talks_through_its_ticket() {
    let n = up(&[]);
    let lk = n.lookup;
    let alice = register(lk, "alice@example.com", "laptop");
    let bob_phone = register(lk, "+15550100", "phone");
    let bob_laptop = register(lk, "+15550100", "laptop");
    let mut a_ws = connect(lk, &alice);
    let mut phone = connect(lk, &bob_phone);
    let mut laptop = connect(lk, &bob_laptop);

    let (status, inv) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(
            &serde_json::json!({"to": ["+15550100"], "info": {"name": "Alice"}, "profile": profile()}),
        ),
        Some(&alice.token),
    );
    assert_eq!(status, 202, "{inv}");
    assert_eq!(inv["delivered"].as_array().unwrap().len(), 2, "{inv}");
    let sid = inv["session"].as_str().unwrap().to_owned();
    let invitation = inv["invitation"].as_str().unwrap().to_owned();
    assert!(!invitation.contains("open"), "the invitation is sealed");
    let ring1 = expect(&mut phone, "invite");
    let ring2 = expect(&mut laptop, "invite");
    assert_eq!(ring1["body"]["from"]["handle"], "alice@example.com");
    assert_eq!(ring2["body"]["session"], sid.as_str());

    // The phone accepts: it gets its side of the plan, Alice gets hers
    // pushed, the laptop stops ringing.
    let accept = serde_json::json!({"invitation": invitation, "profile": profile()});
    let (status, acc) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/accept"),
        Some(&accept),
        Some(&bob_phone.token),
    );
    assert_eq!(status, 200, "{acc}");
    assert!(acc["plan"]["ice_servers"].is_array(), "{acc}");
    let accepted = expect(&mut a_ws, "accepted");
    assert_eq!(accepted["body"]["by"]["device"], bob_phone.id.as_str());
    assert!(accepted["body"]["plan"]["ice_servers"].is_array());
    assert_eq!(accepted["body"]["pair"], acc["pair"]);
    let cancelled = expect(&mut laptop, "cancelled");
    assert_eq!(cancelled["body"]["reason"], "answered-elsewhere");
    // A second accept loses.
    let (status, late) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/accept"),
        Some(&accept),
        Some(&bob_laptop.token),
    );
    assert_eq!(status, 409, "{late}");

    // A sealed relay update through the ticket reaches the peer only.
    let pair = acc["pair"].as_str().unwrap();
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{pair}/update"),
        Some(
            &serde_json::json!({"ticket": acc["ticket"], "kind": "relay-update", "sealed": "opaque-bytes"}),
        ),
        Some(&bob_phone.token),
    );
    assert_eq!(status, 202);
    let update = expect(&mut a_ws, "update");
    assert_eq!(update["body"]["sealed"], "opaque-bytes");
    assert_eq!(update["body"]["from"]["device"], bob_phone.id.as_str());
    silent(&mut laptop, Duration::from_millis(300));
    // The laptop holds no ticket of this pair.
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{pair}/update"),
        Some(&serde_json::json!({"ticket": acc["ticket"], "kind": "app", "sealed": "x"})),
        Some(&bob_laptop.token),
    );
    assert_eq!(status, 403);
    // A relayed retry: both get a relayed side.
    let (status, retry) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{pair}/retry"),
        Some(&serde_json::json!({"ticket": acc["ticket"]})),
        Some(&alice.token),
    );
    assert_eq!(status, 200, "{retry}");
    assert_ne!(retry["mode"], "direct");
    expect(&mut phone, "retry");
    n.wait_metric("lookup_invites_total{result=\"accepted\"}", |v| v == 1.0);
    n.wait_metric("lookup_invites_total{result=\"answered_elsewhere\"}", |v| {
        v == 1.0
    });
    n.wait_metric("lookup_push_sockets", |v| v == 3.0);
}

#[test]
fn decline_cancel_expiry_offline_delivery_and_bad_credentials() {
    let n = up(&["--invites-per-minute", "6"]);
    let lk = n.lookup;
    let alice = register(lk, "alice", "a");
    let bob = register(lk, "bob", "b");
    let carol = register(lk, "carol", "c");
    let mut a_ws = connect(lk, &alice);
    let invite = |to: &str, lifetime_ms: u64| {
        let (status, v) = call(
            lk,
            "POST",
            "/v1/invitations",
            Some(
                &serde_json::json!({"to": [to], "profile": profile(), "lifetime_ms": lifetime_ms}),
            ),
            Some(&alice.token),
        );
        assert_eq!(status, 202, "{v}");
        (
            v["session"].as_str().unwrap().to_owned(),
            v["invitation"].as_str().unwrap().to_owned(),
        )
    };

    // Bob is offline: the invite waits in his mailbox and rings when he
    // connects.
    let (sid, invitation) = invite("bob", 60_000);
    let mut b_ws = connect(lk, &bob);
    assert_eq!(expect(&mut b_ws, "invite")["body"]["session"], sid.as_str());
    // Carol was not invited.
    let accept = serde_json::json!({"invitation": invitation, "profile": profile()});
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/accept"),
        Some(&accept),
        Some(&carol.token),
    );
    assert_eq!(status, 403);
    // Bob declines; Alice hears it.
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/decline"),
        Some(&serde_json::json!({"invitation": invitation, "reason": "busy"})),
        Some(&bob.token),
    );
    assert_eq!(status, 204);
    assert_eq!(expect(&mut a_ws, "declined")["body"]["reason"], "busy");

    // Alice cancels a ringing invite: Bob's ringing stops; only the
    // inviter may cancel.
    let (sid2, inv2) = invite("bob", 60_000);
    expect(&mut b_ws, "invite");
    let cancel = serde_json::json!({"invitation": inv2, "reason": "caller"});
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid2}/cancel"),
        Some(&cancel),
        Some(&bob.token),
    );
    assert_eq!(status, 403);
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid2}/cancel"),
        Some(&cancel),
        Some(&alice.token),
    );
    assert_eq!(status, 204);
    assert_eq!(expect(&mut b_ws, "cancelled")["body"]["reason"], "caller");

    // A late accept gets 410; an invitation for another session 400.
    let (sid3, inv3) = invite("bob", 300);
    std::thread::sleep(Duration::from_millis(500));
    let late = serde_json::json!({"invitation": inv3, "profile": profile()});
    let (status, p) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid3}/accept"),
        Some(&late),
        Some(&bob.token),
    );
    assert_eq!(status, 410, "{p}");
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/accept"),
        Some(&late),
        Some(&bob.token),
    );
    assert_eq!(status, 400);

    // Forged and foreign credentials.
    let forged = bob.token.replace(&bob.id, &carol.id);
    let (status, p) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/accept"),
        Some(&accept),
        Some(&forged),
    );
    assert_eq!(status, 401, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("forged"), "{p}");
    let (status, _) = call(
        lk,
        "POST",
        "/v1/devices",
        Some(&serde_json::json!({
        "handle": "mallory", "grant": register_grant("alice"),
        "public_key": B64.encode(keypair().public_key().as_ref()), "push": {"kind": "ws"}})),
        None,
    );
    assert_eq!(status, 403, "a grant for another handle");
    let (status, _) = call(
        lk,
        "POST",
        "/v1/devices",
        Some(&serde_json::json!({
        "handle": "mallory", "public_key": B64.encode([0u8; 32]), "push": {"kind": "ws"}})),
        None,
    );
    assert_eq!(status, 401, "no grant");
    let (status, _) = call(
        lk,
        "POST",
        "/v1/devices",
        Some(&serde_json::json!({"handle": 1})),
        None,
    );
    assert_eq!(status, 400);
    // Oversized bodies are refused before they are parsed; info over 1 KiB
    // is refused by the handler (neither counts against the spam limit).
    let huge = serde_json::json!({"to": ["bob"], "profile": profile(), "info": "x".repeat(20_000)});
    let (status, _) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(&huge),
        Some(&alice.token),
    );
    assert_eq!(status, 413);
    let big_info =
        serde_json::json!({"to": ["bob"], "profile": profile(), "info": "x".repeat(2_000)});
    let (status, _) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(&big_info),
        Some(&alice.token),
    );
    assert_eq!(status, 400, "info over 1 KiB");

    // The spam limit (6 a minute; three sent above).
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            call(
                lk,
                "POST",
                "/v1/invitations",
                Some(&serde_json::json!({"to": ["carol"], "profile": profile()})),
                Some(&alice.token),
            )
            .0,
        );
    }
    assert_eq!(statuses, [202, 202, 202, 429]);

    // Token refresh with the device key; unregistering revokes at once.
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = carol
        .key
        .sign(natrix_signal::refresh_message(ts, &carol.id).as_bytes());
    let (status, fresh) = call(
        lk,
        "POST",
        &format!("/v1/devices/{}/token", carol.id),
        Some(&serde_json::json!({"ts": ts, "sig": B64.encode(sig.as_ref())})),
        None,
    );
    assert_eq!(status, 200, "{fresh}");
    let wrong = bob
        .key
        .sign(natrix_signal::refresh_message(ts, &carol.id).as_bytes());
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/devices/{}/token", carol.id),
        Some(&serde_json::json!({"ts": ts, "sig": B64.encode(wrong.as_ref())})),
        None,
    );
    assert_eq!(status, 401, "another device's key");
    let (status, _) = call(
        lk,
        "DELETE",
        &format!("/v1/devices/{}", carol.id),
        None,
        Some(fresh["device_token"].as_str().unwrap()),
    );
    assert_eq!(status, 204);
    let (status, p) = call(lk, "GET", "/v1/push/pending", None, Some(&carol.token));
    assert_eq!(status, 401, "{p}");
    n.wait_metric("lookup_device_auth_refused_total", |v| v >= 2.0);
}

/// The test push service (`tests/support/push_endpoint.py`): its process,
/// its first line (port, the user agent's p256dh and auth) and its log.
struct PushService {
    child: std::process::Child,
    port: u16,
    p256dh: String,
    auth: String,
    log: std::path::PathBuf,
}

impl Drop for PushService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PushService {
    fn start(hook_secret: &str) -> PushService {
        use std::io::BufRead as _;
        let log = std::env::temp_dir().join(format!(
            "natrix-push-{}-{}.jsonl",
            std::process::id(),
            common::free_port()
        ));
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/push_endpoint.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(&log)
            .env("HOOK_SECRET", hook_secret)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!("the push service did not start (pip install http_ece cryptography): {line:?}")
        });
        PushService {
            child,
            port: v["port"].as_u64().unwrap() as u16,
            p256dh: v["p256dh"].as_str().unwrap().to_owned(),
            auth: v["auth"].as_str().unwrap().to_owned(),
            log,
        }
    }

    /// The records the service logged, once there are `n` (5 s at most).
    fn records(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} pushes arrived: {text}",
                lines.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn register_route(lookup: SocketAddr, handle: &str, push: serde_json::Value) -> Device {
    let key = keypair();
    let body = serde_json::json!({
        "handle": handle, "grant": register_grant(handle),
        "public_key": B64.encode(key.public_key().as_ref()), "push": push,
    });
    let (status, v) = call(lookup, "POST", "/v1/devices", Some(&body), None);
    assert_eq!(status, 201, "{v}");
    Device {
        id: v["device_id"].as_str().unwrap().to_owned(),
        token: v["device_token"].as_str().unwrap().to_owned(),
        key,
    }
}

/// A device without a socket is woken: by Web Push, encrypted (RFC 8291)
/// and signed (VAPID) so that Python's http_ece decrypts the invite and
/// cryptography verifies the signature; by a webhook signed with the
/// operator's secret; an expired subscription (410) is counted as gone.
/// A device holding a socket is not woken.
#[test]
fn devices_without_a_socket_are_woken_by_web_push_or_the_webhook() {
    let svc = PushService::start("hook-secret-for-tests");
    let hook = format!("http://127.0.0.1:{}/hook", svc.port);
    let n = up(&[
        "--push-webhook-url",
        &hook,
        "--push-webhook-secret",
        "hook-secret-for-tests",
    ]);
    let lk = n.lookup;
    let alice = register(lk, "alice", "a");
    let endpoint = format!("http://127.0.0.1:{}/push/sub-1", svc.port);
    let browser = register_route(
        lk,
        "bob",
        serde_json::json!({"kind": "webpush", "endpoint": endpoint, "p256dh": svc.p256dh, "auth": svc.auth}),
    );
    let phone = register_route(
        lk,
        "bob",
        serde_json::json!({"kind": "webhook", "token": "apns-token-1"}),
    );
    let stale = register_route(
        lk,
        "bob",
        serde_json::json!({"kind": "webpush", "endpoint": format!("http://127.0.0.1:{}/gone/x", svc.port), "p256dh": svc.p256dh, "auth": svc.auth}),
    );
    let online = register(lk, "bob", "online");
    let mut online_ws = connect(lk, &online);
    let (status, vapid) = call(lk, "GET", "/v1/push/vapid", None, None);
    assert_eq!(status, 200);
    assert_eq!(
        B64.decode(vapid["public_key"].as_str().unwrap())
            .unwrap()
            .len(),
        65
    );

    let (status, inv) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(&serde_json::json!({"to": ["bob"], "profile": profile()})),
        Some(&alice.token),
    );
    assert_eq!(status, 202, "{inv}");
    let sid = inv["session"].as_str().unwrap();
    let woken: Vec<&str> = inv["delivered"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["status"] == "woken")
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(woken.len(), 3, "{inv}");
    assert!(
        !woken.contains(&online.id.as_str()),
        "a device with a socket is not woken"
    );
    expect(&mut online_ws, "invite");

    let records = svc.records(3);
    let push = records.iter().find(|r| r["path"] == "/push/sub-1").unwrap();
    assert!(
        push["error"].is_null(),
        "http_ece could not decrypt: {push}"
    );
    assert_eq!(push["vapid_ok"], true, "{push}");
    assert_eq!(push["encoding"], "aes128gcm");
    assert_eq!(push["urgency"], "high");
    assert_eq!(push["payload"]["type"], "invite");
    assert_eq!(push["payload"]["body"]["session"], sid);
    assert!(push["ttl"].as_str().unwrap().parse::<u64>().unwrap() <= 60);
    let hook = records.iter().find(|r| r["path"] == "/hook").unwrap();
    assert_eq!(hook["signature_ok"], true, "{hook}");
    assert_eq!(hook["payload"]["token"], "apns-token-1");
    assert_eq!(hook["payload"]["device"], phone.id.as_str());
    // The woken browser drains its mailbox over HTTP.
    let (status, pending) = call(lk, "GET", "/v1/push/pending", None, Some(&browser.token));
    assert_eq!(status, 200);
    assert_eq!(pending["frames"][0]["body"]["session"], sid);
    let id = pending["frames"][0]["id"].clone();
    let (status, _) = call(
        lk,
        "POST",
        "/v1/push/ack",
        Some(&serde_json::json!({"ids": [id]})),
        Some(&browser.token),
    );
    assert_eq!(status, 204);
    let (_, pending) = call(lk, "GET", "/v1/push/pending", None, Some(&browser.token));
    assert!(
        pending["frames"].as_array().unwrap().is_empty(),
        "{pending}"
    );
    n.wait_metric(
        "lookup_push_wakes_total{result=\"sent\",route=\"webpush\"}",
        |v| v == 1.0,
    );
    n.wait_metric(
        "lookup_push_wakes_total{result=\"gone\",route=\"webpush\"}",
        |v| v == 1.0,
    );
    n.wait_metric(
        "lookup_push_wakes_total{result=\"sent\",route=\"webhook\"}",
        |v| v == 1.0,
    );
    let _ = stale;
}

/// A draining replica sends its devices elsewhere: SIGTERM → every socket
/// gets a `reconnect` frame with a random delay, then a 1012 close.
#[test]
fn a_draining_replica_tells_its_sockets_to_reconnect() {
    let mut n = up(&["--drain-timeout", "3s"]);
    let lk = n.lookup;
    let d = register(lk, "dora", "d");
    let mut ws = connect(lk, &d);
    // SAFETY: a signal to the natrix process this test started.
    assert_eq!(unsafe { libc::kill(n.pid(), libc::SIGTERM) }, 0);
    let frame = expect(&mut ws, "reconnect");
    let after = frame["body"]["after_ms"].as_u64().unwrap();
    assert!(after < 5000, "{frame}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        assert!(Instant::now() < deadline, "no close frame");
        match ws.read() {
            Ok(Message::Close(Some(c))) => break u16::from(c.code),
            Ok(_) => {}
            Err(tungstenite::Error::Io(_)) => {}
            Err(e) => panic!("socket: {e}"),
        }
    };
    assert_eq!(code, 1012);
    let _ = n.wait_exit(Duration::from_secs(20));
}

fn close_code(ws: &mut Socket) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(
            Instant::now() < deadline,
            "the server never closed the socket"
        );
        match ws.read() {
            Ok(Message::Close(Some(c))) => return u16::from(c.code),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::Io(_)) | Err(tungstenite::Error::ConnectionClosed) => {
                return 1006;
            }
            Err(e) => panic!("socket: {e}"),
        }
    }
}

/// A raw handshake on a new connection; the server's answer up to `want`
/// bytes or the end of the stream, and the stream.
fn raw_upgrade(lookup: SocketAddr, path: &str, want: usize) -> (Vec<u8>, TcpStream) {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(lookup).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: natrix\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n")
            && got.starts_with(b"HTTP/1.1 101")
        {
            got.truncate(end + 4);
            break;
        }
    }
    (got, s)
}

/// A socket flooding the server, sending a frame over 4 KiB or a frame RFC
/// 6455 forbids is closed with its code and counted; a socket without a
/// valid token never opens; a device holds 4 sockets and a replica
/// `--max-push-sockets`; the other devices' sockets keep working.
#[test]
fn websocket_floods_and_oversized_frames_are_closed_and_others_keep_ringing() {
    use std::io::{Read as _, Write as _};
    let n = up(&["--max-push-sockets", "6"]);
    let lk = n.lookup;
    let alice = register(lk, "alice", "a");
    let bob = register(lk, "bob", "b");
    let mallory = register(lk, "mallory", "m");
    let mut b_ws = connect(lk, &bob);
    let mut flood = connect(lk, &mallory);
    for i in 0..200 {
        if flood
            .send(Message::text(format!("{{\"ack\":\"{i}\"}}")))
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut flood), 1008);
    let mut big = connect(lk, &mallory);
    let _ = big.send(Message::text("x".repeat(5000)));
    assert_eq!(close_code(&mut big), 1009);
    // An unmasked client frame: 1002, with the accept key RFC 6455 gives.
    let (head, mut raw) = raw_upgrade(lk, &format!("/v1/push?token={}", mallory.token), 4096);
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    raw.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    let mut close = [0u8; 4];
    raw.read_exact(&mut close).unwrap();
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002);
    // Not a WebSocket: 426; another path: 404.
    let (status, _) = call(lk, "GET", "/v1/push", None, Some(&bob.token));
    assert_eq!(status, 426);
    let (other, _) = raw_upgrade(lk, "/v1/plan", 4096);
    assert!(
        other.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&other)
    );
    // Without a valid token: a 401, no socket.
    let stream = TcpStream::connect(lk).unwrap();
    let forged = format!(
        "ws://{lk}/v1/push?token={}",
        bob.token.replace(".v", ".x") + "x"
    );
    assert!(tungstenite::client(forged.as_str(), stream).is_err());
    // Bob still rings.
    let (status, _) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(&serde_json::json!({"to": ["bob"], "profile": profile()})),
        Some(&alice.token),
    );
    assert_eq!(status, 202);
    expect(&mut b_ws, "invite");
    // The closed sockets are gone once their clients hang up.
    drop((flood, big, raw));
    n.wait_metric("lookup_push_sockets", |v| v == 1.0);
    // A device holds at most 4 sockets.
    let _held: Vec<Socket> = (0..4).map(|_| connect(lk, &alice)).collect();
    let stream = TcpStream::connect(lk).unwrap();
    let fifth = format!("ws://{lk}/v1/push?token={}", alice.token);
    assert!(tungstenite::client(fifth.as_str(), stream).is_err());
    n.wait_metric(
        "lookup_push_sockets_closed_total{reason=\"too_many\"}",
        |v| v == 1.0,
    );
    n.wait_metric("lookup_push_sockets_closed_total{reason=\"flood\"}", |v| {
        v == 1.0
    });
    n.wait_metric(
        "lookup_push_sockets_closed_total{reason=\"protocol\"}",
        |v| v == 2.0,
    );
    // Bob's second socket is the replica's sixth; Mallory's is one too many.
    let _b2 = connect(lk, &bob);
    n.wait_metric("lookup_push_sockets", |v| v == 6.0);
    let (full, _) = raw_upgrade(lk, &format!("/v1/push?token={}", mallory.token), 4096);
    let full = String::from_utf8_lossy(&full).to_lowercase();
    assert!(full.starts_with("http/1.1 503"), "{full}");
    assert!(full.contains("retry-after: 5"), "{full}");
    n.wait_metric(
        "lookup_push_sockets_closed_total{reason=\"replica_full\"}",
        |v| v == 1.0,
    );
}

/// Two lookup replicas on one Redis: a device whose socket is on the other
/// replica rings (the notify channel routes the frame); when its replica
/// dies mid-ring, the device reconnects to the survivor and its mailbox
/// still rings it.
#[test]
fn a_replica_killed_mid_ring_loses_no_invitation() {
    use natrix_store::testing::RedisServer;
    let redis = RedisServer::start();
    let url = redis.url();
    let replica = || {
        Natrix::lookup(&[
            "--redis-url",
            &url,
            "--auth-secret",
            "k1=signal-test-turn-secret",
            "--cluster-secret",
            "signal-test-cluster-secret",
            "--grant-secret",
            GRANT_SECRET,
        ])
    };
    let _relay = Natrix::relay(&[
        "--redis-url",
        &url,
        "--auth-secret",
        "k1=signal-test-turn-secret",
    ]);
    let _cdx = Natrix::cdx(&[
        "--redis-url",
        &url,
        "--cluster-secret",
        "signal-test-cluster-secret",
    ]);
    let (mut one, two) = (replica(), replica());
    let alice = register(two.lookup, "alice", "a");
    let bob = register(one.lookup, "bob", "b");
    let mut b_ws = connect(one.lookup, &bob);
    let invite = || {
        let (status, v) = call(
            two.lookup,
            "POST",
            "/v1/invitations",
            Some(&serde_json::json!({"to": ["bob"], "profile": profile()})),
            Some(&alice.token),
        );
        assert_eq!(status, 202, "{v}");
        v["session"].as_str().unwrap().to_owned()
    };
    // Across replicas.
    let first = invite();
    assert_eq!(
        expect(&mut b_ws, "invite")["body"]["session"],
        first.as_str()
    );
    // Bob's replica dies; the invite sent meanwhile waits in his mailbox.
    one.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    let second = invite();
    // (Delivery is at least once: the first invite may come again if its
    // acknowledgement died with the replica; devices dedupe by frame id.)
    let mut b_ws = connect(two.lookup, &bob);
    let deadline = Instant::now() + Duration::from_secs(5);
    while expect(&mut b_ws, "invite")["body"]["session"] != second.as_str() {
        assert!(Instant::now() < deadline, "the second invite never rang");
    }
}

/// Redis restarted mid-run (with its append-only file, as the chart runs
/// it): registrations survive, the replica reconnects, and an invitation
/// sent right after still rings the device on its open socket (the live
/// announcement, or the socket's mailbox sweep if the announcement was
/// lost while the subscription came back).
#[test]
fn a_redis_restart_loses_no_registration_and_no_invitation() {
    use natrix_store::testing::RedisServer;
    let mut redis = RedisServer::start_persistent();
    let url = redis.url();
    let n = up(&["--redis-url", &url]);
    let lk = n.lookup;
    let alice = register(lk, "alice", "a");
    let bob = register(lk, "bob", "b");
    let mut b_ws = connect(lk, &bob);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        let (status, v) = call(
            lk,
            "POST",
            "/v1/invitations",
            Some(&serde_json::json!({"to": ["bob"], "profile": profile()})),
            Some(&alice.token),
        );
        if status == 202 {
            break v["session"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no invitation after the restart: {status} {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let deadline = Instant::now() + Duration::from_secs(12);
    while expect_within(&mut b_ws, "invite", Duration::from_secs(12))["body"]["session"]
        != session.as_str()
    {
        assert!(Instant::now() < deadline, "the invitation never rang");
    }
}

/// [`expect`] with a longer patience.
fn expect_within(ws: &mut Socket, kind: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        assert!(
            Instant::now() < deadline,
            "no {kind} frame within {within:?}"
        );
        match ws.read() {
            Ok(Message::Text(t)) => {
                let f: serde_json::Value = serde_json::from_str(&t).unwrap();
                ws.send(Message::text(
                    serde_json::json!({"ack": f["id"]}).to_string(),
                ))
                .unwrap();
                if f["type"] == kind {
                    return f;
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("socket: {e}"),
        }
    }
}

/// An invitation to several handles makes a star: the first accept of
/// each handle wins (that handle's other devices stop ringing), and the
/// inviter gets one `accepted`, with its own pair and ticket, per handle.
#[test]
fn inviting_several_handles_pairs_the_inviter_with_each_of_them() {
    let n = up(&[]);
    let lk = n.lookup;
    let alice = register(lk, "alice", "a");
    let bob = register(lk, "bob", "b");
    let bob2 = register(lk, "bob", "b2");
    let carol = register(lk, "carol", "c");
    let mut a_ws = connect(lk, &alice);
    let (status, inv) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(&serde_json::json!({"to": ["bob", "carol"], "profile": profile()})),
        Some(&alice.token),
    );
    assert_eq!(status, 202, "{inv}");
    assert_eq!(inv["delivered"].as_array().unwrap().len(), 3);
    let sid = inv["session"].as_str().unwrap();
    let accept = serde_json::json!({"invitation": inv["invitation"], "profile": profile()});
    let path = format!("/v1/sessions/{sid}/accept");
    let (s1, p1) = call(lk, "POST", &path, Some(&accept), Some(&bob.token));
    let (s2, p2) = call(lk, "POST", &path, Some(&accept), Some(&carol.token));
    let (s3, _) = call(lk, "POST", &path, Some(&accept), Some(&bob2.token));
    assert_eq!((s1, s2, s3), (200, 200, 409));
    assert_ne!(p1["pair"], p2["pair"]);
    let mut pairs = vec![
        expect(&mut a_ws, "accepted")["body"]["pair"].clone(),
        expect(&mut a_ws, "accepted")["body"]["pair"].clone(),
    ];
    pairs.sort_by_key(ToString::to_string);
    let mut want = vec![p1["pair"].clone(), p2["pair"].clone()];
    want.sort_by_key(ToString::to_string);
    assert_eq!(pairs, want);
}

/// A call moves from one of the user's devices to another: the phone in a
/// call hands it over, the laptop rings with a `transfer`, takes it (a new
/// pair and plan with the caller, who gets `transferred` with its side),
/// the phone gets `ended`; a second take loses, another handle's device
/// may not take it, and the old ticket no longer names the laptop's pair.
#[test]
fn a_call_is_transferred_between_a_users_devices() {
    let n = up(&[]);
    let lk = n.lookup;
    let alice = register(lk, "alice", "a");
    let phone = register(lk, "bob", "phone");
    let laptop = register(lk, "bob", "laptop");
    let tablet = register(lk, "bob", "tablet");
    let carol = register(lk, "carol", "c");
    let mut a_ws = connect(lk, &alice);
    let mut phone_ws = connect(lk, &phone);
    let mut laptop_ws = connect(lk, &laptop);
    let (_, inv) = call(
        lk,
        "POST",
        "/v1/invitations",
        Some(&serde_json::json!({"to": ["bob"], "profile": profile()})),
        Some(&alice.token),
    );
    let sid = inv["session"].as_str().unwrap();
    let (status, acc) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{sid}/accept"),
        Some(&serde_json::json!({"invitation": inv["invitation"], "profile": profile()})),
        Some(&phone.token),
    );
    assert_eq!(status, 200, "{acc}");
    expect(&mut a_ws, "accepted");
    let pair = acc["pair"].as_str().unwrap();

    // The phone hands the call over.
    let (status, t) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{pair}/transfer"),
        Some(&serde_json::json!({"ticket": acc["ticket"]})),
        Some(&phone.token),
    );
    assert_eq!(status, 202, "{t}");
    let ring = expect(&mut laptop_ws, "transfer");
    assert_eq!(ring["body"]["peer"]["handle"], "alice");
    let take = serde_json::json!({"transfer": ring["body"]["transfer"], "profile": profile()});
    let path = format!("/v1/sessions/{pair}/take");
    let (status, _) = call(lk, "POST", &path, Some(&take), Some(&carol.token));
    assert_eq!(status, 403, "another handle's device");
    let (status, took) = call(lk, "POST", &path, Some(&take), Some(&laptop.token));
    assert_eq!(status, 200, "{took}");
    assert!(took["plan"]["ice_servers"].is_array());
    assert_ne!(took["pair"], pair);
    let (status, _) = call(lk, "POST", &path, Some(&take), Some(&tablet.token));
    assert_eq!(status, 409, "taken once");
    let moved = expect(&mut a_ws, "transferred");
    assert_eq!(moved["body"]["to"]["device"], laptop.id.as_str());
    assert_eq!(moved["body"]["pair"], took["pair"]);
    let ended = expect(&mut phone_ws, "update");
    assert_eq!(ended["body"]["kind"], "ended");
    assert_eq!(ended["body"]["reason"], "transferred");
    // Alice and the laptop talk through the new ticket.
    let (status, _) = call(
        lk,
        "POST",
        &format!("/v1/sessions/{}/update", took["pair"].as_str().unwrap()),
        Some(
            &serde_json::json!({"ticket": moved["body"]["ticket"], "kind": "app", "sealed": "hi"}),
        ),
        Some(&alice.token),
    );
    assert_eq!(status, 202);
    assert_eq!(expect(&mut laptop_ws, "update")["body"]["sealed"], "hi");
}

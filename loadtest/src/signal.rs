//! `natrix-loadtest signal`: calls through natrix's signalling. Each pair
//! registers two handles (with minted grants, or without under
//! `--open-registration`), opens a push WebSocket per device, then calls in a
//! loop: invite → the callee's socket rings → accept (the callee's plan) →
//! the caller's socket gets `accepted` (its plan) → a sealed `ended` update
//! reaches the callee. Reports invite→ring and accept→accepted percentiles,
//! calls per second, pushes that never came (lost), and refusals by status.
//! `--hold N` also opens N idle sockets and reports the server's memory per
//! held socket (`--pid`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use tungstenite::Message;

use crate::live::live;
use crate::stats::Latency;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Options of `signal`.
#[derive(clap::Args, Debug)]
pub(crate) struct SignalArgs {
    /// lookup's API (signalling runs on it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) lookup: SocketAddr,
    /// The grant secret lookup holds (`key-id=secret`): registration grants
    /// are minted with it. Without it the server must run with
    /// `--open-registration`.
    #[arg(long = "grant-secret")]
    pub(crate) grant_secret: Option<natrix_model::TurnSecret>,
    /// Caller/callee pairs, each calling in a loop on its own thread.
    #[arg(long, value_parser = crate::positive, default_value_t = 8)]
    pub(crate) pairs: usize,
    /// How long to call.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Calls per second over all pairs (open loop) instead of each pair
    /// calling as fast as it is answered.
    #[arg(long, value_parser = crate::positive_f64)]
    pub(crate) rate: Option<f64>,
    /// Devices per callee handle: every one rings, the first accepts, the
    /// others must get `cancelled` (answered elsewhere).
    #[arg(long, value_parser = crate::positive, default_value_t = 1)]
    pub(crate) devices_per_handle: usize,
    /// Share of calls the callee declines (the caller must hear it).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) decline_ratio: f64,
    /// Share of calls during which the callee is offline: its socket closes
    /// before the invite and reconnects after, and the invite must come from
    /// its mailbox.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) offline_ratio: f64,
    /// Idle push sockets to hold besides the pairs' (memory per socket).
    #[arg(long, default_value_t = 0)]
    pub(crate) hold: usize,
    /// The server's PID, for its memory before and after the held sockets.
    #[arg(long)]
    pub(crate) pid: Option<u32>,
}

struct Device {
    token: String,
}

fn http(
    lookup: SocketAddr,
    method: &str,
    path: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    crate::e2e::http(lookup, method, path, &text, token)
}

fn register(args: &SignalArgs, handle: &str) -> anyhow::Result<Device> {
    Ok(Device {
        token: register_device(args.lookup, args.grant_secret.as_ref(), handle)?,
    })
}

/// Registers a device for `handle` (a grant minted with `grant_secret`, or
/// none for servers in `--open-registration`); its device token.
pub(crate) fn register_device(
    lookup: SocketAddr,
    grant_secret: Option<&natrix_model::TurnSecret>,
    handle: &str,
) -> anyhow::Result<String> {
    let mut key = [0u8; 32];
    rand::fill(&mut key[..]);
    let mut body = serde_json::json!({
        "handle": handle, "public_key": B64.encode(key), "push": {"kind": "ws"}, "label": "loadtest",
    });
    if let Some(secret) = grant_secret {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        body["grant"] = natrix_model::grant::mint(
            secret,
            &natrix_model::grant::Claims {
                aud: natrix_model::grant::AUDIENCE.into(),
                sub: handle.into(),
                exp: now + 600,
                iat: Some(now),
                nbf: None,
                scope: "register".into(),
                dev: None,
            },
        )
        .into();
    }
    let (status, v) = http(lookup, "POST", "/v1/devices", &body, None)?;
    anyhow::ensure!(status == 201, "registering {handle}: {status} {v}");
    Ok(v["device_token"].as_str().context("no token")?.to_owned())
}

/// A pair's plan through invitations instead of `/v1/plan`: two devices
/// register, A invites with `pa`, B accepts (its side in the answer) with
/// `pb`, A's side comes from its mailbox. The same shape as a plan:
/// `{mode, a, b}`.
pub(crate) fn plan_by_invitation(
    lookup: SocketAddr,
    grant_secret: Option<&natrix_model::TurnSecret>,
    pa: &serde_json::Value,
    pb: &serde_json::Value,
    retry: bool,
) -> anyhow::Result<serde_json::Value> {
    let run = rand::random::<u64>();
    let (ha, hb) = (format!("lab-{run:016x}-a"), format!("lab-{run:016x}-b"));
    let a = register_device(lookup, grant_secret, &ha)?;
    let b = register_device(lookup, grant_secret, &hb)?;
    let (status, inv) = http(
        lookup,
        "POST",
        "/v1/invitations",
        &serde_json::json!({"to": [hb], "profile": pa}),
        Some(&a),
    )?;
    anyhow::ensure!(status == 202, "invite: {status} {inv}");
    let session = inv["session"].as_str().context("no session")?.to_owned();
    let frame = |token: &str, kind: &str| -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (status, p) = http(
                lookup,
                "GET",
                "/v1/push/pending",
                &serde_json::Value::Null,
                Some(token),
            )?;
            anyhow::ensure!(status == 200, "pending: {status} {p}");
            if let Some(f) = p["frames"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|f| f["type"] == kind && f["body"]["session"] == session.as_str())
            {
                return Ok(f.clone());
            }
            anyhow::ensure!(Instant::now() < deadline, "no {kind} frame");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let ring = frame(&b, "invite")?;
    let (status, acc) = http(
        lookup,
        "POST",
        &format!("/v1/sessions/{session}/accept"),
        &serde_json::json!({"invitation": ring["body"]["invitation"], "profile": pb, "retry": retry}),
        Some(&b),
    )?;
    anyhow::ensure!(status == 200, "accept: {status} {acc}");
    let accepted = frame(&a, "accepted")?;
    Ok(serde_json::json!({
        "mode": acc["mode"], "a": accepted["body"]["plan"], "b": acc["plan"],
    }))
}

pub(crate) type Socket = tungstenite::WebSocket<TcpStream>;

fn connect(lookup: SocketAddr, d: &Device) -> anyhow::Result<Socket> {
    let stream = TcpStream::connect_timeout(&lookup, Duration::from_secs(3))?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{lookup}/v1/push?token={}", d.token);
    let (ws, _) = tungstenite::client(url.as_str(), stream).context("WebSocket handshake")?;
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(ws)
}

/// Waits for a frame of `kind` for `session` on `ws` (acknowledging every
/// frame) until `deadline`; an error when the socket closed.
fn wait(
    ws: &mut Socket,
    kind: &str,
    session: &str,
    deadline: Instant,
) -> anyhow::Result<Option<serde_json::Value>> {
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let Ok(f) = serde_json::from_str::<serde_json::Value>(&t) else {
                    continue;
                };
                let _ = ws.send(Message::text(
                    serde_json::json!({"ack": f["id"]}).to_string(),
                ));
                if f["type"] == kind && f["body"]["session"] == session {
                    return Ok(Some(f));
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => anyhow::bail!("the push socket closed: {e}"),
        }
    }
    Ok(None)
}

#[derive(Default)]
struct Tally {
    calls: u64,
    declined: u64,
    offline_rang: u64,
    others_cancelled: u64,
    ring: Latency,
    accepted: Latency,
    lost: u64,
    refused: BTreeMap<String, u64>,
}

fn pair(args: &SignalArgs, i: usize, started: Instant, tally: &Mutex<Tally>) -> anyhow::Result<()> {
    let run = rand::random::<u32>();
    let (a_handle, b_handle) = (format!("lt-{run:08x}-{i}-a"), format!("lt-{run:08x}-{i}-b"));
    let a = register(args, &a_handle)?;
    let bs = (0..args.devices_per_handle)
        .map(|_| register(args, &b_handle))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut a_ws = connect(args.lookup, &a)?;
    let mut b_ws = bs
        .iter()
        .map(|b| connect(args.lookup, b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let profile = serde_json::json!({"class": "open"});
    let deadline = started + args.duration;
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.pairs as f64 / r));
    let mut next = Instant::now();
    let count = |f: &dyn Fn(&mut Tally)| f(&mut tally.lock().unwrap_or_else(|e| e.into_inner()));
    while Instant::now() < deadline && !crate::live::stopped() {
        if let Some(gap) = interval {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += gap;
        }
        let refuse = |kind: String| count(&|t| *t.refused.entry(kind.clone()).or_default() += 1);
        let offline = rand::random::<f64>() < args.offline_ratio;
        if offline {
            // The answering device goes away before the invite.
            let _ = b_ws[0].close(None);
            let _ = b_ws[0].flush();
        }
        let t0 = Instant::now();
        live().sent(1);
        let (status, inv) = http(
            args.lookup,
            "POST",
            "/v1/invitations",
            &serde_json::json!({"to": [b_handle], "profile": profile}),
            Some(&a.token),
        )?;
        if offline {
            b_ws[0] = connect(args.lookup, &bs[0])?;
        }
        if status != 202 {
            refuse(format!("invite {status}"));
            continue;
        }
        let session = inv["session"].as_str().unwrap_or("").to_owned();
        let ring_by = t0 + Duration::from_secs(5);
        let Some(ring) = wait(&mut b_ws[0], "invite", &session, ring_by)? else {
            count(&|t| t.lost += 1);
            continue;
        };
        let rung = t0.elapsed();
        for other in b_ws.iter_mut().skip(1) {
            if wait(other, "invite", &session, ring_by)?.is_none() {
                count(&|t| t.lost += 1);
            }
        }
        if offline {
            count(&|t| t.offline_rang += 1);
        }
        if rand::random::<f64>() < args.decline_ratio {
            let (status, _) = http(
                args.lookup,
                "POST",
                &format!("/v1/sessions/{session}/decline"),
                &serde_json::json!({"invitation": ring["body"]["invitation"], "reason": "busy"}),
                Some(&bs[0].token),
            )?;
            if status != 204 {
                refuse(format!("decline {status}"));
            } else if wait(
                &mut a_ws,
                "declined",
                &session,
                Instant::now() + Duration::from_secs(5),
            )?
            .is_none()
            {
                count(&|t| t.lost += 1);
            } else {
                live().done(1);
                count(&|t| t.declined += 1);
            }
            continue;
        }
        let t1 = Instant::now();
        let (status, acc) = http(
            args.lookup,
            "POST",
            &format!("/v1/sessions/{session}/accept"),
            &serde_json::json!({"invitation": ring["body"]["invitation"], "profile": profile}),
            Some(&bs[0].token),
        )?;
        if status != 200 {
            refuse(format!("accept {status}"));
            continue;
        }
        let Some(_) = wait(&mut a_ws, "accepted", &session, t1 + Duration::from_secs(5))? else {
            count(&|t| t.lost += 1);
            continue;
        };
        let answered = t1.elapsed();
        for other in b_ws.iter_mut().skip(1) {
            match wait(other, "cancelled", &session, t1 + Duration::from_secs(5))? {
                Some(_) => count(&|t| t.others_cancelled += 1),
                None => count(&|t| t.lost += 1),
            }
        }
        // The caller hangs up through the pair's ticket.
        let pair = acc["pair"].as_str().unwrap_or("");
        let _ = http(
            args.lookup,
            "POST",
            &format!("/v1/sessions/{pair}/update"),
            &serde_json::json!({"ticket": acc["ticket"], "kind": "ended", "sealed": "bye"}),
            Some(&a.token),
        );
        live().done(1);
        count(&|t| {
            t.calls += 1;
            t.ring.record(rung);
            t.accepted.record(answered);
        });
    }
    Ok(())
}

/// Registers `n` devices, then opens an idle socket for each; the server's
/// RSS growth per registration and per socket, then rings each socket once
/// ([`ring_held`]).
fn hold(args: &SignalArgs) -> anyhow::Result<serde_json::Value> {
    let rss = || args.pid.and_then(crate::process::process_rss_bytes);
    let before = rss();
    let run = rand::random::<u32>();
    let devices = (0..args.hold)
        .map(|i| register(args, &format!("hold-{run:08x}-{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let registered = rss();
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(args.hold);
    for (i, d) in devices.iter().enumerate() {
        sockets.push(connect(args.lookup, d).with_context(|| format!("socket {i}"))?);
    }
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = rss();
    let per = |a: Option<u64>, b: Option<u64>| {
        a.zip(b)
            .map(|(a, b)| b.saturating_sub(a) as f64 / args.hold.max(1) as f64)
    };
    let delivery = ring_held(args, run, &mut sockets)?;
    let mut report = serde_json::json!({
        "held_sockets": sockets.len(),
        "open_seconds": opened.as_secs_f64(),
        "server_rss_before_bytes": before,
        "server_rss_registered_bytes": registered,
        "server_rss_after_bytes": after,
        "server_bytes_per_registration": per(before, registered),
        "server_bytes_per_socket": per(registered, after),
    });
    if let (Some(r), serde_json::Value::Object(d)) = (report.as_object_mut(), delivery) {
        r.extend(d);
    }
    Ok(report)
}

/// Invitations a caller sends at once (lookup's limit per invitation).
const INVITEES: usize = 8;

/// Rings every held socket once: a caller invites the held devices eight
/// handles at a time, and each socket must show its `invite` frame. Pushes
/// delivered, lost (no frame within 3 s), refused invitations (the server's
/// `--invites-per-minute` binds one caller: raise it for large runs), the
/// time from the invitation's answer to the frame, and pushes a second.
fn ring_held(
    args: &SignalArgs,
    run: u32,
    sockets: &mut [Socket],
) -> anyhow::Result<serde_json::Value> {
    let caller = register(args, &format!("hold-{run:08x}-caller"))?;
    for s in sockets.iter() {
        s.get_ref().set_nonblocking(true)?;
    }
    let (mut delivered, mut lost, mut refused) = (0u64, 0u64, 0u64);
    let mut latency = Latency::new();
    let started = Instant::now();
    let indexes: Vec<usize> = (0..sockets.len()).collect();
    for chunk in indexes.chunks(INVITEES) {
        let to: Vec<String> = chunk
            .iter()
            .map(|i| format!("hold-{run:08x}-{i}"))
            .collect();
        let body = serde_json::json!({"to": to, "profile": {"class": "open"}});
        let (status, _) = http(
            args.lookup,
            "POST",
            "/v1/invitations",
            &body,
            Some(&caller.token),
        )?;
        if status != 202 {
            refused += chunk.len() as u64;
            continue;
        }
        let sent = Instant::now();
        let mut waiting: Vec<usize> = chunk.to_vec();
        while !waiting.is_empty() && sent.elapsed() < Duration::from_secs(3) {
            waiting.retain(|&i| {
                let rang = match sockets[i].read() {
                    Ok(Message::Text(t)) => t.contains("\"type\":\"invite\""),
                    _ => false,
                };
                if rang {
                    latency.record(sent.elapsed());
                    delivered += 1;
                }
                !rang
            });
            if !waiting.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        lost += waiting.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "held_pushes_delivered": delivered,
        "held_pushes_lost": lost,
        "held_invites_refused": refused,
        "held_push_ms_p50": latency.ms(50.0),
        "held_push_ms_p99": latency.ms(99.0),
        "held_pushes_per_second": delivered as f64 / secs.max(0.001),
    }))
}

pub(crate) fn run(args: &SignalArgs) -> anyhow::Result<serde_json::Value> {
    let held = if args.hold > 0 {
        Some(hold(args)?)
    } else {
        None
    };
    let tally = Mutex::new(Tally::default());
    let started = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.pairs)
            .map(|i| {
                let tally = &tally;
                s.spawn(move || pair(args, i, started, tally))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("a pair thread panicked".into()),
            })
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let t = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    let attempted = t.calls + t.declined + t.lost + t.refused.values().sum::<u64>();
    let mut report = serde_json::json!({
        "scenario": "signal",
        "pairs": args.pairs,
        "calls": t.calls,
        "declined": t.declined,
        "offline_rang": t.offline_rang,
        "other_devices_cancelled": t.others_cancelled,
        "calls_per_second": t.calls as f64 / secs.max(0.001),
        "success_ratio": (t.calls + t.declined) as f64 / attempted.max(1) as f64,
        "lost_pushes": t.lost,
        "ring_ms_p50": t.ring.ms(50.0),
        "ring_ms_p99": t.ring.ms(99.0),
        "accepted_ms_p50": t.accepted.ms(50.0),
        "accepted_ms_p99": t.accepted.ms(99.0),
        "errors": t.refused,
        "phases": {"invite_to_ring": t.ring.json(), "accept_to_accepted": t.accepted.json()},
    });
    if let Some(h) = held {
        report["hold"] = h;
    }
    if !errors.is_empty() {
        report["failure"] = format!("{} pair(s) failed: {}", errors.len(), errors[0]).into();
    }
    Ok(report)
}

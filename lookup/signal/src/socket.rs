//! The push WebSocket: `GET /v1/push?token=<device token>` (browsers cannot
//! set headers on a WebSocket; other clients may send the bearer header).
//! On connect the device's mailbox is drained; then frames arrive as the
//! hub routes them. The device acknowledges each frame with `{"ack": id}`
//! (which removes it from the mailbox); the server pings every 25 s and
//! closes a socket that stays silent for 60 s, and closes (1008) a client
//! that sends more than 20 messages a second beyond one acknowledgement per
//! frame it was sent (1008), frames over 4 KiB (1009) or frames RFC 6455
//! forbids (1002). The WebSocket itself is [`crate::ws`]: a held socket costs
//! a few KB, not the HTTP server's buffers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpMessage as _, HttpResponse, web};
use serde::Deserialize;

use crate::http::{SignalState, authenticate, now_ms, problem};
use crate::push::{self, Attached};
use crate::ws::{Fault, Incoming, WebSocket};

const PING_EVERY: Duration = Duration::from_secs(25);
/// How often a socket re-reads its mailbox: frames whose announcement was
/// lost (a Redis restart, a subscription being re-established) reach the
/// device within this, never later.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SILENT_FOR: Duration = Duration::from_secs(60);
const MAX_CLIENT_FRAME: usize = 4096;
/// Sockets one device may hold on one replica (a reconnect overlaps its old
/// socket for a moment; more is a leak or an attack on memory).
const SOCKETS_PER_DEVICE: usize = 4;
/// Client messages a second (acknowledgements, pongs).
const CLIENT_RATE: f64 = 20.0;

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize)]
struct Ack {
    ack: String,
}

/// `GET /v1/push` without `Upgrade: websocket`.
pub(crate) async fn not_upgraded() -> HttpResponse {
    let mut resp = problem(
        426,
        "upgrade required",
        "the push channel is a WebSocket: connect with Upgrade: websocket",
    );
    resp.headers_mut().insert(
        actix_web::http::header::UPGRADE,
        actix_web::http::header::HeaderValue::from_static("websocket"),
    );
    resp
}

/// Serves lookup's upgraded connections: `GET /v1/push` becomes a push
/// socket, anything else is refused.
pub(crate) fn upgrade(state: Arc<SignalState>) -> natrix_lookup::http::Upgrade {
    Arc::new(move |up| Box::pin(handshake(up, state.clone())))
}

/// Checks the handshake and the device; the refusal, when there is one.
async fn admit(
    head: &actix_http::Request,
    state: &SignalState,
) -> Result<(String, String), HttpResponse> {
    use actix_web::http::header;
    if head.path() != "/v1/push" {
        return Err(problem(404, "not found", "only /v1/push upgrades"));
    }
    if head.method() != actix_web::http::Method::GET {
        return Err(problem(405, "method not allowed", "GET /v1/push"));
    }
    let text = |name: header::HeaderName| {
        head.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let is_websocket = text(header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let key = text(header::SEC_WEBSOCKET_KEY).filter(|k| k.trim().len() == 24);
    let (true, Some(key)) = (is_websocket, key) else {
        return Err(problem(
            400,
            "not a WebSocket handshake",
            "send Upgrade: websocket and a Sec-WebSocket-Key",
        ));
    };
    if text(header::SEC_WEBSOCKET_VERSION).as_deref() != Some("13") {
        let mut resp = problem(
            426,
            "WebSocket version 13 only",
            "Sec-WebSocket-Version: 13",
        );
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
        return Err(resp);
    }
    let query = web::Query::<TokenQuery>::from_query(head.uri().query().unwrap_or(""))
        .map(web::Query::into_inner)
        .ok()
        .and_then(|q| q.token);
    let header = text(header::AUTHORIZATION);
    let token = match (query, natrix_model::apikey::bearer(header.as_deref())) {
        (Some(t), _) => t,
        (None, Ok(t)) => t.to_owned(),
        (None, Err(_)) => {
            return Err(problem(
                401,
                "device token required",
                "connect with ?token=<device token> or Authorization: Bearer",
            ));
        }
    };
    let me = authenticate(&token, state).await.map_err(|r| *r)?.0;
    if state.hub.sockets_of(&me) >= SOCKETS_PER_DEVICE {
        state.metrics.socket_closed("too_many").inc();
        return Err(problem(
            429,
            "too many sockets",
            format!("a device holds at most {SOCKETS_PER_DEVICE} push sockets"),
        ));
    }
    let held = usize::try_from(state.metrics.sockets.get()).unwrap_or(0);
    if held >= state.config.max_push_sockets {
        state.metrics.socket_closed("replica_full").inc();
        let mut resp = problem(
            503,
            "this replica holds all the push sockets it may",
            format!(
                "{held} sockets held (--max-push-sockets): reconnect, another replica may take it"
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return Err(resp);
    }
    Ok((me, crate::ws::accept_key(&key)))
}

async fn handshake(up: natrix_lookup::http::Upgraded, state: Arc<SignalState>) {
    use tokio::io::AsyncWriteExt as _;
    let natrix_lookup::http::Upgraded {
        head,
        mut io,
        buffered,
    } = up;
    let guard = &state.lookup.guard;
    let source = guard.source_of(io.peer_addr().ok(), head.headers());
    if let Some(wait) = guard.throttled(source) {
        state.lookup.metrics.throttled.inc();
        natrix_lookup::http::answer_raw(&mut io, natrix_lookup::http::throttled_response(wait))
            .await;
        return;
    }
    let (me, accept) = match admit(&head, &state).await {
        Ok(admitted) => admitted,
        Err(resp) => {
            if resp.status() == actix_web::http::StatusCode::UNAUTHORIZED {
                guard.refused(source);
            }
            natrix_lookup::http::answer_raw(&mut io, resp).await;
            return;
        }
    };
    drop(head);
    let switching = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    );
    let written =
        tokio::time::timeout(Duration::from_secs(5), io.write_all(switching.as_bytes())).await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let ws = WebSocket::new(io, &buffered, MAX_CLIENT_FRAME);
    drop(buffered);
    let attached = state.hub.attach(&me);
    state.metrics.sockets.inc();
    // The socket outlives the HTTP connection's task (which ends here).
    actix_web::rt::spawn(async move {
        serve(ws, attached, &state, &me).await;
        state.metrics.sockets.dec();
    });
}

/// Sends the mailbox's frames this socket has not sent yet; false when the
/// socket is gone. `sent` keeps only ids still in the mailbox.
async fn sweep(
    ws: &mut WebSocket,
    state: &SignalState,
    me: &str,
    sent: &mut HashSet<String>,
) -> bool {
    let Ok(frames) = push::pending(&state.store, me, now_ms()).await else {
        return true;
    };
    let live: HashSet<&str> = frames.iter().map(|f| f.id.as_str()).collect();
    sent.retain(|id| live.contains(id.as_str()));
    for f in &frames {
        if sent.contains(&f.id) {
            continue;
        }
        let Ok(text) = serde_json::to_string(f) else {
            continue;
        };
        if ws.text(&text).await.is_err() {
            return false;
        }
        sent.insert(f.id.clone());
    }
    true
}

/// How a socket ends.
enum End {
    /// Gone, or unable to take a write: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(Option<u16>, &'static str),
}

async fn serve(mut ws: WebSocket, mut attached: Attached, state: &SignalState, me: &str) {
    let _ = push::hold_route(&state.store, me, state.hub.node()).await;
    // Frame ids this socket sent that may still be in the mailbox.
    let mut sent: HashSet<String> = HashSet::new();
    // What waited while the device was away.
    if !sweep(&mut ws, state, me, &mut sent).await {
        return;
    }
    let mut ping = actix_web::rt::time::interval(PING_EVERY);
    let mut sweeps = actix_web::rt::time::interval(SWEEP_EVERY);
    // Intervals tick at once: the first ping and sweep are one period away.
    ping.tick().await;
    sweeps.tick().await;
    let mut heard = Instant::now();
    let (mut budget, mut refilled) = (CLIENT_RATE * 2.0, Instant::now());
    // A frame may have come with the handshake.
    let mut first = true;
    let end = 'socket: loop {
        tokio::select! {
            f = attached.frames.recv() => {
                let Some(f) = f else { break End::Gone };
                if !sent.insert(f.id.clone()) && !f.id.is_empty() {
                    continue;
                }
                let Ok(text) = serde_json::to_string(&*f) else { continue };
                if ws.text(&text).await.is_err() {
                    break End::Gone;
                }
                if f.kind == push::RECONNECT {
                    break End::Close(Some(1012), "draining: reconnect");
                }
                // Each frame earns the client its acknowledgement.
                budget = (budget + 1.0).min(CLIENT_RATE * 2.0 + push::MAILBOX_FIELDS as f64);
            }
            r = ws.readable(), if !first => {
                if r.is_err() {
                    break End::Gone;
                }
            }
            () = std::future::ready(()), if first => {}
            _ = sweeps.tick() => {
                if !sweep(&mut ws, state, me, &mut sent).await {
                    break End::Gone;
                }
                continue;
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENT_FOR {
                    state.metrics.socket_closed("silent").inc();
                    break End::Close(None, "");
                }
                let _ = push::hold_route(&state.store, me, state.hub.node()).await;
                if ws.ping().await.is_err() {
                    break End::Gone;
                }
                continue;
            }
        }
        first = false;
        let mut messages = Vec::new();
        if let Err(fault) = ws.read_ready(&mut messages) {
            if fault == Fault::Gone {
                break End::Gone;
            }
            state.metrics.socket_closed("protocol").inc();
            break End::Close(fault.close_code(), "bad frame");
        }
        for m in messages {
            heard = Instant::now();
            budget =
                (budget + refilled.elapsed().as_secs_f64() * CLIENT_RATE).min(CLIENT_RATE * 2.0);
            refilled = Instant::now();
            budget -= 1.0;
            if budget < 0.0 {
                state.metrics.socket_closed("flood").inc();
                break 'socket End::Close(Some(1008), "too many messages");
            }
            match m {
                Incoming::Text(t) => {
                    if let Ok(a) = serde_json::from_str::<Ack>(&t) {
                        let _ = push::ack(&state.store, me, &a.ack).await;
                    }
                }
                Incoming::Ping(b) => {
                    if ws.pong(&b).await.is_err() {
                        break 'socket End::Gone;
                    }
                }
                Incoming::Close(code) => {
                    // Echo the client's code (RFC 6455 section 5.5.1).
                    break 'socket End::Close(code.or(Some(1000)), "");
                }
                Incoming::Binary | Incoming::Pong => {}
            }
        }
    };
    if let End::Close(code, reason) = end {
        ws.close(code, reason).await;
    }
    // Only now: a draining replica waits for its sockets' goodbyes.
    drop(attached);
    if state.hub.sockets_of(me) == 0 {
        let _ = push::drop_route(&state.store, me).await;
    }
}

//! The push WebSocket: `GET /v1/push?token=<device token>` (browsers cannot
//! set headers on a WebSocket; other clients may send the bearer header).
//! On connect the device's mailbox is drained; then frames arrive as the
//! hub routes them. The device acknowledges each frame with `{"ack": id}`
//! (which removes it from the mailbox); the server pings every 25 s and
//! closes a socket that stays silent for 60 s, and closes (1008) a client
//! that sends more than 20 messages a second beyond one acknowledgement per
//! frame it was sent, or frames over 4 KiB.

use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::Message;
use futures_util::StreamExt as _;
use serde::Deserialize;

use crate::http::{SignalState, authenticate, now_ms, problem};
use crate::push::{self, Attached};

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
pub(crate) struct TokenQuery {
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize)]
struct Ack {
    ack: String,
}

pub(crate) async fn connect(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<SignalState>,
    query: web::Query<TokenQuery>,
) -> Result<HttpResponse, actix_web::Error> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = match (query.token.as_deref(), natrix_model::apikey::bearer(header)) {
        (Some(t), _) | (None, Ok(t)) => t.to_owned(),
        (None, Err(_)) => {
            return Ok(problem(
                401,
                "device token required",
                "connect with ?token=<device token> or Authorization: Bearer",
            ));
        }
    };
    let me = match authenticate(&token, &state).await {
        Ok((id, _)) => id,
        Err(resp) => return Ok(*resp),
    };
    if state.hub.sockets_of(&me) >= SOCKETS_PER_DEVICE {
        state.metrics.socket_closed("too_many").inc();
        return Ok(problem(
            429,
            "too many sockets",
            format!("a device holds at most {SOCKETS_PER_DEVICE} push sockets"),
        ));
    }
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream.max_frame_size(MAX_CLIENT_FRAME);
    let attached = state.hub.attach(&me);
    let state = state.into_inner();
    state.metrics.sockets.inc();
    actix_web::rt::spawn(async move {
        serve(session, stream, attached, &state, &me).await;
        state.metrics.sockets.dec();
    });
    Ok(response)
}

/// Sends the mailbox's frames this socket has not sent yet; false when the
/// socket is gone. `sent` keeps only ids still in the mailbox.
async fn sweep(
    session: &mut actix_ws::Session,
    state: &SignalState,
    me: &str,
    sent: &mut std::collections::HashSet<String>,
) -> bool {
    let Ok(frames) = push::pending(&state.store, me, now_ms()).await else {
        return true;
    };
    let live: std::collections::HashSet<&str> = frames.iter().map(|f| f.id.as_str()).collect();
    sent.retain(|id| live.contains(id.as_str()));
    for f in &frames {
        if sent.contains(&f.id) {
            continue;
        }
        let Ok(text) = serde_json::to_string(f) else {
            continue;
        };
        if session.text(text).await.is_err() {
            return false;
        }
        sent.insert(f.id.clone());
    }
    true
}

async fn serve(
    mut session: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
    mut attached: Attached,
    state: &SignalState,
    me: &str,
) {
    let _ = push::hold_route(&state.store, me, state.hub.node()).await;
    // Frame ids this socket sent that may still be in the mailbox.
    let mut sent: std::collections::HashSet<String> = std::collections::HashSet::new();
    // What waited while the device was away.
    if !sweep(&mut session, state, me, &mut sent).await {
        return;
    }
    let mut ping = actix_web::rt::time::interval(PING_EVERY);
    let mut sweeps = actix_web::rt::time::interval(SWEEP_EVERY);
    sweeps.tick().await;
    let mut heard = Instant::now();
    let (mut budget, mut refilled) = (CLIENT_RATE * 2.0, Instant::now());
    let reason = loop {
        tokio::select! {
            f = attached.frames.recv() => {
                let Some(f) = f else { break None };
                if !sent.insert(f.id.clone()) && !f.id.is_empty() {
                    continue;
                }
                let Ok(text) = serde_json::to_string(&*f) else { continue };
                if session.text(text).await.is_err() {
                    return;
                }
                if f.kind == push::RECONNECT {
                    break Some(actix_ws::CloseReason {
                        code: actix_ws::CloseCode::Restart,
                        description: Some("draining: reconnect".into()),
                    });
                }
                // Each frame earns the client its acknowledgement.
                budget = (budget + 1.0).min(CLIENT_RATE * 2.0 + push::MAILBOX_FIELDS as f64);
            }
            m = stream.next() => {
                heard = Instant::now();
                budget = (budget + refilled.elapsed().as_secs_f64() * CLIENT_RATE).min(CLIENT_RATE * 2.0);
                refilled = Instant::now();
                budget -= 1.0;
                if budget < 0.0 {
                    state.metrics.socket_closed("flood").inc();
                    break Some(actix_ws::CloseReason {
                        code: actix_ws::CloseCode::Policy,
                        description: Some("too many messages".into()),
                    });
                }
                match m {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(a) = serde_json::from_str::<Ack>(&t) {
                            let _ = push::ack(&state.store, me, &a.ack).await;
                        }
                    }
                    Some(Ok(Message::Ping(b))) => {
                        if session.pong(&b).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(_)) => {
                        state.metrics.socket_closed("protocol").inc();
                        break Some(actix_ws::CloseReason {
                            code: actix_ws::CloseCode::Policy,
                            description: Some("bad frame".into()),
                        });
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = sweeps.tick() => {
                if !sweep(&mut session, state, me, &mut sent).await {
                    return;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENT_FOR {
                    state.metrics.socket_closed("silent").inc();
                    break None;
                }
                let _ = push::hold_route(&state.store, me, state.hub.node()).await;
                if session.ping(b"").await.is_err() {
                    return;
                }
            }
        }
    };
    let _ = session.close(reason).await;
    drop(attached);
    if state.hub.sockets_of(me) == 0 {
        let _ = push::drop_route(&state.store, me).await;
    }
}

//! The signalling endpoints on lookup's HTTP server.
//!
//! | method, path | who | what |
//! |---|---|---|
//! | `POST /v1/devices` | a grant (scope `register`, `sub` = handle) or open registration | register a device: its Ed25519 key, handle, push route → device id and token |
//! | `POST /v1/devices/{id}/token` | the device key (signature) | a fresh token; extends the registration |
//! | `PUT /v1/devices/{id}/push` | the device | a new push route |
//! | `DELETE /v1/devices/{id}` | the device | unregister |
//! | `GET /v1/push` | the device (`?token=`) | the WebSocket push channel |
//! | `GET /v1/push/pending`, `POST /v1/push/ack` | the device | the mailbox over HTTP |
//! | `POST /v1/invitations` | the inviting device | ring every device of the invitees' handles |
//! | `POST /v1/sessions/{sid}/accept` | an invited device | the plan: its side in the answer, the inviter's pushed |
//! | `POST /v1/sessions/{sid}/decline` | an invited device | tell the inviter |
//! | `POST /v1/sessions/{sid}/cancel` | the inviter | stop the other devices ringing |
//! | `POST /v1/sessions/{pair}/update` | a pair member (ticket) | a sealed message to the peer |
//! | `POST /v1/sessions/{pair}/retry` | a pair member (ticket) | a relayed plan for both |
//! | `POST /v1/sessions/{pair}/transfer` | a pair member (ticket) | ring its handle's other devices to take the call |
//! | `POST /v1/sessions/{pair}/take` | another device of that handle | a new pair and plan with the staying device; the leaving one gets `ended` |
//!
//! Devices authenticate with `Authorization: Bearer <device token>`. Every
//! refusal is an RFC 9457 problem document.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use natrix_lookup::api::{PeerRequest, PlanRequest, SidePlan};
use natrix_lookup::http::LookupState;
use natrix_model::NatProfile;
use natrix_model::apikey::Scope;
use natrix_model::signal::{
    DeviceTokens, Purpose, Sealer, device_id, is_device_id, valid_handle, verify_device_signature,
};
use natrix_store::Store;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::config::{MAX_INVITE_LIFETIME, SignalConfig};
use crate::directory::{self, DeviceRecord, DirError, PushRoute};
use crate::metrics::SignalMetrics;
use crate::push::{self, Frame, Hub};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Largest request body.
const MAX_BODY: usize = 16 * 1024;
/// Most handles one invitation rings.
const MAX_INVITEES: usize = 8;
/// Largest `info` (display name, call kind details) an invite carries.
const MAX_INFO: usize = 1024;
/// Largest sealed update.
const MAX_UPDATE: usize = 4096;
/// Clock skew a refresh signature may have.
const REFRESH_SKEW: u64 = 60;

/// What the signalling handlers share.
#[derive(Clone)]
pub struct SignalState {
    /// The coordination store (directory, mailboxes, notify channel).
    pub store: Store,
    /// Limits.
    pub config: SignalConfig,
    /// lookup's planner state (registry snapshot, minting, grants).
    pub lookup: LookupState,
    /// Seals invitations and tickets.
    pub sealer: Arc<Sealer>,
    /// Mints and verifies device tokens.
    pub tokens: DeviceTokens,
    /// This replica's sockets.
    pub hub: Hub,
    /// Metric handles.
    pub metrics: SignalMetrics,
    /// The VAPID identity Web Push messages are signed with (loaded or
    /// created at start).
    pub vapid: Arc<tokio::sync::OnceCell<crate::wake::Vapid>>,
}

impl std::fmt::Debug for SignalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalState").finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An RFC 9457 problem document.
pub(crate) fn problem(status: u16, title: &str, detail: impl Into<String>) -> HttpResponse {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail.into(),
    });
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
    )
    .content_type("application/problem+json")
    .body(body.to_string())
}

/// A problem document as the error of a step that refuses.
fn refused(status: u16, title: &str, detail: impl Into<String>) -> Box<HttpResponse> {
    Box::new(problem(status, title, detail))
}

fn store_down() -> HttpResponse {
    problem(
        503,
        "coordination store unavailable",
        "the registration directory cannot be read right now; retry shortly",
    )
}

/// The requesting device (still registered) and its parsed body.
async fn authed<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    state: &SignalState,
    body: &[u8],
) -> Result<(String, DeviceRecord, T), Box<HttpResponse>> {
    let (me, record) = device_of(req, state).await?;
    Ok((me, record, parse(body)?))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<HttpResponse>> {
    serde_json::from_slice(body).map_err(|e| Box::new(problem(400, "bad request", e.to_string())))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The device a request's bearer token names, still registered (a
/// revoked device is refused at its next request).
async fn device_of(
    req: &HttpRequest,
    state: &SignalState,
) -> Result<(String, DeviceRecord), Box<HttpResponse>> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = natrix_model::apikey::bearer(header).map_err(|_| {
        problem(
            401,
            "device token required",
            "send Authorization: Bearer <device token>",
        )
    })?;
    authenticate(token, state).await
}

pub(crate) async fn authenticate(
    token: &str,
    state: &SignalState,
) -> Result<(String, DeviceRecord), Box<HttpResponse>> {
    let id = state
        .tokens
        .verify(token, now_ms() / 1000)
        .map_err(|e| {
            state.metrics.auth_refused.inc();
            Box::new(problem(401, "invalid device token", e.to_string()))
        })?
        .to_owned();
    match directory::get(&state.store, &id).await {
        Ok(Some(record)) => Ok((id, record)),
        Ok(None) => {
            state.metrics.auth_refused.inc();
            Err(refused(
                401,
                "device not registered",
                "this device was unregistered or its registration expired: register again",
            ))
        }
        Err(_) => Err(Box::new(store_down())),
    }
}

// ------------------------------------------------------------ devices

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    handle: String,
    #[serde(default)]
    grant: Option<String>,
    public_key: String,
    push: PushRoute,
    #[serde(default)]
    label: String,
}

#[derive(Serialize)]
struct Registered {
    device_id: String,
    device_token: String,
    expires: u64,
    registration_ttl: u64,
}

fn token_for(state: &SignalState, id: &str) -> (String, u64) {
    let expires = now_ms() / 1000 + state.config.device_token_ttl.as_secs();
    (state.tokens.mint(id, expires), expires)
}

async fn register(state: web::Data<SignalState>, body: web::Bytes) -> HttpResponse {
    let r: RegisterRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    if !valid_handle(&r.handle) {
        return problem(
            400,
            "bad handle",
            "a handle is 1 to 128 bytes without control characters",
        );
    }
    let key = match B64.decode(&r.public_key) {
        Ok(k) if k.len() == 32 => k,
        _ => {
            return problem(
                400,
                "bad public key",
                "public_key is a raw Ed25519 key, 32 bytes, base64url",
            );
        }
    };
    if r.label.len() > 64 {
        return problem(400, "bad label", "a label is at most 64 bytes");
    }
    let id = device_id(&key);
    if !state.config.open_registration {
        let Some(grant) = r.grant.as_deref() else {
            state.metrics.registrations("refused").inc();
            return problem(
                401,
                "grant required",
                "registering a handle needs a grant from the application's backend (scope register, sub = the handle)",
            );
        };
        let verified = match state
            .lookup
            .grants
            .verify(grant, Scope::Register, now_ms() / 1000)
        {
            Ok(v) => v,
            Err(e) => {
                state.metrics.registrations("refused").inc();
                return problem(401, "invalid grant", e.to_string());
            }
        };
        if verified.claims.sub != r.handle {
            state.metrics.registrations("refused").inc();
            return problem(
                403,
                "grant for another handle",
                "the grant's sub is not this handle",
            );
        }
        if verified.claims.dev.as_ref().is_some_and(|d| *d != id) {
            state.metrics.registrations("refused").inc();
            return problem(
                403,
                "grant for another device",
                "the grant's dev is not this key's device id",
            );
        }
    }
    let record = DeviceRecord {
        handle: r.handle,
        public_key: r.public_key,
        push: r.push,
        label: r.label,
        created_ms: now_ms(),
    };
    match directory::put(
        &state.store,
        &id,
        &record,
        state.config.registration_ttl,
        state.config.max_devices_per_handle,
        now_ms(),
    )
    .await
    {
        Ok(()) => {}
        Err(DirError::TooManyDevices) => {
            state.metrics.registrations("refused").inc();
            return problem(
                409,
                "too many devices",
                format!(
                    "this handle has its {} devices; unregister one first",
                    state.config.max_devices_per_handle
                ),
            );
        }
        Err(DirError::Store(_)) => return store_down(),
    }
    state.metrics.registrations("registered").inc();
    let (device_token, expires) = token_for(&state, &id);
    HttpResponse::Created().json(Registered {
        device_id: id,
        device_token,
        expires,
        registration_ttl: state.config.registration_ttl.as_secs(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    /// Unix seconds.
    ts: u64,
    /// Ed25519 signature of `natrix-refresh:<ts>:<device id>`, base64url.
    sig: String,
}

/// The message a refresh signs.
pub fn refresh_message(ts: u64, device: &str) -> String {
    format!("natrix-refresh:{ts}:{device}")
}

async fn refresh(
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    let r: RefreshRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    if !is_device_id(&id) {
        return problem(404, "no such device", "not a device id");
    }
    let now = now_ms() / 1000;
    if r.ts.abs_diff(now) > REFRESH_SKEW {
        return problem(
            401,
            "stale signature",
            "ts must be within 60 s of the server's clock",
        );
    }
    let record = match directory::get(&state.store, &id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            // A failed authentication like a bad signature (and counted
            // against its source): probing ids costs a store read each.
            state.metrics.auth_refused.inc();
            return problem(
                401,
                "unknown device",
                "no device is registered with this id: register again",
            );
        }
        Err(_) => return store_down(),
    };
    let (Ok(key), Ok(sig)) = (B64.decode(&record.public_key), B64.decode(&r.sig)) else {
        return problem(400, "bad signature", "sig is base64url");
    };
    if !verify_device_signature(&key, refresh_message(r.ts, &id).as_bytes(), &sig) {
        state.metrics.auth_refused.inc();
        return problem(
            401,
            "bad signature",
            "the signature does not verify with the registered key",
        );
    }
    if let Err(e) = directory::put(
        &state.store,
        &id,
        &record,
        state.config.registration_ttl,
        state.config.max_devices_per_handle,
        now_ms(),
    )
    .await
    {
        return match e {
            DirError::TooManyDevices => problem(409, "too many devices", "the handle is full"),
            DirError::Store(_) => store_down(),
        };
    }
    let (device_token, expires) = token_for(&state, &id);
    HttpResponse::Ok().json(serde_json::json!({"device_token": device_token, "expires": expires}))
}

async fn reroute(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (id, mut record) = match device_of(&req, &state).await {
        Ok(d) => d,
        Err(e) => return *e,
    };
    if id != *path {
        return problem(
            403,
            "another device",
            "a device changes its own push route only",
        );
    }
    record.push = match parse(&body) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    match directory::put(
        &state.store,
        &id,
        &record,
        state.config.registration_ttl,
        state.config.max_devices_per_handle,
        now_ms(),
    )
    .await
    {
        Ok(()) => HttpResponse::NoContent().finish(),
        Err(DirError::TooManyDevices) => problem(409, "too many devices", "the handle is full"),
        Err(DirError::Store(_)) => store_down(),
    }
}

async fn unregister(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
) -> HttpResponse {
    let (id, record) = match device_of(&req, &state).await {
        Ok(d) => d,
        Err(e) => return *e,
    };
    if id != *path {
        return problem(403, "another device", "a device unregisters itself only");
    }
    match directory::remove(&state.store, &id, &record).await {
        Ok(()) => {
            state.metrics.registrations("unregistered").inc();
            HttpResponse::NoContent().finish()
        }
        Err(_) => store_down(),
    }
}

// --------------------------------------------------------- invitations

/// A device in a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    /// Its handle.
    pub handle: String,
    /// Its device id.
    pub device: String,
}

/// What an invitation blob holds (sealed: the invitee cannot read the
/// inviter's profile before accepting).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct InvitationBlob {
    sid: String,
    from: Party,
    to: Vec<String>,
    kind: String,
    profile: NatProfile,
    #[serde(default)]
    region: Option<String>,
    expires_ms: u64,
}

/// What a pair's ticket holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TicketBlob {
    pair: String,
    sid: String,
    a: Party,
    b: Party,
    a_profile: NatProfile,
    b_profile: NatProfile,
    #[serde(default)]
    a_region: Option<String>,
    #[serde(default)]
    b_region: Option<String>,
    expires_ms: u64,
}

fn seal<T: Serialize>(state: &SignalState, purpose: Purpose, v: &T) -> String {
    let json = serde_json::to_vec(v).unwrap_or_default();
    state.sealer.seal(purpose, rand::random(), &json)
}

fn open<T: serde::de::DeserializeOwned>(
    state: &SignalState,
    purpose: Purpose,
    blob: &str,
) -> Option<T> {
    serde_json::from_slice(&state.sealer.open(purpose, blob)?).ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteRequest {
    to: Vec<String>,
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    info: serde_json::Value,
    profile: NatProfile,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    lifetime_ms: Option<u64>,
}

fn default_kind() -> String {
    "call".into()
}

#[derive(Serialize)]
struct Delivered {
    device_id: String,
    handle: String,
    status: &'static str,
}

/// Queues `frame` for `device` and counts the outcome; a device without a
/// socket anywhere is woken through its push route. Its status.
async fn push_to(state: &SignalState, device: &str, frame: &Frame) -> &'static str {
    let sent = push::send(&state.store, device, frame).await;
    let status = match &sent {
        Ok(push::Sent::ToSocket | push::Sent::Queued) => "queued",
        Ok(push::Sent::Full) => "mailbox_full",
        Err(e) => {
            debug!(error = %e, "push: store call failed");
            "error"
        }
    };
    state.metrics.pushes(status).inc();
    if let Ok(push::Sent::Queued) = sent {
        // No socket anywhere: wake the device through its push route.
        wake(state, device, frame).await;
        return "woken";
    }
    status
}

/// Pushes a frame from `make` (one per device: each its own id) to every
/// device of `handle` but those in `skip`; the status each got.
async fn push_to_handle(
    state: &SignalState,
    handle: &str,
    skip: &[&str],
    make: impl Fn() -> Frame,
) -> Result<Vec<Delivered>, natrix_store::StoreError> {
    let mut delivered = Vec::new();
    for device in directory::devices_of(&state.store, handle).await? {
        if skip.contains(&device.as_str()) {
            continue;
        }
        let status = push_to(state, &device, &make()).await;
        delivered.push(Delivered {
            device_id: device,
            handle: handle.to_owned(),
            status,
        });
    }
    Ok(delivered)
}

/// Whether this is the first claim on `key` before `until_ms` (a store
/// counter; true when the store does not answer: failing open).
async fn first_claim(state: &SignalState, key: &str, until_ms: u64) -> bool {
    let left = Duration::from_millis(until_ms.saturating_sub(now_ms())).max(Duration::from_secs(1));
    state.store.add(key, 1, left).await.map_or(true, |n| n <= 1)
}

/// When a ticket minted now expires (Unix ms).
fn ticket_expiry(state: &SignalState) -> u64 {
    now_ms() + u64::try_from(state.config.ticket_ttl.as_millis()).unwrap_or(0)
}

/// Wakes `device` through its push route (off the event loop; counted).
async fn wake(state: &SignalState, device: &str, frame: &Frame) {
    let Ok(Some(record)) = directory::get(&state.store, device).await else {
        return;
    };
    let json = serde_json::to_vec(frame).unwrap_or_default();
    let stub = || {
        serde_json::to_vec(&serde_json::json!({"type": "wake", "id": frame.id})).unwrap_or_default()
    };
    let now = now_ms() / 1000;
    let ttl = Duration::from_millis(frame.expires_ms.saturating_sub(now_ms()));
    let metrics = state.metrics.clone();
    match record.push {
        PushRoute::Ws => {}
        PushRoute::Webpush {
            endpoint,
            p256dh,
            auth,
        } => {
            let vapid = state.vapid.clone();
            let store = state.store.clone();
            let subject = state.config.vapid_subject.clone();
            let configured = state.config.vapid_key.clone();
            let loaded = vapid
                .get_or_try_init(|| async move {
                    crate::wake_keys::load_vapid(&store, configured, &subject)
                        .await
                        .ok_or(())
                })
                .await;
            let Ok(v) = loaded else {
                metrics.wakes("webpush", "failed").inc();
                return;
            };
            let payload = if json.len() <= crate::wake::MAX_WEBPUSH_PLAINTEXT {
                json
            } else {
                stub()
            };
            let topic = frame.topic.clone();
            let auth_header = (v.authorization(&endpoint, now), v.public_key());
            let result = tokio::task::spawn_blocking(move || {
                crate::wake::web_push_with(
                    &auth_header.0,
                    &endpoint,
                    &p256dh,
                    &auth,
                    &payload,
                    ttl,
                    &topic,
                )
            })
            .await
            .unwrap_or(crate::wake::WakeResult::Failed);
            metrics.wakes("webpush", result.label()).inc();
        }
        PushRoute::Webhook { token } => {
            let (Some(url), Some(secret)) = (
                state.config.webhook_url.clone(),
                state.config.webhook_secret.clone(),
            ) else {
                metrics.wakes("webhook", "failed").inc();
                return;
            };
            let body =
                serde_json::json!({"device": device, "token": token, "frame": frame}).to_string();
            let result = tokio::task::spawn_blocking(move || {
                crate::wake::webhook(&url, secret.expose().as_bytes(), body.as_bytes(), now)
            })
            .await
            .unwrap_or(crate::wake::WakeResult::Failed);
            metrics.wakes("webhook", result.label()).inc();
        }
    }
}

fn frame(kind: &str, topic: String, expires_ms: u64, body: serde_json::Value) -> Frame {
    Frame {
        id: format!("{:013}-{}", now_ms(), random_hex(4)),
        kind: kind.into(),
        topic,
        expires_ms,
        body,
    }
}

async fn invite(req: HttpRequest, state: web::Data<SignalState>, body: web::Bytes) -> HttpResponse {
    let (me, record, r) = match authed::<InviteRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    if r.to.is_empty() || r.to.len() > MAX_INVITEES || !r.to.iter().all(|h| valid_handle(h)) {
        return problem(
            400,
            "bad invitees",
            format!("to names 1 to {MAX_INVITEES} handles"),
        );
    }
    if r.info.to_string().len() > MAX_INFO || r.kind.len() > 32 {
        return problem(400, "too large", "info is at most 1 KiB, kind 32 bytes");
    }
    if let Err(e) = r.profile.behaviour() {
        return problem(
            422,
            "impossible profile",
            format!("profile.{}: {}", e.field, e.detail),
        );
    }
    // The spam limit: invitations per device over a sliding minute (fails
    // open when the store does not answer: it is then down for everyone).
    if sent_last_minute(&state.store, &me).await > state.config.invites_per_minute {
        state.metrics.invites("rate_limited").inc();
        let mut resp = problem(
            429,
            "too many invitations",
            format!(
                "a device sends at most {} invitations a minute",
                state.config.invites_per_minute
            ),
        );
        resp.headers_mut().insert(
            actix_web::http::header::RETRY_AFTER,
            actix_web::http::header::HeaderValue::from_static("60"),
        );
        return resp;
    }
    let lifetime = r
        .lifetime_ms
        .map_or(state.config.invite_lifetime, Duration::from_millis)
        .min(MAX_INVITE_LIFETIME);
    let expires_ms = now_ms() + u64::try_from(lifetime.as_millis()).unwrap_or(60_000);
    let sid = random_hex(16);
    let from = Party {
        handle: record.handle.clone(),
        device: me.clone(),
    };
    let blob = InvitationBlob {
        sid: sid.clone(),
        from: from.clone(),
        to: r.to.clone(),
        kind: r.kind.clone(),
        profile: r.profile,
        region: r.region,
        expires_ms,
    };
    let invitation = seal(&state, Purpose::Invitation, &blob);
    let mut delivered = Vec::new();
    for handle in &r.to {
        let make = || {
            frame(
                "invite",
                format!("s:{sid}"),
                expires_ms,
                serde_json::json!({
                    "session": sid, "from": from, "kind": r.kind, "info": r.info,
                    "invitation": invitation, "expires_ms": expires_ms,
                }),
            )
        };
        match push_to_handle(&state, handle, &[&me], make).await {
            Ok(d) => delivered.extend(d),
            Err(_) => return store_down(),
        }
    }
    state
        .metrics
        .invites(if delivered.is_empty() {
            "no_device"
        } else {
            "sent"
        })
        .inc();
    HttpResponse::Accepted().json(serde_json::json!({
        "session": sid, "invitation": invitation, "expires_ms": expires_ms, "delivered": delivered,
    }))
}

/// Counts one more invitation of `device` and returns how many it sent in
/// the last minute: a sliding window over two one-minute counters (this
/// minute's, and the previous one's weighted by how much of it still
/// counts). 0 when the store does not answer.
async fn sent_last_minute(store: &Store, device: &str) -> u64 {
    let now = now_ms();
    let (minute, into) = (now / 60_000, now % 60_000);
    let Ok(current) = store
        .incr(
            &format!("natrix:sig:rl:{device}:{minute}"),
            Duration::from_secs(130),
        )
        .await
    else {
        return 0;
    };
    let previous = store
        .get(&format!(
            "natrix:sig:rl:{device}:{}",
            minute.wrapping_sub(1)
        ))
        .await
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let weight = (60_000 - into) as f64 / 60_000.0;
    current + (previous as f64 * weight).ceil() as u64
}

/// Opens an invitation for session `sid`: the blob, or the answer to give.
fn opened_invitation(
    state: &SignalState,
    sid: &str,
    blob: &str,
) -> Result<InvitationBlob, Box<HttpResponse>> {
    let inv: InvitationBlob = open(state, Purpose::Invitation, blob).ok_or_else(|| {
        Box::new(problem(
            400,
            "bad invitation",
            "not an invitation of this cluster",
        ))
    })?;
    if inv.sid != sid {
        return Err(refused(
            400,
            "bad invitation",
            "the invitation is for another session",
        ));
    }
    if inv.expires_ms <= now_ms() {
        return Err(refused(
            410,
            "invitation expired",
            "the invitation's lifetime is over",
        ));
    }
    Ok(inv)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptRequest {
    invitation: String,
    profile: NatProfile,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    retry: bool,
}

/// A plan for the pair from lookup's planner, in process.
fn plan_pair(
    state: &SignalState,
    a: (&NatProfile, &Option<String>),
    b: (&NatProfile, &Option<String>),
    retry: bool,
) -> Result<natrix_lookup::api::PlanResponse, Box<HttpResponse>> {
    let lk = &state.lookup;
    let snapshot = lk.snapshot.load();
    let age = snapshot.age(natrix_registry::unix_ms());
    if age > lk.max_snapshot_age {
        return Err(Box::new(problem(
            503,
            "no capacity",
            "the relay registry is stale",
        )));
    }
    let req = PlanRequest {
        a: PeerRequest {
            profile: a.0.clone(),
            region: a.1.clone(),
        },
        b: PeerRequest {
            profile: b.0.clone(),
            region: b.1.clone(),
        },
        retry,
    };
    let mut random = |n: usize| rand::random_range(0..n.max(1));
    let mut fill = |b: &mut [u8]| rand::fill(b);
    natrix_lookup::api::plan(
        &req,
        &snapshot,
        &lk.minting.load(),
        None,
        now_ms() / 1000,
        &mut random,
        &mut fill,
    )
    .map_err(|e| {
        let p = e.problem();
        Box::new(problem(p.status, p.title, p.detail))
    })
}

async fn accept(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, record, r) = match authed::<AcceptRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let inv = match opened_invitation(&state, &path, &r.invitation) {
        Ok(i) => i,
        Err(e) => {
            state.metrics.invites("accept_refused").inc();
            return *e;
        }
    };
    if !inv.to.contains(&record.handle) || me == inv.from.device {
        state.metrics.invites("accept_refused").inc();
        return problem(403, "not invited", "this device's handle was not invited");
    }
    // The first accept of each invited handle wins (fails open without the
    // store): one handle's devices answer once; several handles make a
    // star of pairs around the inviter.
    let handle_key = pair_id(&inv.sid, &record.handle);
    let acc_key = format!("natrix:sig:acc:{}:{handle_key}", inv.sid);
    if !first_claim(&state, &acc_key, inv.expires_ms).await {
        state.metrics.invites("answered_elsewhere").inc();
        return problem(
            409,
            "answered elsewhere",
            "another device accepted this invitation first",
        );
    }
    let plan = match plan_pair(
        &state,
        (&inv.profile, &inv.region),
        (&r.profile, &r.region),
        r.retry,
    ) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let pair = pair_id(&inv.sid, &me);
    let ticket_blob = TicketBlob {
        pair: pair.clone(),
        sid: inv.sid.clone(),
        a: inv.from.clone(),
        b: Party {
            handle: record.handle.clone(),
            device: me.clone(),
        },
        a_profile: inv.profile.clone(),
        b_profile: r.profile.clone(),
        a_region: inv.region.clone(),
        b_region: r.region.clone(),
        expires_ms: ticket_expiry(&state),
    };
    let ticket = seal(&state, Purpose::Ticket, &ticket_blob);
    let by = ticket_blob.b.clone();
    // The inviter gets its side pushed.
    let f = frame(
        "accepted",
        format!("s:{}:accepted:{pair}", inv.sid),
        ticket_blob.expires_ms,
        serde_json::json!({
            "session": inv.sid, "pair": pair, "by": by, "mode": plan.mode,
            "plan": plan.a, "ticket": ticket,
        }),
    );
    push_to(&state, &inv.from.device, &f).await;
    // The handle's other devices stop ringing (their invite is replaced).
    let cancel = || {
        frame(
            "cancelled",
            format!("s:{}", inv.sid),
            inv.expires_ms,
            serde_json::json!({"session": inv.sid, "reason": "answered-elsewhere"}),
        )
    };
    let _ = push_to_handle(&state, &record.handle, &[&me, &inv.from.device], cancel).await;
    state.metrics.invites("accepted").inc();
    HttpResponse::Ok().json(serde_json::json!({
        "session": inv.sid, "pair": pair, "mode": plan.mode, "plan": plan.b, "ticket": ticket,
    }))
}

/// A pair's id: the first 16 bytes of SHA-256(session ‖ accepting device),
/// hex.
fn pair_id(sid: &str, device: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{sid}{device}").as_bytes());
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclineRequest {
    invitation: String,
    #[serde(default)]
    reason: String,
}

async fn decline(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, record, r) = match authed::<DeclineRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let inv = match opened_invitation(&state, &path, &r.invitation) {
        Ok(i) => i,
        Err(e) => return *e,
    };
    if !inv.to.contains(&record.handle) {
        return problem(403, "not invited", "this device's handle was not invited");
    }
    let f = frame(
        "declined",
        format!("s:{}:declined:{me}", inv.sid),
        inv.expires_ms,
        serde_json::json!({
            "session": inv.sid,
            "by": Party { handle: record.handle, device: me },
            "reason": r.reason.chars().take(64).collect::<String>(),
        }),
    );
    push_to(&state, &inv.from.device, &f).await;
    state.metrics.invites("declined").inc();
    HttpResponse::NoContent().finish()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    invitation: String,
    #[serde(default)]
    reason: String,
}

async fn cancel(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, _, r) = match authed::<CancelRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let inv = match opened_invitation(&state, &path, &r.invitation) {
        Ok(i) => i,
        Err(e) => return *e,
    };
    if inv.from.device != me {
        return problem(403, "not the inviter", "only the inviting device cancels");
    }
    let reason: String = r.reason.chars().take(32).collect();
    let cancel = || {
        frame(
            "cancelled",
            format!("s:{}", inv.sid),
            inv.expires_ms,
            serde_json::json!({"session": inv.sid, "reason": reason}),
        )
    };
    for handle in &inv.to {
        let _ = push_to_handle(&state, handle, &[&me], cancel).await;
    }
    state.metrics.invites("cancelled").inc();
    HttpResponse::NoContent().finish()
}

/// Opens a ticket for pair `pair` presented by `me`: the blob and which
/// side `me` is (true for the inviter).
fn opened_ticket(
    state: &SignalState,
    pair: &str,
    blob: &str,
    me: &str,
) -> Result<(TicketBlob, bool), Box<HttpResponse>> {
    let t: TicketBlob = open(state, Purpose::Ticket, blob)
        .ok_or_else(|| Box::new(problem(400, "bad ticket", "not a ticket of this cluster")))?;
    if t.pair != pair {
        return Err(Box::new(problem(
            400,
            "bad ticket",
            "the ticket is for another pair",
        )));
    }
    if t.expires_ms <= now_ms() {
        return Err(Box::new(problem(
            410,
            "ticket expired",
            "the pair's ticket is over",
        )));
    }
    if me == t.a.device {
        Ok((t, true))
    } else if me == t.b.device {
        Ok((t, false))
    } else {
        Err(refused(
            403,
            "not in this pair",
            "the ticket names other devices",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    ticket: String,
    kind: String,
    sealed: String,
}

async fn update(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, _, r) = match authed::<UpdateRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    if !["relay-update", "ended", "app"].contains(&r.kind.as_str()) || r.sealed.len() > MAX_UPDATE {
        return problem(
            400,
            "bad update",
            "kind is relay-update, ended or app; sealed at most 4 KiB",
        );
    }
    let (t, inviter) = match opened_ticket(&state, &path, &r.ticket, &me) {
        Ok(t) => t,
        Err(e) => return *e,
    };
    let (from, to) = if inviter { (&t.a, &t.b) } else { (&t.b, &t.a) };
    let f = frame(
        "update",
        format!("p:{}:{}:{}", t.pair, r.kind, from.device),
        t.expires_ms,
        serde_json::json!({"pair": t.pair, "kind": r.kind, "from": from, "sealed": r.sealed}),
    );
    let status = push_to(&state, &to.device, &f).await;
    HttpResponse::Accepted().json(serde_json::json!({"status": status}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    ticket: String,
    #[serde(default)]
    profile: Option<NatProfile>,
}

async fn retry(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, _, r) = match authed::<RetryRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let (t, inviter) = match opened_ticket(&state, &path, &r.ticket, &me) {
        Ok(t) => t,
        Err(e) => return *e,
    };
    let (mut a, mut b) = (t.a_profile.clone(), t.b_profile.clone());
    if let Some(p) = r.profile {
        if inviter {
            a = p;
        } else {
            b = p;
        }
    }
    let plan = match plan_pair(&state, (&a, &t.a_region), (&b, &t.b_region), true) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let (mine, theirs, peer): (&SidePlan, &SidePlan, &Party) = if inviter {
        (&plan.a, &plan.b, &t.b)
    } else {
        (&plan.b, &plan.a, &t.a)
    };
    let f = frame(
        "retry",
        format!("p:{}:retry", t.pair),
        t.expires_ms,
        serde_json::json!({"pair": t.pair, "mode": plan.mode, "plan": theirs}),
    );
    push_to(&state, &peer.device, &f).await;
    HttpResponse::Ok().json(serde_json::json!({"pair": t.pair, "mode": plan.mode, "plan": mine}))
}

// ------------------------------------------------------------ transfer

/// A call being handed to another device of the leaving party's handle.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TransferBlob {
    pair: String,
    sid: String,
    stay: Party,
    stay_profile: NatProfile,
    #[serde(default)]
    stay_region: Option<String>,
    leaving: Party,
    expires_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    ticket: String,
}

/// A pair member hands its side of the call to its handle's other devices:
/// they ring with a `transfer` frame.
async fn transfer(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, _, r) = match authed::<TransferRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let (t, inviter) = match opened_ticket(&state, &path, &r.ticket, &me) {
        Ok(t) => t,
        Err(e) => return *e,
    };
    let (leaving, stay, stay_profile, stay_region) = if inviter {
        (
            t.a.clone(),
            t.b.clone(),
            t.b_profile.clone(),
            t.b_region.clone(),
        )
    } else {
        (
            t.b.clone(),
            t.a.clone(),
            t.a_profile.clone(),
            t.a_region.clone(),
        )
    };
    let expires_ms =
        now_ms() + u64::try_from(state.config.invite_lifetime.as_millis()).unwrap_or(60_000);
    let blob = seal(
        &state,
        Purpose::Transfer,
        &TransferBlob {
            pair: t.pair.clone(),
            sid: t.sid.clone(),
            stay: stay.clone(),
            stay_profile,
            stay_region,
            leaving: leaving.clone(),
            expires_ms,
        },
    );
    let ring = || {
        frame(
            "transfer",
            format!("t:{}", t.pair),
            expires_ms,
            serde_json::json!({"pair": t.pair, "from": leaving, "peer": stay, "transfer": blob, "expires_ms": expires_ms}),
        )
    };
    let delivered = match push_to_handle(&state, &leaving.handle, &[&me], ring).await {
        Ok(d) => d,
        Err(_) => return store_down(),
    };
    HttpResponse::Accepted().json(serde_json::json!({"pair": t.pair, "delivered": delivered}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeRequest {
    transfer: String,
    profile: NatProfile,
    #[serde(default)]
    region: Option<String>,
}

/// Another device of the leaving handle takes the call: a new plan and a
/// new pair with the staying device; the staying device gets its side
/// pushed, the leaving device gets `ended`.
async fn take(
    req: HttpRequest,
    state: web::Data<SignalState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let (me, record, r) = match authed::<TakeRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let Some(x) = open::<TransferBlob>(&state, Purpose::Transfer, &r.transfer) else {
        return problem(400, "bad transfer", "not a transfer of this cluster");
    };
    if x.pair != *path {
        return problem(400, "bad transfer", "the transfer is for another pair");
    }
    if x.expires_ms <= now_ms() {
        return problem(410, "transfer expired", "the transfer's lifetime is over");
    }
    if record.handle != x.leaving.handle || me == x.leaving.device {
        return problem(
            403,
            "not this handle's",
            "only another device of the same handle takes a call",
        );
    }
    if !first_claim(&state, &format!("natrix:sig:take:{}", x.pair), x.expires_ms).await {
        return problem(
            409,
            "taken elsewhere",
            "another device took this call first",
        );
    }
    let plan = match plan_pair(
        &state,
        (&x.stay_profile, &x.stay_region),
        (&r.profile, &r.region),
        false,
    ) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let pair = pair_id(&x.sid, &me);
    let taker = Party {
        handle: record.handle.clone(),
        device: me.clone(),
    };
    let ticket_blob = TicketBlob {
        pair: pair.clone(),
        sid: x.sid.clone(),
        a: x.stay.clone(),
        b: taker.clone(),
        a_profile: x.stay_profile.clone(),
        b_profile: r.profile.clone(),
        a_region: x.stay_region.clone(),
        b_region: r.region.clone(),
        expires_ms: ticket_expiry(&state),
    };
    let ticket = seal(&state, Purpose::Ticket, &ticket_blob);
    let f = frame(
        "transferred",
        format!("p:{}:transferred", x.pair),
        ticket_blob.expires_ms,
        serde_json::json!({
            "old_pair": x.pair, "pair": pair, "to": taker, "mode": plan.mode,
            "plan": plan.a, "ticket": ticket,
        }),
    );
    push_to(&state, &x.stay.device, &f).await;
    let f = frame(
        "update",
        format!("p:{}:ended:transfer", x.pair),
        ticket_blob.expires_ms,
        serde_json::json!({"pair": x.pair, "kind": "ended", "from": x.stay, "reason": "transferred", "to": taker}),
    );
    push_to(&state, &x.leaving.device, &f).await;
    HttpResponse::Ok().json(serde_json::json!({
        "pair": pair, "old_pair": x.pair, "mode": plan.mode, "plan": plan.b, "ticket": ticket,
    }))
}

// ---------------------------------------------------------------- push

async fn pending(req: HttpRequest, state: web::Data<SignalState>) -> HttpResponse {
    let (me, _) = match device_of(&req, &state).await {
        Ok(d) => d,
        Err(e) => return *e,
    };
    match push::pending(&state.store, &me, now_ms()).await {
        Ok(frames) => HttpResponse::Ok().json(serde_json::json!({"frames": frames})),
        Err(_) => store_down(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    ids: Vec<String>,
}

async fn ack(req: HttpRequest, state: web::Data<SignalState>, body: web::Bytes) -> HttpResponse {
    let (me, _, r) = match authed::<AckRequest>(&req, &state, &body).await {
        Ok(v) => v,
        Err(e) => return *e,
    };
    for id in r.ids.iter().take(push::MAILBOX_FIELDS) {
        if push::ack(&state.store, &me, id).await.is_err() {
            return store_down();
        }
    }
    HttpResponse::NoContent().finish()
}

async fn vapid(state: web::Data<SignalState>) -> HttpResponse {
    let (store, subject, configured) = (
        state.store.clone(),
        state.config.vapid_subject.clone(),
        state.config.vapid_key.clone(),
    );
    let v = state
        .vapid
        .get_or_try_init(|| async move {
            crate::wake_keys::load_vapid(&store, configured, &subject)
                .await
                .ok_or(())
        })
        .await;
    match v {
        Ok(v) => HttpResponse::Ok().json(serde_json::json!({"public_key": v.public_key()})),
        Err(()) => store_down(),
    }
}

/// The call demo: two tabs register handles and call each other
/// (`--open-registration`).
async fn demo() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("demo.html"))
}

/// Registers the signalling routes (inside lookup's App).
pub fn configure(state: SignalState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.service(
            web::scope("")
                .app_data(web::Data::new(state))
                .app_data(web::PayloadConfig::new(MAX_BODY))
                .route("/v1/devices", web::post().to(register))
                .route("/v1/devices/{id}/token", web::post().to(refresh))
                .route("/v1/devices/{id}/push", web::put().to(reroute))
                .route("/v1/devices/{id}", web::delete().to(unregister))
                .route("/v1/push", web::get().to(crate::socket::not_upgraded))
                .route("/v1/push/pending", web::get().to(pending))
                .route("/v1/push/ack", web::post().to(ack))
                .route("/v1/push/vapid", web::get().to(vapid))
                .route("/v1/invitations", web::post().to(invite))
                .route("/v1/sessions/{id}/accept", web::post().to(accept))
                .route("/v1/sessions/{id}/decline", web::post().to(decline))
                .route("/v1/sessions/{id}/cancel", web::post().to(cancel))
                .route("/v1/sessions/{id}/update", web::post().to(update))
                .route("/v1/sessions/{id}/retry", web::post().to(retry))
                .route("/v1/sessions/{id}/transfer", web::post().to(transfer))
                .route("/v1/sessions/{id}/take", web::post().to(take))
                .route("/demo", web::get().to(demo)),
        );
    }
}

/// Every route (OpenAPI completeness test).
pub const ROUTES: [&str; 16] = [
    "/v1/devices",
    "/v1/devices/{id}/token",
    "/v1/devices/{id}/push",
    "/v1/devices/{id}",
    "/v1/push",
    "/v1/push/pending",
    "/v1/push/ack",
    "/v1/push/vapid",
    "/v1/invitations",
    "/v1/sessions/{id}/accept",
    "/v1/sessions/{id}/decline",
    "/v1/sessions/{id}/cancel",
    "/v1/sessions/{id}/update",
    "/v1/sessions/{id}/retry",
    "/v1/sessions/{id}/transfer",
    "/v1/sessions/{id}/take",
];

#[cfg(test)]
mod tests {
    use super::ROUTES;

    #[test]
    fn the_openapi_document_describes_every_signalling_route() {
        let doc = include_str!("../../openapi.yaml");
        for r in ROUTES {
            assert!(
                doc.contains(&format!("\n  {r}:\n")),
                "{r} missing from lookup/openapi.yaml"
            );
        }
    }
}

//! The HTTP API on actix-web: `POST /v1/plan`, `GET /v1/relays`,
//! `/healthz`, `/readyz`. Handlers read the registry snapshot without a
//! lock and never call the store. Errors are RFC 9457 problem documents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::{App, HttpRequest, HttpResponse, dev::Server, web};
use natrix_model::apikey::{AuthError, KeyRing, Scope, bearer, is_api_key};
use natrix_model::grant::GrantRing;
use natrix_registry::{SharedSnapshot, unix_ms};
use natrix_telemetry::Telemetry;

use crate::api::{Minting, PlanError, PlanRequest, Problem, plan};
use crate::metrics::LookupMetrics;
use crate::sessions::SessionLedger;

/// Largest plan request body.
const MAX_BODY: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct LookupState {
    /// The registry, as the keeper last read it.
    pub snapshot: SharedSnapshot,
    /// Secrets, token lifetime, headroom (swapped when secrets rotate).
    pub minting: Arc<arc_swap::ArcSwap<Minting>>,
    /// Oldest snapshot plans are made from.
    pub max_snapshot_age: Duration,
    /// Metric handles.
    pub metrics: LookupMetrics,
    /// Health (readiness and draining).
    pub telemetry: Telemetry,
    /// The API keys this node accepts (swapped when the store's change).
    pub keys: Arc<arc_swap::ArcSwap<KeyRing>>,
    /// Per-key request budgets (keys created in the store; the keys given
    /// with `--api-key` are the operator's own and unmetered).
    pub budgets: Arc<KeyBudgets>,
    /// The grant secrets this node accepts grants under.
    pub grants: Arc<GrantRing>,
    /// Live sessions per tenant.
    pub ledger: Arc<SessionLedger>,
    /// Live sessions a tenant may hold unless its key sets its own cap.
    pub max_sessions: u64,
    /// Sources that keep failing authentication.
    pub guard: Arc<crate::guard::AuthGuard>,
}

/// Who is calling, once authorised.
#[derive(Clone, Debug)]
struct Caller {
    /// The key id (API keys) or `g-<key id>` (grants): what rates, caps,
    /// relay quotas and metrics count.
    tenant: String,
    /// Whether rates and caps apply (not to the operator's --api-key keys).
    metered: bool,
    /// Requests per second.
    rate: f64,
    /// Live sessions.
    max_sessions: u64,
}

/// A token bucket per tenant: its rate in requests per second, twice that
/// in a burst. Bounded: one entry per key the ring holds and grant key id.
#[derive(Debug)]
pub struct KeyBudgets {
    rate: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
    unmetered: std::collections::HashSet<String>,
}

impl KeyBudgets {
    /// Budgets of `rate` requests per second per key unless the key sets
    /// its own; `unmetered` keys have none.
    pub fn new(rate: f64, unmetered: impl IntoIterator<Item = String>) -> KeyBudgets {
        KeyBudgets {
            rate: rate.max(0.001),
            buckets: std::sync::Mutex::new(std::collections::HashMap::new()),
            unmetered: unmetered.into_iter().collect(),
        }
    }

    /// Takes one request from `tenant`'s budget at `rate`; otherwise how
    /// long until the next one is allowed.
    fn take(&self, tenant: &str, rate: f64, tenants: usize, now: Instant) -> Result<(), Duration> {
        let rate = rate.max(0.001);
        let burst = rate * 2.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > tenants.max(1) * 2 {
            // Keys were revoked: start over rather than grow.
            buckets.clear();
        }
        let (tokens, at) = buckets.entry(tenant.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// The problem document of a refused credential.
fn refused_credential(e: AuthError, scope: Scope, detail: Option<String>) -> HttpResponse {
    let (status, title, default) = match e {
        AuthError::Missing => (
            401,
            "credential required",
            "send Authorization: Bearer nxk_… (an API key: `natrix apikey create`) or a grant your backend signed"
                .to_owned(),
        ),
        AuthError::Invalid => (
            401,
            "unknown credential",
            "this cluster knows no such key (create keys with `natrix apikey create`)".to_owned(),
        ),
        AuthError::Forbidden => (
            403,
            "scope missing",
            format!("this credential lacks the `{}` scope", scope.label()),
        ),
    };
    let mut response = problem(&Problem {
        status,
        title,
        detail: detail.unwrap_or(default),
        field: None,
    });
    if status == 401 {
        response.headers_mut().insert(
            actix_web::http::header::WWW_AUTHENTICATE,
            actix_web::http::header::HeaderValue::from_static("Bearer realm=\"natrix\""),
        );
    }
    response
}

/// A 429 problem document with Retry-After.
fn too_many(detail: String, wait: Duration) -> HttpResponse {
    let mut response = problem(&Problem {
        status: 429,
        title: "rate limited",
        detail,
        field: None,
    });
    let secs = wait.as_secs().max(1).to_string();
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&secs) {
        response
            .headers_mut()
            .insert(actix_web::http::header::RETRY_AFTER, v);
    }
    response
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Who the credential (an API key or a grant) names, checked for `scope`.
fn identify(
    header: Option<&str>,
    state: &LookupState,
    scope: Scope,
) -> Result<Caller, (AuthError, Option<String>)> {
    let credential = bearer(header).map_err(|e| (e, None))?;
    if is_api_key(credential) {
        let ring = state.keys.load();
        let (id, record) = ring.authorize(header, scope).map_err(|e| (e, None))?;
        return Ok(Caller {
            tenant: id.to_owned(),
            metered: !state.budgets.unmetered.contains(id),
            rate: record.rate.map_or(state.budgets.rate, f64::from),
            max_sessions: record.max_sessions.unwrap_or(state.max_sessions),
        });
    }
    let verified = state
        .grants
        .verify(credential, scope, unix_now())
        .map_err(|e| {
            use natrix_model::grant::GrantError;
            let kind = match e {
                GrantError::Forbidden(_) => AuthError::Forbidden,
                _ => AuthError::Invalid,
            };
            let detail = match e {
                GrantError::Malformed => "neither an API key (nxk_…; create one with `natrix apikey create`) nor a signed grant (a JWT)".to_owned(),
                e => e.to_string(),
            };
            (kind, Some(detail))
        })?;
    Ok(Caller {
        tenant: format!("g-{}", verified.kid),
        metered: true,
        rate: state.budgets.rate,
        max_sessions: state.max_sessions,
    })
}

/// Checks the request's credential for `scope` and its budget; the caller,
/// or the answer to send when it is refused.
fn authorize(
    req: &HttpRequest,
    state: &LookupState,
    scope: Scope,
) -> Result<Caller, Box<HttpResponse>> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = identify(header, state, scope).map_err(|(e, detail)| {
        state.metrics.auth(e.label()).inc();
        Box::new(refused_credential(e, scope, detail))
    })?;
    if caller.metered {
        let tenants = state.keys.load().len() + state.grants.key_ids().count();
        if let Err(wait) = state
            .budgets
            .take(&caller.tenant, caller.rate, tenants, Instant::now())
        {
            state.metrics.auth("rate_limited").inc();
            state.metrics.keys.refused(&caller.tenant, "rate_limited");
            return Err(Box::new(too_many(
                format!("key {} is over its request rate", caller.tenant),
                wait,
            )));
        }
    }
    state.metrics.auth("ok").inc();
    Ok(caller)
}

fn problem(p: &Problem) -> HttpResponse {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": p.title,
        "status": p.status,
        "detail": p.detail,
        "field": p.field,
    });
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(p.status)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
    )
    .content_type("application/problem+json")
    .body(body.to_string())
}

/// Counts a refused plan request by its cause and answers with its problem
/// document.
fn refuse(state: &LookupState, e: &PlanError) -> HttpResponse {
    state.metrics.error(e.reason()).inc();
    problem(&e.problem())
}

/// The field a serde error names, if any (`unknown field `x``, `missing
/// field `y``).
fn serde_field(e: &serde_json::Error) -> Option<String> {
    let text = e.to_string();
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_owned())
}

async fn post_plan(
    req: HttpRequest,
    state: web::Data<LookupState>,
    body: web::Bytes,
) -> HttpResponse {
    let started = Instant::now();
    let caller = match authorize(&req, &state, Scope::Plan) {
        Ok(c) => c,
        Err(refused) => return *refused,
    };
    let req: PlanRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                &state,
                &PlanError::BadRequest {
                    detail: e.to_string(),
                    field: serde_field(&e),
                },
            );
        }
    };
    let snapshot = state.snapshot.load();
    let age = snapshot.age(unix_ms());
    if age > state.max_snapshot_age {
        return refuse(
            &state,
            &PlanError::StaleRegistry {
                age,
                limit: state.max_snapshot_age,
            },
        );
    }
    let now = unix_now();
    if caller.metered {
        match state
            .ledger
            .admit(&caller.tenant, caller.max_sessions, unix_ms())
        {
            Ok(live) => state.metrics.keys.live(&caller.tenant, live),
            Err(wait) => {
                state.metrics.auth("session_cap").inc();
                state.metrics.keys.refused(&caller.tenant, "session_cap");
                return too_many(
                    format!(
                        "key {} holds its {} live sessions; sessions end when their tokens expire",
                        caller.tenant, caller.max_sessions
                    ),
                    wait,
                );
            }
        }
    }
    let mut random = |n: usize| rand::random_range(0..n.max(1));
    let mut fill = |b: &mut [u8]| rand::fill(b);
    let minting = state.minting.load();
    match plan(
        &req,
        &snapshot,
        &minting,
        Some(&caller.tenant),
        now,
        &mut random,
        &mut fill,
    ) {
        Ok(p) => {
            state.metrics.plan(&p.mode).inc();
            state.metrics.keys.planned(&caller.tenant);
            state
                .metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            HttpResponse::Ok().json(p)
        }
        Err(e) => {
            if caller.metered {
                state.ledger.release(&caller.tenant);
            }
            refuse(&state, &e)
        }
    }
}

/// `POST /v1/outcomes`'s body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeReport {
    /// The plan's `report` ticket.
    report: String,
    /// `direct`, `relay` or `failed`.
    actual: String,
    /// Milliseconds from the plan to the pair's first packet.
    #[serde(default)]
    first_packet_ms: Option<f64>,
    /// Why it failed, in the client's words (logged, never a label).
    #[serde(default)]
    failure: Option<String>,
}

/// A client reports what happened to a plan: counted by NAT pair, planned
/// mode and actual path.
async fn post_outcome(
    req: HttpRequest,
    state: web::Data<LookupState>,
    body: web::Bytes,
) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state, Scope::Plan) {
        return *refused;
    }
    let bad = |detail: String, field: Option<&str>| {
        problem(&Problem {
            status: 400,
            title: "bad outcome report",
            detail,
            field: field.map(str::to_owned),
        })
    };
    let r: OutcomeReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string(), serde_field(&e).as_deref()),
    };
    let Some(actual) = crate::outcomes::ACTUAL.into_iter().find(|a| *a == r.actual) else {
        return bad("actual is direct, relay or failed".into(), Some("actual"));
    };
    let first_packet = match r.first_packet_ms {
        Some(ms) if !(0.0..=600_000.0).contains(&ms) => {
            return bad(
                "first_packet_ms is between 0 and 600000".into(),
                Some("first_packet_ms"),
            );
        }
        other => other,
    };
    let secret = state.minting.load().cluster_secret.clone();
    let planned = match crate::outcomes::verify(&secret, &r.report, unix_now()) {
        Ok(p) => p,
        Err(why) => {
            return problem(&Problem {
                status: 401,
                title: "invalid report ticket",
                detail: why.to_owned(),
                field: Some("report".into()),
            });
        }
    };
    state
        .metrics
        .outcomes
        .with_label_values(&[planned.pair.as_str(), planned.mode, actual])
        .inc();
    if let (Some(ms), true) = (first_packet, actual != "failed") {
        state
            .metrics
            .first_packet
            .with_label_values(&[actual])
            .observe(ms / 1000.0);
    }
    if let Some(why) = r.failure.as_deref().filter(|_| actual == "failed") {
        tracing::debug!(pair = %planned.pair, planned = planned.mode, failure = %why.chars().take(200).collect::<String>(), "a plan failed");
    }
    HttpResponse::Accepted()
        .content_type("application/json")
        .body(r#"{"counted":true}"#)
}

async fn get_relays(req: HttpRequest, state: web::Data<LookupState>) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state, Scope::RelaysRead) {
        return *refused;
    }
    let s = state.snapshot.load();
    let age = s.age(unix_ms());
    HttpResponse::Ok().json(serde_json::json!({
        "snapshot_age_seconds": if s.taken_ms == 0 { None } else { Some(age.as_secs_f64()) },
        "relays": s.relays,
        "cdx": s.cdx,
    }))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<LookupState>) -> HttpResponse {
    let mut reasons = state.telemetry.health().not_ready_reasons();
    let age = state.snapshot.load().age(unix_ms());
    if age > state.max_snapshot_age {
        reasons.push("registry snapshot too old".into());
    }
    if reasons.is_empty() {
        HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("not ready: {}\n", reasons.join(", ")))
    }
}

/// Every route the API serves (`lookup/openapi.yaml` documents each).
pub const ROUTES: [&str; 5] = [
    "/v1/plan",
    "/v1/relays",
    "/healthz",
    "/readyz",
    "/v1/outcomes",
];

/// Registers the API's routes (for embedding in another App, and tests).
pub fn configure(state: LookupState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .route(ROUTES[0], web::post().to(post_plan))
            .route(ROUTES[1], web::get().to(get_relays))
            .route(ROUTES[2], web::get().to(healthz))
            .route(ROUTES[3], web::get().to(readyz))
            .route(ROUTES[4], web::post().to(post_outcome));
    }
}

/// More routes for lookup's server (signalling), registered after its own.
pub type Routes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// A connection that asked to switch protocols (`Connection: Upgrade`): the
/// request head, the socket, and what the server read past the head. The
/// HTTP server's buffers (8 KiB each way) are gone by then, so a held
/// WebSocket costs what its owner keeps, not what the HTTP layer keeps.
pub struct Upgraded {
    /// The request line and headers.
    pub head: actix_http::Request,
    /// The client's connection.
    pub io: actix_rt::net::TcpStream,
    /// Bytes read after the head (a client may pipeline its first frame).
    pub buffered: bytes::BytesMut,
}

/// Serves upgraded connections: answers the handshake (or refuses it) on
/// `io` and returns once the connection is handed off (spawned) or closed.
pub type Upgrade =
    Arc<dyn Fn(Upgraded) -> futures_util::future::LocalBoxFuture<'static, ()> + Send + Sync>;

/// What another role adds to lookup's server.
#[derive(Clone)]
pub struct Extension {
    /// Routes registered after lookup's own.
    pub routes: Routes,
    /// Who serves `Connection: Upgrade` requests (without one they get 404).
    pub upgrade: Option<Upgrade>,
}

/// Writes `resp` on a connection taken out of the HTTP server (an upgrade
/// refused) as an HTTP/1.1 response that closes it, then closes it. A client
/// that does not read within 2 s loses the answer.
pub async fn answer_raw(io: &mut actix_rt::net::TcpStream, resp: HttpResponse) {
    use std::fmt::Write as _;
    use tokio::io::AsyncWriteExt as _;
    let status = resp.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in resp.headers() {
        if let Ok(v) = value.to_str() {
            let _ = write!(head, "{name}: {v}\r\n");
        }
    }
    let body = actix_web::body::to_bytes(resp.into_body())
        .await
        .unwrap_or_default();
    let _ = write!(
        head,
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        io.write_all(head.as_bytes()).await?;
        io.write_all(&body).await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

async fn refuse_upgrade(mut up: Upgraded) {
    let resp = HttpResponse::NotFound()
        .content_type("application/problem+json")
        .body(
            serde_json::json!({
                "type": "about:blank",
                "title": "not found",
                "status": 404,
                "detail": "nothing upgrades here",
            })
            .to_string(),
        );
    answer_raw(&mut up.io, resp).await;
}

/// The answer to a source that used its refused authentications up.
pub fn throttled_response(retry_after: u64) -> HttpResponse {
    HttpResponse::TooManyRequests()
        .content_type("application/problem+json")
        .insert_header(("Retry-After", retry_after.to_string()))
        .body(
            serde_json::json!({
                "type": "about:blank",
                "title": "too many refused authentications",
                "status": 429,
                "detail": "requests from this network failed authentication too often: retry later with a valid credential",
            })
            .to_string(),
        )
}

/// The listening socket: reusable address, a deep accept queue (a burst of
/// push sockets reconnecting after a replica drains).
fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds the API on `addr` with `workers` threads, with what `extra` adds;
/// returns the server (to spawn inside an actix system) and the bound
/// address.
pub fn serve(
    addr: SocketAddr,
    workers: usize,
    state: LookupState,
    extra: Option<Extension>,
) -> std::io::Result<(Server, SocketAddr)> {
    use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _, fn_service, map_config};
    let lst = listener(addr)?;
    let bound = lst.local_addr()?;
    let server = actix_server::Server::build()
        .workers(workers.max(1))
        .disable_signals()
        .shutdown_timeout(2)
        .listen("lookup", lst, move || {
            let guard = (state.guard.clone(), state.metrics.throttled.clone());
            let app = App::new()
                .wrap_fn(move |req, srv| {
                    use actix_web::dev::Service as _;
                    let (guard, throttled) = guard.clone();
                    let source = guard.source_of(req.peer_addr(), req.headers());
                    if let Some(wait) = guard.throttled(source) {
                        throttled.inc();
                        let resp = throttled_response(wait);
                        return futures_util::future::Either::Left(std::future::ready(Ok(
                            req.into_response(resp)
                        )));
                    }
                    let answer = srv.call(req);
                    futures_util::future::Either::Right(async move {
                        let res = answer.await?;
                        if res.status() == actix_web::http::StatusCode::UNAUTHORIZED {
                            guard.refused(source);
                        }
                        Ok(res)
                    })
                })
                .configure(configure(state.clone()));
            let app = match &extra {
                Some(e) => {
                    let routes = e.routes.clone();
                    app.configure(move |cfg| routes(cfg))
                }
                None => app,
            };
            let upgrade = extra.as_ref().and_then(|e| e.upgrade.clone());
            let upgrades = fn_service(
                move |(head, framed): (
                    actix_http::Request,
                    actix_codec::Framed<actix_rt::net::TcpStream, actix_http::h1::Codec>,
                )| {
                    let parts = framed.into_parts();
                    let up = Upgraded {
                        head,
                        io: parts.io,
                        buffered: parts.read_buf,
                    };
                    let fut = match &upgrade {
                        Some(serve) => serve(up),
                        None => Box::pin(refuse_upgrade(up)),
                    };
                    async move {
                        fut.await;
                        Ok::<(), std::convert::Infallible>(())
                    }
                },
            );
            actix_http::HttpService::build()
                .keep_alive(actix_http::KeepAlive::default())
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(bound)
                .upgrade(upgrades)
                .finish(map_config(
                    app.into_factory()
                        .map_err(|e: actix_web::Error| e.as_response_error().error_response()),
                    |_| actix_web::dev::AppConfig::default(),
                ))
                .tcp()
        })?
        .run();
    Ok((server, bound))
}

#[cfg(test)]
mod tests {
    use super::ROUTES;

    #[test]
    fn the_openapi_document_describes_every_route_and_request_field() {
        let doc = include_str!("../openapi.yaml");
        for r in ROUTES {
            assert!(
                doc.contains(&format!("\n  {r}:\n")),
                "{r} missing from openapi.yaml"
            );
        }
        // The profile fields the parser accepts.
        for f in [
            "server",
            "transport",
            "local_address",
            "mapped_address",
            "behind_nat",
            "mapping",
            "filtering",
            "hairpinning",
            "class",
            "other_address",
            "udp_blocked",
            "seconds",
            "tcp_mapped_address",
            "error",
            "retry",
            "region",
        ] {
            assert!(
                doc.contains(&format!(" {f}:")),
                "{f} missing from openapi.yaml"
            );
        }
    }
}

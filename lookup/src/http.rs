//! The HTTP API on actix-web: `POST /v1/plan`, `GET /v1/relays`,
//! `/healthz`, `/readyz`. Handlers read the registry snapshot without a
//! lock and never call the store. Errors are RFC 9457 problem documents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::{App, HttpResponse, HttpServer, dev::Server, web};
use natrix_registry::{SharedSnapshot, unix_ms};
use natrix_telemetry::Telemetry;

use crate::api::{Minting, PlanError, PlanRequest, Problem, plan};
use crate::metrics::LookupMetrics;

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

async fn post_plan(state: web::Data<LookupState>, body: web::Bytes) -> HttpResponse {
    let started = Instant::now();
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut random = |n: usize| rand::random_range(0..n.max(1));
    let mut fill = |b: &mut [u8]| rand::fill(b);
    let minting = state.minting.load();
    match plan(&req, &snapshot, &minting, now, &mut random, &mut fill) {
        Ok(p) => {
            state.metrics.plan(&p.mode).inc();
            state
                .metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            HttpResponse::Ok().json(p)
        }
        Err(e) => refuse(&state, &e),
    }
}

async fn get_relays(state: web::Data<LookupState>) -> HttpResponse {
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
pub const ROUTES: [&str; 4] = ["/v1/plan", "/v1/relays", "/healthz", "/readyz"];

/// Registers the API's routes (for embedding in another App, and tests).
pub fn configure(state: LookupState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .route(ROUTES[0], web::post().to(post_plan))
            .route(ROUTES[1], web::get().to(get_relays))
            .route(ROUTES[2], web::get().to(healthz))
            .route(ROUTES[3], web::get().to(readyz));
    }
}

/// Binds the API on `addr` with `workers` threads; returns the server (to
/// spawn inside an actix system) and the bound address.
pub fn serve(
    addr: SocketAddr,
    workers: usize,
    state: LookupState,
) -> std::io::Result<(Server, SocketAddr)> {
    let server = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .workers(workers.max(1))
        .disable_signals()
        .shutdown_timeout(2)
        .bind(addr)?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("lookup bound no address"))?;
    Ok((server.run(), bound))
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

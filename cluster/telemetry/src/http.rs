//! The metrics and health endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! Served by actix-web with a single worker: it is scraped every few seconds
//! and must never compete with the data plane for cores. Connections are
//! capped ([`MAX_CONNECTIONS`]) and a request must arrive within
//! [`REQUEST_TIMEOUT`], so a flood holds a bounded number of slow sockets.
//! A second listener serving only `/healthz` and `/readyz`
//! ([`serve_health`]) gives probes an endpoint a flood of the metrics port
//! cannot starve.

use std::net::SocketAddr;

use actix_web::{App, HttpResponse, HttpServer, dev::Server, web};
use anyhow::Context;

use crate::Telemetry;

async fn metrics(t: web::Data<Telemetry>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(t.render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(t: web::Data<Telemetry>) -> HttpResponse {
    let reasons = t.health().not_ready_reasons();
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

/// Most connections the endpoint holds at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds the endpoint and returns the server (to be awaited or spawned inside
/// an actix system) and the address actually bound (port 0 picks one).
pub fn serve(addr: SocketAddr, telemetry: Telemetry) -> anyhow::Result<(Server, SocketAddr)> {
    bind(addr, telemetry, true)
}

/// A listener serving only `/healthz` and `/readyz` (for probes), bound
/// like [`serve`].
pub fn serve_health(
    addr: SocketAddr,
    telemetry: Telemetry,
) -> anyhow::Result<(Server, SocketAddr)> {
    bind(addr, telemetry, false)
}

fn bind(
    addr: SocketAddr,
    telemetry: Telemetry,
    with_metrics: bool,
) -> anyhow::Result<(Server, SocketAddr)> {
    let data = web::Data::new(telemetry);
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(data.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
        if with_metrics {
            app.route("/metrics", web::get().to(metrics))
        } else {
            app
        }
    })
    .workers(1)
    .max_connections(MAX_CONNECTIONS)
    .client_request_timeout(REQUEST_TIMEOUT)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)
    .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .context("metrics endpoint bound no address")?;
    Ok((server.run(), bound))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[actix_rt::test]
    async fn serves_metrics_health_and_readiness() {
        let t = Telemetry::new("9.9.9");
        let (server, addr) = serve("127.0.0.1:0".parse().unwrap(), t.clone()).unwrap();
        let handle = server.handle();
        actix_rt::spawn(server);

        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("natrix_build_info{version=\"9.9.9\"} 1"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));

        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let gate = t.health().gate("listener");
        gate.open();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        t.health().start_draining();
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("draining"),
            "{r}"
        );
        handle.stop(true).await;
    }

    #[actix_rt::test]
    async fn the_health_endpoint_answers_probes_only_and_slow_clients_are_cut() {
        let t = Telemetry::new("9.9.9");
        let (server, addr) = serve_health("127.0.0.1:0".parse().unwrap(), t.clone()).unwrap();
        let handle = server.handle();
        actix_rt::spawn(server);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 404"));
        // A client that never finishes its request head is dropped.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT + std::time::Duration::from_secs(3),
            slow.read_to_end(&mut buf),
        )
        .await;
        assert!(
            read.is_ok(),
            "a half-sent request was held past the timeout"
        );
        handle.stop(true).await;
    }
}

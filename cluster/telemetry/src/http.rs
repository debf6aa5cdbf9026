//! The metrics and health endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! Served by actix-web with a single worker: it is scraped every few seconds
//! and must never compete with the data plane for cores.

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

/// Binds the endpoint and returns the server (to be awaited or spawned inside
/// an actix system) and the address actually bound (port 0 picks one).
pub fn serve(addr: SocketAddr, telemetry: Telemetry) -> anyhow::Result<(Server, SocketAddr)> {
    let data = web::Data::new(telemetry);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .workers(1)
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
}

//! The serving commands: start the roles, the metrics endpoint, wait for a
//! signal, shut down in order.

use std::time::Duration;

use anyhow::Context;
use natrix_cdx::{CdxConfig, server::CdxServer};
use natrix_telemetry::{Telemetry, http};
use tracing::{info, warn};

use crate::cli::Global;

/// Which roles a process runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Roles {
    pub(crate) cdx: bool,
}

impl Roles {
    /// Every role (`natrix up`).
    pub(crate) fn all() -> Roles {
        Roles { cdx: true }
    }

    /// The CDX role alone.
    pub(crate) fn cdx_only() -> Roles {
        Roles { cdx: true }
    }
}

fn worker_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs `roles` until SIGINT/SIGTERM.
pub(crate) fn run(global: &Global, roles: Roles, cdx: &CdxConfig) -> anyhow::Result<()> {
    let workers = worker_count(global.workers);
    info!(
        version = env!("CARGO_PKG_VERSION"),
        ?roles,
        workers,
        global = ?global,
        cdx = ?cdx,
        "effective configuration"
    );
    let telemetry = Telemetry::new(env!("CARGO_PKG_VERSION"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("natrix-io")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;

    let cdx_server = if roles.cdx {
        let server = CdxServer::start(runtime.handle(), cdx, workers, &telemetry)?;
        info!(
            udp = ?server.udp_addrs(),
            tcp = ?server.tcp_addrs(),
            "CDX role serving STUN"
        );
        Some(server)
    } else {
        None
    };
    let cdx_gate = telemetry.health().gate("cdx");
    cdx_gate.open();

    // The control plane (actix) runs on this thread: the metrics endpoint
    // today, registry and drain actors as they land.
    let system = actix_rt::System::new();
    let signal = system.block_on(async {
        let (server, addr) = http::serve(global.metrics_listen, telemetry.clone())?;
        let handle = server.handle();
        actix_rt::spawn(server);
        info!(%addr, "metrics and health endpoint up");
        let signal = shutdown_signal().await?;
        info!(signal, "shutting down");
        telemetry.health().start_draining();
        handle.stop(true).await;
        anyhow::Ok(signal)
    })?;

    if let Some(server) = cdx_server {
        // The timer must be created inside the runtime, hence the async block.
        let timeout = global.shutdown_timeout;
        let done =
            runtime.block_on(async { tokio::time::timeout(timeout, server.shutdown()).await });
        if done.is_err() {
            warn!(timeout = ?global.shutdown_timeout, "CDX listeners did not stop in time");
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    info!(signal, "stopped");
    Ok(())
}

//! Signalling, served by lookup's HTTP server (and in `natrix up`): the
//! device registration directory, the stateless invitation service and the
//! push channel (`SIGNALLING.md` in the design notes; the routes are in
//! [`http`]).
//!
//! Nothing per session is kept on the server: an invitation and a pair's
//! ticket are sealed blobs the clients carry ([`natrix_model::signal`]),
//! opened by any replica. The coordination store holds the directory
//! ([`directory`]) and each device's mailbox ([`push`]), every key with a
//! TTL. Plans come from lookup's planner, in process.
//!
//! # Panics and errors
//!
//! Request input never panics: bad JSON, forged or expired tokens, grants,
//! invitations and tickets, and requests from devices that are not party to
//! a session are each a problem document with its status; an unreachable
//! store is 503.

mod config;
pub mod directory;
pub mod http;
mod metrics;
pub mod push;
mod socket;
pub mod wake;
mod wake_keys;
mod ws;

use std::sync::Arc;

pub use config::{MAX_INVITE_LIFETIME, SignalConfig};
pub use http::{SignalState, refresh_message};
pub use metrics::SignalMetrics;

/// The signalling state for lookup's server: the store, the limits, lookup's
/// planner state and the keys derived from the cluster secret. Spawns the
/// hub's listener on the calling actix system.
pub fn state(
    store: &natrix_store::Store,
    config: SignalConfig,
    lookup: natrix_lookup::http::LookupState,
    cluster_secret: &[u8],
    telemetry: &natrix_telemetry::Telemetry,
) -> SignalState {
    let hub = push::Hub::default();
    actix_web::rt::spawn(hub.clone().listen(store.clone()));
    // A draining replica sends its devices elsewhere.
    let (draining, health) = (hub.clone(), telemetry.health().clone());
    actix_web::rt::spawn(async move {
        let mut tick = actix_web::rt::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            if health.is_draining() {
                draining.drain();
                return;
            }
        }
    });
    SignalState {
        store: store.clone(),
        config,
        lookup,
        sealer: Arc::new(natrix_model::signal::Sealer::new(cluster_secret)),
        tokens: natrix_model::signal::DeviceTokens::new(cluster_secret),
        hub,
        metrics: SignalMetrics::new(telemetry),
        vapid: Arc::new(tokio::sync::OnceCell::new()),
    }
}

/// What signalling adds to lookup's server: its routes, and the push
/// WebSocket served off the HTTP server's upgrade hook.
pub fn extension(state: SignalState) -> natrix_lookup::http::Extension {
    let upgrade = socket::upgrade(Arc::new(state.clone()));
    natrix_lookup::http::Extension {
        routes: Arc::new(move |cfg| http::configure(state.clone())(cfg)),
        upgrade: Some(upgrade),
    }
}

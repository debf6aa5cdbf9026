//! Starting the role: the control-plane actors it needs and the HTTP API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::Context;
use natrix_model::TurnSecret;
use natrix_model::apikey::{ApiKey, KeyRecord, KeyRing, Scope};
use natrix_model::grant::GrantRing;
use natrix_registry::apikeys::KeysWatcher;
use natrix_registry::secrets::SecretsWatcher;
use natrix_registry::{HostRecord, SnapshotKeeper, State, shared_snapshot, unix_ms};
use natrix_store::Store;
use natrix_telemetry::Telemetry;
use tracing::info;

use crate::api::Minting;
use crate::http::{KeyBudgets, LookupState};
use crate::sessions::SessionLedger;
use crate::{LookupConfig, LookupMetrics};

/// What adds routes to lookup's server once its state exists (signalling).
pub type Extend = Box<dyn FnOnce(&LookupState) -> crate::http::Extension>;

/// Starts the lookup role in the calling actix system: the snapshot keeper
/// (registry snapshot every 500 ms, readiness gate `lookup registry`), the
/// watcher of rotated TURN secrets, and the HTTP API (with the routes
/// `extend` adds). Returns the API server's handle and bound address.
pub fn start(
    store: &Store,
    config: &LookupConfig,
    turn_secrets: Vec<TurnSecret>,
    cluster_secret: &[u8],
    workers: usize,
    telemetry: &Telemetry,
    extend: Option<Extend>,
) -> anyhow::Result<(actix_web::dev::ServerHandle, SocketAddr)> {
    let metrics = LookupMetrics::new(telemetry);
    let snapshot = keep_snapshot(store, config, &metrics, telemetry);
    let base = Minting {
        turn_secrets: turn_secrets.clone(),
        cluster_secret: cluster_secret.to_vec(),
        ttl: config.token_ttl.as_secs().max(60),
        headroom: config.headroom,
    };
    let state = LookupState {
        snapshot,
        minting: watch_secrets(store, base, turn_secrets),
        max_snapshot_age: config.max_snapshot_age,
        metrics,
        telemetry: telemetry.clone(),
        keys: watch_keys(store, &config.api_keys),
        budgets: Arc::new(KeyBudgets::new(
            config.api_key_rate,
            config.api_keys.iter().map(|k| k.id().to_owned()),
        )),
        grants: Arc::new(GrantRing::new(config.grant_secrets.iter().cloned())),
        ledger: sync_sessions(store, config.token_ttl.max(Duration::from_secs(60))),
        max_sessions: config.api_key_max_sessions,
        guard: Arc::new(crate::guard::AuthGuard::new(
            config.auth_failures_per_minute,
            config.trusted_proxies.clone(),
        )),
    };
    let extra = extend.map(|f| f(&state));
    let (server, addr) = crate::http::serve(config.lookup_listen, workers, state, extra)
        .with_context(|| format!("binding the lookup API on {}", config.lookup_listen))?;
    let handle = server.handle();
    actix_web::rt::spawn(server);
    info!(%addr, "lookup API up");
    Ok((handle, addr))
}

/// The registry snapshot, refreshed every 500 ms by a keeper that also
/// publishes its age and host counts and holds the readiness gate
/// `lookup registry` open while it is fresh.
fn keep_snapshot(
    store: &Store,
    config: &LookupConfig,
    metrics: &LookupMetrics,
    telemetry: &Telemetry,
) -> natrix_registry::SharedSnapshot {
    let snapshot = shared_snapshot();
    let gate = telemetry.health().gate("lookup registry");
    let observe = {
        let metrics = metrics.clone();
        let snapshot = snapshot.clone();
        let max_age = config.max_snapshot_age;
        Box::new(move |ok: bool| {
            metrics.refreshes[usize::from(!ok)].inc();
            let s = snapshot.load();
            let age = s.age(unix_ms());
            metrics
                .snapshot_age
                .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
            let count = |hosts: &[HostRecord], st: State| {
                i64::try_from(hosts.iter().filter(|h| h.state == st).count()).unwrap_or(0)
            };
            metrics.hosts[0].set(count(&s.relays, State::Active));
            metrics.hosts[1].set(count(&s.relays, State::Draining));
            metrics.hosts[2].set(count(&s.cdx, State::Active));
            metrics.hosts[3].set(count(&s.cdx, State::Draining));
            if age <= max_age {
                gate.open();
            } else {
                gate.close();
            }
        })
    };
    SnapshotKeeper::new(
        store.clone(),
        snapshot.clone(),
        Duration::from_millis(500),
        observe,
    )
    .start();
    snapshot
}

/// What tokens are minted with, the store's rotated TURN secrets first
/// (tokens use the newest), then the configured ones.
fn watch_secrets(
    store: &Store,
    base: Minting,
    configured: Vec<TurnSecret>,
) -> Arc<arc_swap::ArcSwap<Minting>> {
    let minting = Arc::new(arc_swap::ArcSwap::from_pointee(base.clone()));
    let swap = minting.clone();
    SecretsWatcher::new(
        store.clone(),
        Duration::from_secs(1),
        Box::new(move |stored| {
            let mut secrets: Vec<TurnSecret> = stored;
            secrets.extend(configured.iter().cloned());
            swap.store(Arc::new(Minting {
                turn_secrets: secrets,
                ..base.clone()
            }));
        }),
    )
    .start();
    minting
}

/// The live-session ledger, synced with the store every second.
fn sync_sessions(store: &Store, ttl: Duration) -> Arc<SessionLedger> {
    let ledger = Arc::new(SessionLedger::new(ttl));
    let (syncing, store) = (ledger.clone(), store.clone());
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match syncing.sync(&store, unix_ms()).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "live-session counts not synced; counting locally until the store answers");
                }
                Err(_) => {}
            }
        }
    });
    ledger
}

/// The API keys: the configured ones and the store's.
fn watch_keys(store: &Store, configured: &[ApiKey]) -> Arc<arc_swap::ArcSwap<KeyRing>> {
    if configured.is_empty() {
        info!("no --api-key given: plans need a key created with `natrix apikey create`");
    }
    let keys = Arc::new(arc_swap::ArcSwap::from_pointee(static_ring(configured)));
    let swap = keys.clone();
    let configured = configured.to_vec();
    KeysWatcher::new(
        store.clone(),
        Duration::from_secs(1),
        Box::new(move |stored| {
            swap.store(Arc::new(static_ring(&configured).with(stored)));
        }),
    )
    .start();
    keys
}

/// The keys given on the command line, with every scope.
fn static_ring(keys: &[ApiKey]) -> KeyRing {
    KeyRing::new(keys.iter().map(|k| {
        (
            k.id().to_owned(),
            KeyRecord {
                name: "configured".to_owned(),
                scopes: Scope::ALL.to_vec(),
                digest: k.digest(),
                created_ms: 0,
                rate: None,
                max_sessions: None,
            },
        )
    }))
}

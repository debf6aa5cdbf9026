//! Cluster glue: the registry records this process publishes, and the
//! lookup role's snapshot keeper and HTTP API.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use anyhow::Context;
use natrix_lookup::api::Minting;
use natrix_lookup::http::LookupState;
use natrix_lookup::{LookupConfig, LookupMetrics};
use natrix_model::TurnSecret;
use natrix_registry::secrets::SecretsWatcher;
use natrix_registry::{
    HostRecord, Load, LoadSource, Publisher, Role, SnapshotKeeper, State, shared_snapshot, unix_ms,
};
use natrix_store::Store;
use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::core::Collector;
use tracing::info;

use crate::cli::Global;

/// This host's name, for generated ids.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// The IPv4 address this host's default route leaves from (no packet is
/// sent: connecting a UDP socket only picks the route).
fn primary_ipv4() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// The addresses clients use for `bound` listeners: a wildcard becomes
/// `public` (or this host's primary IPv4); IPv6 wildcards without a public
/// IPv6 are left out.
pub(crate) fn public_addrs(bound: &[SocketAddr], public: Option<IpAddr>) -> Vec<SocketAddr> {
    bound
        .iter()
        .filter_map(|a| {
            let ip = match (a.ip().is_unspecified(), public) {
                (_, Some(p)) if p.is_ipv4() == a.is_ipv4() => p,
                (false, _) => a.ip(),
                (true, _) if a.is_ipv4() => primary_ipv4()?,
                (true, _) => return None,
            };
            Some(SocketAddr::new(ip, a.port()))
        })
        .collect()
}

/// Sum of every series of a counter family.
fn family_total(t: &Telemetry, def: &'static natrix_telemetry::catalogue::MetricDef) -> f64 {
    t.counter_family(def)
        .collect()
        .iter()
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

/// The relay's load at each heartbeat: allocations from the loops, and
/// forwarded packets and bytes per second since the previous heartbeat.
pub(crate) fn relay_load(
    control: Arc<natrix_relay::control::Control>,
    telemetry: Telemetry,
) -> LoadSource {
    let last = std::sync::Mutex::new((std::time::Instant::now(), 0.0f64, 0.0f64));
    Box::new(move || {
        let packets = family_total(&telemetry, &cat::RELAY_FORWARDED_PACKETS_TOTAL);
        let bytes = family_total(&telemetry, &cat::RELAY_FORWARDED_BYTES_TOTAL);
        let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
        let secs = l.0.elapsed().as_secs_f64().max(0.001);
        let load = Load {
            allocations: control.allocations(),
            packets_per_second: (packets - l.1).max(0.0) / secs,
            bytes_per_second: (bytes - l.2).max(0.0) / secs,
        };
        *l = (std::time::Instant::now(), packets, bytes);
        let state = if telemetry.health().is_draining() {
            State::Draining
        } else {
            State::Active
        };
        (load, state)
    })
}

/// A CDX node's state at each heartbeat.
pub(crate) fn cdx_load(telemetry: Telemetry) -> LoadSource {
    Box::new(move || {
        let state = if telemetry.health().is_draining() {
            State::Draining
        } else {
            State::Active
        };
        (Load::default(), state)
    })
}

/// A record for this host (load and heartbeat filled in by the publisher).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    id: String,
    role: Role,
    global: &Global,
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    capacity: u64,
) -> HostRecord {
    HostRecord {
        id,
        role,
        region: global.region.clone(),
        zone: global.zone.clone(),
        udp,
        tcp,
        tls,
        capacity,
        load: Load::default(),
        state: State::Active,
        heartbeat_ms: 0,
        ttl_ms: 0,
        internal: Vec::new(),
    }
}

/// Starts heartbeating `record` into `store`.
pub(crate) fn publish(
    store: &Store,
    record: HostRecord,
    load: LoadSource,
    global: &Global,
    telemetry: &Telemetry,
) -> Addr<Publisher> {
    let beats = telemetry.counter_family(&cat::CLUSTER_REGISTRY_HEARTBEATS_TOTAL);
    let (ok, err) = (
        beats.with_label_values(&["ok"]),
        beats.with_label_values(&["error"]),
    );
    info!(id = %record.id, role = ?record.role, udp = ?record.udp, "registering in the cluster registry");
    Publisher::new(
        store.clone(),
        record,
        load,
        global.heartbeat,
        global.registry_ttl,
        Box::new(move |good| if good { ok.inc() } else { err.inc() }),
    )
    .start()
}

/// Starts the lookup role: the snapshot keeper and the HTTP API. Returns
/// the API server's handle and bound address.
pub(crate) fn start_lookup(
    store: &Store,
    config: &LookupConfig,
    turn_secrets: Vec<TurnSecret>,
    cluster_secret: &[u8],
    workers: usize,
    telemetry: &Telemetry,
) -> anyhow::Result<(actix_web::dev::ServerHandle, SocketAddr)> {
    let metrics = LookupMetrics::new(telemetry);
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
    let base = Minting {
        turn_secrets: turn_secrets.clone(),
        cluster_secret: cluster_secret.to_vec(),
        ttl: config.token_ttl.as_secs().max(60),
        headroom: config.headroom,
    };
    let minting = Arc::new(arc_swap::ArcSwap::from_pointee(base.clone()));
    // Rotated secrets from the store go first: tokens use the newest.
    {
        let minting = minting.clone();
        SecretsWatcher::new(
            store.clone(),
            Duration::from_secs(1),
            Box::new(move |stored| {
                let mut secrets: Vec<TurnSecret> = stored;
                secrets.extend(turn_secrets.iter().cloned());
                minting.store(Arc::new(Minting {
                    turn_secrets: secrets,
                    ..base.clone()
                }));
            }),
        )
        .start();
    }
    let state = LookupState {
        snapshot,
        minting,
        max_snapshot_age: config.max_snapshot_age,
        metrics,
        telemetry: telemetry.clone(),
    };
    let (server, addr) = natrix_lookup::http::serve(config.lookup_listen, workers, state)
        .with_context(|| format!("binding the lookup API on {}", config.lookup_listen))?;
    let handle = server.handle();
    actix_rt::spawn(server);
    info!(%addr, "lookup API up");
    Ok((handle, addr))
}

/// Feeds the store's TURN secrets to a relay's reload actor.
pub(crate) fn watch_relay_secrets(
    store: &Store,
    reload: Addr<natrix_relay::control::ReloadActor>,
) -> Addr<SecretsWatcher> {
    SecretsWatcher::new(
        store.clone(),
        Duration::from_secs(1),
        Box::new(move |secrets| {
            reload.do_send(natrix_relay::control::StoreSecrets(secrets));
        }),
    )
    .start()
}

/// Pairs a CDX node started with `--stun-sibling auto` with another node
/// of the registry, every second, following [`natrix_registry::sibling_index`]
/// over the live nodes listening on the same port.
pub(crate) struct SiblingPairer {
    store: Store,
    own_id: String,
    handle: natrix_cdx::service::SiblingHandle,
    in_flight: bool,
}

impl SiblingPairer {
    pub(crate) fn new(
        store: Store,
        own_id: String,
        handle: natrix_cdx::service::SiblingHandle,
    ) -> SiblingPairer {
        SiblingPairer {
            store,
            own_id,
            handle,
            in_flight: false,
        }
    }

    fn pair(&mut self, records: &[HostRecord]) {
        for primary in self.handle.pairable() {
            let on_port = |r: &HostRecord| {
                r.internal
                    .iter()
                    .find(|a| a.port() == primary.port() && a.is_ipv4() == primary.is_ipv4())
                    .copied()
            };
            let nodes: Vec<(&HostRecord, SocketAddr)> = records
                .iter()
                .filter_map(|r| on_port(r).map(|a| (r, a)))
                .collect();
            let Some(own) = nodes.iter().position(|(r, _)| r.id == self.own_id) else {
                continue;
            };
            let sibling = natrix_registry::sibling_index(nodes.len(), own).map(|i| {
                let (r, internal) = nodes[i];
                let public = r
                    .udp
                    .iter()
                    .find(|a| a.is_ipv4() == internal.is_ipv4())
                    .map_or(internal.ip(), |a| a.ip());
                (public, internal)
            });
            self.handle.set_sibling(primary, sibling);
        }
    }
}

impl Actor for SiblingPairer {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        use actix::{ActorFutureExt, AsyncContext, WrapFuture};
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            if act.in_flight {
                return;
            }
            act.in_flight = true;
            let store = act.store.clone();
            ctx.spawn(
                async move { natrix_registry::read_live(&store, Role::Cdx).await }
                    .into_actor(act)
                    .map(|r, act, _| {
                        act.in_flight = false;
                        if let Ok(records) = r {
                            act.pair(&records);
                        }
                    }),
            );
        });
    }
}

//! Cluster glue: the registry records this process publishes and the load
//! they report.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use actix::{Actor, Addr};
use natrix_registry::{HostRecord, Load, LoadSource, Publisher, Role, State};
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
            allocations: control.load(),
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
        dtls: Vec::new(),
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

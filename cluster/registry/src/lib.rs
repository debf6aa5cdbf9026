//! The cluster registry: which relay and CDX hosts exist, where they are,
//! how loaded, and whether they take new work.
//!
//! Each host runs a [`Publisher`] actor that writes its [`HostRecord`] into
//! the coordination store every heartbeat (default 1 s) with a TTL (default
//! 3 s); a host that stops heartbeating drops out of every reader's view when
//! its TTL passes — measured by the reader's own monotonic clock from the
//! last change of the heartbeat ([`Liveness`]), so hosts' wall clocks need
//! not agree. Readers (lookup) run a [`SnapshotKeeper`] actor that reads
//! the records at least every second and publishes an immutable
//! [`Snapshot`] through an [`ArcSwap`]: request handlers load it without a
//! lock and never call the store. When the store is unreachable the keeper
//! keeps the last snapshot and its age grows; callers decide how stale is
//! too stale.
//!
//! # Store layout
//!
//! One hash per role (`natrix:registry:relay`, `natrix:registry:cdx`), field
//! = host id, value = the record as JSON (with its heartbeat time and TTL).
//! Every heartbeat extends the hash's own TTL, so a cluster that is gone
//! leaves nothing behind; keepers delete records dead for a long time. One
//! key per role also means every operation touches a single key (Redis
//! Cluster friendly).

pub mod apikeys;
pub mod secrets;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use arc_swap::ArcSwap;
use natrix_store::Store;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, info_span, warn};

/// Most hosts per role a registry holds.
const MAX_HOSTS: usize = 10_000;
/// The hash's own TTL, extended by every heartbeat.
const KEY_TTL: Duration = Duration::from_secs(60);
/// Records dead this many TTLs are deleted by keepers.
const PRUNE_AFTER_TTLS: u64 = 20;

/// What a host does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A TURN relay.
    Relay,
    /// A CDX (STUN, discovery, exchange) node.
    Cdx,
}

impl Role {
    /// The store key of this role's records.
    pub fn key(self) -> &'static str {
        match self {
            Role::Relay => "natrix:registry:relay",
            Role::Cdx => "natrix:registry:cdx",
        }
    }
}

/// Whether a host takes new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Takes new sessions.
    Active,
    /// Finishing what it has; gets nothing new.
    Draining,
}

/// A host's live load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Live allocations (relay) or exchange sessions (CDX).
    pub allocations: u64,
    /// Packets per second relayed (or answered).
    pub packets_per_second: f64,
    /// Bytes per second relayed (or answered).
    pub bytes_per_second: f64,
}

/// One host as the registry knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Unique id (the relay id in session tokens).
    pub id: String,
    /// What it does.
    pub role: Role,
    /// Region (e.g. `eu-west-1`); empty when unknown.
    #[serde(default)]
    pub region: String,
    /// Zone within the region; empty when unknown.
    #[serde(default)]
    pub zone: String,
    /// Public UDP addresses clients use.
    #[serde(default)]
    pub udp: Vec<SocketAddr>,
    /// Public TCP addresses.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// Public TLS addresses.
    #[serde(default)]
    pub tls: Vec<SocketAddr>,
    /// Public DTLS addresses (UDP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dtls: Vec<SocketAddr>,
    /// Most allocations it accepts.
    pub capacity: u64,
    /// Live load.
    #[serde(default)]
    pub load: Load,
    /// Active or draining.
    pub state: State,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_ms: u64,
    /// How long after a heartbeat the record counts as alive.
    pub ttl_ms: u64,
    /// The addresses the host's sockets are bound to, for traffic between
    /// nodes (e.g. RFC 5780 sibling hand-offs) when they differ from the
    /// public ones.
    #[serde(default)]
    pub internal: Vec<SocketAddr>,
}

impl HostRecord {
    /// True while the last heartbeat is younger than the TTL.
    pub fn alive(&self, now_ms: u64) -> bool {
        now_ms < self.heartbeat_ms.saturating_add(self.ttl_ms)
    }

    /// Allocations over capacity (1.0 = full).
    pub fn utilisation(&self) -> f64 {
        if self.capacity == 0 {
            1.0
        } else {
            self.load.allocations as f64 / self.capacity as f64
        }
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a reader sees: the live hosts at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Live relays (heartbeat within TTL), active or draining.
    pub relays: Vec<HostRecord>,
    /// Live CDX nodes.
    pub cdx: Vec<HostRecord>,
    /// Unix ms of the read this snapshot came from (0: never read).
    pub taken_ms: u64,
}

impl Snapshot {
    /// Seconds since the snapshot was read from the store (infinite if
    /// never).
    pub fn age(&self, now_ms: u64) -> Duration {
        if self.taken_ms == 0 {
            Duration::MAX
        } else {
            Duration::from_millis(now_ms.saturating_sub(self.taken_ms))
        }
    }
}

/// The shared, lock-free snapshot.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// An empty shared snapshot (never read).
pub fn shared_snapshot() -> SharedSnapshot {
    Arc::new(ArcSwap::from_pointee(Snapshot::default()))
}

/// Called after every heartbeat or refresh with its result (for metrics).
pub type Observer = Box<dyn Fn(bool) + Send>;

/// Supplies a host's current load and state at each heartbeat.
pub type LoadSource = Box<dyn Fn() -> (Load, State) + Send>;

/// Heartbeats one host's record into the store.
pub struct Publisher {
    store: Store,
    record: HostRecord,
    load: LoadSource,
    interval: Duration,
    observe: Observer,
    span: tracing::Span,
    forced: Option<State>,
    stopped: bool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("id", &self.record.id)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher of `record` (its load and state filled in by `load` at
    /// each heartbeat), every `interval`, alive for `ttl` after each.
    pub fn new(
        store: Store,
        mut record: HostRecord,
        load: LoadSource,
        interval: Duration,
        ttl: Duration,
        observe: Observer,
    ) -> Publisher {
        record.ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let span = info_span!("registry", id = %record.id, role = ?record.role);
        Publisher {
            store,
            record,
            load,
            interval,
            observe,
            span,
            forced: None,
            stopped: false,
        }
    }

    fn publish(&mut self, ctx: &mut Context<Self>) {
        if self.stopped {
            return;
        }
        let (load, state) = (self.load)();
        self.record.load = load;
        self.record.state = self.forced.unwrap_or(state);
        self.record.heartbeat_ms = unix_ms();
        let Ok(json) = serde_json::to_vec(&self.record) else {
            return;
        };
        let store = self.store.clone();
        let key = self.record.role.key();
        let id = self.record.id.clone();
        ctx.spawn(
            async move { store.put_field(key, &id, &json, KEY_TTL, MAX_HOSTS).await }
                .into_actor(self)
                .map(|r, act, _| {
                    let ok = matches!(
                        r,
                        Ok(natrix_store::PutField::Inserted | natrix_store::PutField::Updated)
                    );
                    if let Err(e) = &r {
                        debug!(parent: &act.span, error = %e, "heartbeat failed");
                    }
                    (act.observe)(ok);
                }),
        );
    }
}

impl Actor for Publisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(parent: &self.span, store = self.store.kind(), "registering");
        self.publish(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.publish(ctx));
    }
}

/// Sets the published state now (e.g. draining on SIGTERM) and keeps it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetState(pub State);

impl Handler<SetState> for Publisher {
    type Result = ();
    fn handle(&mut self, msg: SetState, ctx: &mut Context<Self>) {
        info!(parent: &self.span, state = ?msg.0, "state change");
        self.forced = Some(msg.0);
        self.publish(ctx);
    }
}

/// Removes the record (a clean shutdown); answers once the store did.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deregister;

impl Handler<Deregister> for Publisher {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Deregister, ctx: &mut Context<Self>) -> Self::Result {
        // No heartbeat may re-add the record after this.
        self.stopped = true;
        let _ = ctx;
        let store = self.store.clone();
        let key = self.record.role.key();
        let id = self.record.id.clone();
        Box::pin(
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), store.delete_field(key, &id))
                    .await;
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                info!(parent: &act.span, "deregistered");
                ctx.stop();
            }),
        )
    }
}

/// Parses a role's records (fields written by something else are ignored).
fn parse_records(fields: Vec<(String, Vec<u8>)>) -> Vec<(String, HostRecord)> {
    fields
        .into_iter()
        .filter_map(|(id, json)| Some((id, serde_json::from_slice::<HostRecord>(&json).ok()?)))
        .collect()
}

/// Which records are alive, judged by the reader's own monotonic clock:
/// a record lives while its heartbeat keeps changing within its TTL, so
/// hosts whose wall clocks disagree with the reader's (by more than the
/// TTL, either way) are neither dropped while they beat nor kept after
/// they stop. A record seen for the first time is judged by its heartbeat
/// time against the reader's wall clock once.
#[derive(Debug, Default)]
pub struct Liveness {
    /// Per field id: the heartbeat last seen and when it changed.
    seen: HashMap<String, (u64, Instant)>,
}

impl Liveness {
    /// A tracker with nothing seen yet.
    pub fn new() -> Liveness {
        Liveness::default()
    }

    /// The live records of one read (sorted by id) and the ids of records
    /// dead for [`PRUNE_AFTER_TTLS`] TTLs (to delete). `now` is the reader's
    /// monotonic clock, `now_ms` its wall clock (first sightings only).
    pub fn judge(
        &mut self,
        records: Vec<(String, HostRecord)>,
        now: Instant,
        now_ms: u64,
    ) -> (Vec<HostRecord>, Vec<String>) {
        let mut live = Vec::new();
        let mut dead = Vec::new();
        let mut present = std::collections::HashSet::new();
        for (id, r) in records {
            let ttl = Duration::from_millis(r.ttl_ms);
            let since = match self.seen.get(&id) {
                Some(&(beat, at)) if beat == r.heartbeat_ms => at,
                Some(_) => now,
                // First sighting: as old as its heartbeat says, by the
                // reader's wall clock.
                None => {
                    let age = Duration::from_millis(now_ms.saturating_sub(r.heartbeat_ms));
                    now.checked_sub(age).unwrap_or(now)
                }
            };
            self.seen.insert(id.clone(), (r.heartbeat_ms, since));
            present.insert(id.clone());
            let silent = now.saturating_duration_since(since);
            if silent < ttl {
                live.push(r);
            } else if silent >= ttl.saturating_mul(u32::try_from(PRUNE_AFTER_TTLS).unwrap_or(20)) {
                dead.push(id);
            }
        }
        // Forget records that are gone from the store.
        self.seen.retain(|id, _| present.contains(id));
        live.sort_by(|a, b| a.id.cmp(&b.id));
        (live, dead)
    }
}

/// Every parseable record of `role`, with its field id (one store read).
pub async fn read_records(
    store: &Store,
    role: Role,
) -> Result<Vec<(String, HostRecord)>, natrix_store::StoreError> {
    Ok(parse_records(store.fields(role.key()).await?))
}

/// RFC 5780 sibling pairing over the live CDX nodes sorted by id: 0↔1,
/// 2↔3, …; with an odd count the last pairs with the first (which then
/// serves two nodes' hand-offs). `None` when alone.
pub fn sibling_index(count: usize, own: usize) -> Option<usize> {
    if count < 2 || own >= count {
        return None;
    }
    if own % 2 == 1 {
        Some(own - 1)
    } else if own + 1 < count {
        Some(own + 1)
    } else {
        Some(0)
    }
}

/// Reads the registry into a [`SharedSnapshot`] every interval.
pub struct SnapshotKeeper {
    store: Store,
    shared: SharedSnapshot,
    interval: Duration,
    observe: Observer,
    span: tracing::Span,
    in_flight: bool,
    relays: Liveness,
    cdx: Liveness,
}

impl std::fmt::Debug for SnapshotKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotKeeper").finish_non_exhaustive()
    }
}

impl SnapshotKeeper {
    /// A keeper refreshing `shared` from `store` every `interval`.
    pub fn new(
        store: Store,
        shared: SharedSnapshot,
        interval: Duration,
        observe: Observer,
    ) -> SnapshotKeeper {
        SnapshotKeeper {
            store,
            shared,
            interval,
            observe,
            span: info_span!("registry_snapshot"),
            in_flight: false,
            relays: Liveness::new(),
            cdx: Liveness::new(),
        }
    }

    /// Deletes records dead for long (in the background; a failure only
    /// means another try at the next refresh).
    fn prune(&mut self, relays: Vec<String>, cdx: Vec<String>, ctx: &mut Context<Self>) {
        if relays.is_empty() && cdx.is_empty() {
            return;
        }
        let store = self.store.clone();
        ctx.spawn(
            async move {
                for id in relays {
                    let _ = store.delete_field(Role::Relay.key(), &id).await;
                }
                for id in cdx {
                    let _ = store.delete_field(Role::Cdx.key(), &id).await;
                }
            }
            .into_actor(self),
        );
    }

    fn refresh(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight {
            // A slow store: never stack reads.
            return;
        }
        self.in_flight = true;
        let store = self.store.clone();
        let reads = async move {
            let relays = read_records(&store, Role::Relay).await?;
            let cdx = read_records(&store, Role::Cdx).await?;
            Ok::<_, natrix_store::StoreError>((relays, cdx))
        };
        ctx.spawn(
            reads
            .into_actor(self)
            .map(|r, act, ctx| {
                act.in_flight = false;
                match r {
                    Ok((relays, cdx)) => {
                        let (now, now_ms) = (Instant::now(), unix_ms());
                        let (relays, dead_relays) = act.relays.judge(relays, now, now_ms);
                        let (cdx, dead_cdx) = act.cdx.judge(cdx, now, now_ms);
                        act.prune(dead_relays, dead_cdx, ctx);
                        act.shared.store(Arc::new(Snapshot {
                            relays,
                            cdx,
                            taken_ms: now_ms,
                        }));
                        (act.observe)(true);
                    }
                    Err(e) => {
                        warn!(parent: &act.span, error = %e, "registry refresh failed; serving the last snapshot");
                        (act.observe)(false);
                    }
                }
            }),
        );
    }
}

impl Actor for SnapshotKeeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refresh(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.refresh(ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, heartbeat_ms: u64) -> HostRecord {
        HostRecord {
            id: id.into(),
            role: Role::Relay,
            region: "eu".into(),
            zone: String::new(),
            udp: vec!["192.0.2.1:3478".parse().unwrap()],
            tcp: vec![],
            tls: vec![],
            dtls: vec![],
            capacity: 100,
            load: Load::default(),
            state: State::Active,
            heartbeat_ms,
            ttl_ms: 3000,
            internal: Vec::new(),
        }
    }

    #[test]
    fn records_live_for_their_ttl_and_are_pruned_long_after() {
        let fields = vec![
            (
                "a".into(),
                serde_json::to_vec(&record("a", 10_000)).unwrap(),
            ),
            ("b".into(), serde_json::to_vec(&record("b", 5_000)).unwrap()),
            ("c".into(), b"not json".to_vec()),
        ];
        let t0 = Instant::now();
        let mut l = Liveness::new();
        let (live, dead) = l.judge(parse_records(fields.clone()), t0, 12_999);
        assert_eq!(
            live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert!(dead.is_empty(), "b is dead but not for long");
        let later = t0 + Duration::from_millis(3000 * 20);
        let (live, dead) = l.judge(parse_records(fields), later, 12_999 + 3000 * 20);
        assert!(live.is_empty());
        assert_eq!(dead, ["a", "b"], "both silent for 20 TTLs");
    }

    /// Liveness does not depend on the hosts' wall clocks: a host whose
    /// clock is a minute behind lives while it beats, one a minute ahead
    /// dies a TTL after it stops.
    #[test]
    fn liveness_follows_changing_heartbeats_not_the_hosts_clocks() {
        let t0 = Instant::now();
        let reader_ms = 1_000_000;
        let mut l = Liveness::new();
        let fields = |behind: u64, ahead: u64| {
            parse_records(vec![
                (
                    "slow".into(),
                    serde_json::to_vec(&record("slow", behind)).unwrap(),
                ),
                (
                    "fast".into(),
                    serde_json::to_vec(&record("fast", ahead)).unwrap(),
                ),
            ])
        };
        let ids = |v: &[HostRecord]| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        // First sight by the wall clock: the slow one looks old.
        let (live, _) = l.judge(
            fields(reader_ms - 60_000, reader_ms + 60_000),
            t0,
            reader_ms,
        );
        assert_eq!(ids(&live), ["fast"]);
        // Both beat: both live, whatever their clocks say.
        let t1 = t0 + Duration::from_secs(1);
        let (live, _) = l.judge(
            fields(reader_ms - 59_000, reader_ms + 61_000),
            t1,
            reader_ms + 1000,
        );
        assert_eq!(ids(&live), ["fast", "slow"]);
        // The fast one stops; 2 s later it is still live, after 3 s not.
        let t2 = t1 + Duration::from_secs(1);
        let (live, _) = l.judge(
            fields(reader_ms - 58_000, reader_ms + 61_000),
            t2,
            reader_ms + 2000,
        );
        assert_eq!(ids(&live), ["fast", "slow"]);
        let t4 = t1 + Duration::from_secs(3);
        let (live, _) = l.judge(
            fields(reader_ms - 56_000, reader_ms + 61_000),
            t4,
            reader_ms + 4000,
        );
        assert_eq!(ids(&live), ["slow"], "stopped beating a TTL ago");
    }

    #[test]
    fn siblings_pair_up_and_an_odd_one_joins_the_first() {
        assert_eq!(sibling_index(1, 0), None);
        assert_eq!(
            (sibling_index(2, 0), sibling_index(2, 1)),
            (Some(1), Some(0))
        );
        let three: Vec<_> = (0..3).map(|i| sibling_index(3, i)).collect();
        assert_eq!(three, [Some(1), Some(0), Some(0)]);
        assert_eq!(sibling_index(4, 3), Some(2));
    }

    #[test]
    fn records_round_trip_as_json_and_tolerate_new_fields() {
        let r = record("relay-1", 1);
        let mut v = serde_json::to_value(&r).unwrap();
        v["future_field"] = 42.into();
        let back: HostRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}

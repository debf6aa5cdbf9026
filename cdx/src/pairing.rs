//! `--stun-sibling auto`: RFC 5780 across one-IP nodes, paired through the
//! cluster registry.

use std::net::SocketAddr;
use std::time::Duration;

use actix::Actor;
use natrix_registry::{HostRecord, Role};
use natrix_store::Store;

/// Pairs a CDX node started with `--stun-sibling auto` with another node
/// of the registry, every second, following [`natrix_registry::sibling_index`]
/// over the live nodes listening on the same port.
pub struct SiblingPairer {
    store: Store,
    own_id: String,
    handle: crate::service::SiblingHandle,
    in_flight: bool,
    /// Which nodes are alive, by this node's own clock.
    liveness: natrix_registry::Liveness,
}

impl SiblingPairer {
    /// A pairer for the node registered as `own_id`.
    pub fn new(
        store: Store,
        own_id: String,
        handle: crate::service::SiblingHandle,
    ) -> SiblingPairer {
        SiblingPairer {
            store,
            own_id,
            handle,
            in_flight: false,
            liveness: natrix_registry::Liveness::new(),
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
                async move { natrix_registry::read_records(&store, Role::Cdx).await }
                    .into_actor(act)
                    .map(|r, act, _| {
                        act.in_flight = false;
                        if let Ok(records) = r {
                            let now = (std::time::Instant::now(), natrix_registry::unix_ms());
                            let (live, _) = act.liveness.judge(records, now.0, now.1);
                            act.pair(&live);
                        }
                    }),
            );
        });
    }
}

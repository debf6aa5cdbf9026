//! The UDP loop: one per socket, batched receive, answers in place.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use natrix_model::limiter::{UnauthLimiter, UnauthLimits};
use natrix_net::{RecvBatch, SendBatch, UdpIo};
use tokio::sync::watch;
use tokio::time::{MissedTickBehavior, interval};
use tracing::debug;

use super::FLUSH_INTERVAL;
use prometheus::IntCounter;

use crate::binding::{BindingResponder, DropReason, Outcome, Site, Transport, Via};
use crate::exchange::{self, ExchangeSender, Local};
use crate::handoff;
use crate::metrics::CdxMetrics;

/// Largest datagram read; anything longer is truncated by the kernel and then
/// fails to parse (STUN requests are far smaller).
const MAX_DATAGRAM: usize = 2048;

/// The socket of each RFC 5780 cell that sends answers routed to it,
/// indexed `[ip][port]`.
pub(super) type Senders = [[Option<Arc<UdpIo>>; 2]; 2];

/// Where a loop sits and what it may answer.
pub(super) struct LoopSetup {
    /// RFC 5780: the grid and this socket's place in it.
    pub(super) site: Option<Site>,
    /// The sockets of the other cells, for answers routed to them.
    pub(super) senders: Arc<Senders>,
    /// The sibling for change-IP requests, in sibling mode.
    pub(super) handoff: Option<Arc<HandoffPeer>>,
    /// With `--stun-sibling auto`: the current pairing, replacing `site`'s
    /// grid and `handoff` from one batch to the next.
    pub(super) dynamic: Option<Arc<arc_swap::ArcSwap<Paired>>>,
    /// Caps on answers per source prefix and in total.
    pub(super) limits: UnauthLimits,
    /// Where exchange messages go, and the counter of those dropped
    /// because the exchange actor is behind.
    pub(super) exchange: Option<(ExchangeSender, IntCounter)>,
}

/// A run-time pairing: the grid with the sibling's IP, and the hand-off
/// peer.
#[derive(Debug)]
pub(super) struct Paired {
    pub(super) grid: crate::Grid,
    pub(super) handoff: Option<Arc<HandoffPeer>>,
}

/// The sibling node that serves this node's change-IP requests.
#[derive(Debug)]
pub(super) struct HandoffPeer {
    pub(super) key: ring::hmac::Key,
    /// The sibling's primary STUN address.
    pub(super) sibling: SocketAddr,
    pub(super) sent: IntCounter,
    pub(super) answered: IntCounter,
    pub(super) rejected: IntCounter,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs until `shutdown` flips. Priorities per wake-up: shutdown, counter
/// flush, one batch of datagrams. With `site` (RFC 5780), answers may leave
/// from another socket of the grid or go to another port of the client.
pub(super) async fn run(
    io: Arc<UdpIo>,
    setup: LoopSetup,
    responder: Arc<BindingResponder>,
    metrics: CdxMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = RecvBatch::for_socket(&io, MAX_DATAGRAM);
    let mut out = [0u8; 1500];
    let LoopSetup {
        mut site,
        senders,
        mut handoff,
        dynamic,
        limits,
        exchange,
    } = setup;
    let mut sealed = [0u8; 2048];
    let mut replies = SendBatch::new(quinn_udp::BATCH_SIZE * 4);
    let wildcard = io.local_addr().ip().is_unspecified();
    let mut limiter = UnauthLimiter::new(limits, std::time::Instant::now());
    let mut counters = metrics.local(Transport::Udp);
    let mut flush = interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = flush.tick() => {
                counters.flush();
                limiter.sweep(std::time::Instant::now());
            }
            received = io.recv_batch(&mut batch) => {
                if let Err(e) = received {
                    // ICMP errors for earlier sends surface here on some
                    // kernels; they concern one peer, not the socket.
                    debug!(error = %e, local = %io.local_addr(), "UDP receive error");
                    continue;
                }
                if let (Some(cell), Some(s)) = (&dynamic, site.as_mut()) {
                    let paired = cell.load();
                    s.grid = paired.grid;
                    handoff.clone_from(&paired.handoff);
                }
                for d in batch.datagrams() {
                    // A sibling handing us a change-IP request it cannot serve.
                    if let (Some(h), Some(site)) = (&handoff, site)
                        && handoff::is_handoff(d.payload) {
                            answer_handoff(h, site, &senders, &io, &responder, d.payload, &mut out).await;
                            continue;
                        }
                    // Exchange posts and acknowledgements go to the actor;
                    // the loop never waits for it.
                    if let Some((sender, overloaded)) = &exchange
                        && exchange::is_exchange(d.payload)
                    {
                        counters.record_exchange(d.payload.len());
                        if !limiter.allow(d.from.ip(), std::time::Instant::now()) {
                            counters.dropped(DropReason::RateLimited);
                        } else {
                            let local = Local {
                                bound: io.local_addr(),
                                dst_ip: if wildcard { d.to_ip } else { None },
                                stream: None,
                            };
                            if !sender.offer(d.payload, d.from, local) {
                                overloaded.inc();
                            }
                        }
                        continue;
                    }
                    let mut outcome = responder.handle_at(d.payload, d.from, site, &mut out);
                    if matches!(outcome, Outcome::Reply { .. })
                        && !limiter.allow(d.from.ip(), std::time::Instant::now())
                    {
                        outcome = Outcome::Drop(DropReason::RateLimited);
                    }
                    counters.record(d.payload.len(), &outcome);
                    // Our change-IP answers come from the sibling's address.
                    if let (Some(h), Some(site), Outcome::Reply { route: Some((via, _)), .. }) =
                        (&handoff, site, outcome)
                        && !site.grid.is_local(via) {
                            if let Some(n) = handoff::seal(&h.key, unix_ms(), site.arrived.port, d.from, d.payload, &mut sealed)
                                && io.send_to(&sealed[..n], h.sibling, None).await.is_ok() {
                                    h.sent.inc();
                                }
                            continue;
                        }
                    if let Outcome::Reply { len, route, .. } = outcome {
                        let Some((via, to)) = route else {
                            // The common case: answer the sender from this
                            // socket, batched (sendmmsg, GSO) after the loop.
                            let from_ip = if wildcard { d.to_ip } else { None };
                            if replies.is_full() {
                                for _ in 0..replies.flush(io.fd()) {
                                    counters.send_failed();
                                }
                            }
                            replies.push_from(d.from, from_ip, &out[..len]);
                            counters.sent(len);
                            continue;
                        };
                        let sender = senders[via.ip][via.port].as_ref().unwrap_or(&io);
                        match sender.send_to(&out[..len], to, None).await {
                            Ok(()) => counters.sent(len),
                            Err(e) => {
                                counters.send_failed();
                                debug!(error = %e, %to, "UDP send error");
                            }
                        }
                    }
                }
                for _ in 0..replies.flush(io.fd()) {
                    counters.send_failed();
                }
            }
        }
    }
    counters.flush();
}

/// Answers a request a sibling handed over: as if it had arrived on the
/// sibling's socket (our alternate IP), the change brings it to one of ours.
async fn answer_handoff(
    h: &HandoffPeer,
    site: Site,
    senders: &Senders,
    io: &Arc<UdpIo>,
    responder: &BindingResponder,
    packet: &[u8],
    out: &mut [u8],
) {
    let Ok(handed) = handoff::open(&h.key, unix_ms(), packet) else {
        h.rejected.inc();
        return;
    };
    let arrived = Via {
        ip: 1,
        port: handed.arrived_port,
    };
    let outcome = responder.handle_at(
        handed.request,
        handed.client,
        Some(Site {
            grid: site.grid,
            arrived,
        }),
        out,
    );
    let Outcome::Reply { len, route, .. } = outcome else {
        h.rejected.inc();
        return;
    };
    let (via, to) = route.unwrap_or((arrived, handed.client));
    if !site.grid.is_local(via) {
        // Asked to answer from the sibling's own address: not ours to do.
        h.rejected.inc();
        return;
    }
    let sender = senders[via.ip][via.port].as_ref().unwrap_or(io);
    if sender.send_to(&out[..len], to, None).await.is_ok() {
        h.answered.inc();
    }
}

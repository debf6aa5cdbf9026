//! The UDP loop: one per socket, batched receive, answers in place.

use std::sync::Arc;

use natrix_net::{RecvBatch, UdpIo};
use tokio::sync::watch;
use tokio::time::{MissedTickBehavior, interval};
use tracing::debug;

use super::FLUSH_INTERVAL;
use crate::binding::{BindingResponder, Outcome, Site, Transport};
use crate::metrics::CdxMetrics;

/// Largest datagram read; anything longer is truncated by the kernel and then
/// fails to parse (STUN requests are far smaller).
const MAX_DATAGRAM: usize = 2048;

/// The socket of each RFC 5780 cell that sends answers routed to it,
/// indexed `[ip][port]`.
pub(super) type Senders = [[Option<Arc<UdpIo>>; 2]; 2];

/// Runs until `shutdown` flips. Priorities per wake-up: shutdown, counter
/// flush, one batch of datagrams. With `site` (RFC 5780), answers may leave
/// from another socket of the grid or go to another port of the client.
pub(super) async fn run(
    io: Arc<UdpIo>,
    site: Option<Site>,
    senders: Arc<Senders>,
    responder: Arc<BindingResponder>,
    metrics: CdxMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = RecvBatch::for_socket(&io, MAX_DATAGRAM);
    let mut out = [0u8; 1500];
    let mut counters = metrics.local(Transport::Udp);
    let mut flush = interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = flush.tick() => counters.flush(),
            received = io.recv_batch(&mut batch) => {
                if let Err(e) = received {
                    // ICMP errors for earlier sends surface here on some
                    // kernels; they concern one peer, not the socket.
                    debug!(error = %e, local = %io.local_addr(), "UDP receive error");
                    continue;
                }
                for d in batch.datagrams() {
                    let outcome = responder.handle_at(d.payload, d.from, site, &mut out);
                    counters.record(d.payload.len(), &outcome);
                    if let Outcome::Reply { len, route, .. } = outcome {
                        let (sender, to) = match route {
                            Some((via, to)) => (senders[via.ip][via.port].as_ref().unwrap_or(&io), to),
                            None => (&io, d.from),
                        };
                        let from_ip = if route.is_some() { None } else { d.to_ip };
                        match sender.send_to(&out[..len], to, from_ip).await {
                            Ok(()) => counters.sent(len),
                            Err(e) => {
                                counters.send_failed();
                                debug!(error = %e, to = %d.from, "UDP send error");
                            }
                        }
                    }
                }
            }
        }
    }
    counters.flush();
}

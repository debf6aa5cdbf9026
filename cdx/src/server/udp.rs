//! The UDP loop: one per socket, batched receive, answers in place.

use std::sync::Arc;

use natrix_net::{RecvBatch, UdpIo};
use tokio::sync::watch;
use tokio::time::{MissedTickBehavior, interval};
use tracing::debug;

use super::FLUSH_INTERVAL;
use crate::binding::{BindingResponder, Outcome, Transport};
use crate::metrics::CdxMetrics;

/// Largest datagram read; anything longer is truncated by the kernel and then
/// fails to parse (STUN requests are far smaller).
const MAX_DATAGRAM: usize = 2048;

/// Runs until `shutdown` flips. Priorities per wake-up: shutdown, counter
/// flush, one batch of datagrams.
pub(super) async fn run(
    io: UdpIo,
    responder: Arc<BindingResponder>,
    metrics: CdxMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = RecvBatch::for_socket(&io, MAX_DATAGRAM);
    let mut out = [0u8; 1280];
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
                    let outcome = responder.handle(d.payload, d.from, &mut out);
                    counters.record(d.payload.len(), &outcome);
                    if let Outcome::Reply { len, .. } = outcome {
                        match io.send_to(&out[..len], d.from, d.to_ip).await {
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

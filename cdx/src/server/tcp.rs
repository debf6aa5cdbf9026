//! STUN over TCP (RFC 8489 §6.2.2): an acceptor with a connection limit and
//! one task per connection that cuts frames out of the byte stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use natrix_wire::frame_len;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::binding::{BindingResponder, DropReason, Outcome, Transport};
use crate::exchange::{self, ExchangeSender, Local};
use crate::metrics::CdxMetrics;

/// Exchange messages on TCP go to the actor, which answers through the
/// connection (clients that cannot send UDP still exchange).
#[derive(Clone, Debug)]
pub(super) struct StreamExchange {
    pub(super) sender: ExchangeSender,
    pub(super) overloaded: prometheus::IntCounter,
    pub(super) bound: SocketAddr,
}

static NEXT_STREAM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Largest STUN frame accepted on a stream; a longer one closes the
/// connection.
const MAX_FRAME: usize = 4096;

/// Per-listener limits.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub(super) max_connections: usize,
    pub(super) idle_timeout: Duration,
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    responder: Arc<BindingResponder>,
    metrics: CdxMetrics,
    exchange: Option<StreamExchange>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        metrics.tcp_rejected.inc();
                        drop(stream);
                        continue;
                    };
                    metrics.tcp_accepted.inc();
                    metrics.tcp_connections.inc();
                    let _ = stream.set_nodelay(true);
                    let responder = responder.clone();
                    let metrics = metrics.clone();
                    let shutdown = shutdown.clone();
                    let exchange = exchange.clone();
                    tokio::spawn(async move {
                        serve(stream, peer, limits.idle_timeout, &responder, &metrics, exchange, shutdown).await;
                        metrics.tcp_connections.dec();
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    warn!(error = %e, "accepting a STUN TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    idle: Duration,
    responder: &BindingResponder,
    metrics: &CdxMetrics,
    exchange: Option<StreamExchange>,
    mut shutdown: watch::Receiver<bool>,
) {
    let id = NEXT_STREAM.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // What the exchange actor sends this participant (answers, deliveries).
    let (reply_tx, mut reply_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let mut counters = metrics.local(Transport::Tcp);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut filled = 0;
    let mut out = [0u8; 1280];
    loop {
        // Answer every complete frame buffered so far.
        loop {
            let n = match frame_len(&buf[..filled]) {
                Ok(None) => break,
                Ok(Some(n)) if n > MAX_FRAME => {
                    counters.dropped(DropReason::Oversized);
                    debug!(%peer, frame = n, "oversized STUN frame; closing");
                    return;
                }
                Ok(Some(n)) if n > filled => break,
                Ok(Some(n)) => n,
                Err(_) => {
                    // The stream lost framing: nothing after this can be trusted.
                    counters.dropped(DropReason::NotStun);
                    debug!(%peer, "not STUN over TCP; closing");
                    return;
                }
            };
            if let Some(x) = &exchange
                && exchange::is_exchange(&buf[..n])
            {
                counters.record_exchange(n);
                let local = Local {
                    bound: x.bound,
                    dst_ip: None,
                    stream: Some(id),
                };
                if !x
                    .sender
                    .offer_from_stream(&buf[..n], peer, local, Some(reply_tx.clone()))
                {
                    x.overloaded.inc();
                }
                buf.copy_within(n..filled, 0);
                filled -= n;
                continue;
            }
            let outcome = responder.handle(&buf[..n], peer, &mut out);
            counters.record(n, &outcome);
            if let Outcome::Reply { len, .. } = outcome {
                match timeout(idle, stream.write_all(&out[..len])).await {
                    Ok(Ok(())) => counters.sent(len),
                    _ => {
                        counters.send_failed();
                        return;
                    }
                }
            }
            buf.copy_within(n..filled, 0);
            filled -= n;
        }
        counters.flush();
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            Some(message) = reply_rx.recv() => {
                match timeout(idle, stream.write_all(&message)).await {
                    Ok(Ok(())) => counters.sent(message.len()),
                    _ => {
                        counters.send_failed();
                        return;
                    }
                }
            }
            read = timeout(idle, stream.read(&mut buf[filled..])) => match read {
                Ok(Ok(0)) | Err(_) => return,
                Ok(Ok(n)) => filled += n,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "STUN TCP read error");
                    return;
                }
            },
        }
    }
}

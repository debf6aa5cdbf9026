//! The contract between a packet host (the relay's `mio` loops) and a STUN
//! service it carries on its listeners (CDX: Binding, RFC 5780 and the
//! connection-data exchange).
//!
//! The host owns the sockets, the readiness loop, the stream framing and
//! the batched sends; the service decides what to answer. One service
//! value lives in each loop (made by a [`StunServiceFactory`] with the
//! loop's [`LoopContext`]), so nothing on the packet path is shared between
//! loops. Frames a service produces later, off the packet path (the
//! exchange's answers and deliveries on a TCP or TLS connection), reach
//! the connection's loop through its [`StreamMailbox`]: a bounded queue
//! plus the loop's waker, drained between batches.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use natrix_model::Transport;

/// A TCP or TLS connection of a host, unique in the process for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    /// A fresh id (taken when a connection is accepted, never per packet).
    pub fn next() -> ConnId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ConnId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// Where a datagram arrived: the listener's bound address and, on a
/// wildcard listener, the destination IP the client used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The bound address of the listener socket.
    pub bound: SocketAddr,
    /// The datagram's destination IP (wildcard listeners only).
    pub to_ip: Option<IpAddr>,
}

/// What to do with a datagram's answer, written into the host's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Nothing to send.
    None,
    /// `len` bytes back to the sender, from the socket and address it used
    /// (batched with the other answers of the batch).
    Reply(usize),
    /// `len` bytes to `to`, from the host's listener bound to `from` (an
    /// RFC 5780 cell, or the receiving one for a hand-off to a sibling).
    Route {
        /// Length of the answer.
        len: usize,
        /// The bound address of the listener to send from.
        from: SocketAddr,
        /// The destination.
        to: SocketAddr,
    },
}

/// What a host tells its service about the connections and sends it made
/// for it (counted by the service when it owns the listeners).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// A connection was accepted.
    StreamOpened(Transport),
    /// A connection was refused at the connection limit.
    StreamRefused,
    /// A connection closed (by either side, or idle).
    StreamClosed(ConnId, Transport),
    /// A connection sent bytes that are not STUN framing (or a frame over
    /// the cap) and was closed (hosts without TURN only).
    StreamGarbage,
    /// Sends of the service's answers that failed.
    SendFailed(u64),
}

/// A STUN service carried by a host's loops.
pub trait StunService: Send {
    /// Handles a datagram from `from`; an answer goes into `out`.
    fn datagram(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        arrival: Arrival,
        out: &mut [u8],
    ) -> Answer;

    /// Handles a frame of connection `conn` from `from`, accepted on
    /// `local`; returns the length of an answer written into `out` (sent on
    /// the connection), or `None`. Later frames for the connection go
    /// through the loop's [`StreamMailbox`].
    fn frame(
        &mut self,
        packet: &[u8],
        conn: ConnId,
        transport: Transport,
        from: SocketAddr,
        local: SocketAddr,
        out: &mut [u8],
    ) -> Option<usize>;

    /// Something the host did on the service's behalf.
    fn event(&mut self, event: HostEvent) {
        let _ = event;
    }

    /// Publishes counters and sweeps limiters; called when the loop
    /// publishes its own.
    fn flush(&mut self) {}
}

/// What a service learns of the loop it runs in.
#[derive(Clone)]
pub struct LoopContext {
    /// The loop's index.
    pub shard: usize,
    /// Where frames for this loop's connections go.
    pub mailbox: StreamMailbox,
}

/// Makes one service per loop.
pub type StunServiceFactory = Arc<dyn Fn(LoopContext) -> Box<dyn StunService> + Send + Sync>;

/// One frame for one connection.
#[derive(Debug)]
pub struct Mail {
    /// The connection.
    pub conn: ConnId,
    /// A whole frame (a STUN message delimits itself on a stream).
    pub frame: Vec<u8>,
}

/// Why a frame could not be posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailError {
    /// The loop's queue is full: dropped, count it.
    Full,
    /// The loop stopped.
    Closed,
}

/// Frames for the connections of one loop, from outside it: a bounded
/// queue and the loop's waker (cheap to clone).
#[derive(Clone)]
pub struct StreamMailbox {
    tx: SyncSender<Mail>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for StreamMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMailbox").finish_non_exhaustive()
    }
}

impl StreamMailbox {
    /// A mailbox holding at most `capacity` frames, whose loop `wake`
    /// wakes; the loop drains the receiver.
    pub fn new(
        capacity: usize,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> (StreamMailbox, Receiver<Mail>) {
        let (tx, rx) = sync_channel(capacity);
        (StreamMailbox { tx, wake }, rx)
    }

    /// Queues `frame` for `conn` and wakes its loop; never blocks.
    pub fn post(&self, conn: ConnId, frame: Vec<u8>) -> Result<(), MailError> {
        match self.tx.try_send(Mail { conn, frame }) {
            Ok(()) => {
                (self.wake)();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(MailError::Full),
            Err(TrySendError::Disconnected(_)) => Err(MailError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_full_mailbox_refuses_and_a_posted_frame_wakes_the_loop_once() {
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let (mailbox, rx) = StreamMailbox::new(
            2,
            Arc::new(move || {
                w.fetch_add(1, Ordering::Relaxed);
            }),
        );
        assert_eq!(mailbox.post(ConnId(7), vec![1]), Ok(()));
        assert_eq!(mailbox.post(ConnId(7), vec![2]), Ok(()));
        assert_eq!(mailbox.post(ConnId(7), vec![3]), Err(MailError::Full));
        assert_eq!(woken.load(Ordering::Relaxed), 2);
        let frames: Vec<_> = rx.try_iter().map(|m| m.frame).collect();
        assert_eq!(frames, vec![vec![1], vec![2]]);
        drop(rx);
        assert_eq!(mailbox.post(ConnId(7), vec![4]), Err(MailError::Closed));
    }

    #[test]
    fn connection_ids_are_never_reused() {
        let a = ConnId::next();
        let b = ConnId::next();
        assert_ne!(a, b);
    }
}

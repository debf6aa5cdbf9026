//! TURN mobility across loops (RFC 8016).
//!
//! A client's 5-tuple picks its loop (SO_REUSEPORT's flow hash), so a client
//! whose address changed may reach another loop than the one holding its
//! allocation. The Refresh that carries its mobility ticket names the loop
//! that issued the ticket ([`ClientAction::Move`]); the loop it reached asks
//! that loop for the allocation, which checks the Refresh's signature
//! against the allocation's key and hands over the allocation and its
//! relayed socket. The allocation then lives where its client's packets
//! arrive, and the packet path stays local to one loop. Only this slow path
//! crosses loops: a bounded channel each, a wake-up, no lock.
//!
//! [`ClientAction::Move`]: crate::core::ClientAction::Move

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use crate::control::Control;
use crate::core::{ClientAction, ClientSocket, MovedAllocation, Server};

/// Transfers one loop's channel holds; past it a move is refused (the
/// client retries its Refresh).
const QUEUE: usize = 256;

/// What one loop sends another.
pub(super) enum Transfer {
    /// A client's Refresh with a ticket the receiving loop issued: give its
    /// allocation to loop `from_shard`.
    Ask {
        /// The asking loop.
        from_shard: usize,
        /// The Refresh.
        packet: Vec<u8>,
        /// The client's new 5-tuple.
        client: ClientSocket,
    },
    /// The answer to an `Ask`: the allocation and its relayed socket, or
    /// nothing (no such ticket, a bad signature).
    Give {
        /// The Refresh, to handle once the allocation is here.
        packet: Vec<u8>,
        /// The client's new 5-tuple.
        client: ClientSocket,
        /// What moved.
        /// (A dual-stack allocation's IPv6 socket comes along.)
        taken: Option<Box<(MovedAllocation, UdpSocket, Option<UdpSocket>)>>,
    },
    /// A client's new connection whose ConnectionBind (RFC 6062) names a
    /// peer data connection the receiving loop holds: serve it there.
    Bind {
        /// The connection, with what it read after the request.
        stream: Box<super::stream::Stream>,
        /// The ConnectionBind.
        packet: Vec<u8>,
    },
}

/// One loop's ends of the host's transfer channels.
#[derive(Debug)]
pub(super) struct Mobility {
    shard: usize,
    inbox: Receiver<Transfer>,
    outboxes: Arc<Vec<SyncSender<Transfer>>>,
    control: Arc<Control>,
}

impl Mobility {
    /// One [`Mobility`] per loop of a host with `loops` loops; loop `i`'s
    /// waker is the `i`-th the control plane holds.
    pub(super) fn host(loops: usize, control: &Arc<Control>) -> Vec<Mobility> {
        let (outboxes, inboxes): (Vec<_>, Vec<_>) = (0..loops).map(|_| sync_channel(QUEUE)).unzip();
        let outboxes = Arc::new(outboxes);
        inboxes
            .into_iter()
            .enumerate()
            .map(|(shard, inbox)| Mobility {
                shard,
                inbox,
                outboxes: outboxes.clone(),
                control: control.clone(),
            })
            .collect()
    }

    /// Sends `transfer` to loop `shard` and wakes it; false when there is
    /// no such loop or its channel is full.
    pub(super) fn send(&self, shard: usize, transfer: Transfer) -> Result<(), Transfer> {
        let Some(outbox) = self.outboxes.get(shard).filter(|_| shard != self.shard) else {
            return Err(transfer);
        };
        match outbox.try_send(transfer) {
            Ok(()) => {
                self.control.wake(shard);
                Ok(())
            }
            Err(TrySendError::Full(t) | TrySendError::Disconnected(t)) => Err(t),
        }
    }

    /// Asks loop `shard` for the allocation `packet`'s ticket names.
    fn ask(&self, shard: usize, packet: &[u8], client: ClientSocket) -> bool {
        let ask = Transfer::Ask {
            from_shard: self.shard,
            packet: packet.to_vec(),
            client,
        };
        self.send(shard, ask).is_ok()
    }

    /// What becomes of a [`ClientAction::Move`]: the packet goes to loop
    /// `shard` (nothing to answer yet), or, when it cannot, `core` refuses
    /// it.
    /// Hands a client's message to `core`, as every client path does: a
    /// Refresh whose ticket another loop issued goes there instead
    /// ([`Self::hand_over`]).
    #[inline]
    pub(super) fn client_input(
        &self,
        core: &mut Server,
        message: &[u8],
        client: ClientSocket,
        now: std::time::Instant,
        out: &mut [u8],
        sockets: &mut dyn crate::core::RelaySockets,
    ) -> ClientAction {
        match core.handle_client_input(message, client, now, out, sockets) {
            ClientAction::Move { shard } => self.hand_over(core, shard, message, client, now, out),
            action => action,
        }
    }

    fn hand_over(
        &self,
        core: &mut Server,
        shard: u16,
        packet: &[u8],
        client: ClientSocket,
        now: std::time::Instant,
        out: &mut [u8],
    ) -> ClientAction {
        if self.ask(usize::from(shard), packet, client) {
            ClientAction::Consumed
        } else {
            core.refuse_move(packet, client, now, out)
        }
    }

    /// The next transfer for this loop, if any.
    pub(super) fn next(&self) -> Option<Transfer> {
        self.inbox.try_recv().ok()
    }
}

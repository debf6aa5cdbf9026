//! Identities of the things the core talks about.

use std::net::SocketAddr;

pub use natrix_model::Transport;

/// The client side of an allocation: the 5-tuple of RFC 8656 §2 (client
/// address, server address, transport). An allocation is identified by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientSocket {
    /// Client transport.
    pub transport: Transport,
    /// The client's address as the relay sees it (its server-reflexive
    /// address when it is behind a NAT).
    pub client: SocketAddr,
    /// The relay's address the client sent to.
    pub server: SocketAddr,
}

/// A handle on one allocation's relayed transport address, as the shell
/// knows it (it tags the relay socket with it). The generation makes a handle
/// of a freed allocation useless once its slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocationId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl AllocationId {
    /// The slot index: dense, small, reused after the allocation ends; a
    /// shell may index its socket table with it.
    pub const fn index(self) -> usize {
        self.index as usize
    }

    /// Which allocation of the slot it was (slots are reused).
    pub const fn generation(self) -> u32 {
        self.generation
    }
}

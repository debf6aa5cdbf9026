//! Identities of the things the core talks about.

use std::net::SocketAddr;

/// How a client reaches the relay (RFC 8656 §3.1 "client transport").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: one message per datagram, ChannelData padding optional.
    Udp,
    /// TCP: a byte stream, ChannelData padded to four bytes (RFC 8656 §12.5).
    Tcp,
    /// TLS over TCP: as TCP.
    Tls,
}

impl Transport {
    /// True for stream transports, which need ChannelData padding.
    pub const fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

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
}

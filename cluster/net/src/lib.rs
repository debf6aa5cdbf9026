//! Batched UDP and TCP socket plumbing shared by the data planes.
//!
//! - [`bind_udp`]: sockets configured once (SO_REUSEPORT so several loops
//!   can share a port, IPV6_V6ONLY so IPv4 and IPv6 listeners coexist, large
//!   kernel buffers).
//! - [`SyncUdp`]: a non-blocking UDP socket for loops that poll readiness
//!   themselves (the relay host's `mio` loops), receiving in batches
//!   (recvmmsg, and GRO where the kernel offers it, through `quinn-udp`) and
//!   sending with the source address the datagram arrived on (IP_PKTINFO),
//!   so a server bound to a wildcard address always answers from the
//!   address the client used; [`SendBatch`] sends many with one sendmmsg.
//! - [`service`]: the contract between the relay host and a STUN service
//!   it carries (CDX).
//! - [`RecvBatch`]: receive buffers owned by one loop, reused for every
//!   batch; no allocation per packet.
//!
//! # Panics and errors
//!
//! Nothing here panics. Socket errors are returned as `io::Error`; the loops
//! decide what is fatal.

mod frames;
mod mmsg;
pub mod service;
mod udp;

pub use frames::{StreamFrames, TimedRead, is_timeout};
pub use mmsg::{HeadroomBatch, SendBatch};
pub use service::{
    Answer, Arrival, ConnId, HostEvent, LoopContext, StreamMailbox, StunService, StunServiceFactory,
};

pub use udp::{
    Datagram, RecvBatch, SyncUdp, UdpOptions, bind_udp, ensure_tcp_free, ensure_udp_free,
    ipv6_unavailable,
};

/// Raises this process's open-file limit to its hard maximum (every relay
/// allocation and every load-generator client holds a socket). Returns
/// whether the soft limit now equals the hard one.
pub fn raise_fd_limit() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            return libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0;
        }
    }
    true
}

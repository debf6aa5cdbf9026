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

/// Waits until one of `fds` is readable or `timeout` passes; the indexes of
/// the readable ones (empty on timeout or interruption). For blocking
/// clients that listen on many sockets at once (a birthday punch's).
pub fn wait_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: std::time::Duration,
) -> std::io::Result<Vec<usize>> {
    use std::os::fd::AsRawFd;
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `polls` is a live, correctly sized array of pollfd for the
    // duration of the call; the descriptors are borrowed, so open.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    Ok(polls
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

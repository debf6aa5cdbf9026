use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket options for a UDP listener.
#[derive(Clone, Copy, Debug)]
pub struct UdpOptions {
    /// Let several sockets bind the same address (one per event loop); the
    /// kernel spreads datagrams across them by flow hash.
    pub reuse_port: bool,
    /// Kernel receive buffer, bytes (the kernel may cap it at rmem_max).
    pub recv_buffer: usize,
    /// Kernel send buffer, bytes.
    pub send_buffer: usize,
}

impl Default for UdpOptions {
    fn default() -> UdpOptions {
        UdpOptions {
            reuse_port: true,
            recv_buffer: 4 << 20,
            send_buffer: 4 << 20,
        }
    }
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// Fails when another socket already holds `addr` (UDP), even one bound
/// with SO_REUSEPORT: a probe bind without SO_REUSEPORT is refused in that
/// case. Loops of one process share a port through SO_REUSEPORT; a second
/// process must not silently join them and take part of the traffic.
pub fn ensure_udp_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(domain(&addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())
}

/// The TCP counterpart of [`ensure_udp_free`].
pub fn ensure_tcp_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // SO_REUSEADDR only lets TIME_WAIT leftovers of a previous run be reused.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// Binds a non-blocking UDP socket.
pub fn bind_udp(addr: SocketAddr, opts: &UdpOptions) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(domain(&addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Buffer sizes are best effort: the kernel clamps them to its limits.
    let _ = socket.set_recv_buffer_size(opts.recv_buffer);
    let _ = socket.set_send_buffer_size(opts.send_buffer);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// One received datagram.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    /// Sender.
    pub from: SocketAddr,
    /// The local address it was sent to, when the kernel reported it.
    pub to_ip: Option<IpAddr>,
    /// The payload.
    pub payload: &'a [u8],
}

/// Receive buffers for one loop, reused across batches.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    meta: Vec<RecvMeta>,
    filled: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.bufs.len())
            .field("filled", &self.filled)
            .finish()
    }
}

impl RecvBatch {
    /// Buffers for `quinn_udp::BATCH_SIZE` receives of up to `segment_len`
    /// bytes, each `gro_segments` times that so a GRO-coalesced train fits.
    pub fn new(segment_len: usize, gro_segments: usize) -> RecvBatch {
        let slot = segment_len * gro_segments.max(1);
        RecvBatch {
            bufs: (0..quinn_udp::BATCH_SIZE)
                .map(|_| vec![0u8; slot].into_boxed_slice())
                .collect(),
            meta: vec![RecvMeta::default(); quinn_udp::BATCH_SIZE],
            filled: 0,
        }
    }

    /// Receive slots (datagram buffers) per call.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Buffers filled by the last receive.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// The datagrams of the last receive, GRO trains split at their stride.
    pub fn datagrams(&self) -> impl Iterator<Item = Datagram<'_>> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(&self.bufs)
            .flat_map(|(meta, buf)| {
                let len = meta.len.min(buf.len());
                let stride = if meta.stride == 0 {
                    len.max(1)
                } else {
                    meta.stride
                };
                buf[..len].chunks(stride).map(move |payload| Datagram {
                    from: meta.addr,
                    to_ip: meta.dst_ip,
                    payload,
                })
            })
    }
}

/// One recvmmsg (with GRO where enabled) into `batch`'s buffers.
fn fill_batch(
    state: &UdpSocketState,
    socket: UdpSockRef<'_>,
    batch: &mut RecvBatch,
) -> io::Result<usize> {
    let slots = batch.bufs.len();
    let mut slices: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
        std::array::from_fn(|_| IoSliceMut::new(&mut []));
    for (slot, buf) in slices.iter_mut().zip(batch.bufs.iter_mut()) {
        *slot = IoSliceMut::new(buf);
    }
    state.recv(socket, &mut slices[..slots], &mut batch.meta)
}

/// A non-blocking UDP socket with batched receive for loops that poll
/// readiness themselves (mio, epoll) instead of through tokio.
#[derive(Debug)]
pub struct SyncUdp {
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
    wildcard: bool,
}

impl SyncUdp {
    /// Wraps a bound non-blocking socket (see [`bind_udp`]).
    pub fn new(socket: std::net::UdpSocket) -> io::Result<SyncUdp> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let local = socket.local_addr()?;
        Ok(SyncUdp {
            socket,
            state,
            wildcard: local.ip().is_unspecified(),
            local,
        })
    }

    /// The socket, e.g. to register its descriptor with a poller.
    pub fn socket(&self) -> &std::net::UdpSocket {
        &self.socket
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Receive buffers sized for this socket's GRO capability.
    pub fn batch(&self, segment_len: usize) -> RecvBatch {
        RecvBatch::new(segment_len, self.state.gro_segments())
    }

    /// One non-blocking recvmmsg into `batch` (`WouldBlock` when empty).
    pub fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.filled = 0;
        let n = fill_batch(&self.state, UdpSockRef::from(&self.socket), batch)?;
        batch.filled = n;
        Ok(n)
    }

    /// Sends one datagram without waiting, from `from_ip` when the socket
    /// is bound to a wildcard address. A full kernel buffer is `WouldBlock`.
    pub fn try_send_to(
        &self,
        payload: &[u8],
        to: SocketAddr,
        from_ip: Option<IpAddr>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: payload,
            segment_size: None,
            src_ip: if self.wildcard { from_ip } else { None },
        };
        self.state
            .try_send(UdpSockRef::from(&self.socket), &transmit)
    }
}

/// True when `addr` is an IPv6 wildcard and this host has no IPv6 (the
/// kernel refuses an IPv6 socket or the wildcard): such a default listener
/// is skipped rather than fatal.
pub fn ipv6_unavailable(addr: SocketAddr) -> bool {
    if !(addr.is_ipv6() && addr.ip().is_unspecified()) {
        return false;
    }
    let probe = SocketAddr::new(addr.ip(), 0);
    match std::net::UdpSocket::bind(probe) {
        Ok(_) => false,
        Err(e) => matches!(
            e.raw_os_error(),
            Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
        ),
    }
}

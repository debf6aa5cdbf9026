//! The sockets of TCP allocations (RFC 6062): a listener on each relayed
//! address, and the peer data connections — made for a Connect from the
//! relayed address, or accepted on it — each spliced, once its client's
//! ConnectionBind came, with a client data connection (a
//! [`super::stream::Stream`] of the loop).
//!
//! Splicing is flow-controlled, never lossy: bytes read from one side wait
//! in a bounded buffer for the other; when it is full, reading that side
//! stops (its TCP window closes) until the buffer drains.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use crate::core::{AllocationId, ConnectionId};

/// Bytes waiting for one side before reading the other pauses.
pub(super) const HIGH_WATER: usize = 256 * 1024;
/// Bytes read from a peer per read call.
pub(super) const CHUNK: usize = 64 * 1024;
/// Reads from one peer per wake-up.
pub(super) const READS_PER_WAKE: usize = 16;
/// Peers' connections accepted on one relayed address per wake-up.
pub(super) const ACCEPTS_PER_WAKE: usize = 64;
/// Connections a relayed address's listener queues before accepting.
const BACKLOG: i32 = 128;

/// One peer data connection.
pub(super) struct PeerConn {
    pub(super) socket: TcpStream,
    pub(super) connection: ConnectionId,
    /// A Connect's connection, not established yet.
    pub(super) connecting: bool,
    /// The client data connection (its stream index), once bound.
    pub(super) data: Option<usize>,
    /// Bytes for the peer not written yet (at most about
    /// [`HIGH_WATER`] + one client read).
    pub(super) out: Vec<u8>,
    /// Reading the client paused: `out` is full.
    pub(super) client_paused: bool,
    /// One side hung up: close once what is queued for the other left.
    pub(super) closing: bool,
}

/// A loop's TCP allocation sockets.
#[derive(Default)]
pub(super) struct TcpRelays {
    /// Listeners by allocation slot, with the address they are bound to.
    pub(super) listeners: Vec<Option<(AllocationId, TcpListener, SocketAddr)>>,
    pub(super) peers: Vec<Option<PeerConn>>,
    free: Vec<usize>,
    pub(super) by_connection: HashMap<ConnectionId, usize, foldhash::fast::RandomState>,
}

/// A non-blocking TCP socket bound to `addr` that shares the port
/// (SO_REUSEPORT): the loops' client listeners, a relayed address's
/// listener and the connections a Connect makes from it (RFC 6062 §5.2).
pub(super) fn shared_tcp_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

impl TcpRelays {
    /// Listens on `addr` for TCP allocation `id`, under `token`.
    pub(super) fn listen(
        &mut self,
        registry: &Registry,
        id: AllocationId,
        addr: SocketAddr,
        token: Token,
    ) -> io::Result<()> {
        let s = shared_tcp_socket(addr)?;
        s.listen(BACKLOG)?;
        let mut listener = TcpListener::from_std(s.into());
        registry.register(&mut listener, token, Interest::READABLE)?;
        if self.listeners.len() <= id.index() {
            self.listeners.resize_with(id.index() + 1, || None);
        }
        self.listeners[id.index()] = Some((id, listener, addr));
        Ok(())
    }

    /// Closes `id`'s listener, if it has one.
    pub(super) fn close_listener(&mut self, registry: &Registry, id: AllocationId) {
        if let Some(slot) = self.listeners.get_mut(id.index())
            && matches!(slot, Some((owner, _, _)) if *owner == id)
            && let Some((_, mut listener, _)) = slot.take()
        {
            let _ = registry.deregister(&mut listener);
        }
    }

    /// Starts a Connect's connection from `id`'s relayed address to
    /// `peer`; its index, registered under `token(index)`.
    pub(super) fn connect(
        &mut self,
        registry: &Registry,
        id: AllocationId,
        connection: ConnectionId,
        peer: SocketAddr,
        token: impl Fn(usize) -> Token,
    ) -> io::Result<usize> {
        let Some(Some((owner, _, local))) = self.listeners.get(id.index()) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        if *owner != id {
            return Err(io::ErrorKind::NotFound.into());
        }
        let s = shared_tcp_socket(*local)?;
        s.set_tcp_nodelay(true)?;
        match s.connect(&peer.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let socket = TcpStream::from_std(s.into());
        self.add(registry, socket, connection, true, token)
    }

    /// Serves a peer data connection.
    pub(super) fn add(
        &mut self,
        registry: &Registry,
        mut socket: TcpStream,
        connection: ConnectionId,
        connecting: bool,
        token: impl Fn(usize) -> Token,
    ) -> io::Result<usize> {
        let k = self.free.pop().unwrap_or_else(|| {
            self.peers.push(None);
            self.peers.len() - 1
        });
        if let Err(e) = registry.register(
            &mut socket,
            token(k),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(k);
            return Err(e);
        }
        self.peers[k] = Some(PeerConn {
            socket,
            connection,
            connecting,
            data: None,
            out: Vec::new(),
            client_paused: false,
            closing: false,
        });
        self.by_connection.insert(connection, k);
        Ok(k)
    }

    /// Takes peer connection `k` out (closed when dropped).
    pub(super) fn remove(&mut self, registry: &Registry, k: usize) -> Option<PeerConn> {
        let mut peer = self.peers.get_mut(k)?.take()?;
        let _ = registry.deregister(&mut peer.socket);
        self.by_connection.remove(&peer.connection);
        self.free.push(k);
        Some(peer)
    }

    /// Live peer data connections.
    pub(super) fn len(&self) -> usize {
        self.by_connection.len()
    }
}

impl PeerConn {
    /// Writes what waits for the peer; false when the socket failed.
    pub(super) fn flush(&mut self) -> bool {
        while !self.out.is_empty() {
            match self.socket.write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.out.capacity() > HIGH_WATER && self.out.is_empty() {
            self.out = Vec::new();
        }
        true
    }

    /// Reads from the peer into `buf`: `Ok(0)` at EOF.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.socket.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// A Connect's connection finished connecting: `Some(true)` when it is
    /// established, `Some(false)` when it failed, `None` while it is still
    /// under way.
    pub(super) fn connect_outcome(&mut self) -> Option<bool> {
        if let Ok(Some(_)) | Err(_) = self.socket.take_error() {
            return Some(false);
        }
        match self.socket.peer_addr() {
            Ok(_) => Some(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
            Err(_) => Some(false),
        }
    }
}

//! TCP allocations (RFC 6062): a client behind a firewall that lets only
//! TCP out reaches TCP peers through the relay.
//!
//! A TCP allocation has a listener on its relayed address instead of a UDP
//! socket. Its client asks for a connection to a peer with Connect over its
//! control connection; the shell connects from the relayed address and
//! reports back ([`Server::tcp_connected`]), and the answer carries a
//! CONNECTION-ID. A peer that connects to the relayed address is offered
//! to the client with a ConnectionAttempt indication, when a permission
//! covers its IP ([`Server::tcp_accepted`]). Either way the client then
//! opens a new connection to the relay and sends ConnectionBind with the
//! CONNECTION-ID: from its answer on, that connection and the peer's are
//! spliced byte for byte by the shell.
//!
//! The core keeps the table of connections (which allocation, which peer,
//! waiting for what, until when); the sockets and the splicing are the
//! shell's. A CONNECTION-ID names its core in its top bits, so a
//! ConnectionBind that reaches another loop of the host is handed to the
//! right one ([`ClientAction::BindElsewhere`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, ErrorCode, IntegrityKey, Message, MessageType,
    Method, TransactionId,
};

use super::{AllocateRequest, Auth, ClientAction, Command, Server};
use crate::refusal::Refusal;
use crate::stats::{Direction, RequestMethod, RequestResult, TcpEvent};
use crate::types::{AllocationId, ClientSocket, Transport};

/// A peer data connection's id: the CONNECTION-ID attribute's value. Its
/// top [`SHARD_BITS`] bits name the core (loop) that holds it.
pub type ConnectionId = u32;

/// Most peer data connections one TCP allocation holds at once (508 for a
/// Connect past it; an incoming one is refused).
pub const MAX_TCP_CONNECTIONS: usize = 64;

/// How long a Connect waits for its peer (RFC 6062 §5.2: at least 30 s),
/// and a peer data connection for its ConnectionBind (§5.2, §5.3: 30 s).
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bits of a CONNECTION-ID that name its core: 4096 loops, as many as
/// mobility tickets name.
const SHARD_BITS: u32 = 12;
/// Bits of the per-core sequence.
const SEQ_BITS: u32 = 32 - SHARD_BITS;

/// The core that holds the connection `id` names.
fn shard_of(id: ConnectionId) -> u16 {
    (id >> SEQ_BITS) as u16
}

/// How a request was signed: what its deferred answer is signed with.
#[derive(Debug)]
struct Signer {
    transaction: TransactionId,
    key: IntegrityKey,
    sha256: bool,
    fingerprint: bool,
}

#[derive(Debug)]
enum State {
    /// The shell is connecting for a Connect, whose answer is owed.
    Connecting(Box<Signer>),
    /// Established (a Connect's) or accepted (a peer's), waiting for the
    /// client's ConnectionBind.
    Unbound,
    /// Joined to a client data connection.
    Bound,
}

#[derive(Debug)]
struct Connection {
    /// The allocation's slot.
    slot: u32,
    peer: SocketAddr,
    state: State,
    /// When a connection not yet bound gives up.
    deadline: Instant,
}

/// The peer data connections of one core.
#[derive(Debug, Default)]
pub(super) struct TcpTable {
    connections: HashMap<ConnectionId, Connection, RandomState>,
    /// The sequence part of the last id given.
    seq: u32,
}

impl Server {
    /// RFC 6062 §5.1's checks of a TCP Allocate.
    pub(super) fn check_tcp_allocation(
        req: &AllocateRequest<'_>,
        wants_ticket: bool,
        from: ClientSocket,
        enabled: bool,
    ) -> Result<(), Refusal> {
        if !enabled {
            return Err(Refusal::UnsupportedTransport);
        }
        if !matches!(from.transport, Transport::Tcp | Transport::Tls) {
            return Err(Refusal::TcpOverUdp);
        }
        if req.dont_fragment
            || req.even_port.is_some()
            || req.token.is_some()
            || req.additional_v6
            || wants_ticket
        {
            return Err(Refusal::TcpAllocationOptions);
        }
        Ok(())
    }

    /// The core a ConnectionBind's CONNECTION-ID names, when it is not
    /// this one.
    pub(super) fn binds_elsewhere(&self, msg: &Message<'_>, from: ClientSocket) -> Option<u16> {
        if !matches!(from.transport, Transport::Tcp | Transport::Tls)
            || self.allocation_by_client.contains_key(&from)
        {
            return None;
        }
        match msg.decode(AttributeType::CONNECTION_ID) {
            Some(Ok(Attribute::ConnectionId(id))) => {
                Some(shard_of(id)).filter(|&s| s != self.shard)
            }
            _ => None,
        }
    }

    /// A fresh connection id of this core.
    fn new_connection_id(&mut self) -> ConnectionId {
        let mask = (1u32 << SEQ_BITS) - 1;
        loop {
            self.tcp.seq = (self.tcp.seq + 1) & mask;
            let id = u32::from(self.shard) << SEQ_BITS | self.tcp.seq;
            if self.tcp.seq != 0 && !self.tcp.connections.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2): checks it and asks the shell to connect
    /// ([`ClientAction::Connect`]); the answer comes with the outcome.
    pub(super) fn connect(
        &mut self,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        now: Instant,
    ) -> Result<usize, Refusal> {
        let index = self.allocation_of(&from)?;
        let peer = match msg.decode(AttributeType::XOR_PEER_ADDRESS) {
            Some(Ok(Attribute::XorPeerAddress(p))) => p,
            _ => return Err(Refusal::MissingPeer),
        };
        let alloc = self.allocation_ref(index)?;
        if !alloc.tcp {
            return Err(Refusal::NotTcpAllocation);
        }
        self.check_peer(peer, index)?;
        if !self.policy.permits_endpoint(peer) {
            return Err(Refusal::PeerDenied);
        }
        let alloc = self.allocation_ref(index)?;
        let exists = alloc
            .connections
            .iter()
            .any(|id| self.tcp.connections.get(id).is_some_and(|c| c.peer == peer));
        if exists {
            return Err(Refusal::ConnectionExists);
        }
        if alloc.connections.len() >= MAX_TCP_CONNECTIONS {
            return Err(Refusal::ConnectionsFull);
        }
        let id = self.new_connection_id();
        let signer = Signer {
            transaction: msg.transaction_id(),
            key: auth.key.clone(),
            sha256: auth.sha256,
            fingerprint: msg.has_fingerprint(),
        };
        self.add_connection(id, index, peer, State::Connecting(Box::new(signer)), now);
        self.pending_action = Some(ClientAction::Connect {
            allocation: self.id_of(index),
            connection: id,
            peer,
        });
        Ok(0)
    }

    fn add_connection(
        &mut self,
        id: ConnectionId,
        slot: u32,
        peer: SocketAddr,
        state: State,
        now: Instant,
    ) {
        let connection = Connection {
            slot,
            peer,
            state,
            deadline: now + TCP_CONNECT_TIMEOUT,
        };
        self.tcp.connections.insert(id, connection);
        if let Some(a) = self.slots[slot as usize].allocation.as_mut() {
            a.connections.push(id);
        }
        self.stats.tcp_connections = self.tcp.connections.len() as u64;
    }

    /// ConnectionBind (RFC 6062 §5.4), on a new connection without an
    /// allocation, with the allocation's credentials: the connection
    /// becomes the client data connection of the peer connection it names
    /// ([`ClientAction::Bind`]).
    pub(super) fn connection_bind(
        &mut self,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        _now: Instant,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        if !matches!(from.transport, Transport::Tcp | Transport::Tls) {
            return Err(Refusal::TcpOverUdp);
        }
        if self.allocation_by_client.contains_key(&from) {
            return Err(Refusal::BindOnAllocation);
        }
        let id = match msg.decode(AttributeType::CONNECTION_ID) {
            Some(Ok(Attribute::ConnectionId(id))) => id,
            _ => return Err(Refusal::UnknownConnection),
        };
        let Some(conn) = self.tcp.connections.get(&id) else {
            return Err(Refusal::UnknownConnection);
        };
        if !matches!(conn.state, State::Unbound) {
            return Err(Refusal::UnknownConnection);
        }
        let username = match msg.decode(AttributeType::USERNAME) {
            Some(Ok(Attribute::Username(u))) => u,
            _ => return Err(Refusal::WrongConnectionUser),
        };
        let alloc = self.allocation_ref(conn.slot)?;
        if *alloc.username != *username {
            return Err(Refusal::WrongConnectionUser);
        }
        let len = self.success(msg, auth, out, |_| Ok(()))?;
        if let Some(c) = self.tcp.connections.get_mut(&id) {
            c.state = State::Bound;
        }
        self.stats.tcp_events[TcpEvent::Bound as usize] += 1;
        self.pending_action = Some(ClientAction::Bind {
            len,
            connection: id,
        });
        Ok(len)
    }

    /// How the shell's connection for a Connect went: the Connect's answer
    /// goes to the client ([`Command::ToClient`]) — success with the
    /// CONNECTION-ID, or 447. Returns false when the shell should close
    /// its socket (the connection failed, its allocation ended meanwhile,
    /// or it timed out already).
    pub fn tcp_connected(&mut self, connection: ConnectionId, ok: bool, now: Instant) -> bool {
        self.clock = self.clock.max(now);
        let Some(conn) = self.tcp.connections.get_mut(&connection) else {
            return false;
        };
        let State::Connecting(signer) = std::mem::replace(&mut conn.state, State::Unbound) else {
            return false;
        };
        conn.deadline = now + TCP_CONNECT_TIMEOUT;
        let slot = conn.slot;
        if ok {
            if let Some(a) = self.slots[slot as usize].allocation.as_mut() {
                a.usage.peers += 1;
            }
            self.stats.tcp_events[TcpEvent::Connected as usize] += 1;
            self.stats.request(RequestMethod::Connect, RequestResult(0));
        } else {
            self.connect_failed(connection);
        }
        self.answer_connect(slot, &signer, ok.then_some(connection)) && ok
    }

    /// Counts a failed Connect and forgets its connection.
    fn connect_failed(&mut self, connection: ConnectionId) {
        self.stats.tcp_events[TcpEvent::ConnectFailed as usize] += 1;
        self.stats
            .request(RequestMethod::Connect, RequestResult(447));
        self.stats.refused(Refusal::ConnectionFailed);
        self.forget_connection(connection);
    }

    /// Sends a Connect's answer (success with CONNECTION-ID, or 447) on
    /// the control connection of the allocation in `slot`; false when that
    /// allocation is gone.
    fn answer_connect(&mut self, slot: u32, signer: &Signer, id: Option<ConnectionId>) -> bool {
        let Some(client) = self.slots[slot as usize]
            .allocation
            .as_ref()
            .map(|a| a.client)
        else {
            return false;
        };
        if let Some(frame) = self.connect_answer(signer, id) {
            self.commands.push_back(Command::ToClient { client, frame });
        }
        true
    }

    /// A Connect's answer: success with CONNECTION-ID, or 447.
    fn connect_answer(&self, signer: &Signer, id: Option<ConnectionId>) -> Option<Vec<u8>> {
        let mut out = vec![0u8; 512];
        let class = if id.is_some() {
            Class::Success
        } else {
            Class::Error
        };
        let ty = MessageType::new(Method::CONNECT, class);
        let write = |out: &mut [u8]| {
            let mut enc = Encoder::new(out, ty, &signer.transaction)?;
            match id {
                Some(id) => enc.attribute(&Attribute::ConnectionId(id))?,
                None => enc.error_code(ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE)?,
            }
            if let Some(s) = &self.config.software {
                enc.software(s)?;
            }
            let auth = Auth {
                key: signer.key.clone(),
                sha256: signer.sha256,
            };
            self.seal(&mut enc, Some(&auth), signer.fingerprint)?;
            Ok::<_, natrix_wire::EncodeError>(enc.finish())
        };
        let len = write(&mut out).ok()?;
        out.truncate(len);
        Some(out)
    }

    /// A peer connected to the relayed address of TCP allocation
    /// `allocation` (RFC 6062 §5.3): with a permission for its IP (and the
    /// policy's leave), the client is offered it with a ConnectionAttempt
    /// ([`Command::ToClient`]) and the connection waits for its
    /// ConnectionBind under the returned id. `None`: close it.
    pub fn tcp_accepted(
        &mut self,
        allocation: AllocationId,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnectionId> {
        self.clock = self.clock.max(now);
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let slot = allocation.index;
        let live = self
            .slots
            .get(slot as usize)
            .filter(|s| s.generation == allocation.generation)
            .and_then(|s| s.allocation.as_ref())
            .filter(|a| a.tcp);
        let admitted = live.is_some_and(|a| {
            a.permits(peer.ip(), now)
                && a.connections.len() < MAX_TCP_CONNECTIONS
                && a.allowed_peers
                    .as_ref()
                    .is_none_or(|allowed| allowed.contains(&peer.ip()))
        }) && self.policy.permits(peer.ip());
        let Some(client) = live.map(|a| a.client).filter(|_| admitted) else {
            self.stats.tcp_events[TcpEvent::Refused as usize] += 1;
            return None;
        };
        let id = self.new_connection_id();
        self.add_connection(id, slot, peer, State::Unbound, now);
        self.stats.tcp_events[TcpEvent::Accepted as usize] += 1;
        let transaction = TransactionId(self.random_tid());
        let mut out = vec![0u8; 256];
        let write = |out: &mut [u8]| {
            let ty = MessageType::new(Method::CONNECTION_ATTEMPT, Class::Indication);
            let mut enc = Encoder::new(out, ty, &transaction)?;
            enc.attribute(&Attribute::XorPeerAddress(peer))?;
            enc.attribute(&Attribute::ConnectionId(id))?;
            enc.fingerprint()?;
            Ok::<_, natrix_wire::EncodeError>(enc.finish())
        };
        match write(&mut out) {
            Ok(len) => {
                out.truncate(len);
                self.commands
                    .push_back(Command::ToClient { client, frame: out });
                Some(id)
            }
            Err(_) => {
                self.forget_connection(id);
                None
            }
        }
    }

    /// A peer data connection closed (either side hung up): forgotten.
    pub fn tcp_closed(&mut self, connection: ConnectionId) {
        if let Some(c) = self.tcp.connections.get(&connection)
            && let State::Connecting(_) = c.state
        {
            // Closed before the shell reported it: the Connect failed.
            self.connect_failed(connection);
            return;
        }
        self.forget_connection(connection);
    }

    /// Counts `bytes` relayed over peer data connection `connection`, for
    /// its allocation's usage and the relay's counters.
    pub fn tcp_relayed(&mut self, connection: ConnectionId, direction: Direction, bytes: usize) {
        self.stats.tcp_bytes[direction as usize] += bytes as u64;
        let Some(c) = self.tcp.connections.get(&connection) else {
            return;
        };
        if let Some(a) = self.slots[c.slot as usize].allocation.as_mut() {
            a.usage.bytes[direction as usize] += bytes as u64;
        }
    }

    fn forget_connection(&mut self, connection: ConnectionId) {
        if let Some(c) = self.tcp.connections.remove(&connection)
            && let Some(a) = self.slots[c.slot as usize].allocation.as_mut()
        {
            a.connections.retain(|&id| id != connection);
        }
        self.stats.tcp_connections = self.tcp.connections.len() as u64;
    }

    /// An ended allocation's connections: closed by the shell.
    pub(super) fn close_connections(&mut self, ids: &[ConnectionId]) {
        for &id in ids {
            if self.tcp.connections.remove(&id).is_some() {
                self.commands
                    .push_back(Command::CloseTcp { connection: id });
            }
        }
        self.stats.tcp_connections = self.tcp.connections.len() as u64;
    }

    /// Connections that waited too long: a Connect still connecting gets
    /// 447; one not bound is closed.
    pub(super) fn sweep_tcp(&mut self, now: Instant) {
        let late: Vec<ConnectionId> = self
            .tcp
            .connections
            .iter()
            .filter(|(_, c)| !matches!(c.state, State::Bound) && c.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            let Some(c) = self.tcp.connections.get_mut(&id) else {
                continue;
            };
            let slot = c.slot;
            self.commands
                .push_back(Command::CloseTcp { connection: id });
            match std::mem::replace(&mut c.state, State::Unbound) {
                State::Connecting(signer) => {
                    self.connect_failed(id);
                    self.answer_connect(slot, &signer, None);
                }
                _ => {
                    self.stats.tcp_events[TcpEvent::BindTimeout as usize] += 1;
                    self.forget_connection(id);
                }
            }
        }
    }
}

//! Counters the core keeps in plain fields; the shell publishes them.

use super::refusal::Refusal;

/// Direction of forwarded traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → relay → peer.
    ClientToPeer,
    /// Peer → relay → client.
    PeerToClient,
}

impl Direction {
    /// Every direction, in index order.
    pub const ALL: [Direction; 2] = [Direction::ClientToPeer, Direction::PeerToClient];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            Direction::ClientToPeer => "client_to_peer",
            Direction::PeerToClient => "peer_to_client",
        }
    }
}

/// Why a packet was dropped without an answer. Closed set: the `reason`
/// label of `relay_packets_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Neither STUN nor ChannelData.
    NotTurn,
    /// STUN or ChannelData that does not parse.
    Malformed,
    /// FINGERPRINT present and wrong.
    BadFingerprint,
    /// A response or an unexpected indication.
    UnexpectedClass,
    /// Data from a 5-tuple without an allocation.
    NoAllocation,
    /// Data for or from a peer without a permission.
    NoPermission,
    /// ChannelData on a channel that is not bound.
    UnboundChannel,
    /// An unauthenticated answer over the rate limit.
    RateLimited,
    /// Over the allocation's bandwidth cap.
    BandwidthExceeded,
    /// A packet on a relay socket whose allocation has ended.
    StaleAllocation,
    /// A peer datagram too large to frame as a Data indication (STUN's
    /// 16-bit length; a channel carries it).
    TooLarge,
    /// A Send indication to one of the relay's own addresses outside its
    /// relay ports (its listeners, its metrics).
    OwnAddress,
    /// A request from a source banned for repeated authentication
    /// failures.
    Banned,
    /// Data for or from a peer transport address that another allocation
    /// on the same shared (multiplexed) relayed address reaches, or from a
    /// peer no allocation there has a permission for.
    PeerClaimed,
    /// A Send indication on a TCP allocation (RFC 6062: its peers are
    /// reached over connections).
    TcpAllocation,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 15] = [
        DropReason::NotTurn,
        DropReason::Malformed,
        DropReason::BadFingerprint,
        DropReason::UnexpectedClass,
        DropReason::NoAllocation,
        DropReason::NoPermission,
        DropReason::UnboundChannel,
        DropReason::RateLimited,
        DropReason::BandwidthExceeded,
        DropReason::StaleAllocation,
        DropReason::TooLarge,
        DropReason::OwnAddress,
        DropReason::Banned,
        DropReason::PeerClaimed,
        DropReason::TcpAllocation,
    ];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::NotTurn => "not_turn",
            DropReason::Malformed => "malformed",
            DropReason::BadFingerprint => "bad_fingerprint",
            DropReason::UnexpectedClass => "unexpected_class",
            DropReason::NoAllocation => "no_allocation",
            DropReason::NoPermission => "no_permission",
            DropReason::UnboundChannel => "unbound_channel",
            DropReason::RateLimited => "rate_limited",
            DropReason::BandwidthExceeded => "bandwidth_exceeded",
            DropReason::StaleAllocation => "stale_allocation",
            DropReason::TooLarge => "too_large",
            DropReason::OwnAddress => "own_address",
            DropReason::Banned => "banned",
            DropReason::PeerClaimed => "peer_claimed",
            DropReason::TcpAllocation => "tcp_allocation",
        }
    }
}

/// STUN/TURN request methods the relay answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestMethod {
    /// Binding.
    Binding,
    /// Allocate.
    Allocate,
    /// Refresh.
    Refresh,
    /// CreatePermission.
    CreatePermission,
    /// ChannelBind.
    ChannelBind,
    /// Connect (RFC 6062).
    Connect,
    /// ConnectionBind (RFC 6062).
    ConnectionBind,
    /// Anything else (answered 400).
    Other,
}

impl RequestMethod {
    /// Every method, in index order.
    pub const ALL: [RequestMethod; 8] = [
        RequestMethod::Binding,
        RequestMethod::Allocate,
        RequestMethod::Refresh,
        RequestMethod::CreatePermission,
        RequestMethod::ChannelBind,
        RequestMethod::Connect,
        RequestMethod::ConnectionBind,
        RequestMethod::Other,
    ];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            RequestMethod::Binding => "binding",
            RequestMethod::Allocate => "allocate",
            RequestMethod::Refresh => "refresh",
            RequestMethod::CreatePermission => "create_permission",
            RequestMethod::ChannelBind => "channel_bind",
            RequestMethod::Connect => "connect",
            RequestMethod::ConnectionBind => "connection_bind",
            RequestMethod::Other => "other",
        }
    }
}

/// Outcome of a request: success or the error code sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestResult(pub u16);

impl RequestResult {
    /// Every result label, in index order (0 = success).
    pub const CODES: [u16; 18] = [
        0, 400, 401, 403, 405, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508, 300, 446, 447,
    ];

    /// Metric label values, aligned with [`RequestResult::CODES`].
    pub const LABELS: [&'static str; 18] = [
        "success", "400", "401", "403", "405", "420", "437", "438", "440", "441", "442", "443",
        "486", "500", "508", "300", "446", "447",
    ];

    fn index(self) -> usize {
        Self::CODES.iter().position(|c| *c == self.0).unwrap_or(13)
    }
}

/// Why credentials were refused: the `reason` label of
/// `relay_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailureReason {
    /// Unknown username.
    UnknownUser,
    /// REST credentials past their expiry.
    Expired,
    /// A session token for another relay.
    WrongRelay,
    /// MESSAGE-INTEGRITY wrong.
    BadIntegrity,
    /// NONCE not issued by this relay.
    BadNonce,
    /// Credentials of another user on an existing allocation (441).
    WrongCredentials,
}

impl AuthFailureReason {
    /// Every reason, in index order.
    pub const ALL: [AuthFailureReason; 6] = [
        AuthFailureReason::UnknownUser,
        AuthFailureReason::Expired,
        AuthFailureReason::WrongRelay,
        AuthFailureReason::BadIntegrity,
        AuthFailureReason::BadNonce,
        AuthFailureReason::WrongCredentials,
    ];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            AuthFailureReason::UnknownUser => "unknown_user",
            AuthFailureReason::Expired => "expired",
            AuthFailureReason::WrongRelay => "wrong_relay",
            AuthFailureReason::BadIntegrity => "bad_integrity",
            AuthFailureReason::BadNonce => "bad_nonce",
            AuthFailureReason::WrongCredentials => "wrong_credentials",
        }
    }
}

/// Everything the core counts. Monotonic except the gauges (`allocations`
/// and the others counted "now").
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Allocations alive now.
    pub allocations: u64,
    /// Of them, dual-stack (an IPv4 and an IPv6 relayed address).
    pub dual_stack_allocations: u64,
    /// Of them, on a shared (multiplexed) relayed address: the port range
    /// was used up when they came.
    pub multiplexed_allocations: u64,
    /// Shared relay sockets open.
    pub multiplex_sockets: u64,
    /// Allocations created.
    pub allocations_created: u64,
    /// Allocations that ended because they were not refreshed.
    pub allocations_expired: u64,
    /// Allocations deleted by their client (Refresh with lifetime 0).
    pub allocations_deleted: u64,
    /// Allocations whose TCP/TLS client connection closed.
    pub allocations_disconnected: u64,
    /// Allocations moved to a new client 5-tuple by a mobility ticket
    /// (RFC 8016), counted by the loop that serves them afterwards: [0]
    /// within one loop, [1] taken from another loop.
    pub allocations_moved: [u64; 2],
    /// Packets forwarded, by [`Direction`] index.
    pub forwarded_packets: [u64; 2],
    /// Payload bytes forwarded, by [`Direction`] index.
    pub forwarded_bytes: [u64; 2],
    /// Drops by [`DropReason`] index.
    pub dropped: [u64; DropReason::ALL.len()],
    /// Requests by [`RequestMethod`] index and [`RequestResult`] index.
    pub requests: [[u64; RequestResult::CODES.len()]; RequestMethod::ALL.len()],
    /// Authentication failures by [`AuthFailureReason`] index.
    pub auth_failures: [u64; 6],
    /// Refused requests by [`Refusal`] index.
    pub refused: [u64; Refusal::ALL.len()],
    /// Live TCP allocations (RFC 6062).
    pub tcp_allocations: u64,
    /// Live peer data connections of TCP allocations (connecting, waiting
    /// for their ConnectionBind, or relaying).
    pub tcp_connections: u64,
    /// What happened to peer data connections, by [`TcpEvent`] index.
    pub tcp_events: [u64; TcpEvent::ALL.len()],
    /// Bytes relayed over peer data connections, by [`Direction`] index.
    pub tcp_bytes: [u64; 2],
}

/// What happens to the peer data connections of TCP allocations (RFC 6062).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEvent {
    /// A Connect's connection to its peer was established.
    Connected,
    /// A Connect's connection failed or timed out (447).
    ConnectFailed,
    /// A peer's connection to a relayed address was accepted and offered
    /// to the client (ConnectionAttempt).
    Accepted,
    /// A peer's connection was refused: no permission for its IP, the
    /// peer deny-list, or the allocation's connection cap.
    Refused,
    /// A ConnectionBind joined a client data connection to its peer.
    Bound,
    /// No ConnectionBind came in time: the peer connection was closed.
    BindTimeout,
    /// A ConnectionBind reached another loop than the one holding its
    /// peer connection and was handed to that one.
    BindHandedOver,
}

impl TcpEvent {
    /// Every event, in index order.
    pub const ALL: [TcpEvent; 7] = [
        TcpEvent::Connected,
        TcpEvent::ConnectFailed,
        TcpEvent::Accepted,
        TcpEvent::Refused,
        TcpEvent::Bound,
        TcpEvent::BindTimeout,
        TcpEvent::BindHandedOver,
    ];

    /// The `event` label value.
    pub const fn label(self) -> &'static str {
        match self {
            TcpEvent::Connected => "connected",
            TcpEvent::ConnectFailed => "connect_failed",
            TcpEvent::Accepted => "accepted",
            TcpEvent::Refused => "refused",
            TcpEvent::Bound => "bound",
            TcpEvent::BindTimeout => "bind_timeout",
            TcpEvent::BindHandedOver => "bind_handed_over",
        }
    }
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            allocations: 0,
            dual_stack_allocations: 0,
            multiplexed_allocations: 0,
            multiplex_sockets: 0,
            allocations_created: 0,
            allocations_expired: 0,
            allocations_deleted: 0,
            allocations_disconnected: 0,
            allocations_moved: [0; 2],
            forwarded_packets: [0; 2],
            forwarded_bytes: [0; 2],
            dropped: [0; DropReason::ALL.len()],
            requests: [[0; RequestResult::CODES.len()]; RequestMethod::ALL.len()],
            auth_failures: [0; 6],
            refused: [0; Refusal::ALL.len()],
            tcp_allocations: 0,
            tcp_connections: 0,
            tcp_events: [0; TcpEvent::ALL.len()],
            tcp_bytes: [0; 2],
        }
    }
}

impl Stats {
    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }

    pub(crate) fn request(&mut self, method: RequestMethod, result: RequestResult) {
        self.requests[method as usize][result.index()] += 1;
    }

    pub(crate) fn refused(&mut self, refusal: Refusal) {
        self.refused[refusal as usize] += 1;
    }

    pub(crate) fn auth_failure(&mut self, reason: AuthFailureReason) {
        self.auth_failures[reason as usize] += 1;
    }

    pub(crate) fn forwarded(&mut self, direction: Direction, bytes: usize) {
        self.forwarded_packets[direction as usize] += 1;
        self.forwarded_bytes[direction as usize] += bytes as u64;
    }
}

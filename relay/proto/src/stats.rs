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
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 14] = [
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
    /// Anything else (answered 400).
    Other,
}

impl RequestMethod {
    /// Every method, in index order.
    pub const ALL: [RequestMethod; 6] = [
        RequestMethod::Binding,
        RequestMethod::Allocate,
        RequestMethod::Refresh,
        RequestMethod::CreatePermission,
        RequestMethod::ChannelBind,
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
            RequestMethod::Other => "other",
        }
    }
}

/// Outcome of a request: success or the error code sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestResult(pub u16);

impl RequestResult {
    /// Every result label, in index order (0 = success).
    pub const CODES: [u16; 16] = [
        0, 400, 401, 403, 405, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508, 300,
    ];

    /// Metric label values, aligned with [`RequestResult::CODES`].
    pub const LABELS: [&'static str; 16] = [
        "success", "400", "401", "403", "405", "420", "437", "438", "440", "441", "442", "443",
        "486", "500", "508", "300",
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

/// Everything the core counts. Monotonic except `allocations`.
#[derive(Clone, Debug, Default, PartialEq)]
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
    pub requests: [[u64; RequestResult::CODES.len()]; 6],
    /// Authentication failures by [`AuthFailureReason`] index.
    pub auth_failures: [u64; 6],
    /// Refused requests by [`Refusal`] index.
    pub refused: [u64; Refusal::ALL.len()],
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

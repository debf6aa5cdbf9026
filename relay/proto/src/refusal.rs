//! Why the core refused a request: the cause, the STUN error code it is
//! answered with, and the `reason` label of `relay_requests_refused_total`,
//! each by one `match` on the cause (a log line or a dashboard tells a 508
//! for draining from one for a full port pool, which the code alone does
//! not).
//!
//! Credential challenges (401 and 438 with a fresh nonce) are the normal
//! start of every TURN session and are not refusals; refused credentials
//! are counted by [`super::AuthFailureReason`].

use natrix_wire::ErrorCode;

/// Why a TURN request was refused (RFC 8656 §7.2, §9, §12.2; RFC 8489 §14.8
/// for the codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A method the relay does not serve (400).
    UnknownMethod,
    /// MESSAGE-INTEGRITY without USERNAME, REALM or NONCE (400, RFC 8489
    /// §9.2.4).
    IncompleteCredentials,
    /// Comprehension-required attributes the relay does not know (420).
    UnknownAttribute,
    /// Allocate without a readable REQUESTED-TRANSPORT (400).
    MissingRequestedTransport,
    /// A transport other than UDP requested (442).
    UnsupportedTransport,
    /// A malformed RESERVATION-TOKEN, EVEN-PORT, REQUESTED-ADDRESS-FAMILY or
    /// USERNAME (400).
    MalformedAttribute,
    /// RESERVATION-TOKEN together with EVEN-PORT or
    /// REQUESTED-ADDRESS-FAMILY (400, RFC 8656 §7.2).
    ConflictingAttributes,
    /// A relayed address family this relay does not serve (440).
    AddressFamilyNotSupported,
    /// Allocate on a 5-tuple that has an allocation made by another
    /// transaction (437).
    AllocationExists,
    /// Refresh, CreatePermission or ChannelBind without an allocation
    /// (437).
    NoAllocation,
    /// A peer, or a Refresh's family, of the other family than the relayed
    /// address (443).
    PeerAddressFamilyMismatch,
    /// CreatePermission or ChannelBind without a readable XOR-PEER-ADDRESS
    /// (400).
    MissingPeer,
    /// A channel number outside 0x4000–0x7FFE (400).
    BadChannelNumber,
    /// The channel is bound to another peer, or the peer to another channel
    /// (400, RFC 8656 §12.2).
    ChannelConflict,
    /// A peer the relay's policy denies (403).
    PeerDenied,
    /// A peer outside the session token's scope (403).
    PeerOutsideSession,
    /// A peer transport address another allocation on the same shared
    /// (multiplexed) relayed address already reaches (403): peer data on
    /// a shared socket is told apart by its source.
    PeerClaimed,
    /// The username's allocation quota is used up (486).
    UserQuota,
    /// The client IP's allocation quota is used up (486).
    SourceQuota,
    /// The session's allocations are all taken (486): a session token
    /// admits its own sides only.
    SessionQuota,
    /// The tenant's (API key's) allocation quota is used up (486).
    TenantQuota,
    /// An Allocate asked for a mobility ticket on a relay that does not
    /// give them (405, RFC 8016 §3.2).
    MobilityForbidden,
    /// A Refresh from a new 5-tuple whose MOBILITY-TICKET names no
    /// allocation here, or whose signature is not the allocation's (400).
    UnknownTicket,
    /// The relay is draining: no new allocations (508).
    Draining,
    /// The host's allocation capacity is used up (508).
    HostCapacity,
    /// Draining or full, with another relay that has room: 300 Try
    /// Alternate with its ALTERNATE-SERVER (RFC 8656 §7.2, RFC 8489 §10).
    TryAlternate,
    /// No relay port could be bound: the pool is exhausted or every
    /// attempt failed (508).
    NoRelayPort,
    /// A RESERVATION-TOKEN this relay does not hold, or one that expired
    /// (508, RFC 8656 §7.2).
    UnknownReservation,
    /// The allocation's permission table is full (508).
    PermissionsFull,
    /// The allocation's channel table is full (508).
    ChannelsFull,
    /// An internal inconsistency (500): a bug, never input.
    Internal,
    /// A TCP allocation asked for over UDP or DTLS (RFC 6062 §5.1: 400).
    TcpOverUdp,
    /// A TCP allocation with DONT-FRAGMENT, EVEN-PORT, RESERVATION-TOKEN
    /// or a second address family (RFC 6062 §5.1: 400).
    TcpAllocationOptions,
    /// ChannelBind on a TCP allocation (its peers are reached over
    /// connections: 400).
    NotUdpAllocation,
    /// Connect on a UDP allocation (400).
    NotTcpAllocation,
    /// Connect to a peer the allocation has a connection with (446).
    ConnectionExists,
    /// The connection to the peer failed or timed out (447).
    ConnectionFailed,
    /// The allocation holds its most connections (508).
    ConnectionsFull,
    /// ConnectionBind naming no connection that waits for its bind (400).
    UnknownConnection,
    /// ConnectionBind on a connection that holds an allocation (400: a
    /// data connection is a new one).
    BindOnAllocation,
    /// ConnectionBind with credentials other than the allocation's (441).
    WrongConnectionUser,
}

impl Refusal {
    /// Every cause, in index order (the metric's series).
    pub const ALL: [Refusal; 41] = [
        Refusal::UnknownMethod,
        Refusal::IncompleteCredentials,
        Refusal::UnknownAttribute,
        Refusal::MissingRequestedTransport,
        Refusal::UnsupportedTransport,
        Refusal::MalformedAttribute,
        Refusal::ConflictingAttributes,
        Refusal::AddressFamilyNotSupported,
        Refusal::AllocationExists,
        Refusal::NoAllocation,
        Refusal::PeerAddressFamilyMismatch,
        Refusal::MissingPeer,
        Refusal::BadChannelNumber,
        Refusal::ChannelConflict,
        Refusal::PeerDenied,
        Refusal::PeerOutsideSession,
        Refusal::PeerClaimed,
        Refusal::UserQuota,
        Refusal::SourceQuota,
        Refusal::SessionQuota,
        Refusal::TenantQuota,
        Refusal::MobilityForbidden,
        Refusal::UnknownTicket,
        Refusal::Draining,
        Refusal::HostCapacity,
        Refusal::TryAlternate,
        Refusal::NoRelayPort,
        Refusal::UnknownReservation,
        Refusal::PermissionsFull,
        Refusal::ChannelsFull,
        Refusal::Internal,
        Refusal::TcpOverUdp,
        Refusal::TcpAllocationOptions,
        Refusal::NotUdpAllocation,
        Refusal::NotTcpAllocation,
        Refusal::ConnectionExists,
        Refusal::ConnectionFailed,
        Refusal::ConnectionsFull,
        Refusal::UnknownConnection,
        Refusal::BindOnAllocation,
        Refusal::WrongConnectionUser,
    ];

    /// The STUN error the client gets.
    pub const fn code(self) -> ErrorCode<'static> {
        match self {
            Refusal::UnknownMethod
            | Refusal::IncompleteCredentials
            | Refusal::MissingRequestedTransport
            | Refusal::MalformedAttribute
            | Refusal::ConflictingAttributes
            | Refusal::MissingPeer
            | Refusal::BadChannelNumber
            | Refusal::ChannelConflict
            | Refusal::UnknownTicket
            | Refusal::TcpOverUdp
            | Refusal::TcpAllocationOptions
            | Refusal::NotUdpAllocation
            | Refusal::NotTcpAllocation
            | Refusal::UnknownConnection
            | Refusal::BindOnAllocation => ErrorCode::BAD_REQUEST,
            Refusal::ConnectionExists => ErrorCode::CONNECTION_ALREADY_EXISTS,
            Refusal::ConnectionFailed => ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE,
            Refusal::WrongConnectionUser => ErrorCode::WRONG_CREDENTIALS,
            Refusal::MobilityForbidden => ErrorCode::MOBILITY_FORBIDDEN,
            Refusal::UnknownAttribute => ErrorCode::UNKNOWN_ATTRIBUTE,
            Refusal::UnsupportedTransport => ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL,
            Refusal::AddressFamilyNotSupported => ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
            Refusal::AllocationExists | Refusal::NoAllocation => ErrorCode::ALLOCATION_MISMATCH,
            Refusal::PeerAddressFamilyMismatch => ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
            Refusal::PeerDenied | Refusal::PeerOutsideSession | Refusal::PeerClaimed => {
                ErrorCode::FORBIDDEN
            }
            Refusal::UserQuota
            | Refusal::SourceQuota
            | Refusal::SessionQuota
            | Refusal::TenantQuota => ErrorCode::ALLOCATION_QUOTA_REACHED,
            Refusal::Draining
            | Refusal::HostCapacity
            | Refusal::NoRelayPort
            | Refusal::UnknownReservation
            | Refusal::PermissionsFull
            | Refusal::ChannelsFull
            | Refusal::ConnectionsFull => ErrorCode::INSUFFICIENT_CAPACITY,
            Refusal::Internal => ErrorCode::SERVER_ERROR,
            Refusal::TryAlternate => ErrorCode::TRY_ALTERNATE,
        }
    }

    /// The `reason` label of `relay_requests_refused_total`, and the cause
    /// in log lines.
    pub const fn label(self) -> &'static str {
        match self {
            Refusal::UnknownMethod => "unknown_method",
            Refusal::IncompleteCredentials => "incomplete_credentials",
            Refusal::UnknownAttribute => "unknown_attribute",
            Refusal::MissingRequestedTransport => "missing_requested_transport",
            Refusal::UnsupportedTransport => "unsupported_transport",
            Refusal::MalformedAttribute => "malformed_attribute",
            Refusal::ConflictingAttributes => "conflicting_attributes",
            Refusal::AddressFamilyNotSupported => "address_family_not_supported",
            Refusal::AllocationExists => "allocation_exists",
            Refusal::NoAllocation => "no_allocation",
            Refusal::PeerAddressFamilyMismatch => "peer_address_family_mismatch",
            Refusal::MissingPeer => "missing_peer",
            Refusal::BadChannelNumber => "bad_channel_number",
            Refusal::ChannelConflict => "channel_conflict",
            Refusal::PeerDenied => "peer_denied",
            Refusal::PeerOutsideSession => "peer_outside_session",
            Refusal::PeerClaimed => "peer_claimed",
            Refusal::UserQuota => "user_quota",
            Refusal::SourceQuota => "source_quota",
            Refusal::SessionQuota => "session_quota",
            Refusal::TenantQuota => "tenant_quota",
            Refusal::MobilityForbidden => "mobility_forbidden",
            Refusal::UnknownTicket => "unknown_ticket",
            Refusal::Draining => "draining",
            Refusal::HostCapacity => "host_capacity",
            Refusal::TryAlternate => "try_alternate",
            Refusal::NoRelayPort => "no_relay_port",
            Refusal::UnknownReservation => "unknown_reservation",
            Refusal::PermissionsFull => "permissions_full",
            Refusal::ChannelsFull => "channels_full",
            Refusal::Internal => "internal",
            Refusal::TcpOverUdp => "tcp_over_udp",
            Refusal::TcpAllocationOptions => "tcp_allocation_options",
            Refusal::NotUdpAllocation => "not_udp_allocation",
            Refusal::NotTcpAllocation => "not_tcp_allocation",
            Refusal::ConnectionExists => "connection_exists",
            Refusal::ConnectionFailed => "connection_failed",
            Refusal::ConnectionsFull => "connections_full",
            Refusal::UnknownConnection => "unknown_connection",
            Refusal::BindOnAllocation => "bind_on_allocation",
            Refusal::WrongConnectionUser => "wrong_connection_user",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_label_and_sits_at_its_index() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
            assert_eq!(
                Refusal::ALL
                    .iter()
                    .filter(|x| x.label() == r.label())
                    .count(),
                1
            );
        }
    }

    #[test]
    fn causes_that_share_a_code_stay_apart() {
        let codes_508: Vec<_> = Refusal::ALL
            .iter()
            .filter(|r| r.code().code == 508)
            .map(|r| r.label())
            .collect();
        assert_eq!(
            codes_508,
            [
                "draining",
                "host_capacity",
                "no_relay_port",
                "unknown_reservation",
                "permissions_full",
                "channels_full",
                "connections_full"
            ]
        );
    }
}

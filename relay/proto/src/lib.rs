//! The sans-IO TURN core (RFC 8656, compatible with RFC 5766 clients),
//! crate `natrix-relay-proto`: no sockets, no clock, no randomness of its
//! own, and none of tokio, mio, socket2, actix or clap among its
//! dependencies (its `clippy.toml` disallows `Instant::now`,
//! `SystemTime::now` and `rand::random`). The relay host (`natrix-relay`)
//! drives it; it re-exports this crate as `natrix_relay::core`.
//!
//! # Design
//!
//! [`Server`] holds every allocation of one data-plane loop, indexed for the
//! two per-packet lookups: `allocation_by_client` (client 5-tuple → slot) for
//! client traffic and the slot id itself for peer traffic (the shell tags
//! each relay socket with its [`AllocationId`]). Channels and permissions are
//! small vectors inside the allocation: a client has a handful of peers, and a
//! linear scan over a few entries beats hashing.
//!
//! # Run-loop contract
//!
//! 1. For each datagram or stream frame from a client call
//!    [`Server::handle_client_input`]; act on the returned [`ClientAction`]
//!    before the next call (its ranges point into your buffers).
//! 2. For each datagram a relay socket receives call
//!    [`Server::handle_peer_input`] with the payload placed at least
//!    [`PEER_HEADROOM`] bytes into the buffer and [`PEER_TAILROOM`] bytes free
//!    after it; send the returned frame to the returned client.
//! 3. Call [`Server::handle_timeout`] when [`Server::poll_timeout`] is due.
//! 4. After each batch drain [`Server::poll_command`] (relay sockets to
//!    close) and publish [`Server::stats`].
//!
//! Relay sockets are opened synchronously through the [`RelaySockets`] trait
//! while an Allocate is handled, so the answer can say whether it worked.
//!
//! # Panics and errors
//!
//! Nothing a client or peer sends can panic the core: every malformed input
//! is an error response or a counted [`DropReason`]. Panics would indicate a
//! bug in the core (an index invariant broken), never bad input.

mod allocation;
mod auth;
mod bans;
mod policy;
mod ports;
mod refusal;
mod server;
mod stats;
mod types;

pub use allocation::Usage;
pub use auth::{AuthFailure, Credentials, NonceError, Nonces, session_peers};
pub use bans::{BanPolicy, SharedBans, Strike, source_key};
pub use natrix_model::limiter::UnauthLimits;
pub use policy::{IpNet, PeerPolicy};
pub use ports::{PortRange, QuotaUse, SharedPorts};
pub use refusal::Refusal;
pub use server::{
    AllocationInfo, Alternate, ClientAction, Command, ConnectionId, DefaultFamily, FastPath,
    MAX_TCP_CONNECTIONS, Moved, MovedAllocation, PEER_HEADROOM, PEER_TAILROOM, PeerAction,
    RelayAddress, RelaySockets, SESSION_QUOTA, SESSION_TOKEN_QUOTA, Server, ServerConfig,
    TCP_CONNECT_TIMEOUT, TICKET_LEN, Ticket, UsageRecord,
};
pub use stats::{
    AuthFailureReason, Direction, DropReason, RequestMethod, RequestResult, Stats, TcpEvent,
};
pub use types::{AllocationId, ClientSocket, Transport};

//! natrix's shared domain model: every type that more than one role reads
//! or writes, defined once.
//!
//! - [`nat`]: the NAT profile (the one JSON schema of `natrix probe --json`,
//!   lookup's plan API, the load tester and the exchange), RFC 4787
//!   behaviours and classes, and the one direct-path rule
//!   ([`nat::direct_feasible`]).
//! - [`secret`]: redacted strings, TURN REST secrets with their one parser
//!   (`key-id=secret`), the cluster secret.
//! - [`token`]: TURN REST passwords and session-bound relay tokens, minted by
//!   lookup and verified by relays.
//! - [`invitation`]: exchange session ids, keys, tickets and invitations,
//!   and the sealing of connection data.
//! - [`transport`]: the client transports (UDP, TCP, TLS).
//! - [`nat64`]: NAT64 address synthesis for IPv6-only clients (RFC 6052).
//! - [`limiter`]: the caps on unauthenticated answers (per source prefix
//!   and per loop) that the relay core and CDX share.
//! - [`apikey`]: lookup's API keys, their scopes and the ring that checks
//!   them.
//! - [`signal`]: device ids (Ed25519 keys), stateless device tokens and the
//!   sealed blobs (invitations, pair tickets) signalling clients carry.
//! - [`grant`]: signed grants (HS256 JWTs) application backends mint
//!   under a grant secret, checked without a store read.
//!
//! # Purity
//!
//! The crate owns no sockets, reads no clock and draws no randomness:
//! callers pass `now` and random bytes in (its `clippy.toml` disallows
//! `Instant::now`, `SystemTime::now` and `rand::random`). It depends on
//! serde, serde_json, ring and base64 only, so every role, tool and test can use it.
//!
//! # Panics and errors
//!
//! Nothing here panics on input: parsers return typed errors whose messages
//! say what a valid value looks like.

pub mod apikey;
pub mod grant;
pub mod invitation;
mod ipnet;
pub mod limiter;
pub mod nat;
pub mod nat64;
pub mod secret;
pub mod signal;
pub mod token;
pub mod transport;

pub use ipnet::IpNet;
pub use nat::{
    Behaviour, Filtering, Mapping, NatClass, NatProfile, PortAllocation, ProfileError, PunchPlan,
    Technique, direct_feasible, keepalive, punch_plans,
};
pub use nat64::Nat64Prefix;
pub use secret::{ClusterSecret, Redacted, SecretError, TurnSecret};
pub use token::SessionToken;
pub use transport::Transport;

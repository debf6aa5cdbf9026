//! CDX's protocol cores, sans-IO: they own no sockets, read no clock and
//! draw no randomness (inputs carry `now` and seeds; the crate's
//! `clippy.toml` disallows `Instant::now`, `SystemTime::now` and
//! `rand::random`). The role crate `natrix-cdx` drives them on real sockets.
//!
//! - [`binding`]: the STUN Binding responder (RFC 8489 §6.3, RFC 5780
//!   attributes, RFC 3489 clients), one request in, one answer or one
//!   counted drop out.
//! - [`handoff`]: sealed hand-offs between sibling CDX nodes, so that a node
//!   with one IP can answer RFC 5780 change requests through another.
//! - [`discovery`]: the client's RFC 5780 NAT behaviour discovery as a state
//!   machine (`poll_transmit` / `handle_input` / `handle_timeout`), which the
//!   blocking `natrix probe` client and the load tester drive.
//! - [`lifetime`]: RFC 5780 §4.6 binding lifetime discovery (how long a NAT
//!   keeps an idle mapping), idle sockets checked in parallel.
//! - [`exchange`]: the connection-data exchange's wire codec, a node's
//!   session registry (admission, deliveries, retransmission timers at
//!   explicit instants), which the role's actor drives, and the
//!   participant's side as a state machine ([`exchange::client::Poster`]).
//!
//! # Panics and errors
//!
//! Untrusted input never panics: malformed bytes become a counted drop
//! (responder, hand-offs) or are ignored (discovery).

pub mod binding;
pub mod discovery;
pub mod exchange;
#[doc(hidden)]
pub mod fuzzing;
pub mod handoff;
pub mod lifetime;

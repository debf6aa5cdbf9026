//! The CDX role: where am I, and what NAT am I behind.
//!
//! This crate holds the STUN Binding service of [RFC 8489]: a sans-IO core
//! ([`BindingResponder`]) that turns one request into one answer or one
//! counted drop, and the STUN service ([`service`]) that the relay host's
//! loops carry: in `natrix cdx` on a host without TURN, in `natrix up` on
//! TURN's listener (one packet path either way). NAT behaviour discovery (RFC 5780, on one node
//! or across two sibling nodes: [`handoff`]) builds on the same core; the
//! discovery client is [`client`]. The connection-data exchange
//! ([`exchange`]) lets the participants of a session swap sealed candidates
//! through any CDX node and punch direct paths with them.
//!
//! # Run loop contract
//!
//! The relay host runs one `mio` loop per core, each with its own
//! SO_REUSEPORT sockets and its own CDX service ([`service::factory`]).
//! Per wake-up a loop reads batches (recvmmsg, GRO trains split), hands
//! each STUN datagram to the service, which writes its answer into the
//! loop's reused buffer, and sends the batch's answers with one sendmmsg.
//! Nothing on that path allocates, locks or awaits: exchange messages are
//! offered to the actor over a bounded channel and dropped (counted) when
//! it is behind; the actor's frames for TCP and TLS participants come back
//! through the loop's bounded mailbox and waker.
//!
//! # Amplification
//!
//! RFC 8489 clients send bare 20-byte Binding requests and must get
//! XOR-MAPPED-ADDRESS back, so "never answer with more than was asked" would
//! refuse standard clients: the worst ratio is a 20-byte request answered
//! with 56 bytes (2.8×; with RFC 5780 attributes and SOFTWARE, more). CDX
//! bounds what a spoofed flood can reflect instead: answers per /24 (IPv4)
//! or /48 (IPv6) and in total are token buckets per loop
//! (`--stun-rate-per-prefix`, `--stun-rate-total`), and PADDING is echoed
//! only up to what the request itself carried. Exchange answers are smaller
//! than the posts they answer (a post carries a 44-byte ticket and a sealed
//! entry), and deliveries go only to an address that presented a valid
//! ticket from itself.
//!
//! # Panics and errors
//!
//! Untrusted input never panics: the codec rejects malformed bytes and the
//! responder turns every rejection into a [`DropReason`], counted in
//! `cdx_packets_dropped_total`. Socket errors while sending are counted and
//! logged at debug level; only failing to bind is fatal.
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489

pub mod client;
mod config;
pub mod exchange;
mod metrics;
pub mod pairing;
pub mod service;

pub use config::{CdxConfig, Sibling};
pub use metrics::{CdxMetrics, ExchangeMetrics, LoopCounters};
pub use natrix_cdx_proto::binding::{
    self, BindingResponder, DropReason, Grid, Outcome, Reply, Site, Transport, Via,
};
pub use natrix_cdx_proto::handoff;

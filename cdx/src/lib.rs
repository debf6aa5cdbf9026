//! The CDX role: where am I, and what NAT am I behind.
//!
//! This crate holds the STUN Binding service of [RFC 8489]: a sans-IO core
//! ([`BindingResponder`]) that turns one request into one answer or one
//! counted drop, and the server shells that drive it on real sockets
//! ([`server`]: batched UDP loops, one per worker, and a TCP acceptor with
//! per-connection framing). NAT behaviour discovery (RFC 5780) and the
//! connection-data exchange build on the same core.
//!
//! # Run loop contract (UDP)
//!
//! Each loop owns one SO_REUSEPORT socket and its receive buffers. Per
//! wake-up it (1) publishes counters if the flush interval passed, (2) reads
//! one batch (up to 32 datagrams by recvmmsg, GRO trains split), (3) answers
//! each datagram in order, writing into one reused response buffer, and
//! (4) yields back to the runtime. Shutdown is checked first on every wake-up.
//! Nothing on that path allocates, locks or awaits anything but the socket.
//!
//! # Panics and errors
//!
//! Untrusted input never panics: the codec rejects malformed bytes and the
//! responder turns every rejection into a [`DropReason`], counted in
//! `cdx_packets_dropped_total`. Socket errors while sending are counted and
//! logged at debug level; only failing to bind is fatal.
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489

mod binding;
pub mod client;
mod config;
pub mod exchange;
pub mod handoff;
mod metrics;
pub mod server;

pub use binding::{BindingResponder, DropReason, Grid, Outcome, Reply, Site, Transport, Via};
pub use config::{CdxConfig, ClusterSecret};
pub use metrics::{CdxMetrics, ExchangeMetrics, LoopCounters};

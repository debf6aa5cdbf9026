//! The CDX role: where am I, and what NAT am I behind.
//!
//! This crate holds the STUN Binding service of [RFC 8489]: a sans-IO core
//! ([`BindingResponder`]) that turns one request into one answer or one
//! counted drop, and the server shells that drive it on real sockets
//! ([`server`]: batched UDP loops, one per worker, and a TCP acceptor with
//! per-connection framing). NAT behaviour discovery (RFC 5780, on one node
//! or across two sibling nodes: [`handoff`]) builds on the same core; the
//! discovery client is [`client`]. The connection-data exchange
//! ([`exchange`]) lets the participants of a session swap sealed candidates
//! through any CDX node and punch direct paths with them.
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
pub mod server;

pub use config::{CdxConfig, Sibling};
pub use metrics::{CdxMetrics, ExchangeMetrics, LoopCounters};
pub use natrix_cdx_proto::binding::{
    self, BindingResponder, DropReason, Grid, Outcome, Reply, Site, Transport, Via,
};
pub use natrix_cdx_proto::handoff;

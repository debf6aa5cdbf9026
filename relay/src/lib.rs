//! The TURN relay role (RFC 8656, compatible with RFC 5766 clients).
//!
//! The protocol lives in [`core`] (the crate `natrix-relay-proto` in
//! `relay/proto`): a sans-IO state machine that owns no
//! socket, reads no clock and spawns nothing. Its inputs are a packet, where
//! it came from and `now`; its outputs are the bytes to answer, a forwarding
//! decision that points into the input buffer (no copy, no allocation), and
//! commands for the shell (close a relay socket). [`shell`] drives it on
//! real sockets: one `mio` loop per core, batched receives, nothing shared
//! between loops on the packet path. [`control`] is the control plane (drain,
//! credential rotation, certificate reloads; an actix actor). [`config`] is
//! the role's command line.

pub mod config;
pub mod control;
pub mod https;
pub use natrix_relay_proto as core;
pub mod metrics;
pub mod shell;
pub mod tls;
pub mod usage;
pub mod xdp;

pub use config::{HostConfig, RelayConfig};
pub use shell::{BoundHost, HostServices, RelayHost};
pub use tls::TlsReloader;

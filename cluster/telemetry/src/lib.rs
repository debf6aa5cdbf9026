//! Telemetry shared by every natrix role.
//!
//! - [`catalogue`]: every metric name, help string, type and closed label
//!   set in one place, checked against Prometheus naming conventions by a
//!   unit test. Dashboards and alert rules are cross-checked against it.
//! - [`Telemetry`]: the process-wide Prometheus registry. Handles are
//!   resolved once at start-up from catalogue entries; every labelled series
//!   is created up front so dashboards show zeros rather than gaps.
//! - [`LocalCounter`]: a counter owned by one event loop. The packet path adds
//!   to a plain `u64` and the loop publishes deltas between batches, so no
//!   atomic is touched per packet.
//! - [`Health`] and [`http`]: `/metrics`, `/healthz` and `/readyz` on the
//!   metrics port.
//! - [`logging`]: `tracing` with human or JSON output.

pub mod catalogue;
mod health;
pub mod http;
pub mod logging;
mod registry;

pub use health::{Health, ReadyGate};
pub use registry::{LocalCounter, Telemetry};

//! The lookup role: for two peers, how they connect.
//!
//! A client sends both peers' NAT profiles (as `natrix probe --json` prints
//! them); lookup decides the mode from the behaviours ([`planner`]: direct,
//! relay-one with the side that relays, or relay-both), picks relays from
//! the registry snapshot ([`select`]: healthy, not draining, headroom,
//! region, then power of two choices), mints session-bound TURN tokens
//! ([`natrix_model::token`]) and the CDX exchange invitations, and answers with per-side
//! ICE servers in WebRTC form ([`api`]). It is stateless per request: the
//! registry comes from a snapshot a control-plane actor keeps fresh
//! (`natrix_registry::SnapshotKeeper`); handlers never call the store.
//!
//! The HTTP API ([`http`]) is documented in `lookup/openapi.yaml`.
//!
//! # Panics and errors
//!
//! Request input never panics: malformed JSON and unknown fields are 400,
//! contradictory profiles 422 naming the field, no CDX node or no relay with
//! capacity 503, each as an RFC 9457 problem document and counted in
//! `lookup_plan_errors_total`.

pub mod api;
mod config;
pub mod guard;
pub mod http;
mod metrics;
pub mod outcomes;
pub mod planner;
pub mod select;
pub mod sessions;
mod start;

pub use config::LookupConfig;
pub use metrics::LookupMetrics;
pub use start::{Extend, start};

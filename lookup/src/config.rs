//! Configuration of the lookup role.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// lookup's own settings (the TURN and cluster secrets come from the
/// command that runs it). Every flag also reads an environment variable.
#[derive(Args, Clone, Debug)]
pub struct LookupConfig {
    /// Address of the lookup HTTP API.
    #[arg(
        long = "lookup-listen",
        env = "NATRIX_LOOKUP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub lookup_listen: SocketAddr,

    /// Lifetime of relay tokens and exchange sessions in a plan.
    #[arg(
        long = "token-ttl",
        env = "NATRIX_TOKEN_TTL",
        default_value = "10m",
        value_parser = humantime::parse_duration
    )]
    pub token_ttl: Duration,

    /// Oldest registry snapshot plans are made from: while the store is
    /// unreachable lookup serves from its last snapshot this long, then
    /// answers 503 and fails readiness.
    #[arg(
        long = "max-snapshot-age",
        env = "NATRIX_MAX_SNAPSHOT_AGE",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub max_snapshot_age: Duration,

    /// Utilisation (allocations / capacity) above which a relay gets no new
    /// sessions.
    #[arg(
        long = "relay-headroom",
        env = "NATRIX_RELAY_HEADROOM",
        default_value_t = 0.9
    )]
    pub headroom: f64,
}

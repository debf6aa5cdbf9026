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

    /// API keys accepted with every scope, besides those created with
    /// `natrix apikey create` (comma separated, `nxk_<id>_<secret>`). Plans
    /// and the relay list need a key: `Authorization: Bearer nxk_…`.
    #[arg(long = "api-key", env = "NATRIX_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<natrix_model::apikey::ApiKey>,

    /// Requests per second one API key created with `natrix apikey create`
    /// may make (twice that in a burst); past it, 429 with Retry-After.
    /// Keys given with --api-key are the operator's and not metered.
    #[arg(
        long = "api-key-rate",
        env = "NATRIX_API_KEY_RATE",
        default_value_t = 200.0
    )]
    pub api_key_rate: f64,
}

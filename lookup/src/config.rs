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
    /// unreachable lookup serves from its last snapshot this long (relays
    /// keep relaying; `lookup_registry_snapshot_age_seconds` and the
    /// NatrixRegistrySnapshotStale alerts show it), then answers 503 and fails
    /// readiness.
    #[arg(
        long = "max-snapshot-age",
        env = "NATRIX_MAX_SNAPSHOT_AGE",
        default_value = "5m",
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

    /// Live sessions (plans whose tokens have not expired) one API key or
    /// grant key id may hold, cluster-wide, unless the key sets its own;
    /// past it, 429 with Retry-After. Keys given with --api-key are not
    /// capped.
    #[arg(
        long = "api-key-max-sessions",
        env = "NATRIX_API_KEY_MAX_SESSIONS",
        default_value_t = 10_000
    )]
    pub api_key_max_sessions: u64,

    /// Grant secrets (`key-id=secret`, comma separated, newest first) shared
    /// with application backends: lookup accepts the HS256 grants they mint
    /// (`Authorization: Bearer <JWT>`, at most 1 h long, `aud` "natrix",
    /// `scope` "plan" and/or "relays:read"); each key id is a tenant with
    /// the rate and session cap above. `natrix grant` mints one for tests.
    #[arg(
        long = "grant-secret",
        env = "NATRIX_GRANT_SECRETS",
        value_delimiter = ','
    )]
    pub grant_secrets: Vec<natrix_model::TurnSecret>,

    /// Refused authentications (401: no, wrong or forged key, grant or
    /// device token) one source (an IPv4 address, an IPv6 /64) may have a minute, with
    /// as many at once; past them its requests get 429 before any work
    /// until it earns one back. 0 turns the limit off.
    #[arg(
        long = "auth-failures-per-minute",
        env = "NATRIX_AUTH_FAILURES_PER_MINUTE",
        default_value_t = 60
    )]
    pub auth_failures_per_minute: u32,

    /// Proxies (addresses or networks, comma separated) in front of
    /// lookup whose `X-Forwarded-For` names the client: the nearest address
    /// in it that is not itself a trusted proxy is the source the limit
    /// above counts. Without it the TCP peer is the source.
    #[arg(
        long = "trusted-proxy",
        env = "NATRIX_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<natrix_model::IpNet>,
}

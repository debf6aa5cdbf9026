//! Command line. Every flag also reads an environment variable (`NATRIX_*`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use natrix_cdx::CdxConfig;
use natrix_relay::RelayConfig;
use natrix_telemetry::logging::LogFormat;

/// natrix: STUN/TURN relay and connectivity cluster.
#[derive(Parser, Debug)]
#[command(name = "natrix", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options shared by every command.
#[derive(Args, Debug, Clone)]
pub(crate) struct Global {
    /// A config file (TOML, a section per role; `natrix config example`
    /// prints one with every flag). Environment variables and flags
    /// override it.
    #[arg(long, env = "NATRIX_CONFIG", global = true, value_name = "FILE")]
    pub(crate) config: Option<std::path::PathBuf>,

    /// Log filter, `RUST_LOG` syntax (e.g. `info,natrix_cdx=debug`).
    #[arg(long, env = "NATRIX_LOG", default_value = "info", global = true)]
    pub(crate) log: String,

    /// Log format: auto (human on a terminal, JSON otherwise), human or json.
    #[arg(long, env = "NATRIX_LOG_FORMAT", default_value = "auto", global = true)]
    pub(crate) log_format: LogFormat,

    /// Address of the metrics and health endpoint (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "NATRIX_METRICS_LISTEN",
        default_value = "0.0.0.0:9090",
        global = true
    )]
    pub(crate) metrics_listen: SocketAddr,

    /// A second endpoint serving only /healthz and /readyz, for probes: a
    /// flood of the metrics port cannot starve it (the chart points
    /// kubelet's probes at it).
    #[arg(long, env = "NATRIX_HEALTH_LISTEN", global = true)]
    pub(crate) health_listen: Option<SocketAddr>,

    /// Data-plane threads; 0 means one per CPU core.
    #[arg(long, env = "NATRIX_WORKERS", default_value_t = 0, global = true)]
    pub(crate) workers: usize,

    /// Longest a shutdown waits for the HTTP listeners (metrics, lookup) to
    /// finish their requests before exiting.
    #[arg(
        long,
        env = "NATRIX_SHUTDOWN_TIMEOUT",
        default_value = "10s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    pub(crate) shutdown_timeout: Duration,

    /// Redis shared by the cluster: `redis://[user:password@]host:port[/db]`,
    /// `redis+cluster://host:port,host:port` (Redis Cluster seed nodes) or
    /// `redis+sentinel://host:port,host:port/service` (Sentinel). Without it,
    /// coordination state stays in this process (right for `natrix up` and
    /// a single node). At start a process waits up to 60 s for it.
    #[arg(long, env = "NATRIX_REDIS_URL", global = true)]
    pub(crate) redis_url: Option<RedisUrl>,

    /// Region of this host in the registry (relay selection prefers the
    /// client's region).
    #[arg(long, env = "NATRIX_REGION", default_value = "", global = true)]
    pub(crate) region: String,

    /// Zone of this host in the registry.
    #[arg(long, env = "NATRIX_ZONE", default_value = "", global = true)]
    pub(crate) zone: String,

    /// How often this host refreshes its registry record.
    #[arg(
        long,
        env = "NATRIX_HEARTBEAT",
        default_value = "1s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    pub(crate) heartbeat: Duration,

    /// How long a registry record outlives its last heartbeat: a host that
    /// stops (crash, partition) leaves selection after this.
    #[arg(
        long,
        env = "NATRIX_REGISTRY_TTL",
        default_value = "3s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    pub(crate) registry_ttl: Duration,
}

/// A Redis URL whose password never reaches the logs.
#[derive(Clone)]
pub(crate) struct RedisUrl(pub(crate) String);

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keep the scheme, hosts and path; hide any credentials. The
        // credentials end at the authority's last '@' (a raw '@' in a
        // password must not leak its tail).
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str("<redacted>");
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((_, hosts)) => write!(f, "{scheme}://<redacted>@{hosts}{path}"),
            None => f.write_str(&self.0),
        }
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<RedisUrl, String> {
        const SCHEMES: [&str; 5] = [
            "redis://",
            "rediss://",
            "redis+unix://",
            "redis+cluster://",
            "redis+sentinel://",
        ];
        if !SCHEMES.iter().any(|scheme| s.starts_with(scheme)) {
            return Err(format!(
                "a Redis URL starts with one of {}",
                SCHEMES.join(", ")
            ));
        }
        Ok(RedisUrl(s.to_owned()))
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run every role in one process with in-memory coordination: one
    /// listener on 3478 (UDP+TCP) where TURN goes to the relay role and
    /// STUN Binding to the CDX role, and the metrics endpoint on 9090.
    Up(Box<UpArgs>),
    /// Run the CDX role alone: the STUN Binding service.
    Cdx(Box<CdxArgs>),
    /// Run the relay role alone: TURN over UDP and TCP.
    Relay(Box<RelayArgs>),
    /// Run the lookup role alone: the plan API (direct or relay, which
    /// relay, tokens) over the cluster registry.
    Lookup(Box<LookupArgs>),
    /// Ask a STUN server for this host's public (mapped) address.
    Probe(ProbeArgs),
    /// Manage the cluster's shared TURN secrets in Redis (--redis-url):
    /// `rotate` adds a new one (relays and lookup pick it up within a
    /// second; tokens minted before stay valid until they expire), `list`
    /// shows key ids and ages.
    Secret {
        /// rotate or list.
        #[arg(value_parser = ["rotate", "list"])]
        action: String,
    },
    /// Manage lookup's API keys in Redis (--redis-url): `create` prints a
    /// new key once (`--name`, `--scope plan` and/or `--scope relays:read`,
    /// `--rate`, `--max-sessions`), `list` shows ids, names, scopes and
    /// limits, `revoke ID` removes one. Every lookup node follows within a
    /// second.
    Apikey(ApikeyArgs),
    /// Mint a signed grant (an HS256 JWT) under a grant secret, as an
    /// application backend does: for tests and scripts. lookup accepts it as
    /// `Authorization: Bearer <grant>` when it holds the same secret
    /// (--grant-secret).
    Grant(GrantArgs),
    /// The relay's admin API (a relay started with --admin-listen and
    /// --admin-token): `list` its allocations (--user, --session, --tenant,
    /// --peer, --client), `kill RELAYED` one, `drain` the relay (new
    /// allocations refused, lookup stops picking it), `quotas` in use.
    Admin(AdminArgs),
    /// Sums the relays' usage records (one per allocation: who, how long,
    /// packets and bytes each way) by tenant, user, session or relay, from
    /// a relay's --usage-file or from its --usage-stream (--redis-url).
    Usage(UsageArgs),
    /// The config file: `check FILE` validates one without starting
    /// anything (unknown keys name the nearest valid one), `example` prints
    /// one with every flag, its help and its default.
    Config(ConfigArgs),
    /// Prints a shell completion script (bash, zsh, fish, …) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Writes the manual pages (natrix.1 and one per command) into DIR.
    Man {
        /// Where the pages go.
        dir: std::path::PathBuf,
    },
}

/// Options of `natrix admin`.
#[derive(Args, Debug)]
pub(crate) struct AdminArgs {
    /// list, kill, drain or quotas.
    #[arg(value_parser = ["list", "kill", "drain", "quotas"])]
    pub(crate) action: String,
    /// kill: the allocation's relayed address (IP:PORT, as `list` shows).
    pub(crate) relayed: Option<String>,
    /// The relay's admin API.
    #[arg(
        long = "admin-url",
        env = "NATRIX_ADMIN_URL",
        default_value = "http://127.0.0.1:9500"
    )]
    pub(crate) url: String,
    /// The relay's --admin-token.
    #[arg(long = "admin-token", env = "NATRIX_ADMIN_TOKEN")]
    pub(crate) token: natrix_model::Redacted,
    /// list: only this TURN username's allocations.
    #[arg(long)]
    pub(crate) user: Option<String>,
    /// list: only this session's (from session tokens).
    #[arg(long)]
    pub(crate) session: Option<String>,
    /// list: only this tenant's.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// list: only those with a permission for this peer IP.
    #[arg(long)]
    pub(crate) peer: Option<String>,
    /// list: only this client (IP, or IP:PORT); kill: the client (IP:PORT)
    /// of an allocation on a shared relayed address.
    #[arg(long)]
    pub(crate) client: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Options of `natrix usage`.
#[derive(Args, Debug)]
pub(crate) struct UsageArgs {
    /// A usage file (JSON lines, a relay's --usage-file).
    #[arg(long, conflicts_with = "stream")]
    pub(crate) file: Option<std::path::PathBuf>,
    /// A usage stream in Redis (a relay's --usage-stream; needs --redis-url).
    #[arg(long)]
    pub(crate) stream: Option<String>,
    /// Group by tenant (the API key or grant key a session token names),
    /// user (the TURN username), session, relay, or none.
    #[arg(long, default_value = "tenant", value_parser = ["tenant", "user", "session", "relay", "none"])]
    pub(crate) by: String,
    /// Only allocations that ended within this long (e.g. 24h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) since: Option<std::time::Duration>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Options of `natrix config`.
#[derive(Args, Debug)]
pub(crate) struct ConfigArgs {
    /// check or example.
    #[arg(value_parser = ["check", "example"])]
    pub(crate) action: String,
    /// The file to check.
    pub(crate) file: Option<std::path::PathBuf>,
}

/// Options of `natrix apikey`.
#[derive(Args, Debug)]
pub(crate) struct ApikeyArgs {
    /// create, list or revoke.
    #[arg(value_parser = ["create", "list", "revoke"])]
    pub(crate) action: String,
    /// The key id to revoke.
    pub(crate) id: Option<String>,
    /// A name for the new key (who holds it).
    #[arg(long, default_value = "unnamed")]
    pub(crate) name: String,
    /// The new key's scopes (default: plan).
    #[arg(long = "scope")]
    pub(crate) scopes: Vec<natrix_model::apikey::Scope>,
    /// The new key's requests per second (default: lookup's --api-key-rate).
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// The new key's live sessions (default: lookup's
    /// --api-key-max-sessions).
    #[arg(long = "max-sessions")]
    pub(crate) max_sessions: Option<u64>,
}

/// Options of `natrix grant`.
#[derive(Args, Debug)]
pub(crate) struct GrantArgs {
    /// The grant secret to sign with (`key-id=secret`, as lookup's
    /// --grant-secret).
    #[arg(long = "grant-secret", env = "NATRIX_GRANT_SECRET")]
    pub(crate) secret: natrix_model::TurnSecret,
    /// Who the grant is for (the application's user or device id).
    #[arg(long)]
    pub(crate) sub: String,
    /// Its scopes (default: plan).
    #[arg(long = "scope")]
    pub(crate) scopes: Vec<natrix_model::apikey::Scope>,
    /// How long it lives (at most 1h).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) ttl: std::time::Duration,
    /// With `--scope register`: the one device id it may register.
    #[arg(long)]
    pub(crate) dev: Option<String>,
}

/// Options of `natrix cdx`.
#[derive(Args, Debug)]
pub(crate) struct CdxArgs {
    #[command(flatten)]
    pub(crate) cdx: CdxConfig,
}

/// Options of `natrix up`: the relay's, plus what the CDX role on the same
/// listener needs.
#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    pub(crate) relay: RelayConfig,

    /// Shared secret of the cluster (at least 16 characters): verifies
    /// connection-data exchange tickets (the exchange is off without it).
    #[arg(long = "cluster-secret", env = "NATRIX_CLUSTER_SECRET")]
    pub(crate) cluster_secret: Option<natrix_model::ClusterSecret>,

    #[command(flatten)]
    pub(crate) lookup: natrix_lookup::LookupConfig,

    #[command(flatten)]
    pub(crate) signal: natrix_signal::SignalConfig,

    /// RFC 5780 NAT behaviour discovery on up's listener: an alternate port
    /// on the --turn-listen IPs (needs specific --turn-listen addresses).
    #[arg(long = "stun-alternate-port", env = "NATRIX_STUN_ALTERNATE_PORT")]
    pub(crate) stun_alternate_port: Option<u16>,

    /// RFC 5780 on up's listener: a second IP of this host (with
    /// --stun-alternate-port, all four address/port combinations).
    #[arg(long = "stun-alternate-ip", env = "NATRIX_STUN_ALTERNATE_IP")]
    pub(crate) stun_alternate_ip: Option<std::net::IpAddr>,
}

/// Options of `natrix lookup`.
#[derive(Args, Debug)]
pub(crate) struct LookupArgs {
    #[command(flatten)]
    pub(crate) lookup: natrix_lookup::LookupConfig,

    #[command(flatten)]
    pub(crate) signal: natrix_signal::SignalConfig,

    /// TURN REST shared secrets the relays hold, `key-id=secret`, newest
    /// first (comma separated); tokens are minted with the first.
    #[arg(
        long = "auth-secret",
        env = "NATRIX_AUTH_SECRETS",
        value_delimiter = ',',
        required = true
    )]
    pub(crate) auth_secrets: Vec<natrix_model::TurnSecret>,

    /// Shared secret of the cluster (the CDX nodes' `--cluster-secret`):
    /// exchange tickets are minted with it.
    #[arg(
        long = "cluster-secret",
        env = "NATRIX_CLUSTER_SECRET",
        required = true
    )]
    pub(crate) cluster_secret: natrix_model::ClusterSecret,
}

/// Options of `natrix relay`.
#[derive(Args, Debug)]
pub(crate) struct RelayArgs {
    #[command(flatten)]
    pub(crate) relay: RelayConfig,
}

/// Options of `natrix probe`.
#[derive(Args, Debug)]
pub(crate) struct ProbeArgs {
    /// STUN server, `host:port` or `host` (port 3478).
    pub(crate) server: String,

    /// Use TCP instead of UDP.
    #[arg(long)]
    pub(crate) tcp: bool,

    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,

    /// Print JSON instead of a human summary.
    #[arg(long)]
    pub(crate) json: bool,

    /// Also measure how long the NAT keeps an idle UDP mapping (RFC 5780
    /// §4.6): sockets idled for 1 s, 2 s, 4 s… up to this long, checked in
    /// parallel (the probe takes about this long more). What a keepalive
    /// interval must stay under.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) lifetime: Option<Duration>,

    /// Also probe over IPv6 against this server (an IPv6 address of the
    /// same deployment, `[addr]:port` or `addr`), the result nested as
    /// `ipv6`: what lookup plans a direct IPv6 path from. Skipped when the
    /// host has no IPv6 route there.
    #[arg(long)]
    pub(crate) ipv6: Option<String>,

    /// On an IPv6-only host (no route to the IPv4 server): reach it through
    /// the network's NAT64 at its address in this /96 prefix (RFC 6052).
    #[arg(long, env = "NATRIX_NAT64_PREFIX", default_value = "64:ff9b::/96")]
    pub(crate) nat64_prefix: natrix_model::Nat64Prefix,
}

#[cfg(test)]
mod tests {
    use super::RedisUrl;

    #[test]
    fn every_documented_redis_url_is_accepted_and_credentials_never_logged() {
        for (url, shown) in [
            ("redis://h:6379/0", "redis://h:6379/0"),
            ("redis://:p@ss@h:6379/0", "redis://<redacted>@h:6379/0"),
            ("rediss://user:pw@h:6380", "rediss://<redacted>@h:6380"),
            (
                "redis+cluster://:s3cret@a:1,b:2",
                "redis+cluster://<redacted>@a:1,b:2",
            ),
            (
                "redis+sentinel://:pw@s1:26379,s2:26379/natrix",
                "redis+sentinel://<redacted>@s1:26379,s2:26379/natrix",
            ),
        ] {
            let parsed: RedisUrl = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(format!("{parsed:?}"), shown);
        }
        assert!("http://h".parse::<RedisUrl>().is_err());
    }
}

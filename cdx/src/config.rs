//! Configuration of the CDX role.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use natrix_model::ClusterSecret;

impl CdxConfig {
    /// The per-loop answer limits.
    pub fn limits(&self) -> natrix_model::limiter::UnauthLimits {
        natrix_model::limiter::UnauthLimits {
            per_prefix_rate: self.rate_per_prefix,
            per_prefix_burst: (self.rate_per_prefix * 2.0).max(1.0),
            total_rate: self.rate_total,
            total_burst: self.rate_total.max(1.0),
        }
    }
}

impl CdxConfig {
    /// The exchange's caps on node state.
    pub fn exchange_limits(&self) -> crate::exchange::Limits {
        crate::exchange::Limits {
            per_source: self.exchange_per_source,
            max_sessions: self.exchange_max_sessions,
        }
    }
}

/// How a single-IP node finds its RFC 5780 sibling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sibling {
    /// A fixed sibling IP.
    Ip(IpAddr),
    /// Paired through the cluster registry.
    Auto,
}

impl Sibling {
    /// The fixed IP, if any.
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            Sibling::Ip(ip) => Some(ip),
            Sibling::Auto => None,
        }
    }
}

impl std::str::FromStr for Sibling {
    type Err = String;
    fn from_str(s: &str) -> Result<Sibling, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Sibling::Auto);
        }
        s.parse()
            .map(Sibling::Ip)
            .map_err(|_| format!("--stun-sibling takes an IP address or `auto`, not {s:?}"))
    }
}

/// CDX (STUN) listener settings. Every flag also reads an environment
/// variable; the Helm values map one to one onto them.
#[derive(Args, Clone, Debug)]
pub struct CdxConfig {
    /// Addresses the STUN listeners bind, on UDP and TCP (comma separated).
    /// An IPv6 wildcard that the host cannot bind is skipped with a warning.
    #[arg(
        long = "stun-listen",
        env = "NATRIX_STUN_LISTEN",
        value_delimiter = ',',
        default_value = "0.0.0.0:3478,[::]:3478"
    )]
    pub listen: Vec<SocketAddr>,

    /// RFC 5780: an alternate port on every listener's IP (e.g. 3479);
    /// enables NAT behaviour discovery (CHANGE-REQUEST, OTHER-ADDRESS,
    /// RESPONSE-ORIGIN, RESPONSE-PORT). Needs specific listen addresses.
    #[arg(long = "stun-alternate-port", env = "NATRIX_STUN_ALTERNATE_PORT")]
    pub alternate_port: Option<u16>,

    /// RFC 5780: a second IP of this host, answering change-IP requests
    /// (with --stun-alternate-port, all four address/port combinations).
    #[arg(long = "stun-alternate-ip", env = "NATRIX_STUN_ALTERNATE_IP")]
    pub alternate_ip: Option<IpAddr>,

    /// RFC 5780 across two nodes with one IP each: the sibling CDX node's
    /// IP (it listens on the same ports), or `auto` to pair with another
    /// CDX node of the registry (re-paired as nodes come and go).
    /// OTHER-ADDRESS names the sibling, and change-IP requests are handed to
    /// it; needs --cluster-secret, the same on both nodes.
    #[arg(
        long = "stun-sibling",
        env = "NATRIX_STUN_SIBLING",
        conflicts_with = "alternate_ip"
    )]
    pub sibling: Option<Sibling>,

    /// RFC 5780 behind a 1:1 NAT (cloud VMs, Kubernetes nodes): the public
    /// IP clients reach this node's listen address at. RESPONSE-ORIGIN and
    /// OTHER-ADDRESS name public addresses; sockets stay on the private ones.
    #[arg(long = "stun-advertise-ip", env = "NATRIX_STUN_ADVERTISE_IP")]
    pub advertise_ip: Option<IpAddr>,

    /// RFC 5780 behind a 1:1 NAT: the public IP of the alternate IP (or of
    /// the sibling node), named in OTHER-ADDRESS.
    #[arg(
        long = "stun-alternate-advertise-ip",
        env = "NATRIX_STUN_ALTERNATE_ADVERTISE_IP"
    )]
    pub alternate_advertise_ip: Option<IpAddr>,

    /// Shared secret of the cluster (at least 16 characters): authenticates
    /// hand-offs between sibling nodes and verifies exchange tickets (the
    /// exchange is off without it).
    #[arg(long = "cluster-secret", env = "NATRIX_CLUSTER_SECRET")]
    pub cluster_secret: Option<ClusterSecret>,

    /// UDP answers per second to one /24 (IPv4) or /48 (IPv6), per loop:
    /// spoofed floods cannot turn the server into an amplifier.
    #[arg(
        long = "stun-rate-per-prefix",
        env = "NATRIX_STUN_RATE_PER_PREFIX",
        default_value_t = 500.0
    )]
    pub rate_per_prefix: f64,

    /// UDP answers per second in total, per loop.
    #[arg(
        long = "stun-rate-total",
        env = "NATRIX_STUN_RATE_TOTAL",
        default_value_t = 100_000.0
    )]
    pub rate_total: f64,

    /// Serve STUN over TCP as well as UDP.
    #[arg(
        long = "stun-tcp",
        env = "NATRIX_STUN_TCP",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub tcp: bool,

    /// SOFTWARE attribute sent in responses; empty to send none.
    #[arg(long = "software", env = "NATRIX_SOFTWARE", default_value = concat!("natrix ", env!("CARGO_PKG_VERSION")))]
    pub software: String,

    /// Most simultaneous STUN/TCP connections; further ones are closed at once.
    #[arg(
        long = "stun-tcp-max-connections",
        env = "NATRIX_STUN_TCP_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub tcp_max_connections: usize,

    /// Most simultaneous STUN/TCP connections from one IP address (about:
    /// counted per loop); further ones are closed at once.
    #[arg(
        long = "stun-tcp-max-connections-per-ip",
        env = "NATRIX_STUN_TCP_MAX_CONNECTIONS_PER_IP",
        default_value_t = 1000
    )]
    pub tcp_max_connections_per_ip: usize,

    /// Connection-data exchange: live participants (sessions) per source IP
    /// on this node, counted once the source proved it receives there (a
    /// connection or an acknowledged delivery), so spoofed Posts cannot
    /// lock a victim's address out.
    #[arg(
        long = "exchange-sessions-per-source",
        env = "NATRIX_EXCHANGE_SESSIONS_PER_SOURCE",
        default_value_t = 64
    )]
    pub exchange_per_source: u32,

    /// Connection-data exchange: live sessions on this node.
    #[arg(
        long = "exchange-max-sessions",
        env = "NATRIX_EXCHANGE_MAX_SESSIONS",
        default_value_t = 100_000
    )]
    pub exchange_max_sessions: usize,

    /// A STUN/TCP connection that sends nothing for this long is closed.
    #[arg(
        long = "stun-tcp-idle-timeout",
        env = "NATRIX_STUN_TCP_IDLE_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub tcp_idle_timeout: Duration,
}

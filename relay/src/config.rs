//! Configuration of the relay role. Every flag also reads an environment
//! variable; the Helm values map one to one onto them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use natrix_model::{Redacted, TurnSecret};

use crate::core::{
    BanPolicy, Credentials, IpNet, PeerPolicy, PortRange, RelayAddress, ServerConfig, UnauthLimits,
};

/// The listeners of a relay host, whichever services it carries.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// UDP listeners (TURN's, or a STUN service's without TURN).
    pub listen: Vec<SocketAddr>,
    /// TCP on the same addresses as UDP.
    pub tcp: bool,
    /// TLS listeners (bound only with a certificate).
    pub tls_listen: Vec<SocketAddr>,
    /// The certificate chain and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// DTLS listeners (UDP; bound only with a certificate).
    pub dtls_listen: Vec<SocketAddr>,
    /// Most TCP and TLS connections, over all loops.
    pub max_connections: usize,
    /// Most TCP and TLS connections from one IP address, over all loops.
    pub max_connections_per_ip: usize,
    /// Idle limit for connections without an allocation.
    pub idle_timeout: Duration,
    /// Sources (L4 load balancers) whose TCP and TLS connections start
    /// with a PROXY protocol v2 header naming the real client.
    pub proxy_from: Vec<IpNet>,
    /// The TLS listeners also carry HTTPS, passed to this backend.
    pub https: Option<crate::https::HttpsRoute>,
}

/// TURN relay settings.
#[derive(Args, Clone, Debug)]
pub struct RelayConfig {
    /// Addresses the TURN listeners bind, on UDP and TCP (comma separated).
    #[arg(
        long = "turn-listen",
        env = "NATRIX_TURN_LISTEN",
        value_delimiter = ',',
        default_value = "0.0.0.0:3478"
    )]
    pub listen: Vec<SocketAddr>,

    /// Serve TURN over TCP as well as UDP.
    #[arg(long = "turn-tcp", env = "NATRIX_TURN_TCP", default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp: bool,

    /// Addresses the TURN-over-TLS listeners bind (comma separated); used
    /// when --tls-cert and --tls-key are given.
    #[arg(
        long = "tls-listen",
        env = "NATRIX_TLS_LISTEN",
        value_delimiter = ',',
        default_value = "0.0.0.0:5349"
    )]
    pub tls_listen: Vec<SocketAddr>,

    /// Addresses TURN over DTLS (RFC 7350, DTLS 1.2) binds on UDP (comma
    /// separated; off by default; 5349 is its port, beside TLS's on TCP).
    /// Uses the --tls-cert certificate, whose key must be ECDSA (P-256 or
    /// P-384), and its reloads. DTLS sessions count against
    /// --max-connections and --max-connections-per-ip as connections do.
    #[arg(
        long = "dtls-listen",
        env = "NATRIX_DTLS_LISTEN",
        value_delimiter = ',',
        requires = "tls_cert"
    )]
    pub dtls_listen: Vec<SocketAddr>,

    /// TLS certificate chain (PEM). Reloaded when the file changes or on
    /// SIGHUP, without dropping sessions.
    #[arg(long = "tls-cert", env = "NATRIX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM), reloaded with the certificate.
    #[arg(long = "tls-key", env = "NATRIX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// TURN over TLS and HTTPS on one port (443 behind firewalls that allow
    /// nothing else): a TLS connection whose ClientHello asks for HTTP
    /// (ALPN http/1.1, h2 or http/1.0 without stun.turn, or a server name
    /// in --tls-http-names) is answered with the same certificate and its
    /// requests passed to this HTTP server (host:port, the lookup API),
    /// each with X-Forwarded-For naming the client (give lookup this
    /// relay's address in --trusted-proxy). Every other TLS connection is
    /// TURN. Add 443 to --tls-listen for the port.
    #[arg(long = "tls-http-backend", env = "NATRIX_TLS_HTTP_BACKEND", value_parser = parse_backend)]
    pub tls_http_backend: Option<String>,

    /// Server names (SNI, comma separated) whose TLS connections go to
    /// --tls-http-backend whatever their ALPN says (for HTTP clients that
    /// send none).
    #[arg(
        long = "tls-http-names",
        env = "NATRIX_TLS_HTTP_NAMES",
        value_delimiter = ',',
        requires = "tls_http_backend"
    )]
    pub tls_http_names: Vec<String>,

    /// Most TCP and TLS client connections (per host); more are closed at
    /// once.
    #[arg(
        long = "turn-max-connections",
        env = "NATRIX_TURN_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_connections: usize,

    /// Most TCP and TLS client connections from one IP address (about:
    /// counted per loop); more are closed at once, so one source cannot
    /// hold every connection slot. Generous by default: an office or a
    /// carrier NAT puts many legitimate clients behind one address.
    #[arg(
        long = "turn-max-connections-per-ip",
        env = "NATRIX_TURN_MAX_CONNECTIONS_PER_IP",
        default_value_t = 1000
    )]
    pub max_connections_per_ip: usize,

    /// A TCP or TLS connection without an allocation that sends nothing for
    /// this long is closed (slow or idle clients cannot hold connections).
    #[arg(long = "turn-idle-timeout", env = "NATRIX_TURN_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// L4 load balancers in front of the TCP and TLS listeners (comma
    /// separated networks): a connection from one of them must start with
    /// a PROXY protocol v2 header, and the client it names is the
    /// connection's client for nonces, quotas, bans, usage records and logs
    /// (a LOCAL header, the balancer's health check, keeps the balancer's
    /// address). Connections from anywhere else are served as they are; a
    /// header from them is garbage. The per-IP connection cap counts the
    /// named clients, not the balancer.
    #[arg(
        long = "proxy-protocol-from",
        env = "NATRIX_PROXY_PROTOCOL_FROM",
        value_delimiter = ','
    )]
    pub proxy_protocol_from: Vec<IpNet>,

    /// TURN mobility (RFC 8016): a client that asks gets a MOBILITY-TICKET,
    /// and when its address changes (Wi-Fi to cellular, a NAT re-mapping)
    /// it moves its allocation, relayed address and all, to the new address
    /// with a Refresh signed with the allocation's key. Off: such an
    /// Allocate is answered 405 (Mobility Forbidden).
    #[arg(long = "turn-mobility", env = "NATRIX_TURN_MOBILITY", default_value_t = true, action = clap::ArgAction::Set)]
    pub mobility: bool,

    /// TCP allocations (RFC 6062): a client over TCP or TLS may ask for a
    /// relayed TCP address, reach TCP peers with Connect and take their
    /// connections with ConnectionBind (clients behind proxies that let
    /// only TCP out). Off: such an Allocate is answered 442.
    #[arg(long = "tcp-relay", env = "NATRIX_TCP_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp_relay: bool,

    /// Interfaces (comma-separated) the XDP fast path runs on: ChannelData
    /// of UDP clients with a bound channel and a live permission, and
    /// their peers' datagrams, are relayed in the driver's hook, below the
    /// sockets (IPv4; needs root or CAP_BPF, CAP_NET_ADMIN and
    /// CAP_PERFMON). Where the kernel or privileges refuse, the relay says
    /// why and relays in userspace. Off by default.
    #[arg(long = "xdp", env = "NATRIX_XDP", value_delimiter = ',')]
    pub xdp: Vec<String>,

    /// Realm of the long-term credentials (RFC 8489 §9.2).
    #[arg(long, env = "NATRIX_REALM", default_value = "natrix")]
    pub realm: String,

    /// This relay's id; session tokens (`<expiry>:<session>:<relay-id>`)
    /// naming another relay are refused.
    #[arg(long = "relay-id", env = "NATRIX_RELAY_ID")]
    pub relay_id: Option<String>,

    /// TURN REST shared secrets, `key-id=secret` (the secret at least 16
    /// characters), newest first (comma separated; several at once during a
    /// rotation).
    #[arg(
        long = "auth-secret",
        env = "NATRIX_AUTH_SECRETS",
        value_delimiter = ','
    )]
    pub auth_secrets: Vec<TurnSecret>,

    /// A file of TURN REST secrets, one `key-id=secret` a line, newest
    /// first; tried before --auth-secret, and reloaded when it changes or
    /// on SIGHUP (e.g. a Kubernetes Secret mounted as a file).
    #[arg(long = "auth-secret-file", env = "NATRIX_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,

    /// On SIGTERM, how long to keep relaying existing allocations (new ones
    /// are refused) before exiting; a second signal exits at once.
    #[arg(long = "drain-timeout", env = "NATRIX_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Static users `name:password` (development; comma separated).
    #[arg(long = "user", env = "NATRIX_USERS", value_delimiter = ',')]
    pub users: Vec<Redacted>,

    /// IPv4 address relay sockets bind. With 0.0.0.0 (the default) they bind
    /// the listener's address when it is specific, so relayed datagrams leave
    /// from the advertised address even on a host with several; else every
    /// address.
    #[arg(long = "relay-ip", env = "NATRIX_RELAY_IP", default_value = "0.0.0.0")]
    pub relay_ip: IpAddr,

    /// IPv4 address advertised as the relayed address; default: the
    /// listener's address if specific, else this host's primary address —
    /// unless that is a private one (RFC 1918, 100.64.0.0/10): a relay
    /// behind 1:1 NAT (a cloud VM) then learns its public address from the
    /// CDX nodes (`--stun-server`, and those in the registry with
    /// --redis-url), and refuses to start when none answers. Give the
    /// private address here to relay for a private network. An IPv6
    /// address here is the IPv6 relayed address's (--external-ipv6 wins).
    #[arg(long = "external-ip", env = "NATRIX_EXTERNAL_IP")]
    pub external_ip: Option<IpAddr>,

    /// STUN servers (CDX nodes) that tell a relay on a private address its
    /// public one (comma separated HOST:PORT; the registry's CDX nodes
    /// are asked too).
    #[arg(
        long = "stun-server",
        env = "NATRIX_STUN_SERVER",
        value_delimiter = ','
    )]
    pub stun_servers: Vec<SocketAddr>,

    /// IPv6 address relay sockets bind; IPv6 relaying is off without it.
    #[arg(long = "relay-ipv6", env = "NATRIX_RELAY_IPV6")]
    pub relay_ipv6: Option<IpAddr>,

    /// IPv6 address advertised as the relayed address (default: the bind
    /// address).
    #[arg(long = "external-ipv6", env = "NATRIX_EXTERNAL_IPV6")]
    pub external_ipv6: Option<IpAddr>,

    /// The relayed address family of an Allocate that names none (no
    /// REQUESTED-ADDRESS-FAMILY): ipv4 (RFC 8656), ipv6, or keep (the
    /// family the client reached the relay over). A relay without the
    /// chosen family (an IPv6-only host has no IPv4) gives the other.
    #[arg(
        long = "allocation-default-family",
        env = "NATRIX_ALLOCATION_DEFAULT_FAMILY",
        default_value = "ipv4",
        value_parser = parse_family
    )]
    pub allocation_default_family: crate::core::DefaultFamily,

    /// Relay port range, MIN-MAX.
    #[arg(
        long = "relay-ports",
        env = "NATRIX_RELAY_PORTS",
        default_value = "49152-65535"
    )]
    pub ports: PortRange,

    /// Ports of shared relay sockets, MIN-MAX, outside --relay-ports: once
    /// the relay ports are used up, further allocations share these relayed
    /// addresses (one socket per port and family, the ports split between
    /// the loops, at least one each), and the peer data they receive is
    /// told apart by its source (coturn's --multiplex-peer). Two allocations
    /// on one shared address cannot reach the same peer IP:port (the second
    /// gets 403, its data is dropped as `peer_claimed`). Off when not given:
    /// past the range, Allocates get 508.
    #[arg(long = "relay-multiplex-ports", env = "NATRIX_RELAY_MULTIPLEX_PORTS")]
    pub multiplex_ports: Option<PortRange>,

    /// Lifetime granted when a client asks for less or nothing.
    #[arg(long = "default-lifetime", env = "NATRIX_DEFAULT_LIFETIME", default_value = "10m", value_parser = humantime::parse_duration)]
    pub default_lifetime: Duration,

    /// Longest allocation lifetime granted.
    #[arg(long = "max-lifetime", env = "NATRIX_MAX_LIFETIME", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_lifetime: Duration,

    /// How long a NONCE stays valid before a 438 renews it.
    #[arg(long = "nonce-lifetime", env = "NATRIX_NONCE_LIFETIME", default_value = "10m", value_parser = humantime::parse_duration)]
    pub nonce_lifetime: Duration,

    /// How long a permission lasts unless the client refreshes it (RFC
    /// 8656: 5 minutes). Change it only for tests and labs: clients refresh
    /// on the RFC's schedule.
    #[arg(long = "permission-lifetime", env = "NATRIX_PERMISSION_LIFETIME", default_value = "5m", value_parser = at_least_a_second)]
    pub permission_lifetime: Duration,

    /// How long a channel binding lasts unless the client refreshes it (RFC
    /// 8656: 10 minutes). Change it only for tests and labs.
    #[arg(long = "channel-lifetime", env = "NATRIX_CHANNEL_LIFETIME", default_value = "10m", value_parser = at_least_a_second)]
    pub channel_lifetime: Duration,

    /// Most allocations on this relay (508 past it).
    #[arg(
        long = "max-allocations",
        env = "NATRIX_MAX_ALLOCATIONS",
        default_value_t = 100_000
    )]
    pub max_allocations: usize,

    /// Most allocations per username (486 past it). A session token holds
    /// at most 2, and a session at most 4 (its two sides).
    #[arg(long = "user-quota", env = "NATRIX_USER_QUOTA", default_value_t = 100)]
    pub user_quota: usize,

    /// Most allocations from one client IP (486 past it); 0 for no cap.
    /// Clients behind one carrier-grade NAT share an IP: raise it for
    /// relays that serve such networks.
    #[arg(
        long = "max-allocations-per-ip",
        env = "NATRIX_MAX_ALLOCATIONS_PER_IP",
        default_value_t = 1000
    )]
    pub max_allocations_per_ip: usize,

    /// Most allocations per tenant (the API key or grant key id a session
    /// token names) on this relay (486 past it); 0 for no cap.
    #[arg(
        long = "max-allocations-per-tenant",
        env = "NATRIX_MAX_ALLOCATIONS_PER_TENANT",
        default_value_t = 0
    )]
    pub max_allocations_per_tenant: usize,

    /// Bytes per second one allocation may relay (both directions); 0 for
    /// no cap.
    #[arg(
        long = "bandwidth-per-allocation",
        env = "NATRIX_BANDWIDTH_PER_ALLOCATION",
        default_value_t = 0
    )]
    pub bandwidth_per_allocation: u64,

    /// Peer networks allowed even though denied by default (e.g.
    /// 127.0.0.0/8 for labs); comma separated.
    #[arg(long = "peer-allow", env = "NATRIX_PEER_ALLOW", value_delimiter = ',')]
    pub peer_allow: Vec<IpNet>,

    /// Peer networks denied on top of the default deny-list.
    #[arg(long = "peer-deny", env = "NATRIX_PEER_DENY", value_delimiter = ',')]
    pub peer_deny: Vec<IpNet>,

    /// Unauthenticated answers per second to one /24 (IPv4) or /48 (IPv6),
    /// over UDP (TCP and TLS clients prove their address; they are not capped).
    #[arg(
        long = "unauth-rate-per-prefix",
        env = "NATRIX_UNAUTH_RATE_PER_PREFIX",
        default_value_t = 50.0
    )]
    pub unauth_rate_per_prefix: f64,

    /// Unauthenticated UDP answers per second in total, per data-plane loop.
    #[arg(
        long = "unauth-rate-total",
        env = "NATRIX_UNAUTH_RATE_TOTAL",
        default_value_t = 20_000.0
    )]
    pub unauth_rate_total: f64,

    /// Authentication failures (wrong password, unknown user, expired or
    /// forged credentials, another user's allocation) within --auth-ban-window that
    /// ban their source — an IPv4 address or an IPv6 /64 — for
    /// --auth-ban-for: its requests are dropped unanswered (a client that
    /// already holds an allocation keeps it). 0 turns bans off. Every
    /// failure is logged (warn: source, reason, username).
    #[arg(
        long = "auth-ban-after",
        env = "NATRIX_AUTH_BAN_AFTER",
        default_value_t = 10
    )]
    pub auth_ban_after: u32,

    /// How far back authentication failures count toward a ban.
    #[arg(long = "auth-ban-window", env = "NATRIX_AUTH_BAN_WINDOW", default_value = "1m", value_parser = humantime::parse_duration)]
    pub auth_ban_window: Duration,

    /// How long a ban lasts.
    #[arg(long = "auth-ban-for", env = "NATRIX_AUTH_BAN_FOR", default_value = "5m", value_parser = humantime::parse_duration)]
    pub auth_ban_for: Duration,

    /// Most sources tracked for bans at once (failing or banned; about
    /// 64 bytes each); past it new sources are not tracked until entries
    /// expire.
    #[arg(
        long = "auth-ban-max-sources",
        env = "NATRIX_AUTH_BAN_MAX_SOURCES",
        default_value_t = 65_536
    )]
    pub auth_ban_max_sources: usize,

    /// Networks never banned (a monitoring probe, a NAT gateway many users
    /// share); comma separated.
    #[arg(
        long = "auth-ban-exempt",
        env = "NATRIX_AUTH_BAN_EXEMPT",
        value_delimiter = ','
    )]
    pub auth_ban_exempt: Vec<IpNet>,

    /// While this relay is draining or full, new Allocates get 300 Try
    /// Alternate naming this relay (coturn's --alternate-server); without
    /// it, with --redis-url, the relay with the most room among the
    /// registry's active relays of the same IP family (checked every 2 s);
    /// with neither, 508.
    #[arg(long = "alternate-server", env = "NATRIX_ALTERNATE_SERVER")]
    pub alternate_server: Option<SocketAddr>,

    /// With --alternate-server: where TLS clients go (coturn's
    /// --tls-alternate-server; without it they get 508). UDP and TCP
    /// clients go to --alternate-server.
    #[arg(long = "tls-alternate-server", env = "NATRIX_TLS_ALTERNATE_SERVER")]
    pub tls_alternate_server: Option<SocketAddr>,

    /// Serve the admin API here (off by default): list allocations (by
    /// user, session, tenant, peer), kill one, drain the relay, show the
    /// quotas in use — `natrix admin`. Needs --admin-token. Bind it to an
    /// address only operators reach.
    #[arg(long = "admin-listen", env = "NATRIX_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// The bearer token the admin API requires (at least 16 characters).
    #[arg(long = "admin-token", env = "NATRIX_ADMIN_TOKEN")]
    pub admin_token: Option<Redacted>,

    /// Append a usage record (JSON, one line per allocation: user,
    /// session, tenant, start and end, packets and bytes each way, peers,
    /// transport) to this file when each allocation ends; the file is
    /// reopened for every batch, so rotating it needs no signal.
    #[arg(long = "usage-file", env = "NATRIX_USAGE_FILE")]
    pub usage_file: Option<PathBuf>,

    /// Also add each usage record to this stream in the coordination store
    /// (a Redis stream with --redis-url; `natrix usage --stream` reads it).
    #[arg(long = "usage-stream", env = "NATRIX_USAGE_STREAM")]
    pub usage_stream: Option<String>,

    /// About how many records the usage stream keeps (older ones are
    /// trimmed: XADD MAXLEN ~).
    #[arg(
        long = "usage-stream-max-len",
        env = "NATRIX_USAGE_STREAM_MAX_LEN",
        default_value_t = 1_000_000
    )]
    pub usage_stream_max_len: usize,

    /// SOFTWARE attribute in responses; empty for none.
    #[arg(long = "turn-software", env = "NATRIX_TURN_SOFTWARE", default_value = concat!("natrix ", env!("CARGO_PKG_VERSION")))]
    pub software: String,
}

impl RelayConfig {
    /// How many allocations this relay can hold: the configured maximum,
    /// or the relay port range when that is smaller (each allocation holds
    /// a port). What the registry and `relay_allocation_capacity` show, so
    /// lookup does not pick a relay that can only answer 508.
    pub fn capacity(&self) -> usize {
        if self.multiplex_ports.is_some() {
            return self.max_allocations;
        }
        let ports = usize::from(self.ports.max.saturating_sub(self.ports.min)) + 1;
        self.max_allocations.min(ports)
    }

    /// The shared relay socket ports of loop `shard` of `loops`: the range
    /// dealt out in pairs (an even and an odd port each, from an even
    /// start: an EVEN-PORT client finds an even one on every loop), or one
    /// by one when there are fewer pairs than loops.
    pub fn multiplex_ports_of(&self, shard: usize, loops: usize) -> Vec<u16> {
        let loops = loops.max(1);
        self.multiplex_ports.map_or_else(Vec::new, |r| {
            let n = usize::from(r.max - r.min) + 1;
            let step = if n >= 2 * loops { 2 } else { 1 };
            (r.min..=r.max)
                .filter(|p| (usize::from(p - r.min) / step) % loops == shard)
                .collect()
        })
    }

    /// Refuses a --relay-multiplex-ports range that overlaps --relay-ports
    /// or leaves a loop without a port.
    pub fn check_multiplex_ports(&self, loops: usize) -> anyhow::Result<()> {
        let Some(m) = self.multiplex_ports else {
            return Ok(());
        };
        if m.min <= self.ports.max && self.ports.min <= m.max {
            anyhow::bail!(
                "--relay-multiplex-ports {m} overlaps --relay-ports {}: shared sockets need ports of their own",
                self.ports
            );
        }
        let n = usize::from(m.max - m.min) + 1;
        if n < loops {
            anyhow::bail!(
                "--relay-multiplex-ports {m} has {n} port(s) for {loops} relay loops: give at least one per loop"
            );
        }
        Ok(())
    }

    /// The listeners this role's host binds.
    pub fn host(&self) -> HostConfig {
        HostConfig {
            listen: self.listen.clone(),
            tcp: self.tcp,
            tls_listen: self.tls_listen.clone(),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            dtls_listen: self.dtls_listen.clone(),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            idle_timeout: self.idle_timeout,
            proxy_from: self.proxy_protocol_from.clone(),
            https: self
                .tls_http_backend
                .clone()
                .map(|backend| crate::https::HttpsRoute {
                    backend,
                    names: self.tls_http_names.clone(),
                }),
        }
    }

    /// The credential store.
    pub fn credentials(&self) -> Result<Credentials, String> {
        let secrets = self.auth_secrets.clone();
        let mut users = HashMap::new();
        for u in &self.users {
            let (name, password) = u
                .expose()
                .split_once(':')
                .ok_or("--user takes name:password")?;
            users.insert(name.to_string(), password.to_string());
        }
        if self.auth_secrets.is_empty() && users.is_empty() && self.auth_secret_file.is_none() {
            return Err(
                "no credentials: give --auth-secret or --auth-secret-file (TURN REST) or --user name:password"
                    .into(),
            );
        }
        let base = Credentials::new(self.realm.clone(), secrets, users, self.relay_id.clone());
        match &self.auth_secret_file {
            Some(path) => {
                let file = read_secrets(path).map_err(|e| format!("{e:#}"))?;
                Ok(base.with_extra_secrets(file))
            }
            None => Ok(base),
        }
    }

    /// Credentials without the secrets file (the base a reload rebuilds on).
    pub fn base_credentials(&self) -> Result<Credentials, String> {
        let without_file = RelayConfig {
            auth_secret_file: None,
            ..self.clone()
        };
        if self.auth_secrets.is_empty() && self.users.is_empty() {
            return Ok(Credentials::new(
                self.realm.clone(),
                Vec::new(),
                HashMap::new(),
                self.relay_id.clone(),
            ));
        }
        without_file.credentials()
    }

    /// The peer policy.
    pub fn policy(&self) -> PeerPolicy {
        let own = [
            Some(self.external_v4()),
            Some(self.relay_bind_v4()),
            self.external_ipv6,
            self.relay_ipv6,
        ]
        .into_iter()
        .flatten()
        .chain(self.listen.iter().map(SocketAddr::ip))
        .chain(self.tls_listen.iter().map(SocketAddr::ip))
        .chain(self.dtls_listen.iter().map(SocketAddr::ip));
        PeerPolicy::new(&self.peer_deny, &self.peer_allow)
            .with_own(own, (self.ports.min, self.ports.max))
            .with_shared_ports(self.multiplex_ports.map(|r| (r.min, r.max)))
    }

    /// Where usage records go.
    pub fn usage_sinks(&self) -> crate::usage::Sinks {
        crate::usage::Sinks {
            file: self.usage_file.clone(),
            stream: self
                .usage_stream
                .clone()
                .map(|s| (s, self.usage_stream_max_len.max(1))),
        }
    }

    /// True when the advertised IPv4 address would be a private one that
    /// clients on the internet cannot reach (no --external-ip given): the
    /// relay must learn its public address first.
    pub fn needs_public_address(&self) -> bool {
        self.external_ip.is_none() && is_private(self.external_v4())
    }

    /// The advertised IPv4 address.
    pub fn external_v4(&self) -> IpAddr {
        if let Some(ip) = self.external_ip.filter(IpAddr::is_ipv4) {
            return ip;
        }
        if !self.relay_ip.is_unspecified() {
            return self.relay_ip;
        }
        if let Some(l) = self
            .listen
            .iter()
            .find(|l| l.is_ipv4() && !l.ip().is_unspecified())
        {
            return l.ip();
        }
        primary_ipv4().unwrap_or(IpAddr::from([127, 0, 0, 1]))
    }

    /// The IPv4 address relay sockets bind: --relay-ip, or the first
    /// specific IPv4 listener (peers behind address-and-port-dependent
    /// filters only accept datagrams from the exact relayed address they
    /// sent to, and a wildcard socket lets the kernel pick the source).
    pub fn relay_bind_v4(&self) -> IpAddr {
        if !self.relay_ip.is_unspecified() {
            return self.relay_ip;
        }
        self.listen
            .iter()
            .find(|l| l.is_ipv4() && !l.ip().is_unspecified())
            .map_or(self.relay_ip, |l| l.ip())
    }

    /// True when the relay has IPv4 to relay from: given (`--relay-ip`,
    /// `--external-ip`, a specific IPv4 listener) or the host's own.
    pub fn offers_ipv4(&self) -> bool {
        self.external_ip.is_some_and(|ip| ip.is_ipv4())
            || !self.relay_ip.is_unspecified()
            || self
                .listen
                .iter()
                .any(|l| l.is_ipv4() && !l.ip().is_unspecified())
            || primary_ipv4().is_some()
    }

    /// The core configuration (the same for every loop).
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            software: Some(self.software.clone()).filter(|s| !s.is_empty()),
            // An IPv6-only host relays IPv6 alone (no IPv4 address to bind
            // or advertise).
            relay_v4: self.offers_ipv4().then(|| RelayAddress {
                bind: self.relay_bind_v4(),
                public: self.external_v4(),
            }),
            // An IPv6 --external-ip (the chart's node address on an
            // IPv6-only cluster) is the IPv6 one.
            relay_v6: self.relay_ipv6.map(|bind| RelayAddress {
                bind,
                public: self
                    .external_ipv6
                    .or(self.external_ip.filter(IpAddr::is_ipv6))
                    .unwrap_or(bind),
            }),
            default_lifetime: self.default_lifetime,
            max_lifetime: self.max_lifetime.max(self.default_lifetime),
            nonce_lifetime: self.nonce_lifetime,
            permission_lifetime: self.permission_lifetime,
            channel_lifetime: self.channel_lifetime,
            // Both counted host-wide (SharedPorts), whatever loop serves.
            max_allocations: self.max_allocations,
            user_quota: self.user_quota,
            source_quota: Some(self.max_allocations_per_ip)
                .filter(|q| *q > 0)
                .unwrap_or(usize::MAX),
            tenant_quota: Some(self.max_allocations_per_tenant)
                .filter(|q| *q > 0)
                .unwrap_or(usize::MAX),
            bandwidth_per_allocation: Some(self.bandwidth_per_allocation).filter(|b| *b > 0),
            unauth: UnauthLimits {
                per_prefix_rate: self.unauth_rate_per_prefix,
                per_prefix_burst: (self.unauth_rate_per_prefix * 2.0).max(1.0),
                total_rate: self.unauth_rate_total,
                total_burst: self.unauth_rate_total.max(1.0),
            },
            mobility: self.mobility,
            bans: BanPolicy {
                after: self.auth_ban_after,
                window: self.auth_ban_window,
                duration: self.auth_ban_for,
                max_sources: self.auth_ban_max_sources,
                exempt: self.auth_ban_exempt.clone(),
            },
            usage: self.usage_sinks().any(),
            default_family: self.allocation_default_family,
            // Per loop: the host sets each loop's share.
            multiplex_ports: Vec::new(),
            tcp_relay: self.tcp_relay,
            // Set by the host once the XDP program is attached.
            fast_path: false,
        }
    }
}

/// RFC 1918 and shared (carrier-grade NAT) IPv4 space: an address behind
/// a NAT.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(_) => false,
    }
}

/// The address this host would use to reach the Internet (a routing
/// lookup; nothing is sent).
fn primary_ipv4() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Reads a secrets file: one `key-id=secret` a line, newest first, blank
/// lines and `#` comments ignored (the model's one rule); an invalid line is
/// an error naming the file and the line.
pub fn read_secrets(path: &Path) -> anyhow::Result<Vec<TurnSecret>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the secrets file {}", path.display()))?;
    TurnSecret::parse_list(&text).with_context(|| format!("the secrets file {}", path.display()))
}

/// A `host:port` backend: a name or address and a port.
fn parse_backend(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not host:port (for example lookup:8080)")),
    }
}

/// `ipv4`, `ipv6` or `keep`.
fn parse_family(s: &str) -> Result<crate::core::DefaultFamily, String> {
    use crate::core::DefaultFamily;
    match s {
        "ipv4" => Ok(DefaultFamily::Ipv4),
        "ipv6" => Ok(DefaultFamily::Ipv6),
        "keep" => Ok(DefaultFamily::Keep),
        _ => Err(format!("{s:?}: give ipv4, ipv6 or keep")),
    }
}

/// A duration of at least one second (permission and channel lifetimes).
fn at_least_a_second(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(d),
        Ok(_) => Err(format!("{s:?}: at least 1s")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

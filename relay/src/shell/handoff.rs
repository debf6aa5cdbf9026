//! A running relay handed to its successor (a binary upgrade): every
//! loop's listening sockets, its UDP allocations' relayed sockets and their
//! state ([`Moved`]). The descriptors stay open across `exec` (the process
//! that hands off clears their close-on-exec flag); the state travels as
//! text naming them. Datagrams that arrive meanwhile wait in the sockets'
//! kernel buffers, so nothing is lost unless a buffer fills.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::core::{ClientSocket, Moved, MovedAllocation, Transport, Usage};

/// One loop, frozen between batches.
#[derive(Debug)]
pub(super) struct FrozenLoop {
    pub(super) moved: Moved,
    /// UDP listeners (TURN's, then the STUN service's own).
    pub(super) udp: Vec<OwnedFd>,
    pub(super) tcp: Vec<OwnedFd>,
    pub(super) tls: Vec<OwnedFd>,
    /// DTLS listeners (their sessions stay behind).
    pub(super) dtls: Vec<OwnedFd>,
    /// Relayed sockets by allocation slot.
    pub(super) relays: Vec<(u32, OwnedFd)>,
    /// Plain TCP connections holding an allocation.
    pub(super) streams: Vec<MovedStream>,
}

/// What one loop of a successor starts from: the allocations' state, their
/// relayed sockets and their TCP connections.
#[derive(Debug)]
pub(super) struct FrozenState {
    pub(super) moved: Moved,
    pub(super) relays: Vec<(u32, OwnedFd)>,
    pub(super) streams: Vec<MovedStream>,
}

/// A TCP or TLS client connection with an allocation, handed over.
#[derive(Debug)]
pub(super) struct MovedStream {
    pub(super) client: ClientSocket,
    pub(super) fd: OwnedFd,
    pub(super) parts: StreamParts,
}

/// A connection's buffers (plaintext) and, over TLS, its session.
#[derive(Debug)]
pub(super) struct StreamParts {
    /// Read, not yet framed.
    pub(super) unread: Vec<u8>,
    /// Queued, not yet written.
    pub(super) unsent: Vec<u8>,
    pub(super) tls: Option<TlsParts>,
}

/// A TLS 1.3 session: the AEAD, each direction's key, IV and sequence
/// number, and the protected bytes not yet opened or written.
#[derive(Debug)]
pub(super) struct TlsParts {
    pub(super) suite: super::sealed::Suite,
    pub(super) rx: super::sealed::Secret,
    pub(super) tx: super::sealed::Secret,
    pub(super) incoming: Vec<u8>,
    pub(super) outgoing: Vec<u8>,
}

fn secret_json(s: &super::sealed::Secret) -> Value {
    json!({"key": hex(&s.key), "iv": hex(&s.iv), "seq": s.seq})
}

fn secret_from(v: &Value) -> anyhow::Result<super::sealed::Secret> {
    Ok(super::sealed::Secret {
        key: unhex(str_of(v, "key")?)?,
        iv: hex_array(v, "iv")?,
        seq: u64_of(v, "seq")?,
    })
}

/// A whole relay host, frozen: what a successor needs to go on.
#[derive(Debug)]
pub struct Handoff {
    pub(super) loops: Vec<FrozenLoop>,
    pub(super) udp: Vec<SocketAddr>,
    pub(super) service_udp: Vec<SocketAddr>,
    pub(super) tcp: Vec<SocketAddr>,
    pub(super) tls: Vec<SocketAddr>,
    pub(super) dtls: Vec<SocketAddr>,
}

/// The format's version: a successor refuses what it does not know.
const VERSION: u64 = 1;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("hex"))
        .collect()
}

fn allocation_json(a: &MovedAllocation) -> Value {
    json!({
        "slot": a.slot,
        "generation": a.generation,
        "transport": a.client.transport.label(),
        "client": a.client.client.to_string(),
        "server": a.client.server.to_string(),
        "relayed": a.relayed.to_string(),
        "relayed6": a.relayed6.map(|(slot, generation, addr)| json!([slot, generation, addr.to_string()])),
        "username": a.username,
        "key": hex(&a.key),
        "created_by": hex(&a.created_by),
        "expires_in_ms": u64::try_from(a.expires_in.as_millis()).unwrap_or(u64::MAX),
        "permissions": a.permissions.iter()
            .map(|(ip, left)| json!([ip.to_string(), u64::try_from(left.as_millis()).unwrap_or(u64::MAX)]))
            .collect::<Vec<_>>(),
        "channels": a.channels.iter()
            .map(|(n, peer, ms)| json!([n, peer.to_string(), ms]))
            .collect::<Vec<_>>(),
        "bandwidth_tokens": a.bandwidth_tokens,
        "ticket": a.ticket.map(|t| hex(&t)),
        "usage": [a.usage.packets, a.usage.bytes, a.usage.peers, a.usage.started_unix],
        "shared": a.shared.map(|(slot, generation)| json!([slot, generation])),
        "claims": a.claims.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// `v[key]` as hex of exactly `N` bytes.
fn hex_array<const N: usize>(v: &Value, key: &str) -> anyhow::Result<[u8; N]> {
    unhex(str_of(v, key)?)?
        .try_into()
        .ok()
        .with_context(|| format!("`{key}`: {N} bytes expected"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    v[key].as_str().with_context(|| format!("`{key}` missing"))
}

fn u64_of(v: &Value, key: &str) -> anyhow::Result<u64> {
    v[key].as_u64().with_context(|| format!("`{key}` missing"))
}

/// The usage counters of a handed-over allocation (zero when absent).
fn usage_from(v: &Value) -> Usage {
    let pair = |i: usize| [v[i][0].as_u64().unwrap_or(0), v[i][1].as_u64().unwrap_or(0)];
    Usage {
        packets: pair(0),
        bytes: pair(1),
        peers: v[2]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0),
        started_unix: v[3].as_u64().unwrap_or(0),
    }
}

fn allocation_from(v: &Value) -> anyhow::Result<MovedAllocation> {
    let transport: Transport = str_of(v, "transport")?
        .parse()
        .map_err(anyhow::Error::msg)?;
    let created_by = hex_array(v, "created_by")?;
    let permissions = v["permissions"]
        .as_array()
        .context("permissions")?
        .iter()
        .map(|p| {
            let ip: IpAddr = p[0].as_str().context("ip")?.parse()?;
            let left = Duration::from_millis(p[1].as_u64().context("lifetime")?);
            anyhow::Ok((ip, left))
        })
        .collect::<anyhow::Result<_>>()?;
    let channels = v["channels"]
        .as_array()
        .context("channels")?
        .iter()
        .map(|c| {
            let n = u16::try_from(c[0].as_u64().context("number")?)?;
            let peer: SocketAddr = c[1].as_str().context("peer")?.parse()?;
            let ms = c[2].as_i64().context("expiry")?;
            anyhow::Ok((n, peer, ms))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(MovedAllocation {
        slot: u32::try_from(u64_of(v, "slot")?)?,
        generation: u32::try_from(u64_of(v, "generation")?)?,
        client: ClientSocket {
            transport,
            client: str_of(v, "client")?.parse()?,
            server: str_of(v, "server")?.parse()?,
        },
        relayed: str_of(v, "relayed")?.parse()?,
        // A predecessor without dual-stack allocations names none.
        relayed6: match &v["relayed6"] {
            Value::Array(t) if t.len() == 3 => Some((
                u32::try_from(t[0].as_u64().context("relayed6 slot")?)?,
                u32::try_from(t[1].as_u64().context("relayed6 generation")?)?,
                t[2].as_str().context("relayed6 address")?.parse()?,
            )),
            _ => None,
        },
        username: str_of(v, "username")?.to_owned(),
        key: unhex(str_of(v, "key")?)?,
        created_by,
        expires_in: Duration::from_millis(u64_of(v, "expires_in_ms")?),
        permissions,
        channels,
        bandwidth_tokens: v["bandwidth_tokens"].as_f64(),
        ticket: match v["ticket"] {
            Value::Null => None,
            _ => Some(hex_array(v, "ticket")?),
        },
        // A predecessor without usage counters hands over none.
        usage: usage_from(&v["usage"]),
        // Nor one without shared relayed sockets any of these.
        shared: match &v["shared"] {
            Value::Array(t) if t.len() == 2 => Some((
                u32::try_from(t[0].as_u64().context("shared slot")?)?,
                u32::try_from(t[1].as_u64().context("shared generation")?)?,
            )),
            _ => None,
        },
        claims: match &v["claims"] {
            Value::Array(list) => list
                .iter()
                .map(|c| anyhow::Ok(c.as_str().context("claim")?.parse()?))
                .collect::<anyhow::Result<_>>()?,
            _ => Vec::new(),
        },
    })
}

fn fds(list: &[OwnedFd]) -> Vec<RawFd> {
    list.iter().map(AsRawFd::as_raw_fd).collect()
}

fn addrs(list: &[SocketAddr]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// Takes ownership of an inherited descriptor named in the state.
fn adopt_fd(v: &Value) -> anyhow::Result<OwnedFd> {
    let fd = RawFd::try_from(v.as_i64().context("a descriptor")?)?;
    anyhow::ensure!(fd > 2, "descriptor {fd} is not a socket handed over");
    // SAFETY: the predecessor opened this descriptor for us and named it
    // once in the state; nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Handoff {
    /// Allocations carried.
    pub fn allocations(&self) -> usize {
        self.loops.iter().map(|l| l.moved.allocations.len()).sum()
    }

    /// Descriptors carried.
    pub fn descriptors(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.loops.iter().flat_map(|l| {
            l.udp
                .iter()
                .chain(&l.tcp)
                .chain(&l.tls)
                .chain(&l.dtls)
                .chain(l.relays.iter().map(|(_, fd)| fd))
                .chain(l.streams.iter().map(|m| &m.fd))
                .map(AsRawFd::as_raw_fd)
        })
    }

    /// The state as text naming the descriptors (which the caller keeps
    /// open across `exec`, see [`Handoff::descriptors`]).
    pub fn encode(&self) -> String {
        let loops: Vec<Value> = self
            .loops
            .iter()
            .map(|l| {
                json!({
                    "udp": fds(&l.udp),
                    "tcp": fds(&l.tcp),
                    "tls": fds(&l.tls),
                    "dtls": fds(&l.dtls),
                    "relays": l.relays.iter().map(|(slot, fd)| json!([slot, fd.as_raw_fd()])).collect::<Vec<_>>(),
                    "streams": l.streams.iter().map(|m| json!({
                        "fd": m.fd.as_raw_fd(),
                        "transport": m.client.transport.label(),
                        "client": m.client.client.to_string(),
                        "server": m.client.server.to_string(),
                        "unread": hex(&m.parts.unread),
                        "unsent": hex(&m.parts.unsent),
                        "tls": m.parts.tls.as_ref().map(|t| json!({
                            "suite": t.suite.name(),
                            "rx": secret_json(&t.rx),
                            "tx": secret_json(&t.tx),
                            "incoming": hex(&t.incoming),
                            "outgoing": hex(&t.outgoing),
                        })),
                    })).collect::<Vec<_>>(),
                    "seed": hex(&l.moved.seed),
                    "allocations": l.moved.allocations.iter().map(allocation_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "version": VERSION,
            "udp": addrs(&self.udp),
            "service_udp": addrs(&self.service_udp),
            "tcp": addrs(&self.tcp),
            "tls": addrs(&self.tls),
            "dtls": addrs(&self.dtls),
            "loops": loops,
        })
        .to_string()
    }

    /// Reads a predecessor's state and takes ownership of the descriptors
    /// it names.
    ///
    /// # Safety
    ///
    /// Every descriptor `text` names must be open in this process (inherited
    /// from the predecessor that wrote `text`) and owned by nothing else.
    pub unsafe fn decode(text: &str) -> anyhow::Result<Handoff> {
        let v: Value = serde_json::from_str(text).context("the handed-over state")?;
        let version = v["version"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            version == VERSION,
            "handed-over state version {version}, this binary reads {VERSION}"
        );
        let addr_list = |key: &str| -> anyhow::Result<Vec<SocketAddr>> {
            v[key]
                .as_array()
                .with_context(|| format!("`{key}` missing"))?
                .iter()
                .map(|a| Ok(a.as_str().context("an address")?.parse()?))
                .collect()
        };
        let fd_list = |l: &Value, key: &str| -> anyhow::Result<Vec<OwnedFd>> {
            l[key]
                .as_array()
                .with_context(|| format!("`{key}` missing"))?
                .iter()
                .map(adopt_fd)
                .collect()
        };
        let mut loops = Vec::new();
        for l in v["loops"].as_array().context("`loops` missing")? {
            let seed = hex_array(l, "seed")?;
            let relays = l["relays"]
                .as_array()
                .context("`relays` missing")?
                .iter()
                .map(|r| {
                    let slot = u32::try_from(r[0].as_u64().context("slot")?)?;
                    Ok((slot, adopt_fd(&r[1])?))
                })
                .collect::<anyhow::Result<_>>()?;
            let streams = l["streams"]
                .as_array()
                .context("`streams` missing")?
                .iter()
                .map(|m| {
                    let tls = match &m["tls"] {
                        Value::Null => None,
                        t => Some(TlsParts {
                            suite: super::sealed::Suite::from_name(str_of(t, "suite")?)
                                .context("an AEAD this binary knows")?,
                            rx: secret_from(&t["rx"])?,
                            tx: secret_from(&t["tx"])?,
                            incoming: unhex(str_of(t, "incoming")?)?,
                            outgoing: unhex(str_of(t, "outgoing")?)?,
                        }),
                    };
                    Ok(MovedStream {
                        client: ClientSocket {
                            transport: if tls.is_some() {
                                Transport::Tls
                            } else {
                                Transport::Tcp
                            },
                            client: str_of(m, "client")?.parse()?,
                            server: str_of(m, "server")?.parse()?,
                        },
                        fd: adopt_fd(&m["fd"])?,
                        parts: StreamParts {
                            unread: unhex(str_of(m, "unread")?)?,
                            unsent: unhex(str_of(m, "unsent")?)?,
                            tls,
                        },
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            loops.push(FrozenLoop {
                streams,
                udp: fd_list(l, "udp")?,
                tcp: fd_list(l, "tcp")?,
                tls: fd_list(l, "tls")?,
                // A predecessor without DTLS wrote none.
                dtls: if l["dtls"].is_null() {
                    Vec::new()
                } else {
                    fd_list(l, "dtls")?
                },
                relays,
                moved: Moved {
                    seed,
                    allocations: l["allocations"]
                        .as_array()
                        .context("`allocations` missing")?
                        .iter()
                        .map(allocation_from)
                        .collect::<anyhow::Result<_>>()?,
                },
            });
        }
        anyhow::ensure!(!loops.is_empty(), "no loop handed over");
        Ok(Handoff {
            loops,
            udp: addr_list("udp")?,
            service_udp: addr_list("service_udp")?,
            tcp: addr_list("tcp")?,
            tls: addr_list("tls")?,
            dtls: if v["dtls"].is_null() {
                Vec::new()
            } else {
                addr_list("dtls")?
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_allocation_reads_back_as_it_was_written() {
        let a = MovedAllocation {
            slot: 7,
            generation: 3,
            client: ClientSocket {
                transport: Transport::Udp,
                client: "198.51.100.7:40000"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
                server: "[2001:db8::1]:3478"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
            },
            relayed: "192.0.2.1:50001".parse().unwrap(),
            relayed6: Some((8, 2, "[2001:db8::1]:50002".parse().unwrap())),
            username: "1800000000:s.t:relay-1".into(),
            key: vec![0xab; 16],
            created_by: [9; 12],
            expires_in: Duration::from_millis(599_250),
            permissions: vec![("203.0.113.9".parse().unwrap(), Duration::from_secs(200))],
            channels: vec![
                (
                    0x4001,
                    "203.0.113.9:7000"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                    500_000,
                ),
                (
                    0x4002,
                    "203.0.113.9:7001"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                    -20_000,
                ),
            ],
            bandwidth_tokens: Some(1234.5),
            ticket: Some([7; 14]),
            usage: Usage {
                packets: [10, 12],
                bytes: [1600, 1920],
                peers: 2,
                started_unix: 1_800_000_000,
            },
            shared: Some((9, 1)),
            claims: vec!["203.0.113.9:7000".parse().unwrap()],
        };
        let back = allocation_from(&allocation_json(&a));
        assert_eq!(back.ok(), Some(a));
        assert!(allocation_from(&json!({"slot": 1})).is_err());
    }
}

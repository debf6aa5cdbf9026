//! Channel bindings the shell may relay below userspace (the XDP fast path,
//! [`ServerConfig::fast_path`]): the core says which, until when, and when
//! they end ([`Command::FastPath`]); the shell reports what the kernel
//! relayed for them ([`Server::fast_path_relayed`]).
//!
//! A binding qualifies when its allocation is a UDP client's, on a relay
//! port of its own (not shared, not TCP); its client, peer and relayed
//! address are of one family (IPv4 or IPv6: the shell checks, the program
//! does not translate). It is carried until the earlier of the channel's and its
//! permission's expiry;
//! a ChannelBind or CreatePermission that refreshes either sends the new
//! time, the allocation's end and a client's move take it away. The deny
//! list is checked where the binding is made (ChannelBind), as for
//! userspace relaying.
//!
//! A bandwidth cap ([`ServerConfig::bandwidth_per_allocation`]) goes with
//! the binding: the kernel meters the allocation's channels against one
//! budget at the cap's rate and drops past it ([`Server::fast_path_capped`]
//! counts those as `bandwidth_exceeded`); what the kernel relayed is charged
//! to the allocation's userspace budget too, so datagrams that still take
//! the userspace path (indications, channels not in the kernel) share the
//! cap instead of adding to it.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Command, Server, ServerConfig};
use crate::stats::Direction;
use crate::types::{AllocationId, ClientSocket, Transport};

/// A channel binding the fast path may carry, or stop carrying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPath {
    /// The allocation (for the usage it relays).
    pub allocation: AllocationId,
    /// The client's 5-tuple (UDP).
    pub client: ClientSocket,
    /// The channel number.
    pub channel: u16,
    /// The peer transport address.
    pub peer: SocketAddr,
    /// The relay socket's bound address: where peers' datagrams arrive,
    /// and the source of those sent to the peer.
    pub relayed: SocketAddr,
    /// Carried until then; `None`: no longer.
    pub until: Option<Instant>,
    /// The allocation's bandwidth cap, payload bytes a second.
    pub cap: Option<u64>,
}

impl Server {
    /// Whether allocation `index` qualifies (see the module docs): the
    /// bound addresses of its IPv4 and IPv6 relay sockets (a dual-stack
    /// allocation has both).
    fn fast_path_bind(&self, index: u32) -> Option<[Option<SocketAddr>; 2]> {
        let c: &ServerConfig = &self.config;
        if !c.fast_path {
            return None;
        }
        let a = self.slots.get(index as usize)?.allocation.as_ref()?;
        if a.client.transport != Transport::Udp || a.mux.is_some() || a.tcp {
            return None;
        }
        let bound = |relayed: SocketAddr| {
            let bind = self.relay_of(relayed.is_ipv6())?.bind;
            Some(SocketAddr::new(bind, relayed.port()))
        };
        let mut by_family = [None, None];
        by_family[usize::from(a.relayed.is_ipv6())] = bound(a.relayed);
        if let Some((_, relayed6)) = a.relayed6 {
            by_family[1] = bound(relayed6);
        }
        Some(by_family)
    }

    /// Sends the fast-path state of allocation `index`'s channels to peers
    /// of `ip` (every channel when `None`): each live one with its
    /// deadline, each other one as removed.
    pub(super) fn fast_path_sync(
        &mut self,
        index: u32,
        ip: Option<std::net::IpAddr>,
        now: Instant,
    ) {
        self.fast_path_commands(index, ip, None, now);
    }

    /// Takes allocation `index`'s channels off the fast path (it ends, or
    /// its client moves away from `client`).
    pub(super) fn fast_path_end(&mut self, index: u32, client: ClientSocket) {
        let now = self.clock;
        self.fast_path_commands(index, None, Some(client), now);
    }

    /// One [`Command::FastPath`] per channel of allocation `index` to
    /// peers of `ip` (all when `None`): removed for `ended` (the client it
    /// was carried for), else with its deadline.
    fn fast_path_commands(
        &mut self,
        index: u32,
        ip: Option<std::net::IpAddr>,
        ended: Option<ClientSocket>,
        now: Instant,
    ) {
        let Some(bound) = self.fast_path_bind(index) else {
            return;
        };
        let id = self.id_of(index);
        let Some(a) = self.slots[index as usize].allocation.as_ref() else {
            return;
        };
        let channels = a
            .channels
            .iter()
            .filter(|c| ip.is_none_or(|ip| c.peer.ip() == ip));
        for ch in channels {
            let Some(relayed) = bound[usize::from(ch.peer.is_ipv6())] else {
                continue;
            };
            let until = match ended {
                Some(_) => None,
                None => a
                    .permissions
                    .iter()
                    .find(|p| p.ip == ch.peer.ip() && p.expires > now)
                    .map(|p| p.expires.min(ch.expires))
                    .filter(|&t| t > now),
            };
            self.commands
                .push_back(Command::FastPath(Box::new(FastPath {
                    allocation: id,
                    client: ended.unwrap_or(a.client),
                    channel: ch.number,
                    peer: ch.peer,
                    relayed,
                    until,
                    cap: self.config.bandwidth_per_allocation,
                })));
        }
    }

    /// Counts what the fast path relayed for `allocation`: in its usage
    /// and the relay's forwarded counters, as if relayed here.
    pub fn fast_path_relayed(
        &mut self,
        allocation: AllocationId,
        direction: Direction,
        packets: u64,
        bytes: u64,
    ) {
        self.stats.forwarded_packets[direction as usize] += packets;
        self.stats.forwarded_bytes[direction as usize] += bytes;
        let live = self
            .slots
            .get(allocation.index as usize)
            .filter(|s| s.generation == allocation.generation)
            .and_then(|s| s.allocation.as_ref())
            .is_some();
        if live && let Some(a) = self.slots[allocation.index as usize].allocation.as_mut() {
            a.usage.packets[direction as usize] += packets;
            a.usage.bytes[direction as usize] += bytes;
            // The kernel's bytes spend the userspace budget as well (into
            // debt of at most a second's worth).
            if let (Some(b), Some(rate)) = (&mut a.bandwidth, self.config.bandwidth_per_allocation)
            {
                let rate = rate as f64;
                b.tokens = (b.tokens - bytes as f64).max(-rate);
            }
        }
    }

    /// Counts `packets` the kernel dropped over an allocation's bandwidth
    /// cap, as the userspace path counts its own.
    pub fn fast_path_capped(&mut self, packets: u64) {
        self.stats.dropped[crate::stats::DropReason::BandwidthExceeded as usize] += packets;
    }
}

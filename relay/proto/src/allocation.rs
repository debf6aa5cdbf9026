//! One allocation: its relayed address, lifetime, permissions and channels
//! (RFC 8656 §2.2, §9, §12).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natrix_wire::{IntegrityKey, TransactionId};

use super::types::ClientSocket;

/// After a binding expires, neither its number nor its peer may be bound to
/// anything else for 5 minutes (RFC 8656 §12).
pub(crate) const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// Most permissions one allocation holds; bounds memory per allocation.
pub(crate) const MAX_PERMISSIONS: usize = 256;
/// Most channels one allocation holds.
pub(crate) const MAX_CHANNELS: usize = 256;
/// Most peer transport addresses one allocation on a shared relayed
/// address claims at once (past it, its oldest claim goes).
pub(crate) const MAX_CLAIMS: usize = 256;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Permission {
    pub(crate) ip: IpAddr,
    pub(crate) expires: Instant,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Channel {
    pub(crate) number: u16,
    pub(crate) peer: SocketAddr,
    /// Data flows until then; the pair stays reserved for
    /// [`CHANNEL_COOLDOWN`] after.
    pub(crate) expires: Instant,
}

/// Why a ChannelBind cannot be honoured (both are 400, RFC 8656 §12.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindConflict {
    /// The number is bound (or cooling down) to another peer.
    NumberInUse,
    /// The peer is bound (or cooling down) to another number.
    PeerInUse,
    /// Too many channels.
    Full,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Bandwidth {
    pub(crate) tokens: f64,
    pub(crate) updated: Instant,
}

/// What an allocation relayed: the counters of its usage record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Packets relayed, by [`super::Direction`] index (client → peer,
    /// peer → client).
    pub packets: [u64; 2],
    /// Payload bytes relayed (without TURN framing), likewise.
    pub bytes: [u64; 2],
    /// Peer addresses it was permitted to reach (each counted when its
    /// permission was installed).
    pub peers: u32,
    /// Wall-clock second (Unix) it started.
    pub started_unix: u64,
}

impl Usage {
    /// Counts one relayed packet of `len` payload bytes.
    #[inline]
    pub(crate) fn add(&mut self, direction: super::Direction, len: usize) {
        self.packets[direction as usize] += 1;
        self.bytes[direction as usize] += len as u64;
    }
}

#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) client: ClientSocket,
    /// The relayed transport address given to the client.
    pub(crate) relayed: SocketAddr,
    /// A dual-stack allocation's IPv6 relayed address and the slot of its
    /// socket (RFC 8656 ADDITIONAL-ADDRESS-FAMILY).
    pub(crate) relayed6: Option<(u32, SocketAddr)>,
    pub(crate) username: Box<str>,
    pub(crate) key: IntegrityKey,
    /// The Allocate that created it, to recognise retransmissions.
    pub(crate) created_by: TransactionId,
    pub(crate) expires: Instant,
    pub(crate) permissions: Vec<Permission>,
    pub(crate) channels: Vec<Channel>,
    pub(crate) bandwidth: Option<Bandwidth>,
    /// Session-scoped permissions: the only peers this allocation may
    /// reach, from its session token (`None`: any the policy permits).
    pub(crate) allowed_peers: Option<Box<[IpAddr]>>,
    /// The secret of its mobility ticket, when the client asked for one
    /// (RFC 8016).
    pub(crate) ticket: Option<[u8; 14]>,
    /// Handed over by another core for a move that has not completed yet.
    pub(crate) adopted: bool,
    /// What it relayed so far.
    pub(crate) usage: Usage,
    /// The shared relay socket (an index in the core's multiplexed
    /// sockets) when its relayed address is shared: the port range was used
    /// up when it came.
    pub(crate) mux: Option<u32>,
    /// The peer transport addresses it claimed on its shared socket (peer
    /// data from them is its own), oldest first; at most [`MAX_CLAIMS`].
    pub(crate) claims: Vec<SocketAddr>,
    /// A TCP allocation (RFC 6062): a listener on its relayed address, its
    /// peers reached over connections.
    pub(crate) tcp: bool,
    /// Its peer data connections (a TCP allocation's; at most
    /// [`super::server::MAX_TCP_CONNECTIONS`]).
    pub(crate) connections: Vec<u32>,
}

impl Allocation {
    /// True when a live permission covers `ip` (permissions match the IP
    /// address only, RFC 8656 §9).
    #[inline]
    pub(crate) fn permits(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    /// Installs or refreshes the permission for `ip` until `expires`.
    pub(crate) fn install_permission(&mut self, ip: IpAddr, expires: Instant) -> bool {
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires = expires;
            return true;
        }
        if self.permissions.len() >= MAX_PERMISSIONS {
            return false;
        }
        self.permissions.push(Permission { ip, expires });
        self.usage.peers = self.usage.peers.saturating_add(1);
        true
    }

    /// The live channel with `number`.
    #[inline]
    pub(crate) fn channel(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }

    /// The live channel bound to `peer`.
    #[inline]
    pub(crate) fn channel_to(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }

    /// Binds or refreshes `number` ↔ `peer`.
    pub(crate) fn bind_channel(
        &mut self,
        number: u16,
        peer: SocketAddr,
        now: Instant,
        expires: Instant,
    ) -> Result<(), BindConflict> {
        // Entries stay (cooling down) until sweep removes them; a rebind of
        // the same pair revives the entry.
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
        for c in &mut self.channels {
            match (c.number == number, c.peer == peer) {
                (true, true) => {
                    c.expires = expires;
                    return Ok(());
                }
                (true, false) => return Err(BindConflict::NumberInUse),
                (false, true) => return Err(BindConflict::PeerInUse),
                (false, false) => {}
            }
        }
        if self.channels.len() >= MAX_CHANNELS {
            return Err(BindConflict::Full);
        }
        self.channels.push(Channel {
            number,
            peer,
            expires,
        });
        Ok(())
    }

    /// Drops expired permissions and channels past their cool-down.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.permissions.retain(|p| p.expires > now);
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
    }

    /// Takes `bytes` from the bandwidth budget; false when over the cap.
    #[inline]
    pub(crate) fn spend(&mut self, bytes: usize, rate: f64, now: Instant) -> bool {
        let Some(b) = &mut self.bandwidth else {
            return true;
        };
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.updated = now;
        if b.tokens >= bytes as f64 {
            b.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

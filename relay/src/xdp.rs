//! The XDP fast path for channel data (`xdp/natrix_xdp.c`): loading it onto
//! interfaces (`--xdp`), the maps the relay fills from its cores' channel
//! bindings, and the counters read back.
//!
//! The loader is `aya` (pure Rust: it loads the object clang compiled at
//! build time, with no C library to link, and manages its maps). One
//! [`Xdp`] serves the host: every loop installs and removes the entries of
//! its allocations under its lock (channel binds are rare next to packets)
//! and reads back the counters of its own entries — from the program's
//! memory-mapped counter array, without a system call per entry.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::core::ClientSocket;

// The maps' keys and values, in network byte order as in the C program,
// for either family: `A` is the address, `u32` (IPv4: `to_peer`,
// `to_client`) or `[u8; 16]` (IPv6: `to_peer6`, `to_client6`); the fields
// are in the same order in both.

/// Key of a client → peer map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ToPeerKey<A> {
    client_ip: A,
    server_ip: A,
    client_port: u16,
    server_port: u16,
    channel: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ToPeerVal<A> {
    relay_ip: A,
    peer_ip: A,
    relay_port: u16,
    peer_port: u16,
    slot: u32,
    expires_ns: u64,
    cap: u64,
}

/// Key of a peer → client map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ToClientKey<A> {
    relay_ip: A,
    peer_ip: A,
    relay_port: u16,
    peer_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ToClientVal<A> {
    server_ip: A,
    client_ip: A,
    server_port: u16,
    client_port: u16,
    channel: u16,
    pad: u16,
    slot: u32,
    pad2: u32,
    expires_ns: u64,
    cap: u64,
}

/// An IPv6 address as the maps hold it.
type V6 = [u8; 16];

/// The values of a binding with keys `p` and `c` (each direction's key
/// holds the other's addresses).
fn values<A: Copy>(
    p: &ToPeerKey<A>,
    c: &ToClientKey<A>,
    slot: u32,
    expires_ns: u64,
    cap: u64,
) -> (ToPeerVal<A>, ToClientVal<A>) {
    (
        ToPeerVal {
            relay_ip: c.relay_ip,
            peer_ip: c.peer_ip,
            relay_port: c.relay_port,
            peer_port: c.peer_port,
            slot,
            expires_ns,
            cap,
        },
        ToClientVal {
            server_ip: p.server_ip,
            client_ip: p.client_ip,
            server_port: p.server_port,
            client_port: p.client_port,
            channel: p.channel,
            pad: 0,
            slot,
            pad2: 0,
            expires_ns,
            cap,
        },
    )
}

/// Bindings the maps hold at most (`MAX_ENTRIES` in the C program).
pub const MAX_ENTRIES: u32 = 262_144;

/// One binding's counters in the program's array: packets and bytes,
/// client → peer then peer → client (`struct counters`).
const COUNTER_WORDS: usize = 4;

/// An allocation's bandwidth budget in the kernel (a GCRA meter).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CapVal {
    rate: u64,
    tat_ns: u64,
    dropped_packets: u64,
    dropped_bytes: u64,
}

// SAFETY: plain `repr(C)` structs of integers without padding holes the
// kernel would read uninitialised (every gap is a named `pad` field).
// (Both address types leave no gap: 4-byte and 1-byte aligned.)
unsafe impl aya::Pod for ToPeerKey<u32> {}
unsafe impl aya::Pod for ToPeerVal<u32> {}
unsafe impl aya::Pod for ToClientKey<u32> {}
unsafe impl aya::Pod for ToClientVal<u32> {}
unsafe impl aya::Pod for ToPeerKey<V6> {}
unsafe impl aya::Pod for ToPeerVal<V6> {}
unsafe impl aya::Pod for ToClientKey<V6> {}
unsafe impl aya::Pod for ToClientVal<V6> {}
unsafe impl aya::Pod for CapVal {}

/// An allocation's bandwidth cap on the fast path: its budget's key in the
/// kernel (unique across the loops) and the rate, payload bytes a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Key of the budget, never 0.
    pub key: u64,
    /// Bytes per second, above 0.
    pub rate: u64,
}

/// Indexes of the per-CPU counters (`enum` in the C program).
pub const STAT_TO_PEER_PACKETS: u32 = 0;
/// Bytes relayed client → peer.
pub const STAT_TO_PEER_BYTES: u32 = 1;
/// Packets relayed peer → client.
pub const STAT_TO_CLIENT_PACKETS: u32 = 2;
/// Bytes relayed peer → client.
pub const STAT_TO_CLIENT_BYTES: u32 = 3;
/// Entries found expired (passed to userspace).
pub const STAT_EXPIRED: u32 = 4;
/// Destinations the FIB could not resolve (passed to userspace).
pub const STAT_NO_ROUTE: u32 = 5;
/// ChannelData without an entry (passed to userspace).
pub const STAT_PASSED: u32 = 6;
/// Dropped over an allocation's bandwidth cap.
pub const STAT_CAPPED: u32 = 7;
/// How many counters there are.
pub const STATS: u32 = 8;

/// The two keys of one channel binding: client → peer, peer → client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Keys {
    /// Client, listener, relayed address and peer all IPv4.
    V4(ToPeerKey<u32>, ToClientKey<u32>),
    /// All IPv6.
    V6(ToPeerKey<V6>, ToClientKey<V6>),
}

fn v4(a: SocketAddr) -> Option<(u32, u16)> {
    match a.ip().to_canonical() {
        IpAddr::V4(ip) => Some((u32::from_ne_bytes(ip.octets()), a.port().to_be())),
        IpAddr::V6(_) => None,
    }
}

fn v6(a: SocketAddr) -> Option<([u8; 16], u16)> {
    match a.ip().to_canonical() {
        IpAddr::V6(ip) => Some((ip.octets(), a.port().to_be())),
        IpAddr::V4(_) => None,
    }
}

impl Keys {
    /// The keys of a binding of `channel` between `client` and `peer`
    /// through the relay socket bound on `relayed`; `None` unless all four
    /// addresses are of one family (the program does not translate).
    pub fn of(
        client: &ClientSocket,
        channel: u16,
        peer: SocketAddr,
        relayed: SocketAddr,
    ) -> Option<Keys> {
        let channel = channel.to_be();
        if let (Some(c), Some(s), Some(p), Some(r)) =
            (v4(client.client), v4(client.server), v4(peer), v4(relayed))
        {
            return Some(Keys::V4(
                ToPeerKey {
                    client_ip: c.0,
                    server_ip: s.0,
                    client_port: c.1,
                    server_port: s.1,
                    channel,
                    pad: 0,
                },
                ToClientKey {
                    relay_ip: r.0,
                    peer_ip: p.0,
                    relay_port: r.1,
                    peer_port: p.1,
                },
            ));
        }
        let (c, s, p, r) = (
            v6(client.client)?,
            v6(client.server)?,
            v6(peer)?,
            v6(relayed)?,
        );
        Some(Keys::V6(
            ToPeerKey {
                client_ip: c.0,
                server_ip: s.0,
                client_port: c.1,
                server_port: s.1,
                channel,
                pad: 0,
            },
            ToClientKey {
                relay_ip: r.0,
                peer_ip: p.0,
                relay_port: r.1,
                peer_port: p.1,
            },
        ))
    }

    /// True for IPv6 bindings.
    pub fn is_ipv6(&self) -> bool {
        matches!(self, Keys::V6(..))
    }
}

/// Packets and bytes one entry relayed so far, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounters {
    /// Client → peer: packets, bytes.
    pub to_peer: (u64, u64),
    /// Peer → client: packets, bytes.
    pub to_client: (u64, u64),
}

/// Nanoseconds of CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads) at an
/// `Instant`: `Instant` is CLOCK_MONOTONIC on Linux, so one pair read at
/// start converts any other.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    at: Instant,
    ns: u64,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock {
            // The relay's clock source: read right beside the kernel's.
            #[allow(clippy::disallowed_methods)]
            at: Instant::now(),
            ns: (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64,
        }
    }

    /// `t` in CLOCK_MONOTONIC nanoseconds.
    pub fn ns(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.at) {
            Some(d) => self.ns.saturating_add(d.as_nanos() as u64),
            None => self
                .ns
                .saturating_sub(self.at.duration_since(t).as_nanos() as u64),
        }
    }
}

/// The program finds each datagram's next hop with `bpf_fib_lookup`,
/// which the kernel answers only for interfaces with IPv4 forwarding on.
pub fn check_forwarding(iface: &str) -> anyhow::Result<()> {
    if iface.contains('/') || iface.starts_with('.') {
        anyhow::bail!("{iface:?} is not an interface name");
    }
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => anyhow::bail!(
            "IPv4 forwarding is off on {iface}: the XDP program's next-hop lookup needs it \
             (sysctl -w net.ipv4.conf.{iface}.forwarding=1; with forwarding on, drop routed \
             traffic in the firewall's forward chain if the host should not route)"
        ),
        Err(_) => anyhow::bail!("no interface {iface} (no {path})"),
    }
}

/// Whether IPv6 forwarding is on for `iface` (the program's IPv6 next-hop
/// lookup needs it; without, IPv6 bindings stay in userspace).
pub fn ipv6_forwarding(iface: &str) -> bool {
    !iface.contains('/')
        && std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/forwarding"))
            .is_ok_and(|v| v.trim() == "1")
}

#[cfg(natrix_xdp)]
mod loaded {
    use super::*;
    use aya::maps::{HashMap, MapData, PerCpuArray};
    use aya::programs::{Xdp as XdpProgram, XdpMode};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The program's counter array, mapped into this process: the kernel
    /// adds to it atomically, the relay reads it with plain loads.
    struct Counters {
        base: std::ptr::NonNull<AtomicU64>,
        len: usize,
        /// Keeps the map alive as long as the mapping.
        _map: MapData,
    }

    // SAFETY: the mapping is shared memory the kernel updates atomically;
    // every access goes through `AtomicU64`.
    unsafe impl Send for Counters {}

    impl Counters {
        fn map(map: MapData) -> anyhow::Result<Counters> {
            use std::os::fd::{AsFd as _, AsRawFd as _};
            let len = MAX_ENTRIES as usize * COUNTER_WORDS * 8;
            // SAFETY: a shared read-write mapping of an array map created
            // with BPF_F_MMAPABLE, `len` bytes (its size); the kernel
            // checks the length and flags.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    map.fd().as_fd().as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                anyhow::bail!(
                    "mapping the XDP counters: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(Counters {
                base: std::ptr::NonNull::new(ptr.cast())
                    .ok_or_else(|| anyhow::anyhow!("mmap gave null"))?,
                len,
                _map: map,
            })
        }

        fn word(&self, slot: u32, i: usize) -> &AtomicU64 {
            let at = (slot as usize % MAX_ENTRIES as usize) * COUNTER_WORDS + i;
            // SAFETY: `at` is inside the mapping (slot reduced modulo the
            // array's size), 8-byte aligned (page-aligned base, 8-byte
            // words), and the mapping lives as long as `self`.
            unsafe { &*self.base.as_ptr().add(at) }
        }

        fn read(&self, slot: u32) -> EntryCounters {
            let w = |i| self.word(slot, i).load(Ordering::Relaxed);
            EntryCounters {
                to_peer: (w(0), w(2)),
                to_client: (w(1), w(3)),
            }
        }

        fn clear(&self, slot: u32) {
            for i in 0..COUNTER_WORDS {
                self.word(slot, i).store(0, Ordering::Relaxed);
            }
        }
    }

    impl Drop for Counters {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `map`, unmapped once.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }

    /// The program, attached, and its maps.
    pub struct Xdp {
        ebpf: aya::Ebpf,
        /// Keeps the kernel's per-program run-time accounting on (what
        /// `relay_xdp_program_seconds_total` reads).
        _run_time: Option<std::os::fd::OwnedFd>,
        to_peer: HashMap<MapData, ToPeerKey<u32>, ToPeerVal<u32>>,
        to_client: HashMap<MapData, ToClientKey<u32>, ToClientVal<u32>>,
        to_peer6: HashMap<MapData, ToPeerKey<V6>, ToPeerVal<V6>>,
        to_client6: HashMap<MapData, ToClientKey<V6>, ToClientVal<V6>>,
        caps: HashMap<MapData, u64, CapVal>,
        counters: Counters,
        /// Each installed binding's counter slot; slots free for reuse.
        slots: std::collections::HashMap<Keys, u32>,
        free: Vec<u32>,
        stats: PerCpuArray<MapData, u64>,
        clock: Clock,
        /// Interfaces it runs on.
        pub interfaces: Vec<String>,
        /// IPv6 forwarding is on for all of them: IPv6 bindings go in too.
        pub ipv6: bool,
    }

    static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/natrix_xdp.o"));

    impl Xdp {
        /// Loads the program and attaches it to `interfaces` in the
        /// driver's native mode, else the generic one (a clear error when
        /// the kernel or privileges refuse).
        pub fn attach(interfaces: &[String]) -> anyhow::Result<Xdp> {
            use anyhow::Context;
            for iface in interfaces {
                super::check_forwarding(iface)?;
            }
            let mut ebpf = aya::Ebpf::load(OBJECT)
                .context("loading the XDP object (needs root or CAP_BPF and CAP_NET_ADMIN)")?;
            let program: &mut XdpProgram = ebpf
                .program_mut("natrix_xdp")
                .context("the object has no natrix_xdp program")?
                .try_into()
                .context("natrix_xdp is not an XDP program")?;
            program
                .load()
                .context("the kernel refused the XDP program (verifier)")?;
            for iface in interfaces {
                if program.attach(iface, XdpMode::Driver).is_err() {
                    program.attach(iface, XdpMode::Skb).with_context(|| {
                        format!("attaching the XDP program to {iface} (native and generic modes refused)")
                    })?;
                    tracing::warn!(interface = %iface, "XDP runs in generic (skb) mode: slower than native");
                }
            }
            let take = |ebpf: &mut aya::Ebpf, name: &str| {
                ebpf.take_map(name)
                    .with_context(|| format!("the XDP object has no {name} map"))
            };
            let to_peer = HashMap::try_from(take(&mut ebpf, "to_peer")?)?;
            let to_client = HashMap::try_from(take(&mut ebpf, "to_client")?)?;
            let to_peer6 = HashMap::try_from(take(&mut ebpf, "to_peer6")?)?;
            let to_client6 = HashMap::try_from(take(&mut ebpf, "to_client6")?)?;
            let caps = HashMap::try_from(take(&mut ebpf, "caps")?)?;
            let counters = match take(&mut ebpf, "counters")? {
                aya::maps::Map::Array(data) => Counters::map(data)?,
                _ => anyhow::bail!("the XDP object's counters map is not an array"),
            };
            let stats = PerCpuArray::try_from(take(&mut ebpf, "stats")?)?;
            // Costs two clock reads per program run; off where refused.
            let run_time = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
            Ok(Xdp {
                ebpf,
                _run_time: run_time,
                to_peer,
                to_client,
                to_peer6,
                to_client6,
                caps,
                counters,
                slots: std::collections::HashMap::new(),
                free: (0..MAX_ENTRIES).rev().collect(),
                stats,
                clock: Clock::now(),
                interfaces: interfaces.to_vec(),
                ipv6: interfaces.iter().all(|i| super::ipv6_forwarding(i)),
            })
        }

        /// Installs (or updates) the entries of the binding `keys` name,
        /// until `until` (each direction's key holds the other's addresses),
        /// metered against `cap`'s budget (made when missing); false when
        /// the maps refused (full): the binding stays in userspace.
        pub fn install(&mut self, keys: &Keys, until: Instant, cap: Option<Cap>) -> bool {
            let expires_ns = self.clock.ns(until);
            if let Some(c) = cap
                && self.caps.get(&c.key, 0).is_err()
            {
                let budget = CapVal {
                    rate: c.rate,
                    ..CapVal::default()
                };
                if self.caps.insert(c.key, budget, 0).is_err() {
                    return false;
                }
            }
            let cap = cap.map_or(0, |c| c.key);
            // A refresh keeps its slot (and counts on); a new binding
            // takes a free one, zeroed.
            let slot = match self.slots.get(keys) {
                Some(&slot) => slot,
                None => {
                    let Some(slot) = self.free.pop() else {
                        return false;
                    };
                    self.counters.clear(slot);
                    self.slots.insert(*keys, slot);
                    slot
                }
            };
            let ok = match keys {
                Keys::V4(p, c) => {
                    let (to_peer, to_client) = values(p, c, slot, expires_ns, cap);
                    self.to_peer.insert(p, to_peer, 0).is_ok()
                        && self.to_client.insert(c, to_client, 0).is_ok()
                }
                Keys::V6(p, c) => {
                    let (to_peer, to_client) = values(p, c, slot, expires_ns, cap);
                    self.to_peer6.insert(p, to_peer, 0).is_ok()
                        && self.to_client6.insert(c, to_client, 0).is_ok()
                }
            };
            if !ok {
                self.remove(keys);
            }
            ok
        }

        /// Removes `keys`' entries; what they counted last. (A program
        /// run that found the entries just before may still count into
        /// the slot; it is zeroed again when reused.)
        pub fn remove(&mut self, keys: &Keys) -> EntryCounters {
            match keys {
                Keys::V4(p, c) => {
                    let _ = self.to_peer.remove(p);
                    let _ = self.to_client.remove(c);
                }
                Keys::V6(p, c) => {
                    let _ = self.to_peer6.remove(p);
                    let _ = self.to_client6.remove(c);
                }
            }
            let counters = self.counters(keys);
            if let Some(slot) = self.slots.remove(keys) {
                self.free.push(slot);
            }
            counters
        }

        /// What `keys`' entries counted so far (a read of shared memory,
        /// no system call).
        pub fn counters(&self, keys: &Keys) -> EntryCounters {
            self.slots
                .get(keys)
                .map_or_else(EntryCounters::default, |&slot| self.counters.read(slot))
        }

        /// Datagrams budget `key` dropped over its cap so far.
        pub fn capped(&self, key: u64) -> u64 {
            self.caps.get(&key, 0).map_or(0, |v| v.dropped_packets)
        }

        /// Removes budget `key` (its allocation has no entry left); what it
        /// dropped last.
        pub fn remove_cap(&mut self, key: u64) -> u64 {
            let dropped = self.capped(key);
            let _ = self.caps.remove(&key);
            dropped
        }

        /// CPU time the program has run so far (zero when the kernel does
        /// not account it).
        pub fn program_time(&self) -> std::time::Duration {
            self.ebpf
                .program("natrix_xdp")
                .and_then(|p| p.info().ok())
                .map_or(std::time::Duration::ZERO, |i| i.run_time())
        }

        /// The per-CPU counters, summed.
        pub fn stats(&self) -> [u64; STATS as usize] {
            let mut out = [0u64; STATS as usize];
            for (i, o) in out.iter_mut().enumerate() {
                if let Ok(values) = self.stats.get(&(i as u32), 0) {
                    *o = values.iter().sum();
                }
            }
            out
        }
    }

    /// Attaches the pass-through program to veth ends that receive
    /// redirected frames (a veth takes XDP_REDIRECT only when its peer
    /// runs XDP): the lab's far ends.
    pub fn attach_pass(interfaces: &[String]) -> anyhow::Result<aya::Ebpf> {
        use anyhow::Context;
        let mut ebpf = aya::Ebpf::load(OBJECT).context("loading the XDP object")?;
        let program: &mut XdpProgram = ebpf
            .program_mut("natrix_xdp_pass")
            .context("the object has no natrix_xdp_pass program")?
            .try_into()?;
        program.load()?;
        for iface in interfaces {
            program
                .attach(iface, XdpMode::Driver)
                .with_context(|| format!("attaching the pass program to {iface}"))?;
        }
        Ok(ebpf)
    }
}

#[cfg(natrix_xdp)]
pub use loaded::{Xdp, attach_pass};

/// Without clang at build time there is no program to load.
#[cfg(not(natrix_xdp))]
pub struct Xdp {
    /// Interfaces it runs on (never any).
    pub interfaces: Vec<String>,
    /// Never.
    pub ipv6: bool,
}

#[cfg(not(natrix_xdp))]
impl Xdp {
    /// Always an error: this build has no XDP program.
    pub fn attach(_: &[String]) -> anyhow::Result<Xdp> {
        anyhow::bail!(
            "this natrix was built without its XDP program (clang and libbpf-dev were missing at build time)"
        )
    }
    /// Never called (no [`Xdp`] exists).
    pub fn install(&mut self, _: &Keys, _: Instant, _: Option<Cap>) -> bool {
        false
    }
    /// Never called.
    pub fn capped(&self, _: u64) -> u64 {
        0
    }
    /// Never called.
    pub fn remove_cap(&mut self, _: u64) -> u64 {
        0
    }
    /// Never called.
    pub fn remove(&mut self, _: &Keys) -> EntryCounters {
        EntryCounters::default()
    }
    /// Never called.
    pub fn counters(&self, _: &Keys) -> EntryCounters {
        EntryCounters::default()
    }
    /// Never called.
    pub fn stats(&self) -> [u64; STATS as usize] {
        [0; STATS as usize]
    }
    /// Never called.
    pub fn program_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

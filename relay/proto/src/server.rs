//! The TURN server state machine.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use natrix_wire::{
    Attribute, AttributeType, ChannelData, Class, EncodeError, Encoder, ErrorCode, EvenPort, Frame,
    IntegrityKey, Message, MessageType, Method, TransactionId, UnknownAttributes, demux, transport,
};

use super::allocation::{
    Allocation, Bandwidth, BindConflict, Channel, MAX_CLAIMS, Permission, Usage,
};
use super::auth::{AuthFailure, Credentials, NonceError, Nonces};
use super::bans::{BanPolicy, SharedBans, Strike};
use super::policy::PeerPolicy;
use super::ports::{Claim, SharedPorts};
use super::refusal::Refusal;
use super::stats::{AuthFailureReason, Direction, DropReason, RequestMethod, RequestResult, Stats};
use super::types::{AllocationId, ClientSocket};
use natrix_model::limiter::{UnauthLimiter, UnauthLimits};

mod fast_path;
mod tcp;
pub use fast_path::FastPath;
use tcp::TcpTable;
pub use tcp::{ConnectionId, MAX_TCP_CONNECTIONS, TCP_CONNECT_TIMEOUT};

/// Bytes [`Server::handle_peer_input`] needs free before the payload: a
/// Data indication's header (20), XOR-PEER-ADDRESS for IPv6 (24) and the
/// DATA attribute header (4).
pub const PEER_HEADROOM: usize = 48;
/// Bytes needed free after the payload: padding to a multiple of four.
pub const PEER_TAILROOM: usize = 3;

/// Allocations one session token may hold at once on a relay: its
/// session's two sides (relay-both on one relay, each side with the same
/// username when the plan names no peers).
pub const SESSION_TOKEN_QUOTA: usize = 2;

/// Allocations one session may hold at once on a relay, over every token of
/// the session: two sides, each within [`SESSION_TOKEN_QUOTA`]. A token
/// admits its own session's sides, never a pool.
pub const SESSION_QUOTA: usize = 2 * SESSION_TOKEN_QUOTA;

/// How long an EVEN-PORT reservation holds the next port (RFC 8656 §7.2
/// suggests about 30 seconds).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How often expired state is swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts to find a bindable relay port before answering 508. The relay
/// range usually overlaps the kernel's ephemeral range, so other processes'
/// sockets hold some of its ports at any time: with a third of them taken,
/// 16 random picks all fail once in 43 million allocations.
const BIND_ATTEMPTS: usize = 16;
/// How long a port another process held stays out of the pool.
const PARK_FOR: Duration = Duration::from_secs(30);
/// Most ports parked at once (past it the oldest goes back early).
const MAX_PARKED: usize = 4096;
/// Most unknown attributes listed in a 420.
const MAX_UNKNOWN_LISTED: usize = 8;

/// Characters of a refused username that go into the log line.
const MAX_LOGGED_USERNAME: usize = 96;

/// ADDITIONAL-ADDRESS-FAMILY and ADDRESS-ERROR-CODE at the code points of
/// the draft before RFC 8656, which coturn's clients still send and read.
const DRAFT_ADDITIONAL_ADDRESS_FAMILY: AttributeType = AttributeType(0x8032);
const DRAFT_ADDRESS_ERROR_CODE: AttributeType = AttributeType(0x8033);

/// ADDRESS-ERROR-CODE for `family`, at the code point the request used.
fn address_error(
    enc: &mut Encoder<'_>,
    draft: bool,
    family: u8,
    refusal: Refusal,
) -> Result<(), EncodeError> {
    let code = refusal.code();
    if !draft {
        return enc.attribute(&Attribute::AddressErrorCode(family, code));
    }
    let mut value = vec![family, 0, (code.code / 100) as u8, (code.code % 100) as u8];
    value.extend_from_slice(code.reason.as_bytes());
    enc.attribute(&Attribute::Other(DRAFT_ADDRESS_ERROR_CODE, &value))
}

/// Where relayed transport addresses live for one address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    /// Address relay sockets bind.
    pub bind: IpAddr,
    /// Address advertised in XOR-RELAYED-ADDRESS (differs from `bind`
    /// behind a 1:1 NAT, e.g. a cloud public IP).
    pub public: IpAddr,
}

/// What an Allocate request asks for (RFC 8656 §7.1, RFC 6156).
struct AllocateRequest<'a> {
    username: &'a str,
    /// A TCP allocation (REQUESTED-TRANSPORT 6, RFC 6062).
    tcp: bool,
    dont_fragment: bool,
    token: Option<[u8; 8]>,
    even_port: Option<EvenPort>,
    /// An IPv6 relayed address (REQUESTED-ADDRESS-FAMILY 0x02).
    v6: bool,
    /// REQUESTED-ADDRESS-FAMILY was given (else `v6` is the default's).
    family_given: bool,
    /// An IPv6 relayed address besides the IPv4 one
    /// (ADDITIONAL-ADDRESS-FAMILY 0x02, RFC 8656 §7.2).
    additional_v6: bool,
    /// ... asked for at the draft's code point (coturn's clients).
    additional_draft: bool,
}

impl<'a> AllocateRequest<'a> {
    /// Reads and checks the request's attributes.
    fn parse(msg: &Message<'a>) -> Result<AllocateRequest<'a>, Refusal> {
        let tcp = match msg.decode(AttributeType::REQUESTED_TRANSPORT) {
            Some(Ok(Attribute::RequestedTransport(transport::UDP))) => false,
            Some(Ok(Attribute::RequestedTransport(transport::TCP))) => true,
            Some(Ok(Attribute::RequestedTransport(_))) => {
                return Err(Refusal::UnsupportedTransport);
            }
            _ => return Err(Refusal::MissingRequestedTransport),
        };
        let token = match msg.decode(AttributeType::RESERVATION_TOKEN) {
            Some(Ok(Attribute::ReservationToken(t))) => Some(t),
            Some(_) => return Err(Refusal::MalformedAttribute),
            None => None,
        };
        let even_port = match msg.decode(AttributeType::EVEN_PORT) {
            Some(Ok(Attribute::EvenPort(e))) => Some(e),
            Some(_) => return Err(Refusal::MalformedAttribute),
            None => None,
        };
        let family = match msg.decode(AttributeType::REQUESTED_ADDRESS_FAMILY) {
            Some(Ok(Attribute::RequestedAddressFamily(f))) => Some(f),
            Some(_) => return Err(Refusal::MalformedAttribute),
            None => None,
        };
        // Only IPv6 can be additional (the first family is IPv4); not with
        // a requested family or a reservation (RFC 8656 §7.2: 400).
        let (additional_v6, additional_draft) =
            match msg.decode(AttributeType::ADDITIONAL_ADDRESS_FAMILY) {
                Some(Ok(Attribute::AdditionalAddressFamily(0x02))) => (true, false),
                Some(_) => return Err(Refusal::MalformedAttribute),
                None => match msg.get(DRAFT_ADDITIONAL_ADDRESS_FAMILY) {
                    Some([0x02, ..]) => (true, true),
                    Some(_) => return Err(Refusal::MalformedAttribute),
                    None => (false, false),
                },
            };
        if (token.is_some() && (even_port.is_some() || family.is_some() || additional_v6))
            || (additional_v6 && family.is_some())
        {
            return Err(Refusal::ConflictingAttributes);
        }
        let v6 = match family {
            None | Some(0x01) => false,
            Some(0x02) => true,
            Some(_) => return Err(Refusal::AddressFamilyNotSupported),
        };
        let username = msg
            .decode(AttributeType::USERNAME)
            .and_then(Result::ok)
            .and_then(|a| match a {
                Attribute::Username(u) => Some(u),
                _ => None,
            })
            .ok_or(Refusal::MalformedAttribute)?;
        Ok(AllocateRequest {
            username,
            tcp,
            dont_fragment: msg.get(AttributeType::DONT_FRAGMENT).is_some(),
            token,
            even_port,
            v6,
            family_given: family.is_some(),
            additional_v6,
            additional_draft,
        })
    }
}

/// Configuration of one core (one data-plane loop).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// SOFTWARE sent in successful responses; `None` sends none.
    pub software: Option<String>,
    /// IPv4 relayed addresses, if the relay offers IPv4.
    pub relay_v4: Option<RelayAddress>,
    /// IPv6 relayed addresses, if the relay offers IPv6.
    pub relay_v6: Option<RelayAddress>,
    /// Lifetime granted when the client asks for less or nothing (600 s).
    pub default_lifetime: Duration,
    /// Longest lifetime granted (3600 s).
    pub max_lifetime: Duration,
    /// How long a NONCE stays valid.
    pub nonce_lifetime: Duration,
    /// How long a permission lasts unless refreshed (RFC 8656 §9: 300 s;
    /// coturn's `--permission-lifetime`). Shorter only for tests and labs.
    pub permission_lifetime: Duration,
    /// How long a channel binding lasts unless refreshed (RFC 8656 §12:
    /// 600 s; coturn's `--channel-lifetime`).
    pub channel_lifetime: Duration,
    /// Most allocations on the host, counted across every loop sharing the
    /// same [`SharedPorts`] (508 past it).
    pub max_allocations: usize,
    /// Most allocations per username on the host (486 past it).
    pub user_quota: usize,
    /// Most allocations per client IP on the host (486 past it).
    pub source_quota: usize,
    /// Most allocations per tenant (the API key a session token names) on
    /// the host (486 past it); `usize::MAX` for no cap.
    pub tenant_quota: usize,
    /// Bytes per second each allocation may relay, both directions
    /// together; `None` for no cap.
    pub bandwidth_per_allocation: Option<u64>,
    /// Caps on unauthenticated answers.
    pub unauth: UnauthLimits,
    /// Give mobility tickets (RFC 8016) to clients that ask: a client whose
    /// address changes moves its allocation to the new 5-tuple with a
    /// Refresh. Off: such an Allocate gets 405.
    pub mobility: bool,
    /// Temporary bans of sources that keep failing authentication.
    pub bans: BanPolicy,
    /// Emit a usage record ([`Command::Usage`]) for every allocation that
    /// ends.
    pub usage: bool,
    /// The family of an Allocate without REQUESTED-ADDRESS-FAMILY.
    pub default_family: DefaultFamily,
    /// Ports of this core's shared relay sockets, one per port and relayed
    /// family, outside the relay port range: once the range is used up,
    /// further allocations share their relayed addresses and peer data is
    /// told apart by its source (coturn's `--multiplex-peer`). Empty: none
    /// (508 then).
    pub multiplex_ports: Vec<u16>,
    /// Serve TCP allocations (RFC 6062: Connect, ConnectionBind,
    /// ConnectionAttempt) to clients over TCP and TLS. Off: 442.
    pub tcp_relay: bool,
    /// The shell relays channel data below userspace (XDP): the core sends
    /// which channel bindings qualify ([`Command::FastPath`]).
    pub fast_path: bool,
}

/// The relayed address family of an Allocate that names none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultFamily {
    /// IPv4 (RFC 8656 §7.2).
    #[default]
    Ipv4,
    /// IPv6.
    Ipv6,
    /// The family the client reached the relay over (coturn's `keep`).
    Keep,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            software: Some(concat!("natrix ", env!("CARGO_PKG_VERSION")).to_string()),
            relay_v4: None,
            relay_v6: None,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            nonce_lifetime: Duration::from_secs(600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            max_allocations: 100_000,
            user_quota: 100,
            source_quota: 1000,
            tenant_quota: usize::MAX,
            bandwidth_per_allocation: None,
            unauth: UnauthLimits::default(),
            mobility: true,
            bans: BanPolicy::default(),
            usage: false,
            default_family: DefaultFamily::Ipv4,
            multiplex_ports: Vec::new(),
            tcp_relay: true,
            fast_path: false,
        }
    }
}

/// What the shell must do with a client packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// Send the first `len` bytes of the output buffer back to the client.
    Reply(usize),
    /// Send `packet[payload]` from the allocation's relay socket to `peer`.
    ToPeer {
        /// The allocation (its relay socket).
        allocation: AllocationId,
        /// Destination.
        peer: SocketAddr,
        /// The application data inside the input packet.
        payload: Range<usize>,
    },
    /// Handled, nothing to send (a keepalive indication).
    Consumed,
    /// Dropped and counted.
    Drop(DropReason),
    /// A Refresh from a new 5-tuple with a mobility ticket another core
    /// issued (loop `shard` of the host): the shell hands the packet to that
    /// core's [`Server::take_moving`], then gives what it returns to
    /// [`Server::adopt_moving`] here (or, when nothing came,
    /// [`Server::refuse_move`]).
    Move {
        /// The core that issued the ticket.
        shard: u16,
    },
    /// A Connect (RFC 6062 §5.2): open a TCP connection from the
    /// allocation's relayed address (its listener's) to `peer`, and report
    /// how it went to [`Server::tcp_connected`], which answers the client
    /// ([`Command::ToClient`]).
    Connect {
        /// The TCP allocation.
        allocation: AllocationId,
        /// The peer data connection to be.
        connection: ConnectionId,
        /// Where to connect.
        peer: SocketAddr,
    },
    /// A ConnectionBind succeeded (RFC 6062 §5.4): send the first `len`
    /// bytes of the output buffer, then the connection it came on is the
    /// client data connection of `connection`: every byte after the
    /// request goes to the peer as it is, and the peer's bytes come back.
    Bind {
        /// The answer's length.
        len: usize,
        /// The peer data connection it joins.
        connection: ConnectionId,
    },
    /// A ConnectionBind for a peer data connection another core (loop
    /// `shard` of the host) holds: hand the client's connection, with the
    /// request, to that loop.
    BindElsewhere {
        /// The core that holds the peer data connection.
        shard: u16,
    },
}

/// Bytes of a mobility ticket on the wire: ASCII (clients keep it as a C
/// string of at most 32 bytes, coturn's among them): a version letter, the
/// core (loop) that issued it in 3 hex digits, and its secret in hex.
pub const TICKET_LEN: usize = 32;
const TICKET_VERSION: u8 = b'n';
/// Bytes of a ticket's secret.
const SECRET_LEN: usize = 14;

/// A ticket's secret.
type Secret = [u8; SECRET_LEN];

/// A MOBILITY-TICKET (RFC 8016) as this relay writes it. The secret is an
/// HMAC of a counter under the core's seed: unguessable, and useless without
/// the allocation's key, which signs the Refresh that redeems it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The core that issued it (below 4096).
    pub shard: u16,
    /// What identifies the allocation.
    pub secret: [u8; SECRET_LEN],
}

impl Ticket {
    /// Reads a ticket; `None` for anything this relay did not write.
    pub fn parse(value: &[u8]) -> Option<Ticket> {
        if value.len() != TICKET_LEN || value[0] != TICKET_VERSION {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let shard = value[1..4]
            .iter()
            .try_fold(0u16, |acc, &c| Some(acc << 4 | u16::from(nibble(c)?)))?;
        let mut secret = [0u8; SECRET_LEN];
        for (i, pair) in value[4..].chunks_exact(2).enumerate() {
            secret[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Ticket { shard, secret })
    }

    /// The attribute's value.
    pub fn encode(&self) -> [u8; TICKET_LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut v = [0u8; TICKET_LEN];
        v[0] = TICKET_VERSION;
        let shard = self.shard.min(0xFFF);
        for (i, shift) in [8u16, 4, 0].into_iter().enumerate() {
            v[1 + i] = HEX[usize::from((shard >> shift) & 0xF)];
        }
        for (i, b) in self.secret.iter().enumerate() {
            v[4 + 2 * i] = HEX[usize::from(b >> 4)];
            v[5 + 2 * i] = HEX[usize::from(b & 0xF)];
        }
        v
    }
}

/// Where a peer packet goes once framed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAction {
    /// The allocation's client.
    pub client: ClientSocket,
    /// The framed message (ChannelData or Data indication) inside the buffer.
    pub frame: Range<usize>,
}

/// Work for the shell that does not answer a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The allocation ended: close its relay socket.
    CloseRelay {
        /// The allocation.
        allocation: AllocationId,
        /// Its relayed address, for logs.
        relayed: SocketAddr,
    },
    /// What an allocation relayed, when it ended (with
    /// [`ServerConfig::usage`]).
    Usage(Box<UsageRecord>),
    /// Send `frame` (a whole STUN message) to the client on its (TCP or
    /// TLS) control connection: a Connect's answer, a ConnectionAttempt.
    ToClient {
        /// The client's control connection.
        client: ClientSocket,
        /// The message.
        frame: Vec<u8>,
    },
    /// Close a peer data connection (RFC 6062) and its client data
    /// connection: its allocation ended, or no ConnectionBind came in time.
    CloseTcp {
        /// The connection.
        connection: ConnectionId,
    },
    /// A channel binding the fast path may carry from now until a time,
    /// or no longer ([`ServerConfig::fast_path`]).
    FastPath(Box<FastPath>),
}

/// One allocation's usage: who, what it relayed, from when to when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    /// Its relayed transport address.
    pub relayed: SocketAddr,
    /// A dual-stack allocation's IPv6 relayed address.
    pub relayed_v6: Option<SocketAddr>,
    /// Its client's 5-tuple (at the end: after a move, the new one).
    pub client: ClientSocket,
    /// The TURN username (for a session token: expiry, session, tenant).
    pub username: Box<str>,
    /// Packets, bytes and peers.
    pub usage: Usage,
    /// Wall-clock second (Unix) it ended, or was recorded at.
    pub ended_unix: u64,
    /// Why: `expired`, `deleted`, `disconnected`, or `shutdown` (still
    /// alive when the relay stopped).
    pub end: &'static str,
    /// A TCP allocation (RFC 6062): its bytes went over peer data
    /// connections (no packets are counted).
    pub tcp: bool,
}

/// The shell's side of relay sockets, called while an Allocate is handled.
pub trait RelaySockets {
    /// Binds a UDP socket on `addr` for `allocation` (setting the DF bit
    /// when `dont_fragment`), and starts delivering what it receives to
    /// [`Server::handle_peer_input`].
    fn open(
        &mut self,
        allocation: AllocationId,
        addr: SocketAddr,
        dont_fragment: bool,
    ) -> std::io::Result<()>;

    /// Opens a TCP listener on `addr` for a TCP `allocation` (RFC 6062),
    /// whose accepted connections go to [`Server::tcp_accepted`]; the
    /// connections a Connect opens leave from the same address. A shell
    /// without TCP relaying keeps the default: TCP allocations get 508.
    fn listen(&mut self, allocation: AllocationId, addr: SocketAddr) -> std::io::Result<()> {
        let _ = (allocation, addr);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    allocation: Option<Allocation>,
    /// The IPv6 relay socket of a dual-stack allocation (RFC 8656
    /// ADDITIONAL-ADDRESS-FAMILY) holds a slot of its own, so the shell
    /// tags it with an id as any relay socket: the allocation's slot.
    twin_of: Option<u32>,
    /// A shared relay socket (its index in [`Server::muxes`]) holds a slot
    /// of its own too.
    mux: Option<u32>,
}

/// A shared (multiplexed) relay socket: allocations that came when the
/// relay port range was used up share its relayed address, and the peer
/// data it receives is told apart by its source: the peer transport
/// address an allocation sent to (or bound a channel to) first is its own.
#[derive(Debug)]
struct Mux {
    /// Bound on this address.
    bind: SocketAddr,
    /// Given to clients as their relayed address.
    public: SocketAddr,
    /// The slot of its socket once open (opened at the first allocation
    /// that needs it).
    slot: Option<u32>,
    /// Allocations on it.
    members: usize,
    /// Peer transport address → the allocation (slot) it belongs to.
    peers: HashMap<SocketAddr, u32, RandomState>,
    /// Permission IP → the allocation that installed it last: where data
    /// from a peer address nobody claimed goes (an ICE check from a
    /// peer-reflexive address comes before the client ever sent there).
    permitted: HashMap<IpAddr, u32, RandomState>,
    /// Sessions (of session tokens) with allocations on it, and how many:
    /// a session's other side is placed on another shared socket when the
    /// loop has one, since two allocations on one shared address cannot
    /// reach each other through it.
    sessions: HashMap<Box<str>, u32, RandomState>,
}

/// What relay socket an allocation's port gets.
#[derive(Clone, Copy, Debug)]
enum Open {
    /// A UDP socket (DF set when asked).
    Udp { dont_fragment: bool },
    /// A TCP listener (RFC 6062).
    Listen,
}

/// Why an allocation ended.
#[derive(Clone, Copy, Debug)]
enum End {
    Expired,
    Deleted,
    Disconnected,
    /// Ended by an operator (the admin API).
    Killed,
}

impl End {
    const fn label(self) -> &'static str {
        match self {
            End::Expired => "expired",
            End::Deleted => "deleted",
            End::Disconnected => "disconnected",
            End::Killed => "killed",
        }
    }
}

/// Where a draining or full relay sends new Allocates (300 Try Alternate),
/// per transport: a client keeps its transport when it moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Alternate {
    /// For UDP clients.
    pub udp: Option<SocketAddr>,
    /// For TCP clients.
    pub tcp: Option<SocketAddr>,
    /// For TLS clients.
    pub tls: Option<SocketAddr>,
    /// For DTLS clients.
    pub dtls: Option<SocketAddr>,
}

impl Alternate {
    /// The alternate for `from`: its transport's, of the family it reached
    /// this relay over.
    pub fn for_client(&self, from: ClientSocket) -> Option<SocketAddr> {
        let a = match from.transport {
            super::Transport::Udp => self.udp,
            super::Transport::Tcp => self.tcp,
            super::Transport::Tls => self.tls,
            super::Transport::Dtls => self.dtls,
        }?;
        (a.is_ipv4() == from.server.ip().to_canonical().is_ipv4()).then_some(a)
    }
}

/// One allocation as an operator sees it (the admin API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationInfo {
    /// Its relayed transport address.
    pub relayed: SocketAddr,
    /// A dual-stack allocation's IPv6 relayed address.
    pub relayed_v6: Option<SocketAddr>,
    /// Its client's 5-tuple.
    pub client: ClientSocket,
    /// The TURN username.
    pub username: Box<str>,
    /// Lifetime left.
    pub expires_in: Duration,
    /// Peer IPs with a live permission.
    pub peers: Vec<IpAddr>,
    /// Live channel bindings.
    pub channels: usize,
    /// What it relayed so far.
    pub usage: Usage,
    /// Its relayed address is shared (multiplexed) with other allocations.
    pub multiplexed: bool,
}

/// How a request was authenticated: the key its response is signed with.
struct Auth {
    key: IntegrityKey,
    sha256: bool,
}

/// The outcome of request processing before encoding.
type Answer = Result<usize, EncodeError>;

/// The TURN server of one data-plane loop. See the module docs of
/// [the crate docs](crate) for the run-loop contract.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    credentials: Credentials,
    nonces: Nonces,
    policy: PeerPolicy,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    allocation_by_client: HashMap<ClientSocket, u32, RandomState>,
    ports: SharedPorts,
    /// Sources banned for repeated authentication failures (the host's
    /// table once [`Server::set_bans`] shares it).
    bans: SharedBans,
    /// A relay with room that Allocates go to while this one is draining
    /// or full (300 Try Alternate).
    alternate: Alternate,
    limiter: UnauthLimiter,
    commands: VecDeque<Command>,
    stats: Stats,
    epoch: Instant,
    /// The latest instant an input brought (what an allocation ended
    /// without one, e.g. a closed connection, is dated with).
    clock: Instant,
    epoch_unix: u64,
    rng: u64,
    next_sweep: Instant,
    draining: bool,
    /// Ports another process held when we tried them, and until when they
    /// stay out of the pool (then they go back: that process's socket is
    /// usually gone by then).
    parked: VecDeque<(u16, Instant)>,
    /// The seed (nonce key): a process that takes this core's allocations
    /// over (binary upgrade) starts from it, so issued nonces stay valid.
    seed: [u8; 32],
    /// This core's loop on the host (written into its mobility tickets).
    shard: u16,
    /// Mobility ticket secrets → slot.
    tickets: HashMap<Secret, u32, RandomState>,
    /// Key of ticket secrets (from the seed).
    ticket_key: ring::hmac::Key,
    /// Ticket secrets made so far (the HMAC's input).
    tickets_made: u64,
    /// Shared relay sockets, for allocations past the port range.
    muxes: Vec<Mux>,
    /// Peer data connections of TCP allocations (RFC 6062).
    tcp: TcpTable,
    /// What a request handled through [`Server::request`] asks of the
    /// shell besides its answer (Connect, ConnectionBind).
    pending_action: Option<ClientAction>,
}

impl Server {
    /// A core. `now` and `unix_now` (seconds since 1970) anchor its clock;
    /// `seed` feeds its randomness (ports, nonces, transaction ids) and must
    /// be random in production. `ports` is shared by every loop of a host.
    pub fn new(
        config: ServerConfig,
        credentials: Credentials,
        policy: PeerPolicy,
        ports: SharedPorts,
        now: Instant,
        unix_now: u64,
        seed: [u8; 32],
    ) -> Server {
        let nonces = Nonces::new(&seed, config.nonce_lifetime.as_secs().max(1));
        let limiter = UnauthLimiter::new(config.unauth, now);
        let bans = SharedBans::new(config.bans.clone());
        let mut rng = u64::from_le_bytes(seed[..8].try_into().unwrap_or([7; 8]));
        rng ^= 0x9E37_79B9_7F4A_7C15;
        let muxes = config
            .multiplex_ports
            .iter()
            .flat_map(|&port| {
                [config.relay_v4, config.relay_v6]
                    .into_iter()
                    .flatten()
                    .map(move |r| Mux {
                        bind: SocketAddr::new(r.bind, port),
                        public: SocketAddr::new(r.public, port),
                        slot: None,
                        members: 0,
                        peers: HashMap::default(),
                        permitted: HashMap::default(),
                        sessions: HashMap::default(),
                    })
            })
            .collect();
        Server {
            config,
            credentials,
            nonces,
            policy,
            slots: Vec::new(),
            free_slots: Vec::new(),
            allocation_by_client: HashMap::default(),
            ports,
            bans,
            alternate: Alternate::default(),
            limiter,
            commands: VecDeque::new(),
            stats: Stats::default(),
            epoch: now,
            clock: now,
            epoch_unix: unix_now,
            rng,
            next_sweep: now + SWEEP_INTERVAL,
            parked: VecDeque::new(),
            ticket_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed),
            seed,
            draining: false,
            shard: 0,
            tickets: HashMap::default(),
            tickets_made: 0,
            muxes,
            tcp: TcpTable::default(),
            pending_action: None,
        }
    }

    /// Shares the host's ban table (every loop of a host sees the same
    /// bans: a source's retries reach any loop).
    pub fn set_bans(&mut self, bans: SharedBans) {
        self.bans = bans;
    }

    /// The relay new Allocates are sent to (300 Try Alternate with its
    /// ALTERNATE-SERVER) while this one is draining or full; without one
    /// for a client's transport and family they get 508 then.
    pub fn set_alternate(&mut self, alternate: Alternate) {
        self.alternate = alternate;
    }

    /// `refusal`, or a redirect to the alternate relay when there is one
    /// for `from`'s transport and the family it reached this relay over.
    fn redirect_or(&self, refusal: Refusal, from: ClientSocket) -> Refusal {
        match self.alternate.for_client(from) {
            Some(_) => Refusal::TryAlternate,
            None => refusal,
        }
    }

    /// The ban table this core uses (the host's, shared by its loops).
    pub fn bans(&self) -> &SharedBans {
        &self.bans
    }

    /// Sets this core's loop index on the host, which its mobility tickets
    /// name so that any loop can find the allocation they move.
    pub fn set_shard(&mut self, shard: u16) {
        self.shard = shard;
    }

    /// A fresh ticket secret.
    fn new_ticket_secret(&mut self) -> Secret {
        self.tickets_made += 1;
        let mut input = [0u8; 16];
        input[..8].copy_from_slice(b"mobility");
        input[8..].copy_from_slice(&self.tickets_made.to_be_bytes());
        let tag = ring::hmac::sign(&self.ticket_key, &input);
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(&tag.as_ref()[..SECRET_LEN]);
        secret
    }

    /// A request's mobility ticket, when this relay gives them.
    fn ticket(&self, msg: &Message<'_>) -> Option<Ticket> {
        if !self.config.mobility {
            return None;
        }
        Ticket::parse(msg.get(AttributeType::MOBILITY_TICKET)?)
    }

    /// The slot a request's mobility ticket names here, if any.
    fn ticket_slot(&self, msg: &Message<'_>) -> Option<u32> {
        self.tickets.get(&self.ticket(msg)?.secret).copied()
    }

    /// Re-reads the wall clock: `unix_now` (seconds since 1970) at `now`.
    /// REST credentials and session tokens expire by wall-clock time, which
    /// may be stepped (NTP) while the monotonic clock runs on; the shell
    /// calls this every tick. Nonces and timers stay on the monotonic clock.
    pub fn set_wall_clock(&mut self, now: Instant, unix_now: u64) {
        self.epoch_unix = unix_now.saturating_sub(self.secs(now));
    }

    /// While draining, new allocations are refused with 508 (clients move on
    /// to their next ICE server) and existing ones keep working until they
    /// end.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Replaces the credential store (secret rotation). Existing
    /// allocations keep the key they were created with.
    pub fn set_credentials(&mut self, credentials: Credentials) {
        self.credentials = credentials;
    }

    /// Counts a drop the shell decided (stream framing).
    pub fn record_drop(&mut self, reason: DropReason) {
        self.stats.drop(reason);
    }

    /// The counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Relay ports this loop can still hand out.
    pub fn available_ports(&self) -> usize {
        self.ports.available()
    }

    /// True when `client` (a 5-tuple) holds an allocation.
    pub fn has_allocation(&self, client: &ClientSocket) -> bool {
        self.allocation_by_client.contains_key(client)
    }

    /// Every live allocation of this core, as the admin API lists them.
    pub fn allocations_info(&self, now: Instant) -> Vec<AllocationInfo> {
        self.slots
            .iter()
            .filter_map(|s| s.allocation.as_ref())
            .map(|a| AllocationInfo {
                relayed: a.relayed,
                relayed_v6: a.relayed6.map(|(_, r)| r),
                client: a.client,
                username: a.username.clone(),
                expires_in: a.expires.saturating_duration_since(now),
                peers: a
                    .permissions
                    .iter()
                    .filter(|p| p.expires > now)
                    .map(|p| p.ip)
                    .collect(),
                channels: a.channels.iter().filter(|c| c.expires > now).count(),
                usage: a.usage,
                multiplexed: a.mux.is_some(),
            })
            .collect()
    }

    /// Ends the allocation whose relayed address is `relayed` (an
    /// operator's kill) and, when given, whose client is `client` (a shared
    /// relayed address needs it): its socket closes with the next commands,
    /// its usage record says `killed`. False when this core has no such
    /// allocation, or more than one shares `relayed` and no client is named.
    pub fn kill(&mut self, relayed: SocketAddr, client: Option<SocketAddr>, now: Instant) -> bool {
        self.clock = self.clock.max(now);
        let mut found = self.slots.iter().enumerate().filter(|(_, s)| {
            s.allocation.as_ref().is_some_and(|a| {
                (a.relayed == relayed || a.relayed6.is_some_and(|(_, r)| r == relayed))
                    && client.is_none_or(|c| a.client.client == c)
            })
        });
        let (Some((index, _)), None) = (found.next(), found.next()) else {
            return false;
        };
        self.free(index as u32, End::Killed);
        true
    }

    /// Live allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocation_by_client.len()
    }

    /// The host's relay port pool this core shares.
    pub fn ports(&self) -> &SharedPorts {
        &self.ports
    }

    /// The next command for the shell.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`Server::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Instant {
        self.next_sweep
    }

    /// The relayed address of an allocation, if it is alive.
    pub fn relayed_address(&self, id: AllocationId) -> Option<SocketAddr> {
        self.allocation(id).map(|a| a.relayed)
    }

    fn next_random(&mut self) -> u64 {
        // splitmix64: fast, and good enough for port choice and ids; the
        // seed is random per process.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn allocation(&self, id: AllocationId) -> Option<&Allocation> {
        let slot = self.slots.get(id.index())?;
        if slot.generation != id.generation {
            return None;
        }
        slot.allocation.as_ref()
    }

    /// A free slot: one given back, else a new one.
    fn take_slot(&mut self) -> u32 {
        self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            (self.slots.len() - 1) as u32
        })
    }

    fn id_of(&self, index: u32) -> AllocationId {
        AllocationId {
            index,
            generation: self.slots[index as usize].generation,
        }
    }

    // ----------------------------------------------------------------- input

    /// Handles one message from a client (a datagram, or one frame of a
    /// stream). Answers go into `out` (1500 bytes suffice).
    pub fn handle_client_input(
        &mut self,
        packet: &[u8],
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> ClientAction {
        self.clock = now;
        match demux(packet) {
            Frame::ChannelData => self.client_channel_data(packet, from, now),
            Frame::Stun => self.client_stun(packet, from, now, out, sockets),
            Frame::Other => self.dropped(DropReason::NotTurn),
        }
    }

    fn dropped(&mut self, reason: DropReason) -> ClientAction {
        self.stats.drop(reason);
        ClientAction::Drop(reason)
    }

    fn client_channel_data(
        &mut self,
        packet: &[u8],
        from: ClientSocket,
        now: Instant,
    ) -> ClientAction {
        let Ok(data) = ChannelData::parse(packet) else {
            return self.dropped(DropReason::Malformed);
        };
        let Some(&index) = self.allocation_by_client.get(&from) else {
            return self.dropped(DropReason::NoAllocation);
        };
        let rate = self.config.bandwidth_per_allocation.unwrap_or(0) as f64;
        let Some(alloc) = self.slots[index as usize].allocation.as_mut() else {
            return self.dropped(DropReason::NoAllocation);
        };
        let Some(channel) = alloc.channel(data.channel, now) else {
            return self.dropped(DropReason::UnboundChannel);
        };
        let peer = channel.peer;
        if !alloc.permits(peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        // On a shared socket the peer must be this allocation's to send to
        // (the claim needs the core, so the allocation is looked up again).
        let alloc = if alloc.mux.is_some() {
            if !self.claim_peer(index, peer, now) {
                return self.dropped(DropReason::PeerClaimed);
            }
            match self.slots[index as usize].allocation.as_mut() {
                Some(a) => a,
                None => return self.dropped(DropReason::NoAllocation),
            }
        } else {
            alloc
        };
        if !alloc.spend(data.payload.len(), rate, now) {
            return self.dropped(DropReason::BandwidthExceeded);
        }
        alloc.usage.add(Direction::ClientToPeer, data.payload.len());
        self.stats
            .forwarded(Direction::ClientToPeer, data.payload.len());
        ClientAction::ToPeer {
            allocation: self.sender_for(index, peer),
            peer,
            payload: 4..4 + data.payload.len(),
        }
    }

    fn client_stun(
        &mut self,
        packet: &[u8],
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> ClientAction {
        let Ok(msg) = Message::parse(packet) else {
            return self.dropped(DropReason::Malformed);
        };
        if msg.has_fingerprint() && msg.verify_fingerprint().is_err() {
            return self.dropped(DropReason::BadFingerprint);
        }
        if msg.is_rfc3489() {
            return self.dropped(DropReason::Malformed);
        }
        match msg.class() {
            Class::Request => {}
            Class::Indication if msg.method() == Method::SEND => {
                return self.send_indication(&msg, packet, from, now);
            }
            Class::Indication if msg.method() == Method::BINDING => {
                return ClientAction::Consumed;
            }
            _ => return self.dropped(DropReason::UnexpectedClass),
        }
        let method = match msg.method() {
            Method::BINDING => RequestMethod::Binding,
            Method::ALLOCATE => RequestMethod::Allocate,
            Method::REFRESH => RequestMethod::Refresh,
            Method::CREATE_PERMISSION => RequestMethod::CreatePermission,
            Method::CHANNEL_BIND => RequestMethod::ChannelBind,
            Method::CONNECT if self.config.tcp_relay => RequestMethod::Connect,
            Method::CONNECTION_BIND if self.config.tcp_relay => RequestMethod::ConnectionBind,
            _ => RequestMethod::Other,
        };
        // A banned source gets no answer, unless this 5-tuple already holds
        // an allocation (it authenticated before the ban).
        if self.bans.is_banned(from.client.ip(), now)
            && !self.allocation_by_client.contains_key(&from)
        {
            return self.dropped(DropReason::Banned);
        }
        if method == RequestMethod::Refresh
            && let Some(shard) = self.moves_from(&msg, from)
        {
            // Handing a packet to another loop costs more than answering
            // it: bounded like an unauthenticated answer.
            if !self.limiter.allow(from.client.ip(), now) {
                return self.dropped(DropReason::RateLimited);
            }
            return ClientAction::Move { shard };
        }
        if method == RequestMethod::ConnectionBind
            && let Some(shard) = self.binds_elsewhere(&msg, from)
        {
            if !self.limiter.allow(from.client.ip(), now) {
                return self.dropped(DropReason::RateLimited);
            }
            self.stats.tcp_events[crate::stats::TcpEvent::BindHandedOver as usize] += 1;
            return ClientAction::BindElsewhere { shard };
        }
        let (answer, result) = self.request(&msg, method, from, now, out, sockets);
        if let Some(action) = self.pending_action.take() {
            // A Connect is counted when its answer goes out.
            if method != RequestMethod::Connect {
                self.stats.request(method, RequestResult(result));
            }
            return action;
        }
        match answer {
            Some(Ok(len)) => {
                self.stats.request(method, RequestResult(result));
                ClientAction::Reply(len)
            }
            // Only a too-small output buffer gets here: a caller bug, but
            // never worth a panic on the data path.
            Some(Err(_)) => self.dropped(DropReason::Malformed),
            None => self.dropped(DropReason::RateLimited),
        }
    }

    /// The core a Refresh's mobility ticket names when the allocation is
    /// not here (and `from` has none here).
    fn moves_from(&self, msg: &Message<'_>, from: ClientSocket) -> Option<u16> {
        if self.allocation_by_client.contains_key(&from) {
            return None;
        }
        let ticket = self.ticket(msg)?;
        (ticket.shard != self.shard && !self.tickets.contains_key(&ticket.secret))
            .then_some(ticket.shard)
    }

    /// Handles a request; returns the answer (None when rate-limited) and
    /// the result code for metrics (0 for success).
    fn request(
        &mut self,
        msg: &Message<'_>,
        method: RequestMethod,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> (Option<Answer>, u16) {
        if method == RequestMethod::Other {
            self.refused(Refusal::UnknownMethod, method, from);
            let code = Refusal::UnknownMethod.code();
            return self.unauthenticated_error(msg, code, from, now, out);
        }
        if method == RequestMethod::Binding {
            if !self.limiter.allow(from.client.ip(), now) {
                return (None, 0);
            }
            return (Some(self.binding_success(msg, from, out)), 0);
        }
        let mut unknown = [AttributeType(0); MAX_UNKNOWN_LISTED];
        let mut n_unknown = 0;
        for ty in msg.unknown_required(understood) {
            if n_unknown < MAX_UNKNOWN_LISTED && !unknown[..n_unknown].contains(&ty) {
                unknown[n_unknown] = ty;
                n_unknown += 1;
            }
        }
        if n_unknown > 0 {
            self.refused(Refusal::UnknownAttribute, method, from);
            if !self.limiter.allow(from.client.ip(), now) {
                return (None, 0);
            }
            let answer = self.error(msg, Refusal::UnknownAttribute.code(), None, out, |enc| {
                let mut scratch = [0u8; 2 * MAX_UNKNOWN_LISTED];
                let list = UnknownAttributes::from_types(
                    unknown[..n_unknown].iter().copied(),
                    &mut scratch,
                );
                enc.attribute(&Attribute::UnknownAttributes(list))
            });
            return (Some(answer), 420);
        }
        // Draining or full with a relay to send clients to: an Allocate is
        // redirected before the credential challenge, so the client starts
        // afresh there (a nonce of this relay means nothing to the other:
        // browsers treat its 438 on an Allocate as a failure).
        if method == RequestMethod::Allocate
            && !msg.has_integrity()
            && !self.allocation_by_client.contains_key(&from)
            && (self.draining || self.ports.at_capacity(self.config.max_allocations))
            && let Some(alternate) = self.alternate.for_client(from)
        {
            self.refused(Refusal::TryAlternate, method, from);
            return self.unauthenticated(
                msg,
                ErrorCode::TRY_ALTERNATE,
                from,
                now,
                out,
                |enc, _| enc.attribute(&Attribute::AlternateServer(alternate)),
            );
        }
        let auth = match self.authenticate(msg, method, from, now, out) {
            Ok(auth) => auth,
            Err(answer) => return answer,
        };
        let result = match method {
            RequestMethod::Allocate => self.allocate(msg, &auth, from, now, out, sockets),
            RequestMethod::Refresh => self.refresh(msg, &auth, from, now, out),
            RequestMethod::CreatePermission => self.create_permission(msg, &auth, from, now, out),
            RequestMethod::ChannelBind => self.channel_bind(msg, &auth, from, now, out),
            RequestMethod::Connect => self.connect(msg, &auth, from, now),
            RequestMethod::ConnectionBind => self.connection_bind(msg, &auth, from, now, out),
            RequestMethod::Binding | RequestMethod::Other => unreachable_answer(),
        };
        match result {
            Ok(len) => (Some(Ok(len)), 0),
            Err(refusal) => {
                self.refused(refusal, method, from);
                let code = refusal.code();
                let alternate = self
                    .alternate
                    .for_client(from)
                    .filter(|_| refusal == Refusal::TryAlternate);
                let answer = self.error(msg, code, Some(&auth), out, |enc| match alternate {
                    Some(a) => enc.attribute(&Attribute::AlternateServer(a)),
                    None => Ok(()),
                });
                (Some(answer), code.code)
            }
        }
    }

    /// Counts a refused request by its cause and logs it (debug: the
    /// cause is in the metric; the line is for following one client).
    fn refused(&mut self, refusal: Refusal, method: RequestMethod, from: ClientSocket) {
        self.stats.refused(refusal);
        tracing::debug!(
            client = %from.client,
            transport = from.transport.label(),
            method = method.label(),
            reason = refusal.label(),
            code = refusal.code().code,
            "request refused"
        );
    }

    // -------------------------------------------------------- authentication

    /// The long-term credential check (RFC 8489 §9.2.4). On failure returns
    /// the (rate-limited) answer to send.
    fn authenticate(
        &mut self,
        msg: &Message<'_>,
        method: RequestMethod,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> Result<Auth, (Option<Answer>, u16)> {
        if !msg.has_integrity() {
            return Err(self.challenge(msg, ErrorCode::UNAUTHENTICATED, from, now, out));
        }
        let text = |ty| match msg.decode(ty) {
            Some(Ok(Attribute::Username(s) | Attribute::Realm(s) | Attribute::Nonce(s))) => Some(s),
            _ => None,
        };
        let (Some(username), Some(realm), Some(nonce)) = (
            text(AttributeType::USERNAME),
            text(AttributeType::REALM),
            text(AttributeType::NONCE),
        ) else {
            self.refused(Refusal::IncompleteCredentials, method, from);
            let code = Refusal::IncompleteCredentials.code();
            return Err(self.unauthenticated_error(msg, code, from, now, out));
        };
        match self.nonces.verify(nonce, self.secs(now), from.client.ip()) {
            Ok(()) => {}
            Err(e) => {
                // Counted, but neither logged nor held against the source:
                // a nonce another loop issued (a client that moved, RFC
                // 8016) reads as invalid here, and a 438 with a fresh nonce
                // is all a forged one gets.
                if e == NonceError::Invalid {
                    self.stats.auth_failure(AuthFailureReason::BadNonce);
                }
                return Err(self.challenge(msg, ErrorCode::STALE_NONCE, from, now, out));
            }
        }
        if realm != self.credentials.realm() {
            return Err(self.challenge(msg, ErrorCode::UNAUTHENTICATED, from, now, out));
        }
        let sha256 = msg.get(AttributeType::MESSAGE_INTEGRITY_SHA256).is_some();
        let mut slot = self.allocation_by_client.get(&from).copied();
        if slot.is_none() && method == RequestMethod::Refresh {
            // A client that moved signs with its allocation's key, which
            // may outlive its credentials (RFC 8016 §3.3).
            slot = self.ticket_slot(msg);
        }
        let existing = slot.and_then(|i| self.slots[i as usize].allocation.as_ref());
        if let Some(alloc) = existing
            && &*alloc.username == username
        {
            if msg.verify_any_integrity(&alloc.key).is_ok() {
                return Ok(Auth {
                    key: alloc.key.clone(),
                    sha256,
                });
            }
            self.auth_failed(AuthFailureReason::BadIntegrity, method, from, username, now);
            return Err(self.challenge(msg, ErrorCode::UNAUTHENTICATED, from, now, out));
        }
        let unix = self.epoch_unix + self.secs(now);
        match self.credentials.authenticate(msg, username, unix) {
            Ok(key) if existing.is_some() => {
                // Valid credentials, but not the ones that own the
                // allocation on this 5-tuple (RFC 8656 §6.2).
                let reason = AuthFailureReason::WrongCredentials;
                self.auth_failed(reason, method, from, username, now);
                let auth = Auth { key, sha256 };
                let answer =
                    self.error(msg, ErrorCode::WRONG_CREDENTIALS, Some(&auth), out, |_| {
                        Ok(())
                    });
                Err((Some(answer), 441))
            }
            Ok(key) => Ok(Auth { key, sha256 }),
            Err(failure) => {
                let reason = match failure {
                    AuthFailure::UnknownUser => AuthFailureReason::UnknownUser,
                    AuthFailure::Expired => AuthFailureReason::Expired,
                    AuthFailure::WrongRelay => AuthFailureReason::WrongRelay,
                    AuthFailure::BadIntegrity => AuthFailureReason::BadIntegrity,
                };
                self.auth_failed(reason, method, from, username, now);
                Err(self.challenge(msg, ErrorCode::UNAUTHENTICATED, from, now, out))
            }
        }
    }

    /// Counts a refused authentication, logs it (one structured line per
    /// failure: the source, the reason and the username sent — what
    /// fail2ban-style tooling reads) and strikes the source, which past the
    /// policy's count is banned.
    fn auth_failed(
        &mut self,
        reason: AuthFailureReason,
        method: RequestMethod,
        from: ClientSocket,
        username: &str,
        now: Instant,
    ) {
        self.stats.auth_failure(reason);
        let strike = self.bans.strike(from.client.ip(), now);
        // The username is the client's text: shortened, without control
        // characters, so that it cannot forge log lines in any format.
        let username: String = username
            .chars()
            .take(MAX_LOGGED_USERNAME)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let failures = match strike {
            Strike::Counted(n) => n,
            Strike::Banned => self.config.bans.after,
            Strike::Untracked => 0,
        };
        tracing::warn!(
            source = %from.client.ip(),
            port = from.client.port(),
            transport = from.transport.label(),
            method = method.label(),
            reason = reason.label(),
            username = %username,
            failures,
            "authentication refused"
        );
        if strike == Strike::Banned {
            tracing::warn!(
                source = %crate::bans::source_key(from.client.ip()),
                failures,
                ban_secs = self.config.bans.duration.as_secs(),
                "source banned after repeated authentication failures"
            );
        }
    }

    /// 401 or 438 with REALM and a fresh NONCE, rate-limited.
    fn challenge(
        &mut self,
        msg: &Message<'_>,
        code: ErrorCode<'static>,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> (Option<Answer>, u16) {
        self.unauthenticated(msg, code, from, now, out, |enc, server| {
            // Minted only once the answer is allowed: a flood costs no HMACs.
            let nonce = server.nonces.mint(server.secs(now), from.client.ip());
            enc.attribute(&Attribute::Realm(server.credentials.realm()))?;
            // The nonce is ASCII hex by construction.
            enc.raw(AttributeType::NONCE, &nonce)
        })
    }

    /// An error answered before authentication, rate-limited.
    fn unauthenticated_error(
        &mut self,
        msg: &Message<'_>,
        code: ErrorCode<'static>,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> (Option<Answer>, u16) {
        self.unauthenticated(msg, code, from, now, out, |_, _| Ok(()))
    }

    /// An unsigned error with `extra` attributes, or nothing when a UDP
    /// source is over its unauthenticated-answer cap. The cap bounds
    /// reflection towards spoofed UDP sources; a TCP or TLS client proved
    /// its address with the handshake, and an answer it never gets would
    /// only leave it waiting (connection counts bound streams instead).
    fn unauthenticated(
        &mut self,
        msg: &Message<'_>,
        code: ErrorCode<'static>,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
        extra: impl FnOnce(&mut Encoder<'_>, &Self) -> Result<(), EncodeError>,
    ) -> (Option<Answer>, u16) {
        if from.transport == super::Transport::Udp && !self.limiter.allow(from.client.ip(), now) {
            return (None, 0);
        }
        let answer = self.error(msg, code, None, out, |enc| extra(enc, self));
        (Some(answer), code.code)
    }

    // -------------------------------------------------------------- encoding

    fn binding_success(&self, msg: &Message<'_>, from: ClientSocket, out: &mut [u8]) -> Answer {
        let ty = MessageType::new(Method::BINDING, Class::Success);
        let mut enc = Encoder::new(out, ty, &msg.transaction_id())?;
        enc.xor_mapped_address(from.client)?;
        if let Some(s) = &self.config.software {
            enc.software(s)?;
        }
        enc.fingerprint()?;
        Ok(enc.finish())
    }

    /// An error response: ERROR-CODE, `extra` attributes, MESSAGE-INTEGRITY
    /// when authenticated, FINGERPRINT when the request had one.
    fn error(
        &self,
        msg: &Message<'_>,
        code: ErrorCode<'static>,
        auth: Option<&Auth>,
        out: &mut [u8],
        extra: impl FnOnce(&mut Encoder<'_>) -> Result<(), EncodeError>,
    ) -> Answer {
        let ty = MessageType::new(msg.method(), Class::Error);
        let mut enc = Encoder::new(out, ty, &msg.transaction_id())?;
        enc.error_code(code)?;
        extra(&mut enc)?;
        self.seal(&mut enc, auth, msg.has_fingerprint())?;
        Ok(enc.finish())
    }

    fn seal(
        &self,
        enc: &mut Encoder<'_>,
        auth: Option<&Auth>,
        fingerprint: bool,
    ) -> Result<(), EncodeError> {
        if let Some(auth) = auth {
            if auth.sha256 {
                enc.integrity_sha256(&auth.key)?;
            } else {
                enc.integrity(&auth.key)?;
            }
        }
        if fingerprint {
            enc.fingerprint()?;
        }
        Ok(())
    }

    /// A success response signed with the request's key.
    fn success(
        &self,
        msg: &Message<'_>,
        auth: &Auth,
        out: &mut [u8],
        body: impl FnOnce(&mut Encoder<'_>) -> Result<(), EncodeError>,
    ) -> Result<usize, Refusal> {
        let write = || {
            let ty = MessageType::new(msg.method(), Class::Success);
            let mut enc = Encoder::new(out, ty, &msg.transaction_id())?;
            body(&mut enc)?;
            if let Some(s) = &self.config.software {
                enc.software(s)?;
            }
            self.seal(&mut enc, Some(auth), msg.has_fingerprint())?;
            Ok::<_, EncodeError>(enc.finish())
        };
        write().map_err(|_| Refusal::Internal)
    }

    // --------------------------------------------------------------- methods

    fn granted_lifetime(&self, msg: &Message<'_>) -> Duration {
        let requested = match msg.decode(AttributeType::LIFETIME) {
            Some(Ok(Attribute::Lifetime(secs))) => Some(Duration::from_secs(u64::from(secs))),
            _ => None,
        };
        match requested {
            Some(d) if d.is_zero() => Duration::ZERO,
            Some(d) => d
                .max(self.config.default_lifetime)
                .min(self.config.max_lifetime),
            None => self.config.default_lifetime,
        }
    }

    /// Allocate (RFC 8656 §7.2).
    fn allocate(
        &mut self,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
        sockets: &mut dyn RelaySockets,
    ) -> Result<usize, Refusal> {
        if let Some(&index) = self.allocation_by_client.get(&from) {
            return self.allocate_again(index, msg, auth, from, now, out);
        }
        if self.draining {
            return Err(self.redirect_or(Refusal::Draining, from));
        }
        let wants_ticket = msg.get(AttributeType::MOBILITY_TICKET).is_some();
        if wants_ticket && !self.config.mobility {
            return Err(Refusal::MobilityForbidden);
        }
        let mut req = AllocateRequest::parse(msg)?;
        if !req.family_given {
            req.v6 = self.default_v6(from);
        }
        if req.tcp {
            Self::check_tcp_allocation(&req, wants_ticket, from, self.config.tcp_relay)?;
        }
        let claim = self.claim(req.username, from.client.ip());
        if let Err(r) = self.ports.admissible(&claim) {
            return Err(match r {
                Refusal::HostCapacity => self.redirect_or(r, from),
                r => r,
            });
        }
        let mut reserved_token = None;
        let (index, relayed, mux) = match self.own_relay(&req, sockets, now) {
            Ok((index, relayed, token)) => {
                reserved_token = token;
                (index, relayed, None)
            }
            // The range is used up (or no port of it binds): a shared
            // relayed address, unless the client asked for what only a port
            // of its own gives (a held port, the next port reserved, DF on
            // its datagrams alone). An even port is one of the even shared
            // ones.
            Err(Refusal::NoRelayPort)
                if !req.tcp
                    && req.token.is_none()
                    && req.even_port.is_none_or(|e| !e.reserve_next)
                    && !req.dont_fragment =>
            {
                if self.relay_of(req.v6).is_none() {
                    return Err(Refusal::AddressFamilyNotSupported);
                }
                let session = natrix_model::SessionToken::session_of(req.username).map(|(s, _)| s);
                let (index, m) =
                    self.join_mux(req.v6, req.even_port.is_some(), session, sockets)?;
                (index, self.muxes[m as usize].public, Some(m))
            }
            Err(refusal) => return Err(refusal),
        };
        let lifetime = match self.granted_lifetime(msg) {
            d if d.is_zero() => self.config.default_lifetime,
            d => d,
        };
        // Count it host-wide, atomically with the checks: another loop may
        // have taken the last place since the quick check above.
        if let Err(refusal) = self
            .ports
            .count(&self.claim(req.username, from.client.ip()))
        {
            match mux {
                None => {
                    self.commands.push_back(Command::CloseRelay {
                        allocation: self.id_of(index),
                        relayed,
                    });
                    self.ports.put(relayed.port());
                }
                Some(m) => self.leave_mux(m, index, req.username, &[], &[]),
            }
            self.free_slots.push(index);
            return Err(refusal);
        }
        let bandwidth = self.config.bandwidth_per_allocation.map(|rate| Bandwidth {
            tokens: rate as f64,
            updated: now,
        });
        let ticket = wants_ticket.then(|| self.new_ticket_secret());
        if let Some(secret) = ticket {
            self.tickets.insert(secret, index);
        }
        self.slots[index as usize].allocation = Some(Allocation {
            client: from,
            relayed,
            relayed6: None,
            username: req.username.into(),
            key: auth.key.clone(),
            created_by: msg.transaction_id(),
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bandwidth,
            allowed_peers: super::auth::session_peers(req.username),
            ticket,
            adopted: false,
            mux,
            claims: Vec::new(),
            usage: Usage {
                started_unix: self.epoch_unix + self.secs(now),
                ..Usage::default()
            },
            tcp: req.tcp,
            connections: Vec::new(),
        });
        if req.tcp {
            self.stats.tcp_allocations += 1;
        }
        self.allocation_by_client.insert(from, index);
        self.stats.allocations_created += 1;
        self.stats.allocations = self.allocation_by_client.len() as u64;
        let ticket = self.ticket_of(ticket);
        // The IPv6 half of a dual-stack allocation: when it cannot be had,
        // the IPv4 one stands and ADDRESS-ERROR-CODE says why (§7.2).
        let additional = match (req.additional_v6, relayed.is_ipv6()) {
            (true, false) => Some(self.open_twin(index, req.dont_fragment, sockets, now)),
            _ => None,
        };
        // Asked for both on a relay without IPv4: the IPv6 one stands.
        let no_v4 = req.additional_v6 && relayed.is_ipv6();
        let draft = req.additional_draft;

        self.success(msg, auth, out, |enc| {
            enc.attribute(&Attribute::XorRelayedAddress(relayed))?;
            match additional {
                Some(Ok(v6)) => enc.attribute(&Attribute::XorRelayedAddress(v6))?,
                Some(Err(refusal)) => address_error(enc, draft, 0x02, refusal)?,
                None if no_v4 => {
                    address_error(enc, draft, 0x01, Refusal::AddressFamilyNotSupported)?;
                }
                None => {}
            }
            enc.attribute(&Attribute::Lifetime(lifetime.as_secs() as u32))?;
            if let Some(t) = reserved_token {
                enc.attribute(&Attribute::ReservationToken(t))?;
            }
            if let Some(t) = ticket {
                enc.raw(AttributeType::MOBILITY_TICKET, &t)?;
            }
            enc.xor_mapped_address(from.client)
        })
    }

    /// Who an allocation of `username` from `source` is counted against,
    /// with this relay's quotas: the username, the source IP, and for a
    /// session token its session and tenant.
    fn claim<'a>(&self, username: &'a str, source: std::net::IpAddr) -> Claim<'a> {
        let c = &self.config;
        let session = natrix_model::SessionToken::session_of(username);
        Claim {
            user: (
                username,
                if session.is_some() {
                    c.user_quota.min(SESSION_TOKEN_QUOTA)
                } else {
                    c.user_quota
                },
            ),
            source: (source, c.source_quota),
            session: session.map(|(s, _)| (s, SESSION_QUOTA)),
            tenant: session.and_then(|(_, t)| t).map(|t| (t, c.tenant_quota)),
            capacity: c.max_allocations,
        }
    }

    /// An Allocate from a client that has an allocation: a retransmission
    /// of the one that created it gets the same answer again; any other is
    /// refused (437).
    fn allocate_again(
        &mut self,
        index: u32,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let alloc = self.allocation_ref(index)?;
        if alloc.created_by != msg.transaction_id() {
            return Err(Refusal::AllocationExists);
        }
        let relayed = alloc.relayed;
        let relayed6 = alloc.relayed6.map(|(_, a)| a);
        let left = alloc.expires.saturating_duration_since(now).as_secs() as u32;
        let ticket = self.ticket_of(alloc.ticket);
        self.success(msg, auth, out, |enc| {
            enc.attribute(&Attribute::XorRelayedAddress(relayed))?;
            if let Some(v6) = relayed6 {
                enc.attribute(&Attribute::XorRelayedAddress(v6))?;
            }
            enc.attribute(&Attribute::Lifetime(left))?;
            if let Some(t) = ticket {
                enc.raw(AttributeType::MOBILITY_TICKET, &t)?;
            }
            enc.xor_mapped_address(from.client)
        })
    }

    /// The relay port: from a reservation, an even port (maybe reserving
    /// the next), or any; with its family and the token of a reservation
    /// made for the next port.
    fn take_port(
        &mut self,
        req: &AllocateRequest<'_>,
        now: Instant,
    ) -> Result<(u16, bool, Option<[u8; 8]>), Refusal> {
        if let Some(t) = req.token {
            let (port, v6) = self
                .ports
                .redeem(&t, now)
                .ok_or(Refusal::UnknownReservation)?;
            return Ok((port, v6, None));
        }
        let random = self.next_random();
        let mut reserved_token = None;
        let port = match req.even_port {
            Some(EvenPort { reserve_next }) => {
                let reservation = reserve_next.then(|| {
                    let t = self.next_random().to_be_bytes();
                    reserved_token = Some(t);
                    (t, req.v6, now + RESERVATION_LIFETIME)
                });
                self.ports
                    .take_even(random, reservation)
                    .ok_or(Refusal::NoRelayPort)?
            }
            None => self.ports.take_random(random).ok_or(Refusal::NoRelayPort)?,
        };
        Ok((port, req.v6, reserved_token))
    }

    /// Where relayed addresses of the family live, if the relay offers it.
    fn relay_of(&self, v6: bool) -> Option<RelayAddress> {
        if v6 {
            self.config.relay_v6
        } else {
            self.config.relay_v4
        }
    }

    /// A relay port of the allocation's own, its socket open: the slot, the
    /// relayed address and the token of a reservation made for the next
    /// port.
    fn own_relay(
        &mut self,
        req: &AllocateRequest<'_>,
        sockets: &mut dyn RelaySockets,
        now: Instant,
    ) -> Result<(u32, SocketAddr, Option<[u8; 8]>), Refusal> {
        let chosen = req.token.is_some() || req.even_port.is_some();
        // An even port another process holds: another pair (its
        // reservation given back), up to the usual bind attempts.
        let pairs = if req.even_port.is_some() && req.token.is_none() {
            BIND_ATTEMPTS
        } else {
            1
        };
        let mut refused = Refusal::NoRelayPort;
        for _ in 0..pairs {
            let (port, v6, token) = self.take_port(req, now)?;
            let relay = match self.relay_of(v6) {
                Some(r) => r,
                None => {
                    self.ports.put(port);
                    return Err(Refusal::AddressFamilyNotSupported);
                }
            };
            let how = match (req.tcp, req.dont_fragment) {
                (true, _) => Open::Listen,
                (false, df) => Open::Udp { dont_fragment: df },
            };
            match self.open_relay(chosen, how, relay.bind, port, sockets, now) {
                Ok((index, port)) => {
                    return Ok((index, SocketAddr::new(relay.public, port), token));
                }
                Err(e) => {
                    if let Some(t) = token
                        && let Some((next, _)) = self.ports.redeem(&t, now)
                    {
                        self.ports.put(next);
                    }
                    refused = e;
                }
            }
        }
        Err(refused)
    }

    /// Joins the least used shared relay socket of the family (on an even
    /// port when `even`; without an allocation of `session` when one has
    /// none) that opens (each opens at its first allocation); returns the
    /// allocation's slot and the socket's index. 508 when there is none to
    /// share.
    fn join_mux(
        &mut self,
        v6: bool,
        even: bool,
        session: Option<&str>,
        sockets: &mut dyn RelaySockets,
    ) -> Result<(u32, u32), Refusal> {
        let mut candidates: Vec<(bool, usize, u32)> = self
            .muxes
            .iter()
            .enumerate()
            .filter(|(_, m)| m.public.is_ipv6() == v6 && (!even || m.public.port() % 2 == 0))
            .map(|(i, m)| {
                let same_session = session.is_some_and(|s| m.sessions.contains_key(s));
                (same_session, m.members, i as u32)
            })
            .collect();
        if candidates.is_empty() {
            return Err(Refusal::NoRelayPort);
        }
        candidates.sort_unstable();
        for (_, _, m) in candidates {
            if self.muxes[m as usize].slot.is_none() {
                let slot = self.take_slot();
                let id = self.id_of(slot);
                // Shared: DF stays off (an allocation that asks for it gets
                // a port of its own or 508).
                match sockets.open(id, self.muxes[m as usize].bind, false) {
                    Ok(()) => {
                        self.slots[slot as usize].mux = Some(m);
                        self.muxes[m as usize].slot = Some(slot);
                        self.stats.multiplex_sockets += 1;
                    }
                    Err(_) => {
                        // Held by another process (the one this took over
                        // from, for a while): tried again next time.
                        self.free_slots.push(slot);
                        continue;
                    }
                }
            }
            let mux = &mut self.muxes[m as usize];
            mux.members += 1;
            if let Some(s) = session {
                *mux.sessions.entry(s.into()).or_insert(0) += 1;
            }
            self.stats.multiplexed_allocations += 1;
            return Ok((self.take_slot(), m));
        }
        Err(Refusal::NoRelayPort)
    }

    /// An allocation in slot `index` leaves shared socket `m`: its claims
    /// and permissions there go.
    fn leave_mux(
        &mut self,
        m: u32,
        index: u32,
        username: &str,
        claims: &[SocketAddr],
        permissions: &[Permission],
    ) {
        let mux = &mut self.muxes[m as usize];
        mux.members = mux.members.saturating_sub(1);
        if let Some((session, _)) = natrix_model::SessionToken::session_of(username)
            && let Some(n) = mux.sessions.get_mut(session)
        {
            *n -= 1;
            if *n == 0 {
                mux.sessions.remove(session);
            }
        }
        for peer in claims {
            if mux.peers.get(peer) == Some(&index) {
                mux.peers.remove(peer);
            }
        }
        for p in permissions {
            if mux.permitted.get(&p.ip) == Some(&index) {
                mux.permitted.remove(&p.ip);
            }
        }
        self.stats.multiplexed_allocations = self.stats.multiplexed_allocations.saturating_sub(1);
    }

    /// True when the allocation in slot `owner` is on shared socket `m`
    /// and may still hear from `peer` (its claim there holds).
    fn holds(&self, owner: u32, m: u32, peer: SocketAddr, now: Instant) -> bool {
        self.slots
            .get(owner as usize)
            .and_then(|s| s.allocation.as_ref())
            .is_some_and(|a| a.mux == Some(m) && a.permits(peer.ip(), now))
    }

    /// Claims `peer` for the allocation in slot `index` on its shared
    /// socket (always true for one with a socket of its own, or for an IPv6
    /// peer its own IPv6 half reaches). False when another allocation there
    /// holds it.
    #[inline]
    fn claim_peer(&mut self, index: u32, peer: SocketAddr, now: Instant) -> bool {
        let Some(m) = self.slots[index as usize]
            .allocation
            .as_ref()
            .and_then(|a| a.mux)
        else {
            return true;
        };
        if self.muxes[m as usize].public.is_ipv6() != peer.is_ipv6() {
            return true;
        }
        if self.claim_refused(m, index, peer, now) {
            return false;
        }
        if self.muxes[m as usize].peers.get(&peer) != Some(&index) {
            self.take_claim(m, index, peer);
        }
        true
    }

    /// True when the allocation in slot `index` may not have `peer` on
    /// shared socket `m`: another allocation there holds it, or it is the
    /// shared address itself (what came back would be nobody's; two
    /// allocations on one shared address reach each other through other
    /// candidates).
    fn claim_refused(&self, m: u32, index: u32, peer: SocketAddr, now: Instant) -> bool {
        let mux = &self.muxes[m as usize];
        peer == mux.public
            || peer == mux.bind
            || mux
                .peers
                .get(&peer)
                .is_some_and(|&owner| owner != index && self.holds(owner, m, peer, now))
    }

    /// Records `peer` as the allocation in slot `index`'s on shared socket
    /// `m`, dropping its oldest claim past [`MAX_CLAIMS`].
    fn take_claim(&mut self, m: u32, index: u32, peer: SocketAddr) {
        let mux = &mut self.muxes[m as usize];
        mux.peers.insert(peer, index);
        let Some(alloc) = self.slots[index as usize].allocation.as_mut() else {
            return;
        };
        if alloc.claims.len() >= MAX_CLAIMS {
            let old = alloc.claims.remove(0);
            if old != peer && mux.peers.get(&old) == Some(&index) {
                mux.peers.remove(&old);
            }
        }
        alloc.claims.push(peer);
    }

    /// The allocation peer data from `peer` on shared socket `m` goes to:
    /// the one that claimed `peer`, else the last to permit its IP (which
    /// then claims it).
    fn mux_owner(&mut self, m: u32, peer: SocketAddr, now: Instant) -> Option<u32> {
        let mux = &self.muxes[m as usize];
        if let Some(&owner) = mux.peers.get(&peer)
            && self.holds(owner, m, peer, now)
        {
            return Some(owner);
        }
        let owner = *mux.permitted.get(&peer.ip())?;
        if !self.holds(owner, m, peer, now) {
            return None;
        }
        self.take_claim(m, owner, peer);
        Some(owner)
    }

    /// The shared socket at `public` for an allocation (in slot `index`)
    /// that a predecessor handed over on it: placed in slot `socket` with
    /// `generation` unless it is there already. None when this core has no
    /// shared socket there (its configuration changed) or the slot is
    /// another's.
    fn adopt_mux(
        &mut self,
        public: SocketAddr,
        socket: u32,
        generation: u32,
        index: usize,
    ) -> Option<u32> {
        let m = self.muxes.iter().position(|x| x.public == public)?;
        match self.muxes[m].slot {
            Some(s) if s == socket => return Some(m as u32),
            Some(_) => return None,
            None => {}
        }
        let at = socket as usize;
        if at == index {
            return None;
        }
        if self.slots.len() <= at {
            self.slots.resize_with(at + 1, Slot::default);
        }
        let s = &self.slots[at];
        if s.allocation.is_some() || s.twin_of.is_some() || s.mux.is_some() {
            return None;
        }
        self.slots[at] = Slot {
            generation,
            allocation: None,
            twin_of: None,
            mux: Some(m as u32),
        };
        self.muxes[m].slot = Some(socket);
        self.stats.multiplex_sockets += 1;
        Some(m as u32)
    }

    /// Takes a slot and opens its relay socket on `bind:port`. A port
    /// another process holds is parked out of the pool for [`PARK_FOR`] and
    /// another is tried (unless the client asked for this one); any other
    /// failure returns the port to the pool. Returns the slot and port.
    fn open_relay(
        &mut self,
        chosen: bool,
        how: Open,
        bind: std::net::IpAddr,
        mut port: u16,
        sockets: &mut dyn RelaySockets,
        now: Instant,
    ) -> Result<(u32, u16), Refusal> {
        let index = self.take_slot();
        let id = self.id_of(index);
        for attempt in 0..BIND_ATTEMPTS {
            let addr = SocketAddr::new(bind, port);
            let opened = match how {
                Open::Udp { dont_fragment } => sockets.open(id, addr, dont_fragment),
                Open::Listen => sockets.listen(id, addr),
            };
            match opened {
                Ok(()) => return Ok((index, port)),
                Err(e) if e.kind() != std::io::ErrorKind::AddrInUse => {
                    // Out of descriptors or buffers: the port is fine and
                    // goes back to the pool; another would fail the same.
                    self.ports.put(port);
                    break;
                }
                Err(_) => self.park(port, now),
            }
            if chosen || attempt + 1 == BIND_ATTEMPTS {
                break;
            }
            let random = self.next_random();
            match self.ports.take_random(random) {
                Some(p) => port = p,
                None => break,
            }
        }
        self.free_slots.push(index);
        Err(Refusal::NoRelayPort)
    }

    /// The family of an Allocate from `from` that names none: the
    /// configured default's when the relay offers it, else the other.
    fn default_v6(&self, from: ClientSocket) -> bool {
        let preferred_v6 = match self.config.default_family {
            DefaultFamily::Ipv4 => false,
            DefaultFamily::Ipv6 => true,
            DefaultFamily::Keep => from.server.ip().to_canonical().is_ipv6(),
        };
        if preferred_v6 {
            self.config.relay_v6.is_some() || self.config.relay_v4.is_none()
        } else {
            self.config.relay_v4.is_none() && self.config.relay_v6.is_some()
        }
    }

    /// Opens the IPv6 relay socket of the dual-stack allocation in slot
    /// `primary`, in a slot of its own; returns its relayed address.
    fn open_twin(
        &mut self,
        primary: u32,
        dont_fragment: bool,
        sockets: &mut dyn RelaySockets,
        now: Instant,
    ) -> Result<SocketAddr, Refusal> {
        let relay = self
            .config
            .relay_v6
            .ok_or(Refusal::AddressFamilyNotSupported)?;
        let random = self.next_random();
        let port = self.ports.take_random(random).ok_or(Refusal::NoRelayPort)?;
        let how = Open::Udp { dont_fragment };
        let (twin, port) = self.open_relay(false, how, relay.bind, port, sockets, now)?;
        let relayed = SocketAddr::new(relay.public, port);
        self.slots[twin as usize].twin_of = Some(primary);
        if let Some(a) = self.slots[primary as usize].allocation.as_mut() {
            a.relayed6 = Some((twin, relayed));
        }
        self.stats.dual_stack_allocations += 1;
        Ok(relayed)
    }

    /// Closes the IPv6 half of a dual-stack allocation (its socket by the
    /// command, its port back to the pool) and frees its slot.
    fn free_twin(&mut self, twin: Option<(u32, SocketAddr)>) {
        let Some((index, relayed)) = twin else {
            return;
        };
        let slot = &mut self.slots[index as usize];
        let id = AllocationId {
            index,
            generation: slot.generation,
        };
        slot.generation = slot.generation.wrapping_add(1);
        slot.twin_of = None;
        self.free_slots.push(index);
        self.ports.put(relayed.port());
        self.stats.dual_stack_allocations = self.stats.dual_stack_allocations.saturating_sub(1);
        self.commands.push_back(Command::CloseRelay {
            allocation: id,
            relayed,
        });
    }

    /// The id of the relay socket `allocation` sends to `peer` from: the
    /// IPv6 half's for an IPv6 peer of a dual-stack allocation, the shared
    /// socket's for one on a shared relayed address.
    #[inline]
    fn sender_for(&self, index: u32, peer: SocketAddr) -> AllocationId {
        let Some(a) = self.slots[index as usize].allocation.as_ref() else {
            return self.id_of(index);
        };
        match (a.relayed6, a.mux) {
            (Some((twin, _)), _) if peer.is_ipv6() => self.id_of(twin),
            // On a shared socket (its slot is set once it opened).
            (_, Some(m)) => self.muxes[m as usize]
                .slot
                .map_or_else(|| self.id_of(index), |slot| self.id_of(slot)),
            _ => self.id_of(index),
        }
    }

    /// The id of the live allocation or IPv6 half in `slot` (a handed-over
    /// relay socket's owner).
    pub fn live_id(&self, slot: u32) -> Option<AllocationId> {
        let s = self.slots.get(slot as usize)?;
        (s.allocation.is_some() || s.twin_of.is_some() || s.mux.is_some()).then(|| self.id_of(slot))
    }

    /// True when `id` is the IPv6 half of a dual-stack allocation.
    pub fn is_twin(&self, id: AllocationId) -> bool {
        self.slots
            .get(id.index())
            .is_some_and(|s| s.generation == id.generation && s.twin_of.is_some())
    }

    /// The IPv6 half of the dual-stack allocation `id`, if it has one.
    pub fn twin_id(&self, id: AllocationId) -> Option<AllocationId> {
        self.allocation(id)?
            .relayed6
            .map(|(twin, _)| self.id_of(twin))
    }

    /// Refresh (RFC 8656 §7.3).
    fn refresh(
        &mut self,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let index = match self.allocation_of(&from) {
            Ok(index) => index,
            Err(refusal) if msg.get(AttributeType::MOBILITY_TICKET).is_none() => {
                return Err(refusal);
            }
            Err(_) => self.move_to(msg, from)?,
        };
        let lifetime = self.granted_lifetime(msg);
        let ticket = self.ticket_of(self.allocation_ref(index)?.ticket);
        let alloc = self.allocation_mut(index)?;
        if let Some(Ok(Attribute::RequestedAddressFamily(f))) =
            msg.decode(AttributeType::REQUESTED_ADDRESS_FAMILY)
        {
            let v6 = alloc.relayed.is_ipv6();
            if (f == 0x02) != v6 && !(f == 0x02 && alloc.relayed6.is_some()) {
                return Err(Refusal::PeerAddressFamilyMismatch);
            }
        }
        if lifetime.is_zero() {
            self.free(index, End::Deleted);
        } else {
            alloc.expires = now + lifetime;
        }
        self.success(msg, auth, out, |enc| {
            enc.attribute(&Attribute::Lifetime(lifetime.as_secs() as u32))?;
            match ticket {
                Some(t) => enc.raw(AttributeType::MOBILITY_TICKET, &t),
                None => Ok(()),
            }
        })
    }

    /// The wire form of an allocation's ticket.
    fn ticket_of(&self, secret: Option<Secret>) -> Option<[u8; TICKET_LEN]> {
        secret.map(|secret| {
            Ticket {
                shard: self.shard,
                secret,
            }
            .encode()
        })
    }

    /// Moves the allocation a Refresh's (authenticated) ticket names to
    /// `from` (RFC 8016 §3.3): the old 5-tuple loses it, the source quota
    /// follows the client, and the ticket is replaced (each redeems once).
    fn move_to(&mut self, msg: &Message<'_>, from: ClientSocket) -> Result<u32, Refusal> {
        let index = self.ticket_slot(msg).ok_or(Refusal::UnknownTicket)?;
        let quota = self.config.source_quota;
        let alloc = self.allocation_ref(index)?;
        let (old, old_secret) = (alloc.client, alloc.ticket);
        self.ports
            .move_source(old.client.ip(), from.client.ip(), quota)?;
        let secret = self.new_ticket_secret();
        if let Some(s) = old_secret {
            self.tickets.remove(&s);
        }
        self.tickets.insert(secret, index);
        self.fast_path_end(index, old);
        let alloc = self.allocation_mut(index)?;
        alloc.client = from;
        alloc.ticket = Some(secret);
        let across = std::mem::take(&mut alloc.adopted);
        self.allocation_by_client.remove(&old);
        self.allocation_by_client.insert(from, index);
        self.stats.allocations_moved[usize::from(across)] += 1;
        self.fast_path_sync(index, None, self.clock);
        tracing::debug!(from = %old.client, to = %from.client, "allocation moved");
        Ok(index)
    }

    /// The slot of `from`'s allocation; 437 when it has none.
    fn allocation_of(&self, from: &ClientSocket) -> Result<u32, Refusal> {
        self.allocation_by_client
            .get(from)
            .copied()
            .ok_or(Refusal::NoAllocation)
    }

    /// The allocation in slot `index` (indexed, so it exists; a broken
    /// index answers 500 instead of panicking).
    fn allocation_ref(&self, index: u32) -> Result<&Allocation, Refusal> {
        self.slots[index as usize]
            .allocation
            .as_ref()
            .ok_or(Refusal::Internal)
    }

    fn allocation_mut(&mut self, index: u32) -> Result<&mut Allocation, Refusal> {
        self.slots[index as usize]
            .allocation
            .as_mut()
            .ok_or(Refusal::Internal)
    }

    /// The XOR-PEER-ADDRESS values of a request, checked against the
    /// allocation's family, the policy, and the session's peers when its
    /// token names them.
    fn check_peer(&self, peer: SocketAddr, index: u32) -> Result<(), Refusal> {
        let alloc = self.allocation_ref(index)?;
        if peer.is_ipv6() != alloc.relayed.is_ipv6()
            && !(peer.is_ipv6() && alloc.relayed6.is_some())
        {
            return Err(Refusal::PeerAddressFamilyMismatch);
        }
        if !self.policy.permits(peer.ip()) {
            return Err(Refusal::PeerDenied);
        }
        if let Some(allowed) = &alloc.allowed_peers
            && !allowed.contains(&peer.ip())
        {
            return Err(Refusal::PeerOutsideSession);
        }
        Ok(())
    }

    /// CreatePermission (RFC 8656 §9).
    fn create_permission(
        &mut self,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let index = self.allocation_of(&from)?;
        let mut count = 0;
        for raw in msg.attributes() {
            if raw.ty != AttributeType::XOR_PEER_ADDRESS {
                continue;
            }
            let Ok(Attribute::XorPeerAddress(peer)) =
                Attribute::decode(raw.ty, raw.value, &msg.transaction_id())
            else {
                return Err(Refusal::MissingPeer);
            };
            self.check_peer(peer, index)?;
            count += 1;
        }
        if count == 0 {
            return Err(Refusal::MissingPeer);
        }
        let alloc = self.slots[index as usize]
            .allocation
            .as_mut()
            .ok_or(Refusal::Internal)?;
        let mux = alloc.mux;
        for raw in msg.attributes() {
            if let Ok(Attribute::XorPeerAddress(peer)) =
                Attribute::decode(raw.ty, raw.value, &msg.transaction_id())
            {
                if !alloc.install_permission(peer.ip(), now + self.config.permission_lifetime) {
                    return Err(Refusal::PermissionsFull);
                }
                // Peer data from an address of this IP that nobody on the
                // shared socket claimed comes here.
                if let Some(m) = mux {
                    self.muxes[m as usize].permitted.insert(peer.ip(), index);
                }
            }
        }
        if self.config.fast_path {
            // A refreshed permission carries its channels longer.
            let ips: Vec<std::net::IpAddr> = msg
                .attributes()
                .filter_map(|raw| {
                    match Attribute::decode(raw.ty, raw.value, &msg.transaction_id()) {
                        Ok(Attribute::XorPeerAddress(p)) => Some(p.ip()),
                        _ => None,
                    }
                })
                .collect();
            for ip in ips {
                self.fast_path_sync(index, Some(ip), now);
            }
        }
        self.success(msg, auth, out, |_| Ok(()))
    }

    /// ChannelBind (RFC 8656 §12.2).
    fn channel_bind(
        &mut self,
        msg: &Message<'_>,
        auth: &Auth,
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let index = self.allocation_of(&from)?;
        let number = match msg.decode(AttributeType::CHANNEL_NUMBER) {
            // RFC 8656 narrows the range to 0x4000-0x4FFF; RFC 5766 clients
            // may use up to 0x7FFE, which ChannelData framing still carries.
            Some(Ok(Attribute::ChannelNumber(n))) if (0x4000..=0x7FFE).contains(&n) => n,
            _ => return Err(Refusal::BadChannelNumber),
        };
        let peer = match msg.decode(AttributeType::XOR_PEER_ADDRESS) {
            Some(Ok(Attribute::XorPeerAddress(p))) => p,
            _ => return Err(Refusal::MissingPeer),
        };
        self.check_peer(peer, index)?;
        if !self.policy.permits_endpoint(peer) {
            return Err(Refusal::PeerDenied);
        }
        if self.allocation_ref(index)?.tcp {
            return Err(Refusal::NotUdpAllocation);
        }
        let mux = self.allocation_ref(index)?.mux;
        if let Some(m) = mux
            && self.muxes[m as usize].public.is_ipv6() == peer.is_ipv6()
            && self.claim_refused(m, index, peer, now)
        {
            return Err(Refusal::PeerClaimed);
        }
        let (permission, channel) = (
            now + self.config.permission_lifetime,
            now + self.config.channel_lifetime,
        );
        let alloc = self.allocation_mut(index)?;
        match alloc.bind_channel(number, peer, now, channel) {
            Ok(()) => {}
            Err(BindConflict::Full) => return Err(Refusal::ChannelsFull),
            Err(BindConflict::NumberInUse | BindConflict::PeerInUse) => {
                return Err(Refusal::ChannelConflict);
            }
        }
        if !alloc.install_permission(peer.ip(), permission) {
            return Err(Refusal::PermissionsFull);
        }
        if let Some(m) = mux {
            self.muxes[m as usize].permitted.insert(peer.ip(), index);
            self.claim_peer(index, peer, now);
        }
        self.fast_path_sync(index, Some(peer.ip()), now);
        self.success(msg, auth, out, |_| Ok(()))
    }

    /// Send indication (RFC 8656 §11.2): relayed when a permission exists,
    /// silently dropped otherwise.
    fn send_indication(
        &mut self,
        msg: &Message<'_>,
        packet: &[u8],
        from: ClientSocket,
        now: Instant,
    ) -> ClientAction {
        let Some(&index) = self.allocation_by_client.get(&from) else {
            return self.dropped(DropReason::NoAllocation);
        };
        let (Some(Ok(Attribute::XorPeerAddress(peer))), Some(data)) = (
            msg.decode(AttributeType::XOR_PEER_ADDRESS),
            msg.get(AttributeType::DATA),
        ) else {
            return self.dropped(DropReason::Malformed);
        };
        if !self.policy.permits_endpoint(peer) {
            return self.dropped(DropReason::OwnAddress);
        }
        let rate = self.config.bandwidth_per_allocation.unwrap_or(0) as f64;
        let Some(alloc) = self.slots[index as usize].allocation.as_mut() else {
            return self.dropped(DropReason::NoAllocation);
        };
        if alloc.tcp {
            return self.dropped(DropReason::TcpAllocation);
        }
        if !alloc.permits(peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        // On a shared socket the peer must be this allocation's to send to
        // (the claim needs the core, so the allocation is looked up again).
        let alloc = if alloc.mux.is_some() {
            if !self.claim_peer(index, peer, now) {
                return self.dropped(DropReason::PeerClaimed);
            }
            match self.slots[index as usize].allocation.as_mut() {
                Some(a) => a,
                None => return self.dropped(DropReason::NoAllocation),
            }
        } else {
            alloc
        };
        if !alloc.spend(data.len(), rate, now) {
            return self.dropped(DropReason::BandwidthExceeded);
        }
        alloc.usage.add(Direction::ClientToPeer, data.len());
        // DATA's value is a sub-slice of `packet`.
        let start = data.as_ptr() as usize - packet.as_ptr() as usize;
        self.stats.forwarded(Direction::ClientToPeer, data.len());
        ClientAction::ToPeer {
            allocation: self.sender_for(index, peer),
            peer,
            payload: start..start + data.len(),
        }
    }

    /// Handles a datagram a relay socket received from `peer`. The payload
    /// is `buf[payload]`, with [`PEER_HEADROOM`] bytes free before it and
    /// [`PEER_TAILROOM`] after; the framed message is built in place.
    pub fn handle_peer_input(
        &mut self,
        allocation: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
        now: Instant,
    ) -> Result<PeerAction, DropReason> {
        let result = self.peer_input(allocation, peer, buf, payload, now);
        if let Err(reason) = result {
            self.stats.drop(reason);
        }
        result
    }

    fn peer_input(
        &mut self,
        id: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
        now: Instant,
    ) -> Result<PeerAction, DropReason> {
        if payload.start < PEER_HEADROOM || payload.end + PEER_TAILROOM > buf.len() {
            return Err(DropReason::Malformed);
        }
        let rate = self.config.bandwidth_per_allocation.unwrap_or(0) as f64;
        let slot = self
            .slots
            .get(id.index())
            .filter(|s| s.generation == id.generation)
            .ok_or(DropReason::StaleAllocation)?;
        // Peers reach the client only through an IPv4-mapped-normalised
        // permission: a dual-stack socket reports v4 peers as ::ffff:a.b.c.d.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let index = match (slot.twin_of, slot.mux) {
            // A datagram on a dual-stack allocation's IPv6 socket.
            (Some(p), _) => p as usize,
            // On a shared socket: whoever the peer belongs to.
            (None, Some(m)) => self
                .mux_owner(m, peer, now)
                .ok_or(DropReason::NoPermission)? as usize,
            (None, None) => id.index(),
        };
        let alloc = self.slots[index]
            .allocation
            .as_mut()
            .ok_or(DropReason::StaleAllocation)?;
        if !alloc.permits(peer.ip(), now) {
            return Err(DropReason::NoPermission);
        }
        let len = payload.len();
        if !alloc.spend(len, rate, now) {
            return Err(DropReason::BandwidthExceeded);
        }
        alloc.usage.add(Direction::PeerToClient, len);
        let client = alloc.client;
        let stream = client.transport.is_stream();
        let channel = alloc.channel_to(peer, now).map(|c| c.number);
        let frame = match channel {
            Some(number) => {
                let start = payload.start - 4;
                buf[start..start + 2].copy_from_slice(&number.to_be_bytes());
                buf[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
                let mut end = payload.end;
                if stream {
                    let padded = (len + 3) & !3;
                    buf[end..payload.start + padded].fill(0);
                    end = payload.start + padded;
                }
                start..end
            }
            None => {
                let tid = TransactionId(self.random_tid());
                let mut head = [0u8; PEER_HEADROOM];
                let ty = MessageType::new(Method::DATA, Class::Indication);
                let head_len = (|| {
                    let mut enc = Encoder::new(&mut head, ty, &tid)?;
                    enc.attribute(&Attribute::XorPeerAddress(peer))?;
                    Ok::<_, EncodeError>(enc.finish())
                })()
                .map_err(|_| DropReason::Malformed)?;
                let padded = (len + 3) & !3;
                let total = head_len + 4 + padded;
                let body = u16::try_from(total - 20).map_err(|_| DropReason::TooLarge)?;
                head[2..4].copy_from_slice(&body.to_be_bytes());
                let start = payload.start - head_len - 4;
                buf[start..start + head_len].copy_from_slice(&head[..head_len]);
                let at = start + head_len;
                buf[at..at + 2].copy_from_slice(&AttributeType::DATA.0.to_be_bytes());
                buf[at + 2..at + 4].copy_from_slice(&(len as u16).to_be_bytes());
                buf[payload.end..payload.start + padded].fill(0);
                start..payload.start + padded
            }
        };
        self.stats.forwarded(Direction::PeerToClient, len);
        Ok(PeerAction { client, frame })
    }

    fn random_tid(&mut self) -> [u8; 12] {
        let a = self.next_random().to_le_bytes();
        let b = self.next_random().to_le_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        t
    }

    // ---------------------------------------------------------------- timers

    /// Expires allocations, permissions, channels and reservations.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        for index in 0..self.slots.len() {
            let Some(alloc) = self.slots[index].allocation.as_mut() else {
                continue;
            };
            if alloc.expires <= now {
                self.free(index as u32, End::Expired);
            } else {
                if let Some(m) = alloc.mux {
                    // Expiring permissions stop pointing peers here.
                    let mux = &mut self.muxes[m as usize];
                    for p in alloc.permissions.iter().filter(|p| p.expires <= now) {
                        if mux.permitted.get(&p.ip) == Some(&(index as u32)) {
                            mux.permitted.remove(&p.ip);
                        }
                    }
                }
                alloc.sweep(now);
            }
        }
        self.sweep_tcp(now);
        self.ports.sweep(now);
        self.limiter.sweep(now);
        while let Some(&(port, until)) = self.parked.front() {
            if until > now {
                break;
            }
            self.parked.pop_front();
            self.ports.put(port);
        }
    }

    /// Keeps `port` (held by another process) out of the pool for a while.
    fn park(&mut self, port: u16, now: Instant) {
        if self.parked.len() >= MAX_PARKED
            && let Some((oldest, _)) = self.parked.pop_front()
        {
            self.ports.put(oldest);
        }
        self.parked.push_back((port, now + PARK_FOR));
    }

    /// A TCP or TLS client's connection closed: its allocation ends with it
    /// (RFC 8656 §3.1, the allocation lives as long as its 5-tuple).
    ///
    /// An allocation with a mobility ticket outlives its connection (RFC
    /// 8016 §3.3): its client may come back on a new one and move it there,
    /// until its lifetime runs out.
    pub fn handle_client_disconnected(&mut self, client: ClientSocket) {
        if let Some(&index) = self.allocation_by_client.get(&client) {
            if self.slots[index as usize]
                .allocation
                .as_ref()
                .is_some_and(|a| a.ticket.is_some())
            {
                return;
            }
            self.free(index, End::Disconnected);
        }
    }

    /// The usage record of `alloc`, ending now for `end`.
    fn usage_record(&self, alloc: &Allocation, end: &'static str) -> UsageRecord {
        UsageRecord {
            relayed: alloc.relayed,
            relayed_v6: alloc.relayed6.map(|(_, r)| r),
            client: alloc.client,
            username: alloc.username.clone(),
            usage: alloc.usage,
            ended_unix: self.epoch_unix + self.secs(self.clock),
            end,
            tcp: alloc.tcp,
        }
    }

    /// Usage records (`end`: `shutdown`) of every allocation alive now, as
    /// [`Command::Usage`]: the relay is stopping and they end with it.
    pub fn record_live_usage(&mut self, now: Instant) {
        if !self.config.usage {
            return;
        }
        self.clock = self.clock.max(now);
        let records: Vec<UsageRecord> = self
            .slots
            .iter()
            .filter_map(|s| s.allocation.as_ref())
            .map(|a| self.usage_record(a, "shutdown"))
            .collect();
        for r in records {
            self.commands.push_back(Command::Usage(Box::new(r)));
        }
    }

    /// Ends the allocation in slot `index`.
    fn free(&mut self, index: u32, end: End) {
        if let Some(client) = self.slots[index as usize]
            .allocation
            .as_ref()
            .map(|a| a.client)
        {
            self.fast_path_end(index, client);
        }
        let slot = &mut self.slots[index as usize];
        let Some(alloc) = slot.allocation.take() else {
            return;
        };
        let id = AllocationId {
            index,
            generation: slot.generation,
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free_slots.push(index);
        self.allocation_by_client.remove(&alloc.client);
        if let Some(secret) = alloc.ticket {
            self.tickets.remove(&secret);
        }
        self.ports
            .uncount(&self.claim(&alloc.username, alloc.client.client.ip()));
        match alloc.mux {
            None => {
                self.ports.put(alloc.relayed.port());
                self.commands.push_back(Command::CloseRelay {
                    allocation: id,
                    relayed: alloc.relayed,
                });
            }
            Some(m) => self.leave_mux(m, index, &alloc.username, &alloc.claims, &alloc.permissions),
        }
        self.free_twin(alloc.relayed6);
        if alloc.tcp {
            self.stats.tcp_allocations -= 1;
            self.close_connections(&alloc.connections);
        }
        if self.config.usage {
            let record = self.usage_record(&alloc, end.label());
            self.commands.push_back(Command::Usage(Box::new(record)));
        }
        match end {
            End::Expired => self.stats.allocations_expired += 1,
            End::Deleted => self.stats.allocations_deleted += 1,
            End::Disconnected => self.stats.allocations_disconnected += 1,
            End::Killed => self.stats.allocations_deleted += 1,
        }
        self.stats.allocations = self.allocation_by_client.len() as u64;
    }
}

/// One allocation as it moves to another process (a binary upgrade): what
/// it needs to go on, times as offsets from the moment it was exported.
#[derive(Clone, Debug, PartialEq)]
pub struct MovedAllocation {
    /// Its slot and the slot's generation (its [`AllocationId`], which the
    /// shell's relay socket is tagged with).
    pub slot: u32,
    /// The slot's generation.
    pub generation: u32,
    /// The client's 5-tuple.
    pub client: ClientSocket,
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// A dual-stack allocation's IPv6 half: its slot, the slot's
    /// generation (its socket's id) and its relayed address.
    pub relayed6: Option<(u32, u32, SocketAddr)>,
    /// The TURN username.
    pub username: String,
    /// The long-term key its requests are signed with.
    pub key: Vec<u8>,
    /// The Allocate that created it.
    pub created_by: [u8; 12],
    /// Lifetime left.
    pub expires_in: Duration,
    /// Permissions: peer IP and lifetime left.
    pub permissions: Vec<(IpAddr, Duration)>,
    /// Channels: number, peer, and milliseconds left (negative: expired
    /// and cooling down).
    pub channels: Vec<(u16, SocketAddr, i64)>,
    /// Bandwidth tokens left, when the relay caps bandwidth.
    pub bandwidth_tokens: Option<f64>,
    /// Its mobility ticket's secret, when it has one.
    pub ticket: Option<[u8; SECRET_LEN]>,
    /// What it relayed so far (its usage record goes on).
    pub usage: Usage,
    /// On a shared relayed socket: that socket's slot and the slot's
    /// generation (its id); `relayed` is the socket's address.
    pub shared: Option<(u32, u32)>,
    /// The peer transport addresses it holds on its shared socket.
    pub claims: Vec<SocketAddr>,
}

/// What a core hands to its successor: the seed (so the nonces it issued
/// stay valid) and its allocations (those over TCP and TLS move with their
/// connections, which the shell hands over).
#[derive(Clone, Debug, PartialEq)]
pub struct Moved {
    /// The core's seed.
    pub seed: [u8; 32],
    /// Its allocations.
    pub allocations: Vec<MovedAllocation>,
}

/// Milliseconds from `now` to `t` (negative when `t` has passed).
fn offset_ms(t: Instant, now: Instant) -> i64 {
    match t.checked_duration_since(now) {
        Some(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        None => -i64::try_from(now.duration_since(t).as_millis()).unwrap_or(i64::MAX),
    }
}

/// `now` moved by `ms` (either way).
fn at_offset(now: Instant, ms: i64) -> Instant {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

impl Server {
    /// This core's allocations and its seed, for a successor process
    /// ([`Server::import`]); the core itself is left as it was. A TCP or
    /// TLS allocation moves only with its connection: the shell leaves out
    /// those whose connection it cannot hand over.
    pub fn export(&self, now: Instant) -> Moved {
        let allocations = (0..self.slots.len() as u32)
            .filter_map(|slot| self.moved_of(slot, now))
            .collect();
        Moved {
            seed: self.seed,
            allocations,
        }
    }

    /// The allocation in `slot` as it moves.
    fn moved_of(&self, slot: u32, now: Instant) -> Option<MovedAllocation> {
        let s = &self.slots[slot as usize];
        // A TCP allocation's connections cannot be handed over: it ends
        // with its process.
        let a = s.allocation.as_ref().filter(|a| !a.tcp)?;
        let shared = match a.mux {
            None => None,
            Some(m) => {
                let socket = self.muxes[m as usize].slot?;
                Some((socket, self.slots[socket as usize].generation))
            }
        };
        Some(MovedAllocation {
            slot,
            generation: s.generation,
            client: a.client,
            relayed: a.relayed,
            relayed6: a
                .relayed6
                .map(|(t, addr)| (t, self.slots[t as usize].generation, addr)),
            username: a.username.to_string(),
            key: a.key.raw()?.to_vec(),
            created_by: a.created_by.0,
            expires_in: a.expires.saturating_duration_since(now),
            permissions: a
                .permissions
                .iter()
                .map(|p| (p.ip, p.expires.saturating_duration_since(now)))
                .collect(),
            channels: a
                .channels
                .iter()
                .map(|c| (c.number, c.peer, offset_ms(c.expires, now)))
                .collect(),
            bandwidth_tokens: a.bandwidth.map(|b| b.tokens),
            ticket: a.ticket,
            usage: a.usage,
            shared,
            claims: a.claims.clone(),
        })
    }

    /// A moved allocation as this core holds it.
    fn allocation_from(&self, m: &MovedAllocation, now: Instant) -> Allocation {
        let bandwidth = self.config.bandwidth_per_allocation.map(|rate| Bandwidth {
            tokens: m.bandwidth_tokens.unwrap_or(rate as f64),
            updated: now,
        });
        Allocation {
            client: m.client,
            relayed: m.relayed,
            relayed6: None,
            username: m.username.as_str().into(),
            key: IntegrityKey::new(&m.key),
            created_by: TransactionId(m.created_by),
            expires: now + m.expires_in,
            permissions: m
                .permissions
                .iter()
                .map(|&(ip, left)| Permission {
                    ip,
                    expires: now + left,
                })
                .collect(),
            channels: m
                .channels
                .iter()
                .map(|&(number, peer, ms)| Channel {
                    number,
                    peer,
                    expires: at_offset(now, ms),
                })
                .collect(),
            bandwidth,
            allowed_peers: super::auth::session_peers(&m.username),
            ticket: m.ticket,
            adopted: false,
            usage: m.usage,
            mux: None,
            claims: Vec::new(),
            tcp: false,
            connections: Vec::new(),
        }
    }

    /// Takes over allocations a predecessor exported, each in its slot, its
    /// relayed port taken and its quotas counted host-wide. Build this core
    /// with the predecessor's seed. Returns the ids of the allocations
    /// taken; one whose slot is in use or whose port is not free here (a
    /// different port range) is left out, and the shell closes its socket.
    pub fn import(&mut self, moved: &Moved, now: Instant) -> Vec<AllocationId> {
        let mut taken = Vec::new();
        for m in &moved.allocations {
            let index = m.slot as usize;
            if self.slots.len() <= index {
                self.slots.resize_with(index + 1, Slot::default);
            }
            if self.slots[index].allocation.is_some()
                || self.slots[index].mux.is_some()
                || self.allocation_by_client.contains_key(&m.client)
            {
                continue;
            }
            let claim = self.claim(&m.username, m.client.client.ip());
            let mut allocation = self.allocation_from(m, now);
            if let Some((socket, generation)) = m.shared {
                // On a shared socket: this core's shared socket at that
                // address, in the slot it had (its handed-over socket is
                // tagged with it).
                let Some(mux) = self.adopt_mux(m.relayed, socket, generation, index) else {
                    continue;
                };
                self.ports.adopt_shared(&claim);
                allocation.mux = Some(mux);
                allocation.claims = m.claims.clone();
                let x = &mut self.muxes[mux as usize];
                x.members += 1;
                if let Some((session, _)) = natrix_model::SessionToken::session_of(&m.username) {
                    *x.sessions.entry(session.into()).or_insert(0) += 1;
                }
                for peer in &allocation.claims {
                    x.peers.insert(*peer, m.slot);
                }
                for p in &allocation.permissions {
                    x.permitted.insert(p.ip, m.slot);
                }
                self.stats.multiplexed_allocations += 1;
            } else if !self.ports.adopt(m.relayed.port(), &claim) {
                continue;
            }
            if let Some((t, generation, addr)) = m.relayed6.filter(|_| m.shared.is_none()) {
                let t_index = t as usize;
                if self.slots.len() <= t_index {
                    self.slots.resize_with(t_index + 1, Slot::default);
                }
                let free = self.slots[t_index].allocation.is_none()
                    && self.slots[t_index].twin_of.is_none()
                    && self.slots[t_index].mux.is_none();
                // Without its slot or port here the IPv6 half ends (its
                // socket is not taken); the IPv4 one goes on.
                if t_index != index && free && self.ports.take_exact(addr.port()) {
                    self.slots[t_index] = Slot {
                        generation,
                        allocation: None,
                        twin_of: Some(m.slot),
                        mux: None,
                    };
                    allocation.relayed6 = Some((t, addr));
                    self.stats.dual_stack_allocations += 1;
                }
            }
            self.slots[index] = Slot {
                generation: m.generation,
                allocation: Some(allocation),
                twin_of: None,
                mux: None,
            };
            if let Some(secret) = m.ticket {
                self.tickets.insert(secret, m.slot);
            }
            self.allocation_by_client.insert(m.client, m.slot);
            taken.push(self.id_of(m.slot));
        }
        let used: std::collections::HashSet<u32> = taken.iter().map(|id| id.index).collect();
        self.free_slots = (0..self.slots.len() as u32)
            .rev()
            .filter(|i| {
                let s = &self.slots[*i as usize];
                s.allocation.is_none()
                    && s.twin_of.is_none()
                    && s.mux.is_none()
                    && !used.contains(i)
            })
            .collect();
        self.stats.allocations = self.allocation_by_client.len() as u64;
        // A successor's fast path starts empty: its channels go on it.
        for id in &taken {
            self.fast_path_sync(id.index, None, now);
        }
        taken
    }

    // ------------------------------------------------ mobility across loops

    /// Gives up the allocation a Refresh's mobility ticket names, for the
    /// core (loop) the client's new 5-tuple reaches ([`ClientAction::Move`]).
    /// Only a request signed with the allocation's own key takes it (a
    /// ticket seen on the wire is not enough). Its relayed port and quotas
    /// stay counted (the allocation lives on); the shell moves the relay
    /// socket of the returned id along. `None`: no such ticket here, or a
    /// bad signature (the asking core refuses the request).
    pub fn take_moving(
        &mut self,
        packet: &[u8],
        now: Instant,
    ) -> Option<(AllocationId, Option<AllocationId>, MovedAllocation)> {
        let msg = Message::parse(packet).ok()?;
        if msg.method() != Method::REFRESH || msg.class() != Class::Request {
            return None;
        }
        let index = self.ticket_slot(&msg)?;
        // One on a shared socket stays: the socket is this loop's.
        let alloc = self.slots[index as usize]
            .allocation
            .as_ref()
            .filter(|a| a.mux.is_none() && !a.tcp)?;
        let username = match msg.decode(AttributeType::USERNAME) {
            Some(Ok(Attribute::Username(u))) => u,
            _ => return None,
        };
        if *alloc.username != *username || msg.verify_any_integrity(&alloc.key).is_err() {
            self.stats.auth_failure(AuthFailureReason::BadIntegrity);
            return None;
        }
        let moved = self.moved_of(index, now)?;
        let id = self.id_of(index);
        let slot = &mut self.slots[index as usize];
        let alloc = slot.allocation.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free_slots.push(index);
        self.allocation_by_client.remove(&alloc.client);
        if let Some(secret) = alloc.ticket {
            self.tickets.remove(&secret);
        }
        // The IPv6 half moves too: its slot is freed here, its socket and
        // port go along.
        let twin = alloc.relayed6.map(|(t, _)| {
            let twin = self.id_of(t);
            let s = &mut self.slots[t as usize];
            s.generation = s.generation.wrapping_add(1);
            s.twin_of = None;
            self.free_slots.push(t);
            self.stats.dual_stack_allocations = self.stats.dual_stack_allocations.saturating_sub(1);
            twin
        });
        self.stats.allocations = self.allocation_by_client.len() as u64;
        Some((id, twin, moved))
    }

    /// Takes an allocation another core of this host gave up
    /// ([`Server::take_moving`]) into a free slot, under its old 5-tuple
    /// until the Refresh that asked for it (handled next, as any input)
    /// moves it. Its port and quotas are counted already. `None` when its
    /// 5-tuple has an allocation here (it cannot: a 5-tuple reaches one
    /// loop); the allocation then ends.
    pub fn adopt_moving(&mut self, m: &MovedAllocation, now: Instant) -> Option<AllocationId> {
        if self.allocation_by_client.contains_key(&m.client) {
            self.drop_moved(m);
            return None;
        }
        let mut allocation = self.allocation_from(m, now);
        allocation.adopted = true;
        let index = self.take_slot();
        self.slots[index as usize].allocation = Some(allocation);
        if let Some((_, _, addr)) = m.relayed6 {
            let twin = self.take_slot();
            self.slots[twin as usize].twin_of = Some(index);
            if let Some(a) = self.slots[index as usize].allocation.as_mut() {
                a.relayed6 = Some((twin, addr));
            }
            self.stats.dual_stack_allocations += 1;
        }
        if let Some(secret) = m.ticket {
            self.tickets.insert(secret, index);
        }
        self.allocation_by_client.insert(m.client, index);
        self.stats.allocations = self.allocation_by_client.len() as u64;
        Some(self.id_of(index))
    }

    /// Ends a moved allocation no core took: its port goes back to the
    /// pool and its quotas are uncounted.
    pub fn drop_moved(&mut self, m: &MovedAllocation) {
        self.ports
            .uncount(&self.claim(&m.username, m.client.client.ip()));
        self.ports.put(m.relayed.port());
        if let Some((_, _, addr)) = m.relayed6 {
            self.ports.put(addr.port());
        }
        self.stats.allocations_deleted += 1;
    }

    /// Ends allocation `id` now (the shell cannot serve it); its relay
    /// socket is closed by the command that follows.
    pub fn end(&mut self, id: AllocationId) {
        if self
            .slots
            .get(id.index())
            .is_some_and(|s| s.generation == id.generation)
        {
            self.free(id.index, End::Deleted);
        }
    }

    /// Answers a Refresh whose ticket no core could redeem (400, unsigned,
    /// rate-limited like any unauthenticated answer).
    pub fn refuse_move(
        &mut self,
        packet: &[u8],
        from: ClientSocket,
        now: Instant,
        out: &mut [u8],
    ) -> ClientAction {
        let Ok(msg) = Message::parse(packet) else {
            return self.dropped(DropReason::Malformed);
        };
        self.refused(Refusal::UnknownTicket, RequestMethod::Refresh, from);
        let code = Refusal::UnknownTicket.code();
        match self.unauthenticated_error(&msg, code, from, now, out) {
            (Some(Ok(len)), code) => {
                self.stats
                    .request(RequestMethod::Refresh, RequestResult(code));
                ClientAction::Reply(len)
            }
            (Some(Err(_)), _) => self.dropped(DropReason::Malformed),
            (None, _) => self.dropped(DropReason::RateLimited),
        }
    }
}

/// Attributes a TURN request may carry that this relay understands (any
/// comprehension-required type outside this set gets 420).
fn understood(ty: AttributeType) -> bool {
    matches!(
        ty,
        AttributeType::USERNAME
            | AttributeType::MESSAGE_INTEGRITY
            | AttributeType::MESSAGE_INTEGRITY_SHA256
            | AttributeType::REALM
            | AttributeType::NONCE
            | AttributeType::LIFETIME
            | AttributeType::REQUESTED_TRANSPORT
            | AttributeType::DONT_FRAGMENT
            | AttributeType::RESERVATION_TOKEN
            | AttributeType::EVEN_PORT
            | AttributeType::REQUESTED_ADDRESS_FAMILY
            | AttributeType::XOR_PEER_ADDRESS
            | AttributeType::CHANNEL_NUMBER
            | AttributeType::DATA
            | AttributeType::PRIORITY
            | AttributeType::USE_CANDIDATE
            | AttributeType::CONNECTION_ID
    )
}

fn unreachable_answer() -> Result<usize, Refusal> {
    // Binding and unknown methods are answered before authentication.
    Err(Refusal::Internal)
}

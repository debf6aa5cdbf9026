//! The CDX client: RFC 5780 NAT behaviour discovery (§4.3 mapping, §4.4
//! filtering, hairpinning) against any RFC 5780 STUN server, producing a
//! [`NatProfile`]. Blocking and self-contained (one UDP socket), so tools
//! and applications can call it from any thread.
//!
//! Timing follows RFC 8489 §6.2.1 retransmission with a short initial RTO:
//! tests that expect an answer retransmit until one arrives; tests whose
//! verdict is "no answer" (filtering) give up after [`NO_ANSWER_WAIT`], so a
//! whole discovery stays well under two seconds.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use natrix_wire::{
    Attribute, AttributeType, ChangeRequest, Class, Encoder, Message, MessageType, Method,
    TransactionId,
};

/// First retransmission timeout.
const INITIAL_RTO: Duration = Duration::from_millis(100);
/// How long a test waits before concluding "no answer".
pub const NO_ANSWER_WAIT: Duration = Duration::from_millis(500);

/// Mapping behaviour (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// No NAT: the mapped address is the local address.
    NoNat,
    /// Endpoint-independent mapping.
    EndpointIndependent,
    /// Address-dependent mapping.
    AddressDependent,
    /// Address- and port-dependent mapping.
    AddressAndPortDependent,
}

/// Filtering behaviour (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtering {
    /// Endpoint-independent filtering.
    EndpointIndependent,
    /// Address-dependent filtering.
    AddressDependent,
    /// Address- and port-dependent filtering.
    AddressAndPortDependent,
}

/// The classic class names, for humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatClass {
    /// No NAT and no filtering.
    Open,
    /// EIM + EIF.
    FullCone,
    /// EIM + ADF.
    RestrictedCone,
    /// EIM + APDF.
    PortRestrictedCone,
    /// ADM or APDM.
    Symmetric,
    /// No UDP answer at all.
    UdpBlocked,
}

impl NatClass {
    /// The name used in JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            NatClass::Open => "open",
            NatClass::FullCone => "full-cone",
            NatClass::RestrictedCone => "restricted-cone",
            NatClass::PortRestrictedCone => "port-restricted-cone",
            NatClass::Symmetric => "symmetric",
            NatClass::UdpBlocked => "udp-blocked",
        }
    }
}

impl Mapping {
    /// JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            Mapping::NoNat => "no-nat",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

impl Filtering {
    /// JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// What discovery found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatProfile {
    /// The local address the tests ran from.
    pub local: SocketAddr,
    /// The public (mapped) address; `None` when UDP is blocked.
    pub mapped: Option<SocketAddr>,
    /// Mapping behaviour; `None` when the server does not support RFC 5780
    /// (no OTHER-ADDRESS) and there is a NAT.
    pub mapping: Option<Mapping>,
    /// Filtering behaviour; `None` when the server does not support RFC 5780.
    pub filtering: Option<Filtering>,
    /// Whether a packet to our own mapped address came back; `None` when not
    /// tested.
    pub hairpinning: Option<bool>,
    /// The server's alternate address (OTHER-ADDRESS), if any.
    pub other: Option<SocketAddr>,
}

impl NatProfile {
    /// The classic class, where the behaviours determine one.
    pub fn class(&self) -> Option<NatClass> {
        if self.mapped.is_none() {
            return Some(NatClass::UdpBlocked);
        }
        Some(match (self.mapping?, self.filtering) {
            (Mapping::AddressDependent | Mapping::AddressAndPortDependent, _) => {
                NatClass::Symmetric
            }
            (Mapping::NoNat, Some(Filtering::EndpointIndependent) | None) => NatClass::Open,
            (_, Some(Filtering::EndpointIndependent)) => NatClass::FullCone,
            (_, Some(Filtering::AddressDependent)) => NatClass::RestrictedCone,
            (_, Some(Filtering::AddressAndPortDependent)) => NatClass::PortRestrictedCone,
            (Mapping::EndpointIndependent, None) => return None,
        })
    }
}

/// Why discovery could not run.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The local socket could not be set up.
    #[error("local socket: {0}")]
    Socket(#[from] std::io::Error),
    /// A request could not be encoded (a bug, not the network).
    #[error("encoding a request: {0}")]
    Encode(#[from] natrix_wire::EncodeError),
}

/// One Binding answer.
#[derive(Clone, Copy, Debug)]
struct Answer {
    mapped: SocketAddr,
    other: Option<SocketAddr>,
}

struct Prober {
    socket: UdpSocket,
}

impl Prober {
    fn request(
        tid: &TransactionId,
        change: Option<ChangeRequest>,
    ) -> Result<Vec<u8>, DiscoveryError> {
        let mut buf = vec![0u8; 128];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::BINDING, Class::Request),
            tid,
        )?;
        if let Some(c) = change {
            enc.attribute(&Attribute::ChangeRequest(c))?;
        }
        enc.fingerprint()?;
        let n = enc.finish();
        buf.truncate(n);
        Ok(buf)
    }

    /// Sends a Binding request to `to` (with `change`), retransmitting until
    /// an answer or `wait` passes. Answers from any source count (a change
    /// request is answered from another address).
    fn transact(
        &self,
        to: SocketAddr,
        change: Option<ChangeRequest>,
        wait: Duration,
    ) -> Result<Option<Answer>, DiscoveryError> {
        let tid = TransactionId(rand::random());
        let req = Self::request(&tid, change)?;
        let deadline = Instant::now() + wait;
        let mut rto = INITIAL_RTO;
        let mut buf = [0u8; 1500];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // A send error (e.g. ICMP unreachable reported) means no answer.
            if self.socket.send_to(&req, to).is_err() {
                return Ok(None);
            }
            let until = (now + rto).min(deadline);
            rto *= 2;
            while let Some(left) = until
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            {
                self.socket.set_read_timeout(Some(left))?;
                let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                    break;
                };
                if let Some(answer) = parse_answer(&buf[..n], &tid) {
                    return Ok(Some(answer));
                }
            }
        }
    }

    /// True when a datagram sent to `mapped` comes back to this socket.
    fn hairpins(&self, mapped: SocketAddr) -> Result<bool, DiscoveryError> {
        let tid = TransactionId(rand::random());
        let req = Self::request(&tid, None)?;
        let deadline = Instant::now() + NO_ANSWER_WAIT;
        if self.socket.send_to(&req, mapped).is_err() {
            return Ok(false);
        }
        let mut buf = [0u8; 1500];
        while let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            self.socket.set_read_timeout(Some(left))?;
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                break;
            };
            if let Ok(msg) = Message::parse(&buf[..n])
                && msg.transaction_id() == tid
                && msg.class() == Class::Request
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn parse_answer(bytes: &[u8], tid: &TransactionId) -> Option<Answer> {
    let msg = Message::parse(bytes).ok()?;
    if msg.transaction_id() != *tid || msg.class() != Class::Success {
        return None;
    }
    let mapped = match msg
        .decode(AttributeType::XOR_MAPPED_ADDRESS)
        .or_else(|| msg.decode(AttributeType::MAPPED_ADDRESS))?
        .ok()?
    {
        Attribute::XorMappedAddress(a) | Attribute::MappedAddress(a) => a,
        _ => return None,
    };
    let other = match msg.decode(AttributeType::OTHER_ADDRESS) {
        Some(Ok(Attribute::OtherAddress(a))) => Some(a),
        _ => None,
    };
    Some(Answer { mapped, other })
}

/// Runs RFC 5780 discovery against `server` from a socket bound to `local`
/// (port 0 for any). Never fails for network reasons: a silent server
/// yields a profile with `mapped: None` (UDP blocked, or no server).
pub fn discover(server: SocketAddr, local: SocketAddr) -> Result<NatProfile, DiscoveryError> {
    let local_bind_ip = local.ip();
    let socket = UdpSocket::bind(local)?;
    // The address the tests run from, as the routing table picks it.
    let local = {
        let probe = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        let ip = match probe.connect(server).and_then(|()| probe.local_addr()) {
            Ok(a) => a.ip(),
            Err(_) => local.ip(),
        };
        SocketAddr::new(ip, socket.local_addr()?.port())
    };
    let p = Prober { socket };
    let first_prober = &p;
    let mut profile = NatProfile {
        local,
        mapped: None,
        mapping: None,
        filtering: None,
        hairpinning: None,
        other: None,
    };
    // Test I: are we behind a NAT, and does the server know an alternate?
    let Some(first) = p.transact(server, None, Duration::from_millis(1500))? else {
        return Ok(profile);
    };
    profile.mapped = Some(first.mapped);
    profile.other = first.other;
    let no_nat = first.mapped == local;
    if no_nat {
        profile.mapping = Some(Mapping::NoNat);
    }
    let Some(other) = first.other else {
        return Ok(profile);
    };

    // Mapping (RFC 5780 §4.3): to the alternate IP, then the alternate
    // IP and port.
    if !no_nat {
        let to_alt_ip = SocketAddr::new(other.ip(), server.port());
        let second = p.transact(to_alt_ip, None, Duration::from_millis(1000))?;
        profile.mapping = match second {
            Some(a) if a.mapped == first.mapped => Some(Mapping::EndpointIndependent),
            Some(a) => match p.transact(other, None, Duration::from_millis(1000))? {
                Some(b) if b.mapped == a.mapped => Some(Mapping::AddressDependent),
                Some(_) => Some(Mapping::AddressAndPortDependent),
                None => None,
            },
            None => None,
        };
    }

    // Filtering (RFC 5780 §4.4) on a fresh socket: the mapping tests above
    // contacted the alternate IP, which an address-dependent filter would
    // then let through. Answers from the other IP and port, then from the
    // other port only.
    let p = Prober {
        socket: UdpSocket::bind(SocketAddr::new(local_bind_ip, 0))?,
    };
    let both = ChangeRequest {
        change_ip: true,
        change_port: true,
    };
    let port_only = ChangeRequest {
        change_ip: false,
        change_port: true,
    };
    profile.filtering = Some(
        if p.transact(server, Some(both), NO_ANSWER_WAIT)?.is_some() {
            Filtering::EndpointIndependent
        } else if p
            .transact(server, Some(port_only), NO_ANSWER_WAIT)?
            .is_some()
        {
            Filtering::AddressDependent
        } else {
            Filtering::AddressAndPortDependent
        },
    );

    // Hairpinning: only meaningful behind a NAT.
    if !no_nat {
        profile.hairpinning = Some(first_prober.hairpins(first.mapped)?);
    }
    Ok(profile)
}

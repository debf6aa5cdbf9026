//! Attribute types and typed attribute values.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::{DecodeError, EncodeError};
use crate::types::{MAGIC_COOKIE, TransactionId};

/// A STUN attribute type (RFC 8489 §14). Types below 0x8000 are
/// comprehension-required: a receiver that does not understand one must reject
/// the request with 420 (Unknown Attribute).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttributeType(pub u16);

macro_rules! attribute_types {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $label:literal; )*) => {
        impl AttributeType {
            $( $(#[$doc])* pub const $name: AttributeType = AttributeType($value); )*

            /// Every attribute type this crate decodes, in numeric order of
            /// declaration.
            pub const KNOWN: &'static [AttributeType] = &[$(AttributeType::$name),*];

            /// The attribute's name as the RFCs spell it, or `None` for types
            /// this crate does not know.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($label), )*
                    _ => None,
                }
            }
        }
    };
}

attribute_types! {
    /// MAPPED-ADDRESS (RFC 8489 §14.1), for RFC 3489 clients.
    MAPPED_ADDRESS = 0x0001, "MAPPED-ADDRESS";
    /// CHANGE-REQUEST (RFC 5780 §7.2).
    CHANGE_REQUEST = 0x0003, "CHANGE-REQUEST";
    /// USERNAME (RFC 8489 §14.3).
    USERNAME = 0x0006, "USERNAME";
    /// MESSAGE-INTEGRITY, HMAC-SHA1 (RFC 8489 §14.5).
    MESSAGE_INTEGRITY = 0x0008, "MESSAGE-INTEGRITY";
    /// ERROR-CODE (RFC 8489 §14.8).
    ERROR_CODE = 0x0009, "ERROR-CODE";
    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.9).
    UNKNOWN_ATTRIBUTES = 0x000A, "UNKNOWN-ATTRIBUTES";
    /// CHANNEL-NUMBER (RFC 8656 §18.1).
    CHANNEL_NUMBER = 0x000C, "CHANNEL-NUMBER";
    /// LIFETIME in seconds (RFC 8656 §18.2).
    LIFETIME = 0x000D, "LIFETIME";
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    XOR_PEER_ADDRESS = 0x0012, "XOR-PEER-ADDRESS";
    /// DATA (RFC 8656 §18.4).
    DATA = 0x0013, "DATA";
    /// REALM (RFC 8489 §14.9).
    REALM = 0x0014, "REALM";
    /// NONCE (RFC 8489 §14.10).
    NONCE = 0x0015, "NONCE";
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    XOR_RELAYED_ADDRESS = 0x0016, "XOR-RELAYED-ADDRESS";
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
    REQUESTED_ADDRESS_FAMILY = 0x0017, "REQUESTED-ADDRESS-FAMILY";
    /// EVEN-PORT (RFC 8656 §18.7).
    EVEN_PORT = 0x0018, "EVEN-PORT";
    /// REQUESTED-TRANSPORT (RFC 8656 §18.8).
    REQUESTED_TRANSPORT = 0x0019, "REQUESTED-TRANSPORT";
    /// DONT-FRAGMENT (RFC 8656 §18.9).
    DONT_FRAGMENT = 0x001A, "DONT-FRAGMENT";
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6).
    MESSAGE_INTEGRITY_SHA256 = 0x001C, "MESSAGE-INTEGRITY-SHA256";
    /// PASSWORD-ALGORITHM (RFC 8489 §14.12).
    PASSWORD_ALGORITHM = 0x001D, "PASSWORD-ALGORITHM";
    /// USERHASH (RFC 8489 §14.4).
    USERHASH = 0x001E, "USERHASH";
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    XOR_MAPPED_ADDRESS = 0x0020, "XOR-MAPPED-ADDRESS";
    /// RESERVATION-TOKEN (RFC 8656 §18.10).
    RESERVATION_TOKEN = 0x0022, "RESERVATION-TOKEN";
    /// PRIORITY (RFC 8445 §16.1), sent by ICE agents in Binding requests.
    PRIORITY = 0x0024, "PRIORITY";
    /// USE-CANDIDATE (RFC 8445 §16.1).
    USE_CANDIDATE = 0x0025, "USE-CANDIDATE";
    /// PADDING (RFC 5780 §7.6).
    PADDING = 0x0026, "PADDING";
    /// RESPONSE-PORT (RFC 5780 §7.5).
    RESPONSE_PORT = 0x0027, "RESPONSE-PORT";
    /// CONNECTION-ID: a relayed TCP connection (RFC 6062 §6.2.1).
    CONNECTION_ID = 0x002A, "CONNECTION-ID";
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
    ADDITIONAL_ADDRESS_FAMILY = 0x8000, "ADDITIONAL-ADDRESS-FAMILY";
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    ADDRESS_ERROR_CODE = 0x8001, "ADDRESS-ERROR-CODE";
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
    PASSWORD_ALGORITHMS = 0x8002, "PASSWORD-ALGORITHMS";
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    ALTERNATE_DOMAIN = 0x8003, "ALTERNATE-DOMAIN";
    /// ICMP (RFC 8656 §18.13).
    ICMP = 0x8004, "ICMP";
    /// SOFTWARE (RFC 8489 §14.14).
    SOFTWARE = 0x8022, "SOFTWARE";
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    ALTERNATE_SERVER = 0x8023, "ALTERNATE-SERVER";
    /// FINGERPRINT (RFC 8489 §14.7).
    FINGERPRINT = 0x8028, "FINGERPRINT";
    /// ICE-CONTROLLED (RFC 8445 §16.1).
    ICE_CONTROLLED = 0x8029, "ICE-CONTROLLED";
    /// ICE-CONTROLLING (RFC 8445 §16.1).
    ICE_CONTROLLING = 0x802A, "ICE-CONTROLLING";
    /// RESPONSE-ORIGIN (RFC 5780 §7.3).
    RESPONSE_ORIGIN = 0x802B, "RESPONSE-ORIGIN";
    /// OTHER-ADDRESS (RFC 5780 §7.4).
    OTHER_ADDRESS = 0x802C, "OTHER-ADDRESS";
    /// MOBILITY-TICKET (RFC 8016 §3.1): empty in an Allocate that asks
    /// for mobility, the server's opaque ticket in its answers and in the
    /// Refresh that moves the allocation to a new 5-tuple.
    MOBILITY_TICKET = 0x8030, "MOBILITY-TICKET";
}

impl AttributeType {
    /// True for types in the comprehension-required range 0x0000..=0x7FFF
    /// (RFC 8489 §14).
    pub const fn is_comprehension_required(self) -> bool {
        self.0 < 0x8000
    }

    /// True when this crate can decode the type.
    pub const fn is_known(self) -> bool {
        self.name().is_some()
    }
}

impl fmt::Debug for AttributeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "0x{:04x}", self.0),
        }
    }
}

/// ERROR-CODE value (RFC 8489 §14.8): a code in 300..=699 and a reason phrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode<'a> {
    /// The numeric code, e.g. 401.
    pub code: u16,
    /// The reason phrase (UTF-8, at most 763 bytes).
    pub reason: &'a str,
}

impl ErrorCode<'static> {
    /// 300 Try Alternate (RFC 8489 §14.8).
    pub const TRY_ALTERNATE: ErrorCode<'static> = ErrorCode::standard(300);
    /// 400 Bad Request.
    pub const BAD_REQUEST: ErrorCode<'static> = ErrorCode::standard(400);
    /// 401 Unauthenticated.
    pub const UNAUTHENTICATED: ErrorCode<'static> = ErrorCode::standard(401);
    /// 403 Forbidden (RFC 8656).
    pub const FORBIDDEN: ErrorCode<'static> = ErrorCode::standard(403);
    /// 405 Mobility Forbidden (RFC 8016 §3.2).
    pub const MOBILITY_FORBIDDEN: ErrorCode<'static> = ErrorCode::standard(405);
    /// 420 Unknown Attribute.
    pub const UNKNOWN_ATTRIBUTE: ErrorCode<'static> = ErrorCode::standard(420);
    /// 437 Allocation Mismatch (RFC 8656).
    pub const ALLOCATION_MISMATCH: ErrorCode<'static> = ErrorCode::standard(437);
    /// 438 Stale Nonce.
    pub const STALE_NONCE: ErrorCode<'static> = ErrorCode::standard(438);
    /// 440 Address Family not Supported (RFC 8656).
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: ErrorCode<'static> = ErrorCode::standard(440);
    /// 441 Wrong Credentials (RFC 8656).
    pub const WRONG_CREDENTIALS: ErrorCode<'static> = ErrorCode::standard(441);
    /// 442 Unsupported Transport Protocol (RFC 8656).
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: ErrorCode<'static> = ErrorCode::standard(442);
    /// 446 Connection Already Exists (RFC 6062 §6.3).
    pub const CONNECTION_ALREADY_EXISTS: ErrorCode<'static> = ErrorCode::standard(446);
    /// 447 Connection Timeout or Failure (RFC 6062 §6.3).
    pub const CONNECTION_TIMEOUT_OR_FAILURE: ErrorCode<'static> = ErrorCode::standard(447);
    /// 443 Peer Address Family Mismatch (RFC 8656).
    pub const PEER_ADDRESS_FAMILY_MISMATCH: ErrorCode<'static> = ErrorCode::standard(443);
    /// 486 Allocation Quota Reached (RFC 8656).
    pub const ALLOCATION_QUOTA_REACHED: ErrorCode<'static> = ErrorCode::standard(486);
    /// 500 Server Error.
    pub const SERVER_ERROR: ErrorCode<'static> = ErrorCode::standard(500);
    /// 508 Insufficient Capacity (RFC 8656).
    pub const INSUFFICIENT_CAPACITY: ErrorCode<'static> = ErrorCode::standard(508);

    /// The code with the reason phrase the RFCs suggest.
    pub const fn standard(code: u16) -> ErrorCode<'static> {
        let reason = match code {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthenticated",
            403 => "Forbidden",
            405 => "Mobility Forbidden",
            420 => "Unknown Attribute",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            446 => "Connection Already Exists",
            447 => "Connection Timeout or Failure",
            486 => "Allocation Quota Reached",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "",
        };
        ErrorCode { code, reason }
    }
}

/// CHANGE-REQUEST flags (RFC 5780 §7.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeRequest {
    /// Flag A: answer from a different IP address.
    pub change_ip: bool,
    /// Flag B: answer from a different port.
    pub change_port: bool,
}

/// EVEN-PORT value (RFC 8656 §18.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvenPort {
    /// The R bit: also reserve the next-higher port.
    pub reserve_next: bool,
}

/// ICMP attribute value (RFC 8656 §18.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp {
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub code: u8,
    /// Error data (e.g. the MTU of a "fragmentation needed").
    pub data: u32,
}

/// PASSWORD-ALGORITHM value (RFC 8489 §14.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordAlgorithm<'a> {
    /// 0x0001 MD5, 0x0002 SHA-256.
    pub algorithm: u16,
    /// Algorithm parameters (empty for both defined algorithms).
    pub parameters: &'a [u8],
}

impl PasswordAlgorithm<'_> {
    /// MD5 (RFC 8489 §18.5.1.1).
    pub const MD5: u16 = 0x0001;
    /// SHA-256 (RFC 8489 §18.5.1.2).
    pub const SHA256: u16 = 0x0002;
}

/// UNKNOWN-ATTRIBUTES value (RFC 8489 §14.9): a list of 16-bit types.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UnknownAttributes<'a>(&'a [u8]);

impl<'a> UnknownAttributes<'a> {
    /// The listed attribute types.
    pub fn iter(&self) -> impl Iterator<Item = AttributeType> + 'a {
        self.0
            .chunks_exact(2)
            .map(|c| AttributeType(u16::from_be_bytes([c[0], c[1]])))
    }
}

impl fmt::Debug for UnknownAttributes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A decoded attribute. Values borrow from the message buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute<'a> {
    /// MAPPED-ADDRESS.
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS.
    XorMappedAddress(SocketAddr),
    /// USERNAME.
    Username(&'a str),
    /// MESSAGE-INTEGRITY (the 20-byte HMAC-SHA1).
    MessageIntegrity(&'a [u8]),
    /// ERROR-CODE.
    ErrorCode(ErrorCode<'a>),
    /// UNKNOWN-ATTRIBUTES.
    UnknownAttributes(UnknownAttributes<'a>),
    /// REALM.
    Realm(&'a str),
    /// NONCE.
    Nonce(&'a str),
    /// MESSAGE-INTEGRITY-SHA256 (16 to 32 bytes).
    MessageIntegritySha256(&'a [u8]),
    /// PASSWORD-ALGORITHM.
    PasswordAlgorithm(PasswordAlgorithm<'a>),
    /// USERHASH (32 bytes).
    Userhash(&'a [u8]),
    /// PASSWORD-ALGORITHMS (kept raw).
    PasswordAlgorithms(&'a [u8]),
    /// ALTERNATE-DOMAIN.
    AlternateDomain(&'a str),
    /// SOFTWARE.
    Software(&'a str),
    /// ALTERNATE-SERVER.
    AlternateServer(SocketAddr),
    /// FINGERPRINT (the CRC value as sent).
    Fingerprint(u32),
    /// CHANGE-REQUEST.
    ChangeRequest(ChangeRequest),
    /// PADDING.
    Padding(&'a [u8]),
    /// RESPONSE-PORT.
    ResponsePort(u16),
    /// RESPONSE-ORIGIN.
    ResponseOrigin(SocketAddr),
    /// OTHER-ADDRESS.
    OtherAddress(SocketAddr),
    /// CHANNEL-NUMBER.
    ChannelNumber(u16),
    /// LIFETIME, seconds.
    Lifetime(u32),
    /// CONNECTION-ID (RFC 6062), opaque to the client.
    ConnectionId(u32),
    /// XOR-PEER-ADDRESS.
    XorPeerAddress(SocketAddr),
    /// DATA.
    Data(&'a [u8]),
    /// XOR-RELAYED-ADDRESS.
    XorRelayedAddress(SocketAddr),
    /// REQUESTED-ADDRESS-FAMILY (0x01 IPv4, 0x02 IPv6).
    RequestedAddressFamily(u8),
    /// EVEN-PORT.
    EvenPort(EvenPort),
    /// REQUESTED-TRANSPORT (an IANA protocol number).
    RequestedTransport(u8),
    /// DONT-FRAGMENT.
    DontFragment,
    /// RESERVATION-TOKEN.
    ReservationToken([u8; 8]),
    /// ADDITIONAL-ADDRESS-FAMILY.
    AdditionalAddressFamily(u8),
    /// ADDRESS-ERROR-CODE: family and error.
    AddressErrorCode(u8, ErrorCode<'a>),
    /// ICMP.
    Icmp(Icmp),
    /// PRIORITY.
    Priority(u32),
    /// USE-CANDIDATE.
    UseCandidate,
    /// ICE-CONTROLLED tie breaker.
    IceControlled(u64),
    /// ICE-CONTROLLING tie breaker.
    IceControlling(u64),
    /// Any other type, kept raw.
    Other(AttributeType, &'a [u8]),
}

/// Address family codes used in address attributes (RFC 8489 §14.1).
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decodes a MAPPED-ADDRESS-style value (family, port, address).
pub fn decode_address(value: &[u8]) -> Option<SocketAddr> {
    let family = *value.get(1)?;
    let port = be16(value, 2)?;
    match (family, value.len()) {
        (FAMILY_IPV4, 8) => {
            let ip = Ipv4Addr::new(value[4], value[5], value[6], value[7]);
            Some(SocketAddr::new(IpAddr::V4(ip), port))
        }
        (FAMILY_IPV6, 20) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&value[4..20]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => None,
    }
}

/// Decodes an XOR-MAPPED-ADDRESS-style value (RFC 8489 §14.2).
pub fn decode_xor_address(value: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    let plain = decode_address(value)?;
    Some(xor_address(plain, tid))
}

/// XOR is its own inverse: the same function obfuscates and recovers.
fn xor_address(addr: SocketAddr, tid: &TransactionId) -> SocketAddr {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            let x = [
                o[0] ^ cookie[0],
                o[1] ^ cookie[1],
                o[2] ^ cookie[2],
                o[3] ^ cookie[3],
            ];
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port)
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            for (i, b) in o.iter_mut().enumerate() {
                *b ^= if i < 4 { cookie[i] } else { tid.0[i - 4] };
            }
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)
        }
    }
}

fn address_len(addr: &SocketAddr) -> usize {
    if addr.is_ipv4() { 8 } else { 20 }
}

fn write_address(dst: &mut [u8], addr: &SocketAddr) {
    dst[0] = 0;
    dst[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            dst[1] = FAMILY_IPV4;
            dst[4..8].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            dst[1] = FAMILY_IPV6;
            dst[4..20].copy_from_slice(&ip.octets());
        }
    }
}

fn utf8(value: &[u8], ty: AttributeType) -> Result<&str, DecodeError> {
    std::str::from_utf8(value).map_err(|_| DecodeError::BadAttribute(ty.0))
}

fn decode_error_code(value: &[u8], ty: AttributeType) -> Result<ErrorCode<'_>, DecodeError> {
    let bad = DecodeError::BadAttribute(ty.0);
    if value.len() < 4 {
        return Err(bad);
    }
    let class = u16::from(value[2] & 0x07);
    let number = u16::from(value[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(bad);
    }
    let reason = utf8(&value[4..], ty)?;
    Ok(ErrorCode {
        code: class * 100 + number,
        reason,
    })
}

fn write_error_code(dst: &mut [u8], code: u16, reason: &str) {
    dst[0] = 0;
    dst[1] = 0;
    dst[2] = (code / 100) as u8;
    dst[3] = (code % 100) as u8;
    dst[4..4 + reason.len()].copy_from_slice(reason.as_bytes());
}

impl<'a> Attribute<'a> {
    /// Decodes one attribute value. `tid` is needed for the XOR-ed address
    /// attributes. Unknown types come back as [`Attribute::Other`].
    pub fn decode(
        ty: AttributeType,
        value: &'a [u8],
        tid: &TransactionId,
    ) -> Result<Attribute<'a>, DecodeError> {
        let bad = DecodeError::BadAttribute(ty.0);
        let fixed = |n: usize| if value.len() == n { Ok(()) } else { Err(bad) };
        let addr = || decode_address(value).ok_or(bad);
        let xaddr = || decode_xor_address(value, tid).ok_or(bad);
        let u32v = || {
            fixed(4)?;
            be32(value, 0).ok_or(bad)
        };
        let u64v = || {
            fixed(8)?;
            let mut b = [0u8; 8];
            b.copy_from_slice(value);
            Ok(u64::from_be_bytes(b))
        };
        Ok(match ty {
            AttributeType::MAPPED_ADDRESS => Attribute::MappedAddress(addr()?),
            AttributeType::XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(xaddr()?),
            AttributeType::USERNAME => Attribute::Username(utf8(value, ty)?),
            AttributeType::MESSAGE_INTEGRITY => {
                fixed(20)?;
                Attribute::MessageIntegrity(value)
            }
            AttributeType::ERROR_CODE => Attribute::ErrorCode(decode_error_code(value, ty)?),
            AttributeType::UNKNOWN_ATTRIBUTES => {
                if !value.len().is_multiple_of(2) {
                    return Err(bad);
                }
                Attribute::UnknownAttributes(UnknownAttributes(value))
            }
            AttributeType::REALM => Attribute::Realm(utf8(value, ty)?),
            AttributeType::NONCE => Attribute::Nonce(utf8(value, ty)?),
            AttributeType::MESSAGE_INTEGRITY_SHA256 => {
                if !(16..=32).contains(&value.len()) || !value.len().is_multiple_of(4) {
                    return Err(bad);
                }
                Attribute::MessageIntegritySha256(value)
            }
            AttributeType::PASSWORD_ALGORITHM => {
                let algorithm = be16(value, 0).ok_or(bad)?;
                let len = usize::from(be16(value, 2).ok_or(bad)?);
                let parameters = value.get(4..4 + len).ok_or(bad)?;
                if value.len() != 4 + len {
                    return Err(bad);
                }
                Attribute::PasswordAlgorithm(PasswordAlgorithm {
                    algorithm,
                    parameters,
                })
            }
            AttributeType::USERHASH => {
                fixed(32)?;
                Attribute::Userhash(value)
            }
            AttributeType::PASSWORD_ALGORITHMS => Attribute::PasswordAlgorithms(value),
            AttributeType::ALTERNATE_DOMAIN => Attribute::AlternateDomain(utf8(value, ty)?),
            AttributeType::SOFTWARE => Attribute::Software(utf8(value, ty)?),
            AttributeType::ALTERNATE_SERVER => Attribute::AlternateServer(addr()?),
            AttributeType::FINGERPRINT => Attribute::Fingerprint(u32v()?),
            AttributeType::CHANGE_REQUEST => {
                let flags = u32v()?;
                Attribute::ChangeRequest(ChangeRequest {
                    change_ip: flags & 0x4 != 0,
                    change_port: flags & 0x2 != 0,
                })
            }
            AttributeType::PADDING => Attribute::Padding(value),
            AttributeType::RESPONSE_PORT => {
                fixed(4)?;
                Attribute::ResponsePort(be16(value, 0).ok_or(bad)?)
            }
            AttributeType::RESPONSE_ORIGIN => Attribute::ResponseOrigin(addr()?),
            AttributeType::OTHER_ADDRESS => Attribute::OtherAddress(addr()?),
            AttributeType::CHANNEL_NUMBER => {
                fixed(4)?;
                Attribute::ChannelNumber(be16(value, 0).ok_or(bad)?)
            }
            AttributeType::LIFETIME => Attribute::Lifetime(u32v()?),
            AttributeType::CONNECTION_ID => Attribute::ConnectionId(u32v()?),
            AttributeType::XOR_PEER_ADDRESS => Attribute::XorPeerAddress(xaddr()?),
            AttributeType::DATA => Attribute::Data(value),
            AttributeType::XOR_RELAYED_ADDRESS => Attribute::XorRelayedAddress(xaddr()?),
            AttributeType::REQUESTED_ADDRESS_FAMILY => {
                fixed(4)?;
                Attribute::RequestedAddressFamily(value[0])
            }
            AttributeType::EVEN_PORT => {
                fixed(1)?;
                Attribute::EvenPort(EvenPort {
                    reserve_next: value[0] & 0x80 != 0,
                })
            }
            AttributeType::REQUESTED_TRANSPORT => {
                fixed(4)?;
                Attribute::RequestedTransport(value[0])
            }
            AttributeType::DONT_FRAGMENT => {
                fixed(0)?;
                Attribute::DontFragment
            }
            AttributeType::RESERVATION_TOKEN => {
                fixed(8)?;
                let mut token = [0u8; 8];
                token.copy_from_slice(value);
                Attribute::ReservationToken(token)
            }
            AttributeType::ADDITIONAL_ADDRESS_FAMILY => {
                fixed(4)?;
                Attribute::AdditionalAddressFamily(value[0])
            }
            AttributeType::ADDRESS_ERROR_CODE => {
                let family = *value.first().ok_or(bad)?;
                Attribute::AddressErrorCode(family, decode_error_code(value, ty)?)
            }
            AttributeType::ICMP => {
                fixed(8)?;
                Attribute::Icmp(Icmp {
                    icmp_type: value[2],
                    code: value[3],
                    data: be32(value, 4).ok_or(bad)?,
                })
            }
            AttributeType::PRIORITY => Attribute::Priority(u32v()?),
            AttributeType::USE_CANDIDATE => {
                fixed(0)?;
                Attribute::UseCandidate
            }
            AttributeType::ICE_CONTROLLED => Attribute::IceControlled(u64v()?),
            AttributeType::ICE_CONTROLLING => Attribute::IceControlling(u64v()?),
            other => Attribute::Other(other, value),
        })
    }

    /// The attribute's type.
    pub fn attribute_type(&self) -> AttributeType {
        match self {
            Attribute::MappedAddress(_) => AttributeType::MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => AttributeType::XOR_MAPPED_ADDRESS,
            Attribute::Username(_) => AttributeType::USERNAME,
            Attribute::MessageIntegrity(_) => AttributeType::MESSAGE_INTEGRITY,
            Attribute::ErrorCode(_) => AttributeType::ERROR_CODE,
            Attribute::UnknownAttributes(_) => AttributeType::UNKNOWN_ATTRIBUTES,
            Attribute::Realm(_) => AttributeType::REALM,
            Attribute::Nonce(_) => AttributeType::NONCE,
            Attribute::MessageIntegritySha256(_) => AttributeType::MESSAGE_INTEGRITY_SHA256,
            Attribute::PasswordAlgorithm(_) => AttributeType::PASSWORD_ALGORITHM,
            Attribute::Userhash(_) => AttributeType::USERHASH,
            Attribute::PasswordAlgorithms(_) => AttributeType::PASSWORD_ALGORITHMS,
            Attribute::AlternateDomain(_) => AttributeType::ALTERNATE_DOMAIN,
            Attribute::Software(_) => AttributeType::SOFTWARE,
            Attribute::AlternateServer(_) => AttributeType::ALTERNATE_SERVER,
            Attribute::Fingerprint(_) => AttributeType::FINGERPRINT,
            Attribute::ChangeRequest(_) => AttributeType::CHANGE_REQUEST,
            Attribute::Padding(_) => AttributeType::PADDING,
            Attribute::ResponsePort(_) => AttributeType::RESPONSE_PORT,
            Attribute::ResponseOrigin(_) => AttributeType::RESPONSE_ORIGIN,
            Attribute::OtherAddress(_) => AttributeType::OTHER_ADDRESS,
            Attribute::ChannelNumber(_) => AttributeType::CHANNEL_NUMBER,
            Attribute::Lifetime(_) => AttributeType::LIFETIME,
            Attribute::ConnectionId(_) => AttributeType::CONNECTION_ID,
            Attribute::XorPeerAddress(_) => AttributeType::XOR_PEER_ADDRESS,
            Attribute::Data(_) => AttributeType::DATA,
            Attribute::XorRelayedAddress(_) => AttributeType::XOR_RELAYED_ADDRESS,
            Attribute::RequestedAddressFamily(_) => AttributeType::REQUESTED_ADDRESS_FAMILY,
            Attribute::EvenPort(_) => AttributeType::EVEN_PORT,
            Attribute::RequestedTransport(_) => AttributeType::REQUESTED_TRANSPORT,
            Attribute::DontFragment => AttributeType::DONT_FRAGMENT,
            Attribute::ReservationToken(_) => AttributeType::RESERVATION_TOKEN,
            Attribute::AdditionalAddressFamily(_) => AttributeType::ADDITIONAL_ADDRESS_FAMILY,
            Attribute::AddressErrorCode(..) => AttributeType::ADDRESS_ERROR_CODE,
            Attribute::Icmp(_) => AttributeType::ICMP,
            Attribute::Priority(_) => AttributeType::PRIORITY,
            Attribute::UseCandidate => AttributeType::USE_CANDIDATE,
            Attribute::IceControlled(_) => AttributeType::ICE_CONTROLLED,
            Attribute::IceControlling(_) => AttributeType::ICE_CONTROLLING,
            Attribute::Other(ty, _) => *ty,
        }
    }

    /// Length of the encoded value, before padding.
    pub fn value_len(&self) -> usize {
        match self {
            Attribute::MappedAddress(a)
            | Attribute::XorMappedAddress(a)
            | Attribute::AlternateServer(a)
            | Attribute::ResponseOrigin(a)
            | Attribute::OtherAddress(a)
            | Attribute::XorPeerAddress(a)
            | Attribute::XorRelayedAddress(a) => address_len(a),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::AlternateDomain(s)
            | Attribute::Software(s) => s.len(),
            Attribute::MessageIntegrity(b)
            | Attribute::MessageIntegritySha256(b)
            | Attribute::Userhash(b)
            | Attribute::PasswordAlgorithms(b)
            | Attribute::Padding(b)
            | Attribute::Data(b)
            | Attribute::Other(_, b) => b.len(),
            Attribute::ErrorCode(e) | Attribute::AddressErrorCode(_, e) => 4 + e.reason.len(),
            Attribute::UnknownAttributes(u) => u.0.len(),
            Attribute::PasswordAlgorithm(p) => 4 + p.parameters.len(),
            Attribute::Fingerprint(_)
            | Attribute::ChangeRequest(_)
            | Attribute::ResponsePort(_)
            | Attribute::ChannelNumber(_)
            | Attribute::Lifetime(_)
            | Attribute::ConnectionId(_)
            | Attribute::RequestedAddressFamily(_)
            | Attribute::RequestedTransport(_)
            | Attribute::AdditionalAddressFamily(_)
            | Attribute::Priority(_) => 4,
            Attribute::EvenPort(_) => 1,
            Attribute::DontFragment | Attribute::UseCandidate => 0,
            Attribute::ReservationToken(_)
            | Attribute::Icmp(_)
            | Attribute::IceControlled(_)
            | Attribute::IceControlling(_) => 8,
        }
    }

    /// Checks that the value can be encoded (ranges the wire format imposes).
    pub(crate) fn check(&self) -> Result<(), EncodeError> {
        let ty = self.attribute_type().0;
        match self {
            Attribute::ErrorCode(e) | Attribute::AddressErrorCode(_, e)
                if (!(300..=699).contains(&e.code) || e.reason.len() > 763) =>
            {
                return Err(EncodeError::OutOfRange(ty));
            }
            Attribute::MessageIntegrity(b) if b.len() != 20 => {
                return Err(EncodeError::OutOfRange(ty));
            }
            Attribute::MessageIntegritySha256(b)
                if !(16..=32).contains(&b.len()) || b.len() % 4 != 0 =>
            {
                return Err(EncodeError::OutOfRange(ty));
            }
            Attribute::Userhash(b) if b.len() != 32 => return Err(EncodeError::OutOfRange(ty)),
            Attribute::UnknownAttributes(u) if u.0.len() % 2 != 0 => {
                return Err(EncodeError::OutOfRange(ty));
            }
            Attribute::PasswordAlgorithm(p) if p.parameters.len() > usize::from(u16::MAX) => {
                return Err(EncodeError::TooLong);
            }
            _ => {}
        }
        if self.value_len() > usize::from(u16::MAX) {
            return Err(EncodeError::TooLong);
        }
        Ok(())
    }

    /// Writes the value into `dst`, which is exactly `value_len()` bytes.
    pub(crate) fn write_value(&self, dst: &mut [u8], tid: &TransactionId) {
        match self {
            Attribute::MappedAddress(a)
            | Attribute::AlternateServer(a)
            | Attribute::ResponseOrigin(a)
            | Attribute::OtherAddress(a) => write_address(dst, a),
            Attribute::XorMappedAddress(a)
            | Attribute::XorPeerAddress(a)
            | Attribute::XorRelayedAddress(a) => write_address(dst, &xor_address(*a, tid)),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::AlternateDomain(s)
            | Attribute::Software(s) => dst.copy_from_slice(s.as_bytes()),
            Attribute::MessageIntegrity(b)
            | Attribute::MessageIntegritySha256(b)
            | Attribute::Userhash(b)
            | Attribute::PasswordAlgorithms(b)
            | Attribute::Padding(b)
            | Attribute::Data(b)
            | Attribute::Other(_, b) => dst.copy_from_slice(b),
            Attribute::ErrorCode(e) => write_error_code(dst, e.code, e.reason),
            Attribute::AddressErrorCode(family, e) => {
                write_error_code(dst, e.code, e.reason);
                dst[0] = *family;
            }
            Attribute::UnknownAttributes(u) => dst.copy_from_slice(u.0),
            Attribute::PasswordAlgorithm(p) => {
                dst[0..2].copy_from_slice(&p.algorithm.to_be_bytes());
                dst[2..4].copy_from_slice(&(p.parameters.len() as u16).to_be_bytes());
                dst[4..].copy_from_slice(p.parameters);
            }
            Attribute::Fingerprint(v)
            | Attribute::Lifetime(v)
            | Attribute::ConnectionId(v)
            | Attribute::Priority(v) => {
                dst.copy_from_slice(&v.to_be_bytes());
            }
            Attribute::ChangeRequest(c) => {
                let flags = (u32::from(c.change_ip) << 2) | (u32::from(c.change_port) << 1);
                dst.copy_from_slice(&flags.to_be_bytes());
            }
            Attribute::ResponsePort(p) | Attribute::ChannelNumber(p) => {
                dst[0..2].copy_from_slice(&p.to_be_bytes());
                dst[2..4].fill(0);
            }
            Attribute::RequestedAddressFamily(f)
            | Attribute::RequestedTransport(f)
            | Attribute::AdditionalAddressFamily(f) => {
                dst[0] = *f;
                dst[1..4].fill(0);
            }
            Attribute::EvenPort(e) => dst[0] = if e.reserve_next { 0x80 } else { 0 },
            Attribute::DontFragment | Attribute::UseCandidate => {}
            Attribute::ReservationToken(t) => dst.copy_from_slice(t),
            Attribute::Icmp(i) => {
                dst[0..2].fill(0);
                dst[2] = i.icmp_type;
                dst[3] = i.code;
                dst[4..8].copy_from_slice(&i.data.to_be_bytes());
            }
            Attribute::IceControlled(v) | Attribute::IceControlling(v) => {
                dst.copy_from_slice(&v.to_be_bytes());
            }
        }
    }
}

/// Builds an [`UnknownAttributes`] value over a caller-provided byte buffer;
/// used by servers answering 420.
impl<'a> UnknownAttributes<'a> {
    /// Writes `types` big-endian into `scratch` and returns a view over it.
    /// Extra types beyond the scratch capacity are left out.
    pub fn from_types(
        types: impl IntoIterator<Item = AttributeType>,
        scratch: &'a mut [u8],
    ) -> UnknownAttributes<'a> {
        let mut n = 0;
        for ty in types {
            let Some(slot) = scratch.get_mut(n..n + 2) else {
                break;
            };
            slot.copy_from_slice(&ty.0.to_be_bytes());
            n += 2;
        }
        UnknownAttributes(&scratch[..n])
    }
}

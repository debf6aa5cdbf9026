//! Header-level types: methods, classes, transaction ids.

use std::fmt;

/// The fixed magic cookie of RFC 8489 §5; its absence marks an RFC 3489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Size of the STUN header in bytes (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;

/// IANA protocol numbers carried in REQUESTED-TRANSPORT (RFC 8656 §18.11).
pub mod transport {
    /// UDP, the only transport RFC 8656 allocations relay.
    pub const UDP: u8 = 17;
    /// TCP (RFC 6062 allocations).
    pub const TCP: u8 = 6;
}

/// A STUN method (RFC 8489 §5, 12-bit value).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(u16);

impl Method {
    /// Binding (RFC 8489 §18.2).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656 §17).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656 §17).
    pub const REFRESH: Method = Method(0x004);
    /// Send, an indication only (RFC 8656 §17).
    pub const SEND: Method = Method(0x006);
    /// Data, an indication only (RFC 8656 §17).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656 §17).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656 §17).
    pub const CHANNEL_BIND: Method = Method(0x009);
    /// Connect: a TCP connection from the relayed address to a peer (RFC
    /// 6062 §6.1).
    pub const CONNECT: Method = Method(0x00A);
    /// ConnectionBind: a client's data connection joins a relayed TCP
    /// connection (RFC 6062 §6.1).
    pub const CONNECTION_BIND: Method = Method(0x00B);
    /// ConnectionAttempt, an indication only: a peer connected to the
    /// relayed address (RFC 6062 §6.1).
    pub const CONNECTION_ATTEMPT: Method = Method(0x00C);
    /// natrix's connection-data exchange: a participant posts its sealed
    /// entry to CDX (see `natrix_cdx::exchange`).
    pub const EXCHANGE_POST: Method = Method(0x0E1);
    /// natrix's connection-data exchange: CDX delivers another
    /// participant's entry; the client acknowledges with a success response.
    pub const EXCHANGE_DELIVER: Method = Method(0x0E2);

    /// A method from its 12-bit number; `None` when it does not fit in 12 bits.
    pub const fn new(value: u16) -> Option<Method> {
        if value <= 0x0FFF {
            Some(Method(value))
        } else {
            None
        }
    }

    /// The 12-bit method number.
    pub const fn value(self) -> u16 {
        self.0
    }

    /// A short lower-case name for logs and metric labels; `other` for methods
    /// this crate does not name.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0x001 => "binding",
            0x003 => "allocate",
            0x004 => "refresh",
            0x006 => "send",
            0x007 => "data",
            0x008 => "create_permission",
            0x009 => "channel_bind",
            0x00A => "connect",
            0x00B => "connection_bind",
            0x00C => "connection_attempt",
            0x0E1 => "exchange_post",
            0x0E2 => "exchange_deliver",
            _ => "other",
        }
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(0x{:03x})", self.name(), self.0)
    }
}

/// The class of a STUN message (RFC 8489 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request, answered by a success or error response.
    Request,
    /// An indication: no response.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

impl Class {
    const fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    const fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// Method and class, interleaved into the 14-bit message type (RFC 8489 §5,
/// figure 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageType {
    /// The method.
    pub method: Method,
    /// The class.
    pub class: Class,
}

impl MessageType {
    /// A message type from method and class.
    pub const fn new(method: Method, class: Class) -> MessageType {
        MessageType { method, class }
    }

    /// Decodes the first two bytes of a header; the two most significant bits
    /// must be zero (checked by the caller).
    pub const fn from_u16(value: u16) -> MessageType {
        let m = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2);
        let c = ((value >> 4) & 0b01) | ((value >> 7) & 0b10);
        MessageType {
            method: Method(m),
            class: Class::from_bits(c),
        }
    }

    /// Encodes into the first two bytes of a header.
    pub const fn to_u16(self) -> u16 {
        let m = self.method.0;
        let c = self.class.bits();
        (m & 0x000F)
            | ((m & 0x0070) << 1)
            | ((m & 0x0F80) << 2)
            | ((c & 0b01) << 4)
            | ((c & 0b10) << 7)
    }
}

/// The 96-bit transaction id of RFC 8489 §5.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_matches_rfc_examples() {
        // RFC 8489 §5: Binding request 0x0001, success 0x0101, error 0x0111,
        // and RFC 8656 Allocate error 0x0113, Data indication 0x0017.
        assert_eq!(
            MessageType::new(Method::BINDING, Class::Request).to_u16(),
            0x0001
        );
        assert_eq!(
            MessageType::new(Method::BINDING, Class::Success).to_u16(),
            0x0101
        );
        assert_eq!(
            MessageType::new(Method::BINDING, Class::Error).to_u16(),
            0x0111
        );
        assert_eq!(
            MessageType::new(Method::ALLOCATE, Class::Error).to_u16(),
            0x0113
        );
        assert_eq!(
            MessageType::new(Method::DATA, Class::Indication).to_u16(),
            0x0017
        );
        assert_eq!(
            MessageType::new(Method::CHANNEL_BIND, Class::Success).to_u16(),
            0x0109
        );
    }

    #[test]
    fn message_type_round_trips_every_method_and_class() {
        for m in 0..=0x0FFF {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let method = Method::new(m).unwrap();
                let ty = MessageType::new(method, class);
                let raw = ty.to_u16();
                assert_eq!(raw & 0xC000, 0);
                assert_eq!(MessageType::from_u16(raw), ty);
            }
        }
    }
}

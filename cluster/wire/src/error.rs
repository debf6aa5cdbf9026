//! Error types. Each variant names its usual cause.

use thiserror::Error;

/// Why bytes could not be decoded. Every variant means "the peer sent
/// garbage": count it and drop the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or a declared length needs; usually a
    /// truncated datagram or a partial stream read.
    #[error("truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the structure needs.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// More bytes than the header declares (a datagram must hold exactly one
    /// STUN message).
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The first two bits are not `00` (STUN) or `01` (ChannelData); some other
    /// protocol (DTLS, RTP) or noise.
    #[error("not a STUN or ChannelData packet")]
    NotStun,
    /// The message length is not a multiple of four.
    #[error("message length {0} is not a multiple of 4")]
    UnalignedLength(usize),
    /// An attribute's declared length runs past the end of the message.
    #[error("attribute 0x{0:04x} overruns the message")]
    AttributeOverrun(u16),
    /// An attribute follows FINGERPRINT, which must be last (RFC 8489 §14.7).
    #[error("attribute after FINGERPRINT")]
    AttributeAfterFingerprint,
    /// An attribute value has a length or content its definition forbids.
    #[error("malformed value in attribute 0x{0:04x}")]
    BadAttribute(u16),
    /// A ChannelData channel number outside 0x4000..=0x7FFF.
    #[error("invalid channel number 0x{0:04x}")]
    BadChannelNumber(u16),
}

/// Why an encoder could not write a message. These are caller bugs or limits,
/// never the peer's fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The output buffer cannot hold the message.
    #[error("output buffer too small")]
    BufferTooSmall,
    /// An attribute value longer than 65535 bytes, or a message over 65535.
    #[error("value too long")]
    TooLong,
    /// A value that the attribute cannot carry (e.g. an error code outside
    /// 300..=699, a reason phrase over 763 bytes).
    #[error("value out of range for attribute 0x{0:04x}")]
    OutOfRange(u16),
}

/// Why an integrity or fingerprint check failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum IntegrityError {
    /// The message has no such attribute.
    #[error("attribute missing")]
    Missing,
    /// The value does not match: wrong key, or the message was altered.
    #[error("mismatch")]
    Mismatch,
}

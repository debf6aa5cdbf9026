//! Zero-copy STUN/TURN wire codec.
//!
//! This crate turns bytes into protocol values and back, nothing else: no
//! sockets, no clock, no allocation on the decode path. It covers
//!
//! - STUN messages ([RFC 8489]) with MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256
//!   and FINGERPRINT, and RFC 3489 "classic" requests (no magic cookie);
//! - the NAT behaviour discovery attributes of [RFC 5780] (CHANGE-REQUEST,
//!   OTHER-ADDRESS, RESPONSE-ORIGIN, RESPONSE-PORT, PADDING);
//! - the TURN methods and attributes of [RFC 8656];
//! - ChannelData framing, including the TCP padding rule, and stream framing
//!   for STUN over TCP/TLS.
//!
//! # Design
//!
//! [`Message::parse`] validates a whole message once (header, attribute
//! boundaries, the position of the integrity and fingerprint attributes) and
//! keeps a borrowed view of the buffer. Attribute values are decoded lazily
//! and on demand ([`Message::get`], [`Message::attributes`],
//! [`Attribute::decode`]), so a server that only needs two attributes pays for
//! two. Encoding goes through [`Encoder`], which writes into a caller-owned
//! `&mut [u8]` (a slot of a batched send buffer, typically) and never
//! allocates.
//!
//! # Panics and errors
//!
//! Nothing in this crate panics on any input: every length is checked, and
//! malformed input is a [`DecodeError`]. The decoder is fuzzed
//! (`cluster/wire/fuzz`) and property-tested. Encoding fails with
//! [`EncodeError`] when the caller's buffer is too small or a value cannot be
//! represented; a partially written buffer is then garbage and must not be
//! sent.
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489
//! [RFC 5780]: https://www.rfc-editor.org/rfc/rfc5780
//! [RFC 8656]: https://www.rfc-editor.org/rfc/rfc8656

mod attribute;
mod channel;
mod encode;
mod error;
mod integrity;
mod message;
mod types;

pub mod proxy;
pub mod samples;

pub use attribute::{
    Attribute, AttributeType, ChangeRequest, ErrorCode, EvenPort, Icmp, PasswordAlgorithm,
    UnknownAttributes, decode_address, decode_xor_address,
};
pub use channel::{ChannelData, ChannelNumber, Frame, demux, frame_len};
pub use encode::Encoder;
pub use error::{DecodeError, EncodeError, IntegrityError};
pub use integrity::{
    IntegrityKey, long_term_key_md5, long_term_key_sha256, opaque_string, short_term_key, userhash,
};
pub use message::{Message, RawAttribute};
pub use types::{Class, HEADER_LEN, MAGIC_COOKIE, MessageType, Method, TransactionId, transport};

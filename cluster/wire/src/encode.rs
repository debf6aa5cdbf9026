//! Allocation-free message encoder.

use std::net::SocketAddr;

use crate::attribute::{Attribute, AttributeType, ErrorCode};
use crate::error::EncodeError;
use crate::integrity::{self, IntegrityKey};
use crate::types::{HEADER_LEN, MAGIC_COOKIE, MessageType, TransactionId};

/// Writes one STUN message into a caller-owned buffer.
///
/// The header's length field is kept current after every attribute, so the
/// integrity and fingerprint attributes can be appended at any point and the
/// buffer is a complete message after each call. Padding bytes are zero.
///
/// ```
/// use natrix_wire::{Class, Encoder, Message, MessageType, Method, TransactionId};
/// let mut buf = [0u8; 128];
/// let tid = TransactionId([7; 12]);
/// let ty = MessageType::new(Method::BINDING, Class::Success);
/// let mut enc = Encoder::new(&mut buf, ty, &tid)?;
/// enc.xor_mapped_address("192.0.2.1:32853".parse().unwrap())?;
/// enc.software("natrix")?;
/// enc.fingerprint()?;
/// let len = enc.finish();
/// let msg = Message::parse(&buf[..len])?;
/// assert!(msg.verify_fingerprint().is_ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Encoder<'b> {
    buf: &'b mut [u8],
    len: usize,
    tid: TransactionId,
}

impl<'b> Encoder<'b> {
    /// Starts a message with the magic cookie (RFC 8489).
    pub fn new(
        buf: &'b mut [u8],
        ty: MessageType,
        tid: &TransactionId,
    ) -> Result<Encoder<'b>, EncodeError> {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        id[4..].copy_from_slice(&tid.0);
        Self::with_raw_id(buf, ty, &id)
    }

    /// Starts a response to an RFC 3489 request: the 128-bit transaction id is
    /// echoed as is (no magic cookie).
    pub fn new_rfc3489(
        buf: &'b mut [u8],
        ty: MessageType,
        legacy_id: &[u8; 16],
    ) -> Result<Encoder<'b>, EncodeError> {
        Self::with_raw_id(buf, ty, legacy_id)
    }

    fn with_raw_id(
        buf: &'b mut [u8],
        ty: MessageType,
        id: &[u8; 16],
    ) -> Result<Encoder<'b>, EncodeError> {
        let header = buf
            .get_mut(..HEADER_LEN)
            .ok_or(EncodeError::BufferTooSmall)?;
        header[0..2].copy_from_slice(&ty.to_u16().to_be_bytes());
        header[2..4].fill(0);
        header[4..20].copy_from_slice(id);
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&id[4..]);
        Ok(Encoder {
            buf,
            len: HEADER_LEN,
            tid: TransactionId(tid),
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a message has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Reserves an attribute of `value_len` bytes, writes its header and zero
    /// padding, updates the message length and returns the value slot.
    fn reserve(&mut self, ty: AttributeType, value_len: usize) -> Result<&mut [u8], EncodeError> {
        if value_len > usize::from(u16::MAX) {
            return Err(EncodeError::TooLong);
        }
        let padded = (value_len + 3) & !3;
        let start = self.len;
        let end = start + 4 + padded;
        if end - HEADER_LEN > usize::from(u16::MAX) {
            return Err(EncodeError::TooLong);
        }
        let slot = self
            .buf
            .get_mut(start..end)
            .ok_or(EncodeError::BufferTooSmall)?;
        slot[0..2].copy_from_slice(&ty.0.to_be_bytes());
        slot[2..4].copy_from_slice(&(value_len as u16).to_be_bytes());
        slot[4 + value_len..].fill(0);
        self.len = end;
        let body = (end - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
        Ok(&mut self.buf[start + 4..start + 4 + value_len])
    }

    /// Appends any attribute.
    pub fn attribute(&mut self, attr: &Attribute<'_>) -> Result<(), EncodeError> {
        attr.check()?;
        let tid = self.tid;
        let slot = self.reserve(attr.attribute_type(), attr.value_len())?;
        attr.write_value(slot, &tid);
        Ok(())
    }

    /// Appends a raw attribute (type and unpadded value).
    pub fn raw(&mut self, ty: AttributeType, value: &[u8]) -> Result<(), EncodeError> {
        self.reserve(ty, value.len())?.copy_from_slice(value);
        Ok(())
    }

    /// Appends XOR-MAPPED-ADDRESS.
    pub fn xor_mapped_address(&mut self, addr: SocketAddr) -> Result<(), EncodeError> {
        self.attribute(&Attribute::XorMappedAddress(addr))
    }

    /// Appends MAPPED-ADDRESS.
    pub fn mapped_address(&mut self, addr: SocketAddr) -> Result<(), EncodeError> {
        self.attribute(&Attribute::MappedAddress(addr))
    }

    /// Appends SOFTWARE.
    pub fn software(&mut self, name: &str) -> Result<(), EncodeError> {
        self.attribute(&Attribute::Software(name))
    }

    /// Appends ERROR-CODE.
    pub fn error_code(&mut self, error: ErrorCode<'_>) -> Result<(), EncodeError> {
        self.attribute(&Attribute::ErrorCode(error))
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` over everything so far.
    pub fn integrity(&mut self, key: &IntegrityKey) -> Result<(), EncodeError> {
        let at = self.len;
        self.reserve(AttributeType::MESSAGE_INTEGRITY, 20)?;
        let tag = key.sha1_tag(self.buf, at);
        self.buf[at + 4..at + 24].copy_from_slice(&tag);
        Ok(())
    }

    /// Appends a full-length (32-byte) MESSAGE-INTEGRITY-SHA256.
    pub fn integrity_sha256(&mut self, key: &IntegrityKey) -> Result<(), EncodeError> {
        let at = self.len;
        self.reserve(AttributeType::MESSAGE_INTEGRITY_SHA256, 32)?;
        let tag = key.sha256_tag(self.buf, at, 32);
        self.buf[at + 4..at + 36].copy_from_slice(&tag);
        Ok(())
    }

    /// Appends FINGERPRINT; it must be the last attribute.
    pub fn fingerprint(&mut self) -> Result<(), EncodeError> {
        let at = self.len;
        self.reserve(AttributeType::FINGERPRINT, 4)?;
        let crc = integrity::fingerprint(self.buf, at);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }

    /// Ends the message and returns its length.
    pub fn finish(self) -> usize {
        self.len
    }
}

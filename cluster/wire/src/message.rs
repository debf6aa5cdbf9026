//! Zero-copy view of a validated STUN message.

use crate::attribute::{Attribute, AttributeType};
use crate::error::{DecodeError, IntegrityError};
use crate::integrity::{self, IntegrityKey};
use crate::types::{Class, HEADER_LEN, MAGIC_COOKIE, MessageType, Method, TransactionId};

/// One attribute as it sits in the message: type and unpadded value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// The attribute type.
    pub ty: AttributeType,
    /// The value, without padding.
    pub value: &'a [u8],
}

/// A validated STUN message borrowing its buffer.
///
/// [`Message::parse`] checks the header and walks the attribute list once;
/// afterwards every accessor is infallible on structure and only attribute
/// values can still be malformed (checked when decoded).
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    buf: &'a [u8],
    ty: MessageType,
    rfc3489: bool,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if any.
    integrity: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if any.
    integrity_sha256: Option<usize>,
    /// Offset of the FINGERPRINT attribute header, if any.
    fingerprint: Option<usize>,
    /// Attributes at or past this offset are ignored (RFC 8489 §14.5), except
    /// the integrity and fingerprint attributes themselves.
    covered_end: usize,
}

fn round4(n: usize) -> usize {
    (n + 3) & !3
}

impl<'a> Message<'a> {
    /// Validates `buf` as exactly one STUN message (a datagram, or a frame cut
    /// from a stream with [`crate::frame_len`]).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                have: buf.len(),
            });
        }
        if buf[0] & 0xC0 != 0 {
            return Err(DecodeError::NotStun);
        }
        let declared = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if declared % 4 != 0 {
            return Err(DecodeError::UnalignedLength(declared));
        }
        let total = HEADER_LEN + declared;
        if buf.len() < total {
            return Err(DecodeError::Truncated {
                needed: total,
                have: buf.len(),
            });
        }
        if buf.len() > total {
            return Err(DecodeError::TrailingBytes(buf.len() - total));
        }
        let ty = MessageType::from_u16(u16::from_be_bytes([buf[0], buf[1]]));
        let rfc3489 = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE;

        let mut msg = Message {
            buf,
            ty,
            rfc3489,
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
            covered_end: total,
        };
        let mut at = HEADER_LEN;
        while at < total {
            if total - at < 4 {
                return Err(DecodeError::Truncated {
                    needed: at + 4,
                    have: total,
                });
            }
            let ty = u16::from_be_bytes([buf[at], buf[at + 1]]);
            let len = usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]]));
            let next = at + 4 + round4(len);
            if next > total {
                return Err(DecodeError::AttributeOverrun(ty));
            }
            if msg.fingerprint.is_some() {
                return Err(DecodeError::AttributeAfterFingerprint);
            }
            match AttributeType(ty) {
                AttributeType::MESSAGE_INTEGRITY
                    if msg.integrity.is_none() && msg.integrity_sha256.is_none() =>
                {
                    if len != 20 {
                        return Err(DecodeError::BadAttribute(ty));
                    }
                    msg.integrity = Some(at);
                    msg.covered_end = msg.covered_end.min(next);
                }
                AttributeType::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => {
                    if !(16..=32).contains(&len) || len % 4 != 0 {
                        return Err(DecodeError::BadAttribute(ty));
                    }
                    msg.integrity_sha256 = Some(at);
                    msg.covered_end = msg.covered_end.min(next);
                }
                AttributeType::FINGERPRINT => {
                    if len != 4 {
                        return Err(DecodeError::BadAttribute(ty));
                    }
                    msg.fingerprint = Some(at);
                }
                _ => {}
            }
            at = next;
        }
        Ok(msg)
    }

    /// The whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Method and class.
    pub fn message_type(&self) -> MessageType {
        self.ty
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.ty.method
    }

    /// The class.
    pub fn class(&self) -> Class {
        self.ty.class
    }

    /// True when the magic cookie is absent: an RFC 3489 client, which
    /// understands MAPPED-ADDRESS only.
    pub fn is_rfc3489(&self) -> bool {
        self.rfc3489
    }

    /// The 96-bit transaction id (RFC 8489). For RFC 3489 messages this is
    /// the last 96 bits of the 128-bit id; see [`Message::legacy_transaction_id`].
    pub fn transaction_id(&self) -> TransactionId {
        let mut id = [0u8; 12];
        id.copy_from_slice(&self.buf[8..20]);
        TransactionId(id)
    }

    /// Bytes 4..20 of the header: the cookie and transaction id, or the
    /// 128-bit transaction id of RFC 3489, which a response must echo.
    pub fn legacy_transaction_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.buf[4..20]);
        id
    }

    /// Every attribute in order, except those following MESSAGE-INTEGRITY or
    /// MESSAGE-INTEGRITY-SHA256 that RFC 8489 §14.5 says to ignore.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            buf: self.buf,
            at: HEADER_LEN,
            covered_end: self.covered_end,
        }
    }

    /// The value of the first attribute of type `ty`.
    pub fn get(&self, ty: AttributeType) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.ty == ty).map(|a| a.value)
    }

    /// Decodes the first attribute of type `ty`.
    pub fn decode(&self, ty: AttributeType) -> Option<Result<Attribute<'a>, DecodeError>> {
        let tid = self.transaction_id();
        self.get(ty).map(|v| Attribute::decode(ty, v, &tid))
    }

    /// Comprehension-required attributes that `known` does not accept; a
    /// request carrying any must be answered with 420 (RFC 8489 §6.3.1).
    pub fn unknown_required<'s>(
        &'s self,
        known: impl Fn(AttributeType) -> bool + 's,
    ) -> impl Iterator<Item = AttributeType> + 's {
        self.attributes()
            .map(|a| a.ty)
            .filter(move |ty| ty.is_comprehension_required() && !known(*ty))
    }

    /// True when the message carries MESSAGE-INTEGRITY or
    /// MESSAGE-INTEGRITY-SHA256.
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some() || self.integrity_sha256.is_some()
    }

    /// True when the message carries FINGERPRINT.
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// Checks FINGERPRINT (RFC 8489 §14.7).
    pub fn verify_fingerprint(&self) -> Result<(), IntegrityError> {
        let at = self.fingerprint.ok_or(IntegrityError::Missing)?;
        let expected = integrity::fingerprint(self.buf, at);
        let got = u32::from_be_bytes([
            self.buf[at + 4],
            self.buf[at + 5],
            self.buf[at + 6],
            self.buf[at + 7],
        ]);
        if expected == got {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5).
    pub fn verify_integrity(&self, key: &IntegrityKey) -> Result<(), IntegrityError> {
        let at = self.integrity.ok_or(IntegrityError::Missing)?;
        let tag = key.sha1_tag(self.buf, at);
        integrity::tags_equal(&tag, &self.buf[at + 4..at + 24])
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), including truncated
    /// values.
    pub fn verify_integrity_sha256(&self, key: &IntegrityKey) -> Result<(), IntegrityError> {
        let at = self.integrity_sha256.ok_or(IntegrityError::Missing)?;
        let len = usize::from(u16::from_be_bytes([self.buf[at + 2], self.buf[at + 3]]));
        let tag = key.sha256_tag(self.buf, at, len);
        let got = &self.buf[at + 4..at + 4 + len];
        integrity::tags_equal(&tag[..len], got)
    }

    /// Checks whichever integrity attribute is present, preferring SHA-256
    /// when both are (RFC 8489 §9.2.4).
    pub fn verify_any_integrity(&self, key: &IntegrityKey) -> Result<(), IntegrityError> {
        if self.integrity_sha256.is_some() {
            self.verify_integrity_sha256(key)
        } else {
            self.verify_integrity(key)
        }
    }
}

/// Iterator over a message's attributes; see [`Message::attributes`].
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    at: usize,
    covered_end: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<RawAttribute<'a>> {
        loop {
            // The message was validated, so these slices are in bounds; `get`
            // keeps that a non-panicking invariant anyway.
            let head = self.buf.get(self.at..self.at + 4)?;
            let ty = AttributeType(u16::from_be_bytes([head[0], head[1]]));
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let value = self.buf.get(self.at + 4..self.at + 4 + len)?;
            let here = self.at;
            self.at += 4 + round4(len);
            let ignored = here >= self.covered_end
                && !matches!(
                    ty,
                    AttributeType::MESSAGE_INTEGRITY_SHA256 | AttributeType::FINGERPRINT
                );
            if !ignored {
                return Some(RawAttribute { ty, value });
            }
        }
    }
}

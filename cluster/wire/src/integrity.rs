//! MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (RFC 8489
//! §14.5–14.7) and the credential-to-key derivations of RFC 8489 §9.

use md5::{Digest, Md5};
use ring::{digest, hmac};

use crate::error::IntegrityError;
use crate::types::HEADER_LEN;

/// XOR-ed into the CRC-32 of FINGERPRINT ("STUN" in ASCII, RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// An HMAC key ready for both integrity algorithms. Building one costs two
/// hash-block computations, so build it once per credential, not per packet.
#[derive(Clone)]
pub struct IntegrityKey {
    sha1: hmac::Key,
    sha256: hmac::Key,
    /// The raw key (at most 32 bytes: MD5 and SHA-256 derivations), kept so
    /// an allocation can move to another process (binary upgrade).
    raw: [u8; 32],
    raw_len: u8,
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(..)")
    }
}

impl IntegrityKey {
    /// A key from its raw bytes (see [`short_term_key`], [`long_term_key_md5`],
    /// [`long_term_key_sha256`]).
    pub fn new(raw: &[u8]) -> IntegrityKey {
        let mut kept = [0u8; 32];
        let raw_len = match raw.len() {
            n @ 0..=32 => {
                kept[..n].copy_from_slice(raw);
                n as u8
            }
            _ => u8::MAX,
        };
        IntegrityKey {
            sha1: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, raw),
            sha256: hmac::Key::new(hmac::HMAC_SHA256, raw),
            raw: kept,
            raw_len,
        }
    }

    /// The raw key this one was built from, when it was at most 32 bytes
    /// (every long-term credential is); `None` for a longer one.
    pub fn raw(&self) -> Option<&[u8]> {
        self.raw.get(..usize::from(self.raw_len))
    }

    /// HMAC-SHA1 over `msg[..attr_at]` with the header length set as if the
    /// message ended right after a 20-byte MESSAGE-INTEGRITY at `attr_at`.
    pub(crate) fn sha1_tag(&self, msg: &[u8], attr_at: usize) -> [u8; 20] {
        let tag = sign(&self.sha1, msg, attr_at, 4 + 20);
        let mut out = [0u8; 20];
        out.copy_from_slice(&tag.as_ref()[..20]);
        out
    }

    /// HMAC-SHA256 over `msg[..attr_at]` with the header length set as if the
    /// message ended right after a MESSAGE-INTEGRITY-SHA256 of `len` bytes.
    pub(crate) fn sha256_tag(&self, msg: &[u8], attr_at: usize, len: usize) -> [u8; 32] {
        let tag = sign(&self.sha256, msg, attr_at, 4 + len);
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        out
    }
}

/// The header of `msg` with its length field patched so that the message
/// appears to end `attr_len` bytes after `attr_at`.
fn patched_header(msg: &[u8], attr_at: usize, attr_len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&msg[..HEADER_LEN]);
    let len = (attr_at - HEADER_LEN + attr_len) as u16;
    header[2..4].copy_from_slice(&len.to_be_bytes());
    header
}

fn sign(key: &hmac::Key, msg: &[u8], attr_at: usize, attr_len: usize) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&patched_header(msg, attr_at, attr_len));
    ctx.update(&msg[HEADER_LEN..attr_at]);
    ctx.sign()
}

/// The FINGERPRINT value for a message whose FINGERPRINT attribute starts at
/// `attr_at`.
pub(crate) fn fingerprint(msg: &[u8], attr_at: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&patched_header(msg, attr_at, 8));
    hasher.update(&msg[HEADER_LEN..attr_at]);
    hasher.finalize() ^ FINGERPRINT_XOR
}

/// Constant-time comparison of two tags.
pub(crate) fn tags_equal(a: &[u8], b: &[u8]) -> Result<(), IntegrityError> {
    if a.len() != b.len() {
        return Err(IntegrityError::Mismatch);
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff == 0 {
        Ok(())
    } else {
        Err(IntegrityError::Mismatch)
    }
}

/// OpaqueString / SASLprep preparation of a password (RFC 8489 §9.2.2 uses
/// OpaqueString of RFC 8265; for the characters STUN deployments use it agrees
/// with the SASLprep of RFC 5389). Plain printable ASCII is returned as is
/// without allocating a new preparation.
pub fn opaque_string(input: &str) -> std::borrow::Cow<'_, str> {
    if input
        .bytes()
        .all(|b| (0x21..0x7F).contains(&b) || b == b' ')
    {
        return std::borrow::Cow::Borrowed(input);
    }
    match stringprep::saslprep(input) {
        Ok(prepared) => prepared,
        // A password SASLprep rejects (prohibited code points) is used as is:
        // the HMAC simply will not match, which is the right outcome.
        Err(_) => std::borrow::Cow::Borrowed(input),
    }
}

/// The short-term credential key: the prepared password (RFC 8489 §9.1.1).
pub fn short_term_key(password: &str) -> Vec<u8> {
    opaque_string(password).as_bytes().to_vec()
}

/// The long-term credential key with the MD5 algorithm:
/// `MD5(username ":" realm ":" password)` (RFC 8489 §9.2.2).
pub fn long_term_key_md5(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(username.as_bytes());
    hasher.update(b":");
    hasher.update(opaque_string(realm).as_bytes());
    hasher.update(b":");
    hasher.update(opaque_string(password).as_bytes());
    hasher.finalize().into()
}

/// The long-term credential key with the SHA-256 algorithm (RFC 8489 §9.2.2).
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(username.as_bytes());
    ctx.update(b":");
    ctx.update(opaque_string(realm).as_bytes());
    ctx.update(b":");
    ctx.update(opaque_string(password).as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// USERHASH: `SHA-256(username ":" realm)` (RFC 8489 §14.4).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(username.as_bytes());
    ctx.update(b":");
    ctx.update(opaque_string(realm).as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

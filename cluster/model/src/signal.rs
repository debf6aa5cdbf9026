//! Signalling identities and the state clients carry: device ids from
//! Ed25519 keys, stateless device tokens, and sealed blobs (invitations,
//! pair tickets) that only the cluster can open.
//!
//! - A device makes an Ed25519 key pair; its id is the first 26 characters
//!   of the lower-case base32 (RFC 4648, no padding) of SHA-256(public key):
//!   130 bits, the address pushes are routed to.
//! - A device token is `v1.<device id>.<expiry>.<kid>.<mac>`: `mac` is
//!   base64url(HMAC-SHA-256) over the rest under a key derived from the
//!   cluster secret, `kid` names that key (8 hex digits of its digest), so
//!   any replica verifies a token without a store read.
//! - A sealed blob is `v1.<base64url(nonce 12 B ‖ ChaCha20-Poly1305(payload)
//!   ‖ tag)>` under a key derived from the cluster secret and the blob's
//!   purpose (the associated data), so an invitation cannot be passed off as
//!   a ticket, and the invitee cannot read the inviter's addresses before
//!   accepting.
//!
//! Keys derive with HMAC-SHA-256(cluster secret, label) (the same
//! construction as the exchange's ticket key).

use base64::Engine as _;
use ring::{aead, digest, hmac, signature};

use crate::secret::constant_time_eq;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Characters of a device id.
pub const DEVICE_ID_LEN: usize = 26;
/// Longest handle (e-mail address, E.164 number, user name).
pub const MAX_HANDLE_LEN: usize = 128;
/// Longest sealed blob accepted (characters).
pub const MAX_SEALED_LEN: usize = 8192;

fn derive(cluster_secret: &[u8], label: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, cluster_secret), label);
    let mut k = [0u8; 32];
    k.copy_from_slice(tag.as_ref());
    k
}

/// Lower-case RFC 4648 base32 without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// A device's id, from its Ed25519 public key.
pub fn device_id(public_key: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, public_key);
    let mut id = base32(d.as_ref());
    id.truncate(DEVICE_ID_LEN);
    id
}

/// Whether `id` has the shape of a device id.
pub fn is_device_id(id: &str) -> bool {
    id.len() == DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

/// Whether `handle` may be registered: 1 to [`MAX_HANDLE_LEN`] bytes, no
/// control characters.
pub fn valid_handle(handle: &str) -> bool {
    !handle.is_empty() && handle.len() <= MAX_HANDLE_LEN && !handle.chars().any(char::is_control)
}

/// Verifies an Ed25519 signature of `message` by `public_key`.
pub fn verify_device_signature(public_key: &[u8], message: &[u8], sig: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(message, sig)
        .is_ok()
}

/// Why a device token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `v1.<id>.<expiry>.<kid>.<mac>`.
    #[error("not a device token")]
    Malformed,
    /// Minted under another cluster secret.
    #[error("device token from another cluster secret")]
    UnknownKey,
    /// The MAC does not verify.
    #[error("forged device token")]
    Forged,
    /// Past its expiry.
    #[error("device token expired")]
    Expired,
}

/// Mints and verifies device tokens (a key derived from the cluster
/// secret).
#[derive(Clone)]
pub struct DeviceTokens {
    key: hmac::Key,
    kid: String,
}

impl std::fmt::Debug for DeviceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceTokens({})", self.kid)
    }
}

impl DeviceTokens {
    /// The token keys of `cluster_secret`.
    pub fn new(cluster_secret: &[u8]) -> DeviceTokens {
        let raw = derive(cluster_secret, b"natrix device token v1");
        let kid: String = digest::digest(&digest::SHA256, &raw).as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        DeviceTokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, &raw),
            kid,
        }
    }

    /// A token for `device` valid until `expires` (Unix seconds).
    pub fn mint(&self, device: &str, expires: u64) -> String {
        let body = format!("v1.{device}.{expires}.{}", self.kid);
        let mac = B64.encode(hmac::sign(&self.key, body.as_bytes()).as_ref());
        format!("{body}.{mac}")
    }

    /// The device a token names, if it verifies at `now`.
    pub fn verify<'t>(&self, token: &'t str, now: u64) -> Result<&'t str, TokenError> {
        let mut parts = token.split('.');
        let (Some("v1"), Some(device), Some(expires), Some(kid), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        if !is_device_id(device) {
            return Err(TokenError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if kid != self.kid {
            return Err(TokenError::UnknownKey);
        }
        let body = &token[..token.len() - mac.len() - 1];
        let want = hmac::sign(&self.key, body.as_bytes());
        let got = B64.decode(mac).map_err(|_| TokenError::Forged)?;
        if !constant_time_eq(want.as_ref(), &got) {
            return Err(TokenError::Forged);
        }
        if expires <= now {
            return Err(TokenError::Expired);
        }
        Ok(device)
    }
}

/// What a sealed blob is for (its key and associated data differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// An invitation, carried by the inviter and the invitees.
    Invitation,
    /// A ticket of one accepted pair, carried by both devices.
    Ticket,
    /// A call handed to another device of the same handle.
    Transfer,
}

impl Purpose {
    const fn label(self) -> &'static [u8] {
        match self {
            Purpose::Invitation => b"natrix signal invitation v1",
            Purpose::Ticket => b"natrix signal ticket v1",
            Purpose::Transfer => b"natrix signal transfer v1",
        }
    }
}

/// Seals and opens the blobs clients carry.
pub struct Sealer {
    invitation: aead::LessSafeKey,
    ticket: aead::LessSafeKey,
    transfer: aead::LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<keys>)")
    }
}

fn aead_key(cluster_secret: &[u8], p: Purpose) -> aead::LessSafeKey {
    let raw = derive(cluster_secret, p.label());
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &raw)
            .unwrap_or_else(|_| unreachable!("a 32-byte key is valid for ChaCha20-Poly1305")),
    )
}

impl Sealer {
    /// The sealing keys of `cluster_secret`.
    pub fn new(cluster_secret: &[u8]) -> Sealer {
        Sealer {
            invitation: aead_key(cluster_secret, Purpose::Invitation),
            ticket: aead_key(cluster_secret, Purpose::Ticket),
            transfer: aead_key(cluster_secret, Purpose::Transfer),
        }
    }

    fn key(&self, p: Purpose) -> &aead::LessSafeKey {
        match p {
            Purpose::Invitation => &self.invitation,
            Purpose::Ticket => &self.ticket,
            Purpose::Transfer => &self.transfer,
        }
    }

    /// Seals `payload` for `purpose` with a fresh `nonce`.
    pub fn seal(&self, purpose: Purpose, nonce: [u8; 12], payload: &[u8]) -> String {
        let mut body = payload.to_vec();
        let tag = self
            .key(purpose)
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(purpose.label()),
                &mut body,
            )
            .unwrap_or_else(|_| unreachable!("payloads stay below the AEAD limit"));
        let mut raw = Vec::with_capacity(12 + body.len() + 16);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&body);
        raw.extend_from_slice(tag.as_ref());
        format!("v1.{}", B64.encode(raw))
    }

    /// Opens a blob sealed for `purpose`; `None` when it is not one (forged,
    /// another purpose, another cluster secret, truncated, too long).
    pub fn open(&self, purpose: Purpose, blob: &str) -> Option<Vec<u8>> {
        if blob.len() > MAX_SEALED_LEN {
            return None;
        }
        let raw = B64.decode(blob.strip_prefix("v1.")?).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let nonce: [u8; 12] = raw[..12].try_into().ok()?;
        let mut body = raw[12..].to_vec();
        let plain = self
            .key(purpose)
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(purpose.label()),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a cluster secret for signalling";

    #[test]
    fn device_ids_are_base32_of_the_key_digest() {
        // RFC 4648 test vector (upper case there).
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        let id = device_id(&[7u8; 32]);
        assert!(is_device_id(&id), "{id}");
        assert_ne!(id, device_id(&[8u8; 32]));
        assert!(!is_device_id("short"));
        assert!(!is_device_id(&"A".repeat(26)));
    }

    #[test]
    fn device_tokens_verify_statelessly_and_refuse_forgery_and_age() {
        let t = DeviceTokens::new(SECRET);
        let id = device_id(&[1u8; 32]);
        let token = t.mint(&id, 1000);
        assert_eq!(t.verify(&token, 999), Ok(id.as_str()));
        assert_eq!(t.verify(&token, 1000), Err(TokenError::Expired));
        let other = DeviceTokens::new(b"another cluster secret entirely");
        assert_eq!(other.verify(&token, 1), Err(TokenError::UnknownKey));
        // Another device's id with this MAC.
        let stolen = token.replacen(&id, &device_id(&[2u8; 32]), 1);
        assert_eq!(t.verify(&stolen, 1), Err(TokenError::Forged));
        let later = token.replacen(".1000.", ".9999.", 1);
        assert_eq!(t.verify(&later, 1), Err(TokenError::Forged));
        for junk in [
            "",
            "v1",
            "v2.a.b.c.d",
            &format!("v1.{id}.x.y.z"),
            &format!("{token}.x"),
        ] {
            assert!(t.verify(junk, 1).is_err(), "{junk}");
        }
    }

    #[test]
    fn sealed_blobs_open_only_for_their_purpose_and_cluster() {
        let s = Sealer::new(SECRET);
        let blob = s.seal(Purpose::Invitation, [3; 12], b"{\"from\":\"alice\"}");
        assert!(!blob.contains("alice"));
        assert_eq!(
            s.open(Purpose::Invitation, &blob).as_deref(),
            Some(&b"{\"from\":\"alice\"}"[..])
        );
        assert_eq!(s.open(Purpose::Ticket, &blob), None, "another purpose");
        assert_eq!(
            Sealer::new(b"another cluster secret entirely").open(Purpose::Invitation, &blob),
            None
        );
        let mut tampered = blob.clone().into_bytes();
        let i = tampered.len() - 5;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            s.open(Purpose::Invitation, std::str::from_utf8(&tampered).unwrap()),
            None
        );
        assert_eq!(s.open(Purpose::Invitation, "v1.AAAA"), None);
        assert_eq!(s.open(Purpose::Invitation, "junk"), None);
    }

    #[test]
    fn ed25519_signatures_verify_with_ring() {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let sig = pair.sign(b"1800000000.device");
        let public = pair.public_key().as_ref();
        assert!(verify_device_signature(
            public,
            b"1800000000.device",
            sig.as_ref()
        ));
        assert!(!verify_device_signature(
            public,
            b"1800000001.device",
            sig.as_ref()
        ));
    }

    #[test]
    fn handles_are_bounded() {
        assert!(valid_handle("alice@example.com"));
        assert!(valid_handle("+4915123456789"));
        assert!(!valid_handle(""));
        assert!(!valid_handle(&"a".repeat(129)));
        assert!(!valid_handle("bob\n"));
    }
}

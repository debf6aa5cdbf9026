//! The long-term credential mechanism (RFC 8489 §9.2) with TURN REST
//! ephemeral credentials, stateless nonces and the session-token seam.
//!
//! Passwords are never stored for REST users: the password of username `u`
//! is `base64(HMAC-SHA1(secret, u))` for one of the configured secrets, and
//! the username carries its own expiry (`<unix expiry>[:<more>]`). Several
//! secrets are valid at once so that a rotation never breaks a session; each
//! has a key id for logs and metrics. Session-bound tokens minted by lookup
//! have the form `<expiry>:<session>:<relay-id>[:<peers>]` and are accepted
//! only by the relay they name. `<peers>` (comma-separated IPs, lookup adds
//! it when it knows the counterpart's addresses) scopes the allocation's
//! permissions to those peers: see [`session_peers`].

use std::collections::HashMap;
use std::net::IpAddr;

use natrix_model::secret::constant_time_eq;
use natrix_model::token::{rest_expiry, rest_password};
use natrix_model::{SessionToken, TurnSecret};
use natrix_wire::{IntegrityKey, Message, long_term_key_md5};
use ring::hmac;

/// Why a request's credentials were refused. Every variant is a value of the
/// `reason` label of `relay_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// The username is neither a REST username nor a static user.
    UnknownUser,
    /// A REST username whose expiry has passed.
    Expired,
    /// A session token minted for another relay.
    WrongRelay,
    /// MESSAGE-INTEGRITY did not verify with any candidate key.
    BadIntegrity,
}

/// The credential store of one relay.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    realm: String,
    secrets: Vec<TurnSecret>,
    static_users: HashMap<String, String>,
    relay_id: Option<String>,
}

impl Credentials {
    /// Credentials of `realm`, with REST `secrets` (tried in order, newest
    /// first), development `static_users` (username → password) and this
    /// relay's id (session tokens naming another relay are refused).
    pub fn new(
        realm: impl Into<String>,
        secrets: Vec<TurnSecret>,
        static_users: HashMap<String, String>,
        relay_id: Option<String>,
    ) -> Credentials {
        Credentials {
            realm: realm.into(),
            secrets,
            static_users,
            relay_id,
        }
    }

    /// The same store with `extra` secrets tried first (a rotated secrets
    /// file in front of the command-line secrets).
    pub fn with_extra_secrets(&self, extra: Vec<TurnSecret>) -> Credentials {
        let mut c = self.clone();
        let mut secrets = extra;
        secrets.extend(self.secrets.iter().cloned());
        c.secrets = secrets;
        c
    }

    /// The realm (RFC 8489 §14.9).
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Finds the key that verifies `msg`'s integrity for `username`.
    /// `unix_now` is the wall-clock time in seconds (REST expiry).
    pub fn authenticate(
        &self,
        msg: &Message<'_>,
        username: &str,
        unix_now: u64,
    ) -> Result<IntegrityKey, AuthFailure> {
        if let Some(password) = self.static_users.get(username) {
            let key = IntegrityKey::new(&long_term_key_md5(username, &self.realm, password));
            return msg
                .verify_any_integrity(&key)
                .map(|()| key)
                .map_err(|_| AuthFailure::BadIntegrity);
        }
        let expiry = rest_expiry(username).ok_or(AuthFailure::UnknownUser)?;
        if self.secrets.is_empty() {
            return Err(AuthFailure::UnknownUser);
        }
        if expiry <= unix_now {
            return Err(AuthFailure::Expired);
        }
        if let (Some(relay), Some(own)) = (SessionToken::relay_of(username), &self.relay_id)
            && relay != own
        {
            return Err(AuthFailure::WrongRelay);
        }
        for secret in &self.secrets {
            let password = rest_password(secret.bytes(), username);
            let key = IntegrityKey::new(&long_term_key_md5(username, &self.realm, &password));
            if msg.verify_any_integrity(&key).is_ok() {
                return Ok(key);
            }
        }
        Err(AuthFailure::BadIntegrity)
    }
}

/// The peers a session token restricts its allocation to: `None` for
/// usernames without a fourth field (no restriction beyond the deny list),
/// otherwise the listed IPs. An unparsable list yields an empty one, so a
/// broken token can reach nobody rather than everybody.
pub fn session_peers(username: &str) -> Option<Box<[IpAddr]>> {
    SessionToken::parse(username)?
        .peers
        .map(Vec::into_boxed_slice)
}

/// Nonce length on the wire: 8 hex digits of issue time, 24 of MAC.
const NONCE_LEN: usize = 32;

/// Why a NONCE was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceError {
    /// Not a nonce this relay issued (or issued to another address).
    Invalid,
    /// Issued by this relay but too old: the client retries with the fresh
    /// one a 438 carries.
    Stale,
}

/// Stateless nonces: the issue time and an HMAC over (time, client IP) with
/// a per-process key. Verifying needs no table, so a flood of
/// unauthenticated requests cannot grow memory.
#[derive(Clone)]
pub struct Nonces {
    key: hmac::Key,
    lifetime_secs: u64,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonces(lifetime {} s)", self.lifetime_secs)
    }
}

impl Nonces {
    /// Nonces signed with `key` (random per process) and valid for
    /// `lifetime_secs`.
    pub fn new(key: &[u8], lifetime_secs: u64) -> Nonces {
        Nonces {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            lifetime_secs,
        }
    }

    fn mac(&self, issued: u32, ip: IpAddr) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&issued.to_be_bytes());
        match ip {
            IpAddr::V4(v4) => ctx.update(&v4.octets()),
            IpAddr::V6(v6) => ctx.update(&v6.octets()),
        }
        ctx.sign()
    }

    /// A nonce for a client at `ip`, issued at `now_secs` (seconds on the
    /// core's clock).
    pub fn mint(&self, now_secs: u64, ip: IpAddr) -> [u8; NONCE_LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let issued = now_secs as u32;
        let mut out = [0u8; NONCE_LEN];
        let mut raw = [0u8; NONCE_LEN / 2];
        raw[..4].copy_from_slice(&issued.to_be_bytes());
        raw[4..].copy_from_slice(&self.mac(issued, ip).as_ref()[..12]);
        for (i, b) in raw.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        out
    }

    /// Checks a nonce a client at `ip` sent back.
    pub fn verify(&self, nonce: &str, now_secs: u64, ip: IpAddr) -> Result<(), NonceError> {
        let bytes = nonce.as_bytes();
        if bytes.len() != NONCE_LEN {
            return Err(NonceError::Invalid);
        }
        let mut raw = [0u8; NONCE_LEN / 2];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or(NonceError::Invalid)?;
            let lo = hex_digit(pair[1]).ok_or(NonceError::Invalid)?;
            raw[i] = hi << 4 | lo;
        }
        let issued = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let expected = self.mac(issued, ip);
        if !constant_time_eq(&raw[4..], &expected.as_ref()[..12]) {
            return Err(NonceError::Invalid);
        }
        let now = now_secs as u32;
        if now.wrapping_sub(issued) >= self.lifetime_secs as u32 {
            return Err(NonceError::Stale);
        }
        Ok(())
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_verifies_for_its_client_until_it_goes_stale() {
        let n = Nonces::new(b"k", 600);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let nonce = n.mint(1000, ip);
        let s = std::str::from_utf8(&nonce).unwrap();
        assert_eq!(n.verify(s, 1000, ip), Ok(()));
        assert_eq!(n.verify(s, 1599, ip), Ok(()));
        assert_eq!(n.verify(s, 1600, ip), Err(NonceError::Stale));
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(n.verify(s, 1000, other), Err(NonceError::Invalid));
        let forged = Nonces::new(b"other key", 600).mint(1000, ip);
        assert_eq!(
            n.verify(std::str::from_utf8(&forged).unwrap(), 1000, ip),
            Err(NonceError::Invalid)
        );
        assert_eq!(n.verify("short", 1000, ip), Err(NonceError::Invalid));
    }
}

//! Credentials for lookup's API: keys an operator creates (`natrix apikey
//! create`), each with scopes, stored as a digest only.
//!
//! A key reads `nxk_<id>_<secret>`: the id (12 hex digits) names it in
//! logs, metrics and `natrix apikey list`; the secret (32 hex digits) is
//! shown once, at creation, and kept only as its SHA-256. Clients send it
//! as `Authorization: Bearer nxk_…`.

use std::collections::HashMap;

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::secret::{Redacted, constant_time_eq};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// `POST /v1/plan`: plans, relay tokens and exchange invitations.
    #[serde(rename = "plan")]
    Plan,
    /// `GET /v1/relays`: the relay inventory.
    #[serde(rename = "relays:read")]
    RelaysRead,
    /// `POST /v1/devices`: register a device for the grant's `sub` (a
    /// handle). Meaningful in grants; a key with it registers nothing.
    #[serde(rename = "register")]
    Register,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Plan, Scope::RelaysRead, Scope::Register];

    /// Its name on the command line and in the store.
    pub const fn label(self) -> &'static str {
        match self {
            Scope::Plan => "plan",
            Scope::RelaysRead => "relays:read",
            Scope::Register => "register",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.label() == s)
            .ok_or_else(|| format!("a scope is `plan`, `relays:read` or `register`, not {s:?}"))
    }
}

/// Hex digits of a key id.
const ID_HEX: usize = 12;
/// Hex digits of a key secret.
const SECRET_HEX: usize = 32;

/// A full API key (id and secret): what a client holds.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    id: String,
    secret: Redacted,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}: <redacted>)", self.id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ApiKey {
    /// A new key from 22 random bytes (6 for the id, 16 for the secret).
    pub fn generate(random: [u8; 22]) -> ApiKey {
        ApiKey {
            id: hex(&random[..6]),
            secret: Redacted::new(hex(&random[6..])),
        }
    }

    /// Its id (not secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full key, to show once.
    pub fn expose(&self) -> String {
        format!("nxk_{}_{}", self.id, self.secret.expose())
    }

    /// The SHA-256 of its secret, hex: what the store keeps.
    pub fn digest(&self) -> String {
        hex(digest::digest(&digest::SHA256, self.secret.expose().as_bytes()).as_ref())
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    fn from_str(s: &str) -> Result<ApiKey, String> {
        let bad = || "an API key reads nxk_<12 hex digits>_<32 hex digits>".to_owned();
        let rest = s.trim().strip_prefix("nxk_").ok_or_else(bad)?;
        let (id, secret) = rest.split_once('_').ok_or_else(bad)?;
        let is_hex = |v: &str, n: usize| {
            v.len() == n
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, ID_HEX) || !is_hex(secret, SECRET_HEX) {
            return Err(bad());
        }
        Ok(ApiKey {
            id: id.to_owned(),
            secret: Redacted::new(secret.to_owned()),
        })
    }
}

/// A key as the store keeps it (the id is the hash field).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// What the operator called it.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// SHA-256 of the secret, hex.
    pub digest: String,
    /// When it was created (Unix ms).
    pub created_ms: u64,
    /// Requests per second it may make; `None`: lookup's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// Live sessions it may hold; `None`: lookup's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u64>,
}

/// Why a request is not authorised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header (401).
    Missing,
    /// Not a key, or not one this cluster knows (401).
    Invalid,
    /// A valid key without the scope (403).
    Forbidden,
}

impl AuthError {
    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::Forbidden => "forbidden",
        }
    }
}

/// The keys a lookup node accepts, by id.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: HashMap<String, KeyRecord>,
}

impl KeyRing {
    /// A ring of `keys` (id, record).
    pub fn new(keys: impl IntoIterator<Item = (String, KeyRecord)>) -> KeyRing {
        KeyRing {
            keys: keys.into_iter().collect(),
        }
    }

    /// This ring with `more` keys (a key already in it stays as it is).
    pub fn with(mut self, more: impl IntoIterator<Item = (String, KeyRecord)>) -> KeyRing {
        for (id, record) in more {
            self.keys.entry(id).or_insert(record);
        }
        self
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an `Authorization` header value for `scope`; the key's id
    /// and record when it is allowed.
    pub fn authorize(
        &self,
        header: Option<&str>,
        scope: Scope,
    ) -> Result<(&str, &KeyRecord), AuthError> {
        let token = bearer(header)?;
        let key: ApiKey = token.parse().map_err(|_| AuthError::Invalid)?;
        let (id, record) = self
            .keys
            .get_key_value(key.id())
            .ok_or(AuthError::Invalid)?;
        if !constant_time_eq(key.digest().as_bytes(), record.digest.as_bytes()) {
            return Err(AuthError::Invalid);
        }
        if !record.scopes.contains(&scope) {
            return Err(AuthError::Forbidden);
        }
        Ok((id, record))
    }
}

/// The credential of an `Authorization: Bearer …` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    Ok(value
        .strip_prefix("Bearer ")
        .ok_or(AuthError::Missing)?
        .trim())
}

/// Whether a bearer credential is an API key (`nxk_…`) rather than a
/// grant.
pub fn is_api_key(credential: &str) -> bool {
    credential.starts_with("nxk_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &ApiKey, scopes: &[Scope]) -> (String, KeyRecord) {
        (
            key.id().to_owned(),
            KeyRecord {
                name: "test".into(),
                scopes: scopes.to_vec(),
                digest: key.digest(),
                created_ms: 1,
                rate: None,
                max_sessions: None,
            },
        )
    }

    #[test]
    fn keys_read_back_and_never_show_their_secret_in_debug() {
        let k = ApiKey::generate([7; 22]);
        let text = k.expose();
        assert!(text.starts_with("nxk_070707070707_"));
        assert_eq!(text.parse::<ApiKey>().unwrap(), k);
        assert!(!format!("{k:?}").contains(&text[17..]));
        for bad in [
            "",
            "nxk_",
            "nxk_0707_07",
            "xxk_070707070707_07070707070707070707070707070707",
        ] {
            assert!(bad.parse::<ApiKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ring_checks_presence_secret_and_scope() {
        let plan = ApiKey::generate([1; 22]);
        let read = ApiKey::generate([2; 22]);
        let ring = KeyRing::new([
            record(&plan, &[Scope::Plan]),
            record(&read, &[Scope::RelaysRead]),
        ]);
        let bearer = |k: &ApiKey| format!("Bearer {}", k.expose());
        assert_eq!(
            ring.authorize(Some(&bearer(&plan)), Scope::Plan)
                .map(|(id, _)| id),
            Ok(plan.id())
        );
        assert_eq!(ring.authorize(None, Scope::Plan), Err(AuthError::Missing));
        assert_eq!(
            ring.authorize(Some("Basic abc"), Scope::Plan),
            Err(AuthError::Missing)
        );
        assert_eq!(
            ring.authorize(Some(&bearer(&read)), Scope::Plan),
            Err(AuthError::Forbidden)
        );
        // The right id with another secret.
        let forged = format!("Bearer nxk_{}_{}", plan.id(), "0".repeat(32));
        assert_eq!(
            ring.authorize(Some(&forged), Scope::Plan),
            Err(AuthError::Invalid)
        );
        let unknown = ApiKey::generate([3; 22]);
        assert_eq!(
            ring.authorize(Some(&bearer(&unknown)), Scope::Plan),
            Err(AuthError::Invalid)
        );
    }
}

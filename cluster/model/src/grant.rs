//! Signed grants: short-lived credentials an application's backend mints
//! for its own callers, verified without a store read.
//!
//! The operator shares a *grant secret* with an application backend (the
//! one secret format: `key-id=secret`, several at once for rotation). The
//! backend mints a grant for a caller it already trusts; natrix checks the
//! signature, the expiry and the scopes, and counts the grant's use against
//! its key id (the tenant: rates, live-session caps and metrics are per key
//! id, as they are for API keys).
//!
//! A grant is a JSON Web Token (RFC 7519) with HS256, so any JWT library
//! mints one:
//!
//! ```text
//! header  {"alg":"HS256","typ":"JWT","kid":"<grant key id>"}
//! claims  {"aud":"natrix","sub":"<who>","exp":<unix s>,"iat":<unix s>,
//!          "scope":"plan relays:read"}
//! ```
//!
//! Rules (each refusal has its own [`GrantError`]): the algorithm is HS256
//! and nothing else (no `none`, no key confusion); `kid` names a secret the
//! node holds; `aud` is `natrix` (a token the same backend signs for another
//! service is not a grant); `exp` is required, and a grant lives at most
//! [`MAX_GRANT_TTL`] (from `iat` when given, and from now); `nbf` is
//! honoured; [`CLOCK_LEEWAY`] absorbs clock skew between the backend and
//! natrix; `sub` is at most 128 bytes; the whole token at most
//! [`MAX_GRANT_LEN`] bytes.

use std::collections::HashMap;

use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::apikey::Scope;
use crate::secret::{TurnSecret, constant_time_eq};

/// A grant secret: the same rule as a TURN secret (`key-id=secret`, at
/// least 16 bytes after the `=`).
pub type GrantSecret = TurnSecret;

/// Longest a grant may live (from its `iat`, and from the moment it is
/// checked).
pub const MAX_GRANT_TTL: u64 = 3600;
/// Clock skew tolerated between the minting backend and natrix (seconds).
pub const CLOCK_LEEWAY: u64 = 30;
/// Longest grant accepted (bytes, before decoding).
pub const MAX_GRANT_LEN: usize = 4096;
/// Longest `sub`.
pub const MAX_SUBJECT_LEN: usize = 128;
/// The audience every grant names.
pub const AUDIENCE: &str = "natrix";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    kid: String,
}

/// What a grant says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Must be [`AUDIENCE`].
    pub aud: String,
    /// Who the backend minted it for (its own user or device id).
    pub sub: String,
    /// Unix seconds after which it is refused.
    pub exp: u64,
    /// Unix seconds when it was minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Unix seconds before which it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Space-separated scopes (`plan`, `relays:read`, `register`).
    pub scope: String,
    /// With `register`: the one device id the grant may register (binds
    /// the grant to the device key its backend saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// A grant that verified: the key id that signed it (the tenant) and its
/// claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The grant secret's key id.
    pub kid: String,
    /// Its claims.
    pub claims: Claims,
}

/// Why a grant is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Not three base64url parts of JSON, or over the length limit.
    #[error("not a grant (a JWT: header.claims.signature, base64url)")]
    Malformed,
    /// An algorithm other than HS256.
    #[error("grants are signed with HS256, not {0:?}")]
    Algorithm(String),
    /// No grant secret with this key id.
    #[error("no grant secret has key id {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the grant's signature does not verify")]
    Signature,
    /// `aud` is not `natrix`.
    #[error("the grant's aud is {0:?}, not \"natrix\"")]
    Audience(String),
    /// Past `exp`.
    #[error("the grant expired")]
    Expired,
    /// Before `nbf`.
    #[error("the grant is not valid yet")]
    NotYetValid,
    /// `exp` too far from `iat` or from now.
    #[error("a grant lives at most 3600 s")]
    TooLong,
    /// `sub` empty or too long.
    #[error("the grant's sub must be 1 to 128 bytes")]
    Subject,
    /// The grant lacks the scope asked for.
    #[error("the grant lacks the `{}` scope", .0.label())]
    Forbidden(Scope),
}

fn sign(secret: &GrantSecret, signed: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret.bytes()), signed)
}

/// Mints a grant under `secret` (what an application backend does; natrix
/// does it for `natrix grant` and tests).
pub fn mint(secret: &GrantSecret, claims: &Claims) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
        kid: secret.key_id().to_owned(),
    };
    let mut token = format!(
        "{}.{}",
        B64.encode(serde_json::to_vec(&header).unwrap_or_default()),
        B64.encode(serde_json::to_vec(claims).unwrap_or_default())
    );
    let tag = sign(secret, token.as_bytes());
    token.push('.');
    token.push_str(&B64.encode(tag.as_ref()));
    token
}

/// The grant secrets a node accepts, by key id.
#[derive(Clone, Debug, Default)]
pub struct GrantRing {
    secrets: HashMap<String, GrantSecret>,
}

impl GrantRing {
    /// A ring of `secrets` (a later secret with a key id already present
    /// is ignored).
    pub fn new(secrets: impl IntoIterator<Item = GrantSecret>) -> GrantRing {
        let mut map = HashMap::new();
        for s in secrets {
            map.entry(s.key_id().to_owned()).or_insert(s);
        }
        GrantRing { secrets: map }
    }

    /// True when it holds no secret (grants are then refused as unknown).
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The key ids it holds.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }

    /// Verifies `token` for `scope` at `now` (Unix seconds).
    pub fn verify(&self, token: &str, scope: Scope, now: u64) -> Result<Verified, GrantError> {
        if token.len() > MAX_GRANT_LEN {
            return Err(GrantError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(GrantError::Malformed);
        };
        let header: Header = decode(h)?;
        if header.alg != "HS256" {
            return Err(GrantError::Algorithm(header.alg));
        }
        let secret = self
            .secrets
            .get(&header.kid)
            .ok_or_else(|| GrantError::UnknownKey(header.kid.clone()))?;
        let tag = B64.decode(s).map_err(|_| GrantError::Malformed)?;
        let expected = sign(secret, &token.as_bytes()[..h.len() + 1 + c.len()]);
        if !constant_time_eq(expected.as_ref(), &tag) {
            return Err(GrantError::Signature);
        }
        // Only signed claims are parsed past this point.
        let claims: Claims = decode(c)?;
        check_claims(&claims, scope, now)?;
        Ok(Verified {
            kid: header.kid,
            claims,
        })
    }
}

fn decode<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, GrantError> {
    let bytes = B64.decode(part).map_err(|_| GrantError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| GrantError::Malformed)
}

fn check_claims(claims: &Claims, scope: Scope, now: u64) -> Result<(), GrantError> {
    if claims.aud != AUDIENCE {
        return Err(GrantError::Audience(claims.aud.clone()));
    }
    if claims.exp + CLOCK_LEEWAY <= now {
        return Err(GrantError::Expired);
    }
    if claims.nbf.is_some_and(|nbf| nbf > now + CLOCK_LEEWAY) {
        return Err(GrantError::NotYetValid);
    }
    let too_long_from = |t: u64| claims.exp.saturating_sub(t) > MAX_GRANT_TTL + CLOCK_LEEWAY;
    if too_long_from(now) || claims.iat.is_some_and(too_long_from) {
        return Err(GrantError::TooLong);
    }
    if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_LEN {
        return Err(GrantError::Subject);
    }
    if !claims.scope.split(' ').any(|s| s == scope.label()) {
        return Err(GrantError::Forbidden(scope));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn secret() -> GrantSecret {
        "app1=grant-secret-0123456789".parse().unwrap()
    }

    fn claims() -> Claims {
        Claims {
            aud: AUDIENCE.into(),
            sub: "alice".into(),
            exp: NOW + 600,
            iat: Some(NOW),
            nbf: None,
            scope: "plan".into(),
            dev: None,
        }
    }

    #[test]
    fn a_minted_grant_verifies_and_names_its_key() {
        let ring = GrantRing::new([secret()]);
        let token = mint(&secret(), &claims());
        let v = ring.verify(&token, Scope::Plan, NOW).unwrap();
        assert_eq!(v.kid, "app1");
        assert_eq!(v.claims, claims());
        assert_eq!(
            ring.verify(&token, Scope::RelaysRead, NOW),
            Err(GrantError::Forbidden(Scope::RelaysRead))
        );
    }

    #[test]
    fn an_independent_hs256_signature_verifies() {
        // Signed by PyJWT 2.15: jwt.encode({"aud":"natrix","sub":"bob",
        // "exp":1800000600,"scope":"plan relays:read"},
        // "grant-secret-0123456789", headers={"kid":"app1"}).
        let token = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImFwcDEiLCJ0eXAiOiJKV1QifQ.\
eyJhdWQiOiJuYXRyaXgiLCJzdWIiOiJib2IiLCJleHAiOjE4MDAwMDA2MDAsInNjb3BlIjoicGxhbiByZWxheXM6cmVhZCJ9.\
drsjN9IlyuUbFdHIPna7cpe81VXs-f8Y9ufoSOwAiy0";
        let ring = GrantRing::new([secret()]);
        let v = ring.verify(token, Scope::RelaysRead, NOW).unwrap();
        assert_eq!(v.claims.sub, "bob");
    }

    #[test]
    fn forged_and_out_of_bounds_grants_are_refused_with_their_reason() {
        let ring = GrantRing::new([secret()]);
        let other: GrantSecret = "app1=another-secret-0123456".parse().unwrap();
        assert_eq!(
            ring.verify(&mint(&other, &claims()), Scope::Plan, NOW),
            Err(GrantError::Signature)
        );
        let stranger: GrantSecret = "app2=grant-secret-0123456789".parse().unwrap();
        assert_eq!(
            ring.verify(&mint(&stranger, &claims()), Scope::Plan, NOW),
            Err(GrantError::UnknownKey("app2".into()))
        );
        type Change = fn(&mut Claims);
        let cases: [(Change, GrantError); 6] = [
            (|c| c.exp = NOW - 31, GrantError::Expired),
            (|c| c.nbf = Some(NOW + 60), GrantError::NotYetValid),
            (|c| c.exp = NOW + 7200, GrantError::TooLong),
            (
                |c| c.iat = Some(NOW - 4000),
                GrantError::TooLong, // exp is 4600 s after iat
            ),
            (
                |c| c.aud = "other".into(),
                GrantError::Audience("other".into()),
            ),
            (|c| c.sub = "x".repeat(129), GrantError::Subject),
        ];
        for (change, want) in cases {
            let mut c = claims();
            change(&mut c);
            assert_eq!(
                ring.verify(&mint(&secret(), &c), Scope::Plan, NOW),
                Err(want)
            );
        }
        // Within the leeway.
        let mut late = claims();
        late.exp = NOW - 10;
        assert!(
            ring.verify(&mint(&secret(), &late), Scope::Plan, NOW)
                .is_ok()
        );
    }

    #[test]
    fn alg_none_tampered_claims_and_junk_are_refused() {
        let ring = GrantRing::new([secret()]);
        let token = mint(&secret(), &claims());
        let parts: Vec<&str> = token.split('.').collect();
        let none = B64.encode(br#"{"alg":"none","kid":"app1"}"#);
        assert_eq!(
            ring.verify(&format!("{none}.{}.", parts[1]), Scope::Plan, NOW),
            Err(GrantError::Algorithm("none".into()))
        );
        let mut richer = claims();
        richer.scope = "plan relays:read".into();
        let swapped = B64.encode(serde_json::to_vec(&richer).unwrap());
        assert_eq!(
            ring.verify(
                &format!("{}.{swapped}.{}", parts[0], parts[2]),
                Scope::Plan,
                NOW
            ),
            Err(GrantError::Signature)
        );
        for junk in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            &"a".repeat(MAX_GRANT_LEN + 1),
        ] {
            assert_eq!(
                ring.verify(junk, Scope::Plan, NOW),
                Err(GrantError::Malformed),
                "{junk:.20}"
            );
        }
    }
}

//! TURN REST credentials and session-bound relay tokens, minted by lookup
//! and verified by relays (ARCHITECTURE.md, "Relay selection and tokens").
//!
//! A TURN REST username starts with its expiry in Unix seconds,
//! `<expiry>[:<more>]`; its password is `base64(HMAC-SHA1(secret,
//! username))` under a shared [`TurnSecret`] (the scheme of coturn's
//! `use-auth-secret`). A session token is a REST username of the form
//! `<expiry>:<session>[.<tenant>]:<relay-id>[:<peers>]`: the relay it names
//! accepts it until expiry, under any secret it still holds, `<tenant>` (the
//! API key or grant key id the plan was made for) is what the relay's
//! per-tenant allocation quota counts, and `<peers>` (the counterpart's IPs,
//! comma separated) scopes the allocation's permissions to those peers.

use std::net::IpAddr;

use base64::Engine as _;
use ring::hmac;

use crate::secret::TurnSecret;

/// The TURN REST password of `username` under `secret`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// The expiry (Unix seconds) of a TURN REST username; `None` when the
/// username is not one (its first field is not a number).
pub fn rest_expiry(username: &str) -> Option<u64> {
    username.split(':').next()?.parse().ok()
}

/// Hex digits of a session id in a token (16 bytes).
const SESSION_HEX: usize = 32;
/// Longest tenant id in a token.
pub const MAX_TENANT_LEN: usize = 72;

/// Whether `t` may name a tenant in a token: 1 to [`MAX_TENANT_LEN`] of
/// `A-Z a-z 0-9 . _ -` (API key ids and grant key ids both fit).
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TENANT_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A session-bound relay token: what lookup mints for one side of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionToken {
    /// Unix seconds after which relays refuse it.
    pub expires: u64,
    /// The session id (hex).
    pub session: String,
    /// The tenant the plan was made for (an API key id, or `g-<grant key
    /// id>`); `None` for tokens minted without one.
    pub tenant: Option<String>,
    /// The relay that accepts it (no `:` in it).
    pub relay_id: String,
    /// The peers its allocation may reach: `None` for no restriction beyond
    /// the relay's deny list. An unparsable list reads as empty, so that a
    /// broken token reaches nobody rather than everybody.
    pub peers: Option<Vec<IpAddr>>,
}

impl SessionToken {
    /// The TURN username, `<expiry>:<session>[.<tenant>]:<relay-id>[:<peers>]`.
    pub fn username(&self) -> String {
        let mut u = format!("{}:{}", self.expires, self.session);
        if let Some(t) = &self.tenant {
            u.push('.');
            u.push_str(t);
        }
        u.push(':');
        u.push_str(&self.relay_id);
        if let Some(peers) = &self.peers {
            u.push(':');
            let list: Vec<String> = peers.iter().map(ToString::to_string).collect();
            u.push_str(&list.join(","));
        }
        u
    }

    /// Reads a session token from a TURN username; `None` when the username
    /// is not one: a session token is `<expiry>:<session id, 32 hex
    /// digits>[.<tenant>]:<relay id>[:<peers>]`, so a REST username of an application
    /// with colons of its own (`1700000000:alice:phone`) stays a plain
    /// REST username.
    pub fn parse(username: &str) -> Option<SessionToken> {
        let (expires, (session, tenant), relay_id, peers) = Self::fields(username)?;
        let peers = peers.map(|list| {
            list.split(',')
                .map(str::parse)
                .collect::<Result<Vec<IpAddr>, _>>()
                .unwrap_or_default()
        });
        Some(SessionToken {
            expires,
            session: session.to_owned(),
            tenant: tenant.map(str::to_owned),
            relay_id: relay_id.to_owned(),
            peers,
        })
    }

    /// The fields of a session-token username, checked for shape.
    #[allow(clippy::type_complexity)]
    fn fields(username: &str) -> Option<(u64, (&str, Option<&str>), &str, Option<&str>)> {
        let mut fields = username.splitn(4, ':');
        let expires = fields.next()?.parse().ok()?;
        let field = fields.next()?;
        let (session, tenant) = match field.split_once('.') {
            Some((s, t)) => (s, Some(t)),
            None => (field, None),
        };
        let relay_id = fields.next()?;
        let is_session =
            session.len() == SESSION_HEX && session.bytes().all(|b| b.is_ascii_hexdigit());
        let tenant_ok = tenant.is_none_or(valid_tenant);
        (is_session && tenant_ok && !relay_id.is_empty()).then_some((
            expires,
            (session, tenant),
            relay_id,
            fields.next(),
        ))
    }

    /// The relay a session-token username names, without copying; `None`
    /// when the username is not a session token.
    pub fn relay_of(username: &str) -> Option<&str> {
        Self::fields(username).map(|(_, _, relay, _)| relay)
    }

    /// The session id and tenant of a session-token username, without
    /// copying; `None` when the username is not a session token.
    pub fn session_of(username: &str) -> Option<(&str, Option<&str>)> {
        Self::fields(username).map(|(_, session, _, _)| session)
    }

    /// The username and password of this token under `secret`.
    pub fn mint(&self, secret: &TurnSecret) -> (String, String) {
        let username = self.username();
        let password = rest_password(secret.bytes(), &username);
        (username, password)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn rest_password_matches_an_independent_computation() {
        // Python: base64(hmac.new(b"secret", b"1700000000:alice", sha1)).
        assert_eq!(
            rest_password(b"secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
        assert_eq!(rest_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice"), None);
    }

    #[test]
    fn tokens_name_session_relay_and_peers_and_read_back() {
        let secret: TurnSecret = "k1=0123456789abcdef".parse().unwrap();
        let mut t = SessionToken {
            expires: 1_700_000_000,
            session: S.into(),
            tenant: None,
            relay_id: "relay-a".into(),
            peers: None,
        };
        let (user, pass) = t.mint(&secret);
        assert_eq!(user, format!("1700000000:{S}:relay-a"));
        assert_eq!(pass, rest_password(b"0123456789abcdef", &user));
        assert_eq!(SessionToken::parse(&user), Some(t.clone()));
        assert_eq!(SessionToken::relay_of(&user), Some("relay-a"));
        t.peers = Some(vec![
            "198.51.100.7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ]);
        let scoped = t.username();
        assert_eq!(
            scoped,
            format!("1700000000:{S}:relay-a:198.51.100.7,2001:db8::1")
        );
        assert_eq!(SessionToken::parse(&scoped), Some(t.clone()));
        t.tenant = Some("0a1b2c3d4e5f".into());
        let tenanted = t.username();
        assert_eq!(
            tenanted,
            format!("1700000000:{S}.0a1b2c3d4e5f:relay-a:198.51.100.7,2001:db8::1")
        );
        assert_eq!(SessionToken::parse(&tenanted), Some(t.clone()));
        assert_eq!(
            SessionToken::session_of(&tenanted),
            Some((S, Some("0a1b2c3d4e5f")))
        );
        t.tenant = Some("g-app.1".into());
        assert_eq!(SessionToken::parse(&t.username()), Some(t));
        // A tenant with characters outside the set makes no session token.
        assert_eq!(
            SessionToken::parse(&format!("1700000000:{S}.a/b:relay-a")),
            None
        );
        assert_eq!(
            SessionToken::parse(&format!("1700000000:{S}.:relay-a")),
            None
        );
    }

    #[test]
    fn usernames_that_are_not_session_tokens_parse_as_none_and_bad_peers_as_nobody() {
        assert_eq!(SessionToken::parse("1700000000:alice"), None);
        assert_eq!(SessionToken::parse("alice:bob:carol"), None);
        assert_eq!(SessionToken::relay_of("1700000000:alice"), None);
        let broken = SessionToken::parse(&format!("1700000000:{S}:relay-a:not-an-ip")).unwrap();
        assert_eq!(broken.peers, Some(vec![]));
        // An application's REST usernames with colons of their own.
        for user in ["1700000000:alice:phone", "1700000000:00ff:relay-a:10.0.0.1"] {
            assert_eq!(SessionToken::parse(user), None, "{user}");
            assert_eq!(SessionToken::relay_of(user), None, "{user}");
        }
        assert_eq!(SessionToken::parse(&format!("1700000000:{S}:")), None);
    }
}

//! Session-bound relay tokens: TURN REST credentials whose username names
//! the session and the relay, `<expiry>:<session>:<relay-id>[:<peers>]`
//! (`<peers>`: the counterpart's IPs, comma separated; the relay then
//! admits permissions toward them only), and whose
//! password is `base64(HMAC-SHA1(secret, username))` under the newest
//! shared secret. Relays accept them until expiry, only when they name
//! themselves, under any secret they still hold (so a rotation breaks no
//! live session).

use base64::Engine as _;
use ring::hmac;

/// A shared TURN secret with its key id (`key-id=secret` on the command
/// line).
#[derive(Clone)]
pub struct TurnSecret {
    /// Name in logs (never the secret).
    pub key_id: String,
    /// The secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TurnSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TurnSecret({}: <redacted>)", self.key_id)
    }
}

impl std::str::FromStr for TurnSecret {
    type Err = String;
    fn from_str(s: &str) -> Result<TurnSecret, String> {
        let (id, secret) = s.split_once('=').ok_or("a TURN secret is key-id=secret")?;
        if id.is_empty() || secret.len() < 16 {
            return Err("a TURN secret needs a key id and at least 16 characters".into());
        }
        Ok(TurnSecret {
            key_id: id.to_owned(),
            secret: secret.as_bytes().to_vec(),
        })
    }
}

/// The username and password of a token for `relay_id` in `session`,
/// valid until `expires` (Unix seconds), scoped to `peers` when not empty.
pub fn mint(
    secret: &TurnSecret,
    expires: u64,
    session: &str,
    relay_id: &str,
    peers: &[std::net::IpAddr],
) -> (String, String) {
    let mut username = format!("{expires}:{session}:{relay_id}");
    if !peers.is_empty() {
        username.push(':');
        let list: Vec<String> = peers.iter().map(ToString::to_string).collect();
        username.push_str(&list.join(","));
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &secret.secret);
    let tag = hmac::sign(&key, username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_session_and_relay_and_match_an_independent_hmac() {
        let s: TurnSecret = "k1=0123456789abcdef".parse().unwrap();
        let (user, pass) = mint(&s, 1_700_000_000, "00ff", "relay-a", &[]);
        assert_eq!(user, "1700000000:00ff:relay-a");
        // HMAC-SHA1("0123456789abcdef", user), computed independently.
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"0123456789abcdef");
        let expect = base64::engine::general_purpose::STANDARD
            .encode(hmac::sign(&key, user.as_bytes()).as_ref());
        assert_eq!(pass, expect);
        let peers = [
            "198.51.100.7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let (scoped, _) = mint(&s, 1_700_000_000, "00ff", "relay-a", &peers);
        assert_eq!(scoped, "1700000000:00ff:relay-a:198.51.100.7,2001:db8::1");
        assert!("nokey".parse::<TurnSecret>().is_err());
        assert!("k=short".parse::<TurnSecret>().is_err());
        assert!(!format!("{s:?}").contains("0123"));
    }
}

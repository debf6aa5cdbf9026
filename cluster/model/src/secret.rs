//! Secrets: a redacting string, TURN REST secrets with their one parser, the
//! cluster secret, and one constant-time comparison.
//!
//! # The TURN secret rule
//!
//! A TURN REST secret is written `key-id=secret` everywhere: on the command
//! line (`--auth-secret`, relay and lookup alike), in a secrets file (one a
//! line), in the chart's Secret and in the coordination store. The key id
//! names the secret in logs, metrics and rotation (1 to 64 of `A-Z a-z 0-9 .
//! _ -`); the secret after the first `=` has at least
//! [`MIN_TURN_SECRET_LEN`] bytes. A value one role refuses is refused by
//! every role, at start, with a message that says what a valid value looks
//! like.

use std::str::FromStr;

/// Fewest bytes in a TURN REST secret (after `key-id=`).
pub const MIN_TURN_SECRET_LEN: usize = 16;
/// Fewest bytes in the cluster secret.
pub const MIN_CLUSTER_SECRET_LEN: usize = 16;
/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 64;

/// A string that never appears in logs or debug output (passwords, `name:
/// password` pairs, secrets). [`Redacted::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Redacted(String);

impl Redacted {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Redacted {
        Redacted(s.into())
    }

    /// The secret text, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Redacted, Self::Err> {
        Ok(Redacted(s.to_owned()))
    }
}

/// Why a TURN secret or a cluster secret was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No `=`: the value has no key id.
    #[error("a TURN secret is written key-id=secret (e.g. k1=<at least 16 characters>)")]
    MissingKeyId,
    /// The key id is empty, too long or has characters outside the set.
    #[error("the key id {0:?} must be 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadKeyId(String),
    /// The secret of key id `.0` is shorter than the minimum.
    #[error("the TURN secret of key id {0:?} needs at least 16 characters")]
    TooShort(String),
    /// The cluster secret is shorter than the minimum.
    #[error("the cluster secret needs at least 16 characters")]
    ClusterTooShort,
    /// A line of a secrets file is not a valid secret.
    #[error("line {line}: {error}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        error: Box<SecretError>,
    },
    /// A secrets file holds no secret.
    #[error("no secret in the file (one key-id=secret a line)")]
    Empty,
}

/// A shared TURN REST secret with its key id (the module docs give the
/// rule). Its `Debug` form shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnSecret {
    key_id: String,
    secret: Redacted,
}

impl TurnSecret {
    /// A secret named `key_id`, checked against the rule.
    pub fn new(key_id: &str, secret: &str) -> Result<TurnSecret, SecretError> {
        let valid_id = !key_id.is_empty()
            && key_id.len() <= MAX_KEY_ID_LEN
            && key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid_id {
            return Err(SecretError::BadKeyId(key_id.to_owned()));
        }
        if secret.len() < MIN_TURN_SECRET_LEN {
            return Err(SecretError::TooShort(key_id.to_owned()));
        }
        Ok(TurnSecret {
            key_id: key_id.to_owned(),
            secret: Redacted::new(secret),
        })
    }

    /// The key id (safe to log).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The secret bytes (HMAC key of the REST passwords).
    pub fn bytes(&self) -> &[u8] {
        self.secret.expose().as_bytes()
    }

    /// The secret text, for storing it.
    pub fn expose(&self) -> &str {
        self.secret.expose()
    }

    /// Reads a secrets file: one `key-id=secret` a line, newest first;
    /// blank lines and `#` comments ignored; an invalid line is an error
    /// naming it, and a file without a secret is one too.
    pub fn parse_list(text: &str) -> Result<Vec<TurnSecret>, SecretError> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(line.parse().map_err(|e| SecretError::Line {
                line: i + 1,
                error: Box::new(e),
            })?);
        }
        if out.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(out)
    }
}

impl std::fmt::Debug for TurnSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TurnSecret({}: <redacted>)", self.key_id)
    }
}

impl FromStr for TurnSecret {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<TurnSecret, SecretError> {
        let (id, secret) = s.split_once('=').ok_or(SecretError::MissingKeyId)?;
        TurnSecret::new(id.trim(), secret.trim())
    }
}

/// The cluster's shared secret (exchange tickets, CDX hand-offs), at least
/// [`MIN_CLUSTER_SECRET_LEN`] bytes. Its `Debug` form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Redacted);

impl ClusterSecret {
    /// The secret bytes.
    pub fn bytes(&self) -> &[u8] {
        self.0.expose().as_bytes()
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl FromStr for ClusterSecret {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<ClusterSecret, SecretError> {
        if s.len() < MIN_CLUSTER_SECRET_LEN {
            return Err(SecretError::ClusterTooShort);
        }
        Ok(ClusterSecret(Redacted::new(s)))
    }
}

/// Whether `a` and `b` are equal, in time that depends on their lengths
/// only (MACs, tags, nonces).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_secrets_follow_one_rule() {
        let s: TurnSecret = "k1=0123456789abcdef".parse().unwrap();
        assert_eq!(s.key_id(), "k1");
        assert_eq!(s.bytes(), b"0123456789abcdef");
        // Base64 padding stays in the secret: only the first '=' splits.
        let b64: TurnSecret = "k2=c2VjcmV0LXNlY3JldC1zZWNyZXQ==".parse().unwrap();
        assert_eq!(b64.expose(), "c2VjcmV0LXNlY3JldC1zZWNyZXQ==");
        assert_eq!(
            "0123456789abcdef0123".parse::<TurnSecret>(),
            Err(SecretError::MissingKeyId)
        );
        assert_eq!(
            "=0123456789abcdef".parse::<TurnSecret>(),
            Err(SecretError::BadKeyId(String::new()))
        );
        assert!(matches!(
            "k 1=0123456789abcdef".parse::<TurnSecret>(),
            Err(SecretError::BadKeyId(_))
        ));
        assert_eq!(
            "k=short".parse::<TurnSecret>(),
            Err(SecretError::TooShort("k".into()))
        );
        let msg = SecretError::MissingKeyId.to_string();
        assert!(msg.contains("key-id=secret"), "{msg}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s: TurnSecret = "k1=0123456789abcdef".parse().unwrap();
        let c: ClusterSecret = "cluster-secret-0123".parse().unwrap();
        let r = Redacted::new("alice:wonderland");
        for shown in [format!("{s:?}"), format!("{c:?}"), format!("{r:?}")] {
            assert!(
                !shown.contains("0123") && !shown.contains("wonder"),
                "{shown}"
            );
        }
        assert!(format!("{s:?}").contains("k1"));
        assert_eq!(
            "short".parse::<ClusterSecret>(),
            Err(SecretError::ClusterTooShort)
        );
    }

    #[test]
    fn a_secrets_file_names_its_bad_line() {
        let file = "# rotated 2026-11-30\nk2=new-secret-0123456789\n\nk1=old-secret-0123456789\n";
        let list = TurnSecret::parse_list(file).unwrap();
        let ids: Vec<&str> = list.iter().map(TurnSecret::key_id).collect();
        assert_eq!(ids, ["k2", "k1"]);
        let bad = TurnSecret::parse_list("k2=new-secret-0123456789\nbare-secret-0123456789\n");
        assert_eq!(
            bad.unwrap_err().to_string(),
            "line 2: a TURN secret is written key-id=secret (e.g. k1=<at least 16 characters>)"
        );
        assert_eq!(TurnSecret::parse_list("# none\n"), Err(SecretError::Empty));
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"abcd", b"abcd"));
        assert!(!constant_time_eq(b"abcd", b"abce"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}

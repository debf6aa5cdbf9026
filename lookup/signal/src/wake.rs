//! Waking a device that holds no push socket: Web Push (RFC 8030 delivery,
//! RFC 8291 `aes128gcm` message encryption, RFC 8292 VAPID) or a signed
//! webhook to the operator's bridge to APNs/FCM. The woken device opens
//! its socket (or calls `GET /v1/push/pending`) and drains its mailbox, so
//! a wake carries the frame when it fits and a `wake` stub when it does
//! not.
//!
//! All cryptography is `ring`'s: P-256 ECDH, HMAC-SHA-256 (HKDF),
//! AES-128-GCM, ECDSA P-256 for the VAPID JWT.

use std::time::Duration;

use base64::Engine as _;
use ring::rand::SecureRandom as _;
use ring::signature::KeyPair as _;
use ring::{aead, agreement, hmac, rand::SystemRandom, signature};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Record size announced in the aes128gcm header (one record per message).
const RECORD_SIZE: u32 = 4096;
/// Largest plaintext one Web Push message carries (4096 − header − tag −
/// delimiter).
pub const MAX_WEBPUSH_PLAINTEXT: usize = 3993;

fn hmac256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Why a Web Push message could not be made.
#[derive(Debug, PartialEq, Eq)]
pub enum EncryptError {
    /// The subscription's `p256dh` or `auth` is not a valid key/secret.
    BadSubscription,
    /// The plaintext is over [`MAX_WEBPUSH_PLAINTEXT`].
    TooLarge,
    /// The random source failed.
    Random,
}

/// Encrypts `plaintext` for a subscription (RFC 8291): the body to POST,
/// with `Content-Encoding: aes128gcm`.
pub fn encrypt(p256dh: &[u8], auth: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, EncryptError> {
    if plaintext.len() > MAX_WEBPUSH_PLAINTEXT {
        return Err(EncryptError::TooLarge);
    }
    if p256dh.len() != 65 || auth.len() != 16 {
        return Err(EncryptError::BadSubscription);
    }
    let rng = SystemRandom::new();
    let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(|_| EncryptError::Random)?;
    let as_public = ephemeral
        .compute_public_key()
        .map_err(|_| EncryptError::Random)?;
    let ua_public = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, p256dh);
    let ecdh_secret = agreement::agree_ephemeral(ephemeral, &ua_public, |s| s.to_vec())
        .map_err(|_| EncryptError::BadSubscription)?;
    // RFC 8291 §3.4: IKM from the ECDH secret and the auth secret.
    let prk_key = hmac256(auth, &[&ecdh_secret]);
    let ikm = hmac256(
        &prk_key,
        &[b"WebPush: info\0", p256dh, as_public.as_ref(), &[1]],
    );
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| EncryptError::Random)?;
    // RFC 8188: content key and nonce.
    let prk = hmac256(&salt, &[&ikm]);
    let cek = hmac256(&prk, &[b"Content-Encoding: aes128gcm\0", &[1]]);
    let nonce = hmac256(&prk, &[b"Content-Encoding: nonce\0", &[1]]);
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_128_GCM, &cek[..16])
            .unwrap_or_else(|_| unreachable!("16 bytes make an AES-128 key")),
    );
    let mut record = plaintext.to_vec();
    record.push(2); // the last record's delimiter, no padding
    let mut n = [0u8; 12];
    n.copy_from_slice(&nonce[..12]);
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(n),
        aead::Aad::empty(),
        &mut record,
    )
    .map_err(|_| EncryptError::TooLarge)?;
    let mut body = Vec::with_capacity(16 + 4 + 1 + 65 + record.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(65);
    body.extend_from_slice(as_public.as_ref());
    body.extend_from_slice(&record);
    Ok(body)
}

/// The application server's VAPID identity (RFC 8292).
pub struct Vapid {
    key: signature::EcdsaKeyPair,
    subject: String,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vapid({})", self.public_key())
    }
}

impl Vapid {
    /// A new PKCS#8 P-256 key (what `natrix` stores in the cluster when
    /// none is configured).
    pub fn generate_pkcs8() -> Option<Vec<u8>> {
        signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .ok()
        .map(|d| d.as_ref().to_vec())
    }

    /// The identity of a PKCS#8 P-256 key, with `subject` (`mailto:` or
    /// `https:`) as the contact push services see.
    pub fn new(pkcs8: &[u8], subject: &str) -> Option<Vapid> {
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .ok()?;
        Some(Vapid {
            key,
            subject: subject.to_owned(),
        })
    }

    /// The public key browsers pass to `PushManager.subscribe`
    /// (`applicationServerKey`), base64url.
    pub fn public_key(&self) -> String {
        B64.encode(self.key.public_key().as_ref())
    }

    /// The `Authorization` header for a push to `endpoint` at `now` (Unix
    /// seconds): `vapid t=<ES256 JWT>, k=<public key>`.
    pub fn authorization(&self, endpoint: &str, now: u64) -> Option<String> {
        let origin = origin(endpoint)?;
        let header = B64.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = B64.encode(
            serde_json::json!({"aud": origin, "exp": now + 12 * 3600, "sub": self.subject})
                .to_string(),
        );
        let signed = format!("{header}.{claims}");
        let sig = self
            .key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .ok()?;
        Some(format!(
            "vapid t={signed}.{}, k={}",
            B64.encode(sig.as_ref()),
            self.public_key()
        ))
    }
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next()?;
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// What a wake attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeResult {
    /// The push service or bridge took it.
    Sent,
    /// The subscription is gone (404/410): the device must re-subscribe.
    Gone,
    /// Any other failure (network, 4xx/5xx, bad subscription).
    Failed,
}

impl WakeResult {
    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            WakeResult::Sent => "sent",
            WakeResult::Gone => "gone",
            WakeResult::Failed => "failed",
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn status_result(status: u16) -> WakeResult {
    match status {
        200..=299 => WakeResult::Sent,
        404 | 410 => WakeResult::Gone,
        _ => WakeResult::Failed,
    }
}

/// Sends a Web Push message with a prepared VAPID `Authorization` header
/// (blocking: run it off the event loop).
pub fn web_push_with(
    authorization: &Option<String>,
    endpoint: &str,
    p256dh: &str,
    auth: &str,
    payload: &[u8],
    ttl: Duration,
    topic: &str,
) -> WakeResult {
    let (Ok(p256dh), Ok(auth)) = (
        B64.decode(p256dh.trim_end_matches('=')),
        B64.decode(auth.trim_end_matches('=')),
    ) else {
        return WakeResult::Failed;
    };
    let Ok(body) = encrypt(&p256dh, &auth, payload) else {
        return WakeResult::Failed;
    };
    let Some(authorization) = authorization else {
        return WakeResult::Failed;
    };
    // RFC 8030 §5.4: a Topic is at most 32 base64url characters.
    let topic: String = topic
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    let response = agent()
        .post(endpoint)
        .header("TTL", ttl.as_secs().max(1).to_string())
        .header("Urgency", "high")
        .header("Topic", &topic)
        .header("Content-Encoding", "aes128gcm")
        .header("Content-Type", "application/octet-stream")
        .header("Authorization", authorization)
        .send(&body[..]);
    match response {
        Ok(r) => status_result(r.status().as_u16()),
        Err(_) => WakeResult::Failed,
    }
}

/// Posts `body` to the operator's bridge with `X-Natrix-Timestamp` and
/// `X-Natrix-Signature: sha256=<hex HMAC-SHA-256(secret, timestamp "." body)>`
/// (blocking).
pub fn webhook(url: &str, secret: &[u8], body: &[u8], now: u64) -> WakeResult {
    let ts = now.to_string();
    let mac = hmac256(secret, &[ts.as_bytes(), b".", body]);
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    let response = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Natrix-Timestamp", &ts)
        .header("X-Natrix-Signature", &format!("sha256={hex}"))
        .send(body);
    match response {
        Ok(r) => status_result(r.status().as_u16()),
        Err(_) => WakeResult::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vapid_jwt_names_the_endpoints_origin_and_verifies_with_its_key() {
        let pkcs8 = Vapid::generate_pkcs8().unwrap();
        let v = Vapid::new(&pkcs8, "mailto:ops@example.com").unwrap();
        let auth = v
            .authorization("https://push.example.net:8443/wpush/v2/abc", 1_800_000_000)
            .unwrap();
        let t = auth
            .strip_prefix("vapid t=")
            .unwrap()
            .split(", k=")
            .next()
            .unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example.net:8443");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        let public = B64.decode(v.public_key()).unwrap();
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &B64.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn encryption_refuses_bad_subscriptions_and_oversized_payloads() {
        assert_eq!(
            encrypt(&[4; 65], &[0; 16], b"x"),
            Err(EncryptError::BadSubscription),
            "not a curve point"
        );
        assert_eq!(
            encrypt(&[4; 10], &[0; 16], b"x"),
            Err(EncryptError::BadSubscription)
        );
        assert_eq!(
            encrypt(&[4; 65], &[0; 16], &[0; MAX_WEBPUSH_PLAINTEXT + 1]),
            Err(EncryptError::TooLarge)
        );
    }
}

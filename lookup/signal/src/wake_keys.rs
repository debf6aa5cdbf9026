//! The cluster's VAPID key: configured, or generated once and kept in the
//! coordination store so every replica signs with the same one (a browser's
//! subscription is bound to it).

use std::time::Duration;

use base64::Engine as _;
use natrix_store::{PutField, Store};
use tracing::{info, warn};

use crate::wake::Vapid;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const KEY: &str = "natrix:push:vapid";
/// The stored key outlives any deployment.
const TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// The VAPID identity: `configured` (PKCS#8, base64url) or the cluster's
/// stored one (created by the first replica that needs it). `None` when
/// neither is readable.
pub(crate) async fn load_vapid(
    store: &Store,
    configured: Option<natrix_model::Redacted>,
    subject: &str,
) -> Option<Vapid> {
    if let Some(k) = configured {
        let v = B64
            .decode(k.expose().trim())
            .ok()
            .and_then(|der| Vapid::new(&der, subject));
        if v.is_none() {
            warn!("--vapid-key is not a base64url PKCS#8 P-256 key: Web Push is off");
        }
        return v;
    }
    // A hash of at most one field, under a name of this replica's: the
    // first replica's insert wins, later ones are refused and read it.
    let fresh = Vapid::generate_pkcs8()?;
    let mine: String = (0..8)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let put = store
        .put_field(KEY, &mine, B64.encode(&fresh).as_bytes(), TTL, 1)
        .await
        .ok()?;
    if put == PutField::Inserted {
        info!("generated the cluster's VAPID key (stored in the coordination store)");
    }
    let stored = store.fields(KEY).await.ok()?.into_iter().next()?.1;
    let der = B64.decode(stored).ok()?;
    Vapid::new(&der, subject)
}

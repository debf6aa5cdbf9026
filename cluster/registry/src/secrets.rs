//! Shared TURN secrets in the coordination store, so that a rotation
//! reaches every relay and lookup within a heartbeat.
//!
//! The hash `natrix:secrets:turn` holds field = key id, value = JSON
//! `{"secret": …, "created_ms": …}`. `natrix secret rotate` adds a new
//! secret and keeps the [`KEEP`] newest: lookup mints tokens with the newest,
//! relays accept all of them, so tokens minted before a rotation stay valid
//! until they expire. The key's TTL ([`KEY_TTL`]) is renewed by every
//! rotation.

use std::time::Duration;

use natrix_model::TurnSecret;
use natrix_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::unix_ms;
use crate::watch::StoreWatcher;

/// The store key of the TURN secrets.
pub const KEY: &str = "natrix:secrets:turn";
/// Secrets kept after a rotation (the newest first).
pub const KEEP: usize = 3;
/// Life of the secrets key after the last rotation.
pub const KEY_TTL: Duration = Duration::from_secs(400 * 24 * 3600);

/// One shared secret as the store holds it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    /// Its key id (the hash field).
    #[serde(skip)]
    pub key_id: String,
    /// The secret.
    pub secret: String,
    /// When it was added (Unix ms).
    pub created_ms: u64,
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredSecret({}: <redacted>)", self.key_id)
    }
}

impl StoredSecret {
    /// The secret under the model's one rule; an error for a stored value
    /// no role would accept.
    pub fn turn_secret(&self) -> Result<TurnSecret, natrix_model::SecretError> {
        TurnSecret::new(&self.key_id, &self.secret)
    }
}

/// The secrets in the store, newest first.
pub async fn list(store: &Store) -> Result<Vec<StoredSecret>, StoreError> {
    let mut out: Vec<StoredSecret> = store
        .fields(KEY)
        .await?
        .into_iter()
        .filter_map(|(id, json)| {
            let mut s: StoredSecret = serde_json::from_slice(&json).ok()?;
            s.key_id = id;
            Some(s)
        })
        .collect();
    out.sort_by(|a, b| {
        b.created_ms
            .cmp(&a.created_ms)
            .then(b.key_id.cmp(&a.key_id))
    });
    Ok(out)
}

/// Adds a new random secret and prunes to the [`KEEP`] newest; returns the
/// new key id.
pub async fn rotate(store: &Store, secret: String) -> Result<String, StoreError> {
    let now = unix_ms();
    let key_id = format!("k{now}");
    let value = StoredSecret {
        key_id: key_id.clone(),
        secret,
        created_ms: now,
    };
    value
        .turn_secret()
        .map_err(|e| StoreError::Unexpected(e.to_string()))?;
    let json = serde_json::to_vec(&value).map_err(|e| StoreError::Unexpected(e.to_string()))?;
    store.put_field(KEY, &key_id, &json, KEY_TTL, 64).await?;
    for old in list(store).await?.into_iter().skip(KEEP) {
        store.delete_field(KEY, &old.key_id).await?;
    }
    Ok(key_id)
}

/// Watches the stored secrets and reports every change (newest first).
pub type SecretsWatcher = StoreWatcher<StoredSecret>;

impl StoreWatcher<StoredSecret> {
    /// A watcher reading every `interval`; `on_change` gets the secrets
    /// whenever their set changes (not when the store is unreachable: the
    /// last ones stay in use). A stored value that breaks the secret rule
    /// is skipped with a warning.
    pub fn new(
        store: Store,
        interval: Duration,
        on_change: Box<dyn Fn(Vec<TurnSecret>) + Send>,
    ) -> SecretsWatcher {
        StoreWatcher::watch(
            store,
            interval,
            "TURN secrets",
            |store| Box::pin(async move { list(&store).await }),
            Box::new(move |secrets: Vec<StoredSecret>| {
                info!(key_ids = ?secrets.iter().map(|s| &s.key_id).collect::<Vec<_>>(), "TURN secrets from the store");
                let valid = secrets
                    .iter()
                    .filter_map(|s| {
                        s.turn_secret()
                            .inspect_err(
                                |e| warn!(key_id = %s.key_id, "stored TURN secret skipped: {e}"),
                            )
                            .ok()
                    })
                    .collect();
                on_change(valid);
            }),
        )
    }
}

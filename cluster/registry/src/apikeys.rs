//! Lookup's API keys in the coordination store: `natrix apikey create`
//! adds one, `revoke` removes it, and every lookup node picks the change up
//! within a second.
//!
//! The hash `natrix:apikeys` holds field = key id, value = JSON
//! [`KeyRecord`] (name, scopes, SHA-256 of the secret, creation time). The
//! secret itself is never stored.

use std::time::Duration;

use natrix_model::apikey::{ApiKey, KeyRecord, Scope};
use natrix_store::{Store, StoreError};
use tracing::info;

use crate::unix_ms;
use crate::watch::StoreWatcher;

/// The store key of the API keys.
pub const KEY: &str = "natrix:apikeys";
/// Most keys a cluster holds.
pub const MAX_KEYS: usize = 10_000;
/// Life of the keys hash after the last change.
const KEY_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A new key's own limits (`None`: lookup's defaults).
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Requests per second.
    pub rate: Option<u32>,
    /// Live sessions.
    pub max_sessions: Option<u64>,
}

/// Creates a key named `name` with `scopes` and `limits` from 22 random
/// bytes; returns it (the only time its secret is seen).
pub async fn create(
    store: &Store,
    name: &str,
    scopes: &[Scope],
    limits: Limits,
    random: [u8; 22],
) -> Result<ApiKey, StoreError> {
    let key = ApiKey::generate(random);
    let record = KeyRecord {
        name: name.to_owned(),
        scopes: scopes.to_vec(),
        digest: key.digest(),
        created_ms: unix_ms(),
        rate: limits.rate,
        max_sessions: limits.max_sessions,
    };
    let json = serde_json::to_vec(&record).map_err(|e| StoreError::Unexpected(e.to_string()))?;
    match store
        .put_field(KEY, key.id(), &json, KEY_TTL, MAX_KEYS)
        .await?
    {
        natrix_store::PutField::Full => Err(StoreError::Unexpected(format!(
            "the cluster already holds {MAX_KEYS} API keys"
        ))),
        _ => Ok(key),
    }
}

/// Every key, by id (sorted).
pub async fn list(store: &Store) -> Result<Vec<(String, KeyRecord)>, StoreError> {
    let mut keys: Vec<(String, KeyRecord)> = store
        .fields(KEY)
        .await?
        .into_iter()
        .filter_map(|(id, json)| Some((id, serde_json::from_slice(&json).ok()?)))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Removes key `id`; false when there was none.
pub async fn revoke(store: &Store, id: &str) -> Result<bool, StoreError> {
    let known = list(store).await?.iter().any(|(k, _)| k == id);
    if known {
        store.delete_field(KEY, id).await?;
    }
    Ok(known)
}

/// Watches the stored keys and reports every change.
pub type KeysWatcher = StoreWatcher<(String, KeyRecord)>;

impl StoreWatcher<(String, KeyRecord)> {
    /// A watcher reading every `interval`; `on_change` gets the keys (id,
    /// record) whenever they change (not when the store is unreachable:
    /// the last ones stay in use).
    pub fn new(
        store: Store,
        interval: Duration,
        on_change: crate::watch::OnChange<(String, KeyRecord)>,
    ) -> KeysWatcher {
        StoreWatcher::watch(
            store,
            interval,
            "API keys",
            |store| Box::pin(async move { list(&store).await }),
            Box::new(move |keys| {
                info!(keys = keys.len(), "API keys from the store");
                on_change(keys);
            }),
        )
    }
}

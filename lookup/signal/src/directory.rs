//! The registration directory in the coordination store: handle → its
//! devices, device → its key, handle and push route. Every key expires
//! (the registration TTL, extended by each refresh).
//!
//! ```text
//! natrix:reg:h:<sha256(handle) hex>  hash   device id → {label, updated_ms}   ≤ max devices
//! natrix:reg:d:<device id>           value  DeviceRecord (JSON)
//! ```

use std::time::Duration;

use natrix_store::{PutField, Store, StoreError};
use ring::digest;
use serde::{Deserialize, Serialize};

/// How a device is woken when it holds no WebSocket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PushRoute {
    /// Only the WebSocket (and the mailbox on reconnect).
    Ws,
    /// A Web Push subscription (RFC 8030): its endpoint and keys.
    Webpush {
        /// The push service's subscription URL.
        endpoint: String,
        /// The subscription's P-256 key (base64url).
        p256dh: String,
        /// The subscription's auth secret (base64url).
        auth: String,
    },
    /// The operator's bridge to APNs/FCM, with the device's push token.
    Webhook {
        /// The token the bridge knows the device by.
        token: String,
    },
}

/// A registered device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The handle it registered.
    pub handle: String,
    /// Its Ed25519 public key (base64url).
    pub public_key: String,
    /// How it is woken.
    pub push: PushRoute,
    /// What the user calls it ("phone", "laptop").
    pub label: String,
    /// When it registered (Unix ms).
    pub created_ms: u64,
}

/// Why the directory refused a change.
#[derive(Debug)]
pub enum DirError {
    /// The handle has its maximum of devices.
    TooManyDevices,
    /// The store did not answer.
    Store(StoreError),
}

impl From<StoreError> for DirError {
    fn from(e: StoreError) -> DirError {
        DirError::Store(e)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn handle_key(handle: &str) -> String {
    format!(
        "natrix:reg:h:{}",
        hex(digest::digest(&digest::SHA256, handle.as_bytes()).as_ref())
    )
}

fn device_key(id: &str) -> String {
    format!("natrix:reg:d:{id}")
}

/// Registers (or refreshes) `record` as device `id` for `ttl`.
pub async fn put(
    store: &Store,
    id: &str,
    record: &DeviceRecord,
    ttl: Duration,
    max_devices: usize,
    now_ms: u64,
) -> Result<(), DirError> {
    let entry = serde_json::json!({"label": record.label, "updated_ms": now_ms}).to_string();
    match store
        .put_field(
            &handle_key(&record.handle),
            id,
            entry.as_bytes(),
            ttl,
            max_devices,
        )
        .await?
    {
        PutField::Full => return Err(DirError::TooManyDevices),
        PutField::Inserted | PutField::Updated => {}
    }
    let json = serde_json::to_vec(record).map_err(|e| StoreError::Unexpected(e.to_string()))?;
    store.put(&device_key(id), &json, ttl).await?;
    Ok(())
}

/// The device `id`, if registered.
pub async fn get(store: &Store, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    Ok(store
        .get(&device_key(id))
        .await?
        .and_then(|json| serde_json::from_slice(&json).ok()))
}

/// The devices registered for `handle`.
pub async fn devices_of(store: &Store, handle: &str) -> Result<Vec<String>, StoreError> {
    Ok(store
        .fields(&handle_key(handle))
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// Removes device `id` (registered as `record`).
pub async fn remove(store: &Store, id: &str, record: &DeviceRecord) -> Result<(), StoreError> {
    store.delete_field(&handle_key(&record.handle), id).await?;
    store.delete(&device_key(id)).await
}

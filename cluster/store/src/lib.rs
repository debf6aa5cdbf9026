//! The coordination store: the one place cluster state lives.
//!
//! natrix nodes share a little state: exchange sessions that span CDX nodes
//! today, the relay registry and TURN secrets as the cluster grows. This crate
//! gives that state one small interface with two implementations:
//!
//! - [`Store::memory`]: a map in this process, the default when no Redis is
//!   configured, so `natrix up` needs nothing else;
//! - [`Store::redis`]: one Redis, a Redis Cluster or a Sentinel-managed
//!   primary (`redis://`, `redis+cluster://`, `redis+sentinel://`), through
//!   connections that reconnect (and follow a failover) by themselves, with
//!   a timeout on every call and a Lua script where an update must be
//!   atomic.
//!
//! Every key carries a TTL, so nothing grows without bound: a node that dies
//! leaves nothing behind once its keys expire.
//!
//! # Operations
//!
//! - bounded hashes ([`Store::put_field`], [`Store::fields`]): a key holding
//!   up to `max_fields` fields, its TTL extended (never shortened) by writes;
//! - counters with a TTL ([`Store::incr`]) for per-source limits;
//! - plain values with a TTL ([`Store::put`], [`Store::get`], [`Store::delete`]);
//! - broadcast ([`Store::publish`], [`Store::subscribe`]): at-most-once
//!   notifications between nodes. Subscribers must tolerate lost messages
//!   (Redis pub/sub drops them while a subscriber reconnects); the state they
//!   announce is always readable from the store itself.
//!
//! # Errors
//!
//! Every call returns [`StoreError`] instead of waiting: a Redis that does
//! not answer within the configured timeout is an error the caller counts
//! and retries later; it never blocks a data-plane loop (which never calls
//! the store at all).

mod memory;
mod redis_store;
#[cfg(feature = "test-support")]
pub mod testing;

use std::time::Duration;

pub use memory::MemoryStore;
pub use redis_store::{RedisOptions, RedisStore};

/// A failed store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused the call or the connection broke (server down,
    /// network, authentication). Retried by the caller; the connection
    /// manager reconnects by itself.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The server answered with something this code does not expect (a key
    /// written by another program, a version mismatch).
    #[error("unexpected reply from the store: {0}")]
    Unexpected(String),
}

/// The outcome of [`Store::put_field`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutField {
    /// The field is new.
    Inserted,
    /// The field existed and now holds the new value.
    Updated,
    /// The field is new and the hash already holds `max_fields` fields:
    /// nothing was written.
    Full,
}

/// The coordination store of this process: in memory or Redis.
#[derive(Clone, Debug)]
pub enum Store {
    /// This process only.
    Memory(MemoryStore),
    /// A Redis server shared by the cluster (boxed: the connection
    /// manager is large, and stores are cloned into tasks).
    Redis(Box<RedisStore>),
}

impl Store {
    /// A store in this process's memory.
    pub fn memory() -> Store {
        Store::Memory(MemoryStore::new())
    }

    /// Connects to Redis at `url`: `redis://[user:password@]host:port[/db]`,
    /// `redis+cluster://host:port,…` or `redis+sentinel://host:port,…/service`.
    /// Fails if the first connection does not succeed within the timeout;
    /// later outages are per-call errors and heal by themselves.
    pub async fn redis(url: &str, options: RedisOptions) -> Result<Store, StoreError> {
        Ok(Store::Redis(Box::new(
            RedisStore::connect(url, options).await?,
        )))
    }

    /// Short name for logs and metrics: `memory` or `redis`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// Sets `field` of hash `key` to `value`, unless the field is new and
    /// the hash already has `max_fields` fields. The key lives at least
    /// `ttl` from now (a longer TTL already set is kept). Atomic.
    pub async fn put_field(
        &self,
        key: &str,
        field: &str,
        value: &[u8],
        ttl: Duration,
        max_fields: usize,
    ) -> Result<PutField, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.put_field(key, field, value, ttl, max_fields)),
            Store::Redis(r) => r.put_field(key, field, value, ttl, max_fields).await,
        }
    }

    /// Removes `field` from hash `key` (nothing if absent).
    pub async fn delete_field(&self, key: &str, field: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.delete_field(key, field);
                Ok(())
            }
            Store::Redis(r) => r.delete_field(key, field).await,
        }
    }

    /// Every field of hash `key` (empty when the key does not exist).
    pub async fn fields(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.fields(key)),
            Store::Redis(r) => r.fields(key).await,
        }
    }

    /// Adds one to counter `key` and returns the new value; a new counter
    /// expires `ttl` from now (the TTL is not extended by later calls).
    pub async fn incr(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        self.add(key, 1, ttl).await
    }

    /// Adds `n` (0 reads it) to counter `key` and returns the new value; a
    /// new counter expires `ttl` from now (the TTL is not extended by later
    /// calls).
    pub async fn add(&self, key: &str, n: u64, ttl: Duration) -> Result<u64, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.add(key, n, ttl)),
            Store::Redis(r) => r.add(key, n, ttl).await,
        }
    }

    /// Sets `key` to `value` for `ttl`.
    pub async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.put(key, value, ttl);
                Ok(())
            }
            Store::Redis(r) => r.put(key, value, ttl).await,
        }
    }

    /// The value of `key`, if it exists and has not expired.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(key)),
            Store::Redis(r) => r.get(key).await,
        }
    }

    /// Removes `key` (of any kind).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.delete(key);
                Ok(())
            }
            Store::Redis(r) => r.delete(key).await,
        }
    }

    /// Appends `payload` to stream `key` (one field, `r`), trimming the
    /// stream to about `max_len` entries (Redis `XADD … MAXLEN ~`); the
    /// entry's id.
    pub async fn append(
        &self,
        key: &str,
        payload: &[u8],
        max_len: usize,
    ) -> Result<String, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.append(key, payload, max_len)),
            Store::Redis(r) => r.append(key, payload, max_len).await,
        }
    }

    /// Up to `count` entries of stream `key` after id `after` (`"0"` for the
    /// first), oldest first: each entry's id and payload.
    pub async fn read_stream(
        &self,
        key: &str,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.read_stream(key, after, count)),
            Store::Redis(r) => r.read_stream(key, after, count).await,
        }
    }

    /// Sends `payload` to every current subscriber of `channel` (at most
    /// once; none may be listening).
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.publish(channel, payload);
                Ok(())
            }
            Store::Redis(r) => r.publish(channel, payload).await,
        }
    }

    /// Messages published on `channel` once this returns. For Redis a
    /// background task keeps the subscription alive across reconnects
    /// (messages published while it is down are lost); this waits for the
    /// first subscription up to the connect timeout. The subscription ends
    /// when the receiver is dropped.
    pub async fn subscribe(&self, channel: &str) -> Subscription {
        match self {
            Store::Memory(m) => m.subscribe(channel),
            Store::Redis(r) => r.subscribe(channel).await,
        }
    }
}

/// Messages of one channel, in publication order per publisher.
#[derive(Debug)]
pub struct Subscription {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

/// How many published messages a slow subscriber may have pending before
/// newer ones are dropped (and counted by the caller as lost).
const SUBSCRIPTION_BUFFER: usize = 4096;

impl Subscription {
    fn channel() -> (tokio::sync::mpsc::Sender<Vec<u8>>, Subscription) {
        let (tx, rx) = tokio::sync::mpsc::channel(SUBSCRIPTION_BUFFER);
        (tx, Subscription { rx })
    }

    /// The next message; `None` when the store is gone.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }

    /// The receiving half, for callers that want a stream (actors).
    pub fn into_receiver(self) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
        self.rx
    }
}

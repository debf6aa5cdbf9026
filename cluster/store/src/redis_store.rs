//! The Redis store: a connection manager (reconnects by itself) with a
//! timeout on every call, and Lua where an update must be atomic.
//!
//! Every command touches a single key, so the same code works against one
//! Redis, a Sentinel-managed primary (give the primary's URL or a proxy) and
//! Redis Cluster's key routing.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tracing::{debug, info, warn};

use crate::{PutField, StoreError, Subscription};

/// Connection settings.
#[derive(Clone, Copy, Debug)]
pub struct RedisOptions {
    /// Longest a command may wait for its answer.
    pub response_timeout: Duration,
    /// Longest a (re)connection attempt may take.
    pub connect_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            response_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// `put_field` in one step: insert or update a field of a bounded hash and
/// extend (never shorten) its TTL. Returns 0 inserted, 1 updated, -1 full.
const PUT_FIELD: &str = r"
local existed = redis.call('HEXISTS', KEYS[1], ARGV[1])
if existed == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return existed
";

/// `incr` in one step: a new counter gets its TTL with its first value.
const INCR: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// A Redis-backed store (clones share the connection).
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    options: RedisOptions,
    put_field: Script,
    incr: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password: show the address only.
        let addr = self.client.get_connection_info().addr();
        f.debug_struct("RedisStore")
            .field("addr", &addr.to_string())
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Connects to `url`; fails if the first connection fails.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        info!(addr = %client.get_connection_info().addr(), "connected to Redis");
        Ok(RedisStore {
            client,
            conn,
            options,
            put_field: Script::new(PUT_FIELD),
            incr: Script::new(INCR),
        })
    }

    pub(crate) async fn put_field(
        &self,
        key: &str,
        field: &str,
        value: &[u8],
        ttl: Duration,
        max_fields: usize,
    ) -> Result<PutField, StoreError> {
        let mut conn = self.conn.clone();
        let r: i64 = self
            .put_field
            .key(key)
            .arg(field)
            .arg(value)
            .arg(millis(ttl))
            .arg(max_fields)
            .invoke_async(&mut conn)
            .await?;
        match r {
            0 => Ok(PutField::Inserted),
            1 => Ok(PutField::Updated),
            -1 => Ok(PutField::Full),
            other => Err(StoreError::Unexpected(format!(
                "put_field returned {other}"
            ))),
        }
    }

    pub(crate) async fn fields(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut conn = self.conn.clone();
        let map: Vec<(String, Vec<u8>)> = conn.hgetall(key).await?;
        Ok(map)
    }

    pub(crate) async fn delete_field(&self, key: &str, field: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: u64 = conn.hdel(key, field).await?;
        Ok(())
    }

    pub(crate) async fn incr(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let n: u64 = self
            .incr
            .key(key)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await?;
        Ok(n)
    }

    pub(crate) async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let () = conn.pset_ex(key, value, millis(ttl)).await?;
        Ok(())
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.get(key).await?)
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: u64 = conn.del(key).await?;
        Ok(())
    }

    pub(crate) async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: u64 = conn.publish(channel, payload).await?;
        Ok(())
    }

    /// A task holds a dedicated pub/sub connection and re-subscribes after
    /// every disconnect, until the receiver is dropped.
    pub(crate) async fn subscribe(&self, channel: &str) -> Subscription {
        let (tx, sub) = Subscription::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
        let mut ready_tx = Some(ready_tx);
        let client = self.client.clone();
        let channel = channel.to_owned();
        let timeout = self.options.connect_timeout;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            while !tx.is_closed() {
                let connected = tokio::time::timeout(timeout, async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
                let pubsub = match connected {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        debug!(error = %e, %channel, "Redis subscription failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                    Err(_) => {
                        debug!(%channel, "Redis subscription timed out; retrying");
                        continue;
                    }
                };
                backoff = Duration::from_millis(50);
                debug!(%channel, "subscribed");
                if let Some(r) = ready_tx.take() {
                    let _ = r.send(());
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => {
                            let Some(msg) = msg else { break };
                            // A full subscriber loses this message (at most once).
                            let _ = tx.try_send(msg.get_payload_bytes().to_vec());
                        }
                        () = tx.closed() => return,
                    }
                }
                warn!(%channel, "Redis subscription lost; reconnecting");
            }
        });
        // Wait for the first subscription, so that what is published after
        // this returns reaches us; if Redis is down, go on and keep trying.
        let _ = tokio::time::timeout(self.options.connect_timeout, ready).await;
        sub
    }
}

//! The Redis store, with a timeout on every call, Lua where an update must
//! be atomic, and reconnection by itself. Three deployments:
//!
//! - one Redis: `redis://[user:password@]host:port[/db]` (a connection
//!   manager that reconnects to that address);
//! - Redis Cluster: `redis+cluster://host:port,host:port,…` (seed nodes; the
//!   cluster client follows slots and redirections);
//! - Sentinel: `redis+sentinel://host:port,host:port,…/service` (the
//!   sentinels are asked for the current primary; after a failover — a
//!   refused connection or a READONLY answer — they are asked again).
//!
//! Every command touches a single key, so the same calls work in all three.
//! Pub/sub goes to one node (classic PUBLISH reaches every node of a
//! cluster) and re-subscribes after every disconnect, asking again where
//! the primary is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, RedisResult, Script, Value};
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

/// `add` in one step: a new counter gets its TTL with its first value.
const INCR: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// The primary as the sentinels last named it.
struct SentinelState {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    current: tokio::sync::RwLock<(redis::Client, ConnectionManager)>,
    last_resolve: std::sync::Mutex<Instant>,
}

enum Backend {
    Single(redis::Client, ConnectionManager),
    Cluster(Vec<redis::Client>, ClusterConnection),
    Sentinel(Box<SentinelState>),
}

/// One connection of whichever backend, for one call.
#[derive(Clone)]
enum AnyConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(c) => c.get_db(),
        }
    }
}

struct Inner {
    backend: Backend,
    options: RedisOptions,
    put_field: Script,
    incr: Script,
    /// Where the connection info came from, for logs (no credentials).
    describe: String,
}

/// A Redis-backed store (clones share the connection).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("at", &self.inner.describe)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn manager_config(options: RedisOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(options.response_timeout))
        .set_connection_timeout(Some(options.connect_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

/// `host:port,host:port` → `redis://host:port` each.
fn node_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|n| {
            if n.contains("://") {
                n.to_owned()
            } else {
                format!("redis://{n}")
            }
        })
        .collect()
}

fn bad_url(what: String) -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "invalid Redis URL",
        what,
    )))
}

impl RedisStore {
    /// Connects to `url` (see the module docs for the three forms); fails
    /// if the first connection fails.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<RedisStore, StoreError> {
        let (backend, describe) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes = node_urls(rest);
            if nodes.is_empty() {
                return Err(bad_url("redis+cluster:// needs at least one node".into()));
            }
            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(options.connect_timeout)
                .response_timeout(options.response_timeout)
                .retries(2)
                .build()?;
            let conn = client.get_async_connection().await?;
            let clients = nodes
                .iter()
                .map(|n| redis::Client::open(n.as_str()))
                .collect::<RedisResult<Vec<_>>>()?;
            (
                Backend::Cluster(clients, conn),
                format!("cluster of {}", nodes.len()),
            )
        } else if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (list, service) = rest
                .split_once('/')
                .filter(|(_, s)| !s.is_empty())
                .ok_or_else(|| {
                    bad_url("redis+sentinel://host:port,…/service needs a service name".into())
                })?;
            // Credentials before the first host apply to the Sentinels and
            // to the primary they name (`redis+sentinel://:pw@s1,s2/svc`).
            let (auth, list) = match list.rsplit_once('@') {
                Some((auth, hosts)) => (Some(auth), hosts),
                None => (None, list),
            };
            let sentinels: Vec<String> = node_urls(list)
                .into_iter()
                .map(|u| match auth {
                    Some(a) => u.replacen("://", &format!("://{a}@"), 1),
                    None => u,
                })
                .collect();
            let primary_auth = auth.map(|a| {
                let (user, password) = a.split_once(':').unwrap_or(("", a));
                let mut info = redis::RedisConnectionInfo::default().set_password(password);
                if !user.is_empty() {
                    info = info.set_username(user);
                }
                redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info)
            });
            let mut client = SentinelClient::build(
                sentinels.clone(),
                service.to_owned(),
                primary_auth,
                SentinelServerType::Master,
            )?;
            let primary = tokio::time::timeout(options.connect_timeout, client.async_get_client())
                .await
                .map_err(|_| bad_url("no sentinel answered in time".into()))??;
            let manager =
                ConnectionManager::new_with_config(primary.clone(), manager_config(options))
                    .await?;
            (
                Backend::Sentinel(Box::new(SentinelState {
                    sentinels: tokio::sync::Mutex::new(client),
                    current: tokio::sync::RwLock::new((primary, manager)),
                    last_resolve: std::sync::Mutex::new(Instant::now()),
                })),
                format!("service {service} via {} sentinels", sentinels.len()),
            )
        } else {
            let client = redis::Client::open(url)?;
            let manager =
                ConnectionManager::new_with_config(client.clone(), manager_config(options)).await?;
            let describe = client.get_connection_info().addr().to_string();
            (Backend::Single(client, manager), describe)
        };
        info!(at = %describe, "connected to Redis");
        Ok(RedisStore {
            inner: Arc::new(Inner {
                backend,
                options,
                put_field: Script::new(PUT_FIELD),
                incr: Script::new(INCR),
                describe,
            }),
        })
    }

    async fn conn(&self) -> AnyConn {
        match &self.inner.backend {
            Backend::Single(_, m) => AnyConn::Single(m.clone()),
            Backend::Cluster(_, c) => AnyConn::Cluster(c.clone()),
            Backend::Sentinel(s) => AnyConn::Single(s.current.read().await.1.clone()),
        }
    }

    /// After a failed call: with Sentinel, a refused connection or a
    /// READONLY answer means the primary moved; ask the sentinels again (at
    /// most twice a second).
    async fn recover(&self, e: &redis::RedisError) {
        let Backend::Sentinel(s) = &self.inner.backend else {
            return;
        };
        let moved = e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.code() == Some("READONLY");
        if !moved {
            return;
        }
        {
            let mut last = s.last_resolve.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_millis(500) {
                return;
            }
            *last = Instant::now();
        }
        let resolved = {
            let mut sentinels = s.sentinels.lock().await;
            tokio::time::timeout(
                self.inner.options.connect_timeout,
                sentinels.async_get_client(),
            )
            .await
        };
        let Ok(Ok(primary)) = resolved else {
            debug!("sentinels did not name a primary yet");
            return;
        };
        let same = s.current.read().await.0.get_connection_info().addr()
            == primary.get_connection_info().addr();
        if same {
            return;
        }
        match ConnectionManager::new_with_config(
            primary.clone(),
            manager_config(self.inner.options),
        )
        .await
        {
            Ok(m) => {
                warn!(primary = %primary.get_connection_info().addr(), "Redis primary changed (Sentinel failover)");
                *s.current.write().await = (primary, m);
            }
            Err(err) => debug!(error = %err, "new primary not reachable yet"),
        }
    }

    async fn call<T>(
        &self,
        f: impl AsyncFnOnce(&mut AnyConn) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await;
        match f(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.recover(&e).await;
                Err(e.into())
            }
        }
    }

    pub(crate) async fn put_field(
        &self,
        key: &str,
        field: &str,
        value: &[u8],
        ttl: Duration,
        max_fields: usize,
    ) -> Result<PutField, StoreError> {
        let script = &self.inner.put_field;
        let r: i64 = self
            .call(async |c| {
                script
                    .key(key)
                    .arg(field)
                    .arg(value)
                    .arg(millis(ttl))
                    .arg(max_fields)
                    .invoke_async(c)
                    .await
            })
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
        self.call(async |c| c.hgetall(key).await).await
    }

    pub(crate) async fn delete_field(&self, key: &str, field: &str) -> Result<(), StoreError> {
        let _: u64 = self.call(async |c| c.hdel(key, field).await).await?;
        Ok(())
    }

    pub(crate) async fn add(&self, key: &str, n: u64, ttl: Duration) -> Result<u64, StoreError> {
        let script = &self.inner.incr;
        self.call(async |c| {
            script
                .key(key)
                .arg(millis(ttl))
                .arg(n)
                .invoke_async(c)
                .await
        })
        .await
    }

    pub(crate) async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call(async |c| c.pset_ex(key, value, millis(ttl)).await)
            .await
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.call(async |c| c.get(key).await).await
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _: u64 = self.call(async |c| c.del(key).await).await?;
        Ok(())
    }

    pub(crate) async fn append(
        &self,
        key: &str,
        payload: &[u8],
        max_len: usize,
    ) -> Result<String, StoreError> {
        self.call(async |c| {
            redis::cmd("XADD")
                .arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_len)
                .arg("*")
                .arg("r")
                .arg(payload)
                .query_async(c)
                .await
        })
        .await
    }

    pub(crate) async fn read_stream(
        &self,
        key: &str,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // XRANGE with an exclusive start: entries after `after`.
        let start = if after == "0" {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        let entries: Vec<StreamEntry> = self
            .call(async |c| {
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(c)
                    .await
            })
            .await?;
        Ok(entries
            .into_iter()
            .map(|(id, fields)| {
                let payload = fields
                    .into_iter()
                    .find(|(f, _)| f == "r")
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                (id, payload)
            })
            .collect())
    }

    pub(crate) async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), StoreError> {
        let _: u64 = self
            .call(async |c| c.publish(channel, payload).await)
            .await?;
        Ok(())
    }

    /// The node subscriptions go to: the single server, the current
    /// primary, or one of the cluster's seed nodes (rotating on failures).
    async fn pubsub_client(&self, attempt: usize) -> redis::Client {
        match &self.inner.backend {
            Backend::Single(c, _) => c.clone(),
            Backend::Cluster(clients, _) => clients[attempt % clients.len()].clone(),
            Backend::Sentinel(s) => s.current.read().await.0.clone(),
        }
    }

    /// A task holds a dedicated pub/sub connection and re-subscribes after
    /// every disconnect, until the receiver is dropped.
    pub(crate) async fn subscribe(&self, channel: &str) -> Subscription {
        let (tx, sub) = Subscription::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
        let mut ready_tx = Some(ready_tx);
        let store = self.clone();
        let channel = channel.to_owned();
        let timeout = self.inner.options.connect_timeout;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0usize;
            while !tx.is_closed() {
                let client = store.pubsub_client(attempt).await;
                attempt += 1;
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
                        store.recover(&e).await;
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
        let _ = tokio::time::timeout(timeout, ready).await;
        sub
    }
}

/// One stream entry as XRANGE returns it: its id and its field-value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

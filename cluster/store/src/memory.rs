//! The in-process store: one mutex-guarded map, swept as it is used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{PutField, Subscription};

/// How often, at most, a call sweeps expired keys.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Value {
    Bytes(Vec<u8>),
    Counter(u64),
    Hash(Vec<(String, Vec<u8>)>),
    /// A stream: entries with increasing sequence numbers.
    Stream(std::collections::VecDeque<(u64, Vec<u8>)>, u64),
}

#[derive(Debug)]
struct Entry {
    value: Value,
    expires: Instant,
}

#[derive(Debug)]
struct Inner {
    keys: HashMap<String, Entry>,
    subscribers: HashMap<String, Vec<tokio::sync::mpsc::Sender<Vec<u8>>>>,
    last_sweep: Instant,
}

/// A store in this process (clones share it). The lock is held only for a
/// map operation and never across an await.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Mutex::new(Inner {
                keys: HashMap::new(),
                subscribers: HashMap::new(),
                last_sweep: Instant::now(),
            })),
        }
    }

    /// The map with expired keys removed (fully every [`SWEEP_EVERY`]).
    fn lock(&self, now: Instant) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated
        // in a way later calls would misread, so a poisoned lock is used.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(inner.last_sweep) >= SWEEP_EVERY {
            inner.keys.retain(|_, e| e.expires > now);
            inner.subscribers.retain(|_, subs| {
                subs.retain(|s| !s.is_closed());
                !subs.is_empty()
            });
            inner.last_sweep = now;
        }
        inner
    }

    /// Number of live keys (for tests and the expiry guarantee).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock(now)
            .keys
            .values()
            .filter(|e| e.expires > now)
            .count()
    }

    /// True when no key is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn live<'a>(inner: &'a mut Inner, key: &str, now: Instant) -> Option<&'a mut Entry> {
        if inner.keys.get(key).is_some_and(|e| e.expires <= now) {
            inner.keys.remove(key);
        }
        inner.keys.get_mut(key)
    }

    pub(crate) fn put_field(
        &self,
        key: &str,
        field: &str,
        value: &[u8],
        ttl: Duration,
        max_fields: usize,
    ) -> PutField {
        let now = Instant::now();
        let mut inner = self.lock(now);
        let expires = now + ttl;
        let entry = match Self::live(&mut inner, key, now) {
            Some(e) if matches!(e.value, Value::Hash(_)) => e,
            _ => {
                if max_fields == 0 {
                    return PutField::Full;
                }
                inner.keys.insert(
                    key.to_owned(),
                    Entry {
                        value: Value::Hash(vec![(field.to_owned(), value.to_vec())]),
                        expires,
                    },
                );
                return PutField::Inserted;
            }
        };
        let Value::Hash(fields) = &mut entry.value else {
            return PutField::Full;
        };
        let outcome = if let Some(slot) = fields.iter_mut().find(|(f, _)| f == field) {
            slot.1 = value.to_vec();
            PutField::Updated
        } else if fields.len() >= max_fields {
            return PutField::Full;
        } else {
            fields.push((field.to_owned(), value.to_vec()));
            PutField::Inserted
        };
        entry.expires = entry.expires.max(expires);
        outcome
    }

    pub(crate) fn fields(&self, key: &str) -> Vec<(String, Vec<u8>)> {
        let now = Instant::now();
        let mut inner = self.lock(now);
        match Self::live(&mut inner, key, now) {
            Some(Entry {
                value: Value::Hash(fields),
                ..
            }) => fields.clone(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn delete_field(&self, key: &str, field: &str) {
        let now = Instant::now();
        let mut inner = self.lock(now);
        if let Some(Entry {
            value: Value::Hash(fields),
            ..
        }) = Self::live(&mut inner, key, now)
        {
            fields.retain(|(f, _)| f != field);
            if fields.is_empty() {
                inner.keys.remove(key);
            }
        }
    }

    pub(crate) fn add(&self, key: &str, add: u64, ttl: Duration) -> u64 {
        let now = Instant::now();
        let mut inner = self.lock(now);
        if let Some(Entry {
            value: Value::Counter(n),
            ..
        }) = Self::live(&mut inner, key, now)
        {
            *n = n.saturating_add(add);
            return *n;
        }
        inner.keys.insert(
            key.to_owned(),
            Entry {
                value: Value::Counter(add),
                expires: now + ttl,
            },
        );
        add
    }

    pub(crate) fn put(&self, key: &str, value: &[u8], ttl: Duration) {
        let now = Instant::now();
        self.lock(now).keys.insert(
            key.to_owned(),
            Entry {
                value: Value::Bytes(value.to_vec()),
                expires: now + ttl,
            },
        );
    }

    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let mut inner = self.lock(now);
        match Self::live(&mut inner, key, now) {
            Some(Entry {
                value: Value::Bytes(b),
                ..
            }) => Some(b.clone()),
            Some(Entry {
                value: Value::Counter(n),
                ..
            }) => Some(n.to_string().into_bytes()),
            _ => None,
        }
    }

    pub(crate) fn delete(&self, key: &str) {
        self.lock(Instant::now()).keys.remove(key);
    }

    /// Appends to stream `key` (kept as long as the store: streams do not
    /// expire), trimmed to `max_len` entries; ids are `0-<seq>`.
    pub(crate) fn append(&self, key: &str, payload: &[u8], max_len: usize) -> String {
        let now = Instant::now();
        let mut inner = self.lock(now);
        let entry = inner.keys.entry(key.to_owned()).or_insert(Entry {
            value: Value::Stream(Default::default(), 0),
            expires: now + Duration::from_secs(100 * 365 * 24 * 3600),
        });
        if !matches!(entry.value, Value::Stream(..)) {
            entry.value = Value::Stream(Default::default(), 0);
        }
        let Value::Stream(entries, last) = &mut entry.value else {
            return String::new();
        };
        *last += 1;
        entries.push_back((*last, payload.to_vec()));
        while entries.len() > max_len.max(1) {
            entries.pop_front();
        }
        format!("0-{last}")
    }

    /// Up to `count` entries of stream `key` after id `after`.
    pub(crate) fn read_stream(
        &self,
        key: &str,
        after: &str,
        count: usize,
    ) -> Vec<(String, Vec<u8>)> {
        let after: u64 = after
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let now = Instant::now();
        let mut inner = self.lock(now);
        match Self::live(&mut inner, key, now) {
            Some(Entry {
                value: Value::Stream(entries, _),
                ..
            }) => entries
                .iter()
                .filter(|(seq, _)| *seq > after)
                .take(count)
                .map(|(seq, p)| (format!("0-{seq}"), p.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn publish(&self, channel: &str, payload: &[u8]) {
        let inner = self.lock(Instant::now());
        if let Some(subs) = inner.subscribers.get(channel) {
            for s in subs {
                // A full subscriber loses this message, as with Redis.
                let _ = s.try_send(payload.to_vec());
            }
        }
    }

    pub(crate) fn subscribe(&self, channel: &str) -> Subscription {
        let (tx, sub) = Subscription::channel();
        self.lock(Instant::now())
            .subscribers
            .entry(channel.to_owned())
            .or_default()
            .push(tx);
        sub
    }
}

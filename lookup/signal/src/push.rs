//! The push channel: a mailbox per device in the coordination store, a
//! WebSocket per connected device, and the hub that routes a frame to the
//! replica holding the device's socket.
//!
//! Sending writes the frame into the device's mailbox (a bounded hash,
//! field = topic, so a cancel replaces the queued invite as Web Push's Topic
//! does) and then publishes it to the replica holding the device's socket
//! (its route key names it), which writes it out. A lost publish costs
//! latency, never the frame: a socket re-reads its mailbox every few
//! seconds and when it connects (and over HTTP, `GET /v1/push/pending`), and
//! a frame leaves the mailbox only when acknowledged or expired.
//!
//! ```text
//! natrix:push:mbox:<device>    hash   topic → Frame (JSON)   ≤ 32 fields, 10 min
//! natrix:push:route:<device>   value  the replica holding its socket   45 s, refreshed
//! natrix:push:node:<replica>   pub/sub  {device, frame}
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natrix_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Frames a mailbox holds.
pub const MAILBOX_FIELDS: usize = 32;
/// How long a mailbox outlives its last frame.
pub const MAILBOX_TTL: Duration = Duration::from_secs(600);
/// The channel of replica `node`.
fn channel(node: &str) -> String {
    format!("natrix:push:node:{node}")
}
/// The frame that tells a device to reconnect (to another replica).
pub const RECONNECT: &str = "reconnect";
/// Frames queued for one socket; past it a frame waits in the mailbox
/// for the socket to catch up or reconnect. (Frames go by `Arc` so an idle
/// socket's queue costs a few hundred bytes.)
const SOCKET_QUEUE: usize = 32;

/// One push frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// Unique id; the device acknowledges it (`{"ack": id}`).
    pub id: String,
    /// `invite`, `accepted`, `declined`, `cancelled`, `update`, `retry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What it replaces in the mailbox (an invite and its cancel share one).
    pub topic: String,
    /// Unix ms after which it is dropped unsent.
    pub expires_ms: u64,
    /// The message.
    pub body: serde_json::Value,
}

/// How long a socket's route key outlives its last refresh.
pub const ROUTE_TTL: Duration = Duration::from_secs(45);

fn route(device: &str) -> String {
    format!("natrix:push:route:{device}")
}

/// Marks `device` as holding a socket on replica `node` (refreshed while
/// it does).
pub async fn hold_route(store: &Store, device: &str, node: &str) -> Result<(), StoreError> {
    store.put(&route(device), node.as_bytes(), ROUTE_TTL).await
}

/// Clears `device`'s socket mark.
pub async fn drop_route(store: &Store, device: &str) -> Result<(), StoreError> {
    store.delete(&route(device)).await
}

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// In the mailbox and announced to the replica holding the device's
    /// socket.
    ToSocket,
    /// In the mailbox; the device holds no socket (wake it).
    Queued,
    /// The mailbox is full of live frames: not queued.
    Full,
}

fn mailbox(device: &str) -> String {
    format!("natrix:push:mbox:{device}")
}

/// Writes `frame` into `device`'s mailbox and announces it to the replica
/// holding its socket, if any. Expired frames give their place up. When
/// the route cannot be read the device counts as connected (no wake on a
/// guess; its socket's next mailbox read delivers the frame).
pub async fn send(store: &Store, device: &str, frame: &Frame) -> Result<Sent, StoreError> {
    let route = store
        .get(&route(device))
        .await
        .map(|r| r.map(|v| String::from_utf8_lossy(&v).into_owned()));
    let json = serde_json::to_vec(frame).map_err(|e| StoreError::Unexpected(e.to_string()))?;
    let key = mailbox(device);
    let mut put = store
        .put_field(&key, &frame.topic, &json, MAILBOX_TTL, MAILBOX_FIELDS)
        .await?;
    if put == natrix_store::PutField::Full {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for (topic, old) in store.fields(&key).await? {
            let expired =
                serde_json::from_slice::<Frame>(&old).map_or(true, |f| f.expires_ms <= now);
            if expired {
                store.delete_field(&key, &topic).await?;
            }
        }
        put = store
            .put_field(&key, &frame.topic, &json, MAILBOX_TTL, MAILBOX_FIELDS)
            .await?;
    }
    if put == natrix_store::PutField::Full {
        return Ok(Sent::Full);
    }
    match route {
        Ok(Some(node)) => {
            let note = serde_json::json!({"device": device, "frame": frame}).to_string();
            store.publish(&channel(&node), note.as_bytes()).await?;
            Ok(Sent::ToSocket)
        }
        Ok(None) => Ok(Sent::Queued),
        Err(_) => Ok(Sent::ToSocket),
    }
}

/// The frames waiting for `device` that have not expired at `now_ms`,
/// oldest first.
pub async fn pending(store: &Store, device: &str, now_ms: u64) -> Result<Vec<Frame>, StoreError> {
    let mut frames: Vec<Frame> = store
        .fields(&mailbox(device))
        .await?
        .into_iter()
        .filter_map(|(_, json)| serde_json::from_slice(&json).ok())
        .filter(|f: &Frame| f.expires_ms > now_ms)
        .collect();
    frames.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(frames)
}

/// Removes frame `id` from `device`'s mailbox (unless a newer frame took
/// its topic since); true when it was there.
pub async fn ack(store: &Store, device: &str, id: &str) -> Result<bool, StoreError> {
    for (topic, json) in store.fields(&mailbox(device)).await? {
        let same = serde_json::from_slice::<Frame>(&json).is_ok_and(|f| f.id == id);
        if same {
            store.delete_field(&mailbox(device), &topic).await?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// A device's sockets here, each with its id.
type Sockets = HashMap<String, Vec<(u64, mpsc::Sender<Arc<Frame>>)>>;

/// The sockets this replica holds, by device.
#[derive(Clone, Debug)]
pub struct Hub {
    sockets: Arc<Mutex<Sockets>>,
    next: Arc<std::sync::atomic::AtomicU64>,
    /// This replica's id in route keys and its channel's name.
    node: Arc<str>,
}

impl Default for Hub {
    fn default() -> Hub {
        let id: String = (0..8)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        Hub {
            sockets: Arc::default(),
            next: Arc::default(),
            node: id.into(),
        }
    }
}

/// A socket's place in the hub; leaving it (drop) unregisters.
#[derive(Debug)]
pub struct Attached {
    hub: Hub,
    device: String,
    id: u64,
    /// The frames for this socket.
    pub frames: mpsc::Receiver<Arc<Frame>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut sockets = self.hub.lock();
        if let Some(list) = sockets.get_mut(&self.device) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                sockets.remove(&self.device);
            }
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sockets> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a socket of `device`.
    pub fn attach(&self, device: &str) -> Attached {
        let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock()
            .entry(device.to_owned())
            .or_default()
            .push((id, tx));
        Attached {
            hub: self.clone(),
            device: device.to_owned(),
            id,
            frames: rx,
        }
    }

    /// Sockets `device` holds here.
    pub fn sockets_of(&self, device: &str) -> usize {
        self.lock().get(device).map_or(0, Vec::len)
    }

    /// Tells every socket here to reconnect elsewhere (the replica is
    /// draining): a `reconnect` frame with a random delay up to 5 s, so the
    /// devices do not all come back at once; the socket then closes (1012).
    pub fn drain(&self) {
        let sockets = self.lock();
        for list in sockets.values() {
            for (_, tx) in list {
                let after_ms = rand::random_range(0..5000u64);
                let _ = tx.try_send(Arc::new(Frame {
                    id: String::new(),
                    kind: RECONNECT.into(),
                    topic: String::new(),
                    expires_ms: u64::MAX,
                    body: serde_json::json!({"after_ms": after_ms}),
                }));
            }
        }
    }

    /// Drains (see [`Hub::drain`]) and waits, up to `within`, until every
    /// socket here said its goodbye: the HTTP server stopping drops what is
    /// left.
    pub async fn drain_and_wait(&self, within: Duration) {
        self.drain();
        let deadline = tokio::time::Instant::now() + within;
        while self.sockets() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sockets held.
    pub fn sockets(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Hands `frame` to `device`'s sockets here; how many took it. A socket
    /// whose queue is full is skipped (it drains the mailbox when it
    /// catches up or reconnects).
    pub fn deliver(&self, device: &str, frame: &Frame) -> usize {
        let sockets = self.lock();
        let frame = Arc::new(frame.clone());
        sockets.get(device).map_or(0, |list| {
            list.iter()
                .filter(|(_, tx)| tx.try_send(frame.clone()).is_ok())
                .count()
        })
    }

    /// This replica's id (what its sockets' route keys hold).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Listens to this replica's channel for ever, handing frames to local
    /// sockets (spawned once per replica).
    pub async fn listen(self, store: Store) {
        let mut sub = store.subscribe(&channel(&self.node)).await;
        while let Some(note) = sub.next().await {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&note) else {
                continue;
            };
            let (Some(device), Ok(frame)) = (
                v["device"].as_str(),
                serde_json::from_value::<Frame>(v["frame"].clone()),
            ) else {
                continue;
            };
            self.deliver(device, &frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: &str, topic: &str, expires_ms: u64) -> Frame {
        Frame {
            id: id.into(),
            kind: "invite".into(),
            topic: topic.into(),
            expires_ms,
            body: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn a_topic_replaces_its_frame_acks_remove_and_expired_frames_are_not_pending() {
        let store = Store::memory();
        let dev = "abcdefghijklmnopqrstuvwxyz";
        let queued = |s: Sent| s != Sent::Full;
        assert!(queued(
            send(&store, dev, &frame("1", "s:x", 5_000)).await.unwrap()
        ));
        assert!(
            queued(send(&store, dev, &frame("2", "s:y", 1_000)).await.unwrap()),
            "long expired"
        );
        // A cancel takes the invite's topic.
        assert!(queued(
            send(&store, dev, &frame("3", "s:x", 5_000)).await.unwrap()
        ));
        let p = pending(&store, dev, 2_000).await.unwrap();
        assert_eq!(p.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["3"]);
        assert!(
            !ack(&store, dev, "1").await.unwrap(),
            "replaced: nothing to ack"
        );
        assert!(ack(&store, dev, "3").await.unwrap());
        assert!(pending(&store, dev, 2_000).await.unwrap().is_empty());
        // The expired frame gives its place up to live ones.
        for i in 0..MAILBOX_FIELDS {
            let f = frame(&i.to_string(), &format!("t{i}"), u64::MAX);
            let sent = send(&store, dev, &f).await.unwrap();
            assert_eq!(sent, Sent::Queued, "no socket: queued");
        }
        let f = frame("x", "t-extra", u64::MAX);
        assert_eq!(send(&store, dev, &f).await.unwrap(), Sent::Full);
    }

    #[tokio::test]
    async fn the_hub_routes_published_frames_to_local_sockets_only() {
        let store = Store::memory();
        let hub = Hub::default();
        tokio::spawn(hub.clone().listen(store.clone()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut a = hub.attach("dev-a");
        assert_eq!(hub.sockets(), 1);
        hold_route(&store, "dev-a", hub.node()).await.unwrap();
        // Another replica holds dev-b: its frame goes to that channel.
        hold_route(&store, "dev-b", "other-replica").await.unwrap();
        let (f1, f2) = (frame("1", "t", u64::MAX), frame("2", "t", u64::MAX));
        assert_eq!(send(&store, "dev-a", &f1).await.unwrap(), Sent::ToSocket);
        assert_eq!(send(&store, "dev-b", &f2).await.unwrap(), Sent::ToSocket);
        let got = tokio::time::timeout(Duration::from_secs(2), a.frames.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.id, "1");
        drop(a);
        assert_eq!(hub.sockets(), 0);
    }
}

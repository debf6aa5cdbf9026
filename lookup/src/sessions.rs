//! Live sessions per tenant (API key or grant key id), counted across
//! lookup replicas, for the per-key cap.
//!
//! A session is live while its tokens are valid: from its plan until the
//! token TTL has passed. Each replica counts the plans it makes in windows
//! one TTL long and adds them, once a second, to a counter per tenant and
//! window in the coordination store, reading the cluster-wide total back.
//! The live estimate is the sliding-window sum `previous × (1 − elapsed
//! fraction) + current` (cluster-wide as of the last sync, plus this
//! replica's plans since). A cap can so be overshot by what other replicas
//! planned in the last second; while the store is unreachable each replica
//! keeps enforcing what it knows (its own plans included).
//!
//! Memory is bounded: one tally per tenant the key ring knows, forgotten
//! two windows after its last plan.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use natrix_store::Store;

/// Most tenants tracked at once (the key ring is bounded well below this).
const MAX_TENANTS: usize = 16_384;

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// The window the counts below belong to.
    window: u64,
    /// The previous window's cluster-wide total.
    prev: u64,
    /// This window's cluster-wide total at the last sync (this replica's
    /// synced plans included).
    cur: u64,
    /// This replica's plans not yet added to the store.
    pending: u64,
    /// Whether `prev` was read from the store (after a restart or a roll
    /// it holds this replica's view only).
    prev_read: bool,
}

impl Tally {
    fn roll(&mut self, window: u64) {
        if window == self.window {
            return;
        }
        self.prev = if window == self.window + 1 {
            self.cur + self.pending
        } else {
            0
        };
        self.cur = 0;
        self.pending = 0;
        self.prev_read = false;
        self.window = window;
    }

    fn live(&self, fraction: f64) -> u64 {
        (self.prev as f64 * (1.0 - fraction)).ceil() as u64 + self.cur + self.pending
    }
}

/// The live-session tallies of one lookup replica.
#[derive(Debug)]
pub struct SessionLedger {
    window_ms: u64,
    tallies: Mutex<HashMap<String, Tally>>,
}

impl SessionLedger {
    /// A ledger whose sessions live `ttl`.
    pub fn new(ttl: Duration) -> SessionLedger {
        SessionLedger {
            window_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1000),
            tallies: Mutex::new(HashMap::new()),
        }
    }

    fn position(&self, now_ms: u64) -> (u64, f64) {
        let window = now_ms / self.window_ms;
        let fraction = (now_ms % self.window_ms) as f64 / self.window_ms as f64;
        (window, fraction)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tally>> {
        self.tallies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live sessions of `tenant` as this replica knows them.
    pub fn live(&self, tenant: &str, now_ms: u64) -> u64 {
        let (window, fraction) = self.position(now_ms);
        let mut tallies = self.lock();
        tallies.get_mut(tenant).map_or(0, |t| {
            t.roll(window);
            t.live(fraction)
        })
    }

    /// Counts a new session of `tenant` unless it has `cap` live ones;
    /// otherwise how long until one is likely to end.
    pub fn admit(&self, tenant: &str, cap: u64, now_ms: u64) -> Result<u64, Duration> {
        let (window, fraction) = self.position(now_ms);
        let mut tallies = self.lock();
        if tallies.len() >= MAX_TENANTS && !tallies.contains_key(tenant) {
            // More tenants than keys exist: forget the idle ones.
            tallies.retain(|_, t| t.window + 1 >= window);
        }
        let t = tallies.entry(tenant.to_owned()).or_insert(Tally {
            window,
            ..Tally::default()
        });
        t.roll(window);
        let live = t.live(fraction);
        if live >= cap {
            // The previous window's sessions end at a steady pace.
            let per_session = self.window_ms / t.prev.max(1);
            return Err(Duration::from_millis(
                per_session.clamp(1000, self.window_ms),
            ));
        }
        t.pending += 1;
        Ok(live + 1)
    }

    /// Un-counts a session [`SessionLedger::admit`] counted whose plan
    /// then failed.
    pub fn release(&self, tenant: &str) {
        if let Some(t) = self.lock().get_mut(tenant) {
            t.pending = t.pending.saturating_sub(1);
        }
    }

    fn key(tenant: &str, window: u64) -> String {
        format!("natrix:sessions:{tenant}:{window}")
    }

    /// Adds this replica's new sessions to the store and reads the
    /// cluster-wide totals back (one store call per tenant seen in the last
    /// two windows, plus one for a window's first sync); tenants idle for
    /// two windows are forgotten. A store error leaves the pending counts for the next
    /// sync.
    pub async fn sync(&self, store: &Store, now_ms: u64) -> Result<(), natrix_store::StoreError> {
        let (window, _) = self.position(now_ms);
        let work: Vec<(String, Tally)> = {
            let mut tallies = self.lock();
            tallies.retain(|_, t| t.window + 2 > window);
            tallies
                .iter_mut()
                .map(|(k, t)| {
                    t.roll(window);
                    (k.clone(), *t)
                })
                .collect()
        };
        let keep = Duration::from_millis(self.window_ms.saturating_mul(3));
        for (tenant, seen) in work {
            let total = store
                .add(&Self::key(&tenant, window), seen.pending, keep)
                .await?;
            let prev = if seen.prev_read {
                None
            } else {
                let v = store
                    .get(&Self::key(&tenant, window.wrapping_sub(1)))
                    .await?;
                Some(
                    v.and_then(|b| String::from_utf8(b).ok()?.parse::<u64>().ok())
                        .unwrap_or(0),
                )
            };
            let mut tallies = self.lock();
            if let Some(t) = tallies.get_mut(&tenant).filter(|t| t.window == window) {
                t.pending -= seen.pending.min(t.pending);
                t.cur = t.cur.max(total);
                if let Some(p) = prev {
                    t.prev = t.prev.max(p);
                    t.prev_read = true;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(600);

    #[test]
    fn the_cap_binds_and_lifts_as_the_window_slides() {
        let l = SessionLedger::new(TTL);
        let t0 = 600_000 * 100; // start of a window
        for i in 1..=3 {
            assert_eq!(l.admit("k", 3, t0 + i), Ok(i));
        }
        assert!(l.admit("k", 3, t0 + 10).is_err());
        assert!(l.admit("other", 3, t0 + 10).is_ok(), "tenants are apart");
        // Half-way through the next window, half of the previous three
        // still count (rounded up): 2 live, one more fits.
        let mid = t0 + 600_000 + 300_000;
        assert_eq!(l.live("k", mid), 2);
        assert_eq!(l.admit("k", 3, mid), Ok(3));
        assert!(l.admit("k", 3, mid + 1).is_err());
        // Two windows later nothing is live.
        assert_eq!(l.live("k", t0 + 3 * 600_000), 0);
    }

    #[tokio::test]
    async fn replicas_see_each_others_sessions_after_a_sync() {
        let store = Store::memory();
        let (a, b) = (SessionLedger::new(TTL), SessionLedger::new(TTL));
        let t0 = 600_000 * 7 + 1000;
        for i in 0..4 {
            a.admit("k", 10, t0 + i).unwrap();
        }
        b.admit("k", 10, t0).unwrap();
        a.sync(&store, t0 + 100).await.unwrap();
        b.sync(&store, t0 + 100).await.unwrap();
        assert_eq!(b.live("k", t0 + 200), 5);
        a.sync(&store, t0 + 300).await.unwrap();
        assert_eq!(a.live("k", t0 + 300), 5);
        // A replica that starts in the next window reads the previous one.
        let c = SessionLedger::new(TTL);
        c.admit("k", 10, t0 + 600_000).unwrap();
        c.sync(&store, t0 + 600_000).await.unwrap();
        assert!(
            c.live("k", t0 + 600_000) >= 5,
            "{}",
            c.live("k", t0 + 600_000)
        );
    }
}

//! One actor that re-reads a list from the coordination store every
//! interval and reports it when it changes (TURN secrets, API keys).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use actix::prelude::*;
use natrix_store::{Store, StoreError};
use tracing::warn;

/// Reads the list from the store.
pub type Read<T> = fn(Store) -> Pin<Box<dyn Future<Output = Result<Vec<T>, StoreError>> + 'static>>;

/// Gets the list after every change.
pub type OnChange<T> = Box<dyn Fn(Vec<T>) + Send>;

/// Re-reads a list every interval; reports it when it differs from the
/// last one read. When the store is unreachable nothing is reported: the
/// last list stays in use.
pub struct StoreWatcher<T> {
    store: Store,
    interval: Duration,
    what: &'static str,
    read: Read<T>,
    on_change: OnChange<T>,
    last: Option<Vec<T>>,
    in_flight: bool,
}

impl<T> std::fmt::Debug for StoreWatcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWatcher")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl<T: Clone + PartialEq + Unpin + 'static> StoreWatcher<T> {
    /// A watcher of `what` (for logs) reading with `read` every `interval`.
    pub fn watch(
        store: Store,
        interval: Duration,
        what: &'static str,
        read: Read<T>,
        on_change: OnChange<T>,
    ) -> StoreWatcher<T> {
        StoreWatcher {
            store,
            interval,
            what,
            read,
            on_change,
            last: None,
            in_flight: false,
        }
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight {
            return;
        }
        self.in_flight = true;
        let read = (self.read)(self.store.clone());
        ctx.spawn(read.into_actor(self).map(|r, act, _| {
            act.in_flight = false;
            match r {
                Ok(list) if act.last.as_ref() != Some(&list) => {
                    (act.on_change)(list.clone());
                    act.last = Some(list);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, what = act.what, "reading from the store failed; keeping the current ones"),
            }
        }));
    }
}

impl<T: Clone + PartialEq + Unpin + 'static> Actor for StoreWatcher<T> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.poll(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.poll(ctx));
    }
}

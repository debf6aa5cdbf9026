//! Usage records: one per allocation, from the data-plane loops to the
//! operator's durable sinks — JSON lines appended to a file
//! (`--usage-file`) and/or entries of a Redis stream (`--usage-stream`,
//! trimmed to about `--usage-stream-max-len`) — never as metric labels.
//!
//! A loop hands each record (an allocation ended, or the relay stops with
//! it alive) to a bounded queue without waiting; a full queue drops the
//! record and counts it (`relay_usage_records_dropped_total`). The writer
//! (a task of the control plane) drains the queue every second: the
//! file is opened for each batch (so a rotated file is followed), the
//! stream gets one entry per record; what fails is counted and logged, and
//! a failed stream batch is not retried (the file, when configured, still
//! has it).

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use natrix_store::Store;
use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::IntCounter;
use tracing::warn;

use crate::core::UsageRecord;

/// Records waiting for the writer, at most.
pub const QUEUE: usize = 65_536;

/// Records written per batch, at most (the rest waits for the next tick).
const BATCH: usize = 8192;

/// The loops' end of the queue.
#[derive(Clone, Debug)]
pub struct UsageQueue(SyncSender<UsageRecord>);

/// A queue and its receiving end.
pub fn queue() -> (UsageQueue, Receiver<UsageRecord>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    (UsageQueue(tx), rx)
}

impl UsageQueue {
    /// Queues `record`; false when the queue is full (or the writer gone).
    pub fn push(&self, record: UsageRecord) -> bool {
        match self.0.try_send(record) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A record as one JSON object (one line of the file, one stream entry).
/// `relay` names the relay that wrote it.
pub fn record_json(r: &UsageRecord, relay: &str) -> serde_json::Value {
    let session = natrix_model::SessionToken::session_of(&r.username);
    let transport = r.client.transport.label();
    let way =
        |i: usize| serde_json::json!({"packets": r.usage.packets[i], "bytes": r.usage.bytes[i]});
    serde_json::json!({
        "relay": relay,
        "relayed": r.relayed.to_string(),
        "relayed_v6": r.relayed_v6.map(|r| r.to_string()),
        "client": r.client.client.to_string(),
        "transport": transport,
        "relayed_transport": if r.tcp { "tcp" } else { "udp" },
        "username": &*r.username,
        "session": session.map(|(s, _)| s),
        "tenant": session.and_then(|(_, t)| t),
        "start": r.usage.started_unix,
        "end": r.ended_unix,
        "seconds": r.ended_unix.saturating_sub(r.usage.started_unix),
        "ended": r.end,
        "client_to_peer": way(0),
        "peer_to_client": way(1),
        "peers": r.usage.peers,
    })
}

/// Where records go.
#[derive(Clone, Debug, Default)]
pub struct Sinks {
    /// JSON lines appended to this file.
    pub file: Option<PathBuf>,
    /// Entries of this stream in the coordination store, and its length.
    pub stream: Option<(String, usize)>,
}

impl Sinks {
    /// True when records go anywhere.
    pub fn any(&self) -> bool {
        self.file.is_some() || self.stream.is_some()
    }
}

#[derive(Clone, Debug)]
struct Counters {
    file: [IntCounter; 2],
    stream: [IntCounter; 2],
}

/// Writes queued records to the sinks: [`UsageWriter::drain`] every second
/// while the relay runs, and once more after its loops stopped (their last
/// records: the allocations that ended with them).
#[derive(Clone)]
pub struct UsageWriter {
    rx: Arc<Mutex<Receiver<UsageRecord>>>,
    sinks: Sinks,
    store: Store,
    relay: String,
    counters: Counters,
}

impl std::fmt::Debug for UsageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageWriter")
            .field("sinks", &self.sinks)
            .finish_non_exhaustive()
    }
}

impl UsageWriter {
    /// A writer of `rx`'s records to `sinks` (the stream in `store`), as
    /// relay `relay`.
    pub fn new(
        rx: Receiver<UsageRecord>,
        sinks: Sinks,
        store: Store,
        relay: String,
        telemetry: &Telemetry,
    ) -> UsageWriter {
        let family = telemetry.counter_family(&cat::RELAY_USAGE_RECORDS_TOTAL);
        let pair = |sink: &str| {
            ["written", "failed"].map(|result| family.with_label_values(&[sink, result]))
        };
        UsageWriter {
            rx: Arc::new(Mutex::new(rx)),
            sinks,
            store,
            relay,
            counters: Counters {
                file: pair("file"),
                stream: pair("stream"),
            },
        }
    }

    /// Appends `lines` to the file, opened for this batch.
    fn write_file(&self, path: &PathBuf, lines: &[String]) {
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| {
                let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
                for l in lines {
                    text.push_str(l);
                    text.push('\n');
                }
                f.write_all(text.as_bytes())?;
                f.flush()
            });
        let n = lines.len() as u64;
        match result {
            Ok(()) => self.counters.file[0].inc_by(n),
            Err(e) => {
                self.counters.file[1].inc_by(n);
                warn!(path = %path.display(), error = %e, records = n, "usage records not written to the file");
            }
        }
    }

    /// Writes every queued record (in batches); how many.
    pub async fn drain(&self) -> usize {
        let mut total = 0;
        loop {
            let lines: Vec<String> = {
                let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
                rx.try_iter()
                    .take(BATCH)
                    .map(|r| record_json(&r, &self.relay).to_string())
                    .collect()
            };
            if lines.is_empty() {
                return total;
            }
            total += lines.len();
            if let Some(path) = &self.sinks.file {
                self.write_file(path, &lines);
            }
            if let Some((stream, max_len)) = &self.sinks.stream {
                let (mut written, mut failed) = (0u64, 0u64);
                for l in &lines {
                    match self.store.append(stream, l.as_bytes(), *max_len).await {
                        Ok(_) => written += 1,
                        Err(e) => {
                            failed += 1;
                            if failed == 1 {
                                warn!(%stream, error = %e, "usage records not written to the stream");
                            }
                        }
                    }
                }
                self.counters.stream[0].inc_by(written);
                self.counters.stream[1].inc_by(failed);
            }
        }
    }
}

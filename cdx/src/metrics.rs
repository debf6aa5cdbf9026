//! CDX metric handles, resolved once at start-up, and the per-loop counters
//! the packet path increments.

use natrix_telemetry::catalogue as cat;
use natrix_telemetry::{LocalCounter, Telemetry};
use prometheus::{IntCounter, IntGauge};

use crate::binding::{DropReason, Outcome, Reply, Transport};

/// Shared handles for one transport.
#[derive(Clone, Debug)]
struct TransportHandles {
    requests: IntCounter,
    success: IntCounter,
    errors: IntCounter,
    legacy: IntCounter,
    indications: IntCounter,
    drops: [IntCounter; DropReason::ALL.len()],
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
    send_errors: IntCounter,
}

/// Every CDX metric handle, resolved from the catalogue.
#[derive(Clone, Debug)]
pub struct CdxMetrics {
    udp: TransportHandles,
    tcp: TransportHandles,
    /// Open TCP connections.
    pub(crate) tcp_connections: IntGauge,
    /// Accepted TCP connections.
    pub(crate) tcp_accepted: IntCounter,
    /// TCP connections refused at the limit.
    pub(crate) tcp_rejected: IntCounter,
    /// Change-IP requests handed to the sibling.
    pub(crate) handoffs_sent: IntCounter,
    /// Hand-offs from the sibling answered.
    pub(crate) handoffs_answered: IntCounter,
    /// Hand-offs refused (bad tag, stale, malformed).
    pub(crate) handoffs_rejected: IntCounter,
}

impl CdxMetrics {
    /// Resolves (and so creates) every CDX series in `telemetry`.
    pub fn new(telemetry: &Telemetry) -> CdxMetrics {
        let per = |t: Transport| {
            let l = t.label();
            let counter = |def| telemetry.counter_family(def).with_label_values(&[l]);
            let responses = telemetry.counter_family(&cat::CDX_BINDING_RESPONSES_TOTAL);
            let drops = telemetry.counter_family(&cat::CDX_PACKETS_DROPPED_TOTAL);
            TransportHandles {
                requests: counter(&cat::CDX_BINDING_REQUESTS_TOTAL),
                success: responses.with_label_values(&[l, "success"]),
                errors: responses.with_label_values(&[l, "error"]),
                legacy: counter(&cat::CDX_LEGACY_REQUESTS_TOTAL),
                indications: counter(&cat::CDX_BINDING_INDICATIONS_TOTAL),
                drops: DropReason::ALL.map(|r| drops.with_label_values(&[l, r.label()])),
                received_bytes: counter(&cat::CDX_RECEIVED_BYTES_TOTAL),
                sent_bytes: counter(&cat::CDX_SENT_BYTES_TOTAL),
                send_errors: counter(&cat::CDX_SEND_ERRORS_TOTAL),
            }
        };
        let tcp_total = telemetry.counter_family(&cat::CDX_TCP_CONNECTIONS_TOTAL);
        let handoffs = telemetry.counter_family(&cat::CDX_SIBLING_HANDOFFS_TOTAL);
        CdxMetrics {
            udp: per(Transport::Udp),
            tcp: per(Transport::Tcp),
            tcp_connections: telemetry.gauge(&cat::CDX_TCP_CONNECTIONS),
            tcp_accepted: tcp_total.with_label_values(&["accepted"]),
            tcp_rejected: tcp_total.with_label_values(&["rejected"]),
            handoffs_sent: handoffs.with_label_values(&["sent"]),
            handoffs_answered: handoffs.with_label_values(&["answered"]),
            handoffs_rejected: handoffs.with_label_values(&["rejected"]),
        }
    }

    /// Counters owned by one loop or connection.
    pub fn local(&self, transport: Transport) -> LoopCounters {
        let h = match transport {
            // DTLS is UDP under a record layer: counted as UDP.
            Transport::Udp | Transport::Dtls => &self.udp,
            // TLS is TCP framing under a record layer: counted as TCP.
            Transport::Tcp | Transport::Tls => &self.tcp,
        };
        LoopCounters {
            requests: LocalCounter::new(h.requests.clone()),
            success: LocalCounter::new(h.success.clone()),
            errors: LocalCounter::new(h.errors.clone()),
            legacy: LocalCounter::new(h.legacy.clone()),
            indications: LocalCounter::new(h.indications.clone()),
            drops: h.drops.clone().map(LocalCounter::new),
            received_bytes: LocalCounter::new(h.received_bytes.clone()),
            sent_bytes: LocalCounter::new(h.sent_bytes.clone()),
            send_errors: LocalCounter::new(h.send_errors.clone()),
        }
    }
}

/// Plain counters a loop increments per packet and publishes with
/// [`LoopCounters::flush`].
#[derive(Debug)]
pub struct LoopCounters {
    requests: LocalCounter,
    success: LocalCounter,
    errors: LocalCounter,
    legacy: LocalCounter,
    indications: LocalCounter,
    drops: [LocalCounter; DropReason::ALL.len()],
    received_bytes: LocalCounter,
    sent_bytes: LocalCounter,
    send_errors: LocalCounter,
}

impl LoopCounters {
    /// Counts one received packet of `len` bytes and what became of it.
    #[inline]
    pub fn record(&mut self, len: usize, outcome: &Outcome) {
        self.received_bytes.add(len as u64);
        match outcome {
            Outcome::Reply { kind, .. } => {
                self.requests.inc();
                match kind {
                    Reply::Success => self.success.inc(),
                    Reply::LegacySuccess => {
                        self.legacy.inc();
                        self.success.inc();
                    }
                    Reply::Error(_) => self.errors.inc(),
                }
            }
            Outcome::Indication => self.indications.inc(),
            Outcome::Drop(reason) => self.dropped(*reason),
        }
    }

    /// Counts the bytes of an exchange message (handed to the actor).
    #[inline]
    pub fn record_exchange(&mut self, len: usize) {
        self.received_bytes.add(len as u64);
    }

    /// Counts a drop decided outside the responder (e.g. framing).
    #[inline]
    pub fn dropped(&mut self, reason: DropReason) {
        // `ALL` lists every variant, so the position always exists.
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.drops[i].inc();
        }
    }

    /// Counts bytes sent.
    #[inline]
    pub fn sent(&mut self, len: usize) {
        self.sent_bytes.add(len as u64);
    }

    /// Counts a failed send.
    #[inline]
    pub fn send_failed(&mut self) {
        self.send_errors.inc();
    }

    /// Publishes everything counted since the last flush.
    pub fn flush(&mut self) {
        self.requests.flush();
        self.success.flush();
        self.errors.flush();
        self.legacy.flush();
        self.indications.flush();
        for d in &mut self.drops {
            d.flush();
        }
        self.received_bytes.flush();
        self.sent_bytes.flush();
        self.send_errors.flush();
    }
}

/// Handles of the connection-data exchange, resolved once.
#[derive(Clone, Debug)]
pub struct ExchangeMetrics {
    posts: Vec<(&'static str, IntCounter)>,
    profiles: Vec<IntCounter>,
    pub(crate) acked: IntCounter,
    pub(crate) expired: IntCounter,
    pub(crate) retransmits: IntCounter,
    /// Deliveries held back from unproven addresses.
    pub(crate) held: IntCounter,
    pub(crate) stray_acks: IntCounter,
    pub(crate) sessions: IntGauge,
    pub(crate) events: IntCounter,
    pub(crate) events_malformed: IntCounter,
    pub(crate) send_errors: IntCounter,
}

impl ExchangeMetrics {
    /// Resolves (and so creates) every exchange series in `telemetry`.
    pub fn new(telemetry: &Telemetry) -> ExchangeMetrics {
        let posts = telemetry.counter_family(&cat::CDX_EXCHANGE_POSTS_TOTAL);
        let deliveries = telemetry.counter_family(&cat::CDX_EXCHANGE_DELIVERIES_TOTAL);
        let events = telemetry.counter_family(&cat::CDX_EXCHANGE_EVENTS_TOTAL);
        let profiles = telemetry.counter_family(&cat::CDX_NAT_PROFILES_TOTAL);
        let [mapping, filtering] = cat::CDX_NAT_PROFILES_TOTAL.labels else {
            unreachable!("two labels in the catalogue")
        };
        ExchangeMetrics {
            posts: cat::CDX_EXCHANGE_POSTS_TOTAL.labels[0]
                .values
                .iter()
                .map(|v| (*v, posts.with_label_values(&[v])))
                .collect(),
            profiles: mapping
                .values
                .iter()
                .flat_map(|m| filtering.values.iter().map(move |f| (m, f)))
                .map(|(m, f)| profiles.with_label_values(&[m, f]))
                .collect(),
            acked: deliveries.with_label_values(&["acked"]),
            expired: deliveries.with_label_values(&["expired"]),
            held: deliveries.with_label_values(&["held"]),
            retransmits: telemetry
                .counter_family(&cat::CDX_EXCHANGE_RETRANSMITS_TOTAL)
                .with_label_values(&[] as &[&str]),
            stray_acks: telemetry
                .counter_family(&cat::CDX_EXCHANGE_STRAY_ACKS_TOTAL)
                .with_label_values(&[] as &[&str]),
            sessions: telemetry.gauge(&cat::CDX_EXCHANGE_SESSIONS),
            events: events.with_label_values(&["applied"]),
            events_malformed: events.with_label_values(&["malformed"]),
            send_errors: telemetry
                .counter_family(&cat::CDX_SEND_ERRORS_TOTAL)
                .with_label_values(&["udp"]),
        }
    }

    /// The posts counter for `result` (a value of the catalogue's label).
    pub fn post(&self, result: &str) -> &IntCounter {
        self.posts
            .iter()
            .find(|(v, _)| *v == result)
            .map_or(&self.posts[0].1, |(_, c)| c)
    }

    /// The NAT-profile counter for PROFILE codes `mapping`, `filtering`
    /// (out-of-range codes count as unknown).
    pub(crate) fn profile(&self, mapping: u8, filtering: u8) -> &IntCounter {
        let m = if mapping > 4 { 0 } else { usize::from(mapping) };
        let f = if filtering > 3 {
            0
        } else {
            usize::from(filtering)
        };
        &self.profiles[m * 4 + f]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_match_the_metric_catalogue() {
        let declared = natrix_telemetry::catalogue::CDX_DROP_REASON.values;
        let ours: Vec<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(ours, declared);
    }
}

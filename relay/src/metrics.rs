//! Relay metric handles, resolved once, and the publisher that turns a
//! loop's [`Stats`] into Prometheus series by delta (the packet path only
//! increments plain fields).

use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::{IntCounter, IntGauge};

use crate::core::{
    AuthFailureReason, Direction, DropReason, Refusal, RequestMethod, RequestResult, Stats,
    TcpEvent,
};

/// Every relay metric handle.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    allocations: IntGauge,
    dual_stack: IntGauge,
    multiplexed: IntGauge,
    multiplex_sockets: IntGauge,
    created: IntCounter,
    moved: [IntCounter; 2],
    expired: IntCounter,
    deleted: IntCounter,
    disconnected: IntCounter,
    packets: [IntCounter; 2],
    bytes: [IntCounter; 2],
    dropped: [IntCounter; DropReason::ALL.len()],
    requests: Vec<[IntCounter; RequestResult::CODES.len()]>,
    auth_failures: [IntCounter; AuthFailureReason::ALL.len()],
    refused: [IntCounter; Refusal::ALL.len()],
    tcp_allocations: IntGauge,
    tcp_peer_connections: IntGauge,
    tcp_events: [IntCounter; TcpEvent::ALL.len()],
    tcp_bytes: [IntCounter; 2],
    /// Channel bindings on the XDP fast path.
    pub xdp_entries: IntGauge,
    xdp_packets: [IntCounter; 6],
    xdp_program_seconds: prometheus::Counter,
    /// Failed sends.
    pub send_errors: IntCounter,
    /// Open TCP connections.
    pub tcp_connections: IntGauge,
    /// Open TLS connections.
    pub tls_connections: IntGauge,
    /// Connections refused at the limit.
    pub connections_rejected: IntCounter,
    /// Connections closed for idling without an allocation.
    pub connections_idle_closed: IntCounter,
    banned_sources: IntGauge,
    bans: IntCounter,
    /// Usage records dropped at a full queue.
    pub usage_dropped: IntCounter,
    /// PROXY headers: proxied, local, malformed.
    pub proxy_headers: [IntCounter; 3],
    dtls_sessions: IntGauge,
    /// completed, failed, refused, dtls1_0, no_cookie.
    dtls_handshakes: [IntCounter; 5],
}

impl RelayMetrics {
    /// Resolves (and so creates) every relay series.
    pub fn new(t: &Telemetry) -> RelayMetrics {
        let ended = t.counter_family(&cat::RELAY_ALLOCATIONS_ENDED_TOTAL);
        let packets = t.counter_family(&cat::RELAY_FORWARDED_PACKETS_TOTAL);
        let bytes = t.counter_family(&cat::RELAY_FORWARDED_BYTES_TOTAL);
        let dropped = t.counter_family(&cat::RELAY_PACKETS_DROPPED_TOTAL);
        let requests = t.counter_family(&cat::RELAY_REQUESTS_TOTAL);
        let auth = t.counter_family(&cat::RELAY_AUTH_FAILURES_TOTAL);
        let refused = t.counter_family(&cat::RELAY_REQUESTS_REFUSED_TOTAL);
        let conns = t.gauge_family(&cat::RELAY_CONNECTIONS);
        RelayMetrics {
            allocations: t.gauge(&cat::RELAY_ALLOCATIONS),
            dual_stack: t.gauge(&cat::RELAY_DUAL_STACK_ALLOCATIONS),
            multiplexed: t.gauge(&cat::RELAY_MULTIPLEXED_ALLOCATIONS),
            multiplex_sockets: t.gauge(&cat::RELAY_MULTIPLEX_SOCKETS),
            created: t.counter(&cat::RELAY_ALLOCATIONS_CREATED_TOTAL),
            moved: ["same_loop", "across_loops"].map(|p| {
                t.counter_family(&cat::RELAY_ALLOCATIONS_MOVED_TOTAL)
                    .with_label_values(&[p])
            }),
            expired: ended.with_label_values(&["expired"]),
            deleted: ended.with_label_values(&["deleted"]),
            disconnected: ended.with_label_values(&["disconnected"]),
            packets: Direction::ALL.map(|d| packets.with_label_values(&[d.label()])),
            bytes: Direction::ALL.map(|d| bytes.with_label_values(&[d.label()])),
            dropped: DropReason::ALL.map(|r| dropped.with_label_values(&[r.label()])),
            requests: RequestMethod::ALL
                .iter()
                .map(|m| RequestResult::LABELS.map(|r| requests.with_label_values(&[m.label(), r])))
                .collect(),
            auth_failures: AuthFailureReason::ALL.map(|r| auth.with_label_values(&[r.label()])),
            refused: Refusal::ALL.map(|r| refused.with_label_values(&[r.label()])),
            tcp_allocations: t.gauge(&cat::RELAY_TCP_ALLOCATIONS),
            tcp_peer_connections: t.gauge(&cat::RELAY_TCP_CONNECTIONS),
            tcp_events: TcpEvent::ALL.map(|e| {
                t.counter_family(&cat::RELAY_TCP_CONNECTION_EVENTS_TOTAL)
                    .with_label_values(&[e.label()])
            }),
            xdp_entries: t.gauge(&cat::RELAY_XDP_ENTRIES),
            xdp_program_seconds: t.seconds_counter(&cat::RELAY_XDP_PROGRAM_SECONDS_TOTAL),
            xdp_packets: [
                "to_peer",
                "to_client",
                "expired",
                "no_route",
                "passed",
                "capped",
            ]
            .map(|r| {
                t.counter_family(&cat::RELAY_XDP_PACKETS_TOTAL)
                    .with_label_values(&[r])
            }),
            tcp_bytes: Direction::ALL.map(|d| {
                t.counter_family(&cat::RELAY_TCP_RELAYED_BYTES_TOTAL)
                    .with_label_values(&[d.label()])
            }),
            send_errors: t.counter(&cat::RELAY_SEND_ERRORS_TOTAL),
            tcp_connections: conns.with_label_values(&["tcp"]),
            tls_connections: conns.with_label_values(&["tls"]),
            connections_rejected: t.counter(&cat::RELAY_CONNECTIONS_REJECTED_TOTAL),
            connections_idle_closed: t.counter(&cat::RELAY_CONNECTIONS_IDLE_CLOSED_TOTAL),
            banned_sources: t.gauge(&cat::RELAY_AUTH_BANNED_SOURCES),
            bans: t.counter(&cat::RELAY_AUTH_BANS_TOTAL),
            usage_dropped: t.counter(&cat::RELAY_USAGE_RECORDS_DROPPED_TOTAL),
            proxy_headers: ["proxied", "local", "malformed"].map(|r| {
                t.counter_family(&cat::RELAY_PROXY_HEADERS_TOTAL)
                    .with_label_values(&[r])
            }),
            dtls_sessions: t.gauge(&cat::RELAY_DTLS_SESSIONS),
            dtls_handshakes: ["completed", "failed", "refused", "dtls1_0", "no_cookie"].map(|r| {
                t.counter_family(&cat::RELAY_DTLS_HANDSHAKES_TOTAL)
                    .with_label_values(&[r])
            }),
        }
    }

    /// Adds what changed in one loop's DTLS sessions: the sessions now
    /// (`live`) and the handshake outcomes, each as (before, now).
    pub fn publish_dtls(&self, live: (u64, u64), outcomes: [(u64, u64); 5]) {
        self.dtls_sessions.add(live.1 as i64 - live.0 as i64);
        for (c, (a, b)) in self.dtls_handshakes.iter().zip(outcomes) {
            if b > a {
                c.inc_by(b - a);
            }
        }
    }

    /// Adds what the XDP program's per-CPU counters gained between two
    /// readings (`crate::xdp` indexes).
    pub fn publish_xdp(&self, last: &[u64], now: &[u64], program_time: std::time::Duration) {
        let seen = self.xdp_program_seconds.get();
        let now_s = program_time.as_secs_f64();
        if now_s > seen {
            self.xdp_program_seconds.inc_by(now_s - seen);
        }
        use crate::xdp as x;
        let index = [
            x::STAT_TO_PEER_PACKETS,
            x::STAT_TO_CLIENT_PACKETS,
            x::STAT_EXPIRED,
            x::STAT_NO_ROUTE,
            x::STAT_PASSED,
            x::STAT_CAPPED,
        ];
        for (c, i) in self.xdp_packets.iter().zip(index) {
            let (a, b) = (last[i as usize], now[i as usize]);
            if b > a {
                c.inc_by(b - a);
            }
        }
    }

    /// The host's ban table: sources banned now, bans made so far.
    pub fn publish_bans(&self, banned: usize, bans: u64) {
        self.banned_sources.set(banned as i64);
        let seen = self.bans.get();
        if bans > seen {
            self.bans.inc_by(bans - seen);
        }
    }

    /// Adds what changed between `last` and `now` (one loop's stats).
    pub fn publish(&self, last: &Stats, now: &Stats) {
        let inc = |c: &IntCounter, a: u64, b: u64| {
            if b > a {
                c.inc_by(b - a);
            }
        };
        self.allocations
            .add(now.allocations as i64 - last.allocations as i64);
        self.dual_stack
            .add(now.dual_stack_allocations as i64 - last.dual_stack_allocations as i64);
        self.multiplexed
            .add(now.multiplexed_allocations as i64 - last.multiplexed_allocations as i64);
        self.multiplex_sockets
            .add(now.multiplex_sockets as i64 - last.multiplex_sockets as i64);
        inc(
            &self.created,
            last.allocations_created,
            now.allocations_created,
        );
        for (i, c) in self.moved.iter().enumerate() {
            inc(c, last.allocations_moved[i], now.allocations_moved[i]);
        }
        inc(
            &self.expired,
            last.allocations_expired,
            now.allocations_expired,
        );
        inc(
            &self.deleted,
            last.allocations_deleted,
            now.allocations_deleted,
        );
        inc(
            &self.disconnected,
            last.allocations_disconnected,
            now.allocations_disconnected,
        );
        for i in 0..2 {
            inc(
                &self.packets[i],
                last.forwarded_packets[i],
                now.forwarded_packets[i],
            );
            inc(
                &self.bytes[i],
                last.forwarded_bytes[i],
                now.forwarded_bytes[i],
            );
        }
        for (i, c) in self.dropped.iter().enumerate() {
            inc(c, last.dropped[i], now.dropped[i]);
        }
        for (m, row) in self.requests.iter().enumerate() {
            for (r, c) in row.iter().enumerate() {
                inc(c, last.requests[m][r], now.requests[m][r]);
            }
        }
        for (i, c) in self.auth_failures.iter().enumerate() {
            inc(c, last.auth_failures[i], now.auth_failures[i]);
        }
        for (i, c) in self.refused.iter().enumerate() {
            inc(c, last.refused[i], now.refused[i]);
        }
        self.tcp_allocations
            .add(now.tcp_allocations as i64 - last.tcp_allocations as i64);
        self.tcp_peer_connections
            .add(now.tcp_connections as i64 - last.tcp_connections as i64);
        for (i, c) in self.tcp_events.iter().enumerate() {
            inc(c, last.tcp_events[i], now.tcp_events[i]);
        }
        for (i, c) in self.tcp_bytes.iter().enumerate() {
            inc(c, last.tcp_bytes[i], now.tcp_bytes[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalogue's closed label sets must match the core's enums.
    #[test]
    fn catalogue_labels_match_the_core() {
        let labels = |l: &cat::Label| l.values.to_vec();
        assert_eq!(
            labels(&cat::RELAY_DROP_REASON),
            DropReason::ALL.map(|r| r.label()).to_vec()
        );
        assert_eq!(
            labels(&cat::RELAY_METHOD),
            RequestMethod::ALL.map(|m| m.label()).to_vec()
        );
        assert_eq!(labels(&cat::RELAY_RESULT), RequestResult::LABELS.to_vec());
        assert_eq!(
            labels(&cat::RELAY_AUTH_FAILURE_REASON),
            AuthFailureReason::ALL.map(|r| r.label()).to_vec()
        );
        assert_eq!(
            labels(&cat::RELAY_DIRECTION),
            Direction::ALL.map(|d| d.label()).to_vec()
        );
        assert_eq!(
            labels(&cat::RELAY_REFUSAL_REASON),
            Refusal::ALL.map(|r| r.label()).to_vec()
        );
        assert_eq!(
            labels(&cat::RELAY_TCP_EVENT),
            TcpEvent::ALL.map(|e| e.label()).to_vec()
        );
    }
}

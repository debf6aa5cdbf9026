//! The one catalogue of metric names and help strings.
//!
//! Conventions (checked by the tests below): names carry a role prefix
//! (`natrix_`, `cluster_`, `relay_`, `cdx_`, `lookup_`, `loadtest_`), base
//! units (`_seconds`, `_bytes`), `_total` on counters and only on counters;
//! label sets are closed (every value listed here), and no label ever holds a
//! client address, user, session, port or channel.

/// Metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter.
    Counter,
    /// Monotonic counter of seconds, fractional (CPU or busy time).
    SecondsCounter,
    /// Gauge.
    Gauge,
    /// Histogram (buckets in [`MetricDef::buckets`]).
    Histogram,
}

/// A label and its closed set of values.
#[derive(Clone, Copy, Debug)]
pub struct Label {
    /// Label name.
    pub name: &'static str,
    /// Every value the label takes. Empty only for `natrix_build_info`'s
    /// `version`, which has exactly one value per process.
    pub values: &'static [&'static str],
}

/// One metric.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    /// Full metric name.
    pub name: &'static str,
    /// Help text, one sentence.
    pub help: &'static str,
    /// Type.
    pub kind: Kind,
    /// Labels, in order.
    pub labels: &'static [Label],
    /// Histogram buckets (upper bounds, base units).
    pub buckets: &'static [f64],
}

const fn metric(
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [Label],
) -> MetricDef {
    MetricDef {
        name,
        help,
        kind,
        labels,
        buckets: &[],
    }
}

/// Client transports of the STUN/TURN listeners.
pub const TRANSPORT: Label = Label {
    name: "transport",
    values: &["udp", "tcp"],
};

/// Why a CDX listener dropped a packet without answering.
pub const CDX_DROP_REASON: Label = Label {
    name: "reason",
    values: &[
        // Not STUN at all (first bits, or a ChannelData frame on a STUN-only port).
        "not_stun",
        // STUN-shaped but structurally invalid (lengths, attribute overruns).
        "malformed",
        // FINGERPRINT present and wrong.
        "bad_fingerprint",
        // A response or an indication: nothing to answer.
        "unexpected_class",
        // A TCP frame larger than the listener accepts.
        "oversized",
        // An answer over the per-prefix or total rate limit.
        "rate_limited",
    ],
};

/// `natrix_build_info`: constant 1, labelled with the version.
pub const BUILD_INFO: MetricDef = metric(
    "natrix_build_info",
    "Build information of the running natrix binary; the value is always 1.",
    Kind::Gauge,
    &[Label {
        name: "version",
        values: &[],
    }],
);

/// Binding requests received by CDX.
pub const CDX_BINDING_REQUESTS_TOTAL: MetricDef = metric(
    "cdx_binding_requests_total",
    "STUN requests received by the CDX role and answered (requests of other methods are refused with 400 and counted too).",
    Kind::Counter,
    &[TRANSPORT],
);

/// Binding responses sent by CDX.
pub const CDX_BINDING_RESPONSES_TOTAL: MetricDef = metric(
    "cdx_binding_responses_total",
    "STUN Binding responses sent by the CDX role, by result.",
    Kind::Counter,
    &[
        TRANSPORT,
        Label {
            name: "result",
            values: &["success", "error"],
        },
    ],
);

/// Requests answered for RFC 3489 clients.
pub const CDX_LEGACY_REQUESTS_TOTAL: MetricDef = metric(
    "cdx_legacy_requests_total",
    "Binding requests from RFC 3489 clients (no magic cookie), answered with MAPPED-ADDRESS.",
    Kind::Counter,
    &[TRANSPORT],
);

/// Binding indications (keepalives) received by CDX.
pub const CDX_BINDING_INDICATIONS_TOTAL: MetricDef = metric(
    "cdx_binding_indications_total",
    "STUN Binding indications (keepalives) received by the CDX role; they get no answer.",
    Kind::Counter,
    &[TRANSPORT],
);

/// Packets dropped by CDX.
pub const CDX_PACKETS_DROPPED_TOTAL: MetricDef = metric(
    "cdx_packets_dropped_total",
    "Packets the CDX role dropped without an answer, by reason.",
    Kind::Counter,
    &[TRANSPORT, CDX_DROP_REASON],
);

/// Bytes received by the CDX listeners.
pub const CDX_RECEIVED_BYTES_TOTAL: MetricDef = metric(
    "cdx_received_bytes_total",
    "Bytes received by the CDX listeners (STUN payload, without IP/UDP/TCP headers).",
    Kind::Counter,
    &[TRANSPORT],
);

/// Answers that could not be sent.
pub const CDX_SEND_ERRORS_TOTAL: MetricDef = metric(
    "cdx_send_errors_total",
    "Answers the CDX listeners failed to send (socket errors other than a full buffer).",
    Kind::Counter,
    &[TRANSPORT],
);

/// Bytes sent by the CDX listeners.
pub const CDX_SENT_BYTES_TOTAL: MetricDef = metric(
    "cdx_sent_bytes_total",
    "Bytes sent by the CDX listeners (STUN payload, without IP/UDP/TCP headers).",
    Kind::Counter,
    &[TRANSPORT],
);

/// Open TCP connections.
pub const CDX_TCP_CONNECTIONS: MetricDef = metric(
    "cdx_tcp_connections",
    "TCP connections currently open on the CDX listeners.",
    Kind::Gauge,
    &[],
);

/// TCP connections accepted or refused.
pub const CDX_TCP_CONNECTIONS_TOTAL: MetricDef = metric(
    "cdx_tcp_connections_total",
    "TCP connections to the CDX listeners, accepted or rejected at the connection limit.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["accepted", "rejected"],
    }],
);

/// Stream transports of the TURN listeners.
pub const TURN_STREAM_TRANSPORT: Label = Label {
    name: "transport",
    values: &["tcp", "tls"],
};

/// Direction of relayed traffic.
pub const RELAY_DIRECTION: Label = Label {
    name: "direction",
    values: &["client_to_peer", "peer_to_client"],
};

/// Why the relay dropped a packet (mirrors `natrix_relay::core::DropReason`).
pub const RELAY_DROP_REASON: Label = Label {
    name: "reason",
    values: &[
        "not_turn",
        "malformed",
        "bad_fingerprint",
        "unexpected_class",
        "no_allocation",
        "no_permission",
        "unbound_channel",
        "rate_limited",
        "bandwidth_exceeded",
        "stale_allocation",
        "too_large",
        "own_address",
        "banned",
        "peer_claimed",
        "tcp_allocation",
    ],
};

/// TURN request methods (mirrors `natrix_relay::core::RequestMethod`).
pub const RELAY_METHOD: Label = Label {
    name: "method",
    values: &[
        "binding",
        "allocate",
        "refresh",
        "create_permission",
        "channel_bind",
        "connect",
        "connection_bind",
        "other",
    ],
};

/// Request results: success or the STUN error code sent.
pub const RELAY_RESULT: Label = Label {
    name: "result",
    values: &[
        "success", "400", "401", "403", "405", "420", "437", "438", "440", "441", "442", "443",
        "486", "500", "508", "300", "446", "447",
    ],
};

/// Why credentials were refused (mirrors `natrix_relay::core::AuthFailureReason`).
pub const RELAY_AUTH_FAILURE_REASON: Label = Label {
    name: "reason",
    values: &[
        "unknown_user",
        "expired",
        "wrong_relay",
        "bad_integrity",
        "bad_nonce",
        "wrong_credentials",
    ],
};

/// Why a request was refused (mirrors `natrix_relay::core::Refusal`).
pub const RELAY_REFUSAL_REASON: Label = Label {
    name: "reason",
    values: &[
        "unknown_method",
        "incomplete_credentials",
        "unknown_attribute",
        "missing_requested_transport",
        "unsupported_transport",
        "malformed_attribute",
        "conflicting_attributes",
        "address_family_not_supported",
        "allocation_exists",
        "no_allocation",
        "peer_address_family_mismatch",
        "missing_peer",
        "bad_channel_number",
        "channel_conflict",
        "peer_denied",
        "peer_outside_session",
        "peer_claimed",
        "user_quota",
        "source_quota",
        "session_quota",
        "tenant_quota",
        "mobility_forbidden",
        "unknown_ticket",
        "draining",
        "host_capacity",
        "try_alternate",
        "no_relay_port",
        "unknown_reservation",
        "permissions_full",
        "channels_full",
        "internal",
        "tcp_over_udp",
        "tcp_allocation_options",
        "not_udp_allocation",
        "not_tcp_allocation",
        "connection_exists",
        "connection_failed",
        "connections_full",
        "unknown_connection",
        "bind_on_allocation",
        "wrong_connection_user",
    ],
};

/// Allocations alive.
pub const RELAY_ALLOCATIONS: MetricDef = metric(
    "relay_allocations",
    "TURN allocations currently alive on this relay.",
    Kind::Gauge,
    &[],
);

/// Dual-stack allocations alive.
pub const RELAY_DUAL_STACK_ALLOCATIONS: MetricDef = metric(
    "relay_dual_stack_allocations",
    "Of the live TURN allocations, those with an IPv4 and an IPv6 relayed address (RFC 8656 ADDITIONAL-ADDRESS-FAMILY; each holds two relay ports).",
    Kind::Gauge,
    &[],
);

/// Allocations on shared relayed addresses.
pub const RELAY_MULTIPLEXED_ALLOCATIONS: MetricDef = metric(
    "relay_multiplexed_allocations",
    "Of the live TURN allocations, those on a shared relayed address (--relay-multiplex-ports): the relay port range was used up when they came, and their peers are told apart by source address.",
    Kind::Gauge,
    &[],
);

/// Shared relay sockets open.
pub const RELAY_MULTIPLEX_SOCKETS: MetricDef = metric(
    "relay_multiplex_sockets",
    "Shared relay sockets open (--relay-multiplex-ports; each opens at the first allocation that needs it and stays open).",
    Kind::Gauge,
    &[],
);

/// The relay's allocation limit.
pub const RELAY_ALLOCATION_CAPACITY: MetricDef = metric(
    "relay_allocation_capacity",
    "Most allocations this relay accepts (--max-allocations); with relay_allocations, its utilisation.",
    Kind::Gauge,
    &[],
);

/// Allocations created.
pub const RELAY_ALLOCATIONS_CREATED_TOTAL: MetricDef = metric(
    "relay_allocations_created_total",
    "TURN allocations created.",
    Kind::Counter,
    &[],
);

/// Allocations moved to a new client address (TURN mobility).
pub const RELAY_ALLOCATIONS_MOVED_TOTAL: MetricDef = metric(
    "relay_allocations_moved_total",
    "TURN allocations moved to a new client 5-tuple by a mobility ticket (RFC 8016): a client whose address changed kept its relayed address; across_loops when its new address reached another of the relay's loops, which took the allocation over.",
    Kind::Counter,
    &[Label {
        name: "path",
        values: &["same_loop", "across_loops"],
    }],
);

/// Allocations ended, by why.
pub const RELAY_ALLOCATIONS_ENDED_TOTAL: MetricDef = metric(
    "relay_allocations_ended_total",
    "TURN allocations ended: expired (not refreshed), deleted (Refresh with lifetime 0) or disconnected (TCP/TLS client gone).",
    Kind::Counter,
    &[Label {
        name: "reason",
        values: &["expired", "deleted", "disconnected"],
    }],
);

/// Relayed packets.
pub const RELAY_FORWARDED_PACKETS_TOTAL: MetricDef = metric(
    "relay_forwarded_packets_total",
    "Packets relayed between clients and peers, by direction.",
    Kind::Counter,
    &[RELAY_DIRECTION],
);

/// Relayed payload bytes.
pub const RELAY_FORWARDED_BYTES_TOTAL: MetricDef = metric(
    "relay_forwarded_bytes_total",
    "Application payload bytes relayed between clients and peers, by direction (without TURN framing).",
    Kind::Counter,
    &[RELAY_DIRECTION],
);

/// Dropped packets.
pub const RELAY_PACKETS_DROPPED_TOTAL: MetricDef = metric(
    "relay_packets_dropped_total",
    "Packets the relay dropped without forwarding or answering, by reason.",
    Kind::Counter,
    &[RELAY_DROP_REASON],
);

/// Requests by method and result.
pub const RELAY_REQUESTS_TOTAL: MetricDef = metric(
    "relay_requests_total",
    "STUN/TURN requests the relay answered, by method and result (success or error code).",
    Kind::Counter,
    &[RELAY_METHOD, RELAY_RESULT],
);

/// Authentication failures.
pub const RELAY_AUTH_FAILURES_TOTAL: MetricDef = metric(
    "relay_auth_failures_total",
    "Requests whose credentials were refused, by reason.",
    Kind::Counter,
    &[RELAY_AUTH_FAILURE_REASON],
);

/// Admin API requests.
pub const RELAY_ADMIN_REQUESTS_TOTAL: MetricDef = metric(
    "relay_admin_requests_total",
    "Requests to the relay's admin API (--admin-listen), by route and result (unauthorized: without the admin token; throttled: from a source past its 10 refusals a minute, answered 429 unread).",
    Kind::Counter,
    &[
        Label {
            name: "route",
            values: &["list", "kill", "drain", "quotas"],
        },
        Label {
            name: "result",
            values: &[
                "ok",
                "unauthorized",
                "not_found",
                "bad_request",
                "throttled",
            ],
        },
    ],
);

/// PROXY protocol v2 headers read from load balancers.
pub const RELAY_PROXY_HEADERS_TOTAL: MetricDef = metric(
    "relay_proxy_headers_total",
    "PROXY protocol v2 headers on connections from --proxy-protocol-from sources: naming a client (proxied), the balancer's own (local), or not a valid header (malformed: the connection was closed).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["proxied", "local", "malformed"],
    }],
);

/// TLS connections routed by their ClientHello (one port for TURN and HTTPS).
pub const RELAY_TLS_ROUTED_TOTAL: MetricDef = metric(
    "relay_tls_routed_total",
    "TLS connections on a listener shared with HTTPS (--tls-http-backend), by where their ClientHello sent them: TURN in the relay, or the HTTPS front (ALPN http/1.1, h2 or http/1.0, or a --tls-http-names server name).",
    Kind::Counter,
    &[Label {
        name: "to",
        values: &["turn", "https"],
    }],
);

/// What happens to TCP allocations' peer data connections.
pub const RELAY_TCP_EVENT: Label = Label {
    name: "event",
    values: &[
        "connected",
        "connect_failed",
        "accepted",
        "refused",
        "bound",
        "bind_timeout",
        "bind_handed_over",
    ],
};

/// TCP allocations alive.
pub const RELAY_TCP_ALLOCATIONS: MetricDef = metric(
    "relay_tcp_allocations",
    "Of the live TURN allocations, TCP allocations (RFC 6062: a relayed TCP address, peers reached over connections; --tcp-relay).",
    Kind::Gauge,
    &[],
);

/// Peer data connections of TCP allocations.
pub const RELAY_TCP_CONNECTIONS: MetricDef = metric(
    "relay_tcp_peer_connections",
    "Peer data connections of TCP allocations now: connecting for a Connect, waiting for the client's ConnectionBind (at most 30 s), or spliced with a client data connection.",
    Kind::Gauge,
    &[],
);

/// What became of peer data connections.
pub const RELAY_TCP_CONNECTION_EVENTS_TOTAL: MetricDef = metric(
    "relay_tcp_peer_connection_events_total",
    "Peer data connections of TCP allocations by what happened: a Connect's connection established or failed (447), a peer's connection accepted and offered (ConnectionAttempt) or refused (no permission, deny-list, cap), a ConnectionBind joining it, no ConnectionBind within 30 s, or a ConnectionBind that reached another loop and was handed to the one holding the connection.",
    Kind::Counter,
    &[RELAY_TCP_EVENT],
);

/// Bytes relayed over peer data connections.
pub const RELAY_TCP_RELAYED_BYTES_TOTAL: MetricDef = metric(
    "relay_tcp_relayed_bytes_total",
    "Bytes relayed between client and peer data connections of TCP allocations (RFC 6062), by direction; relay_forwarded_bytes_total counts UDP relaying.",
    Kind::Counter,
    &[RELAY_DIRECTION],
);

/// Channel bindings on the XDP fast path.
pub const RELAY_XDP_ENTRIES: MetricDef = metric(
    "relay_xdp_entries",
    "Channel bindings the XDP fast path relays now (--xdp): UDP clients' channels with a live permission, client and peer of one family (IPv6 with IPv6 forwarding on), on relay ports of their own (a bandwidth cap is metered in the kernel).",
    Kind::Gauge,
    &[],
);

/// CPU time in the XDP program.
pub const RELAY_XDP_PROGRAM_SECONDS_TOTAL: MetricDef = metric(
    "relay_xdp_program_seconds_total",
    "CPU time the XDP fast path's program ran (the kernel's per-program accounting, on while the relay runs with --xdp): the relaying the relay process no longer does; the redirects' transmit work is not in it.",
    Kind::SecondsCounter,
    &[],
);

/// Outcomes of the XDP fast path.
pub const RELAY_XDP_RESULT: Label = Label {
    name: "result",
    values: &[
        "to_peer",
        "to_client",
        "expired",
        "no_route",
        "passed",
        "capped",
    ],
};

/// What the XDP program did with the packets it looked at.
pub const RELAY_XDP_PACKETS_TOTAL: MetricDef = metric(
    "relay_xdp_packets_total",
    "Packets the XDP fast path relayed (to_peer, to_client: also counted in relay_forwarded_packets_total) or passed to the userspace relay: an entry past its expiry, a destination without a neighbour or route yet, a UDP datagram with no entry (STUN, bindings not on the fast path); or dropped over the allocation's bandwidth cap (capped: also counted in relay_packets_dropped_total{reason=\"bandwidth_exceeded\"}).",
    Kind::Counter,
    &[RELAY_XDP_RESULT],
);

/// DTLS sessions past the cookie.
pub const RELAY_DTLS_SESSIONS: MetricDef = metric(
    "relay_dtls_sessions",
    "TURN-over-DTLS sessions whose client returned its HelloVerifyRequest cookie (handshaking or connected) now; capped like connections by --max-connections and --max-connections-per-ip.",
    Kind::Gauge,
    &[],
);

/// What became of DTLS handshakes.
pub const RELAY_DTLS_HANDSHAKES_TOTAL: MetricDef = metric(
    "relay_dtls_handshakes_total",
    "TURN-over-DTLS handshakes by outcome: completed; failed (an error, no common cipher suite, the 10 s deadline); refused (the session caps, or the loop's handshake time for a turn spent: the client retransmits); dtls1_0 (a DTLS 1.0 ClientHello, answered with a protocol_version alert); no_cookie (a HelloVerifyRequest never answered: spoofed sources, or clients gone).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["completed", "failed", "refused", "dtls1_0", "no_cookie"],
    }],
);

/// Connections the HTTPS front serves now.
pub const RELAY_HTTPS_CONNECTIONS: MetricDef = metric(
    "relay_https_connections",
    "HTTPS connections the relay's front passes to --tls-http-backend now (at most 1024).",
    Kind::Gauge,
    &[],
);

/// What the HTTPS front did with requests and connections.
pub const RELAY_HTTPS_REQUESTS_TOTAL: MetricDef = metric(
    "relay_https_requests_total",
    "HTTPS on the TURN-over-TLS port: requests passed to --tls-http-backend (forwarded, upgraded to WebSocket), request heads refused (bad_request: not HTTP/1.x, over 16 KiB, chunked, two lengths; the connection ends), and connections lost before a request (handshake_failed, backend_failed, refused_full at 1024 connections or 32 from one address).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &[
            "forwarded",
            "upgraded",
            "bad_request",
            "handshake_failed",
            "backend_failed",
            "refused_full",
        ],
    }],
);

/// Usage records written to each sink.
pub const RELAY_USAGE_RECORDS_TOTAL: MetricDef = metric(
    "relay_usage_records_total",
    "Usage records (one per allocation) written to a sink (--usage-file, --usage-stream) or that failed to be.",
    Kind::Counter,
    &[
        Label {
            name: "sink",
            values: &["file", "stream"],
        },
        Label {
            name: "result",
            values: &["written", "failed"],
        },
    ],
);

/// Usage records dropped because the writer's queue was full.
pub const RELAY_USAGE_RECORDS_DROPPED_TOTAL: MetricDef = metric(
    "relay_usage_records_dropped_total",
    "Usage records dropped because the queue to the writer was full (65,536 records: the sinks fell behind).",
    Kind::Counter,
    &[],
);

/// Sources banned for repeated authentication failures.
pub const RELAY_AUTH_BANS_TOTAL: MetricDef = metric(
    "relay_auth_bans_total",
    "Sources (an IPv4 address or an IPv6 /64) banned for repeated authentication failures (--auth-ban-after within --auth-ban-window).",
    Kind::Counter,
    &[],
);

/// Sources banned now.
pub const RELAY_AUTH_BANNED_SOURCES: MetricDef = metric(
    "relay_auth_banned_sources",
    "Sources whose requests the relay drops unanswered now (a ban lasts --auth-ban-for); their packets count as relay_packets_dropped_total{reason=\"banned\"}.",
    Kind::Gauge,
    &[],
);

/// Refused requests by cause.
pub const RELAY_REQUESTS_REFUSED_TOTAL: MetricDef = metric(
    "relay_requests_refused_total",
    "Requests the relay refused with an error response, by cause (several causes share an error code).",
    Kind::Counter,
    &[RELAY_REFUSAL_REASON],
);

/// Send errors.
pub const RELAY_SEND_ERRORS_TOTAL: MetricDef = metric(
    "relay_send_errors_total",
    "Datagrams or stream writes the relay failed to send (socket errors, full buffers).",
    Kind::Counter,
    &[],
);

/// Client stream connections.
pub const RELAY_CONNECTIONS: MetricDef = metric(
    "relay_connections",
    "TCP and TLS client connections currently open on the relay.",
    Kind::Gauge,
    &[TURN_STREAM_TRANSPORT],
);

/// Stream connections refused at the limit.
pub const RELAY_CONNECTIONS_REJECTED_TOTAL: MetricDef = metric(
    "relay_connections_rejected_total",
    "TCP and TLS client connections closed at once because the relay was at its connection limit.",
    Kind::Counter,
    &[],
);

/// Stream connections closed for idling without an allocation.
pub const RELAY_CONNECTIONS_IDLE_CLOSED_TOTAL: MetricDef = metric(
    "relay_connections_idle_closed_total",
    "TCP and TLS client connections closed because they held no allocation and sent nothing for the idle timeout.",
    Kind::Counter,
    &[],
);

/// Sibling hand-offs of RFC 5780 change-IP requests.
pub const CDX_SIBLING_HANDOFFS_TOTAL: MetricDef = metric(
    "cdx_sibling_handoffs_total",
    "RFC 5780 change-IP requests handed to the sibling CDX node (sent), handed from it and answered, or refused (bad authentication, stale, malformed).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["sent", "answered", "rejected"],
    }],
);

/// Exchange posts by outcome.
pub const CDX_EXCHANGE_POSTS_TOTAL: MetricDef = metric(
    "cdx_exchange_posts_total",
    "Connection-data exchange posts: accepted, accepted by this node alone while the coordination store was unreachable (accepted_local: the session goes on among this node's participants), or refused by reason (forged tickets, replays and overload are dropped without an answer).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &[
            "accepted",
            "accepted_local",
            "malformed",
            "forged",
            "expired",
            "replayed",
            "too_large",
            "source_limit",
            "session_full",
            "store_error",
            "overloaded",
            "disabled",
            "move_unproven",
        ],
    }],
);

/// Exchange deliveries by outcome.
pub const CDX_EXCHANGE_DELIVERIES_TOTAL: MetricDef = metric(
    "cdx_exchange_deliveries_total",
    "Deliveries of another participant's entry: acknowledged by the client, still unacknowledged when the session ended, or held back from an address that never acknowledged (possibly spoofed) until it posts again.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["acked", "expired", "held"],
    }],
);

/// Exchange delivery retransmissions.
pub const CDX_EXCHANGE_RETRANSMITS_TOTAL: MetricDef = metric(
    "cdx_exchange_retransmits_total",
    "Deliveries sent again because the client had not acknowledged them yet.",
    Kind::Counter,
    &[],
);

/// Acknowledgements that match no pending delivery.
pub const CDX_EXCHANGE_STRAY_ACKS_TOTAL: MetricDef = metric(
    "cdx_exchange_stray_acks_total",
    "Delivery acknowledgements matching no pending delivery (duplicates, late, or from another address).",
    Kind::Counter,
    &[],
);

/// Live exchange sessions on this node.
pub const CDX_EXCHANGE_SESSIONS: MetricDef = metric(
    "cdx_exchange_sessions",
    "Exchange sessions with at least one participant on this node.",
    Kind::Gauge,
    &[],
);

/// Entries learnt from other nodes.
pub const CDX_EXCHANGE_EVENTS_TOTAL: MetricDef = metric(
    "cdx_exchange_events_total",
    "Entries other CDX nodes announced through the coordination store: applied, or malformed.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["applied", "malformed"],
    }],
);

/// NAT behaviours clients reported.
pub const CDX_NAT_PROFILES_TOTAL: MetricDef = metric(
    "cdx_nat_profiles_total",
    "NAT behaviours of exchange participants, as their discovery reported them (one count per participant and session).",
    Kind::Counter,
    &[
        Label {
            name: "mapping",
            values: &[
                "unknown",
                "no_nat",
                "endpoint_independent",
                "address_dependent",
                "address_and_port_dependent",
            ],
        },
        Label {
            name: "filtering",
            values: &[
                "unknown",
                "endpoint_independent",
                "address_dependent",
                "address_and_port_dependent",
            ],
        },
    ],
);

/// Plans made, by mode.
pub const LOOKUP_PLANS_TOTAL: MetricDef = metric(
    "lookup_plans_total",
    "Plans returned by lookup, by mode.",
    Kind::Counter,
    &[Label {
        name: "mode",
        values: &["direct", "relay_one", "relay_both"],
    }],
);

/// Plan requests refused, by reason.
pub const LOOKUP_PLAN_ERRORS_TOTAL: MetricDef = metric(
    "lookup_plan_errors_total",
    "Plan requests refused: malformed or unknown fields (bad_request), impossible profiles (unprocessable), no CDX node or no relay with capacity (no_cdx, no_relay), or a server fault.",
    Kind::Counter,
    &[Label {
        name: "reason",
        values: &[
            "bad_request",
            "unprocessable",
            "no_cdx",
            "no_relay",
            "internal",
        ],
    }],
);

/// API requests by authorisation result.
pub const LOOKUP_API_AUTH_TOTAL: MetricDef = metric(
    "lookup_api_auth_total",
    "Requests to lookup's keyed API (plans, relay list) by authorisation result: ok, no credential (missing), unknown or wrong key, forged, expired or foreign grant (invalid), credential without the scope (forbidden), over the key's rate (rate_limited), plan refused at the key's live-session cap (session_cap).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &[
            "ok",
            "missing",
            "invalid",
            "forbidden",
            "rate_limited",
            "session_cap",
        ],
    }],
);

/// The label naming an API key or grant key id: open, but bounded by the
/// keys an operator creates (and cut off at [`MAX_KEY_SERIES`] values, the
/// rest counted as `other`).
pub const KEY: Label = Label {
    name: "key",
    values: &[],
};

/// Most distinct `key` label values a process exports.
pub const MAX_KEY_SERIES: usize = 256;

/// Plans per key.
pub const LOOKUP_KEY_PLANS_TOTAL: MetricDef = metric(
    "lookup_key_plans_total",
    "Plans made per API key id (or g-<grant key id>), for operator-created keys (at most 256 series; the rest are key=\"other\").",
    Kind::Counter,
    &[KEY],
);

/// Refusals per key.
pub const LOOKUP_KEY_REFUSED_TOTAL: MetricDef = metric(
    "lookup_key_refused_total",
    "Requests refused per API key id (or g-<grant key id>): over its request rate (rate_limited) or at its live-session cap (session_cap).",
    Kind::Counter,
    &[
        KEY,
        Label {
            name: "reason",
            values: &["rate_limited", "session_cap"],
        },
    ],
);

/// Live sessions per key.
pub const LOOKUP_KEY_LIVE_SESSIONS: MetricDef = metric(
    "lookup_key_live_sessions",
    "Live sessions (plans whose tokens have not expired) per API key id (or g-<grant key id>), cluster-wide as this lookup node last counted them.",
    Kind::Gauge,
    &[KEY],
);

/// Device registrations.
pub const LOOKUP_REGISTRATIONS_TOTAL: MetricDef = metric(
    "lookup_registrations_total",
    "Device registrations: registered (or refreshed), refused (no, forged or foreign grant; full handle), unregistered.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["registered", "refused", "unregistered"],
    }],
);

/// Invitation steps.
pub const LOOKUP_INVITES_TOTAL: MetricDef = metric(
    "lookup_invites_total",
    "Invitation steps by outcome: sent (rang at least one device), no_device (no invitee has a device), rate_limited, accepted, accept_refused (expired, forged or not invited), answered_elsewhere (a later accept), declined, cancelled.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &[
            "sent",
            "no_device",
            "rate_limited",
            "accepted",
            "accept_refused",
            "answered_elsewhere",
            "declined",
            "cancelled",
        ],
    }],
);

/// Push frames queued.
pub const LOOKUP_PUSHES_TOTAL: MetricDef = metric(
    "lookup_pushes_total",
    "Push frames for devices: queued in the device's mailbox (and announced to the replica holding its socket), mailbox_full (dropped), error (the store did not answer).",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["queued", "mailbox_full", "error"],
    }],
);

/// Wakes of devices without a socket.
pub const LOOKUP_PUSH_WAKES_TOTAL: MetricDef = metric(
    "lookup_push_wakes_total",
    "Devices without a push socket woken through their push route: Web Push (RFC 8030/8291/8292) or the operator's webhook; sent, gone (the subscription expired: 404/410) or failed.",
    Kind::Counter,
    &[
        Label {
            name: "route",
            values: &["webpush", "webhook"],
        },
        Label {
            name: "result",
            values: &["sent", "gone", "failed"],
        },
    ],
);

/// Push sockets held.
pub const LOOKUP_PUSH_SOCKETS: MetricDef = metric(
    "lookup_push_sockets",
    "Push WebSockets this replica holds.",
    Kind::Gauge,
    &[],
);

/// Push sockets closed by the server.
pub const LOOKUP_PUSH_SOCKETS_CLOSED_TOTAL: MetricDef = metric(
    "lookup_push_sockets_closed_total",
    "Push WebSockets the server closed or refused: flood (over 20 messages a second), protocol (a bad or oversized frame), silent (nothing heard for 60 s), too_many (a device over its 4 sockets), replica_full (the replica at --max-push-sockets).",
    Kind::Counter,
    &[Label {
        name: "reason",
        values: &["flood", "protocol", "silent", "too_many", "replica_full"],
    }],
);

/// Device tokens refused.
pub const LOOKUP_DEVICE_AUTH_REFUSED_TOTAL: MetricDef = metric(
    "lookup_device_auth_refused_total",
    "Signalling requests refused for their device credential: a forged, expired or foreign device token, a device no longer registered, a bad refresh signature.",
    Kind::Counter,
    &[],
);

/// Requests turned away for their source's refused authentications.
pub const LOOKUP_THROTTLED_TOTAL: MetricDef = metric(
    "lookup_throttled_total",
    "Requests to lookup's HTTP API (plans, relay list, signalling, push sockets) turned away with 429 before any work, because their source (an IPv4 address, an IPv6 /64) used up its refused authentications (--auth-failures-per-minute).",
    Kind::Counter,
    &[],
);

/// What happened to plans, as clients report.
pub const LOOKUP_PLAN_OUTCOMES_TOTAL: MetricDef = metric(
    "lookup_plan_outcomes_total",
    "Plan outcomes clients reported (POST /v1/outcomes), by NAT pair (the two classes lookup planned with, sorted), planned path (direct, or relay for relay-one and relay-both) and actual path (direct, relay, failed): planned direct that had to relay, or a relayed plan that went direct, is the planner being surprised.",
    Kind::Counter,
    &[
        Label {
            name: "pair",
            values: &[
                "full-cone+full-cone",
                "full-cone+open",
                "full-cone+port-restricted-cone",
                "full-cone+restricted-cone",
                "full-cone+symmetric",
                "full-cone+udp-blocked",
                "open+open",
                "open+port-restricted-cone",
                "open+restricted-cone",
                "open+symmetric",
                "open+udp-blocked",
                "port-restricted-cone+port-restricted-cone",
                "port-restricted-cone+restricted-cone",
                "port-restricted-cone+symmetric",
                "port-restricted-cone+udp-blocked",
                "restricted-cone+restricted-cone",
                "restricted-cone+symmetric",
                "restricted-cone+udp-blocked",
                "symmetric+symmetric",
                "symmetric+udp-blocked",
                "udp-blocked+udp-blocked",
            ],
        },
        Label {
            name: "planned",
            values: &["direct", "relay"],
        },
        Label {
            name: "actual",
            values: &["direct", "relay", "failed"],
        },
    ],
);

/// Time to the first packet, as clients report.
pub const LOOKUP_FIRST_PACKET_SECONDS: MetricDef = MetricDef {
    name: "lookup_first_packet_seconds",
    help: "Time from the plan to a pair's first packet, as clients report it, by actual path.",
    kind: Kind::Histogram,
    labels: &[Label {
        name: "actual",
        values: &["direct", "relay"],
    }],
    buckets: &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0],
};

/// Plan latency.
pub const LOOKUP_PLAN_DURATION_SECONDS: MetricDef = MetricDef {
    name: "lookup_plan_duration_seconds",
    help: "Time to compute a plan, from parsed request to response document.",
    kind: Kind::Histogram,
    labels: &[],
    buckets: &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.05,
    ],
};

/// Hosts in lookup's registry snapshot.
pub const LOOKUP_REGISTRY_HOSTS: MetricDef = metric(
    "lookup_registry_hosts",
    "Live hosts in lookup's registry snapshot, by role and state.",
    Kind::Gauge,
    &[
        Label {
            name: "role",
            values: &["relay", "cdx"],
        },
        Label {
            name: "state",
            values: &["active", "draining"],
        },
    ],
);

/// Age of lookup's registry snapshot.
pub const LOOKUP_REGISTRY_SNAPSHOT_AGE_SECONDS: MetricDef = metric(
    "lookup_registry_snapshot_age_seconds",
    "Whole seconds since lookup last read the registry from the coordination store (grows while the store is unreachable).",
    Kind::Gauge,
    &[],
);

/// Registry heartbeats written by this host.
pub const CLUSTER_REGISTRY_HEARTBEATS_TOTAL: MetricDef = metric(
    "cluster_registry_heartbeats_total",
    "Registry heartbeats this host wrote to the coordination store, by result.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["ok", "error"],
    }],
);

/// Registry reads by this host.
pub const CLUSTER_REGISTRY_REFRESHES_TOTAL: MetricDef = metric(
    "cluster_registry_refreshes_total",
    "Registry snapshot refreshes from the coordination store, by result.",
    Kind::Counter,
    &[Label {
        name: "result",
        values: &["ok", "error"],
    }],
);

/// The scenario a `natrix-loadtest` run drives.
pub const LOADTEST_SCENARIO: Label = Label {
    name: "scenario",
    values: &[
        "stun",
        "alloc",
        "relay",
        "plan",
        "e2e",
        "natlab",
        "compare",
        "generator",
        "peer",
    ],
};

/// Load generator: what it sent.
pub const LOADTEST_SENT_TOTAL: MetricDef = metric(
    "loadtest_sent_total",
    "Requests, packets or attempts natrix-loadtest sent.",
    Kind::Counter,
    &[LOADTEST_SCENARIO],
);

/// Load generator: what came back.
pub const LOADTEST_COMPLETED_TOTAL: MetricDef = metric(
    "loadtest_completed_total",
    "Answers, echoes, plans, allocations or connected pairs natrix-loadtest got back.",
    Kind::Counter,
    &[LOADTEST_SCENARIO],
);

/// Load generator: failures.
pub const LOADTEST_ERRORS_TOTAL: MetricDef = metric(
    "loadtest_errors_total",
    "Failed natrix-loadtest attempts (error answers, timeouts, refused connections).",
    Kind::Counter,
    &[LOADTEST_SCENARIO],
);

/// Load generator: running or not.
pub const LOADTEST_RUNNING: MetricDef = metric(
    "loadtest_running",
    "1 while natrix-loadtest is sending in this scenario.",
    Kind::Gauge,
    &[LOADTEST_SCENARIO],
);

/// Load generator: measured latency.
pub const LOADTEST_LATENCY_SECONDS: MetricDef = MetricDef {
    name: "loadtest_latency_seconds",
    help: "Round-trip or request latency natrix-loadtest measured (sampled).",
    kind: Kind::Histogram,
    labels: &[LOADTEST_SCENARIO],
    buckets: &[
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5,
    ],
};

/// Every metric natrix exports (natrix-loadtest's `loadtest_*` included).
pub const ALL: &[&MetricDef] = &[
    &BUILD_INFO,
    &CDX_BINDING_REQUESTS_TOTAL,
    &CDX_BINDING_RESPONSES_TOTAL,
    &CDX_LEGACY_REQUESTS_TOTAL,
    &CDX_BINDING_INDICATIONS_TOTAL,
    &CDX_PACKETS_DROPPED_TOTAL,
    &CDX_RECEIVED_BYTES_TOTAL,
    &CDX_SENT_BYTES_TOTAL,
    &CDX_SEND_ERRORS_TOTAL,
    &CDX_TCP_CONNECTIONS,
    &CDX_TCP_CONNECTIONS_TOTAL,
    &CDX_SIBLING_HANDOFFS_TOTAL,
    &CDX_EXCHANGE_POSTS_TOTAL,
    &CDX_EXCHANGE_DELIVERIES_TOTAL,
    &CDX_EXCHANGE_RETRANSMITS_TOTAL,
    &CDX_EXCHANGE_STRAY_ACKS_TOTAL,
    &CDX_EXCHANGE_SESSIONS,
    &CDX_EXCHANGE_EVENTS_TOTAL,
    &CDX_NAT_PROFILES_TOTAL,
    &LOOKUP_PLANS_TOTAL,
    &LOOKUP_PLAN_ERRORS_TOTAL,
    &LOOKUP_API_AUTH_TOTAL,
    &LOOKUP_KEY_PLANS_TOTAL,
    &LOOKUP_KEY_REFUSED_TOTAL,
    &LOOKUP_KEY_LIVE_SESSIONS,
    &LOOKUP_REGISTRATIONS_TOTAL,
    &LOOKUP_INVITES_TOTAL,
    &LOOKUP_PUSHES_TOTAL,
    &LOOKUP_PUSH_WAKES_TOTAL,
    &LOOKUP_PUSH_SOCKETS,
    &LOOKUP_PUSH_SOCKETS_CLOSED_TOTAL,
    &LOOKUP_DEVICE_AUTH_REFUSED_TOTAL,
    &LOOKUP_THROTTLED_TOTAL,
    &LOOKUP_PLAN_OUTCOMES_TOTAL,
    &LOOKUP_FIRST_PACKET_SECONDS,
    &LOOKUP_PLAN_DURATION_SECONDS,
    &LOOKUP_REGISTRY_HOSTS,
    &LOOKUP_REGISTRY_SNAPSHOT_AGE_SECONDS,
    &CLUSTER_REGISTRY_HEARTBEATS_TOTAL,
    &CLUSTER_REGISTRY_REFRESHES_TOTAL,
    &RELAY_ALLOCATIONS,
    &RELAY_DUAL_STACK_ALLOCATIONS,
    &RELAY_MULTIPLEXED_ALLOCATIONS,
    &RELAY_MULTIPLEX_SOCKETS,
    &RELAY_ALLOCATION_CAPACITY,
    &RELAY_ALLOCATIONS_CREATED_TOTAL,
    &RELAY_ALLOCATIONS_MOVED_TOTAL,
    &RELAY_ALLOCATIONS_ENDED_TOTAL,
    &RELAY_FORWARDED_PACKETS_TOTAL,
    &RELAY_FORWARDED_BYTES_TOTAL,
    &RELAY_PACKETS_DROPPED_TOTAL,
    &RELAY_REQUESTS_TOTAL,
    &RELAY_AUTH_FAILURES_TOTAL,
    &RELAY_AUTH_BANS_TOTAL,
    &RELAY_USAGE_RECORDS_TOTAL,
    &RELAY_PROXY_HEADERS_TOTAL,
    &RELAY_TLS_ROUTED_TOTAL,
    &RELAY_HTTPS_CONNECTIONS,
    &RELAY_HTTPS_REQUESTS_TOTAL,
    &RELAY_DTLS_SESSIONS,
    &RELAY_DTLS_HANDSHAKES_TOTAL,
    &RELAY_XDP_ENTRIES,
    &RELAY_XDP_PACKETS_TOTAL,
    &RELAY_XDP_PROGRAM_SECONDS_TOTAL,
    &RELAY_TCP_ALLOCATIONS,
    &RELAY_TCP_CONNECTIONS,
    &RELAY_TCP_CONNECTION_EVENTS_TOTAL,
    &RELAY_TCP_RELAYED_BYTES_TOTAL,
    &RELAY_ADMIN_REQUESTS_TOTAL,
    &RELAY_USAGE_RECORDS_DROPPED_TOTAL,
    &RELAY_AUTH_BANNED_SOURCES,
    &RELAY_REQUESTS_REFUSED_TOTAL,
    &RELAY_SEND_ERRORS_TOTAL,
    &RELAY_CONNECTIONS,
    &RELAY_CONNECTIONS_REJECTED_TOTAL,
    &RELAY_CONNECTIONS_IDLE_CLOSED_TOTAL,
    &LOADTEST_SENT_TOTAL,
    &LOADTEST_COMPLETED_TOTAL,
    &LOADTEST_ERRORS_TOTAL,
    &LOADTEST_RUNNING,
    &LOADTEST_LATENCY_SECONDS,
];

/// Looks a metric up by name.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().copied().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const PREFIXES: &[&str] = &[
        "natrix_",
        "cluster_",
        "relay_",
        "cdx_",
        "lookup_",
        "loadtest_",
    ];
    /// Label names that would make series unbounded (one per client).
    const FORBIDDEN_LABELS: &[&str] = &[
        "ip",
        "addr",
        "address",
        "client",
        "peer",
        "user",
        "username",
        "session",
        "port",
        "channel",
        "tid",
        "transaction",
        "realm",
        "nonce",
    ];
    /// Non-base units that must be converted.
    const FORBIDDEN_UNITS: &[&str] = &[
        "_ms",
        "_milliseconds",
        "_microseconds",
        "_us",
        "_ns",
        "_minutes",
        "_hours",
        "_kb",
        "_kilobytes",
        "_mb",
        "_megabytes",
        "_bits",
        "_percent",
    ];

    fn valid_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some('a'..='z'))
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(valid_name(m.name), "{}: not snake_case", m.name);
            assert!(
                PREFIXES.iter().any(|p| m.name.starts_with(p)),
                "{}: missing role prefix",
                m.name
            );
            let is_total = m.name.ends_with("_total");
            assert_eq!(
                is_total,
                matches!(m.kind, Kind::Counter | Kind::SecondsCounter),
                "{}: `_total` is for counters and every counter",
                m.name
            );
            for unit in FORBIDDEN_UNITS {
                assert!(
                    !m.name.trim_end_matches("_total").ends_with(unit),
                    "{}: use base units",
                    m.name
                );
            }
            if m.kind == Kind::Histogram {
                assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_bytes"),
                    "{}: histograms carry a base unit",
                    m.name
                );
                assert!(!m.buckets.is_empty(), "{}: histogram needs buckets", m.name);
                assert!(m.buckets.windows(2).all(|w| w[0] < w[1]));
            }
            assert!(
                m.help.len() > 10 && m.help.ends_with('.'),
                "{}: help should be a sentence",
                m.name
            );
        }
    }

    #[test]
    fn label_sets_are_closed_and_bounded() {
        for m in ALL {
            let mut names = HashSet::new();
            for label in m.labels {
                assert!(names.insert(label.name), "{}: label twice", m.name);
                assert!(valid_name(label.name), "{}: label {}", m.name, label.name);
                assert!(
                    !FORBIDDEN_LABELS.contains(&label.name),
                    "{}: label {} would be unbounded",
                    m.name,
                    label.name
                );
                let open_ok = (m.name == BUILD_INFO.name && label.name == "version")
                    || label.name == KEY.name;
                assert!(
                    !label.values.is_empty() || open_ok,
                    "{}: label {} needs its closed value set",
                    m.name,
                    label.name
                );
                let distinct: HashSet<_> = label.values.iter().collect();
                assert_eq!(
                    distinct.len(),
                    label.values.len(),
                    "{}: duplicate values",
                    m.name
                );
            }
            let series: usize = m.labels.iter().map(|l| l.values.len().max(1)).product();
            // A bounded product: requests by method x result is the widest
            // (8 x 18 = 144).
            assert!(series <= 160, "{}: {series} series is too many", m.name);
        }
    }

    #[test]
    fn find_resolves_every_metric() {
        for m in ALL {
            assert_eq!(find(m.name).map(|d| d.name), Some(m.name));
        }
        assert!(find("no_such_metric").is_none());
    }
}

//! Signalling's metric handles, resolved once.

use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::{IntCounter, IntCounterVec, IntGauge};

/// Every signalling metric handle.
#[derive(Clone, Debug)]
pub struct SignalMetrics {
    registrations: IntCounterVec,
    invites: IntCounterVec,
    pushes: IntCounterVec,
    closed: IntCounterVec,
    wakes: IntCounterVec,
    /// Device tokens refused (forged, expired, unregistered device).
    pub auth_refused: IntCounter,
    /// WebSockets held by this replica.
    pub sockets: IntGauge,
}

impl SignalMetrics {
    /// Resolves (and so creates) every signalling series.
    pub fn new(telemetry: &Telemetry) -> SignalMetrics {
        SignalMetrics {
            registrations: telemetry.counter_family(&cat::LOOKUP_REGISTRATIONS_TOTAL),
            invites: telemetry.counter_family(&cat::LOOKUP_INVITES_TOTAL),
            pushes: telemetry.counter_family(&cat::LOOKUP_PUSHES_TOTAL),
            closed: telemetry.counter_family(&cat::LOOKUP_PUSH_SOCKETS_CLOSED_TOTAL),
            wakes: telemetry.counter_family(&cat::LOOKUP_PUSH_WAKES_TOTAL),
            auth_refused: telemetry.counter(&cat::LOOKUP_DEVICE_AUTH_REFUSED_TOTAL),
            sockets: telemetry.gauge(&cat::LOOKUP_PUSH_SOCKETS),
        }
    }

    fn of(family: &IntCounterVec, def: &cat::MetricDef, value: &str) -> IntCounter {
        let known = def.labels[0].values.contains(&value);
        family.with_label_values(&[if known {
            value
        } else {
            def.labels[0].values[0]
        }])
    }

    /// Registrations by result.
    pub fn registrations(&self, result: &str) -> IntCounter {
        Self::of(
            &self.registrations,
            &cat::LOOKUP_REGISTRATIONS_TOTAL,
            result,
        )
    }

    /// Invitation steps by result.
    pub fn invites(&self, result: &str) -> IntCounter {
        Self::of(&self.invites, &cat::LOOKUP_INVITES_TOTAL, result)
    }

    /// Pushes by result.
    pub fn pushes(&self, result: &str) -> IntCounter {
        Self::of(&self.pushes, &cat::LOOKUP_PUSHES_TOTAL, result)
    }

    /// Wakes by route (`webpush`, `webhook`) and result.
    pub fn wakes(&self, route: &'static str, result: &'static str) -> IntCounter {
        self.wakes.with_label_values(&[route, result])
    }

    /// Sockets the server closed, by reason.
    pub fn socket_closed(&self, reason: &str) -> IntCounter {
        Self::of(&self.closed, &cat::LOOKUP_PUSH_SOCKETS_CLOSED_TOTAL, reason)
    }
}

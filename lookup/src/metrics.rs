//! lookup's metric handles, resolved once.

use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::{Histogram, IntCounter, IntGauge};

/// Every lookup metric handle.
#[derive(Clone, Debug)]
pub struct LookupMetrics {
    plans: [IntCounter; 3],
    errors: Vec<(&'static str, IntCounter)>,
    auth: Vec<(&'static str, IntCounter)>,
    pub(crate) duration: Histogram,
    /// Live hosts by (role, state): relay active, relay draining, cdx
    /// active, cdx draining.
    pub hosts: [IntGauge; 4],
    /// Snapshot age.
    pub snapshot_age: IntGauge,
    /// Refreshes ok / error.
    pub refreshes: [IntCounter; 2],
}

impl LookupMetrics {
    /// Resolves (and so creates) every lookup series.
    pub fn new(telemetry: &Telemetry) -> LookupMetrics {
        let plans = telemetry.counter_family(&cat::LOOKUP_PLANS_TOTAL);
        let errors = telemetry.counter_family(&cat::LOOKUP_PLAN_ERRORS_TOTAL);
        let hosts = telemetry.gauge_family(&cat::LOOKUP_REGISTRY_HOSTS);
        let refreshes = telemetry.counter_family(&cat::CLUSTER_REGISTRY_REFRESHES_TOTAL);
        LookupMetrics {
            plans: ["direct", "relay_one", "relay_both"].map(|m| plans.with_label_values(&[m])),
            errors: cat::LOOKUP_PLAN_ERRORS_TOTAL.labels[0]
                .values
                .iter()
                .map(|v| (*v, errors.with_label_values(&[v])))
                .collect(),
            auth: {
                let family = telemetry.counter_family(&cat::LOOKUP_API_AUTH_TOTAL);
                cat::LOOKUP_API_AUTH_TOTAL.labels[0]
                    .values
                    .iter()
                    .map(|v| (*v, family.with_label_values(&[v])))
                    .collect()
            },
            duration: telemetry.histogram(&cat::LOOKUP_PLAN_DURATION_SECONDS),
            hosts: [
                ("relay", "active"),
                ("relay", "draining"),
                ("cdx", "active"),
                ("cdx", "draining"),
            ]
            .map(|(r, s)| hosts.with_label_values(&[r, s])),
            snapshot_age: telemetry.gauge(&cat::LOOKUP_REGISTRY_SNAPSHOT_AGE_SECONDS),
            refreshes: ["ok", "error"].map(|r| refreshes.with_label_values(&[r])),
        }
    }

    /// The plans counter for API mode name `mode`.
    pub(crate) fn plan(&self, mode: &str) -> &IntCounter {
        match mode {
            "direct" => &self.plans[0],
            "relay-one" => &self.plans[1],
            _ => &self.plans[2],
        }
    }

    /// The authorisation counter for `result` (a catalogue value).
    pub(crate) fn auth(&self, result: &str) -> &IntCounter {
        self.auth
            .iter()
            .find(|(r, _)| *r == result)
            .map_or(&self.auth[0].1, |(_, c)| c)
    }

    /// The errors counter for `reason`.
    pub(crate) fn error(&self, reason: &str) -> &IntCounter {
        self.errors
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(&self.errors[self.errors.len() - 1].1, |(_, c)| c)
    }
}

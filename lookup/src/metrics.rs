//! lookup's metric handles, resolved once.

use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

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
    /// Per-key series.
    pub(crate) keys: KeyMetrics,
    /// Requests turned away for their source's refused authentications.
    pub throttled: IntCounter,
    /// Reported plan outcomes (pair, planned, actual).
    pub outcomes: IntCounterVec,
    /// Reported time to the first packet (actual).
    pub first_packet: prometheus::HistogramVec,
}

/// The per-key series, bounded: the first [`cat::MAX_KEY_SERIES`] keys
/// seen get their own label value, later ones share `other`.
#[derive(Clone, Debug)]
pub(crate) struct KeyMetrics {
    plans: IntCounterVec,
    refused: IntCounterVec,
    live: IntGaugeVec,
    labelled: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl KeyMetrics {
    fn label<'a>(&self, key: &'a str) -> &'a str {
        let mut seen = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(key) {
            return key;
        }
        if seen.len() < cat::MAX_KEY_SERIES {
            seen.insert(key.to_owned());
            return key;
        }
        "other"
    }

    /// A plan made for `key`.
    pub(crate) fn planned(&self, key: &str) {
        self.plans.with_label_values(&[self.label(key)]).inc();
    }

    /// A request of `key` refused for `reason` (a catalogue value).
    pub(crate) fn refused(&self, key: &str, reason: &str) {
        self.refused
            .with_label_values(&[self.label(key), reason])
            .inc();
    }

    /// `key`'s live sessions.
    pub(crate) fn live(&self, key: &str, live: u64) {
        let label = self.label(key);
        if label != "other" {
            self.live
                .with_label_values(&[label])
                .set(i64::try_from(live).unwrap_or(i64::MAX));
        }
    }
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
            keys: KeyMetrics {
                plans: telemetry.counter_family(&cat::LOOKUP_KEY_PLANS_TOTAL),
                refused: telemetry.counter_family(&cat::LOOKUP_KEY_REFUSED_TOTAL),
                live: telemetry.gauge_family(&cat::LOOKUP_KEY_LIVE_SESSIONS),
                labelled: Default::default(),
            },
            throttled: telemetry.counter(&cat::LOOKUP_THROTTLED_TOTAL),
            outcomes: telemetry.counter_family(&cat::LOOKUP_PLAN_OUTCOMES_TOTAL),
            first_packet: telemetry.histogram_family(&cat::LOOKUP_FIRST_PACKET_SECONDS),
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

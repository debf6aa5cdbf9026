//! The process-wide registry and the handles roles resolve from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::catalogue::{self, Kind, MetricDef};
use crate::health::Health;

#[derive(Clone)]
enum Family {
    Counter(IntCounterVec),
    Seconds(prometheus::CounterVec),
    Gauge(IntGaugeVec),
    Histogram(HistogramVec),
}

/// The Prometheus registry of one process, plus its health state.
///
/// Cloning is cheap (shared). Resolving a metric twice returns the same
/// series, so roles sharing a process can each ask for what they use.
#[derive(Clone)]
pub struct Telemetry {
    registry: Registry,
    families: Arc<Mutex<HashMap<&'static str, Family>>>,
    health: Health,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

fn combinations(def: &MetricDef) -> Vec<Vec<&'static str>> {
    let mut out: Vec<Vec<&'static str>> = vec![Vec::new()];
    for label in def.labels {
        if label.values.is_empty() {
            return Vec::new();
        }
        out = out
            .into_iter()
            .flat_map(|prefix| {
                label.values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push(*v);
                    next
                })
            })
            .collect();
    }
    out
}

impl Telemetry {
    /// A registry with `natrix_build_info{version}` set.
    pub fn new(version: &str) -> Telemetry {
        let telemetry = Telemetry {
            registry: Registry::new(),
            families: Arc::default(),
            health: Health::default(),
        };
        telemetry
            .gauge_family(&catalogue::BUILD_INFO)
            .with_label_values(&[version])
            .set(1);
        telemetry
    }

    /// Health and readiness of this process.
    pub fn health(&self) -> &Health {
        &self.health
    }

    fn family(&self, def: &'static MetricDef) -> Family {
        debug_assert!(
            catalogue::find(def.name).is_some(),
            "{} is not in the catalogue",
            def.name
        );
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = families.get(def.name) {
            return f.clone();
        }
        let labels: Vec<&str> = def.labels.iter().map(|l| l.name).collect();
        let opts = Opts::new(def.name, def.help);
        // Names and label sets come from the catalogue, whose tests guarantee
        // they are valid and unique, so construction cannot fail.
        let family = match def.kind {
            Kind::Counter => Family::Counter(
                IntCounterVec::new(opts, &labels).expect("catalogue metric is valid"),
            ),
            Kind::Gauge => {
                Family::Gauge(IntGaugeVec::new(opts, &labels).expect("catalogue metric is valid"))
            }
            Kind::SecondsCounter => Family::Seconds(
                prometheus::CounterVec::new(opts, &labels).expect("catalogue metric is valid"),
            ),
            Kind::Histogram => Family::Histogram(
                HistogramVec::new(
                    HistogramOpts::from(opts).buckets(def.buckets.to_vec()),
                    &labels,
                )
                .expect("catalogue metric is valid"),
            ),
        };
        let collector: Box<dyn Collector> = match &family {
            Family::Counter(c) => Box::new(c.clone()),
            Family::Seconds(c) => Box::new(c.clone()),
            Family::Gauge(g) => Box::new(g.clone()),
            Family::Histogram(h) => Box::new(h.clone()),
        };
        self.registry
            .register(collector)
            .expect("catalogue names are unique");
        // Create every labelled series up front so scrapes show zeros.
        for values in combinations(def) {
            match &family {
                Family::Counter(c) => {
                    c.with_label_values(&values);
                }
                Family::Seconds(c) => {
                    c.with_label_values(&values);
                }
                Family::Gauge(g) => {
                    g.with_label_values(&values);
                }
                Family::Histogram(h) => {
                    h.with_label_values(&values);
                }
            }
        }
        families.insert(def.name, family.clone());
        family
    }

    /// A counter family; resolve series with `with_label_values` at start-up.
    ///
    /// # Panics
    /// When `def` is not a counter (a programming error caught by any test
    /// that starts the role).
    pub fn counter_family(&self, def: &'static MetricDef) -> IntCounterVec {
        match self.family(def) {
            Family::Counter(c) => c,
            _ => panic!("{} is not a counter", def.name),
        }
    }

    /// A gauge family.
    ///
    /// # Panics
    /// When `def` is not a gauge.
    pub fn gauge_family(&self, def: &'static MetricDef) -> IntGaugeVec {
        match self.family(def) {
            Family::Gauge(g) => g,
            _ => panic!("{} is not a gauge", def.name),
        }
    }

    /// A histogram family.
    ///
    /// # Panics
    /// When `def` is not a histogram.
    pub fn histogram_family(&self, def: &'static MetricDef) -> HistogramVec {
        match self.family(def) {
            Family::Histogram(h) => h,
            _ => panic!("{} is not a histogram", def.name),
        }
    }

    /// An unlabelled counter.
    pub fn counter(&self, def: &'static MetricDef) -> IntCounter {
        self.counter_family(def).with_label_values(&[] as &[&str])
    }

    /// An unlabelled counter of seconds (fractional).
    ///
    /// # Panics
    /// When `def` is not a seconds counter.
    pub fn seconds_counter(&self, def: &'static MetricDef) -> prometheus::Counter {
        match self.family(def) {
            Family::Seconds(c) => c.with_label_values(&[] as &[&str]),
            _ => panic!("{} is not a seconds counter", def.name),
        }
    }

    /// An unlabelled gauge.
    pub fn gauge(&self, def: &'static MetricDef) -> IntGauge {
        self.gauge_family(def).with_label_values(&[] as &[&str])
    }

    /// An unlabelled histogram.
    pub fn histogram(&self, def: &'static MetricDef) -> Histogram {
        self.histogram_family(def).with_label_values(&[] as &[&str])
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A counter owned by one event loop.
///
/// `inc`/`add` touch a plain integer; [`LocalCounter::flush`] publishes the
/// accumulated delta to the shared Prometheus counter. Loops flush between
/// batches and on a timer, so scrapes lag by at most the flush interval.
#[derive(Debug)]
pub struct LocalCounter {
    pending: u64,
    target: IntCounter,
}

impl LocalCounter {
    /// A local view of `target`.
    pub fn new(target: IntCounter) -> LocalCounter {
        LocalCounter { pending: 0, target }
    }

    /// Adds one.
    #[inline]
    pub fn inc(&mut self) {
        self.pending += 1;
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&mut self, n: u64) {
        self.pending += n;
    }

    /// Publishes the pending delta.
    pub fn flush(&mut self) {
        if self.pending > 0 {
            self.target.inc_by(self.pending);
            self.pending = 0;
        }
    }
}

impl Drop for LocalCounter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{CDX_BINDING_REQUESTS_TOTAL, CDX_PACKETS_DROPPED_TOTAL};

    #[test]
    fn every_labelled_series_exists_before_first_use() {
        let t = Telemetry::new("1.2.3");
        t.counter_family(&CDX_PACKETS_DROPPED_TOTAL);
        let text = t.render();
        assert!(text.contains("natrix_build_info{version=\"1.2.3\"} 1"));
        assert!(
            text.contains("cdx_packets_dropped_total{reason=\"malformed\",transport=\"udp\"} 0")
        );
        assert!(
            text.contains("cdx_packets_dropped_total{reason=\"oversized\",transport=\"tcp\"} 0")
        );
    }

    #[test]
    fn resolving_twice_shares_the_series_and_local_counters_publish_on_flush() {
        let t = Telemetry::new("0");
        let a = t
            .counter_family(&CDX_BINDING_REQUESTS_TOTAL)
            .with_label_values(&["udp"]);
        let b = t
            .counter_family(&CDX_BINDING_REQUESTS_TOTAL)
            .with_label_values(&["udp"]);
        let mut local = LocalCounter::new(a.clone());
        local.inc();
        local.add(4);
        assert_eq!(b.get(), 0, "nothing is published before flush");
        local.flush();
        assert_eq!(b.get(), 5);
        local.inc();
        drop(local);
        assert_eq!(b.get(), 6, "drop flushes");
    }
}

//! Latency distributions (hdrhistogram, microseconds) and their JSON form:
//! percentiles, the percentile curve and a log-bucket histogram, which the
//! HTML report plots.

use hdrhistogram::Histogram;

/// Latencies in microseconds, up to a minute, 3 significant digits.
pub(crate) struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Latency({} samples)", self.0.len())
    }
}

impl Clone for Latency {
    fn clone(&self) -> Latency {
        Latency(self.0.clone())
    }
}

const MAX_US: u64 = 60_000_000;

impl Latency {
    /// An empty distribution.
    pub(crate) fn new() -> Latency {
        // 1 µs … 60 s at 3 digits is a valid, fixed-size histogram.
        Latency(Histogram::new_with_max(MAX_US, 3).unwrap_or_else(|_| std::process::abort()))
    }

    /// Records one sample (clamped to a minute) and exports it.
    pub(crate) fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
        crate::live::live().latency_us(us);
    }

    /// Records a duration.
    pub(crate) fn record(&mut self, d: std::time::Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(MAX_US));
    }

    /// Adds another distribution's samples.
    pub(crate) fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: addition cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// The value at percentile `p` (0–100) in milliseconds; 0 when empty.
    pub(crate) fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(p / 100.0) as f64 / 1000.0
    }

    /// Summary, percentile curve and histogram, in milliseconds.
    pub(crate) fn json(&self) -> serde_json::Value {
        if self.0.is_empty() {
            return serde_json::json!({"count": 0});
        }
        let curve: Vec<[f64; 2]> = self
            .0
            .iter_quantiles(4)
            .map(|v| {
                [
                    v.quantile_iterated_to() * 100.0,
                    v.value_iterated_to() as f64 / 1000.0,
                ]
            })
            .take_while(|[q, _]| *q <= 99.9999)
            .collect();
        let mut lower = 0u64;
        let buckets: Vec<[f64; 3]> = self
            .0
            .iter_log(10, 1.5)
            .filter_map(|v| {
                let upper = v.value_iterated_to();
                let b = [
                    lower as f64 / 1000.0,
                    upper as f64 / 1000.0,
                    v.count_since_last_iteration() as f64,
                ];
                lower = upper + 1;
                (b[2] > 0.0).then_some(b)
            })
            .collect();
        serde_json::json!({
            "count": self.0.len(),
            "mean_ms": self.0.mean() / 1000.0,
            "p50_ms": self.ms(50.0),
            "p90_ms": self.ms(90.0),
            "p99_ms": self.ms(99.0),
            "p999_ms": self.ms(99.9),
            "max_ms": self.0.max() as f64 / 1000.0,
            "percentile_curve": curve,
            "histogram": buckets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_curve_and_buckets_describe_the_samples() {
        let mut l = Latency::new();
        for us in 1..=1000 {
            l.record_us(us * 10); // 10 µs … 10 ms, uniform
        }
        assert_eq!(l.json()["count"], 1000);
        assert!((l.ms(50.0) - 5.0).abs() < 0.05, "{}", l.ms(50.0));
        assert!((l.ms(99.0) - 9.9).abs() < 0.05, "{}", l.ms(99.0));
        let j = l.json();
        let total: f64 = j["histogram"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b[2].as_f64().unwrap_or(0.0))
            .sum();
        assert_eq!(total, 1000.0, "every sample is in a bucket");
        let curve = j["percentile_curve"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(curve.len() > 10);
        let values: Vec<f64> = curve.iter().filter_map(|p| p[1].as_f64()).collect();
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "the curve rises");
    }

    #[test]
    fn an_empty_distribution_reports_zeroes() {
        let l = Latency::new();
        assert_eq!(l.ms(99.0), 0.0);
        assert_eq!(l.json()["count"], 0);
    }
}

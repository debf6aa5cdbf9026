//! Numbers for people: progress lines and plot axes.

/// A rate or count in a few characters (`1.7M`, `93.5k`, `412`, `0.50`),
/// for progress lines and plot axes.
pub(crate) fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

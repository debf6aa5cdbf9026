//! `--report FILE.html`: one self-contained page per run — the summary,
//! throughput over time, latency histograms and percentile curves, the NAT
//! matrix (natlab), the comparison (compare) and the raw JSON. Plots are
//! SVG drawn by plotters with a vendored font (no system font library) and
//! embedded inline, so the file opens anywhere without network access.

use std::fmt::Write as _;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::units::si;

/// DejaVu Sans (licence in `assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const SERIES: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The vendored font is a valid TrueType file.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws onto an SVG of `w`×`h` and returns its text.
fn svg(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    register_font();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        draw(&root)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(out)
}

fn e<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// Rates over time: what was sent, what came back, errors.
fn throughput(timeline: &[Value], units: (&str, &str)) -> anyhow::Result<String> {
    let series: [(&str, &str); 3] = [
        ("sent_per_s", units.0),
        ("done_per_s", units.1),
        ("errors_per_s", "errors"),
    ];
    let points = |key: &str| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .filter_map(|s| Some((s["t"].as_f64()?, s[key].as_f64()?)))
            .collect()
    };
    let tmax = timeline
        .iter()
        .filter_map(|s| s["t"].as_f64())
        .fold(0.0, f64::max)
        .max(0.1);
    let ymax = series
        .iter()
        .flat_map(|(k, _)| points(k))
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    svg(900, 360, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Throughput over time", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("per second")
            .y_label_formatter(&|v| si(*v))
            .draw()
            .map_err(e)?;
        for (i, (key, label)) in series.iter().enumerate() {
            let pts = points(key);
            if *key == "errors_per_s" && pts.iter().all(|p| p.1 == 0.0) {
                continue;
            }
            let color = SERIES[i];
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(e)?
                .label(format!("{label}/s"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(e)?;
        Ok(())
    })
}

/// Bars per log bucket of a latency distribution.
fn histogram(title: &str, latency: &Value) -> anyhow::Result<Option<String>> {
    let buckets: Vec<(f64, f64, f64)> = latency["histogram"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b[0].as_f64()?, b[1].as_f64()?, b[2].as_f64()?)))
        .collect();
    if buckets.is_empty() {
        return Ok(None);
    }
    let lo = buckets.first().map_or(0.001, |b| b.0).max(0.001);
    let hi = buckets.last().map_or(1.0, |b| b.1).max(lo * 2.0);
    let cmax = buckets.iter().map(|b| b.2).fold(0.0, f64::max) * 1.1;
    svg(440, 320, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(format!("{title}: histogram"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..cmax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds (log)")
            .y_desc("samples")
            .x_labels(6)
            .y_label_formatter(&|v| si(*v))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(
                buckets.iter().map(|&(a, b, c)| {
                    Rectangle::new([(a.max(lo), 0.0), (b, c)], SERIES[0].filled())
                }),
            )
            .map_err(e)?;
        Ok(())
    })
    .map(Some)
}

/// "Nines" of a percentile: 90 → 1, 99 → 2, 99.9 → 3.
fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.999_999)).log10()
}

/// Latency against percentile on a nines axis (HdrHistogram's classic).
fn percentile_curve(title: &str, latency: &Value) -> anyhow::Result<Option<String>> {
    let pts: Vec<(f64, f64)> = latency["percentile_curve"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((nines(p[0].as_f64()?), p[1].as_f64()?)))
        .collect();
    if pts.len() < 2 {
        return Ok(None);
    }
    let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max).ceil();
    let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(0.001) * 1.1;
    svg(440, 320, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(format!("{title}: percentiles"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("milliseconds")
            .x_labels(xmax as usize + 1)
            .x_label_formatter(&|x| {
                let p = 100.0 * (1.0 - 10f64.powf(-x));
                format!("{}", (p * 1000.0).round() / 1000.0)
            })
            .draw()
            .map_err(e)?;
        chart
            .draw_series(LineSeries::new(pts, SERIES[1].stroke_width(2)))
            .map_err(e)?;
        Ok(())
    })
    .map(Some)
}

/// The natlab matrix: a coloured cell per pair of NAT types.
fn nat_matrix(report: &Value) -> anyhow::Result<Option<String>> {
    let types: Vec<&str> = report["types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let pairs = report["pairs"].as_array().cloned().unwrap_or_default();
    if types.is_empty() || pairs.is_empty() {
        return Ok(None);
    }
    let n = types.len() as i32;
    let (cell, left, top) = (110i32, 170i32, 90i32);
    let size = ((left + cell * n + 20) as u32, (top + cell * n + 60) as u32);
    svg(size.0, size.1, |root| {
        let font = |px: i32| ("sans-serif", px).into_font();
        root.draw(&Text::new(
            "NAT matrix: outcome and milliseconds to the first packet",
            (left, 20),
            font(18).color(&BLACK),
        ))
        .map_err(e)?;
        for (i, t) in types.iter().enumerate() {
            let i = i as i32;
            root.draw(&Text::new(
                t.to_string(),
                (left + i * cell + 6, top - 24),
                font(13).color(&BLACK),
            ))
            .map_err(e)?;
            root.draw(&Text::new(
                t.to_string(),
                (10, top + i * cell + cell / 2 - 7),
                font(13).color(&BLACK),
            ))
            .map_err(e)?;
        }
        let index = |t: &str| types.iter().position(|x| *x == t).map(|i| i as i32);
        for p in &pairs {
            let (Some(a), Some(b)) = (
                p["a"].as_str().and_then(index),
                p["b"].as_str().and_then(index),
            ) else {
                continue;
            };
            let outcome = p["outcome"].as_str().unwrap_or("?");
            let ms = p["time_to_direct_ms"]
                .as_f64()
                .or_else(|| p["time_to_first_packet_ms"].as_f64());
            let (color, label) = match outcome {
                "direct" => (RGBColor(120, 200, 120), "direct"),
                "relayed" => (RGBColor(250, 200, 90), "relayed"),
                "no-direct" => (RGBColor(210, 210, 210), "no direct"),
                _ => (RGBColor(235, 110, 100), "failed"),
            };
            // The matrix is symmetric: fill both cells of an unordered pair.
            for (r, c) in [(a, b), (b, a)] {
                let (x, y) = (left + c * cell, top + r * cell);
                root.draw(&Rectangle::new(
                    [(x + 2, y + 2), (x + cell - 2, y + cell - 2)],
                    color.filled(),
                ))
                .map_err(e)?;
                root.draw(&Text::new(label, (x + 10, y + 35), font(15).color(&BLACK)))
                    .map_err(e)?;
                if let Some(ms) = ms.filter(|_| label != "no direct" && label != "failed") {
                    root.draw(&Text::new(
                        format!("{ms:.0} ms"),
                        (x + 10, y + 60),
                        font(14).color(&BLACK),
                    ))
                    .map_err(e)?;
                }
            }
        }
        Ok(())
    })
    .map(Some)
}

/// compare: grouped bars of the median rate per case and target.
fn comparison(report: &Value) -> anyhow::Result<Option<String>> {
    let cases = report["cases"].as_array().cloned().unwrap_or_default();
    let Some(first) = cases.first() else {
        return Ok(None);
    };
    let names: Vec<String> = first["targets"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    // The reference first, as the run listed it.
    let reference = report["reference"].as_str().unwrap_or_default();
    let mut names = names;
    names.sort_by_key(|n| n != reference);
    let ymax = cases
        .iter()
        .flat_map(|c| {
            names
                .iter()
                .filter_map(move |n| c["targets"][n]["median"].as_f64())
        })
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let k = names.len().max(1) as f64;
    svg(900, 380, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "{} (median of the rounds)",
                    report["unit"].as_str().unwrap_or("")
                ),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..cases.len() as f64, 0f64..ymax)
            .map_err(e)?;
        let labels: Vec<String> = cases
            .iter()
            .map(|c| c["case"].as_str().unwrap_or("").to_owned())
            .collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(cases.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| si(*v))
            .draw()
            .map_err(e)?;
        for (j, name) in names.iter().enumerate() {
            let color = SERIES[j % SERIES.len()];
            let w = 0.8 / k;
            chart
                .draw_series(cases.iter().enumerate().filter_map(|(i, c)| {
                    let v = c["targets"][name]["median"].as_f64()?;
                    let x0 = i as f64 + 0.1 + j as f64 * w;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + w * 0.95, v)],
                        color.filled(),
                    ))
                }))
                .map_err(e)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(e)?;
        Ok(())
    })
    .map(Some)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report's top-level figures as (name, text) rows — numbers
/// (fractions to 4 places), strings (not the Markdown table), booleans and
/// error tallies — for the summary on stderr and the HTML summary table.
pub(crate) fn headline(report: &Value) -> Vec<(&str, String)> {
    let Some(m) = report.as_object() else {
        return Vec::new();
    };
    m.iter()
        .filter_map(|(k, v)| {
            let text = match v {
                Value::Number(n) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(0.0)),
                Value::Number(n) => n.to_string(),
                Value::String(s) if k != "markdown" => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Object(_) if k.starts_with("errors") => v.to_string(),
                _ => return None,
            };
            Some((k.as_str(), text))
        })
        .collect()
}

/// Every latency distribution in the report, with a title: the top-level
/// one and those under `phases` or `modes` (an entry's `latency`, or the
/// entry itself when it is a distribution).
fn latencies(report: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    if report["latency"]["count"].as_u64().unwrap_or(0) > 0 {
        out.push(("latency".to_owned(), &report["latency"]));
    }
    for group in ["phases", "modes"] {
        if let Some(m) = report[group].as_object() {
            for (name, v) in m {
                // A group entry holds its distribution, or is one (the
                // signal scenario's phases).
                let l = if v["latency"].is_object() {
                    &v["latency"]
                } else if v["histogram"].is_array() {
                    v
                } else {
                    continue;
                };
                if l["count"].as_u64().unwrap_or(0) > 0 {
                    out.push((name.clone(), l));
                }
            }
        }
    }
    out
}

/// Renders `report` (a scenario's JSON report, with its timeline) as HTML.
pub(crate) fn render(report: &Value, command: &str) -> anyhow::Result<String> {
    let scenario = report["scenario"].as_str().unwrap_or("run");
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>natrix-loadtest {s}</title><style>\
         body{{font-family:sans-serif;margin:24px;color:#222}}\
         table{{border-collapse:collapse;margin:8px 0 20px}}\
         td,th{{border:1px solid #ccc;padding:3px 10px;text-align:left}}\
         td.n{{text-align:right;font-variant-numeric:tabular-nums}}\
         .plots{{display:flex;flex-wrap:wrap;gap:12px}}\
         .warn{{background:#fff3cd;padding:8px;border:1px solid #e0c060}}\
         code{{background:#f4f4f4;padding:2px 4px}}</style></head><body>\n\
         <h1>natrix-loadtest {s}</h1>\n<p><code>{c}</code></p>\n",
        s = escape(scenario),
        c = escape(command),
    );
    if report["interrupted"] == true {
        html += "<p class=\"warn\">Interrupted: the figures cover what was measured until the stop.</p>\n";
    }
    html += "<h2>Summary</h2>\n<table>\n";
    for (k, text) in headline(report) {
        let _ = writeln!(
            html,
            "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
            escape(k),
            escape(&text)
        );
    }
    html += "</table>\n";
    let timeline = report["timeline"].as_array().cloned().unwrap_or_default();
    if timeline.len() >= 2 {
        html += "<h2>Throughput</h2>\n";
        let units = (
            report["units"]["sent"].as_str().unwrap_or("sent"),
            report["units"]["done"].as_str().unwrap_or("done"),
        );
        html += &throughput(&timeline, units)?;
    }
    let lat = latencies(report);
    if !lat.is_empty() {
        html += "\n<h2>Latency</h2>\n";
        for (title, l) in lat {
            let _ = write!(
                html,
                "<h3>{}</h3><p>p50 {:.3} ms · p90 {:.3} ms · p99 {:.3} ms · p99.9 {:.3} ms · max {:.3} ms ({} samples)</p>\n<div class=\"plots\">",
                escape(&title),
                l["p50_ms"].as_f64().unwrap_or(0.0),
                l["p90_ms"].as_f64().unwrap_or(0.0),
                l["p99_ms"].as_f64().unwrap_or(0.0),
                l["p999_ms"].as_f64().unwrap_or(0.0),
                l["max_ms"].as_f64().unwrap_or(0.0),
                l["count"],
            );
            if let Some(s) = histogram(&title, l)? {
                html += &s;
            }
            if let Some(s) = percentile_curve(&title, l)? {
                html += &s;
            }
            html += "</div>\n";
        }
    }
    if let Some(s) = nat_matrix(report)? {
        html += "<h2>NAT matrix</h2>\n";
        html += &s;
    }
    if let Some(s) = comparison(report)? {
        html += "<h2>Comparison</h2>\n";
        html += &s;
        html += &markdown_table(report["markdown"].as_str().unwrap_or(""));
    }
    let _ = write!(
        html,
        "\n<h2>Every figure</h2><details><summary>JSON report</summary><pre>{}</pre></details>\n</body></html>\n",
        escape(&serde_json::to_string_pretty(report).unwrap_or_default())
    );
    Ok(html)
}

/// A Markdown pipe table as HTML.
fn markdown_table(md: &str) -> String {
    let mut html = String::from("<table>\n");
    for (i, line) in md.lines().filter(|l| l.starts_with('|')).enumerate() {
        if line.contains("|---") {
            continue;
        }
        let tag = if i == 0 { "th" } else { "td" };
        html += "<tr>";
        for cell in line.trim_matches('|').split('|') {
            let _ = write!(html, "<{tag}>{}</{tag}>", escape(cell.trim()));
        }
        html += "</tr>\n";
    }
    html + "</table>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_renders_every_section_it_has_data_for() {
        let mut l = crate::stats::Latency::new();
        for us in 1..500 {
            l.record_us(us * 7);
        }
        let report = serde_json::json!({
            "scenario": "relay",
            "sent": 100, "loss_ratio": 0.01,
            "units": {"sent": "packets", "done": "echoes"},
            "timeline": [
                {"t": 0.25, "sent_per_s": 1000.0, "done_per_s": 990.0, "errors_per_s": 0.0},
                {"t": 0.5, "sent_per_s": 1100.0, "done_per_s": 1000.0, "errors_per_s": 0.0},
            ],
            "latency": l.json(),
            "types": ["open", "symmetric"],
            "pairs": [
                {"a": "open", "b": "open", "outcome": "direct", "time_to_direct_ms": 34.0},
                {"a": "open", "b": "symmetric", "outcome": "relayed", "time_to_first_packet_ms": 80.0},
                {"a": "symmetric", "b": "symmetric", "outcome": "failed"},
            ],
        });
        let html = render(&report, "natrix-loadtest relay <x>").unwrap_or_else(|e| panic!("{e:#}"));
        assert!(html.contains("Throughput over time"));
        assert!(html.contains("latency: histogram"));
        assert!(html.contains("latency: percentiles"));
        assert!(html.contains("NAT matrix"));
        // Each pair fills its cell and the mirrored one.
        assert_eq!(html.matches(">\nrelayed\n</text>").count(), 2);
        assert!(html.contains("relay &lt;x&gt;"), "the command is escaped");
        assert_eq!(html.matches("<svg").count(), 4, "four plots");
        assert!(html.contains("<rect"), "bars and cells are drawn");
    }

    #[test]
    fn nines_space_the_percentiles_evenly() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-6);
    }
}

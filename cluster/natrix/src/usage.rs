//! `natrix usage`: sums the relays' usage records (one per allocation) by
//! tenant, user, session or relay — from a `--usage-file` or from the
//! `--usage-stream` in Redis — what an operator bills from.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::Context;

use crate::cli::{Global, UsageArgs};

/// Sums of one group.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sums {
    allocations: u64,
    seconds: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
    peers: u64,
}

impl Sums {
    fn add(&mut self, r: &serde_json::Value) {
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        self.allocations += 1;
        self.seconds += n(&r["seconds"]);
        for (i, way) in ["client_to_peer", "peer_to_client"].iter().enumerate() {
            self.packets[i] += n(&r[way]["packets"]);
            self.bytes[i] += n(&r[way]["bytes"]);
        }
        self.peers += n(&r["peers"]);
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "allocations": self.allocations,
            "seconds": self.seconds,
            "client_to_peer": {"packets": self.packets[0], "bytes": self.bytes[0]},
            "peer_to_client": {"packets": self.packets[1], "bytes": self.bytes[1]},
            "peers": self.peers,
        })
    }
}

/// What the records summed to.
#[derive(Debug, Default)]
struct Summary {
    groups: BTreeMap<String, Sums>,
    total: Sums,
    /// Lines or entries that are not records.
    malformed: u64,
    /// Records outside `--since`.
    skipped: u64,
}

impl Summary {
    fn take(&mut self, text: &[u8], by: &str, since: Option<u64>) {
        let Ok(r) = serde_json::from_slice::<serde_json::Value>(text) else {
            self.malformed += 1;
            return;
        };
        if !r.is_object() || !r["end"].is_u64() {
            self.malformed += 1;
            return;
        }
        if since.is_some_and(|s| r["end"].as_u64().unwrap_or(0) < s) {
            self.skipped += 1;
            return;
        }
        let key = match by {
            "user" => r["username"].as_str(),
            "session" => r["session"].as_str(),
            "relay" => r["relay"].as_str(),
            "none" => Some("all"),
            _ => r["tenant"].as_str(),
        }
        .unwrap_or("-")
        .to_owned();
        self.groups.entry(key).or_default().add(&r);
        self.total.add(&r);
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `natrix usage`.
pub(crate) fn run(global: &Global, args: &UsageArgs) -> anyhow::Result<()> {
    let since = args.since.map(|d| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |n| n.as_secs())
            .saturating_sub(d.as_secs())
    });
    let mut summary = Summary::default();
    match (&args.file, &args.stream) {
        (Some(path), None) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("opening the usage file {}", path.display()))?;
            for line in std::io::BufReader::new(file).lines() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if !line.trim().is_empty() {
                    summary.take(line.as_bytes(), &args.by, since);
                }
            }
        }
        (None, Some(stream)) => {
            let (runtime, store) = crate::store_for(global, "usage streams")?;
            runtime.block_on(async {
                let mut after = "0".to_owned();
                loop {
                    let page = store
                        .read_stream(stream, &after, 1000)
                        .await
                        .with_context(|| format!("reading the stream {stream}"))?;
                    let Some((last, _)) = page.last() else {
                        break;
                    };
                    after = last.clone();
                    for (_, payload) in &page {
                        summary.take(payload, &args.by, since);
                    }
                }
                anyhow::Ok(())
            })?;
        }
        _ => anyhow::bail!(
            "give --file PATH (a relay's --usage-file) or --stream NAME (its --usage-stream, with --redis-url)"
        ),
    }
    if args.json {
        let groups: serde_json::Map<String, serde_json::Value> = summary
            .groups
            .iter()
            .map(|(k, s)| (k.clone(), s.json()))
            .collect();
        let doc = serde_json::json!({
            "by": args.by,
            "groups": groups,
            "total": summary.total.json(),
            "malformed": summary.malformed,
            "skipped": summary.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "{:<40} {:>11} {:>10} {:>12} {:>12} {:>12} {:>12}",
        args.by, "allocations", "hours", "packets →", "bytes →", "packets ←", "bytes ←"
    );
    let row = |name: &str, s: &Sums| {
        println!(
            "{:<40} {:>11} {:>10.2} {:>12} {:>12} {:>12} {:>12}",
            name,
            s.allocations,
            s.seconds as f64 / 3600.0,
            s.packets[0],
            bytes(s.bytes[0]),
            s.packets[1],
            bytes(s.bytes[1])
        );
    };
    for (k, s) in &summary.groups {
        row(k, s);
    }
    row("total", &summary.total);
    if summary.malformed > 0 {
        eprintln!("{} lines were not usage records", summary.malformed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sum_by_tenant_and_bad_lines_are_counted() {
        let mut s = Summary::default();
        let rec = |tenant: &str, bytes: u64, end: u64| {
            serde_json::json!({"tenant": tenant, "username": "u", "end": end, "seconds": 10,
                "client_to_peer": {"packets": 2, "bytes": bytes},
                "peer_to_client": {"packets": 3, "bytes": 2 * bytes}, "peers": 1})
            .to_string()
        };
        s.take(rec("acme", 100, 50).as_bytes(), "tenant", None);
        s.take(rec("acme", 50, 60).as_bytes(), "tenant", None);
        s.take(rec("other", 7, 70).as_bytes(), "tenant", Some(55));
        s.take(rec("old", 7, 10).as_bytes(), "tenant", Some(55));
        s.take(b"{not json", "tenant", None);
        assert_eq!(s.groups["acme"].allocations, 2);
        assert_eq!(s.groups["acme"].bytes, [150, 300]);
        assert_eq!(s.groups["other"].packets, [2, 3]);
        assert!(!s.groups.contains_key("old"));
        assert_eq!((s.total.allocations, s.malformed, s.skipped), (3, 1, 1));
    }
}

//! `natrix-loadtest natlab`: the NAT lab (real Linux NATs in network
//! namespaces) and the matrix of direct connectivity across every pair of
//! NAT types.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use natrix_model::invitation::Invitation;
use natrix_model::{NatClass, direct_feasible};

/// The lab script, shipped inside the binary so the tool works anywhere.
const SCRIPT: &str = include_str!("../natlab/natlab.sh");

/// The lab's client types, in matrix order: one NAT of each class of the
/// model, named as the model names it.
pub(crate) const TYPES: [&str; 6] = {
    let c = NatClass::ALL;
    [
        c[0].name(),
        c[1].name(),
        c[2].name(),
        c[3].name(),
        c[4].name(),
        c[5].name(),
    ]
};

/// Options of `natlab`.
#[derive(clap::Args, Debug)]
pub(crate) struct NatlabArgs {
    /// lookup API key (`nxk_…`; `natrix up` prints a development one).
    #[arg(long = "api-key", env = "NATRIX_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// up (build, replacing any previous lab), down (remove), status, or
    /// matrix (run a session between a client of each type and a client of
    /// every type, through CDX nodes already running in the lab).
    #[arg(value_parser = ["up", "down", "status", "matrix"])]
    pub(crate) action: String,
    /// matrix: CDX nodes in the lab (comma separated); the first
    /// participant of each pair uses the first, the second the next.
    #[arg(long, value_delimiter = ',', default_value = "203.0.113.1:3478")]
    pub(crate) cdx: Vec<SocketAddr>,
    /// matrix: the CDX nodes' cluster secret, to mint session tickets.
    #[arg(long, env = "NATRIX_CLUSTER_SECRET")]
    pub(crate) cluster_secret: Option<String>,
    /// matrix: run NAT discovery in each participant first.
    #[arg(long)]
    pub(crate) discover: bool,
    /// matrix: exit non-zero unless every pair's outcome is what the NAT
    /// behaviours predict (direct where feasible; with --lookup, relayed
    /// elsewhere; without, no direct path elsewhere).
    #[arg(long)]
    pub(crate) check: bool,
    /// matrix: plan every pair with lookup at this address (reachable from
    /// where this runs, e.g. inside nx-pub): direct where planned and
    /// working, else a retry plan through a TURN relay — outcomes direct /
    /// relayed / failed.
    #[arg(long)]
    pub(crate) lookup: Option<String>,
    /// With --lookup: set every pair up through signalling instead of raw
    /// plans — two devices register, one invites, the other accepts, and
    /// each side's plan is the one signalling handed it.
    #[arg(long)]
    pub(crate) invitations: bool,
    /// With --invitations: the grant secret lookup holds (registration
    /// grants are minted with it); without it lookup must run with
    /// --open-registration.
    #[arg(long = "grant-secret")]
    pub(crate) grant_secret: Option<natrix_model::TurnSecret>,
}

fn script(action: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("bash")
        .args(["-s", "--", action])
        .stdin(Stdio::piped())
        .spawn()
        .context("running bash for the NAT lab")?;
    child
        .stdin
        .take()
        .context("bash stdin")?
        .write_all(SCRIPT.as_bytes())
        .context("feeding the NAT lab script")?;
    let status = child.wait()?;
    if !status.success() {
        anyhow::bail!("natlab {action} failed ({status}); it needs root, iproute2 and nftables");
    }
    Ok(())
}

/// Every unordered pair of lab types (21), in matrix order.
fn unordered_pairs() -> Vec<(&'static str, &'static str)> {
    TYPES
        .iter()
        .enumerate()
        .flat_map(|(i, a)| TYPES[i..].iter().map(move |b| (*a, *b)))
        .collect()
}

/// Whether a direct UDP path is feasible between two lab types: the
/// model's one rule on the behaviours their classes stand for.
pub(crate) fn feasible(a: &str, b: &str) -> bool {
    match (a.parse::<NatClass>(), b.parse::<NatClass>()) {
        (Ok(a), Ok(b)) => direct_feasible(&a.behaviour(), &b.behaviour()),
        _ => false,
    }
}

fn peer_in(
    ns: &str,
    cdx: SocketAddr,
    invitation: &Invitation,
    discover: bool,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("locating natrix-loadtest")?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(exe)
        .args(["peer", "--cdx", &cdx.to_string()])
        .env("NATRIX_INVITATION", invitation.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if discover {
        c.arg("--discover");
    }
    c.spawn()
        .with_context(|| format!("starting a peer in {ns}"))
}

/// A peer process in namespace `ns` with `extra` arguments; its JSON line.
fn peer_json(
    ns: &str,
    cdx: SocketAddr,
    extra: &[&str],
    env: Option<(&str, String)>,
) -> serde_json::Value {
    let run = || -> anyhow::Result<serde_json::Value> {
        let exe = std::env::current_exe().context("locating natrix-loadtest")?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(exe)
            .args(["peer", "--cdx", &cdx.to_string()])
            .args(extra)
            .stderr(Stdio::null());
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c
            .output()
            .with_context(|| format!("running a peer in {ns}"))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    run().unwrap_or_else(|e| serde_json::json!({"ok": false, "error": format!("{e:#}")}))
}

/// Runs both sides of `plan` in their namespaces; both reports.
fn run_plan(plan: &serde_json::Value, ns: [&str; 2], cdx: SocketAddr) -> [serde_json::Value; 2] {
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            peer_json(
                ns[0],
                cdx,
                &[],
                Some(("NATRIX_PLAN_SIDE", plan["a"].to_string())),
            )
        });
        let b = s.spawn(|| {
            peer_json(
                ns[1],
                cdx,
                &[],
                Some(("NATRIX_PLAN_SIDE", plan["b"].to_string())),
            )
        });
        [a.join().unwrap_or_default(), b.join().unwrap_or_default()]
    })
}

/// The matrix through lookup: profiles, plans, direct or relayed.
fn matrix_with_lookup(args: &NatlabArgs, lookup: &str) -> anyhow::Result<serde_json::Value> {
    use std::net::ToSocketAddrs;
    let lookup: SocketAddr = lookup
        .to_socket_addrs()?
        .next()
        .context("--lookup resolves to nothing")?;
    let cdx = *args.cdx.first().context("--cdx is empty")?;
    let plan = |a: &serde_json::Value, b: &serde_json::Value, retry: bool| {
        if args.invitations {
            return crate::signal::plan_by_invitation(
                lookup,
                args.grant_secret.as_ref(),
                a,
                b,
                retry,
            )
            .map(|p| (200, p));
        }
        let body = serde_json::json!({"a": {"profile": a}, "b": {"profile": b}, "retry": retry});
        crate::e2e::http(
            lookup,
            "POST",
            "/v1/plan",
            &body.to_string(),
            args.api_key.as_deref(),
        )
    };
    // Each client's profile once (its NAT does not change between pairs).
    let profiles: std::collections::BTreeMap<String, serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = TYPES
            .iter()
            .flat_map(|t| [format!("nx-c-{t}"), format!("nx-c-{t}-2")])
            .map(|ns| {
                s.spawn(move || {
                    let p = peer_json(&ns, cdx, &["--profile-only"], None);
                    (ns, p)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let pairs = unordered_pairs();
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(a, b)| {
                let (na, nb) = (format!("nx-c-{a}"), format!("nx-c-{b}-2"));
                let (pa, pb) = (profiles[&na].clone(), profiles[&nb].clone());
                let plan = &plan;
                s.spawn(move || {
                    let mut attempts = Vec::new();
                    let mut outcome = "failed";
                    for retry in [false, true] {
                        let Ok((200, p)) = plan(&pa, &pb, retry) else {
                            attempts.push(serde_json::json!({"retry": retry, "error": "no plan"}));
                            break;
                        };
                        let reports = run_plan(&p, [&na, &nb], cdx);
                        let ok = reports.iter().all(|r| r["ok"] == true);
                        let mode = p["mode"].as_str().unwrap_or("?").to_owned();
                        let setup = reports
                            .iter()
                            .filter_map(|r| r["first_packet_ms"].as_f64())
                            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
                        attempts.push(serde_json::json!({"retry": retry, "mode": mode, "ok": ok, "setup_ms": setup, "peers": reports}));
                        if ok {
                            outcome = if mode == "direct" { "direct" } else { "relayed" };
                            break;
                        }
                        if mode != "direct" {
                            break;
                        }
                    }
                    let setup = attempts.last().and_then(|a| a["setup_ms"].as_f64());
                    serde_json::json!({
                        "a": a, "b": b,
                        "outcome": outcome,
                        "expected": if feasible(a, b) { "direct" } else { "relayed" },
                        "time_to_first_packet_ms": setup,
                        "attempts": attempts,
                    })
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    print_outcomes(&results);
    let mismatches: Vec<String> = results
        .iter()
        .filter(|r| r["outcome"] != r["expected"])
        .map(|r| {
            format!(
                "{} / {}: {} (expected {})",
                r["a"], r["b"], r["outcome"], r["expected"]
            )
        })
        .collect();
    let count = |o: &str| results.iter().filter(|r| r["outcome"] == o).count();
    let mut doc = serde_json::json!({
        "scenario": "natlab",
        "lookup": lookup.to_string(),
        "direct": count("direct"),
        "relayed": count("relayed"),
        "failed": count("failed"),
        "mismatches": mismatches.len(),
        "types": TYPES,
        "pairs": results,
        "profiles": profiles,
    });
    check_failure(args, &mut doc, &mismatches);
    Ok(doc)
}

/// With --check, a report whose outcomes differ from the prediction
/// carries the failure (written to the reports, then exit 1).
fn check_failure(args: &NatlabArgs, doc: &mut serde_json::Value, mismatches: &[String]) {
    if args.check && !mismatches.is_empty() {
        doc["failure"] = format!(
            "the measured matrix differs from the prediction:\n  {}",
            mismatches.join("\n  ")
        )
        .into();
    }
}

fn print_outcomes(results: &[serde_json::Value]) {
    print_grid(
        "outcome per pair (D direct, R relayed, - failed; ms to the first packet):",
        10,
        results,
        |r| match r["outcome"].as_str() {
            Some("failed") => "-".to_owned(),
            o => format!(
                "{} {:.0}",
                if o == Some("direct") { "D" } else { "R" },
                r["time_to_first_packet_ms"].as_f64().unwrap_or(0.0)
            ),
        },
    );
}

/// The symmetric 6×6 grid of `results` (one per unordered pair), each cell
/// drawn by `cell`, `width` characters wide.
fn print_grid(
    title: &str,
    width: usize,
    results: &[serde_json::Value],
    cell: impl Fn(&serde_json::Value) -> String,
) {
    println!("{title}");
    print!("{:>9}", "");
    for t in TYPES {
        print!("{:>width$}", short(t));
    }
    println!();
    for a in TYPES {
        print!("{:>9}", short(a));
        for b in TYPES {
            let text = results
                .iter()
                .find(|r| (r["a"] == a && r["b"] == b) || (r["a"] == b && r["b"] == a))
                .map_or("?".to_owned(), &cell);
            print!("{text:>width$}");
        }
        println!();
    }
}

fn short(t: &str) -> &'static str {
    match t {
        "open" => "open",
        "full-cone" => "full",
        "restricted-cone" => "restr",
        "port-restricted-cone" => "p-restr",
        "symmetric" => "symm",
        _ => "udp-blk",
    }
}

fn matrix(args: &NatlabArgs) -> anyhow::Result<serde_json::Value> {
    if let Some(lookup) = &args.lookup {
        return matrix_with_lookup(args, lookup);
    }
    let secret = args.cluster_secret.as_deref().context(
        "natlab matrix needs --cluster-secret (the CDX nodes' secret) to mint session tickets",
    )?;
    let first = *args.cdx.first().context("--cdx is empty")?;
    let second = *args.cdx.get(1).unwrap_or(&first);
    let expires = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 120;
    let pairs = unordered_pairs();
    // All pairs at once: each pair has its own sockets, so NAT state of
    // one cannot help another (probes go only to the pair's own mappings).
    let mut running = Vec::new();
    for (a, b) in &pairs {
        let invs =
            Invitation::mint_session(secret.as_bytes(), 2, expires, &mut |buf| rand::fill(buf));
        let pa = peer_in(&format!("nx-c-{a}"), first, &invs[0], args.discover)?;
        let pb = peer_in(&format!("nx-c-{b}-2"), second, &invs[1], args.discover)?;
        running.push((*a, *b, pa, pb));
    }
    let mut results = Vec::new();
    let mut mismatches = Vec::new();
    for (a, b, pa, pb) in running {
        let read = |c: std::process::Child| -> serde_json::Value {
            c.wait_with_output()
                .ok()
                .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                .unwrap_or_else(
                    || serde_json::json!({"direct": false, "error": "peer printed no report"}),
                )
        };
        let (ra, rb) = (read(pa), read(pb));
        let direct = ra["direct"] == true && rb["direct"] == true;
        let expected = feasible(a, b);
        if direct != expected {
            mismatches.push(format!(
                "{a} / {b}: measured {}, expected {}",
                outcome(direct),
                outcome(expected)
            ));
        }
        // The pair is connected when the slower side is.
        let setup = match (
            ra["time_to_direct_ms"].as_f64(),
            rb["time_to_direct_ms"].as_f64(),
        ) {
            (Some(x), Some(y)) => Some(x.max(y)),
            _ => None,
        };
        results.push(serde_json::json!({
            "a": a, "b": b,
            "outcome": outcome(direct),
            "expected": outcome(expected),
            "time_to_direct_ms": setup,
            "peers": [ra, rb],
        }));
    }
    print_matrix(&results);
    let direct = results.iter().filter(|r| r["outcome"] == "direct").count();
    let mut doc = serde_json::json!({
        "scenario": "natlab",
        "direct": direct,
        "no_direct": results.len() - direct,
        "mismatches": mismatches.len(),
        "types": TYPES,
        "pairs": results,
    });
    check_failure(args, &mut doc, &mismatches);
    Ok(doc)
}

fn outcome(direct: bool) -> &'static str {
    if direct { "direct" } else { "no-direct" }
}

fn print_matrix(results: &[serde_json::Value]) {
    print_grid(
        "direct UDP through the CDX exchange (ms to a confirmed path; - = none):",
        9,
        results,
        |r| {
            if r["outcome"] == "direct" {
                r["time_to_direct_ms"]
                    .as_f64()
                    .map_or("direct".to_owned(), |ms| format!("{ms:.0}"))
            } else {
                "-".to_owned()
            }
        },
    );
}

/// `natlab <action>`.
pub(crate) fn run(args: &NatlabArgs) -> anyhow::Result<Option<serde_json::Value>> {
    match args.action.as_str() {
        "matrix" => matrix(args).map(Some),
        action => {
            script(action)?;
            if action == "up" {
                println!(
                    "NAT lab up: CDX addresses 203.0.113.1 and 203.0.113.2 in namespace nx-pub; two clients per type in nx-c-<type> and nx-c-<type>-2 for open, full-cone, restricted-cone, port-restricted-cone, symmetric, udp-blocked"
                );
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feasibility_follows_the_behaviours() {
        let direct: Vec<_> = TYPES
            .iter()
            .flat_map(|a| TYPES.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| feasible(a, b))
            .collect();
        // 5 types that can send UDP → 25 ordered pairs, minus symmetric with
        // symmetric (1) and symmetric with port-restricted (2 orders).
        assert_eq!(direct.len(), 22);
        assert!(feasible("symmetric", "restricted-cone"));
        assert!(feasible("symmetric", "open"));
        assert!(!feasible("port-restricted-cone", "symmetric"));
        assert!(!feasible("open", "udp-blocked"));
        assert_eq!(unordered_pairs().len(), 21);
    }
}

//! `natrix-loadtest natlab`: the NAT lab (real Linux NATs in network
//! namespaces) and the matrix of direct connectivity across every pair of
//! NAT types.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use natrix_model::invitation::Invitation;
use natrix_model::{Behaviour, NatClass, PortAllocation, direct_feasible, punch_plans};

/// The lab script, shipped inside the binary so the tool works anywhere.
const SCRIPT: &str = include_str!("../natlab/natlab.sh");

/// The lab's client types, in matrix order: one NAT of each class of the
/// model, named as the model names it, with the symmetric class in three
/// port allocations (random, sequential, preserving), two clients on one
/// LAN behind a port-restricted NAT that does not hairpin (their pair meets
/// at the private addresses), a home NAT behind a carrier-grade NAT, and
/// two IPv6 clients: dual-stack (IPv4 behind a random-port symmetric NAT,
/// IPv6 behind a stateful firewall) and IPv6-only (the same firewall, IPv4
/// through NAT64).
pub(crate) const TYPES: [&str; 12] = {
    let c = NatClass::ALL;
    [
        c[0].name(),
        c[1].name(),
        c[2].name(),
        c[3].name(),
        c[4].name(),
        SEQUENTIAL,
        PRESERVING,
        SHARED,
        CGNAT,
        DUAL,
        NAT64,
        c[5].name(),
    ]
};

/// IPv4 behind a random-port symmetric NAT, IPv6 behind a stateful firewall.
const DUAL: &str = "dual";
/// IPv6 behind a stateful firewall, IPv4 only through NAT64.
const NAT64: &str = "nat64";
/// The lab NAT64's prefix (network-specific: see natlab.sh).
pub(crate) const LAB_NAT64_PREFIX: &str = "2001:db8:64::/96";

/// Whether a lab type reaches the servers over IPv6 behind a stateful
/// firewall (its IPv6 side behaves as a port-restricted cone).
fn on_ipv6(t: &str) -> bool {
    t == DUAL || t == NAT64
}

/// Two clients behind one port-restricted NAT.
const SHARED: &str = "shared";
/// A port-restricted home NAT behind a carrier-grade NAT.
const CGNAT: &str = "cgnat";

/// The symmetric NAT that allocates ports sequentially.
const SEQUENTIAL: &str = "symmetric-sequential";
/// The symmetric NAT that keeps a socket's port for its first mapping.
const PRESERVING: &str = "symmetric-preserving";

/// The behaviours a lab type stands for: its class's, and for the symmetric
/// ones their port allocation.
fn behaviour(t: &str) -> Option<Behaviour> {
    let (class, allocation, stride) = match t {
        SEQUENTIAL => (NatClass::Symmetric, PortAllocation::Sequential, 1),
        PRESERVING => (NatClass::Symmetric, PortAllocation::Preserving, 0),
        // Through NAT64 the IPv4 side is tayga then a port-keeping NAT.
        SHARED | CGNAT | NAT64 => (NatClass::PortRestrictedCone, PortAllocation::Preserving, 0),
        DUAL => (NatClass::Symmetric, PortAllocation::Random, 0),
        _ => {
            let class: NatClass = t.parse().ok()?;
            let random = class == NatClass::Symmetric;
            return Some(Behaviour {
                allocation: random.then_some(PortAllocation::Random),
                ..class.behaviour()
            });
        }
    };
    Some(Behaviour {
        allocation: Some(allocation),
        stride,
        ..class.behaviour()
    })
}

/// The class discovery finds behind a lab type.
fn class_of(t: &str) -> Option<NatClass> {
    behaviour(t).map(|b| b.class())
}

/// Options of `natlab`.
#[derive(clap::Args, Debug)]
pub(crate) struct NatlabArgs {
    /// lookup API key (`nxk_…`; `natrix up` prints a development one).
    #[arg(long = "api-key", env = "NATRIX_API_KEY")]
    pub(crate) api_key: Option<String>,
    /// up (build, replacing any previous lab), down (remove), status,
    /// matrix (run a session between a client of each type and a client of
    /// every type, through CDX nodes already running in the lab), or hard
    /// (with --lookup: repeat the pairs planned for birthday punching or
    /// port prediction, direct attempts only: success rate, setup time,
    /// probes).
    /// loss: drop --percent of the packets crossing the lab's internet.
    /// hold: one pair kept after punching, with keepalives.
    /// cut / mend: drop (stop dropping) what clients send each other
    /// directly — direct paths break, CDX and the relay stay reachable.
    #[arg(value_parser = ["up", "down", "status", "matrix", "hard", "loss", "hold", "cut", "mend"])]
    pub(crate) action: String,
    /// hold: the two lab types (first and second participant).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "symmetric,port-restricted-cone"
    )]
    pub(crate) pair: Vec<String>,
    /// hold: how long to keep the direct path.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub(crate) hold: std::time::Duration,
    /// hold: the keepalive interval (default: the plan's, from the
    /// profiles' mapping lifetimes — see --lifetime — or 15 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) keepalive: Option<std::time::Duration>,
    /// hold: measure both clients' mapping lifetimes (idling sockets up to
    /// this long) so lookup plans the keepalive from them.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) lifetime: Option<std::time::Duration>,
    /// hold: both sides find a broken path again (new Binding, a newer
    /// entry through CDX, a new punch).
    #[arg(long)]
    pub(crate) recover: bool,
    /// hold: the plan a retry gets (the more restrictive side relayed)
    /// instead of the direct one; with --recover a relayed side whose
    /// address changes moves its allocation (TURN mobility, RFC 8016).
    #[arg(long)]
    pub(crate) relayed: bool,
    /// hold with `--pair mobile,…`: move nx-c-mobile from its Wi-Fi to its
    /// cellular uplink this long into the session (and back after it).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) move_after: Option<std::time::Duration>,
    /// hold: cut the direct paths (`natlab cut`) this long into the
    /// session: a side that raced its relay, and its peer, move to the
    /// relay and the session goes on.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) cut_after: Option<std::time::Duration>,
    /// hold with --cut-after: mend the cut after this long (the sides
    /// move back to the direct path); without it the cut lasts the hold.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) cut_for: Option<std::time::Duration>,
    /// loss: the share of packets to drop, in percent (0 removes the loss).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub(crate) percent: u8,
    /// hard: attempts per ordered pair.
    #[arg(long, default_value_t = 20, value_parser = crate::positive)]
    pub(crate) attempts: usize,
    /// matrix: CDX nodes in the lab (comma separated); the first
    /// participant of each pair uses the first, the second the next.
    #[arg(long, value_delimiter = ',', default_value = "203.0.113.1:3478")]
    pub(crate) cdx: Vec<SocketAddr>,
    /// An IPv6 address of the CDX nodes: clients with an IPv6 route also
    /// run discovery there, and lookup plans IPv6 paths from it.
    #[arg(long, default_value = "[2001:db8:ffff::1]:3478")]
    pub(crate) cdx6: SocketAddr,
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

fn script(action: &str, extra: &[&str]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("bash")
        .args(["-s", "--", action])
        .args(extra)
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

/// Whether the classic rule allows a direct UDP path between two lab types
/// (what peers that only probe each other's candidates find).
pub(crate) fn feasible(a: &str, b: &str) -> bool {
    match (behaviour(a), behaviour(b)) {
        (Some(a), Some(b)) => direct_feasible(&a, &b),
        _ => false,
    }
}

/// The technique the model's rule plans for two lab types (lookup's
/// verdict), `None` where they are relayed.
pub(crate) fn technique(a: &str, b: &str) -> Option<&'static str> {
    // Both on IPv6 behind firewalls: the classic punch there.
    if on_ipv6(a) && on_ipv6(b) {
        return Some("classic");
    }
    let plans = punch_plans(&behaviour(a)?, &behaviour(b)?)?;
    Some(plans[0].technique.name())
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
        .env("NATRIX_NAT64_PREFIX", LAB_NAT64_PREFIX)
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
            .env("NATRIX_NAT64_PREFIX", LAB_NAT64_PREFIX)
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
    run_plan_with(plan, ns, cdx, &[])
}

/// [`run_plan`] with `extra` arguments for both peers.
fn run_plan_with(
    plan: &serde_json::Value,
    ns: [&str; 2],
    cdx: SocketAddr,
    extra: &[&str],
) -> [serde_json::Value; 2] {
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            peer_json(
                ns[0],
                cdx,
                extra,
                Some(("NATRIX_PLAN_SIDE", plan["a"].to_string())),
            )
        });
        let b = s.spawn(|| {
            peer_json(
                ns[1],
                cdx,
                extra,
                Some(("NATRIX_PLAN_SIDE", plan["b"].to_string())),
            )
        });
        [a.join().unwrap_or_default(), b.join().unwrap_or_default()]
    })
}

/// A plan for profiles `a` and `b` from lookup (or through signalling with
/// `--invitations`): its status and body.
fn lookup_plan(
    args: &NatlabArgs,
    lookup: SocketAddr,
    a: &serde_json::Value,
    b: &serde_json::Value,
    retry: bool,
) -> anyhow::Result<(u16, serde_json::Value)> {
    if args.invitations {
        return crate::signal::plan_by_invitation(lookup, args.grant_secret.as_ref(), a, b, retry)
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
}

/// Every lab client's NAT profile, measured once against `cdx` (a NAT does
/// not change between pairs), by namespace.
fn lab_profiles(
    cdx: SocketAddr,
    cdx6: SocketAddr,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let cdx6 = cdx6.to_string();
    std::thread::scope(|s| {
        let handles: Vec<_> = TYPES
            .iter()
            .flat_map(|t| [format!("nx-c-{t}"), format!("nx-c-{t}-2")])
            .map(|ns| {
                let cdx6 = &cdx6;
                s.spawn(move || {
                    let p = peer_json(&ns, cdx, &["--profile-only", "--ipv6-cdx", cdx6], None);
                    (ns, p)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// `natlab hard`: every ordered pair whose plan is not the classic punch
/// (birthday, prediction), `--attempts` attempts each, no retry — how often
/// the direct path is confirmed, the time to it, the time to the first
/// packet on any path (the raced relay's included) and probes sent.
fn hard(args: &NatlabArgs, lookup: &str) -> anyhow::Result<serde_json::Value> {
    let lookup = resolve_lookup(lookup)?;
    let cdx = *args.cdx.first().context("--cdx is empty")?;
    let profiles = lab_profiles(cdx, args.cdx6);
    let pairs: Vec<(&str, &str, &str)> = TYPES
        .iter()
        .flat_map(|a| TYPES.iter().map(move |b| (*a, *b)))
        .filter_map(|(a, b)| match technique(a, b) {
            Some(t) if t != "classic" => Some((a, b, t)),
            _ => None,
        })
        .collect();
    // Waves in which no client namespace takes part twice.
    let mut waves: Vec<Vec<(&str, &str, &str)>> = Vec::new();
    for p in &pairs {
        let clash = |w: &Vec<(&str, &str, &str)>| w.iter().any(|q| q.0 == p.0 || q.1 == p.1);
        match waves.iter_mut().find(|w| !clash(w)) {
            Some(w) => w.push(*p),
            None => waves.push(vec![*p]),
        }
    }
    let mut tallies: std::collections::BTreeMap<(&str, &str), Vec<serde_json::Value>> =
        Default::default();
    for _ in 0..args.attempts {
        for wave in &waves {
            let done: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = wave
                    .iter()
                    .map(|(a, b, _)| {
                        let (na, nb) = (format!("nx-c-{a}"), format!("nx-c-{b}-2"));
                        let (pa, pb) = (&profiles[&na], &profiles[&nb]);
                        s.spawn(move || {
                            let r = match lookup_plan(args, lookup, pa, pb, false) {
                                Ok((200, p)) => {
                                    let reports = run_plan(&p, [&na, &nb], cdx);
                                    // Direct on both sides (a raced plan
                                    // may also connect through the relay).
                                    serde_json::json!({
                                        "ok": reports.iter().all(|r| r["direct"] == true),
                                        "setup_ms": crate::e2e::slowest(&reports, "direct_ms"),
                                        "first_packet_ms": crate::e2e::slowest(&reports, "first_packet_ms"),
                                        "probes": reports.iter().map(|r| r["probes"].as_u64().or_else(|| probes_in(&r["error"])).unwrap_or(0)).sum::<u64>(),
                                        "peers": reports,
                                    })
                                }
                                other => serde_json::json!({"ok": false, "error": format!("no plan: {other:?}")}),
                            };
                            ((*a, *b), r)
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            for (k, r) in done {
                tallies.entry(k).or_default().push(r);
            }
        }
    }
    let mut rows = Vec::new();
    println!(
        "{:<22} {:<22} {:<10} {:>8} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "a", "b", "technique", "direct", "p50 ms", "p90 ms", "max ms", "first p50", "probes max"
    );
    for (a, b, t) in &pairs {
        let runs = tallies.get(&(*a, *b)).map(Vec::as_slice).unwrap_or(&[]);
        let ok = runs.iter().filter(|r| r["ok"] == true).count();
        let mut setup: Vec<f64> = runs
            .iter()
            .filter(|r| r["ok"] == true)
            .filter_map(|r| r["setup_ms"].as_f64())
            .collect();
        setup.sort_by(f64::total_cmp);
        let pct = |q: f64| quantile(&setup, q);
        let probes_max = runs.iter().filter_map(|r| r["probes"].as_u64()).max();
        let rate = ok as f64 / runs.len().max(1) as f64;
        // The first packet on any path, over every attempt that connected.
        let mut first: Vec<f64> = runs
            .iter()
            .filter_map(|r| r["first_packet_ms"].as_f64())
            .collect();
        first.sort_by(f64::total_cmp);
        let first_p50 = quantile(&first, 0.5);
        println!(
            "{a:<22} {b:<22} {t:<10} {:>7.0}% {:>9.0} {:>9.0} {:>9.0} {:>11.0} {:>11}",
            rate * 100.0,
            pct(0.5).unwrap_or(f64::NAN),
            pct(0.9).unwrap_or(f64::NAN),
            pct(1.0).unwrap_or(f64::NAN),
            first_p50.unwrap_or(f64::NAN),
            probes_max.unwrap_or(0)
        );
        rows.push(serde_json::json!({
            "a": a, "b": b, "technique": t,
            "attempts": runs.len(), "succeeded": ok, "success_rate": rate,
            "first_packet_ms_p50": first_p50,
            "setup_ms_p50": pct(0.5), "setup_ms_p90": pct(0.9), "setup_ms_max": pct(1.0),
            "probes_max": probes_max,
            "runs": runs,
        }));
    }
    let worst = rows
        .iter()
        .filter_map(|r| r["success_rate"].as_f64())
        .fold(1.0_f64, f64::min);
    let mut doc = serde_json::json!({
        "scenario": "natlab-hard",
        "attempts": args.attempts,
        "lowest_success_rate": worst,
        "pairs": rows,
    });
    if args.check && worst < 0.9 {
        doc["failure"] = format!(
            "a hard pair went direct in only {:.0} % of attempts (aim: 90 %)",
            worst * 100.0
        )
        .into();
    }
    Ok(doc)
}

/// `natlab hold`: one pair (`--pair`, first in `nx-c-<a>`, second in
/// `nx-c-<b>-2`) planned by lookup and punched directly, then kept for
/// `--hold` with a keepalive every `--keepalive`; held when both sides'
/// last keepalive still got through. The lab's random-port symmetric NAT
/// forgets idle UDP mappings after 5 s: keepalives every 2 s hold its
/// sessions, every 8 s do not.
fn hold(args: &NatlabArgs, lookup: &str) -> anyhow::Result<serde_json::Value> {
    let lookup = resolve_lookup(lookup)?;
    let cdx = *args.cdx.first().context("--cdx is empty")?;
    let [a, b] = args.pair.as_slice() else {
        anyhow::bail!("--pair takes two lab types: A,B");
    };
    let (na, nb) = (format!("nx-c-{a}"), format!("nx-c-{b}-2"));
    let lifetime = args.lifetime.map(|l| format!("{}ms", l.as_millis()));
    let cdx6 = args.cdx6.to_string();
    let mut profile_args = vec!["--profile-only", "--ipv6-cdx", &cdx6];
    if let Some(l) = &lifetime {
        profile_args.extend(["--lifetime", l]);
    }
    let (pa, pb) = std::thread::scope(|s| {
        let pa = s.spawn(|| peer_json(&na, cdx, &profile_args, None));
        let pb = peer_json(&nb, cdx, &profile_args, None);
        (pa.join().unwrap_or_default(), pb)
    });
    let (status, plan) = lookup_plan(args, lookup, &pa, &pb, args.relayed)?;
    if status != 200 || (plan["mode"] == "direct") == args.relayed {
        anyhow::bail!(
            "lookup planned no {} path for {a} / {b} ({status}): {plan}",
            if args.relayed { "relayed" } else { "direct" }
        );
    }
    let hold = format!("{}ms", args.hold.as_millis());
    let keepalive = args.keepalive.map(|k| format!("{}ms", k.as_millis()));
    let mut extra = vec!["--hold", &hold];
    if let Some(k) = &keepalive {
        extra.extend(["--keepalive", k]);
    }
    if args.recover {
        extra.push("--recover");
    }
    let reports = std::thread::scope(|s| {
        if let Some(after) = args.move_after {
            // The punch takes a moment: count from about when it is done.
            s.spawn(move || {
                std::thread::sleep(after + std::time::Duration::from_millis(1500));
                if let Err(e) = script("mobile", &["cell"]) {
                    eprintln!("natlab: moving nx-c-mobile failed: {e:#}");
                }
            });
        }
        if let Some(after) = args.cut_after {
            let cut_for = args.cut_for;
            s.spawn(move || {
                std::thread::sleep(after + std::time::Duration::from_millis(1500));
                if let Err(e) = script("cut", &["on"]) {
                    eprintln!("natlab: cutting the direct paths failed: {e:#}");
                }
                if let Some(d) = cut_for {
                    std::thread::sleep(d);
                    if let Err(e) = script("cut", &["off"]) {
                        eprintln!("natlab: mending the direct paths failed: {e:#}");
                    }
                }
            });
        }
        run_plan_with(&plan, [&na, &nb], cdx, &extra)
    });
    if args.move_after.is_some() {
        script("mobile", &["wifi"])?;
    }
    if args.cut_after.is_some() {
        script("cut", &["off"])?;
    }
    let held = reports.iter().all(|r| r["held"]["held"] == true);
    let keepalive_ms = reports
        .iter()
        .filter_map(|r| r["keepalive_ms"].as_u64())
        .max()
        .unwrap_or(0);
    let path = if args.relayed { "relayed" } else { "direct" };
    let fallbacks: u64 = reports
        .iter()
        .map(|r| r["held"]["fallbacks"].as_u64().unwrap_or(0))
        .sum();
    let moved = if fallbacks == 0 {
        String::new()
    } else {
        let back: u64 = reports
            .iter()
            .map(|r| r["held"]["returns"].as_u64().unwrap_or(0))
            .sum();
        format!(" (the sides moved to the relay {fallbacks} times and back {back} times)")
    };
    println!(
        "{a} / {b}: the {path} path {} for {hold} with a keepalive every {keepalive_ms} ms{moved}",
        if held { "held" } else { "did not hold" }
    );
    Ok(serde_json::json!({
        "scenario": "natlab-hold",
        "a": a, "b": b,
        "technique": plan["a"]["punch"]["technique"],
        "hold_ms": args.hold.as_millis() as u64,
        "keepalive_ms": keepalive_ms,
        "planned_keepalive_ms": plan["a"]["punch"]["keepalive_ms"],
        "profiles": [pa, pb],
        "moved": args.move_after.is_some(),
        "mode": plan["mode"],
        "relayed": [plan["a"]["relayed"] == true, plan["b"]["relayed"] == true],
        "held": held,
        "recoveries": reports.iter().map(|r| r["held"]["recoveries"].as_u64().unwrap_or(0)).sum::<u64>(),
        "cut": args.cut_after.is_some(),
        "fallbacks": reports.iter().map(|r| r["held"]["fallbacks"].as_u64().unwrap_or(0)).collect::<Vec<_>>(),
        "returns": reports.iter().map(|r| r["held"]["returns"].as_u64().unwrap_or(0)).collect::<Vec<_>>(),
        "on_relay": reports.iter().map(|r| r["held"]["on_relay"] == true).collect::<Vec<_>>(),
        "outage_ms": reports.iter().filter_map(|r| r["held"]["outage_ms"].as_f64()).fold(0.0_f64, f64::max),
        "peers": reports,
    }))
}

/// `--lookup`'s address (names are resolved).
fn resolve_lookup(lookup: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    lookup
        .to_socket_addrs()?
        .next()
        .context("--lookup resolves to nothing")
}

/// The `q` quantile (0–1, nearest rank) of `sorted`, `None` when empty.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last as f64 * q).round() as usize])
}

/// The probe count a failed punch's error names ("… (N probes sent)").
fn probes_in(error: &serde_json::Value) -> Option<u64> {
    let e = error.as_str()?;
    let (head, _) = e.rsplit_once(" probes sent)")?;
    head.rsplit_once('(')?.1.parse().ok()
}

/// The matrix through lookup: profiles, plans, direct or relayed.
fn matrix_with_lookup(args: &NatlabArgs, lookup: &str) -> anyhow::Result<serde_json::Value> {
    let lookup = resolve_lookup(lookup)?;
    let cdx = *args.cdx.first().context("--cdx is empty")?;
    let plan = |a: &serde_json::Value, b: &serde_json::Value, retry: bool| {
        lookup_plan(args, lookup, a, b, retry)
    };
    let profiles = lab_profiles(cdx, args.cdx6);
    // In waves, so that each NAT carries one session at a time: pairs of
    // one wave have distinct first and distinct second clients (wave d holds
    // the pairs d types apart). Port prediction assumes no other new
    // mappings on the NAT while it punches, as with one call behind a home
    // NAT; concurrent sessions through a sequential NAT shift its ports.
    let index = |t: &str| TYPES.iter().position(|x| *x == t).unwrap_or(0);
    let mut results: Vec<serde_json::Value> = Vec::new();
    for wave in 0..TYPES.len() {
        let pairs: Vec<_> = unordered_pairs()
            .into_iter()
            .filter(|(a, b)| index(b) - index(a) == wave)
            .collect();
        let done: Vec<serde_json::Value> = std::thread::scope(|s| {
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
                        let (_, reported) = crate::e2e::report_outcome(
                            lookup,
                            args.api_key.as_deref(),
                            &p,
                            &reports[0],
                            &reports[1],
                        );
                        let mode = p["mode"].as_str().unwrap_or("?").to_owned();
                        let setup = crate::e2e::slowest(&reports, "first_packet_ms");
                        let direct_ms = reports
                            .iter()
                            .map(|r| r["direct_ms"].as_f64())
                            .try_fold(0.0_f64, |m, v| v.map(|v| m.max(v)));
                        attempts.push(serde_json::json!({"retry": retry, "mode": mode, "ok": ok, "setup_ms": setup, "direct_ms": direct_ms, "outcome_reported": reported, "peers": reports}));
                        if ok {
                            // A raced direct plan may end on the relay.
                            let direct = reports.iter().all(|r| r["direct"] == true);
                            outcome = if mode == "direct" && direct { "direct" } else { "relayed" };
                            break;
                        }
                        if mode != "direct" {
                            break;
                        }
                    }
                    let setup = attempts.last().and_then(|a| a["setup_ms"].as_f64());
                    let direct_ms = attempts.last().and_then(|a| a["direct_ms"].as_f64());
                    serde_json::json!({
                        "a": a, "b": b,
                        "outcome": outcome,
                        "expected": if technique(a, b).is_some() { "direct" } else { "relayed" },
                        "technique": technique(a, b),
                        "probes": attempts.last().and_then(|a| {
                            a["peers"].as_array().map(|p| p.iter().filter_map(|r| r["probes"].as_u64()).sum::<u64>())
                        }),
                        "time_to_first_packet_ms": setup,
                        "time_to_direct_ms": direct_ms,
                        "attempts": attempts,
                    })
                })
            })
            .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        results.extend(done);
    }
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
    // Time to the first packet by how the pair connected: classic punches,
    // the hard ones (racing their relay) and relayed pairs.
    let group = |r: &serde_json::Value| match (r["outcome"].as_str(), r["technique"].as_str()) {
        (Some("direct"), Some("classic")) => Some("classic"),
        (Some("direct"), Some(_)) => Some("hard"),
        (Some("relayed"), _) => Some("relayed"),
        _ => None,
    };
    let mut first_packet = serde_json::Map::new();
    for g in ["classic", "hard", "relayed"] {
        let mut ms: Vec<f64> = results
            .iter()
            .filter(|r| group(r) == Some(g))
            .filter_map(|r| r["time_to_first_packet_ms"].as_f64())
            .collect();
        ms.sort_by(f64::total_cmp);
        let (Some(p50), Some(p90), Some(max)) =
            (quantile(&ms, 0.5), quantile(&ms, 0.9), quantile(&ms, 1.0))
        else {
            continue;
        };
        println!(
            "  first packet, {g:<8} {:>3} pairs: p50 {:>5.0} ms, p90 {:>5.0} ms, max {:>5.0} ms",
            ms.len(),
            p50,
            p90,
            max
        );
        first_packet.insert(
            g.into(),
            serde_json::json!({"pairs": ms.len(), "p50": p50, "p90": p90, "max": max}),
        );
    }
    let mut doc = serde_json::json!({
        "scenario": "natlab",
        "lookup": lookup.to_string(),
        "first_packet_ms": first_packet,
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
        SEQUENTIAL => "sym-seq",
        PRESERVING => "sym-pres",
        SHARED => "shared",
        CGNAT => "cgnat",
        DUAL => "dual",
        NAT64 => "nat64",
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
            "classes": [class_of(a).map(NatClass::name), class_of(b).map(NatClass::name)],
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

/// `--lookup`, which `action` plans through.
fn planner<'a>(args: &'a NatlabArgs, action: &str) -> anyhow::Result<&'a str> {
    args.lookup
        .as_deref()
        .with_context(|| format!("natlab {action} plans through lookup: give --lookup"))
}

/// `natlab <action>`.
pub(crate) fn run(args: &NatlabArgs) -> anyhow::Result<Option<serde_json::Value>> {
    match args.action.as_str() {
        "matrix" => matrix(args).map(Some),
        "hold" => hold(args, planner(args, "hold")?).map(Some),
        "hard" => hard(args, planner(args, "hard")?).map(Some),
        "cut" | "mend" => {
            let on = args.action == "cut";
            script("cut", &[if on { "on" } else { "off" }])?;
            println!(
                "NAT lab: direct paths between clients {}",
                if on {
                    "cut (CDX and the relay stay reachable)"
                } else {
                    "mended"
                }
            );
            Ok(None)
        }
        "loss" => {
            script("loss", &[&args.percent.to_string()])?;
            println!(
                "NAT lab: {} % of the packets crossing its internet are dropped",
                args.percent
            );
            Ok(None)
        }
        action => {
            script(action, &[])?;
            if action == "up" {
                println!(
                    "NAT lab up: CDX addresses 203.0.113.1 and 203.0.113.2 in namespace nx-pub; two clients per type in nx-c-<type> and nx-c-<type>-2 for {}",
                    TYPES.join(", ")
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
        let ordered = |f: &dyn Fn(&str, &str) -> bool| {
            TYPES
                .iter()
                .flat_map(|a| TYPES.iter().map(move |b| (*a, *b)))
                .filter(|(a, b)| f(a, b))
                .count()
        };
        // The classic rule (over IPv4): 11 types that can send UDP → 121
        // ordered pairs, minus the 4 symmetric ones (the dual-stack client's
        // IPv4 NAT among them) with each other (16) and with the 4
        // port-restricted ones (the IPv6-only client's NAT64 among them; 32
        // orders).
        assert_eq!(ordered(&feasible), 73);
        assert!(feasible("symmetric", "restricted-cone"));
        assert!(feasible("symmetric", "open"));
        assert!(!feasible("port-restricted-cone", "symmetric"));
        assert!(!feasible("open", "udp-blocked"));
        // With port allocation and IPv6, of the 121 orders of UDP types
        // only random ports against another symmetric NAT stay relayed: 5
        // orders, and 6 more for the dual-stack client's random-port IPv4
        // NAT (its IPv6 meets only the IPv6 clients').
        assert_eq!(ordered(&|a, b| technique(a, b).is_some()), 110);
        assert_eq!(technique(DUAL, DUAL), Some("classic"));
        assert_eq!(technique(DUAL, NAT64), Some("classic"));
        assert_eq!(technique(DUAL, "symmetric"), None);
        assert_eq!(technique(DUAL, "port-restricted-cone"), Some("birthday"));
        assert_eq!(technique(NAT64, "symmetric"), Some("birthday"));
        assert_eq!(technique(NAT64, SEQUENTIAL), Some("predicted"));
        assert_eq!(
            technique("symmetric", "port-restricted-cone"),
            Some("birthday")
        );
        assert_eq!(technique(SEQUENTIAL, SEQUENTIAL), Some("predicted"));
        assert_eq!(
            technique(PRESERVING, "port-restricted-cone"),
            Some("predicted")
        );
        assert_eq!(technique("symmetric", SEQUENTIAL), None);
        assert_eq!(class_of(PRESERVING), Some(NatClass::Symmetric));
        assert_eq!(technique(CGNAT, "symmetric"), Some("birthday"));
        assert_eq!(technique(SHARED, SHARED), Some("classic"));
        assert_eq!(unordered_pairs().len(), 78);
    }
}

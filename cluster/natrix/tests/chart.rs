//! The Helm chart (`helm/natrix`), checked with the real tools: Helm v4's
//! strict lint, every rendering validated against the Kubernetes schemas
//! offline (kubernetes-validate), every rendered natrix command line
//! accepted by the binary, the alert rules by promtool, every metric the
//! alerts and the dashboard name present in natrix's catalogue, and a real
//! Prometheus scraping `natrix up` with the chart's rules loaded.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Natrix, Spawned, http_get, tool};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../helm/natrix")
}

/// The default values and every `ci/*-values.yaml`.
fn value_sets() -> Vec<Option<PathBuf>> {
    let mut sets = vec![None];
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    sets.extend(files.into_iter().map(Some));
    sets
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn helm(args: &[&str], values: &Option<PathBuf>) -> (bool, String) {
    let mut c = Command::new(tool("helm"));
    c.args(args);
    if let Some(v) = values {
        c.arg("-f").arg(v);
    }
    run(&mut c)
}

#[test]
fn every_rendering_lints_validates_and_runs_as_natrix_command_lines() {
    let chart = chart();
    let chart_arg = chart.to_str().unwrap();
    for values in value_sets() {
        let label = values
            .as_ref()
            .map_or("default values".to_owned(), |v| v.display().to_string());
        let (ok, text) = helm(&["lint", "--strict", chart_arg], &values);
        assert!(ok, "helm lint --strict ({label}):\n{text}");

        let out = Command::new(tool("helm"))
            .args([
                "template",
                "natrix-test",
                chart_arg,
                "--namespace",
                "natrix",
            ])
            .args(values.iter().flat_map(|v| ["-f".as_ref(), v.as_os_str()]))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm template ({label}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        let file = std::env::temp_dir().join(format!("natrix-chart-{}.yaml", std::process::id()));
        std::fs::write(&file, &rendered).unwrap();
        for version in ["1.29.0", "1.33.0"] {
            let (ok, text) = run(Command::new(tool("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file));
            assert!(ok, "kubernetes-validate {version} ({label}):\n{text}");
        }
        let _ = std::fs::remove_file(&file);

        let mut roles = BTreeSet::new();
        for doc in serde_yaml::Deserializer::from_str(&rendered) {
            let doc = serde_yaml::Value::deserialize(doc).unwrap();
            check_workload(&doc, &label, &mut roles);
        }
        assert!(!roles.is_empty(), "no natrix container rendered ({label})");
    }
}

use serde::Deserialize as _;

/// Security defaults, probes, and the command line of each natrix
/// container, which the binary itself must accept.
fn check_workload(doc: &serde_yaml::Value, label: &str, roles: &mut BTreeSet<String>) {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let spec = match kind {
        "Deployment" | "DaemonSet" | "StatefulSet" => &doc["spec"]["template"]["spec"],
        "Pod" => &doc["spec"],
        _ => return,
    };
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let containers = spec["containers"]
        .as_sequence()
        .into_iter()
        .chain(spec["initContainers"].as_sequence())
        .flatten();
    for c in containers {
        let image = c["image"].as_str().unwrap_or_default();
        assert!(
            !image.ends_with(":latest") && image.contains(':'),
            "{name}: image {image} ({label})"
        );
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name} ({label})"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false)
        );
        if !image.starts_with("natrix:") {
            continue;
        }
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}"
        );
        let args: Vec<String> = c["args"]
            .as_sequence()
            .map(|s| s.iter().map(|a| a.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        let Some(role) = args
            .first()
            .filter(|r| ["relay", "cdx", "lookup"].contains(&r.as_str()))
        else {
            continue;
        };
        roles.insert(role.clone());
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/readyz"),
            "{name}"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"].as_str(),
            Some("/healthz"),
            "{name}"
        );
        if role == "relay" {
            let drain: u64 = args
                .iter()
                .find_map(|a| a.strip_prefix("--drain-timeout="))
                .and_then(|d| d.trim_end_matches('s').parse().ok())
                .expect("the relay gets --drain-timeout");
            assert_eq!(
                spec["terminationGracePeriodSeconds"].as_u64(),
                Some(drain + 15),
                "the grace period covers the drain ({label})"
            );
        }
        // Kubernetes expands $(VAR) from the environment; any address will
        // do for parsing.
        let concrete: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("$(POD_IP)", "192.0.2.10")
                    .replace("$(HOST_IP)", "192.0.2.10")
            })
            .collect();
        let (ok, text) = run(Command::new(env!("CARGO_BIN_EXE_natrix"))
            .args(&concrete)
            .arg("--help")
            .stdout(Stdio::null()));
        assert!(
            ok,
            "natrix refuses the {name} command line {concrete:?} ({label}):\n{text}"
        );
    }
}

/// Every `--flag` in `natrix <args> --help`.
fn flags(args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_natrix"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .and_then(|r| r.split_once(", ").map(|(_, r)| r))
                .unwrap_or(l);
            l.strip_prefix("--")
                .map(|r| r.split([' ', '=', '<']).next().unwrap().to_owned())
        })
        .filter(|f| f != "help" && f != "version")
        .collect()
}

#[test]
fn values_name_every_flag_of_every_role_one_to_one() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let keys = |v: &serde_yaml::Value| -> BTreeSet<String> {
        v.as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    // Set by the chart itself: secrets come from a Secret, the metrics port
    // and the drain time from their own values, TLS files from the mount;
    // the chart passes flags, not a config file.
    let managed: BTreeSet<String> = [
        "config",
        "auth-secret",
        "cluster-secret",
        "api-key",
        "grant-secret",
        "vapid-key",
        "push-webhook-secret",
        "redis-url",
        "metrics-listen",
        "health-listen",
        "drain-timeout",
        "tls-cert",
        "tls-key",
        "admin-token",
    ]
    .map(String::from)
    .into();
    // The global flags are the ones every serving role has.
    let (relay, cdx) = (flags(&["relay"]), flags(&["cdx"]));
    let global: BTreeSet<String> = flags(&["lookup"])
        .into_iter()
        .filter(|f| relay.contains(f) && cdx.contains(f))
        .collect();
    let want_global: BTreeSet<String> = global.difference(&managed).cloned().collect();
    assert_eq!(
        keys(&values["global"]),
        want_global,
        "values.global vs the global flags"
    );
    for role in ["relay", "cdx", "lookup"] {
        let own: BTreeSet<String> = flags(&[role])
            .difference(&global)
            .filter(|f| !managed.contains(*f))
            .cloned()
            .collect();
        assert_eq!(
            keys(&values[role]["config"]),
            own,
            "values.{role}.config vs `natrix {role} --help`"
        );
    }
}

/// Metric names (with their role prefixes) in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Inside a multi-byte character (the dashboard's arrows): no name.
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let start_ok = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if start_ok {
            for prefix in ["natrix_", "relay_", "cdx_", "lookup_", "cluster_"] {
                if text[i..].starts_with(prefix) {
                    let end = text[i..]
                        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                        .map_or(text.len(), |e| i + e);
                    let mut name = text[i..end].to_owned();
                    for suffix in ["_bucket", "_sum", "_count"] {
                        if let Some(base) = name.strip_suffix(suffix)
                            && natrix_telemetry::catalogue::find(base).is_some()
                        {
                            name = base.to_owned();
                        }
                    }
                    names.insert(name);
                    i = end;
                    break;
                }
            }
        }
        i += 1;
    }
    names
}

#[test]
fn alerts_pass_promtool_and_alerts_and_dashboard_name_only_real_metrics() {
    let alerts = chart().join("files/alerts.yaml");
    let (ok, text) = run(Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&alerts));
    assert!(ok, "promtool check rules:\n{text}");
    let alert_text = std::fs::read_to_string(&alerts).unwrap();
    let dashboard = std::fs::read_to_string(chart().join("files/dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    for (what, text) in [("alerts", &alert_text), ("dashboard", &dashboard)] {
        let names = metric_names(text);
        assert!(!names.is_empty(), "{what} names no metric");
        for n in &names {
            assert!(
                natrix_telemetry::catalogue::find(n).is_some(),
                "{what} uses {n}, which natrix does not export (renamed?)"
            );
        }
    }
    // What operators look for on the dashboard.
    for needed in [
        "relay_allocations",
        "relay_forwarded_bytes_total",
        "relay_packets_dropped_total",
        "cdx_nat_profiles_total",
        "lookup_plans_total",
        "lookup_plan_duration_seconds",
        "cluster_registry_heartbeats_total",
    ] {
        assert!(
            metric_names(&dashboard).contains(needed),
            "dashboard lacks {needed}"
        );
    }
}

#[test]
fn a_real_prometheus_scrapes_natrix_and_loads_the_chart_rules() {
    let natrix = Natrix::up(&[]);
    let dir = std::env::temp_dir().join(format!("natrix-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let alerts = chart().join("files/alerts.yaml").canonicalize().unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: natrix\n    static_configs:\n      - targets: ['{}']\n        labels:\n          component: relay\n",
            alerts.display(),
            natrix.metrics
        ),
    )
    .unwrap();
    let port = common::free_port();
    let web = format!("127.0.0.1:{port}");
    let _prometheus = Spawned(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = web.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = loop {
        if let Ok((200, body)) = http_get(addr, "/api/v1/query?query=relay_allocations") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had relay_allocations"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(query["status"], "success");
    assert_eq!(query["data"]["result"][0]["metric"]["component"], "relay");
    // Every rule loaded and evaluated without error.
    let alerts = std::fs::read_to_string(chart().join("files/alerts.yaml"))
        .unwrap()
        .matches("- alert:")
        .count();
    loop {
        let (_, body) = http_get(addr, "/api/v1/rules").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        if rules.len() == alerts && rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "rules not all healthy: {body}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default rendering is locked down: the bundled Redis requires a
/// generated password and keeps an append-only file; natrix reaches it with
/// that password; metrics and health bind the pod's IP, never 0.0.0.0;
/// probes use the health port; NetworkPolicies are on and open only the
/// client ports and relay range (no allow-everything rule); the cluster's
/// CIDRs join the relay's deny-list.
#[test]
fn the_default_rendering_is_locked_down() {
    let chart = chart();
    let (ok, text) = helm(
        &[
            "template",
            "t",
            chart.to_str().unwrap(),
            "--set",
            "relay.clusterCIDRs={100.64.0.0/16,fd00:10::/48}",
            "--set",
            "networkPolicy.nodeCIDRs={10.0.0.0/16}",
        ],
        &None,
    );
    assert!(ok, "{text}");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &serde_yaml::Value| !d.is_null())
        .collect();
    let find = |kind: &str, suffix: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(suffix))
            })
            .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
    };
    let secret = find("Secret", "-secrets");
    assert!(secret["data"]["redis-password"].is_string(), "{secret:?}");
    let redis = &find("Deployment", "-redis")["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = redis["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--requirepass", "$(REDIS_PASSWORD)"]),
        "{args:?}"
    );
    assert!(
        args.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "{args:?}"
    );
    for role in ["-relay", "-cdx", "-lookup"] {
        let spec = docs
            .iter()
            .find(|d| {
                ["Deployment", "DaemonSet", "StatefulSet"]
                    .contains(&d["kind"].as_str().unwrap_or(""))
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(role))
            })
            .unwrap_or_else(|| panic!("no workload {role}"));
        let c = &spec["spec"]["template"]["spec"]["containers"][0];
        let text = serde_yaml::to_string(c).unwrap();
        assert!(
            !text.contains("0.0.0.0:9090"),
            "{role}: metrics on every interface"
        );
        assert!(
            text.contains("--metrics-listen=$(POD_IP):9090"),
            "{role}: {text}"
        );
        assert!(text.contains("--health-listen=$(POD_IP):9091"), "{role}");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "health", "{role}");
        assert!(
            text.contains("redis://:$(NATRIX_REDIS_PASSWORD)@"),
            "{role}: {text}"
        );
        if role == "-relay" {
            assert!(
                text.contains("--peer-deny=100.64.0.0/16,fd00:10::/48"),
                "{role}: {text}"
            );
        }
    }
    let policies: Vec<&serde_yaml::Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 4, "relay, cdx, lookup and redis policies");
    for p in &policies {
        for rule in p["spec"]["ingress"].as_sequence().unwrap() {
            assert!(
                rule.as_mapping().is_some_and(|m| !m.is_empty()),
                "an allow-everything rule in {:?}",
                p["metadata"]["name"]
            );
        }
    }
    let relay_policy = serde_yaml::to_string(find("NetworkPolicy", "-relay")).unwrap();
    assert!(relay_policy.contains("endPort: 65535"), "{relay_policy}");
    let redis_policy = serde_yaml::to_string(find("NetworkPolicy", "-redis")).unwrap();
    assert!(redis_policy.contains("10.0.0.0/16"), "{redis_policy}");
}

/// `relay.config.xdp` renders the flag, and the relay container as root
/// with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and nothing else; without
/// hostNetwork the chart refuses (XDP attaches to the node's interfaces).
#[test]
fn the_xdp_fast_path_gets_the_capabilities_it_needs_and_no_more() {
    let chart = chart();
    let values = Some(chart.join("ci/xdp-values.yaml"));
    let (ok, text) = helm(&["template", "t", chart.to_str().unwrap()], &values);
    assert!(ok, "{text}");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &serde_yaml::Value| !d.is_null())
        .collect();
    let relay = docs
        .iter()
        .find(|d| {
            ["Deployment", "DaemonSet"].contains(&d["kind"].as_str().unwrap_or(""))
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-relay"))
        })
        .expect("a relay workload");
    let pod = &relay["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    let args = serde_yaml::to_string(&c["args"]).unwrap();
    assert!(args.contains("--xdp=eth0"), "{args}");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], 0, "{sc:?}");
    assert_eq!(
        serde_yaml::to_string(&sc["capabilities"]).unwrap(),
        "drop:\n- ALL\nadd:\n- BPF\n- NET_ADMIN\n- PERFMON\n"
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    let (ok, text) = helm(
        &[
            "template",
            "t",
            chart.to_str().unwrap(),
            "--set",
            "relay.hostNetwork=false",
        ],
        &values,
    );
    assert!(!ok && text.contains("needs relay.hostNetwork"), "{text}");
}

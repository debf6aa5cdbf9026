//! The NAT lab end to end: real Linux NATs (nftables in network namespaces,
//! `loadtest/natlab/natlab.sh`), two CDX nodes with one IP each in sibling
//! mode, and `natrix probe` in a client behind every NAT type. coturn's
//! `turnutils_natdiscovery`, run in the same lab, must agree. Needs root
//! (CI has it).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Spawned, tool};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../loadtest/natlab/natlab.sh"
);

/// The lab, torn down when dropped (also after a failed assertion).
struct Lab;

impl Lab {
    fn up() -> Lab {
        tool("nft");
        tool("ip");
        let out = Command::new("bash")
            .args([SCRIPT, "up"])
            .output()
            .expect("running natlab.sh");
        assert!(
            out.status.success(),
            "natlab.sh up failed (root, iproute2 and nftables are needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash").args([SCRIPT, "down"]).status();
    }
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(tool("ip"));
    c.args(["netns", "exec", ns, program]).args(args);
    c
}

fn cdx_node(ip: &str, sibling: &str) -> Spawned {
    Spawned(
        in_ns(
            "nx-pub",
            env!("CARGO_BIN_EXE_natrix"),
            &[
                "cdx",
                "--stun-listen",
                &format!("{ip}:3478"),
                "--stun-alternate-port",
                "3479",
                "--stun-sibling",
                sibling,
                "--cluster-secret",
                "natlab-cluster-secret",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting a CDX node in the lab"),
    )
}

fn probe(client_ns: &str) -> serde_json::Value {
    let out = in_ns(
        client_ns,
        env!("CARGO_BIN_EXE_natrix"),
        &["probe", "--json", "203.0.113.1"],
    )
    .output()
    .expect("running natrix probe in the lab");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "probe in {client_ns} printed no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn natdiscovery(client_ns: &str) -> String {
    let out = in_ns(
        client_ns,
        &tool("turnutils_natdiscovery"),
        &["-m", "-f", "203.0.113.1"],
    )
    .output()
    .expect("running turnutils_natdiscovery in the lab");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn probe_classifies_every_nat_type_like_coturn_does() {
    let _lab = Lab::up();
    let _a = cdx_node("203.0.113.1", "203.0.113.2");
    let _b = cdx_node("203.0.113.2", "203.0.113.1");
    // Ready when the open client gets an answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe("nx-c-open")["class"] != "open" {
        assert!(
            Instant::now() < deadline,
            "the lab's CDX nodes never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // (namespace, class, mapping, filtering, what coturn prints)
    let cases = [
        ("nx-c-open", "open", "no-nat", "endpoint-independent", None),
        (
            "nx-c-full-cone",
            "full-cone",
            "endpoint-independent",
            "endpoint-independent",
            Some((
                "Endpoint Independent Mapping",
                "Endpoint Independent Filtering",
            )),
        ),
        (
            "nx-c-restricted-cone",
            "restricted-cone",
            "endpoint-independent",
            "address-dependent",
            Some((
                "Endpoint Independent Mapping",
                "Address Dependent Filtering",
            )),
        ),
        (
            "nx-c-port-restricted-cone",
            "port-restricted-cone",
            "endpoint-independent",
            "address-and-port-dependent",
            Some((
                "Endpoint Independent Mapping",
                "Address and Port Dependent Filtering",
            )),
        ),
        (
            "nx-c-symmetric",
            "symmetric",
            "address-and-port-dependent",
            "address-and-port-dependent",
            Some((
                "Address and Port Dependent Mapping",
                "Address and Port Dependent Filtering",
            )),
        ),
    ];
    for (ns, class, mapping, filtering, coturn) in cases {
        let started = Instant::now();
        let v = probe(ns);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{ns}: took {:?}",
            started.elapsed()
        );
        assert_eq!(v["class"], class, "{ns}: {v}");
        assert_eq!(v["mapping"], mapping, "{ns}: {v}");
        assert_eq!(v["filtering"], filtering, "{ns}: {v}");
        if let Some((m, f)) = coturn {
            let text = natdiscovery(ns);
            assert!(
                text.contains(&format!("NAT with {m}!")),
                "{ns}: coturn says:\n{text}"
            );
            assert!(
                text.contains(&format!("NAT with {f}!")),
                "{ns}: coturn says:\n{text}"
            );
        }
    }

    // UDP blocked: the probe says so and falls back to TCP.
    let v = probe("nx-c-udp-blocked");
    assert_eq!(v["class"], "udp-blocked", "{v}");
    assert_eq!(v["udp_blocked"], true, "{v}");
    assert!(v["tcp_mapped_address"].is_string(), "{v}");
}

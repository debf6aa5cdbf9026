//! A relay behind 1:1 NAT (a cloud VM: a private address, a public one
//! the provider's NAT maps to it) learns its public address from a CDX node
//! and advertises that — in network namespaces with a real nftables NAT:
//!
//! ```text
//!   pa-pub  (the internet: CDX 203.0.113.10, an echo peer 203.0.113.20,
//!            the client)      198.51.100.1/30
//!     │
//!   pa-nat  (1:1 NAT: 198.51.100.77 ⇄ 10.77.0.2)
//!     │
//!   pa-vm   (the relay on 10.77.0.2)
//! ```
//!
//! And a relay on an IPv6-only host (an IPv6-only Kubernetes node): a
//! namespace whose loopback has no IPv4 address.
//!
//! Needs root, iproute2 and nftables (the NAT lab's requirements).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::{InNs, PASSWORD, USER, sh, tool};

const NAMESPACES: [&str; 3] = ["pa-pub", "pa-nat", "pa-vm"];

/// The namespaces, removed when dropped.
struct Lab;

impl Lab {
    fn up() -> Lab {
        Lab::down();
        sh(r#"
ip netns add pa-pub; ip netns add pa-nat; ip netns add pa-vm
for n in pa-pub pa-nat pa-vm; do ip -n $n link set lo up; done
ip link add pa-wan netns pa-nat type veth peer name pa-up netns pa-pub
ip link add pa-lan netns pa-nat type veth peer name pa-eth netns pa-vm
ip -n pa-pub addr add 198.51.100.1/30 dev pa-up; ip -n pa-pub link set pa-up up
for a in 203.0.113.10 203.0.113.20; do ip -n pa-pub addr add $a/32 dev lo; done
ip -n pa-pub route add 198.51.100.77/32 via 198.51.100.2
ip -n pa-nat addr add 198.51.100.2/30 dev pa-wan; ip -n pa-nat link set pa-wan up
ip -n pa-nat addr add 10.77.0.1/24 dev pa-lan; ip -n pa-nat link set pa-lan up
ip -n pa-nat route add default via 198.51.100.1
ip netns exec pa-nat sysctl -qw net.ipv4.ip_forward=1
ip -n pa-vm addr add 10.77.0.2/24 dev pa-eth; ip -n pa-vm link set pa-eth up
ip -n pa-vm route add default via 10.77.0.1
ip netns exec pa-nat nft -f - <<'NFT'
table ip pa_nat {
  chain pre { type nat hook prerouting priority -100; ip daddr 198.51.100.77 dnat to 10.77.0.2; }
  chain post { type nat hook postrouting priority 100; ip saddr 10.77.0.2 oifname "pa-wan" snat to 198.51.100.77; }
}
NFT
"#);
        Lab
    }

    fn down() {
        common::delete_netns(&NAMESPACES);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        Lab::down();
    }
}

fn relay(extra: &[&str]) -> InNs {
    common::relay_in_ns(
        "pa-vm",
        ("10.77.0.2:3478", "10.77.0.2:9090"),
        "203.0.113.0/24",
        "1",
        extra,
    )
}

#[test]
fn a_relay_behind_one_to_one_nat_learns_and_advertises_its_public_address() {
    let _lab = Lab::up();
    let mut cdx = InNs::spawn(
        "pa-pub",
        env!("CARGO_BIN_EXE_natrix"),
        &[
            "cdx",
            "--stun-listen",
            "203.0.113.10:3478",
            "--metrics-listen",
            "203.0.113.10:9090",
            "--log-format",
            "json",
        ],
    );
    assert!(cdx.wait_for("CDX serving STUN"), "{}", cdx.log());
    let _peer = InNs::spawn(
        "pa-pub",
        &tool("turnutils_peer"),
        &["-p", "3480", "-L", "203.0.113.20"],
    );

    // Its own address is private: it asks the CDX node and advertises
    // what the node saw, the NAT's public address.
    let mut natrix = relay(&["--stun-server", "203.0.113.10:3478"]);
    assert!(
        natrix.wait_for("relay role serving TURN"),
        "{}",
        natrix.log()
    );
    let learnt = natrix
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "public address learnt from the CDX nodes")
        .unwrap_or_else(|| panic!("{}", natrix.log()));
    assert_eq!(learnt["ip"], "198.51.100.77", "{learnt}");
    assert_eq!(learnt["private"], "10.77.0.2", "{learnt}");

    // coturn's client on the internet relays through it: the peer sends to
    // the advertised relayed address, which the NAT maps to the relay.
    let out = Command::new("ip")
        .args(["netns", "exec", "pa-pub", &tool("turnutils_uclient")])
        .args(["-p", "3478", "-u", USER, "-w", PASSWORD])
        .args(["-e", "203.0.113.20", "-r", "3480", "-n", "20", "-m", "1"])
        .arg("198.51.100.77")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("tot_send_msgs=40, tot_recv_msgs=40"),
        "through the public address:\n{text}"
    );
    drop(natrix);

    // No CDX node answers: it refuses to start, saying what to give.
    let mut lost = relay(&["--stun-server", "203.0.113.99:3478"]);
    assert!(!lost.wait_for("relay role serving TURN"));
    let log = lost.log();
    assert!(
        log.contains("is private and no CDX node answered") && log.contains("--external-ip"),
        "{log}"
    );
    // None known at all: the same, at once.
    let mut unknown = relay(&[]);
    assert!(!unknown.wait_for("relay role serving TURN"));
    assert!(
        unknown.log().contains("no CDX node is known"),
        "{}",
        unknown.log()
    );

    // Given --external-ip, it asks nobody.
    let mut given = relay(&["--external-ip", "10.77.0.2"]);
    assert!(given.wait_for("relay role serving TURN"), "{}", given.log());
    assert!(
        !given.log().contains("public address learnt"),
        "{}",
        given.log()
    );
}

/// An IPv6-only host: the relay starts without any IPv4 address, and
/// coturn's client — over IPv6, naming no address family — gets an IPv6
/// relayed address (a relay without IPv4 gives IPv6 whatever
/// --allocation-default-family says) and reaches an IPv6 peer without
/// loss.
#[test]
fn an_ipv6_only_relay_serves_clients_that_name_no_family() {
    const NS: &str = "v6-only";
    sh("ip netns del v6-only 2>/dev/null || true
ip netns add v6-only
ip -n v6-only link set lo up
ip -n v6-only addr del 127.0.0.1/8 dev lo");
    let _ns = common::Netns(NS);
    let user = format!("{USER}:{PASSWORD}");
    let mut natrix = InNs::spawn(
        NS,
        env!("CARGO_BIN_EXE_natrix"),
        &[
            "relay",
            "--turn-listen",
            "[::1]:3478",
            "--relay-ipv6",
            "::1",
            "--user",
            &user,
            "--realm",
            "natrix.test",
            "--peer-allow",
            "::1",
            "--metrics-listen",
            "[::1]:9090",
            "--log-format",
            "json",
            "--workers",
            "1",
        ],
    );
    assert!(
        natrix.wait_for("relay role serving TURN"),
        "{}",
        natrix.log()
    );
    let _peer = InNs::spawn(NS, &tool("turnutils_peer"), &["-p", "3480", "-L", "::1"]);
    std::thread::sleep(Duration::from_millis(200));
    let base = [
        "-p", "3478", "-u", USER, "-w", PASSWORD, "-e", "::1", "-r", "3480", "-n", "20", "-m", "1",
        "-c",
    ];
    // -v: the client prints the relayed address it got.
    let report = common::uclient_in(NS, &[&base[..], &["-v", "::1"]].concat());
    assert_eq!(
        (report.sent, report.received, report.lost),
        (20, 20, 0),
        "{}",
        report.output
    );
    assert!(
        report.output.contains("IPv6. Received relay addr"),
        "{}",
        report.output
    );
}

//! The XDP fast path (`--xdp`) in a lab of network namespaces, with real
//! packets from a client nobody here wrote:
//!
//! ```text
//!   xg (coturn's client, 10.201.1.2) ─ veth ─ xr (the relay: 10.201.1.1,
//!   10.201.2.1; XDP on both ends) ─ veth ─ xp (an echo peer, 10.201.2.2)
//! ```
//!
//! Needs root, iproute2 and a natrix built with its XDP program (clang and
//! libbpf-dev at build time, installed by `.ci/install-deps`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{InNs, PASSWORD, USER, sh, tool};

const NAMESPACES: [&str; 3] = ["xg", "xr", "xp"];

/// The tests share the namespaces: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The namespaces, removed when dropped.
struct Lab {
    dir: std::path::PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Lab {
    fn up() -> Lab {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Lab::down();
        sh(r#"
ip netns add xg; ip netns add xr; ip netns add xp
for n in xg xr xp; do ip -n $n link set lo up; done
ip link add xg0 netns xg type veth peer name xr0 netns xr
ip link add xp0 netns xp type veth peer name xr1 netns xr
ip -n xg addr add 10.201.1.2/24 dev xg0; ip -n xg link set xg0 up
ip -n xg route add default via 10.201.1.1
ip -n xr addr add 10.201.1.1/24 dev xr0; ip -n xr link set xr0 up
ip -n xr addr add 10.201.2.1/24 dev xr1; ip -n xr link set xr1 up
ip -n xp addr add 10.201.2.2/24 dev xp0; ip -n xp link set xp0 up
ip -n xp route add default via 10.201.2.1
ip netns exec xr sysctl -qw net.ipv4.conf.all.forwarding=1
# A veth hands locally sent datagrams on with their UDP checksum still
# partial (to be completed by an offload that never comes); XDP rewrites
# them as the complete ones a real network delivers: the client and peer
# compute theirs in full.
ip netns exec xg ethtool -K xg0 tx off >/dev/null
ip netns exec xp ethtool -K xp0 tx off >/dev/null
"#);
        // A veth takes frames redirected into it only when the far end runs
        // XDP: a pass-through program on the client's and the peer's ends.
        let dir = std::env::temp_dir().join(format!("natrix-xdp-lab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("pass.c"),
            "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
             SEC(\"xdp\") int pass(struct xdp_md *c) { return XDP_PASS; }\n\
             char LICENSE[] SEC(\"license\") = \"GPL\";\n",
        )
        .unwrap();
        let arch_include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        let out = Command::new(tool("clang"))
            .args(["-O2", "-target", "bpf", &arch_include, "-c"])
            .arg(dir.join("pass.c"))
            .arg("-o")
            .arg(dir.join("pass.o"))
            .output()
            .expect("running clang (Debian packages clang, libbpf-dev)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pass = dir.join("pass.o").display().to_string();
        sh(&format!(
            "ip -n xg link set dev xg0 xdp obj {pass} sec xdp\n\
             ip -n xp link set dev xp0 xdp obj {pass} sec xdp"
        ));
        Lab { dir, _turn: turn }
    }

    fn down() {
        common::delete_netns(&NAMESPACES);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        Lab::down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay's metrics, read inside its namespace.
fn metrics() -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "xr",
            "curl",
            "-s",
            "http://10.201.1.1:9090/metrics",
        ])
        .output()
        .expect("running curl in the relay's namespace");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(series: &str) -> f64 {
    common::try_metric_value(&metrics(), series).unwrap_or(0.0)
}

/// Waits until `series` satisfies `pred`; panics after 10 s.
fn wait_metric(series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(series);
        if pred(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {v} after 10 s:\n{}",
            metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// coturn's client in the client's namespace: `clients` allocations, each
/// sending `messages` of 160 bytes over a channel to an echo peer in the
/// peer's namespace (returned: it stops when dropped).
fn channels_to_echo_peer(messages: u32, clients: u32) -> (InNs, common::UclientReport) {
    let peer = InNs::spawn(
        "xp",
        &tool("turnutils_peer"),
        &["-L", "10.201.2.2", "-p", "3480"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (n, m) = (messages.to_string(), clients.to_string());
    let report = common::uclient_in(
        "xg",
        &[
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-p",
            "3478",
            "-e",
            "10.201.2.2",
            "-r",
            "3480",
            "-c",
            "-n",
            &n,
            "-m",
            &m,
            "-l",
            "160",
            "10.201.1.1",
        ],
    );
    (peer, report)
}

fn relay(extra: &[&str]) -> InNs {
    // A private network: its private address is the one to relay on.
    let mut args = vec!["--relay-ip", "10.201.2.1", "--external-ip", "10.201.2.1"];
    args.extend_from_slice(extra);
    common::relay_in_ns(
        "xr",
        ("10.201.1.1:3478", "10.201.1.1:9090"),
        "10.201.0.0/16",
        "2",
        &args,
    )
}

/// coturn's client sends through channels to an echo peer across the
/// relay with XDP on both its interfaces: nothing lost, and the datagrams
/// of both directions were relayed by the XDP program (its counters, and
/// the relay's forwarded counters and usage that include them), not by the
/// sockets.
#[test]
fn channel_data_crosses_an_xdp_relay_in_the_kernel_without_loss() {
    let _lab = Lab::up();
    let mut natrix = relay(&["--xdp", "xr0,xr1"]);
    assert!(
        natrix.wait_for("XDP fast path attached"),
        "the relay did not attach its XDP program:\n{}",
        natrix.log()
    );
    assert!(natrix.wait_for("TURN relay serving"), "{}", natrix.log());
    let (_peer, report) = channels_to_echo_peer(500, 4);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (2000, 2000, 0),
        "{}\n{}",
        report.output,
        natrix.log()
    );
    // The ChannelData went below the sockets, both ways (the channels are
    // bound before the first is sent): all but the first datagram to a
    // neighbour the relay had not resolved yet, which the kernel stack
    // sends (and resolves) for it.
    let at_least = |v: f64| v >= 1990.0;
    let to_peer = wait_metric("relay_xdp_packets_total{result=\"to_peer\"}", at_least);
    let to_client = wait_metric("relay_xdp_packets_total{result=\"to_client\"}", at_least);
    assert!(to_peer <= 2000.0 && to_client <= 2000.0, "{}", metrics());
    // The program's own CPU time is accounted (what "relay CPU" means with
    // XDP: the relay process has nothing left to do).
    assert!(
        metric("relay_xdp_program_seconds_total") > 0.0,
        "{}",
        metrics()
    );
    // The client deleted its allocations on leaving: their bindings left
    // the maps with them.
    wait_metric("relay_xdp_entries", |v| v == 0.0);
    // And the relay counts them as relayed (the loops read the kernel's
    // per-binding counters every second).
    wait_metric(
        "relay_forwarded_packets_total{direction=\"client_to_peer\"}",
        |v| v >= 2000.0,
    );
}

/// Where the kernel refuses what the fast path needs, `--xdp` names the
/// reason and the relay serves from userspace: here IPv4 forwarding is off
/// on the interface (the program's next-hop lookup needs it), and another
/// interface does not exist.
#[test]
fn a_relay_that_cannot_attach_xdp_says_why_and_relays_in_userspace() {
    let _lab = Lab::up();
    sh("ip netns exec xr sysctl -qw net.ipv4.conf.xr0.forwarding=0");
    let mut missing = relay(&["--xdp", "no-such-if0"]);
    assert!(
        missing.wait_for("XDP fast path unavailable"),
        "{}",
        missing.log()
    );
    assert!(
        missing.log().contains("no interface no-such-if0"),
        "{}",
        missing.log()
    );
    drop(missing);
    let mut natrix = relay(&["--xdp", "xr0,xr1"]);
    assert!(
        natrix.wait_for("XDP fast path unavailable"),
        "{}",
        natrix.log()
    );
    assert!(
        natrix.log().contains("IPv4 forwarding is off on xr0"),
        "{}",
        natrix.log()
    );
    assert!(natrix.wait_for("TURN relay serving"), "{}", natrix.log());
    let (_peer, report) = channels_to_echo_peer(100, 1);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (100, 100, 0),
        "{}",
        report.output
    );
    assert_eq!(metric("relay_xdp_packets_total{result=\"to_peer\"}"), 0.0);
}

//! A binary upgrade without dropping calls: a relay started from a copy of
//! the binary relays channel data for load-test clients over UDP, TCP and
//! TLS; the file is
//! replaced (as a package upgrade does), SIGUSR2 hands the relay over to
//! the new file in place (same PID, same sockets), and the clients' traffic
//! goes on. Then a broken binary at the path: SIGUSR2 is refused and the
//! relay serves on.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Natrix, PASSWORD, USER, loadtest};

/// A new file at `path` with the test binary's content (a new inode, as a
/// package manager writes it).
fn install_binary(path: &Path) {
    let staged = path.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_natrix"), &staged).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .display()
        .to_string()
}

fn wait_log(n: &Natrix, needle: &str, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while n.log().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within {within:?}:\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn relay_load(server: &str, duration: &str, transport: &str) -> std::process::Child {
    Command::new(loadtest())
        .args(["--progress", "off", "relay", "--server", server])
        .args(["--transport", transport])
        .args(["--user", USER, "--password", PASSWORD])
        .args(["--clients", "2", "--rate", "1000", "--duration", duration])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    common::stdout_report(&out, "natrix-loadtest")
}

#[test]
fn sigusr2_hands_a_relay_to_the_new_binary_without_losing_its_allocations() {
    let dir = std::env::temp_dir().join(format!("natrix-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("natrix");
    install_binary(&bin);
    common::write_cert(&dir, "natrix-test");
    let tls = format!("127.0.0.1:{}", common::free_port());
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let n = Natrix::launch(
        &[bin.to_str().unwrap()],
        "relay",
        &[
            "--peer-allow",
            "127.0.0.0/8,::1",
            "--relay-ipv6",
            "::1",
            "--tls-listen",
            &tls,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let pid = n.pid();
    let server = n.stun.to_string();
    // Clients over UDP, TCP and TLS (their connections move too).
    let loads = [
        ("udp", relay_load(&server, "6s", "udp")),
        ("tcp", relay_load(&server, "6s", "tcp")),
        ("tls", relay_load(&tls, "6s", "tls")),
    ];
    // And coturn's client with a dual-stack allocation (-Z) talking to an
    // IPv6 peer: the IPv6 relay socket moves with its allocation.
    let (_peer6, peer6_port) = common::udp_echo_peer_on("::1");
    let dual = {
        let (port, peer) = (n.stun.port().to_string(), peer6_port.to_string());
        std::thread::spawn(move || {
            common::uclient(&[
                "-Z",
                "-u",
                USER,
                "-w",
                PASSWORD,
                "-p",
                &port,
                "-e",
                "::1",
                "-r",
                &peer,
                "-n",
                "250",
                "-m",
                "1",
                "127.0.0.1",
            ])
        })
    };
    std::thread::sleep(Duration::from_millis(2000));

    // A package upgrade replaces the file; the running image is the old one.
    install_binary(&bin);
    assert!(exe_of(pid).ends_with("(deleted)"), "{}", exe_of(pid));
    // SAFETY: a signal to the relay this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    wait_log(
        &n,
        "took over the allocations of the previous binary",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(exe_of(pid), bin.display().to_string(), "the new file runs");
    for (transport, load) in loads {
        let r = report(load);
        let (sent, echoed) = (r["sent"].as_u64().unwrap(), r["echoed"].as_u64().unwrap());
        eprintln!(
            "{transport} through the upgrade: sent {sent}, echoed {echoed}, lost {}, rtt p99 {} ms, max {} ms",
            sent - echoed.min(sent),
            r["rtt_ms_p99"],
            r["latency"]["max_ms"]
        );
        assert!(sent > 5_000, "{transport}: {r}");
        assert!(
            r["loss_ratio"].as_f64().unwrap() <= 0.001,
            "{transport}: more than 0.1% lost through the upgrade: {r}"
        );
    }
    let dual = dual.join().expect("the dual-stack client");
    assert_eq!(
        (dual.sent, dual.received, dual.lost),
        (250, 250, 0),
        "the dual-stack client through the upgrade:\n{}",
        dual.output
    );
    // The clients are gone; their allocations went on through the hand-off
    // and ended when the clients did.
    let log = n.log();
    assert!(
        log.contains(
            "\"message\":\"took over the allocations of the previous binary\",\"allocations\":8"
        ),
        "8 handed over (the dual-stack client's two among them):\n{log}"
    );

    // A binary that does not run: the relay refuses to hand over and
    // serves on.
    let broken = bin.with_extension("broken");
    std::fs::write(&broken, b"not a program").unwrap();
    std::fs::rename(&broken, &bin).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    wait_log(
        &n,
        "the new binary does not run",
        1,
        Duration::from_secs(10),
    );
    let r = report(relay_load(&server, "1s", "udp"));
    assert!(r["loss_ratio"].as_f64().unwrap() < 0.01, "{r}");
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Past the relay port range, allocations on shared relayed sockets
/// (`--relay-multiplex-ports`) move to the new binary too: their shared
/// socket goes along in the slot it had, with who holds which peer, and
/// the load tester's clients (one relay port, so three of four on shared
/// sockets, each to a peer of its own) lose nothing.
#[test]
fn sigusr2_hands_over_allocations_on_shared_relayed_sockets() {
    let dir = std::env::temp_dir().join(format!("natrix-upgrade-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("natrix");
    install_binary(&bin);
    let range = common::PastTheRange::free(4);
    let n = Natrix::launch(
        &[bin.to_str().unwrap()],
        "relay",
        &range.and(&["--peer-allow", "127.0.0.0/8"]),
    );
    let pid = n.pid();
    let load = Command::new(loadtest())
        .args([
            "--progress",
            "off",
            "relay",
            "--server",
            &n.stun.to_string(),
        ])
        .args(["--user", USER, "--password", PASSWORD])
        .args([
            "--clients",
            "4",
            "--peers",
            "4",
            "--rate",
            "1000",
            "--duration",
            "5s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let before = n.wait_metric("relay_multiplexed_allocations", |v| v >= 3.0);
    assert_eq!(before, 3.0, "one relay port: three of four shared");
    install_binary(&bin);
    // SAFETY: a signal to the relay this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    wait_log(
        &n,
        "took over the allocations of the previous binary",
        1,
        Duration::from_secs(10),
    );
    let after = n.wait_metric("relay_multiplexed_allocations", |v| v >= 3.0);
    assert_eq!(after, 3.0, "the new binary holds them");
    let r = report(load);
    let (sent, echoed) = (r["sent"].as_u64().unwrap(), r["echoed"].as_u64().unwrap());
    eprintln!(
        "shared sockets through the upgrade: sent {sent}, echoed {echoed}, rtt p99 {} ms",
        r["rtt_ms_p99"]
    );
    assert!(sent > 3_000, "{r}");
    assert!(
        r["loss_ratio"].as_f64().unwrap() <= 0.001,
        "more than 0.1% lost through the upgrade: {r}"
    );
    assert!(
        n.log().contains(
            "\"message\":\"took over the allocations of the previous binary\",\"allocations\":4"
        ),
        "{}",
        n.log()
    );
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `natrix up` without --auth-secret made its TURN secret up: a successor
/// would make up another and the allocations could not go on, so SIGUSR2
/// is refused and the process serves on.
#[test]
fn natrix_up_with_generated_credentials_refuses_to_hand_over() {
    let n = Natrix::up(&[]);
    // SAFETY: a signal to the natrix process this test started.
    assert_eq!(unsafe { libc::kill(n.pid(), libc::SIGUSR2) }, 0);
    wait_log(
        &n,
        "only a relay with configured credentials",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(
        common::http_get(n.metrics, "/readyz").unwrap().0,
        200,
        "still serving"
    );
}

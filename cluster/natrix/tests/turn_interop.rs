//! The relay role driven by clients nobody here wrote: coturn's
//! `turnutils_uclient` (with `turnutils_peer` as the far end) over UDP and
//! TCP, channels and Send indications, client to client, and TURN REST
//! credentials.

mod common;

use common::{Natrix, PASSWORD, USER, uclient, udp_echo_peer};

/// Loopback peers are denied by default; the tests relay to them.
const ALLOW_LOOPBACK: &[&str] = &["--peer-allow", "127.0.0.0/8"];

fn assert_clean(report: &common::UclientReport, expected: u64) {
    assert_eq!(
        (
            report.sent,
            report.received,
            report.lost,
            report.send_dropped
        ),
        (expected, expected, 0, 0),
        "uclient output:\n{}",
        report.output
    );
}

fn port(natrix: &Natrix) -> String {
    natrix.stun.port().to_string()
}

#[test]
fn uclient_over_udp_relays_to_a_peer_through_channels_without_loss() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = uclient(&[
        "-p",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "100",
        "-m",
        "4",
        "-l",
        "160",
        "127.0.0.1",
    ]);
    assert_clean(&report, 400);
    let forwarded = natrix.wait_metric(
        "relay_forwarded_packets_total{direction=\"peer_to_client\"}",
        |v| v >= 400.0,
    );
    assert!(forwarded >= 400.0, "peer_to_client {forwarded}");
}

#[test]
fn uclient_over_tcp_relays_to_a_peer_without_loss() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = uclient(&[
        "-t",
        "-p",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "100",
        "-m",
        "4",
        "-l",
        "1000",
        "127.0.0.1",
    ]);
    assert_clean(&report, 400);
}

#[test]
fn uclient_with_send_indications_and_padding_works() {
    let natrix = Natrix::up(ALLOW_LOOPBACK);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    // -s: Send/Data indications instead of channels.
    let report = uclient(&[
        "-s",
        "-p",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "50",
        "-m",
        "2",
        "-l",
        "333",
        "127.0.0.1",
    ]);
    assert_clean(&report, 100);
    // -t -D: TCP with mandatory channel padding (pjnath style).
    let report = uclient(&[
        "-t",
        "-D",
        "-p",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "50",
        "-m",
        "2",
        "-l",
        "333",
        "127.0.0.1",
    ]);
    assert_clean(&report, 100);
}

#[test]
fn uclient_client_to_client_through_two_allocations() {
    let natrix = Natrix::relay(ALLOW_LOOPBACK);
    let p = port(&natrix);
    // -y: clients send to each other's relayed addresses; with -m 2 that is
    // four allocations and 4 x 100 messages.
    let report = uclient(&[
        "-y",
        "-p",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-n",
        "100",
        "-m",
        "2",
        "-l",
        "1200",
        "127.0.0.1",
    ]);
    assert_clean(&report, 400);
}

#[test]
fn uclient_with_turn_rest_credentials_and_a_rotated_secret() {
    let natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--auth-secret",
        "k2=fresh-secret,k1=previous-secret",
    ]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    for secret in ["fresh-secret", "previous-secret"] {
        let report = uclient(&[
            "-p",
            &p,
            "-W",
            secret,
            "-u",
            "alice",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-n",
            "20",
            "-m",
            "1",
            "127.0.0.1",
        ]);
        // One client and its RTCP companion allocation: 2 x 20 messages.
        assert_clean(&report, 40);
    }
    let report = uclient(&[
        "-p",
        &p,
        "-W",
        "guessed",
        "-u",
        "mallory",
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "5",
        "127.0.0.1",
    ]);
    assert_eq!(report.received, 0, "{}", report.output);
    let failures = natrix.wait_metric("relay_auth_failures_total{reason=\"bad_integrity\"}", |v| {
        v >= 1.0
    });
    assert!(failures >= 1.0);
}

#[test]
fn loopback_peers_are_refused_by_default() {
    let natrix = Natrix::relay(&[]);
    let (_peer, peer_port) = udp_echo_peer();
    let p = port(&natrix);
    let pp = peer_port.to_string();
    let report = uclient(&[
        "-p",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "5",
        "-m",
        "1",
        "127.0.0.1",
    ]);
    assert_eq!(report.received, 0, "{}", report.output);
    let forbidden = natrix.wait_metric(
        "relay_requests_total{method=\"channel_bind\",result=\"403\"}",
        |v| v >= 1.0,
    );
    let forbidden_perm =
        natrix.metric("relay_requests_total{method=\"create_permission\",result=\"403\"}");
    assert!(
        forbidden + forbidden_perm >= 1.0,
        "403s: {forbidden} {forbidden_perm}"
    );
}

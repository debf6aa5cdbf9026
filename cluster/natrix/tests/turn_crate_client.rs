//! The relay role driven by webrtc-rs' TURN client (the `turn` crate):
//! allocate, permission, channel bind, data both ways, refresh, delete.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Natrix, PASSWORD, REALM, USER};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_client_relays_refreshes_and_deletes() {
    // A short lifetime makes the client refresh within the test.
    let natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--default-lifetime",
        "4s",
        "--max-lifetime",
        "4s",
    ]);

    // The peer: echoes every datagram back to where it came from (the
    // relayed address).
    let peer = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("peer bind"));
    let peer_addr = peer.local_addr().expect("peer addr");
    let echo = {
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut seen_from = None;
            while let Ok((n, from)) = peer.recv_from(&mut buf).await {
                seen_from = Some(from);
                if &buf[..n] == b"bye" {
                    break;
                }
                let _ = peer.send_to(&buf[..n], from).await;
            }
            seen_from
        })
    };

    let server = natrix.stun.to_string();
    let conn = UdpSocket::bind("127.0.0.1:0").await.expect("client bind");
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.clone(),
        turn_serv_addr: server,
        username: USER.to_string(),
        password: PASSWORD.to_string(),
        realm: REALM.to_string(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .expect("client");
    client.listen().await.expect("listen");
    let relay = client.allocate().await.expect("allocate");
    let relayed = relay.local_addr().expect("relayed address");
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");

    let mapped = client.send_binding_request().await.expect("binding");
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");

    async fn round_trips(relay: &impl Conn, peer: SocketAddr, tag: &str, n: usize) {
        let mut buf = vec![0u8; 2048];
        for i in 0..n {
            let msg = format!("{tag}-{i}");
            relay
                .send_to(msg.as_bytes(), peer)
                .await
                .expect("send through the relay");
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(3), relay.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("no echo for {msg}"))
                    .expect("receive through the relay");
            assert_eq!(from, peer);
            assert_eq!(&buf[..len], msg.as_bytes());
            // Give the client time to bind a channel after the first sends.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    round_trips(&relay, peer_addr, "first", 30).await;

    // Past the 4 s lifetime: only the client's refreshes keep it alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    round_trips(&relay, peer_addr, "after-refresh", 10).await;

    relay.send_to(b"bye", peer_addr).await.expect("bye");
    let seen_from = echo.await.expect("echo task");
    assert_eq!(seen_from, Some(relayed), "the peer saw the relayed address");

    relay.close().await.expect("delete the allocation");
    client.close().await.expect("close the client");

    let metric = |s: &str| natrix.wait_metric(s, |v| v >= 1.0);
    assert!(metric("relay_requests_total{method=\"create_permission\",result=\"success\"}") >= 1.0);
    assert!(metric("relay_requests_total{method=\"channel_bind\",result=\"success\"}") >= 1.0);
    assert!(metric("relay_requests_total{method=\"refresh\",result=\"success\"}") >= 1.0);
    assert!(metric("relay_allocations_ended_total{reason=\"deleted\"}") >= 1.0);
    let alive = natrix.wait_metric("relay_allocations", |v| v == 0.0);
    assert_eq!(alive, 0.0);
}

/// SIGTERM drains: readiness drops, new allocations are refused, existing
/// ones keep relaying; the process exits as soon as the last one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_existing_allocations_before_exiting() {
    let mut natrix = Natrix::relay(&["--peer-allow", "127.0.0.0/8", "--drain-timeout", "60s"]);
    let peer = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("peer bind"));
    let peer_addr = peer.local_addr().expect("peer addr");
    {
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = peer.recv_from(&mut buf).await {
                let _ = peer.send_to(&buf[..n], from).await;
            }
        });
    }
    let client = |conn: UdpSocket| {
        let server = natrix.stun.to_string();
        Client::new(ClientConfig {
            stun_serv_addr: server.clone(),
            turn_serv_addr: server,
            username: USER.to_string(),
            password: PASSWORD.to_string(),
            realm: REALM.to_string(),
            software: String::new(),
            rto_in_ms: 0,
            conn: Arc::new(conn),
            vnet: None,
        })
    };
    let first = client(UdpSocket::bind("127.0.0.1:0").await.expect("bind"))
        .await
        .expect("client");
    first.listen().await.expect("listen");
    let relay = first.allocate().await.expect("allocate");
    natrix.wait_metric("relay_allocations", |v| v >= 1.0);

    // SAFETY: kill(2) on the PID of a child this test spawned.
    assert_eq!(unsafe { libc::kill(natrix.pid(), libc::SIGTERM) }, 0);
    let metrics = natrix.metrics;
    let ready = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = common::http_get(metrics, "/readyz")
                .map(|(s, _)| s)
                .unwrap_or(0);
            if status == 503 || std::time::Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("readiness poll");
    assert_eq!(ready, 503, "draining must drop readiness");

    // A new allocation is refused...
    let second = client(UdpSocket::bind("127.0.0.1:0").await.expect("bind"))
        .await
        .expect("client");
    second.listen().await.expect("listen");
    assert!(
        second.allocate().await.is_err(),
        "a draining relay must refuse new allocations"
    );
    let _ = second.close().await;

    // ...the existing one still relays...
    let mut buf = vec![0u8; 256];
    relay
        .send_to(b"during drain", peer_addr)
        .await
        .expect("send");
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), relay.recv_from(&mut buf))
        .await
        .expect("an echo during the drain")
        .expect("recv");
    assert_eq!((&buf[..n], from), (&b"during drain"[..], peer_addr));
    assert!(natrix.alive(), "exited with an allocation alive");

    // ...and when it ends, the process exits cleanly.
    relay.close().await.expect("delete");
    first.close().await.expect("close");
    let status = tokio::task::spawn_blocking(move || natrix.wait_exit(Duration::from_secs(10)))
        .await
        .expect("exit wait");
    assert!(status.success(), "exit status {status}");
}

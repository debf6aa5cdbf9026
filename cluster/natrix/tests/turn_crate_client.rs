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

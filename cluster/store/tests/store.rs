//! The same contract, checked against both implementations: memory, and a
//! real `redis-server` started on a free port.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use natrix_store::testing::{RedisCluster, RedisSentinel, RedisServer};
use natrix_store::{PutField, RedisOptions, Store};

async fn redis(server: &RedisServer) -> Store {
    Store::redis(&server.url(), RedisOptions::default())
        .await
        .expect("connecting to the test redis-server")
}

async fn bounded_hashes(store: &Store) {
    let ttl = Duration::from_secs(2);
    for (i, f) in ["a", "b", "c"].iter().enumerate() {
        let r = store.put_field("h", f, &[i as u8], ttl, 3).await.unwrap();
        assert_eq!(r, PutField::Inserted, "{}", store.kind());
    }
    assert_eq!(
        store.put_field("h", "d", b"x", ttl, 3).await.unwrap(),
        PutField::Full,
        "a fourth field must not fit ({})",
        store.kind()
    );
    assert_eq!(
        store.put_field("h", "b", b"new", ttl, 3).await.unwrap(),
        PutField::Updated
    );
    let mut fields = store.fields("h").await.unwrap();
    fields.sort();
    assert_eq!(
        fields,
        vec![
            ("a".to_owned(), vec![0]),
            ("b".to_owned(), b"new".to_vec()),
            ("c".to_owned(), vec![2])
        ]
    );
    assert!(store.fields("missing").await.unwrap().is_empty());
    store.delete_field("h", "a").await.unwrap();
    assert_eq!(store.fields("h").await.unwrap().len(), 2);
    assert_eq!(
        store.put_field("h", "d", b"x", ttl, 3).await.unwrap(),
        PutField::Inserted,
        "a deleted field frees its place"
    );
}

async fn everything_expires(store: &Store) {
    let short = Duration::from_millis(300);
    store.put_field("eh", "f", b"1", short, 4).await.unwrap();
    // A later, shorter TTL never shortens the key's life.
    store
        .put_field("long", "f", b"1", Duration::from_secs(2), 4)
        .await
        .unwrap();
    store.put_field("long", "g", b"2", short, 4).await.unwrap();
    store.put("v", b"value", short).await.unwrap();
    assert_eq!(store.incr("n", short).await.unwrap(), 1);
    assert_eq!(store.incr("n", short).await.unwrap(), 2);
    assert_eq!(store.add("n", 5, short).await.unwrap(), 7);
    assert_eq!(store.add("n", 0, short).await.unwrap(), 7, "adding 0 reads");
    assert_eq!(store.get("n").await.unwrap().as_deref(), Some(&b"7"[..]));
    // A counter first touched with 0 still expires.
    assert_eq!(store.add("z", 0, short).await.unwrap(), 0);
    assert_eq!(
        store.get("v").await.unwrap().as_deref(),
        Some(&b"value"[..])
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        store.fields("eh").await.unwrap().is_empty(),
        "{}",
        store.kind()
    );
    assert_eq!(store.fields("long").await.unwrap().len(), 2);
    assert_eq!(store.get("v").await.unwrap(), None);
    assert_eq!(
        store.add("z", 1, short).await.unwrap(),
        1,
        "{}",
        store.kind()
    );
    assert_eq!(
        store.incr("n", short).await.unwrap(),
        1,
        "counter restarts after its TTL"
    );
    store.put("w", b"x", Duration::from_secs(5)).await.unwrap();
    store.delete("w").await.unwrap();
    assert_eq!(store.get("w").await.unwrap(), None);
}

async fn broadcast(store: &Store) {
    let mut a = store.subscribe("chan").await;
    let mut b = store.subscribe("chan").await;
    for i in 0..50u8 {
        store.publish("chan", &[i]).await.unwrap();
    }
    store.publish("other", b"not for us").await.unwrap();
    for sub in [&mut a, &mut b] {
        for i in 0..50u8 {
            let got = tokio::time::timeout(Duration::from_secs(2), sub.next())
                .await
                .expect("a published message arrives")
                .expect("subscription open");
            assert_eq!(got, vec![i], "in order ({})", store.kind());
        }
    }
    drop(a);
    // A dropped subscriber does not break publishing to the others.
    store.publish("chan", b"after").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), b.next())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"after"[..]));
}

/// Streams keep the newest entries (about `max_len`: Redis trims whole
/// nodes), in order, read page by page after an id.
async fn streams(store: &Store) {
    for i in 0..250u32 {
        store
            .append("s", i.to_string().as_bytes(), 100)
            .await
            .unwrap();
    }
    let (mut after, mut seen) = ("0".to_owned(), Vec::new());
    loop {
        let page = store.read_stream("s", &after, 40).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        assert!(page.len() <= 40);
        after = last.clone();
        seen.extend(page.into_iter().map(|(_, p)| String::from_utf8(p).unwrap()));
    }
    assert!(
        (100..250).contains(&seen.len()),
        "{} kept ({})",
        seen.len(),
        store.kind()
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("249"),
        "{}",
        store.kind()
    );
    let first: u32 = seen[0].parse().unwrap();
    let want: Vec<String> = (first..250).map(|i| i.to_string()).collect();
    assert_eq!(seen, want, "in order, none missing ({})", store.kind());
    assert!(
        store
            .read_stream("absent", "0", 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.delete("s").await.unwrap();
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    let store = Store::memory();
    bounded_hashes(&store).await;
    everything_expires(&store).await;
    broadcast(&store).await;
    streams(&store).await;
    let Store::Memory(m) = &store else {
        unreachable!()
    };
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(m.is_empty(), "every key expired, nothing left behind");
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let server = RedisServer::start();
    let store = redis(&server).await;
    bounded_hashes(&store).await;
    streams(&store).await;
    everything_expires(&store).await;
    broadcast(&store).await;
}

#[tokio::test]
async fn redis_outage_is_a_prompt_error_and_heals_by_itself() {
    let mut server = RedisServer::start();
    let store = redis(&server).await;
    let mut sub = store.subscribe("events").await;
    store.put("k", b"1", Duration::from_secs(30)).await.unwrap();

    server.stop();
    let started = Instant::now();
    let err = store.get("k").await;
    assert!(err.is_err(), "a call while Redis is down fails");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "and fails promptly, not after minutes: {:?}",
        started.elapsed()
    );

    server.restart();
    // The connection manager reconnects on its own; the data is gone (a
    // crash without persistence) but the store works again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.put("k", b"2", Duration::from_secs(30)).await {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not heal: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"2"[..]));
    // The subscription re-subscribes by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        store.publish("events", b"back").await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            assert_eq!(m, b"back");
            break;
        }
        assert!(Instant::now() < deadline, "subscription did not resume");
    }
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = Store::redis(
        &format!("redis://127.0.0.1:{port}"),
        RedisOptions::default(),
    )
    .await
    .expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = err.to_string();
    assert!(text.starts_with("redis: "), "{text}");
}

#[tokio::test]
async fn redis_cluster_keeps_the_contract() {
    let cluster = RedisCluster::start(3);
    let store = Store::redis(&cluster.url(), RedisOptions::default())
        .await
        .expect("connecting to the test cluster");
    bounded_hashes(&store).await;
    everything_expires(&store).await;
    broadcast(&store).await;
    // Keys spread over the slots of all three primaries.
    for i in 0..50 {
        store
            .put(&format!("spread-{i}"), b"x", Duration::from_secs(5))
            .await
            .unwrap();
    }
    for i in 0..50 {
        assert!(store.get(&format!("spread-{i}")).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn sentinel_failover_moves_the_store_to_the_new_primary_by_itself() {
    let mut set = RedisSentinel::start();
    let store = Store::redis(&set.url(), RedisOptions::default())
        .await
        .expect("connecting through the sentinel");
    bounded_hashes(&store).await;
    let mut sub = store.subscribe("after-failover").await;
    store
        .put("k", b"before", Duration::from_secs(60))
        .await
        .unwrap();

    set.kill_primary();
    let started = Instant::now();
    loop {
        match store.put("k", b"after", Duration::from_secs(60)).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no write succeeded after the failover: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(
        store.get("k").await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
    // The write went to the promoted replica.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &set.replica_port().to_string(), "get", "k"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "after");
    // The subscription follows the primary too.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        store.publish("after-failover", b"hello").await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            assert_eq!(m, b"hello");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscription did not follow the failover"
        );
    }
}

/// Sentinel with authentication: the credentials in the URL reach the
/// Sentinel and the primary it names; without them the connection fails
/// with an error, not a hang.
#[tokio::test]
async fn a_password_protected_sentinel_set_is_reached_with_the_urls_credentials() {
    let set = RedisSentinel::start_with_password("sentinel-test-pw");
    let store = Store::redis(&set.url(), RedisOptions::default())
        .await
        .expect("connecting through the sentinel with its password");
    store
        .put("auth-k", b"v", Duration::from_secs(60))
        .await
        .expect("a write on the authenticated primary");
    assert_eq!(
        store.get("auth-k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    let without = set.url().replace(":sentinel-test-pw@", "");
    assert!(
        tokio::time::timeout(
            Duration::from_secs(20),
            Store::redis(&without, RedisOptions::default())
        )
        .await
        .expect("an answer, not a hang")
        .is_err(),
        "no password, no connection"
    );
}

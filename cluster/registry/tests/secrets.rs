//! Rotation against a real redis-server: newest first, three kept.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use natrix_registry::secrets::{KEEP, list, rotate};
use natrix_store::testing::RedisServer;
use natrix_store::{RedisOptions, Store};

#[tokio::test]
async fn rotation_keeps_the_newest_three_newest_first() {
    let server = RedisServer::start();
    let store = Store::redis(&server.url(), RedisOptions::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            rotate(&store, format!("secret-number-{i}-long-enough"))
                .await
                .unwrap(),
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let got = list(&store).await.unwrap();
    assert_eq!(got.len(), KEEP);
    let got_ids: Vec<_> = got.iter().map(|s| s.key_id.clone()).collect();
    assert_eq!(
        got_ids,
        vec![ids[4].clone(), ids[3].clone(), ids[2].clone()]
    );
    assert_eq!(got[0].secret, "secret-number-4-long-enough");
}

//! A seeded, bounded run of the CDX fuzz entry point in the test suite:
//! valid messages of every kind CDX parses, mutated (bit flips,
//! truncations, insertions, splices) and random bytes. The `cdx/fuzz`
//! target runs the same entry point under libFuzzer for longer.

#![allow(clippy::disallowed_methods)] // Instant::now as the run's instant
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natrix_cdx_proto::exchange::client::{ConnectionData, PostSeeds, Poster};
use natrix_cdx_proto::exchange::{Entry, encode_deliver, encode_post_success};
use natrix_cdx_proto::fuzzing::exercise;
use natrix_cdx_proto::handoff;
use natrix_model::invitation::Invitation;
use natrix_wire::TransactionId;

/// xorshift64*: a deterministic generator without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let now = Instant::now();
    let inv = Invitation::mint_session(b"smoke", 2, u64::MAX, &mut |b: &mut [u8]| b.fill(9));
    let data = ConnectionData {
        class: None,
        candidates: Vec::new(),
    };
    let seeds = PostSeeds {
        nonce: [1; 12],
        tid: [2; 12],
    };
    let mut poster = Poster::new(
        &inv[0],
        &data,
        Some([1, 1, 0, 0]),
        3,
        seeds,
        now,
        Duration::from_secs(1),
    )
    .unwrap();
    let post = poster.poll_transmit(now).unwrap().payload;
    let tid = TransactionId([2; 12]);
    let mut success = [0u8; 128];
    let n = encode_post_success(
        &mut success,
        &tid,
        "203.0.113.9:4000".parse().unwrap(),
        1,
        2,
        60,
    )
    .unwrap();
    let deliver = encode_deliver(
        &tid,
        &Entry {
            participant: 1,
            seq: 1,
            sealed: &[5; 40],
        },
    );
    let mut sealed = [0u8; 512];
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let key = handoff::key(b"a cluster secret for fuzzing");
    let h = handoff::seal(
        &key,
        1_000_000,
        1,
        client,
        natrix_wire::samples::RFC5769_REQUEST,
        &mut sealed,
    )
    .unwrap();
    vec![
        natrix_wire::samples::RFC5769_REQUEST.to_vec(),
        post,
        success[..n].to_vec(),
        deliver,
        sealed[..h].to_vec(),
        data.encode(),
    ]
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.truncate(rng.below(b.len() + 1)),
            2 => {
                let i = rng.below(b.len() + 1);
                b.insert(i, rng.next() as u8);
            }
            3 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len());
                let at = rng.below(b.len() + 1);
                b.splice(at..at, other[from..].iter().copied());
            }
            _ => {
                let len = rng.below(96);
                b = (0..len).map(|_| rng.next() as u8).collect();
            }
        }
    }
    b
}

#[test]
fn every_cdx_parser_survives_mutated_and_random_input() {
    let corpus = corpus();
    let now = Instant::now();
    for sample in &corpus {
        exercise(sample, now);
    }
    let mut rng = Rng(0x5EED_CD00_0000_0001);
    for _ in 0..20_000 {
        exercise(&mutate(&mut rng, &corpus), now);
    }
}

//! The exchange client's state machine at explicit instants, against a CDX
//! node played by the test with the crate's own codec: retransmission and
//! re-post timing, deliveries before and after the answer, refusals, the
//! deadline, and entries that must not count (forged, own, older).

// Instant has no constructor but `now`: each test takes its t0 from it once
// and advances virtual time from there.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natrix_cdx_proto::exchange::client::{
    Candidate, CandidateKind, ConnectionData, INITIAL_RTO, MAX_RTO, PostError, PostSeeds, Poster,
    Transmit,
};
use natrix_cdx_proto::exchange::{
    ClientMessage, DELIVER, Entry, encode_deliver, encode_post_error, encode_post_success,
    parse_client,
};
use natrix_model::NatClass;
use natrix_model::invitation::{Invitation, SessionKey, seal};
use natrix_wire::{Class, Message, TransactionId};

const TIMEOUT: Duration = Duration::from_secs(10);

fn invitations(participants: u8) -> Vec<Invitation> {
    let mut n = 0u8;
    Invitation::mint_session(
        b"a cluster secret for tests",
        participants,
        u64::MAX,
        &mut |b: &mut [u8]| {
            for x in b {
                n = n.wrapping_add(17);
                *x = n;
            }
        },
    )
}

fn data(port: u16) -> ConnectionData {
    ConnectionData {
        class: Some(NatClass::PortRestrictedCone),
        candidates: vec![Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: SocketAddr::from(([203, 0, 113, 7], port)),
        }],
    }
}

fn poster(inv: &Invitation, t0: Instant) -> Poster {
    Poster::new(
        inv,
        &data(40000),
        Some([2, 3, 0, 0]),
        1,
        PostSeeds {
            nonce: [9; 12],
            tid: [1; 12],
        },
        t0,
        TIMEOUT,
    )
    .unwrap()
}

/// The Post among `sent`, parsed as a CDX node would.
fn post_tid(t: &Transmit) -> TransactionId {
    assert!(!t.ack);
    match parse_client(&t.payload).unwrap() {
        ClientMessage::Post(p) => p.tid,
        ClientMessage::Ack(_) => panic!("a Post was expected"),
    }
}

fn success(tid: &TransactionId) -> Vec<u8> {
    let mut out = [0u8; 128];
    let n = encode_post_success(
        &mut out,
        tid,
        SocketAddr::from(([203, 0, 113, 7], 50000)),
        1,
        2,
        600,
    )
    .unwrap();
    out[..n].to_vec()
}

/// A delivery of participant `who`'s data at `seq`, sealed with `key`.
fn deliver(inv: &Invitation, key: &SessionKey, who: u8, seq: u32, port: u16) -> Vec<u8> {
    let sealed = seal(
        key,
        &inv.session(),
        who,
        seq,
        [who; 12],
        &data(port).encode(),
    );
    encode_deliver(
        &TransactionId([who.wrapping_add(seq as u8); 12]),
        &Entry {
            participant: who,
            seq,
            sealed: &sealed,
        },
    )
}

/// Every transmit due at `now`.
fn drain(p: &mut Poster, now: Instant) -> Vec<Transmit> {
    std::iter::from_fn(|| p.poll_transmit(now)).collect()
}

#[test]
fn the_post_is_retransmitted_with_a_doubling_timeout_until_answered_then_reposted_slowly() {
    let t0 = Instant::now();
    let inv = invitations(2);
    let mut p = poster(&inv[0], t0);
    let mut sends = Vec::new();
    let mut now = t0;
    // Unanswered for 3 s: sends at 0, 100, 300, 700, 1500, 2500 ms.
    while now < t0 + Duration::from_secs(3) {
        for t in drain(&mut p, now) {
            post_tid(&t);
            sends.push(now - t0);
        }
        now = p.poll_timeout().max(now + Duration::from_millis(1));
        p.handle_timeout(now);
    }
    let ms: Vec<u128> = sends.iter().map(Duration::as_millis).collect();
    assert_eq!(ms, vec![0, 100, 300, 700, 1500, 2500]);
    assert_eq!(INITIAL_RTO, Duration::from_millis(100));

    // Answered (the peer's entry still missing): one re-post a MAX_RTO.
    let tid = TransactionId([1; 12]);
    p.handle_input(&success(&tid), now);
    assert!(p.poll_outcome().is_none(), "the peer's entry is missing");
    assert!(drain(&mut p, now).is_empty());
    assert_eq!(p.poll_timeout(), now + MAX_RTO);
    assert_eq!(drain(&mut p, now + MAX_RTO).len(), 1);
}

#[test]
fn a_delivery_is_acknowledged_and_with_the_answer_completes_the_exchange() {
    let t0 = Instant::now();
    let inv = invitations(2);
    let mut p = poster(&inv[0], t0);
    let tid = post_tid(&drain(&mut p, t0)[0]);
    // The peer's entry arrives before the answer to our post.
    let d = deliver(&inv[0], &inv[0].key, 1, 3, 41000);
    p.handle_input(&d, t0 + Duration::from_millis(20));
    let acks = drain(&mut p, t0 + Duration::from_millis(20));
    assert_eq!(acks.len(), 1);
    assert!(acks[0].ack);
    let ack = Message::parse(&acks[0].payload).unwrap();
    let deliver_msg = Message::parse(&d).unwrap();
    assert_eq!(
        (ack.method(), ack.class(), ack.transaction_id()),
        (DELIVER, Class::Success, deliver_msg.transaction_id())
    );
    assert!(
        matches!(parse_client(&acks[0].payload), Ok(ClientMessage::Ack(_))),
        "CDX reads it as an acknowledgement"
    );
    assert!(p.poll_outcome().is_none(), "no answer to the post yet");

    p.handle_input(&success(&tid), t0 + Duration::from_millis(40));
    let done = p.poll_outcome().unwrap().unwrap();
    // A delivery repeated after the end (our ack was lost) is still
    // acknowledged, and nothing else is sent.
    p.handle_input(&d, t0 + Duration::from_millis(50));
    let late = drain(&mut p, t0 + Duration::from_secs(5));
    assert_eq!(late.len(), 1);
    assert!(late[0].ack);
    assert_eq!(done.mapped, SocketAddr::from(([203, 0, 113, 7], 50000)));
    assert_eq!(done.peers.get(&1), Some(&data(41000)));
    assert_eq!(done.rejected_entries, 0);
    assert_eq!(done.elapsed, Duration::from_millis(40));
    assert!(p.poll_outcome().is_none(), "the outcome is taken once");
}

#[test]
fn forged_own_and_older_entries_do_not_count_but_are_acknowledged() {
    let t0 = Instant::now();
    let inv = invitations(3);
    let mut p = poster(&inv[0], t0);
    let tid = post_tid(&drain(&mut p, t0)[0]);
    let at = t0 + Duration::from_millis(10);
    // Sealed under another session key: not from a participant.
    p.handle_input(&deliver(&inv[0], &SessionKey([0xEE; 32]), 1, 1, 41000), at);
    // Our own entry echoed back.
    p.handle_input(&deliver(&inv[0], &inv[0].key, 0, 1, 40000), at);
    // Participant 1 at seq 5, then an older seq 4 with other data.
    p.handle_input(&deliver(&inv[0], &inv[0].key, 1, 5, 41005), at);
    p.handle_input(&deliver(&inv[0], &inv[0].key, 1, 4, 41004), at);
    assert_eq!(drain(&mut p, at).iter().filter(|t| t.ack).count(), 4);
    p.handle_input(&success(&tid), at);
    assert!(p.poll_outcome().is_none(), "participant 2 is missing");
    p.handle_input(&deliver(&inv[0], &inv[0].key, 2, 1, 42000), at);
    let done = p.poll_outcome().unwrap().unwrap();
    assert_eq!(done.peers.len(), 2);
    assert_eq!(
        done.peers.get(&1),
        Some(&data(41005)),
        "the newer entry stays"
    );
    assert_eq!(done.rejected_entries, 2);
}

#[test]
fn a_refusal_ends_the_exchange_with_its_code_and_reason() {
    let t0 = Instant::now();
    let inv = invitations(2);
    let mut p = poster(&inv[0], t0);
    let tid = post_tid(&drain(&mut p, t0)[0]);
    let mut out = [0u8; 128];
    // An answer to another transaction is ignored.
    let n = encode_post_error(&mut out, &TransactionId([7; 12]), 403, "forged").unwrap();
    p.handle_input(&out[..n], t0);
    assert!(p.poll_outcome().is_none());
    let n = encode_post_error(&mut out, &tid, 401, "ticket expired").unwrap();
    p.handle_input(&out[..n], t0);
    assert_eq!(
        p.poll_outcome(),
        Some(Err(PostError::Rejected {
            code: 401,
            reason: "ticket expired".into()
        }))
    );
    assert!(
        drain(&mut p, t0 + Duration::from_secs(5)).is_empty(),
        "nothing is sent after the end"
    );
}

#[test]
fn the_deadline_says_how_far_the_exchange_got() {
    let t0 = Instant::now();
    let inv = invitations(2);
    // Nobody answers.
    let mut p = poster(&inv[0], t0);
    drain(&mut p, t0);
    p.handle_timeout(t0 + TIMEOUT - Duration::from_millis(1));
    assert!(p.poll_outcome().is_none());
    p.handle_timeout(t0 + TIMEOUT);
    assert_eq!(
        p.poll_outcome(),
        Some(Err(PostError::Timeout {
            posted: false,
            received: 0,
            expected: 1
        }))
    );
    // Answered, but the peer never posts.
    let mut p = poster(&inv[0], t0);
    let tid = post_tid(&drain(&mut p, t0)[0]);
    p.handle_input(&success(&tid), t0);
    p.handle_timeout(t0 + TIMEOUT);
    assert_eq!(
        p.poll_outcome(),
        Some(Err(PostError::Timeout {
            posted: true,
            received: 0,
            expected: 1
        }))
    );
}

#[test]
fn garbage_and_truncated_messages_are_ignored() {
    let t0 = Instant::now();
    let inv = invitations(2);
    let mut p = poster(&inv[0], t0);
    let tid = post_tid(&drain(&mut p, t0)[0]);
    let good = deliver(&inv[0], &inv[0].key, 1, 1, 41000);
    for cut in 0..good.len() {
        p.handle_input(&good[..cut], t0);
    }
    p.handle_input(b"not stun at all", t0);
    assert!(drain(&mut p, t0).is_empty(), "nothing to acknowledge");
    p.handle_input(&success(&tid), t0);
    p.handle_input(&good, t0);
    assert!(p.poll_outcome().unwrap().is_ok());
}

/// A Post from a new address is challenged (401 with CHALLENGE): the
/// participant signs the challenge with its move key and posts again at
/// once; the proof holds only for that participant, that address and a
/// fresh challenge, so a sniffed ticket replayed from elsewhere cannot move
/// it.
#[test]
fn a_challenged_move_is_proven_with_the_move_key_and_nothing_else() {
    use natrix_cdx_proto::exchange::{
        CHALLENGE_BUCKET_SECS, challenge, encode_post_challenge, proves_move,
    };
    let t0 = Instant::now();
    let invs = invitations(2);
    let base = natrix_model::invitation::move_key_base(b"a cluster secret for tests");
    let mut p = poster(&invs[0], t0);
    let first = p.poll_transmit(t0).unwrap();
    let tid = post_tid(&first);
    let moved: SocketAddr = "198.51.100.9:5000".parse().unwrap();
    let unix = 1_800_000_000;
    let bucket = unix / CHALLENGE_BUCKET_SECS;
    let c = challenge(&base, &invs[0].ticket, moved, bucket);
    let mut out = [0u8; 128];
    let n = encode_post_challenge(&mut out, &tid, &c).unwrap();
    p.handle_input(&out[..n], t0 + Duration::from_millis(5));
    assert!(p.poll_outcome().is_none(), "a challenge is not a refusal");
    let proven = p
        .poll_transmit(t0 + Duration::from_millis(5))
        .expect("the proven Post goes out at once");
    let ClientMessage::Post(post) = parse_client(&proven.payload).unwrap() else {
        panic!("a Post was expected");
    };
    assert_eq!(post.tid, tid);
    assert!(proves_move(&base, &post, moved, unix));
    assert!(
        proves_move(&base, &post, moved, unix + CHALLENGE_BUCKET_SECS),
        "one bucket late"
    );
    assert!(
        !proves_move(&base, &post, moved, unix + 2 * CHALLENGE_BUCKET_SECS),
        "stale"
    );
    let elsewhere: SocketAddr = "203.0.113.66:5000".parse().unwrap();
    assert!(
        !proves_move(&base, &post, elsewhere, unix),
        "bound to the address"
    );
    // The first Post (what a sniffer has) proves nothing.
    let ClientMessage::Post(plain) = parse_client(&first.payload).unwrap() else {
        panic!("a Post was expected");
    };
    assert!(!proves_move(&base, &plain, moved, unix));
    // Another participant's move key does not sign for this one.
    let mut other = invs[0].clone();
    other.mover = invs[1].mover.clone();
    let mut q = poster(&other, t0);
    let _ = q.poll_transmit(t0);
    q.handle_input(&out[..n], t0);
    let forged = q.poll_transmit(t0).unwrap();
    let ClientMessage::Post(forged) = parse_client(&forged.payload).unwrap() else {
        panic!("a Post was expected");
    };
    assert!(!proves_move(&base, &forged, moved, unix));
    // Without a move key (an old invitation) a challenge ends the exchange.
    let mut old = invs[0].clone();
    old.mover = None;
    let mut r = poster(&old, t0);
    let _ = r.poll_transmit(t0);
    r.handle_input(&out[..n], t0);
    assert!(matches!(
        r.poll_outcome(),
        Some(Err(PostError::Rejected { code: 401, .. }))
    ));
}

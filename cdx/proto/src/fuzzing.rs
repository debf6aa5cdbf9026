//! One entry point that feeds a byte string to every parser CDX runs on
//! untrusted input, for the `cdx/fuzz` target and the seeded smoke test
//! that runs in the test suite. Not API.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natrix_model::invitation::Invitation;

use crate::binding::{BindingResponder, Grid, Outcome, Site};
use crate::discovery::{Discovery, Socket};
use crate::exchange::client::{ConnectionData, PostSeeds, Poster};
use crate::exchange::{Entry, is_exchange, parse_client};
use crate::handoff;

/// Runs `data` through every parser at `now`. Panics (the fuzzer's
/// finding) only when an invariant breaks.
pub fn exercise(data: &[u8], now: Instant) {
    let client = SocketAddr::from(([198, 51, 100, 7], 40000));
    let server = SocketAddr::from(([192, 0, 2, 1], 3478));
    let mut out = [0u8; 1500];

    // The Binding responder, plain and at every cell of a full grid.
    let responder = BindingResponder::new(Some("natrix fuzz".into()));
    check_answer(&responder.handle(data, client, &mut out), out.len());
    let grid = Grid {
        ips: [server.ip(), IpAddr::from([192, 0, 2, 2])],
        advertised: [
            IpAddr::from([203, 0, 113, 1]),
            IpAddr::from([203, 0, 113, 2]),
        ],
        ports: [3478, 3479],
        alt_ip: true,
        alt_port: true,
        sibling: false,
    };
    for arrived in grid.cells() {
        let site = Some(Site { grid, arrived });
        let outcome = responder.handle_at(data, client, site, &mut out);
        check_answer(&outcome, out.len());
        if let Outcome::Reply {
            route: Some((via, _)),
            ..
        } = outcome
        {
            assert!(grid.has(via), "routed to a cell the grid lacks");
        }
    }

    // The exchange's parsers.
    let _ = is_exchange(data);
    let _ = parse_client(data);
    if let Some(e) = Entry::parse(data) {
        assert_eq!(Entry::parse(&e.to_bytes()), Some(e));
    }
    let _ = ConnectionData::decode(data);

    // Sibling hand-offs: arbitrary input, and a sealed round trip.
    let key = handoff::key(b"a cluster secret for fuzzing");
    let _ = handoff::open(&key, 1_000_000, data);
    for port in 0..2 {
        if let Some(n) = handoff::seal(&key, 1_000_000, port, client, data, &mut out) {
            let opened = handoff::open(&key, 1_000_100, &out[..n]);
            let handed = opened.unwrap_or_else(|e| panic!("own hand-off refused: {e:?}"));
            assert_eq!(
                (handed.request, handed.client, handed.arrived_port),
                (data, client, port)
            );
        }
    }

    // The client state machines answered by a hostile server.
    let invitation = Invitation::mint_session(b"fuzz", 2, u64::MAX, &mut |b: &mut [u8]| {
        b.fill(7);
    })
    .remove(0);
    let data_plain = ConnectionData {
        class: None,
        candidates: Vec::new(),
    };
    let seeds = PostSeeds {
        nonce: [1; 12],
        tid: [2; 12],
    };
    if let Ok(mut poster) = Poster::new(
        &invitation,
        &data_plain,
        None,
        1,
        seeds,
        now,
        Duration::from_secs(5),
    ) {
        let _ = poster.poll_transmit(now);
        poster.handle_input(data, now);
        while poster.poll_transmit(now).is_some() {}
        let _ = poster.poll_outcome();
    }
    let local = SocketAddr::from(([10, 0, 0, 2], 40000));
    let mut discovery = Discovery::new(server, local, [3; 32], now);
    while discovery.poll_transmit().is_some() {}
    discovery.handle_input(Socket::Primary, server, data, now);
    discovery.handle_input(Socket::Fresh, server, data, now);
    let _ = discovery.poll_transmit();
}

fn check_answer(outcome: &Outcome, room: usize) {
    if let Outcome::Reply { len, .. } = outcome {
        assert!(*len <= room && *len >= 20, "answer of {len} bytes");
    }
}

//! Drives the sans-IO TURN core with arbitrary operation sequences: raw
//! client packets, authenticated requests with arbitrary attributes (signed
//! by the harness, so the fuzzer reaches past authentication), peer
//! datagrams and time jumps. The core must never panic, and its allocation
//! gauge must match what it reports.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use natrix_relay_proto::{
    AllocationId, ClientAction, ClientSocket, Credentials, PEER_HEADROOM, PeerPolicy, PortRange,
    RelayAddress, RelaySockets, Server, ServerConfig, SharedPorts, Transport,
};
use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, IntegrityKey, Message, MessageType, Method,
    TransactionId, long_term_key_md5,
};

struct Sockets(Vec<AllocationId>);

impl RelaySockets for Sockets {
    fn open(&mut self, id: AllocationId, _: SocketAddr, _: bool) -> std::io::Result<()> {
        self.0.push(id);
        Ok(())
    }

    // TCP allocations (RFC 6062) too: Connect and ConnectionBind reach the
    // core's connection table.
    fn listen(&mut self, id: AllocationId, _: SocketAddr) -> std::io::Result<()> {
        self.0.push(id);
        Ok(())
    }
}

fn client(k: u8) -> ClientSocket {
    ClientSocket {
        transport: if k & 4 == 0 { Transport::Udp } else { Transport::Tcp },
        client: SocketAddr::from(([198, 51, 100, 1 + (k & 3)], 40000)),
        server: SocketAddr::from(([192, 0, 2, 1], 3478)),
    }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut users = HashMap::new();
    users.insert("u".to_string(), "p".to_string());
    let config = ServerConfig {
        relay_v4: Some(RelayAddress {
            bind: "10.0.0.1".parse().unwrap(),
            public: "192.0.2.1".parse().unwrap(),
        }),
        user_quota: 4,
        max_allocations: 6,
        // Two ports, then shared sockets: both kinds of relayed address.
        multiplex_ports: vec![3480],
        ..ServerConfig::default()
    };
    let mut server = Server::new(
        config,
        Credentials::new("r", Vec::new(), users, None),
        PeerPolicy::new(&[], &["203.0.113.0/24".parse().unwrap()]),
        SharedPorts::new(PortRange { min: 50000, max: 50001 }),
        t0,
        1_800_000_000,
        [7; 32],
    );
    let key = IntegrityKey::new(&long_term_key_md5("u", "r", "p"));
    let mut sockets = Sockets(Vec::new());
    let mut out = vec![0u8; 1500];
    let mut now = t0;
    let mut nonces: HashMap<u8, String> = HashMap::new();
    let mut input = data;
    while input.len() >= 2 {
        let (op, k, len) = (input[0] % 4, input[1], usize::from(input.get(2).copied().unwrap_or(0)));
        let body = input.get(3..3 + len).unwrap_or(&input[input.len().min(3)..]);
        input = input.get(3 + len..).unwrap_or(&[]);
        let from = client(k);
        match op {
            0 => {
                if let ClientAction::Reply(n) =
                    server.handle_client_input(body, from, now, &mut out, &mut sockets)
                {
                    if let Ok(msg) = Message::parse(&out[..n]) {
                        if let Some(Ok(Attribute::Nonce(nonce))) = msg.decode(AttributeType::NONCE) {
                            nonces.insert(k & 7, nonce.to_string());
                        }
                    }
                }
            }
            1 => {
                // An authenticated request: method from `k`, attributes
                // from `body` (raw type/length/value triples).
                let method = [Method::ALLOCATE, Method::REFRESH, Method::CREATE_PERMISSION, Method::CHANNEL_BIND][usize::from(k >> 4) % 4];
                let nonce = nonces.get(&(k & 7)).cloned().unwrap_or_default();
                let mut buf = vec![0u8; 2048];
                let tid = TransactionId([k; 12]);
                let Ok(mut enc) = Encoder::new(&mut buf, MessageType::new(method, Class::Request), &tid) else { continue };
                let mut rest = body;
                while rest.len() >= 3 {
                    let ty = AttributeType(u16::from_be_bytes([rest[0], rest[1]]) & 0x7fff);
                    let l = usize::from(rest[2]).min(rest.len() - 3);
                    if ty == AttributeType::MESSAGE_INTEGRITY || ty == AttributeType::MESSAGE_INTEGRITY_SHA256 || ty == AttributeType::FINGERPRINT {
                        rest = &rest[3 + l..];
                        continue;
                    }
                    let _ = enc.raw(ty, &rest[3..3 + l]);
                    rest = &rest[3 + l..];
                }
                let _ = enc.attribute(&Attribute::Username("u"));
                let _ = enc.attribute(&Attribute::Realm("r"));
                let _ = enc.attribute(&Attribute::Nonce(&nonce));
                let _ = enc.integrity(&key);
                let n = enc.finish();
                let _ = server.handle_client_input(&buf[..n], from, now, &mut out, &mut sockets);
            }
            2 => {
                if let Some(&id) = sockets.0.get(usize::from(k) % sockets.0.len().max(1)) {
                    let mut buf = vec![0u8; PEER_HEADROOM + body.len() + 8];
                    buf[PEER_HEADROOM..PEER_HEADROOM + body.len()].copy_from_slice(body);
                    let peer = SocketAddr::from(([203, 0, 113, k & 3], 5000 + u16::from(k >> 6)));
                    let _ = server.handle_peer_input(id, peer, &mut buf, PEER_HEADROOM..PEER_HEADROOM + body.len(), now);
                }
            }
            _ => {
                now += Duration::from_secs(u64::from(k) * 8);
                server.handle_timeout(now);
                while server.poll_command().is_some() {}
            }
        }
        assert_eq!(server.stats().allocations as usize, server.allocation_count());
    }
});

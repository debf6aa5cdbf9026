//! Sans-IO scenarios: inputs at explicit instants, the exact answers and
//! commands asserted. Names read as sentences.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // each test takes its base instant from the clock once

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natrix_model::TurnSecret;
use natrix_relay_proto::{
    AllocationId, Alternate, ClientAction, ClientSocket, Command, Credentials, DropReason, IpNet,
    PEER_HEADROOM, PeerPolicy, PortRange, Refusal, RelayAddress, RelaySockets, Server,
    ServerConfig, SharedPorts, Transport, UnauthLimits,
};
use natrix_wire::{
    Attribute, AttributeType, ChannelData, Class, Encoder, EvenPort, IntegrityKey, Message,
    MessageType, Method, TransactionId, long_term_key_md5,
};

const REALM: &str = "natrix.test";
const UNIX_T0: u64 = 1_800_000_000;
const SECRET: &[u8] = b"rest-secret-0123456789";

/// Records the sockets the core asks for; can be told to fail.
#[derive(Default)]
struct Sockets {
    opened: Vec<(AllocationId, SocketAddr, bool)>,
    /// Fail this many opens with `fail_with` (address in use by default).
    refuse: usize,
    fail_with: Option<std::io::ErrorKind>,
    /// TCP allocations' listeners (RFC 6062).
    listened: Vec<(AllocationId, SocketAddr)>,
}

impl RelaySockets for Sockets {
    fn open(&mut self, id: AllocationId, addr: SocketAddr, df: bool) -> std::io::Result<()> {
        if self.refuse > 0 {
            self.refuse -= 1;
            let kind = self.fail_with.unwrap_or(std::io::ErrorKind::AddrInUse);
            return Err(std::io::Error::from(kind));
        }
        self.opened.push((id, addr, df));
        Ok(())
    }

    fn listen(&mut self, id: AllocationId, addr: SocketAddr) -> std::io::Result<()> {
        self.listened.push((id, addr));
        Ok(())
    }
}

struct Harness {
    server: Server,
    sockets: Sockets,
    t0: Instant,
    out: Vec<u8>,
}

fn client(port: u16) -> ClientSocket {
    ClientSocket {
        transport: Transport::Udp,
        client: SocketAddr::from(([198, 51, 100, 7], port)),
        server: SocketAddr::from(([192, 0, 2, 1], 3478)),
    }
}

fn peer(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, last], port))
}

fn config() -> ServerConfig {
    ServerConfig {
        relay_v4: Some(RelayAddress {
            bind: "10.0.0.5".parse().unwrap(),
            public: "192.0.2.1".parse().unwrap(),
        }),
        ..ServerConfig::default()
    }
}

/// Test peers live in documentation ranges, denied by default: allow them.
fn policy() -> PeerPolicy {
    PeerPolicy::new(&[], &["203.0.113.0/24".parse::<IpNet>().unwrap()])
}

fn credentials() -> Credentials {
    let mut users = HashMap::new();
    users.insert("alice".to_string(), "wonderland".to_string());
    users.insert("bob".to_string(), "builder".to_string());
    Credentials::new(
        REALM,
        vec![
            TurnSecret::new("new", "newer-secret-0123456789").unwrap(),
            TurnSecret::new("old", std::str::from_utf8(SECRET).unwrap()).unwrap(),
        ],
        users,
        Some("relay-1".into()),
    )
}

impl Harness {
    fn new(config: ServerConfig) -> Harness {
        Harness::with_policy(config, policy())
    }

    fn with_policy(config: ServerConfig, policy: PeerPolicy) -> Harness {
        Harness::with_ports(
            config,
            policy,
            PortRange {
                min: 50000,
                max: 50099,
            },
        )
    }

    /// One relay port (50000), then the shared ports `multiplex`
    /// (`--relay-multiplex-ports`).
    fn one_port(config: ServerConfig, policy: PeerPolicy, multiplex: &[u16]) -> Harness {
        Harness::with_ports(
            ServerConfig {
                multiplex_ports: multiplex.to_vec(),
                ..config
            },
            policy,
            PortRange {
                min: 50000,
                max: 50000,
            },
        )
    }

    fn with_ports(config: ServerConfig, policy: PeerPolicy, ports: PortRange) -> Harness {
        let t0 = Instant::now();
        Harness {
            server: Server::new(
                config,
                credentials(),
                policy,
                SharedPorts::new(ports),
                t0,
                UNIX_T0,
                [42; 32],
            ),
            sockets: Sockets::default(),
            t0,
            out: vec![0; 1500],
        }
    }

    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    fn input(&mut self, packet: &[u8], from: ClientSocket, now: Instant) -> ClientAction {
        self.server
            .handle_client_input(packet, from, now, &mut self.out, &mut self.sockets)
    }

    /// Sends a request; returns the raw answer.
    fn request(&mut self, packet: &[u8], from: ClientSocket, now: Instant) -> Vec<u8> {
        match self.input(packet, from, now) {
            ClientAction::Reply(len) => self.out[..len].to_vec(),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    /// Gets a nonce with an unauthenticated request.
    fn nonce(&mut self, from: ClientSocket, now: Instant) -> String {
        let req = Req::new(Method::ALLOCATE).transport(17).build_unsigned();
        let resp = self.request(&req, from, now);
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(error_code(&msg), Some(401));
        text(&msg, AttributeType::NONCE)
    }

    /// Allocates as `user` and returns the relayed address and allocation.
    fn allocate(&mut self, from: ClientSocket, user: &User, now: Instant) -> SocketAddr {
        let nonce = self.nonce(from, now);
        let req = Req::new(Method::ALLOCATE).transport(17).sign(user, &nonce);
        let resp = self.request(&req, from, now);
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(msg.class(), Class::Success, "allocate failed: {msg:?}");
        msg.verify_integrity(&user.key()).expect("a signed success");
        match msg.decode(AttributeType::XOR_RELAYED_ADDRESS) {
            Some(Ok(Attribute::XorRelayedAddress(a))) => a,
            other => panic!("no relayed address: {other:?}"),
        }
    }

    fn last_allocation(&self) -> AllocationId {
        self.sockets.opened.last().expect("a socket was opened").0
    }

    /// An allocation of `user` from `c` with a permission for `to`'s IP;
    /// its id and a nonce for further requests.
    fn allocate_permitted(
        &mut self,
        c: ClientSocket,
        user: &User,
        to: SocketAddr,
    ) -> (AllocationId, String) {
        self.allocate(c, user, self.t0);
        let id = self.last_allocation();
        let nonce = self.nonce(c, self.t0);
        let req = Req::new(Method::CREATE_PERMISSION)
            .peer(to)
            .sign(user, &nonce);
        let resp = self.request(&req, c, self.t0);
        assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
        (id, nonce)
    }
}

struct User {
    name: String,
    password: String,
}

impl User {
    fn stat(name: &str, password: &str) -> User {
        User {
            name: name.into(),
            password: password.into(),
        }
    }

    fn rest(username: &str, secret: &[u8]) -> User {
        User {
            name: username.into(),
            password: natrix_model::token::rest_password(secret, username),
        }
    }

    fn key(&self) -> IntegrityKey {
        IntegrityKey::new(&long_term_key_md5(&self.name, REALM, &self.password))
    }
}

/// A request builder.
struct Req {
    method: Method,
    tid: TransactionId,
    attrs: Vec<(AttributeType, Vec<u8>)>,
    peers: Vec<SocketAddr>,
    channel: Option<u16>,
    lifetime: Option<u32>,
    even_port: Option<EvenPort>,
}

impl Req {
    fn new(method: Method) -> Req {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&n.to_be_bytes());
        Req {
            method,
            tid: TransactionId(tid),
            attrs: Vec::new(),
            peers: Vec::new(),
            channel: None,
            lifetime: None,
            even_port: None,
        }
    }

    fn tid(mut self, tid: TransactionId) -> Req {
        self.tid = tid;
        self
    }

    fn transport(mut self, proto: u8) -> Req {
        self.attrs
            .push((AttributeType::REQUESTED_TRANSPORT, vec![proto, 0, 0, 0]));
        self
    }

    fn raw(mut self, ty: AttributeType, value: &[u8]) -> Req {
        self.attrs.push((ty, value.to_vec()));
        self
    }

    fn peer(mut self, p: SocketAddr) -> Req {
        self.peers.push(p);
        self
    }

    fn channel(mut self, n: u16) -> Req {
        self.channel = Some(n);
        self
    }

    fn lifetime(mut self, secs: u32) -> Req {
        self.lifetime = Some(secs);
        self
    }

    fn even_port(mut self, reserve_next: bool) -> Req {
        self.even_port = Some(EvenPort { reserve_next });
        self
    }

    fn body(&self, enc: &mut Encoder<'_>) {
        for (ty, v) in &self.attrs {
            enc.raw(*ty, v).unwrap();
        }
        for p in &self.peers {
            enc.attribute(&Attribute::XorPeerAddress(*p)).unwrap();
        }
        if let Some(n) = self.channel {
            enc.attribute(&Attribute::ChannelNumber(n)).unwrap();
        }
        if let Some(l) = self.lifetime {
            enc.attribute(&Attribute::Lifetime(l)).unwrap();
        }
        if let Some(e) = self.even_port {
            enc.attribute(&Attribute::EvenPort(e)).unwrap();
        }
    }

    fn build_unsigned(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 1024];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(self.method, Class::Request),
            &self.tid,
        )
        .unwrap();
        self.body(&mut enc);
        enc.fingerprint().unwrap();
        let n = enc.finish();
        buf.truncate(n);
        buf
    }

    fn sign(&self, user: &User, nonce: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 1024];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(self.method, Class::Request),
            &self.tid,
        )
        .unwrap();
        self.body(&mut enc);
        enc.attribute(&Attribute::Username(&user.name)).unwrap();
        enc.attribute(&Attribute::Realm(REALM)).unwrap();
        enc.attribute(&Attribute::Nonce(nonce)).unwrap();
        enc.integrity(&user.key()).unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        buf.truncate(n);
        buf
    }
}

fn error_code(msg: &Message<'_>) -> Option<u16> {
    match msg.decode(AttributeType::ERROR_CODE) {
        Some(Ok(Attribute::ErrorCode(e))) => Some(e.code),
        _ => None,
    }
}

fn text(msg: &Message<'_>, ty: AttributeType) -> String {
    std::str::from_utf8(msg.get(ty).expect("attribute present"))
        .unwrap()
        .to_string()
}

fn code_of(answer: &[u8]) -> Option<u16> {
    error_code(&Message::parse(answer).unwrap())
}

fn send_indication(p: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 1500];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::SEND, Class::Indication),
        &TransactionId([9; 12]),
    )
    .unwrap();
    enc.attribute(&Attribute::XorPeerAddress(p)).unwrap();
    enc.attribute(&Attribute::Data(data)).unwrap();
    let n = enc.finish();
    buf.truncate(n);
    buf
}

/// A peer datagram placed in a buffer with the headroom the core needs.
fn peer_buffer(payload: &[u8]) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut buf = vec![0xAA; PEER_HEADROOM + payload.len() + 8];
    buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
    (buf, PEER_HEADROOM..PEER_HEADROOM + payload.len())
}

#[test]
fn unauthenticated_allocate_is_challenged_with_realm_and_nonce() {
    let mut h = Harness::new(config());
    let req = Req::new(Method::ALLOCATE).transport(17).build_unsigned();
    let resp = h.request(&req, client(40000), h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Error);
    assert_eq!(error_code(&msg), Some(401));
    assert_eq!(text(&msg, AttributeType::REALM), REALM);
    assert_eq!(text(&msg, AttributeType::NONCE).len(), 32);
    assert!(msg.get(AttributeType::MESSAGE_INTEGRITY).is_none());
    assert!(h.sockets.opened.is_empty());
}

#[test]
fn allocate_with_static_credentials_opens_a_relay_socket_and_signs_the_answer() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let relayed = h.allocate(client(40000), &alice, h.t0);
    assert_eq!(relayed.ip(), "192.0.2.1".parse::<IpAddr>().unwrap());
    assert!((50000..=50099).contains(&relayed.port()));
    let (_, bound, df) = h.sockets.opened[0];
    assert_eq!(
        bound,
        SocketAddr::new("10.0.0.5".parse().unwrap(), relayed.port())
    );
    assert!(!df);
    assert_eq!(h.server.stats().allocations, 1);
    assert_eq!(h.server.stats().allocations_created, 1);
}

/// Credentials expire by the wall clock, which the shell re-reads every
/// tick: a clock stepped forward (NTP) expires a REST credential although
/// the monotonic clock barely moved; stepped back, it is valid again.
#[test]
fn rest_expiry_follows_the_wall_clock_the_shell_reports() {
    let mut h = Harness::new(config());
    let user = User::rest(&format!("{}:alice", UNIX_T0 + 60), SECRET);
    let c = client(40004);
    let nonce = h.nonce(c, h.t0);
    let allocate = Req::new(Method::ALLOCATE).transport(17).sign(&user, &nonce);
    let at = h.t0 + Duration::from_millis(200);
    h.server.set_wall_clock(at, UNIX_T0 + 3600);
    assert_eq!(code_of(&h.request(&allocate, c, at)), Some(401), "expired");
    h.server.set_wall_clock(at, UNIX_T0);
    assert_eq!(code_of(&h.request(&allocate, c, at)), None, "valid again");
}

#[test]
fn rest_credentials_work_with_every_configured_secret_until_they_expire() {
    let mut h = Harness::new(config());
    let user = User::rest(&format!("{}:alice", UNIX_T0 + 3600), SECRET);
    h.allocate(client(40001), &user, h.t0);
    let newer = User::rest(
        &format!("{}:bob", UNIX_T0 + 3600),
        b"newer-secret-0123456789",
    );
    h.allocate(client(40002), &newer, h.t0);

    let expired = User::rest(&format!("{}:carol", UNIX_T0 - 1), SECRET);
    let nonce = h.nonce(client(40003), h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&expired, &nonce);
    assert_eq!(code_of(&h.request(&req, client(40003), h.t0)), Some(401));

    let forged = User::rest(&format!("{}:mallory", UNIX_T0 + 3600), b"guessed");
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&forged, &nonce);
    assert_eq!(code_of(&h.request(&req, client(40003), h.t0)), Some(401));
    let failures = h.server.stats().auth_failures;
    assert_eq!(failures[1], 1, "one expired");
    assert_eq!(failures[3], 1, "one bad integrity");
}

#[test]
fn session_tokens_are_accepted_only_by_the_relay_they_name() {
    let mut h = Harness::new(config());
    let mine = User::rest(
        &format!("{}:00112233445566778899aabbccddeeff:relay-1", UNIX_T0 + 60),
        SECRET,
    );
    h.allocate(client(40010), &mine, h.t0);
    let theirs = User::rest(
        &format!("{}:00112233445566778899aabbccddeeff:relay-2", UNIX_T0 + 60),
        SECRET,
    );
    let nonce = h.nonce(client(40011), h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&theirs, &nonce);
    assert_eq!(code_of(&h.request(&req, client(40011), h.t0)), Some(401));
    assert_eq!(
        h.server.stats().auth_failures[2],
        1,
        "counted as wrong_relay"
    );
}

/// A session token admits its session's sides, not a pool: a third
/// allocation with the same token is refused (486) while the user quota
/// is far higher.
#[test]
fn a_session_token_holds_at_most_its_sides_allocations() {
    let mut h = Harness::new(config());
    let token = User::rest(
        &format!("{}:00112233445566778899aabbccddeeff:relay-1", UNIX_T0 + 60),
        SECRET,
    );
    h.allocate(client(40030), &token, h.t0);
    h.allocate(client(40031), &token, h.t0);
    assert_eq!(natrix_relay_proto::SESSION_TOKEN_QUOTA, 2);
    let c = client(40032);
    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&token, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(486));
    // A plain REST user keeps the configured quota.
    let plain = User::rest(&format!("{}:alice", UNIX_T0 + 60), SECRET);
    for port in 40033..40036 {
        h.allocate(client(port), &plain, h.t0);
    }
}

#[test]
fn a_session_token_naming_peers_scopes_permissions_and_channels_to_them() {
    let mut h = Harness::new(config());
    let counterpart = peer(7, 4000);
    let other = peer(8, 4000);
    let user = User::rest(
        &format!(
            "{}:00112233445566778899aabbccddeeff:relay-1:{},2001:db8::7",
            UNIX_T0 + 60,
            counterpart.ip()
        ),
        SECRET,
    );
    let c = client(40020);
    h.allocate(c, &user, h.t0);
    let nonce = h.nonce(c, h.t0);
    let permit = |p: SocketAddr| {
        Req::new(Method::CREATE_PERMISSION)
            .peer(p)
            .sign(&user, &nonce)
    };
    assert_eq!(
        code_of(&h.request(&permit(counterpart), c, h.t0)),
        None,
        "the counterpart"
    );
    assert_eq!(
        code_of(&h.request(&permit(other), c, h.t0)),
        Some(403),
        "anyone else"
    );
    let bind = Req::new(Method::CHANNEL_BIND)
        .channel(0x4001)
        .peer(other)
        .sign(&user, &nonce);
    assert_eq!(code_of(&h.request(&bind, c, h.t0)), Some(403));
    let refused = h.server.stats().refused;
    assert_eq!(refused[Refusal::PeerOutsideSession as usize], 2);
    assert_eq!(refused[Refusal::PeerDenied as usize], 0, "403, other cause");

    // Without the peers field (or with a plain REST user) nothing changes.
    let plain = User::rest(
        &format!("{}:00112233445566778899aabbccddeeff:relay-1", UNIX_T0 + 60),
        SECRET,
    );
    let d = client(40021);
    h.allocate(d, &plain, h.t0);
    let nonce = h.nonce(d, h.t0);
    let req = Req::new(Method::CREATE_PERMISSION)
        .peer(other)
        .sign(&plain, &nonce);
    assert_eq!(code_of(&h.request(&req, d, h.t0)), None);

    // A garbled list reaches nobody rather than everybody.
    assert_eq!(
        natrix_relay_proto::session_peers("1:00112233445566778899aabbccddeeff:r:not-an-ip")
            .as_deref(),
        Some(&[][..])
    );
    assert_eq!(
        natrix_relay_proto::session_peers("1:00112233445566778899aabbccddeeff:r"),
        None
    );
    // An application's REST username with colons is no session token: it is
    // neither refused as naming another relay nor scoped.
    let app = User::rest(&format!("{}:alice:phone", UNIX_T0 + 60), SECRET);
    let e = client(40022);
    h.allocate(e, &app, h.t0);
    let nonce = h.nonce(e, h.t0);
    let req = Req::new(Method::CREATE_PERMISSION)
        .peer(other)
        .sign(&app, &nonce);
    assert_eq!(code_of(&h.request(&req, e, h.t0)), None);
}

#[test]
fn a_stale_nonce_gets_438_with_a_fresh_one() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let nonce = h.nonce(client(40000), h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    let resp = h.request(&req, client(40000), h.at(601));
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(error_code(&msg), Some(438));
    let fresh = text(&msg, AttributeType::NONCE);
    assert_ne!(fresh, nonce);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &fresh);
    let resp = h.request(&req, client(40000), h.at(601));
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
}

#[test]
fn a_nonce_issued_to_another_address_is_refused() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let nonce = h.nonce(client(40000), h.t0);
    let elsewhere = ClientSocket {
        client: SocketAddr::from(([198, 51, 100, 8], 40000)),
        ..client(40000)
    };
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, elsewhere, h.t0)), Some(438));
}

#[test]
fn allocate_errors_carry_the_right_codes() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(40000);
    let nonce = h.nonce(c, h.t0);
    let cases: Vec<(Req, u16, Refusal)> = vec![
        (
            Req::new(Method::ALLOCATE),
            400,
            Refusal::MissingRequestedTransport,
        ),
        (
            Req::new(Method::ALLOCATE).transport(132), // SCTP
            442,
            Refusal::UnsupportedTransport,
        ),
        (
            Req::new(Method::ALLOCATE).transport(6), // TCP over UDP
            400,
            Refusal::TcpOverUdp,
        ),
        (
            Req::new(Method::ALLOCATE)
                .transport(17)
                .raw(AttributeType::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]),
            440, // no IPv6 relay address configured
            Refusal::AddressFamilyNotSupported,
        ),
        (
            Req::new(Method::ALLOCATE)
                .transport(17)
                .raw(AttributeType::RESERVATION_TOKEN, &[1; 8])
                .even_port(false),
            400,
            Refusal::ConflictingAttributes,
        ),
        (
            Req::new(Method::ALLOCATE)
                .transport(17)
                .raw(AttributeType::RESERVATION_TOKEN, &[1; 8]),
            508,
            Refusal::UnknownReservation,
        ),
    ];
    for (req, code, cause) in cases {
        let before = h.server.stats().refused;
        let resp = h.request(&req.sign(&alice, &nonce), c, h.t0);
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(error_code(&msg), Some(code), "{cause:?}");
        assert_eq!(cause.code().code, code);
        msg.verify_integrity(&alice.key())
            .expect("errors after authentication are signed");
        let after = h.server.stats().refused;
        for r in Refusal::ALL {
            let counted = after[r as usize] - before[r as usize];
            assert_eq!(counted, u64::from(r == cause), "{r:?} for {cause:?}");
        }
    }
    // Unknown comprehension-required attribute: 420 listing it.
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType(0x7ff0), &[0; 4])
        .sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(error_code(&msg), Some(420));
    assert_eq!(
        msg.get(AttributeType::UNKNOWN_ATTRIBUTES),
        Some(&[0x7f, 0xf0][..])
    );
    assert_eq!(
        h.server.stats().refused[Refusal::UnknownAttribute as usize],
        1
    );
    assert!(h.sockets.opened.is_empty());
}

#[test]
fn allocate_retransmission_gets_the_same_answer_and_a_new_allocate_gets_437() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(40000);
    let nonce = h.nonce(c, h.t0);
    let tid = TransactionId([5; 12]);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .tid(tid)
        .sign(&alice, &nonce);
    let first = h.request(&req, c, h.t0);
    let again = h.request(&req, c, h.t0);
    let addr = |b: &[u8]| -> Option<SocketAddr> {
        match Message::parse(b)
            .ok()?
            .decode(AttributeType::XOR_RELAYED_ADDRESS)
        {
            Some(Ok(Attribute::XorRelayedAddress(a))) => Some(a),
            _ => None,
        }
    };
    assert!(addr(&first).is_some());
    assert_eq!(addr(&first), addr(&again));
    assert_eq!(h.sockets.opened.len(), 1);
    let other = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&other, c, h.t0)), Some(437));
}

#[test]
fn another_users_credentials_on_an_allocation_get_441() {
    let mut h = Harness::new(config());
    let c = client(40000);
    h.allocate(c, &User::stat("alice", "wonderland"), h.t0);
    let bob = User::stat("bob", "builder");
    let nonce = h.nonce(client(40001), h.t0);
    let req = Req::new(Method::REFRESH).sign(&bob, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(441));
}

#[test]
fn quota_per_user_and_capacity_are_enforced() {
    let mut h = Harness::new(ServerConfig {
        user_quota: 2,
        max_allocations: 3,
        ..config()
    });
    let alice = User::stat("alice", "wonderland");
    h.allocate(client(1), &alice, h.t0);
    h.allocate(client(2), &alice, h.t0);
    let nonce = h.nonce(client(3), h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, client(3), h.t0)), Some(486));
    let bob = User::stat("bob", "builder");
    h.allocate(client(4), &bob, h.t0);
    let req = Req::new(Method::ALLOCATE).transport(17).sign(&bob, &nonce);
    assert_eq!(code_of(&h.request(&req, client(5), h.t0)), Some(508));
    let refused = h.server.stats().refused;
    assert_eq!(refused[Refusal::UserQuota as usize], 1);
    assert_eq!(refused[Refusal::HostCapacity as usize], 1, "508: capacity");
    assert_eq!(refused[Refusal::Draining as usize], 0, "not draining");
}

#[test]
fn a_port_held_by_another_process_is_skipped() {
    let mut h = Harness::new(config());
    h.sockets.refuse = 2;
    h.allocate(client(1), &User::stat("alice", "wonderland"), h.t0);
    assert_eq!(h.sockets.opened.len(), 1);
}

#[test]
fn even_port_with_reservation_gives_the_next_port_to_the_token_holder() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .even_port(true)
        .sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    let msg = Message::parse(&resp).unwrap();
    let Some(Ok(Attribute::XorRelayedAddress(first))) =
        msg.decode(AttributeType::XOR_RELAYED_ADDRESS)
    else {
        panic!("no relayed address");
    };
    assert_eq!(first.port() % 2, 0);
    let token = msg.get(AttributeType::RESERVATION_TOKEN).unwrap().to_vec();
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType::RESERVATION_TOKEN, &token)
        .sign(&alice, &nonce);
    let resp = h.request(&req, client(2), h.t0);
    let Some(Ok(Attribute::XorRelayedAddress(second))) = Message::parse(&resp)
        .unwrap()
        .decode(AttributeType::XOR_RELAYED_ADDRESS)
    else {
        panic!("no relayed address");
    };
    assert_eq!(second.port(), first.port() + 1);
}

/// STUN lengths are 16 bits: a peer datagram whose Data indication would
/// not fit is dropped and counted, never framed with a wrapped length.
#[test]
fn a_peer_datagram_too_large_for_a_data_indication_is_dropped_not_wrapped() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let (id, _) = h.allocate_permitted(client(1), &alice, peer(9, 1));
    // Header 20 + XOR-PEER-ADDRESS 12 + DATA header 4 + 65 520: a body of
    // 65 536 bytes.
    let (mut buf, range) = peer_buffer(&vec![7u8; 65_520]);
    assert_eq!(
        h.server
            .handle_peer_input(id, peer(9, 5000), &mut buf, range, h.t0),
        Err(DropReason::TooLarge)
    );
    assert_eq!(h.server.stats().dropped[DropReason::TooLarge as usize], 1);
    // One byte less per 4 still fits.
    let (mut buf, range) = peer_buffer(&vec![7u8; 65_516]);
    let action = h
        .server
        .handle_peer_input(id, peer(9, 5000), &mut buf, range, h.t0)
        .unwrap();
    let msg = Message::parse(&buf[action.frame]).unwrap();
    assert_eq!(msg.get(AttributeType::DATA).map(<[u8]>::len), Some(65_516));
}

/// The relay's own address is a peer only at its relay ports (relay to
/// relay): a Send indication to its TURN listener is dropped, a channel to
/// it refused, while another allocation on it is reached.
#[test]
fn the_relays_own_address_is_reachable_only_at_relay_ports() {
    // A public address (not in the default deny-list), as a relay's is.
    let own = SocketAddr::from(([44, 0, 0, 5], 3478));
    let policy = policy().with_own([own.ip()], (50000, 50099));
    let mut h = Harness::with_policy(config(), policy);
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let (_, nonce) = h.allocate_permitted(c, &alice, own);
    let to_listener = send_indication(own, b"turn inside turn");
    assert_eq!(
        h.input(&to_listener, c, h.t0),
        ClientAction::Drop(DropReason::OwnAddress)
    );
    assert_eq!(h.server.stats().dropped[DropReason::OwnAddress as usize], 1);
    let to_allocation =
        send_indication(SocketAddr::from(([44, 0, 0, 5], 50007)), b"relay to relay");
    assert!(matches!(
        h.input(&to_allocation, c, h.t0),
        ClientAction::ToPeer { .. }
    ));
    let bind = Req::new(Method::CHANNEL_BIND)
        .channel(0x4001)
        .peer(own)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&bind, c, h.t0)), Some(403));
}

#[test]
fn permissions_gate_traffic_both_ways_and_denied_peers_get_403() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    h.allocate(c, &alice, h.t0);
    let id = h.last_allocation();
    let nonce = h.nonce(c, h.t0);

    // Before any permission: both directions dropped.
    let send = send_indication(peer(9, 5000), b"hello");
    assert_eq!(
        h.input(&send, c, h.t0),
        ClientAction::Drop(DropReason::NoPermission)
    );
    let (mut buf, range) = peer_buffer(b"reply");
    assert_eq!(
        h.server
            .handle_peer_input(id, peer(9, 5000), &mut buf, range, h.t0),
        Err(DropReason::NoPermission)
    );

    // A denied address (loopback, metadata) gets 403 and installs nothing.
    for denied in ["127.0.0.1:80", "169.254.169.254:80", "10.1.1.1:53"] {
        let req = Req::new(Method::CREATE_PERMISSION)
            .peer(denied.parse().unwrap())
            .sign(&alice, &nonce);
        assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(403), "{denied}");
    }
    assert_eq!(h.server.stats().refused[Refusal::PeerDenied as usize], 3);

    let req = Req::new(Method::CREATE_PERMISSION)
        .peer(peer(9, 1))
        .sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);

    // Permissions are per IP: any port of that peer now passes.
    let packet = send_indication(peer(9, 5000), b"hello");
    match h.input(&packet, c, h.at(1)) {
        ClientAction::ToPeer {
            allocation,
            peer: to,
            payload,
        } => {
            assert_eq!(allocation, id);
            assert_eq!(to, peer(9, 5000));
            assert_eq!(&packet[payload], b"hello");
        }
        other => panic!("expected forwarding, got {other:?}"),
    }

    // Peer → client without a channel: a Data indication built in place.
    let (mut buf, range) = peer_buffer(b"reply!");
    let action = h
        .server
        .handle_peer_input(id, peer(9, 5000), &mut buf, range, h.at(1))
        .unwrap();
    assert_eq!(action.client, c);
    let msg = Message::parse(&buf[action.frame.clone()]).unwrap();
    assert_eq!(msg.method(), Method::DATA);
    assert_eq!(msg.class(), Class::Indication);
    assert_eq!(
        msg.decode(AttributeType::XOR_PEER_ADDRESS)
            .unwrap()
            .unwrap(),
        Attribute::XorPeerAddress(peer(9, 5000))
    );
    assert_eq!(msg.get(AttributeType::DATA), Some(&b"reply!"[..]));
    assert_eq!(action.frame.len() % 4, 0);

    // The permission lapses after 300 s without refresh.
    h.server.handle_timeout(h.at(301));
    assert_eq!(
        h.input(&packet, c, h.at(301)),
        ClientAction::Drop(DropReason::NoPermission)
    );
}

#[test]
fn channels_carry_data_with_a_four_byte_header_and_pad_on_streams() {
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut h = Harness::new(config());
        let alice = User::stat("alice", "wonderland");
        let c = ClientSocket {
            transport,
            ..client(1)
        };
        h.allocate(c, &alice, h.t0);
        let id = h.last_allocation();
        let nonce = h.nonce(c, h.t0);
        let p = peer(9, 7000);
        let req = Req::new(Method::CHANNEL_BIND)
            .channel(0x4001)
            .peer(p)
            .sign(&alice, &nonce);
        let resp = h.request(&req, c, h.t0);
        assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);

        let mut frame = vec![0u8; 12];
        let n = ChannelData::encode(
            &mut frame,
            natrix_wire::ChannelNumber::new(0x4001).unwrap(),
            b"abcde",
            transport != Transport::Udp,
        )
        .unwrap();
        match h.input(&frame[..n], c, h.t0) {
            ClientAction::ToPeer {
                peer: to, payload, ..
            } => {
                assert_eq!(to, p);
                assert_eq!(&frame[payload], b"abcde");
            }
            other => panic!("{other:?}"),
        }
        let (mut buf, range) = peer_buffer(b"xyz");
        let action = h
            .server
            .handle_peer_input(id, p, &mut buf, range, h.t0)
            .unwrap();
        let framed = &buf[action.frame];
        assert_eq!(&framed[..4], &[0x40, 0x01, 0x00, 0x03]);
        assert_eq!(&framed[4..7], b"xyz");
        if transport == Transport::Udp {
            assert_eq!(framed.len(), 7);
        } else {
            assert_eq!(framed, &[0x40, 0x01, 0, 3, b'x', b'y', b'z', 0]);
        }

        // An unbound channel number is a counted drop.
        let mut other = frame.clone();
        other[1] = 0x02;
        assert_eq!(
            h.input(&other[..n], c, h.t0),
            ClientAction::Drop(DropReason::UnboundChannel)
        );
    }
}

#[test]
fn channel_bindings_expire_after_ten_minutes_and_cool_down_for_five() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    h.allocate(c, &alice, h.t0);
    let t0 = h.t0;
    let at = |secs| t0 + Duration::from_secs(secs);
    let bind = |h: &mut Harness, n: u16, p: SocketAddr, now: Instant| -> Option<u16> {
        let nonce = h.nonce(c, now);
        let req = Req::new(Method::CHANNEL_BIND)
            .channel(n)
            .peer(p)
            .sign(&alice, &nonce);
        let resp = h.request(&req, c, now);
        code_of(&resp)
    };
    assert_eq!(bind(&mut h, 0x4000, peer(1, 1), t0), None);
    // Conflicts while bound: the number to another peer, the peer to
    // another number.
    assert_eq!(bind(&mut h, 0x4000, peer(2, 1), t0), Some(400));
    assert_eq!(bind(&mut h, 0x4001, peer(1, 1), t0), Some(400));
    // Out of range.
    assert_eq!(bind(&mut h, 0x3fff, peer(3, 1), t0), Some(400));
    // Keep the allocation alive past the binding's lifetime.
    let nonce = h.nonce(c, at(500));
    let refresh = Req::new(Method::REFRESH)
        .lifetime(3600)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&refresh, c, at(500))), None);
    // Permissions last 300 s; refresh it without touching the channel.
    let perm = Req::new(Method::CREATE_PERMISSION)
        .peer(peer(1, 1))
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&perm, c, at(500))), None);

    let data = [0x40, 0x00, 0x00, 0x01, 0x55];
    assert!(matches!(
        h.input(&data, c, at(599)),
        ClientAction::ToPeer { .. }
    ));
    h.server.handle_timeout(at(601));
    assert_eq!(
        h.input(&data, c, at(601)),
        ClientAction::Drop(DropReason::UnboundChannel)
    );
    // Cooling down: still reserved for the same pair, refused for others.
    assert_eq!(bind(&mut h, 0x4000, peer(2, 1), at(700)), Some(400));
    h.server.handle_timeout(at(901));
    assert_eq!(bind(&mut h, 0x4000, peer(2, 1), at(901)), None);
}

#[test]
fn refresh_with_lifetime_zero_deletes_and_expiry_closes_the_socket() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let relayed = h.allocate(c, &alice, h.t0);
    let id = h.last_allocation();
    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(
        msg.decode(AttributeType::LIFETIME).unwrap().unwrap(),
        Attribute::Lifetime(0)
    );
    assert_eq!(
        h.server.poll_command(),
        Some(Command::CloseRelay {
            allocation: id,
            relayed
        })
    );
    let req = Req::new(Method::REFRESH).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(437));
    let (mut buf, range) = peer_buffer(b"late");
    assert_eq!(
        h.server
            .handle_peer_input(id, peer(1, 1), &mut buf, range, h.t0),
        Err(DropReason::StaleAllocation)
    );

    // An allocation that is not refreshed expires on its own.
    let c2 = client(2);
    h.allocate(c2, &alice, h.t0);
    h.server.handle_timeout(h.at(599));
    assert_eq!(h.server.poll_command(), None);
    h.server.handle_timeout(h.at(601));
    assert!(matches!(
        h.server.poll_command(),
        Some(Command::CloseRelay { .. })
    ));
    let s = h.server.stats();
    assert_eq!(
        (s.allocations, s.allocations_deleted, s.allocations_expired),
        (0, 1, 1)
    );
}

#[test]
fn requested_lifetimes_are_clamped() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    h.allocate(c, &alice, h.t0);
    let nonce = h.nonce(c, h.t0);
    for (asked, granted) in [(30, 600), (1200, 1200), (86_400, 3600)] {
        let req = Req::new(Method::REFRESH)
            .lifetime(asked)
            .sign(&alice, &nonce);
        let resp = h.request(&req, c, h.t0);
        assert_eq!(
            Message::parse(&resp)
                .unwrap()
                .decode(AttributeType::LIFETIME)
                .unwrap()
                .unwrap(),
            Attribute::Lifetime(granted)
        );
    }
}

#[test]
fn requests_without_an_allocation_get_437_and_data_is_dropped() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let nonce = h.nonce(c, h.t0);
    for req in [
        Req::new(Method::REFRESH),
        Req::new(Method::CREATE_PERMISSION).peer(peer(1, 1)),
        Req::new(Method::CHANNEL_BIND)
            .channel(0x4000)
            .peer(peer(1, 1)),
    ] {
        assert_eq!(
            code_of(&h.request(&req.sign(&alice, &nonce), c, h.t0)),
            Some(437)
        );
    }
    assert_eq!(
        h.input(&send_indication(peer(1, 1), b"x"), c, h.t0),
        ClientAction::Drop(DropReason::NoAllocation)
    );
    assert_eq!(
        h.input(&[0x40, 0, 0, 1, 7], c, h.t0),
        ClientAction::Drop(DropReason::NoAllocation)
    );
}

/// Unauthenticated answers capped at a burst of 10 per source prefix.
fn capped_unauth() -> ServerConfig {
    ServerConfig {
        unauth: UnauthLimits {
            per_prefix_rate: 1.0,
            per_prefix_burst: 10.0,
            total_rate: 1000.0,
            total_burst: 1000.0,
        },
        ..config()
    }
}

#[test]
fn unauthenticated_answers_are_capped_per_prefix() {
    let mut h = Harness::new(capped_unauth());
    let req = Req::new(Method::ALLOCATE).transport(17).build_unsigned();
    let mut answered = 0;
    let mut limited = 0;
    for port in 0..100 {
        match h.input(&req, client(port), h.t0) {
            ClientAction::Reply(len) => {
                answered += 1;
                // Worst case response/request ratio stays small.
                assert!(len <= 4 * req.len(), "{len} bytes for {}", req.len());
            }
            ClientAction::Drop(DropReason::RateLimited) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((answered, limited), (10, 90));
    assert_eq!(
        h.server.stats().dropped[DropReason::RateLimited as usize],
        90
    );
    // Over TCP the source is proven by the handshake: no reflection to
    // bound, and a dropped challenge would only leave the client waiting.
    for port in 0..100 {
        let tcp = ClientSocket {
            transport: Transport::Tcp,
            ..client(port)
        };
        assert!(
            matches!(h.input(&req, tcp, h.t0), ClientAction::Reply(_)),
            "TCP challenge {port} was not answered"
        );
    }
}

#[test]
fn bandwidth_cap_drops_the_excess() {
    let mut h = Harness::new(ServerConfig {
        bandwidth_per_allocation: Some(1000),
        ..config()
    });
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    h.allocate_permitted(c, &alice, peer(1, 1));
    let packet = send_indication(peer(1, 1), &[0u8; 400]);
    let forwarded = (0..5)
        .filter(|_| matches!(h.input(&packet, c, h.t0), ClientAction::ToPeer { .. }))
        .count();
    assert_eq!(
        forwarded, 2,
        "1000 bytes/s allows two 400-byte packets at once"
    );
    assert!(matches!(
        h.input(&packet, c, h.at(1)),
        ClientAction::ToPeer { .. }
    ));
}

#[test]
fn garbage_never_panics_and_is_counted() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    h.allocate(c, &alice, h.t0);
    let mut seed = 0x1234_5678_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let len = (next() % 300) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(first) = p.first_mut() {
            // Aim at both parsers.
            *first = [0x00, 0x01, 0x40, 0x7f][(next() % 4) as usize];
        }
        let _ = h.input(&p, c, h.t0);
        let _ = h.input(&p, client(2), h.t0);
    }
    assert_eq!(h.server.stats().allocations, 1);
}

/// A port held by another process leaves the pool for 30 s; a bind that
/// failed for want of descriptors or buffers gives its port back at once.
#[test]
fn only_ports_in_use_elsewhere_leave_the_pool_after_a_failed_bind() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let free = |h: &Harness| h.server.ports().available();
    assert_eq!(free(&h), 100);
    // Two ports in use by another process, then success on a third.
    h.sockets.refuse = 2;
    h.allocate(client(1), &alice, h.t0);
    assert_eq!(free(&h), 97, "two left out, one allocated");
    // Out of descriptors: refused (508) and the port returns.
    h.sockets.refuse = 1;
    h.sockets.fail_with = Some(std::io::ErrorKind::OutOfMemory);
    let nonce = h.nonce(client(2), h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, client(2), h.t0)), Some(508));
    assert_eq!(free(&h), 97, "the port went back to the pool");
    // Fifteen ports held elsewhere still allocate (the range overlaps the
    // kernel's ephemeral ports: other processes hold some at any time).
    h.sockets.fail_with = None;
    h.sockets.refuse = 15;
    h.allocate(client(3), &alice, h.t0);
    assert_eq!(free(&h), 81, "fifteen parked, one allocated");
    // The parked ports come back once their owners had time to let go.
    h.server.handle_timeout(h.at(29));
    assert_eq!(free(&h), 81);
    h.server.handle_timeout(h.at(31));
    assert_eq!(free(&h), 98, "seventeen parked ports are back");
}

/// EVEN-PORT with R: an even port another process holds costs a pair, not
/// the Allocate — the next pair is tried (its reservation made afresh, the
/// failed pair's given back), and the answer names an even port.
#[test]
fn an_even_port_held_elsewhere_moves_to_another_pair() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let free = h.server.ports().available();
    h.sockets.refuse = 3;
    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .even_port(true)
        .sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    let relayed = match msg.decode(AttributeType::XOR_RELAYED_ADDRESS) {
        Some(Ok(Attribute::XorRelayedAddress(a))) => a,
        other => panic!("no relayed address: {other:?}"),
    };
    assert_eq!(relayed.port() % 2, 0);
    assert!(msg.get(AttributeType::RESERVATION_TOKEN).is_some());
    // Three held ports parked, one allocated, one reserved.
    assert_eq!(h.server.ports().available(), free - 5);
}

#[test]
fn draining_refuses_new_allocations_and_keeps_existing_ones() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let (id, nonce) = h.allocate_permitted(c, &alice, peer(1, 1));
    h.server.set_draining(true);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, client(2), h.t0)), Some(508));
    let refused = h.server.stats().refused;
    assert_eq!(refused[Refusal::Draining as usize], 1, "508 says why");
    assert_eq!(refused[Refusal::HostCapacity as usize], 0);
    // The existing allocation still relays and can be refreshed.
    let (mut buf, range) = peer_buffer(b"still here");
    assert!(
        h.server
            .handle_peer_input(id, peer(1, 1), &mut buf, range, h.t0)
            .is_ok()
    );
    let refresh = Req::new(Method::REFRESH).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&refresh, c, h.t0)), None);
}

#[test]
fn rotated_credentials_apply_to_new_requests_only() {
    let mut h = Harness::new(config());
    let user = User::rest(&format!("{}:alice", UNIX_T0 + 3600), SECRET);
    let c = client(1);
    h.allocate(c, &user, h.t0);
    // The old secret is withdrawn: new allocations with it fail, the
    // existing allocation keeps its key.
    h.server.set_credentials(Credentials::new(
        REALM,
        vec![TurnSecret::new("next", "next-secret-0123456789").unwrap()],
        HashMap::new(),
        None,
    ));
    let nonce = h.nonce(client(2), h.t0);
    let req = Req::new(Method::ALLOCATE).transport(17).sign(&user, &nonce);
    assert_eq!(code_of(&h.request(&req, client(2), h.t0)), Some(401));
    let refresh = Req::new(Method::REFRESH).sign(&user, &nonce);
    assert_eq!(code_of(&h.request(&refresh, c, h.t0)), None);
    let next = User::rest(
        &format!("{}:bob", UNIX_T0 + 3600),
        b"next-secret-0123456789",
    );
    h.allocate(client(3), &next, h.t0);
}

#[test]
fn quota_and_capacity_hold_across_loops_sharing_a_host() {
    // Two cores (loops) of one host share their SharedPorts.
    let shared = SharedPorts::new(PortRange {
        min: 50000,
        max: 50099,
    });
    let t0 = Instant::now();
    let config = ServerConfig {
        user_quota: 2,
        max_allocations: 3,
        ..config()
    };
    let mut loops = two_loops(&config, &shared, t0);
    let alice = User::stat("alice", "wonderland");
    loops[0].allocate(client(1), &alice, t0);
    loops[1].allocate(client(2), &alice, t0);
    // Alice's third allocation is refused on either loop.
    for h in loops.iter_mut() {
        let nonce = h.nonce(client(3), t0);
        let req = Req::new(Method::ALLOCATE)
            .transport(17)
            .sign(&alice, &nonce);
        assert_eq!(code_of(&h.request(&req, client(3), t0)), Some(486));
    }
    let bob = User::stat("bob", "builder");
    loops[1].allocate(client(4), &bob, t0);
    // The host is full (3): Bob's second is refused on the other loop.
    let nonce = loops[0].nonce(client(5), t0);
    let req = Req::new(Method::ALLOCATE).transport(17).sign(&bob, &nonce);
    assert_eq!(code_of(&loops[0].request(&req, client(5), t0)), Some(508));
    // An allocation ending frees its place for everyone.
    let nonce = loops[0].nonce(client(1), t0);
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    assert_eq!(code_of(&loops[0].request(&delete, client(1), t0)), None);
    loops[1].allocate(client(6), &bob, t0);
}

/// Two cores (loops 0 and 1) of one host, sharing `shared`'s ports and
/// counts, each with its own seed.
fn two_loops(config: &ServerConfig, shared: &SharedPorts, t0: Instant) -> Vec<Harness> {
    (0..2u8)
        .map(|i| {
            let mut server = Server::new(
                config.clone(),
                credentials(),
                policy(),
                shared.clone(),
                t0,
                UNIX_T0,
                [i; 32],
            );
            server.set_shard(u16::from(i));
            Harness {
                server,
                sockets: Sockets::default(),
                t0,
                out: vec![0; 1500],
            }
        })
        .collect()
}

fn client_at(ip: [u8; 4], port: u16) -> ClientSocket {
    ClientSocket {
        client: SocketAddr::from((ip, port)),
        ..client(port)
    }
}

/// Quotas bind per client IP, per session (over all its tokens) and per
/// tenant (the API key a token names), each answered 486 and counted under
/// its own reason; an ended allocation gives its place back.
#[test]
fn source_session_and_tenant_quotas_bind_and_free_on_deallocation() {
    let mut h = Harness::new(ServerConfig {
        source_quota: 2,
        tenant_quota: 5,
        ..config()
    });
    let refuse = |h: &mut Harness, user: &User, c: ClientSocket| {
        let nonce = h.nonce(c, h.t0);
        let req = Req::new(Method::ALLOCATE).transport(17).sign(user, &nonce);
        code_of(&h.request(&req, c, h.t0))
    };
    // Per source IP: two plain users from one address, the third refused;
    // the same user from another address is served.
    let alice = User::stat("alice", "wonderland");
    let home = [198, 51, 100, 7];
    h.allocate(client_at(home, 1), &alice, h.t0);
    h.allocate(client_at(home, 2), &User::stat("bob", "builder"), h.t0);
    assert_eq!(refuse(&mut h, &alice, client_at(home, 3)), Some(486));
    h.allocate(client_at([198, 51, 100, 8], 3), &alice, h.t0);
    assert_eq!(h.server.stats().refused[Refusal::SourceQuota as usize], 1);

    // Per session: its tokens (one per side, each with its peers) together
    // hold at most SESSION_QUOTA allocations.
    let session = "00112233445566778899aabbccddeeff";
    let side = |peers: &str| {
        User::rest(
            &format!("{}:{session}.key1:relay-1:{peers}", UNIX_T0 + 60),
            SECRET,
        )
    };
    let (a, b) = (side("203.0.113.1"), side("203.0.113.2"));
    let mut ip = 10u8;
    let mut next = || {
        ip += 1;
        client_at([198, 51, 100, ip], 5000)
    };
    for user in [&a, &a, &b, &b] {
        let c = next();
        h.allocate(c, user, h.t0);
    }
    assert_eq!(natrix_relay_proto::SESSION_QUOTA, 4);
    let c = next();
    assert_eq!(refuse(&mut h, &side("203.0.113.3"), c), Some(486));
    assert_eq!(h.server.stats().refused[Refusal::SessionQuota as usize], 1);

    // Per tenant: key1 holds 4 in that session; one more session's
    // allocation reaches its quota of 5, the next is refused, and another
    // tenant is not affected.
    let other_session = |tenant: &str| {
        User::rest(
            &format!(
                "{}:ffeeddccbbaa99887766554433221100.{tenant}:relay-1",
                UNIX_T0 + 60
            ),
            SECRET,
        )
    };
    let c5 = next();
    h.allocate(c5, &other_session("key1"), h.t0);
    let c = next();
    assert_eq!(refuse(&mut h, &other_session("key1"), c), Some(486));
    assert_eq!(h.server.stats().refused[Refusal::TenantQuota as usize], 1);
    let c = next();
    h.allocate(c, &other_session("key2"), h.t0);

    // Deallocating frees the tenant's place.
    let nonce = h.nonce(c5, h.t0);
    let req = Req::new(Method::REFRESH)
        .lifetime(0)
        .sign(&other_session("key1"), &nonce);
    assert_eq!(code_of(&h.request(&req, c5, h.t0)), None);
    let c = next();
    h.allocate(c, &other_session("key1"), h.t0);
}

/// A binary upgrade: a core exports its UDP allocations at 100 s, a fresh
/// core (another process: its own port pool) built with the exported seed
/// imports them at the same moment, and everything goes on — channel data
/// both ways, a Refresh signed with a nonce the first core issued, the
/// lifetime left, the port taken in the new pool, the quotas counted; TCP
/// and TLS allocations are exported too (they move with their connections,
/// which the shell hands over).
#[test]
fn allocations_move_to_a_successor_core_and_go_on() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let relayed = h.allocate(c, &alice, h.t0);
    let id = h.last_allocation();
    let nonce = h.nonce(c, h.t0);
    let p = peer(9, 7000);
    let bind = Req::new(Method::CHANNEL_BIND)
        .channel(0x4001)
        .peer(p)
        .sign(&alice, &nonce);
    assert_eq!(
        Message::parse(&h.request(&bind, c, h.t0)).unwrap().class(),
        Class::Success
    );
    let tcp = ClientSocket {
        transport: Transport::Tcp,
        ..client(2)
    };
    h.allocate(tcp, &alice, h.t0);
    let tls = ClientSocket {
        transport: Transport::Tls,
        ..client(3)
    };
    h.allocate(tls, &alice, h.t0);

    let moved = h.server.export(h.at(100));
    let clients: Vec<ClientSocket> = moved.allocations.iter().map(|a| a.client).collect();
    assert_eq!(clients, vec![c, tcp, tls]);
    let m = &moved.allocations[0];
    assert_eq!((m.client, m.relayed), (c, relayed));
    assert_eq!(m.expires_in, Duration::from_secs(500), "600 s, 100 gone");
    assert_eq!(m.channels, vec![(0x4001, p, 500_000)]);
    assert_eq!(m.permissions, vec![(p.ip(), Duration::from_secs(200))]);

    let ports = SharedPorts::new(PortRange {
        min: 50000,
        max: 50099,
    });
    let t1 = h.at(100);
    let mut next = Server::new(
        config(),
        credentials(),
        policy(),
        ports.clone(),
        t1,
        UNIX_T0 + 100,
        moved.seed,
    );
    let only_udp = natrix_relay_proto::Moved {
        seed: moved.seed,
        allocations: moved.allocations[..1].to_vec(),
    };
    assert_eq!(next.import(&only_udp, t1), vec![id]);
    assert_eq!(next.stats().allocations, 1);
    assert_eq!(ports.available(), 99, "its port is taken in the new pool");

    // Channel data both ways.
    let mut frame = vec![0u8; 12];
    let n = ChannelData::encode(
        &mut frame,
        natrix_wire::ChannelNumber::new(0x4001).unwrap(),
        b"abcde",
        false,
    )
    .unwrap();
    let mut out = vec![0u8; 1500];
    let mut sockets = Sockets::default();
    match next.handle_client_input(&frame[..n], c, t1, &mut out, &mut sockets) {
        ClientAction::ToPeer { peer: to, .. } => assert_eq!(to, p),
        other => panic!("{other:?}"),
    }
    let (mut buf, range) = peer_buffer(b"xyz");
    let back = next.handle_peer_input(id, p, &mut buf, range, t1).unwrap();
    assert_eq!(&buf[back.frame][..4], &[0x40, 0x01, 0x00, 0x03]);

    // A Refresh with the first core's nonce is accepted: same seed.
    let refresh = Req::new(Method::REFRESH).lifetime(600).sign(&alice, &nonce);
    match next.handle_client_input(&refresh, c, t1, &mut out, &mut sockets) {
        ClientAction::Reply(len) => {
            let msg = Message::parse(&out[..len]).unwrap();
            assert_eq!(msg.class(), Class::Success, "{msg:?}");
            msg.verify_integrity(&alice.key()).unwrap();
        }
        other => panic!("{other:?}"),
    }
    // Deleting it frees the port in the new pool.
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    assert!(matches!(
        next.handle_client_input(&delete, c, t1, &mut out, &mut sockets),
        ClientAction::Reply(_)
    ));
    assert_eq!(ports.available(), 100);
    assert_eq!(next.stats().allocations, 0);
}

/// Allocates as `user` asking for a mobility ticket; returns the ticket.
fn allocate_mobile(h: &mut Harness, from: ClientSocket, user: &User) -> Vec<u8> {
    let nonce = h.nonce(from, h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType::MOBILITY_TICKET, &[])
        .sign(user, &nonce);
    let resp = h.request(&req, from, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    ticket_in(&resp)
}

/// The MOBILITY-TICKET of an answer.
fn ticket_in(answer: &[u8]) -> Vec<u8> {
    let msg = Message::parse(answer).unwrap();
    let ticket = msg
        .get(AttributeType::MOBILITY_TICKET)
        .expect("a mobility ticket")
        .to_vec();
    // Clients keep it as a C string of at most 32 bytes.
    assert!(ticket.len() <= 32 && ticket.iter().all(|b| b.is_ascii_graphic()));
    ticket
}

/// A Refresh carrying `ticket`, signed by `user` with a nonce `from` got.
fn mobility_refresh(h: &mut Harness, from: ClientSocket, user: &User, ticket: &[u8]) -> Vec<u8> {
    let nonce = h.nonce(from, h.t0);
    Req::new(Method::REFRESH)
        .lifetime(600)
        .raw(AttributeType::MOBILITY_TICKET, ticket)
        .sign(user, &nonce)
}

fn channel_frame(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; payload.len() + 8];
    let n = ChannelData::encode(
        &mut frame,
        natrix_wire::ChannelNumber::new(number).unwrap(),
        payload,
        false,
    )
    .unwrap();
    frame.truncate(n);
    frame
}

/// RFC 8016: a client whose address changed moves its allocation (relayed
/// address, permissions, channels) with a Refresh carrying its ticket and
/// signed with the allocation's key; the old address loses it, the ticket
/// is replaced, and nobody else's credentials move it.
#[test]
fn a_mobility_ticket_moves_the_allocation_to_the_clients_new_address() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let (old, new) = (client(1), client_at([198, 51, 100, 99], 4000));
    let ticket = allocate_mobile(&mut h, old, &alice);
    let id = h.last_allocation();
    let p = peer(9, 7000);
    let nonce = h.nonce(old, h.t0);
    let bind = Req::new(Method::CHANNEL_BIND)
        .channel(0x4001)
        .peer(p)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&bind, old, h.t0)), None);

    // The old address's nonce is stale at the new one (nonces are bound to
    // the client's IP): the client retries with a fresh one.
    let stale = Req::new(Method::REFRESH)
        .lifetime(600)
        .raw(AttributeType::MOBILITY_TICKET, &ticket)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&stale, new, h.t0)), Some(438));
    let refresh = mobility_refresh(&mut h, new, &alice, &ticket);
    let answer = h.request(&refresh, new, h.t0);
    let msg = Message::parse(&answer).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    msg.verify_integrity(&alice.key()).unwrap();
    let next = ticket_in(&answer);
    assert_ne!(next, ticket, "each ticket redeems once");
    assert_eq!(h.server.stats().allocations_moved, [1, 0]);
    assert_eq!(h.server.stats().allocations, 1);

    // Data flows from the new address on the same channel; the old one has
    // nothing left.
    let frame = channel_frame(0x4001, b"hello");
    assert!(matches!(
        h.input(&frame, new, h.t0),
        ClientAction::ToPeer { peer, .. } if peer == p
    ));
    assert_eq!(
        h.input(&frame, old, h.t0),
        ClientAction::Drop(DropReason::NoAllocation)
    );
    let (mut buf, range) = peer_buffer(b"back");
    let back = h.server.handle_peer_input(id, p, &mut buf, range, h.t0);
    assert_eq!(back.unwrap().client, new, "peer data follows the client");

    // The spent ticket moves nothing.
    let elsewhere = client_at([198, 51, 100, 50], 5000);
    let replay = mobility_refresh(&mut h, elsewhere, &alice, &ticket);
    assert_eq!(code_of(&h.request(&replay, elsewhere, h.t0)), Some(400));
    // Another user's valid credentials with the live ticket: 441.
    let bob = User::stat("bob", "builder");
    let theft = mobility_refresh(&mut h, elsewhere, &bob, &next);
    assert_eq!(code_of(&h.request(&theft, elsewhere, h.t0)), Some(441));
    // A wrong password with the live ticket: 401.
    let forged = mobility_refresh(&mut h, elsewhere, &User::stat("alice", "guess"), &next);
    assert_eq!(code_of(&h.request(&forged, elsewhere, h.t0)), Some(401));
    assert_eq!(h.server.stats().allocations_moved, [1, 0]);
    assert!(matches!(
        h.input(&frame, new, h.t0),
        ClientAction::ToPeer { .. }
    ));
}

#[test]
fn with_mobility_off_an_allocate_asking_for_a_ticket_gets_405() {
    let mut h = Harness::new(ServerConfig {
        mobility: false,
        ..config()
    });
    let alice = User::stat("alice", "wonderland");
    let nonce = h.nonce(client(1), h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType::MOBILITY_TICKET, &[])
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, client(1), h.t0)), Some(405));
    assert_eq!(
        h.server.stats().refused[Refusal::MobilityForbidden as usize],
        1
    );
    h.allocate(client(1), &alice, h.t0);
}

/// A client's new 5-tuple may reach another loop of the host (flow hash):
/// that loop asks the issuing loop, which gives the allocation up only to a
/// Refresh signed with its key; the port and quotas stay counted once.
#[test]
fn a_ticket_from_another_loop_moves_the_allocation_between_loops() {
    let shared = SharedPorts::new(PortRange {
        min: 50000,
        max: 50099,
    });
    let t0 = Instant::now();
    let mut loops = two_loops(&config(), &shared, t0);
    let alice = User::stat("alice", "wonderland");
    let (old, new) = (client(1), client_at([198, 51, 100, 99], 4000));
    let ticket = allocate_mobile(&mut loops[0], old, &alice);
    let p = peer(9, 7000);
    let nonce = loops[0].nonce(old, t0);
    let permit = Req::new(Method::CREATE_PERMISSION)
        .peer(p)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&loops[0].request(&permit, old, t0)), None);
    assert_eq!(shared.available(), 99);

    let refresh = mobility_refresh(&mut loops[1], new, &alice, &ticket);
    assert_eq!(
        loops[1].input(&refresh, new, t0),
        ClientAction::Move { shard: 0 }
    );
    // The issuing loop checks the signature: a wrong password or another
    // user takes nothing.
    let forged = mobility_refresh(&mut loops[1], new, &User::stat("alice", "guess"), &ticket);
    assert!(loops[0].server.take_moving(&forged, t0).is_none());
    let bob = User::stat("bob", "builder");
    let theft = mobility_refresh(&mut loops[1], new, &bob, &ticket);
    assert!(loops[0].server.take_moving(&theft, t0).is_none());
    assert_eq!(loops[0].server.stats().allocations, 1);

    let (_, _, moved) = loops[0].server.take_moving(&refresh, t0).unwrap();
    assert_eq!(loops[0].server.stats().allocations, 0);
    assert_eq!(
        shared.available(),
        99,
        "the port stays taken while it moves"
    );
    let id = loops[1].server.adopt_moving(&moved, t0).unwrap();
    let answer = loops[1].request(&refresh, new, t0);
    assert_eq!(code_of(&answer), None);
    assert_ne!(ticket_in(&answer), ticket);
    assert_eq!(loops[1].server.stats().allocations_moved, [0, 1]);

    // The permission came along: a Send indication from the new address
    // reaches the peer, and the peer's answer reaches the new address.
    assert!(matches!(
        loops[1].input(&send_indication(p, b"hi"), new, t0),
        ClientAction::ToPeer { allocation, .. } if allocation == id
    ));
    let (mut buf, range) = peer_buffer(b"back");
    let back = loops[1]
        .server
        .handle_peer_input(id, p, &mut buf, range, t0);
    assert_eq!(back.unwrap().client, new);

    // A ticket nobody holds is refused where the client is, not passed on.
    let unknown = mobility_refresh(&mut loops[1], client(9), &alice, &ticket);
    assert_eq!(
        loops[1].input(&unknown, client(9), t0),
        ClientAction::Move { shard: 0 }
    );
    assert!(loops[0].server.take_moving(&unknown, t0).is_none());
    let mut out = vec![0u8; 1500];
    match loops[1]
        .server
        .refuse_move(&unknown, client(9), t0, &mut out)
    {
        ClientAction::Reply(len) => assert_eq!(code_of(&out[..len]), Some(400)),
        other => panic!("{other:?}"),
    }

    // Deleting it where it lives now frees its port for the host.
    let nonce = loops[1].nonce(new, t0);
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    assert_eq!(code_of(&loops[1].request(&delete, new, t0)), None);
    assert_eq!(shared.available(), 100);
}

/// RFC 8016 §3.3: a TCP allocation with a ticket outlives its connection
/// (its client comes back on another); one without ends with it.
#[test]
fn a_stream_allocation_with_a_ticket_outlives_its_connection() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let tcp = |port| ClientSocket {
        transport: Transport::Tcp,
        ..client(port)
    };
    let ticket = allocate_mobile(&mut h, tcp(1), &alice);
    h.allocate(tcp(2), &alice, h.t0);
    h.server.handle_client_disconnected(tcp(1));
    h.server.handle_client_disconnected(tcp(2));
    assert_eq!(h.server.stats().allocations, 1);
    let refresh = mobility_refresh(&mut h, tcp(3), &alice, &ticket);
    assert_eq!(code_of(&h.request(&refresh, tcp(3), h.t0)), None);
    assert_eq!(h.server.stats().allocations_moved, [1, 0]);
    // It still expires when not refreshed.
    h.server.handle_timeout(h.at(601));
    assert_eq!(h.server.stats().allocations, 0);
}

/// Forged tickets naming another loop cost that loop a lookup each: they
/// are bounded per source like unauthenticated answers, and a malformed
/// ticket is an ordinary Refresh without an allocation.
#[test]
fn forged_tickets_are_bounded_per_source_and_garbage_tickets_are_ignored() {
    let mut h = Harness::new(capped_unauth());
    let alice = User::stat("alice", "wonderland");
    let nonce = h.nonce(client(1), h.t0);
    let mut moves = 0;
    let mut limited = 0;
    for i in 0..100u32 {
        let forged = natrix_relay_proto::Ticket {
            shard: 7,
            secret: [i as u8; 14],
        }
        .encode();
        let req = Req::new(Method::REFRESH)
            .raw(AttributeType::MOBILITY_TICKET, &forged)
            .sign(&alice, &nonce);
        match h.input(&req, client(2), h.t0) {
            ClientAction::Move { shard: 7 } => moves += 1,
            ClientAction::Drop(DropReason::RateLimited) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    // The nonce request took one token of the burst.
    assert_eq!((moves, limited), (9, 91));
    for garbage in [
        &b""[..],
        b"n",
        &[0xFF; 32],
        b"n00zzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ] {
        assert!(natrix_relay_proto::Ticket::parse(garbage).is_none());
    }
    let t = natrix_relay_proto::Ticket {
        shard: 0xABC,
        secret: [0x5A; 14],
    };
    assert_eq!(natrix_relay_proto::Ticket::parse(&t.encode()), Some(t));
}

/// Drains the core's commands, keeping the usage records.
fn usage_records(h: &mut Harness) -> Vec<natrix_relay_proto::UsageRecord> {
    std::iter::from_fn(|| h.server.poll_command())
        .filter_map(|c| match c {
            Command::Usage(r) => Some(*r),
            _ => None,
        })
        .collect()
}

#[test]
fn an_ending_allocation_reports_what_it_relayed_each_way() {
    let mut h = Harness::new(ServerConfig {
        usage: true,
        ..config()
    });
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let (id, nonce) = h.allocate_permitted(c, &alice, peer(9, 1));
    for _ in 0..3 {
        let send = send_indication(peer(9, 5000), b"hello");
        assert!(matches!(
            h.input(&send, c, h.at(1)),
            ClientAction::ToPeer { .. }
        ));
    }
    let (mut buf, range) = peer_buffer(b"a reply!");
    assert!(
        h.server
            .handle_peer_input(id, peer(9, 5000), &mut buf, range, h.at(2))
            .is_ok()
    );
    // Dropped packets (no permission) are not counted.
    let send = send_indication(peer(8, 5000), b"nope");
    assert!(matches!(h.input(&send, c, h.at(2)), ClientAction::Drop(_)));
    assert!(usage_records(&mut h).is_empty(), "nothing ended yet");

    let req = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    h.request(&req, c, h.at(30));
    let records = usage_records(&mut h);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.end, "deleted");
    assert_eq!(&*r.username, "alice");
    assert_eq!((r.usage.packets, r.usage.bytes), ([3, 1], [15, 8]));
    assert_eq!(r.usage.peers, 1);
    assert_eq!(
        (r.usage.started_unix, r.ended_unix),
        (UNIX_T0, UNIX_T0 + 30)
    );

    // One that expires says so; one alive when the relay stops is
    // recorded as `shutdown`, and stays.
    h.allocate(client(2), &alice, h.at(40));
    h.server.handle_timeout(h.at(641));
    assert_eq!(usage_records(&mut h)[0].end, "expired");
    h.allocate(client(3), &alice, h.at(700));
    h.server.record_live_usage(h.at(710));
    let live = usage_records(&mut h);
    assert_eq!((live.len(), live[0].end), (1, "shutdown"));
    assert_eq!(h.server.allocation_count(), 1);

    // Without a sink, no records.
    let mut quiet = Harness::new(config());
    quiet.allocate(client(4), &alice, quiet.t0);
    quiet.server.record_live_usage(quiet.t0);
    assert!(usage_records(&mut quiet).is_empty());
}

#[test]
fn usage_counters_move_with_an_allocation_to_a_successor() {
    let mut h = Harness::new(ServerConfig {
        usage: true,
        ..config()
    });
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let (_, _) = h.allocate_permitted(c, &alice, peer(9, 1));
    let send = send_indication(peer(9, 5000), b"hello");
    assert!(matches!(
        h.input(&send, c, h.at(1)),
        ClientAction::ToPeer { .. }
    ));
    let moved = h.server.export(h.at(2));
    assert_eq!(moved.allocations[0].usage.bytes, [5, 0]);
    let mut next = Harness::new(ServerConfig {
        usage: true,
        ..config()
    });
    assert_eq!(next.server.import(&moved, next.t0).len(), 1);
    next.server.record_live_usage(next.t0);
    let r = usage_records(&mut next);
    assert_eq!((r[0].usage.packets, r[0].usage.peers), ([1, 0], 1));
}

#[test]
fn a_draining_or_full_relay_with_an_alternate_answers_300_try_alternate() {
    let alternate: SocketAddr = "203.0.113.9:3478".parse().unwrap();
    let mut h = Harness::new(ServerConfig {
        max_allocations: 1,
        ..config()
    });
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let (_, nonce) = h.allocate_permitted(c, &alice, peer(1, 1));
    let redirected = |h: &mut Harness, from: ClientSocket| {
        let req = Req::new(Method::ALLOCATE)
            .transport(17)
            .sign(&alice, &nonce);
        let resp = h.request(&req, from, h.t0);
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(error_code(&msg), Some(300));
        // Signed: a forged redirect cannot pass for the relay's.
        msg.verify_integrity(&alice.key()).expect("a signed 300");
        match msg.decode(AttributeType::ALTERNATE_SERVER) {
            Some(Ok(Attribute::AlternateServer(a))) => a,
            other => panic!("no ALTERNATE-SERVER: {other:?}"),
        }
    };
    // Full, without an alternate: 508; with one: 300 to it.
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, client(2), h.t0)), Some(508));
    h.server.set_alternate(Alternate {
        udp: Some(alternate),
        ..Alternate::default()
    });
    assert_eq!(redirected(&mut h, client(3)), alternate);
    // Draining: the same.
    h.server.set_draining(true);
    assert_eq!(redirected(&mut h, client(4)), alternate);
    let s = h.server.stats();
    assert_eq!(s.refused[Refusal::TryAlternate as usize], 2);
    // An alternate of the other family is no use to this client: 508.
    h.server.set_alternate(Alternate {
        udp: Some("[2001:db8::9]:3478".parse().unwrap()),
        ..Alternate::default()
    });
    assert_eq!(code_of(&h.request(&req, client(5), h.t0)), Some(508));
    // A client's first, unauthenticated Allocate is redirected before the
    // challenge: it meets the other relay's nonce there, not this one's.
    h.server.set_alternate(Alternate {
        udp: Some(alternate),
        ..Alternate::default()
    });
    let unsigned = Req::new(Method::ALLOCATE).transport(17).build_unsigned();
    let resp = h.request(&unsigned, client(6), h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(error_code(&msg), Some(300));
    assert_eq!(
        msg.decode(AttributeType::ALTERNATE_SERVER),
        Some(Ok(Attribute::AlternateServer(alternate)))
    );
    assert!(msg.get(AttributeType::NONCE).is_none());
    // A TCP client goes to the alternate's TCP address, and without one
    // gets 508 (it keeps its transport when it moves).
    let tcp = ClientSocket {
        transport: Transport::Tcp,
        ..client(8)
    };
    assert_eq!(code_of(&h.request(&unsigned, tcp, h.t0)), Some(401));
    let over_tcp: SocketAddr = "203.0.113.9:443".parse().unwrap();
    h.server.set_alternate(Alternate {
        udp: Some(alternate),
        tcp: Some(over_tcp),
        tls: None,
        dtls: None,
    });
    let resp = h.request(&unsigned, tcp, h.t0);
    assert_eq!(
        Message::parse(&resp)
            .unwrap()
            .decode(AttributeType::ALTERNATE_SERVER),
        Some(Ok(Attribute::AlternateServer(over_tcp)))
    );
    // A DTLS client goes to the alternate's DTLS address, never its plain
    // UDP one (it would lose its encryption there); without one, 508.
    let dtls = ClientSocket {
        transport: Transport::Dtls,
        ..client(9)
    };
    let resp = h.request(&unsigned, dtls, h.t0);
    assert_eq!(code_of(&resp), Some(401));
    let over_dtls: SocketAddr = "203.0.113.9:5349".parse().unwrap();
    h.server.set_alternate(Alternate {
        udp: Some(alternate),
        dtls: Some(over_dtls),
        ..Alternate::default()
    });
    let resp = h.request(&unsigned, dtls, h.t0);
    assert_eq!(
        Message::parse(&resp)
            .unwrap()
            .decode(AttributeType::ALTERNATE_SERVER),
        Some(Ok(Attribute::AlternateServer(over_dtls)))
    );
    // Not draining and not full: the usual challenge.
    h.server.set_draining(false);
    let mut room = Harness::new(config());
    room.server.set_alternate(Alternate {
        udp: Some(alternate),
        ..Alternate::default()
    });
    assert_eq!(
        code_of(&room.request(&unsigned, client(7), room.t0)),
        Some(401)
    );
}

/// The relayed addresses an Allocate answer gives, in order.
fn relayed_addresses(msg: &Message<'_>) -> Vec<SocketAddr> {
    let tid = msg.transaction_id();
    msg.attributes()
        .filter(|a| a.ty == AttributeType::XOR_RELAYED_ADDRESS)
        .filter_map(|a| match Attribute::decode(a.ty, a.value, &tid) {
            Ok(Attribute::XorRelayedAddress(addr)) => Some(addr),
            _ => None,
        })
        .collect()
}

/// An Allocate asking for an IPv6 relayed address besides the IPv4 one.
fn dual_allocate() -> Req {
    Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0])
}

fn dual_config() -> ServerConfig {
    ServerConfig {
        relay_v6: Some(RelayAddress {
            bind: "fd00::5".parse().unwrap(),
            public: "2001:db8::1".parse().unwrap(),
        }),
        ..config()
    }
}

fn dual_policy() -> PeerPolicy {
    PeerPolicy::new(
        &[],
        &[
            "203.0.113.0/24".parse::<IpNet>().unwrap(),
            "2001:db8:5::/48".parse::<IpNet>().unwrap(),
        ],
    )
}

/// RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY gives an IPv4 and an IPv6
/// relayed address in one Allocate; an IPv4 peer is reached from the IPv4
/// socket, an IPv6 peer from the IPv6 one, both answer the one client;
/// the end closes both sockets and returns both ports.
#[test]
fn a_dual_stack_allocation_relays_each_family_from_its_own_socket() {
    let mut h = Harness::with_policy(dual_config(), dual_policy());
    let alice = User::stat("alice", "wonderland");
    let c = client(1);
    let free = h.server.ports().available();
    let nonce = h.nonce(c, h.t0);
    let req = dual_allocate().sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    let relayed = relayed_addresses(&msg);
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6(), "{relayed:?}");
    assert_eq!(relayed[1].ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
    assert_eq!(h.sockets.opened.len(), 2);
    let (id4, bind4, _) = h.sockets.opened[0];
    let (id6, bind6, _) = h.sockets.opened[1];
    assert_ne!(id4, id6);
    assert_eq!(bind4.ip(), "10.0.0.5".parse::<IpAddr>().unwrap());
    assert_eq!(bind6.ip(), "fd00::5".parse::<IpAddr>().unwrap());
    assert_eq!(bind6.port(), relayed[1].port());
    assert_eq!(h.server.ports().available(), free - 2);
    assert_eq!(h.server.stats().dual_stack_allocations, 1);
    // A retransmission names both again.
    let again = Message::parse(&h.request(&req, c, h.t0))
        .map(|m| relayed_addresses(&m))
        .unwrap();
    assert_eq!(again, relayed);

    // Permissions for one peer of each family; each is sent from its own
    // family's socket.
    let v6_peer: SocketAddr = "[2001:db8:5::9]:6000".parse().unwrap();
    for p in [peer(9, 5000), v6_peer] {
        let req = Req::new(Method::CREATE_PERMISSION)
            .peer(p)
            .sign(&alice, &nonce);
        let resp = h.request(&req, c, h.t0);
        assert_eq!(
            Message::parse(&resp).unwrap().class(),
            Class::Success,
            "{p}"
        );
    }
    for (p, expected) in [(peer(9, 5000), id4), (v6_peer, id6)] {
        let packet = send_indication(p, b"hello");
        match h.input(&packet, c, h.at(1)) {
            ClientAction::ToPeer {
                allocation, peer, ..
            } => {
                assert_eq!((allocation, peer), (expected, p));
            }
            other => panic!("expected forwarding to {p}, got {other:?}"),
        }
    }
    // A channel to the IPv6 peer: ChannelData leaves from the IPv6 socket.
    let bind = Req::new(Method::CHANNEL_BIND)
        .peer(v6_peer)
        .channel(0x4001)
        .sign(&alice, &nonce);
    assert_eq!(
        Message::parse(&h.request(&bind, c, h.at(1)))
            .unwrap()
            .class(),
        Class::Success
    );
    let mut data = vec![0x40, 0x01, 0x00, 0x03];
    data.extend_from_slice(b"abc\0");
    match h.input(&data, c, h.at(1)) {
        ClientAction::ToPeer {
            allocation, peer, ..
        } => assert_eq!((allocation, peer), (id6, v6_peer)),
        other => panic!("expected ChannelData forwarding, got {other:?}"),
    }
    // The IPv6 peer answers on the IPv6 socket: the client gets it on the
    // channel; an unpermitted IPv6 peer is dropped.
    let (mut buf, range) = peer_buffer(b"back");
    let action = h
        .server
        .handle_peer_input(id6, v6_peer, &mut buf, range, h.at(1))
        .unwrap();
    assert_eq!(action.client, c);
    assert_eq!(&buf[action.frame.clone()][..4], &[0x40, 0x01, 0x00, 0x04]);
    let (mut buf, range) = peer_buffer(b"nope");
    assert_eq!(
        h.server.handle_peer_input(
            id6,
            "[2001:db8:5::7]:6000".parse().unwrap(),
            &mut buf,
            range,
            h.at(1)
        ),
        Err(DropReason::NoPermission)
    );

    // Refresh to 0 ends both halves: two sockets closed, both ports back.
    let refresh = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    assert_eq!(
        Message::parse(&h.request(&refresh, c, h.at(2)))
            .unwrap()
            .class(),
        Class::Success
    );
    let mut closed = Vec::new();
    while let Some(cmd) = h.server.poll_command() {
        if let Command::CloseRelay { allocation, .. } = cmd {
            closed.push(allocation);
        }
    }
    closed.sort_by_key(|id| id.index());
    assert_eq!(closed, vec![id4, id6]);
    assert_eq!(h.server.ports().available(), free);
    assert_eq!(h.server.stats().dual_stack_allocations, 0);
    let (mut buf, range) = peer_buffer(b"late");
    assert_eq!(
        h.server
            .handle_peer_input(id6, v6_peer, &mut buf, range, h.at(3)),
        Err(DropReason::StaleAllocation)
    );
}

/// What RFC 8656 §7.2 refuses, and a relay without IPv6: the IPv4
/// allocation stands, ADDRESS-ERROR-CODE 440 says why there is no IPv6 one.
#[test]
fn additional_address_family_errors() {
    let mut h = Harness::with_policy(dual_config(), dual_policy());
    let alice = User::stat("alice", "wonderland");
    let c = client(2);
    let nonce = h.nonce(c, h.t0);
    for (req, why) in [
        (
            Req::new(Method::ALLOCATE)
                .transport(17)
                .raw(AttributeType::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]),
            "IPv4 cannot be additional",
        ),
        (
            dual_allocate().raw(AttributeType::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]),
            "with REQUESTED-ADDRESS-FAMILY",
        ),
    ] {
        let resp = h.request(&req.sign(&alice, &nonce), c, h.t0);
        assert_eq!(code_of(&resp), Some(400), "{why}");
    }
    assert!(h.sockets.opened.is_empty());

    let mut h = Harness::new(config());
    let nonce = h.nonce(c, h.t0);
    let req = dual_allocate().sign(&alice, &nonce);
    let resp = h.request(&req, c, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(relayed_addresses(&msg).len(), 1);
    match msg.decode(AttributeType::ADDRESS_ERROR_CODE) {
        Some(Ok(Attribute::AddressErrorCode(family, code))) => {
            assert_eq!((family, code.code), (2, 440));
        }
        other => panic!("no ADDRESS-ERROR-CODE: {other:?}"),
    }
    // coturn's clients ask at the draft's code point (0x8032) and read the
    // error at 0x8033.
    let c2 = client(3);
    let nonce2 = h.nonce(c2, h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType(0x8032), &[2, 0, 0, 0])
        .sign(&alice, &nonce2);
    let resp = h.request(&req, c2, h.t0);
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success);
    let draft = msg
        .get(AttributeType(0x8033))
        .expect("the draft's ADDRESS-ERROR-CODE");
    assert_eq!(&draft[..4], &[2, 0, 4, 40]);
    // An IPv6 peer is then refused (443), as for any IPv4 allocation.
    let req = Req::new(Method::CREATE_PERMISSION)
        .peer("[2001:db8:5::9]:6000".parse().unwrap())
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(443));
}

/// A dual-stack allocation crosses a binary upgrade whole: the successor
/// takes both slots and both ports, and relays from the IPv6 socket.
#[test]
fn a_dual_stack_allocation_survives_export_and_import() {
    let mut h = Harness::with_policy(dual_config(), dual_policy());
    let alice = User::stat("alice", "wonderland");
    let c = client(3);
    let nonce = h.nonce(c, h.t0);
    let req = dual_allocate().sign(&alice, &nonce);
    h.request(&req, c, h.t0);
    let v6_peer: SocketAddr = "[2001:db8:5::9]:6000".parse().unwrap();
    let perm = Req::new(Method::CREATE_PERMISSION)
        .peer(v6_peer)
        .sign(&alice, &nonce);
    h.request(&perm, c, h.t0);
    let (id6, addr6, _) = h.sockets.opened[1];
    let moved = h.server.export(h.at(1));
    assert_eq!(moved.allocations.len(), 1);
    let m = &moved.allocations[0];
    assert_eq!(
        m.relayed6.map(|(slot, _, a)| (slot as usize, a.port())),
        Some((id6.index(), addr6.port()))
    );

    let mut next = Harness::with_policy(dual_config(), dual_policy());
    let free = next.server.ports().available();
    let ids = next.server.import(&moved, next.t0);
    assert_eq!(ids.len(), 1);
    assert_eq!(next.server.ports().available(), free - 2);
    assert_eq!(next.server.live_id(id6.index() as u32), Some(id6));
    assert!(next.server.is_twin(id6));
    assert_eq!(next.server.twin_id(ids[0]), Some(id6));
    assert_eq!(next.server.stats().dual_stack_allocations, 1);
    let packet = send_indication(v6_peer, b"after");
    match next.input(&packet, c, next.t0) {
        ClientAction::ToPeer { allocation, .. } => assert_eq!(allocation, id6),
        other => panic!("expected forwarding, got {other:?}"),
    }
    // A new allocation does not take the IPv6 half's slot.
    let c2 = client(4);
    next.allocate(c2, &alice, next.t0);
    assert_ne!(next.last_allocation().index(), id6.index());
}

/// Sends `packet` from `c`; the relay socket and peer it goes to.
fn forwarded(h: &mut Harness, packet: &[u8], c: ClientSocket) -> (AllocationId, SocketAddr) {
    match h.input(packet, c, h.t0) {
        ClientAction::ToPeer {
            allocation, peer, ..
        } => (allocation, peer),
        other => panic!("expected forwarding, got {other:?}"),
    }
}

/// Past the relay port range (--relay-multiplex-ports), allocations share
/// a relayed address: one socket, opened once; the peer data it receives
/// goes to the allocation that sent to (or permitted) its source, a peer
/// address one allocation holds is refused to the others, and an
/// allocation that ends gives its peers back without closing the socket.
#[test]
fn allocations_past_the_port_range_share_a_relayed_address_told_apart_by_peer() {
    let mut h = Harness::one_port(config(), policy(), &[3480]);
    let alice = User::stat("alice", "wonderland");
    let (a, b, c) = (client(1), client(2), client(3));
    let own = h.allocate(a, &alice, h.t0);
    assert_eq!(own.port(), 50000);
    let shared = h.allocate(b, &alice, h.t0);
    assert_eq!(shared, "192.0.2.1:3480".parse().unwrap());
    let mux = h.last_allocation();
    assert_eq!(
        h.sockets.opened.last().unwrap().1,
        "10.0.0.5:3480".parse().unwrap()
    );
    assert_eq!(h.allocate(c, &alice, h.t0), shared);
    assert_eq!(h.sockets.opened.len(), 2, "the shared socket opens once");
    assert_eq!(h.server.stats().multiplexed_allocations, 2);
    assert_eq!(h.server.stats().multiplex_sockets, 1);

    let permit = |h: &mut Harness, from: ClientSocket, to: SocketAddr| {
        let nonce = h.nonce(from, h.t0);
        let req = Req::new(Method::CREATE_PERMISSION)
            .peer(to)
            .sign(&alice, &nonce);
        code_of(&h.request(&req, from, h.t0))
    };
    assert_eq!(permit(&mut h, b, peer(9, 1)), None);
    assert_eq!(permit(&mut h, c, peer(9, 1)), None);
    assert_eq!(permit(&mut h, c, peer(8, 1)), None);

    // B reaches 9:5000 first: it is B's on the shared socket; C may not.
    let to_9_5000 = send_indication(peer(9, 5000), b"from b");
    assert_eq!(forwarded(&mut h, &to_9_5000, b), (mux, peer(9, 5000)));
    assert_eq!(
        h.input(&send_indication(peer(9, 5000), b"from c"), c, h.t0),
        ClientAction::Drop(DropReason::PeerClaimed)
    );
    let to_9_5001 = send_indication(peer(9, 5001), b"from c");
    assert_eq!(forwarded(&mut h, &to_9_5001, c), (mux, peer(9, 5001)));
    let back = |h: &mut Harness, from: SocketAddr| {
        let (mut buf, range) = peer_buffer(b"answer");
        h.server
            .handle_peer_input(mux, from, &mut buf, range, h.t0)
            .map(|a| a.client)
    };
    assert_eq!(back(&mut h, peer(9, 5000)), Ok(b));
    assert_eq!(back(&mut h, peer(9, 5001)), Ok(c));
    // A source nobody sent to goes to whoever permitted its IP (an ICE
    // check from a peer-reflexive address), and is then theirs.
    assert_eq!(back(&mut h, peer(8, 7000)), Ok(c));
    assert_eq!(permit(&mut h, b, peer(8, 1)), None);
    assert_eq!(back(&mut h, peer(8, 7000)), Ok(c), "claimed by C");
    assert_eq!(back(&mut h, peer(8, 7001)), Ok(b), "B permitted 8 last");
    assert_eq!(back(&mut h, peer(7, 1)), Err(DropReason::NoPermission));

    // A channel to a peer address C holds is refused to B (403).
    let nonce = h.nonce(b, h.t0);
    let bind = Req::new(Method::CHANNEL_BIND)
        .channel(0x4000)
        .peer(peer(9, 5001))
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&bind, b, h.t0)), Some(403));
    assert_eq!(h.server.stats().refused[Refusal::PeerClaimed as usize], 1);

    // C deletes its allocation: no socket closes, its peers are free.
    let nonce = h.nonce(c, h.t0);
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&delete, c, h.t0)), None);
    assert!(h.server.poll_command().is_none(), "the shared socket stays");
    assert_eq!(h.server.stats().multiplexed_allocations, 1);
    assert_eq!(forwarded(&mut h, &to_9_5001, b), (mux, peer(9, 5001)));
    assert_eq!(back(&mut h, peer(9, 5001)), Ok(b));

    // What only a port of its own gives is refused past the range (508):
    // the next port reserved, DF. An even port is an even shared one.
    let d = client(4);
    let nonce = h.nonce(d, h.t0);
    let reserve = Req::new(Method::ALLOCATE)
        .transport(17)
        .even_port(true)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&reserve, d, h.t0)), Some(508));
    let df = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType::DONT_FRAGMENT, &[])
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&df, d, h.t0)), Some(508));

    let e = client(7);
    let nonce = h.nonce(e, h.t0);
    let even = Req::new(Method::ALLOCATE)
        .transport(17)
        .even_port(false)
        .sign(&alice, &nonce);
    let answer = h.request(&even, e, h.t0);
    let msg = Message::parse(&answer).unwrap();
    assert_eq!(
        msg.decode(AttributeType::XOR_RELAYED_ADDRESS),
        Some(Ok(Attribute::XorRelayedAddress(shared))),
        "3480 is even"
    );
    let nonce = h.nonce(e, h.t0);
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&delete, e, h.t0)), None);

    // An operator names an allocation on a shared address by its client.
    assert_eq!(h.allocate(d, &alice, h.at(1)), shared);
    assert!(!h.server.kill(shared, None, h.at(1)), "two share it");
    assert!(h.server.kill(shared, Some(d.client), h.at(1)));
    assert!(h.server.poll_command().is_none());
    let infos = h.server.allocations_info(h.at(1));
    assert_eq!(infos.iter().filter(|i| i.multiplexed).count(), 1);

    // Expiry ends them all (A's port goes back, the shared socket stays).
    h.server.handle_timeout(h.at(700));
    assert_eq!(h.server.stats().multiplexed_allocations, 0);
    let commands: Vec<Command> = std::iter::from_fn(|| h.server.poll_command()).collect();
    assert!(
        commands.iter().all(|cmd| !matches!(
            cmd,
            Command::CloseRelay { relayed, .. } if *relayed == shared
        )),
        "{commands:?}"
    );
    // A free port comes first again; past it, the open shared socket.
    assert_eq!(h.allocate(client(5), &alice, h.at(701)), own);
    assert_eq!(h.allocate(client(6), &alice, h.at(701)), shared);
    assert_eq!(
        h.sockets.opened.len(),
        3,
        "the port's socket; the shared one was open"
    );
}

/// A shared socket that cannot be bound (another process holds the port,
/// e.g. the one a binary upgrade took over from) is tried again by the next
/// Allocate; without shared ports the range's end is 508.
#[test]
fn a_shared_socket_that_cannot_open_is_tried_again_and_without_one_past_the_range_is_508() {
    for multiplex in [vec![], vec![3480]] {
        let mut h = Harness::one_port(config(), policy(), &multiplex);
        let alice = User::stat("alice", "wonderland");
        h.allocate(client(1), &alice, h.t0);
        h.sockets.refuse = 1;
        let c = client(2);
        let nonce = h.nonce(c, h.t0);
        let req = Req::new(Method::ALLOCATE)
            .transport(17)
            .sign(&alice, &nonce);
        assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(508));
        let c = client(3);
        let nonce = h.nonce(c, h.t0);
        let req = Req::new(Method::ALLOCATE)
            .transport(17)
            .sign(&alice, &nonce);
        let expect = if multiplex.is_empty() {
            Some(508)
        } else {
            None
        };
        assert_eq!(code_of(&h.request(&req, c, h.t0)), expect, "{multiplex:?}");
    }
}

/// A binary upgrade hands shared allocations over with their shared
/// socket (in the slot it had, so the handed-over socket finds it), their
/// claims and permissions: peers are told apart as before, the socket's
/// slot is never given to a new allocation, and a successor without that
/// shared port ends them.
#[test]
fn shared_allocations_survive_export_and_import() {
    let mut h = Harness::one_port(config(), policy(), &[3480]);
    let alice = User::stat("alice", "wonderland");
    let (a, b, c) = (client(1), client(2), client(3));
    h.allocate(a, &alice, h.t0);
    let shared = h.allocate(b, &alice, h.t0);
    let mux = h.last_allocation();
    assert_eq!(h.allocate(c, &alice, h.t0), shared);
    for (from, to) in [(b, peer(9, 5000)), (c, peer(9, 5001))] {
        let nonce = h.nonce(from, h.t0);
        let req = Req::new(Method::CREATE_PERMISSION)
            .peer(to)
            .sign(&alice, &nonce);
        assert_eq!(code_of(&h.request(&req, from, h.t0)), None);
        forwarded(&mut h, &send_indication(to, b"x"), from);
    }
    let moved = h.server.export(h.at(1));
    assert_eq!(moved.allocations.len(), 3);
    assert_eq!(
        moved
            .allocations
            .iter()
            .filter(|m| m.shared == Some((mux.index() as u32, 0)))
            .count(),
        2
    );

    let mut next = Harness::one_port(config(), policy(), &[3480]);
    let ids = next.server.import(&moved, next.t0);
    assert_eq!(ids.len(), 3);
    assert_eq!(
        next.server.live_id(mux.index() as u32),
        Some(mux),
        "the socket's slot"
    );
    assert_eq!(next.server.stats().multiplexed_allocations, 2);
    assert_eq!(next.server.stats().multiplex_sockets, 1);
    for (from, who) in [(peer(9, 5000), b), (peer(9, 5001), c)] {
        let (mut buf, range) = peer_buffer(b"back");
        let action = next
            .server
            .handle_peer_input(mux, from, &mut buf, range, next.t0)
            .unwrap();
        assert_eq!(action.client, who);
    }
    assert_eq!(
        next.input(&send_indication(peer(9, 5000), b"x"), c, next.t0),
        ClientAction::Drop(DropReason::PeerClaimed),
        "B's claim came along"
    );
    // A new allocation joins the handed-over socket, in a slot of its own.
    assert_eq!(next.allocate(client(4), &alice, next.t0), shared);
    assert_eq!(
        next.sockets.opened.len(),
        0,
        "nothing opened: the socket came along"
    );

    // Without the shared port the shared allocations end; A goes on.
    let mut other = Harness::one_port(config(), policy(), &[]);
    assert_eq!(other.server.import(&moved, other.t0).len(), 1);
}

/// A relay port another process holds is parked and, with no other port
/// left, the Allocate gets a shared relayed address instead of 508 (a
/// browser's first allocation met exactly this).
#[test]
fn a_relay_port_held_elsewhere_falls_back_to_a_shared_address() {
    let mut h = Harness::one_port(config(), policy(), &[3480]);
    let alice = User::stat("alice", "wonderland");
    h.sockets.refuse = 1;
    assert_eq!(
        h.allocate(client(1), &alice, h.t0),
        "192.0.2.1:3480".parse().unwrap()
    );
    assert_eq!(h.sockets.opened.len(), 1, "the shared socket only");
    // An IPv6 one on a relay without IPv6 is still 440, not 508.
    let c = client(2);
    let nonce = h.nonce(c, h.t0);
    let v6 = Req::new(Method::ALLOCATE)
        .transport(17)
        .raw(AttributeType::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&v6, c, h.t0)), Some(440));
}

/// Two allocations on one shared address cannot reach each other through
/// it, so a session's two sides go to different shared sockets when the
/// loop has them, even where the least used one would be the first side's.
#[test]
fn a_sessions_two_sides_are_placed_on_different_shared_sockets() {
    let mut h = Harness::one_port(config(), policy(), &[3480, 3482]);
    let alice = User::stat("alice", "wonderland");
    h.allocate(client(1), &alice, h.t0);
    // Unrelated allocations: two on 3480, and 3482's two end.
    let placed: Vec<u16> = (2..6)
        .map(|n| h.allocate(client(n), &alice, h.t0).port())
        .collect();
    assert_eq!(placed, [3480, 3482, 3480, 3482], "the least used, in turn");
    let on_3482: SocketAddr = "192.0.2.1:3482".parse().unwrap();
    for n in [3, 5] {
        assert!(h.server.kill(on_3482, Some(client(n).client), h.t0));
    }
    // Both sides of one session (one token, as a plan relaying both sides
    // on one relay hands out).
    let token = User::rest(
        &format!(
            "{}:00112233445566778899aabbccddeeff:relay-1:203.0.113.7",
            UNIX_T0 + 60
        ),
        SECRET,
    );
    let a = h.allocate(client(6), &token, h.t0);
    assert_eq!(a.port(), 3482, "the least used");
    // 3482 holds one now, 3480 two: the other side still goes to 3480.
    let b = h.allocate(client(7), &token, h.t0);
    assert_eq!(b.port(), 3480, "not its other side's, though more used");
}

/// IPv6 too (an IPv6-only cluster): past the range an IPv6 Allocate gets
/// the IPv6 shared socket of the port, whose peers are IPv6; an IPv4 one
/// the IPv4 socket of the same port.
#[test]
fn ipv6_allocations_share_the_ipv6_socket_of_a_shared_port() {
    let mut h = Harness::one_port(dual_config(), dual_policy(), &[3480]);
    let alice = User::stat("alice", "wonderland");
    h.allocate(client(1), &alice, h.t0);
    let v6 = |h: &mut Harness, c: ClientSocket| {
        let nonce = h.nonce(c, h.t0);
        let req = Req::new(Method::ALLOCATE)
            .transport(17)
            .raw(AttributeType::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            .sign(&alice, &nonce);
        let answer = h.request(&req, c, h.t0);
        match Message::parse(&answer)
            .unwrap()
            .decode(AttributeType::XOR_RELAYED_ADDRESS)
        {
            Some(Ok(Attribute::XorRelayedAddress(a))) => a,
            other => panic!("{other:?}"),
        }
    };
    let shared6: SocketAddr = "[2001:db8::1]:3480".parse().unwrap();
    assert_eq!(v6(&mut h, client(2)), shared6);
    let socket6 = h.last_allocation();
    assert_eq!(
        h.sockets.opened.last().unwrap().1,
        "[fd00::5]:3480".parse().unwrap()
    );
    assert_eq!(v6(&mut h, client(3)), shared6);
    assert_eq!(
        h.allocate(client(4), &alice, h.t0),
        "192.0.2.1:3480".parse().unwrap()
    );
    assert_eq!(h.server.stats().multiplex_sockets, 2, "one per family");

    let (p2, p3): (SocketAddr, SocketAddr) = (
        "[2001:db8:5::9]:6000".parse().unwrap(),
        "[2001:db8:5::9]:6001".parse().unwrap(),
    );
    for (c, p) in [(client(2), p2), (client(3), p3)] {
        let nonce = h.nonce(c, h.t0);
        let req = Req::new(Method::CHANNEL_BIND)
            .channel(0x4000)
            .peer(p)
            .sign(&alice, &nonce);
        assert_eq!(code_of(&h.request(&req, c, h.t0)), None);
    }
    for (p, c) in [(p2, client(2)), (p3, client(3))] {
        let (mut buf, range) = peer_buffer(b"six");
        let action = h
            .server
            .handle_peer_input(socket6, p, &mut buf, range, h.t0)
            .unwrap();
        assert_eq!(action.client, c);
        assert_eq!(&buf[action.frame][..2], &[0x40, 0x00]);
    }
}

// ------------------------------------------------------------ RFC 6062

/// A client over TCP.
fn tcp_client(port: u16) -> ClientSocket {
    ClientSocket {
        transport: Transport::Tcp,
        ..client(port)
    }
}

/// Drains the core's commands.
fn commands(h: &mut Harness) -> Vec<Command> {
    std::iter::from_fn(|| h.server.poll_command()).collect()
}

/// The frames the core asked to send to clients, in order.
fn to_clients(commands: &[Command]) -> Vec<(ClientSocket, Vec<u8>)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::ToClient { client, frame } => Some((*client, frame.clone())),
            _ => None,
        })
        .collect()
}

fn connection_id(msg: &Message<'_>) -> u32 {
    match msg.decode(AttributeType::CONNECTION_ID) {
        Some(Ok(Attribute::ConnectionId(id))) => id,
        other => panic!("no CONNECTION-ID: {other:?}"),
    }
}

impl Harness {
    /// A TCP allocation of `user` from `c`: its relayed address and id.
    fn allocate_tcp(&mut self, c: ClientSocket, user: &User) -> (SocketAddr, AllocationId) {
        let nonce = self.nonce(c, self.t0);
        let req = Req::new(Method::ALLOCATE).transport(6).sign(user, &nonce);
        let resp = self.request(&req, c, self.t0);
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(msg.class(), Class::Success, "TCP allocate failed: {msg:?}");
        let relayed = match msg.decode(AttributeType::XOR_RELAYED_ADDRESS) {
            Some(Ok(Attribute::XorRelayedAddress(a))) => a,
            other => panic!("no relayed address: {other:?}"),
        };
        let (id, _) = *self.sockets.listened.last().expect("a listener");
        (relayed, id)
    }

    /// Connect to `to` from TCP allocation client `c`; the connection id
    /// the shell is to report on.
    fn connect(&mut self, c: ClientSocket, user: &User, to: SocketAddr, now: Instant) -> u32 {
        let nonce = self.nonce(c, now);
        let req = Req::new(Method::CONNECT).peer(to).sign(user, &nonce);
        match self.input(&req, c, now) {
            ClientAction::Connect {
                connection, peer, ..
            } => {
                assert_eq!(peer, to);
                connection
            }
            other => panic!("expected a Connect for the shell, got {other:?}"),
        }
    }

    /// ConnectionBind for `id` from a new connection `d` as `user`.
    fn bind(&mut self, d: ClientSocket, user: &User, id: u32, now: Instant) -> ClientAction {
        let nonce = self.nonce(d, now);
        let req = Req::new(Method::CONNECTION_BIND)
            .raw(AttributeType::CONNECTION_ID, &id.to_be_bytes())
            .sign(user, &nonce);
        self.input(&req, d, now)
    }
}

#[test]
fn a_tcp_allocation_listens_connects_and_binds_a_data_connection() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = tcp_client(40000);
    let (relayed, id) = h.allocate_tcp(c, &alice);
    assert!(
        h.sockets.opened.is_empty(),
        "no UDP socket for a TCP allocation"
    );
    assert_eq!(
        h.sockets.listened,
        [(
            id,
            SocketAddr::new("10.0.0.5".parse().unwrap(), relayed.port())
        )]
    );
    assert_eq!(h.server.stats().tcp_allocations, 1);

    // Connect: the shell connects, reports, and the answer goes out then.
    let p = peer(9, 8080);
    let conn = h.connect(c, &alice, p, h.t0);
    assert!(
        to_clients(&commands(&mut h)).is_empty(),
        "nothing before the outcome"
    );
    assert!(h.server.tcp_connected(conn, true, h.at(1)));
    let sent = to_clients(&commands(&mut h));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, c, "on the control connection");
    let msg = Message::parse(&sent[0].1).unwrap();
    assert_eq!(
        (msg.method(), msg.class()),
        (Method::CONNECT, Class::Success)
    );
    msg.verify_integrity(&alice.key())
        .expect("signed with the allocation's key");
    assert_eq!(connection_id(&msg), conn);

    // A second Connect to the same peer: 446.
    let nonce = h.nonce(c, h.at(1));
    let again = Req::new(Method::CONNECT).peer(p).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&again, c, h.at(1))), Some(446));

    // The data connection: ConnectionBind from a new connection.
    let d = tcp_client(40001);
    match h.bind(d, &alice, conn, h.at(2)) {
        ClientAction::Bind { len, connection } => {
            assert_eq!(connection, conn);
            let msg = Message::parse(&h.out[..len]).unwrap();
            assert_eq!(msg.class(), Class::Success);
            msg.verify_integrity(&alice.key()).unwrap();
        }
        other => panic!("expected Bind, got {other:?}"),
    }
    // Bound once: a second bind names nothing waiting.
    let e = tcp_client(40002);
    match h.bind(e, &alice, conn, h.at(2)) {
        ClientAction::Reply(len) => assert_eq!(code_of(&h.out[..len]), Some(400)),
        other => panic!("expected 400, got {other:?}"),
    }
    // Relayed bytes count in the allocation's usage; bound connections do
    // not time out.
    h.server
        .tcp_relayed(conn, natrix_relay_proto::Direction::ClientToPeer, 1000);
    h.server
        .tcp_relayed(conn, natrix_relay_proto::Direction::PeerToClient, 3000);
    h.server.handle_timeout(h.at(40));
    assert!(commands(&mut h).is_empty(), "a bound connection stays");
    assert_eq!(h.server.stats().tcp_bytes, [1000, 3000]);
    let info = h.server.allocations_info(h.at(40));
    assert_eq!(info[0].usage.bytes, [1000, 3000]);

    // Deleting the allocation closes its connections and its listener.
    let nonce = h.nonce(c, h.at(41));
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    h.request(&delete, c, h.at(41));
    let cmds = commands(&mut h);
    assert!(
        cmds.contains(&Command::CloseTcp { connection: conn }),
        "{cmds:?}"
    );
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::CloseRelay { allocation, .. } if *allocation == id))
    );
    assert_eq!(h.server.stats().tcp_allocations, 0);
    assert_eq!(h.server.stats().tcp_connections, 0);
}

#[test]
fn tcp_allocations_follow_rfc_6062s_rules() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    // Over UDP: 400. With EVEN-PORT or DONT-FRAGMENT: 400.
    let u = client(40010);
    let nonce = h.nonce(u, h.t0);
    let req = Req::new(Method::ALLOCATE).transport(6).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, u, h.t0)), Some(400));
    let c = tcp_client(40011);
    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::ALLOCATE)
        .transport(6)
        .even_port(false)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(400));
    let req = Req::new(Method::ALLOCATE)
        .transport(6)
        .raw(AttributeType::DONT_FRAGMENT, &[])
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(400));
    assert!(h.sockets.listened.is_empty());

    // A TCP allocation: ChannelBind 400, Send indications dropped.
    let (_, _) = h.allocate_tcp(c, &alice);
    let p = peer(9, 8080);
    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::CHANNEL_BIND)
        .channel(0x4000)
        .peer(p)
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(400));
    assert_eq!(
        h.input(&send_indication(p, b"x"), c, h.t0),
        ClientAction::Drop(DropReason::TcpAllocation)
    );
    // Connect without a peer: 400; to a denied peer: 403.
    let req = Req::new(Method::CONNECT).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(400));
    let req = Req::new(Method::CONNECT)
        .peer(SocketAddr::from(([10, 1, 2, 3], 80)))
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.t0)), Some(403));

    // Connect on a UDP allocation: 400.
    let u2 = client(40012);
    h.allocate(u2, &alice, h.t0);
    let nonce = h.nonce(u2, h.t0);
    let req = Req::new(Method::CONNECT).peer(p).sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, u2, h.t0)), Some(400));
    // ConnectionBind on a connection that holds an allocation: 400.
    let req = Req::new(Method::CONNECTION_BIND)
        .raw(AttributeType::CONNECTION_ID, &1u32.to_be_bytes())
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, u2, h.t0)), Some(400));

    // Switched off: 442, as any other transport.
    let mut off = Harness::new(ServerConfig {
        tcp_relay: false,
        ..config()
    });
    let nonce = off.nonce(c, off.t0);
    let req = Req::new(Method::ALLOCATE).transport(6).sign(&alice, &nonce);
    assert_eq!(code_of(&off.request(&req, c, off.t0)), Some(442));
    let refused = off.server.stats().refused;
    assert_eq!(refused[Refusal::UnsupportedTransport as usize], 1);
    assert_eq!(
        h.server.stats().refused[Refusal::TcpOverUdp as usize],
        2,
        "an Allocate and a ConnectionBind over UDP"
    );
    assert_eq!(
        h.server.stats().refused[Refusal::TcpAllocationOptions as usize],
        2
    );
}

#[test]
fn a_peers_connection_needs_a_permission_and_waits_thirty_seconds_for_its_bind() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = tcp_client(40020);
    let (_, id) = h.allocate_tcp(c, &alice);
    let p = peer(9, 5555);
    // No permission for its IP: closed.
    assert_eq!(h.server.tcp_accepted(id, p, h.t0), None);
    assert!(commands(&mut h).is_empty());

    let nonce = h.nonce(c, h.t0);
    let req = Req::new(Method::CREATE_PERMISSION)
        .peer(p)
        .sign(&alice, &nonce);
    assert_eq!(
        Message::parse(&h.request(&req, c, h.t0)).unwrap().class(),
        Class::Success
    );
    let conn = h.server.tcp_accepted(id, p, h.at(1)).expect("permitted");
    let sent = to_clients(&commands(&mut h));
    assert_eq!(sent.len(), 1);
    let msg = Message::parse(&sent[0].1).unwrap();
    assert_eq!(
        (msg.method(), msg.class()),
        (Method::CONNECTION_ATTEMPT, Class::Indication)
    );
    assert_eq!(connection_id(&msg), conn);
    assert_eq!(
        msg.decode(AttributeType::XOR_PEER_ADDRESS),
        Some(Ok(Attribute::XorPeerAddress(p)))
    );
    // Unbound for 30 s: closed, and a late bind names nothing.
    h.server.handle_timeout(h.at(30));
    assert!(commands(&mut h).is_empty(), "not yet");
    h.server.handle_timeout(h.at(32));
    assert_eq!(commands(&mut h), [Command::CloseTcp { connection: conn }]);
    match h.bind(tcp_client(40021), &alice, conn, h.at(33)) {
        ClientAction::Reply(len) => assert_eq!(code_of(&h.out[..len]), Some(400)),
        other => panic!("expected 400, got {other:?}"),
    }
    let events = h.server.stats().tcp_events;
    assert_eq!(events[natrix_relay_proto::TcpEvent::Refused as usize], 1);
    assert_eq!(
        events[natrix_relay_proto::TcpEvent::BindTimeout as usize],
        1
    );
}

#[test]
fn a_connect_that_fails_or_times_out_is_answered_447() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let c = tcp_client(40030);
    h.allocate_tcp(c, &alice);
    // Refused by the peer.
    let conn = h.connect(c, &alice, peer(9, 1), h.t0);
    assert!(!h.server.tcp_connected(conn, false, h.at(1)));
    let sent = to_clients(&commands(&mut h));
    let msg = Message::parse(&sent[0].1).unwrap();
    assert_eq!((msg.method(), msg.class()), (Method::CONNECT, Class::Error));
    assert_eq!(error_code(&msg), Some(447));
    msg.verify_integrity(&alice.key()).unwrap();
    // The peer may be tried again; this time it never answers.
    let conn = h.connect(c, &alice, peer(9, 1), h.at(2));
    h.server.handle_timeout(h.at(33));
    let cmds = commands(&mut h);
    assert!(cmds.contains(&Command::CloseTcp { connection: conn }));
    let sent = to_clients(&cmds);
    assert_eq!(code_of(&sent[0].1), Some(447));
    // A late report finds nothing: the shell closes its socket.
    assert!(!h.server.tcp_connected(conn, true, h.at(34)));
    assert_eq!(h.server.stats().tcp_connections, 0);
}

#[test]
fn connection_binds_are_the_allocations_users_own_and_capped() {
    let mut h = Harness::new(config());
    let alice = User::stat("alice", "wonderland");
    let bob = User::stat("bob", "builder");
    let c = tcp_client(40040);
    h.allocate_tcp(c, &alice);
    let conn = h.connect(c, &alice, peer(9, 80), h.t0);
    assert!(h.server.tcp_connected(conn, true, h.t0));
    // Another user, even with valid credentials, cannot take it: 441.
    match h.bind(tcp_client(40041), &bob, conn, h.at(1)) {
        ClientAction::Reply(len) => assert_eq!(code_of(&h.out[..len]), Some(441)),
        other => panic!("expected 441, got {other:?}"),
    }
    // Unauthenticated: challenged, never bound.
    let req = Req::new(Method::CONNECTION_BIND)
        .raw(AttributeType::CONNECTION_ID, &conn.to_be_bytes())
        .build_unsigned();
    assert_eq!(
        code_of(&h.request(&req, tcp_client(40042), h.at(1))),
        Some(401)
    );
    // A CONNECTION-ID of another loop goes there, before authentication.
    let elsewhere = (3u32 << 20) | 7;
    let req = Req::new(Method::CONNECTION_BIND)
        .raw(AttributeType::CONNECTION_ID, &elsewhere.to_be_bytes())
        .build_unsigned();
    assert_eq!(
        h.input(&req, tcp_client(40043), h.at(1)),
        ClientAction::BindElsewhere { shard: 3 }
    );
    // At most 64 connections per allocation: the 65th Connect gets 508.
    for i in 1..natrix_relay_proto::MAX_TCP_CONNECTIONS {
        h.connect(c, &alice, peer(9, 1000 + i as u16), h.at(2));
    }
    let nonce = h.nonce(c, h.at(2));
    let req = Req::new(Method::CONNECT)
        .peer(peer(9, 999))
        .sign(&alice, &nonce);
    assert_eq!(code_of(&h.request(&req, c, h.at(2))), Some(508));
}

// ------------------------------------------------------- the fast path

/// The fast-path commands, in order.
fn fast_paths(h: &mut Harness) -> Vec<natrix_relay_proto::FastPath> {
    commands(h)
        .into_iter()
        .filter_map(|c| match c {
            Command::FastPath(f) => Some(*f),
            _ => None,
        })
        .collect()
}

fn fast_config() -> ServerConfig {
    ServerConfig {
        fast_path: true,
        ..config()
    }
}

impl Harness {
    fn channel_bind(&mut self, c: ClientSocket, user: &User, n: u16, to: SocketAddr, at: Instant) {
        let nonce = self.nonce(c, at);
        let req = Req::new(Method::CHANNEL_BIND)
            .channel(n)
            .peer(to)
            .sign(user, &nonce);
        let resp = self.request(&req, c, at);
        assert_eq!(Message::parse(&resp).unwrap().class(), Class::Success);
    }
}

#[test]
fn channel_bindings_go_on_the_fast_path_until_the_earlier_expiry_and_leave_with_their_allocation() {
    let mut h = Harness::new(fast_config());
    let alice = User::stat("alice", "wonderland");
    let c = client(41000);
    let relayed = h.allocate(c, &alice, h.t0);
    let id = h.last_allocation();
    let p = peer(9, 7000);
    h.channel_bind(c, &alice, 0x4001, p, h.t0);
    // The permission (300 s) ends before the channel (600 s).
    let bound_at = relayed.port();
    let f = fast_paths(&mut h);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (f[0].allocation, f[0].client, f[0].channel, f[0].peer),
        (id, c, 0x4001, p)
    );
    assert_eq!(
        f[0].relayed,
        SocketAddr::new("10.0.0.5".parse().unwrap(), bound_at),
        "the bound address, not the public one"
    );
    assert_eq!(f[0].until, Some(h.at(300)));
    // A CreatePermission at 100 s carries it to 400 s; a ChannelBind
    // refresh at 350 s refreshes the permission too: 650 → the channel's 950.
    let nonce = h.nonce(c, h.at(100));
    let req = Req::new(Method::CREATE_PERMISSION)
        .peer(p)
        .sign(&alice, &nonce);
    h.request(&req, c, h.at(100));
    assert_eq!(fast_paths(&mut h)[0].until, Some(h.at(400)));
    h.channel_bind(c, &alice, 0x4001, p, h.at(350));
    assert_eq!(fast_paths(&mut h)[0].until, Some(h.at(650)));
    // What the kernel relayed counts as relayed.
    h.server
        .fast_path_relayed(id, natrix_relay_proto::Direction::PeerToClient, 10, 1600);
    assert_eq!(h.server.stats().forwarded_packets[1], 10);
    assert_eq!(h.server.allocations_info(h.at(351))[0].usage.bytes[1], 1600);
    // Deleting the allocation takes it off.
    let nonce = h.nonce(c, h.at(360));
    let delete = Req::new(Method::REFRESH).lifetime(0).sign(&alice, &nonce);
    h.request(&delete, c, h.at(360));
    let f = fast_paths(&mut h);
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].channel, f[0].until), (0x4001, None));
}

#[test]
fn a_capped_allocation_takes_the_fast_path_with_its_cap_and_kernel_bytes_spend_its_budget() {
    let alice = User::stat("alice", "wonderland");
    let mut h = Harness::new(ServerConfig {
        bandwidth_per_allocation: Some(1000),
        ..fast_config()
    });
    let c = client(41020);
    let p = peer(9, 7000);
    h.allocate(c, &alice, h.t0);
    let id = h.last_allocation();
    h.channel_bind(c, &alice, 0x4001, p, h.t0);
    let f = fast_paths(&mut h);
    assert_eq!((f.len(), f[0].cap), (1, Some(1000)), "{f:?}");
    // Userspace alone: 1000 bytes a second allow two 400-byte datagrams.
    // After the kernel relayed 1000 bytes for the allocation, a Send
    // indication in the same second finds the budget spent.
    h.server
        .fast_path_relayed(id, natrix_relay_proto::Direction::ClientToPeer, 2, 1000);
    let packet = send_indication(p, &[0u8; 400]);
    assert!(matches!(
        h.input(&packet, c, h.t0),
        ClientAction::Drop(natrix_relay_proto::DropReason::BandwidthExceeded)
    ));
    // What the kernel dropped over the cap counts as the relay's drops.
    let before =
        h.server.stats().dropped[natrix_relay_proto::DropReason::BandwidthExceeded as usize];
    h.server.fast_path_capped(7);
    assert_eq!(
        h.server.stats().dropped[natrix_relay_proto::DropReason::BandwidthExceeded as usize],
        before + 7
    );
    // Two seconds on, the budget has refilled.
    assert!(matches!(
        h.input(&packet, c, h.at(2)),
        ClientAction::ToPeer { .. }
    ));
}

/// A dual-stack allocation's channels go on the fast path from the socket
/// of their peer's family: an IPv4 peer's through the IPv4 relay socket's
/// bound address, an IPv6 peer's through the IPv6 one's (the shell checks
/// the client is of the same family before the kernel takes it).
#[test]
fn ipv6_channels_go_on_the_fast_path_from_the_ipv6_socket() {
    let mut h = Harness::with_policy(
        ServerConfig {
            fast_path: true,
            ..dual_config()
        },
        dual_policy(),
    );
    let alice = User::stat("alice", "wonderland");
    let c = client(41030);
    let nonce = h.nonce(c, h.t0);
    let req = dual_allocate().sign(&alice, &nonce);
    let msg_bytes = h.request(&req, c, h.t0);
    let relayed = relayed_addresses(&Message::parse(&msg_bytes).unwrap());
    let (p4, p6): (SocketAddr, SocketAddr) = (
        "203.0.113.9:7000".parse().unwrap(),
        "[2001:db8:5::9]:7000".parse().unwrap(),
    );
    h.channel_bind(c, &alice, 0x4001, p4, h.t0);
    h.channel_bind(c, &alice, 0x4002, p6, h.t0);
    let f = fast_paths(&mut h);
    let of = |ch: u16| f.iter().rev().find(|f| f.channel == ch).unwrap();
    assert_eq!(
        of(0x4001).relayed,
        SocketAddr::new("10.0.0.5".parse().unwrap(), relayed[0].port())
    );
    assert_eq!(
        of(0x4002).relayed,
        SocketAddr::new("fd00::5".parse().unwrap(), relayed[1].port())
    );
    assert_eq!(of(0x4002).peer, p6);
}

#[test]
fn only_udp_bindings_on_ports_of_their_own_take_the_fast_path() {
    let alice = User::stat("alice", "wonderland");
    let p = peer(9, 7000);
    // Off: nothing.
    let mut h = Harness::new(config());
    let c = client(41010);
    h.allocate(c, &alice, h.t0);
    h.channel_bind(c, &alice, 0x4001, p, h.t0);
    assert!(fast_paths(&mut h).is_empty());
    // A TCP client: nothing.
    let mut h = Harness::new(fast_config());
    let t = tcp_client(41011);
    h.allocate(t, &alice, h.t0);
    h.channel_bind(t, &alice, 0x4001, p, h.t0);
    assert!(fast_paths(&mut h).is_empty());
    // A shared relayed address: nothing.
    let mut h = Harness::one_port(fast_config(), policy(), &[40000, 40001]);
    h.allocate(client(41012), &alice, h.t0);
    let c = client(41013);
    h.allocate(c, &alice, h.t0);
    h.channel_bind(c, &alice, 0x4001, p, h.t0);
    let f = fast_paths(&mut h);
    assert!(f.is_empty(), "{f:?}");
}

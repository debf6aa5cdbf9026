//! Property tests: decoding never panics, and encode → decode round-trips.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use natrix_wire::{
    Attribute, AttributeType, ChangeRequest, ChannelData, ChannelNumber, Class, Encoder, ErrorCode,
    EvenPort, IntegrityKey, Message, MessageType, Method, TransactionId, frame_len,
};
use proptest::prelude::*;

/// Owned attribute values, borrowed into [`Attribute`] for encoding.
#[derive(Clone, Debug)]
enum Owned {
    XorMapped(SocketAddr),
    Mapped(SocketAddr),
    Username(String),
    Realm(String),
    Nonce(String),
    Software(String),
    Error(u16, String),
    Lifetime(u32),
    XorPeer(SocketAddr),
    XorRelayed(SocketAddr),
    Data(Vec<u8>),
    Change(bool, bool),
    ResponsePort(u16),
    ResponseOrigin(SocketAddr),
    OtherAddress(SocketAddr),
    Padding(Vec<u8>),
    Channel(u16),
    Transport(u8),
    Family(u8),
    EvenPort(bool),
    DontFragment,
    Token([u8; 8]),
    Other(u16, Vec<u8>),
}

impl Owned {
    fn attr(&self) -> Attribute<'_> {
        match self {
            Owned::XorMapped(a) => Attribute::XorMappedAddress(*a),
            Owned::Mapped(a) => Attribute::MappedAddress(*a),
            Owned::Username(s) => Attribute::Username(s),
            Owned::Realm(s) => Attribute::Realm(s),
            Owned::Nonce(s) => Attribute::Nonce(s),
            Owned::Software(s) => Attribute::Software(s),
            Owned::Error(code, reason) => Attribute::ErrorCode(ErrorCode {
                code: *code,
                reason,
            }),
            Owned::Lifetime(v) => Attribute::Lifetime(*v),
            Owned::XorPeer(a) => Attribute::XorPeerAddress(*a),
            Owned::XorRelayed(a) => Attribute::XorRelayedAddress(*a),
            Owned::Data(d) => Attribute::Data(d),
            Owned::Change(ip, port) => Attribute::ChangeRequest(ChangeRequest {
                change_ip: *ip,
                change_port: *port,
            }),
            Owned::ResponsePort(p) => Attribute::ResponsePort(*p),
            Owned::ResponseOrigin(a) => Attribute::ResponseOrigin(*a),
            Owned::OtherAddress(a) => Attribute::OtherAddress(*a),
            Owned::Padding(d) => Attribute::Padding(d),
            Owned::Channel(c) => Attribute::ChannelNumber(*c),
            Owned::Transport(t) => Attribute::RequestedTransport(*t),
            Owned::Family(f) => Attribute::RequestedAddressFamily(*f),
            Owned::EvenPort(r) => Attribute::EvenPort(EvenPort { reserve_next: *r }),
            Owned::DontFragment => Attribute::DontFragment,
            Owned::Token(t) => Attribute::ReservationToken(*t),
            Owned::Other(ty, v) => Attribute::Other(AttributeType(*ty), v),
        }
    }
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(o, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(o, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), p)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        addr().prop_map(Owned::XorMapped),
        addr().prop_map(Owned::Mapped),
        text().prop_map(Owned::Username),
        text().prop_map(Owned::Realm),
        text().prop_map(Owned::Nonce),
        text().prop_map(Owned::Software),
        (300u16..700, text()).prop_map(|(c, r)| Owned::Error(c, r)),
        any::<u32>().prop_map(Owned::Lifetime),
        addr().prop_map(Owned::XorPeer),
        addr().prop_map(Owned::XorRelayed),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Owned::Data),
        (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Owned::Change(a, b)),
        any::<u16>().prop_map(Owned::ResponsePort),
        addr().prop_map(Owned::ResponseOrigin),
        addr().prop_map(Owned::OtherAddress),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Owned::Padding),
        any::<u16>().prop_map(Owned::Channel),
        any::<u8>().prop_map(Owned::Transport),
        any::<u8>().prop_map(Owned::Family),
        any::<bool>().prop_map(Owned::EvenPort),
        Just(Owned::DontFragment),
        any::<[u8; 8]>().prop_map(Owned::Token),
        // Unknown types only: known ones have their own strategies.
        (
            0xC000u16..0xFFFF,
            proptest::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(t, v)| Owned::Other(t, v)),
    ]
}

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::Request),
        Just(Class::Indication),
        Just(Class::Success),
        Just(Class::Error)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let key = IntegrityKey::new(b"key");
        let _ = frame_len(&bytes);
        let _ = ChannelData::parse(&bytes);
        if let Ok(msg) = Message::parse(&bytes) {
            let tid = msg.transaction_id();
            for a in msg.attributes() {
                let _ = Attribute::decode(a.ty, a.value, &tid);
            }
            let _ = msg.verify_fingerprint();
            let _ = msg.verify_integrity(&key);
            let _ = msg.verify_integrity_sha256(&key);
            let _ = msg.unknown_required(|t| t.is_known()).count();
        }
    }

    #[test]
    fn stun_shaped_garbage_never_panics(
        method in 0u16..0x1000,
        tail in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        // A valid header with a length matching the random tail exercises the
        // attribute walker rather than the header checks.
        let mut bytes = Vec::with_capacity(20 + tail.len());
        let ty = MessageType::new(Method::new(method).unwrap(), Class::Request).to_u16();
        bytes.extend_from_slice(&ty.to_be_bytes());
        let len = tail.len() & !3;
        bytes.extend_from_slice(&(len as u16).to_be_bytes());
        bytes.extend_from_slice(&0x2112A442u32.to_be_bytes());
        bytes.extend_from_slice(&[9; 12]);
        bytes.extend_from_slice(&tail[..len]);
        if let Ok(msg) = Message::parse(&bytes) {
            let tid = msg.transaction_id();
            for a in msg.attributes() {
                let _ = Attribute::decode(a.ty, a.value, &tid);
            }
            let _ = msg.verify_fingerprint();
        }
    }

    #[test]
    fn encode_decode_round_trips(
        method in 0u16..0x1000,
        class in class(),
        tid in any::<[u8; 12]>(),
        attrs in proptest::collection::vec(owned(), 0..12),
        with_integrity in any::<bool>(),
        with_sha256 in any::<bool>(),
        with_fingerprint in any::<bool>(),
    ) {
        let tid = TransactionId(tid);
        let ty = MessageType::new(Method::new(method).unwrap(), class);
        let key = IntegrityKey::new(b"secret");
        let mut buf = vec![0u8; 8192];
        let mut enc = Encoder::new(&mut buf, ty, &tid).unwrap();
        for a in &attrs {
            enc.attribute(&a.attr()).unwrap();
        }
        if with_integrity { enc.integrity(&key).unwrap(); }
        if with_sha256 { enc.integrity_sha256(&key).unwrap(); }
        if with_fingerprint { enc.fingerprint().unwrap(); }
        let n = enc.finish();

        let msg = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(msg.message_type(), ty);
        prop_assert_eq!(msg.transaction_id(), tid);
        let decoded: Vec<Attribute<'_>> = msg
            .attributes()
            .filter(|a| !matches!(a.ty, AttributeType::MESSAGE_INTEGRITY
                | AttributeType::MESSAGE_INTEGRITY_SHA256 | AttributeType::FINGERPRINT))
            .map(|a| Attribute::decode(a.ty, a.value, &tid).unwrap())
            .collect();
        let expected: Vec<Attribute<'_>> = attrs.iter().map(Owned::attr).collect();
        prop_assert_eq!(decoded, expected);
        if with_integrity { prop_assert!(msg.verify_integrity(&key).is_ok()); }
        if with_sha256 { prop_assert!(msg.verify_integrity_sha256(&key).is_ok()); }
        if with_fingerprint { prop_assert!(msg.verify_fingerprint().is_ok()); }

        // Every strict prefix is rejected without panicking.
        for cut in 0..n {
            prop_assert!(Message::parse(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn channel_data_round_trips(
        channel in 0x4000u16..=0x4FFF,
        payload in proptest::collection::vec(any::<u8>(), 0..1500),
        padded in any::<bool>(),
    ) {
        let ch = ChannelNumber::new(channel).unwrap();
        let mut buf = vec![0u8; 1600];
        let n = ChannelData::encode(&mut buf, ch, &payload, padded).unwrap();
        if padded {
            prop_assert_eq!(n % 4, 0);
            prop_assert_eq!(frame_len(&buf[..n]).unwrap(), Some(n));
        }
        let cd = ChannelData::parse(&buf[..n]).unwrap();
        prop_assert_eq!(cd.channel, channel);
        prop_assert_eq!(cd.payload, &payload[..]);
    }
}

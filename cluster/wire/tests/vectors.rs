//! RFC 5769 test vectors (and RFC 8489 appendix B.1), byte for byte.

use natrix_wire::{
    Attribute, AttributeType, Class, Encoder, IntegrityError, IntegrityKey, Message, MessageType,
    Method, PasswordAlgorithm, TransactionId, long_term_key_md5, long_term_key_sha256, samples,
    short_term_key, userhash,
};

fn unhex(s: &str) -> Vec<u8> {
    let clean: String = s.split_whitespace().collect();
    hex::decode(clean).expect("valid hex")
}

/// RFC 5769 §2.1 Sample Request.
fn sample_request() -> Vec<u8> {
    samples::RFC5769_REQUEST.to_vec()
}

/// RFC 5769 §2.2 Sample IPv4 Response.
fn sample_ipv4_response() -> Vec<u8> {
    samples::RFC5769_IPV4_RESPONSE.to_vec()
}

/// RFC 5769 §2.3 Sample IPv6 Response.
fn sample_ipv6_response() -> Vec<u8> {
    samples::RFC5769_IPV6_RESPONSE.to_vec()
}

/// RFC 5769 §2.4 Sample Request with Long-Term Authentication.
fn sample_long_term_request() -> Vec<u8> {
    samples::RFC5769_LONG_TERM_REQUEST.to_vec()
}

const PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";
const LT_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
const LT_PASSWORD: &str = "The\u{00AD}M\u{00AA}tr\u{2168}";

fn short_key() -> IntegrityKey {
    IntegrityKey::new(&short_term_key(PASSWORD))
}

#[test]
fn rfc5769_sample_request_verifies() {
    let bytes = sample_request();
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.method(), Method::BINDING);
    assert_eq!(msg.class(), Class::Request);
    assert!(!msg.is_rfc3489());
    assert_eq!(
        msg.transaction_id(),
        TransactionId([
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae
        ])
    );
    msg.verify_fingerprint().unwrap();
    msg.verify_integrity(&short_key()).unwrap();
    assert_eq!(
        msg.verify_integrity(&IntegrityKey::new(b"wrong")),
        Err(IntegrityError::Mismatch)
    );
    let tid = msg.transaction_id();
    let decoded: Vec<_> = msg
        .attributes()
        .map(|a| Attribute::decode(a.ty, a.value, &tid).unwrap())
        .collect();
    assert_eq!(decoded[0], Attribute::Software("STUN test client"));
    assert_eq!(decoded[1], Attribute::Priority(0x6e0001ff));
    assert_eq!(decoded[2], Attribute::IceControlled(0x932ff9b151263b36));
    assert_eq!(decoded[3], Attribute::Username("evtj:h6vY"));
    assert_eq!(decoded.len(), 6);
}

#[test]
fn rfc5769_ipv4_response_verifies_and_decodes_mapped_address() {
    let bytes = sample_ipv4_response();
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.class(), Class::Success);
    msg.verify_fingerprint().unwrap();
    msg.verify_integrity(&short_key()).unwrap();
    let addr = msg
        .decode(AttributeType::XOR_MAPPED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(
        addr,
        Attribute::XorMappedAddress("192.0.2.1:32853".parse().unwrap())
    );
    assert_eq!(
        msg.decode(AttributeType::SOFTWARE).unwrap().unwrap(),
        Attribute::Software("test vector")
    );
}

#[test]
fn rfc5769_ipv6_response_verifies_and_decodes_mapped_address() {
    let bytes = sample_ipv6_response();
    let msg = Message::parse(&bytes).unwrap();
    msg.verify_fingerprint().unwrap();
    msg.verify_integrity(&short_key()).unwrap();
    let addr = msg
        .decode(AttributeType::XOR_MAPPED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(
        addr,
        Attribute::XorMappedAddress(
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap()
        )
    );
}

/// Re-encoding the IPv4 response with our encoder gives the same bytes once
/// the padding of SOFTWARE (spaces in the RFC, zeros here) is accounted for:
/// only the padding byte, the HMAC and the CRC may differ, so compare the rest
/// and check our own integrity and fingerprint verify.
#[test]
fn encoder_reproduces_rfc5769_ipv4_response_layout() {
    let reference = sample_ipv4_response();
    let msg = Message::parse(&reference).unwrap();
    let mut buf = [0u8; 128];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Success),
        &msg.transaction_id(),
    )
    .unwrap();
    enc.software("test vector").unwrap();
    enc.xor_mapped_address("192.0.2.1:32853".parse().unwrap())
        .unwrap();
    enc.integrity(&short_key()).unwrap();
    enc.fingerprint().unwrap();
    let n = enc.finish();
    assert_eq!(n, reference.len());
    // Header, SOFTWARE value, XOR-MAPPED-ADDRESS, attribute headers: equal.
    assert_eq!(&buf[..35], &reference[..35]);
    assert_eq!(buf[35], 0, "we pad with zeros");
    assert_eq!(&buf[36..52], &reference[36..52]);
    let ours = Message::parse(&buf[..n]).unwrap();
    ours.verify_integrity(&short_key()).unwrap();
    ours.verify_fingerprint().unwrap();
}

#[test]
fn rfc5769_long_term_request_verifies_with_saslprep_password() {
    let bytes = sample_long_term_request();
    let msg = Message::parse(&bytes).unwrap();
    assert!(!msg.has_fingerprint());
    let tid = msg.transaction_id();
    let get = |ty| {
        let v = msg.get(ty).unwrap();
        Attribute::decode(ty, v, &tid).unwrap()
    };
    assert_eq!(
        get(AttributeType::USERNAME),
        Attribute::Username(LT_USERNAME)
    );
    assert_eq!(get(AttributeType::REALM), Attribute::Realm("example.org"));
    assert_eq!(
        get(AttributeType::NONCE),
        Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA")
    );
    let key = long_term_key_md5(LT_USERNAME, "example.org", LT_PASSWORD);
    assert_eq!(
        key,
        long_term_key_md5(LT_USERNAME, "example.org", "TheMatrIX")
    );
    msg.verify_integrity(&IntegrityKey::new(&key)).unwrap();
}

/// The long-term request has zero padding, so our encoder must reproduce it
/// exactly, integrity included.
#[test]
fn encoder_reproduces_rfc5769_long_term_request_byte_for_byte() {
    let reference = sample_long_term_request();
    let msg = Message::parse(&reference).unwrap();
    let key = IntegrityKey::new(&long_term_key_md5(LT_USERNAME, "example.org", LT_PASSWORD));
    let mut buf = [0u8; 256];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        &msg.transaction_id(),
    )
    .unwrap();
    enc.attribute(&Attribute::Username(LT_USERNAME)).unwrap();
    enc.attribute(&Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"))
        .unwrap();
    enc.attribute(&Attribute::Realm("example.org")).unwrap();
    enc.integrity(&key).unwrap();
    let n = enc.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&reference));
}

/// RFC 8489 appendix B.1: USERHASH, PASSWORD-ALGORITHM SHA-256 and
/// MESSAGE-INTEGRITY-SHA256, verified and re-encoded byte for byte.
#[test]
fn rfc8489_sha256_request_verifies_and_encodes_byte_for_byte() {
    let reference = unhex(
        "00 01 00 90 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
         00 1e 00 20 4a 3c f3 8f ef 69 92 bd a9 52 c6 78 04 17 da 0f 24 81 94 15
                     56 9e 60 b2 05 c4 6e 41 40 7f 17 04
         00 15 00 29 6f 62 4d 61 74 4a 6f 73 32 41 41 41 43 66 2f 2f 34 39 39 6b
                     39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73
                     41 00 00 00
         00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
         00 1d 00 04 00 02 00 00
         00 1c 00 20 b5 c7 bf 00 5b 6c 52 a2 1c 51 c5 e8 92 f8 19 24 13 62 96 cb
                     92 7c 43 14 93 09 27 8c c6 51 8e 65",
    );
    let msg = Message::parse(&reference).unwrap();
    assert!(msg.has_integrity());
    let hash = userhash(LT_USERNAME, "example.org");
    assert_eq!(msg.get(AttributeType::USERHASH).unwrap(), &hash[..]);
    let key = IntegrityKey::new(&long_term_key_sha256(
        LT_USERNAME,
        "example.org",
        LT_PASSWORD,
    ));
    msg.verify_integrity_sha256(&key).unwrap();
    msg.verify_any_integrity(&key).unwrap();

    let mut buf = [0u8; 256];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        &msg.transaction_id(),
    )
    .unwrap();
    enc.attribute(&Attribute::Userhash(&hash)).unwrap();
    enc.attribute(&Attribute::Nonce(
        "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA",
    ))
    .unwrap();
    enc.attribute(&Attribute::Realm("example.org")).unwrap();
    enc.attribute(&Attribute::PasswordAlgorithm(PasswordAlgorithm {
        algorithm: PasswordAlgorithm::SHA256,
        parameters: &[],
    }))
    .unwrap();
    enc.integrity_sha256(&key).unwrap();
    let n = enc.finish();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&reference));
}

#[test]
fn tampering_breaks_integrity_and_fingerprint() {
    let mut bytes = sample_request();
    bytes[30] ^= 1; // inside SOFTWARE
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.verify_fingerprint(), Err(IntegrityError::Mismatch));
    assert_eq!(
        msg.verify_integrity(&short_key()),
        Err(IntegrityError::Mismatch)
    );
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    let key = short_key();
    let mut buf = [0u8; 128];
    let tid = TransactionId([1; 12]);
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        &tid,
    )
    .unwrap();
    enc.attribute(&Attribute::Username("alice")).unwrap();
    enc.integrity(&key).unwrap();
    enc.software("injected").unwrap();
    enc.fingerprint().unwrap();
    let n = enc.finish();
    let msg = Message::parse(&buf[..n]).unwrap();
    assert!(msg.get(AttributeType::SOFTWARE).is_none());
    assert!(msg.get(AttributeType::FINGERPRINT).is_some());
    msg.verify_integrity(&key).unwrap();
    msg.verify_fingerprint().unwrap();
}

/// RFC 6062's methods and CONNECTION-ID: a ConnectionAttempt indication
/// (method 0x00C, type 0x001C) carries the id big-endian after its type and
/// length, reads back, and the new error codes carry their phrases.
#[test]
fn rfc6062_connection_attempt_and_connection_id_round_trip() {
    use natrix_wire::ErrorCode;
    let tid = TransactionId([7; 12]);
    let mut buf = [0u8; 128];
    let mut enc = Encoder::new(
        &mut buf,
        MessageType::new(Method::CONNECTION_ATTEMPT, Class::Indication),
        &tid,
    )
    .unwrap();
    enc.attribute(&Attribute::ConnectionId(0x0102_0304))
        .unwrap();
    let n = enc.finish();
    assert_eq!(&buf[..2], &[0x00, 0x1C]);
    assert_eq!(
        &buf[20..28],
        &[0x00, 0x2A, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04]
    );
    let msg = Message::parse(&buf[..n]).unwrap();
    assert_eq!(msg.method(), Method::CONNECTION_ATTEMPT);
    assert_eq!(msg.method().name(), "connection_attempt");
    assert_eq!(
        msg.decode(AttributeType::CONNECTION_ID),
        Some(Ok(Attribute::ConnectionId(0x0102_0304)))
    );
    assert_eq!(Method::CONNECT.name(), "connect");
    assert_eq!(Method::CONNECTION_BIND.name(), "connection_bind");
    assert_eq!(
        ErrorCode::CONNECTION_ALREADY_EXISTS.reason,
        "Connection Already Exists"
    );
    assert_eq!(ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE.code, 447);
}

//! Connection-data exchange: how two (or more) participants of a session
//! swap their candidates through CDX before they hole-punch.
//!
//! lookup hands every participant of a session an invitation
//! ([`natrix_model::invitation`]): a ticket that CDX verifies (it names the
//! session, the participant's index, the number of participants and an
//! expiry, authenticated with a key derived from the cluster secret) and a
//! session key that CDX never sees.
//! Each participant seals its connection data with the session key
//! (ChaCha20-Poly1305) and posts it, with its ticket, to any CDX node over
//! UDP — from the socket it will punch from, so the node learns the address
//! the NAT gave that socket. CDX stores the sealed entry in the coordination
//! store and delivers every other participant's entry to it, retransmitting
//! each delivery until the participant acknowledges it or the session ends.
//! Nodes learn of entries posted elsewhere through the store's broadcast, so
//! participants may use different nodes.
//!
//! # Wire format
//!
//! Exchange messages are STUN messages (RFC 8489 header with the magic
//! cookie, FINGERPRINT required) with two methods of their own, numbered
//! below 0x100 so that their first byte stays in 0..=3 and RFC 7983
//! demultiplexing (and STUN framing on TCP) still sees STUN:
//!
//! | message | class | attributes |
//! |---|---|---|
//! | Post (0x0E1) | request, client → CDX | TICKET, ENTRY, optional PROFILE, FINGERPRINT |
//! | Post | success, CDX → client | XOR-MAPPED-ADDRESS, STATUS, FINGERPRINT |
//! | Post | error, CDX → client | ERROR-CODE (400, 401, 403, 500), FINGERPRINT |
//! | Deliver (0x0E2) | request, CDX → client | ENTRY (another participant's), FINGERPRINT |
//! | Deliver | success, client → CDX | FINGERPRINT (the acknowledgement; same transaction id) |
//!
//! Attributes (comprehension-required range):
//!
//! ```text
//! TICKET  0x7E01  session id 16 B | participant 1 B | participants 1 B | 0 0 |
//!                 expiry (Unix seconds) 8 B BE | tag 16 B          = 44 B
//! ENTRY   0x7E02  participant 1 B | 0 0 0 | seq 4 B BE | sealed (nonce 12 B |
//!                 ciphertext | Poly1305 tag 16 B), at most 1024 B sealed
//! STATUS  0x7E03  participants posted 1 B | participants 1 B | 0 0 |
//!                 seconds left 4 B BE
//! PROFILE 0x7E04  mapping 1 B | filtering 1 B | 0 0   (codes of
//!                 `NatProfile::codes`; cleartext, for metrics only)
//! ```
//!
//! The ticket tag is HMAC-SHA-256 (first 16 bytes) over the first 28 bytes
//! of the ticket under `HMAC-SHA-256(cluster secret, "natrix exchange ticket
//! v1")`. The sealed entry's associated data is the session id, the
//! participant and the sequence number, so neither CDX nor anyone else can
//! move an entry to another session, participant or version unnoticed.
//! A participant posts with a sequence number that grows when its data
//! changes; re-posting the same sequence is a retransmission (answered
//! again), a lower one is a replay (dropped and counted).
//!
//! # Limits
//!
//! At most `MAX_PARTICIPANTS` per session, [`MAX_SEALED`] bytes per entry,
//! sessions at most `MAX_SESSION_TTL` long (both constants of
//! `natrix_model::invitation`), and a cap on live sessions per source IP and
//! in total per node. Sessions leave nothing behind: store keys
//! carry the session's TTL and node state is swept at expiry.

pub mod client;
mod registry;

use std::net::SocketAddr;

use natrix_wire::{AttributeType, Class, Encoder, Message, MessageType, Method, TransactionId};

pub use registry::{Admitted, Limits, Local, Registry, Stats, Transmit, UNPROVEN_SENDS};

/// Post: a participant's entry, client → CDX (request) and its answer.
pub const POST: Method = Method::EXCHANGE_POST;
/// Deliver: another participant's entry, CDX → client, acknowledged by a
/// success response.
pub const DELIVER: Method = Method::EXCHANGE_DELIVER;

/// TICKET attribute.
pub const TICKET: AttributeType = AttributeType(0x7E01);
/// ENTRY attribute.
pub const ENTRY: AttributeType = AttributeType(0x7E02);
/// STATUS attribute.
pub const STATUS: AttributeType = AttributeType(0x7E03);
/// PROFILE attribute.
pub const PROFILE: AttributeType = AttributeType(0x7E04);
/// CHALLENGE attribute: 16 bytes CDX sends with a 401 to a Post that moves
/// a participant to a new address, echoed in the proven Post.
pub const CHALLENGE: AttributeType = AttributeType(0x7E05);
/// PROOF attribute: `move_proof(move key, CHALLENGE)`, 16 bytes.
pub const PROOF: AttributeType = AttributeType(0x7E06);
/// Length of CHALLENGE and PROOF.
pub const CHALLENGE_LEN: usize = 16;
/// How long a challenge stays valid (it is stateless: one bucket of this
/// length, or the one before).
pub const CHALLENGE_BUCKET_SECS: u64 = 30;

/// The challenge for a Post of `ticket` from `from` in time bucket
/// `bucket` (Unix seconds / [`CHALLENGE_BUCKET_SECS`]): any CDX node
/// computes the same one from the cluster secret, so the proven Post may
/// reach another node.
pub fn challenge(
    base: &ring::hmac::Key,
    ticket: &[u8],
    from: SocketAddr,
    bucket: u64,
) -> [u8; CHALLENGE_LEN] {
    let mut ctx = ring::hmac::Context::with_key(base);
    ctx.update(b"challenge");
    ctx.update(ticket);
    ctx.update(from.to_string().as_bytes());
    ctx.update(&bucket.to_be_bytes());
    let mut c = [0u8; CHALLENGE_LEN];
    c.copy_from_slice(&ctx.sign().as_ref()[..CHALLENGE_LEN]);
    c
}

/// Whether `post` proves its participant's move to `from` at `unix`
/// (Unix seconds): it echoes a challenge of this or the previous bucket
/// and signs it with the move key the ticket derives.
pub fn proves_move(base: &ring::hmac::Key, post: &Post<'_>, from: SocketAddr, unix: u64) -> bool {
    let (Some(c), Some(p)) = (post.challenge, post.proof) else {
        return false;
    };
    let bucket = unix / CHALLENGE_BUCKET_SECS;
    let fresh = [bucket, bucket.saturating_sub(1)].iter().any(|b| {
        natrix_model::secret::constant_time_eq(&challenge(base, post.ticket, from, *b), c)
    });
    let key = natrix_model::invitation::move_key(base, post.ticket);
    fresh
        && natrix_model::secret::constant_time_eq(&natrix_model::invitation::move_proof(&key, c), p)
}

/// Largest sealed entry.
pub const MAX_SEALED: usize = 1024;

/// One participant's entry as carried by ENTRY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Whose entry.
    pub participant: u8,
    /// Its version.
    pub seq: u32,
    /// The sealed connection data.
    pub sealed: &'a [u8],
}

impl<'a> Entry<'a> {
    /// Parses an ENTRY value.
    pub fn parse(v: &'a [u8]) -> Option<Entry<'a>> {
        if v.len() < 8 {
            return None;
        }
        Some(Entry {
            participant: v[0],
            seq: u32::from_be_bytes(v[4..8].try_into().ok()?),
            sealed: &v[8..],
        })
    }

    /// The ENTRY value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.sealed.len());
        v.extend_from_slice(&[self.participant, 0, 0, 0]);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(self.sealed);
        v
    }
}

/// True when `packet` is an exchange message (checked before Binding).
pub fn is_exchange(packet: &[u8]) -> bool {
    if packet.len() < natrix_wire::HEADER_LEN
        || packet[4..8] != natrix_wire::MAGIC_COOKIE.to_be_bytes()
    {
        return false;
    }
    let ty = u16::from_be_bytes([packet[0], packet[1]]);
    let method = (ty & 0x000F) | ((ty & 0x00E0) >> 1) | ((ty & 0x3E00) >> 2);
    method == POST.value() || method == DELIVER.value()
}

/// Why an exchange message was refused. Every variant is a value of the
/// `result` label of `cdx_exchange_posts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not a valid exchange message: bad STUN, no FINGERPRINT, missing or
    /// malformed attributes, an entry for another participant.
    Malformed,
    /// The ticket's tag does not verify.
    Forged,
    /// The ticket expired.
    Expired,
    /// A lower sequence number than the participant already posted.
    Replayed,
    /// The sealed entry is larger than [`MAX_SEALED`].
    TooLarge,
    /// Too many live sessions from this source IP, or on this node.
    SourceLimit,
    /// The session already has entries from all its participants.
    SessionFull,
    /// The coordination store did not answer.
    StoreError,
    /// The node's exchange inbox was full.
    Overloaded,
    /// This node has no cluster secret, so it cannot verify tickets.
    Disabled,
    /// A Post from a new address for a participant already in the session,
    /// without a proof of its move key: answered 401 with a CHALLENGE.
    MoveUnproven,
}

impl Reject {
    /// Every reason, in label order.
    pub const ALL: [Reject; 11] = [
        Reject::Malformed,
        Reject::Forged,
        Reject::Expired,
        Reject::Replayed,
        Reject::TooLarge,
        Reject::SourceLimit,
        Reject::SessionFull,
        Reject::StoreError,
        Reject::Overloaded,
        Reject::Disabled,
        Reject::MoveUnproven,
    ];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Forged => "forged",
            Reject::Expired => "expired",
            Reject::Replayed => "replayed",
            Reject::TooLarge => "too_large",
            Reject::SourceLimit => "source_limit",
            Reject::SessionFull => "session_full",
            Reject::StoreError => "store_error",
            Reject::Overloaded => "overloaded",
            Reject::Disabled => "disabled",
            Reject::MoveUnproven => "move_unproven",
        }
    }

    /// The error response a client gets, if any: forged tickets, replays
    /// and overload are dropped silently (answering would help an attacker
    /// or add load), the rest get a code and a reason.
    pub const fn answer(self) -> Option<(u16, &'static str)> {
        match self {
            Reject::Malformed => Some((400, "malformed exchange post")),
            Reject::TooLarge => Some((400, "entry too large")),
            Reject::Expired => Some((401, "ticket expired")),
            Reject::SourceLimit => Some((403, "too many sessions from this address")),
            Reject::SessionFull => Some((403, "session full")),
            Reject::Disabled => Some((403, "exchange not enabled on this node")),
            Reject::StoreError => Some((500, "coordination store unavailable")),
            Reject::MoveUnproven => Some((401, "prove the move")),
            Reject::Forged | Reject::Replayed | Reject::Overloaded => None,
        }
    }
}

/// A parsed Post request.
#[derive(Clone, Copy, Debug)]
pub struct Post<'a> {
    /// The request's transaction id (echoed in the answer).
    pub tid: TransactionId,
    /// The TICKET value, not yet verified.
    pub ticket: &'a [u8],
    /// The poster's entry.
    pub entry: Entry<'a>,
    /// PROFILE codes, if sent.
    pub profile: Option<[u8; 2]>,
    /// CHALLENGE, if echoed.
    pub challenge: Option<&'a [u8]>,
    /// PROOF, if sent.
    pub proof: Option<&'a [u8]>,
}

/// An exchange message from a client.
#[derive(Clone, Copy, Debug)]
pub enum ClientMessage<'a> {
    /// A Post request.
    Post(Post<'a>),
    /// A Deliver success response: the acknowledgement of a delivery.
    Ack(TransactionId),
}

/// Parses an exchange message sent by a client.
pub fn parse_client(packet: &[u8]) -> Result<ClientMessage<'_>, Reject> {
    let msg = Message::parse(packet).map_err(|_| Reject::Malformed)?;
    if !msg.has_fingerprint() || msg.verify_fingerprint().is_err() {
        return Err(Reject::Malformed);
    }
    match (msg.method(), msg.class()) {
        (m, Class::Request) if m == POST => {
            let ticket = msg.get(TICKET).ok_or(Reject::Malformed)?;
            let entry = msg
                .get(ENTRY)
                .and_then(Entry::parse)
                .ok_or(Reject::Malformed)?;
            let profile = msg
                .get(PROFILE)
                .and_then(|p| Some([*p.first()?, *p.get(1)?]));
            let sized = |v: &'_ [u8]| v.len() == CHALLENGE_LEN;
            Ok(ClientMessage::Post(Post {
                tid: msg.transaction_id(),
                ticket,
                entry,
                profile,
                challenge: msg.get(CHALLENGE).filter(|v| sized(v)),
                proof: msg.get(PROOF).filter(|v| sized(v)),
            }))
        }
        (m, Class::Success) if m == DELIVER => Ok(ClientMessage::Ack(msg.transaction_id())),
        _ => Err(Reject::Malformed),
    }
}

/// Writes the success answer to a Post.
pub fn encode_post_success(
    out: &mut [u8],
    tid: &TransactionId,
    mapped: SocketAddr,
    posted: u8,
    participants: u8,
    seconds_left: u32,
) -> Result<usize, natrix_wire::EncodeError> {
    let mut enc = Encoder::new(out, MessageType::new(POST, Class::Success), tid)?;
    enc.xor_mapped_address(mapped)?;
    let mut status = [posted, participants, 0, 0, 0, 0, 0, 0];
    status[4..].copy_from_slice(&seconds_left.to_be_bytes());
    enc.raw(STATUS, &status)?;
    enc.fingerprint()?;
    Ok(enc.finish())
}

/// Writes an error answer to a Post.
pub fn encode_post_error(
    out: &mut [u8],
    tid: &TransactionId,
    code: u16,
    reason: &str,
) -> Result<usize, natrix_wire::EncodeError> {
    let mut enc = Encoder::new(out, MessageType::new(POST, Class::Error), tid)?;
    enc.error_code(natrix_wire::ErrorCode { code, reason })?;
    enc.fingerprint()?;
    Ok(enc.finish())
}

/// Writes the 401 answer to an unproven move, with its CHALLENGE.
pub fn encode_post_challenge(
    out: &mut [u8],
    tid: &TransactionId,
    challenge: &[u8; CHALLENGE_LEN],
) -> Result<usize, natrix_wire::EncodeError> {
    let mut enc = Encoder::new(out, MessageType::new(POST, Class::Error), tid)?;
    enc.error_code(natrix_wire::ErrorCode {
        code: 401,
        reason: "prove the move",
    })?;
    enc.raw(CHALLENGE, challenge)?;
    enc.fingerprint()?;
    Ok(enc.finish())
}

/// Writes a Deliver request carrying `entry`.
pub fn encode_deliver(tid: &TransactionId, entry: &Entry<'_>) -> Vec<u8> {
    let mut out = vec![0u8; 20 + 12 + 8 + MAX_SEALED + 8];
    let value = entry.to_bytes();
    let n = (|| {
        let mut enc = Encoder::new(&mut out, MessageType::new(DELIVER, Class::Request), tid)?;
        enc.raw(ENTRY, &value)?;
        enc.fingerprint()?;
        Ok::<_, natrix_wire::EncodeError>(enc.finish())
    })()
    .unwrap_or(0);
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_messages_are_told_apart_from_binding() {
        let tid = TransactionId([4; 12]);
        let deliver = encode_deliver(
            &tid,
            &Entry {
                participant: 1,
                seq: 2,
                sealed: &[0; 40],
            },
        );
        assert!(is_exchange(&deliver));
        assert!(!is_exchange(natrix_wire::samples::RFC5769_REQUEST));
        assert!(!is_exchange(b"short"));
        let mut out = [0u8; 128];
        let n = encode_post_error(&mut out, &tid, 401, "ticket expired").unwrap();
        assert!(is_exchange(&out[..n]));
        // A Deliver request is not something a client sends.
        assert!(matches!(parse_client(&deliver), Err(Reject::Malformed)));
    }
}

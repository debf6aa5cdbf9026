//! Connection-data exchange: how two (or more) participants of a session
//! swap their candidates through CDX before they hole-punch.
//!
//! lookup hands every participant of a session an [`Invitation`]: a
//! [`Ticket`] that CDX verifies (it names the session, the participant's
//! index, the number of participants and an expiry, authenticated with a key
//! derived from the cluster secret) and a [`SessionKey`] that CDX never sees.
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
//!                 [`profile_codes`]; cleartext, for metrics only)
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
//! At most [`MAX_PARTICIPANTS`] per session, [`MAX_SEALED`] bytes per entry,
//! sessions at most [`MAX_SESSION_TTL`] long, and a cap on live sessions per
//! source IP and in total per node. Sessions leave nothing behind: store keys
//! carry the session's TTL and node state is swept at expiry.

mod actor;
pub mod client;
mod registry;

use std::net::SocketAddr;
use std::time::Duration;

use natrix_wire::{AttributeType, Class, Encoder, Message, MessageType, Method, TransactionId};
use ring::{aead, hmac};

pub use actor::{ExchangeActor, ExchangeInbox, ExchangeSender, Inbound, inbox};
pub use registry::{Limits, Local, Registry, Transmit};

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

/// Most participants in one session.
pub const MAX_PARTICIPANTS: usize = 8;
/// Largest sealed entry.
pub const MAX_SEALED: usize = 1024;
/// Longest session a ticket may describe (longer expiries are clamped).
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(3600);
/// Ticket length on the wire.
pub const TICKET_LEN: usize = 44;
const TICKET_SIGNED: usize = 28;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// Seal overhead: nonce and Poly1305 tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// A session id (16 random bytes chosen by lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// Lower-case hex, for store keys.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The key that seals a session's connection data; CDX never sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// The key CDX uses to verify tickets, derived from the cluster secret.
pub fn ticket_key(cluster_secret: &[u8]) -> hmac::Key {
    let derive = hmac::Key::new(hmac::HMAC_SHA256, cluster_secret);
    let k = hmac::sign(&derive, b"natrix exchange ticket v1");
    hmac::Key::new(hmac::HMAC_SHA256, k.as_ref())
}

/// A participant's admission to a session, as CDX verified it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The session.
    pub session: SessionId,
    /// This participant's index, below `participants`.
    pub participant: u8,
    /// How many participants the session has.
    pub participants: u8,
    /// Unix seconds after which the session is over.
    pub expires: u64,
}

/// Why a ticket is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Wrong length, a participant index out of range, or too many
    /// participants.
    #[error("malformed ticket")]
    Malformed,
    /// The tag does not verify: forged, or minted with another secret.
    #[error("ticket not issued by this cluster")]
    Forged,
    /// The session is over.
    #[error("ticket expired")]
    Expired,
}

impl Ticket {
    /// The 44 bytes of the TICKET attribute, authenticated with `key`
    /// (what lookup does when it plans a session).
    pub fn mint(&self, key: &hmac::Key) -> [u8; TICKET_LEN] {
        let mut out = [0u8; TICKET_LEN];
        out[..16].copy_from_slice(&self.session.0);
        out[16] = self.participant;
        out[17] = self.participants;
        out[20..28].copy_from_slice(&self.expires.to_be_bytes());
        let tag = hmac::sign(key, &out[..TICKET_SIGNED]);
        out[TICKET_SIGNED..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
        out
    }

    /// Verifies a TICKET attribute at `now` (Unix seconds).
    pub fn verify(bytes: &[u8], key: &hmac::Key, now: u64) -> Result<Ticket, TicketError> {
        let bytes: &[u8; TICKET_LEN] = bytes.try_into().map_err(|_| TicketError::Malformed)?;
        let tag = hmac::sign(key, &bytes[..TICKET_SIGNED]);
        // Compare the truncated tag without an early exit.
        let diff = tag.as_ref()[..TAG_LEN]
            .iter()
            .zip(&bytes[TICKET_SIGNED..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(TicketError::Forged);
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&bytes[..16]);
        let ticket = Ticket {
            session: SessionId(session),
            participant: bytes[16],
            participants: bytes[17],
            expires: u64::from_be_bytes(
                bytes[20..28]
                    .try_into()
                    .map_err(|_| TicketError::Malformed)?,
            ),
        };
        if ticket.participants < 2
            || usize::from(ticket.participants) > MAX_PARTICIPANTS
            || ticket.participant >= ticket.participants
        {
            return Err(TicketError::Malformed);
        }
        if ticket.expires <= now {
            return Err(TicketError::Expired);
        }
        Ok(ticket)
    }
}

/// What one participant receives from lookup: its ticket and the session
/// key. Its text form is `<ticket hex>.<key hex>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invitation {
    /// The TICKET attribute, opaque to the participant.
    pub ticket: [u8; TICKET_LEN],
    /// The session key.
    pub key: SessionKey,
}

impl Invitation {
    /// The session id inside the ticket (not authenticated on this side).
    pub fn session(&self) -> SessionId {
        let mut s = [0u8; 16];
        s.copy_from_slice(&self.ticket[..16]);
        SessionId(s)
    }

    /// This participant's index.
    pub fn participant(&self) -> u8 {
        self.ticket[16]
    }

    /// How many participants the session has.
    pub fn participants(&self) -> u8 {
        self.ticket[17]
    }

    /// Mints invitations for every participant of a new session: what
    /// lookup does, and what tests and tools do with the cluster secret.
    pub fn mint_session(
        cluster_secret: &[u8],
        participants: u8,
        expires: u64,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Vec<Invitation> {
        let key = ticket_key(cluster_secret);
        let mut session = [0u8; 16];
        random(&mut session);
        let mut sk = [0u8; 32];
        random(&mut sk);
        (0..participants)
            .map(|p| Invitation {
                ticket: Ticket {
                    session: SessionId(session),
                    participant: p,
                    participants,
                    expires,
                }
                .mint(&key),
                key: SessionKey(sk),
            })
            .collect()
    }
}

impl std::fmt::Display for Invitation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.ticket {
            write!(f, "{b:02x}")?;
        }
        f.write_str(".")?;
        for b in &self.key.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl std::str::FromStr for Invitation {
    type Err = String;
    fn from_str(s: &str) -> Result<Invitation, String> {
        let (t, k) = s
            .trim()
            .split_once('.')
            .ok_or("an invitation is <ticket hex>.<key hex>")?;
        Ok(Invitation {
            ticket: unhex(t).ok_or("the ticket must be 88 hex digits")?,
            key: SessionKey(unhex(k).ok_or("the key must be 64 hex digits")?),
        })
    }
}

fn aad(session: &SessionId, participant: u8, seq: u32) -> [u8; 21] {
    let mut a = [0u8; 21];
    a[..16].copy_from_slice(&session.0);
    a[16] = participant;
    a[17..].copy_from_slice(&seq.to_be_bytes());
    a
}

/// Seals `plaintext` for the session: nonce, ciphertext, tag.
pub fn seal(
    key: &SessionKey,
    session: &SessionId,
    participant: u8,
    seq: u32,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    let sealing = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key.0)
            .unwrap_or_else(|_| unreachable!("a 32-byte key is valid for ChaCha20-Poly1305")),
    );
    let tag = sealing
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad(session, participant, seq)),
            &mut body,
        )
        .unwrap_or_else(|_| unreachable!("inputs below the AEAD limits"));
    out.extend_from_slice(&body);
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a sealed entry; `None` when it was not sealed with this key for
/// this session, participant and sequence number.
pub fn open(
    key: &SessionKey,
    session: &SessionId,
    participant: u8,
    seq: u32,
    sealed: &[u8],
) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().ok()?;
    let mut body = sealed[NONCE_LEN..].to_vec();
    let opening =
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key.0).ok()?);
    let plain = opening
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad(session, participant, seq)),
            &mut body,
        )
        .ok()?;
    Some(plain.to_vec())
}

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

/// Cleartext NAT behaviour codes of the PROFILE attribute:
/// mapping 0 unknown, 1 no NAT, 2 endpoint-independent, 3 address-dependent,
/// 4 address-and-port-dependent; filtering 0 unknown, 1 endpoint-independent,
/// 2 address-dependent, 3 address-and-port-dependent.
pub fn profile_codes(profile: &crate::client::NatProfile) -> [u8; 4] {
    use crate::client::{Filtering, Mapping};
    let m = match profile.mapping {
        None => 0,
        Some(Mapping::NoNat) => 1,
        Some(Mapping::EndpointIndependent) => 2,
        Some(Mapping::AddressDependent) => 3,
        Some(Mapping::AddressAndPortDependent) => 4,
    };
    let f = match profile.filtering {
        None => 0,
        Some(Filtering::EndpointIndependent) => 1,
        Some(Filtering::AddressDependent) => 2,
        Some(Filtering::AddressAndPortDependent) => 3,
    };
    [m, f, 0, 0]
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
}

impl Reject {
    /// Every reason, in label order.
    pub const ALL: [Reject; 10] = [
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
            Ok(ClientMessage::Post(Post {
                tid: msg.transaction_id(),
                ticket,
                entry,
                profile,
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

    fn key() -> hmac::Key {
        ticket_key(b"a cluster secret of some length")
    }

    fn ticket(expires: u64) -> Ticket {
        Ticket {
            session: SessionId([7; 16]),
            participant: 1,
            participants: 2,
            expires,
        }
    }

    #[test]
    fn tickets_verify_only_with_the_cluster_key_and_before_expiry() {
        let bytes = ticket(1000).mint(&key());
        assert_eq!(Ticket::verify(&bytes, &key(), 999), Ok(ticket(1000)));
        assert_eq!(
            Ticket::verify(&bytes, &key(), 1000),
            Err(TicketError::Expired)
        );
        let other = ticket_key(b"another secret, also long enough");
        assert_eq!(
            Ticket::verify(&bytes, &other, 999),
            Err(TicketError::Forged)
        );
        for i in 0..TICKET_LEN {
            let mut forged = bytes;
            forged[i] ^= 1;
            assert_eq!(
                Ticket::verify(&forged, &key(), 999),
                Err(TicketError::Forged),
                "bit flip at {i}"
            );
        }
        assert_eq!(
            Ticket::verify(&bytes[..40], &key(), 999),
            Err(TicketError::Malformed)
        );
        let mut bad = ticket(1000);
        bad.participant = 2;
        assert_eq!(
            Ticket::verify(&bad.mint(&key()), &key(), 999),
            Err(TicketError::Malformed)
        );
    }

    #[test]
    fn sealed_entries_open_only_for_their_session_participant_and_seq() {
        let k = SessionKey([9; 32]);
        let s = SessionId([1; 16]);
        let sealed = seal(&k, &s, 0, 5, [3; 12], b"candidates");
        assert_eq!(
            open(&k, &s, 0, 5, &sealed).as_deref(),
            Some(&b"candidates"[..])
        );
        assert_eq!(
            open(&k, &s, 1, 5, &sealed),
            None,
            "moved to another participant"
        );
        assert_eq!(
            open(&k, &s, 0, 6, &sealed),
            None,
            "replayed as another version"
        );
        assert_eq!(open(&k, &SessionId([2; 16]), 0, 5, &sealed), None);
        assert_eq!(open(&SessionKey([8; 32]), &s, 0, 5, &sealed), None);
        let mut tampered = sealed.clone();
        tampered[14] ^= 0x40;
        assert_eq!(open(&k, &s, 0, 5, &tampered), None);
        assert_eq!(open(&k, &s, 0, 5, &sealed[..10]), None);
    }

    #[test]
    fn invitations_round_trip_through_text() {
        let mut n = 0u8;
        let invites = Invitation::mint_session(b"secret secret secret", 2, 99, &mut |b| {
            for x in b.iter_mut() {
                n = n.wrapping_add(1);
                *x = n;
            }
        });
        assert_eq!(invites.len(), 2);
        let text = invites[1].to_string();
        let back: Invitation = text.parse().unwrap();
        assert_eq!(back, invites[1]);
        assert_eq!(back.participant(), 1);
        assert_eq!(back.session(), invites[0].session());
        assert!("zz.00".parse::<Invitation>().is_err());
        assert!(!format!("{:?}", back.key).contains("09"));
    }

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

    #[test]
    fn every_reject_reason_is_in_the_metric_catalogue() {
        let def = natrix_telemetry::catalogue::CDX_EXCHANGE_POSTS_TOTAL;
        let values = def.labels[0].values;
        for r in Reject::ALL {
            assert!(values.contains(&r.label()), "{}", r.label());
        }
        assert!(values.contains(&"accepted"));
    }
}

//! Exchange sessions: ids, keys, tickets and invitations, and the sealing
//! of connection data (the exchange's wire format is in `natrix-cdx`).
//!
//! lookup hands every participant of a session an [`Invitation`]: a
//! [`Ticket`] that CDX verifies (it names the session, the participant's
//! index, the number of participants and an expiry, authenticated with a key
//! derived from the cluster secret, [`ticket_key`]) and a [`SessionKey`]
//! that CDX never sees. Participants [`seal`] their connection data with the
//! session key (ChaCha20-Poly1305; the associated data is the session id,
//! the participant and the sequence number, so nobody can move an entry to
//! another session, participant or version unnoticed) and [`open`] the
//! others'.
//!
//! ```text
//! TICKET  session id 16 B | participant 1 B | participants 1 B | 0 0 |
//!         expiry (Unix seconds) 8 B BE | tag 16 B                  = 44 B
//! ```
//!
//! The ticket tag is HMAC-SHA-256 (first 16 bytes) over the first 28 bytes
//! of the ticket under `HMAC-SHA-256(cluster secret, "natrix exchange ticket
//! v1")`.

use std::time::Duration;

use ring::{aead, hmac};

use crate::secret::constant_time_eq;

/// Most participants in one session.
pub const MAX_PARTICIPANTS: usize = 8;
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

/// The key participants' move keys derive from (lookup and CDX both hold
/// the cluster secret).
pub fn move_key_base(cluster_secret: &[u8]) -> hmac::Key {
    let derive = hmac::Key::new(hmac::HMAC_SHA256, cluster_secret);
    let k = hmac::sign(&derive, b"natrix exchange move v1");
    hmac::Key::new(hmac::HMAC_SHA256, k.as_ref())
}

/// A participant's move key: what proves to CDX that a Post from a new
/// address comes from the participant and not from someone who sniffed
/// its ticket. lookup hands it out in the invitation; CDX derives it from
/// the ticket.
pub fn move_key(base: &hmac::Key, ticket: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 32];
    k.copy_from_slice(hmac::sign(base, ticket).as_ref());
    k
}

/// The proof of a move: the first 16 bytes of HMAC-SHA-256 over CDX's
/// challenge under the participant's move key.
pub fn move_proof(move_key: &[u8; 32], challenge: &[u8]) -> [u8; 16] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, move_key), challenge);
    let mut p = [0u8; 16];
    p.copy_from_slice(&tag.as_ref()[..16]);
    p
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
        if !constant_time_eq(&tag.as_ref()[..TAG_LEN], &bytes[TICKET_SIGNED..]) {
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

/// What one participant receives from lookup: its ticket, the session key
/// and its move key. Its text form is `<ticket hex>.<key hex>.<move key
/// hex>` (invitations without the move key still read, but cannot move).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invitation {
    /// The TICKET attribute, opaque to the participant.
    pub ticket: [u8; TICKET_LEN],
    /// The session key.
    pub key: SessionKey,
    /// The participant's move key ([`move_key`]).
    pub mover: Option<SessionKey>,
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
        let base = move_key_base(cluster_secret);
        let mut session = [0u8; 16];
        random(&mut session);
        let mut sk = [0u8; 32];
        random(&mut sk);
        (0..participants)
            .map(|p| {
                let ticket = Ticket {
                    session: SessionId(session),
                    participant: p,
                    participants,
                    expires,
                }
                .mint(&key);
                Invitation {
                    ticket,
                    key: SessionKey(sk),
                    mover: Some(SessionKey(move_key(&base, &ticket))),
                }
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
        if let Some(m) = &self.mover {
            f.write_str(".")?;
            for b in &m.0 {
                write!(f, "{b:02x}")?;
            }
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
        let mut parts = s.trim().split('.');
        let (Some(t), Some(k), m, None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("an invitation is <ticket hex>.<key hex>.<move key hex>".into());
        };
        Ok(Invitation {
            ticket: unhex(t).ok_or("the ticket must be 88 hex digits")?,
            key: SessionKey(unhex(k).ok_or("the key must be 64 hex digits")?),
            mover: m
                .map(|m| {
                    unhex(m)
                        .map(SessionKey)
                        .ok_or("the move key must be 64 hex digits")
                })
                .transpose()?,
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
        // The move key is the one CDX derives from the ticket.
        let base = move_key_base(b"secret secret secret");
        assert_eq!(
            back.mover.as_ref().map(|m| m.0),
            Some(move_key(&base, &back.ticket))
        );
        assert_ne!(invites[0].mover, invites[1].mover, "one per participant");
        // An invitation of two parts still reads (it cannot move).
        let old: Invitation = text.rsplit_once('.').unwrap().0.parse().unwrap();
        assert_eq!(old.mover, None);
        assert_eq!(back.session(), invites[0].session());
        assert!("zz.00".parse::<Invitation>().is_err());
        assert!(!format!("{:?}", back.key).contains("09"));
    }
}

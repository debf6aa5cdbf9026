//! A participant's exchange as a state machine: post this participant's
//! connection data, retransmit until CDX answers, acknowledge every
//! delivery, and finish when every other participant's data is in (or
//! fail on a refusal or at the deadline). Sans-IO in the manner of
//! `discovery`: the driver feeds `handle_input` with what arrives, sends
//! what `poll_transmit` returns, sleeps until `poll_timeout`, and calls
//! `handle_timeout`; randomness (the seal's nonce, the transaction id)
//! comes in as seeds.
//!
//! # Connection data (the plaintext inside a sealed entry)
//!
//! ```text
//! version 1 B (=1) | NAT class 1 B | candidates 1 B | per candidate:
//!   kind 1 B (1 host, 2 server-reflexive, 3 relayed, 4 predicted) |
//!   family 1 B (4, 6) |
//!   port 2 B BE | address 4 or 16 B
//! ```
//!
//! NAT class codes: 0 unknown, 1 open, 2 full-cone, 3 restricted-cone,
//! 4 port-restricted-cone, 5 symmetric, 6 udp-blocked.
//!
//! # Timing
//!
//! The Post is retransmitted from [`INITIAL_RTO`], doubling up to
//! [`MAX_RTO`], until CDX answers; after that, while entries of other
//! participants are missing, it is re-posted every [`MAX_RTO`] (which makes
//! CDX look in the store again).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natrix_model::NatClass;
use natrix_model::invitation::{Invitation, SessionId, SessionKey, open, seal};
use natrix_wire::{
    Attribute, AttributeType, Class, EncodeError, Encoder, Message, MessageType, TransactionId,
};

use super::{CHALLENGE, CHALLENGE_LEN, DELIVER, ENTRY, Entry, POST, PROFILE, PROOF, TICKET};
use natrix_model::invitation::TICKET_LEN;

/// First retransmission timeout of a Post (RFC 8489 §6.2.1 timing, short).
pub const INITIAL_RTO: Duration = Duration::from_millis(100);
/// Longest gap between Post retransmissions, and the re-post interval while
/// entries of other participants are still missing.
pub const MAX_RTO: Duration = Duration::from_millis(1000);
/// Acknowledgements queued at most (a flood of deliveries cannot grow the
/// queue; a dropped one only means CDX sends the entry again).
const MAX_PENDING_ACKS: usize = 64;

/// What a candidate address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CandidateKind {
    /// The socket's local address.
    Host,
    /// The address the NAT gave the socket, as CDX saw it.
    ServerReflexive,
    /// A TURN relayed address.
    Relayed,
    /// A fresh socket's local port at the public address: behind a
    /// port-preserving NAT, where that socket's first mapping will be.
    Predicted,
}

/// One address the peer may reach this participant at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its kind.
    pub kind: CandidateKind,
    /// The address.
    pub addr: SocketAddr,
}

/// What a participant tells the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionData {
    /// The participant's NAT class, if it ran discovery.
    pub class: Option<NatClass>,
    /// Where it may be reached.
    pub candidates: Vec<Candidate>,
}

impl ConnectionData {
    /// The address of the first candidate of `kind`, if any.
    pub fn address(&self, kind: CandidateKind) -> Option<SocketAddr> {
        self.candidates
            .iter()
            .find(|c| c.kind == kind)
            .map(|c| c.addr)
    }

    /// These candidates as an IPv6-only host reaches them through NAT64
    /// (`nat64`'s prefix): IPv4 addresses synthesized, IPv6 ones unchanged;
    /// a copy as they are without a prefix.
    pub fn through(&self, nat64: Option<natrix_model::Nat64Prefix>) -> ConnectionData {
        ConnectionData {
            class: self.class,
            candidates: self
                .candidates
                .iter()
                .map(|c| Candidate {
                    kind: c.kind,
                    addr: nat64.map_or(c.addr, |p| p.synthesize(c.addr)),
                })
                .collect(),
        }
    }

    /// The plaintext format above.
    pub fn encode(&self) -> Vec<u8> {
        let class = NatClass::code(self.class);
        let n = self.candidates.len().min(16);
        let mut out = vec![1, class, n as u8];
        for c in &self.candidates[..n] {
            out.push(match c.kind {
                CandidateKind::Host => 1,
                CandidateKind::ServerReflexive => 2,
                CandidateKind::Relayed => 3,
                CandidateKind::Predicted => 4,
            });
            match c.addr.ip() {
                IpAddr::V4(ip) => {
                    out.push(4);
                    out.extend_from_slice(&c.addr.port().to_be_bytes());
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(6);
                    out.extend_from_slice(&c.addr.port().to_be_bytes());
                    out.extend_from_slice(&ip.octets());
                }
            }
        }
        out
    }

    /// Parses the plaintext format; `None` for anything malformed.
    pub fn decode(b: &[u8]) -> Option<ConnectionData> {
        if b.len() < 3 || b[0] != 1 {
            return None;
        }
        let class = match b[1] {
            0 => None,
            k => Some(NatClass::from_code(k)?),
        };
        let mut rest = &b[3..];
        let mut candidates = Vec::new();
        for _ in 0..b[2] {
            let (&kind, r) = rest.split_first()?;
            let (&family, r) = r.split_first()?;
            let kind = match kind {
                1 => CandidateKind::Host,
                2 => CandidateKind::ServerReflexive,
                3 => CandidateKind::Relayed,
                4 => CandidateKind::Predicted,
                _ => return None,
            };
            let port = u16::from_be_bytes([*r.first()?, *r.get(1)?]);
            let r = &r[2..];
            let (ip, r): (IpAddr, &[u8]) = match family {
                4 => (<[u8; 4]>::try_from(r.get(..4)?).ok()?.into(), &r[4..]),
                6 => (<[u8; 16]>::try_from(r.get(..16)?).ok()?.into(), &r[16..]),
                _ => return None,
            };
            candidates.push(Candidate {
                kind,
                addr: SocketAddr::new(ip, port),
            });
            rest = r;
        }
        rest.is_empty()
            .then_some(ConnectionData { class, candidates })
    }
}

/// Why an exchange failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostError {
    /// CDX refused the post.
    Rejected {
        /// The STUN error code.
        code: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// No answer from CDX, or not every participant's entry, in time.
    Timeout {
        /// Whether CDX answered the post.
        posted: bool,
        /// Entries received.
        received: usize,
        /// Entries expected (participants − 1).
        expected: usize,
    },
}

/// The result of an exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchanged {
    /// This socket's address as CDX saw it.
    pub mapped: SocketAddr,
    /// The other participants' connection data, by index.
    pub peers: BTreeMap<u8, ConnectionData>,
    /// Entries CDX delivered that did not open with the session key (not
    /// from a participant; dropped).
    pub rejected_entries: usize,
    /// How long the exchange took.
    pub elapsed: Duration,
}

/// What to send to the CDX node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The message.
    pub payload: Vec<u8>,
    /// An acknowledgement of a delivery (losing it only means CDX sends the
    /// entry again), as opposed to the Post.
    pub ack: bool,
}

/// The randomness an exchange needs, drawn by the driver.
#[derive(Clone, Copy, Debug)]
pub struct PostSeeds {
    /// The seal's nonce.
    pub nonce: [u8; 12],
    /// The Post's transaction id.
    pub tid: [u8; 12],
}

/// One participant's exchange.
#[derive(Debug)]
pub struct Poster {
    post: Vec<u8>,
    /// TICKET, ENTRY and PROFILE values, to re-encode the Post with a
    /// proof.
    parts: ([u8; TICKET_LEN], Vec<u8>, Option<[u8; 4]>),
    mover: Option<[u8; 32]>,
    /// Challenges answered (bounded: a node that keeps challenging is
    /// refusing).
    challenges: u8,
    tid: TransactionId,
    key: SessionKey,
    session: SessionId,
    me: u8,
    expected: usize,
    started: Instant,
    deadline: Instant,
    rto: Duration,
    next_send: Instant,
    mapped: Option<SocketAddr>,
    peers: BTreeMap<u8, (u32, ConnectionData)>,
    rejected_entries: usize,
    acks: VecDeque<Vec<u8>>,
    outcome: Option<Result<Exchanged, PostError>>,
    /// An outcome was reached (it may have been taken since).
    ended: bool,
}

impl Poster {
    /// An exchange of `data` (version `seq`: post a higher one when it
    /// changes) for `invitation`'s participant, started at `now` and given
    /// up at `now + timeout`. `profile` (PROFILE codes, see
    /// `NatProfile::codes`) lets CDX count NAT behaviours.
    pub fn new(
        invitation: &Invitation,
        data: &ConnectionData,
        profile: Option<[u8; 4]>,
        seq: u32,
        seeds: PostSeeds,
        now: Instant,
        timeout: Duration,
    ) -> Result<Poster, EncodeError> {
        let session = invitation.session();
        let me = invitation.participant();
        let sealed = seal(
            &invitation.key,
            &session,
            me,
            seq,
            seeds.nonce,
            &data.encode(),
        );
        let tid = TransactionId(seeds.tid);
        let entry = Entry {
            participant: me,
            seq,
            sealed: &sealed,
        }
        .to_bytes();
        let parts = (invitation.ticket, entry, profile);
        let post = encode_post(&tid, &parts, None)?;
        Ok(Poster {
            post,
            parts,
            mover: invitation.mover.as_ref().map(|m| m.0),
            challenges: 0,
            tid,
            key: invitation.key.clone(),
            session,
            me,
            expected: usize::from(invitation.participants()).saturating_sub(1),
            started: now,
            deadline: now + timeout,
            rto: INITIAL_RTO,
            next_send: now,
            mapped: None,
            peers: BTreeMap::new(),
            rejected_entries: 0,
            acks: VecDeque::new(),
            outcome: None,
            ended: false,
        })
    }

    /// The next message to send at `now`: acknowledgements first, then the
    /// Post when it is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(ack) = self.acks.pop_front() {
            return Some(Transmit {
                payload: ack,
                ack: true,
            });
        }
        if self.ended || now < self.next_send || now >= self.deadline {
            return None;
        }
        self.next_send = now + self.rto;
        self.rto = (self.rto * 2).min(MAX_RTO);
        Some(Transmit {
            payload: self.post.clone(),
            ack: false,
        })
    }

    /// When [`Poster::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_send.min(self.deadline)
    }

    /// Gives up at the deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.ended && now >= self.deadline {
            self.end(Err(PostError::Timeout {
                posted: self.mapped.is_some(),
                received: self.peers.len(),
                expected: self.expected,
            }));
        }
    }

    fn end(&mut self, outcome: Result<Exchanged, PostError>) {
        self.ended = true;
        self.outcome = Some(outcome);
    }

    /// A message from the CDX node: the Post's answer, or a delivery
    /// (acknowledged through [`Poster::poll_transmit`], also after the
    /// end). Anything else is ignored.
    pub fn handle_input(&mut self, packet: &[u8], now: Instant) {
        if let Some((entry, ack)) = delivery(packet) {
            // Acknowledged even after the end, so CDX stops re-sending.
            if self.acks.len() < MAX_PENDING_ACKS {
                self.acks.push_back(ack);
            }
            if !self.ended {
                self.take_entry(&entry);
            }
        } else if !self.ended {
            self.take_answer(packet, now);
        }
        if !self.ended
            && let Some(mapped) = self.mapped.filter(|_| self.peers.len() >= self.expected)
        {
            let peers = std::mem::take(&mut self.peers);
            self.end(Ok(Exchanged {
                mapped,
                peers: peers.into_iter().map(|(k, (_, d))| (k, d)).collect(),
                rejected_entries: self.rejected_entries,
                elapsed: now.saturating_duration_since(self.started),
            }));
        }
    }

    /// The result, once there is one (taken once).
    pub fn poll_outcome(&mut self) -> Option<Result<Exchanged, PostError>> {
        self.outcome.take()
    }

    fn take_entry(&mut self, entry: &Entry<'_>) {
        let opened = open(
            &self.key,
            &self.session,
            entry.participant,
            entry.seq,
            entry.sealed,
        )
        .and_then(|p| ConnectionData::decode(&p));
        match opened {
            Some(d) if entry.participant != self.me => {
                let newer = self
                    .peers
                    .get(&entry.participant)
                    .is_none_or(|(s, _)| *s < entry.seq);
                if newer {
                    self.peers.insert(entry.participant, (entry.seq, d));
                }
            }
            _ => self.rejected_entries += 1,
        }
    }

    fn take_answer(&mut self, packet: &[u8], now: Instant) {
        let Ok(msg) = Message::parse(packet) else {
            return;
        };
        if msg.transaction_id() != self.tid || msg.method() != POST {
            return;
        }
        match msg.class() {
            Class::Success => {
                if let Some(Ok(Attribute::XorMappedAddress(a))) =
                    msg.decode(AttributeType::XOR_MAPPED_ADDRESS)
                {
                    if self.mapped.is_none() {
                        // Answered: from now on a re-post now and then.
                        self.next_send = now + MAX_RTO;
                        self.rto = MAX_RTO;
                    }
                    self.mapped = Some(a);
                }
            }
            Class::Error => {
                let (code, reason) = match msg.decode(AttributeType::ERROR_CODE) {
                    Some(Ok(Attribute::ErrorCode(e))) => (e.code, e.reason.to_owned()),
                    _ => (0, String::new()),
                };
                // CDX asks this participant to prove a move to its new
                // address: sign the challenge with the move key and post
                // again at once.
                let challenge = msg.get(CHALLENGE).filter(|c| c.len() == CHALLENGE_LEN);
                if let (401, Some(c), Some(key)) = (code, challenge, self.mover)
                    && self.challenges < MAX_CHALLENGES
                {
                    let proof = natrix_model::invitation::move_proof(&key, c);
                    let mut echoed = [0u8; CHALLENGE_LEN];
                    echoed.copy_from_slice(c);
                    if let Ok(post) = encode_post(&self.tid, &self.parts, Some((echoed, proof))) {
                        self.challenges += 1;
                        self.post = post;
                        self.next_send = now;
                        return;
                    }
                }
                self.end(Err(PostError::Rejected { code, reason }));
            }
            _ => {}
        }
    }
}

/// Challenges one exchange answers before it gives up.
const MAX_CHALLENGES: u8 = 4;

/// Encodes a Post of `parts` (TICKET, ENTRY, PROFILE), with an echoed
/// challenge and its proof when given.
#[allow(clippy::type_complexity)]
fn encode_post(
    tid: &TransactionId,
    parts: &([u8; TICKET_LEN], Vec<u8>, Option<[u8; 4]>),
    proof: Option<([u8; CHALLENGE_LEN], [u8; 16])>,
) -> Result<Vec<u8>, EncodeError> {
    let (ticket, entry, profile) = parts;
    let mut post = vec![0u8; 20 + 48 + 12 + entry.len() + 8 + 40 + 8];
    let mut enc = Encoder::new(&mut post, MessageType::new(POST, Class::Request), tid)?;
    enc.raw(TICKET, ticket)?;
    enc.raw(ENTRY, entry)?;
    if let Some(p) = profile {
        enc.raw(PROFILE, p)?;
    }
    if let Some((c, p)) = proof {
        enc.raw(CHALLENGE, &c)?;
        enc.raw(PROOF, &p)?;
    }
    enc.fingerprint()?;
    let n = enc.finish();
    post.truncate(n);
    Ok(post)
}

/// A Deliver request's entry and the acknowledgement to send back; `None`
/// for anything else.
pub fn delivery(packet: &[u8]) -> Option<(Entry<'_>, Vec<u8>)> {
    let msg = Message::parse(packet).ok()?;
    if msg.method() != DELIVER || msg.class() != Class::Request || msg.verify_fingerprint().is_err()
    {
        return None;
    }
    let entry = Entry::parse(msg.get(ENTRY)?)?;
    let mut ack = [0u8; 64];
    let tid = msg.transaction_id();
    let n = (|| {
        let mut enc = Encoder::new(&mut ack, MessageType::new(DELIVER, Class::Success), &tid)?;
        enc.fingerprint()?;
        Ok::<_, EncodeError>(enc.finish())
    })()
    .ok()?;
    Some((entry, ack[..n].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_data_round_trips_and_rejects_garbage() {
        let d = ConnectionData {
            class: Some(NatClass::Symmetric),
            candidates: vec![
                Candidate {
                    kind: CandidateKind::Host,
                    addr: "10.0.0.2:4000".parse().unwrap(),
                },
                Candidate {
                    kind: CandidateKind::ServerReflexive,
                    addr: "[2001:db8::1]:5000".parse().unwrap(),
                },
            ],
        };
        let bytes = d.encode();
        assert_eq!(ConnectionData::decode(&bytes), Some(d));
        for cut in 0..bytes.len() {
            assert_eq!(ConnectionData::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(ConnectionData::decode(&extra), None);
        assert_eq!(ConnectionData::decode(&[1, 99, 0]), None);
    }
}

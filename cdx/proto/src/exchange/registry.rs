//! The node's exchange state, sans-IO: which participants posted here, from
//! where, and which deliveries to them are still unacknowledged.
//!
//! Inputs: [`Registry::admit`] (a verified Post), [`Registry::offer`] (an
//! entry, from a local Post, the store or another node's broadcast),
//! [`Registry::ack`] (a client's acknowledgement), each with `now`.
//! Outputs: [`Registry::poll_transmit`] yields due deliveries;
//! [`Registry::sweep`] ends expired sessions. No sockets, no clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natrix_wire::TransactionId;

use natrix_model::invitation::{MAX_PARTICIPANTS, MAX_SESSION_TTL, SessionId, Ticket};

use super::{Entry, Reject, encode_deliver};

/// First retransmission timeout of a delivery.
const INITIAL_RTO: Duration = Duration::from_millis(250);
/// Longest gap between retransmissions (they go on until the session ends).
const MAX_RTO: Duration = Duration::from_secs(4);

/// Caps on node state.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Live participants (posts in distinct sessions) per source IP,
    /// counting those that proved they receive at it (over a connection,
    /// or by acknowledging a delivery): spoofed Posts are not charged to
    /// the address they claim.
    pub per_source: u32,
    /// Live sessions on this node.
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            per_source: 64,
            max_sessions: 100_000,
        }
    }
}

/// Where a participant reached this node: the socket (by its bound address)
/// and, for wildcard sockets, the destination IP to answer from; or a TCP
/// connection (for clients that cannot send UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Local {
    /// The bound address of the socket the post arrived on.
    pub bound: SocketAddr,
    /// The destination IP of the post (wildcard sockets only).
    pub dst_ip: Option<IpAddr>,
    /// The TCP connection the post arrived on, by its id.
    pub stream: Option<u64>,
}

/// One datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The participant's address.
    pub to: SocketAddr,
    /// The socket and source IP to send from.
    pub via: Local,
    /// The Deliver request.
    pub payload: Vec<u8>,
}

/// The outcome of [`Registry::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// A participant new to this node.
    New,
    /// A newer entry from a known participant.
    Newer,
    /// The same entry again (a retransmitted or repeated Post).
    Repeat,
}

#[derive(Debug)]
struct Slot {
    seq: u32,
    sealed: Arc<[u8]>,
    tid: TransactionId,
    acked: bool,
    next: Instant,
    rto: Duration,
    /// Transmissions since the member last posted from its address.
    sent: u8,
}

#[derive(Debug)]
struct Member {
    addr: SocketAddr,
    local: Local,
    seq: u32,
    /// Deliveries to this member, by the sender's index.
    slots: [Option<Slot>; MAX_PARTICIPANTS],
    /// It acknowledged a delivery from its address (or posts over a
    /// connection, whose source cannot be spoofed).
    proven: bool,
}

#[derive(Debug)]
struct Session {
    deadline: Instant,
    members: [Option<Member>; MAX_PARTICIPANTS],
    /// The newest entry of each participant this node has seen, so that the
    /// session goes on from this node alone while the coordination store
    /// is unreachable.
    entries: [Option<(u32, Arc<[u8]>)>; MAX_PARTICIPANTS],
}

/// Counters the actor publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries still unacknowledged when their session ended.
    pub expired: u64,
    /// Delivery retransmissions.
    pub retransmits: u64,
    /// Deliveries held back because their member has not yet shown it
    /// receives at its address (no acknowledgement yet): a spoofed Post
    /// buys at most [`UNPROVEN_SENDS`] transmissions per entry.
    pub held: u64,
}

/// Transmissions of one delivery to a member that has never acknowledged
/// anything (and posts over UDP), until it posts again: deliveries to a
/// spoofed source stop at once instead of being re-sent for the ticket's
/// life.
pub const UNPROVEN_SENDS: u8 = 2;

/// The exchange sessions with participants on this node.
pub struct Registry {
    limits: Limits,
    sessions: HashMap<SessionId, Session>,
    per_source: HashMap<IpAddr, u32>,
    acks: HashMap<[u8; 12], (SessionId, u8, u8)>,
    timers: BinaryHeap<Reverse<(Instant, SessionId, u8, u8)>>,
    random_tid: Box<dyn FnMut() -> [u8; 12] + Send>,
    stats: Stats,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.sessions.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry; `random_tid` draws delivery transaction ids
    /// (unpredictable, so nobody off-path can acknowledge for a client).
    pub fn new(limits: Limits, random_tid: Box<dyn FnMut() -> [u8; 12] + Send>) -> Registry {
        Registry {
            limits,
            sessions: HashMap::new(),
            per_source: HashMap::new(),
            acks: HashMap::new(),
            timers: BinaryHeap::new(),
            random_tid,
            stats: Stats::default(),
        }
    }

    /// Live sessions on this node.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The TCP/TLS connections (by id) some live participant uses.
    pub fn streams(&self) -> impl Iterator<Item = u64> + '_ {
        self.sessions
            .values()
            .flat_map(|s| s.members.iter().flatten())
            .filter_map(|m| m.local.stream)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Registers a verified post of `ticket`'s participant at `seq`, sent
    /// from `from` to `local`. `unix` is the wall clock in seconds (the
    /// ticket's expiry is wall-clock time). `move_proven` says whether the
    /// post proved its move key ([`super::proves_move`]): a participant
    /// moves to a new address only with it, so a sniffed ticket replayed
    /// from elsewhere cannot redirect its deliveries.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        ticket: &Ticket,
        seq: u32,
        from: SocketAddr,
        local: Local,
        move_proven: bool,
        now: Instant,
        unix: u64,
    ) -> Result<Admitted, Reject> {
        let p = usize::from(ticket.participant);
        if !self.sessions.contains_key(&ticket.session) {
            if self.sessions.len() >= self.limits.max_sessions {
                return Err(Reject::SourceLimit);
            }
            let left =
                Duration::from_secs(ticket.expires.saturating_sub(unix)).min(MAX_SESSION_TTL);
            self.sessions.insert(
                ticket.session,
                Session {
                    deadline: now + left,
                    members: Default::default(),
                    entries: Default::default(),
                },
            );
        }
        let Some(session) = self.sessions.get_mut(&ticket.session) else {
            return Err(Reject::SourceLimit);
        };
        match &mut session.members[p] {
            Some(m) => {
                if seq < m.seq {
                    return Err(Reject::Replayed);
                }
                let moved = m.addr != from || m.local != local;
                if moved && !move_proven {
                    return Err(Reject::MoveUnproven);
                }
                if moved {
                    // A new socket or NAT binding: it needs everything again.
                    // Only proven members are charged to their source.
                    if m.addr.ip() != from.ip() {
                        let over = self.per_source.get(&from.ip()).copied().unwrap_or(0)
                            >= self.limits.per_source;
                        if over {
                            return Err(Reject::SourceLimit);
                        }
                    }
                    if m.proven {
                        release(&mut self.per_source, m.addr.ip());
                    }
                    m.addr = from;
                    m.local = local;
                    m.proven = local.stream.is_some();
                    if m.proven {
                        *self.per_source.entry(from.ip()).or_default() += 1;
                    }
                    for (i, slot) in m.slots.iter_mut().enumerate() {
                        if let Some(s) = slot {
                            s.acked = false;
                            s.next = now;
                            s.rto = INITIAL_RTO;
                            s.sent = 0;
                            self.timers.push(Reverse((
                                now,
                                ticket.session,
                                ticket.participant,
                                i as u8,
                            )));
                        }
                    }
                } else if !m.proven {
                    // Posting again from the same address: deliveries held
                    // back for want of proof go out again (within budget).
                    for (i, slot) in m.slots.iter_mut().enumerate() {
                        if let Some(s) = slot
                            .as_mut()
                            .filter(|s| !s.acked && s.sent >= UNPROVEN_SENDS)
                        {
                            s.next = now;
                            s.sent = 0;
                            self.timers.push(Reverse((
                                now,
                                ticket.session,
                                ticket.participant,
                                i as u8,
                            )));
                        }
                    }
                }
                let newer = seq > m.seq;
                m.seq = seq;
                Ok(if newer {
                    Admitted::Newer
                } else {
                    Admitted::Repeat
                })
            }
            slot @ None => {
                // A source is charged once it has proven it receives at
                // its address (a connection, or an acknowledgement), so a
                // Post spoofed from a victim's address cannot use up the
                // victim's sessions.
                let count = self.per_source.get(&from.ip()).copied().unwrap_or(0);
                if count >= self.limits.per_source {
                    if session.members.iter().all(Option::is_none) {
                        self.sessions.remove(&ticket.session);
                    }
                    return Err(Reject::SourceLimit);
                }
                let proven = local.stream.is_some();
                if proven {
                    *self.per_source.entry(from.ip()).or_default() += 1;
                }
                *slot = Some(Member {
                    addr: from,
                    local,
                    seq,
                    slots: Default::default(),
                    proven,
                });
                Ok(Admitted::New)
            }
        }
    }

    /// Makes `entry` of `session` due for delivery to every local member
    /// other than its author that has not got this or a newer version.
    /// Entries for sessions without local members are ignored.
    pub fn offer(&mut self, session: &SessionId, entry: &Entry<'_>, now: Instant) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let from = usize::from(entry.participant);
        if from >= MAX_PARTICIPANTS {
            return;
        }
        let mut sealed: Option<Arc<[u8]>> = None;
        if s.entries[from]
            .as_ref()
            .is_none_or(|(seq, _)| *seq < entry.seq)
        {
            let bytes = sealed
                .get_or_insert_with(|| Arc::from(entry.sealed))
                .clone();
            s.entries[from] = Some((entry.seq, bytes));
        }
        for (i, member) in s.members.iter_mut().enumerate() {
            let Some(m) = member else { continue };
            if i == from {
                continue;
            }
            if m.slots[from]
                .as_ref()
                .is_some_and(|old| old.seq >= entry.seq)
            {
                continue;
            }
            if let Some(old) = m.slots[from].take() {
                self.acks.remove(&old.tid.0);
            }
            let tid = TransactionId((self.random_tid)());
            let bytes = sealed
                .get_or_insert_with(|| Arc::from(entry.sealed))
                .clone();
            m.slots[from] = Some(Slot {
                seq: entry.seq,
                sealed: bytes,
                tid,
                acked: false,
                next: now,
                rto: INITIAL_RTO,
                sent: 0,
            });
            self.acks.insert(tid.0, (*session, i as u8, from as u8));
            self.timers
                .push(Reverse((now, *session, i as u8, from as u8)));
        }
    }

    /// Offers again every entry of `session` this node has seen (what the
    /// node does when the store cannot give it the session's entries);
    /// how many participants have one.
    pub fn reoffer_local(&mut self, session: &SessionId, now: Instant) -> u8 {
        let Some(s) = self.sessions.get(session) else {
            return 0;
        };
        let known: Vec<(u8, u32, Arc<[u8]>)> = s
            .entries
            .iter()
            .enumerate()
            .filter_map(|(p, e)| e.as_ref().map(|(seq, b)| (p as u8, *seq, b.clone())))
            .collect();
        for (participant, seq, sealed) in &known {
            self.offer(
                session,
                &Entry {
                    participant: *participant,
                    seq: *seq,
                    sealed,
                },
                now,
            );
        }
        known.len() as u8
    }

    /// A client acknowledged delivery `tid` from `from`; false when it is
    /// unknown, already acknowledged or from another address.
    pub fn ack(&mut self, from: SocketAddr, tid: &TransactionId) -> bool {
        let Some(&(session, member, slot)) = self.acks.get(&tid.0) else {
            return false;
        };
        let Some(Some(m)) = self
            .sessions
            .get_mut(&session)
            .map(|s| &mut s.members[usize::from(member)])
        else {
            return false;
        };
        if m.addr != from {
            return false;
        }
        let Some(s) = &mut m.slots[usize::from(slot)] else {
            return false;
        };
        if s.acked {
            return false;
        }
        s.acked = true;
        if !m.proven {
            m.proven = true;
            *self.per_source.entry(m.addr.ip()).or_default() += 1;
        }
        self.acks.remove(&tid.0);
        self.stats.acked += 1;
        true
    }

    /// The earliest instant a delivery is due, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, ..))| *t)
    }

    /// Appends every delivery due at `now` (first sends and retransmissions)
    /// to `out`, and schedules each one's next retransmission.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        while let Some(Reverse((due, session, member, slot))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&session) else {
                continue;
            };
            let deadline = s.deadline;
            let Some(m) = &mut s.members[usize::from(member)] else {
                continue;
            };
            let (to, via, proven) = (m.addr, m.local, m.proven);
            let Some(d) = &mut m.slots[usize::from(slot)] else {
                continue;
            };
            // Stale timer entries (rescheduled or acknowledged) are skipped.
            if d.acked || d.next != due {
                continue;
            }
            if !proven && d.sent >= UNPROVEN_SENDS {
                // Held until the member acknowledges or posts again.
                self.stats.held += 1;
                continue;
            }
            d.sent = d.sent.saturating_add(1);
            if d.rto > INITIAL_RTO {
                self.stats.retransmits += 1;
            }
            out.push(Transmit {
                to,
                via,
                payload: encode_deliver(
                    &d.tid,
                    &Entry {
                        participant: slot,
                        seq: d.seq,
                        sealed: &d.sealed,
                    },
                ),
            });
            d.next = now + d.rto;
            d.rto = (d.rto * 2).min(MAX_RTO);
            if d.next < deadline {
                self.timers.push(Reverse((d.next, session, member, slot)));
            }
        }
    }

    /// Ends sessions whose time is up: their state goes, and deliveries
    /// never acknowledged are counted as expired.
    pub fn sweep(&mut self, now: Instant) {
        let mut ended = Vec::new();
        for (id, s) in &self.sessions {
            if s.deadline <= now {
                ended.push(*id);
            }
        }
        for id in ended {
            let Some(s) = self.sessions.remove(&id) else {
                continue;
            };
            for m in s.members.into_iter().flatten() {
                if m.proven {
                    release(&mut self.per_source, m.addr.ip());
                }
                for d in m.slots.into_iter().flatten() {
                    self.acks.remove(&d.tid.0);
                    if !d.acked {
                        self.stats.expired += 1;
                    }
                }
            }
        }
        if self.timers.len() > 4 * self.acks.len() + 1024 {
            // Acknowledged deliveries leave stale timers behind; rebuild
            // the heap now and then so it stays proportional to real work.
            let sessions = &self.sessions;
            self.timers.retain(|Reverse((due, id, m, slot))| {
                sessions
                    .get(id)
                    .and_then(|s| s.members[usize::from(*m)].as_ref())
                    .and_then(|m| m.slots[usize::from(*slot)].as_ref())
                    .is_some_and(|d| !d.acked && d.next == *due)
            });
        }
    }
}

fn release(per_source: &mut HashMap<IpAddr, u32>, ip: IpAddr) {
    if let Some(n) = per_source.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per_source.remove(&ip);
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Instant::now as the tests' t0
mod tests {
    use super::super::{ClientMessage, DELIVER, parse_client};
    use super::*;
    use natrix_wire::{Class, Encoder, Message, MessageType};

    fn registry(limits: Limits) -> Registry {
        let mut n = 0u8;
        Registry::new(
            limits,
            Box::new(move || {
                n = n.wrapping_add(1);
                [n; 12]
            }),
        )
    }

    fn ticket(participant: u8) -> Ticket {
        Ticket {
            session: SessionId([5; 16]),
            participant,
            participants: 2,
            expires: 1_000 + 60,
        }
    }

    fn local() -> Local {
        Local {
            bound: "192.0.2.1:3478".parse().unwrap(),
            dst_ip: None,
            stream: None,
        }
    }

    const A: &str = "198.51.100.1:4000";
    const B: &str = "198.51.100.2:5000";

    fn entry(participant: u8, seq: u32) -> Entry<'static> {
        Entry {
            participant,
            seq,
            sealed: b"sealed bytes, opaque to the node",
        }
    }

    fn delivered(t: &Transmit) -> (TransactionId, u8, u32) {
        let msg = Message::parse(&t.payload).unwrap();
        assert_eq!((msg.method(), msg.class()), (DELIVER, Class::Request));
        let e = Entry::parse(msg.get(super::super::ENTRY).unwrap()).unwrap();
        (msg.transaction_id(), e.participant, e.seq)
    }

    fn ack_bytes(tid: &TransactionId) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        let mut enc =
            Encoder::new(&mut out, MessageType::new(DELIVER, Class::Success), tid).unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        out.truncate(n);
        out
    }

    #[test]
    fn each_participant_gets_the_others_entry_until_it_acknowledges() {
        let t0 = Instant::now();
        let mut r = registry(Limits::default());
        let (a, b) = (A.parse().unwrap(), B.parse().unwrap());
        assert_eq!(
            r.admit(&ticket(0), 1, a, local(), false, t0, 1_000),
            Ok(Admitted::New)
        );
        r.offer(&SessionId([5; 16]), &entry(0, 1), t0);
        let mut out = Vec::new();
        r.poll_transmit(t0, &mut out);
        assert!(out.is_empty(), "nobody else is here yet");

        assert_eq!(
            r.admit(&ticket(1), 1, b, local(), false, t0, 1_000),
            Ok(Admitted::New)
        );
        r.offer(&SessionId([5; 16]), &entry(1, 1), t0);
        // B also needs A's entry, which the node read back from the store.
        r.offer(&SessionId([5; 16]), &entry(0, 1), t0);
        r.poll_transmit(t0, &mut out);
        assert_eq!(out.len(), 2);
        let to_a = out.iter().find(|t| t.to == a).unwrap();
        let to_b = out.iter().find(|t| t.to == b).unwrap();
        assert_eq!(delivered(to_a).1, 1, "A gets B's entry");
        assert_eq!(delivered(to_b).1, 0, "B gets A's entry");

        // A acknowledges; B does not, and gets retransmissions with backoff.
        let ClientMessage::Ack(tid) = parse_client(&ack_bytes(&delivered(to_a).0)).unwrap() else {
            panic!("an ack")
        };
        assert!(r.ack(a, &tid));
        assert!(!r.ack(a, &tid), "a second ack changes nothing");
        assert!(!r.ack(a, &delivered(to_b).0), "A cannot acknowledge for B");
        let mut times = Vec::new();
        let mut now = t0;
        for _ in 0..60 {
            now += Duration::from_millis(50);
            let mut out = Vec::new();
            r.poll_transmit(now, &mut out);
            if !out.is_empty() {
                assert!(out.iter().all(|t| t.to == b));
                times.push(now.duration_since(t0).as_millis());
            }
        }
        // B has never acknowledged anything: its address is unproven (it
        // may be spoofed), so one retransmission and then nothing.
        assert_eq!(
            times,
            vec![250],
            "one retransmission to an unproven address"
        );
        assert_eq!(r.stats().retransmits, 1, "every send after the first");
        assert_eq!(r.stats().held, 1);
        // B posts again from the same address: the held delivery goes out
        // again, within the same budget.
        assert_eq!(
            r.admit(&ticket(1), 1, b, local(), false, now, 1_000),
            Ok(Admitted::Repeat)
        );
        let mut out = Vec::new();
        r.poll_transmit(now, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].to, b);
        assert!(r.ack(b, &delivered(to_b).0));
        let mut out = Vec::new();
        r.poll_transmit(now + Duration::from_secs(10), &mut out);
        assert!(out.is_empty());
        assert_eq!(r.stats().acked, 2);
    }

    /// A member that acknowledged once gets retransmissions with backoff
    /// for as long as it needs them.
    #[test]
    fn a_proven_member_gets_retransmissions_with_backoff() {
        let t0 = Instant::now();
        let mut r = registry(Limits::default());
        let (a, b) = (A.parse().unwrap(), B.parse().unwrap());
        r.admit(&ticket(0), 1, a, local(), false, t0, 1_000)
            .unwrap();
        r.admit(&ticket(1), 1, b, local(), false, t0, 1_000)
            .unwrap();
        r.offer(&SessionId([5; 16]), &entry(1, 1), t0);
        let mut out = Vec::new();
        r.poll_transmit(t0, &mut out);
        assert!(r.ack(a, &delivered(&out[0]).0), "A proves its address");
        // B's newer entry: A is proven now.
        r.offer(&SessionId([5; 16]), &entry(1, 2), t0);
        let mut times = Vec::new();
        let mut now = t0;
        for _ in 0..60 {
            now += Duration::from_millis(50);
            let mut out = Vec::new();
            r.poll_transmit(now, &mut out);
            if !out.is_empty() {
                times.push(now.duration_since(t0).as_millis());
            }
        }
        assert_eq!(times, vec![50, 300, 800, 1800], "at once, then doubling");
        assert_eq!(r.stats().held, 0);
    }

    #[test]
    fn replays_are_refused_and_repeats_are_idempotent() {
        let t0 = Instant::now();
        let mut r = registry(Limits::default());
        let a = A.parse().unwrap();
        assert_eq!(
            r.admit(&ticket(0), 5, a, local(), false, t0, 1_000),
            Ok(Admitted::New)
        );
        assert_eq!(
            r.admit(&ticket(0), 5, a, local(), false, t0, 1_000),
            Ok(Admitted::Repeat)
        );
        assert_eq!(
            r.admit(&ticket(0), 6, a, local(), false, t0, 1_000),
            Ok(Admitted::Newer)
        );
        assert_eq!(
            r.admit(&ticket(0), 5, a, local(), false, t0, 1_000),
            Err(Reject::Replayed)
        );
    }

    #[test]
    fn a_participant_moves_only_with_proof_and_then_gets_everything_again() {
        let t0 = Instant::now();
        let mut r = registry(Limits::default());
        let (a, b) = (A.parse().unwrap(), B.parse().unwrap());
        r.admit(&ticket(0), 1, a, local(), false, t0, 1_000)
            .unwrap();
        r.admit(&ticket(1), 1, b, local(), false, t0, 1_000)
            .unwrap();
        r.offer(&SessionId([5; 16]), &entry(1, 1), t0);
        let mut out = Vec::new();
        r.poll_transmit(t0, &mut out);
        assert!(r.ack(a, &delivered(&out[0]).0));
        let a2: SocketAddr = "198.51.100.1:4001".parse().unwrap();
        // Without proof (a sniffed ticket replayed elsewhere): refused, and
        // deliveries stay with A.
        assert_eq!(
            r.admit(&ticket(0), 1, a2, local(), false, t0, 1_000),
            Err(Reject::MoveUnproven)
        );
        let mut none = Vec::new();
        r.poll_transmit(t0, &mut none);
        assert!(none.is_empty(), "nothing moved to the replayer");
        assert_eq!(
            r.admit(&ticket(0), 1, a2, local(), true, t0, 1_000),
            Ok(Admitted::Repeat)
        );
        let mut out = Vec::new();
        r.poll_transmit(t0 + Duration::from_millis(1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].to, a2);
    }

    #[test]
    fn sessions_end_at_their_expiry_and_leave_nothing_behind() {
        let t0 = Instant::now();
        let mut r = registry(Limits::default());
        let (a, b) = (A.parse().unwrap(), B.parse().unwrap());
        r.admit(&ticket(0), 1, a, local(), false, t0, 1_000)
            .unwrap();
        r.admit(&ticket(1), 1, b, local(), false, t0, 1_000)
            .unwrap();
        r.offer(&SessionId([5; 16]), &entry(0, 1), t0);
        r.sweep(t0 + Duration::from_secs(59));
        assert_eq!(r.sessions(), 1);
        r.sweep(t0 + Duration::from_secs(60));
        assert_eq!(r.sessions(), 0);
        assert_eq!(r.stats().expired, 1);
        assert!(r.per_source.is_empty() && r.acks.is_empty());
        let mut out = Vec::new();
        r.poll_transmit(t0 + Duration::from_secs(61), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn sources_and_the_node_have_caps() {
        let t0 = Instant::now();
        let mut r = registry(Limits {
            per_source: 2,
            max_sessions: 3,
        });
        let from: SocketAddr = A.parse().unwrap();
        let t = |s: u8| Ticket {
            session: SessionId([s; 16]),
            ..ticket(0)
        };
        // Over a connection a source is proven at once and charged.
        let conn = Local {
            stream: Some(7),
            ..local()
        };
        assert!(r.admit(&t(1), 1, from, conn, false, t0, 1_000).is_ok());
        assert!(r.admit(&t(2), 1, from, conn, false, t0, 1_000).is_ok());
        assert_eq!(
            r.admit(&t(3), 1, from, conn, false, t0, 1_000),
            Err(Reject::SourceLimit)
        );
        assert_eq!(r.sessions(), 2, "a refused post leaves no session behind");
        let other: SocketAddr = B.parse().unwrap();
        assert!(r.admit(&t(3), 1, other, local(), false, t0, 1_000).is_ok());
        assert_eq!(
            r.admit(&t(4), 1, other, local(), false, t0, 1_000),
            Err(Reject::SourceLimit),
            "node full"
        );
    }

    /// Posts spoofed from a victim's address (UDP, never acknowledged) are
    /// not charged to the victim: its own sessions still fit. A source is
    /// charged when it acknowledges, and uncharged when its session ends.
    #[test]
    fn a_source_is_charged_only_once_it_proves_it_receives() {
        let t0 = Instant::now();
        let mut r = registry(Limits {
            per_source: 1,
            max_sessions: 10,
        });
        let victim: SocketAddr = A.parse().unwrap();
        let t = |s: u8, p: u8| Ticket {
            session: SessionId([s; 16]),
            ..ticket(p)
        };
        for s in 1..=3 {
            assert!(
                r.admit(&t(s, 0), 1, victim, local(), false, t0, 1_000)
                    .is_ok()
            );
        }
        assert!(r.per_source.is_empty(), "{:?}", r.per_source);
        // A real session: B posts, A (the victim, for real) gets B's entry
        // and acknowledges it: now A's address is charged.
        let b: SocketAddr = B.parse().unwrap();
        r.admit(&t(1, 1), 1, b, local(), false, t0, 1_000).unwrap();
        r.offer(&SessionId([1; 16]), &entry(1, 1), t0);
        let mut out = Vec::new();
        r.poll_transmit(t0, &mut out);
        let to_a = out.iter().find(|o| o.to == victim).unwrap();
        assert!(r.ack(victim, &delivered(to_a).0));
        assert_eq!(r.per_source.get(&victim.ip()), Some(&1));
        assert_eq!(
            r.admit(&t(4, 0), 1, victim, local(), false, t0, 1_000),
            Err(Reject::SourceLimit),
            "a proven source is at its cap"
        );
        r.sweep(t0 + Duration::from_secs(2000));
        assert!(
            r.per_source.is_empty(),
            "released at the end: {:?}",
            r.per_source
        );
    }
}

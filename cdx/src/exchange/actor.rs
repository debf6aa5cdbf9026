//! The exchange-session actor: the control-plane owner of the node's
//! [`Registry`] and of all store traffic for exchanges.
//!
//! The UDP loops never wait for it: they hand exchange datagrams over a
//! bounded channel ([`ExchangeSender::offer`], counted as `overloaded` when
//! full) and go on with the next packet. The actor verifies tickets, writes
//! entries to the coordination store, broadcasts them to the other nodes,
//! answers posts and sends (and re-sends) deliveries from the socket each
//! participant used, so its NAT lets them in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use natrix_model::invitation::{
    MAX_SESSION_TTL, SessionId, Ticket, TicketError, move_key_base, ticket_key,
};
use natrix_net::service::MailError;
use natrix_net::{ConnId, SendBatch, StreamMailbox};
use natrix_store::{PutField, Store};
use natrix_wire::{Class, Message, TransactionId};
use ring::hmac;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn};

use super::{
    ClientMessage, Entry, MAX_SEALED, POST, Reject, encode_post_error, encode_post_success,
    parse_client,
};
use super::{Local, Registry, Stats, Transmit};
use crate::metrics::ExchangeMetrics;

/// The broadcast channel entries travel on between nodes.
const EVENTS: &str = "natrix:cdx:exchange";
/// How often the actor sends due deliveries and sweeps expired sessions.
const TICK: Duration = Duration::from_millis(20);
/// Exchange datagrams waiting for the actor before loops drop new ones.
const INBOX: usize = 4096;
/// Posts whose store work may run at once; past it, Posts are dropped as
/// `overloaded` (the client re-posts) rather than queued without bound.
const MAX_IN_FLIGHT: usize = 512;

/// How long the node serves Posts locally after a failed store call
/// before it tries the store again.
const STORE_RETRY: Duration = Duration::from_secs(2);
/// Ticks between sweeps of the connections no participant uses any more
/// (a closed connection whose notice was dropped with a full inbox).
const STREAM_SWEEP_TICKS: u32 = 50;

/// Where answers and deliveries for a TCP or TLS participant go: its
/// connection, through its loop's mailbox.
#[derive(Clone, Debug)]
pub struct StreamReply {
    /// The mailbox of the loop that owns the connection.
    pub mailbox: StreamMailbox,
    /// The connection.
    pub conn: ConnId,
}

/// One exchange datagram (or TCP frame), as a loop received it.
#[derive(Debug)]
pub struct Inbound {
    /// The datagram.
    pub payload: Vec<u8>,
    /// Its source.
    pub from: SocketAddr,
    /// The socket (and destination IP) it arrived on.
    pub local: Local,
    /// For a TCP connection: where to write answers and deliveries.
    pub reply: Option<StreamReply>,
}

/// What reaches the actor from the loops.
#[derive(Debug)]
enum ToActor {
    /// An exchange message.
    Packet(Inbound),
    /// A connection closed: forget its mailbox.
    StreamClosed(u64),
}

/// The loops' side of the inbox.
#[derive(Clone, Debug)]
pub struct ExchangeSender {
    tx: mpsc::Sender<ToActor>,
}

impl ExchangeSender {
    /// Hands a datagram to the actor; false (and nothing queued) when the
    /// inbox is full or the actor is gone.
    pub fn offer(&self, payload: &[u8], from: SocketAddr, local: Local) -> bool {
        self.offer_from_stream(payload, from, local, None)
    }

    /// As [`ExchangeSender::offer`], for a frame of a TCP connection whose
    /// writer takes what the actor sends back from `reply`.
    pub fn offer_from_stream(
        &self,
        payload: &[u8],
        from: SocketAddr,
        local: Local,
        reply: Option<StreamReply>,
    ) -> bool {
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(ToActor::Packet(Inbound {
                    payload: payload.to_vec(),
                    from,
                    local,
                    reply,
                }));
                true
            }
            Err(_) => false,
        }
    }

    /// Tells the actor connection `conn` closed (best effort: with a full
    /// inbox the actor's periodic sweep forgets it).
    pub fn stream_closed(&self, conn: ConnId) {
        let _ = self.tx.try_send(ToActor::StreamClosed(conn.0));
    }
}

/// The actor's side of the inbox, with the sockets deliveries leave from.
#[derive(Debug)]
pub struct ExchangeInbox {
    rx: mpsc::Receiver<ToActor>,
    sockets: HashMap<SocketAddr, Arc<std::net::UdpSocket>>,
}

impl ExchangeInbox {
    /// Registers the socket bound to `bound` for sending answers and
    /// deliveries (a clone of a listener socket: same address and port).
    pub fn add_socket(&mut self, bound: SocketAddr, socket: std::net::UdpSocket) {
        self.sockets
            .entry(bound)
            .or_insert_with(|| Arc::new(socket));
    }
}

/// A new inbox: the loops get the sender, the actor the receiver.
pub fn inbox() -> (ExchangeSender, ExchangeInbox) {
    let (tx, rx) = mpsc::channel(INBOX);
    (
        ExchangeSender { tx },
        ExchangeInbox {
            rx,
            sockets: HashMap::new(),
        },
    )
}

/// What storing one Post writes: the session's hash field, the broadcast
/// to the other nodes, and the entry to deliver from this node.
struct StoreWrite {
    key: String,
    field: String,
    /// `seq 4 B | sealed`.
    value: Vec<u8>,
    /// `node 8 | session 16 | ENTRY value`.
    event: Vec<u8>,
    /// A new or newer entry (a repeat is not broadcast again).
    announce: bool,
    ttl: Duration,
    participants: u8,
    /// The ENTRY value.
    entry: Vec<u8>,
}

impl StoreWrite {
    fn new(
        node: &[u8; 8],
        ticket: &Ticket,
        post: &super::Post<'_>,
        admitted: super::Admitted,
        unix: u64,
    ) -> StoreWrite {
        let mut value = post.entry.seq.to_be_bytes().to_vec();
        value.extend_from_slice(post.entry.sealed);
        let entry = post.entry.to_bytes();
        let mut event = node.to_vec();
        event.extend_from_slice(&ticket.session.0);
        event.extend_from_slice(&entry);
        StoreWrite {
            key: store_key(&ticket.session),
            field: ticket.participant.to_string(),
            value,
            event,
            announce: admitted != super::Admitted::Repeat,
            ttl: Duration::from_secs(ticket.expires.saturating_sub(unix)).min(MAX_SESSION_TTL),
            participants: ticket.participants,
            entry,
        }
    }
}

/// A broadcast from the store: another node stored an entry.
#[derive(Debug)]
struct Event(Vec<u8>);

/// Owns the registry, the store traffic, and the sending of answers and
/// deliveries.
pub struct ExchangeActor {
    registry: Registry,
    store: Store,
    key: Option<hmac::Key>,
    /// What move keys and challenges derive from.
    mover: Option<hmac::Key>,
    sockets: HashMap<SocketAddr, Arc<std::net::UdpSocket>>,
    /// The mailboxes of the TCP/TLS connections participants posted on.
    streams: HashMap<u64, StreamMailbox>,
    inbox: Option<mpsc::Receiver<ToActor>>,
    ticks: u32,
    /// Posts whose store work is running.
    in_flight: usize,
    /// After a failed store call, Posts are served locally without trying
    /// the store until this instant.
    store_down_until: Option<Instant>,
    metrics: ExchangeMetrics,
    published: Stats,
    node: [u8; 8],
    batch: SendBatch,
    span: tracing::Span,
}

impl std::fmt::Debug for ExchangeActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeActor")
            .field("registry", &self.registry)
            .field("store", &self.store.kind())
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn store_key(session: &SessionId) -> String {
    format!("natrix:cdx:xs:{{{}}}", session.hex())
}

impl ExchangeActor {
    /// An actor for `inbox`; without `cluster_secret` every post is
    /// refused (`disabled`), as tickets cannot be verified.
    pub fn new(
        inbox: ExchangeInbox,
        store: Store,
        cluster_secret: Option<&[u8]>,
        limits: super::Limits,
        metrics: ExchangeMetrics,
    ) -> ExchangeActor {
        ExchangeActor {
            registry: Registry::new(limits, Box::new(rand::random)),
            store,
            key: cluster_secret.map(ticket_key),
            mover: cluster_secret.map(move_key_base),
            sockets: inbox.sockets,
            streams: HashMap::new(),
            inbox: Some(inbox.rx),
            ticks: 0,
            in_flight: 0,
            store_down_until: None,
            metrics,
            published: Stats::default(),
            node: rand::random(),
            batch: SendBatch::new(64).without_gso(),
            span: info_span!("exchange"),
        }
    }

    fn send(&mut self, t: Transmit) {
        if let Some(id) = t.via.stream {
            // A TCP participant: through its loop to its connection (STUN
            // messages delimit themselves on a stream).
            let Some(mailbox) = self.streams.get(&id) else {
                self.metrics.send_errors.inc();
                return;
            };
            match mailbox.post(ConnId(id), t.payload) {
                Ok(()) => {}
                Err(MailError::Full) => self.metrics.send_errors.inc(),
                Err(MailError::Closed) => {
                    self.streams.remove(&id);
                }
            }
            return;
        }
        let Some(socket) = self.sockets.get(&t.via.bound) else {
            debug!(bound = %t.via.bound, "no socket to send an exchange message from");
            return;
        };
        self.batch.push_from(t.to, t.via.dst_ip, &t.payload);
        for _ in 0..self.batch.flush(socket.as_fd()) {
            self.metrics.send_errors.inc();
        }
    }

    fn answer_error(&mut self, inbound: &Inbound, tid: &TransactionId, reject: Reject) {
        let Some((code, reason)) = reject.answer() else {
            return;
        };
        let mut out = [0u8; 128];
        if let Ok(n) = encode_post_error(&mut out, tid, code, reason) {
            self.send(Transmit {
                to: inbound.from,
                via: inbound.local,
                payload: out[..n].to_vec(),
            });
        }
    }

    fn reject(&mut self, inbound: &Inbound, tid: Option<TransactionId>, reject: Reject) {
        self.metrics.post(reject.label()).inc();
        if let Some(tid) = tid {
            self.answer_error(inbound, &tid, reject);
        }
    }

    fn handle_inbound(&mut self, mut inbound: Inbound, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        if let (Some(id), Some(reply)) = (inbound.local.stream, inbound.reply.take()) {
            self.streams.entry(id).or_insert(reply.mailbox);
        }
        let post = match parse_client(&inbound.payload) {
            Ok(ClientMessage::Ack(tid)) => {
                if !self.registry.ack(inbound.from, &tid) {
                    self.metrics.stray_acks.inc();
                }
                return;
            }
            Ok(ClientMessage::Post(p)) => p,
            Err(r) => {
                // Answer malformed Post requests we can still address.
                let tid = Message::parse(&inbound.payload)
                    .ok()
                    .filter(|m| m.method() == POST && m.class() == Class::Request)
                    .map(|m| m.transaction_id());
                self.reject(&inbound, tid, r);
                return;
            }
        };
        let tid = post.tid;
        if self.in_flight >= MAX_IN_FLIGHT {
            return self.reject(&inbound, Some(tid), Reject::Overloaded);
        }
        let unix = unix_now();
        let (ticket, admitted) = match self.admit(&inbound, &post, unix) {
            Ok(a) => a,
            Err(Reject::MoveUnproven) => return self.challenge(&inbound, &post, unix),
            Err(r) => return self.reject(&inbound, Some(tid), r),
        };
        if admitted == super::Admitted::New
            && let Some([m, f]) = post.profile
        {
            self.metrics.profile(m, f).inc();
        }
        let write = StoreWrite::new(&self.node, &ticket, &post, admitted, unix);
        self.store_post(inbound, tid, ticket, write, ctx);
    }

    /// Answers a Post that would move its participant without proof: 401
    /// with a challenge the participant signs with its move key.
    fn challenge(&mut self, inbound: &Inbound, post: &super::Post<'_>, unix: u64) {
        self.metrics.post(Reject::MoveUnproven.label()).inc();
        let Some(base) = self.mover.as_ref() else {
            return;
        };
        let c = super::challenge(
            base,
            post.ticket,
            inbound.from,
            unix / super::CHALLENGE_BUCKET_SECS,
        );
        let mut out = [0u8; 128];
        if let Ok(n) = super::encode_post_challenge(&mut out, &post.tid, &c) {
            self.send(Transmit {
                to: inbound.from,
                via: inbound.local,
                payload: out[..n].to_vec(),
            });
        }
    }

    /// Verifies a Post's ticket and entry and admits its participant.
    fn admit(
        &mut self,
        inbound: &Inbound,
        post: &super::Post<'_>,
        unix: u64,
    ) -> Result<(Ticket, super::Admitted), Reject> {
        let key = self.key.as_ref().ok_or(Reject::Disabled)?;
        let ticket = Ticket::verify(post.ticket, key, unix).map_err(|e| match e {
            TicketError::Malformed => Reject::Malformed,
            TicketError::Forged => Reject::Forged,
            TicketError::Expired => Reject::Expired,
        })?;
        if post.entry.participant != ticket.participant {
            return Err(Reject::Malformed);
        }
        if post.entry.sealed.len() > MAX_SEALED {
            return Err(Reject::TooLarge);
        }
        let move_proven = self
            .mover
            .as_ref()
            .is_some_and(|base| super::proves_move(base, post, inbound.from, unix));
        let admitted = self.registry.admit(
            &ticket,
            post.entry.seq,
            inbound.from,
            inbound.local,
            move_proven,
            Instant::now(),
            unix,
        )?;
        Ok((ticket, admitted))
    }

    /// Stores the entry (and announces it to the other nodes), then reads
    /// the session's entries back and answers the Post.
    fn store_post(
        &mut self,
        inbound: Inbound,
        tid: TransactionId,
        ticket: Ticket,
        write: StoreWrite,
        ctx: &mut Context<Self>,
    ) {
        if self
            .store_down_until
            .is_some_and(|until| Instant::now() < until)
        {
            return self.posted_locally(&inbound, &tid, &ticket, &write.entry);
        }
        let store = self.store.clone();
        let StoreWrite {
            key,
            field,
            value,
            event,
            announce,
            ttl,
            participants,
            entry,
        } = write;
        let work = async move {
            let put = store
                .put_field(&key, &field, &value, ttl, usize::from(participants))
                .await?;
            if put == PutField::Full {
                return Ok(None);
            }
            if announce {
                store.publish(EVENTS, &event).await?;
            }
            store.fields(&key).await.map(Some)
        };
        self.in_flight += 1;
        ctx.spawn(work.into_actor(self).map(move |result, act, _ctx| {
            let _span = act.span.clone().entered();
            act.in_flight -= 1;
            match result {
                Ok(Some(fields)) => {
                    act.store_down_until = None;
                    act.posted(&inbound, &tid, &ticket, &entry, &fields);
                }
                Ok(None) => act.reject(&inbound, Some(tid), Reject::SessionFull),
                Err(e) => {
                    // The session goes on from this node alone: the entries
                    // it has seen are delivered to its own participants.
                    if act.store_down_until.is_none() {
                        warn!(error = %e, "exchange: the coordination store is unreachable; sessions go on from this node alone");
                    }
                    act.store_down_until = Some(Instant::now() + STORE_RETRY);
                    act.posted_locally(&inbound, &tid, &ticket, &entry);
                }
            }
        }));
    }

    /// The entry is stored: offer the session's entries (ours and the
    /// others') for delivery and answer the Post.
    fn posted(
        &mut self,
        inbound: &Inbound,
        tid: &TransactionId,
        ticket: &Ticket,
        entry: &[u8],
        fields: &[(String, Vec<u8>)],
    ) {
        let now = Instant::now();
        if let Some(own) = Entry::parse(entry) {
            self.registry.offer(&ticket.session, &own, now);
        }
        let mut posted = 0u8;
        for (field, value) in fields {
            let (Ok(p), true) = (field.parse::<u8>(), value.len() >= 4) else {
                continue;
            };
            posted += 1;
            let seq = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            self.registry.offer(
                &ticket.session,
                &Entry {
                    participant: p,
                    seq,
                    sealed: &value[4..],
                },
                now,
            );
        }
        self.answer_success(inbound, tid, ticket, posted, "accepted");
        self.flush_due(now);
    }

    /// The store could not be reached: offer the entries this node has
    /// seen for the session (its own participants' and those it heard of)
    /// and answer the Post.
    fn posted_locally(
        &mut self,
        inbound: &Inbound,
        tid: &TransactionId,
        ticket: &Ticket,
        entry: &[u8],
    ) {
        let now = Instant::now();
        if let Some(own) = Entry::parse(entry) {
            self.registry.offer(&ticket.session, &own, now);
        }
        let posted = self.registry.reoffer_local(&ticket.session, now);
        self.answer_success(inbound, tid, ticket, posted, "accepted_local");
        self.flush_due(now);
    }

    fn answer_success(
        &mut self,
        inbound: &Inbound,
        tid: &TransactionId,
        ticket: &Ticket,
        posted: u8,
        result: &'static str,
    ) {
        let mut out = [0u8; 128];
        let left = ticket.expires.saturating_sub(unix_now());
        if let Ok(n) = encode_post_success(
            &mut out,
            tid,
            inbound.from,
            posted,
            ticket.participants,
            u32::try_from(left).unwrap_or(u32::MAX),
        ) {
            self.metrics.post(result).inc();
            self.send(Transmit {
                to: inbound.from,
                via: inbound.local,
                payload: out[..n].to_vec(),
            });
        }
    }

    /// A broadcast: `node 8 | session 16 | ENTRY value`.
    fn handle_event(&mut self, event: &[u8]) {
        if event.len() < 24 || event[..8] == self.node {
            return;
        }
        let Ok(session) = <[u8; 16]>::try_from(&event[8..24]) else {
            return;
        };
        let Some(entry) = Entry::parse(&event[24..]) else {
            self.metrics.events_malformed.inc();
            return;
        };
        self.metrics.events.inc();
        self.registry
            .offer(&SessionId(session), &entry, Instant::now());
        self.flush_due(Instant::now());
    }

    fn flush_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.registry.poll_transmit(now, &mut due);
        for t in due {
            self.send(t);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.flush_due(now);
        self.registry.sweep(now);
        self.ticks += 1;
        if self.ticks >= STREAM_SWEEP_TICKS {
            self.ticks = 0;
            let live: std::collections::HashSet<u64> = self.registry.streams().collect();
            self.streams.retain(|id, _| live.contains(id));
        }
        let stats = self.registry.stats();
        self.metrics
            .acked
            .inc_by(stats.acked - self.published.acked);
        self.metrics
            .expired
            .inc_by(stats.expired - self.published.expired);
        self.metrics
            .retransmits
            .inc_by(stats.retransmits - self.published.retransmits);
        self.metrics.held.inc_by(stats.held - self.published.held);
        self.published = stats;
        self.metrics
            .sessions
            .set(i64::try_from(self.registry.sessions()).unwrap_or(i64::MAX));
    }
}

fn receiver_stream<T: 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

impl Actor for ExchangeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(parent: &self.span, store = self.store.kind(), enabled = self.key.is_some(), "exchange sessions on");
        if let Some(rx) = self.inbox.take() {
            ctx.add_stream(receiver_stream(rx));
        }
        let store = self.store.clone();
        ctx.spawn(
            async move { store.subscribe(EVENTS).await }
                .into_actor(self)
                .map(|sub, _act, ctx| {
                    ctx.add_stream(receiver_stream(sub.into_receiver()).map(Event));
                }),
        );
        ctx.run_interval(TICK, |act, _ctx| act.tick());
    }
}

impl StreamHandler<ToActor> for ExchangeActor {
    fn handle(&mut self, item: ToActor, ctx: &mut Context<Self>) {
        match item {
            ToActor::Packet(inbound) => self.handle_inbound(inbound, ctx),
            ToActor::StreamClosed(id) => {
                self.streams.remove(&id);
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // The loops stopped; deliveries in flight still finish.
        debug!(parent: &self.span, "exchange inbox closed");
    }
}

impl StreamHandler<Event> for ExchangeActor {
    fn handle(&mut self, item: Event, _ctx: &mut Context<Self>) {
        self.handle_event(&item.0);
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        warn!(parent: &self.span, "store broadcast ended; entries from other nodes arrive only through re-posts");
    }
}

use futures_util::StreamExt as _;

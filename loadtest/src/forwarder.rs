//! `natrix-loadtest forwarder`: the bare userspace TURN channel forwarder,
//! the reference a relay's packet path is measured against. It does what
//! relaying channel data needs and nothing more — one thread, `poll(2)`,
//! `recvmmsg(2)` into buffers with headroom for the ChannelData header,
//! `sendmmsg(2)` with GSO — and just enough TURN for a client to set a
//! channel up: long-term credentials on every request, Allocate,
//! ChannelBind, CreatePermission and Refresh answered at once. No
//! lifetimes, permissions, quotas, metrics or deny-list: a benchmark tool,
//! never a server for the open internet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use natrix_net::{HeadroomBatch, SendBatch};
use natrix_wire::{
    Attribute, AttributeType, ChannelData, ChannelNumber, Class, Encoder, ErrorCode, IntegrityKey,
    Message, MessageType, Method, long_term_key_md5,
};

/// Options of `forwarder`.
#[derive(clap::Args, Debug)]
pub(crate) struct ForwarderArgs {
    /// Where clients reach it (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    listen: SocketAddr,
    /// The address relayed sockets bind (one port each, from the kernel).
    #[arg(long, default_value = "127.0.0.1")]
    relay_ip: IpAddr,
    /// The one account, USER:PASSWORD.
    #[arg(long, default_value = "bench:bench")]
    user: String,
    /// The realm of the 401 challenge.
    #[arg(long, default_value = "natrix")]
    realm: String,
    /// Stop after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Allocations at most (one relayed socket each).
    #[arg(long, default_value_t = 1024)]
    max_allocations: usize,
}

/// Datagrams per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Batches one socket may take per wake-up before the others get a turn.
const TURNS: usize = 16;
const HEADROOM: usize = 4;
const MAX_PAYLOAD: usize = 2048;
const NONCE: &str = "bare-forwarder-nonce";

struct Relayed {
    socket: UdpSocket,
    client: SocketAddr,
    relayed: SocketAddr,
    to_peer: HashMap<u16, SocketAddr>,
    to_client: HashMap<SocketAddr, u16>,
    out: SendBatch,
}

struct Forwarder {
    listener: UdpSocket,
    user: String,
    realm: String,
    key: IntegrityKey,
    relay_ip: IpAddr,
    max: usize,
    allocations: Vec<Relayed>,
    by_client: HashMap<SocketAddr, usize>,
    to_clients: SendBatch,
    forwarded: u64,
    dropped: u64,
}

pub(crate) fn run(args: &ForwarderArgs) -> anyhow::Result<serde_json::Value> {
    let (user, password) = args
        .user
        .split_once(':')
        .context("--user wants USER:PASSWORD")?;
    let listener = UdpSocket::bind(args.listen)
        .with_context(|| format!("binding the forwarder to {}", args.listen))?;
    listener.set_nonblocking(true)?;
    eprintln!("natrix-loadtest forwarder: listening on {}", args.listen);
    let mut fwd = Forwarder {
        listener,
        user: user.to_owned(),
        realm: args.realm.clone(),
        key: IntegrityKey::new(&long_term_key_md5(user, &args.realm, password)),
        relay_ip: args.relay_ip,
        max: args.max_allocations,
        allocations: Vec::new(),
        by_client: HashMap::new(),
        to_clients: SendBatch::new(BATCH),
        forwarded: 0,
        dropped: 0,
    };
    let mut batch = HeadroomBatch::new(BATCH, HEADROOM, MAX_PAYLOAD, 0);
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut fds = Vec::new();
    while Instant::now() < deadline && !crate::live::stopped() {
        fds.clear();
        fds.push(pollfd(&fwd.listener));
        fds.extend(fwd.allocations.iter().map(|a| pollfd(&a.socket)));
        // SAFETY: `fds` is a valid array of pollfd structs for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready <= 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            fwd.serve_clients(&mut batch);
        }
        for (i, fd) in fds[1..].iter().enumerate() {
            if fd.revents & libc::POLLIN != 0 && i < fwd.allocations.len() {
                fwd.serve_peers(i, &mut batch);
            }
        }
    }
    Ok(serde_json::json!({
        "scenario": "forwarder",
        "seconds": started.elapsed().as_secs_f64(),
        "allocations": fwd.allocations.len(),
        "forwarded": fwd.forwarded,
        "dropped": fwd.dropped,
    }))
}

fn pollfd(socket: &UdpSocket) -> libc::pollfd {
    libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

impl Forwarder {
    /// ChannelData on to peers, requests answered.
    fn serve_clients(&mut self, batch: &mut HeadroomBatch) {
        for _ in 0..TURNS {
            let Ok(n) = batch.recv(self.listener.as_fd()) else {
                break;
            };
            for i in 0..n {
                let (buf, range, from) = batch.get_mut(i);
                let packet = &buf[range];
                if packet.first().is_some_and(|b| b & 0xC0 == 0x40) {
                    let relayed = self.by_client.get(&from).map(|&k| &mut self.allocations[k]);
                    let sent = relayed.and_then(|a| {
                        let cd = ChannelData::parse(packet).ok()?;
                        let peer = a.to_peer.get(&cd.channel)?;
                        a.out.push(*peer, cd.payload);
                        Some(())
                    });
                    match sent {
                        Some(()) => self.forwarded += 1,
                        None => self.dropped += 1,
                    }
                } else if let Ok(msg) = Message::parse(packet) {
                    let mut answer = [0u8; 512];
                    if let Some(len) = self.answer(&msg, from, &mut answer) {
                        let _ = self.listener.send_to(&answer[..len], from);
                    }
                } else {
                    self.dropped += 1;
                }
            }
            for a in &mut self.allocations {
                if !a.out.is_empty() {
                    self.dropped += a.out.flush(a.socket.as_fd()) as u64;
                }
            }
            if n < BATCH {
                break;
            }
        }
    }

    /// Peers' datagrams to their clients as ChannelData.
    fn serve_peers(&mut self, k: usize, batch: &mut HeadroomBatch) {
        let a = &self.allocations[k];
        for _ in 0..TURNS {
            let Ok(n) = batch.recv(a.socket.as_fd()) else {
                break;
            };
            for i in 0..n {
                let (buf, range, from) = batch.get_mut(i);
                let Some(number) = a.to_client.get(&from).and_then(|c| ChannelNumber::new(*c))
                else {
                    self.dropped += 1;
                    continue;
                };
                let start = range.start - HEADROOM;
                if ChannelData::write_header(&mut buf[start..], number, range.len()).is_err() {
                    self.dropped += 1;
                    continue;
                }
                self.to_clients.push(a.client, &buf[start..range.end]);
                self.forwarded += 1;
            }
            self.dropped += self.to_clients.flush(self.listener.as_fd()) as u64;
            if n < BATCH {
                break;
            }
        }
    }

    /// The answer to a request, or `None` to stay silent.
    fn answer(&mut self, msg: &Message<'_>, from: SocketAddr, out: &mut [u8]) -> Option<usize> {
        if msg.class() != Class::Request {
            return None;
        }
        let method = msg.method();
        let tid = msg.transaction_id();
        let authentic = msg.get(AttributeType::USERNAME) == Some(self.user.as_bytes())
            && msg.verify_integrity(&self.key).is_ok();
        if !authentic {
            let mut enc = Encoder::new(out, MessageType::new(method, Class::Error), &tid).ok()?;
            enc.attribute(&Attribute::ErrorCode(ErrorCode::UNAUTHENTICATED))
                .ok()?;
            enc.attribute(&Attribute::Realm(&self.realm)).ok()?;
            enc.attribute(&Attribute::Nonce(NONCE)).ok()?;
            return Some(enc.finish());
        }
        let mut enc = Encoder::new(out, MessageType::new(method, Class::Success), &tid).ok()?;
        match method {
            Method::ALLOCATE => {
                let k = match self.by_client.get(&from) {
                    Some(&k) => k,
                    None => self.allocate(from)?,
                };
                let relayed = self.allocations[k].relayed;
                enc.attribute(&Attribute::XorRelayedAddress(relayed)).ok()?;
                enc.attribute(&Attribute::XorMappedAddress(from)).ok()?;
                enc.attribute(&Attribute::Lifetime(600)).ok()?;
            }
            Method::REFRESH => {
                let lifetime = match msg.decode(AttributeType::LIFETIME) {
                    Some(Ok(Attribute::Lifetime(s))) => s.min(3600),
                    _ => 600,
                };
                if lifetime == 0 {
                    self.release(from);
                }
                enc.attribute(&Attribute::Lifetime(lifetime)).ok()?;
            }
            Method::CHANNEL_BIND => {
                let a = self
                    .by_client
                    .get(&from)
                    .map(|&k| &mut self.allocations[k])?;
                let (Some(Ok(Attribute::ChannelNumber(c))), Some(Ok(Attribute::XorPeerAddress(p)))) = (
                    msg.decode(AttributeType::CHANNEL_NUMBER),
                    msg.decode(AttributeType::XOR_PEER_ADDRESS),
                ) else {
                    return None;
                };
                a.to_peer.insert(c, p);
                a.to_client.insert(p, c);
            }
            Method::CREATE_PERMISSION => {}
            _ => return None,
        }
        enc.integrity(&self.key).ok()?;
        Some(enc.finish())
    }

    fn allocate(&mut self, client: SocketAddr) -> Option<usize> {
        if self.allocations.len() >= self.max {
            return None;
        }
        let socket = UdpSocket::bind((self.relay_ip, 0)).ok()?;
        socket.set_nonblocking(true).ok()?;
        let relayed = socket.local_addr().ok()?;
        self.allocations.push(Relayed {
            socket,
            client,
            relayed,
            to_peer: HashMap::new(),
            to_client: HashMap::new(),
            out: SendBatch::new(BATCH),
        });
        let k = self.allocations.len() - 1;
        self.by_client.insert(client, k);
        Some(k)
    }

    fn release(&mut self, client: SocketAddr) {
        let Some(k) = self.by_client.remove(&client) else {
            return;
        };
        self.allocations.swap_remove(k);
        if let Some(moved) = self.allocations.get(k) {
            self.by_client.insert(moved.client, k);
        }
    }
}

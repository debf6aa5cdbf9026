//! The datagram engine under the `stun` and `relay` scenarios: a window of
//! requests in flight (closed loop) or a paced rate (open loop), batched
//! sends (sendmmsg, GSO) and receives (recvmmsg), and UDP echoes.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use natrix_net::{HeadroomBatch, SendBatch};

use crate::live::{live, stopped};
use crate::stats::Latency;

/// What one sending client saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct ClientResult {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// Answers that arrived after one sent later than them.
    pub(crate) reordered: u64,
    pub(crate) rtt: Latency,
    /// The highest sequence number answered so far.
    highest: Option<u64>,
}

impl ClientResult {
    /// Counts an answer carrying `(sent_at, seq)`: reordering against the
    /// highest sequence seen, and one round-trip time in 16.
    pub(crate) fn answered(&mut self, (sent_at, seq): Stamp, started: Instant) {
        self.received += 1;
        if self.highest.is_some_and(|h| seq < h) {
            self.reordered += 1;
        } else {
            self.highest = Some(seq);
        }
        if self.received.is_multiple_of(16) {
            let now = started.elapsed().as_nanos() as u64;
            self.rtt.record_us(now.saturating_sub(sent_at) / 1000);
        }
    }

    /// Adds another client's counts.
    pub(crate) fn merge(&mut self, other: &ClientResult) {
        self.sent += other.sent;
        self.received += other.received;
        self.reordered += other.reordered;
        self.rtt.merge(&other.rtt);
    }
}

/// Waits up to `ms` for `fd` to become readable.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd owned by this frame.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// How a [`Load`] paces its requests.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pace {
    /// Keep this many in flight: the run finds the rate the server
    /// sustains instead of overrunning it. Nothing answered for 50 ms
    /// counts whatever was in flight as lost.
    Window(usize),
    /// Send this many per second whatever comes back (open loop).
    Rate(f64),
}

/// A load towards `to` until `deadline` (or Ctrl-C). Sends and receives are
/// batched so that the generator costs less CPU than the server it measures.
pub(crate) struct Load {
    pub(crate) to: SocketAddr,
    pub(crate) pace: Pace,
    pub(crate) deadline: Instant,
    /// Answers arriving up to this long after the deadline still count.
    pub(crate) linger_ms: Option<i32>,
    /// Largest request `build` writes.
    pub(crate) max_frame: usize,
}

/// The answer's send time and sequence number, which requests carry.
pub(crate) type Stamp = (u64, u64);

impl Load {
    /// Runs the load on `fd`. `build(seq, t_ns, buf)` writes request number
    /// `seq`, sent at `t_ns` (ns since `started`), and returns its length;
    /// `answer(bytes)` recognises an answer and returns the send time and
    /// sequence number it carries (round-trip times: one in 16 sampled).
    pub(crate) fn run(
        &self,
        fd: BorrowedFd<'_>,
        started: Instant,
        mut build: impl FnMut(u64, u64, &mut [u8]) -> usize,
        answer: impl Fn(&[u8]) -> Option<Stamp>,
    ) -> ClientResult {
        let mut frame = vec![0u8; self.max_frame];
        let batch = match self.pace {
            Pace::Window(w) => w.max(1),
            Pace::Rate(_) => 64,
        };
        let mut out = SendBatch::new(batch);
        // Answers are about the size of requests (echoes, Binding answers).
        let mut rx = HeadroomBatch::new(64, 0, self.max_frame.max(2048), 0);
        let mut r = ClientResult::default();
        let mut inflight = 0usize;
        let live = live();
        let take = |r: &mut ClientResult, rx: &mut HeadroomBatch, n: usize| -> usize {
            let mut got = 0;
            for j in 0..n {
                let (buf, range, _) = rx.get_mut(j);
                let Some(stamp) = answer(&buf[range]) else {
                    continue;
                };
                got += 1;
                r.answered(stamp, started);
            }
            live.done(got as u64);
            got
        };
        while Instant::now() < self.deadline && !stopped() {
            let room = match self.pace {
                Pace::Window(w) => w.saturating_sub(inflight),
                Pace::Rate(pps) => {
                    let due = (started.elapsed().as_secs_f64() * pps) as u64;
                    (due.saturating_sub(r.sent) as usize).min(batch)
                }
            };
            for i in 0..room {
                let t = started.elapsed().as_nanos() as u64;
                let n = build(r.sent + i as u64, t, &mut frame);
                out.push(self.to, &frame[..n]);
            }
            if room > 0 {
                let failed = out.flush(fd);
                let sent = (room - failed) as u64;
                r.sent += sent;
                inflight += room - failed;
                live.sent(sent);
            }
            let wait_ms = match self.pace {
                Pace::Window(_) => 50,
                // Wake in time for the next datagram.
                Pace::Rate(pps) => {
                    let due = (r.sent + 1) as f64 / pps;
                    ((due - started.elapsed().as_secs_f64()) * 1000.0).clamp(0.0, 50.0) as i32
                }
            };
            if !wait_readable(fd, wait_ms) {
                if matches!(self.pace, Pace::Window(_)) {
                    inflight = 0;
                } else if room == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                continue;
            }
            let Ok(n) = rx.recv(fd) else { continue };
            let got = take(&mut r, &mut rx, n);
            inflight = inflight.saturating_sub(got);
        }
        if let Some(ms) = self.linger_ms {
            while wait_readable(fd, ms) {
                let Ok(n) = rx.recv(fd) else { break };
                take(&mut r, &mut rx, n);
            }
        }
        r
    }
}

/// Receives in batches and sends every datagram `reply` accepts back in one
/// batch, until `stop`.
pub(crate) fn echo(
    socket: &UdpSocket,
    stop: &AtomicBool,
    reply_to: impl Fn(SocketAddr) -> SocketAddr,
    accept: impl Fn(&[u8]) -> bool,
) {
    let fd = socket.as_fd();
    let mut rx = HeadroomBatch::new(64, 0, 65535, 0);
    let mut out = SendBatch::new(64);
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(fd, 100) {
            continue;
        }
        let Ok(n) = rx.recv(fd) else { continue };
        for j in 0..n {
            let (buf, range, from) = rx.get_mut(j);
            if accept(&buf[range.clone()]) {
                out.push(reply_to(from), &buf[range]);
            }
        }
        out.flush(fd);
    }
}

/// A plain UDP echo peer.
pub(crate) fn echo_peer(socket: &UdpSocket, stop: &AtomicBool) {
    echo(socket, stop, |from| from, |_| true);
}

/// Runs `client` on each of `items` in its own thread (sharing `started`)
/// and merges what they saw.
pub(crate) fn run_clients<T: Send>(
    items: &mut [T],
    client: impl Fn(&mut T) -> anyhow::Result<ClientResult> + Sync,
) -> anyhow::Result<ClientResult> {
    let client = &client;
    let results: Vec<anyhow::Result<ClientResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = items
            .iter_mut()
            .map(|c| s.spawn(move || client(c)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let mut total = ClientResult::default();
    for r in results {
        total.merge(&r?);
    }
    Ok(total)
}

/// The share of `sent` that never came back.
pub(crate) fn loss(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        0.0
    } else {
        1.0 - (received.min(sent) as f64 / sent as f64)
    }
}

/// One Binding request on a connected socket, answered within 2 s (three
/// tries), or a clear error: nothing listening, or no answer.
pub(crate) fn probe_binding(socket: &UdpSocket, server: SocketAddr) -> anyhow::Result<()> {
    use natrix_wire::{Class, Encoder, MessageType, Method, TransactionId};
    let mut buf = [0u8; 64];
    let tid = TransactionId(rand::random());
    let n = Encoder::new(
        &mut buf,
        MessageType::new(Method::BINDING, Class::Request),
        &tid,
    )?
    .finish();
    socket.set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut answer = [0u8; 1500];
    for _ in 0..3 {
        socket.send(&buf[..n])?;
        match socket.recv(&mut answer) {
            Ok(m) if m >= 20 && answer[8..20] == tid.0 => {
                socket.set_read_timeout(None)?;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if natrix_net::is_timeout(&e) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow::bail!("{server} is unreachable ({e}): nothing listens there")
            }
            Err(e) => return Err(e).with_context(|| format!("asking {server}")),
        }
    }
    anyhow::bail!(
        "no answer from {server} to a STUN Binding request in 2 s: is a STUN server listening there?"
    )
}

//! A client's TCP or TLS connection: framing in, buffered writes out.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use natrix_wire::frame_len;

use crate::core::{ClientSocket, DropReason, Transport};

/// Largest frame a client may send (a STUN message or ChannelData with a
/// full UDP payload, padded).
pub(super) const MAX_FRAME: usize = 4 + 65535 + 3;
/// Largest STUN message accepted on a stream: TURN requests are a few
/// hundred bytes; a bigger header is garbage or an attack on memory. Also
/// the largest frame of any kind from a connection without an allocation
/// (its ChannelData could only be dropped).
const MAX_STUN_FRAME: usize = 4096;
/// Most bytes queued for one slow client before relayed data is dropped.
const MAX_PENDING_WRITE: usize = 1 << 20;
/// Most bytes queued for a connection without an allocation (answers to
/// pipelined unauthenticated requests that it does not read).
const MAX_UNTRUSTED_PENDING: usize = 16 * 1024;
/// The read buffer of a connection without an allocation: one STUN frame.
const UNTRUSTED_READ: usize = MAX_STUN_FRAME;
/// The read buffer of a connection with an allocation (and what it
/// returns to once drained): room for a hundred small frames per read. It
/// grows (doubling) only for frames larger than what it holds, up to
/// [`MAX_READ`].
const INITIAL_READ: usize = 16 * 1024;
/// Reads per wake-up before the loop turns to other sockets (the rest is
/// read on its next turn).
const READS_PER_WAKE: usize = 16;
/// The largest read buffer: one maximal frame and some.
const MAX_READ: usize = MAX_FRAME + 4096;
/// The read buffer of a client data connection (RFC 6062).
const PIPE_READ: usize = 64 * 1024;
/// Write capacity kept once a burst has drained.
const KEPT_WRITE: usize = 64 * 1024;

/// One client connection.
pub(super) struct Stream {
    pub(super) socket: mio::net::TcpStream,
    pub(super) client: ClientSocket,
    tls: Option<rustls::ServerConnection>,
    /// A TLS 1.3 session whose handshake ran in a predecessor process.
    sealed: Option<Box<super::sealed::Sealed>>,
    read: Vec<u8>,
    filled: usize,
    write: Vec<u8>,
    /// Plaintext handed to TLS since its output buffer was last empty.
    tls_queued: usize,
    /// Registered for WRITABLE (a write is pending).
    pub(super) want_write: bool,
    /// Frames were queued since the loop last flushed this stream.
    pub(super) dirty: bool,
    /// The connection's id, for frames a STUN service sends it later.
    pub(super) conn: natrix_net::ConnId,
    /// When the client last sent something.
    pub(super) last_active: std::time::Instant,
    /// The client holds an allocation: larger frames, buffers and queues.
    pub(super) trusted: bool,
    /// From a load balancer: the PROXY v2 header read so far, until it is
    /// complete.
    proxy: Option<Vec<u8>>,
    /// The header named another client: the connection's address before
    /// (for the loop to re-key its maps).
    pub(super) readdressed: Option<ClientSocket>,
    /// The IP this connection counts against in the per-IP cap.
    pub(super) counted_ip: Option<std::net::IpAddr>,
    /// On a TLS listener shared with HTTPS: the ClientHello read so far,
    /// until it says whether the connection is TURN or HTTPS.
    sniff: Option<Box<Sniff>>,
    /// A client data connection (RFC 6062 ConnectionBind): its bytes go to
    /// this peer data connection as they are, unframed.
    pub(super) pipe: Option<crate::core::ConnectionId>,
}

/// A TLS connection whose ClientHello has not decided between TURN and
/// HTTPS yet.
struct Sniff {
    /// Every byte read, for the HTTPS front to replay.
    raw: Vec<u8>,
    acceptor: rustls::server::Acceptor,
    config: Arc<rustls::ServerConfig>,
    https: crate::https::HttpsHandoff,
}

/// The longest ClientHello a shared listener waits for (a record's
/// largest plaintext and its header).
const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

/// What reading produced.
pub(super) enum ReadOutcome {
    /// Keep the connection.
    Open,
    /// The read budget is spent with bytes still waiting: keep it and read
    /// again on the loop's next turn.
    More,
    /// The peer closed, or the socket failed: close it.
    Close,
    /// The peer sent something that cannot be framed: close and count it.
    Garbage(DropReason),
    /// The ClientHello asked for HTTP: hand the connection to the HTTPS
    /// front ([`Stream::take_for_https`]).
    Https,
}

impl Stream {
    pub(super) fn new(
        socket: mio::net::TcpStream,
        client: SocketAddr,
        server: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Stream> {
        let tls = tls
            .map(rustls::ServerConnection::new)
            .transpose()
            .map_err(io::Error::other)?;
        Ok(Stream {
            socket,
            client: ClientSocket {
                transport: if tls.is_some() {
                    Transport::Tls
                } else {
                    Transport::Tcp
                },
                client,
                server,
            },
            tls,
            sealed: None,
            read: vec![0; UNTRUSTED_READ],
            filled: 0,
            write: Vec::new(),
            tls_queued: 0,
            want_write: false,
            dirty: false,
            conn: natrix_net::ConnId::next(),
            last_active: std::time::Instant::now(),
            trusted: false,
            proxy: None,
            readdressed: None,
            counted_ip: None,
            sniff: None,
            pipe: None,
        })
    }

    /// True until the PROXY header of a balancer's connection is complete.
    pub(super) fn awaits_proxy_header(&self) -> bool {
        self.proxy.is_some()
    }

    /// The TLS listener is shared with HTTPS: the ClientHello decides
    /// whether this connection is TURN (the handshake goes on here, with
    /// `config`) or HTTPS (handed to the front).
    pub(super) fn route_by_client_hello(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        https: crate::https::HttpsHandoff,
    ) {
        self.client.transport = Transport::Tls;
        self.sniff = Some(Box::new(Sniff {
            raw: Vec::new(),
            acceptor: rustls::server::Acceptor::default(),
            config,
            https,
        }));
    }

    /// The socket (a duplicate: the loop closes its own), the bytes read
    /// and the client of a connection [`ReadOutcome::Https`] named.
    pub(super) fn take_for_https(
        &mut self,
    ) -> Option<(crate::https::HttpsHandoff, crate::https::Handed)> {
        use std::os::fd::AsFd;
        let sniff = self.sniff.take()?;
        let fd = self.socket.as_fd().try_clone_to_owned().ok()?;
        Some((
            sniff.https,
            crate::https::Handed {
                socket: std::net::TcpStream::from(fd),
                head: sniff.raw,
                client: self.client.client,
            },
        ))
    }

    /// Takes `bytes` (read from the socket) into the ClientHello; once it
    /// is complete, decides: TURN goes on with the handshake here, HTTPS
    /// is [`ReadOutcome::Https`].
    fn sniff_bytes(&mut self, bytes: &[u8]) -> Result<(), ReadOutcome> {
        let Some(sniff) = self.sniff.as_mut() else {
            return Ok(());
        };
        sniff.raw.extend_from_slice(bytes);
        if sniff.raw.len() > MAX_CLIENT_HELLO {
            return Err(ReadOutcome::Garbage(DropReason::Malformed));
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            match sniff.acceptor.read_tls(&mut rest) {
                Ok(0) | Err(_) => return Err(ReadOutcome::Garbage(DropReason::Malformed)),
                Ok(_) => {}
            }
        }
        let accepted = match sniff.acceptor.accept() {
            Ok(None) => return Ok(()),
            Ok(Some(accepted)) => accepted,
            Err((_, mut alert)) => {
                let _ = alert.write_all(&mut self.socket);
                return Err(ReadOutcome::Garbage(DropReason::Malformed));
            }
        };
        let hello = accepted.client_hello();
        if crate::https::wants_http(hello.alpn(), hello.server_name(), sniff.https.names()) {
            return Err(ReadOutcome::Https);
        }
        sniff.https.kept_for_turn();
        let config = sniff.config.clone();
        self.sniff = None;
        match accepted.into_connection(config) {
            Ok(conn) => {
                self.tls = Some(conn);
                let _ = self.flush();
                Ok(())
            }
            Err((_, mut alert)) => {
                let _ = alert.write_all(&mut self.socket);
                Err(ReadOutcome::Garbage(DropReason::Malformed))
            }
        }
    }

    /// [`Stream::fill`] until the ClientHello of a shared listener decides.
    fn fill_sniff(&mut self) -> Result<bool, ReadOutcome> {
        let mut chunk = [0u8; 4096];
        let n = match self.socket.read(&mut chunk) {
            Ok(0) => return Err(ReadOutcome::Close),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(_) => return Err(ReadOutcome::Close),
        };
        self.sniff_bytes(&chunk[..n])?;
        Ok(true)
    }

    /// The connection comes from a load balancer: its first bytes are a
    /// PROXY protocol v2 header.
    pub(super) fn expect_proxy_header(&mut self) {
        self.proxy = Some(Vec::new());
    }

    /// [`Stream::fill`] until the PROXY header is complete: reads it, takes
    /// the client it names, and passes what followed it on to the stream
    /// (or to TLS).
    fn fill_proxy(&mut self) -> Result<bool, ReadOutcome> {
        use natrix_wire::proxy::{MAX_HEADER, ProxyHeader, parse};
        let Some(head) = self.proxy.as_mut() else {
            return Ok(false);
        };
        let mut chunk = [0u8; 512];
        let room = (MAX_HEADER + chunk.len())
            .saturating_sub(head.len())
            .min(chunk.len());
        match self.socket.read(&mut chunk[..room]) {
            Ok(0) => return Err(ReadOutcome::Close),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(_) => return Err(ReadOutcome::Close),
        }
        let (header, used) = match parse(head) {
            Ok(Some(done)) => done,
            Ok(None) => return Ok(true),
            Err(_) => return Err(ReadOutcome::Garbage(DropReason::Malformed)),
        };
        let rest = head.split_off(used);
        self.proxy = None;
        if let ProxyHeader::Proxied { source, .. } = header {
            self.readdressed = Some(self.client);
            self.client.client = SocketAddr::new(source.ip().to_canonical(), source.port());
        }
        if self.sniff.is_some() {
            self.sniff_bytes(&rest)?;
            return Ok(true);
        }
        match self.tls.as_mut() {
            None => {
                // At most 512 bytes: within a fresh read buffer.
                let end = (self.filled + rest.len()).min(self.read.len());
                let n = end - self.filled;
                self.read[self.filled..end].copy_from_slice(&rest[..n]);
                self.filled = end;
            }
            Some(tls) if !rest.is_empty() => {
                if tls.read_tls(&mut &rest[..]).is_err() || tls.process_new_packets().is_err() {
                    let _ = tls.write_tls(&mut self.socket);
                    return Err(ReadOutcome::Garbage(DropReason::Malformed));
                }
                if tls.wants_write() {
                    let _ = self.flush();
                }
            }
            Some(_) => {}
        }
        Ok(true)
    }

    /// What a successor needs of a connection: the plaintext read but not
    /// yet framed, the plaintext queued but not yet written, and for TLS
    /// the session's traffic secrets and the bytes on either side of them.
    /// `None` when it cannot move: TLS 1.2, a handshake not done, records
    /// rustls still has to write, or secret extraction refused.
    pub(super) fn handoff_parts(&mut self) -> Option<super::handoff::StreamParts> {
        if self.sniff.is_some() {
            // Neither TURN nor HTTPS yet.
            return None;
        }
        let mut unread = self.read[..self.filled].to_vec();
        let tls = match (self.tls.take(), &self.sealed) {
            (None, None) => None,
            (None, Some(sealed)) => {
                let (suite, rx, tx) = sealed.export();
                Some(super::handoff::TlsParts {
                    suite,
                    rx,
                    tx,
                    incoming: sealed.incoming.clone(),
                    outgoing: sealed.outgoing.clone(),
                })
            }
            (Some(mut conn), _) => {
                if conn.is_handshaking()
                    || conn.wants_write()
                    || conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
                {
                    return None;
                }
                // Plaintext rustls decrypted that the loop has not read.
                let mut rest = [0u8; 4096];
                while let Ok(n @ 1..) = conn.reader().read(&mut rest) {
                    unread.extend_from_slice(&rest[..n]);
                }
                let secrets = conn.dangerous_extract_secrets().ok()?;
                let part = |(seq, s): (u64, rustls::ConnectionTrafficSecrets)| {
                    use rustls::ConnectionTrafficSecrets as C;
                    let (suite, key, iv) = match s {
                        C::Aes128Gcm { key, iv } => (super::sealed::Suite::Aes128Gcm, key, iv),
                        C::Aes256Gcm { key, iv } => (super::sealed::Suite::Aes256Gcm, key, iv),
                        C::Chacha20Poly1305 { key, iv } => {
                            (super::sealed::Suite::Chacha20Poly1305, key, iv)
                        }
                        _ => return None,
                    };
                    let iv: [u8; 12] = iv.as_ref().try_into().ok()?;
                    Some((
                        suite,
                        super::sealed::Secret {
                            key: key.as_ref().to_vec(),
                            iv,
                            seq,
                        },
                    ))
                };
                let (suite, rx) = part(secrets.rx)?;
                let (_, tx) = part(secrets.tx)?;
                Some(super::handoff::TlsParts {
                    suite,
                    rx,
                    tx,
                    incoming: Vec::new(),
                    outgoing: Vec::new(),
                })
            }
        };
        Some(super::handoff::StreamParts {
            unread,
            unsent: self.write.clone(),
            tls,
        })
    }

    /// A connection a predecessor handed over with its allocation:
    /// `unread` waits to be framed, `unsent` to be written; a TLS session
    /// goes on with its secrets.
    pub(super) fn adopted(
        socket: mio::net::TcpStream,
        client: ClientSocket,
        parts: super::handoff::StreamParts,
    ) -> Option<Stream> {
        let sealed = match parts.tls {
            Some(t) => {
                let mut sealed = super::sealed::Sealed::new(t.suite, t.rx, t.tx)?;
                sealed.incoming = t.incoming;
                sealed.outgoing = t.outgoing;
                Some(Box::new(sealed))
            }
            None => None,
        };
        let mut read = vec![0; INITIAL_READ.max(parts.unread.len())];
        read[..parts.unread.len()].copy_from_slice(&parts.unread);
        Some(Stream {
            socket,
            client,
            tls: None,
            sealed,
            read,
            filled: parts.unread.len(),
            write: parts.unsent,
            tls_queued: 0,
            want_write: false,
            dirty: false,
            conn: natrix_net::ConnId::next(),
            last_active: std::time::Instant::now(),
            trusted: true,
            proxy: None,
            readdressed: None,
            counted_ip: None,
            sniff: None,
            pipe: None,
        })
    }

    /// The read buffer a drained connection keeps.
    fn resting_read(&self) -> usize {
        if self.trusted {
            INITIAL_READ
        } else {
            UNTRUSTED_READ
        }
    }

    /// Reads available bytes (decrypting TLS) into the read buffer.
    /// `Ok(true)` when something arrived, `Ok(false)` on `WouldBlock`.
    fn fill(&mut self) -> Result<bool, ReadOutcome> {
        if self.filled == self.read.len() {
            // A frame larger than the buffer: grow (frames are capped
            // before this — at MAX_STUN_FRAME without an allocation, else
            // MAX_FRAME — so a full buffer at the cap cannot happen for a
            // well-framed stream).
            let cap = if self.trusted {
                MAX_READ
            } else {
                UNTRUSTED_READ
            };
            if self.read.len() >= cap {
                return Err(ReadOutcome::Garbage(DropReason::Malformed));
            }
            let grown = (self.read.len() * 2).max(INITIAL_READ).min(cap);
            self.read.resize(grown, 0);
        }
        if self.proxy.is_some() {
            return self.fill_proxy();
        }
        if self.sealed.is_some() {
            return self.fill_sealed();
        }
        if self.sniff.is_some() {
            return self.fill_sniff();
        }
        let Some(tls) = self.tls.as_mut() else {
            return match self.socket.read(&mut self.read[self.filled..]) {
                Ok(0) => Err(ReadOutcome::Close),
                Ok(n) => {
                    self.filled += n;
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(_) => Err(ReadOutcome::Close),
            };
        };
        let mut progress = false;
        match tls.read_tls(&mut self.socket) {
            Ok(0) => return Err(ReadOutcome::Close),
            Ok(_) => {
                progress = true;
                if tls.process_new_packets().is_err() {
                    // Let the alert go out, then close.
                    let _ = tls.write_tls(&mut self.socket);
                    return Err(ReadOutcome::Garbage(DropReason::Malformed));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
            Err(_) => return Err(ReadOutcome::Close),
        }
        loop {
            if self.filled == self.read.len() {
                break;
            }
            match tls.reader().read(&mut self.read[self.filled..]) {
                Ok(0) => return Err(ReadOutcome::Close),
                Ok(n) => {
                    self.filled += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(ReadOutcome::Close),
            }
        }
        // Handshake messages the server owes the client.
        if tls.wants_write() {
            let _ = self.flush();
        }
        Ok(progress)
    }

    /// [`Stream::fill`] for a session taken over from a predecessor: reads
    /// records, opens them into the read buffer.
    fn fill_sealed(&mut self) -> Result<bool, ReadOutcome> {
        let Some(sealed) = self.sealed.as_mut() else {
            return Ok(false);
        };
        let mut chunk = vec![0u8; sealed.room().max(1)];
        let progress = match self.socket.read(&mut chunk) {
            Ok(0) => return Err(ReadOutcome::Close),
            Ok(n) => {
                sealed.incoming.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(_) => return Err(ReadOutcome::Close),
        };
        let mut plain = Vec::new();
        let room = MAX_READ.saturating_sub(self.filled);
        match sealed.open(&mut plain, room) {
            super::sealed::Opened::Data => {}
            super::sealed::Opened::Closed => return Err(ReadOutcome::Close),
            super::sealed::Opened::Broken => {
                return Err(ReadOutcome::Garbage(DropReason::Malformed));
            }
        }
        if self.read.len() < self.filled + plain.len() {
            self.read.resize(self.filled + plain.len(), 0);
        }
        self.read[self.filled..self.filled + plain.len()].copy_from_slice(&plain);
        self.filled += plain.len();
        Ok(progress || !plain.is_empty())
    }

    /// A client data connection's bytes (RFC 6062), unframed: what the
    /// read buffer holds, then what the socket has, each chunk handed to
    /// `sink`, which answers whether it takes more. Stops at `WouldBlock`,
    /// EOF, an error, a full sink (the rest waits in the socket: TCP's
    /// window slows the client down), or after [`READS_PER_WAKE`] reads.
    pub(super) fn read_raw(&mut self, mut sink: impl FnMut(&[u8]) -> bool) -> ReadOutcome {
        for _ in 0..READS_PER_WAKE {
            if self.filled > 0 {
                let more = sink(&self.read[..self.filled]);
                self.filled = 0;
                if !more {
                    return ReadOutcome::Open;
                }
            }
            match self.fill() {
                Ok(true) => self.last_active = std::time::Instant::now(),
                Ok(false) => return ReadOutcome::Open,
                Err(outcome) => return outcome,
            }
        }
        if self.filled > 0 {
            let more = sink(&self.read[..self.filled]);
            self.filled = 0;
            if !more {
                return ReadOutcome::Open;
            }
        }
        ReadOutcome::More
    }

    /// Makes this connection the client data connection of peer data
    /// connection `connection`: unframed from now on, with a data
    /// connection's buffers.
    pub(super) fn become_pipe(&mut self, connection: crate::core::ConnectionId) {
        self.pipe = Some(connection);
        self.trusted = true;
        if self.read.len() < PIPE_READ {
            self.read.resize(PIPE_READ, 0);
        }
    }

    /// Bytes queued for the client and not yet written.
    pub(super) fn pending_len(&self) -> usize {
        self.write.len() + self.tls_queued + self.sealed.as_ref().map_or(0, |s| s.outgoing.len())
    }

    /// Reads what is available and hands each complete frame to `frame`,
    /// which answers whether framing goes on (after a ConnectionBind the
    /// rest is a data connection's bytes, left in the read buffer).
    /// Stops at `WouldBlock`, EOF, an error, a frame that cannot be framed
    /// (not STUN, not ChannelData, over the cap), or after
    /// [`READS_PER_WAKE`] reads.
    pub(super) fn read_frames(
        &mut self,
        mut frame: impl FnMut(&[u8], &mut Stream) -> bool,
    ) -> ReadOutcome {
        for _ in 0..READS_PER_WAKE {
            match self.fill() {
                Ok(true) => self.last_active = std::time::Instant::now(),
                Ok(false) => return ReadOutcome::Open,
                Err(outcome) => return outcome,
            }
            let mut at = 0;
            loop {
                let len = match frame_len(&self.read[at..self.filled]) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(_) => return ReadOutcome::Garbage(DropReason::NotTurn),
                };
                let stun = self.read[at] < 0x40;
                let small = stun || !self.trusted;
                if len > MAX_FRAME || (small && len > MAX_STUN_FRAME) {
                    return ReadOutcome::Garbage(DropReason::Malformed);
                }
                if at + len > self.filled {
                    break;
                }
                // The frame is copied out of the read buffer so `frame` may
                // queue writes on this stream; frames are small.
                let mut scratch = [0u8; 2048];
                let more = if len <= scratch.len() {
                    scratch[..len].copy_from_slice(&self.read[at..at + len]);
                    frame(&scratch[..len], self)
                } else {
                    let big = self.read[at..at + len].to_vec();
                    frame(&big, self)
                };
                at += len;
                if !more {
                    self.read.copy_within(at..self.filled, 0);
                    self.filled -= at;
                    return ReadOutcome::Open;
                }
            }
            self.read.copy_within(at..self.filled, 0);
            self.filled -= at;
            let resting = self.resting_read();
            if self.filled == 0 && self.read.len() > resting {
                // A large frame passed: give the memory back.
                self.read = vec![0; resting];
            }
        }
        ReadOutcome::More
    }

    /// Queues `bytes` (one whole frame) for the next [`Stream::flush`], so
    /// that the frames of one batch leave in one write (and, over TLS, in
    /// one record). Returns false when the client is too slow and the
    /// frame was dropped whole (never half a frame: that would break the
    /// framing).
    pub(super) fn queue(&mut self, bytes: &[u8]) -> bool {
        if let Some(tls) = &self.tls
            && !tls.wants_write()
        {
            self.tls_queued = 0;
        }
        let cap = if self.trusted {
            MAX_PENDING_WRITE
        } else {
            MAX_UNTRUSTED_PENDING
        };
        let sealed = self.sealed.as_ref().map_or(0, |s| s.outgoing.len());
        if self.tls_queued + sealed + self.write.len() + bytes.len() > cap {
            return false;
        }
        self.write.extend_from_slice(bytes);
        true
    }

    /// Writes pending bytes; true when everything went out.
    pub(super) fn flush(&mut self) -> io::Result<bool> {
        if let Some(sealed) = self.sealed.as_mut() {
            if !self.write.is_empty() {
                sealed.seal(&self.write);
                self.write.clear();
            }
            return drain_into(&mut self.socket, &mut sealed.outgoing);
        }
        if let Some(tls) = self.tls.as_mut() {
            // rustls buffers at most 64 KiB of plaintext: hand it what it
            // takes, write its records out, and keep the rest queued here
            // (under MAX_PENDING_WRITE) until the socket drains. A burst
            // larger than rustls's buffer is neither an error nor lost.
            loop {
                let mut handed = 0;
                if !self.write.is_empty() {
                    handed = tls.writer().write(&self.write)?;
                    self.tls_queued += handed;
                    self.write.drain(..handed);
                }
                let mut wrote = false;
                while tls.wants_write() {
                    match tls.write_tls(&mut self.socket) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(_) => wrote = true,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if self.write.is_empty() {
                    break;
                }
                if handed == 0 && !wrote {
                    // rustls takes nothing more yet (a handshake still
                    // running): the rest waits for the next flush.
                    return Ok(false);
                }
            }
            if self.write.capacity() > KEPT_WRITE {
                self.write.shrink_to(KEPT_WRITE);
            }
            self.tls_queued = 0;
            return Ok(true);
        }
        if !drain_into(&mut self.socket, &mut self.write)? {
            return Ok(false);
        }
        if self.write.capacity() > KEPT_WRITE {
            // A burst for a slow client has drained: give the memory back.
            self.write.shrink_to(KEPT_WRITE);
        }
        Ok(true)
    }

    /// True while a TLS handshake is under way (its steps cost key
    /// exchanges and signatures: the loop bounds them per turn).
    pub(super) fn is_handshaking(&self) -> bool {
        self.sniff.is_some() || self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// True when bytes wait for the socket.
    pub(super) fn has_pending(&self) -> bool {
        !self.write.is_empty()
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
            || self.sealed.as_ref().is_some_and(|s| !s.outgoing.is_empty())
    }
}

/// Writes `buf` to `socket` until it is empty (true) or the socket would
/// block (false, the rest stays queued); what was written leaves `buf`.
fn drain_into(socket: &mut impl Write, buf: &mut Vec<u8>) -> io::Result<bool> {
    while !buf.is_empty() {
        match socket.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

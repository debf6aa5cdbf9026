//! The server side of a WebSocket (RFC 6455), lean enough to hold tens of
//! thousands: a held socket owns its TCP stream, no buffer while it is
//! idle (a read goes through the stack and only an unfinished frame is
//! kept), and no task of its own besides the push loop that owns it.
//! Client frames must be masked, carry no extension bits and stay under a
//! size limit; text must be UTF-8; control frames are short and whole.
//! Faults name the close code RFC 6455 gives them.

use std::io;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// RFC 6455 section 1.3's key suffix.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// One read off the socket (on the stack).
const READ_CHUNK: usize = 2048;
/// How long a write may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing socket waits for the client's side of the close.
const LINGER: Duration = Duration::from_secs(1);

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub(crate) fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    Text(String),
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The client closes (with its code, if it sent one).
    Close(Option<u16>),
}

/// Why the connection cannot go on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The peer went away (end of stream or a socket error).
    Gone,
    /// A frame RFC 6455 forbids (close code 1002).
    Protocol(&'static str),
    /// Text that is not UTF-8 (1007).
    NotUtf8,
    /// A message over the limit (1009).
    TooBig,
}

impl Fault {
    /// The close code to send, if the connection is still there.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self {
            Fault::Gone => None,
            Fault::Protocol(_) => Some(1002),
            Fault::NotUtf8 => Some(1007),
            Fault::TooBig => Some(1009),
        }
    }
}

/// The server end of one WebSocket.
#[derive(Debug)]
pub(crate) struct WebSocket {
    io: TcpStream,
    /// Bytes of a frame not complete yet (empty, unallocated, when idle).
    partial: Vec<u8>,
    /// A fragmented message so far, and whether it is text.
    message: Option<(bool, Vec<u8>)>,
    max_message: usize,
}

impl WebSocket {
    /// Takes over `io` after the handshake; `buffered` is what was read past
    /// the request head.
    pub(crate) fn new(io: TcpStream, buffered: &[u8], max_message: usize) -> WebSocket {
        WebSocket {
            io,
            partial: buffered.to_vec(),
            message: None,
            max_message,
        }
    }

    /// Waits until the client sent something (cancel-safe).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.io.readable().await
    }

    /// Reads once (without waiting) and appends the client's complete
    /// messages to `out`. Call again after [`WebSocket::readable`], and
    /// first after the handshake when a frame may already be buffered.
    pub(crate) fn read_ready(&mut self, out: &mut Vec<Incoming>) -> Result<(), Fault> {
        let mut chunk = [0u8; READ_CHUNK];
        match self.io.try_read(&mut chunk) {
            Ok(0) => return Err(Fault::Gone),
            Ok(n) => self.partial.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Fault::Gone),
        }
        self.parse(out)
    }

    /// Parses the complete frames held.
    fn parse(&mut self, out: &mut Vec<Incoming>) -> Result<(), Fault> {
        let mut at = 0;
        while let Some((frame, used)) = frame(&self.partial[at..], self.max_message)? {
            at += used;
            if let Some(m) = self.assemble(frame)? {
                out.push(m);
            }
        }
        self.partial.drain(..at);
        if self.partial.is_empty() {
            // Idle sockets keep no buffer.
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// Joins fragments into messages.
    fn assemble(&mut self, f: Frame) -> Result<Option<Incoming>, Fault> {
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|_| Fault::NotUtf8);
        Ok(match f.opcode {
            0x0 => {
                let Some((is_text, mut so_far)) = self.message.take() else {
                    return Err(Fault::Protocol("continuation without a message"));
                };
                if so_far.len() + f.payload.len() > self.max_message {
                    return Err(Fault::TooBig);
                }
                so_far.extend_from_slice(&f.payload);
                if !f.fin {
                    self.message = Some((is_text, so_far));
                    return Ok(None);
                }
                if is_text {
                    Some(Incoming::Text(text(so_far)?))
                } else {
                    Some(Incoming::Binary)
                }
            }
            0x1 | 0x2 => {
                if self.message.is_some() {
                    return Err(Fault::Protocol("a new message inside a fragmented one"));
                }
                let is_text = f.opcode == 0x1;
                if !f.fin {
                    self.message = Some((is_text, f.payload));
                    return Ok(None);
                }
                if is_text {
                    Some(Incoming::Text(text(f.payload)?))
                } else {
                    Some(Incoming::Binary)
                }
            }
            0x8 => {
                let code = match f.payload.len() {
                    0 => None,
                    1 => return Err(Fault::Protocol("a one-byte close payload")),
                    _ => Some(u16::from_be_bytes([f.payload[0], f.payload[1]])),
                };
                Some(Incoming::Close(code))
            }
            0x9 => Some(Incoming::Ping(f.payload)),
            0xA => Some(Incoming::Pong),
            _ => return Err(Fault::Protocol("unknown opcode")),
        })
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 10);
        frame.push(0x80 | opcode);
        match payload.len() {
            n @ 0..=125 => frame.push(n as u8),
            n @ 126..=0xFFFF => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        tokio::time::timeout(WRITE_TIMEOUT, self.io.write_all(&frame))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client does not read"))?
    }

    /// Sends a text message.
    pub(crate) async fn text(&mut self, text: &str) -> io::Result<()> {
        self.send(0x1, text.as_bytes()).await
    }

    /// Sends a ping.
    pub(crate) async fn ping(&mut self) -> io::Result<()> {
        self.send(0x9, b"").await
    }

    /// Answers a ping.
    pub(crate) async fn pong(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(0xA, payload).await
    }

    /// Closes with `code` and `reason` (or without a code), then waits a
    /// moment for the client to close its side, so the close frame is not
    /// lost to a reset.
    pub(crate) async fn close(mut self, code: Option<u16>, reason: &str) {
        let mut payload = Vec::new();
        if let Some(code) = code {
            payload.extend_from_slice(&code.to_be_bytes());
            payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
        }
        if self.send(0x8, &payload).await.is_err() {
            return;
        }
        let _ = self.io.shutdown().await;
        let linger = async {
            let mut sink = [0u8; 512];
            loop {
                if self.io.readable().await.is_err() {
                    return;
                }
                match self.io.try_read(&mut sink) {
                    Ok(0) => return,
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, linger).await;
    }
}

/// One client frame.
#[derive(Debug)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Parses one client frame off the front of `buf`: the frame and the bytes
/// it took, `None` when it is not all there yet.
fn frame(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, Fault> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(Fault::Protocol("reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(Fault::Protocol("an unmasked client frame"));
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    let (len, head) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                (u64::from_be_bytes(n), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode >= 0x8 && (len > 125 || !fin) {
        return Err(Fault::Protocol("a long or fragmented control frame"));
    }
    let len = usize::try_from(len).map_err(|_| Fault::TooBig)?;
    if len > max {
        return Err(Fault::TooBig);
    }
    let Some(mask) = buf.get(head..head + 4) else {
        return Ok(None);
    };
    let start = head + 4;
    let Some(body) = buf.get(start..start + len) else {
        return Ok(None);
    };
    let payload = body
        .iter()
        .zip(mask.iter().cycle())
        .map(|(b, m)| b ^ m)
        .collect();
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        start + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as tungstenite (or a browser) would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        f
    }

    async fn socket_with(bytes: &[u8]) -> (WebSocket, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (WebSocket::new(server, bytes, 4096), client)
    }

    async fn parse_all(bytes: &[u8]) -> Result<Vec<Incoming>, Fault> {
        let (mut ws, _client) = socket_with(bytes).await;
        let mut out = Vec::new();
        ws.parse(&mut out)?;
        Ok(out)
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn messages_fragments_and_control_frames_parse() {
        let mut bytes = client_frame(true, 0x1, b"{\"ack\":\"1\"}");
        bytes.extend(client_frame(false, 0x1, b"hel"));
        bytes.extend(client_frame(true, 0x9, b"p")); // a ping between fragments
        bytes.extend(client_frame(true, 0x0, b"lo"));
        bytes.extend(client_frame(true, 0x2, &[0u8; 300]));
        bytes.extend(client_frame(true, 0x8, &1000u16.to_be_bytes()));
        let got = parse_all(&bytes).await.unwrap();
        assert_eq!(
            got,
            [
                Incoming::Text("{\"ack\":\"1\"}".into()),
                Incoming::Ping(b"p".to_vec()),
                Incoming::Text("hello".into()),
                Incoming::Binary,
                Incoming::Close(Some(1000)),
            ]
        );
    }

    #[tokio::test]
    async fn a_frame_split_across_reads_waits_for_its_end() {
        let bytes = client_frame(true, 0x1, &[b'a'; 200]);
        let (mut ws, _client) = socket_with(&bytes[..3]).await;
        let mut out = Vec::new();
        ws.parse(&mut out).unwrap();
        assert!(out.is_empty());
        ws.partial.extend_from_slice(&bytes[3..]);
        ws.parse(&mut out).unwrap();
        assert_eq!(out, [Incoming::Text("a".repeat(200))]);
        assert_eq!(ws.partial.capacity(), 0, "an idle socket keeps no buffer");
    }

    #[tokio::test]
    async fn forbidden_frames_are_faults_with_their_close_codes() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let mut rsv = client_frame(true, 0x1, b"x");
        rsv[0] |= 0x40;
        let mut big = client_frame(true, 0x1, &[b'a'; 5000]);
        big.truncate(20); // the header alone says it is too big
        let long_ping = client_frame(true, 0x9, &[0u8; 126]);
        let split_ping = client_frame(false, 0x9, b"x");
        let stray = client_frame(true, 0x0, b"x");
        let bad_utf8 = client_frame(true, 0x1, &[0xff, 0xfe]);
        let mut nested = client_frame(false, 0x1, b"a");
        nested.extend(client_frame(true, 0x1, b"b"));
        let mut too_long = client_frame(false, 0x1, &[b'a'; 3000]);
        too_long.extend(client_frame(true, 0x0, &[b'a'; 3000]));
        let opcode = client_frame(true, 0x3, b"");
        for (bytes, code) in [
            (unmasked, 1002),
            (rsv, 1002),
            (big, 1009),
            (long_ping, 1002),
            (split_ping, 1002),
            (stray, 1002),
            (bad_utf8, 1007),
            (nested, 1002),
            (too_long, 1009),
            (opcode, 1002),
        ] {
            let fault = parse_all(&bytes).await.unwrap_err();
            assert_eq!(fault.close_code(), Some(code), "{fault:?}");
        }
    }
}

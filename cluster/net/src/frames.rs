//! Blocking reads of STUN/TURN frames from a byte stream (TCP), for the
//! clients: the discovery/exchange client and the load tester.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// True for the errors a read timeout produces.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Bytes read from a stream but not yet cut into frames.
#[derive(Debug, Default)]
pub struct StreamFrames {
    pending: Vec<u8>,
}

impl StreamFrames {
    /// The next whole frame (STUN message or padded ChannelData) from
    /// `stream`, waiting at most `wait`; `None` when none is complete in
    /// time. A stream closed by the peer is an error.
    pub fn next(
        &mut self,
        stream: &mut TcpStream,
        wait: Duration,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(len)) = natrix_wire::frame_len(&self.pending)
                && self.pending.len() >= len
            {
                let rest = self.pending.split_off(len);
                return Ok(Some(std::mem::replace(&mut self.pending, rest)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            stream.set_read_timeout(Some(left))?;
            let mut buf = [0u8; 4096];
            match stream.read(&mut buf) {
                Ok(0) => return Err(std::io::Error::other("the server closed the connection")),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

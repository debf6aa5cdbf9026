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

/// A byte stream whose reads can be given a deadline: TCP, or TLS over TCP.
pub trait TimedRead: Read {
    /// Sets how long one read may block (`None`: for ever).
    fn set_read_timeout(&self, wait: Option<Duration>) -> std::io::Result<()>;
}

impl TimedRead for TcpStream {
    fn set_read_timeout(&self, wait: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, wait)
    }
}

/// Bytes read from a stream but not yet cut into frames.
#[derive(Debug, Default)]
pub struct StreamFrames {
    pending: Vec<u8>,
    /// Where the unread part of `pending` starts (compacted before reads).
    start: usize,
}

impl StreamFrames {
    /// The next whole frame (STUN message or padded ChannelData) from
    /// `stream`, waiting at most `wait`; `None` when none is complete in
    /// time. A stream closed by the peer is an error.
    pub fn next<S: TimedRead>(
        &mut self,
        stream: &mut S,
        wait: Duration,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(frame) = self.pop() {
                return Ok(Some(frame));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            stream.set_read_timeout(Some(left))?;
            self.pending.drain(..self.start);
            self.start = 0;
            let mut buf = [0u8; 16384];
            match stream.read(&mut buf) {
                Ok(0) => return Err(std::io::Error::other("the server closed the connection")),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// A whole frame already read, without reading more.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let unread = &self.pending[self.start..];
        match natrix_wire::frame_len(unread) {
            Ok(Some(len)) if unread.len() >= len => {
                let frame = unread[..len].to_vec();
                self.start += len;
                if self.start == self.pending.len() {
                    self.pending.clear();
                    self.start = 0;
                }
                Some(frame)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn frames_are_cut_across_reads_and_several_per_read() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let mut tx = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut rx, _) = listener.accept().expect("accept");
        // ChannelData on 0x4000: 4-byte header + 5 bytes, padded to 12.
        let frame = |b: u8| [0x40, 0x00, 0x00, 0x05, b, b, b, b, b, 0, 0, 0];
        let mut frames = StreamFrames::default();
        let wait = Duration::from_secs(2);
        // Half a frame: nothing yet.
        tx.write_all(&frame(1)[..6]).expect("write");
        assert_eq!(
            frames
                .next(&mut rx, Duration::from_millis(50))
                .expect("read"),
            None
        );
        // The rest, then two more in one write.
        let mut rest = frame(1)[6..].to_vec();
        rest.extend_from_slice(&frame(2));
        rest.extend_from_slice(&frame(3));
        tx.write_all(&rest).expect("write");
        assert_eq!(
            frames.next(&mut rx, wait).expect("read"),
            Some(frame(1).to_vec())
        );
        assert_eq!(
            frames.next(&mut rx, wait).expect("read"),
            Some(frame(2).to_vec())
        );
        assert_eq!(frames.pop(), Some(frame(3).to_vec()));
        assert_eq!(frames.pop(), None);
        drop(tx);
        assert!(
            frames.next(&mut rx, wait).is_err(),
            "a closed stream is an error"
        );
    }
}

//! TLS 1.3 records (RFC 8446 §5) for a connection whose handshake ran in a
//! predecessor process: its traffic keys, IVs and sequence numbers come
//! with the hand-off (rustls extracts them), and this side protects and
//! opens application data with them. Anything but application data (an
//! alert, a KeyUpdate, a ticket) ends the connection, as does a record that
//! does not open; a peer's TLS stack sees an ordinary connection.

use ring::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};

/// Largest TLS plaintext in one record.
const MAX_PLAINTEXT: usize = 16_384;
/// Largest protected record body (plaintext, content type, padding, tag).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const APPLICATION_DATA: u8 = 23;
const CHANGE_CIPHER_SPEC: u8 = 20;

/// The AEAD a session negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static Algorithm {
        match self {
            Suite::Aes128Gcm => &AES_128_GCM,
            Suite::Aes256Gcm => &AES_256_GCM,
            Suite::Chacha20Poly1305 => &CHACHA20_POLY1305,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "aes128gcm",
            Suite::Aes256Gcm => "aes256gcm",
            Suite::Chacha20Poly1305 => "chacha20poly1305",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Suite> {
        [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// One direction's traffic secret, as it moves between processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Secret {
    pub(crate) key: Vec<u8>,
    pub(crate) iv: [u8; 12],
    pub(crate) seq: u64,
}

/// One direction, ready to use.
struct Direction {
    key: LessSafeKey,
    secret: Secret,
}

impl Direction {
    fn new(suite: Suite, secret: Secret) -> Option<Direction> {
        let key = UnboundKey::new(suite.algorithm(), &secret.key).ok()?;
        Some(Direction {
            key: LessSafeKey::new(key),
            secret,
        })
    }

    /// The per-record nonce (RFC 8446 §5.3), then the next sequence number.
    fn nonce(&mut self) -> Nonce {
        let mut n = self.secret.iv;
        for (b, s) in n[4..].iter_mut().zip(self.secret.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.secret.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// What opening the buffered records produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Plaintext appended (maybe none yet: a record is incomplete).
    Data,
    /// The peer closed (an alert) or sent what this side cannot follow.
    Closed,
    /// A record that does not open or parse.
    Broken,
}

/// A TLS 1.3 session taken over from a predecessor.
pub(crate) struct Sealed {
    suite: Suite,
    rx: Direction,
    tx: Direction,
    /// Received bytes not yet opened (at most one record and a header).
    pub(crate) incoming: Vec<u8>,
    /// Protected records not yet written.
    pub(crate) outgoing: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl Sealed {
    pub(crate) fn new(suite: Suite, rx: Secret, tx: Secret) -> Option<Sealed> {
        Some(Sealed {
            suite,
            rx: Direction::new(suite, rx)?,
            tx: Direction::new(suite, tx)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
        })
    }

    /// The session's state, to move it again.
    pub(crate) fn export(&self) -> (Suite, Secret, Secret) {
        (self.suite, self.rx.secret.clone(), self.tx.secret.clone())
    }

    /// Room in [`Sealed::incoming`] for one more read.
    pub(crate) fn room(&self) -> usize {
        (HEADER + MAX_CIPHERTEXT).saturating_sub(self.incoming.len())
    }

    /// Opens the complete records in `incoming`, appending their plaintext
    /// to `out` while it has room for a whole record's.
    pub(crate) fn open(&mut self, out: &mut Vec<u8>, room: usize) -> Opened {
        let mut at = 0;
        let result = loop {
            let Some(header) = self.incoming.get(at..at + HEADER) else {
                break Opened::Data;
            };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > MAX_CIPHERTEXT || header[1] != 3 {
                break Opened::Broken;
            }
            let Some(body) = self.incoming.get(at + HEADER..at + HEADER + len) else {
                break Opened::Data;
            };
            match header[0] {
                // A middlebox-compatibility record, unprotected: skip it.
                CHANGE_CIPHER_SPEC => {
                    at += HEADER + len;
                    continue;
                }
                APPLICATION_DATA => {}
                _ => break Opened::Broken,
            }
            if out.len() + len > room {
                break Opened::Data;
            }
            let mut aad = [0u8; HEADER];
            aad.copy_from_slice(header);
            let mut record = body.to_vec();
            let nonce = self.rx.nonce();
            let Ok(plain) = self
                .rx
                .key
                .open_in_place(nonce, Aad::from(aad), &mut record)
            else {
                break Opened::Broken;
            };
            // The content type is the last non-zero byte (RFC 8446 §5.4).
            let Some(end) = plain.iter().rposition(|b| *b != 0) else {
                break Opened::Broken;
            };
            at += HEADER + len;
            if plain[end] != APPLICATION_DATA {
                break Opened::Closed;
            }
            out.extend_from_slice(&plain[..end]);
        };
        self.incoming.drain(..at);
        result
    }

    /// Protects `plain` as application-data records appended to `outgoing`.
    pub(crate) fn seal(&mut self, plain: &[u8]) {
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            let mut record = Vec::with_capacity(chunk.len() + 1 + 16);
            record.extend_from_slice(chunk);
            record.push(APPLICATION_DATA);
            let len = record.len() + self.tx.key.algorithm().tag_len();
            let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, (len & 0xff) as u8];
            let nonce = self.tx.nonce();
            if self
                .tx
                .key
                .seal_in_place_append_tag(nonce, Aad::from(header), &mut record)
                .is_err()
            {
                return;
            }
            self.outgoing.extend_from_slice(&header);
            self.outgoing.extend_from_slice(&record);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secret(fill: u8, seq: u64) -> Secret {
        Secret {
            key: vec![fill; 16],
            iv: [fill ^ 0x5a; 12],
            seq,
        }
    }

    #[test]
    fn records_sealed_by_one_side_open_on_the_other_in_order() {
        let (a_to_b, b_to_a) = (secret(1, 7), secret(2, 0));
        let mut a = Sealed::new(Suite::Aes128Gcm, b_to_a.clone(), a_to_b.clone()).unwrap();
        let mut b = Sealed::new(Suite::Aes128Gcm, a_to_b, b_to_a).unwrap();
        let big = vec![9u8; 20_000];
        a.seal(b"hello");
        a.seal(&big);
        // Arrives in pieces.
        let wire = std::mem::take(&mut a.outgoing);
        let mut plain = Vec::new();
        for piece in wire.chunks(1000) {
            b.incoming.extend_from_slice(piece);
            assert_eq!(b.open(&mut plain, 1 << 20), Opened::Data);
        }
        assert_eq!(plain.len(), 5 + 20_000);
        assert_eq!(&plain[..5], b"hello");
        assert!(b.incoming.is_empty());
        // A flipped bit does not open.
        a.seal(b"x");
        let mut wire = std::mem::take(&mut a.outgoing);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        b.incoming.extend_from_slice(&wire);
        assert_eq!(b.open(&mut plain, 1 << 20), Opened::Broken);
    }
}

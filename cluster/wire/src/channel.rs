//! ChannelData messages (RFC 8656 §12.4) and framing of STUN/ChannelData over
//! streams (RFC 8656 §12.5, RFC 8489 §6.2.2) and datagrams (RFC 7983 §7).

use crate::error::{DecodeError, EncodeError};
use crate::types::HEADER_LEN;

/// A TURN channel number. RFC 8656 §12 allows 0x4000 through 0x4FFF for
/// ChannelBind; RFC 5766 allowed up to 0x7FFE, so [`ChannelNumber::new`]
/// accepts the RFC 8656 range and [`ChannelNumber::new_rfc5766`] the older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// Lowest valid channel number (RFC 8656 §12).
    pub const MIN: u16 = 0x4000;
    /// Highest channel number a client may bind (RFC 8656 §12).
    pub const MAX: u16 = 0x4FFF;
    /// Highest channel number of RFC 5766 §11.
    pub const MAX_RFC5766: u16 = 0x7FFE;

    /// A channel number in the RFC 8656 range.
    pub const fn new(n: u16) -> Option<ChannelNumber> {
        if n >= Self::MIN && n <= Self::MAX {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }

    /// A channel number in the wider RFC 5766 range.
    pub const fn new_rfc5766(n: u16) -> Option<ChannelNumber> {
        if n >= Self::MIN && n <= Self::MAX_RFC5766 {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }

    /// The number.
    pub const fn value(self) -> u16 {
        self.0
    }
}

/// A ChannelData message: 4-byte header (channel, length) and application
/// data (RFC 8656 §12.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel (0x4000..=0x7FFF on the wire; binding checks the range).
    pub channel: u16,
    /// The application data, without padding.
    pub payload: &'a [u8],
}

/// ChannelData header size.
const CHANNEL_HEADER_LEN: usize = 4;

impl<'a> ChannelData<'a> {
    /// Decodes a ChannelData message. Bytes past the declared length are
    /// padding and ignored (over UDP padding is optional, RFC 8656 §12.5); a
    /// datagram shorter than the declared length is an error.
    pub fn parse(buf: &'a [u8]) -> Result<ChannelData<'a>, DecodeError> {
        let head = buf
            .get(..CHANNEL_HEADER_LEN)
            .ok_or(DecodeError::Truncated {
                needed: CHANNEL_HEADER_LEN,
                have: buf.len(),
            })?;
        let channel = u16::from_be_bytes([head[0], head[1]]);
        if !(0x4000..=0x7FFF).contains(&channel) {
            return Err(DecodeError::BadChannelNumber(channel));
        }
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let payload = buf
            .get(CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + len)
            .ok_or(DecodeError::Truncated {
                needed: CHANNEL_HEADER_LEN + len,
                have: buf.len(),
            })?;
        Ok(ChannelData { channel, payload })
    }

    /// Bytes a message with `payload_len` bytes of data takes; `padded` rounds
    /// up to a multiple of four as streams require (RFC 8656 §12.5).
    pub const fn encoded_len(payload_len: usize, padded: bool) -> usize {
        let n = CHANNEL_HEADER_LEN + payload_len;
        if padded { (n + 3) & !3 } else { n }
    }

    /// Writes the 4-byte header for `payload_len` bytes of data into `dst`;
    /// the caller places the data right after (this is how a relay builds
    /// ChannelData around data received in place, without a copy).
    pub fn write_header(
        dst: &mut [u8],
        channel: ChannelNumber,
        payload_len: usize,
    ) -> Result<(), EncodeError> {
        let len = u16::try_from(payload_len).map_err(|_| EncodeError::TooLong)?;
        let head = dst
            .get_mut(..CHANNEL_HEADER_LEN)
            .ok_or(EncodeError::BufferTooSmall)?;
        head[0..2].copy_from_slice(&channel.value().to_be_bytes());
        head[2..4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Writes a complete message and returns its length (padded with zeros
    /// when `padded`).
    pub fn encode(
        dst: &mut [u8],
        channel: ChannelNumber,
        payload: &[u8],
        padded: bool,
    ) -> Result<usize, EncodeError> {
        let total = Self::encoded_len(payload.len(), padded);
        let out = dst.get_mut(..total).ok_or(EncodeError::BufferTooSmall)?;
        Self::write_header(out, channel, payload.len())?;
        out[CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + payload.len()].copy_from_slice(payload);
        out[CHANNEL_HEADER_LEN + payload.len()..].fill(0);
        Ok(total)
    }
}

/// What a packet's first byte says it is (RFC 7983 §7 demultiplexing, with
/// TURN's ChannelData range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A STUN message (first byte 0..=3).
    Stun,
    /// A ChannelData message (first byte 0x40..=0x7F).
    ChannelData,
    /// Anything else (DTLS, RTP, noise).
    Other,
}

/// Classifies a datagram by its first byte.
pub fn demux(packet: &[u8]) -> Frame {
    match packet.first() {
        Some(0..=3) => Frame::Stun,
        Some(0x40..=0x7F) => Frame::ChannelData,
        _ => Frame::Other,
    }
}

/// The length of the next frame in a byte stream (STUN or ChannelData over
/// TCP/TLS), given at least its first four bytes. ChannelData frames include
/// their padding to a multiple of four (RFC 8656 §12.5). `Ok(None)` means
/// fewer than four bytes are buffered.
pub fn frame_len(head: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(h) = head.get(..4) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    match demux(h) {
        Frame::Stun => {
            if len % 4 != 0 {
                return Err(DecodeError::UnalignedLength(len));
            }
            Ok(Some(HEADER_LEN + len))
        }
        Frame::ChannelData => Ok(Some(ChannelData::encoded_len(len, true))),
        Frame::Other => Err(DecodeError::NotStun),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_numbers_follow_rfc8656_range() {
        assert!(ChannelNumber::new(0x3FFF).is_none());
        assert!(ChannelNumber::new(0x4000).is_some());
        assert!(ChannelNumber::new(0x4FFF).is_some());
        assert!(ChannelNumber::new(0x5000).is_none());
        assert!(ChannelNumber::new_rfc5766(0x7FFE).is_some());
        assert!(ChannelNumber::new_rfc5766(0x7FFF).is_none());
    }

    #[test]
    fn stream_frames_are_padded_and_datagrams_need_not_be() {
        let ch = ChannelNumber::new(0x4001).unwrap();
        let mut buf = [0xAAu8; 16];
        let n = ChannelData::encode(&mut buf, ch, b"hello", true).unwrap();
        assert_eq!(n, 12);
        assert_eq!(&buf[..12], b"\x40\x01\x00\x05hello\0\0\0");
        assert_eq!(frame_len(&buf).unwrap(), Some(12));
        let n = ChannelData::encode(&mut buf, ch, b"hello", false).unwrap();
        assert_eq!(n, 9);
        let cd = ChannelData::parse(&buf[..9]).unwrap();
        assert_eq!((cd.channel, cd.payload), (0x4001, &b"hello"[..]));
        // Over UDP the datagram may carry the padding too.
        let cd = ChannelData::parse(&buf[..12]).unwrap();
        assert_eq!(cd.payload, b"hello");
        assert!(matches!(
            ChannelData::parse(&buf[..8]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn frame_len_needs_four_bytes_and_rejects_other_protocols() {
        assert_eq!(frame_len(&[0, 1, 0]).unwrap(), None);
        assert_eq!(frame_len(&[0, 1, 0, 8]).unwrap(), Some(28));
        assert!(frame_len(&[0, 1, 0, 7]).is_err());
        assert!(frame_len(&[0x16, 0xfe, 0xfd, 0]).is_err());
    }
}

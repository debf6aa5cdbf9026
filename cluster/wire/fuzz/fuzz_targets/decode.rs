//! Feeds arbitrary bytes to every decoder a server runs on untrusted input:
//! datagram demux, stream framing, STUN parse, every attribute decoder,
//! integrity and fingerprint checks, ChannelData.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natrix_wire::{Attribute, ChannelData, IntegrityKey, Message, demux, frame_len};

fuzz_target!(|data: &[u8]| {
    let _ = demux(data);
    if let Ok(Some(n)) = frame_len(data) {
        assert!(n >= 4);
    }
    let _ = ChannelData::parse(data);
    if let Ok(msg) = Message::parse(data) {
        let tid = msg.transaction_id();
        for a in msg.attributes() {
            let _ = Attribute::decode(a.ty, a.value, &tid);
        }
        let key = IntegrityKey::new(b"fuzz");
        let _ = msg.verify_fingerprint();
        let _ = msg.verify_integrity(&key);
        let _ = msg.verify_integrity_sha256(&key);
        let _ = msg.unknown_required(|t| t.is_known()).count();
    }
});

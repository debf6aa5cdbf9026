//! Feeds arbitrary bytes to every parser CDX runs on untrusted input: the
//! Binding responder (plain and on an RFC 5780 grid), the exchange's
//! client-message parser and its entry codec, sibling hand-offs, and the
//! two client state machines (discovery, exchange) a hostile server could
//! answer. Nothing may panic; an answer must fit the buffer it was written
//! into.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natrix_cdx_proto::fuzzing::exercise;

fuzz_target!(|data: &[u8]| {
    exercise(data, std::time::Instant::now());
});

//! The TURN relay role (RFC 8656, compatible with RFC 5766 clients).
//!
//! The protocol lives in [`core`]: a sans-IO state machine that owns no
//! socket, reads no clock and spawns nothing. Its inputs are a packet, where
//! it came from and `now`; its outputs are the bytes to answer, a forwarding
//! decision that points into the input buffer (no copy, no allocation), and
//! commands for the shell (close a relay socket).
//! The I/O shell that drives it on real sockets lands next (issue 3).

pub mod core;

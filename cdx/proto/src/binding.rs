//! Sans-IO Binding responder (RFC 8489 §6.3, RFC 3489 compatibility).

use std::net::{IpAddr, SocketAddr};

use natrix_wire::{
    Attribute, AttributeType, ChangeRequest, Class, Encoder, ErrorCode, Frame, Message,
    MessageType, Method, UnknownAttributes, demux,
};

pub use natrix_model::Transport;

/// Why a packet got no answer. Every variant is a value of the `reason` label
/// of `cdx_packets_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not STUN at all: another protocol, noise, or ChannelData on a port
    /// without the relay role.
    NotStun,
    /// STUN-shaped but invalid: bad lengths, overrunning or malformed
    /// attributes.
    Malformed,
    /// FINGERPRINT present and wrong (RFC 8489 §7.3: discard).
    BadFingerprint,
    /// A response or error response: a server has nothing to answer.
    UnexpectedClass,
    /// A stream frame larger than the listener accepts.
    Oversized,
    /// An answer over the per-prefix or total rate limit (anti-amplification).
    RateLimited,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 6] = [
        DropReason::NotStun,
        DropReason::Malformed,
        DropReason::BadFingerprint,
        DropReason::UnexpectedClass,
        DropReason::Oversized,
        DropReason::RateLimited,
    ];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::NotStun => "not_stun",
            DropReason::Malformed => "malformed",
            DropReason::BadFingerprint => "bad_fingerprint",
            DropReason::UnexpectedClass => "unexpected_class",
            DropReason::Oversized => "oversized",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// What kind of answer was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Binding success with XOR-MAPPED-ADDRESS.
    Success,
    /// Binding success with MAPPED-ADDRESS for an RFC 3489 client.
    LegacySuccess,
    /// An error response with this code (400, 420).
    Error(u16),
}

/// One socket of an RFC 5780 server: index into [`Grid`] (0 = primary,
/// 1 = alternate) for the IP and for the port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Via {
    /// 0 for the primary IP, 1 for the alternate.
    pub ip: usize,
    /// 0 for the primary port, 1 for the alternate.
    pub port: usize,
}

/// The addresses of an RFC 5780 server (§4.1): a primary and an alternate
/// IP, a primary and an alternate port, and a socket for each combination
/// the server has. Without an alternate IP, change-IP requests get 420.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Primary and alternate IP (equal when there is no alternate).
    pub ips: [IpAddr; 2],
    /// Primary and alternate port (equal when there is no alternate).
    pub ports: [u16; 2],
    /// The public IPs clients see for `ips` (equal to them unless the host
    /// sits behind a 1:1 NAT, as cloud VMs and Kubernetes nodes do):
    /// RESPONSE-ORIGIN and OTHER-ADDRESS name these.
    pub advertised: [IpAddr; 2],
    /// The server has an alternate IP.
    pub alt_ip: bool,
    /// The server has an alternate port.
    pub alt_port: bool,
    /// The alternate IP belongs to a sibling node: its sockets are remote,
    /// and requests for them are handed off (see [`crate::handoff`]).
    pub sibling: bool,
}

impl Grid {
    /// The address of socket `via`.
    pub fn addr(&self, via: Via) -> SocketAddr {
        SocketAddr::new(self.ips[via.ip & 1], self.ports[via.port & 1])
    }

    /// True when the server has socket `via`.
    pub fn has(&self, via: Via) -> bool {
        (via.ip == 0 || self.alt_ip) && (via.port == 0 || self.alt_port)
    }

    /// Every socket the server (with its sibling) has.
    pub fn cells(&self) -> impl Iterator<Item = Via> + '_ {
        [(0, 0), (0, 1), (1, 0), (1, 1)]
            .into_iter()
            .map(|(ip, port)| Via { ip, port })
            .filter(|v| self.has(*v))
    }

    /// True when socket `via` is on this node (not the sibling's).
    pub fn is_local(&self, via: Via) -> bool {
        !(self.sibling && via.ip == 1)
    }

    /// The address clients know socket `via` by.
    pub fn public(&self, via: Via) -> SocketAddr {
        SocketAddr::new(self.advertised[via.ip & 1], self.ports[via.port & 1])
    }

    /// OTHER-ADDRESS as seen from socket `at`: the other IP and the other
    /// port where the server has them, as clients know them.
    fn other(&self, at: Via) -> SocketAddr {
        self.public(Via {
            ip: if self.alt_ip { 1 - at.ip } else { at.ip },
            port: if self.alt_port { 1 - at.port } else { at.port },
        })
    }
}

/// Where a request arrived on an RFC 5780 server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// The server's sockets.
    pub grid: Grid,
    /// The socket the request arrived on.
    pub arrived: Via,
}

/// Largest PADDING echoed (RFC 5780 §7.6); keeps answers within 1500 bytes.
const MAX_PADDING: usize = 1400;

/// The result of handling one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the first `len` bytes of the output buffer back to the sender.
    Reply {
        /// Bytes written.
        len: usize,
        /// What was written.
        kind: Reply,
        /// RFC 5780: the socket to answer from and the address to answer
        /// to, when not the receiving socket and the sender.
        route: Option<(Via, SocketAddr)>,
    },
    /// A Binding indication (a keepalive): nothing to send.
    Indication,
    /// Drop the packet and count it.
    Drop(DropReason),
}

/// Most unknown attribute types listed in one 420 response; caps the answer
/// size whatever the request carries.
const MAX_UNKNOWN_LISTED: usize = 8;

/// Turns Binding requests into responses. Holds configuration only: no
/// state, no clock, no I/O, so one instance serves every loop.
#[derive(Clone, Debug)]
pub struct BindingResponder {
    software: Option<String>,
}

impl BindingResponder {
    /// A responder that names itself with `software` in SOFTWARE (RFC 8489
    /// §14.14), or sends no SOFTWARE when `None` or empty.
    pub fn new(software: Option<String>) -> BindingResponder {
        BindingResponder {
            software: software.filter(|s| !s.is_empty()),
        }
    }

    /// True for attributes this responder understands in a Binding request.
    /// CHANGE-REQUEST and RESPONSE-PORT are RFC 5780 features: this responder
    /// has no alternate address, so a request that needs them gets 420, as
    /// RFC 5780 §6.1 prescribes for servers without that support.
    fn understands(ty: AttributeType) -> bool {
        ty.is_known() && ty != AttributeType::RESPONSE_PORT && ty != AttributeType::CHANGE_REQUEST
    }

    /// Handles one packet from `from`; writes any answer into `out` (1280
    /// bytes always suffice) and says what to do.
    #[inline]
    pub fn handle(&self, packet: &[u8], from: SocketAddr, out: &mut [u8]) -> Outcome {
        self.handle_at(packet, from, None, out)
    }

    /// Like [`BindingResponder::handle`] on an RFC 5780 server whose request
    /// arrived at `site`: CHANGE-REQUEST and RESPONSE-PORT are honoured,
    /// answers carry RESPONSE-ORIGIN and OTHER-ADDRESS and echo PADDING.
    /// `out` must hold 1500 bytes.
    pub fn handle_at(
        &self,
        packet: &[u8],
        from: SocketAddr,
        site: Option<Site>,
        out: &mut [u8],
    ) -> Outcome {
        if demux(packet) != Frame::Stun {
            return Outcome::Drop(DropReason::NotStun);
        }
        let msg = match Message::parse(packet) {
            Ok(msg) => msg,
            Err(_) => return Outcome::Drop(DropReason::Malformed),
        };
        if msg.has_fingerprint() && msg.verify_fingerprint().is_err() {
            return Outcome::Drop(DropReason::BadFingerprint);
        }
        match msg.class() {
            Class::Request => {}
            Class::Indication if msg.method() == Method::BINDING => return Outcome::Indication,
            _ => return Outcome::Drop(DropReason::UnexpectedClass),
        }
        if msg.is_rfc3489() {
            return self.legacy_success(&msg, from, out);
        }
        if msg.method() != Method::BINDING {
            return self.error(&msg, ErrorCode::BAD_REQUEST, None, out);
        }
        // The socket to answer from, where RFC 5780 asks for another one.
        let mut route = None;
        if let Some(site) = site {
            let change = match msg.decode(AttributeType::CHANGE_REQUEST) {
                None => ChangeRequest::default(),
                Some(Ok(Attribute::ChangeRequest(c))) => c,
                Some(_) => return self.error(&msg, ErrorCode::BAD_REQUEST, None, out),
            };
            let via = Via {
                ip: site.arrived.ip ^ usize::from(change.change_ip),
                port: site.arrived.port ^ usize::from(change.change_port),
            };
            if !site.grid.has(via) {
                // A change this server cannot make (RFC 5780 §6.1).
                return self.error(
                    &msg,
                    ErrorCode::UNKNOWN_ATTRIBUTE,
                    Some(&[AttributeType::CHANGE_REQUEST]),
                    out,
                );
            }
            let to = match msg.decode(AttributeType::RESPONSE_PORT) {
                None => from,
                Some(Ok(Attribute::ResponsePort(p))) => SocketAddr::new(from.ip(), p),
                Some(_) => return self.error(&msg, ErrorCode::BAD_REQUEST, None, out),
            };
            route = Some((via, to));
        }
        let mut unknown = [AttributeType(0); MAX_UNKNOWN_LISTED];
        let mut n_unknown = 0;
        for ty in msg.unknown_required(Self::understands) {
            if site.is_some()
                && (ty == AttributeType::CHANGE_REQUEST || ty == AttributeType::RESPONSE_PORT)
            {
                continue;
            }
            if ty == AttributeType::CHANGE_REQUEST && !change_requested(&msg) {
                // CHANGE-REQUEST with no flag set asks for nothing we lack.
                continue;
            }
            if n_unknown < MAX_UNKNOWN_LISTED && !unknown[..n_unknown].contains(&ty) {
                unknown[n_unknown] = ty;
                n_unknown += 1;
            }
        }
        if n_unknown > 0 {
            return self.error(
                &msg,
                ErrorCode::UNKNOWN_ATTRIBUTE,
                Some(&unknown[..n_unknown]),
                out,
            );
        }
        match (site, route) {
            (Some(site), Some((via, to))) => {
                let mut outcome = self.success(&msg, from, Some((site, via)), out);
                if let Outcome::Reply { route: r, .. } = &mut outcome
                    && (via != site.arrived || to != from)
                {
                    *r = Some((via, to));
                }
                outcome
            }
            _ => self.success(&msg, from, None, out),
        }
    }

    fn success(
        &self,
        msg: &Message<'_>,
        from: SocketAddr,
        rfc5780: Option<(Site, Via)>,
        out: &mut [u8],
    ) -> Outcome {
        let ty = MessageType::new(Method::BINDING, Class::Success);
        let padding = msg
            .get(AttributeType::PADDING)
            .map_or(0, |p| p.len().min(MAX_PADDING));
        let written = (|| {
            let mut enc = Encoder::new(out, ty, &msg.transaction_id())?;
            enc.xor_mapped_address(from)?;
            if let Some((site, via)) = rfc5780 {
                enc.attribute(&Attribute::ResponseOrigin(site.grid.public(via)))?;
                if site.grid.alt_ip || site.grid.alt_port {
                    enc.attribute(&Attribute::OtherAddress(site.grid.other(site.arrived)))?;
                }
            }
            if let Some(name) = &self.software {
                enc.software(name)?;
            }
            if rfc5780.is_some() && padding > 0 {
                // Echo the request's padding (RFC 5780 §7.6, MTU tests); it
                // never makes the answer larger than the request by more
                // than the fixed attributes.
                enc.raw(AttributeType::PADDING, &[0u8; MAX_PADDING][..padding])?;
            }
            enc.fingerprint()?;
            Ok::<_, natrix_wire::EncodeError>(enc.finish())
        })();
        finish(written, Reply::Success)
    }

    fn legacy_success(&self, msg: &Message<'_>, from: SocketAddr, out: &mut [u8]) -> Outcome {
        if msg.method() != Method::BINDING {
            // RFC 3489 defines Binding and Shared Secret only; the latter is
            // obsolete and never answered.
            return Outcome::Drop(DropReason::UnexpectedClass);
        }
        let ty = MessageType::new(Method::BINDING, Class::Success);
        let written = (|| {
            let mut enc = Encoder::new_rfc3489(out, ty, &msg.legacy_transaction_id())?;
            enc.mapped_address(from)?;
            if let Some(name) = &self.software {
                enc.software(name)?;
            }
            Ok::<_, natrix_wire::EncodeError>(enc.finish())
        })();
        finish(written, Reply::LegacySuccess)
    }

    fn error(
        &self,
        msg: &Message<'_>,
        code: ErrorCode<'static>,
        unknown: Option<&[AttributeType]>,
        out: &mut [u8],
    ) -> Outcome {
        let ty = MessageType::new(msg.method(), Class::Error);
        let written = (|| {
            let mut enc = Encoder::new(out, ty, &msg.transaction_id())?;
            enc.error_code(code)?;
            if let Some(types) = unknown {
                let mut scratch = [0u8; 2 * MAX_UNKNOWN_LISTED];
                let list = UnknownAttributes::from_types(types.iter().copied(), &mut scratch);
                enc.attribute(&Attribute::UnknownAttributes(list))?;
            }
            if let Some(name) = &self.software {
                enc.software(name)?;
            }
            enc.fingerprint()?;
            Ok::<_, natrix_wire::EncodeError>(enc.finish())
        })();
        finish(written, Reply::Error(code.code))
    }
}

fn change_requested(msg: &Message<'_>) -> bool {
    match msg.decode(AttributeType::CHANGE_REQUEST) {
        Some(Ok(Attribute::ChangeRequest(c))) => c.change_ip || c.change_port,
        // Malformed CHANGE-REQUEST: treat as a request we cannot honour.
        _ => true,
    }
}

fn finish(written: Result<usize, natrix_wire::EncodeError>, kind: Reply) -> Outcome {
    match written {
        Ok(len) => Outcome::Reply {
            len,
            kind,
            route: None,
        },
        // Only an output buffer smaller than the documented minimum gets
        // here; answering nothing is the safe fallback.
        Err(_) => Outcome::Drop(DropReason::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natrix_wire::{ChangeRequest, TransactionId};

    const FROM: &str = "203.0.113.7:40000";

    fn responder() -> BindingResponder {
        BindingResponder::new(Some("natrix test".into()))
    }

    fn request(attrs: &[Attribute<'_>], fingerprint: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::BINDING, Class::Request),
            &TransactionId([3; 12]),
        )
        .unwrap();
        for a in attrs {
            enc.attribute(a).unwrap();
        }
        if fingerprint {
            enc.fingerprint().unwrap();
        }
        let n = enc.finish();
        buf.truncate(n);
        buf
    }

    fn answer(packet: &[u8]) -> (Outcome, Vec<u8>) {
        let mut out = [0u8; 1280];
        let outcome = responder().handle(packet, FROM.parse().unwrap(), &mut out);
        let len = match outcome {
            Outcome::Reply { len, .. } => len,
            _ => 0,
        };
        (outcome, out[..len].to_vec())
    }

    #[test]
    fn binding_request_gets_xor_mapped_address_software_and_fingerprint() {
        let (outcome, bytes) = answer(&request(&[], false));
        assert!(matches!(
            outcome,
            Outcome::Reply {
                kind: Reply::Success,
                ..
            }
        ));
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(msg.class(), Class::Success);
        assert_eq!(msg.transaction_id(), TransactionId([3; 12]));
        let types: Vec<_> = msg.attributes().map(|a| a.ty).collect();
        assert_eq!(
            types,
            [
                AttributeType::XOR_MAPPED_ADDRESS,
                AttributeType::SOFTWARE,
                AttributeType::FINGERPRINT
            ]
        );
        assert_eq!(
            msg.decode(AttributeType::XOR_MAPPED_ADDRESS)
                .unwrap()
                .unwrap(),
            Attribute::XorMappedAddress(FROM.parse().unwrap())
        );
        msg.verify_fingerprint().unwrap();
    }

    #[test]
    fn ipv6_clients_get_their_ipv6_address() {
        let mut out = [0u8; 1280];
        let from: SocketAddr = "[2001:db8::42]:5000".parse().unwrap();
        let Outcome::Reply { len, .. } = responder().handle(&request(&[], true), from, &mut out)
        else {
            panic!("no reply");
        };
        let msg = Message::parse(&out[..len]).unwrap();
        assert_eq!(
            msg.decode(AttributeType::XOR_MAPPED_ADDRESS)
                .unwrap()
                .unwrap(),
            Attribute::XorMappedAddress(from)
        );
    }

    #[test]
    fn rfc3489_request_gets_mapped_address_and_its_128_bit_id_back() {
        let mut req = request(&[], false);
        req[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // no magic cookie
        let (outcome, bytes) = answer(&req);
        assert!(matches!(
            outcome,
            Outcome::Reply {
                kind: Reply::LegacySuccess,
                ..
            }
        ));
        assert_eq!(&bytes[4..20], &req[4..20]);
        let msg = Message::parse(&bytes).unwrap();
        assert!(msg.is_rfc3489());
        assert!(msg.get(AttributeType::XOR_MAPPED_ADDRESS).is_none());
        assert!(!msg.has_fingerprint());
        assert_eq!(
            msg.decode(AttributeType::MAPPED_ADDRESS).unwrap().unwrap(),
            Attribute::MappedAddress(FROM.parse().unwrap())
        );
    }

    #[test]
    fn unknown_comprehension_required_attribute_gets_420_listing_it() {
        let req = request(&[Attribute::Other(AttributeType(0x7777), b"x")], true);
        let (outcome, bytes) = answer(&req);
        assert_eq!(
            outcome,
            Outcome::Reply {
                len: bytes.len(),
                kind: Reply::Error(420),
                route: None,
            }
        );
        let msg = Message::parse(&bytes).unwrap();
        let Some(Ok(Attribute::UnknownAttributes(list))) =
            msg.decode(AttributeType::UNKNOWN_ATTRIBUTES)
        else {
            panic!("no UNKNOWN-ATTRIBUTES");
        };
        assert_eq!(list.iter().collect::<Vec<_>>(), [AttributeType(0x7777)]);
        msg.verify_fingerprint().unwrap();
    }

    #[test]
    fn unknown_optional_attributes_are_ignored() {
        let req = request(&[Attribute::Other(AttributeType(0xC001), b"opt")], true);
        assert!(matches!(
            answer(&req).0,
            Outcome::Reply {
                kind: Reply::Success,
                ..
            }
        ));
    }

    #[test]
    fn change_request_without_an_alternate_address_gets_420_unless_empty() {
        let change = |ip, port| {
            request(
                &[Attribute::ChangeRequest(ChangeRequest {
                    change_ip: ip,
                    change_port: port,
                })],
                true,
            )
        };
        assert_eq!(
            answer(&change(true, false)).0,
            Outcome::Reply {
                len: answer(&change(true, false)).1.len(),
                kind: Reply::Error(420),
                route: None,
            }
        );
        assert!(matches!(
            answer(&change(false, false)).0,
            Outcome::Reply {
                kind: Reply::Success,
                ..
            }
        ));
    }

    #[test]
    fn garbage_and_responses_are_dropped_with_a_reason() {
        assert_eq!(answer(b"").0, Outcome::Drop(DropReason::NotStun));
        assert_eq!(
            answer(&[0x16, 0xfe, 0xfd, 0, 0]).0,
            Outcome::Drop(DropReason::NotStun)
        );
        assert_eq!(
            answer(&[0x40, 0x00, 0x00, 0x01, 9]).0,
            Outcome::Drop(DropReason::NotStun)
        );
        let mut truncated = request(&[Attribute::Software("abc")], true);
        truncated.truncate(truncated.len() - 3);
        assert_eq!(answer(&truncated).0, Outcome::Drop(DropReason::Malformed));
        let mut bad_fp = request(&[], true);
        let last = bad_fp.len() - 1;
        bad_fp[last] ^= 0xff;
        assert_eq!(answer(&bad_fp).0, Outcome::Drop(DropReason::BadFingerprint));
        let mut response = request(&[], true);
        response[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
        // Re-seal the fingerprint so only the class is wrong.
        let msg_len = response.len();
        let reparsed = {
            let mut buf = vec![0u8; msg_len];
            let mut enc = Encoder::new(
                &mut buf,
                MessageType::new(Method::BINDING, Class::Success),
                &TransactionId([3; 12]),
            )
            .unwrap();
            enc.fingerprint().unwrap();
            let n = enc.finish();
            buf.truncate(n);
            buf
        };
        assert_eq!(
            answer(&reparsed).0,
            Outcome::Drop(DropReason::UnexpectedClass)
        );
    }

    #[test]
    fn binding_indication_is_a_keepalive() {
        let mut buf = [0u8; 64];
        let enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::BINDING, Class::Indication),
            &TransactionId([1; 12]),
        )
        .unwrap();
        let n = enc.finish();
        assert_eq!(answer(&buf[..n]).0, Outcome::Indication);
    }

    #[test]
    fn other_methods_get_400() {
        let mut buf = [0u8; 64];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::ALLOCATE, Class::Request),
            &TransactionId([1; 12]),
        )
        .unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        let (outcome, bytes) = answer(&buf[..n]);
        assert!(matches!(
            outcome,
            Outcome::Reply {
                kind: Reply::Error(400),
                ..
            }
        ));
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(msg.method(), Method::ALLOCATE);
        assert_eq!(msg.class(), Class::Error);
    }

    fn grid(alt_ip: bool) -> Grid {
        let ips = [
            "192.0.2.1".parse().unwrap(),
            if alt_ip { "192.0.2.2" } else { "192.0.2.1" }
                .parse()
                .unwrap(),
        ];
        Grid {
            ips,
            ports: [3478, 3479],
            advertised: ips,
            alt_ip,
            alt_port: true,
            sibling: false,
        }
    }

    fn answer_at(packet: &[u8], site: Site) -> (Outcome, Vec<u8>) {
        let mut out = [0u8; 1500];
        let outcome = responder().handle_at(packet, FROM.parse().unwrap(), Some(site), &mut out);
        let len = match outcome {
            Outcome::Reply { len, .. } => len,
            _ => 0,
        };
        (outcome, out[..len].to_vec())
    }

    fn change(ip: bool, port: bool) -> Attribute<'static> {
        Attribute::ChangeRequest(ChangeRequest {
            change_ip: ip,
            change_port: port,
        })
    }

    #[test]
    fn rfc5780_answers_carry_response_origin_and_other_address() {
        let site = Site {
            grid: grid(true),
            arrived: Via { ip: 0, port: 0 },
        };
        let (outcome, bytes) = answer_at(&request(&[], true), site);
        assert!(matches!(outcome, Outcome::Reply { route: None, .. }));
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(
            msg.decode(AttributeType::RESPONSE_ORIGIN).unwrap().unwrap(),
            Attribute::ResponseOrigin("192.0.2.1:3478".parse().unwrap())
        );
        assert_eq!(
            msg.decode(AttributeType::OTHER_ADDRESS).unwrap().unwrap(),
            Attribute::OtherAddress("192.0.2.2:3479".parse().unwrap())
        );
    }

    #[test]
    fn behind_a_one_to_one_nat_answers_name_the_public_addresses() {
        let mut g = grid(true);
        g.advertised = [
            "203.0.113.10".parse().unwrap(),
            "203.0.113.11".parse().unwrap(),
        ];
        let site = Site {
            grid: g,
            arrived: Via { ip: 0, port: 1 },
        };
        let (_, bytes) = answer_at(&request(&[], true), site);
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(
            msg.decode(AttributeType::RESPONSE_ORIGIN).unwrap().unwrap(),
            Attribute::ResponseOrigin("203.0.113.10:3479".parse().unwrap())
        );
        assert_eq!(
            msg.decode(AttributeType::OTHER_ADDRESS).unwrap().unwrap(),
            Attribute::OtherAddress("203.0.113.11:3478".parse().unwrap())
        );
        // The sockets themselves stay on the private addresses.
        assert_eq!(
            g.addr(Via { ip: 1, port: 0 }),
            "192.0.2.2:3478".parse().unwrap()
        );
    }

    #[test]
    fn change_requests_pick_the_socket_to_answer_from() {
        let arrived = Via { ip: 0, port: 0 };
        let site = Site {
            grid: grid(true),
            arrived,
        };
        for (ip, port, via, origin) in [
            (false, true, Via { ip: 0, port: 1 }, "192.0.2.1:3479"),
            (true, false, Via { ip: 1, port: 0 }, "192.0.2.2:3478"),
            (true, true, Via { ip: 1, port: 1 }, "192.0.2.2:3479"),
        ] {
            let (outcome, bytes) = answer_at(&request(&[change(ip, port)], true), site);
            let Outcome::Reply { route, .. } = outcome else {
                panic!("no reply");
            };
            assert_eq!(route, Some((via, FROM.parse().unwrap())));
            let msg = Message::parse(&bytes).unwrap();
            assert_eq!(
                msg.decode(AttributeType::RESPONSE_ORIGIN).unwrap().unwrap(),
                Attribute::ResponseOrigin(origin.parse().unwrap())
            );
        }
        // Without an alternate IP, change-IP is refused with 420.
        let no_ip = Site {
            grid: grid(false),
            arrived,
        };
        let (outcome, _) = answer_at(&request(&[change(true, false)], true), no_ip);
        assert!(matches!(
            outcome,
            Outcome::Reply {
                kind: Reply::Error(420),
                ..
            }
        ));
    }

    #[test]
    fn response_port_and_padding_are_honoured() {
        let site = Site {
            grid: grid(true),
            arrived: Via { ip: 0, port: 0 },
        };
        let req = request(
            &[
                Attribute::ResponsePort(50000),
                Attribute::Padding(&[0; 200]),
            ],
            true,
        );
        let (outcome, bytes) = answer_at(&req, site);
        let Outcome::Reply { route, .. } = outcome else {
            panic!("no reply");
        };
        assert_eq!(
            route,
            Some((Via { ip: 0, port: 0 }, "203.0.113.7:50000".parse().unwrap()))
        );
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(msg.get(AttributeType::PADDING).map(<[u8]>::len), Some(200));
        assert!(
            bytes.len() <= req.len() + 64,
            "padding echoes, never amplifies"
        );
    }
}

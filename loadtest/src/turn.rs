//! A small blocking TURN client (long-term or REST credentials, over UDP,
//! TCP, TLS or DTLS) for load generation and the end-to-end scenarios: allocate,
//! refresh, bind channels, frame data.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use natrix_net::{StreamFrames, TimedRead, is_timeout};
use natrix_wire::{
    Attribute, AttributeType, ChannelData, ChannelNumber, Class, Encoder, IntegrityKey, Message,
    MessageType, Method, TransactionId, long_term_key_md5,
};
use rustls::pki_types::{CertificateDer, ServerName};

/// Credentials for a TURN server.
#[derive(Clone, Debug)]
pub(crate) struct Credentials {
    /// Username.
    pub(crate) user: String,
    /// Password.
    pub(crate) password: String,
}

impl Credentials {
    /// Time-limited credentials from a shared secret (the TURN REST API
    /// scheme coturn's `use-auth-secret` and natrix's `--auth-secret`
    /// accept): username `<expiry>:<user>`, password
    /// `base64(HMAC-SHA1(secret, username))`.
    pub(crate) fn from_secret(secret: &str, user: &str, ttl: Duration) -> Credentials {
        use base64::Engine as _;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + ttl;
        let user = format!("{}:{user}", expiry.as_secs());
        let key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
        let tag = ring::hmac::sign(&key, user.as_bytes());
        Credentials {
            password: base64::engine::general_purpose::STANDARD.encode(tag.as_ref()),
            user,
        }
    }
}

/// Why a TURN exchange failed, in terms a user can act on; [`kind`] names
/// it for the errors-by-code tables.
#[derive(Debug)]
pub(crate) enum TurnError {
    /// The server answered with an error code.
    Refused {
        /// The request's method.
        method: &'static str,
        /// The STUN error code.
        code: u16,
        /// The server's reason phrase.
        reason: String,
    },
    /// No answer at all.
    Timeout {
        /// Where the requests went.
        server: SocketAddr,
        /// How many were sent.
        tries: u32,
        /// Over TCP or TLS (else UDP).
        stream: bool,
    },
    /// ICMP port unreachable or a refused connection: nothing listens.
    Unreachable {
        /// Where.
        server: SocketAddr,
        /// The system's word for it.
        error: std::io::Error,
    },
    /// This machine ran out of local ports or file descriptors.
    LocalExhausted(std::io::Error),
}

impl std::fmt::Display for TurnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TurnError::Refused {
                method,
                code,
                reason,
            } => {
                write!(f, "{method} refused with {code} {reason}")?;
                let hint = match code {
                    401 => " (wrong username or password, or an expired REST credential)",
                    403 => " (the server forbids this peer or request)",
                    437 => {
                        " (allocation mismatch: this 5-tuple already has, or has no, allocation)"
                    }
                    441 => " (wrong credentials for this allocation)",
                    486 => " (the user's allocation quota is reached)",
                    508 => " (the server is out of relay ports or allocations)",
                    _ => "",
                };
                f.write_str(hint)
            }
            TurnError::Timeout {
                server,
                tries,
                stream: false,
            } => write!(
                f,
                "no answer from {server} after {tries} tries: is a TURN server listening there, \
                 and does a firewall let UDP through?"
            ),
            TurnError::Timeout { server, .. } => write!(
                f,
                "no answer from {server} over the connection within 3 s (the server accepted \
                 it but said nothing: overloaded, or not speaking TURN on this port?)"
            ),
            TurnError::Unreachable { server, error } => {
                write!(
                    f,
                    "{server} is unreachable ({error}): nothing listens there"
                )
            }
            TurnError::LocalExhausted(e) => write!(
                f,
                "out of local ports or file descriptors ({e}): raise `ulimit -n`, widen \
                 net.ipv4.ip_local_port_range, or spread clients over more --local addresses"
            ),
        }
    }
}

impl std::error::Error for TurnError {}

impl TurnError {
    /// A short name for tables: the error code, `timeout`, `unreachable`
    /// or `local-ports`.
    pub(crate) fn kind(&self) -> String {
        match self {
            TurnError::Refused { code, .. } => code.to_string(),
            TurnError::Timeout { .. } => "timeout".into(),
            TurnError::Unreachable { .. } => "unreachable".into(),
            TurnError::LocalExhausted(_) => "local-ports".into(),
        }
    }

    /// Classifies a socket error towards `server`.
    fn io(server: SocketAddr, error: std::io::Error) -> anyhow::Error {
        use std::io::ErrorKind;
        let local = matches!(
            error.raw_os_error(),
            Some(
                libc::EADDRINUSE
                    | libc::EADDRNOTAVAIL
                    | libc::EMFILE
                    | libc::ENFILE
                    | libc::ENOBUFS
            )
        );
        if local {
            TurnError::LocalExhausted(error).into()
        } else if matches!(
            error.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
        ) {
            TurnError::Unreachable { server, error }.into()
        } else {
            anyhow::Error::new(error).context(format!("talking to {server}"))
        }
    }
}

/// The [`TurnError::kind`] of an error, or `other`.
pub(crate) fn error_kind(e: &anyhow::Error) -> String {
    e.chain()
        .find_map(|c| c.downcast_ref::<TurnError>())
        .map_or_else(|| "other".to_owned(), TurnError::kind)
}

/// The transport between client and TURN server (the model's one type).
pub(crate) use natrix_model::Transport;

/// Accepts any server certificate but still checks the handshake's
/// signatures: a load test measures the server, it does not authenticate
/// it (give `--tls-ca` to verify).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS client settings: the configuration and the name to ask for.
#[derive(Clone, Debug)]
pub(crate) struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl Tls {
    /// Verifies the server against the PEM certificates in `ca` (and
    /// `name`, default the server's IP), or accepts any certificate.
    pub(crate) fn new(
        ca: Option<&std::path::Path>,
        name: Option<&str>,
        server: SocketAddr,
    ) -> anyhow::Result<Tls> {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let config = match ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("reading --tls-ca {}", path.display()))?
                {
                    roots
                        .add(cert.with_context(|| format!("a certificate in {}", path.display()))?)
                        .context("adding a CA certificate")?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
        };
        let name = match name {
            Some(n) => ServerName::try_from(n.to_owned()).context("--tls-name")?,
            None => ServerName::IpAddress(server.ip().into()),
        };
        Ok(Tls {
            config: Arc::new(config),
            name,
        })
    }
}

impl Tls {
    /// The same settings, offering ALPN `protocols` (e.g. `http/1.1`).
    pub(crate) fn with_alpn(&self, protocols: &[&[u8]]) -> Tls {
        let mut config = (*self.config).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Tls {
            config: Arc::new(config),
            name: self.name.clone(),
        }
    }

    /// A TLS session with `server` over `stream`, its handshake done.
    pub(crate) fn open(&self, stream: TcpStream, server: SocketAddr) -> anyhow::Result<TlsStream> {
        let conn = rustls::ClientConnection::new(self.config.clone(), self.name.clone())
            .context("starting TLS")?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        tls.sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .with_context(|| format!("TLS handshake with {server}"))?;
        }
        Ok(TlsStream(tls))
    }

    /// One full TLS handshake with `server` over `stream`, then close (the
    /// attack suite's handshake flood).
    pub(crate) fn handshake(&self, stream: TcpStream, server: SocketAddr) -> anyhow::Result<()> {
        self.open(stream, server).map(drop)
    }
}

/// A TLS session over TCP, readable with a deadline.
pub(crate) struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl std::io::Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl TlsStream {
    /// The TCP connection under it.
    pub(crate) fn tcp(&mut self) -> &mut TcpStream {
        &mut self.0.sock
    }
}

impl TimedRead for TlsStream {
    fn set_read_timeout(&self, wait: Option<Duration>) -> std::io::Result<()> {
        self.0.sock.set_read_timeout(wait)
    }
}

/// How the client reaches the server: a connected UDP socket, or a TCP or
/// TLS stream carrying framed messages (RFC 8656 §12.5: ChannelData padded).
#[derive(Debug)]
pub(crate) enum Link {
    /// UDP.
    Udp(UdpSocket),
    /// TCP, with the bytes read but not yet framed.
    Tcp(TcpStream, StreamFrames),
    /// TLS over TCP, likewise.
    Tls(Box<TlsStream>, StreamFrames),
    /// DTLS over UDP: one message per record.
    Dtls(Box<crate::dtls::DtlsLink>),
}

impl Link {
    /// The server's address.
    fn peer(&self) -> SocketAddr {
        match self {
            Link::Udp(s) => s.peer_addr(),
            Link::Tcp(s, _) => s.peer_addr(),
            Link::Tls(s, _) => s.0.sock.peer_addr(),
            Link::Dtls(l) => l.peer_addr(),
        }
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Sends one datagram, or bytes on the stream.
    pub(crate) fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Udp(s) => s.send(data).map(|_| ()),
            Link::Tcp(s, _) => s.write_all(data),
            Link::Tls(s, _) => s.write_all(data),
            Link::Dtls(l) => l.send(data),
        }
    }

    /// True for TCP and TLS (framed, padded ChannelData).
    pub(crate) fn is_stream(&self) -> bool {
        matches!(self, Link::Tcp(..) | Link::Tls(..))
    }

    /// The next datagram or frame, waiting at most `timeout`.
    pub(crate) fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        let timeout = timeout.max(Duration::from_millis(1));
        match self {
            Link::Udp(s) => {
                s.set_read_timeout(Some(timeout))?;
                let mut buf = vec![0u8; 2048];
                match s.recv(&mut buf) {
                    Ok(n) => Ok(Some(buf[..n].to_vec())),
                    Err(e) if is_timeout(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Link::Tcp(s, frames) => frames.next(s, timeout),
            Link::Tls(s, frames) => frames.next(s.as_mut(), timeout),
            Link::Dtls(l) => l.recv(timeout),
        }
    }

    /// A frame already read from a stream, without waiting.
    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        match self {
            Link::Udp(_) => None,
            Link::Dtls(l) => l.pop(),
            Link::Tcp(_, frames) | Link::Tls(_, frames) => frames.pop(),
        }
    }
}

/// One allocation held by one UDP socket or TCP connection.
#[derive(Debug)]
pub(crate) struct TurnClient {
    /// The connection to the server.
    pub(crate) link: Link,
    /// The relayed transport address.
    pub(crate) relayed: SocketAddr,
    user: String,
    realm: String,
    nonce: String,
    key: IntegrityKey,
    /// The relay's mobility ticket (RFC 8016), when the allocation has one.
    ticket: Option<Vec<u8>>,
}

fn transact(link: &mut Link, req: &[u8]) -> anyhow::Result<Vec<u8>> {
    let tid = &req[8..20];
    let server = link.peer();
    // Over TCP the stream retransmits; one send and a longer wait.
    let attempts = if link.is_stream() { 1 } else { 5 };
    for attempt in 0..attempts {
        link.send(req).map_err(|e| TurnError::io(server, e))?;
        let deadline = Instant::now()
            + Duration::from_millis(if attempts == 1 { 3000 } else { 200 << attempt });
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match link.recv(left).map_err(|e| TurnError::io(server, e))? {
                Some(m) if m.len() >= 20 && &m[8..20] == tid => return Ok(m),
                Some(_) => continue,
                None => break,
            }
        }
    }
    Err(TurnError::Timeout {
        server,
        tries: attempts,
        stream: link.is_stream(),
    }
    .into())
}

/// A UDP socket bound to `local` and connected to `server`.
fn udp_link(server: SocketAddr, local: SocketAddr) -> anyhow::Result<Link> {
    let socket = UdpSocket::bind(local).map_err(|e| TurnError::io(server, e))?;
    socket
        .connect(server)
        .map_err(|e| TurnError::io(server, e))?;
    Ok(Link::Udp(socket))
}

/// True when `e` is the relay's refusal with `code`.
fn is_refused(e: &anyhow::Error, code: u16) -> bool {
    matches!(e.downcast_ref::<TurnError>(), Some(TurnError::Refused { code: c, .. }) if *c == code)
}

/// The error of a failed answer.
fn refused(method: Method, msg: &Message<'_>) -> anyhow::Error {
    let (code, reason) = match msg.decode(AttributeType::ERROR_CODE) {
        Some(Ok(Attribute::ErrorCode(e))) => (e.code, e.reason.to_owned()),
        _ => (0, "without an ERROR-CODE".to_owned()),
    };
    TurnError::Refused {
        method: method.name(),
        code,
        reason,
    }
    .into()
}

fn text(msg: &Message<'_>, ty: AttributeType) -> Option<String> {
    msg.get(ty)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

fn error_code(msg: &Message<'_>) -> Option<u16> {
    match msg.decode(AttributeType::ERROR_CODE) {
        Some(Ok(Attribute::ErrorCode(e))) => Some(e.code),
        _ => None,
    }
}

impl TurnClient {
    /// Allocates on `server` from a fresh UDP socket bound to `local`.
    pub(crate) fn allocate(
        server: SocketAddr,
        local: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<TurnClient> {
        Self::allocate_over(udp_link(server, local)?, creds)
    }

    /// [`TurnClient::allocate`] asking for a mobility ticket (RFC 8016), so
    /// that [`TurnClient::rebind`] can move the allocation to a new address;
    /// a relay that gives none (405) allocates without.
    pub(crate) fn allocate_mobile(
        server: SocketAddr,
        local: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<TurnClient> {
        match Self::allocate_with(udp_link(server, local)?, creds, true) {
            Err(e) if is_refused(&e, 405) => Self::allocate(server, local, creds),
            other => other,
        }
    }

    /// Moves the allocation to a fresh UDP socket bound to `local` (the
    /// client's address changed, or its NAT forgot the mapping) with a
    /// Refresh carrying its mobility ticket: same relayed address, same
    /// permissions and channels.
    pub(crate) fn rebind(&mut self, local: SocketAddr) -> anyhow::Result<()> {
        let ticket = self
            .ticket
            .clone()
            .context("the allocation has no mobility ticket")?;
        let link = udp_link(self.link.peer(), local)?;
        let old = std::mem::replace(&mut self.link, link);
        let resp = self.request(Method::REFRESH, |enc| {
            enc.attribute(&Attribute::Lifetime(600))?;
            enc.raw(AttributeType::MOBILITY_TICKET, &ticket)
        });
        match resp {
            Ok(resp) => {
                let msg = Message::parse(&resp)?;
                self.ticket = msg.get(AttributeType::MOBILITY_TICKET).map(<[u8]>::to_vec);
                Ok(())
            }
            Err(e) => {
                self.link = old;
                Err(e.context("moving the allocation with its mobility ticket"))
            }
        }
    }

    /// True when the allocation can move ([`TurnClient::rebind`]).
    pub(crate) fn is_mobile(&self) -> bool {
        self.ticket.is_some()
    }

    /// Allocates (a UDP relay) over a TCP connection to `server` (TURN over
    /// TCP, for clients that cannot send UDP).
    pub(crate) fn allocate_tcp(
        server: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<TurnClient> {
        let stream = connect_tcp(server)?;
        Self::allocate_over(Link::Tcp(stream, StreamFrames::default()), creds)
    }

    /// Allocates on `server` over `transport` (TLS settings needed for TLS;
    /// the UDP socket binds `local`).
    pub(crate) fn connect(
        transport: Transport,
        server: SocketAddr,
        local: SocketAddr,
        creds: &Credentials,
        tls: Option<&Tls>,
    ) -> anyhow::Result<TurnClient> {
        match transport {
            Transport::Udp => Self::allocate(server, local, creds),
            Transport::Tcp => Self::allocate_tcp(server, creds),
            Transport::Tls => {
                let tls = tls.context("TLS settings for a TLS transport")?;
                let tcp = connect_tcp(server)?;
                let conn = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone())
                    .context("starting TLS")?;
                let mut stream = TlsStream(rustls::StreamOwned::new(conn, tcp));
                // Handshake now, so a TLS failure reads as one.
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                while stream.0.conn.is_handshaking() {
                    stream
                        .0
                        .conn
                        .complete_io(&mut stream.0.sock)
                        .with_context(|| format!("TLS handshake with {server}"))?;
                }
                Self::allocate_over(Link::Tls(Box::new(stream), StreamFrames::default()), creds)
            }
            Transport::Dtls => {
                let link = crate::dtls::DtlsLink::connect(server, local)?;
                Self::allocate_over(Link::Dtls(Box::new(link)), creds)
            }
        }
    }

    fn allocate_over(link: Link, creds: &Credentials) -> anyhow::Result<TurnClient> {
        Self::allocate_with(link, creds, false)
    }

    fn allocate_with(
        mut link: Link,
        creds: &Credentials,
        mobile: bool,
    ) -> anyhow::Result<TurnClient> {
        let server = link.peer();
        let local: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut buf = vec![0u8; 512];
        let tid = TransactionId(rand::random());
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::ALLOCATE, Class::Request),
            &tid,
        )?;
        enc.attribute(&Attribute::RequestedTransport(17))?;
        let n = enc.finish();
        let resp = transact(&mut link, &buf[..n])?;
        let msg = Message::parse(&resp)?;
        if error_code(&msg) != Some(401) {
            if msg.class() == Class::Error {
                return Err(refused(Method::ALLOCATE, &msg));
            }
            bail!("{server} answered an unauthenticated Allocate without the 401 challenge");
        }
        let realm = text(&msg, AttributeType::REALM).context("no REALM in the challenge")?;
        let nonce = text(&msg, AttributeType::NONCE).context("no NONCE in the challenge")?;
        let key = IntegrityKey::new(&long_term_key_md5(&creds.user, &realm, &creds.password));
        let mut client = TurnClient {
            link,
            relayed: local,
            user: creds.user.clone(),
            realm,
            nonce,
            key,
            ticket: None,
        };
        let resp = client.request(Method::ALLOCATE, |enc| {
            enc.attribute(&Attribute::RequestedTransport(17))?;
            if mobile {
                enc.raw(AttributeType::MOBILITY_TICKET, &[])?;
            }
            enc.attribute(&Attribute::Lifetime(600))
        })?;
        let msg = Message::parse(&resp)?;
        client.ticket = msg.get(AttributeType::MOBILITY_TICKET).map(<[u8]>::to_vec);
        match msg.decode(AttributeType::XOR_RELAYED_ADDRESS) {
            Some(Ok(Attribute::XorRelayedAddress(a))) => client.relayed = a,
            _ => bail!("{server} accepted the Allocate but sent no XOR-RELAYED-ADDRESS"),
        }
        Ok(client)
    }

    /// Sends an authenticated request (retrying once on 438) and returns the
    /// success response.
    fn request(
        &mut self,
        method: Method,
        body: impl Fn(&mut Encoder<'_>) -> Result<(), natrix_wire::EncodeError>,
    ) -> anyhow::Result<Vec<u8>> {
        for _ in 0..2 {
            let mut buf = vec![0u8; 512];
            let tid = TransactionId(rand::random());
            let mut enc = Encoder::new(&mut buf, MessageType::new(method, Class::Request), &tid)?;
            body(&mut enc)?;
            enc.attribute(&Attribute::Username(&self.user))?;
            enc.attribute(&Attribute::Realm(&self.realm))?;
            enc.attribute(&Attribute::Nonce(&self.nonce))?;
            enc.integrity(&self.key)?;
            enc.fingerprint()?;
            let n = enc.finish();
            let resp = transact(&mut self.link, &buf[..n])?;
            let msg = Message::parse(&resp)?;
            match msg.class() {
                Class::Success => return Ok(resp),
                _ if error_code(&msg) == Some(438) => {
                    self.nonce = text(&msg, AttributeType::NONCE).context("438 without NONCE")?;
                }
                _ => return Err(refused(method, &msg)),
            }
        }
        bail!("{} failed: stale nonce twice", method.name())
    }

    /// Binds `channel` to `peer` (which also installs the permission).
    pub(crate) fn bind_channel(&mut self, channel: u16, peer: SocketAddr) -> anyhow::Result<()> {
        self.request(Method::CHANNEL_BIND, |enc| {
            enc.attribute(&Attribute::ChannelNumber(channel))?;
            enc.attribute(&Attribute::XorPeerAddress(peer))
        })?;
        Ok(())
    }

    /// The UDP socket of a UDP client.
    pub(crate) fn udp_socket(&self) -> Option<&UdpSocket> {
        match &self.link {
            Link::Udp(s) => Some(s),
            Link::Tcp(..) | Link::Tls(..) | Link::Dtls(_) => None,
        }
    }

    /// Sends `payload` on `channel` (padded over TCP).
    pub(crate) fn send_channel_data(
        &mut self,
        channel: ChannelNumber,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let mut out = [0u8; 2048];
        let padded = self.link.is_stream();
        let n = ChannelData::encode(&mut out, channel, payload, padded).unwrap_or(0);
        self.link.send(&out[..n]).context("sending ChannelData")?;
        Ok(())
    }

    /// Deletes the allocation (Refresh with lifetime 0).
    pub(crate) fn release(&mut self) -> anyhow::Result<()> {
        self.refresh(0)
    }

    /// Refreshes the allocation for `lifetime` seconds (0 deletes it).
    pub(crate) fn refresh(&mut self, lifetime: u32) -> anyhow::Result<()> {
        self.request(Method::REFRESH, |enc| {
            enc.attribute(&Attribute::Lifetime(lifetime))
        })?;
        Ok(())
    }
}

/// A TCP connection to the TURN server (3 s to connect, no Nagle delay),
/// for TURN over TCP and under TLS.
fn connect_tcp(server: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&server, Duration::from_secs(3))
        .map_err(|e| TurnError::io(server, e))
        .with_context(|| format!("connecting to the TURN server {server} over TCP"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Frames `payload` as ChannelData on `channel` into `out`; 0 when `out`
/// is too small.
pub(crate) fn channel_data(out: &mut [u8], channel: ChannelNumber, payload: &[u8]) -> usize {
    ChannelData::encode(out, channel, payload, false).unwrap_or(0)
}

//! The load tester's DTLS 1.2 client (TURN over DTLS, RFC 7350): a connected
//! UDP socket and a `dimpl` engine; one TURN message per record.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use dimpl::{Dtls, Output};
use natrix_net::is_timeout;

/// How long a handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// A DTLS session with a TURN server.
pub(crate) struct DtlsLink {
    socket: UdpSocket,
    dtls: Dtls,
    buf: Vec<u8>,
    /// Messages opened and not yet read.
    inbox: VecDeque<Vec<u8>>,
}

impl std::fmt::Debug for DtlsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsLink")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// The client's own key and a placeholder certificate: the engine needs
/// both, and a TURN server asks for neither (the client is not
/// authenticated by certificate). Made once per process.
fn identity() -> anyhow::Result<(Arc<dimpl::Config>, dimpl::DtlsCertificate)> {
    static IDENTITY: OnceLock<Result<(Arc<dimpl::Config>, dimpl::DtlsCertificate), String>> =
        OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            let rng = ring::rand::SystemRandom::new();
            let key = ring::signature::EcdsaKeyPair::generate_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &rng,
            )
            .map_err(|e| format!("generating a DTLS client key: {e}"))?;
            let config = dimpl::Config::builder()
                .mtu(1400)
                .handshake_timeout(HANDSHAKE)
                .build()
                .map_err(|e| format!("DTLS client settings: {e}"))?;
            Ok((
                Arc::new(config),
                dimpl::DtlsCertificate {
                    // Never sent: only a server asking for a client
                    // certificate would see it.
                    certificate: vec![0x30, 0x00],
                    private_key: key.as_ref().to_vec(),
                },
            ))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A client's first ClientHello (no cookie), as a flood would send it.
pub(crate) fn client_hello() -> anyhow::Result<Vec<u8>> {
    let (config, certificate) = identity()?;
    let now = Instant::now();
    let mut dtls = Dtls::new_12(config, certificate, now);
    dtls.set_active(true);
    dtls.handle_timeout(now)
        .map_err(|e| anyhow::anyhow!("starting a DTLS client: {e}"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        match dtls.poll_output(&mut buf) {
            Output::Packet(p) => return Ok(p.to_vec()),
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            Output::Timeout(_) => anyhow::bail!("the DTLS client sent no ClientHello"),
            _ => {}
        }
    }
}

impl DtlsLink {
    /// A DTLS session from `local` with `server`, handshake done.
    pub(crate) fn connect(server: SocketAddr, local: SocketAddr) -> anyhow::Result<DtlsLink> {
        let (config, certificate) = identity()?;
        let socket = UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
        socket
            .connect(server)
            .with_context(|| format!("connecting to {server}"))?;
        let now = Instant::now();
        let mut dtls = Dtls::new_12(config, certificate, now);
        dtls.set_active(true);
        let mut link = DtlsLink {
            socket,
            dtls,
            buf: vec![0; 4096],
            inbox: VecDeque::new(),
        };
        let deadline = now + HANDSHAKE;
        let mut connected = false;
        let mut packet = vec![0u8; 4096];
        while !connected {
            let now = Instant::now();
            anyhow::ensure!(now < deadline, "DTLS handshake with {server} timed out");
            link.dtls
                .handle_timeout(now)
                .map_err(|e| anyhow::anyhow!("DTLS handshake with {server}: {e}"))?;
            let wake = link.drain(&mut connected)?;
            if connected {
                break;
            }
            let wait = wake
                .min(deadline)
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            link.socket.set_read_timeout(Some(wait))?;
            match link.socket.recv(&mut packet) {
                Ok(n) => link
                    .dtls
                    .handle_packet(&packet[..n])
                    .map_err(|e| anyhow::anyhow!("DTLS handshake with {server}: {e}"))?,
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("DTLS handshake with {server}"));
                }
            }
        }
        Ok(link)
    }

    /// Sends what the engine has, keeps what it opened; returns when it
    /// wants its next wake-up.
    fn drain(&mut self, connected: &mut bool) -> std::io::Result<Instant> {
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => {
                    // A full socket buffer drops the record, as UDP would.
                    let _ = self.socket.send(p);
                }
                Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                Output::Connected => *connected = true,
                Output::ApplicationData(m) => self.inbox.push_back(m.to_vec()),
                Output::CloseNotify => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server closed the DTLS session",
                    ));
                }
                Output::Timeout(at) => return Ok(at),
                _ => {}
            }
        }
    }

    /// The server's address.
    pub(crate) fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.peer_addr()
    }

    /// Sends one message in one record.
    pub(crate) fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        self.dtls
            .send_application_data(message)
            .map_err(std::io::Error::other)?;
        self.drain(&mut false).map(|_| ())
    }

    /// The next message, waiting at most `timeout`.
    pub(crate) fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(Some(m));
        }
        let deadline = Instant::now() + timeout;
        let mut packet = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv(&mut packet) {
                Ok(n) => {
                    self.dtls
                        .handle_timeout(Instant::now())
                        .and_then(|()| self.dtls.handle_packet(&packet[..n]))
                        .map_err(std::io::Error::other)?;
                    self.drain(&mut false)?;
                    if let Some(m) = self.inbox.pop_front() {
                        return Ok(Some(m));
                    }
                }
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// A message already opened, without waiting.
    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        self.inbox.pop_front()
    }
}

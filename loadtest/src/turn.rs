//! A small blocking TURN client (long-term credentials, over UDP or TCP)
//! for load generation and the end-to-end scenarios: allocate, bind
//! channels, frame data.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use natrix_net::{StreamFrames, is_timeout};
use natrix_wire::{
    Attribute, AttributeType, ChannelData, ChannelNumber, Class, Encoder, IntegrityKey, Message,
    MessageType, Method, TransactionId, long_term_key_md5,
};

/// Credentials for a TURN server.
#[derive(Clone, Debug)]
pub(crate) struct Credentials {
    /// Username.
    pub(crate) user: String,
    /// Password.
    pub(crate) password: String,
}

/// How the client reaches the server: a connected UDP socket, or a TCP
/// stream carrying framed messages (RFC 8656 §12.5: ChannelData padded).
#[derive(Debug)]
pub(crate) enum Link {
    /// UDP.
    Udp(UdpSocket),
    /// TCP, with the bytes read but not yet framed.
    Tcp(TcpStream, StreamFrames),
}

impl Link {
    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Udp(s) => s.send(data).map(|_| ()),
            Link::Tcp(s, _) => s.write_all(data),
        }
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
}

fn transact(link: &mut Link, req: &[u8]) -> anyhow::Result<Vec<u8>> {
    let tid = &req[8..20];
    // Over TCP the stream retransmits; one send and a longer wait.
    let attempts = if matches!(link, Link::Tcp(..)) { 1 } else { 5 };
    for attempt in 0..attempts {
        link.send(req).context("sending to the TURN server")?;
        let deadline = Instant::now()
            + Duration::from_millis(if attempts == 1 { 3000 } else { 200 << attempt });
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match link.recv(left).context("receiving from the TURN server")? {
                Some(m) if m.len() >= 20 && &m[8..20] == tid => return Ok(m),
                Some(_) => continue,
                None => break,
            }
        }
    }
    bail!("the TURN server did not answer")
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
        let socket = UdpSocket::bind(local).context("binding a client socket")?;
        socket.connect(server)?;
        Self::allocate_over(Link::Udp(socket), creds)
    }

    /// Allocates (a UDP relay) over a TCP connection to `server` (TURN over
    /// TCP, for clients that cannot send UDP).
    pub(crate) fn allocate_tcp(
        server: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<TurnClient> {
        let stream = TcpStream::connect_timeout(&server, Duration::from_secs(3))
            .with_context(|| format!("connecting to the TURN server {server} over TCP"))?;
        stream.set_nodelay(true)?;
        Self::allocate_over(Link::Tcp(stream, StreamFrames::default()), creds)
    }

    fn allocate_over(mut link: Link, creds: &Credentials) -> anyhow::Result<TurnClient> {
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
            bail!("expected a 401 challenge, got {:?}", error_code(&msg));
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
        };
        let resp = client.request(Method::ALLOCATE, |enc| {
            enc.attribute(&Attribute::RequestedTransport(17))?;
            enc.attribute(&Attribute::Lifetime(600))
        })?;
        let msg = Message::parse(&resp)?;
        match msg.decode(AttributeType::XOR_RELAYED_ADDRESS) {
            Some(Ok(Attribute::XorRelayedAddress(a))) => client.relayed = a,
            _ => bail!("allocation failed: error {:?}", error_code(&msg)),
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
                _ => bail!("{} failed: error {:?}", method.name(), error_code(&msg)),
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
    ///
    /// # Panics
    ///
    /// For a TCP client (the load paths only make UDP ones).
    pub(crate) fn udp_socket(&self) -> &UdpSocket {
        match &self.link {
            Link::Udp(s) => s,
            Link::Tcp(..) => panic!("a TCP TURN client has no UDP socket"),
        }
    }

    /// Sends `payload` on `channel` (padded over TCP).
    pub(crate) fn send_channel_data(
        &mut self,
        channel: ChannelNumber,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let mut out = [0u8; 2048];
        let padded = matches!(self.link, Link::Tcp(..));
        let n = ChannelData::encode(&mut out, channel, payload, padded).unwrap_or(0);
        self.link.send(&out[..n]).context("sending ChannelData")?;
        Ok(())
    }

    /// Deletes the allocation (Refresh with lifetime 0).
    pub(crate) fn release(&mut self) -> anyhow::Result<()> {
        self.request(Method::REFRESH, |enc| {
            enc.attribute(&Attribute::Lifetime(0))
        })?;
        Ok(())
    }
}

/// Frames `payload` as ChannelData on `channel` into `out`; 0 when `out`
/// is too small.
pub(crate) fn channel_data(out: &mut [u8], channel: ChannelNumber, payload: &[u8]) -> usize {
    ChannelData::encode(out, channel, payload, false).unwrap_or(0)
}

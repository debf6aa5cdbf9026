//! A small blocking TURN client (long-term credentials, UDP) for load
//! generation: allocate, create permissions, bind channels, frame data.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail};
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

/// One allocation held by one UDP socket.
#[derive(Debug)]
pub(crate) struct TurnClient {
    /// The socket, connected to the server.
    pub(crate) socket: UdpSocket,
    /// The relayed transport address.
    pub(crate) relayed: SocketAddr,
    user: String,
    realm: String,
    nonce: String,
    key: IntegrityKey,
}

fn transact(socket: &UdpSocket, req: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let tid = &req[8..20];
    for attempt in 0..5 {
        socket.send(req).context("sending to the TURN server")?;
        socket.set_read_timeout(Some(Duration::from_millis(200 << attempt)))?;
        loop {
            match socket.recv(&mut buf) {
                Ok(n) if n >= 20 && &buf[8..20] == tid => return Ok(buf[..n].to_vec()),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e).context("receiving from the TURN server"),
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
    /// Allocates on `server` from a fresh socket bound to `local`.
    pub(crate) fn allocate(
        server: SocketAddr,
        local: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<TurnClient> {
        let socket = UdpSocket::bind(local).context("binding a client socket")?;
        socket.connect(server)?;
        let mut buf = vec![0u8; 512];
        let tid = TransactionId(rand::random());
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(Method::ALLOCATE, Class::Request),
            &tid,
        )?;
        enc.attribute(&Attribute::RequestedTransport(17))?;
        let n = enc.finish();
        let resp = transact(&socket, &buf[..n])?;
        let msg = Message::parse(&resp)?;
        if error_code(&msg) != Some(401) {
            bail!("expected a 401 challenge, got {:?}", error_code(&msg));
        }
        let realm = text(&msg, AttributeType::REALM).context("no REALM in the challenge")?;
        let nonce = text(&msg, AttributeType::NONCE).context("no NONCE in the challenge")?;
        let key = IntegrityKey::new(&long_term_key_md5(&creds.user, &realm, &creds.password));
        let mut client = TurnClient {
            socket,
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
            let resp = transact(&self.socket, &buf[..n])?;
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

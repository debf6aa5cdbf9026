//! TURN over TLS and HTTPS on one port (443, the port firewalls leave open):
//! a TLS listener whose ClientHello asks for HTTP — ALPN `http/1.1`, `h2` or
//! `http/1.0` without TURN's `stun.turn`, or a server name in
//! `--tls-http-names` — is handed by the relay loop to this front, which
//! answers the handshake with the same certificate and passes the requests
//! to `--tls-http-backend` (the lookup API), each with `X-Forwarded-For`
//! naming the client (lookup believes it from its `--trusted-proxy`
//! sources). Every other TLS connection stays TURN in the loop.
//!
//! The front is bounded like every other endpoint: at most
//! [`MAX_CONNECTIONS`] at once (more are closed and counted), a request head
//! of at most [`MAX_HEAD`] bytes, deadlines on the handshake, on each head
//! and on the backend's connect; chunked request bodies are refused (the API
//! takes JSON with a length). WebSocket upgrades (invitations, push) are
//! passed through once their head is forwarded.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use natrix_telemetry::Telemetry;
use natrix_telemetry::catalogue as cat;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::tls::TlsReloader;

/// HTTPS connections served at once; more are closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// HTTPS connections one client address holds at once (so one source
/// cannot take every slot with idle connections).
pub const MAX_CONNECTIONS_PER_IP: usize = 32;
/// The longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Connections waiting between a loop and the front.
const QUEUE: usize = 256;
/// The TLS handshake's deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a request head: the first one after the handshake, the next
/// one of a kept-alive connection.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The backend's connect deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where HTTP connections of the TLS listeners go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsRoute {
    /// The HTTP server (`host:port`) that answers them: lookup's API.
    pub backend: String,
    /// Server names (SNI) that are HTTP whatever ALPN says.
    pub names: Vec<String>,
}

/// True when a ClientHello with these ALPN protocols and server name is
/// for HTTP rather than TURN.
pub fn wants_http<'a>(
    alpn: Option<impl Iterator<Item = &'a [u8]>>,
    server_name: Option<&str>,
    names: &[String],
) -> bool {
    if let Some(name) = server_name
        && names.iter().any(|n| n.eq_ignore_ascii_case(name))
    {
        return true;
    }
    let Some(alpn) = alpn else {
        return false;
    };
    let (mut http, mut turn) = (false, false);
    for p in alpn {
        match p {
            b"http/1.1" | b"h2" | b"http/1.0" => http = true,
            b"stun.turn" | b"stun.nat-discovery" => turn = true,
            _ => {}
        }
    }
    http && !turn
}

/// A connection a loop hands over: its socket, the bytes it read (the
/// ClientHello, to be replayed) and the client (a PROXY header's, if any).
#[derive(Debug)]
pub struct Handed {
    /// The connection (non-blocking).
    pub socket: std::net::TcpStream,
    /// What the loop read of it.
    pub head: Vec<u8>,
    /// The client it serves.
    pub client: SocketAddr,
}

/// The loops' side of the front: routing rule and where to hand over.
#[derive(Clone, Debug)]
pub struct HttpsHandoff {
    names: Arc<[String]>,
    tx: tokio::sync::mpsc::Sender<Handed>,
    metrics: FrontMetrics,
}

impl HttpsHandoff {
    /// The server names routed to HTTP whatever ALPN says.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Hands `conn` to the front; closed and counted when the front is
    /// full or gone.
    pub fn hand(&self, conn: Handed) {
        self.metrics.routed_https.inc();
        if self.tx.try_send(conn).is_err() {
            self.metrics.refused_full.inc();
        }
    }

    /// Counts a TLS connection the loop keeps for TURN.
    pub fn kept_for_turn(&self) {
        self.metrics.routed_turn.inc();
    }
}

#[derive(Clone, Debug)]
struct FrontMetrics {
    routed_turn: IntCounter,
    routed_https: IntCounter,
    connections: IntGauge,
    forwarded: IntCounter,
    upgraded: IntCounter,
    bad_request: IntCounter,
    handshake_failed: IntCounter,
    backend_failed: IntCounter,
    refused_full: IntCounter,
}

impl FrontMetrics {
    fn new(t: &Telemetry) -> FrontMetrics {
        let routed = t.counter_family(&cat::RELAY_TLS_ROUTED_TOTAL);
        let requests = t.counter_family(&cat::RELAY_HTTPS_REQUESTS_TOTAL);
        let r = |l: &str| requests.with_label_values(&[l]);
        FrontMetrics {
            routed_turn: routed.with_label_values(&["turn"]),
            routed_https: routed.with_label_values(&["https"]),
            connections: t.gauge(&cat::RELAY_HTTPS_CONNECTIONS),
            forwarded: r("forwarded"),
            upgraded: r("upgraded"),
            bad_request: r("bad_request"),
            handshake_failed: r("handshake_failed"),
            backend_failed: r("backend_failed"),
            refused_full: r("refused_full"),
        }
    }
}

/// Starts the front on a thread of its own; the handle goes to the loops.
pub fn start(
    route: HttpsRoute,
    tls: Arc<TlsReloader>,
    telemetry: &Telemetry,
) -> anyhow::Result<HttpsHandoff> {
    let metrics = FrontMetrics::new(telemetry);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Handed>(QUEUE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let m = metrics.clone();
    let backend: Arc<str> = route.backend.clone().into();
    std::thread::Builder::new()
        .name("natrix-https".into())
        .spawn(move || {
            runtime.block_on(async move {
                let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
                let per_ip = Arc::new(PerIp::default());
                while let Some(conn) = rx.recv().await {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        m.refused_full.inc();
                        continue;
                    };
                    let Some(held) = per_ip.take(conn.client.ip()) else {
                        m.refused_full.inc();
                        continue;
                    };
                    let (m, tls, backend) = (m.clone(), tls.clone(), backend.clone());
                    tokio::spawn(async move {
                        m.connections.inc();
                        serve(conn, &tls, &backend, &m).await;
                        m.connections.dec();
                        drop((permit, held));
                    });
                }
            });
        })?;
    Ok(HttpsHandoff {
        names: route.names.into(),
        tx,
        metrics,
    })
}

/// Connections per client address.
#[derive(Debug, Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection counted against its address; released when dropped.
struct Held(Arc<PerIp>, std::net::IpAddr);

impl PerIp {
    /// Counts a connection from `ip`; `None` at the cap.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Held> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(Held(self.clone(), ip))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// The socket with the bytes the loop already read in front of it.
struct Replayed {
    head: Vec<u8>,
    at: usize,
    socket: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// True at most once per 10 s (the backend-failure log line).
fn log_backend_failure() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    now >= last.saturating_add(10)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// One HTTPS connection: handshake, then its requests to the backend.
async fn serve(conn: Handed, tls: &TlsReloader, backend: &str, m: &FrontMetrics) {
    let Ok(socket) = TcpStream::from_std(conn.socket) else {
        return;
    };
    let mut config = (*tls.config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_secret_extraction = false;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let replayed = Replayed {
        head: conn.head,
        at: 0,
        socket,
    };
    let client = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(replayed)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            m.handshake_failed.inc();
            debug!(client = %conn.client, error = %e, "HTTPS handshake failed");
            return;
        }
        Err(_) => {
            m.handshake_failed.inc();
            return;
        }
    };
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
        Ok(Ok(s)) => s,
        outcome => {
            m.backend_failed.inc();
            let error = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            // Once per 10 s at most: every connection fails the same way
            // while the backend is down (the metric counts them all).
            if log_backend_failure() {
                warn!(backend, error, "the HTTPS front cannot reach its backend");
            }
            let mut client = client;
            let _ = client
                .write_all(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            let _ = client.shutdown().await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_backend, mut to_backend) = upstream.into_split();
    // Answers flow back as they come; requests go one at a time, each head
    // rewritten.
    let answers = async {
        let _ = tokio::io::copy(&mut from_backend, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    // A refused request ends the connection once the backend has answered
    // what came before it.
    let requests = async {
        let stop = forward_requests(&mut from_client, &mut to_backend, conn.client.ip(), m).await;
        if stop == Stop::BadRequest {
            debug!(client = %conn.client, "HTTPS front refused a request head");
        }
        let _ = to_backend.shutdown().await;
    };
    tokio::join!(answers, requests);
}

/// Why a connection's requests stopped being forwarded.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The client closed, idled past the deadline, or the backend went.
    Ended,
    /// A head that is not HTTP/1.x, too large, or a chunked body.
    BadRequest,
}

/// Forwards the requests read from `client` to `backend` until one side
/// ends: each head with `X-Forwarded-For: ip` (the client's own such
/// headers removed), then its body by its length; after an upgrade, bytes
/// as they come.
async fn forward_requests(
    client: &mut (impl AsyncRead + Unpin),
    backend: &mut (impl AsyncWrite + Unpin),
    ip: std::net::IpAddr,
    m: &FrontMetrics,
) -> Stop {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read until a complete head.
        let head_end = loop {
            if let Some(end) = find_head_end(&buf) {
                break end;
            }
            if buf.len() >= MAX_HEAD {
                m.bad_request.inc();
                return Stop::BadRequest;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(HEAD_TIMEOUT, client.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Stop::Ended,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(request) = rewrite_head(&buf[..head_end], ip) else {
            m.bad_request.inc();
            return Stop::BadRequest;
        };
        buf.drain(..head_end);
        if backend.write_all(&request.head).await.is_err() {
            return Stop::Ended;
        }
        if request.upgrade {
            m.upgraded.inc();
            if backend.write_all(&buf).await.is_err() {
                return Stop::Ended;
            }
            let _ = tokio::io::copy(client, backend).await;
            return Stop::Ended;
        }
        m.forwarded.inc();
        // The body: what was read with the head first, then the rest.
        let mut left = request.body;
        let now = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if backend.write_all(&buf[..now]).await.is_err() {
            return Stop::Ended;
        }
        buf.drain(..now);
        left -= now as u64;
        if left > 0 {
            let mut body = (&mut *client).take(left);
            match tokio::io::copy(&mut body, backend).await {
                Ok(n) if n == left => {}
                _ => return Stop::Ended,
            }
        }
    }
}

/// Where a request head ends (after its blank line).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A request head as the backend gets it.
#[derive(Debug)]
struct Request {
    head: Vec<u8>,
    /// The body's length (Content-Length; 0 without).
    body: u64,
    /// An upgrade (WebSocket): bytes pass through after the head.
    upgrade: bool,
}

/// Parses a head and rewrites it: `X-Forwarded-For`, `Forwarded` and
/// `X-Forwarded-Proto` from the client go, ours come. `None` for what is
/// not an HTTP/1.x request with a usable body length.
fn rewrite_head(head: &[u8], ip: std::net::IpAddr) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let (method, path) = (req.method?, req.path?);
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(format!(" HTTP/1.{}\r\n", req.version?).as_bytes());
    let (mut body, mut upgrade, mut lengths) = (0u64, false, 0);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("forwarded")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
        {
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            body = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        }
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if lengths > 1 {
        // Two lengths: a smuggling attempt.
        return None;
    }
    out.extend_from_slice(
        format!("x-forwarded-for: {ip}\r\nx-forwarded-proto: https\r\n\r\n").as_bytes(),
    );
    Some(Request {
        head: out,
        body,
        upgrade,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_alpn_or_a_named_host_is_http_everything_else_turn() {
        let names = vec!["api.example.com".to_string()];
        let alpn = |ps: &'static [&'static [u8]]| Some(ps.iter().copied());
        assert!(wants_http(alpn(&[b"h2", b"http/1.1"]), None, &names));
        assert!(wants_http(
            alpn(&[b"http/1.1"]),
            Some("turn.example.com"),
            &names
        ));
        assert!(!wants_http(
            alpn(&[b"stun.turn", b"http/1.1"]),
            None,
            &names
        ));
        assert!(!wants_http(alpn(&[b"stun.turn"]), None, &names));
        assert!(!wants_http(None::<std::iter::Empty<&[u8]>>, None, &names));
        assert!(!wants_http(
            None::<std::iter::Empty<&[u8]>>,
            Some("turn.example.com"),
            &names
        ));
        assert!(wants_http(
            None::<std::iter::Empty<&[u8]>>,
            Some("API.example.com"),
            &names
        ));
    }

    #[test]
    fn heads_name_the_client_and_lose_forged_forwarding_headers() {
        let ip: std::net::IpAddr = "192.0.2.7".parse().expect("ip");
        let r = rewrite_head(
            b"POST /v1/plan HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\nForwarded: for=1.2.3.4\r\nContent-Length: 12\r\n\r\n",
            ip,
        )
        .expect("a request");
        let head = String::from_utf8(r.head).expect("text");
        assert_eq!(r.body, 12);
        assert!(!r.upgrade);
        assert!(
            head.starts_with("POST /v1/plan HTTP/1.1\r\nHost: x\r\n"),
            "{head}"
        );
        assert!(
            !head.contains("10.0.0.1") && !head.contains("1.2.3.4"),
            "{head}"
        );
        assert!(head.ends_with("x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: https\r\n\r\n"));
        let ws = rewrite_head(
            b"GET /v1/signal HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            ip,
        )
        .expect("an upgrade");
        assert!(ws.upgrade);
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_connections() {
        let per_ip = Arc::new(PerIp::default());
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = (
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        );
        let mut held: Vec<Held> = (0..MAX_CONNECTIONS_PER_IP)
            .map(|_| per_ip.take(a).expect("under the cap"))
            .collect();
        assert!(per_ip.take(a).is_none(), "past the cap");
        assert!(per_ip.take(b).is_some(), "another address is not affected");
        held.pop();
        assert!(
            per_ip.take(a).is_some(),
            "a closed connection frees its place"
        );
        drop(held);
        assert_eq!(
            per_ip.0.lock().expect("lock").len(),
            0,
            "nothing kept for gone clients"
        );
    }

    #[test]
    fn chunked_bodies_double_lengths_and_garbage_are_refused() {
        let ip: std::net::IpAddr = "192.0.2.7".parse().expect("ip");
        for bad in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(
                rewrite_head(bad, ip).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

//! The relay host: data-plane loops that drive the sans-IO core on real
//! sockets.
//!
//! One loop per core, each a plain thread with its own `mio` poller, its own
//! [`Server`] and its own sockets: the TURN listeners are bound once per loop
//! with SO_REUSEPORT (the kernel spreads clients by flow hash, so a client
//! always reaches the same loop). Nothing on the packet path is shared
//! between loops: no lock, no channel, no allocation. The relay port pool is
//! shared, behind a lock taken only when an allocation starts or ends.
//! Control reaches a loop through its waker and an atomic flag, checked
//! between batches.

mod event_loop;
mod stream;
mod tls;

pub use tls::TlsReloader;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use natrix_net::{SyncUdp, UdpOptions, bind_udp, ensure_tcp_free, ensure_udp_free};
use natrix_telemetry::Telemetry;
use tracing::{info, warn};

use crate::config::RelayConfig;
use crate::control::{Control, ReloadActor, SecretSource};
use crate::core::{Server, SharedPorts, Transport};
use crate::metrics::RelayMetrics;

/// Answers the STUN messages a relay leaves to another role: Binding
/// requests and indications, RFC 3489 messages, and the connection-data
/// exchange. In `natrix up` the CDX role plugs in here, so one listener on
/// 3478 serves both roles.
pub trait BindingDelegate: Send {
    /// Handles `packet` from `from`, received on the socket bound to `local`
    /// (with destination IP `to_ip` on wildcard UDP sockets); returns the
    /// length of an answer written into `out`, or `None` to send nothing.
    fn handle(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        local: (SocketAddr, Option<std::net::IpAddr>),
        transport: Transport,
        out: &mut [u8],
    ) -> Option<usize>;

    /// Handles a frame from a TCP or TLS client, like [`handle`]; the
    /// delegate may also attach an [`StreamOutbox`] to the connection for
    /// frames it produces later (the exchange's deliveries), which the loop
    /// drains and writes to it until the connection closes.
    ///
    /// [`handle`]: BindingDelegate::handle
    fn handle_stream(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        out: &mut [u8],
        outbox: &mut Option<Box<dyn StreamOutbox>>,
    ) -> Option<usize> {
        let _ = outbox;
        self.handle(packet, from, (local, None), transport, out)
    }

    /// Publishes counters; called when the loop publishes its own.
    fn flush(&mut self) {}
}

/// Frames a delegate sends on a TCP or TLS connection after the fact
/// (answers computed elsewhere). The loop polls every connection that has
/// one at least every [`OUTBOX_POLL`].
pub trait StreamOutbox: Send {
    /// The next whole frame to write, if one is waiting.
    fn poll(&mut self) -> Option<Vec<u8>>;

    /// The delegate's own type, to reach its state on later frames.
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

/// How long an outbox frame may wait for the loop.
pub const OUTBOX_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Makes one delegate per loop.
pub type DelegateFactory = Arc<dyn Fn() -> Box<dyn BindingDelegate> + Send + Sync>;

/// True for messages a [`BindingDelegate`] takes: STUN Binding and the
/// exchange methods (any class), and anything without the RFC 5389 magic
/// cookie.
#[inline]
pub(crate) fn is_binding(packet: &[u8]) -> bool {
    use natrix_wire::Method;
    // STUN's first two bits are zero (ChannelData starts 0b01).
    if packet.len() < 20 || packet[0] & 0xC0 != 0 {
        return false;
    }
    let t = u16::from_be_bytes([packet[0], packet[1]]);
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    method == Method::BINDING.value()
        || method == Method::EXCHANGE_POST.value()
        || method == Method::EXCHANGE_DELIVER.value()
        || packet[4..8] != natrix_wire::MAGIC_COOKIE.to_be_bytes()
}

/// A running relay: its loops and how to stop them.
#[derive(Debug)]
pub struct RelayHost {
    loops: Vec<(JoinHandle<()>, Arc<mio::Waker>)>,
    stop: Arc<AtomicBool>,
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    tls_config: Option<Arc<TlsReloader>>,
    control: Arc<Control>,
    secrets: Option<SecretSource>,
    /// A clone of the first loop's socket per UDP listener, for senders
    /// outside the loops (the exchange actor in `natrix up`).
    udp_clones: Vec<std::net::UdpSocket>,
    /// Credentials from the command line, rebuilt around rotated secrets.
    base_credentials: crate::core::Credentials,
}

/// Binds a TCP listener that several loops share (SO_REUSEPORT).
fn bind_shared_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

impl RelayHost {
    /// Binds every listener of `loops` loops and starts them.
    pub fn start(
        config: &RelayConfig,
        loops: usize,
        telemetry: &Telemetry,
        delegate: Option<DelegateFactory>,
    ) -> anyhow::Result<RelayHost> {
        let loops = loops.max(1);
        let credentials = config.credentials().map_err(anyhow::Error::msg)?;
        let policy = config.policy();
        let metrics = RelayMetrics::new(telemetry);
        telemetry
            .gauge(&natrix_telemetry::catalogue::RELAY_ALLOCATION_CAPACITY)
            .set(i64::try_from(config.max_allocations).unwrap_or(i64::MAX));
        if !natrix_net::raise_fd_limit() {
            warn!("could not raise the open-file limit; allocations may fail early");
        }

        let tls_config = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(TlsReloader::load(cert, key)?)),
            _ => None,
        };

        // Bind everything first so that a taken port fails the start.
        let mut bound = Vec::new();
        let mut udp_addrs = Vec::new();
        let mut tcp_addrs = Vec::new();
        let mut tls_addrs: Vec<SocketAddr> = Vec::new();
        let mut udp_clones = Vec::new();
        for shard in 0..loops {
            let mut udp = Vec::new();
            let mut tcp = Vec::new();
            let mut tls = Vec::new();
            if tls_config.is_some() {
                for (i, requested) in config.tls_listen.iter().enumerate() {
                    let addr = if shard == 0 {
                        ensure_tcp_free(*requested)
                            .with_context(|| format!("binding TURN TLS on {requested}"))?;
                        *requested
                    } else {
                        tls_addrs[i]
                    };
                    let listener = bind_shared_tcp(addr)
                        .with_context(|| format!("binding TURN TLS on {addr}"))?;
                    if shard == 0 {
                        tls_addrs.push(listener.local_addr()?);
                    }
                    tls.push(listener);
                }
            }
            for (i, requested) in config.listen.iter().enumerate() {
                // Port 0: the first loop picks, the others join it.
                let addr = if shard == 0 {
                    ensure_udp_free(*requested)
                        .with_context(|| format!("binding TURN UDP on {requested}"))?;
                    *requested
                } else {
                    udp_addrs[i]
                };
                let socket = bind_udp(addr, &UdpOptions::default())
                    .with_context(|| format!("binding TURN UDP on {addr}"))?;
                let socket = SyncUdp::new(socket)
                    .with_context(|| format!("configuring TURN UDP on {addr}"))?;
                if shard == 0 {
                    udp_addrs.push(socket.local_addr());
                    udp_clones.push(
                        socket
                            .socket()
                            .try_clone()
                            .with_context(|| format!("cloning TURN UDP socket {addr}"))?,
                    );
                }
                udp.push(socket);
                if config.tcp {
                    let addr = if shard == 0 {
                        let addr = SocketAddr::new(requested.ip(), udp_addrs[i].port());
                        ensure_tcp_free(addr)
                            .with_context(|| format!("binding TURN TCP on {addr}"))?;
                        addr
                    } else {
                        tcp_addrs[i]
                    };
                    let listener = bind_shared_tcp(addr)
                        .with_context(|| format!("binding TURN TCP on {addr}"))?;
                    if shard == 0 {
                        tcp_addrs.push(listener.local_addr()?);
                    }
                    tcp.push(listener);
                }
            }
            bound.push((udp, tcp, tls));
        }

        let ports = SharedPorts::new(config.ports);
        let control = Arc::new(Control::new(credentials.clone(), loops));
        let secrets = config
            .auth_secret_file
            .as_ref()
            .map(|path| SecretSource { path: path.clone() });
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (shard, (udp, tcp, tls)) in bound.into_iter().enumerate() {
            let seed: [u8; 32] = rand::random();
            let core = Server::new(
                config.server_config(),
                credentials.clone(),
                policy.clone(),
                ports.clone(),
                Instant::now(),
                unix_now,
                seed,
            );
            let (event_loop, waker) = event_loop::EventLoop::new(
                core,
                event_loop::Listeners { udp, tcp, tls },
                tls_config.clone(),
                metrics.clone(),
                stop.clone(),
                delegate.as_ref().map(|make| make()),
                event_loop::LoopSettings {
                    control: control.clone(),
                    shard,
                    max_streams: config.max_connections.div_ceil(loops).max(1),
                    idle_timeout: config.idle_timeout,
                },
            )
            .context("setting up a relay loop")?;
            control.add_waker(waker.clone());
            let handle = std::thread::Builder::new()
                .name(format!("natrix-relay-{shard}"))
                .spawn(move || event_loop.run())
                .context("spawning a relay loop")?;
            handles.push((handle, waker));
        }
        info!(
            udp = ?udp_addrs,
            tcp = ?tcp_addrs,
            tls = ?tls_addrs,
            loops,
            external_ip = %config.external_v4(),
            ports = %config.ports,
            "TURN relay serving"
        );
        Ok(RelayHost {
            loops: handles,
            stop,
            udp: udp_addrs,
            tcp: tcp_addrs,
            tls: tls_addrs,
            tls_config,
            control,
            secrets,
            udp_clones,
            base_credentials: config.base_credentials().map_err(anyhow::Error::msg)?,
        })
    }

    /// Clones of the UDP listener sockets (same address and port), with
    /// their bound addresses: for a sender outside the loops, such as the
    /// exchange actor answering on the relay's listener in `natrix up`.
    pub fn udp_socket_clones(&self) -> std::io::Result<Vec<(SocketAddr, std::net::UdpSocket)>> {
        self.udp_clones
            .iter()
            .map(|s| Ok((s.local_addr()?, s.try_clone()?)))
            .collect()
    }

    /// The bound UDP listener addresses.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// The bound TCP listener addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// The bound TLS listener addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }

    /// The control-plane handle: drain, credentials, live allocations.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The actor that reloads certificates and secrets; start it in an
    /// actix system (send it [`crate::control::Reload`] on SIGHUP).
    pub fn reload_actor(&self) -> ReloadActor {
        ReloadActor::new(
            self.control.clone(),
            self.tls_config.clone(),
            self.secrets.clone(),
            self.base_credentials.clone(),
        )
    }

    /// Stops every loop and waits for them.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, waker) in &self.loops {
            let _ = waker.wake();
        }
        for (handle, _) in self.loops {
            if handle.join().is_err() {
                warn!("a relay loop panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_binding;
    use natrix_wire::{Class, Encoder, MessageType, Method, TransactionId};

    fn message(method: Method, class: Class) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        let enc = Encoder::new(
            &mut buf,
            MessageType::new(method, class),
            &TransactionId([1; 12]),
        )
        .expect("a header fits");
        let n = enc.finish();
        buf.truncate(n);
        buf
    }

    #[test]
    fn the_delegate_gets_binding_and_exchange_messages_and_nothing_of_turn() {
        for (m, c) in [
            (Method::BINDING, Class::Request),
            (Method::BINDING, Class::Indication),
            (Method::EXCHANGE_POST, Class::Request),
            (Method::EXCHANGE_DELIVER, Class::Success),
        ] {
            assert!(is_binding(&message(m, c)), "{m:?} {c:?}");
        }
        for m in [
            Method::ALLOCATE,
            Method::REFRESH,
            Method::SEND,
            Method::CHANNEL_BIND,
        ] {
            assert!(!is_binding(&message(m, Class::Request)), "{m:?}");
        }
        let mut channel_data = vec![0x40, 0x00, 0x00, 0x10];
        channel_data.extend_from_slice(&[0; 16]);
        assert!(!is_binding(&channel_data));
    }
}

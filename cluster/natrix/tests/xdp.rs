//! The XDP fast path (`--xdp`) in a lab of network namespaces, with real
//! packets from a client nobody here wrote:
//!
//! ```text
//!   xg (coturn's client, 10.201.1.2) ─ veth ─ xr (the relay: 10.201.1.1,
//!   10.201.2.1; XDP on both ends) ─ veth ─ xp (an echo peer, 10.201.2.2)
//! ```
//!
//! Needs root, iproute2 and a natrix built with its XDP program (clang and
//! libbpf-dev at build time, installed by `.ci/install-deps`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{InNs, PASSWORD, USER, sh, tool};
use natrix_wire::{Attribute, AttributeType, ChannelData, ChannelNumber, Message, Method};

const NAMESPACES: [&str; 3] = ["xg", "xr", "xp"];

/// The tests share the namespaces: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The namespaces, removed when dropped.
struct Lab {
    dir: std::path::PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Lab {
    fn up() -> Lab {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Lab::down();
        sh(r#"
ip netns add xg; ip netns add xr; ip netns add xp
for n in xg xr xp; do ip -n $n link set lo up; done
ip link add xg0 netns xg type veth peer name xr0 netns xr
ip link add xp0 netns xp type veth peer name xr1 netns xr
ip -n xg addr add 10.201.1.2/24 dev xg0; ip -n xg link set xg0 up
ip -n xg addr add 10.201.1.66/24 dev xg0 # the attacker's
ip -n xg addr add fd01:201:1::2/64 dev xg0 nodad
ip -n xg -6 route add default via fd01:201:1::1
ip -n xg route add default via 10.201.1.1
ip -n xr addr add 10.201.1.1/24 dev xr0; ip -n xr link set xr0 up
ip -n xr addr add 10.201.2.1/24 dev xr1; ip -n xr link set xr1 up
ip -n xr addr add fd01:201:1::1/64 dev xr0 nodad
ip -n xr addr add fd01:201:2::1/64 dev xr1 nodad
ip -n xp addr add 10.201.2.2/24 dev xp0; ip -n xp link set xp0 up
ip -n xp route add default via 10.201.2.1
ip -n xp addr add fd01:201:2::2/64 dev xp0 nodad
ip -n xp -6 route add default via fd01:201:2::1
ip netns exec xr sysctl -qw net.ipv4.conf.all.forwarding=1
ip netns exec xr sysctl -qw net.ipv6.conf.all.forwarding=1
# A veth hands locally sent datagrams on with their UDP checksum still
# partial (to be completed by an offload that never comes); XDP rewrites
# them as the complete ones a real network delivers: the client and peer
# compute theirs in full.
ip netns exec xg ethtool -K xg0 tx off >/dev/null
ip netns exec xp ethtool -K xp0 tx off >/dev/null
"#);
        // A veth takes frames redirected into it only when the far end runs
        // XDP: a pass-through program on the client's and the peer's ends.
        let dir = std::env::temp_dir().join(format!("natrix-xdp-lab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("pass.c"),
            "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
             SEC(\"xdp\") int pass(struct xdp_md *c) { return XDP_PASS; }\n\
             char LICENSE[] SEC(\"license\") = \"GPL\";\n",
        )
        .unwrap();
        let arch_include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        let out = Command::new(tool("clang"))
            .args(["-O2", "-target", "bpf", &arch_include, "-c"])
            .arg(dir.join("pass.c"))
            .arg("-o")
            .arg(dir.join("pass.o"))
            .output()
            .expect("running clang (Debian packages clang, libbpf-dev)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pass = dir.join("pass.o").display().to_string();
        sh(&format!(
            "ip -n xg link set dev xg0 xdp obj {pass} sec xdp\n\
             ip -n xp link set dev xp0 xdp obj {pass} sec xdp"
        ));
        Lab { dir, _turn: turn }
    }

    fn down() {
        common::delete_netns(&NAMESPACES);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        Lab::down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay's metrics, read inside its namespace.
fn metrics() -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "xr",
            "curl",
            "-s",
            "http://10.201.1.1:9090/metrics",
        ])
        .output()
        .expect("running curl in the relay's namespace");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(series: &str) -> f64 {
    common::try_metric_value(&metrics(), series).unwrap_or(0.0)
}

/// Waits until `series` satisfies `pred`; panics after 10 s.
fn wait_metric(series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(series);
        if pred(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {v} after 10 s:\n{}",
            metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// coturn's client in the client's namespace: `clients` allocations, each
/// sending `messages` of 160 bytes over a channel to an echo peer in the
/// peer's namespace (returned: it stops when dropped).
fn channels_to_echo_peer(messages: u32, clients: u32) -> (InNs, common::UclientReport) {
    let peer = InNs::spawn(
        "xp",
        &tool("turnutils_peer"),
        &["-L", "10.201.2.2", "-p", "3480"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (n, m) = (messages.to_string(), clients.to_string());
    let report = common::uclient_in(
        "xg",
        &[
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-p",
            "3478",
            "-e",
            "10.201.2.2",
            "-r",
            "3480",
            "-c",
            "-n",
            &n,
            "-m",
            &m,
            "-l",
            "160",
            "10.201.1.1",
        ],
    );
    (peer, report)
}

fn relay(extra: &[&str]) -> InNs {
    // A private network: its private address is the one to relay on.
    let mut args = vec!["--relay-ip", "10.201.2.1", "--external-ip", "10.201.2.1"];
    args.extend_from_slice(extra);
    common::relay_in_ns(
        "xr",
        ("10.201.1.1:3478", "10.201.1.1:9090"),
        "10.201.0.0/16",
        "2",
        &args,
    )
}

/// A relay with XDP on both its interfaces (and `extra` flags), attached
/// and serving.
fn xdp_relay(extra: &[&str]) -> InNs {
    let mut args = vec!["--xdp", "xr0,xr1"];
    args.extend_from_slice(extra);
    let mut natrix = relay(&args);
    assert!(
        natrix.wait_for("XDP fast path attached"),
        "the relay did not attach its XDP program:\n{}",
        natrix.log()
    );
    assert!(natrix.wait_for("TURN relay serving"), "{}", natrix.log());
    natrix
}

/// coturn's client sends through channels to an echo peer across the
/// relay with XDP on both its interfaces: nothing lost, and the datagrams
/// of both directions were relayed by the XDP program (its counters, and
/// the relay's forwarded counters and usage that include them), not by the
/// sockets.
#[test]
fn channel_data_crosses_an_xdp_relay_in_the_kernel_without_loss() {
    let _lab = Lab::up();
    let natrix = xdp_relay(&[]);
    let (_peer, report) = channels_to_echo_peer(500, 4);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (2000, 2000, 0),
        "{}\n{}",
        report.output,
        natrix.log()
    );
    // The ChannelData went below the sockets, both ways (the channels are
    // bound before the first is sent): all but the first datagram to a
    // neighbour the relay had not resolved yet, which the kernel stack
    // sends (and resolves) for it.
    let at_least = |v: f64| v >= 1990.0;
    let to_peer = wait_metric("relay_xdp_packets_total{result=\"to_peer\"}", at_least);
    let to_client = wait_metric("relay_xdp_packets_total{result=\"to_client\"}", at_least);
    assert!(to_peer <= 2000.0 && to_client <= 2000.0, "{}", metrics());
    // The program's own CPU time is accounted (what "relay CPU" means with
    // XDP: the relay process has nothing left to do).
    assert!(
        metric("relay_xdp_program_seconds_total") > 0.0,
        "{}",
        metrics()
    );
    // The client deleted its allocations on leaving: their bindings left
    // the maps with them.
    wait_metric("relay_xdp_entries", |v| v == 0.0);
    // And the relay counts them as relayed (the loops read the kernel's
    // per-binding counters every second).
    wait_metric(
        "relay_forwarded_packets_total{direction=\"client_to_peer\"}",
        |v| v >= 2000.0,
    );
}

/// Where the kernel refuses what the fast path needs, `--xdp` names the
/// reason and the relay serves from userspace: here IPv4 forwarding is off
/// on the interface (the program's next-hop lookup needs it), and another
/// interface does not exist.
#[test]
fn a_relay_that_cannot_attach_xdp_says_why_and_relays_in_userspace() {
    let _lab = Lab::up();
    sh("ip netns exec xr sysctl -qw net.ipv4.conf.xr0.forwarding=0");
    let mut missing = relay(&["--xdp", "no-such-if0"]);
    assert!(
        missing.wait_for("XDP fast path unavailable"),
        "{}",
        missing.log()
    );
    assert!(
        missing.log().contains("no interface no-such-if0"),
        "{}",
        missing.log()
    );
    drop(missing);
    let mut natrix = relay(&["--xdp", "xr0,xr1"]);
    assert!(
        natrix.wait_for("XDP fast path unavailable"),
        "{}",
        natrix.log()
    );
    assert!(
        natrix.log().contains("IPv4 forwarding is off on xr0"),
        "{}",
        natrix.log()
    );
    assert!(natrix.wait_for("TURN relay serving"), "{}", natrix.log());
    let (_peer, report) = channels_to_echo_peer(100, 1);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (100, 100, 0),
        "{}",
        report.output
    );
    assert_eq!(metric("relay_xdp_packets_total{result=\"to_peer\"}"), 0.0);
}

// ------------------------------------------ channel lifetimes, real packets

/// A UDP socket bound to `addr` inside network namespace `ns` (a thread
/// enters the namespace to create it; the socket stays there).
fn udp_in(ns: &str, addr: &str) -> UdpSocket {
    let (ns, addr) = (ns.to_owned(), addr.to_owned());
    std::thread::spawn(move || {
        let handle = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on this thread only, with a namespace file we opened.
        let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "entering {ns}");
        let socket = UdpSocket::bind(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        socket
    })
    .join()
    .unwrap()
}

const SERVER: &str = "10.201.1.1:3478";
const CHANNEL: u16 = 0x4000;

/// A bare TURN client over UDP: every request is one the test chose.
struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    requests: common::Requests,
    relayed: SocketAddr,
}

impl Client {
    /// An IPv4 allocation over IPv4.
    fn allocate() -> Client {
        Client::allocate_from("10.201.1.2:0", SERVER)
    }

    /// An allocation of `server`'s family, from `local` in the client's
    /// namespace.
    fn allocate_from(local: &str, server: &str) -> Client {
        let server: SocketAddr = server.parse().unwrap();
        let mut client = Client {
            socket: udp_in("xg", local),
            server,
            requests: common::Requests::new(),
            relayed: "0.0.0.0:0".parse().unwrap(),
        };
        let family = if server.is_ipv6() { 2 } else { 1 };
        let udp = [
            Attribute::RequestedTransport(natrix_wire::transport::UDP),
            Attribute::RequestedAddressFamily(family),
        ];
        let answer = client.request(Method::ALLOCATE, &udp);
        client.relayed = match Message::parse(&answer)
            .unwrap()
            .decode(AttributeType::XOR_RELAYED_ADDRESS)
        {
            Some(Ok(Attribute::XorRelayedAddress(a))) => a,
            other => panic!("no relayed address: {other:?}"),
        };
        client
    }

    /// Sends a signed request (learning the nonce on 401/438) and returns
    /// its success answer; panics on any other.
    fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        for _ in 0..4 {
            let signed = !self.requests.nonce.is_empty();
            let req = self.requests.encode(method, attrs, signed);
            self.socket.send_to(&req, self.server).unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            let answer = loop {
                assert!(Instant::now() < deadline, "no answer to {method:?}");
                let mut buf = [0u8; 1500];
                let Ok(n) = self.socket.recv(&mut buf) else {
                    continue;
                };
                if n >= 20 && buf[8..20] == req[8..20] {
                    break buf[..n].to_vec();
                }
            };
            let msg = Message::parse(&answer).unwrap();
            match msg.decode(AttributeType::ERROR_CODE) {
                None => return answer,
                Some(Ok(Attribute::ErrorCode(e))) if matches!(e.code, 401 | 438) => {
                    self.requests.learn_nonce(&answer);
                }
                other => panic!("{method:?} refused: {other:?}"),
            }
        }
        panic!("{method:?}: no success after four tries")
    }

    /// A client with a channel to `peer`, warmed: the relay's neighbour
    /// entries resolved (the kernel path needs them) and what that relayed
    /// published by the loops.
    fn bound_to(peer: &UdpSocket) -> Client {
        Client::warmed(Client::allocate(), peer)
    }

    /// `client` with a channel to `peer`, warmed.
    fn warmed(mut client: Client, peer: &UdpSocket) -> Client {
        client.bind(peer.local_addr().unwrap());
        let _ = exchange(&client, peer, 1);
        let _ = kernel_since(by_kernel());
        client
    }

    fn bind(&mut self, peer: SocketAddr) {
        self.request(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(CHANNEL),
                Attribute::XorPeerAddress(peer),
            ],
        );
    }

    fn permit(&mut self, peer: SocketAddr) {
        self.request(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        );
    }
}

/// `n` each way, over the channel both ways.
fn all(n: usize) -> Crossed {
    Crossed {
        at_peer: n,
        channel_data: n,
        indications: 0,
    }
}

/// What crossed the relay in one exchange.
#[derive(Debug, Default, PartialEq)]
struct Crossed {
    /// Client → peer over the channel, as the peer received them.
    at_peer: usize,
    /// Peer → client as ChannelData on the channel.
    channel_data: usize,
    /// Peer → client as Data indications (no channel, a permission).
    indications: usize,
}

/// Sends `n` datagrams each way — the client's over the channel, the
/// peer's to the relayed address — and counts what arrived where.
fn exchange(client: &Client, peer: &UdpSocket, n: usize) -> Crossed {
    exchange_of(client, peer, n, 0)
}

/// [`exchange`] with payloads padded to `size` bytes.
fn exchange_of(client: &Client, peer: &UdpSocket, n: usize, size: usize) -> Crossed {
    let peer_addr = peer.local_addr().unwrap();
    let mut crossed = Crossed::default();
    let mut buf = [0u8; 1500];
    let padded = |text: String| {
        let mut bytes = text.into_bytes();
        bytes.resize(bytes.len().max(size), b'.');
        bytes
    };
    for i in 0..n {
        let mut out = [0u8; 1500];
        let len = ChannelData::encode(
            &mut out,
            ChannelNumber::new(CHANNEL).unwrap(),
            &padded(format!("to peer {i}")),
            false,
        )
        .unwrap();
        client.socket.send_to(&out[..len], client.server).unwrap();
        peer.send_to(&padded(format!("to client {i}")), client.relayed)
            .unwrap();
    }
    while let Ok((len, from)) = peer.recv_from(&mut buf) {
        if from == client.relayed && buf[..len].starts_with(b"to peer ") {
            crossed.at_peer += 1;
        }
    }
    while let Ok(len) = client.socket.recv(&mut buf) {
        let packet = &buf[..len];
        if let Ok(cd) = ChannelData::parse(packet) {
            if cd.channel == CHANNEL && cd.payload.starts_with(b"to client ") {
                crossed.channel_data += 1;
            }
        } else if let Ok(msg) = Message::parse(packet)
            && msg.method() == Method::DATA
            && matches!(
                msg.decode(AttributeType::XOR_PEER_ADDRESS),
                Some(Ok(Attribute::XorPeerAddress(a))) if a == peer_addr
            )
        {
            crossed.indications += 1;
        }
    }
    crossed
}

/// The kernel's relayed packets so far, both directions.
fn by_kernel() -> (f64, f64) {
    (
        metric("relay_xdp_packets_total{result=\"to_peer\"}"),
        metric("relay_xdp_packets_total{result=\"to_client\"}"),
    )
}

/// Waits for the loops to publish the kernel's counters (every second)
/// and returns how many packets each way the kernel relayed since
/// `before` (itself read when nothing was left unpublished).
fn kernel_since(before: (f64, f64)) -> (f64, f64) {
    std::thread::sleep(Duration::from_millis(1300));
    let now = by_kernel();
    (now.0 - before.0, now.1 - before.1)
}

fn dropped(reason: &str) -> f64 {
    metric(&format!(
        "relay_packets_dropped_total{{reason=\"{reason}\"}}"
    ))
}

/// The core's channel behaviours with real packets through the XDP lab,
/// on a relay whose permissions last 4 s and channels 20 s: the kernel
/// relays a bound channel both ways; a permission refresh carries its
/// entry on past the first expiry; an expired permission stops the kernel
/// and the relay alike (the datagrams dropped in userspace as
/// `no_permission`) until a new CreatePermission, which puts the channel
/// back in the kernel; a ChannelBind refresh carries the channel on; an
/// expired channel with a live permission leaves the kernel and the
/// relay delivers the peer's datagrams as Data indications (userspace's
/// rule, not a stale kernel entry); deallocation ends it all.
#[test]
fn channel_lifetimes_hold_in_the_kernel_with_real_packets() {
    let _lab = Lab::up();
    let natrix = xdp_relay(&["--permission-lifetime", "4s", "--channel-lifetime", "20s"]);
    assert!(
        natrix.log().contains("shorter than RFC 8656's"),
        "no warning about the short lifetimes:\n{}",
        natrix.log()
    );
    let peer = udp_in("xp", "10.201.2.2:3490");
    let peer_addr = peer.local_addr().unwrap();
    // The lifetimes' clock starts with a ChannelBind refresh.
    let mut client = Client::bound_to(&peer);
    client.bind(peer_addr);
    let t0 = Instant::now();
    // Each step happens at its time on the lifetimes' clock (a step that
    // comes late would test something else: it fails instead).
    let at = |secs: f64| {
        let due = t0 + Duration::from_secs_f64(secs);
        match due.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => assert!(t0.elapsed().as_secs_f64() < secs + 0.5, "late for {secs} s"),
        }
    };

    // Bound: both ways, in the kernel.
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), all(20));
    assert_eq!(kernel_since(k), (20.0, 20.0), "{}", metrics());

    // t = 2.5: CreatePermission → the permission lasts to 6.5 s; at 5 s
    // (past the first expiry) the kernel still relays.
    at(2.5);
    client.permit(peer_addr);
    at(5.0);
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), all(20));
    assert_eq!(kernel_since(k), (20.0, 20.0), "{}", metrics());

    // t = 8: the permission expired (6.5 s), the channel (20 s) did not:
    // nothing crosses, the kernel passed them up and userspace dropped.
    at(8.0);
    let (k, refused) = (by_kernel(), dropped("no_permission"));
    assert_eq!(exchange(&client, &peer, 20), Crossed::default());
    assert_eq!(kernel_since(k), (0.0, 0.0), "{}", metrics());
    assert!(dropped("no_permission") - refused >= 40.0, "{}", metrics());

    // A new permission puts the channel back in the kernel.
    client.permit(peer_addr);
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), all(20));
    assert_eq!(kernel_since(k), (20.0, 20.0), "{}", metrics());

    // ChannelBind again before the channel's 20 s (at about 12 s): the
    // channel lasts 20 s more. Past the first 20 s the kernel still relays.
    assert!(
        t0.elapsed() < Duration::from_millis(19_000),
        "late to rebind"
    );
    client.bind(peer_addr);
    let rebound = Instant::now();
    // The permission (4 s) is kept up meanwhile; the channel is not
    // refreshed again.
    let keep_permitted = |client: &mut Client, until: Instant| {
        while Instant::now() < until {
            client.permit(peer_addr);
            std::thread::sleep(Duration::from_millis(800));
        }
        client.permit(peer_addr);
    };
    keep_permitted(&mut client, t0 + Duration::from_millis(20_500));
    at(21.0);
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), all(20));
    assert_eq!(kernel_since(k), (20.0, 20.0), "{}", metrics());

    // Keep the permission alive past the channel's end: once the channel
    // expired, the client's ChannelData is dropped as unbound and the
    // peer's datagrams come as Data indications — from userspace.
    keep_permitted(&mut client, rebound + Duration::from_millis(20_300));
    let (k, unbound) = (by_kernel(), dropped("unbound_channel"));
    assert_eq!(
        exchange(&client, &peer, 20),
        Crossed {
            at_peer: 0,
            channel_data: 0,
            indications: 20
        }
    );
    assert_eq!(kernel_since(k), (0.0, 0.0), "{}", metrics());
    assert!(
        dropped("unbound_channel") - unbound >= 20.0,
        "{}",
        metrics()
    );
    wait_metric("relay_xdp_entries", |v| v == 0.0);

    // Bound again (the same pair revives), then deallocated: the entries
    // go with the allocation and nothing crosses.
    client.bind(peer_addr);
    wait_metric("relay_xdp_entries", |v| v >= 1.0);
    client.request(Method::REFRESH, &[Attribute::Lifetime(0)]);
    wait_metric("relay_xdp_entries", |v| v == 0.0);
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), Crossed::default());
    assert_eq!(kernel_since(k), (0.0, 0.0), "{}", metrics());
}

/// True when an XDP program is attached to `iface` in the relay's
/// namespace.
fn xdp_attached(iface: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", "xr", "link", "show", "dev", iface])
        .output()
        .expect("running ip");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// A draining relay (SIGTERM) keeps relaying its live channels in the
/// kernel until it exits; when it exits — at the drain timeout, or killed
/// outright with SIGKILL — its program leaves the interfaces with it:
/// no channel is relayed by a relay that is gone, and the next relay
/// attaches afresh.
#[test]
fn an_exiting_relay_takes_its_xdp_program_with_it() {
    let _lab = Lab::up();
    let peer = udp_in("xp", "10.201.2.2:3490");
    let all = all(20);
    for (signal, name) in [(libc::SIGTERM, "drain"), (libc::SIGKILL, "kill")] {
        let mut natrix = xdp_relay(&["--drain-timeout", "4s"]);
        assert!(xdp_attached("xr0") && xdp_attached("xr1"));
        let client = Client::bound_to(&peer);
        let k = by_kernel();
        assert_eq!(exchange(&client, &peer, 20), all, "{name}");
        assert_eq!(kernel_since(k), (20.0, 20.0), "{name}: {}", metrics());

        natrix.signal(signal);
        if signal == libc::SIGTERM {
            assert!(natrix.wait_for("draining"), "{}", natrix.log());
            // Draining: the live channel still crosses, in the kernel.
            assert_eq!(exchange(&client, &peer, 20), all, "while draining");
            assert!(xdp_attached("xr0"), "detached while draining");
        }
        natrix.wait_exit(Duration::from_secs(15));
        assert!(
            !xdp_attached("xr0") && !xdp_attached("xr1"),
            "{name}: the program outlived the relay"
        );
        assert_eq!(
            exchange(&client, &peer, 20),
            Crossed::default(),
            "{name}: relayed after the relay exited"
        );
    }
}

/// A bandwidth cap holds on the kernel path: with 20 000 bytes a second
/// per allocation, 100 datagrams of 1000 bytes each way at once cross as
/// one second's burst (about 20 in all, both directions sharing the
/// budget), relayed by the program; the program drops the rest and the
/// relay counts them as `bandwidth_exceeded`, as it does its own.
#[test]
fn a_bandwidth_cap_is_metered_in_the_kernel() {
    let _lab = Lab::up();
    let _natrix = xdp_relay(&["--bandwidth-per-allocation", "20000"]);
    let peer = udp_in("xp", "10.201.2.2:3490");
    // The warm-up's charge ages out of the budget while its counts are
    // published.
    let client = Client::bound_to(&peer);
    wait_metric("relay_xdp_entries", |v| v == 1.0);
    let (k, exceeded) = (by_kernel(), dropped("bandwidth_exceeded"));
    let crossed = exchange_of(&client, &peer, 100, 1000);
    let total = crossed.at_peer + crossed.channel_data;
    assert!(
        (18..=23).contains(&total),
        "one second's burst of 20 000 bytes, not {crossed:?}"
    );
    assert_eq!(crossed.indications, 0);
    let kernel = kernel_since(k);
    assert_eq!(
        kernel.0 + kernel.1,
        total as f64,
        "the kernel relayed what crossed: {}",
        metrics()
    );
    let over = wait_metric("relay_xdp_packets_total{result=\"capped\"}", |v| v >= 170.0);
    assert!(over <= 200.0 - total as f64 + 2.0, "{}", metrics());
    assert!(
        dropped("bandwidth_exceeded") - exceeded >= 170.0,
        "{}",
        metrics()
    );
}

/// A binary upgrade (SIGUSR2: the relay executes its binary in place and
/// the new image takes over sockets and allocations) with XDP on: the old
/// image's program leaves with it, the new image attaches its own and puts
/// the handed-over channels back in the kernel — the channel goes on
/// crossing, and in the kernel again, after the upgrade.
#[test]
fn channels_go_back_in_the_kernel_after_a_binary_upgrade() {
    let _lab = Lab::up();
    let mut natrix = xdp_relay(&[]);
    let peer = udp_in("xp", "10.201.2.2:3490");
    let client = Client::bound_to(&peer);
    let all = all(20);
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), all);
    assert_eq!(kernel_since(k), (20.0, 20.0), "{}", metrics());

    natrix.signal(libc::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while natrix.log().matches("XDP fast path attached").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the new image did not attach:\n{}",
            natrix.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        natrix.wait_for("took over the allocations of the previous binary"),
        "{}",
        natrix.log()
    );
    wait_metric("relay_xdp_entries", |v| v == 1.0);
    assert!(xdp_attached("xr0") && xdp_attached("xr1"));
    let _ = kernel_since(by_kernel());
    let k = by_kernel();
    assert_eq!(exchange(&client, &peer, 20), all, "after the upgrade");
    assert_eq!(
        kernel_since(k),
        (20.0, 20.0),
        "in the kernel after the upgrade: {}",
        metrics()
    );
}

/// The hostile-traffic suite's attacks on the relay's UDP paths, run
/// against an XDP relay in the lab (`natrix-loadtest attack` from the
/// client's namespace, the attacker on an address of its own): forged
/// ChannelData on a victim's channel number and others, datagrams to the
/// victim's relayed address from an unpermitted source, scans of other
/// relay ports and random garbage. The program passes every one of them
/// up (no entry matches) and userspace drops them; none is delivered, the
/// legitimate sessions lose nothing, and their channel data went on
/// crossing in the kernel during the attacks.
#[test]
fn forged_and_garbage_floods_do_not_cross_an_xdp_relay() {
    let _lab = Lab::up();
    let _natrix = xdp_relay(&[]);
    let (passed, to_peer) = (
        metric("relay_xdp_packets_total{result=\"passed\"}"),
        metric("relay_xdp_packets_total{result=\"to_peer\"}"),
    );
    let loadtest = common::loadtest().display().to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "xg",
            &loadtest,
            "--progress",
            "off",
            "attack",
        ])
        .args(["--attack", "channel-forgery,garbage"])
        .args(["--turn", SERVER, "--metrics", "10.201.1.1:9090"])
        .args(["--local", "10.201.1.2", "--attacker-ip", "10.201.1.66"])
        .args(["--user", USER, "--password", PASSWORD])
        .args(["--legit", "4", "--duration", "2s"])
        .output()
        .expect("running natrix-loadtest attack in the client's namespace");
    let attacks = common::attacks_held(&out);
    let forged = &attacks[0]["answers"];
    assert!(
        forged["datagrams forged"].as_u64().unwrap() > 10_000,
        "{forged}"
    );
    assert_eq!(forged["forged delivered"], 0, "{forged}");
    // The floods met the program and went up to userspace; the legitimate
    // channels were relayed in the kernel all along.
    let passed = wait_metric("relay_xdp_packets_total{result=\"passed\"}", |v| {
        v - passed > 10_000.0
    });
    let to_peer = wait_metric("relay_xdp_packets_total{result=\"to_peer\"}", |v| {
        v - to_peer > 100.0
    });
    println!(
        "{}\npassed {passed}, to_peer {to_peer}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// IPv6 end to end (client, listener, relayed address and peer all IPv6,
/// IPv6 forwarding on): the channel crosses both ways in the kernel, with
/// the UDP checksum carried through the IPv6 pseudo-header (the peer and
/// client sockets would drop a datagram with a wrong one).
#[test]
fn ipv6_channel_data_crosses_an_xdp_relay_in_the_kernel() {
    let _lab = Lab::up();
    let natrix = xdp_relay(&[
        "--turn-listen",
        "[fd01:201:1::1]:3478",
        "--relay-ipv6",
        "fd01:201:2::1",
        "--peer-allow",
        "fd01:201::/32",
    ]);
    assert!(natrix.log().contains("\"ipv6\":true"), "{}", natrix.log());
    let peer = udp_in("xp", "[fd01:201:2::2]:3490");
    let client = Client::allocate_from("[fd01:201:1::2]:0", "[fd01:201:1::1]:3478");
    assert!(client.relayed.is_ipv6(), "{}", client.relayed);
    let client = Client::warmed(client, &peer);
    wait_metric("relay_xdp_entries", |v| v == 1.0);
    let k = by_kernel();
    assert_eq!(
        exchange_of(&client, &peer, 20, 1000),
        all(20),
        "{}",
        natrix.log()
    );
    assert_eq!(kernel_since(k), (20.0, 20.0), "{}", metrics());
}

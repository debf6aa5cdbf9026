//! Shared harness of the `natrix` integration tests: start the real binary on
//! free loopback ports, wait until it is ready, talk to it, stop it by PID.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The TURN user the harness configures.
pub const USER: &str = "tester";
/// Its password.
pub const PASSWORD: &str = "test-password";
/// The realm the harness configures.
pub const REALM: &str = "natrix.test";
/// The lookup API key the harness starts `up` and `lookup` with, and the
/// HTTP helpers send.
pub const API_KEY: &str = "nxk_0123456789ab_0123456789abcdef0123456789abcdef";

/// A `natrix` process started by a test; killed (by PID) when dropped.
pub struct Natrix {
    child: Option<Child>,
    pub stun: SocketAddr,
    pub metrics: SocketAddr,
    /// The lookup API (`up` and `lookup`).
    pub lookup: SocketAddr,
    stderr_path: std::path::PathBuf,
}

/// A loopback port free on both UDP and TCP right now.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("binding a probe UDP socket");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A free loopback TCP port below the kernel's ephemeral range (32768 and
/// up) and the test relays' port ranges, for a server started after its
/// clients are told its address: a client retrying a connection to a port
/// in the ephemeral range can be handed that very port as its source and
/// connect to itself (TCP simultaneous open), and the server then finds the
/// port taken.
#[allow(dead_code)]
pub fn free_port_below_ephemeral() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(26_000..32_000u16);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 26000-31999");
}

/// `n` consecutive free loopback UDP ports below the ephemeral range, as
/// `MIN-MAX`.
pub fn free_udp_range(n: u16) -> String {
    for _ in 0..1000 {
        // Even: the loops are dealt an even and an odd port each.
        let base = rand::random_range(10_500..12_500u16) * 2;
        let probes: Vec<_> = (base..base + n)
            .map(|p| UdpSocket::bind(("127.0.0.1", p)))
            .collect();
        if probes.iter().all(Result::is_ok) {
            return format!("{base}-{}", base + n - 1);
        }
    }
    panic!("no {n} free UDP ports in 21000-25999");
}

/// Relay flags for allocations past the relay port range: `--relay-ports`
/// of a single free port and `--relay-multiplex-ports` of `shared` free
/// ports ([`free_udp_range`]).
pub struct PastTheRange {
    /// The flags, to pass on.
    pub flags: Vec<String>,
    /// With [`PastTheRange::held`]: the socket holding the relay port, so
    /// that no allocation gets a port of its own (keep it alive).
    pub holder: Option<UdpSocket>,
}

impl PastTheRange {
    /// The first allocation gets the relay port, the others share.
    pub fn free(shared: u16) -> PastTheRange {
        PastTheRange::with(free_port(), shared, None)
    }

    /// The relay port is held here: every allocation shares.
    pub fn held(shared: u16) -> PastTheRange {
        let holder = UdpSocket::bind("127.0.0.1:0").expect("binding the port holder");
        let port = holder.local_addr().expect("local addr").port();
        PastTheRange::with(port, shared, Some(holder))
    }

    fn with(port: u16, shared: u16, holder: Option<UdpSocket>) -> PastTheRange {
        let flags = vec![
            "--relay-ports".to_owned(),
            format!("{port}-{port}"),
            "--relay-multiplex-ports".to_owned(),
            free_udp_range(shared),
        ];
        PastTheRange { flags, holder }
    }

    /// The flags followed by `extra`, as a command line takes them.
    pub fn and<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        self.flags
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .collect()
    }
}

/// The load tester built beside the binary under test.
pub fn loadtest() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_natrix")).with_file_name("natrix-loadtest");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (.ci/test does)",
        bin.display()
    );
    bin
}

impl Natrix {
    /// `natrix up` on free loopback ports, ready to answer, with the test
    /// user [`USER`]:[`PASSWORD`].
    pub fn up(extra: &[&str]) -> Natrix {
        Natrix::start("up", extra)
    }

    /// `natrix relay` on free loopback ports, with the test user.
    pub fn relay(extra: &[&str]) -> Natrix {
        Natrix::start("relay", extra)
    }

    /// `natrix cdx` on free loopback ports.
    pub fn cdx(extra: &[&str]) -> Natrix {
        Natrix::start("cdx", extra)
    }

    /// `natrix lookup` with its API on a free loopback port (`lookup`);
    /// `extra` must give the secrets.
    pub fn lookup(extra: &[&str]) -> Natrix {
        Natrix::start("lookup", extra)
    }

    fn start(cmd: &str, extra: &[&str]) -> Natrix {
        Natrix::launch(&[env!("CARGO_BIN_EXE_natrix")], cmd, extra)
    }

    /// `cmd` as [`Natrix::up`] and the others start it, but run by
    /// `launcher` (the program and its first arguments: an installed
    /// binary, or `chroot` into an image).
    pub fn launch(launcher: &[&str], cmd: &str, extra: &[&str]) -> Natrix {
        // Free ports can be taken between the probe and the bind: retry.
        let mut last = String::new();
        for _ in 0..5 {
            match Natrix::try_start(launcher, cmd, extra) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
        }
        panic!("natrix did not start: {last}");
    }

    fn try_start(launcher: &[&str], cmd: &str, extra: &[&str]) -> Result<Natrix, String> {
        // A test may choose the TURN listener itself (e.g. a wildcard
        // address); the harness then talks to its port on 127.0.0.1.
        let chosen = extra
            .iter()
            .position(|a| *a == "--turn-listen" || *a == "--stun-listen")
            .and_then(|i| extra.get(i + 1))
            .and_then(|v| v.parse::<SocketAddr>().ok());
        let stun = match chosen {
            Some(addr) if addr.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], addr.port()))
            }
            Some(addr) => addr,
            None => SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let lookup = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stderr_path = std::env::temp_dir().join(format!(
            "natrix-test-{}-{}.log",
            std::process::id(),
            stun.port()
        ));
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let (program, first) = launcher.split_first().ok_or("no launcher")?;
        let child = Command::new(program)
            .args(first)
            .arg(cmd)
            .args(if cmd == "cdx" {
                if chosen.is_some() {
                    vec![]
                } else {
                    vec!["--stun-listen".to_string(), stun.to_string()]
                }
            } else if cmd == "lookup" {
                vec![
                    "--lookup-listen".to_string(),
                    lookup.to_string(),
                    "--api-key".to_string(),
                    API_KEY.to_string(),
                ]
            } else {
                let mut args = Vec::new();
                if chosen.is_none() {
                    args.push("--turn-listen".to_string());
                    args.push(stun.to_string());
                }
                args.extend([
                    "--user".to_string(),
                    format!("{USER}:{PASSWORD}"),
                    "--realm".to_string(),
                    REALM.to_string(),
                ]);
                if cmd == "up" {
                    args.extend([
                        "--lookup-listen".to_string(),
                        lookup.to_string(),
                        "--api-key".to_string(),
                        API_KEY.to_string(),
                    ]);
                }
                args
            })
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--log-format", "json"])
            .args(if extra.contains(&"--workers") {
                &[][..]
            } else {
                &["--workers", "2"][..]
            })
            .args(extra)
            .env_remove("NATRIX_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawning natrix: {e}"))?;
        let mut n = Natrix {
            child: Some(child),
            stun,
            metrics,
            lookup,
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = n.child_mut().try_wait().map_err(|e| e.to_string())? {
                return Err(format!("natrix exited with {status}: {}", n.log()));
            }
            if let Ok((200, _)) = http_get(metrics, "/readyz") {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("natrix not ready within 20 s: {}", n.log()))
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(None))
    }

    /// Waits (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("waiting for natrix") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "natrix still running after {within:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits (bounded) for the exit.
    pub fn signal_and_wait(&mut self, signal: i32, within: Duration) -> ExitStatus {
        // SAFETY: kill(2) on the PID of a child this harness spawned and has not reaped.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("waiting for natrix") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "natrix did not exit within {within:?} of signal {signal}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").expect("scraping /metrics");
        assert_eq!(status, 200, "/metrics answered {status}");
        body
    }

    /// Value of one series (`name{labels}` exactly as rendered), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics_text(), series)
    }

    /// Polls `series` until it exists and `pred` holds (counters are
    /// published periodically); fails the test when that does not happen
    /// within 10 s.
    pub fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        self.wait_until(
            series,
            || try_metric_value(&self.metrics_text(), series),
            pred,
        )
    }
}

impl Drop for Natrix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What a failing test needs to be understood: the refusals and
            // drops the process counted, and the end of its log.
            let counted: Vec<String> = http_get(self.metrics, "/metrics")
                .map(|(_, text)| text)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    (l.starts_with("relay_requests_refused_total")
                        || l.starts_with("relay_packets_dropped_total")
                        || l.starts_with("relay_auth_failures_total"))
                        && !l.ends_with(" 0")
                })
                .map(str::to_owned)
                .collect();
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "natrix under test (pid {}): {}\nlast log lines:\n{}",
                self.pid(),
                counted.join("\n"),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Finds `series value` in a Prometheus text exposition; fails the test
/// when the series is not there (a renamed or unregistered series must not
/// read as zero).
pub fn metric_value(text: &str, series: &str) -> f64 {
    try_metric_value(text, series)
        .unwrap_or_else(|| panic!("no series {series} in the exposition:\n{text}"))
}

/// Finds `series value` in a Prometheus text exposition, if it is there.
pub fn try_metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A minimal HTTP/1.1 GET with the harness's API key: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None, Some(API_KEY))
}

/// POSTs `body` (JSON) with the harness's API key to `addr` and returns
/// the status and body.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path, Some(body), Some(API_KEY))
}

/// One HTTP request on a fresh connection, with `key` as the bearer token
/// when given; the status, the headers and the body.
pub fn http_request_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let content = body.map_or(String::new(), |b| {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )
    });
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        // HTTP/1.0: no chunked answers to decode.
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {raw:?}")))?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    Ok((status, head.to_owned(), body.to_owned()))
}

/// One HTTP request on a fresh connection; the status and the body.
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_request_raw(addr, method, path, body, key).map(|(status, _, body)| (status, body))
}

/// Path of an external tool the test needs; fails loudly when missing
/// Writes a fresh self-signed certificate with common name `cn`, replacing
/// the files atomically (rename), as cert-manager or certbot do.
pub fn write_cert(dir: &std::path::Path, cn: &str) {
    let (cert_tmp, key_tmp) = (dir.join("cert.tmp"), dir.join("key.tmp"));
    let status = Command::new(tool("openssl"))
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-days", "2", "-nodes", "-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(&key_tmp)
        .arg("-out")
        .arg(&cert_tmp)
        .output()
        .expect("running openssl");
    assert!(status.status.success(), "openssl failed: {status:?}");
    std::fs::rename(&key_tmp, dir.join("key.pem")).expect("rename key");
    std::fs::rename(&cert_tmp, dir.join("cert.pem")).expect("rename cert");
}

/// A fresh directory (`natrix-<tag>-<pid>` under the temp dir) with a
/// certificate for `cn` from [`write_cert`]: the directory and the paths of
/// the certificate and key (remove the directory when done).
#[allow(dead_code)]
pub fn cert_dir(tag: &str, cn: &str) -> (std::path::PathBuf, String, String) {
    let dir = std::env::temp_dir().join(format!("natrix-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    write_cert(&dir, cn);
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    (dir, cert, key)
}

/// The common name of the certificate a handshake with 127.0.0.1:`port`
/// shows: TLS, or with `dtls` DTLS 1.2 (openssl's client).
#[allow(dead_code)]
pub fn served_cn(port: u16, dtls: bool) -> String {
    let version = if dtls { "-dtls1_2" } else { "" };
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 5 openssl s_client {version} -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -subject"
        ))
        .output()
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits (10 s at most) until a handshake with `port` shows `cn`; what it
/// showed last.
#[allow(dead_code)]
pub fn wait_for_cn(port: u16, cn: &str, dtls: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = served_cn(port, dtls);
        if seen.contains(cn) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (`.ci/install-deps` installs them).
pub fn tool(name: &str) -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return p.display().to_string();
        }
    }
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return p.display().to_string();
        }
    }
    panic!(
        "`{name}` is not installed; run .ci/install-deps (Debian packages coturn, prometheus, redis-server, nftables)"
    );
}

impl Natrix {
    /// Polls `read` until `pred` holds and returns that value; fails the
    /// test after 10 s, naming `what` and the last value read.
    pub fn wait_metric_with(
        &self,
        what: &str,
        read: impl Fn() -> f64,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        self.wait_until(what, || Some(read()), pred)
    }

    fn wait_until(
        &self,
        what: &str,
        read: impl Fn() -> Option<f64>,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = read();
            if let Some(v) = v.filter(|v| pred(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the expected value never came within 10 s (last read: {v:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A helper process (e.g. `turnutils_peer`) killed by PID when dropped.
pub struct Spawned(pub Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts coturn's `turnutils_peer` (a UDP echo peer) on a free loopback port.
pub fn udp_echo_peer() -> (Spawned, u16) {
    udp_echo_peer_on("127.0.0.1")
}

/// [`udp_echo_peer`] on address `ip` (e.g. `::1`).
pub fn udp_echo_peer_on(ip: &str) -> (Spawned, u16) {
    let port = free_port();
    let child = Command::new(tool("turnutils_peer"))
        .args(["-p", &port.to_string(), "-L", ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting turnutils_peer");
    // It binds at once; give it a moment to be scheduled.
    std::thread::sleep(Duration::from_millis(200));
    (Spawned(child), port)
}

/// What `turnutils_uclient` reported at the end of a run.
#[derive(Debug, Default)]
pub struct UclientReport {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub send_dropped: u64,
    pub output: String,
}

/// Runs `turnutils_uclient` with `args` and parses its totals.
pub fn uclient(args: &[&str]) -> UclientReport {
    let out = Command::new(tool("turnutils_uclient"))
        .args(args)
        .output()
        .expect("running turnutils_uclient");
    uclient_report(&out)
}

/// Runs `turnutils_uclient` with `args` in network namespace `ns`.
pub fn uclient_in(ns: &str, args: &[&str]) -> UclientReport {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, &tool("turnutils_uclient")])
        .args(args)
        .output()
        .expect("running turnutils_uclient in a namespace");
    uclient_report(&out)
}

/// Runs `turnutils_uclient` with `args` for at most `limit` (a client that
/// gets no answers retries for a minute): killed then, its totals so far.
#[allow(dead_code)]
pub fn uclient_within(args: &[&str], limit: Duration) -> UclientReport {
    let mut child = Command::new(tool("turnutils_uclient"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running turnutils_uclient");
    let deadline = Instant::now() + limit;
    while child
        .try_wait()
        .expect("waiting for turnutils_uclient")
        .is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child
        .wait_with_output()
        .expect("collecting turnutils_uclient's output");
    uclient_report(&out)
}

fn uclient_report(out: &std::process::Output) -> UclientReport {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = UclientReport {
        output: text.clone(),
        ..UclientReport::default()
    };
    let number_after = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    for line in text.lines() {
        if line.contains("start_mclient: tot_send_msgs=") {
            r.sent = number_after(line, "tot_send_msgs=").unwrap_or(0);
            r.received = number_after(line, "tot_recv_msgs=").unwrap_or(0);
        }
        if line.contains("Total lost packets") {
            r.lost = number_after(line, "Total lost packets").unwrap_or(u64::MAX);
            r.send_dropped = number_after(line, "total send dropped").unwrap_or(u64::MAX);
        }
    }
    r
}

/// The headless browser's path.
pub fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
        {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !path.is_empty() {
                return path;
            }
        }
    }
    panic!("Chromium is not installed; run .ci/install-deps (Debian package chromium)");
}

/// coturn's `turnserver` on a free loopback port, with the harness' user
/// (long-term credentials) or, given `secret`, the TURN REST API; relays to
/// loopback peers. Returns the server and its port; its PID is the child's.
pub fn coturn(secret: Option<&str>) -> (Spawned, u16) {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("natrix-coturn-{}-{port}.log", std::process::id()));
    let mut cmd = Command::new(tool("turnserver"));
    cmd.args([
        "-n",
        "--no-cli",
        "--listening-ip",
        "127.0.0.1",
        "--relay-ip",
        "127.0.0.1",
    ])
    .args(["--listening-port", &port.to_string(), "--realm", REALM])
    .args([
        "--allow-loopback-peers",
        "--no-tls",
        "--no-dtls",
        "--user-quota",
        "0",
    ])
    .args([
        "--total-quota",
        "0",
        "--min-port",
        "41000",
        "--max-port",
        "48000",
    ])
    .arg("--log-file")
    .arg(&log);
    match secret {
        Some(s) => cmd.args(["--use-auth-secret", "--static-auth-secret", s]),
        None => cmd.args(["--lt-cred-mech", "--user", &format!("{USER}:{PASSWORD}")]),
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting turnserver (Debian package coturn)");
    let server = Spawned(child);
    // Ready when it answers a Binding request.
    let probe = UdpSocket::bind("127.0.0.1:0").expect("a probe socket");
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("a timeout");
    let request = [
        0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        let _ = probe.send_to(&request, ("127.0.0.1", port));
        if probe.recv(&mut buf).is_ok() {
            return (server, port);
        }
    }
    panic!("turnserver did not answer on port {port} within 10 s");
}

/// The JSON report a tool printed on stdout; the test fails (with the
/// tool's output) when `what` exited non-zero.
pub fn stdout_report(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON report: {e}"))
}

/// HAProxy in front of a natrix TCP or TLS listener on `backend` (TCP
/// mode, `send-proxy-v2`): it, its port, and its configuration directory.
#[allow(dead_code)]
pub fn haproxy(backend: u16) -> (Spawned, u16, std::path::PathBuf) {
    let lb = free_port();
    let dir = std::env::temp_dir().join(format!("natrix-haproxy-{}-{lb}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for haproxy");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend turn\n  bind 127.0.0.1:{lb}\n  default_backend natrix\nbackend natrix\n  server n1 127.0.0.1:{backend} send-proxy-v2\n"
        ),
    )
    .expect("writing haproxy's configuration");
    let child = std::process::Command::new(tool("haproxy"))
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting haproxy");
    let spawned = Spawned(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", lb)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "haproxy never listened on {lb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (spawned, lb, dir)
}

/// The usage records in a relay's `--usage-file` (one JSON object a line);
/// empty when the file does not exist yet.
#[allow(dead_code)]
pub fn usage_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a usage record is one JSON object a line"))
        .collect()
}

/// A network namespace, deleted when dropped.
pub struct Netns(pub &'static str);

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&[self.0]);
    }
}

/// Deletes the network namespaces named (those that exist).
#[allow(dead_code)]
pub fn delete_netns(names: &[&str]) {
    for ns in names {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// `natrix relay` in namespace `ns` as the harness's test user, listening
/// for TURN on `listen` and metrics on `metrics`, relaying to `peer_allow`,
/// with `workers` loops and `extra` flags.
#[allow(dead_code)]
pub fn relay_in_ns(
    ns: &str,
    (listen, metrics): (&str, &str),
    peer_allow: &str,
    workers: &str,
    extra: &[&str],
) -> InNs {
    let user = format!("{USER}:{PASSWORD}");
    let mut args = vec![
        "relay",
        "--turn-listen",
        listen,
        "--user",
        &user,
        "--realm",
        REALM,
        "--peer-allow",
        peer_allow,
        "--metrics-listen",
        metrics,
        "--log-format",
        "json",
        "--workers",
        workers,
    ];
    args.extend_from_slice(extra);
    InNs::spawn(ns, env!("CARGO_BIN_EXE_natrix"), &args)
}

/// A relay with TURN over TLS on a free loopback port, a certificate for
/// `cn` (in a fresh directory tagged `tag`) and `extra` flags: the relay,
/// its TLS port and the certificate's directory (remove it when done).
#[allow(dead_code)]
pub fn tls_relay(tag: &str, cn: &str, extra: &[&str]) -> (Natrix, u16, std::path::PathBuf) {
    let (dir, cert, key) = cert_dir(tag, cn);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--tls-listen",
        &listen,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    (Natrix::relay(&args), port, dir)
}

/// One TLS port for TURN and HTTPS: `natrix lookup` (with `lookup_extra`)
/// and a relay whose TLS listener on `ip:443` passes HTTPS to it; the
/// certificate's directory (remove it when done).
pub fn tls_443_with_lookup(
    ip: &str,
    lookup_extra: &[&str],
) -> (Natrix, Natrix, std::path::PathBuf) {
    let secrets = [
        "--auth-secret",
        "k1=turn-secret-for-443",
        "--cluster-secret",
        "cluster-secret-for-443",
    ];
    let lookup = Natrix::lookup(&[&secrets[..], lookup_extra].concat());
    let (relay, dir) = tls_443_relay(ip, &lookup.lookup.to_string());
    (lookup, relay, dir)
}

/// A relay whose TLS listener on `ip:443` passes HTTPS to `backend`
/// (`host:port`); the certificate's directory (remove it when done).
pub fn tls_443_relay(ip: &str, backend: &str) -> (Natrix, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("natrix-443-{}-{ip}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "natrix-443");
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let relay = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--tls-listen",
        &format!("{ip}:443"),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-http-backend",
        backend,
    ]);
    (relay, dir)
}

/// Runs a shell script, failing the test when it fails.
#[allow(dead_code)]
pub fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process in namespace `ns`, killed when dropped; its stderr in a file.
pub struct InNs {
    child: Child,
    log: std::path::PathBuf,
}

#[allow(dead_code)]
impl InNs {
    pub fn spawn(ns: &str, program: &str, args: &[&str]) -> InNs {
        let log = std::env::temp_dir().join(format!(
            "natrix-ns-{}-{ns}-{}.log",
            std::process::id(),
            args.first().unwrap_or(&"")
        ));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("running a program in a network namespace");
        InNs { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (`ip netns exec` replaced itself with the program:
    /// the child is the program).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(sent, 0, "signalling {}", self.child.id());
    }

    /// Waits for the exit; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("a child's status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log holds `text` (true) or the process exits
    /// (false); panics after 20 s.
    pub fn wait_for(&mut self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.log().contains(text) {
                return true;
            }
            if self.child.try_wait().expect("a child's status").is_some() {
                return self.log().contains(text);
            }
            assert!(
                Instant::now() < deadline,
                "neither {text:?} nor an exit within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for InNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// TURN requests with the test account's long-term credentials: numbered
/// transaction ids, the nonce the relay last gave.
#[allow(dead_code)]
pub struct Requests {
    pub key: natrix_wire::IntegrityKey,
    pub nonce: String,
    /// The next transaction's number.
    pub next: u64,
}

#[allow(dead_code)]
impl Requests {
    pub fn new() -> Requests {
        Requests {
            key: natrix_wire::IntegrityKey::new(&natrix_wire::long_term_key_md5(
                USER, REALM, PASSWORD,
            )),
            nonce: String::new(),
            next: 1,
        }
    }

    /// A request with `attrs`, signed (USERNAME, REALM, NONCE,
    /// MESSAGE-INTEGRITY) when `signed`.
    pub fn encode(
        &mut self,
        method: natrix_wire::Method,
        attrs: &[natrix_wire::Attribute<'_>],
        signed: bool,
    ) -> Vec<u8> {
        use natrix_wire::{Attribute, Class, Encoder, MessageType, TransactionId};
        let mut tid = [7u8; 12];
        tid[..8].copy_from_slice(&self.next.to_be_bytes());
        self.next += 1;
        let mut buf = vec![0u8; 1024];
        let mut enc = Encoder::new(
            &mut buf,
            MessageType::new(method, Class::Request),
            &TransactionId(tid),
        )
        .expect("a request header");
        for a in attrs {
            enc.attribute(a).expect("an attribute that fits");
        }
        if signed {
            enc.attribute(&Attribute::Username(USER)).expect("fits");
            enc.attribute(&Attribute::Realm(REALM)).expect("fits");
            enc.attribute(&Attribute::Nonce(&self.nonce)).expect("fits");
            enc.integrity(&self.key).expect("fits");
        }
        let n = enc.finish();
        buf.truncate(n);
        buf
    }

    /// Takes the NONCE of a 401 or 438 answer.
    pub fn learn_nonce(&mut self, answer: &[u8]) {
        let msg = natrix_wire::Message::parse(answer).expect("a STUN answer");
        self.nonce =
            std::str::from_utf8(msg.get(natrix_wire::AttributeType::NONCE).expect("a nonce"))
                .expect("a UTF-8 nonce")
                .to_string();
    }
}

/// The attacks of a `natrix-loadtest attack` run (its output), each checked
/// run, held, with no legitimate session lost and legitimate traffic
/// answered; panics with the run's stderr otherwise.
#[allow(dead_code)]
pub fn attacks_held(out: &std::process::Output) -> Vec<serde_json::Value> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no report:\n{stderr}"));
    assert!(out.status.success(), "not held:\n{stderr}");
    let attacks = report["attacks"].as_array().expect("attacks").clone();
    for a in &attacks {
        let name = a["attack"].as_str().expect("a name");
        assert!(a["skipped"].is_null(), "{name} skipped: {}", a["skipped"]);
        assert_eq!(a["held"], true, "{name}: {}", a["server_did"]);
        assert_eq!(
            a["legit_sessions_lost"], 0,
            "{name}: {}",
            a["legit_lost_why"]
        );
        assert!(
            a["legit_answered"].as_u64().unwrap_or(0) > 0,
            "{name}: no legit traffic"
        );
    }
    attacks
}

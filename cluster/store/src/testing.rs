//! A real `redis-server` on a free loopback port, for tests.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process, killed (by PID) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// `requirepass` (and `masterauth`), when started with one.
    password: Option<String>,
    /// The directory of its append-only file, when it keeps one.
    aof: Option<std::path::PathBuf>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port of 127.0.0.1 without
    /// persistence and waits until it answers PING.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing (install it with `.ci/install-deps`) or
    /// does not answer within 10 s: a test cannot run without it.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free TCP port");
        RedisServer::start_on(port)
    }

    /// Starts `redis-server` on `port` of 127.0.0.1 (see [`RedisServer::start`]).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            port,
            child: None,
            password: None,
            aof: None,
        };
        server.spawn();
        server
    }

    /// A server on a free port that requires `password`.
    ///
    /// # Panics
    ///
    /// If redis-server is missing or does not come up within 10 s.
    pub fn start_with_password(password: &str) -> RedisServer {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free TCP port");
        let mut server = RedisServer {
            port,
            child: None,
            password: Some(password.to_owned()),
            aof: None,
        };
        server.spawn();
        server
    }

    /// A redis-server with an append-only file (fsync on every write) in a
    /// directory of its own: a [`RedisServer::restart`] keeps its data, as
    /// the chart's bundled Redis does.
    pub fn start_persistent() -> RedisServer {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free TCP port");
        let dir =
            std::env::temp_dir().join(format!("natrix-redis-aof-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the AOF directory");
        let mut server = RedisServer {
            port,
            child: None,
            password: None,
            aof: Some(dir),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut c = Command::new("redis-server");
        c.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""]);
        match &self.aof {
            Some(dir) => c
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--dir", &dir.to_string_lossy()]),
            None => c
                .args(["--appendonly", "no"])
                .args(["--dir", &std::env::temp_dir().to_string_lossy()]),
        };
        if let Some(pw) = &self.password {
            c.args(["--requirepass", pw, "--masterauth", pw]);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (is it installed? see .ci/install-deps)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 32];
        match &self.password {
            None => {
                s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf).is_ok_and(|n| &buf[..n] == b"+PONG\r\n")
            }
            Some(pw) => {
                let auth = format!("AUTH {pw}\r\n");
                s.write_all(auth.as_bytes()).is_ok()
                    && s.read(&mut buf).is_ok_and(|n| &buf[..n] == b"+OK\r\n")
            }
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (all data is lost, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: empty, or with its data when it
    /// keeps an append-only file.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback TCP port whose `+10000` (Redis Cluster's bus port) is
/// free too.
fn free_port_pair() -> u16 {
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free TCP port");
        if port < 55_000 && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut c = Command::new("redis-cli");
    c.args(["-p", &port.to_string()]);
    if let Some(pw) = password {
        c.args(["-a", pw, "--no-auth-warning"]);
    }
    let out = c
        .args(args)
        .output()
        .expect("running redis-cli (installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_quiet(mut c: Command) -> Child {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redis-server (is it installed? see .ci/install-deps)")
}

/// A Redis Cluster of `n` primaries on loopback, every slot assigned.
#[derive(Debug)]
pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts `n` (≥ 3) cluster-enabled servers and joins them.
    ///
    /// # Panics
    ///
    /// If redis-server or redis-cli is missing or the cluster does not form.
    pub fn start(n: usize) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "natrix-redis-cluster-{}-{}",
            std::process::id(),
            free_port_pair()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let ports: Vec<u16> = (0..n).map(|_| free_port_pair()).collect();
        let mut children = Vec::new();
        for p in &ports {
            let mut c = Command::new("redis-server");
            c.args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--dir", &dir.to_string_lossy()]);
            children.push(spawn_quiet(c));
        }
        let cluster = RedisCluster {
            ports,
            children,
            dir,
        };
        for p in &cluster.ports {
            wait_for("a cluster node answers", || {
                redis_cli(*p, None, &["ping"]).contains("PONG")
            });
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(nodes.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli(cluster.ports[0], None, &args);
        for p in &cluster.ports {
            wait_for("the cluster state is ok", || {
                redis_cli(*p, None, &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,…`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, one replica and one Sentinel watching them (service
/// `natrix`, quorum 1, failover after 1 s of silence).
#[derive(Debug)]
pub struct RedisSentinel {
    /// The primary (killed by [`RedisSentinel::kill_primary`]).
    pub primary: RedisServer,
    replica_port: u16,
    replica: Child,
    sentinel_port: u16,
    sentinel: Child,
    conf: std::path::PathBuf,
    password: Option<String>,
}

impl RedisSentinel {
    /// Starts the three processes and waits until the Sentinel knows the
    /// replica.
    ///
    /// # Panics
    ///
    /// If redis-server is missing or the set-up does not settle.
    pub fn start() -> RedisSentinel {
        RedisSentinel::launch(None)
    }

    /// As [`RedisSentinel::start`], every process requiring `password`
    /// (clients, replication and the Sentinel itself).
    ///
    /// # Panics
    ///
    /// If redis-server is missing or the set-up does not settle.
    pub fn start_with_password(password: &str) -> RedisSentinel {
        RedisSentinel::launch(Some(password))
    }

    fn launch(password: Option<&str>) -> RedisSentinel {
        let primary = match password {
            Some(pw) => RedisServer::start_with_password(pw),
            None => RedisServer::start(),
        };
        let replica_port = free_port_pair();
        let mut c = Command::new("redis-server");
        c.args(["--port", &replica_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--replicaof", "127.0.0.1", &primary.port().to_string()]);
        if let Some(pw) = password {
            c.args(["--requirepass", pw, "--masterauth", pw]);
        }
        let replica = spawn_quiet(c);
        wait_for("the replica follows the primary", || {
            redis_cli(replica_port, password, &["info", "replication"])
                .contains("master_link_status:up")
        });
        let sentinel_port = free_port_pair();
        let conf = std::env::temp_dir().join(format!(
            "natrix-sentinel-{}-{sentinel_port}.conf",
            std::process::id()
        ));
        let auth = password.map_or(String::new(), |pw| {
            format!("sentinel auth-pass natrix {pw}\nrequirepass {pw}\n")
        });
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor natrix 127.0.0.1 {} 1\nsentinel down-after-milliseconds natrix 1000\nsentinel failover-timeout natrix 5000\n{auth}",
                primary.port()
            ),
        )
        .expect("writing the sentinel configuration");
        let mut c = Command::new("redis-server");
        c.arg(&conf).arg("--sentinel");
        let sentinel = spawn_quiet(c);
        wait_for("the sentinel knows the replica", || {
            redis_cli(sentinel_port, password, &["sentinel", "replicas", "natrix"])
                .contains(&replica_port.to_string())
        });
        RedisSentinel {
            primary,
            replica_port,
            replica,
            sentinel_port,
            sentinel,
            conf,
            password: password.map(str::to_owned),
        }
    }

    /// `redis+sentinel://[:<password>@]127.0.0.1:<sentinel>/natrix`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!(
                "redis+sentinel://:{pw}@127.0.0.1:{}/natrix",
                self.sentinel_port
            ),
            None => format!("redis+sentinel://127.0.0.1:{}/natrix", self.sentinel_port),
        }
    }

    /// The replica's port (the primary after a failover).
    pub fn replica_port(&self) -> u16 {
        self.replica_port
    }

    /// Kills the primary; the Sentinel promotes the replica.
    pub fn kill_primary(&mut self) {
        self.primary.stop();
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for c in [&mut self.sentinel, &mut self.replica] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.conf);
    }
}

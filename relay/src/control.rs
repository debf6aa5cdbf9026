//! The relay's control plane: state the data-plane loops poll between
//! batches (drain flag, credentials), and an actix actor that keeps it fresh
//! (TLS certificate and secret files reloaded when they change or on
//! SIGHUP). Nothing here runs per packet: loops read one atomic per wake-up
//! and take a lock only when the credentials' generation changed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message};
use natrix_registry::secrets::SecretsWatcher;
use natrix_store::Store;
use tracing::{info, warn};

use natrix_model::TurnSecret;

use crate::core::Credentials;
use crate::tls::TlsReloader;

/// Shared between the control plane and the loops.
#[derive(Debug)]
pub struct Control {
    draining: AtomicBool,
    credentials_generation: AtomicU64,
    credentials: Mutex<Credentials>,
    allocations: Vec<AtomicU64>,
    wakers: Mutex<Vec<Arc<mio::Waker>>>,
    ports: natrix_relay_proto::SharedPorts,
    /// Where the loops hand usage records, when they are kept.
    usage: Option<crate::usage::UsageQueue>,
    /// Operators' questions to every loop (the admin API), and the id of
    /// the newest (the loops compare it with the last they answered).
    admin: Mutex<Vec<AdminJob>>,
    admin_latest: AtomicU64,
    /// Where Allocates go while this relay is draining or full, and its
    /// version (the loops compare it with theirs).
    alternate: Mutex<natrix_relay_proto::Alternate>,
    alternate_generation: AtomicU64,
}

/// What an operator asks every loop (the admin API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminQuery {
    /// Its allocations.
    List,
    /// End the allocation with this relayed address (and this client's
    /// address, when given: a shared relayed address needs it), if it holds
    /// it.
    Kill(std::net::SocketAddr, Option<std::net::SocketAddr>),
}

/// A loop's answer.
#[derive(Clone, Debug)]
pub enum AdminAnswer {
    /// Its allocations.
    List(Vec<natrix_relay_proto::AllocationInfo>),
    /// Whether it held (and ended) the allocation.
    Killed(bool),
}

/// A question waiting for the loops' answers.
#[derive(Debug)]
pub(crate) struct AdminJob {
    pub(crate) id: u64,
    pub(crate) query: AdminQuery,
    pub(crate) reply: std::sync::mpsc::SyncSender<AdminAnswer>,
}

impl Control {
    pub(crate) fn new(
        credentials: Credentials,
        loops: usize,
        ports: natrix_relay_proto::SharedPorts,
        usage: Option<crate::usage::UsageQueue>,
    ) -> Control {
        Control {
            ports,
            usage,
            admin: Mutex::new(Vec::new()),
            admin_latest: AtomicU64::new(0),
            alternate: Mutex::new(natrix_relay_proto::Alternate::default()),
            alternate_generation: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            credentials_generation: AtomicU64::new(0),
            credentials: Mutex::new(credentials),
            allocations: (0..loops).map(|_| AtomicU64::new(0)).collect(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Asks every loop `query` and collects their answers (blocking: call
    /// it off the async runtime); loops that do not answer within
    /// `timeout` (one busy or stuck) are left out.
    pub fn ask_loops(&self, query: AdminQuery, timeout: Duration) -> Vec<AdminAnswer> {
        let loops = self.allocations.len();
        let (reply, answers) = std::sync::mpsc::sync_channel(loops.max(1));
        let id = {
            let mut jobs = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            let id = self.admin_latest.load(Ordering::SeqCst) + 1;
            jobs.push(AdminJob { id, query, reply });
            self.admin_latest.store(id, Ordering::SeqCst);
            id
        };
        self.wake_all();
        let deadline = std::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < loops {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match answers.recv_timeout(left) {
                Ok(a) => got.push(a),
                Err(_) => break,
            }
        }
        self.admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|j| j.id != id);
        got
    }

    /// Sends new Allocates to `alternate` (300 Try Alternate) while the
    /// relay is draining or full; `None`: 508 then. Loops follow within a
    /// wake-up.
    pub fn set_alternate(&self, alternate: natrix_relay_proto::Alternate) {
        let mut a = self.alternate.lock().unwrap_or_else(|e| e.into_inner());
        if *a != alternate {
            *a = alternate;
            self.alternate_generation.fetch_add(1, Ordering::SeqCst);
            drop(a);
            self.wake_all();
        }
    }

    /// The alternate relay, and its version.
    pub(crate) fn alternate(&self) -> (u64, natrix_relay_proto::Alternate) {
        let a = self.alternate.lock().unwrap_or_else(|e| e.into_inner());
        (self.alternate_generation.load(Ordering::SeqCst), *a)
    }

    /// The version of the alternate relay.
    pub(crate) fn alternate_generation(&self) -> u64 {
        self.alternate_generation.load(Ordering::SeqCst)
    }

    /// The newest admin question's id.
    pub(crate) fn admin_latest(&self) -> u64 {
        self.admin_latest.load(Ordering::SeqCst)
    }

    /// The questions newer than `seen`, with where to answer.
    pub(crate) fn admin_jobs_after(
        &self,
        seen: u64,
    ) -> Vec<(u64, AdminQuery, std::sync::mpsc::SyncSender<AdminAnswer>)> {
        self.admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|j| j.id > seen)
            .map(|j| (j.id, j.query, j.reply.clone()))
            .collect()
    }

    /// The host's allocation counts (quotas, free ports), `top` holders.
    pub fn quota_use(&self, top: usize) -> natrix_relay_proto::QuotaUse {
        self.ports.quota_use(top)
    }

    /// Queues a usage record for the writer; false when it was dropped
    /// (the queue is full, or records are not kept).
    pub(crate) fn record_usage(&self, record: natrix_relay_proto::UsageRecord) -> bool {
        self.usage.as_ref().is_some_and(|q| q.push(record))
    }

    pub(crate) fn add_waker(&self, waker: Arc<mio::Waker>) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(waker);
    }

    /// Wakes loop `shard` (wakers are added in loop order).
    pub(crate) fn wake(&self, shard: usize) {
        if let Some(w) = self
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(shard)
        {
            let _ = w.wake();
        }
    }

    fn wake_all(&self) {
        for w in self.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = w.wake();
        }
    }

    /// Stops new allocations everywhere; existing ones keep relaying.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// True once [`Control::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Installs new credentials in every loop (secret rotation).
    pub fn set_credentials(&self, credentials: Credentials) {
        *self.credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials;
        self.credentials_generation.fetch_add(1, Ordering::SeqCst);
        self.wake_all();
    }

    /// The credentials generation (changes on every rotation).
    pub(crate) fn credentials_generation(&self) -> u64 {
        self.credentials_generation.load(Ordering::Relaxed)
    }

    /// The current credentials.
    pub(crate) fn credentials(&self) -> Credentials {
        self.credentials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records loop `shard`'s live allocations (published periodically).
    pub(crate) fn set_allocations(&self, shard: usize, n: u64) {
        if let Some(a) = self.allocations.get(shard) {
            a.store(n, Ordering::Relaxed);
        }
    }

    /// Live allocations on the host, as last published by the loops.
    pub fn allocations(&self) -> u64 {
        self.allocations
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// What the relay's load is published as: its allocations plus the
    /// ports EVEN-PORT reservations hold (each takes a port an allocation
    /// could have had).
    pub fn load(&self) -> u64 {
        self.allocations() + self.ports.reserved() as u64
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Where rotated secrets come from: a file, reloaded when it changes.
#[derive(Debug, Clone)]
pub struct SecretSource {
    /// The secrets file.
    pub path: PathBuf,
}

/// Reload now (SIGHUP).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Reload;

/// Keeps TLS certificates and secrets fresh: polls file modification times
/// twice a second and reloads on change or on [`Reload`]. A file that fails
/// to load leaves the previous configuration in service.
#[derive(Debug)]
pub struct ReloadActor {
    control: Arc<Control>,
    tls: Option<Arc<TlsReloader>>,
    secrets: Option<SecretSource>,
    secrets_stamp: Option<SystemTime>,
    /// The command line's credentials.
    base: Credentials,
    /// Secrets from the coordination store (newest first).
    store_secrets: Vec<TurnSecret>,
    /// Secrets from the file, as last read successfully.
    file_secrets: Vec<TurnSecret>,
}

impl ReloadActor {
    /// An actor for `control`; start it inside an actix system.
    pub fn new(
        control: Arc<Control>,
        tls: Option<Arc<TlsReloader>>,
        secrets: Option<SecretSource>,
        base: Credentials,
    ) -> ReloadActor {
        let secrets_stamp = secrets.as_ref().and_then(|s| modified(&s.path));
        let file_secrets = secrets
            .as_ref()
            .and_then(|s| crate::config::read_secrets(&s.path).ok())
            .unwrap_or_default();
        ReloadActor {
            control,
            tls,
            secrets,
            secrets_stamp,
            base,
            store_secrets: Vec::new(),
            file_secrets,
        }
    }

    /// Installs the command line's credentials with the store's and the
    /// file's secrets in front (store first: it holds the newest).
    fn apply(&self) {
        let mut extra = self.store_secrets.clone();
        extra.extend(self.file_secrets.iter().cloned());
        self.control
            .set_credentials(self.base.with_extra_secrets(extra));
    }

    fn reload_secrets(&mut self) {
        let Some(source) = &self.secrets else { return };
        self.secrets_stamp = modified(&source.path);
        match crate::config::read_secrets(&source.path) {
            Ok(file) => {
                self.file_secrets = file;
                self.apply();
                info!(file = %source.path.display(), "TURN secrets reloaded");
            }
            Err(e) => warn!("TURN secrets not reloaded, keeping the previous ones: {e:#}"),
        }
    }

    fn poll_files(&mut self) {
        if let Some(tls) = &self.tls {
            match tls.reload_if_changed() {
                Ok(true) => info!("TLS certificate reloaded (files changed)"),
                Ok(false) => {}
                Err(e) => warn!(
                    "TLS certificate files changed but could not be loaded; keeping the previous one: {e:#}"
                ),
            }
        }
        if let Some(source) = &self.secrets
            && modified(&source.path) != self.secrets_stamp
        {
            self.reload_secrets();
        }
    }
}

impl Actor for ReloadActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let span = tracing::info_span!("relay_reload");
        let _enter = span.enter();
        ctx.run_interval(Duration::from_millis(500), |actor, _| actor.poll_files());
    }
}

/// The TURN secrets in the coordination store changed (newest first).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StoreSecrets(pub Vec<TurnSecret>);

impl Handler<StoreSecrets> for ReloadActor {
    type Result = ();

    fn handle(&mut self, msg: StoreSecrets, _: &mut Context<Self>) {
        info!(
            key_ids = ?msg.0.iter().map(|s| s.key_id()).collect::<Vec<_>>(),
            "TURN secrets from the coordination store in use"
        );
        self.store_secrets = msg.0;
        self.apply();
    }
}

impl Handler<Reload> for ReloadActor {
    type Result = ();

    fn handle(&mut self, _: Reload, _: &mut Context<Self>) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => info!("SIGHUP: TLS certificate reloaded"),
                Err(e) => {
                    warn!("SIGHUP: TLS certificate not reloaded, keeping the previous one: {e:#}")
                }
            }
        }
        self.reload_secrets();
    }
}

/// Feeds the store's TURN secrets to a relay's reload actor.
pub fn watch_store_secrets(store: &Store, reload: Addr<ReloadActor>) -> Addr<SecretsWatcher> {
    SecretsWatcher::new(
        store.clone(),
        Duration::from_secs(1),
        Box::new(move |secrets| {
            reload.do_send(StoreSecrets(secrets));
        }),
    )
    .start()
}

//! The live side of a run: the counters every scenario bumps, the stop flag
//! Ctrl-C raises, progress on stderr (a bar on a terminal, plain periodic
//! lines otherwise), the timeline the HTML report plots, and the optional
//! Prometheus endpoint (`--metrics-addr`) that puts a load test on the same
//! dashboards as the cluster.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use natrix_telemetry::Telemetry;
use prometheus::{Histogram, IntCounter, IntGauge};

use crate::units::si;

/// Set by the first Ctrl-C (SIGINT) or SIGTERM: scenarios stop sending,
/// finish what is in flight and report what they measured.
static STOP: AtomicBool = AtomicBool::new(false);

/// True once the run was asked to stop.
pub(crate) fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C: the user means it.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Ctrl-C and SIGTERM stop the run cleanly (the report is still written);
/// a second one exits at once.
pub(crate) fn install_stop_handler() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// Sleeps up to `d`, waking early when the run is stopped; false if stopped.
pub(crate) fn sleep(d: Duration) -> bool {
    let end = Instant::now() + d;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if stopped() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    !stopped()
}

/// What a scenario calls the things it counts, for progress lines.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Units {
    /// Requests, packets, attempts…
    pub(crate) sent: &'static str,
    /// Answers, echoes, plans, allocations…
    pub(crate) done: &'static str,
}

/// One point of the timeline: rates over the interval ending at `t`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) sent_per_s: f64,
    pub(crate) done_per_s: f64,
    pub(crate) errors_per_s: f64,
}

/// The counters of the running scenario and its exported metrics.
pub(crate) struct Live {
    sent: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    state: Mutex<State>,
    telemetry: Telemetry,
    m_sent: IntCounter,
    m_done: IntCounter,
    m_errors: IntCounter,
    m_latency: Histogram,
    m_running: IntGauge,
}

struct State {
    scenario: &'static str,
    units: Units,
    started: Instant,
    planned: Option<Duration>,
    timeline: Vec<Sample>,
    /// Counter values at the last sample and at the last export.
    last: [u64; 3],
    exported: [u64; 3],
}

static LIVE: LazyLock<Live> = LazyLock::new(Live::new);

/// The running scenario's counters.
pub(crate) fn live() -> &'static Live {
    &LIVE
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The scenario label of this process' metrics (set once, before the
/// first use of [`live`]).
static SCENARIO: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names the scenario this process runs, for its exported metrics.
pub(crate) fn init(scenario: &'static str) {
    let _ = SCENARIO.set(scenario);
}

impl Live {
    fn new() -> Live {
        use natrix_telemetry::catalogue as c;
        let telemetry = Telemetry::new(env!("CARGO_PKG_VERSION"));
        let scenario = [*SCENARIO.get().unwrap_or(&"relay")];
        let counter = |def| telemetry.counter_family(def).with_label_values(&scenario);
        Live {
            sent: AtomicU64::new(0),
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            state: Mutex::new(State {
                scenario: "",
                units: Units {
                    sent: "sent",
                    done: "done",
                },
                started: Instant::now(),
                planned: None,
                timeline: Vec::new(),
                last: [0; 3],
                exported: [0; 3],
            }),
            m_sent: counter(&c::LOADTEST_SENT_TOTAL),
            m_done: counter(&c::LOADTEST_COMPLETED_TOTAL),
            m_errors: counter(&c::LOADTEST_ERRORS_TOTAL),
            m_latency: telemetry
                .histogram_family(&c::LOADTEST_LATENCY_SECONDS)
                .with_label_values(&scenario),
            m_running: telemetry
                .gauge_family(&c::LOADTEST_RUNNING)
                .with_label_values(&scenario),
            telemetry,
        }
    }

    /// Starts the clock of a scenario expected to run `planned` (for the
    /// remaining time shown), clearing the counters.
    pub(crate) fn begin(&self, scenario: &'static str, units: Units, planned: Option<Duration>) {
        let mut s = lock(&self.state);
        self.flush_metrics(&mut s);
        for c in [&self.sent, &self.done, &self.errors] {
            c.store(0, Ordering::Relaxed);
        }
        s.scenario = scenario;
        s.units = units;
        s.started = Instant::now();
        s.planned = planned;
        s.timeline.clear();
        s.last = [0; 3];
        s.exported = [0; 3];
        self.m_running.set(1);
    }

    /// Marks the end of sending.
    pub(crate) fn end(&self) {
        let mut s = lock(&self.state);
        self.sample_locked(&mut s);
        self.flush_metrics(&mut s);
        self.m_running.set(0);
    }

    /// Counts `n` sent.
    pub(crate) fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` completed.
    pub(crate) fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` errors.
    pub(crate) fn error(&self, n: u64) {
        self.errors.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one latency sample (µs) for the exported histogram.
    pub(crate) fn latency_us(&self, us: u64) {
        self.m_latency.observe(us as f64 / 1e6);
    }

    fn counters(&self) -> [u64; 3] {
        [&self.sent, &self.done, &self.errors].map(|c| c.load(Ordering::Relaxed))
    }

    fn flush_metrics(&self, s: &mut State) {
        let now = self.counters();
        let gauges = [&self.m_sent, &self.m_done, &self.m_errors];
        for (i, m) in gauges.into_iter().enumerate() {
            m.inc_by(now[i].saturating_sub(s.exported[i]));
        }
        s.exported = now;
    }

    fn sample_locked(&self, s: &mut State) {
        let now = self.counters();
        let t = s.started.elapsed().as_secs_f64();
        let prev_t = s.timeline.last().map_or(0.0, |p| p.t);
        let dt = t - prev_t;
        if dt < 0.05 {
            return;
        }
        let rate = |i: usize| now[i].saturating_sub(s.last[i]) as f64 / dt;
        s.timeline.push(Sample {
            t,
            sent_per_s: rate(0),
            done_per_s: rate(1),
            errors_per_s: rate(2),
        });
        s.last = now;
    }

    /// The timeline sampled so far.
    pub(crate) fn timeline(&self) -> Vec<Sample> {
        lock(&self.state).timeline.clone()
    }

    /// What the last scenario called the things it counted.
    pub(crate) fn units(&self) -> Units {
        lock(&self.state).units
    }

    /// The exported metrics in Prometheus' text format.
    fn render(&self) -> String {
        {
            let mut s = lock(&self.state);
            self.flush_metrics(&mut s);
        }
        self.telemetry.render()
    }
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    /// Always the bar.
    Bar,
    /// Always plain lines (one per second).
    Lines,
    /// Nothing.
    Off,
}

/// The progress thread: samples the counters four times a second into the
/// timeline and shows them.
pub(crate) struct Progress {
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn line(s: &State, sample: &Sample, totals: [u64; 3]) -> String {
    let mut text = format!(
        "{} {}/s {} {}/s",
        si(sample.sent_per_s),
        s.units.sent,
        si(sample.done_per_s),
        s.units.done,
    );
    text += &format!(
        " · {} {} · {} {} · {} errors",
        si(totals[0] as f64),
        s.units.sent,
        si(totals[1] as f64),
        s.units.done,
        totals[2]
    );
    text
}

impl Progress {
    /// Starts showing progress in `mode`.
    pub(crate) fn start(mode: ProgressMode) -> Progress {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let bar = match mode {
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Bar => true,
            ProgressMode::Lines | ProgressMode::Off => false,
        };
        let lines = mode == ProgressMode::Lines
            || (mode == ProgressMode::Auto && !std::io::stderr().is_terminal());
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || progress_loop(&flag, bar, lines))
            .ok();
        Progress { stop, thread }
    }

    /// Stops the thread (after one last sample).
    pub(crate) fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn progress_loop(stop: &AtomicBool, bar: bool, lines: bool) {
    let pb = bar.then(|| {
        let pb = indicatif::ProgressBar::new(1000);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:24} {prefix} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let mut last_line = Instant::now();
    let tick = Duration::from_millis(250);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        let mut s = lock(&LIVE.state);
        if s.scenario.is_empty() {
            continue;
        }
        LIVE.sample_locked(&mut s);
        let Some(sample) = s.timeline.last().copied() else {
            continue;
        };
        let totals = LIVE.counters();
        let elapsed = s.started.elapsed();
        let remaining = s.planned.map(|p| p.saturating_sub(elapsed));
        let text = line(&s, &sample, totals);
        if let Some(pb) = &pb {
            if let Some(p) = s.planned.filter(|p| !p.is_zero()) {
                pb.set_position(
                    (elapsed.as_secs_f64() / p.as_secs_f64() * 1000.0).min(1000.0) as u64,
                );
            }
            pb.set_prefix(match remaining {
                Some(r) => format!("{} {:.0}s left", s.scenario, r.as_secs_f64()),
                None => s.scenario.to_owned(),
            });
            pb.set_message(text.clone());
        }
        if lines && last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            let left = remaining.map_or(String::new(), |r| {
                format!(" ({:.0}s left)", r.as_secs_f64())
            });
            eprintln!(
                "natrix-loadtest: {} {:6.1}s{left} {text}",
                s.scenario,
                elapsed.as_secs_f64()
            );
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
}

/// Serves the load generator's metrics at `http://addr/metrics` for the
/// life of the process (a thread; one short answer per connection).
pub(crate) fn serve_metrics(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let n = conn.read(&mut buf).unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split(' ').nth(1).unwrap_or("");
                let (status, body) = if path == "/metrics" {
                    ("200 OK", LIVE.render())
                } else {
                    ("404 Not Found", "see /metrics\n".to_owned())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(bound)
}

//! The Prometheus metrics of `run` and `watch`: every series, what feeds it, and the two
//! ways out, an HTTP listener (`--metrics-listen`, `listener`) and a file rewritten after
//! every sync (`--metrics-file`, for node_exporter's textfile collector, for those who want
//! no listener in PID 1). Off unless one of them is asked for: then nothing here exists.
//!
//! The facts come from what the sync already produces, in one place: the outcome of each
//! sync (`Report`, its failure class, the watchdog's tally of blocking sessions that the
//! `Syncer` keeps) through `Metrics::record`, the readiness and recovery the state file
//! holds (`StateFile`, read when the text is made), and in overlap mode one catalog read of
//! the logins (`VALID UNTIL`, sessions, a pending stage: `overlap::server::read_logins`)
//! after every sync and every `LOGINS_REFRESH`. Every series exists from the start with
//! its labels known from the configuration (an absent series never alerts); labels hold
//! role and login names, trigger, result and class names only, never a secret.
//!
//! The text is the classic exposition format (the `prometheus` crate's `TextEncoder`),
//! which `promtool check metrics`, node_exporter's textfile collector and the Prometheus
//! server all read; OpenMetrics is not, which the first two reject.

mod listener;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, Opts, Registry,
    TextEncoder,
};

use crate::config::Config;
use crate::error::Failure;
use crate::fileio::atomic;
use crate::fileio::dirfd::Dir;
use crate::overlap::server::{read_logins, staged_login};
use crate::overlap::{Login, Pair};
use crate::session::locks;
use crate::state::StateFile;
use crate::sync::{FilesChanged, Report, Syncer};

/// How often the overlap logins are read again between syncs: about a scrape interval, so
/// that the sessions still open on a retiring login are current when its grace ends.
const LOGINS_REFRESH: Duration = Duration::from_secs(15);

/// The buckets of the time from a file event to the commit, in seconds: a rename is
/// applied in milliseconds, an in-place write after the quiet period (250 ms by default),
/// a sync that waits for blocking sessions after up to the lock wait (30 s).
const EVENT_TO_COMMIT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Where the metrics go (`--metrics-listen`, `--metrics-file`); neither: off.
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    pub listen: Option<SocketAddr>,
    pub file: Option<PathBuf>,
}

/// Why a sync ran, as the `trigger` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first sync, and the loop's check when it starts watching.
    Start,
    /// A secret file changed (or the watcher lost events).
    File,
    /// `--resync-interval`.
    Periodic,
    /// SIGHUP.
    Sighup,
    /// A standby became a primary.
    Promotion,
}

impl Trigger {
    const ALL: [Trigger; 5] = [
        Trigger::Start,
        Trigger::File,
        Trigger::Periodic,
        Trigger::Sighup,
        Trigger::Promotion,
    ];

    fn label(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::File => "file",
            Trigger::Periodic => "periodic",
            Trigger::Sighup => "sighup",
            Trigger::Promotion => "promotion",
        }
    }
}

/// The `class` label of a failed sync.
const CLASSES: [&str; 5] = ["config", "connect", "sql", "lock", "verify"];

/// The class of a failed sync: a lock wait given up is told apart from other SQL failures;
/// a missing role under `--strict` is the configuration's.
fn class_of(err: &anyhow::Error) -> &'static str {
    if locks::gave_up(err) {
        return "lock";
    }
    match Failure::of(err) {
        Some(Failure::Config | Failure::MissingRole | Failure::BadFiles) => "config",
        Some(Failure::Connect) => "connect",
        Some(Failure::Verify) => "verify",
        _ => "sql",
    }
}

/// Every series, registered once; shared by the work (which updates them) and the listener
/// (which renders them). Only the crate's `f64` types: each metric type is its own copy of
/// the crate's generic code in PID 1's binary, and every byte of code is resident memory.
struct Exposition {
    registry: Registry,
    /// Read when the text is made: readiness and recovery as `health` would see them.
    state: StateFile,
    sync: SyncSeries,
    logins: LoginSeries,
}

/// The series of the server and the syncs.
struct SyncSeries {
    ready: Gauge,
    standby: Gauge,
    last_attempt: Gauge,
    last_success: Gauge,
    syncs: CounterVec,
    changes: CounterVec,
    failures: CounterVec,
    event_to_commit: Histogram,
    blocked: Counter,
    ended: Counter,
    drift: CounterVec,
}

/// Overlap mode's series of the logins (no series at all when it is off).
struct LoginSeries {
    published: GaugeVec,
    valid_until: GaugeVec,
    sessions: GaugeVec,
    stage_pending: GaugeVec,
}

/// Registers `metric` with `registry` and returns it.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> anyhow::Result<M> {
    let metric = metric.context("defining a metric")?;
    registry
        .register(Box::new(metric.clone()))
        .context("registering a metric")?;
    Ok(metric)
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("pg_password_sync_{name}"), help)
}

impl SyncSeries {
    fn new(r: &Registry) -> anyhow::Result<SyncSeries> {
        let info = opts("build_info", "The running version (always 1).")
            .const_label("version", env!("CARGO_PKG_VERSION"));
        register(r, Gauge::with_opts(info))?.set(1.0);
        let gauge = |name: &str, help: &str| register(r, Gauge::with_opts(opts(name, help)));
        let counter = |name: &str, help: &str| register(r, Counter::with_opts(opts(name, help)));
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(r, CounterVec::new(opts(name, help), labels))
        };
        let buckets = HistogramOpts::new(
            "pg_password_sync_file_event_to_commit_seconds",
            "Time from the first event of a file change to the commit of its sync.",
        )
        .buckets(EVENT_TO_COMMIT_BUCKETS.to_vec());
        Ok(SyncSeries {
            ready: gauge("server_ready", "1 when the server accepts connections.")?,
            standby: gauge("server_standby", "1 when the server is a standby.")?,
            last_attempt: gauge(
                "last_sync_attempt_timestamp_seconds",
                "Unix time of the last sync attempt (0: none yet).",
            )?,
            last_success: gauge(
                "last_sync_success_timestamp_seconds",
                "Unix time of the last successful sync (0: none yet).",
            )?,
            syncs: counters(
                "syncs_total",
                "Syncs by trigger and result.",
                &["trigger", "result"],
            )?,
            changes: counters(
                "password_changes_total",
                "Passwords set, by role (a twin login is a role).",
                &["role"],
            )?,
            failures: counters("sync_failures_total", "Failed syncs by class.", &["class"])?,
            event_to_commit: register(r, Histogram::with_opts(buckets))?,
            blocked: counter(
                "blocking_sessions_total",
                "Sessions (or prepared transactions) that held a sync up.",
            )?,
            ended: counter(
                "blocking_sessions_ended_total",
                "Blocking sessions ended (or prepared transactions rolled back).",
            )?,
            drift: counters(
                "drift_restored_total",
                "Passwords restored after a change on the server behind our back, by role.",
                &["role"],
            )?,
        })
    }
}

impl LoginSeries {
    fn new(r: &Registry) -> anyhow::Result<LoginSeries> {
        let labels = ["role", "login"];
        Ok(LoginSeries {
            published: register(
                r,
                GaugeVec::new(
                    opts(
                        "login_published",
                        "Overlap mode: 1 for the login pg_service.conf publishes, 0 for the other.",
                    ),
                    &labels,
                ),
            )?,
            valid_until: register(
                r,
                GaugeVec::new(
                    opts(
                        "login_valid_until_timestamp_seconds",
                        "Overlap mode: the login's VALID UNTIL as Unix time (+Inf: none).",
                    ),
                    &labels,
                ),
            )?,
            sessions: register(
                r,
                GaugeVec::new(
                    opts(
                        "login_sessions",
                        "Overlap mode: client sessions open per login.",
                    ),
                    &labels,
                ),
            )?,
            stage_pending: register(
                r,
                GaugeVec::new(
                    opts(
                        "stage_pending",
                        "Overlap mode: 1 while a staged login waits for its publish.",
                    ),
                    &["role"],
                ),
            )?,
        })
    }
}

impl Exposition {
    /// Every series with the labels the configuration knows, at their start values.
    fn new(config: &Config, state: StateFile) -> anyhow::Result<Exposition> {
        let registry = Registry::new();
        let e = Exposition {
            sync: SyncSeries::new(&registry)?,
            logins: LoginSeries::new(&registry)?,
            registry,
            state,
        };
        e.preset(config);
        Ok(e)
    }

    /// Creates every labelled series at its start value.
    fn preset(&self, config: &Config) {
        for trigger in Trigger::ALL {
            for result in ["success", "failure"] {
                self.sync
                    .syncs
                    .with_label_values(&[trigger.label(), result]);
            }
        }
        for class in CLASSES {
            self.sync.failures.with_label_values(&[class]);
        }
        for login in config.logins() {
            self.sync.changes.with_label_values(&[&login]);
            self.sync.drift.with_label_values(&[&login]);
        }
        for pair in config.pairs() {
            for login in [&pair.role, &pair.twin] {
                let labels = [pair.role.as_str(), login.as_str()];
                self.logins.published.with_label_values(&labels).set(0.0);
                // Unknown until the server is read.
                self.logins
                    .valid_until
                    .with_label_values(&labels)
                    .set(f64::NAN);
                self.logins.sessions.with_label_values(&labels).set(0.0);
            }
            self.logins
                .stage_pending
                .with_label_values(&[&pair.role])
                .set(0.0);
        }
    }

    /// The text exposition of every series, readiness and recovery as recorded now.
    fn render(&self) -> Vec<u8> {
        let state = self.state.snapshot();
        self.sync.ready.set(f64::from(u8::from(state.ready)));
        self.sync.standby.set(f64::from(u8::from(state.standby)));
        let mut text = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            // Only a metric the encoder cannot write (none of ours) fails here.
            tracing::warn!("cannot render the metrics: {err}");
        }
        text
    }
}

/// Binds `--metrics-listen` before anything starts, so that an address that cannot be
/// had is a configuration error (exit 3) and not a silent gap.
pub fn bind(settings: &MetricsSettings) -> anyhow::Result<Option<std::net::TcpListener>> {
    settings
        .listen
        .map(listener::bind)
        .transpose()
        .context(Failure::Config)
}

/// The metrics of one `run` or `watch`: off, or the series and where they go.
pub struct Metrics {
    on: Option<On>,
}

struct On {
    exposition: Arc<Exposition>,
    file: Option<PathBuf>,
    /// Whether the last write of the file failed (said once, and when it works again).
    file_failing: bool,
    /// Overlap mode's pairs, with the login published as the last applied set says.
    pairs: Vec<Pair>,
    /// When the overlap logins are read next (`None`: overlap off).
    next_logins: Option<Instant>,
}

impl Metrics {
    /// No metrics at all.
    pub fn off() -> Metrics {
        Metrics { on: None }
    }

    /// The metrics `settings` ask for, or `off`. Inside the runtime: the listener (bound by
    /// `bind`) becomes a task of its own on it; the file is written at once, so that every
    /// series is there before the first sync.
    pub fn start(
        settings: &MetricsSettings,
        listener: Option<std::net::TcpListener>,
        config: &Config,
        state: &StateFile,
    ) -> anyhow::Result<Metrics> {
        if listener.is_none() && settings.file.is_none() {
            return Ok(Metrics::off());
        }
        let exposition = Arc::new(Exposition::new(config, state.clone())?);
        if let Some(listener) = listener {
            let served = listener::serve(listener, exposition.clone())?;
            tracing::info!("metrics on http://{served}/metrics");
        }
        let pairs = config.pairs().to_vec();
        let mut metrics = Metrics {
            on: Some(On {
                exposition,
                file: settings.file.clone(),
                file_failing: false,
                next_logins: (!pairs.is_empty()).then(Instant::now),
                pairs,
            }),
        };
        if let Some(on) = &mut metrics.on {
            on.write_file();
        }
        Ok(metrics)
    }

    /// Records the outcome of one sync (`since`: when its first file event came).
    pub fn record(
        &mut self,
        trigger: Trigger,
        result: &anyhow::Result<Option<Report>>,
        since: Instant,
        syncer: &Syncer,
    ) {
        let Some(on) = &mut self.on else {
            return;
        };
        let e = &on.exposition;
        let tally = syncer.take_tally();
        e.sync.blocked.inc_by(tally.blocked as f64);
        e.sync.ended.inc_by(tally.ended as f64);
        // Files that changed while the sync queued for its lock: nothing was applied and
        // nothing failed; the sync that applies them once they settle is the one counted.
        if let Err(err) = result
            && err.downcast_ref::<FilesChanged>().is_some()
        {
            return;
        }
        let now = unix_now();
        e.sync.last_attempt.set(now);
        match result {
            Ok(report) => {
                e.sync
                    .syncs
                    .with_label_values(&[trigger.label(), "success"])
                    .inc();
                e.sync.last_success.set(now);
                if let Some(report) = report {
                    e.count_report(report, trigger, since);
                }
                if let Some(set) = syncer.last_applied() {
                    on.pairs.clone_from(&set.published);
                }
                for pair in &on.pairs {
                    for which in [Login::Role, Login::Twin] {
                        let labels = [pair.role.as_str(), pair.login(which)];
                        let published = f64::from(u8::from(pair.published == which));
                        e.logins.published.with_label_values(&labels).set(published);
                    }
                }
                // What the sync did to the logins is read back at once.
                on.next_logins = on.next_logins.map(|_| Instant::now());
            }
            Err(err) => {
                e.sync
                    .syncs
                    .with_label_values(&[trigger.label(), "failure"])
                    .inc();
                e.sync.failures.with_label_values(&[class_of(err)]).inc();
            }
        }
        on.write_file();
    }

    /// When the overlap logins are due to be read (`refresh_logins`); never when off.
    pub fn logins_due(&self) -> Option<Instant> {
        self.on.as_ref().and_then(|on| on.next_logins)
    }

    /// Reads the overlap logins' `VALID UNTIL`, sessions and pending stages from the
    /// server as the superuser (a session of its own, closed after the read, so that a
    /// smart shutdown never waits for it), each wait bounded by the connect timeout. A
    /// failure keeps the last values (and is logged at debug level: the sync says more).
    pub async fn refresh_logins(&mut self, syncer: &Syncer) {
        let Some(on) = &mut self.on else {
            return;
        };
        if on.next_logins.is_none() {
            return;
        }
        on.next_logins = Some(Instant::now() + LOGINS_REFRESH);
        let names: Vec<String> = on
            .pairs
            .iter()
            .flat_map(|p| [p.role.clone(), p.twin.clone()])
            .collect();
        let limit = syncer.config.connection.connect_timeout;
        let read = async {
            // Borrowed, not cloned: no second copy of the passwords in memory.
            let set = syncer
                .last_applied()
                .map_or(&[][..], |set| set.entries.as_slice());
            let client = syncer.connect_superuser(set).await?;
            tokio::time::timeout(limit, read_logins(&client, &names))
                .await
                .context("no answer in time")?
        };
        let facts = match tokio::time::timeout(limit * 2, read).await {
            Ok(Ok(facts)) => facts,
            Ok(Err(err)) => {
                tracing::debug!("reading the overlap logins for the metrics: {err:#}");
                return;
            }
            Err(_) => {
                tracing::debug!("reading the overlap logins for the metrics: no answer in time");
                return;
            }
        };
        let e = &on.exposition;
        for pair in &on.pairs {
            for fact in facts.iter().filter(|f| pair.which(&f.login).is_some()) {
                let labels = [pair.role.as_str(), fact.login.as_str()];
                let until = if fact.exists {
                    fact.valid_until
                } else {
                    f64::NAN
                };
                e.logins.valid_until.with_label_values(&labels).set(until);
                e.logins
                    .sessions
                    .with_label_values(&labels)
                    .set(fact.sessions as f64);
            }
            let comment = facts
                .iter()
                .find(|f| f.login == pair.twin)
                .and_then(|f| f.comment.as_deref());
            let pending = f64::from(u8::from(staged_login(pair, comment).is_some()));
            e.logins
                .stage_pending
                .with_label_values(&[&pair.role])
                .set(pending);
        }
        on.write_file();
    }
}

impl Exposition {
    /// The counters a successful sync's report moves.
    fn count_report(&self, report: &Report, trigger: Trigger, since: Instant) {
        let changed = report.changed();
        for role in &changed {
            self.sync.changes.with_label_values(&[role]).inc();
        }
        for role in &report.restored {
            self.sync.drift.with_label_values(&[role]).inc();
        }
        // The rotations the watcher logs as "ms from first event to commit".
        let rotated = !changed.is_empty() || !report.logins.is_empty();
        if trigger == Trigger::File && !report.standby && rotated {
            self.sync
                .event_to_commit
                .observe(since.elapsed().as_secs_f64());
        }
    }
}

impl On {
    /// Rewrites `--metrics-file`, if asked for.
    fn write_file(&mut self) {
        let Some(path) = &self.file else {
            return;
        };
        match write_atomic(path, &self.exposition.render()) {
            Ok(()) if self.file_failing => {
                tracing::info!("the metrics file {} is written again", path.display());
                self.file_failing = false;
            }
            Ok(()) => {}
            Err(err) if !self.file_failing => {
                tracing::warn!("cannot write the metrics file: {err:#}");
                self.file_failing = true;
            }
            Err(err) => tracing::debug!("cannot write the metrics file: {err:#}"),
        }
    }
}

/// Writes `text` to `path` as a whole, through `fileio`: a new temp file beside it (a
/// hidden name node_exporter skips, created new, links not followed), then a rename over
/// it, so a reader sees the old text or the new one. Mode 0644: the collector reading it
/// is usually another user, and it holds no secret. The directory is not synced: the file
/// is rewritten after every sync and worth nothing after a crash.
fn write_atomic(path: &Path, text: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("{} names no file", path.display()))?;
    let dir = Dir::open_followed(path.parent().unwrap_or(Path::new("")))?;
    let temp = atomic::temp_name(name);
    let written = dir
        .create_synced(&temp, 0o644, text, || {})
        .and_then(|()| dir.rename(&temp, name));
    if written.is_err() {
        let _ = dir.remove_file(&temp);
    }
    written
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(overlap: bool) -> (tempfile::TempDir, Exposition) {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::config_of(crate::config::test_role_map(), overlap);
        let state = StateFile::new(dir.path());
        let e = Exposition::new(&config, state).unwrap();
        (dir, e)
    }

    fn text(e: &Exposition) -> String {
        String::from_utf8(e.render()).unwrap()
    }

    #[test]
    fn every_series_is_there_from_the_start() {
        let (_dir, e) = exposition(true);
        let all = text(&e);
        for line in [
            "pg_password_sync_build_info{version=\"",
            "pg_password_sync_server_ready 0",
            "pg_password_sync_last_sync_success_timestamp_seconds 0",
            "pg_password_sync_syncs_total{result=\"failure\",trigger=\"promotion\"} 0",
            "pg_password_sync_sync_failures_total{class=\"lock\"} 0",
            "pg_password_sync_password_changes_total{role=\"appuser_alt\"} 0",
            "pg_password_sync_drift_restored_total{role=\"postgres\"} 0",
            "pg_password_sync_file_event_to_commit_seconds_count 0",
            "pg_password_sync_blocking_sessions_ended_total 0",
            "pg_password_sync_login_sessions{login=\"appuser_alt\",role=\"appuser\"} 0",
            "pg_password_sync_login_valid_until_timestamp_seconds{login=\"appuser\",role=\"appuser\"} NaN",
            "pg_password_sync_stage_pending{role=\"backupuser\"} 0",
        ] {
            assert!(all.contains(line), "no {line:?} in\n{all}");
        }
        // The overlap series only in overlap mode.
        let (_dir, e) = exposition(false);
        assert!(!text(&e).contains("login_sessions{"));
    }

    #[test]
    fn failures_are_classed() {
        let lock = anyhow::Error::new(locks::GaveUp("x".into())).context(Failure::Sql);
        assert_eq!(class_of(&lock), "lock");
        let connect = anyhow::anyhow!("refused").context(Failure::Connect);
        assert_eq!(class_of(&connect), "connect");
        assert_eq!(
            class_of(&anyhow::anyhow!("?").context(Failure::MissingRole)),
            "config"
        );
        assert_eq!(class_of(&anyhow::anyhow!("?")), "sql");
    }

    #[test]
    fn the_file_is_replaced_whole_and_a_planted_link_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg_password_sync.prom");
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_atomic(&path, b"a 1\n").unwrap();
        write_atomic(&path, b"a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "no temp file is left");
    }
}

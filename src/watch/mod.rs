//! Keeping passwords in step with the secret files while the server runs: the `watch`
//! sidecar command, and `watch_loop`, which `run` also uses after its first sync.
//!
//! The loop (ARCHITECTURE.md, "The life of a rotation") re-reads *every* secret when the
//! files have changed and applies only when the whole set is valid and some value differs
//! from what it last applied. When a file's value is taken (ARCHITECTURE.md, "When a file's
//! value is taken"):
//! - a file renamed into place (`IN_MOVED_TO`, a Compose directory mount, a generator) or a
//!   Kubernetes `..data` swap is complete on arrival: the set is read and applied at once,
//!   and again if more events follow;
//! - a file modified in place is taken only after its writer closed it (`IN_CLOSE_WRITE`)
//!   and its size and mtime stood still for the quiet period (`--debounce`); the maximum
//!   wait never overrides a writer that still holds it open.
//!
//! An invalid set (an empty, too short or unreadable file) is logged and left alone: the
//! previous passwords stay in force until the next event brings a valid set. A periodic
//! full resync (`--resync-interval`), a watcher overflow, a request on the `resync` channel
//! (SIGHUP) and the promotion of a standby check every role (`Scope::CheckAll`), which
//! restores a password changed behind our back; while files are mid-change such a resync
//! re-applies the last applied set instead of reading them. Requests merge: one resync
//! runs at a time, at most one waits (`resync_channel`), and requests start at most one
//! resync a second (`RESYNC_SPACING`). On a standby the sync is
//! skipped; the loop then watches for its promotion (`standby.signal` leaving the data
//! directory, confirmed by `pg_is_in_recovery()`, which alone serves a sidecar without the
//! data directory) and syncs every role as soon as it is a primary. A failed apply is retried with backoff; nothing transient
//! ends the loop.

mod debounce;
mod watches;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::Event;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::{self, Receiver, Sender};
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::Failure;
use crate::metrics::{self, Metrics, MetricsSettings};
use crate::postmaster;
use crate::session::{self, connect};
use crate::state::{Snapshot, StateFile};
use crate::sync::{
    FilesChanged, Options, Report, Reread, Scope, Syncer, log_report, sync_and_record,
};
use debounce::{Debouncer, Due};
use watches::Watches;

/// How often the watched paths are checked for having appeared, vanished or been replaced
/// (cases inotify cannot report, e.g. a directory missing at start or mounted over).
const DRIFT_CHECK: Duration = Duration::from_secs(1);

/// Retry delays for a failed apply: quick at first (a server restart takes about a
/// second), then no more than two attempts (and warnings) a minute.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Startup wait for the server (`watch` sidecar): 100 ms doubling to 5 s, never giving up,
/// a progress line every 10 s.
const WAIT_MIN: Duration = Duration::from_millis(100);
const WAIT_MAX: Duration = Duration::from_secs(5);
const WAIT_PROGRESS: Duration = Duration::from_secs(10);

/// How often a standby is checked for promotion: while its data directory says standby,
/// a `stat` and one small read; otherwise one `SELECT pg_is_in_recovery()` on a kept
/// connection. Both well inside the promise of a sync within a second of promotion.
const PROMOTION_POLL_FILE: Duration = Duration::from_millis(100);
const PROMOTION_POLL_QUERY: Duration = Duration::from_millis(250);

/// The shortest time between two resyncs on request (SIGHUP): a request sooner than this
/// after the last one started waits for the rest of it, merged with any other. Together
/// with the one-slot channel, a storm of signals costs about one resync a second.
pub const RESYNC_SPACING: Duration = Duration::from_secs(1);

/// How the secret files are watched (shared by `run` and `watch`).
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Quiet period before re-reading the secrets after an in-place write or another change
    /// (a file renamed into place is read at once).
    pub debounce: Duration,
    /// Period of the resync that checks every role (`ZERO` = off).
    pub resync_interval: Duration,
    /// Directory for the health state file.
    pub state_dir: PathBuf,
    /// The data directory (`--pgdata`), when this process can see it: whether the server
    /// is a standby, and (`run`) whether it was initialised.
    pub pgdata: PathBuf,
    /// Where the metrics go (nowhere by default).
    pub metrics: MetricsSettings,
}

/// What `watch` was asked to do.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub config: Config,
    /// How the sync applies (`--strict`, blocking sessions); a watcher never dry-runs.
    pub options: Options,
    pub watch: WatchOptions,
}

/// The channel of full-resync requests (SIGHUP): room for one. A request made while one
/// is already waiting merges with it, so a storm of signals costs one resync in progress
/// and at most one more, never a queue.
pub fn resync_channel() -> (Sender<()>, Receiver<()>) {
    mpsc::channel(1)
}

/// What became of a resync request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// It waits for its turn.
    Queued,
    /// One was already waiting: this one is answered by it.
    Merged,
    /// Nobody listens any more (the loop is gone).
    Closed,
}

/// Asks for a full resync without ever blocking (the caller may be a signal handler task).
pub fn request_resync(tx: &Sender<()>) -> Requested {
    match tx.try_send(()) {
        Ok(()) => Requested::Queued,
        Err(mpsc::error::TrySendError::Full(())) => Requested::Merged,
        Err(mpsc::error::TrySendError::Closed(())) => Requested::Closed,
    }
}

/// `pg-password-sync watch` (sidecar): wait for the server, sync, then watch and re-sync
/// until SIGTERM or SIGINT (exit 0). SIGHUP checks every role.
pub fn command(settings: WatchSettings) -> anyhow::Result<u8> {
    let listener = metrics::bind(&settings.watch.metrics)?;
    crate::runtime::new()?.block_on(sidecar(
        Syncer::new(settings.config, settings.options),
        settings.watch,
        listener,
    ))
}

async fn sidecar(
    mut syncer: Syncer,
    options: WatchOptions,
    listener: Option<std::net::TcpListener>,
) -> anyhow::Result<u8> {
    // Installed before anything else, so a stop during the server wait is clean too.
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let (resync_tx, mut resync_rx) = resync_channel();
    let state = StateFile::new(&options.state_dir);
    // A fresh state at once: a restarted sidecar must not inherit its predecessor's
    // "ready, synced" from a state directory that outlived it.
    state.record_ready(false);
    let mut metrics = Metrics::start(&options.metrics, listener, &syncer.config, &state)?;

    let work = async {
        let standby = wait_for_server_and_sync(&mut syncer, &state, &mut metrics).await;
        let recorders = Recorders {
            state: &state,
            metrics: &mut metrics,
        };
        watch_loop(&mut syncer, &options, recorders, &mut resync_rx, standby).await
    };
    tokio::pin!(work);
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received; stopping");
                return Ok(0);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received; stopping");
                return Ok(0);
            }
            _ = hup.recv() => match request_resync(&resync_tx) {
                // Waits if the loop has not started yet; it then resyncs right away.
                Requested::Queued => tracing::info!("SIGHUP received; full resync"),
                Requested::Merged => tracing::debug!("SIGHUP received; a full resync is already pending"),
                Requested::Closed => {}
            },
            result = &mut work => {
                // The loop only returns on an error it cannot recover from.
                result?;
                return Ok(0);
            }
        }
    }
}

/// The sidecar's start: waits until the server answers (backoff, a progress line every
/// 10 s, never giving up), then makes the first sync, which checks every role. Only a
/// connection failure is waited out here; every other outcome hands over to the watch loop
/// at once: invalid or missing secret files (the server is then only probed, and the loop
/// reports the files and applies them when they become valid) or a failed apply (the loop
/// retries it with its own backoff). Contrast `run`'s first sync, which retries a failed
/// sync itself because postgres is its child and may still be starting. Returns whether
/// the server said it is a standby.
async fn wait_for_server_and_sync(
    syncer: &mut Syncer,
    state: &StateFile,
    metrics: &mut Metrics,
) -> bool {
    let started = Instant::now();
    let mut backoff = Backoff::new(WAIT_MIN, WAIT_MAX);
    let mut progress_at = started + WAIT_PROGRESS;
    let mut announced = false;
    loop {
        let attempt = Instant::now();
        let result = sync_and_record(syncer, state, Scope::CheckAll, Reread::AtOnce).await;
        metrics.record(metrics::Trigger::Start, &result, attempt, syncer);
        let error = match result {
            Ok(report) => {
                // Ready before the report is logged: whoever sees the line finds `health`
                // already current (the rule of `sync_and_record`).
                state.record_ready(true);
                if let Some(report) = &report {
                    log_report(report);
                }
                return report.is_some_and(|r| r.standby);
            }
            Err(err) if Failure::of(&err) == Some(Failure::Config) => {
                // The secrets cannot be read yet; is the server at least up?
                match syncer.connect_superuser(&[]).await {
                    Ok(client) => {
                        state.record_ready(true);
                        return in_recovery(&client, syncer.config.connection.connect_timeout)
                            .await
                            .unwrap_or(false);
                    }
                    // Servers answer, all standbys: up, and a promotion to watch for.
                    Err(probe) if session::target::only_standbys(&probe) => {
                        state.record_ready(true);
                        return true;
                    }
                    Err(probe) => probe,
                }
            }
            Err(err) if Failure::of(&err) == Some(Failure::Connect) => err,
            Err(err) => {
                // The server answered (SQL failure, missing role under --strict): it is up;
                // the loop retries the sync with its own backoff.
                tracing::warn!("first sync failed: {err:#}");
                state.record_ready(true);
                return false;
            }
        };
        if !announced {
            tracing::info!(
                "waiting for PostgreSQL at {}: {error:#}",
                connect::describe(&syncer.config)
            );
            announced = true;
        } else if Instant::now() >= progress_at {
            tracing::info!(
                "still waiting for PostgreSQL after {} s: {error:#}",
                started.elapsed().as_secs()
            );
            progress_at = Instant::now() + WAIT_PROGRESS;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// `SELECT pg_is_in_recovery()`, bounded by `limit`.
async fn in_recovery(client: &Client, limit: Duration) -> anyhow::Result<bool> {
    let row = tokio::time::timeout(limit, client.query_one("SELECT pg_is_in_recovery()", &[]))
        .await
        .context("asking whether the server is a standby: no answer in time")?
        .context("asking whether the server is a standby")?;
    Ok(row.get(0))
}

/// Why a sync is being made (for the log, and whether it must apply without a change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The loop started: closes the gap between the caller's first sync and the watches
    /// (applies only what changed in that gap).
    Start,
    /// File events: a file arrived by rename, or a burst settled.
    Files,
    /// The watcher overflowed or failed: events may have been lost.
    Overflow,
    /// `--resync-interval` elapsed.
    Periodic,
    /// A message on the `resync` channel (SIGHUP).
    Requested,
    /// The standby we were skipping became a primary.
    Promoted,
    /// A retry after a failed apply (keeps the original trigger's scope, and counts as
    /// the original trigger in the metrics).
    Retry(Scope, metrics::Trigger),
}

impl Trigger {
    /// Which roles the sync covers. `ChangedOnly` also means an unchanged set needs no
    /// connection at all.
    fn scope(self) -> Scope {
        match self {
            // Start: the caller's first sync has just applied the set (or failed, and then
            // there is no last applied set and the comparison applies it anyway); only a
            // change in between needs a connection, not a second pass over every role.
            Trigger::Start | Trigger::Files => Scope::ChangedOnly,
            Trigger::Retry(scope, _) => scope,
            // Promoted: what a standby skipped was still remembered as applied, so only
            // checking every role catches up with it.
            Trigger::Overflow | Trigger::Periodic | Trigger::Requested | Trigger::Promoted => {
                Scope::CheckAll
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Trigger::Start => "start of watching",
            Trigger::Files => "file change",
            Trigger::Overflow => "watcher overflow",
            Trigger::Periodic => "periodic resync",
            Trigger::Requested => "resync request",
            Trigger::Promoted => "promotion",
            Trigger::Retry(..) => "retry",
        }
    }

    /// The trigger the metrics count the sync under.
    fn cause(self) -> metrics::Trigger {
        match self {
            Trigger::Start => metrics::Trigger::Start,
            Trigger::Files | Trigger::Overflow => metrics::Trigger::File,
            Trigger::Periodic => metrics::Trigger::Periodic,
            Trigger::Requested => metrics::Trigger::Sighup,
            Trigger::Promoted => metrics::Trigger::Promotion,
            Trigger::Retry(_, cause) => cause,
        }
    }
}

/// A scheduled retry of a failed apply.
struct Retry {
    at: Instant,
    scope: Scope,
    /// When the rotation being retried was first seen (latency is reported from there).
    since: Instant,
    /// What made the sync that failed.
    cause: metrics::Trigger,
}

/// The retry schedule of failed applies: the one pending retry, if any, and the backoff
/// that spaces them (the last applied set is the Syncer's).
struct RetrySchedule {
    pending: Option<Retry>,
    backoff: Backoff,
}

impl RetrySchedule {
    /// Whether the pending retry checks every role.
    fn pending_checks_all(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|r| r.scope == Scope::CheckAll)
    }
}

/// A standby being watched for its promotion (the watch loop, and `run` when it does not
/// watch the files).
pub struct PromotionWatch {
    /// The data directory, when this process can see it (`standby.signal`).
    pgdata: PathBuf,
    next_check: Instant,
    /// The kept connection of the `pg_is_in_recovery()` check (no data directory).
    client: Option<Client>,
}

impl PromotionWatch {
    pub fn new(pgdata: &Path) -> PromotionWatch {
        PromotionWatch {
            pgdata: pgdata.to_path_buf(),
            next_check: Instant::now(),
            client: None,
        }
    }

    /// Whether the server is a primary now. While the data directory says it is a standby
    /// (`standby.signal`, which the server removes when promoted) nothing else is asked.
    /// Otherwise, or without the data directory (a sidecar), the server is asked on a
    /// connection kept for the purpose: the status line of `postmaster.pid` cannot tell, a
    /// hot standby writes `ready` like a primary. Every wait is bounded by the connect
    /// timeout; any doubt (server restarting, no answer) counts as still a standby and is
    /// checked again soon.
    async fn promoted(&mut self, syncer: &Syncer) -> bool {
        let pgdata = &self.pgdata;
        if postmaster::is_standby(pgdata, postmaster::read(pgdata).as_ref()) {
            self.next_check = Instant::now() + PROMOTION_POLL_FILE;
            return false;
        }
        self.next_check = Instant::now() + PROMOTION_POLL_QUERY;
        let limit = syncer.config.connection.connect_timeout;
        if self.client.as_ref().is_none_or(Client::is_closed) {
            // Borrowed, not cloned: no second copy of the passwords in memory.
            let set = syncer
                .last_applied()
                .map_or(&[][..], |set| set.entries.as_slice());
            let budget = syncer.config.connect_budget();
            match tokio::time::timeout(budget, syncer.connect_superuser(set)).await {
                Ok(Ok(client)) => self.client = Some(client),
                Ok(Err(err)) => {
                    tracing::debug!("standby check: {err:#}");
                    return false;
                }
                Err(_) => {
                    tracing::debug!("standby check: connecting took too long");
                    return false;
                }
            }
        }
        let Some(client) = &self.client else {
            return false;
        };
        match in_recovery(client, limit).await {
            Ok(recovering) => !recovering,
            Err(err) => {
                tracing::debug!("standby check: {err:#}");
                self.client = None;
                false
            }
        }
    }

    /// Returns once the server is a primary (checks as `promoted`, at its pace).
    pub async fn wait(&mut self, syncer: &Syncer) {
        loop {
            sleep_until(Some(self.next_check)).await;
            if self.promoted(syncer).await {
                return;
            }
        }
    }
}

/// Where the loop records each sync's outcome: the state file `health` reads, and the
/// metrics (off unless asked for).
pub struct Recorders<'a> {
    pub state: &'a StateFile,
    pub metrics: &'a mut Metrics,
}

/// Watches the secret directories and re-syncs on change, on the periodic timer, on every
/// request on `resync` (SIGHUP) and when a standby is promoted, recording each outcome in
/// `recorders`. `standby`: the caller's first sync found a standby. Runs until an
/// unrecoverable error; the caller drops it to stop (e.g. when the child exits).
pub async fn watch_loop(
    syncer: &mut Syncer,
    options: &WatchOptions,
    recorders: Recorders<'_>,
    resync: &mut Receiver<()>,
    standby: bool,
) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watches = Watches::new(events_tx)?;
    watches.arm(&syncer.config);
    announce(&watches, syncer, options);
    let mut work = Loop {
        syncer,
        state: recorders.state,
        metrics: recorders.metrics,
        watches,
        debouncer: Debouncer::new(options.debounce),
        stamps: None,
        retries: RetrySchedule {
            pending: None,
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
        },
        standby: None,
        pgdata: &options.pgdata,
        last_requested: None,
        deferred_request: None,
    };
    if standby {
        work.became_standby();
    }
    let mut periodic = (!options.resync_interval.is_zero()).then(|| {
        let period = options.resync_interval;
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    let mut drift_check = tokio::time::interval(DRIFT_CHECK);
    drift_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync_open = true;

    // Anything that changed between the caller's first sync and the watches being armed
    // would otherwise go unnoticed until the next event. Changed roles only: the first sync
    // has just checked the server, so an unchanged set needs no second connection.
    work.reconcile(Trigger::Start, Instant::now()).await;

    loop {
        work.prune_writers();
        let debounce_at = work.debouncer.deadline();
        let retry_at = work.retries.pending.as_ref().map(|r| r.at);
        let promotion_at = work.standby.as_ref().map(|s| s.next_check);
        let deferred_at = work.deferred_request;
        let logins_at = work.metrics.logins_due();
        tokio::select! {
            event = events.recv() => {
                let event = event.context("the file watcher stopped")?;
                work.on_event(&event).await;
            }
            _ = sleep_until(debounce_at) => work.on_due().await,
            _ = sleep_until(retry_at) => {
                if let Some(retry) = work.retries.pending.take() {
                    work.on_retry(retry).await;
                }
            }
            message = resync.recv(), if resync_open => match message {
                Some(()) => work.requested().await,
                // The sender is gone (the caller will drop us soon); stop polling it.
                None => resync_open = false,
            },
            _ = sleep_until(deferred_at) => {
                work.deferred_request = None;
                work.requested().await;
            }
            _ = tick(periodic.as_mut()) => work.full_resync(Trigger::Periodic).await,
            _ = sleep_until(promotion_at) => work.check_promotion().await,
            _ = drift_check.tick() => work.check_drift(),
            _ = sleep_until(logins_at) => work.metrics.refresh_logins(work.syncer).await,
        }
    }
}

/// The loop's first line: what it watches, and how.
fn announce(watches: &Watches, syncer: &Syncer, options: &WatchOptions) {
    let (dirs, files) = watches.counts(&syncer.config);
    tracing::info!(
        "watching {dirs} secret director{} and {files} secret file{} (debounce {} ms, resync {})",
        if dirs == 1 { "y" } else { "ies" },
        if files == 1 { "" } else { "s" },
        options.debounce.as_millis(),
        if options.resync_interval.is_zero() {
            "off".to_owned()
        } else {
            format!("every {} s", options.resync_interval.as_secs())
        }
    );
}

/// How the loop treats one notify event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventClass {
    /// Opening or reading a file (our own reads cause these), and the second report of a
    /// rename (notify sends `To`, then `Both` for the same rename): not a change.
    Noise,
    /// Something changed (created, deleted, renamed away, metadata): read after the quiet
    /// period.
    Change,
    /// `IN_MODIFY`: the file is being written in place, and is incomplete until its writer
    /// closes it.
    Modified,
    /// `IN_CLOSE_WRITE`: a writer is done with the file.
    Closed,
    /// `IN_MOVED_TO`: a file was renamed into place (a generator's or Compose host's
    /// atomic replace, or a Kubernetes AtomicWriter's new `..data` symlink). A rename
    /// moves a finished file, so it is complete on arrival: read and apply at once.
    Arrived,
    /// Events were lost (inotify queue overflow) or the watcher reported an error.
    Overflow,
}

fn classify(event: &notify::Result<Event>) -> EventClass {
    match event {
        Err(_) => EventClass::Overflow,
        Ok(event) if event.need_rescan() => EventClass::Overflow,
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => EventClass::Closed,
            EventKind::Access(_) => EventClass::Noise,
            EventKind::Modify(ModifyKind::Data(_)) => EventClass::Modified,
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => EventClass::Arrived,
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => EventClass::Noise,
            _ => EventClass::Change,
        },
    }
}

/// The symlink a Kubernetes AtomicWriter renames into place as the last step of a swap.
const DATA_LINK: &str = "..data";

fn describe_event(event: &notify::Result<Event>) -> String {
    match event {
        Ok(event) => format!("{:?}", event.kind),
        Err(err) => err.to_string(),
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The loop's state between events.
struct Loop<'a> {
    syncer: &'a mut Syncer,
    state: &'a StateFile,
    metrics: &'a mut Metrics,
    watches: Watches,
    debouncer: Debouncer,
    /// The secret files' versions at the last in-place write: a burst of in-place writes
    /// is only read when they are unchanged at its end (size and mtime stood still).
    stamps: Option<Snapshot>,
    retries: RetrySchedule,
    /// Set while the server is a standby: then its promotion is watched for.
    standby: Option<PromotionWatch>,
    /// The data directory, for the promotion watch.
    pgdata: &'a Path,
    /// When the last resync on request started (`RESYNC_SPACING` from there).
    last_requested: Option<Instant>,
    /// A request that came too soon after the last one: answered at this instant.
    deferred_request: Option<Instant>,
}

impl Loop<'_> {
    async fn on_event(&mut self, event: &notify::Result<Event>) {
        let now = Instant::now();
        let class = classify(event);
        let paths: &[PathBuf] = event.as_ref().map_or(&[], |e| e.paths.as_slice());
        match class {
            EventClass::Noise => {}
            EventClass::Change => self.debouncer.event(now, false),
            EventClass::Overflow => {
                tracing::warn!(
                    "file watcher overflowed or failed ({}); full resync",
                    describe_event(event)
                );
                self.debouncer.event(now, true);
            }
            EventClass::Modified | EventClass::Closed => {
                // Only secret files: a temporary file written beside them before its
                // rename, or a stranger's file, is no part of the set.
                let secret: Vec<&PathBuf> = paths
                    .iter()
                    .filter(|p| watches::is_secret_file(&self.syncer.config, p))
                    .collect();
                if secret.is_empty() {
                    return;
                }
                for path in secret {
                    if class == EventClass::Modified {
                        let id = watches::identity(path);
                        self.debouncer.modified(now, path.clone(), id);
                    } else {
                        self.debouncer.closed(now, path);
                    }
                }
                self.stamps = Some(Snapshot::take(&self.syncer.config));
            }
            EventClass::Arrived => {
                if self.debouncer.in_place() {
                    // Another secret file is being written in place: the set is not
                    // complete until that one settles; the burst applies both.
                    tracing::debug!("a file arrived while another is written in place");
                    self.debouncer.event(now, false);
                    return;
                }
                let (trigger, since) = match self.debouncer.take_settled() {
                    Some(b) if b.overflowed => (Trigger::Overflow, b.first),
                    Some(b) => (Trigger::Files, b.first),
                    None => (Trigger::Files, now),
                };
                let swap = paths
                    .iter()
                    .any(|p| p.file_name() == Some(OsStr::new(DATA_LINK)));
                tracing::debug!(swap, "a file arrived by rename; applying at once");
                self.reconcile(trigger, since).await;
            }
        }
    }

    /// A watched path appeared, vanished or was replaced: read after the quiet period. A
    /// pending burst re-arms anyway; feeding it would only stretch its quiet period (after
    /// a Kubernetes swap every file's inode has changed).
    fn check_drift(&mut self) {
        if !self.debouncer.pending() && self.watches.drifted(&self.syncer.config) {
            tracing::debug!("a watched path appeared, vanished or was replaced");
            self.debouncer.event(Instant::now(), false);
        }
    }

    /// Drops writers whose file has since been replaced (renamed over, swapped, deleted):
    /// whatever they still write goes to a file that is no longer the secret.
    fn prune_writers(&mut self) {
        if self.debouncer.in_place() {
            self.debouncer
                .retain_writers(|path, id| id.is_some() && watches::identity(path) == id);
        }
    }

    /// The pending burst's deadline passed: apply it, or keep waiting for an open writer
    /// or for files that still change.
    async fn on_due(&mut self) {
        let now = Instant::now();
        if self.debouncer.in_place() && self.debouncer.deadline().is_some_and(|d| d <= now) {
            let current = Snapshot::take(&self.syncer.config);
            if self.stamps.as_ref() != Some(&current) {
                // Written without an event we saw (another mount, a lost event): the quiet
                // period starts again from now.
                tracing::debug!("secret files changed during the quiet period; waiting");
                self.stamps = Some(current);
                self.debouncer.written(now);
                return;
            }
        }
        match self.debouncer.take_due(now) {
            Due::NotYet => {}
            Due::HeldOpen(paths) => tracing::warn!(
                "secret file(s) {} modified in place and still open for writing; their \
                 value is taken once the writer closes them (the previous passwords stay \
                 in force)",
                show(&paths)
            ),
            Due::Burst(burst) => {
                self.stamps = None;
                let trigger = if burst.overflowed {
                    Trigger::Overflow
                } else {
                    Trigger::Files
                };
                self.reconcile(trigger, burst.first).await;
            }
        }
    }

    /// A resync request (SIGHUP): at once, or at the end of `RESYNC_SPACING` after the
    /// last one, merged with every request until then.
    async fn requested(&mut self) {
        let now = Instant::now();
        if let Some(at) = self.deferred_request {
            tracing::debug!(
                in_ms = (at - now.min(at)).as_millis(),
                "resync request merged"
            );
            return;
        }
        if let Some(last) = self.last_requested
            && now < last + RESYNC_SPACING
        {
            self.deferred_request = Some(last + RESYNC_SPACING);
            return;
        }
        self.last_requested = Some(now);
        self.full_resync(Trigger::Requested).await;
    }

    async fn on_retry(&mut self, retry: Retry) {
        match retry.scope {
            Scope::CheckAll => {
                self.full_resync(Trigger::Retry(Scope::CheckAll, retry.cause))
                    .await;
            }
            // The pending burst re-reads the changed files anyway once they settle.
            Scope::ChangedOnly if self.debouncer.pending() => {}
            Scope::ChangedOnly => {
                let since = self
                    .debouncer
                    .take_settled()
                    .map_or(retry.since, |b| b.first.min(retry.since));
                self.reconcile(Trigger::Retry(Scope::ChangedOnly, retry.cause), since)
                    .await;
            }
        }
    }

    /// A resync of every role. With no file change pending it reads the files; while
    /// files are mid-change it must not (it could take half a value), so it re-applies the
    /// last applied set, which still restores a password changed behind our back; the
    /// pending change is applied when it settles.
    async fn full_resync(&mut self, trigger: Trigger) {
        if !self.debouncer.pending() {
            self.reconcile(trigger, Instant::now()).await;
            return;
        }
        if self.syncer.last_applied().is_none() {
            tracing::debug!(
                trigger = trigger.describe(),
                "secret files are changing and nothing was applied yet; the change is read \
                 when it settles"
            );
            return;
        }
        tracing::info!(
            "secret files are changing; the {} re-applies the last applied set instead of \
             reading them",
            trigger.describe()
        );
        let applying = Instant::now();
        let result = self.syncer.reapply_last().await;
        match &result {
            // The files were not read: only a failure is worth recording for `health`,
            // and what the server said about recovery (a promotion).
            Ok(report) => {
                self.state
                    .record_standby(report.as_ref().is_some_and(|r| r.standby));
                if let Some(report) = report {
                    self.state.record_changed(&report.changed());
                }
            }
            Err(_) => self
                .state
                .record_sync_of(Snapshot::take(&self.syncer.config), false, None),
        }
        self.outcome(result, trigger, Scope::CheckAll, applying, applying);
    }

    async fn check_promotion(&mut self) {
        let Some(standby) = &mut self.standby else {
            return;
        };
        if standby.promoted(self.syncer).await {
            self.standby = None;
            tracing::info!("the server is no longer a standby (promoted): syncing every role");
            self.full_resync(Trigger::Promoted).await;
        }
    }

    fn became_standby(&mut self) {
        if self.standby.is_none() {
            tracing::info!("watching the standby for its promotion");
            self.standby = Some(PromotionWatch::new(self.pgdata));
        }
    }

    /// Re-arms the watches, re-reads every secret, and applies when needed; records the
    /// outcome.
    async fn reconcile(&mut self, trigger: Trigger, since: Instant) {
        // First re-arm, then read: a change after the read is then sure to raise an event.
        self.watches.arm(&self.syncer.config);
        let scope = trigger.scope();
        let applying = Instant::now();
        // A change that came while it waited for the sync lock is applied when it settles.
        let result = sync_and_record(self.syncer, self.state, scope, Reread::WhenSettled).await;
        self.outcome(result, trigger, scope, since, applying);
    }

    /// Logs a sync's outcome and schedules what follows from it (a retry, watching a
    /// standby).
    fn outcome(
        &mut self,
        result: anyhow::Result<Option<Report>>,
        trigger: Trigger,
        scope: Scope,
        since: Instant,
        applying: Instant,
    ) {
        self.metrics
            .record(trigger.cause(), &result, since, self.syncer);
        match result {
            Ok(None) => {
                tracing::debug!(
                    trigger = trigger.describe(),
                    "secret files unchanged; nothing to do"
                );
                // A retry of a failed resync of every role stays scheduled: the server may
                // still hold a password changed behind our back. A retry of a file change
                // is moot now.
                if self.retries.pending.is_some() && !self.retries.pending_checks_all() {
                    self.retries.pending = None;
                }
            }
            Ok(Some(report)) => {
                log_applied(&report, trigger, since, applying);
                if report.standby {
                    self.became_standby();
                } else {
                    self.standby = None;
                }
                // An apply of the changed roles only does not stand in for a resync of
                // every role that failed earlier: that retry stays scheduled.
                if scope == Scope::CheckAll || !self.retries.pending_checks_all() {
                    self.retries.pending = None;
                    self.retries.backoff.reset();
                }
            }
            Err(err) if Failure::of(&err) == Some(Failure::Config) => {
                // The message names the file and the problem, never the value.
                tracing::warn!(
                    "secret files are not valid, nothing applied (the previous passwords \
                     stay in force until the files are fixed): {err:#}"
                );
            }
            Err(err) => {
                let delay = self.retries.backoff.next_delay();
                if err.downcast_ref::<FilesChanged>().is_some() {
                    // Not a failure: the files changed while the sync queued for its lock.
                    // The pending change is applied when it settles (the retry waits for
                    // it, or finds none and reads the files).
                    tracing::info!(
                        "{err} (trigger: {}); applying them once they settle",
                        trigger.describe()
                    );
                } else {
                    tracing::warn!(
                        "applying the secret files failed (trigger: {}); retrying in {} ms: \
                         {err:#}",
                        trigger.describe(),
                        delay.as_millis()
                    );
                }
                self.retries.pending = Some(Retry {
                    at: Instant::now() + delay,
                    scope,
                    since,
                    cause: trigger.cause(),
                });
            }
        }
    }
}

/// Logs what a sync that applied did: the per-role report and completion line when it
/// changed something (operators grep for `Password synchronization complete.`), with the
/// time from the first file event to its commit.
fn log_applied(report: &Report, trigger: Trigger, since: Instant, applying: Instant) {
    let elapsed = since.elapsed().as_millis();
    tracing::debug!(
        trigger = trigger.describe(),
        apply_ms = applying.elapsed().as_millis(),
        since_first_event_ms = elapsed,
        "sync transaction done"
    );
    let changed = report.changed();
    if report.standby {
        tracing::info!("server is a standby (in recovery): sync skipped");
        return;
    }
    if !report.restored.is_empty() {
        tracing::warn!(
            "password of role(s) {} restored: changed on the server since this process set it",
            report.restored.join(", ")
        );
    }
    if changed.is_empty() && report.logins.is_empty() {
        tracing::debug!(
            trigger = trigger.describe(),
            "all passwords already in force"
        );
        return;
    }
    log_report(report);
    tracing::info!(
        "passwords rotated: {} changed, {elapsed} ms from first event to commit (trigger: {})",
        if changed.is_empty() {
            "none".to_owned()
        } else {
            changed.join(", ")
        },
        trigger.describe()
    );
}

/// Sleeps until `deadline`, or forever when there is none (a disabled `select!` branch).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// The next tick of an optional interval (forever when it is off).
async fn tick(timer: Option<&mut tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};

    fn ev(kind: EventKind, path: &str) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(path.into()))
    }

    #[test]
    fn our_own_reads_are_noise() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert_eq!(
                classify(&ev(kind, "/k/pw.txt")),
                EventClass::Noise,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn in_place_writes_are_modified_until_closed() {
        assert_eq!(
            classify(&ev(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                "/k/pw.txt"
            )),
            EventClass::Modified
        );
        assert_eq!(
            classify(&ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/k/pw.txt"
            )),
            EventClass::Closed
        );
    }

    #[test]
    fn a_rename_into_place_arrives_complete_and_its_second_report_is_noise() {
        // A plain rename into the keys directory (Compose directory mount, a generator).
        assert_eq!(
            classify(&ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/k/postgres_password.txt"
            )),
            EventClass::Arrived
        );
        // A Kubernetes AtomicWriter's last step.
        assert_eq!(
            classify(&ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/k/..data"
            )),
            EventClass::Arrived
        );
        // notify reports the same rename again with both names: already handled.
        let both = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path("/k/..data_tmp".into())
            .add_path("/k/..data".into());
        assert_eq!(classify(&Ok(both)), EventClass::Noise);
    }

    #[test]
    fn other_changes_wait_for_the_quiet_period() {
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Other,
        ] {
            assert_eq!(
                classify(&ev(kind, "/k/pw.txt")),
                EventClass::Change,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn lost_events_are_an_overflow() {
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(classify(&Ok(overflow)), EventClass::Overflow);
        assert_eq!(
            classify(&Err(notify::Error::generic("boom"))),
            EventClass::Overflow
        );
    }

    #[test]
    fn file_events_and_the_start_apply_only_what_changed() {
        assert_eq!(Trigger::Files.scope(), Scope::ChangedOnly);
        assert_eq!(Trigger::Start.scope(), Scope::ChangedOnly);
        assert_eq!(
            Trigger::Retry(Scope::ChangedOnly, metrics::Trigger::File).scope(),
            Scope::ChangedOnly
        );
        for t in [
            Trigger::Overflow,
            Trigger::Periodic,
            Trigger::Requested,
            Trigger::Promoted,
            Trigger::Retry(Scope::CheckAll, metrics::Trigger::Periodic),
        ] {
            assert_eq!(t.scope(), Scope::CheckAll, "{t:?}");
        }
    }

    #[test]
    fn resync_requests_merge_while_one_is_pending() {
        let (tx, mut rx) = resync_channel();
        assert_eq!(request_resync(&tx), Requested::Queued);
        for _ in 0..1_000 {
            assert_eq!(request_resync(&tx), Requested::Merged);
        }
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "one request for the whole storm");
        assert_eq!(request_resync(&tx), Requested::Queued);
        drop(rx);
        assert_eq!(request_resync(&tx), Requested::Closed);
    }
}

//! Keeping passwords in step with the secret files while the server runs: the `watch`
//! sidecar command, and `watch_loop`, which `run` also uses after its first sync.
//!
//! The loop (ARCHITECTURE.md, "A rotation") treats any inotify event on a secret directory or file as a
//! trigger, waits for a quiet period (`--debounce`) so that a rotation touching several files
//! is read once, re-reads *every* secret, and applies only when the whole set is valid and
//! some value differs from what it last applied. An invalid set (a half-written or empty
//! file) is logged and left alone: the previous passwords stay in force until the next event
//! brings a valid set. One event skips the quiet period: a Kubernetes AtomicWriter renaming
//! its new `..data` symlink into place, which by design completes a consistent set, so a
//! Secret update is applied milliseconds after the kubelet swaps it. A periodic full resync
//! (`--resync-interval`), a watcher overflow and a message on the `resync` channel (SIGHUP)
//! check every role (`Scope::CheckAll`) even without a content change, which restores a
//! password changed behind our back; a file change applies only the roles whose secret
//! changed (`Scope::ChangedOnly`).
//! A failed apply (server restarting, auth refused) is retried with backoff; nothing
//! transient ends the loop.

mod debounce;
mod watches;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::Event;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::backoff::Backoff;
use crate::config::{Config, ConfigSettings};
use crate::error::Failure;
use crate::state::StateFile;
use crate::sync::{Options, Scope, Syncer, connect, log_report, sync_and_record};
use debounce::Debouncer;
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

/// How the secret files are watched (shared by `run` and `watch`).
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Quiet period after a file event before re-reading the secrets.
    pub debounce: Duration,
    /// Period of the resync that checks every role (`ZERO` = off).
    pub resync_interval: Duration,
    /// Directory for the health state file.
    pub state_dir: PathBuf,
}

/// What `watch` was asked to do.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub config: ConfigSettings,
    /// How the sync applies (`--strict`, blocking sessions); a watcher never dry-runs.
    pub options: Options,
    pub watch: WatchOptions,
}

/// `pg-password-sync watch` (sidecar): wait for the server, sync, then watch and re-sync
/// until SIGTERM or SIGINT (exit 0). SIGHUP checks every role.
pub fn command(settings: WatchSettings) -> anyhow::Result<u8> {
    let config = Config::from_settings(&settings.config)?;
    crate::runtime::new()?.block_on(sidecar(
        Syncer::new(config, settings.options),
        settings.watch,
    ))
}

async fn sidecar(mut syncer: Syncer, options: WatchOptions) -> anyhow::Result<u8> {
    // Installed before anything else, so a stop during the server wait is clean too.
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let (resync_tx, mut resync_rx) = mpsc::unbounded_channel();
    let state = StateFile::new(&options.state_dir);
    // A fresh state at once: a restarted sidecar must not inherit its predecessor's
    // "ready, synced" from a state directory that outlived it.
    state.record_ready(false);

    let work = async {
        wait_for_server_and_sync(&mut syncer, &state).await;
        watch_loop(&mut syncer, &options, &state, &mut resync_rx).await
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
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; full resync");
                // Queued if the loop has not started yet; it then resyncs right away.
                let _ = resync_tx.send(());
            }
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
/// sync itself because postgres is its child and may still be starting.
async fn wait_for_server_and_sync(syncer: &mut Syncer, state: &StateFile) {
    let started = Instant::now();
    let mut backoff = Backoff::new(WAIT_MIN, WAIT_MAX);
    let mut progress_at = started + WAIT_PROGRESS;
    let mut announced = false;
    loop {
        let error = match sync_and_record(syncer, state, Scope::CheckAll).await {
            Ok(report) => {
                if let Some(report) = &report {
                    log_report(report);
                }
                state.record_ready(true);
                return;
            }
            Err(err) if Failure::of(&err) == Some(Failure::Config) => {
                // The secrets cannot be read yet; is the server at least up?
                match syncer.connect_superuser(&[]).await {
                    Ok(_client) => {
                        state.record_ready(true);
                        return;
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
                return;
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

/// Why a sync is being made (for the log, and whether it must apply without a change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The loop started: closes the gap between the caller's first sync and the watches
    /// (applies only what changed in that gap).
    Start,
    /// A debounced burst of file events.
    Files,
    /// The watcher overflowed or failed: events may have been lost.
    Overflow,
    /// `--resync-interval` elapsed.
    Periodic,
    /// A message on the `resync` channel (SIGHUP).
    Requested,
    /// A retry after a failed apply (keeps the original trigger's scope).
    Retry(Scope),
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
            Trigger::Retry(scope) => scope,
            Trigger::Overflow | Trigger::Periodic | Trigger::Requested => Scope::CheckAll,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Trigger::Start => "start of watching",
            Trigger::Files => "file change",
            Trigger::Overflow => "watcher overflow",
            Trigger::Periodic => "periodic resync",
            Trigger::Requested => "resync request",
            Trigger::Retry(_) => "retry",
        }
    }
}

/// A scheduled retry of a failed apply.
struct Retry {
    at: Instant,
    scope: Scope,
    /// When the rotation being retried was first seen (latency is reported from there).
    since: Instant,
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

/// Watches the secret directories and re-syncs on change, on the periodic timer and on
/// every message on `resync` (SIGHUP), recording each outcome in `state`. Runs until an
/// unrecoverable error; the caller drops it to stop (e.g. when the child exits).
pub async fn watch_loop(
    syncer: &mut Syncer,
    options: &WatchOptions,
    state: &StateFile,
    resync: &mut UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watches = Watches::new(events_tx)?;
    watches.arm(&syncer.config);
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

    let mut debouncer = Debouncer::new(options.debounce);
    let mut retries = RetrySchedule {
        pending: None,
        backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
    };
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
    reconcile(
        syncer,
        state,
        &mut watches,
        &mut retries,
        Trigger::Start,
        Instant::now(),
    )
    .await;

    loop {
        let debounce_at = debouncer.deadline();
        let retry_at = retries.pending.as_ref().map(|r| r.at);
        tokio::select! {
            event = events.recv() => {
                let event = event.context("the file watcher stopped")?;
                let now = Instant::now();
                match classify(&event) {
                    EventClass::Noise => {}
                    EventClass::Change => debouncer.event(now, false),
                    EventClass::Complete => {
                        let since = debouncer.take().map_or(now, |b| b.first);
                        reconcile(syncer, state, &mut watches, &mut retries, Trigger::Files, since).await;
                    }
                    EventClass::Overflow => {
                        tracing::warn!("file watcher overflowed or failed ({}); full resync", describe_event(&event));
                        debouncer.event(now, true);
                    }
                }
            }
            _ = sleep_until(debounce_at) => {
                if let Some(burst) = debouncer.take_due(Instant::now()) {
                    let trigger = if burst.overflowed { Trigger::Overflow } else { Trigger::Files };
                    reconcile(syncer, state, &mut watches, &mut retries, trigger, burst.first).await;
                }
            }
            _ = sleep_until(retry_at) => {
                if let Some(retry) = retries.pending.take() {
                    // A pending burst is covered: the retry re-reads every file.
                    let since = debouncer.take().map_or(retry.since, |b| b.first.min(retry.since));
                    reconcile(syncer, state, &mut watches, &mut retries, Trigger::Retry(retry.scope), since).await;
                }
            }
            message = resync.recv(), if resync_open => match message {
                Some(()) => {
                    let since = debouncer.take().map_or_else(Instant::now, |b| b.first);
                    reconcile(syncer, state, &mut watches, &mut retries, Trigger::Requested, since).await;
                }
                // The sender is gone (the caller will drop us soon); stop polling it.
                None => resync_open = false,
            },
            _ = tick(periodic.as_mut()) => {
                let since = debouncer.take().map_or_else(Instant::now, |b| b.first);
                reconcile(syncer, state, &mut watches, &mut retries, Trigger::Periodic, since).await;
            }
            _ = drift_check.tick() => {
                // A pending burst re-arms anyway; feeding it would only stretch its quiet
                // period (after a Kubernetes swap every file's inode has changed).
                if debouncer.deadline().is_none() && watches.drifted(&syncer.config) {
                    tracing::debug!("a watched path appeared, vanished or was replaced");
                    debouncer.event(Instant::now(), false);
                }
            }
        }
    }
}

/// How the loop treats one notify event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventClass {
    /// Opening or reading a file (our own reads cause these): not a change.
    Noise,
    Change,
    /// A Kubernetes AtomicWriter finished a swap: the new `..data` symlink was renamed into
    /// place. The writer guarantees the whole set is complete at that moment, so there is
    /// nothing to wait for: apply at once instead of after the quiet period.
    Complete,
    /// Events were lost (inotify queue overflow) or the watcher reported an error.
    Overflow,
}

/// The symlink a Kubernetes AtomicWriter renames into place as the last step of a swap.
const DATA_LINK: &str = "..data";

fn classify(event: &notify::Result<Event>) -> EventClass {
    match event {
        Err(_) => EventClass::Overflow,
        Ok(event) if event.need_rescan() => EventClass::Overflow,
        Ok(event) => match event.kind {
            // A write ends with close-after-write; that one is a change.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => EventClass::Change,
            EventKind::Access(_) => EventClass::Noise,
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
                if event
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(OsStr::new(DATA_LINK))) =>
            {
                EventClass::Complete
            }
            _ => EventClass::Change,
        },
    }
}

fn describe_event(event: &notify::Result<Event>) -> String {
    match event {
        Ok(event) => format!("{:?}", event.kind),
        Err(err) => err.to_string(),
    }
}

/// Re-arms the watches, re-reads every secret, and applies when needed; records the outcome.
async fn reconcile(
    syncer: &mut Syncer,
    state: &StateFile,
    watches: &mut Watches,
    retries: &mut RetrySchedule,
    trigger: Trigger,
    since: Instant,
) {
    // First re-arm, then read: a change after the read is then sure to raise an event.
    watches.arm(&syncer.config);
    let scope = trigger.scope();
    let applying = Instant::now();
    match sync_and_record(syncer, state, scope).await {
        Ok(None) => {
            tracing::debug!(
                trigger = trigger.describe(),
                "secret files unchanged; nothing to do"
            );
            // A retry of a failed resync of every role stays scheduled: the server may still
            // hold a password changed behind our back. A retry of a file change is moot now.
            if retries.pending.is_some() && !retries.pending_checks_all() {
                retries.pending = None;
            }
        }
        Ok(Some(report)) => {
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
            } else if !changed.is_empty() || !report.logins.is_empty() {
                // The same per-role report and completion line as every other sync:
                // operators grep for `Password synchronization complete.`.
                log_report(&report);
                tracing::info!(
                    "passwords rotated: {} changed, {elapsed} ms from first event to commit \
                     (trigger: {})",
                    if changed.is_empty() {
                        "none".to_owned()
                    } else {
                        changed.join(", ")
                    },
                    trigger.describe()
                );
            } else {
                tracing::debug!(
                    trigger = trigger.describe(),
                    "all passwords already in force"
                );
            }
            // An apply of the changed roles only does not stand in for a resync of every
            // role that failed earlier: that retry stays scheduled.
            if scope == Scope::CheckAll || !retries.pending_checks_all() {
                retries.pending = None;
                retries.backoff.reset();
            }
        }
        Err(err) if Failure::of(&err) == Some(Failure::Config) => {
            // The message names the file and the problem, never the value.
            tracing::warn!(
                "secret files are not valid, nothing applied (the previous passwords stay in \
                 force until the files are fixed): {err:#}"
            );
        }
        Err(err) => {
            let delay = retries.backoff.next_delay();
            tracing::warn!(
                "applying the secret files failed (trigger: {}); retrying in {} ms: {err:#}",
                trigger.describe(),
                delay.as_millis()
            );
            retries.pending = Some(Retry {
                at: Instant::now() + delay,
                scope,
                since,
            });
        }
    }
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
    use notify::event::{CreateKind, RenameMode};

    #[test]
    fn our_own_reads_are_not_changes_but_writes_and_renames_are() {
        let ev = |kind| Ok(Event::new(kind));
        assert_eq!(
            classify(&ev(EventKind::Access(AccessKind::Open(AccessMode::Any)))),
            EventClass::Noise
        );
        assert_eq!(
            classify(&ev(EventKind::Access(AccessKind::Close(AccessMode::Read)))),
            EventClass::Noise
        );
        assert_eq!(
            classify(&ev(EventKind::Access(AccessKind::Close(AccessMode::Write)))),
            EventClass::Change
        );
        assert_eq!(
            classify(&ev(EventKind::Modify(ModifyKind::Name(RenameMode::To)))),
            EventClass::Change
        );
        assert_eq!(
            classify(&ev(EventKind::Create(CreateKind::File))),
            EventClass::Change
        );
        let swap = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path("/keys/..data_tmp".into())
            .add_path("/keys/..data".into());
        assert_eq!(classify(&Ok(swap)), EventClass::Complete);
        let other_rename = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::To)))
            .add_path("/keys/postgres_password.txt".into());
        assert_eq!(classify(&Ok(other_rename)), EventClass::Change);
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(classify(&Ok(overflow)), EventClass::Overflow);
        assert_eq!(
            classify(&Err(notify::Error::generic("boom"))),
            EventClass::Overflow
        );
    }

    #[test]
    fn file_bursts_and_the_start_apply_only_what_changed() {
        assert_eq!(Trigger::Files.scope(), Scope::ChangedOnly);
        assert_eq!(Trigger::Start.scope(), Scope::ChangedOnly);
        assert_eq!(
            Trigger::Retry(Scope::ChangedOnly).scope(),
            Scope::ChangedOnly
        );
        for t in [
            Trigger::Overflow,
            Trigger::Periodic,
            Trigger::Requested,
            Trigger::Retry(Scope::CheckAll),
        ] {
            assert_eq!(t.scope(), Scope::CheckAll, "{t:?}");
        }
    }
}

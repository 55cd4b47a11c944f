//! `run`: the container's PID 1. Spawn CMD, forward signals, reap every zombie, wait for
//! the *final* server to be ready, sync, then watch and re-sync; exit with CMD's status.
//!
//! The order in `run` matters and is the reason this module exists: signals are blocked
//! (and the signalfd opened) before the runtime or any thread exists and before the child
//! is spawned, so no signal meets a default disposition; the subreaper flag is set before
//! spawning, so the entrypoint's orphans come to us. Then one task owns the signalfd and
//! the reaper (the only `waitpid` in the process), and the main future races the child's
//! end against the work (readiness → sync → watch). When the child ends the work is simply
//! dropped: nothing else has to stop, and we exit at once with its status, after stopping
//! a temporary init server the entrypoint may have left behind.

mod exit;
mod reaper;
mod signals;
mod spawn;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpid};
use tokio::sync::{mpsc, watch};

use crate::cli::RunArgs;
use crate::config::{Config, Host};
use crate::error::Failure;
use crate::postmaster::{self, PidFile};
use crate::state::{Snapshot, StateFile};
use crate::sync::{Options, Syncer};

use reaper::Reaper;
use signals::{Action, Signals};

/// How often the reaper runs even without SIGCHLD (a safety net; signals do the work).
const SAFETY_REAP: Duration = Duration::from_secs(1);

/// How long to wait for a leftover temporary server after SIGINT (fast shutdown).
const LEFTOVER_STOP_LIMIT: Duration = Duration::from_secs(60);

/// `pg-password-sync run`.
pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    // First, before any thread exists: every later thread inherits the mask.
    let signalfd = signals::block()?;
    let config = if args.no_sync {
        None
    } else {
        Some(Config::from_args(&args.config)?)
    };
    if getpid().as_raw() != 1 {
        // Not PID 1 (a sidecar-less test, `docker run --init`…): become the reaper of our
        // orphans anyway, so the temp server and grandchildren are ours to reap and stop.
        nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let command = spawn::command_or_default(&args.cmd);
    let withheld = withheld_env(&args.config.pgdata);
    let child = match spawn::spawn(&command, withheld) {
        Ok(pid) => pid,
        Err(failure) => {
            tracing::error!("{}", failure.message);
            return Ok(failure.code);
        }
    };
    let result = runtime.block_on(supervise(child, signalfd, args, config));
    // Do not wait for anything still running in the runtime (a connection task): the
    // child is gone and PID 1 must exit promptly.
    runtime.shutdown_background();
    result
}

/// Variables the child does not get. The official entrypoint turns
/// `POSTGRES_PASSWORD_FILE` into an exported `POSTGRES_PASSWORD` on every start and then
/// `exec`s postgres, so the superuser's plaintext would sit in the environment of the
/// postmaster and every backend. It only needs it to initialise an empty data directory:
/// once `PG_VERSION` exists, neither variable is passed on. (For the first start, the
/// image ships an init script that unsets it before the entrypoint's final `exec`.)
fn withheld_env(pgdata: &std::path::Path) -> &'static [&'static str] {
    if pgdata.join("PG_VERSION").exists() {
        &["POSTGRES_PASSWORD", "POSTGRES_PASSWORD_FILE"]
    } else {
        &[]
    }
}

/// Everything after the spawn.
async fn supervise(
    child: Pid,
    signalfd: nix::sys::signalfd::SignalFd,
    args: RunArgs,
    config: Option<Config>,
) -> anyhow::Result<u8> {
    let (status_tx, mut status_rx) = watch::channel(None::<u8>);
    let (resync_tx, resync_rx) = mpsc::unbounded_channel();
    let signals = Signals::new(signalfd)?;
    tokio::spawn(signal_loop(
        signals,
        Reaper::new(child, status_tx),
        child,
        resync_tx,
    ));

    let pgdata = args.config.pgdata.clone();
    let state = config
        .as_ref()
        .map(|_| StateFile::new(&args.watch.state_dir));
    if let Some(state) = &state {
        tracing::debug!(path = %state.path.display(), "state file");
        state.record_ready(false);
    }
    let work = work(child, &args, config, state.clone(), resync_rx);
    tokio::pin!(work);
    let mut work_done = false;
    let mut stop_error = None;
    let code = loop {
        tokio::select! {
            changed = status_rx.wait_for(Option::is_some) => {
                // The sender lives in the signal task, which never ends; a closed channel
                // would mean it panicked, and there is no status to report then.
                match changed.map(|code| *code) {
                    Ok(Some(code)) => break code,
                    Ok(None) => continue,
                    Err(_) => anyhow::bail!("the signal and reaper task ended unexpectedly"),
                }
            }
            outcome = &mut work, if !work_done => {
                work_done = true;
                if let Err(err) = outcome {
                    // --exit-on-sync-failure: stop postgres the fast way and exit with the
                    // failure's code once it is down.
                    tracing::error!("stopping PostgreSQL after the failed sync (--exit-on-sync-failure)");
                    forward(child, Signal::SIGINT);
                    stop_error = Some(err);
                }
            }
        }
    };
    let exited_at = Instant::now();
    if let Some(state) = &state {
        state.record_ready(false);
    }
    stop_leftover_server(&pgdata, child).await;
    tracing::info!(
        code,
        after_child_ms = exited_at.elapsed().as_millis() as u64,
        "exiting"
    );
    match stop_error {
        Some(err) => Err(err),
        None => Ok(code),
    }
}

/// Owns the signalfd and the reaper: forwards signals, reaps on SIGCHLD and periodically.
async fn signal_loop(
    mut signals: Signals,
    reaper: Reaper,
    child: Pid,
    resync: mpsc::UnboundedSender<()>,
) {
    let mut safety = tokio::time::interval(SAFETY_REAP);
    loop {
        tokio::select! {
            received = signals.recv() => match received {
                Ok(info) => {
                    let signo = info.ssi_signo as i32;
                    match signals::action(signo) {
                        Action::Reap => reaper.reap_all(),
                        Action::Forward(signal) => {
                            tracing::info!(signal = %signal, from_pid = info.ssi_pid, "forwarding");
                            forward(child, signal);
                        }
                        Action::ForwardAndResync => {
                            tracing::info!(from_pid = info.ssi_pid, "SIGHUP: forwarding and re-syncing");
                            forward(child, Signal::SIGHUP);
                            // No receiver (no sync, or the child is gone): nothing to do.
                            let _ = resync.send(());
                        }
                        Action::Drop => tracing::warn!(signo, "real-time signal not forwarded"),
                    }
                }
                Err(err) => {
                    // Should never happen; keep reaping on the timer rather than spin.
                    tracing::error!("{err:#}");
                    tokio::time::sleep(SAFETY_REAP).await;
                }
            },
            _ = safety.tick() => reaper.reap_all(),
        }
    }
}

/// Sends `signal` to the child. ESRCH (already gone, not yet reaped) is expected.
fn forward(child: Pid, signal: Signal) {
    if let Err(err) = kill(child, signal) {
        tracing::debug!(signal = %signal, "not forwarded: {err}");
    }
}

/// Readiness → first sync (retried) → watch. Returns only for `--no-sync`, when watching
/// stops for good, or with an error under `--exit-on-sync-failure`.
async fn work(
    child: Pid,
    args: &RunArgs,
    config: Option<Config>,
    state: Option<StateFile>,
    mut resync: mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let (Some(config), Some(state)) = (config, state) else {
        tracing::info!("--no-sync: supervising only");
        return Ok(());
    };
    let pidfile = postmaster::wait_ready(&config.pgdata, child.as_raw()).await;
    let ready_at = Instant::now();
    state.record_ready_pid(pidfile.pid);
    let config = target_server(config, &pidfile);
    let options = Options {
        strict: args.options.strict,
        dry_run: false,
        blockers: args.options.blockers.policy(),
    };
    let mut syncer = Syncer::new(config, options);
    first_sync(
        &mut syncer,
        &state,
        &mut resync,
        args.exit_on_sync_failure,
        !args.no_watch,
        ready_at,
    )
    .await?;
    if !args.no_watch {
        tracing::info!("watching the secret files");
        if let Err(err) =
            crate::watch::watch_loop(&mut syncer, &args.watch, &state, &mut resync).await
        {
            tracing::error!(
                "watching the secret files stopped: {err:#}; \
                 re-syncing on SIGHUP and every --resync-interval only"
            );
        }
    }
    // --no-watch: SIGHUP still re-syncs. A watch that gave up (no inotify instance left,
    // say) keeps the periodic resync too.
    let period = Some(args.watch.resync_interval).filter(|p| !args.no_watch && !p.is_zero());
    loop {
        tokio::select! {
            message = resync.recv() => if message.is_none() { break },
            () = tokio::time::sleep(period.unwrap_or_default()), if period.is_some() => {}
        }
        let _ = sync_once(&mut syncer, &state).await;
    }
    Ok(())
}

/// The server to connect to: the socket directory and port the final postmaster wrote,
/// when we connect over a socket at all (a TCP `PGHOST` is the operator's explicit choice).
fn target_server(mut config: Config, pidfile: &PidFile) -> Config {
    if let (Host::Socket(dir), Some(socket_dir), Some(port)) =
        (&config.host, &pidfile.socket_dir, pidfile.port)
        && (dir != socket_dir || config.port != port)
    {
        tracing::info!(
            "postmaster.pid says the server listens on {}/.s.PGSQL.{port}; using that",
            socket_dir.display()
        );
        config.host = Host::Socket(socket_dir.clone());
        config.port = port;
    }
    config
}

/// The first sync after readiness, retried with backoff (1 s doubling to 30 s) while
/// postgres keeps serving; SIGHUP retries at once. With `exit_on_failure` the first
/// failure is returned instead. With `watching`, invalid secret files end this loop
/// early: the watcher applies them as soon as they are fixed, instead of at the next
/// backoff tick.
async fn first_sync(
    syncer: &mut Syncer,
    state: &StateFile,
    resync: &mut mpsc::UnboundedReceiver<()>,
    exit_on_failure: bool,
    watching: bool,
    ready_at: Instant,
) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    loop {
        // A SIGHUP that arrived while waiting is answered by this very attempt.
        while resync.try_recv().is_ok() {}
        match sync_once(syncer, state).await {
            Ok(()) => {
                tracing::info!(
                    after_ready_ms = ready_at.elapsed().as_millis() as u64,
                    "first sync done"
                );
                return Ok(());
            }
            Err(err) if exit_on_failure => return Err(err),
            Err(err) if watching && Failure::of(&err) == Some(Failure::Config) => {
                tracing::info!("waiting for valid secret files");
                return Ok(());
            }
            Err(_) => {
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::info!(retry_in_s = delay.as_secs(), "retrying the sync");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    Some(()) = resync.recv() => attempt = 0,
                }
            }
        }
    }
}

/// One sync, logged and recorded. The snapshot of the files is taken before they are read.
async fn sync_once(syncer: &mut Syncer, state: &StateFile) -> anyhow::Result<()> {
    let snapshot = Snapshot::take(&syncer.config);
    let started = Instant::now();
    match syncer.sync().await {
        Ok(report) => {
            // Recorded before the report is logged: whoever sees the completion line
            // (operators, tests) finds `health` already current.
            state.record_sync_of(snapshot, true);
            for line in report.lines() {
                tracing::info!("{line}");
            }
            tracing::debug!(took_ms = started.elapsed().as_millis() as u64, "sync");
            Ok(())
        }
        Err(err) => {
            tracing::error!("sync failed: {err:#}");
            state.record_sync_of(snapshot, false);
            Err(err)
        }
    }
}

/// The delay before retry number `attempt` (0-based): 1 s, 2 s, 4 s, … capped at 30 s.
fn backoff(attempt: u32) -> Duration {
    let secs = 1u64.checked_shl(attempt.min(16)).unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(30))
}

/// After the child is gone: if `postmaster.pid` names another live postgres (the
/// entrypoint's temporary init server, when the entrypoint died mid-init), stop it with
/// SIGINT (fast shutdown) and wait for it, bounded, so the data directory is left cleanly
/// shut down. As its (sub)reaper we reap it ourselves; `is_alive` treats a zombie as gone.
async fn stop_leftover_server(pgdata: &Path, child: Pid) {
    let Some(file) = postmaster::read(pgdata) else {
        return;
    };
    if file.pid == child.as_raw() || !postmaster::is_alive(file.pid) {
        return;
    }
    if !postmaster::is_postgres(file.pid) {
        tracing::debug!(pid = file.pid, "stale postmaster.pid names another program");
        return;
    }
    tracing::warn!(
        pid = file.pid,
        "a temporary PostgreSQL server is still running; stopping it (SIGINT)"
    );
    if let Err(err) = kill(Pid::from_raw(file.pid), Signal::SIGINT) {
        tracing::warn!(pid = file.pid, "cannot stop it: {err}");
        return;
    }
    let started = Instant::now();
    while postmaster::is_alive(file.pid) {
        if started.elapsed() > LEFTOVER_STOP_LIMIT {
            tracing::warn!(
                pid = file.pid,
                "still running after {LEFTOVER_STOP_LIMIT:?}; giving up"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(
        pid = file.pid,
        took_ms = started.elapsed().as_millis() as u64,
        "temporary server stopped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let secs: Vec<u64> = (0..8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn target_server_follows_the_pid_file_for_sockets_only() {
        use crate::cli::ConfigArgs;
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            c: ConfigArgs,
        }
        let args = W::try_parse_from(["x", "--sync-user", "root"]).unwrap().c;
        let config = Config::from_args(&args).unwrap();
        let file = postmaster::parse("7\n/d\n1\n6543\n/tmp/s\n\n0 0\nready\n").unwrap();
        let moved = target_server(config.clone(), &file);
        assert_eq!(moved.host, Host::Socket("/tmp/s".into()));
        assert_eq!(moved.port, 6543);
        let mut tcp = config;
        tcp.host = Host::Tcp("db".into());
        assert_eq!(target_server(tcp, &file).host, Host::Tcp("db".into()));
    }
}

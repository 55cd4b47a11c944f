//! `run`: the container's story on top of the PID-1 mechanics of `supervisor`. Start CMD
//! (default `docker-entrypoint.sh postgres`), wait for the *final* server to be ready (its
//! `postmaster.pid`: CMD itself, or a postmaster CMD started, such as Patroni's; see
//! `postmaster::PostmasterRule`), make the first sync (retried with backoff), then watch
//! the secret files and re-sync; when CMD ends, stop a server it left behind and exit with
//! CMD's status (ARCHITECTURE.md, "The life of `run`").
//!
//! Everything here is a caller of `supervisor`: the work future (readiness → sync → watch)
//! and what happens after the child's exit. Nothing here blocks signals, waits for a child
//! or forwards a signal; it only asks the supervisor to stop the child when a failed first
//! sync must end the container (`--exit-on-sync-failure`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc::Receiver;

use crate::backoff::Backoff;
use crate::config::{Config, Host, Server};
use crate::error::Failure;
use crate::metrics::{self, Metrics, Trigger};
use crate::postmaster::{self, Kin, PidFile, PostmasterRule};
use crate::state::StateFile;
use crate::supervisor::{Child, Hangups, Supervisor};
use crate::sync::{Options, Reread, Scope, Syncer, log_report, sync_and_record};
use crate::watch::{
    PromotionWatch, RESYNC_SPACING, Recorders, Requested, WatchOptions, request_resync,
    resync_channel, watch_loop,
};

/// The default CMD, as in the official image (`ENTRYPOINT ["docker-entrypoint.sh"]`,
/// `CMD ["postgres"]`).
const DEFAULT_CMD: [&str; 2] = ["docker-entrypoint.sh", "postgres"];

/// Retry delays of a failed first sync: 1 s doubling to 30 s.
const FIRST_SYNC_RETRY_MIN: Duration = Duration::from_secs(1);
const FIRST_SYNC_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long to wait for a leftover temporary server after SIGINT (fast shutdown).
const LEFTOVER_STOP_LIMIT: Duration = Duration::from_secs(60);

/// What `run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// `None` with `--no-sync`: only supervise CMD (the configuration is not read).
    pub config: Option<Config>,
    /// How the sync applies (`--strict`, blocking sessions); `run` never dry-runs.
    pub options: Options,
    pub watch: WatchOptions,
    /// Do not watch the secret files after the first sync (SIGHUP still re-syncs).
    pub no_watch: bool,
    /// On a failed first sync stop postgres and exit non-zero instead of retrying.
    pub exit_on_sync_failure: bool,
    /// Which postmaster is the final server (`--postmaster`).
    pub postmaster: PostmasterRule,
    /// The command to supervise (empty: `DEFAULT_CMD`).
    pub cmd: Vec<String>,
}

/// `pg-password-sync run`.
pub fn command(settings: RunSettings) -> anyhow::Result<u8> {
    // First, before any thread exists: every later thread inherits the mask.
    let supervisor = Supervisor::take_signals()?;
    if let Some(config) = &settings.config
        && config.connection.servers.len() > 1
    {
        return Err(anyhow::anyhow!(
            "PGHOST lists several servers: run syncs the one server it supervises, give its \
             socket directory"
        ))
        .context(Failure::Config);
    }
    // Bound before CMD starts: an address that cannot be had is a configuration error.
    let listener = match &settings.config {
        Some(_) => metrics::bind(&settings.watch.metrics)?,
        None => {
            let asked = &settings.watch.metrics;
            if asked.listen.is_some() || asked.file.is_some() {
                tracing::warn!("--no-sync: there is no sync to report on; no metrics");
            }
            None
        }
    };
    let command = command_or_default(&settings.cmd);
    let withheld = withheld_env(&settings.watch.pgdata);
    // The state file belongs to the sync: with --no-sync there is nothing to report.
    let state = settings
        .config
        .as_ref()
        .map(|_| StateFile::new(&settings.watch.state_dir));
    if let Some(state) = &state {
        tracing::debug!(path = %state.path.display(), "state file");
        state.record_ready(false);
    }
    let pgdata = settings.watch.pgdata.clone();
    let after_state = state.clone();
    supervisor.run(
        &command,
        withheld,
        |child, hangups| work(child, hangups, settings, state, listener),
        |child| async move {
            if let Some(state) = &after_state {
                state.record_ready(false);
            }
            stop_leftover_server(&pgdata, child).await;
        },
    )
}

/// The command to run: the user's, or the image default.
fn command_or_default(cmd: &[String]) -> Vec<String> {
    if cmd.is_empty() {
        DEFAULT_CMD.iter().map(|s| (*s).to_owned()).collect()
    } else {
        cmd.to_vec()
    }
}

/// Variables the child does not get. The official entrypoint turns
/// `POSTGRES_PASSWORD_FILE` into an exported `POSTGRES_PASSWORD` on every start and then
/// `exec`s postgres, so the superuser's plaintext would sit in the environment of the
/// postmaster and every backend. It only needs it to initialise an empty data directory:
/// once `PG_VERSION` exists, neither variable is passed on. (For the first start, the
/// image ships an init script that unsets it before the entrypoint's final `exec`.)
fn withheld_env(pgdata: &Path) -> &'static [&'static str] {
    if pgdata.join("PG_VERSION").exists() {
        &["POSTGRES_PASSWORD", "POSTGRES_PASSWORD_FILE"]
    } else {
        &[]
    }
}

/// Readiness → first sync (retried) → watch. Returns only for `--no-sync`, when watching
/// stops for good, or with an error under `--exit-on-sync-failure` (after asking the child
/// to stop).
async fn work(
    child: Child,
    hangups: Hangups,
    mut settings: RunSettings,
    state: Option<StateFile>,
    listener: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let (Some(config), Some(state)) = (settings.config.take(), state) else {
        tracing::info!("--no-sync: supervising only");
        return Ok(());
    };
    let mut metrics = Metrics::start(&settings.watch.metrics, listener, &config, &state)?;
    let mut resync = resync_requests(hangups);
    let pidfile = final_server_ready(&child, &settings, &state).await;
    let ready_at = Instant::now();
    let config = target_server(config, &pidfile);
    let mut syncer = Syncer::new(config, settings.options);
    let watching = !settings.no_watch;
    let mut recorders = Recorders {
        state: &state,
        metrics: &mut metrics,
    };
    let first = FirstSync {
        pgdata: settings.watch.pgdata.clone(),
        exit_on_failure: settings.exit_on_sync_failure,
        watching,
        ready_at,
    };
    let standby = match first_sync_with_retry(&mut syncer, &mut recorders, &mut resync, first).await
    {
        Ok(standby) => standby,
        Err(err) => {
            // --exit-on-sync-failure: stop postgres the fast way; the supervisor returns
            // the failure's code once it is down.
            tracing::error!("stopping PostgreSQL after the failed sync (--exit-on-sync-failure)");
            child.signal(Signal::SIGINT);
            return Err(err);
        }
    };
    if watching {
        tracing::info!("watching the secret files");
        let recorders = Recorders {
            state: &state,
            metrics: recorders.metrics,
        };
        let watched = watch_loop(
            &mut syncer,
            &settings.watch,
            recorders,
            &mut resync,
            standby,
        );
        if let Err(err) = watched.await {
            tracing::error!(
                "watching the secret files stopped: {err:#}; \
                 re-syncing on SIGHUP and every --resync-interval only"
            );
        }
    }
    // --no-watch: SIGHUP still re-syncs, and a standby's promotion. A watch that gave up
    // (no inotify instance left, say) keeps the periodic resync too.
    let period = Some(settings.watch.resync_interval).filter(|p| watching && !p.is_zero());
    let pgdata = &settings.watch.pgdata;
    resync_loop(
        &mut syncer,
        &mut recorders,
        &mut resync,
        period,
        standby,
        pgdata,
    )
    .await;
    Ok(())
}

/// Waits until the final server is ready, and records it in the state file.
async fn final_server_ready(
    child: &Child,
    settings: &RunSettings,
    state: &StateFile,
) -> postmaster::PidFile {
    let pgdata = &settings.watch.pgdata;
    let (pidfile, kin) =
        postmaster::wait_ready(pgdata, child.pid.as_raw(), settings.postmaster).await;
    match kin {
        // Our child: `health` checks that the server is still that very process.
        Kin::Cmd => state.record_ready_pid(pidfile.pid),
        // A postmaster CMD started (Patroni): CMD may restart it (a demotion, a rewind),
        // so `health` checks whichever postmaster the data directory names.
        Kin::Descendant | Kin::Stranger => state.record_ready(true),
    }
    pidfile
}

/// The resyncs of `run` when the files are not watched: on SIGHUP, every `period`, and
/// when a standby is promoted; until the requests' sender is gone. The metrics' reads of
/// the overlap logins go on meanwhile.
async fn resync_loop(
    syncer: &mut Syncer,
    recorders: &mut Recorders<'_>,
    resync: &mut Receiver<()>,
    period: Option<Duration>,
    standby: bool,
    pgdata: &Path,
) {
    let mut promotion = standby.then(|| PromotionWatch::new(pgdata));
    // A deadline, not a sleep made anew each turn: the metrics' reads must not postpone it.
    let mut periodic_at = period.map(|p| Instant::now() + p);
    loop {
        let logins_at = recorders.metrics.logins_due();
        let trigger = tokio::select! {
            message = resync.recv() => match message {
                Some(()) => Trigger::Sighup,
                None => break,
            },
            () = sleep_until(periodic_at) => Trigger::Periodic,
            () = wait_promoted(promotion.as_mut(), syncer) => {
                tracing::info!("the server is no longer a standby (promoted): syncing every role");
                Trigger::Promotion
            }
            () = sleep_until(logins_at) => {
                recorders.metrics.refresh_logins(syncer).await;
                continue;
            }
        };
        let started = Instant::now();
        let standby = sync_logged(syncer, recorders, trigger)
            .await
            .unwrap_or(false);
        promotion = match promotion {
            Some(watch) if standby => Some(watch),
            None if standby => Some(PromotionWatch::new(pgdata)),
            _ => None,
        };
        // At most one resync a second, as in the watch loop; requests meanwhile merge.
        tokio::time::sleep_until((started + RESYNC_SPACING).into()).await;
        periodic_at = period.map(|p| Instant::now() + p);
    }
}

/// Sleeps until `deadline`; forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Returns when the watched standby is promoted; never when there is none.
async fn wait_promoted(watch: Option<&mut PromotionWatch>, syncer: &Syncer) {
    match watch {
        Some(watch) => watch.wait(syncer).await,
        None => std::future::pending().await,
    }
}

/// Turns the supervisor's SIGHUP events into re-sync requests, saying so in the log when
/// the signal arrives (not when a busy sync gets round to it). The supervisor has logged
/// the forwarding; this line is only written once the request is taken, so it never
/// claims a re-sync nobody will make (`--no-sync`, or after the work has ended). Requests
/// merge: a SIGHUP while one resync waits is answered by that one (`resync_channel`), so a
/// storm of signals never queues resyncs.
fn resync_requests(mut hangups: Hangups) -> Receiver<()> {
    let (tx, rx) = resync_channel();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match request_resync(&tx) {
                Requested::Queued => tracing::info!("SIGHUP: re-syncing every role"),
                Requested::Merged => {
                    tracing::debug!("SIGHUP: a resync is already pending");
                }
                Requested::Closed => break,
            }
        }
    });
    rx
}

/// The server to connect to: the socket directory and port the final postmaster wrote,
/// when we connect over a socket at all (a TCP `PGHOST` is the operator's explicit choice).
fn target_server(mut config: Config, pidfile: &PidFile) -> Config {
    if let (
        [
            Server {
                host: Host::Socket(dir),
                port: at,
            },
        ],
        Some(socket_dir),
        Some(port),
    ) = (
        config.connection.servers.as_slice(),
        &pidfile.socket_dir,
        pidfile.port,
    ) && (dir != socket_dir || *at != port)
    {
        tracing::info!(
            "postmaster.pid says the server listens on {}/.s.PGSQL.{port}; using that",
            socket_dir.display()
        );
        config.connection.servers = vec![Server {
            host: Host::Socket(socket_dir.clone()),
            port,
        }];
    }
    config
}

/// `run`'s first sync after readiness, retried with backoff (1 s doubling to 30 s) while
/// postgres keeps serving; SIGHUP retries at once. With `exit_on_failure` the first
/// failure is returned instead. With `watching`, invalid secret files end this loop early:
/// the watcher applies them as soon as they are fixed, instead of at the next backoff tick.
/// (The `watch` sidecar's start differs: it waits for a server it does not own, and hands
/// every other failure to the watch loop.) Returns whether the server is a standby.
async fn first_sync_with_retry(
    syncer: &mut Syncer,
    recorders: &mut Recorders<'_>,
    resync: &mut Receiver<()>,
    first: FirstSync,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new(FIRST_SYNC_RETRY_MIN, FIRST_SYNC_RETRY_MAX);
    loop {
        // A SIGHUP that arrived while waiting is answered by this very attempt.
        while resync.try_recv().is_ok() {}
        match sync_logged(syncer, recorders, Trigger::Start).await {
            Ok(standby) => {
                tracing::info!(
                    after_ready_ms = first.ready_at.elapsed().as_millis() as u64,
                    "first sync done"
                );
                return Ok(standby);
            }
            Err(err) if first.exit_on_failure => return Err(err),
            Err(err) if first.watching && Failure::of(&err) == Some(Failure::Config) => {
                tracing::info!("waiting for valid secret files");
                // The data directory says whether it is a standby, for the promotion watch.
                let pgdata = &first.pgdata;
                return Ok(postmaster::is_standby(
                    pgdata,
                    postmaster::read(pgdata).as_ref(),
                ));
            }
            Err(_) => {
                let delay = backoff.next_delay();
                tracing::info!(retry_in_s = delay.as_secs(), "retrying the sync");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    Some(()) = resync.recv() => backoff.reset(),
                }
            }
        }
    }
}

/// How `run`'s first sync goes: `--exit-on-sync-failure`, whether the files are watched
/// afterwards, and when the server was ready.
#[derive(Debug, Clone)]
struct FirstSync {
    /// The data directory: whether the server is a standby when no sync succeeded.
    pgdata: PathBuf,
    exit_on_failure: bool,
    watching: bool,
    ready_at: Instant,
}

/// One sync of every role, recorded and logged (the report, or the failure). Returns
/// whether the server is a standby (the sync was skipped).
async fn sync_logged(
    syncer: &mut Syncer,
    recorders: &mut Recorders<'_>,
    trigger: Trigger,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let result = sync_and_record(syncer, recorders.state, Scope::CheckAll, Reread::AtOnce).await;
    recorders.metrics.record(trigger, &result, started, syncer);
    match result {
        Ok(report) => {
            if let Some(report) = &report {
                log_report(report);
            }
            tracing::debug!(took_ms = started.elapsed().as_millis() as u64, "sync");
            Ok(report.is_some_and(|r| r.standby))
        }
        Err(err) => {
            tracing::error!("sync failed: {err:#}");
            Err(err)
        }
    }
}

/// After the child is gone: if `postmaster.pid` names another live postgres (the
/// entrypoint's temporary init server, when the entrypoint died mid-init, or the server of
/// a supervisor such as Patroni that died without stopping it), stop it with SIGINT (fast
/// shutdown) and wait for it, bounded, so the data directory is left cleanly shut down. As
/// its (sub)reaper the supervisor reaps it; `is_alive` treats a zombie as gone.
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
        "a PostgreSQL server CMD started is still running (a temporary init server, or a \
         supervisor's server); stopping it (SIGINT)"
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
    fn default_command() {
        assert_eq!(
            command_or_default(&[]),
            ["docker-entrypoint.sh", "postgres"]
        );
        assert_eq!(command_or_default(&["x".into()]), ["x"]);
    }

    #[test]
    fn target_server_follows_the_pid_file_for_sockets_only() {
        let config = crate::config::test_config();
        let file = postmaster::parse("7\n/d\n1\n6543\n/tmp/s\n\n0 0\nready\n").unwrap();
        let moved = target_server(config.clone(), &file);
        assert_eq!(
            moved.connection.servers,
            [Server {
                host: Host::Socket("/tmp/s".into()),
                port: 6543
            }]
        );
        let mut tcp = config;
        tcp.connection.servers[0].host = Host::Tcp("db".into());
        assert_eq!(
            target_server(tcp, &file).connection.servers[0].host,
            Host::Tcp("db".into())
        );
    }
}

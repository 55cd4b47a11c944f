//! `rotate`: the staged rotation of overlap mode, run on the host against `generate`'s
//! secrets directory.
//!
//! Each application role has two logins (the role and its twin); `pg_service.conf`
//! publishes the one applications use. A rotation never touches the published login's
//! password: it gives the *unpublished* login a new one, waits until the server accepts
//! it, and only then publishes it, in one atomic rename of `pg_service.conf`. An
//! application therefore always holds a login and password the server accepts, whenever
//! the new files reach it; the login that stopped being published is expired by the
//! server itself after the grace period (`VALID UNTIL`, set by the sync).
//!
//! The stages (all under `generate`'s lock on the directory):
//! 1. refuse, writing nothing, when an unpublished login is still inside its grace period
//!    or still open-ended on the server (published until now, or the server has not yet
//!    seen the last publish), unless `--force`;
//! 2. back up the complete set, as `generate --force` does;
//! 3. stage: new passwords for the unpublished logins and for the single-login secrets;
//!    a small record of the stage (`rotate-pending.json`, no values) lets a killed run be
//!    aborted (a run killed after its publish but before removing the record is complete:
//!    `--abort` and `--publish-only` then only remove the record);
//! 4. wait until every staged login logs in over TCP (a wrong password refused first);
//!    on timeout, error or signal restore the staged files byte for byte and fail;
//! 5. publish; 6. check the published logins and report per role.
//!
//! `--stage-only`, `--publish-only` and `--abort` split the run for deliveries this
//! process cannot observe (a Kubernetes Secret checked with `kubectl exec … verify`).
//!
//! This file holds the flow, the wait and the final check; `set` reads and cross-checks the
//! files, `grace` asks the server, `stage` writes (and undoes). The login check is
//! `verify`'s (`verify::checked_login`): one implementation of "a wrong password is
//! refused, then the real one logs in".
//!
//! `--wait` must be shorter than the sync's `--grace`: a sync that starts again (or a
//! one-shot `sync`) cannot tell a pending stage from a login published until now, and
//! gives it the grace; a stage published within the grace is never cut short.

mod grace;
mod set;
mod stage;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, Host};
use crate::error::Failure;
use crate::overlap::files::PENDING_FILE;
use crate::session::connect;
use crate::store::Locked;
use crate::verify::{Login, checked_login};
use grace::check_grace;
use set::RoleSet;
use stage::{Pending, Staged, finish_published, publish, remove_pending, rollback};

/// How often the wait step retries the staged logins.
const POLL: Duration = Duration::from_millis(500);

/// How long the final check retries a published login that fails.
const CHECK_RETRY_LIMIT: Duration = Duration::from_secs(20);

/// What `rotate` was asked to do (converted from the command line in `cli.rs`).
#[derive(Debug, Clone)]
pub struct RotateSettings {
    /// `generate`'s directory: keys in `dir/keys`, backups in `dir/backups`.
    pub dir: PathBuf,
    /// Role map and server; its secret directories are `dir/keys` only.
    pub config: Config,
    /// How long to wait for every staged login to log in (`--wait`).
    pub wait: Duration,
    /// The sync's `--grace`, which `wait` must stay below.
    pub grace: Duration,
    pub force: bool,
    pub stage_only: bool,
    pub publish_only: bool,
    pub abort: bool,
}

/// `pg-password-sync rotate`.
pub fn command(settings: RotateSettings) -> anyhow::Result<u8> {
    crate::runtime::block_on(rotate(settings))
}

/// Which part of a rotation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Full,
    StageOnly,
    PublishOnly,
    Abort,
}

fn phase(stage_only: bool, publish_only: bool, abort: bool) -> anyhow::Result<Phase> {
    let chosen: Vec<(&str, Phase)> = [
        ("--stage-only", stage_only, Phase::StageOnly),
        ("--publish-only", publish_only, Phase::PublishOnly),
        ("--abort", abort, Phase::Abort),
    ]
    .into_iter()
    .filter_map(|(flag, on, phase)| on.then_some((flag, phase)))
    .collect();
    match chosen[..] {
        [] => Ok(Phase::Full),
        [(_, phase)] => Ok(phase),
        [(a, _), (b, _), ..] => Err(anyhow::anyhow!("{a} cannot be used with {b}")),
    }
}

async fn rotate(settings: RotateSettings) -> anyhow::Result<u8> {
    let phase = phase(settings.stage_only, settings.publish_only, settings.abort)
        .context(Failure::Config)?;
    if matches!(phase, Phase::Full | Phase::StageOnly) {
        check_wait(settings.wait, settings.grace).context(Failure::Config)?;
    }
    let config = &settings.config;
    refuse_sockets(config)?;
    // The same lock as `generate`: nothing else writes the set while a rotation runs.
    // Every file below is reached through the handles it holds, never through a link.
    let mut locked =
        crate::store::lock(&settings.dir).map_err(|err| Failure::Config.unless_classified(err))?;
    match phase {
        Phase::Abort | Phase::PublishOnly => finish_pending(config, &locked, phase),
        Phase::Full | Phase::StageOnly => {
            stage_and_publish(&settings, config, &mut locked, phase).await
        }
    }
}

/// `--abort` and `--publish-only`: ends the pending stage one way or the other.
fn finish_pending(config: &Config, locked: &Locked, phase: Phase) -> anyhow::Result<u8> {
    let pending = Pending::read(&locked.root)?;
    // A run killed between its publish and the record's removal: the rotation is done.
    // Rolling the staged files back under the new pg_service.conf would leave a set the
    // sync refuses, and publishing again is impossible (the staged logins are no longer
    // the unpublished ones): only the record goes (`finish_published`).
    if pending.already_published(&locked.keys)? {
        finish_published(&locked.root, &pending)?;
        return Ok(0);
    }
    if phase == Phase::Abort {
        rollback(locked, &pending)?;
        return Ok(0);
    }
    pending.check_staged(locked)?;
    let set = RoleSet::read(config, &locked.keys, &config.twin_suffix)?;
    let staged = pending.staged_from_files(&set)?;
    publish(&locked.keys, &set, &staged)?;
    remove_pending(&locked.root)?;
    Ok(0)
}

/// A full run (or `--stage-only`): grace check, backup and stage; then the wait, the
/// publish and the final check, or a rollback.
async fn stage_and_publish(
    settings: &RotateSettings,
    config: &Config,
    locked: &mut Locked,
    phase: Phase,
) -> anyhow::Result<u8> {
    if Pending::exists(&locked.root)? {
        return Err(anyhow::anyhow!(
            "a staged rotation is pending ({}): finish it with `rotate --publish-only` or \
             undo it with `rotate --abort`",
            locked.root.shown(PENDING_FILE)
        ))
        .context(Failure::TryLater);
    }
    let set = RoleSet::read(config, &locked.keys, &config.twin_suffix)?;
    check_grace(config, &set, settings.force).await?;
    let (pending, staged) = stage::stage(locked, &set, &config.twin_suffix)?;
    if phase == Phase::StageOnly {
        println!(
            "staged; deliver the files, check the staged logins (verify --overlap --staged), \
             then run `rotate --publish-only` (or `rotate --abort`)"
        );
        return Ok(0);
    }
    println!(
        "waiting up to {} for the staged logins to log in at {}",
        humanize(settings.wait),
        connect::describe(config)
    );
    if let Err(err) = wait_or_signal(config, &staged, settings.wait).await {
        // Whatever went wrong, the published credentials were never touched; put the
        // staged files back so the set is exactly what it was before.
        return Err(match rollback(locked, &pending) {
            Ok(()) => err.context("the rotation was rolled back"),
            Err(rollback_err) => err.context(format!(
                "rolling back failed too ({rollback_err:#}); finish with `rotate --abort`"
            )),
        });
    }
    publish(&locked.keys, &set, &staged)?;
    remove_pending(&locked.root)?;
    check_published(config, &staged).await
}

/// rotate checks logins over TCP as the applications make them: a socket directory in
/// the list of servers is refused.
fn refuse_sockets(config: &Config) -> anyhow::Result<()> {
    if let Some(dir) = config
        .connection
        .servers
        .iter()
        .find_map(|s| match &s.host {
            Host::Socket(dir) => Some(dir),
            Host::Tcp(_) => None,
        })
    {
        return Err(anyhow::anyhow!(
            "PGHOST/--pghost names a socket directory ({}); rotate checks logins over TCP as \
             the applications make them: give host names or addresses",
            dir.display()
        ))
        .context(Failure::Config);
    }
    Ok(())
}

/// Stage 4, bounded by `limit` and ended early by SIGINT/SIGTERM/SIGHUP (the caller rolls
/// back in every case it returns an error).
async fn wait_or_signal(config: &Config, staged: &[Staged], limit: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
    let interrupted = |signal: nix::sys::signal::Signal| {
        Err(anyhow::anyhow!(
            "interrupted while waiting for the staged logins"
        ))
        .context(Failure::Interrupted(signal))
    };
    tokio::select! {
        result = tokio::time::timeout(limit, wait_staged(config, staged)) => match result {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!(
                "timed out after {}: the staged logins did not all log in (is the sync \
                 running with --overlap, and did the new files reach it?)",
                humanize(limit)
            ))
            .context(Failure::TryLater),
        },
        _ = interrupt.recv() => interrupted(nix::sys::signal::Signal::SIGINT),
        _ = terminate.recv() => interrupted(nix::sys::signal::Signal::SIGTERM),
        _ = hangup.recv() => interrupted(nix::sys::signal::Signal::SIGHUP),
    }
}

/// Polls until every staged login logs in with its new password. A server that accepts
/// a wrong password ends the wait at once: no login there can ever prove anything.
async fn wait_staged(config: &Config, staged: &[Staged]) -> anyhow::Result<()> {
    let mut waiting: Vec<&Staged> = staged.iter().collect();
    let mut last_problem = String::new();
    loop {
        let mut still = Vec::new();
        for s in waiting {
            match checked_login(config, &s.login, &s.password).await {
                Login::LoggedIn => {
                    println!("login {:?} logs in with its staged password", s.login);
                }
                Login::Trusted | Login::Unchecked => {
                    return Err(trusted_error(config, &s.login)).context(Failure::Verify);
                }
                Login::Failed(err) => {
                    let problem = format!("login {:?}: {err:#}", s.login);
                    if problem != last_problem {
                        tracing::info!("not yet: {problem}");
                        last_problem = problem;
                    }
                    still.push(s);
                }
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        waiting = still;
        tokio::time::sleep(POLL).await;
    }
}

fn trusted_error(config: &Config, login: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the server at {} accepted a wrong password for {login:?} (a trust line in \
         pg_hba.conf), so a login there proves nothing: use --host with an address whose \
         pg_hba.conf line asks for a password",
        connect::describe(config)
    )
}

/// Stage 6: each published credential logs in (where the server checks passwords).
async fn check_published(config: &Config, staged: &[Staged]) -> anyhow::Result<u8> {
    let mut failed = Vec::new();
    for s in staged {
        match checked_with_retries(config, s).await {
            Login::LoggedIn => println!(
                "role {:?}: ok (publishes login {:?}; it logs in, a wrong password is refused)",
                s.role, s.login
            ),
            Login::Trusted | Login::Unchecked => {
                println!(
                    "role {:?}: not verifiable ({:#})",
                    s.role,
                    trusted_error(config, &s.login)
                );
                failed.push(s.role.as_str());
            }
            Login::Failed(err) => {
                println!(
                    "role {:?}: FAILED (publishes login {:?}: {err:#})",
                    s.role, s.login
                );
                failed.push(s.role.as_str());
            }
        }
    }
    if failed.is_empty() {
        Ok(0)
    } else {
        Err(anyhow::anyhow!(
            "published, but role(s) {failed:?} do not log in with the published credential"
        ))
        .context(Failure::Verify)
    }
}

/// One published login checked, retrying a failure for up to `CHECK_RETRY_LIMIT`: it
/// logged in moments ago, so a failure now is most likely passing (a slow connection).
async fn checked_with_retries(config: &Config, s: &Staged) -> Login {
    let deadline = tokio::time::Instant::now() + CHECK_RETRY_LIMIT;
    loop {
        match checked_login(config, &s.login, &s.password).await {
            Login::Failed(err) if tokio::time::Instant::now() < deadline => {
                tracing::info!("checking login {:?} again: {err:#}", s.login);
                tokio::time::sleep(POLL).await;
            }
            outcome => return outcome,
        }
    }
}

/// Refuses a `--wait` that is not shorter than the sync's `--grace`: a sync that restarts
/// while the stage is pending would give the staged login its grace, and a stage still
/// waiting when that ends would lose the login it is about to publish.
fn check_wait(wait: Duration, grace: Duration) -> anyhow::Result<()> {
    if wait >= grace {
        anyhow::bail!(
            "--wait {} must be shorter than the sync's --grace {} (PG_PASSWORD_SYNC_GRACE): \
             a stage must be published within the grace",
            humanize(wait),
            humanize(grace)
        );
    }
    Ok(())
}

/// `5m`, `90s`, `1500ms`.
fn humanize(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_conflict() {
        assert_eq!(phase(false, false, false).unwrap(), Phase::Full);
        assert_eq!(phase(true, false, false).unwrap(), Phase::StageOnly);
        assert_eq!(phase(false, false, true).unwrap(), Phase::Abort);
        let err = phase(true, false, true).unwrap_err();
        assert_eq!(err.to_string(), "--stage-only cannot be used with --abort");
    }

    #[test]
    fn the_wait_must_be_shorter_than_the_grace() {
        let min = Duration::from_secs(60);
        assert!(check_wait(5 * min, 15 * min).is_ok());
        let err = check_wait(15 * min, 15 * min).unwrap_err().to_string();
        assert!(
            err.contains("--wait 15m must be shorter than the sync's --grace 15m"),
            "{err}"
        );
        assert!(check_wait(20 * min, 15 * min).is_err());
    }

    #[test]
    fn durations_read_back() {
        assert_eq!(humanize(Duration::from_secs(300)), "5m");
        assert_eq!(humanize(Duration::from_secs(90)), "90s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500ms");
    }
}

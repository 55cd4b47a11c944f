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
//!    aborted;
//! 4. wait until every staged login logs in over TCP (a wrong password refused first);
//!    on timeout, error or signal restore the staged files byte for byte and fail;
//! 5. publish; 6. check the published logins and report per role.
//!
//! `--stage-only`, `--publish-only` and `--abort` split the run for deliveries this
//! process cannot observe (a Kubernetes Secret checked with `kubectl exec … verify`).

pub mod login;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::cli::ConfigArgs;
use crate::config::{Config, Host, SecretRef};
use crate::error::Failure;
use crate::keyfiles::overlap as files;
use crate::overlap::{self, SERVICE_FILE, service_file};
use crate::secret::{self, Secret};
use crate::sync::connect::{self, Auth};

/// The record of a stage that is neither published nor rolled back, in the secrets
/// directory (beside `keys/`, so it is never delivered with the secrets).
pub const PENDING_FILE: &str = "rotate-pending.json";

/// How often the wait step retries the staged logins.
const POLL: Duration = Duration::from_millis(500);

/// What `rotate` was asked to do (converted from the command line in `cli.rs`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `generate`'s directory: keys in `dir/keys`, backups in `dir/backups`.
    pub dir: PathBuf,
    /// Role map and server; its secret directories are `dir/keys` only.
    pub config: ConfigArgs,
    pub twin_suffix: String,
    pub wait: Duration,
    pub force: bool,
    pub stage_only: bool,
    pub publish_only: bool,
    pub abort: bool,
}

/// `pg-password-sync rotate`.
pub fn command(settings: Settings) -> anyhow::Result<u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(rotate(settings))
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

async fn rotate(settings: Settings) -> anyhow::Result<u8> {
    let phase = phase(settings.stage_only, settings.publish_only, settings.abort)
        .context(Failure::Config)?;
    let config = Config::from_args(&settings.config)?;
    if let Host::Socket(dir) = &config.host {
        return Err(anyhow::anyhow!(
            "PGHOST/--host is a socket directory ({}); rotate checks logins over TCP as \
             the applications make them: give a host name or address",
            dir.display()
        ))
        .context(Failure::Config);
    }
    let root = settings.dir.clone();
    let keys = root.join("keys");
    // The same lock as `generate`: nothing else writes the set while a rotation runs.
    let _lock = files::lock(&root).context(Failure::Config)?;
    let pending_path = root.join(PENDING_FILE);
    match phase {
        Phase::Abort => {
            let pending = Pending::read(&pending_path)?;
            rollback(&root, &keys, &pending)?;
            return Ok(0);
        }
        Phase::PublishOnly => {
            let pending = Pending::read(&pending_path)?;
            let set = RoleSet::read(&config, &keys, &settings.twin_suffix)?;
            let staged = pending.staged_from_files(&set)?;
            publish(&keys, &set, &staged)?;
            remove_pending(&root)?;
            return Ok(0);
        }
        Phase::Full | Phase::StageOnly => {}
    }
    if pending_path.exists() {
        return Err(anyhow::anyhow!(
            "a staged rotation is pending ({}): finish it with `rotate --publish-only` or \
             undo it with `rotate --abort`",
            pending_path.display()
        ))
        .context(Failure::Config);
    }
    let set = RoleSet::read(&config, &keys, &settings.twin_suffix)?;
    check_grace(&config, &set, settings.force).await?;
    let (pending, staged) = stage(&root, &keys, &set, &settings.twin_suffix)?;
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
        connect::describe(&config)
    );
    if let Err(err) = wait_or_signal(&config, &staged, settings.wait).await {
        // Whatever went wrong, the published credentials were never touched; put the
        // staged files back so the set is exactly what it was before.
        match rollback(&root, &keys, &pending) {
            Ok(()) => return Err(err.context("the rotation was rolled back")),
            Err(rollback_err) => {
                return Err(err.context(format!(
                    "rolling back failed too ({rollback_err:#}); finish with `rotate --abort`"
                )));
            }
        }
    }
    publish(&keys, &set, &staged)?;
    remove_pending(&root)?;
    check_published(&config, &staged).await
}

/// One overlapped role as the files describe it now.
struct Overlapped {
    role: String,
    twin: String,
    /// File names in `keys/`.
    role_file: String,
    twin_file: String,
    role_password: Secret,
    twin_password: Secret,
    /// Whether `pg_service.conf` publishes the twin (else the role itself).
    twin_published: bool,
}

impl Overlapped {
    /// The login a rotation re-keys, and its file.
    fn unpublished(&self) -> (&str, &str) {
        if self.twin_published {
            (&self.role, &self.role_file)
        } else {
            (&self.twin, &self.twin_file)
        }
    }

    fn published(&self) -> (&str, &Secret) {
        if self.twin_published {
            (&self.twin, &self.twin_password)
        } else {
            (&self.role, &self.role_password)
        }
    }
}

/// The overlapped roles and `pg_service.conf`, checked for consistency.
struct RoleSet {
    roles: Vec<Overlapped>,
    service: service_file::ServiceFile,
    superuser: String,
    superuser_password: Option<Secret>,
}

impl RoleSet {
    fn read(config: &Config, keys: &Path, suffix: &str) -> anyhow::Result<RoleSet> {
        Self::read_inner(config, keys, suffix).context(Failure::Config)
    }

    fn read_inner(config: &Config, keys: &Path, suffix: &str) -> anyhow::Result<RoleSet> {
        let service_path = keys.join(SERVICE_FILE);
        let text = files::read_exact(&service_path).with_context(|| {
            format!(
                "reading {} (create it with `generate --overlap`)",
                service_path.display()
            )
        })?;
        let text = std::str::from_utf8(&text)
            .with_context(|| format!("{} is not valid UTF-8", service_path.display()))?;
        let service = service_file::parse(text)?;
        let mut roles = Vec::new();
        for spec in config.roles.iter().filter(|r| r.name != config.superuser) {
            let twin = overlap::twin_login(&spec.name, suffix)?;
            let (role_file, twin_file) = pair_files(keys, &spec.secret, suffix)
                .with_context(|| format!("the files of role {:?}", spec.name))?;
            let role_password = secret::read_file(&keys.join(&role_file))?;
            let twin_password = secret::read_file(&keys.join(&twin_file))?;
            let section = service
                .get(&spec.name)
                .with_context(|| format!("{SERVICE_FILE} has no section [{}]", spec.name))?;
            let user = section
                .user
                .as_deref()
                .with_context(|| format!("{SERVICE_FILE}: section [{}] has no user=", spec.name))?;
            let twin_published = if user == spec.name {
                false
            } else if user == twin {
                true
            } else {
                bail!(
                    "{SERVICE_FILE}: section [{}] publishes login {user:?}, which is neither \
                     {:?} nor {twin:?}",
                    spec.name,
                    spec.name
                );
            };
            let expected = if twin_published {
                (&twin_password, &twin_file)
            } else {
                (&role_password, &role_file)
            };
            if section.password.as_ref() != Some(expected.0) {
                bail!(
                    "{SERVICE_FILE}: section [{}] does not hold the password of {} (the set \
                     is inconsistent; restore it or run `generate --overlap --force`)",
                    spec.name,
                    expected.1
                );
            }
            roles.push(Overlapped {
                role: spec.name.clone(),
                twin,
                role_file,
                twin_file,
                role_password,
                twin_password,
                twin_published,
            });
        }
        if roles.is_empty() {
            bail!("no overlapped roles: every configured role is the superuser");
        }
        let superuser_password = config.superuser_password().and_then(Result::ok);
        Ok(RoleSet {
            roles,
            service,
            superuser: config.superuser.clone(),
            superuser_password,
        })
    }

    /// Every file of the overlapped roles (for the exclusion from single-login secrets
    /// and for the backup).
    fn files(&self) -> Vec<String> {
        self.roles
            .iter()
            .flat_map(|r| [r.role_file.clone(), r.twin_file.clone()])
            .collect()
    }
}

/// The file names in `keys/` of a role's password and of its twin's. A rotation writes
/// and backs up only inside `keys/`, so a secret elsewhere is refused.
fn pair_files(keys: &Path, secret: &SecretRef, suffix: &str) -> anyhow::Result<(String, String)> {
    match secret {
        SecretRef::Name(name) => {
            let role = secret::locate(name, &[keys]).map_err(|_| {
                anyhow::anyhow!("secret file {name} not found in {}", keys.display())
            })?;
            let twin_name = overlap::twin_secret_name(name, suffix);
            let twin = secret::locate(&twin_name, &[keys]).map_err(|_| {
                anyhow::anyhow!(
                    "the twin login's file {twin_name} is not in {} (create it with \
                     `generate --overlap`)",
                    keys.display()
                )
            })?;
            Ok((file_name(&role)?, file_name(&twin)?))
        }
        SecretRef::Path(path) => {
            if path.parent() != Some(keys) {
                bail!(
                    "{} is outside {}; rotate only manages the files of its directory",
                    path.display(),
                    keys.display()
                );
            }
            let twin = overlap::twin_secret_path(path, suffix)
                .with_context(|| format!("{} has no usable file name", path.display()))?;
            Ok((file_name(path)?, file_name(&twin)?))
        }
    }
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no usable file name", path.display()))
}

/// What the server says about a login that would be re-keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LoginState {
    /// No such role yet (the sync creates the twin): nothing can be using it.
    Missing,
    /// `VALID UNTIL` in the past (or `-infinity`: a twin that was never published).
    Expired,
    /// No `VALID UNTIL`, or `infinity`: published until now, or the server has not yet
    /// seen the publish that retired it, so applications may still be using it.
    Open,
    /// Grace period running until this time (server's text form).
    Until(String),
}

/// Why a login may not be re-keyed now, if it may not.
fn refusal(login: &str, state: &LoginState) -> Option<String> {
    match state {
        LoginState::Missing | LoginState::Expired => None,
        LoginState::Open => Some(format!(
            "login {login:?} has no expiry on the server: it is still published there (the \
             sync has not applied the last publish yet), so applications may be using it"
        )),
        LoginState::Until(until) => Some(format!(
            "login {login:?} is inside its grace period until {until}: applications may \
             still be using it"
        )),
    }
}

/// Stage 1: refuses when a login to re-key may still be in use, unless `force`.
async fn check_grace(config: &Config, set: &RoleSet, force: bool) -> anyhow::Result<()> {
    let logins: Vec<String> = set
        .roles
        .iter()
        .map(|r| r.unpublished().0.to_owned())
        .collect();
    let states = match login_states(config, set, &logins).await {
        Ok(states) => states,
        Err(err) if force => {
            tracing::warn!("--force: not checking the grace periods: {err:#}");
            return Ok(());
        }
        Err(err) => {
            return Err(err.context(
                "cannot ask the server whether the logins to re-key are still in use \
                 (nothing was written; --force skips this check)",
            ));
        }
    };
    let refusals: Vec<String> = logins
        .iter()
        .zip(&states)
        .filter_map(|(login, state)| refusal(login, state))
        .collect();
    if refusals.is_empty() {
        return Ok(());
    }
    if force {
        for refusal in &refusals {
            tracing::warn!("--force: re-keying anyway: {refusal}");
        }
        return Ok(());
    }
    Err(anyhow::anyhow!(
        "{}; nothing was written (wait for the grace period to end, or --force to re-key \
         anyway and break those applications)",
        refusals.join("; ")
    ))
    .context(Failure::Config)
}

/// Reads `pg_roles.rolvaliduntil` of `logins` (any login may read `pg_roles`), logged
/// in with the superuser's password or else with a published credential.
async fn login_states(
    config: &Config,
    set: &RoleSet,
    logins: &[String],
) -> anyhow::Result<Vec<LoginState>> {
    let mut candidates: Vec<(&str, &Secret)> = Vec::new();
    if let Some(password) = &set.superuser_password {
        candidates.push((&set.superuser, password));
    }
    candidates.extend(set.roles.iter().map(Overlapped::published));
    let mut reasons = Vec::new();
    let mut client = None;
    for (user, password) in candidates {
        match connect::connect(config, user, &Auth::Password(password, "secret file")).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(err) => reasons.push(format!("as {user:?}: {err:#}")),
        }
    }
    let client = client
        .ok_or_else(|| anyhow::anyhow!("{}", reasons.join("; ")))
        .with_context(|| format!("logging in at {}", connect::describe(config)))
        .context(Failure::Connect)?;
    // Compared on the server, with its clock: the grace deadline was set by its clock too.
    let rows = client
        .query(
            "SELECT rolname::text, \
                    (rolvaliduntil IS NULL OR rolvaliduntil = 'infinity') AS open, \
                    coalesce(rolvaliduntil > now(), false) AS running, \
                    coalesce(rolvaliduntil::text, '') AS until \
               FROM pg_roles WHERE rolname::text = ANY($1::text[])",
            &[&logins],
        )
        .await
        .context("reading the logins' VALID UNTIL from pg_roles")
        .context(Failure::Sql)?;
    Ok(logins
        .iter()
        .map(|login| {
            rows.iter()
                .find(|row| row.get::<_, String>(0) == *login)
                .map_or(LoginState::Missing, |row| {
                    if row.get::<_, bool>(1) {
                        LoginState::Open
                    } else if row.get::<_, bool>(2) {
                        LoginState::Until(row.get(3))
                    } else {
                        LoginState::Expired
                    }
                })
        })
        .collect())
}

/// A login staged with a new password.
struct Staged {
    role: String,
    login: String,
    file: String,
    password: Secret,
}

/// The record of a stage: enough to finish or undo it, and no value.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    /// Backup directory name under `backups/`.
    backup: String,
    /// Files in `keys/` the stage wrote (restored from the backup on rollback).
    files: Vec<String>,
    /// Files the stage created (removed on rollback).
    created: Vec<String>,
    /// (role, staged login, its file).
    logins: Vec<(String, String, String)>,
}

impl Pending {
    fn read(path: &Path) -> anyhow::Result<Pending> {
        let bytes = files::read_exact(path)
            .with_context(|| format!("no staged rotation to finish ({})", path.display()))
            .context(Failure::Config)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a rotation record", path.display()))
            .context(Failure::Config)
    }

    /// The staged logins with the passwords their files hold now (`--publish-only`).
    fn staged_from_files(&self, set: &RoleSet) -> anyhow::Result<Vec<Staged>> {
        self.logins
            .iter()
            .map(|(role, login, file)| {
                let known = set
                    .roles
                    .iter()
                    .any(|r| r.role == *role && r.unpublished() == (login.as_str(), file.as_str()));
                if !known {
                    bail!(
                        "the staged login {login:?} of role {role:?} is no longer the \
                         unpublished one; `rotate --abort` and start again"
                    );
                }
                Ok(Staged {
                    role: role.clone(),
                    login: login.clone(),
                    file: file.clone(),
                    password: match set.roles.iter().find(|r| r.role == *role) {
                        Some(r) if r.twin_published => r.role_password.clone(),
                        Some(r) => r.twin_password.clone(),
                        None => bail!("role {role:?} is no longer configured"),
                    },
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context(Failure::Config)
    }
}

/// Stages 2 and 3: complete backup, the record, then the new values (atomic writes).
fn stage(
    root: &Path,
    keys: &Path,
    set: &RoleSet,
    suffix: &str,
) -> anyhow::Result<(Pending, Vec<Staged>)> {
    let mut staged = Vec::new();
    let mut writes: Vec<(String, Secret)> = Vec::new();
    for role in &set.roles {
        let (login, file) = role.unpublished();
        let password = files::new_password()?;
        staged.push(Staged {
            role: role.role.clone(),
            login: login.to_owned(),
            file: file.to_owned(),
            password: password.clone(),
        });
        writes.push((file.to_owned(), password));
    }
    // The superuser, redis, session and CSRF secrets (and any other catalog password that
    // is not an overlapped pair's): single-login secrets, rotated as `generate --force`
    // does. A superuser file outside the catalog is left alone.
    writes.extend(files::single_login_values(&set.files())?);

    let mut present = files::present_files(keys, suffix);
    for file in set.files() {
        if !present.contains(&file) {
            present.push(file);
        }
    }
    let (backup, _) = files::backup(root, &present)?;
    println!("backed up {} files to backups/{backup}", present.len());
    let pending = Pending {
        backup,
        files: writes.iter().map(|(f, _)| f.clone()).collect(),
        created: writes
            .iter()
            .map(|(f, _)| f.clone())
            .filter(|f| !present.contains(f))
            .collect(),
        logins: staged
            .iter()
            .map(|s| (s.role.clone(), s.login.clone(), s.file.clone()))
            .collect(),
    };
    let record = serde_json::to_vec_pretty(&pending).context("writing the rotation record")?;
    files::write(root, PENDING_FILE, &record)?;
    for (file, value) in &writes {
        files::write(keys, file, value.expose().as_bytes())?;
    }
    for s in &staged {
        println!(
            "staged a new password for login {:?} (role {:?}) in keys/{}",
            s.login, s.role, s.file
        );
    }
    let singles: Vec<&str> = writes
        .iter()
        .skip(staged.len())
        .map(|(f, _)| f.as_str())
        .collect();
    println!("regenerated {}", singles.join(", "));
    Ok((pending, staged))
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
            .context(Failure::Verify),
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
            match login::checked(config, &s.login, &s.password).await {
                login::Outcome::LoggedIn => {
                    println!("login {:?} logs in with its staged password", s.login);
                }
                login::Outcome::Trusted => {
                    return Err(trusted_error(config, &s.login)).context(Failure::Verify);
                }
                login::Outcome::Failed(err) => {
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

/// Puts every staged file back from the stage's backup, byte for byte, removes the files
/// the stage created and the record. `pg_service.conf` was never written by the stage.
fn rollback(root: &Path, keys: &Path, pending: &Pending) -> anyhow::Result<()> {
    let backup_keys = root.join("backups").join(&pending.backup).join("keys");
    let mut restored = 0;
    for file in &pending.files {
        if pending.created.contains(file) {
            match std::fs::remove_file(keys.join(file)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("removing keys/{file}"));
                }
            }
            continue;
        }
        let bytes: Zeroizing<Vec<u8>> = files::read_exact(&backup_keys.join(file))
            .with_context(|| format!("reading {file} from backup {}", pending.backup))?;
        files::write(keys, file, &bytes)?;
        restored += 1;
    }
    remove_pending(root)?;
    println!(
        "rolled back: restored {restored} staged files from backups/{} byte for byte; the \
         published credentials were not changed",
        pending.backup
    );
    Ok(())
}

fn remove_pending(root: &Path) -> anyhow::Result<()> {
    let path = root.join(PENDING_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

/// Stage 5: one atomic rewrite of `pg_service.conf`, other sections and settings kept.
fn publish(keys: &Path, set: &RoleSet, staged: &[Staged]) -> anyhow::Result<()> {
    let mut service = set.service.clone();
    for s in staged {
        service.publish(&s.role, &s.login, s.password.clone());
    }
    let text = service_file::render(&service)?;
    files::write(keys, SERVICE_FILE, text.as_bytes())?;
    for s in staged {
        println!(
            "published login {:?} for role {:?} in keys/{SERVICE_FILE}",
            s.login, s.role
        );
    }
    Ok(())
}

/// Stage 6: each published credential logs in (where the server checks passwords).
async fn check_published(config: &Config, staged: &[Staged]) -> anyhow::Result<u8> {
    let mut failed = Vec::new();
    for s in staged {
        match login::checked(config, &s.login, &s.password).await {
            login::Outcome::LoggedIn => println!(
                "role {:?}: ok (publishes login {:?}; it logs in, a wrong password is refused)",
                s.role, s.login
            ),
            login::Outcome::Trusted => {
                println!(
                    "role {:?}: not verifiable ({:#})",
                    s.role,
                    trusted_error(config, &s.login)
                );
                failed.push(s.role.as_str());
            }
            login::Outcome::Failed(err) => {
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
    fn only_missing_or_expired_logins_may_be_rekeyed() {
        assert_eq!(refusal("a", &LoginState::Missing), None);
        assert_eq!(refusal("a", &LoginState::Expired), None);
        let open = refusal("a_alt", &LoginState::Open).unwrap();
        assert!(open.contains("still published"), "{open}");
        let until = refusal("a", &LoginState::Until("2026-01-01 00:00:00+00".into())).unwrap();
        assert!(until.contains("grace period until 2026-01-01"), "{until}");
    }

    #[test]
    fn phases_conflict() {
        assert_eq!(phase(false, false, false).unwrap(), Phase::Full);
        assert_eq!(phase(true, false, false).unwrap(), Phase::StageOnly);
        assert_eq!(phase(false, false, true).unwrap(), Phase::Abort);
        let err = phase(true, false, true).unwrap_err();
        assert_eq!(err.to_string(), "--stage-only cannot be used with --abort");
    }

    #[test]
    fn durations_read_back() {
        assert_eq!(humanize(Duration::from_secs(300)), "5m");
        assert_eq!(humanize(Duration::from_secs(90)), "90s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500ms");
    }
}

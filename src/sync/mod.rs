//! The password sync: plan which roles need a new password, apply them in one transaction.
//!
//! One implementation serves `sync`, `run` and `watch` (ARCHITECTURE.md, "A rotation"): every
//! secret is read and validated before connecting (an invalid file applies nothing); one
//! transaction takes an advisory lock (concurrent syncs queue instead of interleaving),
//! switches statement logging off for itself, reads the stored verifiers, and sends
//! `ALTER ROLE … PASSWORD '<SCRAM verifier>'` only for roles whose stored verifier does
//! not already match. A failure rolls the whole set back, so the old passwords keep working.
//! Overlap mode's twins and `VALID UNTIL` rules (`overlap`) run inside the same transaction.

mod recorded;
pub mod scram;
pub mod sql;

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, RoleSpec, SecretSet};
use crate::error::Failure;
use crate::overlap::server::{self as overlap, Applied, Policy};
use crate::secret::Secret;
use crate::session::{self, locks};
pub use recorded::{log_report, sync_and_record};

/// The line operators grep for after a sync.
pub const COMPLETE_LINE: &str = "Password synchronization complete.";

/// What happened to one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A new verifier was stored.
    Changed,
    /// The stored verifier already matches the secret; nothing was written.
    Unchanged,
    /// The role does not exist (a warning, or an error under `--strict`).
    Missing,
    /// `--dry-run`: would be changed.
    WouldChange,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Changed => "changed",
            Status::Unchanged => "unchanged",
            Status::Missing => "missing",
            Status::WouldChange => "would change",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RoleOutcome {
    pub role: String,
    pub status: Status,
}

/// The result of one sync.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub roles: Vec<RoleOutcome>,
    /// Overlap mode's changes to logins other than passwords (twin created or repaired,
    /// VALID UNTIL set, NOLOGIN), one line each; never a password or verifier.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<String>,
    /// Roles whose password was set again although their secret had not changed since this
    /// process last applied it: someone changed it on the server behind our back (drift),
    /// and the sync restored it. Only a long-running process knows what it applied last.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restored: Vec<String>,
    /// The server is a standby (read-only): nothing was attempted.
    pub standby: bool,
    pub dry_run: bool,
    /// Roles whose verifier was re-made (or would be) only to reach the server's
    /// `scram_iterations`: changed, but not to a new password.
    #[serde(skip)]
    pub strengthened: Vec<String>,
}

impl Report {
    /// Roles that got a new password.
    pub fn changed(&self) -> Vec<&str> {
        self.roles_with(Status::Changed)
    }

    pub fn roles_with(&self, status: Status) -> Vec<&str> {
        self.roles
            .iter()
            .filter(|r| r.status == status)
            .map(|r| r.role.as_str())
            .collect()
    }

    /// The report as text lines (one per role, then the completion line).
    pub fn lines(&self) -> Vec<String> {
        if self.standby {
            return vec!["server is a standby (in recovery): sync skipped".to_owned()];
        }
        let mut lines: Vec<String> = self
            .roles
            .iter()
            .map(|r| format!("role {:?}: {}", r.role, r.status))
            .collect();
        lines.extend(self.logins.iter().cloned());
        lines.push(if self.dry_run {
            "Dry run: nothing was changed.".to_owned()
        } else {
            COMPLETE_LINE.to_owned()
        });
        lines
    }
}

/// How to apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub strict: bool,
    pub dry_run: bool,
    /// What to do about sessions that hold the locks the sync needs.
    pub blockers: locks::Blockers,
    /// Overlap mode: keep the sessions of a login whose grace is over (`--keep-retired-sessions`).
    pub keep_retired_sessions: bool,
    /// Overlap mode: undo an administrator's lockout of a login (`--override-lockouts`).
    pub override_lockouts: bool,
    /// How long a login that stopped being published keeps working (`--grace`).
    pub grace: std::time::Duration,
    /// Shortest role password applied, in characters (`--min-password-length`; `0`: any).
    pub min_password_length: usize,
}

/// Which roles a sync sends to the server, and whether it checks their stored verifiers
/// first. Every mode speaks of this choice with this one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every role, each checked against its stored verifier: a role already holding its
    /// secret keeps its verifier byte for byte, and a password changed behind our back is
    /// restored. The first sync, `sync`, the periodic and SIGHUP resyncs.
    CheckAll,
    /// Only the roles whose secret differs from the last applied set (every role before the
    /// first apply), without checking their stored verifiers: they are known to differ from
    /// what was last set. What a file change needs; it keeps PBKDF2 (4096 rounds per check)
    /// off the path from a rotation to the new password being in force.
    ChangedOnly,
}

/// How a command prints its report on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
}

/// What `sync` was asked to do.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub config: Config,
    pub options: Options,
    pub format: ReportFormat,
}

/// A sync that remembers, in memory only, the last set of secrets it applied: the watcher
/// compares new files against it, and its superuser password lets a long-running process
/// still authenticate after rotating the superuser.
pub struct Syncer {
    pub config: Config,
    pub options: Options,
    last_applied: Option<SecretSet>,
    /// What the watchdogs of the syncs since the last `take_tally` saw of blocking
    /// sessions, failed syncs included.
    tally: Cell<locks::Tally>,
}

impl Syncer {
    pub fn new(config: Config, options: Options) -> Syncer {
        Syncer {
            config,
            options,
            last_applied: None,
            tally: Cell::new(locks::Tally::default()),
        }
    }

    /// The blocking sessions seen and ended by the syncs since the last call.
    pub fn take_tally(&self) -> locks::Tally {
        self.tally.take()
    }

    /// Reads every secret (all must be valid), connects, applies every role
    /// (`Scope::CheckAll`). Nothing is applied on any error.
    pub async fn sync(&mut self) -> anyhow::Result<Report> {
        self.sync_files(Scope::CheckAll, Reread::AtOnce)
            .await?
            .context("no set was applied")
    }

    /// Reads the secret files and applies them as `scope` says (`Ok(None)`: with
    /// `Scope::ChangedOnly`, the files hold the last applied set, and nothing was sent).
    /// The transaction reads the files again once it holds the sync lock, and applies only
    /// if they are still what was read: a sync queued behind another (a one-shot `sync`
    /// behind the watcher, say) never puts back an older set than the files hold. When they
    /// changed meanwhile, nothing is applied; `reread` says whether the new set is read
    /// and applied at once (a few times at most), or left to the caller (`FilesChanged`).
    pub async fn sync_files(
        &mut self,
        scope: Scope,
        reread: Reread,
    ) -> anyhow::Result<Option<Report>> {
        let mut attempt = 1;
        loop {
            let secrets = self.config.load_secrets(self.options.min_password_length)?;
            if scope == Scope::ChangedOnly && !set_changed(self.last_applied(), &secrets) {
                return Ok(None);
            }
            match self.apply_checked(&secrets, scope, true).await {
                Err(err)
                    if err.downcast_ref::<FilesChanged>().is_some()
                        && reread == Reread::AtOnce
                        && attempt < STALE_ATTEMPTS =>
                {
                    tracing::info!(
                        "the secret files changed while the sync waited for its lock; reading them again"
                    );
                    attempt += 1;
                }
                result => return result.map(Some),
            }
        }
    }

    /// Applies the set this process applied last again, in one transaction, to every
    /// role: what a resync does while the files are mid-change (they must not be read
    /// then). Nothing is compared with the files: a newer set there is pending, and is
    /// applied when it settles.
    ///
    /// Overlap mode's pairs are left out (their logins' passwords and `VALID UNTIL`): that
    /// set may be older than what another sync (a one-shot `sync`) already applied from
    /// the newer files, and for a pair an older password is no mere restore: it would
    /// take a stage applied since for a stage rolled back (expired at once, its sessions
    /// ended), or re-publish a retired login. The settled change, or the next full resync,
    /// checks them.
    pub async fn reapply_last(&mut self) -> anyhow::Result<Option<Report>> {
        let Some(set) = self.last_applied().cloned() else {
            return Ok(None);
        };
        let pair_logins: Vec<&str> = set
            .published
            .iter()
            .flat_map(|p| [p.role.as_str(), p.twin.as_str()])
            .collect();
        let outside_pairs = SecretSet {
            entries: set
                .entries
                .iter()
                .filter(|(spec, _)| !pair_logins.contains(&spec.name.as_str()))
                .cloned()
                .collect(),
            published: Vec::new(),
            service: None,
        };
        let report = self
            .apply_checked(&outside_pairs, Scope::CheckAll, false)
            .await;
        // Still the whole set: the pairs' values were applied by an earlier sync.
        self.last_applied = Some(set);
        report.map(Some)
    }

    /// Applies an already validated set of secrets in one transaction, to the roles `scope`
    /// says, and remembers the set as applied. With `check_files`, the transaction reads
    /// the files again under its lock and fails with `FilesChanged` when they differ.
    async fn apply_checked(
        &mut self,
        set: &SecretSet,
        scope: Scope,
        check_files: bool,
    ) -> anyhow::Result<Report> {
        // Before the first apply there is nothing to compare with: every role is checked.
        let scope = match self.last_applied() {
            None => Scope::CheckAll,
            Some(_) => scope,
        };
        let secrets = &set.entries;
        let changed: Vec<(RoleSpec, Secret)>;
        let roles = match scope {
            Scope::CheckAll => secrets.as_slice(),
            Scope::ChangedOnly => {
                changed = changed_since(self.last_entries(), secrets)
                    .cloned()
                    .collect();
                &changed
            }
        };
        // The whole set still offers the superuser's (possibly new) password to log in.
        let client = match self.connect_superuser(secrets).await {
            Ok(client) => client,
            // Every server of the list that answered is a standby (a cluster between
            // leaders): as on one standby, nothing is attempted and the promotion of one
            // of them is watched for.
            Err(err) if session::target::only_standbys(&err) => {
                tracing::info!("{err:#}");
                self.applied(set);
                return Ok(Report {
                    dry_run: self.options.dry_run,
                    standby: true,
                    ..Report::default()
                });
            }
            Err(err) => return Err(err),
        };
        let leftovers = match &self.config.overlap {
            Some(_) => Vec::new(),
            None => overlap::possible_leftovers(
                &self.config.roles,
                &self.config.superuser,
                &self.config.twin_suffix,
            ),
        };
        let logins = overlap::Logins::new(
            applied(set),
            leftovers,
            Policy {
                grace: self.options.grace,
                end_retired_sessions: !self.options.keep_retired_sessions && !self.options.dry_run,
                override_lockouts: self.options.override_lockouts,
            },
        );
        let fresh = check_files.then_some(set);
        let mut report = apply(self, &client, secrets, roles, &logins, scope, fresh).await?;
        report.restored = restored(self.last_entries(), secrets, &report);
        self.applied(set);
        Ok(report)
    }

    /// Remembers `secrets` as applied. A role the server did not have counts as applied
    /// too: it is tried again by the next full resync (periodic, SIGHUP) or when its own
    /// file changes, not on every other file change (each would warn about it again).
    fn applied(&mut self, set: &SecretSet) {
        if !self.options.dry_run {
            // Replacing the old set drops (and so zeroizes) it.
            self.last_applied = Some(set.clone());
        }
    }

    /// The set the last successful apply used (`None` before the first one).
    pub fn last_applied(&self) -> Option<&SecretSet> {
        self.last_applied.as_ref()
    }

    /// The logins and passwords of the last applied set.
    fn last_entries(&self) -> Option<&[(RoleSpec, Secret)]> {
        self.last_applied().map(|set| set.entries.as_slice())
    }

    /// Connects as the superuser to the configured database: with the password of
    /// `secrets` (the set about to be applied), else its file, else the last applied one.
    /// The one pinned way (`session::superuser`).
    pub async fn connect_superuser(
        &self,
        secrets: &[(RoleSpec, Secret)],
    ) -> anyhow::Result<Client> {
        self.connect_superuser_to(secrets, None).await
    }

    /// `connect_superuser` to another database of the same server (`None`: the configured
    /// one), for the watchdog's `ROLLBACK PREPARED`, which works only in the prepared
    /// transaction's own database.
    pub async fn connect_superuser_to(
        &self,
        secrets: &[(RoleSpec, Secret)],
        dbname: Option<String>,
    ) -> anyhow::Result<Client> {
        let superuser = |set: &[(RoleSpec, Secret)]| {
            set.iter()
                .find(|(r, _)| r.name == self.config.superuser)
                .map(|(_, s)| s.clone())
        };
        // When the superuser is not in the synced set, its file is still a way in.
        let from_file = match superuser(secrets) {
            Some(secret) => Some(secret),
            None => self.config.superuser_password().and_then(Result::ok),
        };
        let remembered = self.last_entries().and_then(superuser);
        let mut passwords = Vec::new();
        if let Some(secret) = &from_file {
            passwords.push((secret, "superuser password file"));
        }
        if let Some(secret) = &remembered
            && remembered != from_file
        {
            passwords.push((secret, "last applied superuser password"));
        }
        session::superuser(&self.config, &passwords, dbname).await
    }
}

/// How many times a sync whose files changed while it waited for its lock reads them again.
const STALE_ATTEMPTS: u32 = 5;

/// What a sync does when the files changed while it waited for its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reread {
    /// Reads them again at once: a one-shot `sync`, and the first sync of `run` and
    /// `watch`, which take the files as they find them.
    AtOnce,
    /// Applies nothing (`FilesChanged`): the watch loop, whose file events say when the
    /// change is complete (a file written in place is taken only once its writer closed
    /// it and it stood still, and a read now could take half of it).
    WhenSettled,
}

/// The secret files no longer hold the set a sync was about to apply (read again under
/// its lock): it applied nothing.
#[derive(Debug)]
pub struct FilesChanged;

impl fmt::Display for FilesChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the secret files changed while the sync waited for its lock; nothing was applied",
        )
    }
}

impl std::error::Error for FilesChanged {}

fn applied(set: &SecretSet) -> Applied<'_> {
    Applied {
        entries: &set.entries,
        pairs: &set.published,
    }
}

/// The entries of `new` whose secret differs from the one `last` had for that role (all of
/// them when nothing was applied yet; a role new in the set counts as different). Compares
/// values for equality only.
pub fn changed_since<'a>(
    last: Option<&[(RoleSpec, Secret)]>,
    new: &'a [(RoleSpec, Secret)],
) -> impl Iterator<Item = &'a (RoleSpec, Secret)> {
    new.iter().filter(move |(spec, secret)| {
        !last.is_some_and(|last| last.iter().any(|(s, v)| s == spec && v == secret))
    })
}

/// Whether a new set must be applied at all: it differs from the last applied one (in a
/// value, in a role, in the set of roles, or in which login is published).
pub fn set_changed(last: Option<&SecretSet>, new: &SecretSet) -> bool {
    match last {
        None => true,
        Some(last) => {
            last.entries.len() != new.entries.len()
                || changed_since(Some(&last.entries), &new.entries)
                    .next()
                    .is_some()
                || last.published != new.published
        }
    }
}

/// The roles `report` changed whose secret in `secrets` is the one `last` applied (none
/// before the first apply: a change then may be a rotation made while nobody watched).
fn restored(
    last: Option<&[(RoleSpec, Secret)]>,
    secrets: &[(RoleSpec, Secret)],
    report: &Report,
) -> Vec<String> {
    let Some(last) = last else {
        return Vec::new();
    };
    let changed: Vec<&str> = changed_since(Some(last), secrets)
        .map(|(spec, _)| spec.name.as_str())
        .collect();
    report
        .changed()
        .into_iter()
        .filter(|role| !changed.contains(role))
        .map(str::to_owned)
        .collect()
}

/// How many times a sync the server chose as a deadlock's victim is tried again (within
/// the same total wait).
const DEADLOCK_ATTEMPTS: u32 = 3;

/// The sync transaction itself, with its waits watched (`locks`). `login` is the set whose
/// superuser password may open the watchdog's second connection.
async fn apply(
    syncer: &Syncer,
    client: &Client,
    login: &[(RoleSpec, Secret)],
    secrets: &[(RoleSpec, Secret)],
    logins: &overlap::Logins<'_>,
    scope: Scope,
    fresh: Option<&SecretSet>,
) -> anyhow::Result<Report> {
    let options = syncer.options;
    // A standby cannot take ALTER ROLE; its passwords arrive through replication. One round
    // trip also reads the iteration count new verifiers must have (NULL before 16) and the
    // backend pid whose lock waits the watchdog watches.
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('scram_iterations', true), \
             pg_backend_pid()",
            &[],
        )
        .await
        .context("checking whether the server is a standby")
        .context(Failure::Sql)?;
    if row.get::<_, bool>(0) {
        return Ok(Report {
            dry_run: options.dry_run,
            standby: true,
            ..Report::default()
        });
    }
    let iterations = scram::iterations_for(row.get::<_, Option<&str>>(1));
    let mut watchdog = locks::Watchdog::new(
        options.blockers,
        Box::new(move |dbname| Box::pin(syncer.connect_superuser_to(login, dbname))),
    );
    watchdog.set_backend_pid(row.get(2));
    let plan = Plan {
        secrets,
        logins,
        options,
        scope,
        iterations,
        fresh: fresh.map(|set| (&syncer.config, set)),
    };
    let result = attempts(client, &plan, &mut watchdog).await;
    // Failed syncs count too: a blocker that made the sync give up is the one to know of.
    syncer.tally.set(syncer.tally.get().add(watchdog.tally()));
    result
}

/// The transaction, tried again when the server chose it as a deadlock's victim.
async fn attempts(
    client: &Client,
    plan: &Plan<'_>,
    watchdog: &mut locks::Watchdog<'_>,
) -> anyhow::Result<Report> {
    let mut attempt = 1;
    loop {
        let mut report = Report {
            dry_run: plan.options.dry_run,
            ..Report::default()
        };
        match transaction(client, plan, watchdog, &mut report).await {
            Ok(()) => return Ok(report),
            // The server rolled the sync back to break a deadlock with another session (it
            // normally picks the other one: see `sql::bounds`). The other session has its
            // locks now; the next attempt waits for them under the same watchdog.
            Err(err)
                if locks::is_deadlock(&err)
                    && attempt < DEADLOCK_ATTEMPTS
                    && !watchdog.time_left().is_zero() =>
            {
                tracing::warn!(
                    attempt,
                    "the sync was rolled back to break a deadlock; retrying"
                );
                attempt += 1;
            }
            Err(err) => return Err(Failure::Sql.unless_classified(err)),
        }
    }
}

/// What one transaction applies, and how.
struct Plan<'a> {
    secrets: &'a [(RoleSpec, Secret)],
    /// Overlap mode's twins and grace (nothing to do without it).
    logins: &'a overlap::Logins<'a>,
    options: Options,
    scope: Scope,
    /// PBKDF2 rounds of new verifiers (the server's `scram_iterations`).
    iterations: u32,
    /// The files to read again under the lock, and the set they must still hold.
    fresh: Option<(&'a Config, &'a SecretSet)>,
}

async fn transaction(
    client: &Client,
    plan: &Plan<'_>,
    watchdog: &mut locks::Watchdog<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    // `Client::transaction` needs `&mut`; the explicit BEGIN keeps `Client` shareable.
    // Any early return drops the connection's transaction state with ROLLBACK below.
    client
        .batch_execute(sql::QUIET_SESSION)
        .await
        .context("suppressing transaction sampling")?;
    client
        .batch_execute("BEGIN")
        .await
        .context("starting the transaction")?;
    let result = async {
        begin_locked(client, plan, watchdog).await?;
        let logins = plan.logins;
        // Overlap mode: twins created or repaired first, so their passwords are set below
        // like every other login's; a twin created now gets its password even when only
        // other files changed.
        let prepared = logins.prepare(client, watchdog, &mut report.logins).await?;
        let secrets = &logins.adjust(plan.secrets, &prepared);
        let leftovers = logins.find_leftovers(client, watchdog).await?;
        let salts = set_passwords(client, plan, secrets, watchdog, report).await?;
        // Who may log in until when: the same transaction, so a publish switch and the
        // passwords it relies on are in force together, or not at all. A verifier only
        // re-made at the server's strength holds no new password.
        let changed: Vec<&str> = report
            .changed()
            .into_iter()
            .chain(report.roles_with(Status::WouldChange))
            .filter(|role| !report.strengthened.iter().any(|s| s == role))
            .collect();
        let lines = logins
            .valid_until(client, watchdog, &changed, &salts, &prepared, &leftovers)
            .await?;
        report.logins.extend(lines);
        if plan.options.dry_run {
            bail!(DryRun);
        }
        client.batch_execute("COMMIT").await.context("committing")
    }
    .await;
    match result {
        Ok(()) => Ok(()),
        Err(err) => {
            // Roll back whatever was applied; if the connection is gone, the server
            // rolls back on its own.
            let _ = client.batch_execute("ROLLBACK").await;
            if err.downcast_ref::<DryRun>().is_some() {
                Ok(())
            } else {
                Err(err)
            }
        }
    }
}

/// The transaction's first steps: statement logging off and its waits bounded, the sync
/// lock taken, and (`plan.fresh`) the files read again under the lock.
async fn begin_locked(
    client: &Client,
    plan: &Plan<'_>,
    watchdog: &mut locks::Watchdog<'_>,
) -> anyhow::Result<()> {
    // A message of their own, before anything that can wait: a setting only applies to
    // statements received after it (sending it in one batch with ALTER ROLE would log
    // the batch), and a lock wait reads the timeouts when it starts. The server-side
    // bounds sit a little beyond the watchdog's, which gives up first and says why.
    let settings: Vec<String> = sql::QUIET_SETTINGS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(sql::bounds(
            plan.options.blockers.total_wait() + std::time::Duration::from_secs(1),
        ))
        .collect();
    client
        .batch_execute(&settings.join("; "))
        .await
        .context("suppressing statement logging and bounding the transaction's waits")?;
    watchdog
        .guard(
            "taking the sync lock",
            client.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&sql::ADVISORY_LOCK_KEY],
            ),
        )
        .await?;
    // Whoever held the lock may have applied newer files than this sync read: what is
    // applied is decided from files read now, under the lock. (A file unreadable now is
    // mid-change: read again too.)
    if let Some((config, set)) = plan.fresh
        && config
            .load_secrets(plan.options.min_password_length)
            .ok()
            .as_ref()
            != Some(set)
    {
        bail!(FilesChanged);
    }
    Ok(())
}

/// Reads the stored verifiers of `secrets`, plans each role's step off the runtime's
/// thread, and sends the new verifiers; one outcome per role in `report`. Returns, per
/// role, the salt of its stored verifier before and after (overlap mode records them).
async fn set_passwords(
    client: &Client,
    plan: &Plan<'_>,
    secrets: &[(RoleSpec, Secret)],
    watchdog: &mut locks::Watchdog<'_>,
    report: &mut Report,
) -> anyhow::Result<HashMap<String, overlap::Salts>> {
    let names: Vec<String> = secrets.iter().map(|(r, _)| r.name.clone()).collect();
    let rows = watchdog
        .guard(
            "reading the stored password verifiers (pg_authid)",
            client.query(
                "SELECT rolname::text, rolpassword FROM pg_authid \
                 WHERE rolname = ANY($1::text[])",
                &[&names],
            ),
        )
        .await?;
    let current: HashMap<String, Option<String>> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let mut salts = salts_of(&current);
    let missing: Vec<&str> = names
        .iter()
        .filter(|n| !current.contains_key(*n))
        .map(String::as_str)
        .collect();
    if plan.options.strict && !missing.is_empty() {
        return Err(anyhow::anyhow!(
            "role(s) {missing:?} do not exist (--strict)"
        ))
        .context(Failure::MissingRole);
    }
    // PBKDF2 costs milliseconds per role: off the runtime's thread, so that in `run`
    // signals keep being forwarded and children reaped while a large set is planned.
    let owned = secrets.to_vec();
    // Overlap mode's logins are always compared: whether one of them really got a new
    // password decides its VALID UNTIL (a stage, or a stage rolled back), and another
    // sync may have applied the same files a moment ago.
    let checked: Vec<String> = match plan.scope {
        Scope::CheckAll => secrets.iter().map(|(r, _)| r.name.clone()).collect(),
        Scope::ChangedOnly => plan.logins.logins(),
    };
    let (dry_run, iterations) = (plan.options.dry_run, plan.iterations);
    let steps = tokio::task::spawn_blocking(move || {
        plan_steps(&owned, &current, dry_run, &checked, iterations)
    })
    .await
    .context("planning the password changes")??;
    for ((spec, _), step) in secrets.iter().zip(steps) {
        if matches!(step, Step::Strengthen(_)) {
            report.strengthened.push(spec.name.clone());
        }
        let status = match step {
            Step::Keep(status) => status,
            Step::Strengthen(None) => Status::WouldChange,
            Step::Set(verifier) | Step::Strengthen(Some(verifier)) => {
                if let Some(entry) = salts.get_mut(&spec.name) {
                    entry.after = scram::salt_tag(&verifier);
                }
                let statement = sql::alter_role_password(&spec.name, &verifier);
                watchdog
                    .guard(
                        &format!("setting the password of role {:?}", spec.name),
                        client.batch_execute(&statement),
                    )
                    .await?;
                Status::Changed
            }
        };
        if status == Status::Missing {
            tracing::warn!(role = ?spec.name, "role does not exist; skipped");
        }
        report.roles.push(RoleOutcome {
            role: spec.name.clone(),
            status,
        });
    }
    Ok(salts)
}

/// Per role, the salt of its stored verifier, before and (until a new one is set) after.
fn salts_of(current: &HashMap<String, Option<String>>) -> HashMap<String, overlap::Salts> {
    current
        .iter()
        .map(|(name, stored)| {
            let before = stored.as_deref().and_then(scram::salt_tag);
            let salts = overlap::Salts {
                after: before.clone(),
                before,
            };
            (name.clone(), salts)
        })
        .collect()
}

impl overlap::Guard for locks::Watchdog<'_> {
    fn guard<T>(
        &mut self,
        what: &str,
        statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> impl std::future::Future<Output = anyhow::Result<T>> {
        locks::Watchdog::guard(self, what, statement)
    }
}

/// What the transaction does for one role, decided before any statement is sent.
enum Step {
    /// Nothing to send; the role's final status.
    Keep(Status),
    /// Store this (freshly made) verifier.
    Set(String),
    /// The stored verifier holds the role's password with fewer rounds than the server's
    /// `scram_iterations`: store this one, made at the server's strength (`None`: dry
    /// run). The same password: no new password as far as overlap mode's rules go (a
    /// stage, a lockout lifted by a new password).
    Strengthen(Option<String>),
}

/// Decides every role's step; the stored verifiers of `checked` are compared first. Checking a stored verifier and making a new one are
/// `iterations` PBKDF2 rounds each, the bulk of a large sync's time, so big role sets are
/// spread over the available cores. A stored verifier with fewer rounds than the server's
/// `scram_iterations` counts as changed: it is re-made at the configured strength (a
/// `Step::Strengthen` when it still holds the role's password: one PBKDF2 at its own,
/// lower, count tells).
fn plan_steps(
    secrets: &[(RoleSpec, Secret)],
    current: &HashMap<String, Option<String>>,
    dry_run: bool,
    checked: &[String],
    iterations: u32,
) -> anyhow::Result<Vec<Step>> {
    parallel_map(secrets, |(spec, secret)| match current.get(&spec.name) {
        None => Ok(Step::Keep(Status::Missing)),
        Some(Some(stored))
            if checked.contains(&spec.name) && scram::is_current(stored, secret, iterations) =>
        {
            Ok(Step::Keep(Status::Unchanged))
        }
        Some(Some(stored))
            if checked.contains(&spec.name)
                && !scram::strong_enough(stored, iterations)
                && scram::verifies(stored, secret) =>
        {
            if dry_run {
                Ok(Step::Strengthen(None))
            } else {
                scram::make_verifier(secret, iterations).map(|v| Step::Strengthen(Some(v)))
            }
        }
        Some(_) if dry_run => Ok(Step::Keep(Status::WouldChange)),
        Some(_) => scram::make_verifier(secret, iterations).map(Step::Set),
    })
    .into_iter()
    .collect()
}

/// `items.iter().map(f)`, on scoped threads (one per core) when there are enough items to
/// be worth it; order is kept.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    const MIN_PARALLEL: usize = 16;
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if items.len() < MIN_PARALLEL || threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Marker used to leave a dry run's transaction through the rollback path.
#[derive(Debug)]
struct DryRun;

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dry run")
    }
}

impl std::error::Error for DryRun {}

/// `pg-password-sync sync`: one sync against the running server, report on stdout.
pub fn command(settings: SyncSettings) -> anyhow::Result<u8> {
    let mut syncer = Syncer::new(settings.config, settings.options);
    let report = crate::runtime::block_on(syncer.sync())?;
    print_report(&report, settings.format)?;
    Ok(0)
}

/// Writes the report to stdout.
pub fn print_report(report: &Report, format: ReportFormat) -> anyhow::Result<()> {
    match format {
        ReportFormat::Text => {
            for line in report.lines() {
                println!("{line}");
            }
        }
        ReportFormat::Json => {
            println!(
                "{}",
                serde_json::to_string(report).context("serialising the report")?
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(values: &[(&str, &str)]) -> Vec<(RoleSpec, Secret)> {
        values
            .iter()
            .map(|(role, value)| {
                (
                    RoleSpec {
                        name: (*role).to_owned(),
                        secret: crate::config::SecretRef::Name(format!("{role}_pw")),
                    },
                    Secret::new((*value).to_owned()),
                )
            })
            .collect()
    }

    fn changed_roles<'a>(
        last: Option<&[(RoleSpec, Secret)]>,
        new: &'a [(RoleSpec, Secret)],
    ) -> Vec<&'a str> {
        changed_since(last, new)
            .map(|(spec, _)| spec.name.as_str())
            .collect()
    }

    #[test]
    fn set_changes_are_detected_per_role() {
        let whole = |values: &[(&str, &str)]| SecretSet {
            service: None,
            entries: set(values),
            published: Vec::new(),
        };
        let old = set(&[("postgres", "a"), ("appuser", "b")]);
        let old_set = whole(&[("postgres", "a"), ("appuser", "b")]);
        assert!(set_changed(None, &old_set), "nothing applied yet");
        assert!(!set_changed(Some(&old_set), &old_set.clone()));
        let new = set(&[("postgres", "a"), ("appuser", "c")]);
        assert!(set_changed(
            Some(&old_set),
            &whole(&[("postgres", "a"), ("appuser", "c")])
        ));
        assert_eq!(changed_roles(Some(&old), &new), ["appuser"]);
        // A role dropped from the set is a change too (nothing else differs).
        assert!(set_changed(Some(&old_set), &whole(&[("postgres", "a")])));
        // So is another published login with the same passwords.
        let mut switched = old_set.clone();
        let mut pair = crate::overlap::Pair::of(&switched.entries[1].0, "_alt").unwrap();
        pair.published = crate::overlap::Login::Twin;
        switched.published.push(pair);
        assert!(set_changed(Some(&old_set), &switched));
        // So is a role whose secret moved to another file with the same value.
        let mut moved = old.clone();
        moved[1].0.secret = crate::config::SecretRef::Path("/elsewhere".into());
        assert_eq!(changed_roles(Some(&old), &moved), ["appuser"]);
        assert_eq!(changed_roles(None, &old), ["postgres", "appuser"]);
    }

    #[test]
    fn parallel_map_keeps_order_for_small_and_large_inputs() {
        for n in [0, 3, 15, 16, 17, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let doubled = parallel_map(&items, |x| x * 2);
            assert_eq!(doubled, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
    }

    fn make(secret: &Secret, iterations: u32) -> String {
        scram::make_verifier(secret, iterations).unwrap()
    }

    #[test]
    fn plan_checks_existing_verifiers() {
        let secret = Secret::new("pw".into());
        let spec = |name: &str| RoleSpec {
            name: name.into(),
            secret: crate::config::SecretRef::Name("f".into()),
        };
        let current: HashMap<String, Option<String>> = [
            ("same".to_owned(), Some(make(&secret, 4096))),
            (
                "other".to_owned(),
                Some(make(&Secret::new("old".into()), 4096)),
            ),
            ("null".to_owned(), None),
        ]
        .into();
        let secrets: Vec<_> = ["same", "other", "null", "ghost"]
            .iter()
            .map(|n| (spec(n), secret.clone()))
            .collect();
        let all: Vec<String> = secrets.iter().map(|(r, _)| r.name.clone()).collect();
        let steps = plan_steps(&secrets, &current, false, &all, 4096).unwrap();
        assert!(matches!(steps[0], Step::Keep(Status::Unchanged)));
        assert!(matches!(&steps[1], Step::Set(v) if scram::verifies(v, &secret)));
        assert!(matches!(steps[2], Step::Set(_)));
        assert!(matches!(steps[3], Step::Keep(Status::Missing)));
        let dry = plan_steps(&secrets, &current, true, &all, 4096).unwrap();
        assert!(matches!(dry[1], Step::Keep(Status::WouldChange)));
        // Known to have changed: a new verifier even where the stored one still matches;
        // a missing role stays missing.
        let known = plan_steps(&secrets, &current, false, &[], 4096).unwrap();
        assert!(matches!(&known[0], Step::Set(v) if scram::verifies(v, &secret)));
        assert!(matches!(known[3], Step::Keep(Status::Missing)));
        // The server asks for more rounds than the stored verifier has: re-made with them.
        let stronger = plan_steps(&secrets, &current, false, &all, 8192).unwrap();
        assert!(
            matches!(&stronger[0], Step::Strengthen(Some(v)) if v.starts_with("SCRAM-SHA-256$8192:")
                && scram::verifies(v, &secret))
        );
        // Another password: a new one, whatever the rounds.
        assert!(matches!(&stronger[1], Step::Set(v) if scram::verifies(v, &secret)));
        let dry = plan_steps(&secrets, &current, true, &all, 8192).unwrap();
        assert!(matches!(dry[0], Step::Strengthen(None)));
        assert!(matches!(dry[1], Step::Keep(Status::WouldChange)));
    }
}

//! Overlap mode inside the sync transaction: the twin logins themselves (created, checked,
//! repaired, settings mirrored) before the passwords, and who may log in until when
//! (`VALID UNTIL`), and which sessions of a retired login end, after them, so that a
//! publish switch and the passwords it relies on commit together. Also what a sync
//! *without* overlap does to twins an earlier overlap mode left.
//!
//! Everything here runs in the caller's transaction, after its advisory lock and with its
//! statement logging off, and every statement goes through the caller's `Guard` (the
//! watchdog that names, and past its limit ends, the sessions a statement waits for); no
//! statement here carries a password or verifier (the twin's password is set by the
//! ordinary password step). Every decision is derived from the files and the server's
//! catalogs alone, so a restart or a one-shot `sync` decides as a long-running process
//! does: the one fact the files cannot tell, that an unpublished login was staged and
//! waits for its publish, is kept on the server in the twin's mark (`Mark::Staged`).
//!
//! A twin is ours or refused. The sync creates it (`CREATE ROLE twin LOGIN INHERIT`,
//! `GRANT role TO twin`, the per-role setting `role=<role>`) and marks it with a comment
//! (`COMMENT ON ROLE`), which only a superuser or a holder of CREATEROLE can write on a
//! role, and a twin may hold neither. A role that already carries the twin's name without
//! that mark is refused and granted nothing, whatever it says of itself: a login can set
//! its own `role=` setting, and on PostgreSQL 14 and older a role can grant membership in
//! itself. (A twin made before the mark existed is recognised by a membership that a
//! superuser granted, and marked.) A twin with any attribute beyond LOGIN INHERIT, or a
//! member of other roles, would be more than the role: refused too. A role that is a
//! member of a twin would hold the role's rights through it: every such membership is
//! revoked (on 14 and older the twin's own login can grant one).
//!
//! Why the twin acts as the role: the `role` setting runs `SET ROLE role` at session start,
//! so `current_user` is the role and what it creates is the role's; `RESET ROLE`,
//! `DISCARD ALL` and `RESET ALL` return to that session default (only `SET ROLE NONE`
//! returns to the twin itself, which may do no more than the role: it is only a member).
//!
//! Why the settings are copied as catalog rows (`pg_db_role_setting`) rather than re-set:
//! `ALTER ROLE twin SET x FROM CURRENT` would first run the role's values in our session,
//! and an ordinary role may set its own values (our `statement_timeout`, say);
//! `ALTER ROLE twin SET x = '<text>'` from the stored text would re-quote list settings
//! such as `search_path`. A superuser may write that catalog, and the rows are read as
//! they are at each login, so a copy is exact by construction.
//!
//! An administrator's lockout stands: a published login whose `VALID UNTIL` has passed
//! (the sync never sets a past one on a published login) or a twin made NOLOGIN by
//! someone else is kept as it is and reported, unless `override_lockouts`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{Login, Pair, twin_login};
use crate::secret::{RoleSpec, Secret};

/// Runs one statement of the transaction, bounding and watching its wait for other
/// sessions (the sync's watchdog). Every statement here goes through it.
pub trait Guard {
    fn guard<T>(
        &mut self,
        what: &str,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> impl Future<Output = anyhow::Result<T>>;
}

/// How the transaction treats logins beyond their passwords (flags of `sync`, `run`,
/// `watch`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How long a login that stopped being published keeps working.
    pub grace: Duration,
    /// End the sessions still open on a login whose grace is over (and on a login being
    /// re-keyed, which were opened with its retired password).
    pub end_retired_sessions: bool,
    /// Undo an administrator's lockout (`VALID UNTIL` in the past on a published login,
    /// NOLOGIN on a twin) instead of keeping it.
    pub override_lockouts: bool,
}

/// What the transaction does to logins besides their passwords.
pub struct Logins<'a> {
    /// Overlap on: each overlapped role's pair, with its published login (empty when off).
    pairs: &'a [Pair],
    /// Overlap off: (role, twin) pairs whose twin, if it is ours, is retired.
    leftovers: Vec<(String, String)>,
    /// Every login of the set with its password (a twin created now needs its own).
    entries: &'a [(RoleSpec, Secret)],
    policy: Policy,
}

/// The set a sync applies, as far as logins go: every login with its password, and (overlap
/// on) the pairs with their published logins.
#[derive(Clone, Copy)]
pub struct Applied<'a> {
    pub entries: &'a [(RoleSpec, Secret)],
    pub pairs: &'a [Pair],
}

/// What `prepare` found: twins made now, and twins whose role does not exist (left alone:
/// their password is not set either).
#[derive(Debug, Default)]
pub struct Prepared {
    pub created: Vec<String>,
    pub orphaned: Vec<String>,
}

/// A twin an earlier overlap mode left (overlap off), as `find_leftovers` found it.
pub struct Leftover {
    role: String,
    twin: String,
    /// No `VALID UNTIL`, or `infinity`.
    endless: bool,
    /// Its `VALID UNTIL` has passed.
    expired: bool,
    can_login: bool,
}

/// What the comment on a twin says: that it is ours (see the module comment), and the
/// one piece of state the server keeps for the pair. Only a superuser (or a holder of
/// CREATEROLE, which a twin may not have) can write it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mark {
    /// Ours, nothing pending.
    Plain,
    /// Ours, and this login of the pair is staged: it got a new password (and `infinity`)
    /// while unpublished, and is not published yet. What tells a pending stage from a
    /// login published until now after a restart, and a stage rolled back from a new one.
    Staged(String),
    /// Ours, made NOLOGIN by a sync with overlap mode off. A NOLOGIN under any other
    /// comment is an administrator's lockout.
    Retired,
}

impl Mark {
    fn text(&self, role: &str) -> String {
        let mark = format!("pg-password-sync: twin login of role {role:?}");
        match self {
            Mark::Plain => mark,
            Mark::Staged(login) => format!("{mark}; staged login {login:?}"),
            Mark::Retired => format!("{mark}; NOLOGIN since overlap mode was turned off"),
        }
    }

    /// The mark `comment` is for the twin of `pair` (`None`: not ours), whatever salts it
    /// records (`Recorded::read`).
    fn read(pair: &Pair, comment: Option<&str>) -> Option<Mark> {
        let comment = comment?;
        let comment = comment.rsplit_once(SALTS).map_or(comment, |(head, _)| head);
        [
            Mark::Plain,
            Mark::Retired,
            Mark::Staged(pair.role.clone()),
            Mark::Staged(pair.twin.clone()),
        ]
        .into_iter()
        .find(|mark| mark.text(&pair.role) == comment)
    }
}

/// Where a mark records the tags of the verifiers the sync last stored for the pair.
const SALTS: &str = "; verifier tags ";

/// The tags of the verifiers the sync last stored for a pair's two logins (`scram::salt_tag`:
/// a hash of the random salt, no part of the verifier), as its mark records them: how the
/// sync tells a password it set (its tag still there) from one set behind its back
/// (another tag), which it restores without taking it for a stage or a lifted lockout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    role: Option<String>,
    twin: Option<String>,
}

impl Recorded {
    fn read(comment: Option<&str>) -> Recorded {
        let Some((_, salts)) = comment.and_then(|c| c.rsplit_once(SALTS)) else {
            return Recorded::default();
        };
        let salt = |s: Option<&str>| s.filter(|s| *s != "-").map(str::to_owned);
        let mut parts = salts.split(' ');
        Recorded {
            role: salt(parts.next()),
            twin: salt(parts.next()),
        }
    }

    fn text(&self) -> String {
        if self.role.is_none() && self.twin.is_none() {
            return String::new();
        }
        let salt = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
        format!("{SALTS}{} {}", salt(&self.role), salt(&self.twin))
    }

    /// What to record after the password step: the salts it left, or, for a login it did
    /// not look at, the one recorded.
    fn after(&self, pair: &Pair, salts: &HashMap<String, Salts>) -> Recorded {
        let after = |login: &str| {
            salts.get(login).map_or_else(
                || self.of(pair, login).map(str::to_owned),
                |s| s.after.clone(),
            )
        };
        Recorded {
            role: after(&pair.role),
            twin: after(&pair.twin),
        }
    }

    fn of(&self, pair: &Pair, login: &str) -> Option<&str> {
        match pair.which(login)? {
            Login::Role => self.role.as_deref(),
            Login::Twin => self.twin.as_deref(),
        }
    }
}

/// What the password step found and left for one login: the tag (`scram::salt_tag`) of the
/// stored verifier before the transaction, and after it (the one it set, or the same).
#[derive(Debug, Clone, Default)]
pub struct Salts {
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The twins that overlap mode, now off, may have left: one per role of the role map but
/// the superuser (a name that would not fit cannot have been made).
pub fn possible_leftovers(
    roles: &[RoleSpec],
    superuser: &str,
    suffix: &str,
) -> Vec<(String, String)> {
    roles
        .iter()
        .filter(|r| r.name != superuser)
        .filter_map(|r| {
            twin_login(&r.name, suffix)
                .ok()
                .map(|t| (r.name.clone(), t))
        })
        .collect()
}

impl<'a> Logins<'a> {
    /// What the transaction does for `set` (overlap on: its pairs; off: `leftovers`).
    pub fn new(set: Applied<'a>, leftovers: Vec<(String, String)>, policy: Policy) -> Logins<'a> {
        Logins {
            pairs: set.pairs,
            leftovers,
            entries: set.entries,
            policy,
        }
    }

    /// Both logins of each pair: whether a login's password really changed decides its
    /// `VALID UNTIL` (a stage, a stage rolled back, a lockout lifted by a new password),
    /// so the sync compares their stored verifiers whatever the scope.
    pub fn logins(&self) -> Vec<String> {
        self.pairs
            .iter()
            .flat_map(|p| [p.role.clone(), p.twin.clone()])
            .collect()
    }

    /// Creates missing twins, refuses a twin name held by a role that is not ours (or a
    /// twin that holds more than LOGIN INHERIT), repairs ours (membership, `role` setting,
    /// LOGIN unless locked out, INHERIT), and mirrors each role's settings and connection
    /// limit onto its twin.
    pub async fn prepare(
        &self,
        client: &Client,
        guard: &mut impl Guard,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<Prepared> {
        let mut prepared = Prepared::default();
        for pair in self.pairs {
            let (role, twin) = (&pair.role, &pair.twin);
            let Some(mut state) = Catalog::read(client, guard, role, twin).await? else {
                // The role is missing (reported by the password step): leave its twin.
                prepared.orphaned.push(twin.clone());
                continue;
            };
            let created = state.twin.is_none();
            if created {
                create_twin(client, guard, pair).await?;
                lines.push(format!(
                    "login {twin:?}: created as the twin of role {role:?}"
                ));
                prepared.created.push(twin.clone());
                state = Catalog::read(client, guard, role, twin)
                    .await?
                    .context("reading the twin just created")?;
            }
            let repairs = self.repair(client, guard, pair, &state, lines).await?;
            if !created && !repairs.is_empty() {
                lines.push(format!(
                    "login {twin:?}: brought in line with role {role:?} ({})",
                    repairs.join(", ")
                ));
            }
        }
        Ok(prepared)
    }

    /// Brings an existing twin (ours, or refused here) in line with its role; says what
    /// was repaired.
    async fn repair(
        &self,
        client: &Client,
        guard: &mut impl Guard,
        pair: &Pair,
        state: &Catalog,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<Vec<&'static str>> {
        let (role, twin) = (&pair.role, &pair.twin);
        let t = state.twin.as_ref().context("reading the twin's row")?;
        let mark = Mark::read(pair, t.comment.as_deref());
        t.check_ours(pair)?;
        let mut repairs = Vec::new();
        // Nobody is a member of a twin: through it a member would hold the role's rights,
        // past every rotation of the twin's password (on PostgreSQL 14 and older the twin
        // itself can grant it, so a leaked twin password could leave a lasting member).
        for (member, grantor) in &t.members {
            let by = grantor
                .as_deref()
                .map(|g| format!(" GRANTED BY {}", escape_identifier(g)))
                .unwrap_or_default();
            let revoke = format!(
                "REVOKE {} FROM {}{by} CASCADE",
                escape_identifier(twin),
                escape_identifier(member)
            );
            exec(client, guard, &revoke, twin).await?;
            lines.push(format!(
                "login {twin:?}: took back the membership of role {member:?} in it (a twin \
                 has no members: through it they held the rights of role {role:?})"
            ));
        }
        if !t.members.is_empty() {
            repairs.push("memberships in it taken back");
        }
        let retired_by_us = mark == Some(Mark::Retired);
        if mark.is_none() || retired_by_us {
            // Made before the mark existed, or retired by overlap mode turned off.
            comment_on(client, guard, twin, &Mark::Plain.text(role)).await?;
            repairs.push("marked as ours");
        }
        if !t.member {
            let grant = format!(
                "GRANT {} TO {}",
                escape_identifier(role),
                escape_identifier(twin)
            );
            exec(client, guard, &grant, twin).await?;
            repairs.push("member of the role");
        }
        let unlock = !t.can_login && (retired_by_us || self.policy.override_lockouts);
        if !t.can_login && !unlock {
            lines.push(locked_out_line(twin, "NOLOGIN"));
        }
        if !t.inherit || unlock {
            let login = if t.can_login || unlock { " LOGIN" } else { "" };
            let alter = format!("ALTER ROLE {}{login} INHERIT", escape_identifier(twin));
            exec(client, guard, &alter, twin).await?;
            repairs.push(if unlock { "LOGIN" } else { "INHERIT" });
        }
        if t.connlimit != state.role_connlimit {
            let alter = format!(
                "ALTER ROLE {} CONNECTION LIMIT {}",
                escape_identifier(twin),
                state.role_connlimit
            );
            exec(client, guard, &alter, twin).await?;
            repairs.push("connection limit");
        }
        if mirror_settings(client, guard, role, state.role_oid, t.oid).await? {
            repairs.push("settings");
        }
        Ok(repairs)
    }

    /// The logins whose passwords the transaction sets: `secrets` (what the scope chose)
    /// plus twins created now, minus twins whose role is missing.
    pub fn adjust(
        &self,
        secrets: &[(RoleSpec, Secret)],
        prepared: &Prepared,
    ) -> Vec<(RoleSpec, Secret)> {
        let created = self.entries.iter().filter(|(spec, _)| {
            prepared.created.contains(&spec.name) && !secrets.iter().any(|(s, _)| s == spec)
        });
        secrets
            .iter()
            .chain(created)
            .filter(|(spec, _)| !prepared.orphaned.contains(&spec.name))
            .cloned()
            .collect()
    }

    /// Overlap off: the twins an earlier overlap mode left that are ours (marked, or made
    /// before the mark with a superuser's grant and the `role` setting; never a
    /// superuser), for `valid_until`. Nothing is read with overlap on. What it reads is
    /// not touched by the password step, so the caller sends it beside the verifier query
    /// instead of adding a round trip to every sync.
    pub async fn find_leftovers(
        &self,
        client: &Client,
        guard: &mut impl Guard,
    ) -> anyhow::Result<Vec<Leftover>> {
        if self.leftovers.is_empty() {
            return Ok(Vec::new());
        }
        let (roles, twins): (Vec<&str>, Vec<&str>) = self
            .leftovers
            .iter()
            .map(|(r, t)| (r.as_str(), t.as_str()))
            .unzip();
        let marks: Vec<String> = roles.iter().map(|r| Mark::Plain.text(r)).collect();
        let retired: Vec<String> = roles.iter().map(|r| Mark::Retired.text(r)).collect();
        let params: [&(dyn ToSql + Sync); 4] = [&roles, &twins, &marks, &retired];
        let rows = guard
            .guard(
                "looking for twins left by overlap mode",
                client.query(
                    "SELECT p.role, t.rolname::text, \
                            t.rolvaliduntil IS NULL OR t.rolvaliduntil = 'infinity', \
                            coalesce(t.rolvaliduntil < now(), false), t.rolcanlogin \
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
                          AS p(role, twin, mark, retired) \
                     JOIN pg_authid r ON r.rolname = p.role \
                     JOIN pg_authid t ON t.rolname = p.twin \
                     LEFT JOIN pg_shdescription d \
                          ON d.objoid = t.oid AND d.classoid = 'pg_authid'::regclass \
                     WHERE NOT t.rolsuper AND (d.description = p.mark \
                        OR starts_with(d.description, p.mark || '; ') \
                        OR (EXISTS (SELECT 1 FROM pg_auth_members m \
                                    JOIN pg_authid g ON g.oid = m.grantor \
                                    WHERE m.roleid = r.oid AND m.member = t.oid \
                                      AND g.rolsuper) \
                            AND EXISTS (SELECT 1 FROM pg_db_role_setting s \
                                        WHERE s.setrole = t.oid AND s.setdatabase = 0 \
                                          AND ('role=' || r.rolname) = ANY (s.setconfig))))",
                    &params,
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Leftover {
                role: row.get(0),
                twin: row.get(1),
                endless: row.get(2),
                expired: row.get(3),
                can_login: row.get(4),
            })
            .collect())
    }

    /// Sets who may log in until when, after the passwords (`changed`: logins whose
    /// password this transaction set), then ends the sessions of retired logins. Overlap
    /// on, per role:
    /// - the published login never expires; but one whose `VALID UNTIL` has passed while
    ///   its password did not change was locked out by someone else, and stays so;
    /// - the other one, when its password was just set, never expires if it had expired
    ///   or had an end before (a stage: a retired login re-keyed, about to be published;
    ///   the twin's mark records it as staged); if it was staged, it expires now (a stage
    ///   rolled back, or changed again: nothing brings a retired password back);
    /// - a staged login is left alone until it is published (a pending stage keeps
    ///   `infinity`, across restarts too); any other unpublished login with no end gets
    ///   `now + grace` (it was published until now), and is otherwise left alone (grace
    ///   running or over; a twin created unpublished starts expired).
    ///
    /// Overlap off: each of `leftovers` (`find_leftovers`) gets `now + grace` if it had no
    /// end, and NOLOGIN once that has passed; never dropped (it may own objects, and
    /// dropping is the operator's call).
    pub async fn valid_until(
        &self,
        client: &Client,
        guard: &mut impl Guard,
        changed: &[&str],
        salts: &HashMap<String, Salts>,
        prepared: &Prepared,
        leftovers: &[Leftover],
    ) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        let mut grace = GraceEnd::new(self.policy.grace);
        let mut retired = Vec::new();
        if !self.pairs.is_empty() {
            let until = Until::read(client, guard, self.pairs).await?;
            for pair in self.pairs {
                let step = Step {
                    changed,
                    salts,
                    prepared,
                    until: &until,
                };
                self.pair_valid_until(
                    client,
                    guard,
                    pair,
                    step,
                    &mut grace,
                    &mut lines,
                    &mut retired,
                )
                .await?;
            }
        }
        for left in leftovers {
            retire_leftover(client, guard, left, &mut grace, &mut lines).await?;
            if left.expired {
                retired.push(left.twin.clone());
            }
        }
        lines.extend(self.end_sessions(client, guard, &retired).await?);
        Ok(lines)
    }

    /// `valid_until` for one pair; pushes the logins whose sessions are retired.
    #[allow(clippy::too_many_arguments)]
    async fn pair_valid_until(
        &self,
        client: &Client,
        guard: &mut impl Guard,
        pair: &Pair,
        step: Step<'_>,
        grace: &mut GraceEnd,
        lines: &mut Vec<String>,
        retired: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let published = pair.published_login();
        let unpublished = pair.unpublished_login();
        let (Some(p), Some(u)) = (step.until.get(published), step.until.get(unpublished)) else {
            return Ok(());
        };
        let comment = step.until.get(&pair.twin).and_then(|t| t.comment.clone());
        let mut mark = Mark::read(pair, comment.as_deref()).unwrap_or(Mark::Plain);
        let recorded = Recorded::read(comment.as_deref());
        let p_changed = new_password(pair, published, step, &recorded, lines);
        let u_changed = new_password(pair, unpublished, step, &recorded, lines);
        if p.expired && !p_changed && !self.policy.override_lockouts {
            lines.push(locked_out_line(published, "VALID UNTIL in the past"));
        } else if !p.infinity {
            set_valid_until(client, guard, published, "infinity").await?;
            lines.push(format!(
                "login {published:?}: published; valid until infinity"
            ));
        }
        if mark == Mark::Staged(published.to_owned()) {
            // The stage was published: nothing is pending any more.
            mark = Mark::Plain;
        }
        let staged = mark == Mark::Staged(unpublished.to_owned());
        if step.prepared.created.iter().any(|c| c == unpublished) {
            // Created unpublished, already expired: nothing to grace.
        } else if u_changed && !u.endless {
            set_valid_until(client, guard, unpublished, "infinity").await?;
            mark = Mark::Staged(unpublished.to_owned());
            lines.push(format!(
                "login {unpublished:?}: staged (new password, not published yet); \
                 valid until infinity"
            ));
            // Its sessions were opened with the retired password.
            retired.push(unpublished.to_owned());
        } else if u_changed && staged {
            // A stage rolled back (or changed again) before its publish: the password
            // it gets back is the retired one, which must not come back at all.
            let now = grace.now(client, guard).await?;
            set_valid_until(client, guard, unpublished, &now).await?;
            mark = Mark::Plain;
            lines.push(format!(
                "login {unpublished:?}: its stage was rolled back (new password before its \
                 publish); expired now, so a retired password never comes back"
            ));
            retired.push(unpublished.to_owned());
        } else if staged {
            // A stage waiting for its publish, however long this process has run.
        } else if u.endless {
            // Published until now (its password may have changed with the switch).
            let at = grace.end(client, guard).await?;
            set_valid_until(client, guard, unpublished, &at).await?;
            lines.push(format!(
                "login {unpublished:?}: no longer published; valid until {at}"
            ));
        } else if u.expired {
            retired.push(unpublished.to_owned());
        }
        // The mark as it now is: its state, and the salts of what the password step left.
        let text = format!(
            "{}{}",
            mark.text(&pair.role),
            recorded.after(pair, step.salts).text()
        );
        if comment.as_deref() != Some(text.as_str()) {
            comment_on(client, guard, &pair.twin, &text).await?;
        }
        Ok(())
    }

    /// Ends the client sessions of `logins` (non-superuser only; never our own), or with
    /// `end_retired_sessions` off only reports them. A login whose grace is over must not
    /// keep sessions that hold connection slots (its connection limit is its staged
    /// successor's too) or outlive the rotation that retired its password.
    async fn end_sessions(
        &self,
        client: &Client,
        guard: &mut impl Guard,
        logins: &[String],
    ) -> anyhow::Result<Vec<String>> {
        if logins.is_empty() {
            return Ok(Vec::new());
        }
        let end = self.policy.end_retired_sessions;
        let rows = guard
            .guard(
                "ending the sessions of retired logins",
                client.query(
                    "SELECT a.usename::text, a.pid, \
                            CASE WHEN $2 THEN pg_terminate_backend(a.pid) ELSE false END \
                     FROM pg_stat_activity a JOIN pg_authid r ON r.oid = a.usesysid \
                     WHERE r.rolname = ANY($1::text[]) AND NOT r.rolsuper \
                       AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid() \
                     ORDER BY 1, 2",
                    &[&logins, &end],
                ),
            )
            .await?;
        let mut by_login: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for row in &rows {
            by_login.entry(row.get(0)).or_default().push(row.get(1));
        }
        Ok(by_login
            .into_iter()
            .map(|(login, pids)| {
                let pids: Vec<String> = pids.iter().map(i32::to_string).collect();
                if end {
                    format!(
                        "login {login:?}: retired; ended its {} remaining session(s) (pid {})",
                        pids.len(),
                        pids.join(", ")
                    )
                } else {
                    format!(
                        "login {login:?}: retired; {} session(s) still open (pid {}), kept \
                         (--keep-retired-sessions)",
                        pids.len(),
                        pids.join(", ")
                    )
                }
            })
            .collect())
    }
}

/// Whether `login` of `pair` got a new password from the files in this transaction: set,
/// and not set by someone else since the sync last stored it (its salt is not the one
/// recorded), which is only restored, no new password for the `VALID UNTIL` rules.
fn new_password(
    pair: &Pair,
    login: &str,
    step: Step<'_>,
    recorded: &Recorded,
    lines: &mut Vec<String>,
) -> bool {
    let set = step.changed.contains(&login);
    let drifted = set
        && recorded.of(pair, login).is_some_and(|ours| {
            step.salts.get(login).and_then(|s| s.before.as_deref()) != Some(ours)
        });
    if drifted {
        lines.push(format!(
            "login {login:?}: its password was changed outside pg-password-sync; restored, \
             its VALID UNTIL kept"
        ));
    }
    set && !drifted
}

/// The per-statement inputs of `pair_valid_until`.
#[derive(Clone, Copy)]
struct Step<'a> {
    changed: &'a [&'a str],
    salts: &'a HashMap<String, Salts>,
    prepared: &'a Prepared,
    until: &'a Until,
}

/// Overlap off: one leftover twin's grace, then NOLOGIN (marked as ours).
async fn retire_leftover(
    client: &Client,
    guard: &mut impl Guard,
    left: &Leftover,
    grace: &mut GraceEnd,
    lines: &mut Vec<String>,
) -> anyhow::Result<()> {
    let twin = &left.twin;
    if left.endless {
        let at = grace.end(client, guard).await?;
        set_valid_until(client, guard, twin, &at).await?;
        lines.push(format!(
            "login {twin:?}: overlap mode is off; this twin is valid until {at}"
        ));
    } else if left.expired && left.can_login {
        let alter = format!("ALTER ROLE {} NOLOGIN", escape_identifier(twin));
        exec(client, guard, &alter, twin).await?;
        comment_on(client, guard, twin, &Mark::Retired.text(&left.role)).await?;
        lines.push(format!(
            "login {twin:?}: overlap mode is off and its grace is over; NOLOGIN \
             (kept, not dropped)"
        ));
    }
    Ok(())
}

fn locked_out_line(login: &str, how: &str) -> String {
    format!(
        "login {login:?}: locked out ({how}, set outside pg-password-sync); kept \
         (--override-lockouts restores it)"
    )
}

/// A twin's row, as `Catalog::read` found it.
struct TwinRow {
    oid: u32,
    superuser: bool,
    can_login: bool,
    inherit: bool,
    connlimit: i32,
    /// Attributes a twin must not have (CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS).
    extra: Vec<&'static str>,
    comment: Option<String>,
    /// A member of the role.
    member: bool,
    /// A member of the role by a superuser's grant, with the `role=<role>` setting: a twin
    /// made before the mark existed.
    made_before_mark: bool,
    /// Other roles it is a member of.
    other_roles: Vec<String>,
    /// Roles that are members of it, each with the grantor of that membership (`None`: a
    /// grantor since dropped).
    members: Vec<(String, Option<String>)>,
}

impl TwinRow {
    /// Refuses a twin that is not ours or holds more than the role (see the module
    /// comment). Nothing has been written when this refuses.
    fn check_ours(&self, pair: &Pair) -> anyhow::Result<()> {
        let (role, twin) = (&pair.role, &pair.twin);
        let marked = Mark::read(pair, self.comment.as_deref()).is_some();
        if self.superuser {
            bail!(
                "role {twin:?} is a superuser: refusing to use it as the twin login of \
                 {role:?} (choose another --twin-suffix)"
            );
        }
        if !marked && !self.made_before_mark {
            bail!(
                "role {twin:?} exists but was not created by pg-password-sync (it does not \
                 carry our mark): refusing to make it the twin of {role:?}, to grant it \
                 anything or to give it a password (rename or drop it, or choose another \
                 --twin-suffix)"
            );
        }
        if !self.extra.is_empty() {
            bail!(
                "twin login {twin:?} has {}: a twin is LOGIN INHERIT and nothing more, or \
                 it could do more than role {role:?}; refusing (remove with ALTER ROLE)",
                self.extra.join(", ")
            );
        }
        if !self.other_roles.is_empty() {
            bail!(
                "twin login {twin:?} is also a member of {:?}: it could do more than role \
                 {role:?}; refusing (REVOKE those memberships)",
                self.other_roles
            );
        }
        Ok(())
    }
}

/// A role's and its twin's rows, as `prepare` needs them.
struct Catalog {
    role_oid: u32,
    role_connlimit: i32,
    /// `None`: no role holds the twin's name.
    twin: Option<TwinRow>,
}

impl Catalog {
    /// The role's and twin's rows; `None` when the role does not exist.
    async fn read(
        client: &Client,
        guard: &mut impl Guard,
        role: &str,
        twin: &str,
    ) -> anyhow::Result<Option<Catalog>> {
        let row = guard
            .guard(
                &format!("reading role {role:?} and its twin {twin:?}"),
                client.query_opt(CATALOG_QUERY, &[&role, &twin]),
            )
            .await?;
        Ok(row.map(|row| {
            let twin = row.get::<_, Option<u32>>(2).map(|oid| {
                let extra = [
                    (7, "CREATEROLE"),
                    (8, "CREATEDB"),
                    (9, "REPLICATION"),
                    (10, "BYPASSRLS"),
                ]
                .into_iter()
                .filter(|(i, _)| row.get::<_, bool>(*i))
                .map(|(_, name)| name)
                .collect();
                TwinRow {
                    oid,
                    superuser: row.get(3),
                    can_login: row.get(4),
                    inherit: row.get(5),
                    connlimit: row.get(6),
                    extra,
                    comment: row.get(11),
                    member: row.get(12),
                    made_before_mark: row.get::<_, bool>(13) && row.get::<_, bool>(14),
                    other_roles: row.get(15),
                    members: row
                        .get::<_, Vec<String>>(16)
                        .into_iter()
                        .zip(row.get::<_, Vec<Option<String>>>(17))
                        .collect(),
                }
            });
            Catalog {
                role_oid: row.get(0),
                role_connlimit: row.get(1),
                twin,
            }
        }))
    }
}

/// `$1` the role, `$2` the twin: one row when the role exists, the twin's columns NULL
/// when no role holds its name.
const CATALOG_QUERY: &str = "\
    SELECT r.oid, r.rolconnlimit, t.oid, t.rolsuper, t.rolcanlogin, t.rolinherit, \
           t.rolconnlimit, t.rolcreaterole, t.rolcreatedb, t.rolreplication, t.rolbypassrls, \
           (SELECT d.description FROM pg_shdescription d \
            WHERE d.objoid = t.oid AND d.classoid = 'pg_authid'::regclass), \
           EXISTS (SELECT 1 FROM pg_auth_members m \
                   WHERE m.roleid = r.oid AND m.member = t.oid), \
           EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_authid g ON g.oid = m.grantor \
                   WHERE m.roleid = r.oid AND m.member = t.oid AND g.rolsuper), \
           EXISTS (SELECT 1 FROM pg_db_role_setting s \
                   WHERE s.setrole = t.oid AND s.setdatabase = 0 \
                     AND ('role=' || r.rolname) = ANY (s.setconfig)), \
           ARRAY(SELECT g.rolname::text FROM pg_auth_members m \
                 JOIN pg_authid g ON g.oid = m.roleid \
                 WHERE m.member = t.oid AND m.roleid <> r.oid ORDER BY 1), \
           ARRAY(SELECT x.rolname::text FROM pg_auth_members m \
                 JOIN pg_authid x ON x.oid = m.member \
                 WHERE m.roleid = t.oid ORDER BY m.member, m.grantor), \
           ARRAY(SELECT g.rolname::text FROM pg_auth_members m \
                 JOIN pg_authid x ON x.oid = m.member \
                 LEFT JOIN pg_authid g ON g.oid = m.grantor \
                 WHERE m.roleid = t.oid ORDER BY m.member, m.grantor) \
    FROM pg_authid r LEFT JOIN pg_authid t ON t.rolname = $2 \
    WHERE r.rolname = $1";

/// Creates `pair`'s twin, marked as ours and a member of the role. No password here: the
/// password step sets it with the other logins. A twin nobody is told to use never needs
/// to log in until it is staged, so an unpublished one starts expired.
async fn create_twin(client: &Client, guard: &mut impl Guard, pair: &Pair) -> anyhow::Result<()> {
    let (role, twin) = (&pair.role, &pair.twin);
    let expiry = if pair.published_login() == twin {
        ""
    } else {
        " VALID UNTIL '-infinity'"
    };
    let create = format!(
        "CREATE ROLE {} LOGIN INHERIT{expiry}",
        escape_identifier(twin)
    );
    exec(client, guard, &create, twin).await?;
    comment_on(client, guard, twin, &Mark::Plain.text(role)).await?;
    let grant = format!(
        "GRANT {} TO {}",
        escape_identifier(role),
        escape_identifier(twin)
    );
    exec(client, guard, &grant, twin).await
}

async fn comment_on(
    client: &Client,
    guard: &mut impl Guard,
    twin: &str,
    text: &str,
) -> anyhow::Result<()> {
    role_literal(client, guard, "COMMENT ON ROLE", twin, "IS", text).await
}

/// `<head> "login" <keyword> '<literal>'`, quoted once here, through `exec`.
async fn role_literal(
    client: &Client,
    guard: &mut impl Guard,
    head: &str,
    login: &str,
    keyword: &str,
    literal: &str,
) -> anyhow::Result<()> {
    let statement = format!(
        "{head} {} {keyword} {}",
        escape_identifier(login),
        escape_literal(literal)
    );
    exec(client, guard, &statement, login).await
}

/// Each overlapped login's `VALID UNTIL`, read once per transaction.
struct Until(BTreeMap<String, UntilRow>);

struct UntilRow {
    /// No `VALID UNTIL`, or `infinity`.
    endless: bool,
    /// Exactly `infinity`.
    infinity: bool,
    /// In the past.
    expired: bool,
    /// The comment on the login (a twin's mark).
    comment: Option<String>,
}

impl Until {
    async fn read(
        client: &Client,
        guard: &mut impl Guard,
        pairs: &[Pair],
    ) -> anyhow::Result<Until> {
        let names: Vec<&str> = pairs
            .iter()
            .flat_map(|p| [p.role.as_str(), p.twin.as_str()])
            .collect();
        let rows = guard
            .guard(
                "reading the logins' VALID UNTIL",
                client.query(
                    "SELECT a.rolname::text, \
                            a.rolvaliduntil IS NULL OR a.rolvaliduntil = 'infinity', \
                            coalesce(a.rolvaliduntil = 'infinity', false), \
                            coalesce(a.rolvaliduntil < now(), false), d.description \
                     FROM pg_authid a LEFT JOIN pg_shdescription d \
                          ON d.objoid = a.oid AND d.classoid = 'pg_authid'::regclass \
                     WHERE a.rolname = ANY($1::text[])",
                    &[&names],
                ),
            )
            .await?;
        Ok(Until(
            rows.iter()
                .map(|r| {
                    let row = UntilRow {
                        endless: r.get(1),
                        infinity: r.get(2),
                        expired: r.get(3),
                        comment: r.get(4),
                    };
                    (r.get(0), row)
                })
                .collect(),
        ))
    }

    fn get(&self, login: &str) -> Option<&UntilRow> {
        self.0.get(login)
    }
}

/// One login as the server has it now, read outside any sync (`read_logins`) for those who
/// report on the logins (`status`, the metrics); nothing here decides anything.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginFacts {
    pub login: String,
    /// Whether a role of that name exists.
    pub exists: bool,
    /// `VALID UNTIL` as Unix seconds: `+inf` for none or `infinity`, `-inf` for
    /// `-infinity` (a twin created unpublished).
    pub valid_until: f64,
    /// `VALID UNTIL` as the server writes it (`None`: no end).
    pub valid_until_text: Option<String>,
    pub can_login: bool,
    /// Client sessions open on the login.
    pub sessions: i64,
    /// The comment on the login (a twin's mark: see `staged_login`).
    pub comment: Option<String>,
}

/// What the server says of `logins`, one entry each in that order, in one catalog read
/// (no lock taken, no row written; the caller bounds the wait).
pub async fn read_logins(client: &Client, logins: &[String]) -> anyhow::Result<Vec<LoginFacts>> {
    let rows = client
        .query(
            "SELECT n.login, a.oid IS NOT NULL, \
                    CASE WHEN a.rolvaliduntil IS NULL OR a.rolvaliduntil = 'infinity' \
                              THEN 'Infinity'::float8 \
                         WHEN a.rolvaliduntil = '-infinity' THEN '-Infinity'::float8 \
                         ELSE extract(epoch FROM a.rolvaliduntil)::float8 END, \
                    a.rolvaliduntil::text, coalesce(a.rolcanlogin, false), \
                    (SELECT count(*) FROM pg_stat_activity s \
                     WHERE s.usesysid = a.oid AND s.backend_type = 'client backend'), \
                    d.description \
             FROM unnest($1::text[]) WITH ORDINALITY AS n(login, i) \
             LEFT JOIN pg_authid a ON a.rolname = n.login \
             LEFT JOIN pg_shdescription d \
                  ON d.objoid = a.oid AND d.classoid = 'pg_authid'::regclass \
             ORDER BY n.i",
            &[&logins],
        )
        .await
        .context("reading the logins' VALID UNTIL and sessions")?;
    Ok(rows
        .iter()
        .map(|row| LoginFacts {
            login: row.get(0),
            exists: row.get(1),
            valid_until: row.get(2),
            valid_until_text: row.get(3),
            can_login: row.get(4),
            sessions: row.get(5),
            comment: row.get(6),
        })
        .collect())
}

/// The login of `pair` whose stage is pending (new password, not published yet), as the
/// twin's mark says; `None` when nothing is pending or the comment is not our mark.
pub fn staged_login(pair: &Pair, twin_comment: Option<&str>) -> Option<String> {
    match Mark::read(pair, twin_comment) {
        Some(Mark::Staged(login)) => Some(login),
        _ => None,
    }
}

/// Per-database and global settings rows, sorted: (database oid, `name=value` entries).
type SettingRows = Vec<(u32, Vec<String>)>;

/// What the twin's `pg_db_role_setting` rows must be: the role's, with `role=<role>`
/// (replacing any `role=` of its own) in the global row.
fn twin_settings(role: &str, mut rows: SettingRows) -> SettingRows {
    let act_as = format!("role={role}");
    if !rows.iter().any(|(db, _)| *db == 0) {
        rows.push((0, Vec::new()));
    }
    for (db, config) in &mut rows {
        if *db == 0 {
            config.retain(|entry| !entry.starts_with("role="));
            config.push(act_as.clone());
        }
    }
    rows.sort();
    rows
}

/// Makes the twin's settings rows a copy of the role's (plus `role=`); true when written.
async fn mirror_settings(
    client: &Client,
    guard: &mut impl Guard,
    role: &str,
    role_oid: u32,
    twin_oid: u32,
) -> anyhow::Result<bool> {
    // One read of both logins' rows, in the caller's transaction like the writes below.
    let rows = guard
        .guard(
            &format!("reading the settings of role {role:?} and of its twin"),
            client.query(
                "SELECT setrole, setdatabase, setconfig FROM pg_db_role_setting \
                 WHERE setrole IN ($1, $2)",
                &[&role_oid, &twin_oid],
            ),
        )
        .await?;
    let (mut of_role, mut current) = (SettingRows::new(), SettingRows::new());
    for row in &rows {
        let entry = (
            row.get(1),
            row.get::<_, Option<Vec<String>>>(2).unwrap_or_default(),
        );
        if row.get::<_, u32>(0) == role_oid {
            of_role.push(entry);
        } else {
            current.push(entry);
        }
    }
    of_role.sort();
    current.sort();
    let wanted = twin_settings(role, of_role);
    if current == wanted {
        return Ok(false);
    }
    let what = format!("copying the settings of role {role:?} to its twin");
    guard
        .guard(
            &what,
            client.execute(
                "DELETE FROM pg_db_role_setting WHERE setrole = $1",
                &[&twin_oid],
            ),
        )
        .await?;
    for (db, config) in &wanted {
        guard
            .guard(
                &what,
                client.execute(
                    "INSERT INTO pg_db_role_setting (setdatabase, setrole, setconfig) \
                     VALUES ($1, $2, $3)",
                    &[db, &twin_oid, config],
                ),
            )
            .await?;
    }
    Ok(true)
}

/// `now() + grace` and `now()` as the server writes them, each computed once per
/// transaction. On the server: its clock is the one that enforces VALID UNTIL.
struct GraceEnd {
    grace: Duration,
    end: Option<String>,
    now: Option<String>,
}

impl GraceEnd {
    fn new(grace: Duration) -> GraceEnd {
        GraceEnd {
            grace,
            end: None,
            now: None,
        }
    }

    async fn end(&mut self, client: &Client, guard: &mut impl Guard) -> anyhow::Result<String> {
        if self.end.is_none() {
            self.end = Some(server_time(client, guard, self.grace).await?);
        }
        self.end
            .clone()
            .context("computing the end of the grace period")
    }

    async fn now(&mut self, client: &Client, guard: &mut impl Guard) -> anyhow::Result<String> {
        if self.now.is_none() {
            self.now = Some(server_time(client, guard, Duration::ZERO).await?);
        }
        self.now.clone().context("reading the server's time")
    }
}

async fn server_time(
    client: &Client,
    guard: &mut impl Guard,
    after: Duration,
) -> anyhow::Result<String> {
    let row = guard
        .guard(
            "computing the end of the grace period",
            client.query_one(
                "SELECT (now() + make_interval(secs => $1))::text",
                &[&after.as_secs_f64()],
            ),
        )
        .await?;
    Ok(row.get(0))
}

async fn set_valid_until(
    client: &Client,
    guard: &mut impl Guard,
    login: &str,
    at: &str,
) -> anyhow::Result<()> {
    role_literal(client, guard, "ALTER ROLE", login, "VALID UNTIL", at).await
}

async fn exec(
    client: &Client,
    guard: &mut impl Guard,
    statement: &str,
    login: &str,
) -> anyhow::Result<()> {
    guard
        .guard(
            &format!("updating login {login:?}"),
            client.batch_execute(statement),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretRef;

    #[test]
    fn a_mark_is_read_back_only_for_its_role_and_logins() {
        let pair = Pair::of(
            &RoleSpec {
                name: "app".into(),
                secret: SecretRef::Name("app_pw".into()),
            },
            "_alt",
        )
        .unwrap();
        for mark in [
            Mark::Plain,
            Mark::Retired,
            Mark::Staged("app".into()),
            Mark::Staged("app_alt".into()),
        ] {
            let text = mark.text("app");
            assert_eq!(Mark::read(&pair, Some(&text)), Some(mark.clone()));
            assert_eq!(Mark::read(&pair, Some(&mark.text("app2"))), None);
        }
        let foreign = Mark::Staged("mallory".into()).text("app");
        assert_eq!(Mark::read(&pair, Some(&foreign)), None);
        assert_eq!(Mark::read(&pair, Some("anything")), None);
        assert_eq!(Mark::read(&pair, None), None);
    }

    #[test]
    fn the_salts_a_mark_records_read_back_beside_its_state() {
        let pair = Pair::of(&crate::secret::test_entry("app", "").0, "_alt").unwrap();
        let recorded = Recorded {
            role: Some("c2FsdA==".into()),
            twin: None,
        };
        let text = format!(
            "{}{}",
            Mark::Staged("app_alt".into()).text("app"),
            recorded.text()
        );
        assert_eq!(Recorded::read(Some(&text)), recorded);
        assert_eq!(recorded.of(&pair, "app"), Some("c2FsdA=="));
        assert_eq!(recorded.of(&pair, "app_alt"), None);
        assert_eq!(
            Mark::read(&pair, Some(&text)),
            Some(Mark::Staged("app_alt".into()))
        );
        assert_eq!(Recorded::default().text(), "");
        assert_eq!(
            Recorded::read(Some(&Mark::Plain.text("app"))),
            Recorded::default()
        );
    }

    #[test]
    fn twin_settings_copy_the_role_and_act_as_it() {
        assert_eq!(
            twin_settings("app", Vec::new()),
            [(0, vec!["role=app".to_owned()])]
        );
        let role = vec![
            (5, vec!["work_mem=8MB".to_owned()]),
            (
                0,
                vec![
                    "search_path=\"My Schema\", public".to_owned(),
                    "role=other".to_owned(),
                ],
            ),
        ];
        assert_eq!(
            twin_settings("app", role),
            [
                (
                    0,
                    vec![
                        "search_path=\"My Schema\", public".to_owned(),
                        "role=app".to_owned()
                    ]
                ),
                (5, vec!["work_mem=8MB".to_owned()]),
            ]
        );
    }

    #[test]
    fn only_our_plain_twins_pass() {
        let ours = || TwinRow {
            oid: 1,
            superuser: false,
            can_login: true,
            inherit: true,
            connlimit: -1,
            extra: Vec::new(),
            comment: Some(Mark::Plain.text("app")),
            member: true,
            made_before_mark: false,
            other_roles: Vec::new(),
            members: Vec::new(),
        };
        let pair = Pair::of(
            &RoleSpec {
                name: "app".into(),
                secret: SecretRef::Name("app_pw".into()),
            },
            "_alt",
        )
        .unwrap();
        assert!(ours().check_ours(&pair).is_ok());
        let staged = TwinRow {
            comment: Some(Mark::Staged("app_alt".into()).text("app")),
            ..ours()
        };
        assert!(staged.check_ours(&pair).is_ok());
        let retired = TwinRow {
            comment: Some(Mark::Retired.text("app")),
            ..ours()
        };
        assert!(retired.check_ours(&pair).is_ok());
        let legacy = TwinRow {
            comment: None,
            made_before_mark: true,
            ..ours()
        };
        assert!(legacy.check_ours(&pair).is_ok());
        for (row, needle) in [
            (
                TwinRow {
                    comment: None,
                    ..ours()
                },
                "not created by pg-password-sync",
            ),
            (
                TwinRow {
                    comment: Some(Mark::Plain.text("other")),
                    ..ours()
                },
                "not created by pg-password-sync",
            ),
            (
                TwinRow {
                    extra: vec!["BYPASSRLS"],
                    ..ours()
                },
                "has BYPASSRLS",
            ),
            (
                TwinRow {
                    other_roles: vec!["pg_read_all_data".into()],
                    ..ours()
                },
                "also a member",
            ),
            (
                TwinRow {
                    superuser: true,
                    ..ours()
                },
                "is a superuser",
            ),
        ] {
            let err = row.check_ours(&pair).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("\"app_alt\""), "{err}");
        }
    }
}

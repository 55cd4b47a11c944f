//! Overlap mode inside the sync transaction: the twin logins themselves (created, repaired,
//! settings mirrored) before the passwords, and who may log in until when (`VALID UNTIL`)
//! after them, so that a publish switch and the passwords it relies on commit together.
//! Also what a sync *without* overlap does to twins an earlier overlap mode left.
//!
//! Everything here runs in the caller's transaction, after its advisory lock and with its
//! statement logging off; no statement here carries a password or verifier (the twin's
//! password is set by the ordinary password step). Every decision is derived from the files
//! and the server's catalogs, with one exception a restart can only make more cautious: a
//! long-running process leaves a pending stage alone while other files change (`settled`).
//!
//! Why a twin is `CREATE ROLE twin LOGIN INHERIT`, `GRANT role TO twin` and the per-role
//! setting `role=<role>`: the login runs `SET ROLE role` at session start, so
//! `current_user` is the role and what it creates is the role's; `RESET ROLE`,
//! `DISCARD ALL` and `RESET ALL` return to that session default (only `SET ROLE NONE`
//! returns to the twin itself, which may do no more than the role: it is only a member).
//!
//! Why the settings are copied as catalog rows (`pg_db_role_setting`) rather than re-set:
//! `ALTER ROLE twin SET x FROM CURRENT` would first run the role's values in our session,
//! and an ordinary role may set its own values (our `statement_timeout`, say);
//! `ALTER ROLE twin SET x = '<text>'` from the stored text would re-quote list settings
//! such as `search_path`. A superuser may write that catalog, and the rows are read as
//! they are at each login, so a copy is exact by construction.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::Client;

use crate::config::{Config, RoleSpec, SecretSet};
use crate::overlap::{Published, twin_login};
use crate::secret::Secret;

/// What the transaction does to logins besides their passwords.
pub struct Logins<'a> {
    /// Overlap on: each overlapped role's published login (empty when off).
    published: &'a [Published],
    /// Overlap off: (role, twin) pairs whose twin, if it looks like ours, is retired.
    leftovers: Vec<(String, String)>,
    /// Every login of the set with its password (a twin created now needs its own).
    entries: &'a [(RoleSpec, Secret)],
    /// Unpublished logins this process applied last time with the same password and the
    /// same published login beside them: nothing happened to them since, so their
    /// `VALID UNTIL` is left as the last sync set it (a pending stage keeps `infinity`).
    settled: Vec<String>,
    grace: Duration,
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
    twin: String,
    /// No `VALID UNTIL`, or `infinity`.
    endless: bool,
    /// Its `VALID UNTIL` has passed.
    expired: bool,
    can_login: bool,
}

/// A twin's and its role's rows, as `prepare` needs them.
struct PairState {
    role_oid: u32,
    role_connlimit: i32,
    twin_oid: Option<u32>,
    twin_super: bool,
    twin_login: bool,
    twin_inherit: bool,
    twin_connlimit: i32,
    member: bool,
    acts_as_role: bool,
}

impl<'a> Logins<'a> {
    /// What the transaction does for `set`; `last` is the set this process applied last
    /// (`None` after a start: everything is then derived from the server alone).
    pub fn new(config: &Config, set: &'a SecretSet, last: Option<&SecretSet>) -> Logins<'a> {
        let leftovers = match &config.overlap {
            Some(_) => Vec::new(),
            // A twin name that would not fit cannot have been made by overlap mode.
            None => config
                .roles
                .iter()
                .filter(|r| r.name != config.superuser)
                .filter_map(|r| {
                    twin_login(&r.name, &config.twin_suffix)
                        .ok()
                        .map(|t| (r.name.clone(), t))
                })
                .collect(),
        };
        Logins {
            published: &set.published,
            leftovers,
            entries: &set.entries,
            settled: last.map_or_else(Vec::new, |last| settled(last, set)),
            grace: config.grace,
        }
    }

    /// Creates missing twins and repairs existing ones (membership, `role` setting, LOGIN,
    /// INHERIT), mirrors each role's settings and connection limit onto its twin. Refuses a
    /// twin name held by a superuser or by a role that is not ours.
    pub async fn prepare(
        &self,
        client: &Client,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<Prepared> {
        let mut prepared = Prepared::default();
        for pair in self.published {
            let (role, twin) = (&pair.role, &pair.twin);
            let Some(mut state) = pair_state(client, role, twin).await? else {
                // The role is missing (reported by the password step): leave its twin.
                prepared.orphaned.push(twin.clone());
                continue;
            };
            let mut created = false;
            if state.twin_oid.is_none() {
                // No password here: the password step sets it with the other logins. A
                // twin nobody is told to use never needs to log in until it is staged.
                let expiry = if pair.login == *twin {
                    ""
                } else {
                    " VALID UNTIL '-infinity'"
                };
                exec(
                    client,
                    &format!(
                        "CREATE ROLE {} LOGIN INHERIT{expiry}",
                        escape_identifier(twin)
                    ),
                    twin,
                )
                .await?;
                lines.push(format!(
                    "login {twin:?}: created as the twin of role {role:?}"
                ));
                prepared.created.push(twin.clone());
                created = true;
                state = pair_state(client, role, twin)
                    .await?
                    .context("reading the twin just created")?;
            }
            let twin_oid = state.twin_oid.context("reading the twin's oid")?;
            if state.twin_super {
                bail!(
                    "role {twin:?} is a superuser: refusing to use it as the twin login of \
                     {role:?} (choose another --twin-suffix)"
                );
            }
            if !created && !state.member && !state.acts_as_role {
                bail!(
                    "role {twin:?} exists but is not a twin of {role:?} (not a member of it, \
                     not set to act as it): refusing to give it a password (rename it or \
                     choose another --twin-suffix)"
                );
            }
            let mut repairs = Vec::new();
            if !state.member {
                let grant = format!(
                    "GRANT {} TO {}",
                    escape_identifier(role),
                    escape_identifier(twin)
                );
                exec(client, &grant, twin).await?;
                repairs.push("member of the role");
            }
            if !state.twin_inherit || !state.twin_login {
                let alter = format!("ALTER ROLE {} LOGIN INHERIT", escape_identifier(twin));
                exec(client, &alter, twin).await?;
                repairs.push("LOGIN INHERIT");
            }
            if state.twin_connlimit != state.role_connlimit {
                let alter = format!(
                    "ALTER ROLE {} CONNECTION LIMIT {}",
                    escape_identifier(twin),
                    state.role_connlimit
                );
                exec(client, &alter, twin).await?;
                repairs.push("connection limit");
            }
            if mirror_settings(client, role, state.role_oid, twin_oid).await? {
                repairs.push("settings");
            }
            if !created && !repairs.is_empty() {
                lines.push(format!(
                    "login {twin:?}: brought in line with role {role:?} ({})",
                    repairs.join(", ")
                ));
            }
        }
        Ok(prepared)
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

    /// Overlap off: the twins an earlier overlap mode left that look like ours (a member of
    /// their role, set to act as it, not a superuser), for `valid_until`. Nothing is read
    /// with overlap on. What it reads is not touched by the password step, so the caller
    /// sends it beside the verifier query instead of adding a round trip to every sync.
    pub async fn find_leftovers(&self, client: &Client) -> anyhow::Result<Vec<Leftover>> {
        if self.leftovers.is_empty() {
            return Ok(Vec::new());
        }
        let (roles, twins): (Vec<&str>, Vec<&str>) = self
            .leftovers
            .iter()
            .map(|(r, t)| (r.as_str(), t.as_str()))
            .unzip();
        let rows = client
            .query(
                "SELECT t.rolname::text, \
                        t.rolvaliduntil IS NULL OR t.rolvaliduntil = 'infinity', \
                        coalesce(t.rolvaliduntil < now(), false), t.rolcanlogin \
                 FROM unnest($1::text[], $2::text[]) AS p(role, twin) \
                 JOIN pg_authid r ON r.rolname = p.role \
                 JOIN pg_authid t ON t.rolname = p.twin \
                 WHERE NOT t.rolsuper \
                   AND EXISTS (SELECT 1 FROM pg_auth_members m \
                               WHERE m.roleid = r.oid AND m.member = t.oid) \
                   AND EXISTS (SELECT 1 FROM pg_db_role_setting s \
                               WHERE s.setrole = t.oid AND s.setdatabase = 0 \
                                 AND ('role=' || r.rolname) = ANY (s.setconfig))",
                &[&roles, &twins],
            )
            .await
            .context("looking for twins left by overlap mode")?;
        Ok(rows
            .iter()
            .map(|row| Leftover {
                twin: row.get(0),
                endless: row.get(1),
                expired: row.get(2),
                can_login: row.get(3),
            })
            .collect())
    }

    /// Sets who may log in until when, after the passwords (`changed`: logins whose
    /// password this transaction set). Overlap on, per role:
    /// - the published login never expires;
    /// - the other one, when its password was just set, never expires if it had expired
    ///   or had an end before (a stage: a retired login re-keyed, about to be published);
    ///   if it had no end it gets `now + grace` (a stage rolled back from its backup, or a
    ///   pending stage changed again: nothing must bring a retired password back for good);
    /// - when its password was not set, it is left alone if this process applied it last
    ///   time beside the same published login (`settled`: a pending stage keeps
    ///   `infinity`), gets `now + grace` when it had no end (it was published until now),
    ///   and is otherwise left alone (grace running or over; a twin created unpublished
    ///   starts expired).
    ///
    /// Overlap off: each of `leftovers` (`find_leftovers`) gets `now + grace` if it had no
    /// end, and NOLOGIN once that has passed; never dropped (it may own objects, and
    /// dropping is the operator's call).
    pub async fn valid_until(
        &self,
        client: &Client,
        changed: &[&str],
        prepared: &Prepared,
        leftovers: &[Leftover],
    ) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        let mut grace_until: Option<String> = None;
        if !self.published.is_empty() {
            let names: Vec<&str> = self
                .published
                .iter()
                .flat_map(|p| [p.role.as_str(), p.twin.as_str()])
                .collect();
            let rows = client
                .query(
                    "SELECT rolname::text, rolvaliduntil IS NULL OR rolvaliduntil = 'infinity', \
                     rolvaliduntil = 'infinity' FROM pg_authid WHERE rolname = ANY($1::text[])",
                    &[&names],
                )
                .await
                .context("reading the logins' VALID UNTIL")?;
            // login → (never expires, exactly 'infinity')
            let until: BTreeMap<String, (bool, bool)> = rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        (r.get(1), r.get::<_, Option<bool>>(2) == Some(true)),
                    )
                })
                .collect();
            for pair in self.published {
                let published = pair.login.as_str();
                let unpublished = pair.unpublished();
                let (Some(p), Some(u)) = (until.get(published), until.get(unpublished)) else {
                    continue;
                };
                if !p.1 {
                    set_valid_until(client, published, "infinity").await?;
                    lines.push(format!(
                        "login {published:?}: published; valid until infinity"
                    ));
                }
                if prepared.created.iter().any(|c| c == unpublished) {
                    // Created unpublished, already expired: nothing to grace.
                } else if changed.contains(&unpublished) && !u.0 {
                    set_valid_until(client, unpublished, "infinity").await?;
                    lines.push(format!(
                        "login {unpublished:?}: staged (new password, not published yet); \
                         valid until infinity"
                    ));
                } else if changed.contains(&unpublished) {
                    let at = grace_end(client, self.grace, &mut grace_until).await?;
                    set_valid_until(client, unpublished, &at).await?;
                    lines.push(format!(
                        "login {unpublished:?}: new password while it never expired (a stage \
                         rolled back or changed again); valid until {at}"
                    ));
                } else if self.settled.iter().any(|l| l == unpublished) {
                    // Nothing happened to it since the last sync of this process.
                } else if u.0 {
                    let at = grace_end(client, self.grace, &mut grace_until).await?;
                    set_valid_until(client, unpublished, &at).await?;
                    lines.push(format!(
                        "login {unpublished:?}: no longer published; valid until {at}"
                    ));
                }
            }
        }
        for left in leftovers {
            let twin = &left.twin;
            if left.endless {
                let at = grace_end(client, self.grace, &mut grace_until).await?;
                set_valid_until(client, twin, &at).await?;
                lines.push(format!(
                    "login {twin:?}: overlap mode is off; this twin is valid until {at}"
                ));
            } else if left.expired && left.can_login {
                let alter = format!("ALTER ROLE {} NOLOGIN", escape_identifier(twin));
                exec(client, &alter, twin).await?;
                lines.push(format!(
                    "login {twin:?}: overlap mode is off and its grace is over; NOLOGIN \
                     (kept, not dropped)"
                ));
            }
        }
        Ok(lines)
    }
}

/// The unpublished logins of `set` that `last` already had, unpublished beside the same
/// published login and with the same password.
fn settled(last: &SecretSet, set: &SecretSet) -> Vec<String> {
    let password = |s: &SecretSet, login: &str| {
        s.entries
            .iter()
            .find(|(spec, _)| spec.name == login)
            .map(|(_, secret)| secret.clone())
    };
    set.published
        .iter()
        .filter(|p| last.published.contains(p))
        .map(Published::unpublished)
        .filter(|u| password(last, u).is_some() && password(last, u) == password(set, u))
        .map(str::to_owned)
        .collect()
}

/// The role's and twin's catalog rows; `None` when the role does not exist.
async fn pair_state(client: &Client, role: &str, twin: &str) -> anyhow::Result<Option<PairState>> {
    let row = client
        .query_opt(
            "SELECT r.oid, r.rolconnlimit, t.oid, t.rolsuper, t.rolcanlogin, t.rolinherit, \
                    t.rolconnlimit, \
                    EXISTS (SELECT 1 FROM pg_auth_members m \
                            WHERE m.roleid = r.oid AND m.member = t.oid), \
                    EXISTS (SELECT 1 FROM pg_db_role_setting s \
                            WHERE s.setrole = t.oid AND s.setdatabase = 0 \
                              AND ('role=' || r.rolname) = ANY (s.setconfig)) \
             FROM pg_authid r LEFT JOIN pg_authid t ON t.rolname = $2 \
             WHERE r.rolname = $1",
            &[&role, &twin],
        )
        .await
        .with_context(|| format!("reading role {role:?} and its twin {twin:?}"))?;
    Ok(row.map(|row| PairState {
        role_oid: row.get(0),
        role_connlimit: row.get(1),
        twin_oid: row.get(2),
        twin_super: row.get::<_, Option<bool>>(3).unwrap_or(false),
        twin_login: row.get::<_, Option<bool>>(4).unwrap_or(false),
        twin_inherit: row.get::<_, Option<bool>>(5).unwrap_or(false),
        twin_connlimit: row.get::<_, Option<i32>>(6).unwrap_or(-1),
        member: row.get(7),
        acts_as_role: row.get(8),
    }))
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
    role: &str,
    role_oid: u32,
    twin_oid: u32,
) -> anyhow::Result<bool> {
    // One read of both logins' rows, in the caller's transaction like the writes below.
    let rows = client
        .query(
            "SELECT setrole, setdatabase, setconfig FROM pg_db_role_setting \
             WHERE setrole IN ($1, $2)",
            &[&role_oid, &twin_oid],
        )
        .await
        .with_context(|| format!("reading the settings of role {role:?} and of its twin"))?;
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
    client
        .execute(
            "DELETE FROM pg_db_role_setting WHERE setrole = $1",
            &[&twin_oid],
        )
        .await
        .with_context(|| format!("replacing the settings of the twin of {role:?}"))?;
    for (db, config) in &wanted {
        client
            .execute(
                "INSERT INTO pg_db_role_setting (setdatabase, setrole, setconfig) \
                 VALUES ($1, $2, $3)",
                &[db, &twin_oid, config],
            )
            .await
            .with_context(|| format!("copying the settings of role {role:?} to its twin"))?;
    }
    Ok(true)
}

/// `now() + grace` as the server writes it, computed once per transaction.
async fn grace_end(
    client: &Client,
    grace: Duration,
    cache: &mut Option<String>,
) -> anyhow::Result<String> {
    if let Some(at) = cache {
        return Ok(at.clone());
    }
    // On the server: its clock is the one that enforces VALID UNTIL.
    let at: String = client
        .query_one(
            "SELECT (now() + make_interval(secs => $1))::text",
            &[&grace.as_secs_f64()],
        )
        .await
        .context("computing the end of the grace period")?
        .get(0);
    *cache = Some(at.clone());
    Ok(at)
}

async fn set_valid_until(client: &Client, login: &str, at: &str) -> anyhow::Result<()> {
    let alter = format!(
        "ALTER ROLE {} VALID UNTIL {}",
        escape_identifier(login),
        escape_literal(at)
    );
    exec(client, &alter, login).await
}

async fn exec(client: &Client, statement: &str, login: &str) -> anyhow::Result<()> {
    client
        .batch_execute(statement)
        .await
        .with_context(|| format!("updating login {login:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretRef;

    fn set(app: &str, app_alt: &str, published: &str) -> SecretSet {
        let entry = |name: &str, value: &str| {
            (
                RoleSpec {
                    name: name.into(),
                    secret: SecretRef::Name(format!("{name}_pw")),
                },
                Secret::new(value.into()),
            )
        };
        SecretSet {
            entries: vec![entry("app", app), entry("app_alt", app_alt)],
            published: vec![Published {
                role: "app".into(),
                twin: "app_alt".into(),
                login: published.into(),
            }],
        }
    }

    #[test]
    fn an_unpublished_login_is_settled_only_when_nothing_happened_to_it() {
        let last = set("a", "b", "app");
        assert_eq!(settled(&last, &set("a", "b", "app")), ["app_alt"]);
        // Another role's file changed: still settled.
        assert_eq!(settled(&last, &set("a2", "b", "app")), ["app_alt"]);
        // Its own password changed, or the published login switched: not settled.
        assert!(settled(&last, &set("a", "b2", "app")).is_empty());
        assert!(settled(&last, &set("a", "b", "app_alt")).is_empty());
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
}

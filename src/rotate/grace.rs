//! Stage 1 of a rotation: ask the server whether a login about to be re-keyed may still
//! be in use. The answer is its `VALID UNTIL`, which the sync sets when the login stops
//! being published and which the server compares with its own clock: no state of ours.
//! Asked as the superuser only, in the one pinned superuser session (`session::superuser`):
//! an application's login, or a session the application's database could steer, would
//! let the application answer for itself. The sessions still open on a login about to be
//! re-keyed are reported (the sync ends them when it applies the stage).

use anyhow::Context;

use super::set::RoleSet;
use crate::config::Config;
use crate::error::Failure;
use crate::session::{self, connect};

/// What the server says about a login that would be re-keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LoginState {
    /// No such role yet: the sync with `--overlap` has not created the twin (or the role
    /// does not exist). Nothing uses it, but nothing could be staged on it either: the
    /// sync creates an unpublished twin expired, from whatever its file holds then.
    Missing,
    /// `VALID UNTIL` in the past (or `-infinity`: a twin that was never published).
    Expired,
    /// No `VALID UNTIL`, or `infinity`: published until now, or the server has not yet
    /// seen the publish that retired it, so applications may still be using it.
    Open,
    /// Grace period running until this time (server's text form).
    Until(String),
}

/// Why a login may not be re-keyed now, if it may not (`--force` overrides these).
fn refusal(login: &str, state: &LoginState) -> Option<String> {
    match state {
        LoginState::Missing | LoginState::Expired => None,
        LoginState::Open => Some(format!(
            "login {login:?} has no expiry on the server: it is still published there (the \
             sync has not applied the last publish yet), or a rolled-back stage left it open \
             until the sync's next pass starts its grace period; applications may be using it"
        )),
        LoginState::Until(until) => Some(format!(
            "login {login:?} is inside its grace period until {until}: applications may \
             still be using it"
        )),
    }
}

/// Why a login can never be re-keyed now, even with `--force`: the server does not have
/// it. The sync would create it from the staged file as an unpublished twin, which starts
/// expired, so the stage could never log in; and the rollback of that stage would reach
/// the sync as a change of an expired login's password, a new stage of a value nobody
/// staged, which the sync opens for good.
fn missing(login: &str, state: &LoginState) -> Option<String> {
    (*state == LoginState::Missing).then(|| {
        format!(
            "login {login:?} does not exist on the server: the sync with --overlap has not \
             created it yet (or its role is missing), and a login it creates from a staged \
             file could not log in; run the sync with --overlap first"
        )
    })
}

/// Stage 1: refuses when a login to re-key may still be in use, unless `force`, and when
/// the server does not have it yet, whatever `force` says.
pub(super) async fn check_grace(config: &Config, set: &RoleSet, force: bool) -> anyhow::Result<()> {
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
    let missing: Vec<String> = logins
        .iter()
        .zip(&states)
        .filter_map(|(login, state)| missing(login, state))
        .collect();
    if !missing.is_empty() {
        return Err(anyhow::anyhow!(
            "{}; nothing was written",
            missing.join("; ")
        ))
        .context(Failure::Config);
    }
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
    .context(Failure::TryLater)
}

/// Reads `rolvaliduntil` of `logins` and how many client sessions each has open, as the
/// superuser; prints the sessions.
async fn login_states(
    config: &Config,
    set: &RoleSet,
    logins: &[String],
) -> anyhow::Result<Vec<LoginState>> {
    let Some(password) = &set.superuser_password else {
        return Err(anyhow::anyhow!(
            "no password file for the superuser {:?} in the secrets directory: rotate asks \
             the server as the superuser only",
            set.superuser
        ))
        .context(Failure::Connect);
    };
    let client = session::superuser(config, &[(password, "superuser password file")], None)
        .await
        .with_context(|| format!("logging in at {}", connect::describe(config)))?;
    // Compared on the server, with its clock: the grace deadline was set by its clock too.
    // Bounded like a connect: a superuser's lock on pg_authid would otherwise hold this
    // read, and with it the lock on the secrets directory, for as long as it lasts.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&logins];
    let query = client.query(
        "SELECT r.rolname::text, \
                (r.rolvaliduntil IS NULL OR r.rolvaliduntil = 'infinity') AS open, \
                coalesce(r.rolvaliduntil > now(), false) AS running, \
                coalesce(r.rolvaliduntil::text, '') AS until, \
                (SELECT count(*) FROM pg_stat_activity a \
                 WHERE a.usesysid = r.oid AND a.backend_type = 'client backend') AS sessions \
           FROM pg_authid r WHERE r.rolname = ANY($1::text[])",
        &params,
    );
    let rows = tokio::time::timeout(config.connection.connect_timeout, query)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer within {:?} (a lock on pg_authid?)",
                config.connection.connect_timeout
            )
        })
        .and_then(|rows| rows.map_err(anyhow::Error::from))
        .context("reading the logins' VALID UNTIL and sessions")
        .context(Failure::Sql)?;
    for row in &rows {
        let sessions: i64 = row.get(4);
        if sessions > 0 {
            println!(
                "login {:?}: {sessions} session(s) still open on it, opened with its \
                 retired password; the sync ends them when it applies the stage",
                row.get::<_, String>(0)
            );
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_or_expired_logins_may_be_rekeyed() {
        assert_eq!(refusal("a", &LoginState::Missing), None);
        let missing = missing("a_alt", &LoginState::Missing).unwrap();
        assert!(missing.contains("sync with --overlap first"), "{missing}");
        assert_eq!(super::missing("a_alt", &LoginState::Expired), None);
        assert_eq!(refusal("a", &LoginState::Expired), None);
        let open = refusal("a_alt", &LoginState::Open).unwrap();
        assert!(open.contains("still published"), "{open}");
        let until = refusal("a", &LoginState::Until("2026-01-01 00:00:00+00".into())).unwrap();
        assert!(until.contains("grace period until 2026-01-01"), "{until}");
    }
}

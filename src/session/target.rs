//! Which server of a list a session may use: libpq's `target_session_attrs`, for the
//! superuser's session (`session::superuser`) and for `verify`'s and `rotate`'s logins.
//!
//! libpq tries the hosts of `PGHOST` in order and keeps the first whose session is the kind
//! asked for: `any` takes the first that answers; `read-write` the first whose session
//! accepts writes by default; `primary` the first that is not in recovery. It asks the
//! server as cheaply as it can: from PostgreSQL 14 on the server reports `in_hot_standby`
//! and `default_transaction_read_only` at startup, and no statement is needed; before
//! that, one (`SHOW transaction_read_only`, or `SELECT pg_is_in_recovery()`). A login's
//! check here is exactly that (`check_login`): what an application with the same settings
//! gets. The superuser's session differs in one point (`check_pinned`): it is checked after
//! it has been pinned (`session`), which resets `default_transaction_read_only`, so a
//! database owner's `ALTER DATABASE … SET default_transaction_read_only = on` cannot make
//! the primary look unusable to the sync; for it `read-write` and `primary` both mean "not
//! in recovery".

use std::fmt;
use std::time::Duration;

use anyhow::Context;

use super::connect::Connected;
use crate::config::TargetSession;

/// Why a server was passed over, or `None` when it is the kind asked for.
pub type Verdict = Option<&'static str>;

const STANDBY: &str = "a standby (in recovery)";
const READ_ONLY: &str = "its sessions are read-only by default";

/// libpq's check of a login's session (`verify`, `rotate`): the reported parameters when
/// the server gave them, else one statement, bounded by `limit`.
pub async fn check_login(
    connected: &Connected,
    target: TargetSession,
    limit: Duration,
) -> anyhow::Result<Verdict> {
    match target {
        TargetSession::Any => Ok(None),
        TargetSession::Primary => primary(connected, limit).await,
        TargetSession::ReadWrite => {
            if let (Some(standby), Some(read_only)) =
                (connected.in_hot_standby, connected.default_read_only)
            {
                return Ok(if standby {
                    Some(STANDBY)
                } else {
                    read_only.then_some(READ_ONLY)
                });
            }
            let read_only = ask(connected, "SHOW transaction_read_only", limit).await?;
            Ok((read_only == "on").then_some(READ_ONLY))
        }
    }
}

/// The check of a pinned superuser session: not in recovery, for both `read-write` and
/// `primary` (the pinning reset the session's read-only default).
pub async fn check_pinned(
    connected: &Connected,
    target: TargetSession,
    limit: Duration,
) -> anyhow::Result<Verdict> {
    match target {
        TargetSession::Any => Ok(None),
        TargetSession::ReadWrite | TargetSession::Primary => primary(connected, limit).await,
    }
}

async fn primary(connected: &Connected, limit: Duration) -> anyhow::Result<Verdict> {
    let standby = match connected.in_hot_standby {
        Some(standby) => standby,
        None => {
            ask(
                connected,
                "SELECT pg_catalog.pg_is_in_recovery()::text",
                limit,
            )
            .await?
                == "true"
        }
    };
    Ok(standby.then_some(STANDBY))
}

/// One statement's single text value, bounded by `limit`.
async fn ask(connected: &Connected, query: &str, limit: Duration) -> anyhow::Result<String> {
    let rows = tokio::time::timeout(limit, connected.client.simple_query(query))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {limit:?}"))
        .and_then(|rows| rows.map_err(anyhow::Error::from))
        .with_context(|| format!("asking the server what it is ({query})"))?;
    rows.iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .with_context(|| format!("no answer to {query}"))
}

/// No server of the list is the kind asked for. `standbys` of them answered as standbys
/// (or read-only); the others could not be reached. With at least one standby this is a
/// cluster between leaders (a failover) as far as the sync can tell.
#[derive(Debug)]
pub struct NoTarget {
    pub target: TargetSession,
    pub standbys: usize,
    /// One line per server: where, and why it was passed over.
    pub reasons: Vec<String>,
}

impl fmt::Display for NoTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no server accepts {} sessions (target_session_attrs): {}",
            self.target.as_str(),
            self.reasons.join("; ")
        )
    }
}

impl std::error::Error for NoTarget {}

/// Whether `err` says that every server that answered is a standby (at least one did).
pub fn only_standbys(err: &anyhow::Error) -> bool {
    err.downcast_ref::<NoTarget>()
        .is_some_and(|no| no.standbys > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Failure;

    #[test]
    fn only_standbys_is_found_under_the_context_callers_add() {
        let no = |standbys| NoTarget {
            target: TargetSession::ReadWrite,
            standbys,
            reasons: vec!["127.0.0.1:5432: a standby (in recovery)".into()],
        };
        let err = anyhow::Error::new(no(1))
            .context(Failure::Connect)
            .context("syncing");
        assert!(only_standbys(&err));
        assert!(format!("{err:#}").contains("no server accepts read-write sessions"));
        // None answered: no server at all, not a cluster between leaders.
        assert!(!only_standbys(&anyhow::Error::new(no(0))));
        assert!(!only_standbys(&anyhow::anyhow!("refused")));
    }
}

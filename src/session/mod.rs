//! Sessions with the server: how to connect (`connect`), the one way to open a superuser
//! session (`superuser`), which server of a list to use (`target`), and the watchdog that
//! bounds every wait of the sync's statements on other sessions (`locks`).
//!
//! Every command that talks to the server as the superuser (`sync`, `run`, `watch`,
//! `rotate`) opens its session here, and the session is pinned before its first statement
//! runs: the database it connects to may be owned by an ordinary login (a `PGDATABASE`
//! naming the application's database), and a database's owner can attach settings to it
//! that every session there starts with (`ALTER DATABASE … SET`): a `search_path` naming
//! one of its schemas before `pg_catalog` would make our unqualified `now()`,
//! `pg_authid`, `pg_blocking_pids()` … resolve to its functions and views, run with
//! superuser rights; a `role` would run the whole session as that login; a read-only
//! default or tiny timeouts would make every statement fail; a `repeatable read` default
//! would hide what changed while the sync waited for its lock.

pub mod auth_watch;
pub mod connect;
pub mod locks;
pub mod target;

use anyhow::Context;
use tokio_postgres::Client;

use crate::config::{Config, Server};
use crate::error::Failure;
use crate::secret::Secret;
use connect::Auth;
use target::NoTarget;

/// Sent first on every superuser session, before any other statement. A single cheap
/// statement, fully qualified (the search path is not pinned yet; `IS NOT NULL` is no
/// operator that could be looked up), that clears `transaction_timeout` (17+) where it
/// exists: it goes alone because a multi-statement message is one transaction, which a
/// `transaction_timeout` of a millisecond would end, with the connection.
const PIN_FIRST: &str = "\
    SELECT pg_catalog.set_config('transaction_timeout', '0', false) \
    WHERE pg_catalog.current_setting('transaction_timeout', true) IS NOT NULL";

/// Then the rest: the search path is set to the catalog alone (`pg_temp` named last, so no
/// temporary relation comes first), `SET ROLE NONE` returns to the login's own role
/// (`RESET ROLE` would return to the database's setting), and read-only is turned off (the
/// timeouts that could stop a statement were cleared in the startup packet,
/// `connect::STARTUP_OPTIONS`; the sync's own bounds come later, with `SET LOCAL`).
/// Each statement sees what others committed before it (`read committed`): a
/// `repeatable read` default would keep the catalog as it was when a transaction began,
/// before the sync's lock was granted, hiding what a session that held the lock changed.
/// Statement logging is left to the transaction that sends something worth hiding
/// (`sync::sql::QUIET_SETTINGS`): nothing else a superuser session sends carries a secret.
const PINNED_SESSION: &str = "\
    SET search_path = pg_catalog, pg_temp; SET ROLE NONE; \
    SET default_transaction_read_only = off; \
    SET default_transaction_isolation = 'read committed'";

/// Opens a superuser session on `config`'s server (`dbname`: another database of it),
/// trying the OS identity first, then each password in turn, and pins it before anything
/// else runs. With a list of servers, each in order until one is the kind
/// `PGTARGETSESSIONATTRS` asks for (`target`). Errors are `Failure::Connect` (no way in,
/// or `NoTarget`: no server of the kind) or, with one server, `Failure::Sql` (pinning
/// failed).
pub async fn superuser(
    config: &Config,
    passwords: &[(&Secret, &'static str)],
    dbname: Option<String>,
) -> anyhow::Result<Client> {
    let mut methods = vec![Auth::Identity];
    methods.extend(
        passwords
            .iter()
            .map(|(secret, label)| Auth::Password(secret, label)),
    );
    let mut other;
    let config = match dbname {
        Some(dbname) => {
            other = config.clone();
            other.connection.dbname = dbname;
            &other
        }
        None => config,
    };
    let mut passed_over = NoTarget {
        target: config.connection.target,
        standbys: 0,
        reasons: Vec::new(),
    };
    for server in &config.connection.servers {
        let shown = connect::describe_server(server);
        match pinned(config, server, &methods).await {
            Ok((client, None)) => return Ok(client),
            Ok((_, Some(why))) => {
                passed_over.standbys += 1;
                passed_over.reasons.push(format!("{shown}: {why}"));
            }
            // One server: its own error, classified as it was.
            Err(err) if config.connection.servers.len() == 1 => return Err(err),
            Err(err) => passed_over
                .reasons
                .push(format!("{shown}: {}", unclassed(&err))),
        }
    }
    Err(anyhow::Error::new(passed_over)).context(Failure::Connect)
}

/// An error's chain without its failure class (the whole list gets one).
fn unclassed(err: &anyhow::Error) -> String {
    let classes = [Failure::Connect.to_string(), Failure::Sql.to_string()];
    let causes: Vec<String> = err
        .chain()
        .map(ToString::to_string)
        .filter(|cause| !classes.contains(cause))
        .collect();
    causes.join(": ")
}

/// A pinned superuser session on `server`, and why it is not the kind asked for (`None`:
/// it is).
async fn pinned(
    config: &Config,
    server: &Server,
    methods: &[Auth<'_>],
) -> anyhow::Result<(Client, target::Verdict)> {
    let connected = connect::connect_any(config, server, &config.superuser, methods).await?;
    for statement in [PIN_FIRST, PINNED_SESSION] {
        connected
            .client
            .batch_execute(statement)
            .await
            .context("pinning the search path, role and timeouts of the session")
            .context(Failure::Sql)?;
    }
    let verdict = target::check_pinned(
        &connected,
        config.connection.target,
        config.connection.connect_timeout,
    )
    .await
    .context(Failure::Sql)?;
    if let Some(why) = verdict {
        tracing::debug!(server = %connect::describe_server(server), why, "passed over");
    }
    Ok((connected.client, verdict))
}

//! The SQL text the sync sends, built in one place so quoting is reviewed once.
//!
//! `ALTER ROLE … PASSWORD $1` is a syntax error (utility statements take no bind
//! parameters), so the statement is built as text: the role name through
//! `escape_identifier` (quotes, spaces, upper case and unicode all survive) and the
//! verifier through `escape_literal`. Only verifiers ever reach this function.

use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::session::locks::SYNCHRONOUS_COMMIT_LOCAL;

/// Key of the transaction-scoped advisory lock that serialises concurrent syncs
/// (`run`'s watcher and a `docker exec … sync` racing on the same roles).
pub const ADVISORY_LOCK_KEY: i64 = 0x7067_7077_7379_6e63; // "pgpwsync"

/// Settings made first in the sync transaction, in a message of their own, so they are in
/// force before the `ALTER ROLE` statements are received. They keep those statements (which
/// carry verifiers, never plaintext) out of the server log and statistics:
/// `log_statement` would print them, `log_min_error_statement` a failing one in full,
/// `log_min_duration_statement` / `log_min_duration_sample` a slow one, the `debug_print_*`
/// settings their parse trees, and `pg_stat_statements` would keep their text.
/// Setting a `pg_stat_statements.*` name is harmless when the module is not loaded.
/// `track_activities = off` keeps the statement text out of this backend's
/// `pg_stat_activity` entry, which is where the server's deadlock report takes the
/// `Process N: <query>` lines it logs for every member of the cycle (no log setting
/// reaches those), and where other superusers could read it.
pub const QUIET_SETTINGS: [&str; 9] = [
    "SET LOCAL log_statement = 'none'",
    "SET LOCAL log_min_error_statement = 'panic'",
    "SET LOCAL log_min_duration_statement = -1",
    "SET LOCAL log_min_duration_sample = -1",
    "SET LOCAL debug_print_parse = off",
    "SET LOCAL debug_print_rewritten = off",
    "SET LOCAL debug_print_plan = off",
    "SET LOCAL pg_stat_statements.track_utility = off",
    "SET LOCAL track_activities = off",
];

/// The server-side bounds of the sync transaction (sent with `QUIET_SETTINGS`, before the
/// first lock is requested, since a wait reads them when it starts):
/// `lock_timeout` and `statement_timeout` end any wait the client-side watchdog
/// (`locks`) could not end itself, for instance when it cannot open its second
/// connection; a `deadlock_timeout` longer than every wait of ours means that in a
/// deadlock the *other* session runs the check first and is the one rolled back.
/// The COMMIT is the one wait no timeout reaches: with `synchronous_standby_names` set it
/// waits, unbounded and invisible to others, for a standby to confirm, and a standby that
/// is down (or a REPLICATION login posing as one that never confirms) would hold the
/// rotation forever. `SYNCHRONOUS_COMMIT_LOCAL` lets it return once the change is durable
/// on this server; standbys receive it like any other write, and a standby promoted
/// before it arrived checks every role on promotion (the watch loop's failover path).
pub fn bounds(lock_timeout: Duration) -> [String; 4] {
    let ms = lock_timeout.as_millis();
    [
        format!("SET LOCAL lock_timeout = {ms}"),
        // A little more than the lock wait, so a lock wait reports itself as one.
        format!("SET LOCAL statement_timeout = {}", ms + 1_000),
        format!("SET LOCAL deadlock_timeout = {}", ms + 2_000),
        format!("SET LOCAL {SYNCHRONOUS_COMMIT_LOCAL}"),
    ]
}

/// Sent before `BEGIN`: whether a whole transaction is sampled for logging is decided when
/// it starts, so this one cannot be a `SET LOCAL` inside it. The connection is the sync's
/// own and closed after it.
pub const QUIET_SESSION: &str = "SET log_transaction_sample_rate = 0";

/// `ALTER ROLE "name" PASSWORD 'SCRAM-SHA-256$…'`.
pub fn alter_role_password(role: &str, verifier: &str) -> String {
    debug_assert!(verifier.starts_with("SCRAM-SHA-256$"));
    format!(
        "ALTER ROLE {} PASSWORD {}",
        escape_identifier(role),
        escape_literal(verifier)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        let v = "SCRAM-SHA-256$4096:c2FsdA==$a:b";
        assert_eq!(
            alter_role_password("appuser", v),
            "ALTER ROLE \"appuser\" PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b'"
        );
        assert_eq!(
            alter_role_password("My \"odd\" Rôle", v),
            format!("ALTER ROLE \"My \"\"odd\"\" Rôle\" PASSWORD '{v}'")
        );
    }

    #[test]
    fn settings_are_local_to_the_transaction() {
        assert!(QUIET_SETTINGS.iter().all(|s| s.starts_with("SET LOCAL ")));
        let bounds = bounds(Duration::from_millis(12_500));
        assert!(bounds.iter().all(|s| s.starts_with("SET LOCAL ")));
        assert_eq!(bounds[0], "SET LOCAL lock_timeout = 12500");
        assert_eq!(bounds[1], "SET LOCAL statement_timeout = 13500");
        assert_eq!(bounds[2], "SET LOCAL deadlock_timeout = 14500");
        assert_eq!(bounds[3], "SET LOCAL synchronous_commit = local");
    }
}

//! The SQL text the sync sends, built in one place so quoting is reviewed once.
//!
//! `ALTER ROLE … PASSWORD $1` is a syntax error (utility statements take no bind
//! parameters), so the statement is built as text: the role name through
//! `escape_identifier` (quotes, spaces, upper case and unicode all survive) and the
//! verifier through `escape_literal`. Only verifiers ever reach this function.

use postgres_protocol::escape::{escape_identifier, escape_literal};

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
pub const QUIET_SETTINGS: [&str; 8] = [
    "SET LOCAL log_statement = 'none'",
    "SET LOCAL log_min_error_statement = 'panic'",
    "SET LOCAL log_min_duration_statement = -1",
    "SET LOCAL log_min_duration_sample = -1",
    "SET LOCAL debug_print_parse = off",
    "SET LOCAL debug_print_rewritten = off",
    "SET LOCAL debug_print_plan = off",
    "SET LOCAL pg_stat_statements.track_utility = off",
];

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
    }
}

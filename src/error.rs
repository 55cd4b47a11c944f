//! Failure classes and their exit codes.
//!
//! Errors travel as `anyhow::Error` with `.context()` saying what was being done; the one
//! piece of structure we need on top is *which kind* of failure it was, because scripts and
//! probes branch on the exit code. A `Failure` is attached as a context layer where the
//! failure is classified, and `main` finds it again with `downcast_ref`.

use std::fmt;

use nix::sys::signal::Signal;

/// The classes of failure with distinct exit codes (documented in `--help` and README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad configuration or secret file: nothing was applied.
    Config,
    /// Cannot connect to or authenticate with the server.
    Connect,
    /// A SQL statement failed; the transaction was rolled back.
    Sql,
    /// A configured role does not exist and `--strict` was given.
    MissingRole,
    /// A check of the secrets failed: `verify` found a role that cannot log in with its
    /// secret (or a NOLOGIN owner that can), or `generate --verify` found secret files that
    /// are missing, too short, loosely permitted or placeholders.
    Verify,
    /// `health` found the server not ready or the last sync not current.
    Unhealthy,
    /// Interrupted by this signal (Ctrl-C, …) at an interactive prompt; nothing was
    /// written. `main` then ends the process by the signal itself, as a shell expects.
    Interrupted(Signal),
}

impl Failure {
    /// The process exit code for this class.
    pub fn exit_code(self) -> u8 {
        match self {
            Failure::Config => 3,
            Failure::Connect => 4,
            Failure::Sql => 5,
            Failure::MissingRole => 6,
            Failure::Verify => 7,
            Failure::Unhealthy => 8,
            // 128 + N, what a shell reports for a command ended by signal N (130: Ctrl-C).
            Failure::Interrupted(signal) => 128 + signal as u8,
        }
    }

    /// The class of an error, if one was attached anywhere in its chain.
    pub fn of(error: &anyhow::Error) -> Option<Failure> {
        error.downcast_ref::<Failure>().copied()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Failure::Config => "invalid configuration",
            Failure::Connect => "cannot connect to PostgreSQL",
            Failure::Sql => "SQL failure",
            Failure::MissingRole => "missing role",
            Failure::Verify => "verification failed",
            Failure::Unhealthy => "not healthy",
            Failure::Interrupted(_) => "interrupted",
        })
    }
}

/// Exit code for an error with no class attached.
pub const EXIT_UNEXPECTED: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context, anyhow};

    #[test]
    fn class_is_found_below_later_context() {
        let err = Err::<(), _>(anyhow!("connection refused"))
            .context(Failure::Connect)
            .context("syncing passwords")
            .unwrap_err();
        assert_eq!(Failure::of(&err), Some(Failure::Connect));
        assert_eq!(
            format!("{err:#}"),
            "syncing passwords: cannot connect to PostgreSQL: connection refused"
        );
    }

    #[test]
    fn unclassified_error_has_no_class() {
        assert_eq!(Failure::of(&anyhow!("boom")), None);
    }

    #[test]
    fn codes_are_distinct() {
        let all = [
            Failure::Config,
            Failure::Connect,
            Failure::Sql,
            Failure::MissingRole,
            Failure::Verify,
            Failure::Unhealthy,
            Failure::Interrupted(Signal::SIGINT),
        ];
        let mut codes: Vec<u8> = all.iter().map(|f| f.exit_code()).collect();
        codes.push(EXIT_UNEXPECTED);
        codes.push(2);
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len() + 2);
    }
}

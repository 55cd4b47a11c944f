//! Failure classes and their exit codes.
//!
//! Errors travel as `anyhow::Error` with `.context()` saying what was being done; the one
//! piece of structure we need on top is *which kind* of failure it was, because scripts and
//! probes branch on the exit code. A `Failure` is attached as a context layer where the
//! failure is classified, and `main` finds it again with `downcast_ref`.

use std::fmt;

use nix::sys::signal::Signal;

/// The classes of failure with distinct exit codes; each code means one thing
/// (`EXIT_CODES` is the table `--help` and docs/exit-codes.md show).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad configuration or secret file: nothing was applied or written.
    Config,
    /// Cannot connect to or authenticate with the server.
    Connect,
    /// A SQL statement failed; the transaction was rolled back.
    Sql,
    /// A configured role does not exist and `--strict` was given.
    MissingRole,
    /// A login check failed: `verify` found a role that cannot log in with its secret (or
    /// one it cannot verify, or a NOLOGIN owner that can), or a credential `rotate` just
    /// published does not log in.
    Verify,
    /// `health` found the server not ready or the last sync not current.
    Unhealthy,
    /// `generate --verify` found secret files that are missing, too short, loosely
    /// permitted or placeholders.
    BadFiles,
    /// Refused for now, nothing written, to be tried again later: a login to re-key is
    /// still in its grace period, another `generate` or `rotate` holds the directory, a
    /// staged rotation is pending, or the staged logins did not log in in time (rolled
    /// back). `EX_TEMPFAIL` of sysexits.h.
    TryLater,
    /// Interrupted by this signal (Ctrl-C, …) at an interactive prompt or while `rotate`
    /// waits; nothing was written, or it was rolled back. `main` then ends the process by
    /// the signal itself, as a shell expects.
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
            Failure::BadFiles => 9,
            Failure::TryLater => 75,
            // 128 + N, what a shell reports for a command ended by signal N (130: Ctrl-C).
            Failure::Interrupted(signal) => 128 + signal as u8,
        }
    }

    /// `err` with this class attached, unless it already has one.
    pub fn unless_classified(self, err: anyhow::Error) -> anyhow::Error {
        match Failure::of(&err) {
            Some(_) => err,
            None => err.context(self),
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
            Failure::BadFiles => "secret files have problems",
            Failure::TryLater => "refused for now",
            Failure::Interrupted(_) => "interrupted",
        })
    }
}

/// Every exit code and what it means: the one table, shown by `--help` (`exit_codes_help`)
/// and in docs/exit-codes.md (a test keeps the page equal to it).
pub const EXIT_CODES: [(&str, &str); 13] = [
    ("0", "ok"),
    ("1", "unexpected error"),
    ("2", "bad command line"),
    (
        "3",
        "bad configuration or secret file: nothing applied or written",
    ),
    ("4", "cannot connect or authenticate"),
    (
        "5",
        "SQL failure: the transaction was rolled back, the old passwords stay in force",
    ),
    ("6", "a configured role is missing (`--strict`)"),
    (
        "7",
        "a login check failed (`verify`; `rotate`'s check of what it published)",
    ),
    ("8", "`health`: not healthy"),
    (
        "9",
        "`generate --verify`: secret files missing, too short, loosely permitted or placeholders",
    ),
    (
        "75",
        "refused for now, nothing written: try again later (`rotate`: a login to re-key is in \
         its grace period, the staged logins did not log in in time and were rolled back; \
         `generate`/`rotate`: another run holds the directory, or a staged rotation is pending)",
    ),
    (
        "128+N",
        "interrupted by signal N (`generate` at its prompt, `rotate` while it waits: 129 \
         SIGHUP, 130 SIGINT, 143 SIGTERM); nothing written, or rolled back",
    ),
    (
        "CMD's",
        "`run`: its child's exit status; 128+N when the child was killed by signal N, 127 when \
         CMD is not found, 126 when it cannot be executed",
    ),
];

/// The exit-code table as `--help` prints it.
pub fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:\n");
    for (code, meaning) in EXIT_CODES {
        text.push_str(&format!("  {code:>6}  {meaning}\n"));
    }
    text
}

/// Exit code for an error with no class attached.
pub const EXIT_UNEXPECTED: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context, anyhow};

    /// The exit-code table as docs/exit-codes.md holds it.
    fn exit_codes_markdown() -> String {
        let mut text = String::from("| code | meaning |\n|---|---|\n");
        for (code, meaning) in EXIT_CODES {
            text.push_str(&format!("| `{code}` | {meaning} |\n"));
        }
        text
    }

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
            Failure::BadFiles,
            Failure::TryLater,
            Failure::Interrupted(Signal::SIGINT),
        ];
        let mut codes: Vec<u8> = all.iter().map(|f| f.exit_code()).collect();
        codes.push(EXIT_UNEXPECTED);
        codes.push(2);
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len() + 2);
        // Each is in the table.
        for code in codes {
            let listed = EXIT_CODES.iter().any(|(c, _)| *c == code.to_string())
                || (code > 128 && EXIT_CODES.iter().any(|(c, _)| *c == "128+N"));
            assert!(listed, "exit code {code} is not in EXIT_CODES");
        }
    }

    /// docs/exit-codes.md holds the table of the code, word for word.
    #[test]
    fn the_exit_code_page_is_the_table_of_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/exit-codes.md");
        let page = std::fs::read_to_string(path).unwrap();
        assert!(
            page.contains(&exit_codes_markdown()),
            "docs/exit-codes.md differs from error::EXIT_CODES; the table should read:\n{}",
            exit_codes_markdown()
        );
    }
}

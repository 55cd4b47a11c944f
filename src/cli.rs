//! The command line: every subcommand, flag and environment variable of the tool.
//!
//! clap's derive API turns the doc comments below into `--help`, so they are written for
//! operators. Every flag has an environment variable (flags win), matching the variables
//! the replaced shell scripts read, so the binary is a drop-in for their container setup.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::keyfiles::GenerateArgs;

/// Keeps PostgreSQL role passwords in step with the secret files mounted into the container.
///
/// Passwords are sent to the server only as client-side SCRAM-SHA-256 verifiers inside one
/// transaction with statement logging suppressed; no password is ever printed or passed
/// through argv or the environment.
///
/// Exit codes: 0 ok; 1 unexpected error; 2 bad command line; 3 bad configuration or secret
/// file; 4 cannot connect or authenticate; 5 SQL failure; 6 missing role under --strict;
/// 7 verify failed; 8 not healthy; 130 interrupted at a `generate` prompt. `run` exits with
/// its child's status (128+N when the child was killed by signal N, 127 when CMD is not
/// found, 126 when it cannot be executed).
#[derive(Debug, Parser)]
#[command(name = "pg-password-sync", version, max_term_width = 100)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Container PID 1: start CMD (default `docker-entrypoint.sh postgres`), forward signals,
    /// reap zombies, sync once the final server is ready, then watch the secret files.
    Run(RunArgs),
    /// One-shot sync against the running server (`docker exec … pg-password-sync sync`).
    Sync(SyncArgs),
    /// Sidecar mode: wait for the server, sync, then watch the secret files and re-sync.
    Watch(WatchArgs),
    /// Log in over TCP as every configured role with its current secret and report.
    Verify(VerifyArgs),
    /// Exit 0 only if postgres is ready and the last sync of the current secrets succeeded.
    Health(HealthArgs),
    /// Create, back up, verify, list and restore the secret files (run on the host).
    Generate(GenerateArgs),
    /// Overlap mode's staged rotation of `generate`'s directory (run on the host): give the
    /// unpublished login of each role a new password, wait until the server accepts it,
    /// then publish it in pg_service.conf. Refused while that login may still be in use.
    Rotate(RotateArgs),
}

/// Where the secrets are, which roles they belong to, and where the server is.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Directory holding the secret files.
    #[arg(long, env = "KEYS_DIR", default_value = "/app/keys")]
    pub keys_dir: PathBuf,

    /// Directory searched for secret files before --keys-dir.
    #[arg(long, env = "SECRETS_SOURCE_DIR", default_value = "/run/secrets")]
    pub secrets_source_dir: PathBuf,

    /// Superuser role; its password comes from --postgres-password-file or `postgres_password`.
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,

    /// File holding the superuser password (instead of looking up `postgres_password`).
    #[arg(long, env = "POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,

    /// Application role, synced from `postgres_app_user_pw`.
    #[arg(long, env = "APP_DB_USER", default_value = "appuser")]
    pub app_db_user: String,

    /// Read-only role, synced from `postgres_app_ro_pw`.
    #[arg(long, env = "APP_DB_RO_USER", default_value = "backupuser")]
    pub app_db_ro_user: String,

    /// Temporal role, synced from `postgres_temporal_pw`; skipped when unset.
    #[arg(long, env = "TEMPORAL_DB_USER")]
    pub temporal_db_user: Option<String>,

    /// Explicit role map NAME=FILE (repeatable); replaces the default four roles. FILE is a
    /// secret name looked up like the defaults, or a path when it contains a `/`. In the
    /// environment variable, entries are separated by commas.
    #[arg(
        long = "role",
        value_name = "NAME=FILE",
        env = "PG_PASSWORD_SYNC_ROLES",
        value_delimiter = ','
    )]
    pub roles: Vec<String>,

    /// Server socket directory (starts with `/`) or TCP host name.
    #[arg(long, env = "PGHOST", default_value = "/var/run/postgresql")]
    pub pghost: String,

    /// Server port (also names the socket file `.s.PGSQL.<port>`).
    #[arg(long, env = "PGPORT", default_value_t = 5432)]
    pub pgport: u16,

    /// Data directory; its `postmaster.pid` tells when the final server is ready.
    #[arg(long, env = "PGDATA", default_value = "/var/lib/postgresql/data")]
    pub pgdata: PathBuf,

    /// Database to connect to.
    #[arg(long, env = "PGDATABASE", default_value = "postgres")]
    pub dbname: String,

    /// OS user whose identity the socket connection uses when started as root, so that
    /// `local all postgres peer` admits the sync. Default: `postgres` when root.
    #[arg(long, env = "PG_PASSWORD_SYNC_USER")]
    pub sync_user: Option<String>,

    /// Give up connecting after this long (per attempt), e.g. `5s`, `500ms`.
    #[arg(long, env = "PG_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

/// How the sync applies passwords.
#[derive(Debug, Clone, Args)]
pub struct SyncOptionsArgs {
    /// A role that does not exist is an error (exit 6) instead of a warning.
    #[arg(long, env = "PG_PASSWORD_SYNC_STRICT", value_parser = BoolishValueParser::new())]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub options: SyncOptionsArgs,
    /// Report what would change; change nothing.
    #[arg(long, env = "PG_PASSWORD_SYNC_DRY_RUN", value_parser = BoolishValueParser::new())]
    pub dry_run: bool,
    /// Report format on stdout.
    #[arg(long, env = "PG_PASSWORD_SYNC_REPORT_FORMAT", value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

/// Watching the secret files (shared by `run` and `watch`).
#[derive(Debug, Clone, Args)]
pub struct WatchOptionsArgs {
    /// Quiet period after a file event before re-reading the secrets, e.g. `250ms`.
    #[arg(long, env = "PG_PASSWORD_SYNC_DEBOUNCE", default_value = "250ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Full resync period even without file events (`0` = off), e.g. `5m`.
    #[arg(long, env = "PG_PASSWORD_SYNC_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Directory for the health state file (falls back to a writable temp dir).
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_STATE_DIR",
        default_value = "/run/pg-password-sync"
    )]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub options: SyncOptionsArgs,
    #[command(flatten)]
    pub watch: WatchOptionsArgs,
    /// Do not watch the secret files after the first sync.
    #[arg(long, env = "PG_PASSWORD_SYNC_NO_WATCH", value_parser = BoolishValueParser::new())]
    pub no_watch: bool,
    /// Do not sync at all: only supervise CMD (a plain init).
    #[arg(long, env = "PG_PASSWORD_SYNC_NO_SYNC", value_parser = BoolishValueParser::new())]
    pub no_sync: bool,
    /// On a failed first sync stop postgres (SIGINT) and exit non-zero, like the old wrapper,
    /// instead of retrying with backoff while postgres keeps serving.
    #[arg(long, env = "PG_PASSWORD_SYNC_EXIT_ON_FAILURE", value_parser = BoolishValueParser::new())]
    pub exit_on_sync_failure: bool,
    /// The command to supervise.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub options: SyncOptionsArgs,
    #[command(flatten)]
    pub watch: WatchOptionsArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Host to log in over TCP (verify always uses TCP + SCRAM, like the application).
    #[arg(long, env = "PG_VERIFY_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Also check that this NOLOGIN owner role refuses login (with `postgres_app_owner_pw`).
    #[arg(long, env = "APP_DB_OWNER")]
    pub owner: Option<String>,
    /// Report format on stdout.
    #[arg(long, env = "PG_PASSWORD_SYNC_REPORT_FORMAT", value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Directory holding the state file written by `run`/`watch`.
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_STATE_DIR",
        default_value = "/run/pg-password-sync"
    )]
    pub state_dir: PathBuf,
}

/// Options of `rotate`. The role map and server are read from the same variables as the
/// other commands; the secrets are those of `generate --dir DIR` (DIR/keys) only.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Secrets directory of `generate`: keys in DIR/keys, backups in DIR/backups.
    #[arg(
        long,
        value_name = "DIR",
        env = "PG_PASSWORD_SYNC_SECRETS_DIR",
        default_value = "infra/secrets"
    )]
    pub dir: PathBuf,

    /// Server host for the checks, reached over TCP as the applications reach it (use an
    /// address whose pg_hba.conf line asks for a password).
    #[arg(long, env = "PGHOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Server port.
    #[arg(long, env = "PGPORT", default_value_t = 5432)]
    pub port: u16,

    /// Database to log in to.
    #[arg(long, env = "PGDATABASE", default_value = "postgres")]
    pub dbname: String,

    /// Superuser role (never overlapped; its password file is rotated as a single login).
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,

    /// Application role, with `postgres_app_user_pw`.
    #[arg(long, env = "APP_DB_USER", default_value = "appuser")]
    pub app_db_user: String,

    /// Read-only role, with `postgres_app_ro_pw`.
    #[arg(long, env = "APP_DB_RO_USER", default_value = "backupuser")]
    pub app_db_ro_user: String,

    /// Temporal role, with `postgres_temporal_pw`; not overlapped when unset.
    #[arg(long, env = "TEMPORAL_DB_USER")]
    pub temporal_db_user: Option<String>,

    /// Explicit role map NAME=FILE (repeatable), as for `run`; files must be in DIR/keys.
    #[arg(
        long = "role",
        value_name = "NAME=FILE",
        env = "PG_PASSWORD_SYNC_ROLES",
        value_delimiter = ','
    )]
    pub roles: Vec<String>,

    /// Suffix of the twin logins (`appuser` → `appuser_alt`).
    #[arg(long, env = "PG_PASSWORD_SYNC_TWIN_SUFFIX", default_value = crate::overlap::DEFAULT_TWIN_SUFFIX)]
    pub twin_suffix: String,

    /// How long to wait for every staged login to log in (the new files must reach the
    /// sync first: allow for Kubernetes' propagation) before rolling the stage back. Keep
    /// it below the sync's --grace.
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub wait: Duration,

    /// Re-key the unpublished logins even when the server says they may still be in use
    /// (applications still using them will fail to log in).
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_FORCE", value_parser = BoolishValueParser::new())]
    pub force: bool,

    /// Only check, back up and stage; finish later with --publish-only or --abort (for
    /// deliveries checked elsewhere, e.g. `kubectl exec … verify --overlap --staged`).
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_STAGE_ONLY", value_parser = BoolishValueParser::new())]
    pub stage_only: bool,

    /// Publish the logins staged by --stage-only (no login check: verify them first).
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_PUBLISH_ONLY", value_parser = BoolishValueParser::new())]
    pub publish_only: bool,

    /// Undo the stage of --stage-only: restore the staged files byte for byte.
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_ABORT", value_parser = BoolishValueParser::new())]
    pub abort: bool,

    /// Give up connecting after this long (per attempt).
    #[arg(long, env = "PG_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Accepted so that one environment (PG_PASSWORD_SYNC_OVERLAP=true) serves every
    /// command; rotate always works in overlap mode.
    #[arg(long, env = "PG_PASSWORD_SYNC_OVERLAP", value_parser = BoolishValueParser::new())]
    pub overlap: bool,
}

impl From<RotateArgs> for crate::rotate::Settings {
    fn from(args: RotateArgs) -> Self {
        let keys = args.dir.join("keys");
        crate::rotate::Settings {
            config: ConfigArgs {
                // The secrets are generate's files, and only those.
                keys_dir: keys.clone(),
                secrets_source_dir: keys,
                postgres_user: args.postgres_user,
                postgres_password_file: None,
                app_db_user: args.app_db_user,
                app_db_ro_user: args.app_db_ro_user,
                temporal_db_user: args.temporal_db_user,
                roles: args.roles,
                pghost: args.host,
                pgport: args.port,
                // Unused: rotate never looks at a data directory or a socket.
                pgdata: PathBuf::from("/nonexistent"),
                dbname: args.dbname,
                sync_user: None,
                connect_timeout: args.connect_timeout,
            },
            dir: args.dir,
            twin_suffix: args.twin_suffix,
            wait: args.wait,
            force: args.force,
            stage_only: args.stage_only,
            publish_only: args.publish_only,
            abort: args.abort,
        }
    }
}

/// Parses `250ms`, `5s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 250ms, 5s or 5m"))?;
    // A year is more than any sensible period, and keeps `Instant + period` far from overflow.
    const MAX_MILLIS: u64 = 365 * 24 * 3_600_000;
    let millis = match unit {
        "ms" => Some(value),
        "" | "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        _ => return Err(format!("unknown unit in `{text}` (use ms, s, m or h)")),
    };
    millis
        .filter(|&ms| ms <= MAX_MILLIS)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long (at most a year)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                // clap's own flags, and `run`'s CMD after `--`.
                if matches!(id, "help" | "version" | "cmd") {
                    continue;
                }
                if arg.get_env().is_none() {
                    missing.push(format!("{} --{id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "flags without an env var: {missing:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("8761h").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
    }
}

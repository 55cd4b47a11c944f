//! The command line: every subcommand, flag and environment variable of the tool.
//!
//! clap's derive API turns the doc comments below into `--help`, so they are written for
//! operators. Every flag has an environment variable (flags win), matching the variables
//! the replaced shell scripts read, so the binary is a drop-in for their container setup.
//!
//! This is the only module that knows clap, and the first of the two configuration
//! layers: each subcommand's arguments are turned here (the conversions at the end) into
//! the validated settings its module owns and runs on (built from `config.rs`'s types), so
//! the domain modules never depend on the command line. Every default is written once, in
//! the flag's attribute or as a constant the attribute names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use anyhow::Context;

use crate::config::{self, Config, Connection, NamedRoles, OsIdentity, RoleMap};
use crate::config::{DEFAULT_GRACE, PatroniRule, TargetSession, parse_duration};
use crate::error::Failure;
use crate::health::HealthSettings;
use crate::keyfiles::GenerateSettings;
use crate::metrics::MetricsSettings;
use crate::postmaster::PostmasterRule;
use crate::rotate::RotateSettings;
use crate::run::RunSettings;
use crate::status::StatusSettings;
use crate::sync::{Options, SyncSettings};
use crate::verify::VerifySettings;
use crate::watch::{WatchOptions, WatchSettings};

/// Keeps PostgreSQL role passwords in step with the secret files mounted into the container.
///
/// Passwords are sent to the server only as client-side SCRAM-SHA-256 verifiers inside one
/// transaction with statement logging suppressed; no password is ever printed or passed
/// through argv or the environment.
#[derive(Debug, Parser)]
#[command(
    name = "pg-password-sync",
    version,
    max_term_width = 100,
    after_help = crate::error::exit_codes_help()
)]
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
    /// Per role: its logins, which one is published, VALID UNTIL, sessions on each, the
    /// last change applied, a pending stage (a table, or --format json); exit codes as
    /// `health`'s. Reads the server as the superuser and the state file; prints no secret.
    Status(StatusArgs),
    /// Create, back up, verify, list and restore the secret files (run on the host).
    Generate(GenerateArgs),
    /// Overlap mode's staged rotation of `generate`'s directory (run on the host): give the
    /// unpublished login of each role a new password, wait until the server accepts it,
    /// then publish it in pg_service.conf. Refused while that login may still be in use.
    Rotate(RotateArgs),
}

/// The three named application roles, by the variables the replaced scripts read. One
/// definition for the syncing commands, `rotate` and `generate --overlap` (which names the
/// sections of pg_service.conf after them), so flags, variables and defaults cannot drift.
#[derive(Debug, Clone, Args)]
pub struct NamedRoleArgs {
    /// Application role, whose password is `postgres_app_user_pw` (in overlap mode also its
    /// section in pg_service.conf).
    #[arg(long, env = "APP_DB_USER", default_value = "appuser")]
    pub app_db_user: String,

    /// Read-only role, whose password is `postgres_app_ro_pw`.
    #[arg(long, env = "APP_DB_RO_USER", default_value = "backupuser")]
    pub app_db_ro_user: String,

    /// Temporal role, whose password is `postgres_temporal_pw`; skipped when unset.
    #[arg(long, env = "TEMPORAL_DB_USER")]
    pub temporal_db_user: Option<String>,
}

/// The roles whose passwords come from the secret files: the named defaults or an explicit
/// map. One definition for the syncing commands and `rotate`.
#[derive(Debug, Clone, Args)]
pub struct RoleMapArgs {
    #[command(flatten)]
    pub named: NamedRoleArgs,

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
}

/// The server besides its host, how to reach it and whether Patroni manages it: one
/// definition for the commands that run beside it and `rotate`, which runs on the host (each
/// names its own `--pghost` default).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server port (also names the socket file `.s.PGSQL.<port>`): one for every host of
    /// --pghost, or a comma-separated list with one per host. `--port` is the same.
    #[arg(
        long = "pgport",
        alias = "port",
        env = "PGPORT",
        default_value = "5432"
    )]
    pub pgport: String,

    /// Which server of a --pghost list to use, as libpq's target_session_attrs: `any` (the
    /// first that answers), `read-write` or `primary` (the first that is not a standby).
    #[arg(
        long,
        env = "PGTARGETSESSIONATTRS",
        default_value = "any",
        value_parser = TargetSession::parse
    )]
    pub target_session_attrs: TargetSession,

    /// Database to connect to.
    #[arg(long, env = "PGDATABASE", default_value = crate::config::DEFAULT_SUPERUSER)]
    pub dbname: String,

    /// Whether Patroni manages the server: `auto` (PGDATA holds patroni.dynamic.json or a
    /// postgresql.conf written by Patroni; off for `rotate`, which has no data directory),
    /// `on` or `off`. Where it does, the default role map leaves the superuser to Patroni
    /// (`rotate` leaves the superuser's password file as it is); see docs/clusters.md.
    #[arg(long, env = "PG_PASSWORD_SYNC_PATRONI", default_value = "auto", value_parser = PatroniRule::parse)]
    pub patroni: PatroniRule,

    /// Give up connecting after this long (per attempt), e.g. `5s`, `500ms`.
    #[arg(long, env = "PG_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
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
    #[arg(long, env = "POSTGRES_USER", default_value = crate::config::DEFAULT_SUPERUSER)]
    pub postgres_user: String,

    /// File holding the superuser password (instead of looking up `postgres_password`).
    #[arg(long, env = "POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,

    #[command(flatten)]
    pub role_map: RoleMapArgs,

    /// Server socket directory (starts with `/`) or TCP host name; or a comma-separated
    /// list of them, tried in order as libpq does (see --target-session-attrs).
    #[arg(long, env = "PGHOST", default_value = crate::config::DEFAULT_SOCKET_DIR)]
    pub pghost: String,

    #[command(flatten)]
    pub server: ServerArgs,

    /// Data directory; its `postmaster.pid` tells when the final server is ready.
    #[arg(long, env = "PGDATA", default_value = "/var/lib/postgresql/data")]
    pub pgdata: PathBuf,

    /// OS user whose identity the socket connection uses when started as root, so that
    /// `local all postgres peer` admits the sync. Default: `postgres` when root.
    #[arg(long, env = "PG_PASSWORD_SYNC_USER")]
    pub sync_user: Option<String>,

    /// Overlap mode: every role but the superuser also has a twin login (role name +
    /// --twin-suffix, password file named like the role's with the suffix before `_pw`),
    /// and `pg_service.conf` publishes which login applications use now. See
    /// docs/overlap.md.
    #[arg(long, env = "PG_PASSWORD_SYNC_OVERLAP", value_parser = BoolishValueParser::new())]
    pub overlap: bool,

    /// Suffix of the twin logins in overlap mode (also how a sync without --overlap
    /// recognises twins an earlier overlap mode left).
    #[arg(long, env = "PG_PASSWORD_SYNC_TWIN_SUFFIX", default_value = crate::overlap::DEFAULT_TWIN_SUFFIX)]
    pub twin_suffix: String,
}

/// How the sync applies passwords.
#[derive(Debug, Clone, Args)]
pub struct SyncOptionsArgs {
    /// A role that does not exist is an error (exit 6) instead of a warning.
    #[arg(long, env = "PG_PASSWORD_SYNC_STRICT", value_parser = BoolishValueParser::new())]
    pub strict: bool,
    #[command(flatten)]
    pub blockers: BlockerArgs,
    /// How long a login that stopped being published keeps working (its VALID UNTIL is set
    /// to now + this when the sync sees the switch), e.g. `15m`. Also the time a twin left
    /// by an earlier overlap mode keeps working after overlap is turned off.
    #[arg(long, env = "PG_PASSWORD_SYNC_GRACE", default_value = DEFAULT_GRACE, value_parser = parse_duration)]
    pub grace: Duration,
    /// Overlap mode: keep the sessions still open on a login whose grace is over. By
    /// default the sync ends them (pg_terminate_backend; non-superuser only, named in the
    /// log), so a retired login cannot hold connection slots its staged successor needs
    /// or keep a leaked password's session alive past the rotation.
    #[arg(long, env = "PG_PASSWORD_SYNC_KEEP_RETIRED_SESSIONS", value_parser = BoolishValueParser::new())]
    pub keep_retired_sessions: bool,
    /// Overlap mode: undo an administrator's lockout. By default a published login whose
    /// VALID UNTIL is in the past, or a twin made NOLOGIN, by someone else stays locked
    /// out (reported on every sync); with this flag the sync restores VALID UNTIL
    /// infinity and LOGIN.
    #[arg(long, env = "PG_PASSWORD_SYNC_OVERRIDE_LOCKOUTS", value_parser = BoolishValueParser::new())]
    pub override_lockouts: bool,
    /// Refuse (apply nothing, name the file) a role password shorter than N characters,
    /// e.g. what a writer that died after one byte leaves behind. `0` turns it off;
    /// `generate` writes 32.
    #[arg(
        long,
        value_name = "N",
        env = "PG_PASSWORD_SYNC_MIN_PASSWORD_LENGTH",
        default_value_t = crate::config::DEFAULT_MIN_PASSWORD_LENGTH
    )]
    pub min_password_length: usize,
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
    /// Quiet period before re-reading the secrets after a file is written in place (once its
    /// writer closed it) or otherwise changed, e.g. `250ms`. A file renamed into place (and a
    /// Kubernetes `..data` swap) is read at once.
    #[arg(long, env = "PG_PASSWORD_SYNC_DEBOUNCE", default_value = "250ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Full resync period even without file events (`0` = off), e.g. `5m`.
    #[arg(long, env = "PG_PASSWORD_SYNC_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Directory for the health state file (falls back to a writable temp dir).
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_STATE_DIR",
        default_value = crate::state::DEFAULT_DIR
    )]
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics (GET /metrics, text format) on ADDR:PORT, e.g.
    /// `127.0.0.1:9753` or `[::]:9753`. Off by default: no listener unless asked. See
    /// docs/metrics.md.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "PG_PASSWORD_SYNC_METRICS_LISTEN"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// Write the same metrics to FILE after every sync (a temp file renamed over it), for
    /// node_exporter's textfile collector (a `*.prom` name in its directory). Off by
    /// default.
    #[arg(long, value_name = "FILE", env = "PG_PASSWORD_SYNC_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
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
    /// On a failed first sync stop postgres (SIGINT) and exit non-zero instead of retrying
    /// with backoff while postgres keeps serving.
    #[arg(long, env = "PG_PASSWORD_SYNC_EXIT_ON_FAILURE", value_parser = BoolishValueParser::new())]
    pub exit_on_sync_failure: bool,
    /// Which postmaster is the final server to sync: `cmd` (CMD's own pid: CMD execs into
    /// postgres, as the official entrypoint does), `descendant` (also a postmaster CMD
    /// started that listens on TCP: Patroni, a supervisor script; never the entrypoint's
    /// socket-only temporary server) or `any-descendant` (socket-only ones too).
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_POSTMASTER",
        default_value = "descendant",
        value_parser = PostmasterRule::parse
    )]
    pub postmaster: PostmasterRule,
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
    /// Without it: 127.0.0.1, or this machine's own addresses when 127.0.0.1 is trusted.
    #[arg(long, env = "PG_VERIFY_HOST")]
    pub host: Option<String>,
    /// Also check that this NOLOGIN owner role refuses login (with `postgres_app_owner_pw`).
    #[arg(long, env = "APP_DB_OWNER")]
    pub owner: Option<String>,
    /// With --overlap: also check each role's unpublished login with its password file
    /// (what `rotate` waits for after staging). Without it only the published credentials
    /// (`pg_service.conf`) and the superuser are checked.
    #[arg(long, env = "PG_PASSWORD_SYNC_VERIFY_STAGED", value_parser = BoolishValueParser::new())]
    pub staged: bool,
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
        default_value = crate::state::DEFAULT_DIR
    )]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Directory holding the state file written by `run`/`watch`.
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_STATE_DIR",
        default_value = crate::state::DEFAULT_DIR
    )]
    pub state_dir: PathBuf,
    /// Output format on stdout: a table, or one JSON object.
    #[arg(long, env = "PG_PASSWORD_SYNC_REPORT_FORMAT", value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

/// Options of `generate`.
///
/// Without a mode flag, creates the missing secret files and keeps existing ones.
///
/// Every option has an environment variable. The conflicts between options are checked by
/// `effective`, not by clap, because clap counts a variable set to `false` or to an empty
/// value as a given option: `PG_PASSWORD_SYNC_VERIFY=false` must not conflict with `--force`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Secrets directory: files go to DIR/keys, backups to DIR/backups, and the OIDC client
    /// secrets are read from DIR/user-provided.env.
    #[arg(
        long,
        value_name = "DIR",
        env = "PG_PASSWORD_SYNC_SECRETS_DIR",
        default_value = crate::store::DEFAULT_DIR
    )]
    pub dir: PathBuf,

    /// Regenerate every random secret and re-read the three OIDC values from their source
    /// (a complete backup of the current set is taken first unless --no-backup).
    #[arg(long, env = "PG_PASSWORD_SYNC_FORCE", value_parser = BoolishValueParser::new())]
    pub force: bool,

    /// Do not back up the current set before --force overwrites it (--restore always backs
    /// up). The variable takes true/false, 1/0, yes/no or on/off.
    #[arg(long, env = "PG_PASSWORD_SYNC_NO_BACKUP", value_parser = BoolishValueParser::new())]
    pub no_backup: bool,

    /// Only back up the current set to DIR/backups/backup-YYYYMMDD-HHMMSS; generate nothing.
    #[arg(long, env = "PG_PASSWORD_SYNC_BACKUP_ONLY", value_parser = BoolishValueParser::new())]
    pub backup_only: bool,

    /// Check every file: present, mode 0600, long enough, not a placeholder; exit 7 listing
    /// every problem.
    #[arg(long, env = "PG_PASSWORD_SYNC_VERIFY", value_parser = BoolishValueParser::new())]
    pub verify: bool,

    /// List the secret files with size, mode and modification time (never their content).
    #[arg(long, env = "PG_PASSWORD_SYNC_LIST", value_parser = BoolishValueParser::new())]
    pub list: bool,

    /// List the backups, oldest first.
    #[arg(long, env = "PG_PASSWORD_SYNC_LIST_BACKUPS", value_parser = BoolishValueParser::new())]
    pub list_backups: bool,

    /// Restore the secret files from BACKUP (a name under DIR/backups or a path; the newest
    /// by default, or with the name `newest`). The current set is backed up first. Asks on a
    /// terminal unless --yes or --non-interactive. An empty variable counts as unset.
    #[arg(long, value_name = "BACKUP", env = "PG_PASSWORD_SYNC_RESTORE")]
    #[allow(clippy::option_option)]
    pub restore: Option<Option<String>>,

    /// Do not ask for confirmation before --restore.
    #[arg(long, short = 'y', env = "PG_PASSWORD_SYNC_YES", value_parser = BoolishValueParser::new())]
    pub yes: bool,

    /// After a successful run, delete the oldest backups so that at most N remain.
    #[arg(long, value_name = "N", env = "PG_PASSWORD_SYNC_KEEP_BACKUPS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_backups: Option<u32>,

    /// File holding OIDC_GOOGLE_CLIENT_SECRET, OIDC_MICROSOFT_CLIENT_SECRET and
    /// OIDC_KEYCLOAK_CLIENT_SECRET as KEY=VALUE lines (parsed, never executed). Values missing
    /// there are taken from the environment. Default: DIR/user-provided.env, if present.
    #[arg(long, value_name = "FILE", env = "PG_PASSWORD_SYNC_USER_SECRETS_FILE")]
    pub user_secrets_file: Option<PathBuf>,

    /// Never prompt: a missing OIDC value is an error (the default when stdin is not a
    /// terminal), and --restore does not ask.
    #[arg(long, env = "PG_PASSWORD_SYNC_NON_INTERACTIVE", value_parser = BoolishValueParser::new())]
    pub non_interactive: bool,

    /// Also write a Kubernetes Secret manifest named NAME holding every value (keys without
    /// `.txt`) to --output, or to stdout when that is a pipe (`| kubectl apply -f -`); it
    /// is refused when stdout is a terminal.
    #[arg(long, value_name = "NAME", env = "PG_PASSWORD_SYNC_K8S_SECRET")]
    pub k8s_secret: Option<String>,

    /// Namespace of the --k8s-secret manifest.
    #[arg(long, value_name = "NS", env = "PG_PASSWORD_SYNC_K8S_NAMESPACE")]
    pub namespace: Option<String>,

    /// Write the --k8s-secret manifest to FILE (created 0600) instead of stdout.
    #[arg(long, value_name = "FILE", env = "PG_PASSWORD_SYNC_OUTPUT",
          value_parser = clap::builder::TypedValueParser::map(
              clap::builder::OsStringValueParser::new(), PathBuf::from))]
    pub output: Option<PathBuf>,

    /// Overlap mode: also create each application role's twin-login password file
    /// (`postgres_app_user_alt_pw.txt`, …) and `pg_service.conf`, which publishes each
    /// role's own login on a first run; --verify and --list then expect them, and
    /// --k8s-secret carries them. A directory that already has `pg_service.conf` is
    /// treated as overlapped without it. See `rotate` for the staged rotation.
    #[arg(long, env = "PG_PASSWORD_SYNC_OVERLAP", value_parser = BoolishValueParser::new())]
    pub overlap: bool,

    /// Suffix of the twin logins and their files (`appuser` → `appuser_alt`).
    #[arg(long, env = "PG_PASSWORD_SYNC_TWIN_SUFFIX", default_value = crate::overlap::DEFAULT_TWIN_SUFFIX)]
    pub twin_suffix: String,

    /// In overlap mode: the roles that get twins, and the sections of pg_service.conf.
    #[command(flatten)]
    pub named: NamedRoleArgs,
}

/// Options of `rotate`. The role map and server are read from the same variables as the
/// other commands; the secrets are those of `generate --dir DIR` (DIR/keys) only.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Secrets directory of `generate`: keys in DIR/keys (the --role files too), backups in
    /// DIR/backups.
    #[arg(
        long,
        value_name = "DIR",
        env = "PG_PASSWORD_SYNC_SECRETS_DIR",
        default_value = crate::store::DEFAULT_DIR
    )]
    pub dir: PathBuf,

    /// Server host for the checks, reached over TCP as the applications reach it (use an
    /// address whose pg_hba.conf line asks for a password), or a comma-separated list of
    /// hosts tried in order (see --target-session-attrs). `--host` is the same.
    #[arg(
        long = "pghost",
        alias = "host",
        env = "PGHOST",
        default_value = "127.0.0.1"
    )]
    pub pghost: String,

    #[command(flatten)]
    pub server: ServerArgs,

    /// Superuser role (never overlapped; its password file is rotated as a single login).
    #[arg(long, env = "POSTGRES_USER", default_value = crate::config::DEFAULT_SUPERUSER)]
    pub postgres_user: String,

    #[command(flatten)]
    pub role_map: RoleMapArgs,

    /// Suffix of the twin logins (`appuser` → `appuser_alt`).
    #[arg(long, env = "PG_PASSWORD_SYNC_TWIN_SUFFIX", default_value = crate::overlap::DEFAULT_TWIN_SUFFIX)]
    pub twin_suffix: String,

    /// How long to wait for every staged login to log in (the new files must reach the
    /// sync first: allow for Kubernetes' propagation) before rolling the stage back. Must
    /// be shorter than --grace: a stage the sync sees again after a restart gets the grace.
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub wait: Duration,

    /// The sync's --grace (same variable): --wait must be shorter. rotate only compares
    /// the two; the sync is what applies it.
    #[arg(long, env = "PG_PASSWORD_SYNC_GRACE", default_value = DEFAULT_GRACE, value_parser = parse_duration)]
    pub grace: Duration,

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

    /// Undo the stage of --stage-only (or of a run that was killed): restore the staged
    /// files byte for byte; a stage already published is complete, and only its record
    /// is removed.
    #[arg(long, env = "PG_PASSWORD_SYNC_ROTATE_ABORT", value_parser = BoolishValueParser::new())]
    pub abort: bool,
}

impl From<LogFormat> for crate::logging::Format {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => crate::logging::Format::Text,
            LogFormat::Json => crate::logging::Format::Json,
        }
    }
}

/// What the sync does about other sessions holding the locks it needs: the advisory lock
/// that serialises syncs, and the `pg_authid` row of a role being changed.
#[derive(Debug, Clone, Args)]
pub struct BlockerArgs {
    /// End (pg_terminate_backend) sessions of non-superuser roles that have held up the
    /// sync this long, then apply: a leaked login cannot postpone its own rotation. `0` or
    /// `off`: never end a session. Superuser sessions are never ended, only waited for.
    /// Blocking sessions are named in the log (pid, role, state, for how long) after 1s.
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_TERMINATE_BLOCKERS_AFTER",
        value_name = "DURATION|off",
        default_value = "10s",
        value_parser = parse_terminate_after
    )]
    pub terminate_blockers_after: TerminateAfter,

    /// Give up (exit 5; `run`/`watch` retry later) when the sync has waited this long in
    /// total for locks held by sessions it does not end. Raised to
    /// --terminate-blockers-after + 2s when lower, so that ending a blocker comes first.
    #[arg(
        long,
        env = "PG_PASSWORD_SYNC_LOCK_WAIT_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_positive_duration
    )]
    pub lock_wait_timeout: Duration,
}

/// `--terminate-blockers-after`: a duration, or `None` for never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminateAfter(pub Option<Duration>);

impl SyncOptionsArgs {
    /// The sync's options; only the one-shot `sync` may dry-run.
    fn sync_options(&self, dry_run: bool) -> Options {
        Options {
            strict: self.strict,
            dry_run,
            blockers: self.blockers.policy(),
            keep_retired_sessions: self.keep_retired_sessions,
            override_lockouts: self.override_lockouts,
            grace: self.grace,
            min_password_length: self.min_password_length,
        }
    }
}

impl BlockerArgs {
    /// The sync's policy for blocking sessions.
    pub fn policy(&self) -> crate::session::locks::Blockers {
        crate::session::locks::Blockers {
            lock_wait: self.lock_wait_timeout,
            terminate_after: self.terminate_blockers_after.0,
        }
    }
}

impl From<ReportFormat> for crate::sync::ReportFormat {
    fn from(format: ReportFormat) -> Self {
        match format {
            ReportFormat::Text => crate::sync::ReportFormat::Text,
            ReportFormat::Json => crate::sync::ReportFormat::Json,
        }
    }
}

// ---- From the command line to the settings each command runs on ---------------------

impl ServerArgs {
    /// How to reach the server(s) `pghost` names, as these flags say.
    fn connection(
        self,
        pghost: &str,
        sync_identity: Option<OsIdentity>,
    ) -> anyhow::Result<Connection> {
        Ok(Connection {
            servers: config::servers(pghost, &self.pgport)?,
            target: self.target_session_attrs,
            dbname: self.dbname,
            connect_timeout: self.connect_timeout,
            sync_identity,
        })
    }
}

impl From<NamedRoleArgs> for NamedRoles {
    fn from(args: NamedRoleArgs) -> Self {
        NamedRoles {
            app: args.app_db_user,
            read_only: args.app_db_ro_user,
            temporal: args.temporal_db_user,
        }
    }
}

impl ConfigArgs {
    /// The validated configuration (a mistake is `Failure::Config`), and the data
    /// directory.
    fn validate(self) -> anyhow::Result<(Config, PathBuf)> {
        let pgdata = self.pgdata.clone();
        let config = self.config(&pgdata).context(Failure::Config)?;
        Ok((config, pgdata))
    }

    fn config(self, pgdata: &Path) -> anyhow::Result<Config> {
        let map = RoleMap::new(
            &self.postgres_user,
            self.postgres_password_file,
            &self.role_map.named.into(),
            &self.role_map.roles,
        )?;
        let identity = config::sync_identity(self.sync_user.as_deref())?;
        let patroni = self.server.patroni.at(Some(pgdata));
        Config::new(
            map,
            vec![self.secrets_source_dir, self.keys_dir],
            self.server.connection(&self.pghost, identity)?,
            patroni,
            self.overlap,
            self.twin_suffix,
        )
    }
}

impl WatchOptionsArgs {
    fn options(self, pgdata: PathBuf) -> WatchOptions {
        WatchOptions {
            debounce: self.debounce,
            resync_interval: self.resync_interval,
            state_dir: self.state_dir,
            pgdata,
            metrics: MetricsSettings {
                listen: self.metrics_listen,
                file: self.metrics_file,
            },
        }
    }
}

impl TryFrom<RunArgs> for RunSettings {
    type Error = anyhow::Error;

    fn try_from(args: RunArgs) -> anyhow::Result<Self> {
        // `--no-sync` is a plain init: the secrets' configuration is neither read nor
        // checked.
        let (config, pgdata) = if args.no_sync {
            (None, args.config.pgdata)
        } else {
            let (config, pgdata) = args.config.validate()?;
            (Some(config), pgdata)
        };
        Ok(RunSettings {
            config,
            options: args.options.sync_options(false),
            watch: args.watch.options(pgdata),
            no_watch: args.no_watch,
            exit_on_sync_failure: args.exit_on_sync_failure,
            postmaster: args.postmaster,
            cmd: args.cmd,
        })
    }
}

impl TryFrom<SyncArgs> for SyncSettings {
    type Error = anyhow::Error;

    fn try_from(args: SyncArgs) -> anyhow::Result<Self> {
        Ok(SyncSettings {
            config: args.config.validate()?.0,
            options: args.options.sync_options(args.dry_run),
            format: args.format.into(),
        })
    }
}

impl TryFrom<WatchArgs> for WatchSettings {
    type Error = anyhow::Error;

    fn try_from(args: WatchArgs) -> anyhow::Result<Self> {
        let (config, pgdata) = args.config.validate()?;
        Ok(WatchSettings {
            config,
            options: args.options.sync_options(false),
            watch: args.watch.options(pgdata),
        })
    }
}

impl TryFrom<VerifyArgs> for VerifySettings {
    type Error = anyhow::Error;

    fn try_from(args: VerifyArgs) -> anyhow::Result<Self> {
        Ok(VerifySettings {
            config: args.config.validate()?.0,
            host: args.host,
            owner: args.owner,
            staged: args.staged,
            format: args.format.into(),
        })
    }
}

impl From<HealthArgs> for HealthSettings {
    fn from(args: HealthArgs) -> Self {
        let pgdata = args.config.pgdata.clone();
        HealthSettings {
            // A configuration that does not validate only skips the check of the secret
            // lookup: the state file and the server still decide.
            config: args.config.validate().ok().map(|(config, _)| config),
            pgdata,
            state_dir: args.state_dir,
        }
    }
}

impl TryFrom<StatusArgs> for StatusSettings {
    type Error = anyhow::Error;

    fn try_from(args: StatusArgs) -> anyhow::Result<Self> {
        let (config, pgdata) = args.config.validate()?;
        Ok(StatusSettings {
            config,
            pgdata,
            state_dir: args.state_dir,
            format: args.format.into(),
        })
    }
}

impl From<GenerateArgs> for GenerateSettings {
    fn from(args: GenerateArgs) -> Self {
        GenerateSettings {
            dir: args.dir,
            force: args.force,
            no_backup: args.no_backup,
            backup_only: args.backup_only,
            verify: args.verify,
            list: args.list,
            list_backups: args.list_backups,
            restore: args.restore,
            yes: args.yes,
            keep_backups: args.keep_backups,
            user_secrets_file: args.user_secrets_file,
            non_interactive: args.non_interactive,
            k8s_secret: args.k8s_secret,
            namespace: args.namespace,
            output: args.output,
            overlap: args.overlap,
            twin_suffix: args.twin_suffix,
            named: args.named.into(),
        }
    }
}

impl TryFrom<RotateArgs> for RotateSettings {
    type Error = anyhow::Error;

    fn try_from(args: RotateArgs) -> anyhow::Result<Self> {
        Ok(RotateSettings {
            config: args.config().context(Failure::Config)?,
            dir: args.dir,
            wait: args.wait,
            grace: args.grace,
            force: args.force,
            stage_only: args.stage_only,
            publish_only: args.publish_only,
            abort: args.abort,
        })
    }
}

impl RotateArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let named = self.role_map.named.clone().into();
        let map = RoleMap::new(&self.postgres_user, None, &named, &self.role_map.roles)?;
        Config::new(
            map,
            // The secrets are generate's files, and only those.
            vec![self.dir.join("keys")],
            // Over TCP with passwords only (sockets are refused): no identity switch.
            self.server.clone().connection(&self.pghost, None)?,
            // rotate runs on the host, with no data directory to look at.
            self.server.patroni.at(None),
            // rotate reads the overlap files itself (`rotate::set`).
            false,
            self.twin_suffix.clone(),
        )
    }
}

fn parse_terminate_after(text: &str) -> Result<TerminateAfter, String> {
    crate::session::locks::Blockers::parse_terminate_after(text).map(TerminateAfter)
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("`{text}` must be more than 0"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[test]
    fn rotate_takes_the_server_flags_of_every_other_command_and_its_old_names() {
        let parse = |args: &[&str]| {
            let mut full = vec!["pg-password-sync", "rotate"];
            full.extend(args);
            match Cli::try_parse_from(full).unwrap().command {
                Command::Rotate(args) => (args.pghost, args.server.pgport),
                _ => unreachable!(),
            }
        };
        let new = parse(&["--pghost", "db", "--pgport", "6543"]);
        assert_eq!(new, ("db".to_owned(), "6543".to_owned()));
        assert_eq!(parse(&["--host", "db", "--port", "6543"]), new);
    }

    #[test]
    fn host_lists_target_kinds_patroni_and_the_postmaster_rule_reach_the_settings() {
        let cli = Cli::try_parse_from([
            "pg-password-sync",
            "watch",
            "--pghost",
            "n1,n2,n3",
            "--pgport",
            "5001,5002,5003",
            "--target-session-attrs",
            "read-write",
            "--patroni",
            "on",
        ])
        .unwrap();
        let Command::Watch(args) = cli.command else {
            unreachable!()
        };
        let config = WatchSettings::try_from(args).unwrap().config;
        let ports: Vec<u16> = config.connection.servers.iter().map(|s| s.port).collect();
        assert_eq!(ports, [5001, 5002, 5003]);
        assert_eq!(
            config.connection.servers[2].host,
            crate::config::Host::Tcp("n3".into())
        );
        assert_eq!(config.connection.target, TargetSession::ReadWrite);
        assert_eq!(config.patroni, crate::config::Patroni::On);
        for refused in [
            ["--target-session-attrs", "standby"],
            ["--patroni", "maybe"],
        ] {
            let mut argv = vec!["pg-password-sync", "sync"];
            argv.extend(refused);
            assert!(Cli::try_parse_from(argv).is_err(), "{refused:?}");
        }
        let run = |rule: &[&str]| {
            let mut argv = vec!["pg-password-sync", "run"];
            argv.extend(rule);
            argv.extend(["--", "patroni", "p.yml"]);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Run(args) => RunSettings::try_from(args).unwrap().postmaster,
                _ => unreachable!(),
            }
        };
        assert_eq!(run(&[]), PostmasterRule::Descendant);
        assert_eq!(run(&["--postmaster", "cmd"]), PostmasterRule::Cmd);
    }

    fn parse(argv: &[&str]) -> Command {
        let mut full = vec!["pg-password-sync"];
        full.extend(argv);
        Cli::try_parse_from(full).unwrap().command
    }

    #[test]
    fn a_configuration_mistake_fails_the_conversion_as_a_configuration_error() {
        let mistakes: [&[&str]; 5] = [
            &["--role", "noequals"],
            &["--role", "a=x", "--role", "a=y"],
            &["--pghost", ""],
            &["--pgport", "1,2", "--pghost", "a,b,c"],
            &["--connect-timeout", "0"],
        ];
        for mistake in mistakes {
            for command in ["sync", "watch", "verify", "status", "run", "rotate"] {
                let mut argv = vec![command];
                argv.extend(mistake);
                let err = match parse(&argv) {
                    Command::Sync(a) => SyncSettings::try_from(a).err(),
                    Command::Watch(a) => WatchSettings::try_from(a).err(),
                    Command::Verify(a) => VerifySettings::try_from(a).err(),
                    Command::Status(a) => StatusSettings::try_from(a).err(),
                    Command::Run(a) => RunSettings::try_from(a).err(),
                    Command::Rotate(a) => RotateSettings::try_from(a).err(),
                    _ => unreachable!(),
                };
                let err = err.unwrap_or_else(|| panic!("{argv:?} was taken"));
                assert_eq!(Failure::of(&err), Some(Failure::Config), "{argv:?}");
            }
        }
        // `run --no-sync` is a plain init: it reads no configuration, so none can be wrong;
        // and `health` still judges the state file.
        let Command::Run(args) = parse(&["run", "--no-sync", "--role", "noequals"]) else {
            unreachable!()
        };
        assert!(RunSettings::try_from(args).unwrap().config.is_none());
        let Command::Health(args) = parse(&["health", "--role", "noequals"]) else {
            unreachable!()
        };
        assert!(HealthSettings::from(args).config.is_none());
    }

    #[test]
    fn the_sync_options_and_rotate_take_their_own_defaults_once() {
        let Command::Sync(args) = parse(&["sync"]) else {
            unreachable!()
        };
        let options = SyncSettings::try_from(args).unwrap().options;
        assert_eq!(Some(options.grace), parse_duration(DEFAULT_GRACE).ok());
        let min = crate::config::DEFAULT_MIN_PASSWORD_LENGTH;
        assert_eq!(options.min_password_length, min);
        let Command::Watch(args) = parse(&["watch", "--grace", "2m", "--min-password-length", "0"])
        else {
            unreachable!()
        };
        let options = WatchSettings::try_from(args).unwrap().options;
        assert_eq!(
            (options.grace, options.min_password_length),
            (Duration::from_secs(120), 0)
        );
        let Command::Rotate(args) = parse(&["rotate", "--dir", "/s", "--grace", "1h"]) else {
            unreachable!()
        };
        let rotate = RotateSettings::try_from(args).unwrap();
        assert_eq!(rotate.grace, Duration::from_secs(3600));
        assert_eq!(rotate.config.secret_dirs, [PathBuf::from("/s/keys")]);
        // No data directory on the host: `auto` is off, and no identity switch.
        assert_eq!(rotate.config.patroni, crate::config::Patroni::Off);
        assert_eq!(rotate.config.connection.sync_identity, None);
        assert!(rotate.config.overlap.is_none());
    }

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

    fn generate(argv: &[&str]) -> GenerateSettings {
        let cmd = GenerateArgs::augment_args(clap::Command::new("generate").no_binary_name(true));
        let matches = cmd.try_get_matches_from(argv).unwrap();
        GenerateArgs::from_arg_matches(&matches).unwrap().into()
    }

    #[test]
    fn every_generate_option_has_a_prefixed_environment_variable() {
        let cmd = GenerateArgs::augment_args(clap::Command::new("generate"));
        let mut seen = 0;
        for arg in cmd.get_arguments() {
            if arg.get_id() == "help" || arg.get_id() == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .and_then(|e| e.to_str())
                .unwrap_or_else(|| panic!("--{} has no environment variable", arg.get_id()));
            // The role names of --overlap share the variables `run` reads.
            let shared = ["APP_DB_USER", "APP_DB_RO_USER", "TEMPORAL_DB_USER"];
            assert!(
                env.starts_with("PG_PASSWORD_SYNC_") || shared.contains(&env),
                "{env}"
            );
            seen += 1;
        }
        assert!(seen >= 15, "only {seen} options");
    }

    #[test]
    fn restore_takes_an_optional_value() {
        assert_eq!(generate(&["--restore"]).restore, Some(None));
        assert_eq!(
            generate(&["--restore", "backup-x"]).restore,
            Some(Some("backup-x".to_owned()))
        );
        assert_eq!(generate(&["--restore="]).restore, Some(Some(String::new())));
        assert_eq!(generate(&[]).dir, PathBuf::from("infra/secrets"));
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

    #[test]
    fn blocker_flags() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["pg-password-sync", "sync"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).map(|cli| cli.command) {
                Ok(Command::Sync(sync)) => Ok(sync.options.blockers.policy()),
                Ok(_) => unreachable!(),
                Err(err) => Err(err),
            }
        };
        let default = parse(&[]).unwrap();
        assert_eq!(default, crate::session::locks::Blockers::default());
        let off = parse(&["--terminate-blockers-after", "off"]).unwrap();
        assert_eq!(off.terminate_after, None);
        let zero = parse(&["--terminate-blockers-after", "0"]).unwrap();
        assert_eq!(zero.terminate_after, None);
        let set = parse(&[
            "--terminate-blockers-after",
            "3s",
            "--lock-wait-timeout",
            "1m",
        ]);
        assert_eq!(
            set.unwrap(),
            crate::session::locks::Blockers {
                lock_wait: Duration::from_secs(60),
                terminate_after: Some(Duration::from_secs(3)),
            }
        );
        assert!(parse(&["--lock-wait-timeout", "0"]).is_err());
        assert!(parse(&["--terminate-blockers-after", "later"]).is_err());
    }
}

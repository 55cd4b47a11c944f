//! Validated configuration: which roles get which secret, and how to reach the server.
//!
//! The second of the two configuration layers: `cli.rs` parses the command line and
//! environment (clap) and builds each command's settings from the validated types here
//! (`RoleMap`, `servers`, `Config::new`), so that every mode (`sync`, `run`, `watch`,
//! `verify`, `health`, `status`, `rotate`) agrees on the role map and the secret lookup
//! rules (ARCHITECTURE.md, "Secret files"), and so that configuration mistakes (a
//! malformed `--role`, a role name PostgreSQL would silently truncate) fail before anything
//! touches the server. In overlap mode the set
//! also holds each twin's password and which login `pg_service.conf` publishes, checked
//! against the password files on every read (`SecretSet`).
//!
//! The server is a list, as libpq reads `PGHOST`/`PGPORT` (`Server`, tried in order, kept
//! only when it is the kind of server `PGTARGETSESSIONATTRS` asks for), so that a command
//! run from outside a cluster finds its leader. In a data directory Patroni manages, the
//! default role map leaves the superuser to Patroni (`Config::synced_roles`): its
//! `pg_rewind` and replication log in with the password in Patroni's configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::unistd::{Gid, Uid, User};

use crate::error::Failure;
use crate::overlap::{self, Pair};
use crate::secret::{self, Secret};
pub use crate::secret::{NamedRoles, RoleSpec, SecretRef};

/// PostgreSQL's identifier limit (NAMEDATALEN - 1); longer names are truncated by the
/// server, which would silently sync the wrong role.
pub const MAX_ROLE_BYTES: usize = 63;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A Unix socket directory (`PGHOST` starting with `/`).
    Socket(PathBuf),
    /// A TCP host name or address.
    Tcp(String),
}

/// One server of the list `PGHOST`/`PGPORT` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: Host,
    pub port: u16,
}

/// The socket directory an empty entry of a `PGHOST` list stands for (libpq's rule: the
/// default), and the default of `--pghost`.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// The superuser role's name, and the database a session opens, unless told otherwise
/// (`POSTGRES_USER`, `PGDATABASE`: the official image's defaults).
pub const DEFAULT_SUPERUSER: &str = "postgres";

/// The port an empty entry of a `PGPORT` list stands for.
pub const DEFAULT_PORT: u16 = 5432;

/// Which server of the list a session may use (`PGTARGETSESSIONATTRS`, libpq's
/// `target_session_attrs`): the first that answers (`Any`), or the first that is not a
/// standby. libpq's `read-only`, `standby` and `prefer-standby` are refused: a password
/// can only be set on a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSession {
    #[default]
    Any,
    /// A session that accepts writes by default.
    ReadWrite,
    /// A server that is not in recovery.
    Primary,
}

impl TargetSession {
    /// Parses libpq's words.
    pub fn parse(text: &str) -> Result<TargetSession, String> {
        match text.trim() {
            "" | "any" => Ok(TargetSession::Any),
            "read-write" => Ok(TargetSession::ReadWrite),
            "primary" => Ok(TargetSession::Primary),
            other @ ("read-only" | "standby" | "prefer-standby") => Err(format!(
                "`{other}` would pick a standby, where no password can be set: use \
                 read-write, primary or any"
            )),
            other => Err(format!(
                "`{other}` is not a target session kind (read-write, primary or any)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetSession::Any => "any",
            TargetSession::ReadWrite => "read-write",
            TargetSession::Primary => "primary",
        }
    }
}

/// Whether the data directory is Patroni's (`--patroni`): `Auto` looks at it on every read
/// of the secrets (`patroni_manages`), the others are the operator's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PatroniRule {
    #[default]
    Auto,
    On,
    Off,
}

impl PatroniRule {
    pub fn parse(text: &str) -> Result<PatroniRule, String> {
        match text.trim() {
            "auto" => Ok(PatroniRule::Auto),
            "on" | "true" | "yes" | "1" => Ok(PatroniRule::On),
            "off" | "false" | "no" | "0" => Ok(PatroniRule::Off),
            other => Err(format!("`{other}` is not auto, on or off")),
        }
    }

    /// What the rule decides for a data directory (`None`: this process has none, as
    /// `rotate` on the host, and `auto` means off).
    pub fn at(self, pgdata: Option<&Path>) -> Patroni {
        match (self, pgdata) {
            (PatroniRule::Auto, Some(pgdata)) => Patroni::Detect(pgdata.to_path_buf()),
            (PatroniRule::Auto, None) | (PatroniRule::Off, _) => Patroni::Off,
            (PatroniRule::On, _) => Patroni::On,
        }
    }
}

/// Whether Patroni manages the server, as `PatroniRule::at` decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Patroni {
    /// Look for Patroni's marks in this data directory on every read of the secrets.
    Detect(PathBuf),
    On,
    Off,
}

/// The OS identity to connect with when started as root (peer authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsIdentity {
    pub uid: Uid,
    pub gid: Gid,
}

/// Which roles get which secret: the superuser and the named roles by default, or an
/// explicit `NAME=FILE` map; checked so that no role is configured twice and no name is
/// one the server would refuse or truncate.
#[derive(Debug, Clone)]
pub struct RoleMap {
    pub roles: Vec<RoleSpec>,
    pub superuser: String,
    pub superuser_secret: SecretRef,
    /// No `--role` was given: the roles are the named defaults, superuser first.
    pub default: bool,
}

impl RoleMap {
    /// `superuser_file` replaces the lookup of `postgres_password` (`POSTGRES_PASSWORD_FILE`);
    /// a non-empty `explicit` map replaces the defaults, and its entry for the superuser,
    /// if any, is the superuser's password source.
    pub fn new(
        superuser: &str,
        superuser_file: Option<PathBuf>,
        named: &NamedRoles,
        explicit: &[String],
    ) -> anyhow::Result<RoleMap> {
        let superuser_default = match superuser_file {
            Some(path) => SecretRef::Path(path),
            None => SecretRef::Name("postgres_password".into()),
        };
        let roles = if explicit.is_empty() {
            let mut roles = vec![RoleSpec {
                name: superuser.to_owned(),
                secret: superuser_default.clone(),
            }];
            roles.extend(
                named
                    .with_secrets()
                    .into_iter()
                    .map(|(name, secret)| RoleSpec {
                        name: name.to_owned(),
                        secret: SecretRef::Name(secret.to_owned()),
                    }),
            );
            roles
        } else {
            explicit
                .iter()
                .map(|spec| parse_role_spec(spec))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        for (i, spec) in roles.iter().enumerate() {
            check_role_name(&spec.name)?;
            if roles[..i].iter().any(|other| other.name == spec.name) {
                bail!("role {:?} is configured twice", spec.name);
            }
        }
        check_role_name(superuser)?;
        let superuser_secret = roles
            .iter()
            .find(|r| r.name == superuser)
            .map_or(superuser_default, |r| r.secret.clone());
        Ok(RoleMap {
            roles,
            superuser: superuser.to_owned(),
            superuser_secret,
            default: explicit.is_empty(),
        })
    }
}

/// Overlap mode's part of the configuration: the twins, and where the published
/// credentials are.
#[derive(Debug, Clone)]
pub struct OverlapConfig {
    /// One per role of the role map except the superuser, in role map order.
    pub pairs: Vec<Pair>,
    /// `pg_service.conf`, looked up like every secret.
    pub service_file: SecretRef,
}

/// One consistent read of every secret file: what a sync applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretSet {
    /// Each login and its password: the role map, then (overlap mode) the twins.
    pub entries: Vec<(RoleSpec, Secret)>,
    /// Overlap mode: each overlapped role's pair, with its published login as
    /// `pg_service.conf` says (empty otherwise).
    pub published: Vec<Pair>,
    /// Overlap mode: `pg_service.conf` as read (its sections say how applications
    /// connect, which `verify --overlap` follows).
    pub service: Option<overlap::service_file::ServiceFile>,
}

/// The default of `--grace` (`sync`, `run`, `watch`, and `rotate`, whose `--wait` must stay
/// below it): the one place it is written.
pub const DEFAULT_GRACE: &str = "15m";

/// The default of `--min-password-length`: far below the 32 characters `generate` writes,
/// far above what a writer that died after a byte or two leaves behind.
pub const DEFAULT_MIN_PASSWORD_LENGTH: usize = 12;

/// How to reach the server: the list `PGHOST`/`PGPORT` name, which of them to use, and how
/// a session logs in.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Tried in order (never empty); see `TargetSession`.
    pub servers: Vec<Server>,
    pub target: TargetSession,
    pub dbname: String,
    /// Per attempt; never zero.
    pub connect_timeout: Duration,
    /// The OS identity a socket connection takes when started as root (`sync_identity`).
    pub sync_identity: Option<OsIdentity>,
}

/// The validated configuration every command that reads secrets or reaches the server
/// runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub roles: Vec<RoleSpec>,
    pub superuser: String,
    pub superuser_secret: SecretRef,
    /// Searched in order: `SECRETS_SOURCE_DIR`, then `KEYS_DIR`.
    pub secret_dirs: Vec<PathBuf>,
    pub connection: Connection,
    pub patroni: Patroni,
    /// No `--role` was given: the roles are the named defaults, superuser first.
    pub default_role_map: bool,
    /// `Some` in overlap mode.
    pub overlap: Option<OverlapConfig>,
    /// Also used with overlap off, to find the twins an earlier overlap mode left.
    pub twin_suffix: String,
}

impl Config {
    /// `map`'s roles, their secrets looked up in `secret_dirs` (in order), the server
    /// `connection` reaches; in overlap mode (`overlap`) every role but the superuser is
    /// paired with a twin named with `twin_suffix`. The caller classifies the errors (a
    /// mistake in the configuration: `Failure::Config`).
    pub fn new(
        map: RoleMap,
        secret_dirs: Vec<PathBuf>,
        connection: Connection,
        patroni: Patroni,
        overlap: bool,
        twin_suffix: String,
    ) -> anyhow::Result<Config> {
        if connection.connect_timeout.is_zero() {
            bail!("--connect-timeout must be more than 0");
        }
        let overlap = if overlap {
            Some(overlap_config(&map.roles, &map.superuser, &twin_suffix)?)
        } else {
            None
        };
        Ok(Config {
            roles: map.roles,
            superuser: map.superuser,
            superuser_secret: map.superuser_secret,
            secret_dirs,
            connection,
            patroni,
            default_role_map: map.default,
            overlap,
            twin_suffix,
        })
    }

    /// How long opening a session may take in all: the connect timeout for each server of
    /// the list (libpq bounds each host's attempt, not the whole).
    pub fn connect_budget(&self) -> Duration {
        let servers = u32::try_from(self.connection.servers.len()).unwrap_or(u32::MAX);
        self.connection
            .connect_timeout
            .saturating_mul(servers.max(1))
    }

    /// The file a secret reference points at now (lookups are repeated on every read,
    /// because a rotation may add `NAME` beside `NAME.txt`).
    pub fn resolve(&self, secret: &SecretRef) -> anyhow::Result<PathBuf> {
        match secret {
            SecretRef::Path(path) => Ok(path.clone()),
            SecretRef::Name(name) => {
                let dirs: Vec<&Path> = self.secret_dirs.iter().map(PathBuf::as_path).collect();
                secret::locate(name, &dirs).map_err(|tried| {
                    let tried: Vec<String> =
                        tried.iter().map(|p| p.display().to_string()).collect();
                    anyhow::anyhow!("secret file {name} not found (tried {})", tried.join(", "))
                })
            }
        }
    }

    /// Reads and validates every secret: each role's, and in overlap mode each twin's and
    /// the published credentials, which must agree with the password files. The first
    /// problem fails the whole set (`Failure::Config`). Besides the file rules of
    /// `secret.rs`, every password (role or twin) must be at least `min_length`
    /// characters (`0`: any length): a writer that died after a byte must not leave a
    /// one-character password in force.
    pub fn load_secrets(&self, min_length: usize) -> anyhow::Result<SecretSet> {
        self.load_set(min_length).context(Failure::Config)
    }

    fn load_set(&self, min_length: usize) -> anyhow::Result<SecretSet> {
        let read = |spec: &RoleSpec, what: &str| -> anyhow::Result<(RoleSpec, Secret)> {
            let secret = self
                .resolve(&spec.secret)
                .and_then(|path| {
                    let secret = secret::read_file(&path)?;
                    check_length(&secret, min_length)
                        .with_context(|| format!("secret file {}", path.display()))?;
                    Ok(secret)
                })
                .with_context(|| format!("secret for {what} {:?}", spec.name))?;
            Ok((spec.clone(), secret))
        };
        let mut entries = self
            .synced_roles()
            .into_iter()
            .map(|spec| read(spec, "role"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // With no role to overlap (only the superuser), there is nothing to publish.
        let Some(overlap) = self.overlap.as_ref().filter(|o| !o.pairs.is_empty()) else {
            return Ok(SecretSet {
                entries,
                published: Vec::new(),
                service: None,
            });
        };
        for pair in &overlap.pairs {
            entries.push(read(&pair.twin_spec(), "twin login")?);
        }
        let path = self.resolve(&overlap.service_file)?;
        let file = overlap::read_service_file(&path)?;
        let published = overlap::check_published(&path, &file, &overlap.pairs, &entries)?;
        Ok(SecretSet {
            entries,
            published,
            service: Some(file),
        })
    }

    /// Whether the superuser is left to Patroni: the role map is the default one and the
    /// data directory is Patroni's (`--patroni`, or by default its marks: `patroni`).
    pub fn superuser_left_to_patroni(&self) -> bool {
        self.default_role_map && self.patroni_manages().is_some()
    }

    /// Why the data directory counts as Patroni's, if it does.
    fn patroni_manages(&self) -> Option<&'static str> {
        match &self.patroni {
            Patroni::On => Some("--patroni on"),
            Patroni::Off => None,
            Patroni::Detect(pgdata) => crate::patroni::manages(pgdata),
        }
    }

    /// The roles a sync applies and `verify` checks: the role map, without the superuser
    /// when it is left to Patroni. Said once in the log, as is a superuser mapped
    /// explicitly where Patroni manages the server (its password is Patroni's to know).
    pub fn synced_roles(&self) -> Vec<&RoleSpec> {
        let left = self.superuser_left_to_patroni();
        if left {
            static TOLD: std::sync::Once = std::sync::Once::new();
            TOLD.call_once(|| {
                tracing::info!(
                    "PGDATA is managed by Patroni ({}): the superuser {:?} is left to \
                     Patroni, as are its replication and rewind roles (Patroni logs in \
                     with the passwords of its own configuration); map it with --role to \
                     rotate it here (docs/clusters.md)",
                    self.patroni_manages().unwrap_or_default(),
                    self.superuser
                );
            });
        } else if !self.default_role_map
            && self.roles.iter().any(|r| r.name == self.superuser)
            && let Some(why) = self.patroni_manages()
        {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "PGDATA is managed by Patroni ({why}) and the role map names the \
                     superuser {:?}: give Patroni the same password (its \
                     postgresql.authentication), or its pg_rewind and replicas cannot log in \
                     (docs/clusters.md)",
                    self.superuser
                );
            });
        }
        self.roles
            .iter()
            .filter(|r| !(left && r.name == self.superuser))
            .collect()
    }

    /// Overlap mode's pairs (none when it is off).
    pub fn pairs(&self) -> &[Pair] {
        self.overlap.as_ref().map_or(&[], |o| o.pairs.as_slice())
    }

    /// Every login whose password the sync sets: the role map, then (overlap mode) each
    /// twin.
    pub fn logins(&self) -> Vec<String> {
        let mut all: Vec<String> = self.roles.iter().map(|r| r.name.clone()).collect();
        all.extend(self.pairs().iter().map(|p| p.twin.clone()));
        all
    }

    /// Every file a sync reads, labelled with the login (or, for the service file, the
    /// file's name): the role map, then in overlap mode the twins and `pg_service.conf`.
    pub fn secret_files(&self) -> Vec<(String, SecretRef)> {
        let mut files: Vec<(String, SecretRef)> = self
            .roles
            .iter()
            .map(|r| (r.name.clone(), r.secret.clone()))
            .collect();
        if let Some(overlap) = &self.overlap {
            files.extend(
                overlap
                    .pairs
                    .iter()
                    .map(|p| (p.twin.clone(), p.twin_secret.clone())),
            );
            files.push((
                overlap::SERVICE_FILE.to_owned(),
                overlap.service_file.clone(),
            ));
        }
        files
    }

    /// The superuser's password from its file, if such a file exists.
    pub fn superuser_password(&self) -> Option<anyhow::Result<Secret>> {
        let path = self.resolve(&self.superuser_secret).ok()?;
        Some(secret::read_file(&path))
    }

    /// Every directory that can hold a configured secret (what `watch` observes).
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.secret_dirs.clone();
        let files = self.secret_files();
        for spec in files
            .iter()
            .map(|(_, secret)| secret)
            .chain(std::iter::once(&self.superuser_secret))
        {
            if let SecretRef::Path(path) = spec
                && let Some(parent) = path.parent()
                && !dirs.iter().any(|d| d == parent)
            {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs
    }
}

/// The servers of `PGHOST`/`PGPORT`, as libpq reads them: comma-separated hosts (a socket
/// directory starts with `/`; an empty entry is the default socket directory) and either
/// one port for all of them or one per host (an empty entry is 5432). A wholly empty
/// `PGHOST` is refused: it would silently mean the default.
pub fn servers(hosts: &str, ports: &str) -> anyhow::Result<Vec<Server>> {
    if hosts.trim().is_empty() {
        bail!("PGHOST is empty");
    }
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    let ports: Vec<u16> = ports
        .split(',')
        .map(|port| match port.trim() {
            "" => Ok(DEFAULT_PORT),
            text => text
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| anyhow::anyhow!("PGPORT {text:?} is not a port number")),
        })
        .collect::<anyhow::Result<_>>()?;
    if ports.len() != 1 && ports.len() != hosts.len() {
        bail!(
            "PGPORT lists {} ports for {} hosts: give one port for all, or one per host",
            ports.len(),
            hosts.len()
        );
    }
    Ok(hosts
        .iter()
        .enumerate()
        .map(|(i, host)| Server {
            host: match *host {
                "" => Host::Socket(PathBuf::from(DEFAULT_SOCKET_DIR)),
                dir if dir.starts_with('/') => Host::Socket(PathBuf::from(dir)),
                name => Host::Tcp(name.to_owned()),
            },
            port: ports[if ports.len() == 1 { 0 } else { i }],
        })
        .collect())
}

/// The twins of every role but the superuser. A twin named like a configured role (or
/// another twin) is refused: one login cannot have two password files.
fn overlap_config(
    roles: &[RoleSpec],
    superuser: &str,
    suffix: &str,
) -> anyhow::Result<OverlapConfig> {
    let mut pairs: Vec<Pair> = Vec::new();
    for role in roles.iter().filter(|r| r.name != superuser) {
        let pair = Pair::of(role, suffix).context("--overlap")?;
        if roles.iter().any(|r| r.name == pair.twin) || pairs.iter().any(|p| p.twin == pair.twin) {
            bail!(
                "--overlap: the twin login {:?} of role {:?} is also a configured role",
                pair.twin,
                role.name
            );
        }
        pairs.push(pair);
    }
    Ok(OverlapConfig {
        pairs,
        service_file: SecretRef::Name(overlap::SERVICE_FILE.to_owned()),
    })
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

/// Refuses a value shorter than `min` characters. The message gives lengths, never the value.
pub fn check_length(secret: &Secret, min: usize) -> anyhow::Result<()> {
    let length = secret.expose().chars().count();
    if length < min {
        bail!(
            "is {length} character(s) long, shorter than the minimum of {min} \
             (--min-password-length); a half-written or truncated file?"
        );
    }
    Ok(())
}

/// Parses `--role NAME=FILE`.
pub fn parse_role_spec(spec: &str) -> anyhow::Result<RoleSpec> {
    let Some((name, file)) = spec.split_once('=') else {
        bail!("--role {spec:?} is not of the form NAME=FILE");
    };
    if name.is_empty() || file.is_empty() {
        bail!("--role {spec:?} is not of the form NAME=FILE");
    }
    let secret = if file.contains('/') {
        SecretRef::Path(PathBuf::from(file))
    } else {
        SecretRef::Name(file.to_owned())
    };
    Ok(RoleSpec {
        name: name.to_owned(),
        secret,
    })
}

/// Rejects names the server would refuse or silently truncate, and names with control
/// characters: PostgreSQL would accept `appuser\n` as a distinct role, so a value that
/// kept a trailing newline (a Kubernetes value can) would sync nothing for the real role
/// while every report looked fine, and the raw character would break log lines. Names are
/// shown with `{:?}`, which escapes such characters, never raw.
pub fn check_role_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("a role name is empty");
    }
    if name.contains('\0') {
        bail!("role name {name:?} contains a NUL byte");
    }
    if name.chars().any(char::is_control) {
        bail!(
            "role name {name:?} contains a control character (a newline, tab, escape, …); \
             check the value for a stray trailing newline"
        );
    }
    if name.len() > MAX_ROLE_BYTES {
        bail!(
            "role name {name:?} is {} bytes long; PostgreSQL allows at most {MAX_ROLE_BYTES}",
            name.len()
        );
    }
    Ok(())
}

/// Started as root, the sync connects as an unprivileged OS user so that `peer`
/// authentication maps it to the superuser role (the image's `local all postgres peer`).
pub fn sync_identity(requested: Option<&str>) -> anyhow::Result<Option<OsIdentity>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = requested.unwrap_or("postgres");
    match User::from_name(name).with_context(|| format!("looking up OS user {name:?}"))? {
        Some(user) if user.uid.is_root() => Ok(None),
        Some(user) => Ok(Some(OsIdentity {
            uid: user.uid,
            gid: user.gid,
        })),
        None if requested.is_some() => bail!("--sync-user: no OS user named {name:?}"),
        None => Ok(None),
    }
}

/// The command line's defaults as tests need them: the named roles of the replaced
/// scripts.
#[cfg(test)]
pub fn test_named_roles() -> NamedRoles {
    NamedRoles {
        app: "appuser".into(),
        read_only: "backupuser".into(),
        temporal: None,
    }
}

/// A `Config` with the command line's defaults and no identity switch, for tests that
/// need one without a command line.
#[cfg(test)]
pub fn test_config() -> Config {
    config_of(test_role_map(), false)
}

/// The default role map.
#[cfg(test)]
pub fn test_role_map() -> RoleMap {
    RoleMap::new("postgres", None, &test_named_roles(), &[]).expect("valid")
}

/// `map` (in overlap mode when `overlap`) with the command line's defaults for everything
/// else.
#[cfg(test)]
pub fn config_of(map: RoleMap, overlap: bool) -> Config {
    let connection = Connection {
        servers: servers(DEFAULT_SOCKET_DIR, &DEFAULT_PORT.to_string()).expect("valid"),
        target: TargetSession::Any,
        dbname: "postgres".into(),
        connect_timeout: Duration::from_secs(5),
        sync_identity: None,
    };
    let dirs = vec!["/run/secrets".into(), "/app/keys".into()];
    let suffix = overlap::DEFAULT_TWIN_SUFFIX.into();
    Config::new(map, dirs, connection, Patroni::Off, overlap, suffix).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The role map of the defaults with `named` changed, or of `explicit`.
    fn map(explicit: &[&str], change: impl FnOnce(&mut NamedRoles)) -> anyhow::Result<RoleMap> {
        let mut named = test_named_roles();
        change(&mut named);
        let explicit: Vec<String> = explicit.iter().map(|s| (*s).to_owned()).collect();
        RoleMap::new("postgres", None, &named, &explicit)
    }

    fn names(roles: &[RoleSpec]) -> Vec<&str> {
        roles.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn short_values_are_refused_by_length_in_characters() {
        let secret = |v: &str| Secret::new(v.to_owned());
        assert!(check_length(&secret("123456789012"), 12).is_ok());
        // Characters, not bytes: twelve two-byte characters are long enough.
        assert!(check_length(&secret(&"ü".repeat(12)), 12).is_ok());
        let msg = format!("{:#}", check_length(&secret("F"), 12).unwrap_err());
        assert!(
            msg.contains("1 character(s)") && msg.contains("12"),
            "{msg}"
        );
        assert!(
            check_length(&secret("F"), 0).is_ok(),
            "0 turns the check off"
        );
    }

    #[test]
    fn load_secrets_names_the_short_file_and_never_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config_of(map(&["appuser=app_pw"], |_| {}).unwrap(), false);
        c.secret_dirs = vec![dir.path().to_path_buf()];
        std::fs::write(dir.path().join("app_pw.txt"), "Fx\n").unwrap();
        let err = c.load_secrets(DEFAULT_MIN_PASSWORD_LENGTH).unwrap_err();
        let msg = format!("{err:#}");
        assert_eq!(Failure::of(&err), Some(Failure::Config));
        assert!(
            msg.contains("app_pw.txt") && msg.contains("minimum"),
            "{msg}"
        );
        assert!(!msg.contains("Fx"), "{msg}");
        assert_eq!(c.load_secrets(0).unwrap().entries[0].1.expose(), "Fx");
        std::fs::write(dir.path().join("app_pw.txt"), "long enough value\n").unwrap();
        let set = c.load_secrets(DEFAULT_MIN_PASSWORD_LENGTH).unwrap();
        assert_eq!(set.entries[0].1.expose(), "long enough value");
    }

    #[test]
    fn default_roles_and_optional_temporal() {
        assert_eq!(
            names(&map(&[], |_| {}).unwrap().roles),
            ["postgres", "appuser", "backupuser"]
        );
        let m = map(&[], |n| {
            n.temporal = Some("temporaluser".into());
            n.app = "app".into();
        })
        .unwrap();
        assert_eq!(
            names(&m.roles),
            ["postgres", "app", "backupuser", "temporaluser"]
        );
        assert_eq!(
            m.roles[3].secret,
            SecretRef::Name("postgres_temporal_pw".into())
        );
        let empty = map(&[], |n| n.temporal = Some(String::new())).unwrap();
        assert_eq!(names(&empty.roles), ["postgres", "appuser", "backupuser"]);
    }

    #[test]
    fn password_file_is_the_superuser_source() {
        let file = Some(PathBuf::from("/run/secrets/pw"));
        let m = RoleMap::new("postgres", file, &test_named_roles(), &[]).unwrap();
        assert_eq!(m.roles[0].secret, SecretRef::Path("/run/secrets/pw".into()));
        assert_eq!(
            m.superuser_secret,
            SecretRef::Path("/run/secrets/pw".into())
        );
        assert!(
            config_of(m, false)
                .watched_dirs()
                .contains(&PathBuf::from("/run/secrets"))
        );
    }

    #[test]
    fn explicit_role_map_replaces_defaults() {
        let m = map(&["My Role=my_pw", "x=/etc/k/x.txt"], |_| {}).unwrap();
        assert_eq!(names(&m.roles), ["My Role", "x"]);
        assert!(!m.default);
        assert_eq!(m.roles[1].secret, SecretRef::Path("/etc/k/x.txt".into()));
        assert_eq!(
            m.superuser_secret,
            SecretRef::Name("postgres_password".into())
        );
    }

    #[test]
    fn bad_role_specs_are_refused() {
        for bad in [
            "noequals",
            "=file",
            "name=",
            &format!("{}=f", "r".repeat(64)),
        ] {
            assert!(map(&[bad], |_| {}).is_err(), "{bad}");
        }
        assert!(map(&[&format!("{}=f", "r".repeat(63))], |_| {}).is_ok());
        assert!(map(&["a=x", "a=y"], |_| {}).is_err());
    }

    #[test]
    fn control_characters_in_role_names_are_refused_and_shown_escaped() {
        for bad in [
            "appuser\n",
            "app\tuser",
            "app\x1b[31muser",
            "app\u{85}user",
            "\r",
        ] {
            let refused = [
                map(&[], |n| n.app = bad.into()),
                map(&[], |n| n.temporal = Some(bad.into())),
                RoleMap::new(bad, None, &test_named_roles(), &[]),
                map(&[&format!("{bad}=f")], |_| {}),
            ];
            for err in refused.into_iter().map(Result::unwrap_err) {
                let text = format!("{err:#}");
                assert!(text.contains("control character"), "{text}");
                assert!(text.contains(&format!("{bad:?}")), "{text}");
                assert!(!text.chars().any(char::is_control), "raw: {text:?}");
            }
        }
        // Printable Unicode, spaces and quotes stay allowed.
        assert!(map(&["Rôle \"x\" y=f"], |_| {}).is_ok());
    }

    #[test]
    fn unusable_connection_settings_are_refused() {
        let mut zero = test_config().connection;
        zero.connect_timeout = Duration::ZERO;
        let m = map(&[], |_| {}).unwrap();
        let suffix = overlap::DEFAULT_TWIN_SUFFIX.to_owned();
        assert!(Config::new(m, Vec::new(), zero, Patroni::Off, false, suffix).is_err());
        assert!(servers("", "5432").is_err());
        for (hosts, ports) in [("a,b,c", "1,2"), ("a", "x"), ("a", "0"), ("a,b", "70000,1")] {
            assert!(servers(hosts, ports).is_err(), "{hosts} {ports}");
        }
    }

    #[test]
    fn host_lists_pair_with_ports_as_libpq_does() {
        let tcp = |host: &str, port| Server {
            host: Host::Tcp(host.into()),
            port,
        };
        assert_eq!(
            servers("n1,n2,n3", "5433").unwrap(),
            [tcp("n1", 5433), tcp("n2", 5433), tcp("n3", 5433)]
        );
        assert_eq!(
            servers("n1, n2", "6001,").unwrap(),
            [tcp("n1", 6001), tcp("n2", DEFAULT_PORT)]
        );
        assert_eq!(
            servers("/s,,db", "1,2,3").unwrap(),
            [
                Server {
                    host: Host::Socket("/s".into()),
                    port: 1
                },
                Server {
                    host: Host::Socket(DEFAULT_SOCKET_DIR.into()),
                    port: 2
                },
                tcp("db", 3)
            ]
        );
        assert!(servers("a,b", "1,2,3").is_err());
        assert_eq!(servers("db", "5432").unwrap(), [tcp("db", 5432)]);
    }

    #[test]
    fn target_session_kinds_are_libpqs_words_that_reach_a_primary() {
        assert_eq!(TargetSession::parse("any"), Ok(TargetSession::Any));
        assert_eq!(TargetSession::parse(""), Ok(TargetSession::Any));
        assert_eq!(
            TargetSession::parse("read-write"),
            Ok(TargetSession::ReadWrite)
        );
        assert_eq!(TargetSession::parse("primary"), Ok(TargetSession::Primary));
        for refused in ["read-only", "standby", "prefer-standby", "leader"] {
            assert!(TargetSession::parse(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn the_superuser_is_left_to_patroni_only_with_the_default_map() {
        let dir = tempfile::tempdir().unwrap();
        let at = |rule: PatroniRule, roles: &[&str]| {
            let mut c = config_of(map(roles, |_| {}).unwrap(), false);
            c.patroni = rule.at(Some(dir.path()));
            let names: Vec<String> = c.synced_roles().iter().map(|r| r.name.clone()).collect();
            names
        };
        let all = ["postgres", "appuser", "backupuser"];
        assert_eq!(at(PatroniRule::Auto, &[]), all, "no mark: a plain server");
        assert_eq!(at(PatroniRule::On, &[]), ["appuser", "backupuser"]);
        std::fs::write(dir.path().join("patroni.dynamic.json"), "{}").unwrap();
        assert_eq!(at(PatroniRule::Auto, &[]), ["appuser", "backupuser"]);
        assert_eq!(at(PatroniRule::Off, &[]), all, "the operator's override");
        // Mapped explicitly: the operator's choice.
        assert_eq!(
            at(PatroniRule::Auto, &["postgres=pw", "app=app_pw"]),
            ["postgres", "app"]
        );
        // Without a data directory (rotate), `auto` is off.
        assert_eq!(PatroniRule::Auto.at(None), Patroni::Off);
        assert_eq!(PatroniRule::On.at(None), Patroni::On);
    }

    fn overlapped(explicit: &[&str]) -> anyhow::Result<Config> {
        let c = test_config();
        let m = map(explicit, |_| {})?;
        Config::new(
            m,
            c.secret_dirs,
            c.connection,
            Patroni::Off,
            true,
            c.twin_suffix,
        )
    }

    #[test]
    fn overlap_twins_every_role_but_the_superuser() {
        let c = overlapped(&[]).unwrap();
        let pairs = &c.overlap.as_ref().unwrap().pairs;
        let logins: Vec<&str> = pairs.iter().map(|p| p.twin.as_str()).collect();
        assert_eq!(logins, ["appuser_alt", "backupuser_alt"]);
        assert_eq!(
            pairs[0].twin_secret,
            SecretRef::Name("postgres_app_user_alt_pw".into())
        );
        let files: Vec<String> = c.secret_files().into_iter().map(|(l, _)| l).collect();
        assert_eq!(
            files,
            [
                "postgres",
                "appuser",
                "backupuser",
                "appuser_alt",
                "backupuser_alt",
                "pg_service.conf"
            ]
        );
        // A twin name over 63 bytes, or one colliding with a role, is refused.
        let long = format!("{}=f", "r".repeat(60));
        let err = overlapped(&[&long]).unwrap_err();
        assert!(format!("{err:#}").contains("64 bytes"), "{err:#}");
        assert!(overlapped(&["a=x", "a_alt=y"]).is_err());
        // Off: no twins, and the long name does not matter.
        assert!(map(&[&long], |_| {}).is_ok());
    }
}

//! Validated configuration: which roles get which secret, and how to reach the server.
//!
//! Built once from the settings the command line and environment gave (`ConfigSettings`,
//! filled in by `cli.rs`) so that every mode (`sync`, `run`, `watch`, `verify`, `health`)
//! agrees on the role map and the secret lookup rules (ARCHITECTURE.md, "Secret files"), and
//! so that configuration mistakes (a malformed `--role`, a role name PostgreSQL would
//! silently truncate) fail before anything touches the server. In overlap mode the set
//! also holds each twin's password and which login `pg_service.conf` publishes, checked
//! against the password files on every read (`SecretSet`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::unistd::{Gid, Uid, User};

use crate::error::Failure;
use crate::overlap::{self, Pair};
use crate::secret::{self, Secret};
pub use crate::secret::{RoleSpec, SecretRef};

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

/// The OS identity to connect with when started as root (peer authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsIdentity {
    pub uid: Uid,
    pub gid: Gid,
}

/// The configuration as given, before validation: one field per option of `ConfigArgs`
/// in `cli.rs` (see there for what each means and its default).
#[derive(Debug, Clone)]
pub struct ConfigSettings {
    pub keys_dir: PathBuf,
    pub secrets_source_dir: PathBuf,
    pub postgres_user: String,
    pub postgres_password_file: Option<PathBuf>,
    pub app_db_user: String,
    pub app_db_ro_user: String,
    pub temporal_db_user: Option<String>,
    /// `NAME=FILE` entries; when any is given they replace the default roles.
    pub roles: Vec<String>,
    pub pghost: String,
    pub pgport: u16,
    pub pgdata: PathBuf,
    pub dbname: String,
    pub sync_user: Option<String>,
    pub connect_timeout: Duration,
    /// Overlap mode: every role but the superuser gets a twin login.
    pub overlap: bool,
    pub twin_suffix: String,
    /// How long a login that stopped being published keeps working.
    pub grace: Duration,
    /// Shortest role password accepted, in characters (`0` = no minimum).
    pub min_password_length: usize,
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
/// below it).
pub const DEFAULT_GRACE: &str = "15m";

/// The default of `--min-password-length`: far below the 32 characters `generate` writes,
/// far above what a writer that died after a byte or two leaves behind.
pub const DEFAULT_MIN_PASSWORD_LENGTH: usize = 12;

#[derive(Debug, Clone)]
pub struct Config {
    pub roles: Vec<RoleSpec>,
    pub superuser: String,
    pub superuser_secret: SecretRef,
    /// Searched in order: `SECRETS_SOURCE_DIR`, then `KEYS_DIR`.
    pub secret_dirs: Vec<PathBuf>,
    pub host: Host,
    pub port: u16,
    pub pgdata: PathBuf,
    pub dbname: String,
    pub sync_identity: Option<OsIdentity>,
    pub connect_timeout: Duration,
    /// `Some` in overlap mode.
    pub overlap: Option<OverlapConfig>,
    /// Also used with overlap off, to find the twins an earlier overlap mode left.
    pub twin_suffix: String,
    pub grace: Duration,
    /// Shortest role password accepted, in characters (`0` = no minimum).
    pub min_password_length: usize,
}

impl Config {
    /// Validates the settings. Errors are `Failure::Config`.
    pub fn from_settings(args: &ConfigSettings) -> anyhow::Result<Config> {
        Self::build(args).context(Failure::Config)
    }

    fn build(args: &ConfigSettings) -> anyhow::Result<Config> {
        let superuser_default = match &args.postgres_password_file {
            Some(path) => SecretRef::Path(path.clone()),
            None => SecretRef::Name("postgres_password".into()),
        };
        let roles = if args.roles.is_empty() {
            let mut roles = vec![
                RoleSpec {
                    name: args.postgres_user.clone(),
                    secret: superuser_default.clone(),
                },
                role(&args.app_db_user, "postgres_app_user_pw"),
                role(&args.app_db_ro_user, "postgres_app_ro_pw"),
            ];
            if let Some(user) = args.temporal_db_user.as_deref().filter(|u| !u.is_empty()) {
                roles.push(role(user, "postgres_temporal_pw"));
            }
            roles
        } else {
            args.roles
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
        check_role_name(&args.postgres_user)?;
        // With an explicit map, the superuser's own entry (if any) is its password source.
        let superuser_secret = roles
            .iter()
            .find(|r| r.name == args.postgres_user)
            .map_or(superuser_default, |r| r.secret.clone());
        if args.connect_timeout.is_zero() {
            bail!("--connect-timeout must be more than 0");
        }
        if args.pghost.contains(',') {
            bail!("PGHOST lists several hosts; give exactly one socket directory or host");
        }
        let overlap = if args.overlap {
            Some(overlap_config(
                &roles,
                &args.postgres_user,
                &args.twin_suffix,
            )?)
        } else {
            None
        };
        let host = if args.pghost.starts_with('/') {
            Host::Socket(PathBuf::from(&args.pghost))
        } else if args.pghost.is_empty() {
            bail!("PGHOST is empty");
        } else {
            Host::Tcp(args.pghost.clone())
        };
        Ok(Config {
            roles,
            superuser: args.postgres_user.clone(),
            superuser_secret,
            secret_dirs: vec![args.secrets_source_dir.clone(), args.keys_dir.clone()],
            host,
            port: args.pgport,
            pgdata: args.pgdata.clone(),
            dbname: args.dbname.clone(),
            sync_identity: sync_identity(args.sync_user.as_deref())?,
            connect_timeout: args.connect_timeout,
            overlap,
            twin_suffix: args.twin_suffix.clone(),
            grace: args.grace,
            min_password_length: args.min_password_length,
        })
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
    /// `secret.rs`, every password (role or twin) must be at least `min_password_length`
    /// characters: a writer that died after a byte must not leave a one-character password
    /// in force.
    pub fn load_secrets(&self) -> anyhow::Result<SecretSet> {
        self.load_set().context(Failure::Config)
    }

    fn load_set(&self) -> anyhow::Result<SecretSet> {
        let read = |spec: &RoleSpec, what: &str| -> anyhow::Result<(RoleSpec, Secret)> {
            let secret = self
                .resolve(&spec.secret)
                .and_then(|path| {
                    let secret = secret::read_file(&path)?;
                    check_length(&secret, self.min_password_length)
                        .with_context(|| format!("secret file {}", path.display()))?;
                    Ok(secret)
                })
                .with_context(|| format!("secret for {what} {:?}", spec.name))?;
            Ok((spec.clone(), secret))
        };
        let mut entries = self
            .roles
            .iter()
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

fn role(name: &str, secret: &str) -> RoleSpec {
    RoleSpec {
        name: name.to_owned(),
        secret: SecretRef::Name(secret.to_owned()),
    }
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
fn sync_identity(requested: Option<&str>) -> anyhow::Result<Option<OsIdentity>> {
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

/// The command line's defaults with `--sync-user root` (no identity switch), for tests
/// that need a `Config` without a command line.
#[cfg(test)]
pub fn test_settings() -> ConfigSettings {
    ConfigSettings {
        keys_dir: "/app/keys".into(),
        secrets_source_dir: "/run/secrets".into(),
        postgres_user: "postgres".into(),
        postgres_password_file: None,
        app_db_user: "appuser".into(),
        app_db_ro_user: "backupuser".into(),
        temporal_db_user: None,
        roles: Vec::new(),
        pghost: "/var/run/postgresql".into(),
        pgport: 5432,
        pgdata: "/var/lib/postgresql/data".into(),
        dbname: "postgres".into(),
        sync_user: Some("root".into()),
        connect_timeout: Duration::from_secs(5),
        overlap: false,
        twin_suffix: overlap::DEFAULT_TWIN_SUFFIX.into(),
        grace: parse_duration(DEFAULT_GRACE).unwrap(),
        min_password_length: DEFAULT_MIN_PASSWORD_LENGTH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(change: impl FnOnce(&mut ConfigSettings)) -> anyhow::Result<Config> {
        let mut settings = test_settings();
        change(&mut settings);
        Config::from_settings(&settings)
    }

    fn roles(specs: &[&str]) -> impl FnOnce(&mut ConfigSettings) {
        let specs: Vec<String> = specs.iter().map(|s| (*s).to_owned()).collect();
        move |s| s.roles = specs
    }

    fn names(config: &Config) -> Vec<&str> {
        config.roles.iter().map(|r| r.name.as_str()).collect()
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
        let mut settings = test_settings();
        settings.keys_dir = dir.path().to_path_buf();
        settings.roles = vec!["appuser=app_pw".into()];
        let c = Config::from_settings(&settings).unwrap();
        std::fs::write(dir.path().join("app_pw.txt"), "Fx\n").unwrap();
        let err = c.load_secrets().unwrap_err();
        let msg = format!("{err:#}");
        assert_eq!(Failure::of(&err), Some(Failure::Config));
        assert!(
            msg.contains("app_pw.txt") && msg.contains("minimum"),
            "{msg}"
        );
        assert!(!msg.contains("Fx"), "{msg}");
        std::fs::write(dir.path().join("app_pw.txt"), "long enough value\n").unwrap();
        let set = c.load_secrets().unwrap();
        assert_eq!(set.entries[0].1.expose(), "long enough value");
    }

    #[test]
    fn default_roles_and_optional_temporal() {
        let c = config(|_| {}).unwrap();
        assert_eq!(names(&c), ["postgres", "appuser", "backupuser"]);
        let c = config(|s| {
            s.temporal_db_user = Some("temporaluser".into());
            s.app_db_user = "app".into();
        })
        .unwrap();
        assert_eq!(names(&c), ["postgres", "app", "backupuser", "temporaluser"]);
        assert_eq!(
            c.roles[3].secret,
            SecretRef::Name("postgres_temporal_pw".into())
        );
    }

    #[test]
    fn password_file_is_the_superuser_source() {
        let c = config(|s| s.postgres_password_file = Some("/run/secrets/pw".into())).unwrap();
        assert_eq!(c.roles[0].secret, SecretRef::Path("/run/secrets/pw".into()));
        assert_eq!(
            c.superuser_secret,
            SecretRef::Path("/run/secrets/pw".into())
        );
        assert!(c.watched_dirs().contains(&PathBuf::from("/run/secrets")));
    }

    #[test]
    fn explicit_role_map_replaces_defaults() {
        let c = config(roles(&["My Role=my_pw", "x=/etc/k/x.txt"])).unwrap();
        assert_eq!(names(&c), ["My Role", "x"]);
        assert_eq!(c.roles[1].secret, SecretRef::Path("/etc/k/x.txt".into()));
        assert_eq!(
            c.superuser_secret,
            SecretRef::Name("postgres_password".into())
        );
    }

    #[test]
    fn bad_role_specs_are_config_errors() {
        for bad in [
            "noequals",
            "=file",
            "name=",
            &format!("{}=f", "r".repeat(64)),
        ] {
            let err = config(roles(&[bad])).unwrap_err();
            assert_eq!(Failure::of(&err), Some(Failure::Config), "{bad}");
        }
        assert!(config(roles(&[&format!("{}=f", "r".repeat(63))])).is_ok());
        assert!(config(roles(&["a=x", "a=y"])).is_err());
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
            let settings: [fn(&mut ConfigSettings, &str); 3] = [
                |s, bad| s.app_db_user = bad.into(),
                |s, bad| s.postgres_user = bad.into(),
                |s, bad| s.temporal_db_user = Some(bad.into()),
            ];
            for set in settings {
                let err = config(|s| set(s, bad)).unwrap_err();
                assert_eq!(Failure::of(&err), Some(Failure::Config), "{bad:?}");
                let text = format!("{err:#}");
                assert!(text.contains("control character"), "{text}");
                assert!(text.contains(&format!("{bad:?}")), "{text}");
                assert!(!text.chars().any(char::is_control), "raw: {text:?}");
            }
            let spec = format!("{bad}=f");
            assert!(config(roles(&[&spec])).is_err(), "{bad:?}");
        }
        // Printable Unicode, spaces and quotes stay allowed.
        assert!(config(roles(&["Rôle \"x\" y=f"])).is_ok());
    }

    #[test]
    fn unusable_connection_settings_are_config_errors() {
        assert!(config(|s| s.connect_timeout = Duration::ZERO).is_err());
        assert!(config(|s| s.pghost = "a,b".into()).is_err());
    }

    #[test]
    fn overlap_twins_every_role_but_the_superuser() {
        let c = config(|s| s.overlap = true).unwrap();
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
        let err = config(|s| {
            s.overlap = true;
            s.roles = vec![long];
        })
        .unwrap_err();
        assert_eq!(Failure::of(&err), Some(Failure::Config));
        assert!(format!("{err:#}").contains("64 bytes"), "{err:#}");
        assert!(
            config(|s| {
                s.overlap = true;
                s.roles = vec!["a=x".into(), "a_alt=y".into()];
            })
            .is_err()
        );
        // Off: no twins, and the long name does not matter.
        assert!(config(|s| s.roles = vec![format!("{}=f", "r".repeat(60))]).is_ok());
    }

    #[test]
    fn host_kind() {
        assert!(matches!(config(|_| {}).unwrap().host, Host::Socket(_)));
        assert_eq!(
            config(|s| s.pghost = "db".into()).unwrap().host,
            Host::Tcp("db".into())
        );
    }
}

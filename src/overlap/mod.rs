//! Overlap mode: every application role gets a twin login, and the login that applications
//! must use right now is published in one `pg_service.conf`.
//!
//! PostgreSQL keeps one password per role, so a password change always has a moment when
//! some client holds the other one. Two logins for one identity remove that moment: a new
//! password is staged on the login nobody uses, checked, and only then published; the login
//! that stopped being published keeps working until the server expires it (`VALID UNTIL`).
//!
//! This module is the whole feature but its command line: the pair of logins (`Pair`: the
//! role, its twin, their password files, which one is published), the names that follow
//! from a role, and the check of the published credentials against the password files
//! (here); the libpq service file (`service_file`); what the sync transaction does to the
//! logins on the server (`server`); and the files `generate --overlap` writes (`files`).
//! `rotate` (the staged rotation) and `verify --overlap` use it.

pub mod files;
pub mod server;
pub mod service_file;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::secret::{RoleSpec, Secret, SecretRef};
use service_file::ServiceFile;

/// Default suffix of a role's twin login (`appuser` → `appuser_alt`).
pub const DEFAULT_TWIN_SUFFIX: &str = "_alt";

/// The file that publishes, per role, the login and password applications must use now.
/// Looked up like every secret (`SECRETS_SOURCE_DIR`, then `KEYS_DIR`; `NAME`, then
/// `NAME.txt`), so Compose, Kubernetes and `generate` deliver it beside the password files.
pub const SERVICE_FILE: &str = "pg_service.conf";

/// PostgreSQL's identifier limit (NAMEDATALEN - 1); a longer twin name would be truncated
/// by the server and could collide with another role.
const MAX_NAME_BYTES: usize = 63;

/// The twin login of `role`. Refused when the server would truncate it, or when the suffix
/// is empty (the twin would be the role itself) or holds control characters.
pub fn twin_login(role: &str, suffix: &str) -> anyhow::Result<String> {
    if suffix.is_empty() {
        bail!("the twin login suffix is empty");
    }
    if suffix.chars().any(char::is_control) {
        bail!("the twin login suffix {suffix:?} contains control characters");
    }
    let twin = format!("{role}{suffix}");
    if twin.len() > MAX_NAME_BYTES {
        bail!(
            "the twin login of role {role:?} would be {} bytes long; PostgreSQL allows at \
             most {MAX_NAME_BYTES} (use a shorter --twin-suffix or role name)",
            twin.len()
        );
    }
    Ok(twin)
}

/// The secret name of a twin's password: the suffix goes before a trailing `_pw`, so the
/// files sort and read as a pair (`postgres_app_user_pw` → `postgres_app_user_alt_pw`);
/// names without `_pw` get it appended (`my_secret` → `my_secret_alt`).
pub fn twin_secret_name(name: &str, suffix: &str) -> String {
    match name.strip_suffix("_pw") {
        Some(stem) => format!("{stem}{suffix}_pw"),
        None => format!("{name}{suffix}"),
    }
}

/// The same rule for a secret given as a path: applied to the file name, keeping a `.txt`
/// extension and the directory (`/k/app_pw.txt` → `/k/app_alt_pw.txt`).
pub fn twin_secret_path(path: &std::path::Path, suffix: &str) -> Option<PathBuf> {
    let file = path.file_name()?.to_str()?;
    let (stem, ext) = match file.strip_suffix(".txt") {
        Some(stem) => (stem, ".txt"),
        None => (file, ""),
    };
    Some(path.with_file_name(format!("{}{ext}", twin_secret_name(stem, suffix))))
}

/// Which of a role's two logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// The role itself.
    Role,
    /// Its twin login.
    Twin,
}

impl Login {
    /// The other login of the pair.
    pub fn other(self) -> Login {
        match self {
            Login::Role => Login::Twin,
            Login::Twin => Login::Role,
        }
    }
}

/// One overlapped role: its two logins, their password files, and which of them
/// `pg_service.conf` publishes. The one type every part of overlap mode speaks of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The role (the identity both logins act as).
    pub role: String,
    /// The twin login (`<role><suffix>`).
    pub twin: String,
    /// The role's password file.
    pub role_secret: SecretRef,
    /// The twin's password file (`twin_secret_name` / `twin_secret_path` of the role's).
    pub twin_secret: SecretRef,
    /// The login applications use now. As configured, before `pg_service.conf` is read,
    /// the role's own login: what `generate --overlap` first publishes.
    pub published: Login,
}

impl Pair {
    /// The pair of `role` with `suffix`; refused when its twin's name would not fit.
    pub fn of(role: &RoleSpec, suffix: &str) -> anyhow::Result<Pair> {
        let twin = twin_login(&role.name, suffix)?;
        let twin_secret = match &role.secret {
            SecretRef::Name(name) => SecretRef::Name(twin_secret_name(name, suffix)),
            SecretRef::Path(path) => {
                SecretRef::Path(twin_secret_path(path, suffix).with_context(|| {
                    format!(
                        "no twin password file can be named after {}",
                        path.display()
                    )
                })?)
            }
        };
        Ok(Pair {
            role: role.name.clone(),
            twin,
            role_secret: role.secret.clone(),
            twin_secret,
            published: Login::Role,
        })
    }

    /// The name of `which` login.
    pub fn login(&self, which: Login) -> &str {
        match which {
            Login::Role => &self.role,
            Login::Twin => &self.twin,
        }
    }

    /// The password file of `which` login.
    pub fn secret(&self, which: Login) -> &SecretRef {
        match which {
            Login::Role => &self.role_secret,
            Login::Twin => &self.twin_secret,
        }
    }

    /// Which login of the pair `login` is, if it is one.
    pub fn which(&self, login: &str) -> Option<Login> {
        if login == self.role {
            Some(Login::Role)
        } else if login == self.twin {
            Some(Login::Twin)
        } else {
            None
        }
    }

    /// The login applications are told to use.
    pub fn published_login(&self) -> &str {
        self.login(self.published)
    }

    /// The login applications are not told to use: the one a rotation re-keys next.
    pub fn unpublished_login(&self) -> &str {
        self.login(self.published.other())
    }

    /// The twin's password file as a role spec (how the sync reads and sets it).
    pub fn twin_spec(&self) -> RoleSpec {
        RoleSpec {
            name: self.twin.clone(),
            secret: self.twin_secret.clone(),
        }
    }
}

/// Largest accepted service file: far more than one section per role needs, small enough
/// that a wrong mount (a log, a dump) is refused instead of read. The one limit for every
/// reader of the file, the sync's and the secrets directory's (`store::MAX_FILE_BYTES`).
pub const MAX_SERVICE_FILE_BYTES: usize = crate::store::MAX_FILE_BYTES;

/// Reads and parses the service file at `path`, as every secret file is read (`fileio`:
/// without blocking, judged on the descriptor, bounded). Errors name the file, never its
/// content.
pub fn read_service_file(path: &Path) -> anyhow::Result<ServiceFile> {
    let shown = path.display();
    let bytes = crate::fileio::dirfd::read_followed_file(path, MAX_SERVICE_FILE_BYTES)
        .with_context(|| format!("reading {shown}"))?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| anyhow::anyhow!("{shown} is not valid UTF-8"))?;
    service_file::parse(text).with_context(|| format!("reading {shown}"))
}

/// Checks the section `[role]` of the service file `file` (named `shown` in messages): it
/// must publish the pair's role or its twin, with exactly that login's password, and hold
/// no key libpq would refuse (`service_file::check_keys`). `password_file` gives, for the
/// published login, its password and how a message names its file (`None`: no password
/// file for it). Returns the pair with its published login. Messages name the service
/// file, the section, the login and the password file, never a password. The one check of
/// a section: the sync's (`check_published`), `rotate`'s and `generate --verify`'s.
pub fn check_section<'a>(
    shown: &str,
    file: &ServiceFile,
    pair: &Pair,
    password_file: impl FnOnce(Login) -> Option<(&'a Secret, String)>,
) -> anyhow::Result<Pair> {
    let role = &pair.role;
    let Some(section) = file.get(role) else {
        bail!("{shown}: no section [{role}] publishes a login of role {role:?}");
    };
    service_file::check_keys(section).with_context(|| format!("{shown}: section [{role}]"))?;
    let Some(login) = section.user.as_deref() else {
        bail!("{shown}: section [{role}] has no user=");
    };
    let Some(published) = pair.which(login) else {
        bail!(
            "{shown}: section [{role}] publishes login {login:?}, which is neither the role \
             nor its twin {:?}",
            pair.twin
        );
    };
    let Some(password) = &section.password else {
        bail!("{shown}: section [{role}] has no password=");
    };
    let Some((expected, expected_file)) = password_file(published) else {
        bail!("{shown}: section [{role}]: no password file for login {login:?}");
    };
    if password != expected {
        bail!(
            "{shown}: section [{role}]: the password for login {login:?} differs from its \
             password file ({expected_file})"
        );
    }
    Ok(Pair {
        published,
        ..pair.clone()
    })
}

/// Checks the published credentials against the password files and returns the pairs with
/// their published logins. The whole set is refused when a role has no section, the
/// section names a login other than the role or its twin, or its password differs from
/// that login's password file: applications would use a credential the server does not
/// get. Messages name the file, the section and the login, never a password.
pub fn check_published(
    path: &Path,
    file: &ServiceFile,
    pairs: &[Pair],
    secrets: &[(RoleSpec, Secret)],
) -> anyhow::Result<Vec<Pair>> {
    let shown = path.display().to_string();
    pairs
        .iter()
        .map(|pair| {
            check_section(&shown, file, pair, |which| {
                let login = pair.login(which);
                secrets
                    .iter()
                    .find(|(spec, _)| spec.name == login)
                    .map(|(spec, secret)| (secret, describe_ref(&spec.secret)))
            })
        })
        .collect()
}

fn describe_ref(secret: &SecretRef) -> String {
    match secret {
        SecretRef::Name(name) => name.clone(),
        SecretRef::Path(path) => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_names() {
        assert_eq!(twin_login("appuser", "_alt").unwrap(), "appuser_alt");
        assert_eq!(twin_login("My Role", "_b").unwrap(), "My Role_b");
        assert!(twin_login(&"r".repeat(59), "_alt").is_ok());
        let err = twin_login(&"r".repeat(60), "_alt").unwrap_err();
        assert!(format!("{err:#}").contains("64 bytes"), "{err:#}");
        assert!(twin_login("appuser", "").is_err());
        assert!(twin_login("appuser", "_a\n").is_err());
    }

    #[test]
    fn twin_secret_files_pair_with_the_role_file() {
        assert_eq!(
            twin_secret_name("postgres_app_user_pw", "_alt"),
            "postgres_app_user_alt_pw"
        );
        assert_eq!(twin_secret_name("my_secret", "_alt"), "my_secret_alt");
        assert_eq!(
            twin_secret_path(Path::new("/k/app_pw.txt"), "_alt").unwrap(),
            Path::new("/k/app_alt_pw.txt")
        );
        assert_eq!(
            twin_secret_path(Path::new("/k/app"), "_2").unwrap(),
            Path::new("/k/app_2")
        );
    }

    use crate::secret::test_entry as entry;

    #[test]
    fn published_credentials_must_match_the_password_files() {
        let twins = [Pair::of(&entry("app", "").0, "_alt").unwrap()];
        assert_eq!(twins[0].twin_secret, SecretRef::Name("app_alt_pw".into()));
        let secrets = [entry("app", "one s3cret"), entry("app_alt", "two s3cret")];
        let path = Path::new("/k/pg_service.conf");
        let check = |text: &str| {
            check_published(path, &service_file::parse(text).unwrap(), &twins, &secrets)
        };
        let ok = check("[app]\nuser=app_alt\npassword=two s3cret\n").unwrap();
        assert_eq!(ok[0].published_login(), "app_alt");
        assert_eq!(ok[0].unpublished_login(), "app");
        assert_eq!(
            check("[app]\nuser=app\npassword=one s3cret\n").unwrap()[0].unpublished_login(),
            "app_alt"
        );
        for (text, needle) in [
            ("[other]\nuser=app\n", "no section [app]"),
            ("[app]\npassword=one s3cret\n", "no user="),
            ("[app]\nuser=mallory\npassword=one s3cret\n", "neither"),
            ("[app]\nuser=app\n", "no password="),
            (
                "[app]\nuser=app\npassword=two s3cret\n",
                "differs from its password file (app_pw)",
            ),
        ] {
            let err = format!("{:#}", check(text).unwrap_err());
            assert!(
                err.contains(needle) && err.contains("pg_service.conf"),
                "{text:?}: {err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_service_file_must_be_a_regular_file_and_a_fifo_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pg_service.conf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer ever opens it: a blocking open would hang this test.
        let err = format!("{:#}", read_service_file(&fifo).unwrap_err());
        assert!(
            err.contains("pg_service.conf is not a regular file"),
            "{err}"
        );
        let err = format!("{:#}", read_service_file(dir.path()).unwrap_err());
        assert!(err.contains("is a directory, not a file"), "{err}");
        let missing = dir.path().join("absent");
        let err = format!("{:#}", read_service_file(&missing).unwrap_err());
        assert!(
            err.starts_with("reading ") && err.contains("absent"),
            "{err}"
        );
    }
}

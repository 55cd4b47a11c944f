//! What the files of a rotation say: each overlapped role's two logins, their password
//! files in `keys/`, which of them `pg_service.conf` publishes, and whether the three agree.
//! Read once per run, before anything is written, so every refusal happens first. Every
//! file is read through the `keys/` handle of `generate`'s lock, never through a link.

use anyhow::{Context, bail};

use crate::config::{Config, SecretRef};
use crate::error::Failure;
use crate::overlap::{self, Login, Pair, SERVICE_FILE, files, service_file};
use crate::secret::Secret;
use crate::store::{self, Dir};

/// One overlapped role as the files in `keys/` describe it now: its pair (with the
/// published login), each login's file name there and password.
pub(super) struct PairFiles {
    pub(super) pair: Pair,
    role_file: String,
    twin_file: String,
    role_password: Secret,
    twin_password: Secret,
}

impl PairFiles {
    /// The file name in `keys/` of `which` login.
    pub(super) fn file(&self, which: Login) -> &str {
        match which {
            Login::Role => &self.role_file,
            Login::Twin => &self.twin_file,
        }
    }

    /// The password `which` login's file holds.
    pub(super) fn password(&self, which: Login) -> &Secret {
        match which {
            Login::Role => &self.role_password,
            Login::Twin => &self.twin_password,
        }
    }

    /// The login a rotation re-keys, and its file.
    pub(super) fn unpublished(&self) -> (&str, &str) {
        let which = self.pair.published.other();
        (self.pair.login(which), self.file(which))
    }
}

/// The overlapped roles and `pg_service.conf`, checked for consistency.
pub(super) struct RoleSet {
    pub(super) roles: Vec<PairFiles>,
    pub(super) service: service_file::ServiceFile,
    pub(super) superuser: String,
    pub(super) superuser_password: Option<Secret>,
    /// Secrets a rotation leaves as they are besides the pairs' files: the superuser's when
    /// it is left to Patroni (`--patroni on`), whose configuration holds the same password.
    pub(super) left_alone: Vec<String>,
}

impl RoleSet {
    pub(super) fn read(config: &Config, keys: &Dir, suffix: &str) -> anyhow::Result<RoleSet> {
        Self::read_inner(config, keys, suffix).context(Failure::Config)
    }

    fn read_inner(config: &Config, keys: &Dir, suffix: &str) -> anyhow::Result<RoleSet> {
        let text = store::read_exact(keys, SERVICE_FILE).with_context(|| {
            format!(
                "reading {} (create it with `generate --overlap`)",
                keys.shown(SERVICE_FILE)
            )
        })?;
        let text = std::str::from_utf8(&text)
            .with_context(|| format!("{} is not valid UTF-8", keys.shown(SERVICE_FILE)))?;
        let service = service_file::parse(text)?;
        // The publish rewrites this file, other sections kept: one the writer refuses (a
        // line older libpq cannot read) is refused now, before any connection or write.
        // (`stage` renders the exact file to publish once more before its first write.)
        service_file::render(&service).with_context(|| {
            format!(
                "{} could not be rewritten by the publish",
                keys.shown(SERVICE_FILE)
            )
        })?;
        let mut roles = Vec::new();
        for spec in config.roles.iter().filter(|r| r.name != config.superuser) {
            let pair = Pair::of(spec, suffix)?;
            let (role_file, twin_file) = pair_files(keys, &spec.secret, suffix)
                .with_context(|| format!("the files of role {:?}", spec.name))?;
            let role_password = files::read_secret(keys, &role_file)?;
            let twin_password = files::read_secret(keys, &twin_file)?;
            let pair =
                overlap::check_section(&keys.shown(SERVICE_FILE), &service, &pair, |which| {
                    Some(match which {
                        Login::Role => (&role_password, role_file.clone()),
                        Login::Twin => (&twin_password, twin_file.clone()),
                    })
                })
                .context(
                    "the set is inconsistent (restore it or run `generate --overlap --force`)",
                )?;
            roles.push(PairFiles {
                pair,
                role_file,
                twin_file,
                role_password,
                twin_password,
            });
        }
        if roles.is_empty() {
            bail!("no overlapped roles: every configured role is the superuser");
        }
        // To ask the server about grace periods and sessions, as the superuser only: an
        // application's login could be answered by what the application controls.
        let superuser_password = match &config.superuser_secret {
            SecretRef::Name(name) => locate(keys, name)
                .ok()
                .and_then(|file| files::read_secret(keys, &file).ok()),
            SecretRef::Path(_) => config.superuser_password().and_then(Result::ok),
        };
        let mut left_alone = Vec::new();
        if config.superuser_left_to_patroni() {
            let name = match &config.superuser_secret {
                SecretRef::Name(name) => name.clone(),
                SecretRef::Path(path) => file_name(path)?,
            };
            println!(
                "the superuser's password ({name}) is left as it is: Patroni manages the \
                 server (--patroni on); rotate it through Patroni (docs/clusters.md)"
            );
            left_alone.push(name);
        }
        Ok(RoleSet {
            roles,
            service,
            superuser: config.superuser.clone(),
            superuser_password,
            left_alone,
        })
    }

    /// Every file of the overlapped roles (for the exclusion from single-login secrets
    /// and for the backup).
    pub(super) fn files(&self) -> Vec<String> {
        self.roles
            .iter()
            .flat_map(|r| [r.role_file.clone(), r.twin_file.clone()])
            .collect()
    }
}

/// The file names in `keys/` of a role's password and of its twin's. A rotation writes
/// and backs up only inside `keys/`, so a secret elsewhere is refused.
fn pair_files(keys: &Dir, secret: &SecretRef, suffix: &str) -> anyhow::Result<(String, String)> {
    match secret {
        SecretRef::Name(name) => {
            let role = locate(keys, name)?;
            let twin_name = overlap::twin_secret_name(name, suffix);
            let twin = locate(keys, &twin_name).map_err(|_| {
                anyhow::anyhow!(
                    "the twin login's file {twin_name} is not in {} (create it with \
                     `generate --overlap`)",
                    keys.path().display()
                )
            })?;
            Ok((role, twin))
        }
        SecretRef::Path(path) => {
            if path.parent() != Some(keys.path()) {
                bail!(
                    "{} is outside {}; rotate only manages the files of its directory",
                    path.display(),
                    keys.path().display()
                );
            }
            let twin = overlap::twin_secret_path(path, suffix)
                .with_context(|| format!("{} has no usable file name", path.display()))?;
            Ok((file_name(path)?, file_name(&twin)?))
        }
    }
}

/// The secret `name` in `keys/`, looked up as everywhere (`NAME`, then `NAME.txt`),
/// without following a link (a link there is refused when it is read).
fn locate(keys: &Dir, name: &str) -> anyhow::Result<String> {
    for candidate in [name.to_owned(), format!("{name}.txt")] {
        if keys.stat(&candidate)?.is_some() {
            return Ok(candidate);
        }
    }
    bail!("secret file {name} not found in {}", keys.path().display())
}

fn file_name(path: &std::path::Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no usable file name", path.display()))
}

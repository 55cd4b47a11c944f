//! What the files of a rotation say: each overlapped role's two logins, their password
//! files in `keys/`, which of them `pg_service.conf` publishes, and whether the three agree.
//! Read once per run, before anything is written, so every refusal happens first. Every
//! file is read through the `keys/` handle of `generate`'s lock, never through a link.

use anyhow::{Context, bail};

use crate::config::{Config, SecretRef};
use crate::error::Failure;
use crate::keyfiles::overlap::{self as files, Dir};
use crate::overlap::{self, SERVICE_FILE, service_file};
use crate::secret::Secret;

/// One overlapped role as the files describe it now.
pub(super) struct Overlapped {
    pub(super) role: String,
    pub(super) twin: String,
    /// File names in `keys/`.
    pub(super) role_file: String,
    pub(super) twin_file: String,
    pub(super) role_password: Secret,
    pub(super) twin_password: Secret,
    /// Whether `pg_service.conf` publishes the twin (else the role itself).
    pub(super) twin_published: bool,
}

impl Overlapped {
    /// The login a rotation re-keys, and its file.
    pub(super) fn unpublished(&self) -> (&str, &str) {
        if self.twin_published {
            (&self.role, &self.role_file)
        } else {
            (&self.twin, &self.twin_file)
        }
    }

    pub(super) fn published(&self) -> (&str, &Secret) {
        if self.twin_published {
            (&self.twin, &self.twin_password)
        } else {
            (&self.role, &self.role_password)
        }
    }
}

/// The overlapped roles and `pg_service.conf`, checked for consistency.
pub(super) struct RoleSet {
    pub(super) roles: Vec<Overlapped>,
    pub(super) service: service_file::ServiceFile,
    pub(super) superuser: String,
    pub(super) superuser_password: Option<Secret>,
}

impl RoleSet {
    pub(super) fn read(config: &Config, keys: &Dir, suffix: &str) -> anyhow::Result<RoleSet> {
        Self::read_inner(config, keys, suffix).context(Failure::Config)
    }

    fn read_inner(config: &Config, keys: &Dir, suffix: &str) -> anyhow::Result<RoleSet> {
        let text = files::read_exact(keys, SERVICE_FILE).with_context(|| {
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
            let twin = overlap::twin_login(&spec.name, suffix)?;
            let (role_file, twin_file) = pair_files(keys, &spec.secret, suffix)
                .with_context(|| format!("the files of role {:?}", spec.name))?;
            let role_password = files::read_secret(keys, &role_file)?;
            let twin_password = files::read_secret(keys, &twin_file)?;
            let published = overlap::check_section(
                &keys.shown(SERVICE_FILE),
                &service,
                &spec.name,
                &twin,
                |login| {
                    Some(if login == twin {
                        (&twin_password, twin_file.clone())
                    } else {
                        (&role_password, role_file.clone())
                    })
                },
            )
            .context("the set is inconsistent (restore it or run `generate --overlap --force`)")?;
            roles.push(Overlapped {
                role: spec.name.clone(),
                twin,
                role_file,
                twin_file,
                role_password,
                twin_password,
                twin_published: published == overlap::Login::Twin,
            });
        }
        if roles.is_empty() {
            bail!("no overlapped roles: every configured role is the superuser");
        }
        // Only to ask the server about grace periods; a published login serves as well.
        let superuser_password = match &config.superuser_secret {
            SecretRef::Name(name) => locate(keys, name)
                .ok()
                .and_then(|file| files::read_secret(keys, &file).ok()),
            SecretRef::Path(_) => None,
        };
        Ok(RoleSet {
            roles,
            service,
            superuser: config.superuser.clone(),
            superuser_password,
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

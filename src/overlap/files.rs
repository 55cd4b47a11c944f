//! Overlap mode's files in a secrets directory: each application role's twin-login password
//! file and `pg_service.conf`, which `generate --overlap` creates beside the catalog's
//! eleven files, backs up, verifies, lists and puts into the Kubernetes Secret, and which
//! `rotate` rewrites (through the same `store` handles, backups and atomic writes).
//!
//! On a first run `pg_service.conf` publishes every role's own login: the twin starts
//! unused, so the first `rotate` can stage it at once. Whenever `generate` itself gives a
//! published login a new password (`--force`, or a role file created anew),
//! `pg_service.conf` is rewritten to publish the role's own login with that password, in
//! the same run and after the password files, so the set on disk is always consistent.
//!
//! Every file is reached through the `keys/` directory's handle (`Dir`), never through a
//! link.

use anyhow::Context;
use zeroize::Zeroizing;

use super::{Login, Pair, SERVICE_FILE, service_file};
use crate::error::Failure;
use crate::fileio::atomic;
use crate::fileio::dirfd::{Dir, Kind as FileKind};
use crate::secret::{NamedRoles, RoleSpec, Secret, SecretRef};
use crate::store::catalog::{ENTRIES, Entry, Kind};
use crate::store::{Action, backup, check, random};

/// The secret name of `which` login of a pair `generate` made (`postgres_app_user_pw`).
fn key(pair: &Pair, which: Login) -> &str {
    match pair.secret(which) {
        SecretRef::Name(name) => name,
        // `default_pairs` names every secret; a path has no key.
        SecretRef::Path(path) => path.to_str().unwrap_or_default(),
    }
}

/// The file name `generate` uses for `which` login of `pair` (`KEY.txt`).
pub fn file(pair: &Pair, which: Login) -> String {
    format!("{}.txt", key(pair, which))
}

/// The record of a staged rotation that is neither published nor rolled back, in the
/// secrets directory (beside `keys/`, so it is never delivered with the secrets). `rotate`
/// writes it; `generate` refuses to write while it exists.
pub const PENDING_FILE: &str = "rotate-pending.json";

/// Refuses to write the set while a staged rotation is pending in `root`: a regenerated
/// file would be lost to the stage's rollback, or published unchecked.
pub fn refuse_while_pending(root: &Dir) -> anyhow::Result<()> {
    if root.stat(PENDING_FILE)?.is_some() {
        return Err(anyhow::anyhow!(
            "a staged rotation is pending ({}): finish it with `rotate --publish-only` or \
             undo it with `rotate --abort` first; nothing was written",
            root.shown(PENDING_FILE)
        ))
        .context(Failure::TryLater);
    }
    Ok(())
}

/// The overlapped roles among `generate`'s files: the application and read-only roles,
/// and the temporal role when it is configured (the superuser is never overlapped, and the
/// owner role is NOLOGIN).
pub fn default_pairs(named: &NamedRoles, suffix: &str) -> anyhow::Result<Vec<Pair>> {
    let pair = |role: &str, key: &str| {
        Pair::of(
            &RoleSpec {
                name: role.to_owned(),
                secret: SecretRef::Name(key.to_owned()),
            },
            suffix,
        )
    };
    let pairs = named
        .with_secrets()
        .into_iter()
        .map(|(role, key)| pair(role, key))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (i, pair) in pairs.iter().enumerate() {
        if pairs[..i]
            .iter()
            .any(|p| p.role == pair.role || p.role == pair.twin || p.twin == pair.role)
        {
            anyhow::bail!(
                "role {:?} is named twice among the overlapped roles and their twins",
                pair.role
            );
        }
    }
    Ok(pairs)
}

/// The overlap files that may sit in `keys` for twin suffix `suffix`: the twin file of
/// every catalog password, and `pg_service.conf`.
fn candidate_files(suffix: &str) -> Vec<String> {
    ENTRIES
        .iter()
        .filter(|e| e.kind == Kind::Password)
        .map(|e| format!("{}.txt", super::twin_secret_name(e.key(), suffix)))
        .chain(std::iter::once(SERVICE_FILE.to_owned()))
        .collect()
}

/// Every file of the set present in `keys`, catalog first: what a complete backup copies
/// and `--restore` puts back.
pub fn present_files(keys: &Dir, suffix: &str) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<String> = backup::present_files(keys)?
        .into_iter()
        .map(str::to_owned)
        .collect();
    for file in candidate_files(suffix) {
        // (An empty suffix would name the catalog's own files: listed once.)
        if !files.contains(&file) && backup::present(keys, &file)? {
            files.push(file);
        }
    }
    Ok(files)
}

/// One overlap file `generate` is about to write.
pub struct Write {
    pub file: String,
    pub action: Action,
    pub value: Zeroizing<Vec<u8>>,
}

/// What `generate --overlap` writes beyond the catalog, given the catalog values it is
/// about to write (`catalog`): missing twin files (all of them with `force`), then
/// `pg_service.conf` when it is missing, lacks a role's section, or publishes a login
/// whose password changes in this run (every section with `force`), publishing the role's
/// own login. Returns the writes (the service file last) and the names kept. Only reads:
/// everything it can refuse is refused before `generate` writes anything.
pub fn plan(
    keys: &Dir,
    pairs: &[Pair],
    force: bool,
    catalog: &[(Entry, Action, Secret)],
) -> anyhow::Result<(Vec<Write>, Vec<String>)> {
    let mut writes = Vec::new();
    let mut kept = Vec::new();
    let mut changed_keys: Vec<String> = catalog.iter().map(|(e, ..)| e.key().to_owned()).collect();
    for pair in pairs {
        let file = file(pair, Login::Twin);
        let action = match (backup::present(keys, &file)?, force) {
            (false, _) => Action::Create,
            (true, true) => Action::Replace,
            (true, false) => {
                kept.push(file);
                continue;
            }
        };
        let value = random::password()?;
        writes.push(Write {
            file,
            action,
            value: Zeroizing::new(value.expose().as_bytes().to_vec()),
        });
        changed_keys.push(key(pair, Login::Twin).to_owned());
    }

    let (mut service, action) = current_service_file(keys, force)?;
    let mut republished = false;
    for pair in pairs {
        let published = service
            .get(&pair.role)
            .and_then(|s| s.user.clone())
            .map(|user| {
                let which = pair.which(&user).unwrap_or(Login::Role);
                key(pair, which).to_owned()
            });
        let stale = match &published {
            None => true,
            Some(key) => force || changed_keys.contains(key),
        };
        if !stale {
            continue;
        }
        let password = match catalog
            .iter()
            .find(|(e, ..)| e.key() == key(pair, Login::Role))
        {
            Some((_, _, value)) => value.clone(),
            None => read_secret(keys, &file(pair, Login::Role))
                .with_context(|| format!("the password of role {:?}", pair.role))
                .context(Failure::Config)?,
        };
        service.publish(&pair.role, &pair.role, password);
        republished = true;
    }
    if republished {
        let text = service_file::render(&service)?;
        writes.push(Write {
            file: SERVICE_FILE.to_owned(),
            action,
            value: Zeroizing::new(text.as_bytes().to_vec()),
        });
    } else {
        kept.push(SERVICE_FILE.to_owned());
    }
    Ok((writes, kept))
}

/// The service file there now, and what writing it is (`--force` mends one that does not
/// parse; without it, what is wrong is said).
fn current_service_file(
    keys: &Dir,
    force: bool,
) -> anyhow::Result<(service_file::ServiceFile, Action)> {
    if !backup::present(keys, SERVICE_FILE)? {
        return Ok((service_file::ServiceFile::default(), Action::Create));
    }
    let parsed = read_text(keys, SERVICE_FILE)
        .and_then(|text| service_file::parse(&text))
        .with_context(|| format!("reading {}", keys.shown(SERVICE_FILE)));
    match parsed {
        Ok(parsed) => Ok((parsed, Action::Replace)),
        Err(_) if force => Ok((service_file::ServiceFile::default(), Action::Replace)),
        Err(err) => Err(err).context(Failure::Config),
    }
}

/// `keys/name` as text, read through the directory's handle (bounded, zeroized).
fn read_text(keys: &Dir, name: &str) -> anyhow::Result<Zeroizing<String>> {
    let bytes = crate::store::read_exact(keys, name)?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{} is not valid UTF-8", keys.shown(name)))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// The secret in `keys/name`, validated as `run` validates it.
pub fn read_secret(keys: &Dir, name: &str) -> anyhow::Result<Secret> {
    let bytes = check::read_value(keys, name)?;
    crate::secret::parse(bytes.to_vec())
        .with_context(|| format!("secret file {}", keys.shown(name)))
}

/// `--verify`'s problems with the overlap files. With `pairs` (`--overlap`), every twin
/// file and `pg_service.conf` must exist and every role's section must publish one of
/// its two logins with exactly that login's password; without, the overlap files present
/// are checked as files. Problems name files, sections and kinds, never values.
pub fn problems(keys: Option<&Dir>, pairs: Option<&[Pair]>, suffix: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let exists = |file: &str| keys.is_some_and(|k| !matches!(k.kind(file), Ok(FileKind::Missing)));
    let twin_files: Vec<String> = match pairs {
        Some(pairs) => pairs.iter().map(|p| file(p, Login::Twin)).collect(),
        None => candidate_files(suffix)
            .into_iter()
            .filter(|f| f != SERVICE_FILE && exists(f))
            .collect(),
    };
    let twin_entry = Entry {
        file: "",
        kind: Kind::Password,
    };
    for file in &twin_files {
        if let Some(problem) = file_problem(keys, file) {
            problems.push(format!("{file}: {problem}"));
            continue;
        }
        let Some(keys) = keys else { continue };
        match check::read_value(keys, file) {
            Ok(value) => problems.extend(
                check::value_problems(&twin_entry, &value)
                    .into_iter()
                    .map(|p| format!("{file}: {p}")),
            ),
            Err(err) => problems.push(format!("{file}: {err:#}")),
        }
    }
    if pairs.is_none() && !exists(SERVICE_FILE) {
        return problems;
    }
    if let Some(problem) = file_problem(keys, SERVICE_FILE) {
        problems.push(format!("{SERVICE_FILE}: {problem}"));
        return problems;
    }
    let Some(keys) = keys else {
        return problems;
    };
    let service = match read_text(keys, SERVICE_FILE).and_then(|t| service_file::parse(&t)) {
        Ok(service) => service,
        Err(err) => {
            problems.push(format!("{err:#}"));
            return problems;
        }
    };
    for pair in pairs.unwrap_or_default() {
        if let Err(problem) = check_section(keys, &service, pair) {
            problems.push(problem);
        }
    }
    problems
}

/// Whether `pair`'s section publishes one of its two logins with that login's password:
/// the sync's own check of a section (`overlap::check_section`).
fn check_section(
    keys: &Dir,
    service: &service_file::ServiceFile,
    pair: &Pair,
) -> Result<(), String> {
    let password = |which| {
        let name = file(pair, which);
        read_secret(keys, &name).ok().map(|secret| (secret, name))
    };
    let (role_pw, twin_pw) = (password(Login::Role), password(Login::Twin));
    super::check_section(SERVICE_FILE, service, pair, |which| {
        let found = match which {
            Login::Role => role_pw.as_ref(),
            Login::Twin => twin_pw.as_ref(),
        };
        found.map(|(secret, name)| (secret, name.clone()))
    })
    .map(|_| ())
    .map_err(|err| format!("{err:#}"))
}

/// Missing / not a regular file (a link is not followed) / mode other than 0600.
fn file_problem(keys: Option<&Dir>, file: &str) -> Option<String> {
    let Some(keys) = keys else {
        return Some("missing".into());
    };
    match keys.stat(file) {
        Err(err) => Some(format!("cannot be inspected ({err:#})")),
        Ok(None) => Some("missing".into()),
        Ok(Some(stat)) => match FileKind::of(&stat) {
            FileKind::File if stat.st_mode & 0o7777 != atomic::FILE_MODE => Some(format!(
                "has mode {:04o}, expected 0600",
                stat.st_mode & 0o7777
            )),
            FileKind::File => None,
            kind => Some(kind.problem().into()),
        },
    }
}

/// `--list` lines for the overlap files: the present ones, and with `pairs` the missing
/// expected ones too. Same columns as the catalog's lines.
pub fn list(
    keys: Option<&Dir>,
    pairs: Option<&[Pair]>,
    suffix: &str,
) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<String> = match pairs {
        Some(pairs) => pairs.iter().map(|p| file(p, Login::Twin)).collect(),
        None => Vec::new(),
    };
    for file in candidate_files(suffix) {
        let wanted = pairs.is_some() && file == SERVICE_FILE;
        let there = match keys {
            Some(keys) => keys.kind(&file)? != FileKind::Missing,
            None => false,
        };
        if (wanted || there) && !files.contains(&file) {
            files.push(file);
        }
    }
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    check::list_files(keys, &names)
}

/// The Kubernetes Secret entries of the overlap files present: key = file name without
/// `.txt` (`pg_service.conf` keeps its name), as `run` looks them up.
pub fn manifest_values(
    keys: &Dir,
    suffix: &str,
) -> anyhow::Result<Vec<(String, Zeroizing<Vec<u8>>)>> {
    let mut values = Vec::new();
    for file in candidate_files(suffix) {
        if backup::present(keys, &file)? {
            let key = file.strip_suffix(".txt").unwrap_or(&file).to_owned();
            let value = if file == SERVICE_FILE {
                let text = read_text(keys, &file)?;
                Zeroizing::new(text.as_bytes().to_vec())
            } else {
                check::read_value(keys, &file)?
            };
            values.push((key, value));
        }
    }
    Ok(values)
}

/// The catalog files a rotation regenerates as single-login secrets (every random value
/// except those in `exclude`), each with a new value; OIDC values are never generated.
pub fn single_login_values(exclude: &[String]) -> anyhow::Result<Vec<(String, Secret)>> {
    let mut values = Vec::new();
    for entry in ENTRIES.iter().filter(|e| e.is_random()) {
        if exclude.iter().any(|x| x == entry.file || x == entry.key()) {
            continue;
        }
        let value = match entry.kind {
            Kind::Signing => random::signing_secret()?,
            _ => random::password()?,
        };
        values.push((entry.file.to_owned(), value));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn named(app: &str, read_only: &str, temporal: Option<&str>) -> NamedRoles {
        NamedRoles {
            app: app.into(),
            read_only: read_only.into(),
            temporal: temporal.map(Into::into),
        }
    }

    fn pairs() -> Vec<Pair> {
        default_pairs(&named("appuser", "backupuser", None), "_alt").unwrap()
    }

    #[test]
    fn pairs_name_twins_and_refuse_clashes() {
        let p = pairs();
        assert_eq!(p[0].twin, "appuser_alt");
        assert_eq!(file(&p[0], Login::Twin), "postgres_app_user_alt_pw.txt");
        assert_eq!(key(&p[1], Login::Twin), "postgres_app_ro_alt_pw");
        assert_eq!(
            default_pairs(&named("a", "b", Some("t")), "_x")
                .unwrap()
                .len(),
            3
        );
        assert!(default_pairs(&named("a", "a_alt", None), "_alt").is_err());
        assert!(default_pairs(&named("a", "a", None), "_alt").is_err());
        assert!(default_pairs(&named(&"a".repeat(60), "b", None), "_alt").is_err());
    }

    fn write_file(keys: &Path, file: &str, value: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(keys.join(file), value).unwrap();
        std::fs::set_permissions(keys.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A keys directory holding the two roles' own password files, and its handle.
    fn keys_with_own_files() -> (tempfile::TempDir, Dir) {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path();
        let d = Dir::open_path(keys).unwrap().unwrap();
        write_file(
            keys,
            "postgres_app_user_pw.txt",
            "AppUserPassword0123456789",
        );
        write_file(keys, "postgres_app_ro_pw.txt", "ReadOnlyPassword012345678");
        (dir, d)
    }

    #[test]
    fn first_run_publishes_each_role_itself_and_verify_checks_the_pairing() {
        let (dir, d) = keys_with_own_files();
        let keys = dir.path();
        let (writes, kept) = plan(&d, &pairs(), false, &[]).unwrap();
        assert!(kept.is_empty());
        let files: Vec<&str> = writes.iter().map(|w| w.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "postgres_app_user_alt_pw.txt",
                "postgres_app_ro_alt_pw.txt",
                SERVICE_FILE
            ]
        );
        for w in &writes {
            write_file(keys, &w.file, std::str::from_utf8(&w.value).unwrap());
        }
        let text = std::fs::read_to_string(keys.join(SERVICE_FILE)).unwrap();
        let parsed = service_file::parse(&text).unwrap();
        let app = parsed.get("appuser").unwrap();
        assert_eq!(app.user.as_deref(), Some("appuser"));
        assert_eq!(
            app.password.as_ref().unwrap().expose(),
            "AppUserPassword0123456789"
        );
        assert!(problems(Some(&d), Some(&pairs()), "_alt").is_empty());
        // A second run keeps everything.
        let (writes, kept) = plan(&d, &pairs(), false, &[]).unwrap();
        assert!(writes.is_empty());
        assert_eq!(kept.len(), 3);
        // A published password that differs from its file is a problem, never quoted.
        write_file(
            keys,
            "postgres_app_user_pw.txt",
            "AnotherPassword0123456789",
        );
        let found = problems(Some(&d), Some(&pairs()), "_alt");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("[appuser]") && found[0].contains("differs"));
        assert!(!found[0].contains("Password0123"));
        std::fs::remove_file(keys.join("postgres_app_ro_alt_pw.txt")).unwrap();
        let found = problems(Some(&d), Some(&pairs()), "_alt");
        assert!(
            found
                .iter()
                .any(|p| p == "postgres_app_ro_alt_pw.txt: missing")
        );
    }

    #[test]
    fn a_login_that_gets_a_new_password_is_republished_and_a_published_twin_is_kept() {
        let (dir, d) = keys_with_own_files();
        let keys = dir.path();
        write_file(
            keys,
            "postgres_app_user_alt_pw.txt",
            "AppTwinPassword0123456789",
        );
        write_file(
            keys,
            "postgres_app_ro_alt_pw.txt",
            "RoTwinPassword01234567890",
        );
        // appuser publishes its twin, backupuser itself.
        let mut service = service_file::ServiceFile::default();
        service.publish(
            "appuser",
            "appuser_alt",
            Secret::new("AppTwinPassword0123456789".into()),
        );
        service.publish(
            "backupuser",
            "backupuser",
            Secret::new("ReadOnlyPassword012345678".into()),
        );
        write_file(keys, SERVICE_FILE, &service_file::render(&service).unwrap());
        // Both roles' own files get new values (as `generate` re-creating them would).
        let app = ENTRIES
            .iter()
            .find(|e| e.key() == "postgres_app_user_pw")
            .unwrap();
        let ro = ENTRIES
            .iter()
            .find(|e| e.key() == "postgres_app_ro_pw")
            .unwrap();
        let catalog = vec![
            (
                *app,
                Action::Replace,
                Secret::new("NewAppPassword01234567890".into()),
            ),
            (
                *ro,
                Action::Replace,
                Secret::new("NewRoPassword012345678901".into()),
            ),
        ];
        let (writes, kept) = plan(&d, &pairs(), false, &catalog).unwrap();
        assert_eq!(
            kept,
            ["postgres_app_user_alt_pw.txt", "postgres_app_ro_alt_pw.txt"]
        );
        assert_eq!(writes.len(), 1);
        let text = std::str::from_utf8(&writes[0].value).unwrap();
        let parsed = service_file::parse(text).unwrap();
        // The published twin is untouched; backupuser is republished with its new password.
        let app = parsed.get("appuser").unwrap();
        assert_eq!(app.user.as_deref(), Some("appuser_alt"));
        assert_eq!(
            app.password.as_ref().unwrap().expose(),
            "AppTwinPassword0123456789"
        );
        let ro = parsed.get("backupuser").unwrap();
        assert_eq!(
            ro.password.as_ref().unwrap().expose(),
            "NewRoPassword012345678901"
        );
        // --force: new twins, and every role publishes itself again.
        let (writes, _) = plan(&d, &pairs(), true, &catalog).unwrap();
        assert_eq!(writes.len(), 3);
        let text = std::str::from_utf8(&writes[2].value).unwrap();
        let parsed = service_file::parse(text).unwrap();
        assert_eq!(
            parsed.get("appuser").unwrap().user.as_deref(),
            Some("appuser")
        );
    }
}

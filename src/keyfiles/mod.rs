//! The secret-file generator (`generate`): creates, backs up, verifies, lists and restores
//! the eleven secret files under `<dir>/keys/`, and renders them as a Kubernetes Secret.
//!
//! It replaces the template's bash/openssl `generate_secrets.sh` and keeps its flags so
//! runbooks keep working, while fixing its defects: values come from the OS CSPRNG without
//! modulo bias (`random`), files are replaced atomically and durably (`atomic`), a complete
//! durable backup exists before the first overwrite (`backup`), the user secrets file is
//! parsed instead of sourced (`envfile`), and no value is ever printed: reports name files
//! and actions only. This file holds the flow of each mode (its options are parsed in
//! `cli.rs`); the submodules hold the pieces, each with its own tests.

mod atomic;
mod backup;
mod catalog;
mod check;
mod clock;
mod envfile;
mod k8s;
mod oidc;
mod random;

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use crate::error::Failure;
use crate::secret::Secret;
use catalog::{ENTRIES, Entry, Kind};

/// What `generate` was asked to do: one field per option of `GenerateSettings` in `cli.rs`
/// (see there for what each means). Conflicts between them are checked by `effective`.
#[derive(Debug, Clone, Default)]
pub struct GenerateSettings {
    pub dir: PathBuf,
    pub force: bool,
    pub no_backup: bool,
    pub backup_only: bool,
    pub verify: bool,
    pub list: bool,
    pub list_backups: bool,
    /// `Some(None)`: the newest backup; `Some(Some(name))`: that one.
    #[allow(clippy::option_option)]
    pub restore: Option<Option<String>>,
    pub yes: bool,
    pub keep_backups: Option<u32>,
    pub user_secrets_file: Option<PathBuf>,
    pub non_interactive: bool,
    pub k8s_secret: Option<String>,
    pub namespace: Option<String>,
    pub output: Option<PathBuf>,
}

/// `pg-password-sync generate`.
pub fn command(settings: GenerateSettings) -> anyhow::Result<u8> {
    generate_files(&settings).map(|()| 0)
}

/// Runs the mode the settings select.
fn generate_files(args: &GenerateSettings) -> anyhow::Result<()> {
    let args = &effective(args)?;
    let paths = Paths::new(&args.dir);
    if args.verify {
        return verify(&paths);
    }
    if args.list {
        return list(&paths);
    }
    if args.list_backups {
        return list_backups(&paths);
    }
    // The write modes return their lock so that pruning happens while it is still held.
    let _lock = if let Some(name) = &args.restore {
        restore(args, &paths, name.as_deref())?
    } else if args.backup_only {
        backup_only(&paths)?
    } else {
        generate(args, &paths)?
    };
    if let Some(keep) = args.keep_backups {
        for name in backup::prune(&paths.root, keep as usize)? {
            report(args, &format!("removed old backup {name}"));
        }
    }
    Ok(())
}

/// The options as given, with empty values (an exported but empty variable) counting as
/// unset, `--restore newest` as `--restore`, and the conflicts between options checked.
fn effective(args: &GenerateSettings) -> anyhow::Result<GenerateSettings> {
    let mut args = args.clone();
    let empty = |v: &Option<String>| v.as_deref().is_some_and(str::is_empty);
    if empty(&args.k8s_secret) {
        args.k8s_secret = None;
    }
    if empty(&args.namespace) {
        args.namespace = None;
    }
    if args
        .output
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        args.output = None;
    }
    args.restore = match args.restore.take() {
        Some(Some(name)) if name.is_empty() => None,
        Some(Some(name)) if name == "newest" => Some(None),
        other => other,
    };
    let modes: Vec<&str> = [
        ("--backup-only", args.backup_only),
        ("--verify", args.verify),
        ("--list", args.list),
        ("--list-backups", args.list_backups),
        ("--restore", args.restore.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, on)| on.then_some(flag))
    .collect();
    let conflict = |a: &str, b: &str| {
        Err(anyhow::anyhow!(
            "{a} cannot be used with {b} (set by the option or its PG_PASSWORD_SYNC_ variable)"
        ))
        .context(Failure::Config)
    };
    if let [first, second, ..] = modes[..] {
        return conflict(first, second);
    }
    if let Some(mode) = modes.first() {
        if args.force {
            return conflict("--force", mode);
        }
        if args.k8s_secret.is_some() {
            return conflict("--k8s-secret", mode);
        }
    }
    if args.k8s_secret.is_none() {
        for (flag, given) in [
            ("--namespace", args.namespace.is_some()),
            ("--output", args.output.is_some()),
        ] {
            if given {
                return Err(anyhow::anyhow!("{flag} needs --k8s-secret NAME"))
                    .context(Failure::Config);
            }
        }
    }
    Ok(args)
}

/// The directories of one secrets directory.
struct Paths {
    root: PathBuf,
    keys: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Paths {
        Paths {
            root: root.to_owned(),
            keys: root.join("keys"),
        }
    }

    /// `keys/NAME` as shown in reports.
    fn shown(&self, file: &str) -> String {
        self.keys.join(file).display().to_string()
    }
}

/// Holds an exclusive `flock` on the secrets directory for the whole run, so two runs
/// cannot interleave their writes or remove each other's temp files as leftovers.
fn lock_and_prepare(paths: &Paths) -> anyhow::Result<Flock<File>> {
    if !paths.root.exists() {
        atomic::ensure_private_dir(&paths.root)?;
    }
    let dir =
        File::open(&paths.root).with_context(|| format!("opening {}", paths.root.display()))?;
    let lock = Flock::lock(dir, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "another `generate` is running on {} ({errno})",
            paths.root.display()
        )
    })?;
    atomic::ensure_private_dir(&paths.keys)?;
    // Temp files of a killed run are incomplete by definition: remove them.
    atomic::remove_leftovers(&paths.keys)?;
    atomic::remove_leftovers(&backup::backups_dir(&paths.root))?;
    Ok(lock)
}

/// What a run does to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Create,
    Replace,
    Keep,
}

/// The action for each catalog file given which files exist now.
fn plan(paths: &Paths, force: bool) -> Vec<(Entry, Action)> {
    ENTRIES
        .iter()
        .map(|entry| {
            let action = match (paths.keys.join(entry.file).exists(), force) {
                (false, _) => Action::Create,
                (true, true) => Action::Replace,
                (true, false) => Action::Keep,
            };
            (*entry, action)
        })
        .collect()
}

/// Creates missing files (or, with `--force`, replaces all), backing up first.
fn generate(args: &GenerateSettings, paths: &Paths) -> anyhow::Result<Flock<File>> {
    // Everything that can be refused is checked before the first write.
    if let Some(name) = &args.k8s_secret {
        check_k8s_names(name, args.namespace.as_deref())?;
        if args.output.is_none() && std::io::stdout().is_terminal() {
            return Err(anyhow::anyhow!(
                "--k8s-secret without --output would print every secret to the terminal: \
                 use --output FILE, or pipe it (`| kubectl apply -f -`)"
            ))
            .context(Failure::Config);
        }
    }
    // The OIDC values are gathered (perhaps prompted for) before the lock, from a first
    // look at which files exist; what is written and what is backed up is decided again
    // under the lock, since another run may have created files in the meantime.
    let oidc_vars: Vec<&'static str> = plan(paths, args.force)
        .iter()
        .filter_map(|(entry, action)| match (entry.kind, action) {
            (Kind::Oidc(var), Action::Create | Action::Replace) => Some(var),
            _ => None,
        })
        .collect();
    let oidc_values: Vec<(&'static str, Secret)> = if oidc_vars.is_empty() {
        Vec::new()
    } else {
        let (env_path, explicit) = match &args.user_secrets_file {
            Some(path) => (path.clone(), true),
            None => (paths.root.join("user-provided.env"), false),
        };
        let file = oidc::load_env_file(&env_path, explicit)?;
        let values = oidc::collect(
            &oidc_vars,
            file.as_ref(),
            &env_path,
            oidc::interactive(args.non_interactive),
        )?;
        oidc_vars.iter().copied().zip(values).collect()
    };

    let lock = lock_and_prepare(paths)?;
    // New values, made before anything is written; `None` keeps the current file.
    let mut writes: Vec<(Entry, Action, Secret)> = Vec::new();
    let mut kept = Vec::new();
    for (entry, action) in plan(paths, args.force) {
        let value = match (action, entry.kind) {
            (Action::Keep, _) => {
                kept.push(entry);
                continue;
            }
            (_, Kind::Password) => random::password()?,
            (_, Kind::Signing) => random::signing_secret()?,
            (_, Kind::Oidc(var)) => oidc_values
                .iter()
                .find(|(v, _)| *v == var)
                .map(|(_, value)| value.clone())
                .with_context(|| {
                    format!(
                        "{} disappeared while {var} was being gathered; run again",
                        paths.shown(entry.file)
                    )
                })?,
        };
        if action == Action::Replace {
            // An unchanged value is kept. A file that cannot be read as a value (one over
            // 4096 bytes, say) is simply replaced: that is what --force is for, and the
            // backup before the first overwrite still copies it.
            let unchanged = check::read_value(&paths.keys.join(entry.file))
                .is_ok_and(|current| *current == value.expose().as_bytes());
            if unchanged {
                kept.push(entry);
                continue;
            }
        }
        writes.push((entry, action, value));
    }

    let overwrites = writes
        .iter()
        .any(|(_, action, _)| *action == Action::Replace);
    if overwrites && !args.no_backup {
        let files = backup::present_files(&paths.keys);
        let made = backup::create(&paths.root, &paths.keys, &files)?;
        report(
            args,
            &format!("backed up {} files to {}", files.len(), made.path.display()),
        );
    }
    for (entry, action, value) in &writes {
        atomic::write_atomic(&paths.keys, entry.file, value.expose().as_bytes())
            .with_context(|| format!("writing {}", paths.shown(entry.file)))?;
        let verb = match (action, entry.is_random()) {
            (Action::Create, _) => "created",
            (_, true) => "regenerated",
            (_, false) => "updated",
        };
        report(args, &format!("{verb} {}", paths.shown(entry.file)));
    }
    for entry in kept {
        let fixed = fix_mode(&paths.keys.join(entry.file))?;
        let note = if fixed { " (mode set to 0600)" } else { "" };
        report(args, &format!("kept {}{note}", paths.shown(entry.file)));
    }

    if let Some(name) = &args.k8s_secret {
        write_manifest(args, paths, name)?;
    }
    Ok(lock)
}

/// Sets a kept file's mode to 0600 if it differs; returns whether it did.
fn fix_mode(path: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("inspecting {}", path.display()))?;
    if meta.permissions().mode() & 0o7777 == atomic::FILE_MODE {
        return Ok(false);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(atomic::FILE_MODE))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(true)
}

/// Reports an action. The manifest may own stdout, so reports then go to stderr.
fn report(args: &GenerateSettings, line: &str) {
    if args.k8s_secret.is_some() && args.output.is_none() {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// Refuses a Secret name or namespace Kubernetes would reject.
fn check_k8s_names(name: &str, namespace: Option<&str>) -> anyhow::Result<()> {
    if !k8s::is_dns_subdomain(name) {
        return Err(anyhow::anyhow!(
            "--k8s-secret {name:?} is not a valid Kubernetes name (lowercase letters, digits, `-`, `.`)"
        ))
        .context(Failure::Config);
    }
    if let Some(ns) = namespace.filter(|ns| !k8s::is_dns_label(ns)) {
        return Err(anyhow::anyhow!(
            "--namespace {ns:?} is not a valid Kubernetes namespace (lowercase letters, digits, `-`)"
        ))
        .context(Failure::Config);
    }
    Ok(())
}

/// Writes the Kubernetes Secret manifest of the current set to stdout or `--output`.
fn write_manifest(args: &GenerateSettings, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let mut values = Vec::with_capacity(ENTRIES.len());
    for entry in &ENTRIES {
        values.push((
            entry.key(),
            check::read_value(&paths.keys.join(entry.file))?,
        ));
    }
    let manifest = k8s::render(name, args.namespace.as_deref(), &values);
    match &args.output {
        Some(path) => {
            let dir = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .with_context(|| format!("--output {} does not name a file", path.display()))?;
            atomic::write_atomic(dir, file, manifest.as_bytes())
                .with_context(|| format!("writing the manifest to {}", path.display()))?;
            println!("wrote Kubernetes Secret {name} to {}", path.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(manifest.as_bytes())
                .and_then(|()| out.flush())
                .context("writing the manifest to stdout")?;
        }
    }
    Ok(())
}

/// `--backup-only`.
fn backup_only(paths: &Paths) -> anyhow::Result<Flock<File>> {
    let lock = lock_and_prepare(paths)?;
    let files = backup::present_files(&paths.keys);
    if files.is_empty() {
        println!("no secret files in {} to back up", paths.keys.display());
        return Ok(lock);
    }
    let made = backup::create(&paths.root, &paths.keys, &files)?;
    println!("backed up {} files to {}", files.len(), made.path.display());
    Ok(lock)
}

/// `--restore [BACKUP]`.
fn restore(
    args: &GenerateSettings,
    paths: &Paths,
    name: Option<&str>,
) -> anyhow::Result<Flock<File>> {
    let source = backup::resolve(&paths.root, name).context(Failure::Config)?;
    let files = backup::present_files(&source.keys());
    if files.is_empty() {
        return Err(anyhow::anyhow!(
            "backup {} holds no secret files",
            source.path.display()
        ))
        .context(Failure::Config);
    }
    if !args.yes && oidc::interactive(args.non_interactive) {
        let question = format!(
            "Replace {} secret files in {} with those of {}?",
            files.len(),
            paths.keys.display(),
            source.name
        );
        if !oidc::confirm(&question)? {
            bail!("restore cancelled; nothing was changed");
        }
    }
    let lock = lock_and_prepare(paths)?;
    let current = backup::present_files(&paths.keys);
    if !current.is_empty() {
        let made = backup::create(&paths.root, &paths.keys, &current)?;
        println!(
            "backed up {} files to {}",
            current.len(),
            made.path.display()
        );
    }
    for file in &files {
        let value: Zeroizing<Vec<u8>> = Zeroizing::new(
            std::fs::read(source.keys().join(file))
                .with_context(|| format!("reading {} from the backup", file))?,
        );
        atomic::write_atomic(&paths.keys, file, &value)
            .with_context(|| format!("restoring {}", paths.shown(file)))?;
        println!("restored {}", paths.shown(file));
    }
    println!(
        "restored {} files from {}",
        files.len(),
        source.path.display()
    );
    Ok(lock)
}

/// `--verify`.
fn verify(paths: &Paths) -> anyhow::Result<()> {
    let problems = check::verify(&paths.keys)?;
    if problems.is_empty() {
        println!(
            "all {} secret files in {} pass",
            ENTRIES.len(),
            paths.keys.display()
        );
        return Ok(());
    }
    for problem in &problems {
        println!("problem: {problem}");
    }
    Err(anyhow::anyhow!(
        "{} problem(s) with the secret files in {}",
        problems.len(),
        paths.keys.display()
    ))
    .context(Failure::Verify)
}

/// `--list`.
fn list(paths: &Paths) -> anyhow::Result<()> {
    println!("{}", paths.keys.display());
    for line in check::list(&paths.keys)? {
        println!("{line}");
    }
    Ok(())
}

/// `--list-backups`.
fn list_backups(paths: &Paths) -> anyhow::Result<()> {
    let backups = backup::list(&paths.root)?;
    if backups.is_empty() {
        println!(
            "no backups in {}",
            backup::backups_dir(&paths.root).display()
        );
        return Ok(());
    }
    let newest = backups.len() - 1;
    for (index, b) in backups.iter().enumerate() {
        let count = backup::present_files(&b.keys()).len();
        let mark = if index == newest { "  (newest)" } else { "" };
        println!("{}  {count} files{mark}", b.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(change: impl FnOnce(&mut GenerateSettings)) -> anyhow::Result<GenerateSettings> {
        let mut settings = GenerateSettings {
            dir: "infra/secrets".into(),
            ..GenerateSettings::default()
        };
        change(&mut settings);
        effective(&settings)
    }

    #[test]
    fn modes_conflict_only_when_switched_on() {
        assert!(
            settings(|s| {
                s.force = true;
                s.k8s_secret = Some("app".into());
            })
            .is_ok()
        );
        let err = settings(|s| {
            s.force = true;
            s.verify = true;
        })
        .unwrap_err();
        assert_eq!(Failure::of(&err), Some(Failure::Config));
        assert!(format!("{err:#}").contains("--force cannot be used with --verify"));
        assert!(
            settings(|s| {
                s.list = true;
                s.list_backups = true;
            })
            .is_err()
        );
        assert!(
            settings(|s| {
                s.k8s_secret = Some("app".into());
                s.list = true;
            })
            .is_err()
        );
        assert!(settings(|s| s.namespace = Some("prod".into())).is_err());
        // Empty values count as unset; `newest` is the newest backup.
        let args = settings(|s| {
            s.k8s_secret = Some(String::new());
            s.namespace = Some(String::new());
            s.output = Some(PathBuf::new());
            s.restore = Some(Some(String::new()));
        })
        .unwrap();
        assert!(args.k8s_secret.is_none() && args.namespace.is_none());
        assert!(args.output.is_none() && args.restore.is_none());
        let restore = |value: Option<&str>| {
            settings(|s| s.restore = Some(value.map(str::to_owned)))
                .unwrap()
                .restore
        };
        assert_eq!(restore(Some("newest")), Some(None));
        assert_eq!(restore(None), Some(None));
        assert_eq!(restore(Some("backup-x")), Some(Some("backup-x".to_owned())));
    }
}

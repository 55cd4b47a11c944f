//! The secret-file generator (`generate`): creates, backs up, verifies, lists and restores
//! the eleven secret files under `<dir>/keys/`, and renders them as a Kubernetes Secret.
//!
//! It replaces the template's bash/openssl `generate_secrets.sh` and keeps its flags so
//! runbooks keep working, while fixing its defects: values come from the OS CSPRNG without
//! modulo bias (`store::random`), files are replaced atomically and durably
//! (`store::atomic`), a complete durable backup exists before the first overwrite
//! (`store::backup`), the user secrets file is parsed instead of sourced (`envfile`), and no
//! value is ever printed: reports name files and actions only. Nothing under the directory
//! is reached through a link (`store::dirfd`), and every input that can be refused is
//! checked before the first write. This file holds the flow of each mode (its options are
//! parsed in `cli.rs`); the submodules hold the pieces, each with its own tests. Overlap
//! mode's files (twin passwords, `pg_service.conf`) are `overlap::files`'; the secrets
//! directory itself is `store`'s, shared with `rotate`. While a staged rotation is pending,
//! nothing is written.

mod envfile;
mod k8s;
mod oidc;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::error::Failure;
use crate::fileio::atomic;
use crate::fileio::dirfd::{self, Dir};
use crate::overlap::files as overlap;
use crate::secret::{NamedRoles, Secret};
use crate::store::catalog::{ENTRIES, Entry, Kind};
use crate::store::{Action, Locked, backup, check, random};

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
    /// Overlap mode: twin files and `pg_service.conf` too (see `overlap`).
    pub overlap: bool,
    pub twin_suffix: String,
    /// The overlapped roles' names (sections of `pg_service.conf`).
    pub named: NamedRoles,
}

/// The overlapped roles of `--overlap` (None without it). A directory that already has a
/// `pg_service.conf` is treated as overlapped too: a plain `generate --force` there would
/// otherwise leave it publishing a password that no longer is, and the sync would refuse
/// the whole set.
fn overlap_pairs(
    args: &GenerateSettings,
    keys: Option<&Dir>,
) -> anyhow::Result<Option<Vec<crate::overlap::Pair>>> {
    let has_service_file = match keys {
        Some(keys) => keys.kind(crate::overlap::SERVICE_FILE)? != dirfd::Kind::Missing,
        None => false,
    };
    if !args.overlap && !has_service_file {
        return Ok(None);
    }
    overlap::default_pairs(&args.named, &args.twin_suffix)
        .map(Some)
        .context(Failure::Config)
}

/// `pg-password-sync generate`.
pub fn command(settings: GenerateSettings) -> anyhow::Result<u8> {
    generate_files(&settings).map(|()| 0)
}

/// Runs the mode the settings select.
fn generate_files(args: &GenerateSettings) -> anyhow::Result<()> {
    let args = &effective(args)?;
    if args.verify {
        return verify(args);
    }
    if args.list {
        return list(args);
    }
    if args.list_backups {
        return list_backups(&args.dir);
    }
    // The write modes return their lock so that pruning happens while it is still held.
    let locked = if let Some(name) = &args.restore {
        restore(args, name.as_deref())?
    } else if args.backup_only {
        backup_only(&args.dir, &args.twin_suffix)?
    } else {
        generate(args)?
    };
    if let Some(keep) = args.keep_backups {
        // A pending stage's backup is what `rotate --abort` restores and `--publish-only`
        // checks: pruning it would leave a stage that can be neither undone nor finished.
        if locked.root.stat(overlap::PENDING_FILE)?.is_some() {
            return Err(anyhow::anyhow!(
                "a staged rotation is pending ({}): not pruning backups, since its rollback \
                 needs its own; finish it with `rotate --publish-only` or undo it with \
                 `rotate --abort` first",
                locked.root.shown(overlap::PENDING_FILE)
            ))
            .context(Failure::Config);
        }
        for name in backup::prune(locked.backups.as_ref(), keep as usize)? {
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

/// The secrets directory and its `keys/` and `backups/` as they are before the lock,
/// opened for a look only: a link at any of them is refused here, before anything is
/// written, and whatever is missing is `None`.
struct Existing {
    root: Option<Dir>,
    keys: Option<Dir>,
    backups: Option<Dir>,
}

impl Existing {
    fn open(dir: &Path) -> anyhow::Result<Existing> {
        let root = Dir::open_path(dir)?;
        let sub = |name: &str| match &root {
            Some(root) => root.subdir(name),
            None => Ok(None),
        };
        let keys = sub("keys")?;
        let backups = sub(backup::DIR)?;
        Ok(Existing {
            root,
            keys,
            backups,
        })
    }
}

/// The action for each catalog file given which files exist now in `keys` (`None`: no
/// `keys/` yet). Anything but a regular file under a catalog name (a link, say) is
/// refused: keeping it would chmod, and backing it up would copy, what it points at.
fn plan(keys: Option<&Dir>, force: bool) -> anyhow::Result<Vec<(Entry, Action)>> {
    let present = match keys {
        Some(keys) => backup::present_files(keys)?,
        None => Vec::new(),
    };
    Ok(ENTRIES
        .iter()
        .map(|entry| {
            let action = match (present.contains(&entry.file), force) {
                (false, _) => Action::Create,
                (true, true) => Action::Replace,
                (true, false) => Action::Keep,
            };
            (*entry, action)
        })
        .collect())
}

/// Where `--output` writes the manifest: its directory, opened and checked before anything
/// is written, and the file name in it.
struct Output {
    dir: Dir,
    file: String,
    path: PathBuf,
}

impl Output {
    /// Refuses an `--output` whose directory is missing or not writable, or that names a
    /// directory or special file. (A link at the name is replaced, never written through.)
    fn open(path: &Path) -> anyhow::Result<Output> {
        let checked = || -> anyhow::Result<Output> {
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .context("it does not name a file")?
                .to_owned();
            let dir = Dir::open_followed(path.parent().unwrap_or(Path::new("")))?;
            dir.check_writable()?;
            match dir.kind(&file)? {
                dirfd::Kind::Missing | dirfd::Kind::File | dirfd::Kind::Symlink => {}
                kind => anyhow::bail!("{} {}", dir.shown(&file), kind.problem()),
            }
            Ok(Output {
                dir,
                file,
                path: path.to_owned(),
            })
        };
        checked()
            .with_context(|| format!("--output {} cannot be written", path.display()))
            .context(Failure::Config)
    }
}

/// Creates missing files (or, with `--force`, replaces all), backing up first.
fn generate(args: &GenerateSettings) -> anyhow::Result<Locked> {
    // Everything that can be refused is checked before the first write.
    let mut output = None;
    if let Some(name) = &args.k8s_secret {
        check_k8s_names(name, args.namespace.as_deref())?;
        if args.output.is_none() && std::io::stdout().is_terminal() {
            return Err(anyhow::anyhow!(
                "--k8s-secret without --output would print every secret to the terminal: \
                 use --output FILE, or pipe it (`| kubectl apply -f -`)"
            ))
            .context(Failure::Config);
        }
        output = args.output.as_deref().map(Output::open).transpose()?;
    }
    let oidc_values = gather_oidc(args)?;

    let mut locked = crate::store::lock(&args.dir)?;
    overlap::refuse_while_pending(&locked.root)?;
    let keys = &locked.keys;
    let (writes, kept) = new_values(args, keys, &oidc_values)?;
    // Overlap files follow from the catalog values above (pg_service.conf publishes them);
    // planned (and refused, if they must be) before the first write.
    let (overlap_writes, overlap_kept) = match overlap_pairs(args, Some(keys))? {
        Some(pairs) => overlap::plan(keys, &pairs, args.force, &writes)?,
        None => (Vec::new(), Vec::new()),
    };
    let overwrites = writes
        .iter()
        .any(|(_, action, _)| *action == Action::Replace)
        || overlap_writes.iter().any(|w| w.action == Action::Replace);
    if overwrites && !args.no_backup {
        back_up_current(&mut locked, &args.twin_suffix, |line| report(args, line))?;
    }
    let keys = &locked.keys;
    write_values(args, keys, &writes, &overlap_writes)?;
    let kept_files = kept
        .iter()
        .map(|entry| entry.file.to_owned())
        .chain(overlap_kept);
    for file in kept_files {
        // By descriptor, on the file itself: never on what a link points at.
        let fixed = keys.fix_mode(&file, atomic::FILE_MODE)?;
        let note = if fixed { " (mode set to 0600)" } else { "" };
        report(args, &format!("kept {}{note}", keys.shown(&file)));
    }
    if let Some(name) = &args.k8s_secret {
        write_manifest(args, keys, name, output.as_ref())?;
    }
    Ok(locked)
}

/// The OIDC values this run needs, gathered (perhaps prompted for) before the lock, from a
/// first look at which files exist; what is written and what is backed up is decided
/// again under the lock, since another run may have created files in the meantime.
fn gather_oidc(args: &GenerateSettings) -> anyhow::Result<Vec<(&'static str, Secret)>> {
    let existing = Existing::open(&args.dir)?;
    let oidc_vars: Vec<&'static str> = plan(existing.keys.as_ref(), args.force)?
        .iter()
        .filter_map(|(entry, action)| match (entry.kind, action) {
            (Kind::Oidc(var), Action::Create | Action::Replace) => Some(var),
            _ => None,
        })
        .collect();
    if oidc_vars.is_empty() {
        return Ok(Vec::new());
    }
    let (env_path, explicit) = match &args.user_secrets_file {
        Some(path) => (path.clone(), true),
        None => (args.dir.join(oidc::ENV_FILE), false),
    };
    let file = oidc::load_env_file(existing.root.as_ref(), &env_path, explicit)?;
    let values = oidc::collect(
        &oidc_vars,
        file.as_ref(),
        &env_path,
        oidc::interactive(args.non_interactive),
    )?;
    Ok(oidc_vars.iter().copied().zip(values).collect())
}

/// A catalog file about to be written: what, how, and its new value.
type CatalogWrite = (Entry, Action, Secret);

/// The catalog files to write with their new values (made before anything is written), and
/// the ones kept (an unchanged value is kept too).
fn new_values(
    args: &GenerateSettings,
    keys: &Dir,
    oidc_values: &[(&'static str, Secret)],
) -> anyhow::Result<(Vec<CatalogWrite>, Vec<Entry>)> {
    let mut writes = Vec::new();
    let mut kept = Vec::new();
    for (entry, action) in plan(Some(keys), args.force)? {
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
                        keys.shown(entry.file)
                    )
                })?,
        };
        // A file that cannot be read as a value (one over 4096 bytes, say) is simply
        // replaced: that is what --force is for, and the backup before the first
        // overwrite still copies it.
        let unchanged = action == Action::Replace
            && check::read_value(keys, entry.file)
                .is_ok_and(|current| *current == value.expose().as_bytes());
        if unchanged {
            kept.push(entry);
        } else {
            writes.push((entry, action, value));
        }
    }
    Ok((writes, kept))
}

/// Writes the catalog values, then the overlap files: pg_service.conf never publishes a
/// password that its login's file does not hold yet.
fn write_values(
    args: &GenerateSettings,
    keys: &Dir,
    writes: &[CatalogWrite],
    overlap_writes: &[overlap::Write],
) -> anyhow::Result<()> {
    for (entry, action, value) in writes {
        atomic::write_atomic(keys, entry.file, value.expose().as_bytes())
            .with_context(|| format!("writing {}", keys.shown(entry.file)))?;
        let verb = match (action, entry.is_random()) {
            (Action::Create, _) => "created",
            (_, true) => "regenerated",
            (_, false) => "updated",
        };
        report(args, &format!("{verb} {}", keys.shown(entry.file)));
    }
    for write in overlap_writes {
        atomic::write_atomic(keys, &write.file, &write.value)
            .with_context(|| format!("writing {}", keys.shown(&write.file)))?;
        let verb = match write.action {
            Action::Create => "created",
            _ if write.file == crate::overlap::SERVICE_FILE => "updated",
            _ => "regenerated",
        };
        report(args, &format!("{verb} {}", keys.shown(&write.file)));
    }
    Ok(())
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
fn write_manifest(
    args: &GenerateSettings,
    keys: &Dir,
    name: &str,
    output: Option<&Output>,
) -> anyhow::Result<()> {
    let extra = overlap::manifest_values(keys, &args.twin_suffix)?;
    let mut values = Vec::with_capacity(ENTRIES.len() + extra.len());
    for entry in &ENTRIES {
        values.push((entry.key(), check::read_value(keys, entry.file)?));
    }
    for (key, value) in &extra {
        values.push((key.as_str(), value.clone()));
    }
    let manifest = k8s::render(name, args.namespace.as_deref(), &values);
    match output {
        Some(output) => {
            atomic::write_atomic(&output.dir, &output.file, manifest.as_bytes())
                .with_context(|| format!("writing the manifest to {}", output.path.display()))?;
            println!(
                "wrote Kubernetes Secret {name} to {}",
                output.path.display()
            );
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

/// Backs up the files of the set now in `keys/` (the catalog's and overlap mode's, if any;
/// `backups/` is created on first use) and reports it with `say`; returns how many files
/// were backed up.
fn back_up_current(locked: &mut Locked, suffix: &str, say: impl Fn(&str)) -> anyhow::Result<usize> {
    let files = overlap::present_files(&locked.keys, suffix)?;
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    if files.is_empty() {
        return Ok(0);
    }
    let made = locked.backup(&files)?;
    say(&format!(
        "backed up {} files to {}",
        files.len(),
        made.path.display()
    ));
    Ok(files.len())
}

/// `--backup-only`.
fn backup_only(dir: &Path, suffix: &str) -> anyhow::Result<Locked> {
    // Refuse links in the current set before the lock creates anything.
    if let Some(keys) = Existing::open(dir)?.keys {
        overlap::present_files(&keys, suffix)?;
    }
    let mut locked = crate::store::lock(dir)?;
    if back_up_current(&mut locked, suffix, |line| println!("{line}"))? == 0 {
        println!(
            "no secret files in {} to back up",
            locked.keys.path().display()
        );
    }
    Ok(locked)
}

/// `--restore [BACKUP]`.
fn restore(args: &GenerateSettings, name: Option<&str>) -> anyhow::Result<Locked> {
    let existing = Existing::open(&args.dir)?;
    // The current set is backed up first: refuse links in it before anything else.
    if let Some(keys) = &existing.keys {
        overlap::present_files(keys, &args.twin_suffix)?;
    }
    let (source, source_keys) =
        backup::resolve(existing.backups.as_ref(), name).context(Failure::Config)?;
    let files = overlap::present_files(&source_keys, &args.twin_suffix)?;
    if files.is_empty() {
        return Err(anyhow::anyhow!(
            "backup {} holds no secret files",
            source.path.display()
        ))
        .context(Failure::Config);
    }
    let keys_shown = args.dir.join("keys");
    if !args.yes && oidc::interactive(args.non_interactive) {
        let question = format!(
            "Replace {} secret files in {} with those of {}?",
            files.len(),
            keys_shown.display(),
            source.name
        );
        if !oidc::confirm(&question)? {
            bail!("restore cancelled; nothing was changed");
        }
    }
    drop(existing);
    let mut locked = crate::store::lock(&args.dir)?;
    overlap::refuse_while_pending(&locked.root)?;
    back_up_current(&mut locked, &args.twin_suffix, |line| println!("{line}"))?;
    for file in &files {
        let value = source_keys
            .read_file(file, backup::MAX_COPY_BYTES)
            .with_context(|| format!("reading {file} from the backup"))?
            .with_context(|| format!("{file} disappeared from the backup"))?;
        atomic::write_atomic(&locked.keys, file, &value)
            .with_context(|| format!("restoring {}", locked.keys.shown(file)))?;
        println!("restored {}", locked.keys.shown(file));
    }
    println!(
        "restored {} files from {}",
        files.len(),
        source.path.display()
    );
    Ok(locked)
}

/// `--verify`.
fn verify(args: &GenerateSettings) -> anyhow::Result<()> {
    let dir = &args.dir;
    let keys_shown = dir.join("keys");
    let keys = Existing::open(dir)?.keys;
    let pairs = overlap_pairs(args, keys.as_ref())?;
    let mut problems = check::verify(keys.as_ref())?;
    problems.extend(overlap::problems(
        keys.as_ref(),
        pairs.as_deref(),
        &args.twin_suffix,
    ));
    if problems.is_empty() {
        let overlap_files = match &keys {
            Some(keys) => {
                overlap::present_files(keys, &args.twin_suffix)?.len()
                    - backup::present_files(keys)?.len()
            }
            None => 0,
        };
        println!(
            "all {} secret files in {} pass",
            ENTRIES.len() + overlap_files,
            keys_shown.display()
        );
        return Ok(());
    }
    for problem in &problems {
        println!("problem: {problem}");
    }
    Err(anyhow::anyhow!(
        "{} problem(s) with the secret files in {}",
        problems.len(),
        keys_shown.display()
    ))
    .context(Failure::BadFiles)
}

/// `--list`.
fn list(args: &GenerateSettings) -> anyhow::Result<()> {
    let dir = &args.dir;
    let keys = Existing::open(dir)?.keys;
    let pairs = overlap_pairs(args, keys.as_ref())?;
    println!("{}", dir.join("keys").display());
    for line in check::list(keys.as_ref())? {
        println!("{line}");
    }
    let extra = overlap::list(keys.as_ref(), pairs.as_deref(), &args.twin_suffix)?;
    for line in extra.into_iter().skip(1) {
        println!("{line}");
    }
    Ok(())
}

/// `--list-backups`.
fn list_backups(dir: &Path) -> anyhow::Result<()> {
    let existing = Existing::open(dir)?;
    let backups = backup::list(existing.backups.as_ref())?;
    if backups.is_empty() {
        println!("no backups in {}", dir.join(backup::DIR).display());
        return Ok(());
    }
    let newest = backups.len() - 1;
    for (index, b) in backups.iter().enumerate() {
        // A backup whose files cannot be counted (a link among them) is still listed.
        let count = existing
            .backups
            .as_ref()
            .and_then(|all| all.subdir(&b.name).ok().flatten())
            .and_then(|dir| dir.subdir("keys").ok().flatten())
            .and_then(|keys| backup::present_files(&keys).ok())
            .map_or_else(|| "?".to_owned(), |files| files.len().to_string());
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

//! The secret-file generator (`generate`): creates, backs up, verifies, lists and restores
//! the eleven secret files under `<dir>/keys/`, and renders them as a Kubernetes Secret.
//!
//! It replaces the template's bash/openssl `generate_secrets.sh` and keeps its flags so
//! runbooks keep working, while fixing its defects: values come from the OS CSPRNG without
//! modulo bias (`random`), files are replaced atomically and durably (`atomic`), a complete
//! durable backup exists before the first overwrite (`backup`), the user secrets file is
//! parsed instead of sourced (`envfile`), and no value is ever printed: reports name files
//! and actions only. This file holds the command line and the flow of each mode; the
//! submodules hold the pieces, each with its own tests.

mod atomic;
mod backup;
mod catalog;
mod check;
mod clock;
mod envfile;
mod k8s;
mod oidc;
pub mod overlap;
mod random;

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use clap::builder::BoolishValueParser;
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use crate::error::Failure;
use crate::secret::Secret;
use catalog::{ENTRIES, Entry, Kind};

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
        default_value = "infra/secrets"
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
    /// --k8s-secret carries them. See `rotate` for the staged rotation.
    #[arg(long, env = "PG_PASSWORD_SYNC_OVERLAP", value_parser = BoolishValueParser::new())]
    pub overlap: bool,

    /// Suffix of the twin logins and their files (`appuser` → `appuser_alt`).
    #[arg(long, env = "PG_PASSWORD_SYNC_TWIN_SUFFIX", default_value = crate::overlap::DEFAULT_TWIN_SUFFIX)]
    pub twin_suffix: String,

    /// With --overlap (or an existing pg_service.conf): the role whose password is
    /// `postgres_app_user_pw`, its section name in pg_service.conf (the variable `run`
    /// reads too).
    #[arg(long, env = "APP_DB_USER", default_value = "appuser")]
    pub app_db_user: String,

    /// With --overlap: the role whose password is `postgres_app_ro_pw`.
    #[arg(long, env = "APP_DB_RO_USER", default_value = "backupuser")]
    pub app_db_ro_user: String,

    /// With --overlap: the role whose password is `postgres_temporal_pw`; not overlapped
    /// when unset (as `run` skips it).
    #[arg(long, env = "TEMPORAL_DB_USER")]
    pub temporal_db_user: Option<String>,
}

/// The overlapped roles of `--overlap` (None without it). A directory that already has a
/// `pg_service.conf` is treated as overlapped too: a plain `generate --force` there would
/// otherwise leave it publishing a password that no longer is, and the sync would refuse
/// the whole set.
fn overlap_pairs(args: &GenerateArgs) -> anyhow::Result<Option<Vec<overlap::Pair>>> {
    let service_file = args.dir.join("keys").join(crate::overlap::SERVICE_FILE);
    if !args.overlap && !service_file.exists() {
        return Ok(None);
    }
    overlap::default_pairs(
        &args.app_db_user,
        &args.app_db_ro_user,
        args.temporal_db_user.as_deref(),
        &args.twin_suffix,
    )
    .map(Some)
    .context(Failure::Config)
}

/// Runs `generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let args = &effective(args)?;
    let paths = Paths::new(&args.dir);
    if args.verify {
        return verify(args, &paths);
    }
    if args.list {
        return list(args, &paths);
    }
    if args.list_backups {
        return list_backups(&paths);
    }
    // The write modes return their lock so that pruning happens while it is still held.
    let _lock = if let Some(name) = &args.restore {
        restore(args, &paths, name.as_deref())?
    } else if args.backup_only {
        backup_only(args, &paths)?
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
fn effective(args: &GenerateArgs) -> anyhow::Result<GenerateArgs> {
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
pub(crate) enum Action {
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
fn generate(args: &GenerateArgs, paths: &Paths) -> anyhow::Result<Flock<File>> {
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

    // Overlap files follow from the catalog values above (pg_service.conf publishes them).
    let (overlap_writes, overlap_kept) = match overlap_pairs(args)? {
        Some(pairs) => overlap::plan(&paths.keys, &pairs, args.force, &writes)?,
        None => (Vec::new(), Vec::new()),
    };

    let overwrites = writes
        .iter()
        .any(|(_, action, _)| *action == Action::Replace)
        || overlap_writes.iter().any(|w| w.action == Action::Replace);
    if overwrites && !args.no_backup {
        let files = overlap::present_files(&paths.keys, &args.twin_suffix);
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
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
    // After the password files, so pg_service.conf never publishes a password that its
    // login's file does not hold yet.
    for write in &overlap_writes {
        atomic::write_atomic(&paths.keys, &write.file, &write.value)
            .with_context(|| format!("writing {}", paths.shown(&write.file)))?;
        let verb = match write.action {
            Action::Create => "created",
            _ if write.file == crate::overlap::SERVICE_FILE => "updated",
            _ => "regenerated",
        };
        report(args, &format!("{verb} {}", paths.shown(&write.file)));
    }
    for entry in kept {
        let fixed = fix_mode(&paths.keys.join(entry.file))?;
        let note = if fixed { " (mode set to 0600)" } else { "" };
        report(args, &format!("kept {}{note}", paths.shown(entry.file)));
    }
    for file in overlap_kept {
        let fixed = fix_mode(&paths.keys.join(&file))?;
        let note = if fixed { " (mode set to 0600)" } else { "" };
        report(args, &format!("kept {}{note}", paths.shown(&file)));
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
fn report(args: &GenerateArgs, line: &str) {
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
fn write_manifest(args: &GenerateArgs, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let extra = overlap::manifest_values(&paths.keys, &args.twin_suffix)?;
    let mut values = Vec::with_capacity(ENTRIES.len() + extra.len());
    for entry in &ENTRIES {
        values.push((
            entry.key(),
            check::read_value(&paths.keys.join(entry.file))?,
        ));
    }
    for (key, value) in &extra {
        values.push((key.as_str(), value.clone()));
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
fn backup_only(args: &GenerateArgs, paths: &Paths) -> anyhow::Result<Flock<File>> {
    let lock = lock_and_prepare(paths)?;
    let files = overlap::present_files(&paths.keys, &args.twin_suffix);
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    if files.is_empty() {
        println!("no secret files in {} to back up", paths.keys.display());
        return Ok(lock);
    }
    let made = backup::create(&paths.root, &paths.keys, &files)?;
    println!("backed up {} files to {}", files.len(), made.path.display());
    Ok(lock)
}

/// `--restore [BACKUP]`.
fn restore(args: &GenerateArgs, paths: &Paths, name: Option<&str>) -> anyhow::Result<Flock<File>> {
    let source = backup::resolve(&paths.root, name).context(Failure::Config)?;
    let files = overlap::present_files(&source.keys(), &args.twin_suffix);
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
    let current = overlap::present_files(&paths.keys, &args.twin_suffix);
    let current: Vec<&str> = current.iter().map(String::as_str).collect();
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
fn verify(args: &GenerateArgs, paths: &Paths) -> anyhow::Result<()> {
    let pairs = overlap_pairs(args)?;
    let mut problems = check::verify(&paths.keys)?;
    problems.extend(overlap::problems(
        &paths.keys,
        pairs.as_deref(),
        &args.twin_suffix,
    ));
    if problems.is_empty() {
        let overlap_files = overlap::present_files(&paths.keys, &args.twin_suffix).len()
            - backup::present_files(&paths.keys).len();
        println!(
            "all {} secret files in {} pass",
            ENTRIES.len() + overlap_files,
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
fn list(args: &GenerateArgs, paths: &Paths) -> anyhow::Result<()> {
    let pairs = overlap_pairs(args)?;
    println!("{}", paths.keys.display());
    for line in check::list(&paths.keys)? {
        println!("{line}");
    }
    for line in overlap::list(&paths.keys, pairs.as_deref(), &args.twin_suffix)?
        .into_iter()
        .skip(1)
    {
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
    use clap::FromArgMatches;

    fn command() -> clap::Command {
        GenerateArgs::augment_args(clap::Command::new("generate").no_binary_name(true))
    }

    #[test]
    fn every_option_has_an_environment_variable() {
        let cmd = command();
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

    /// `generate ARGS` as `run` sees it. Variables are tested on the binary, since
    /// clap reads them from this process's environment.
    fn parse(argv: &[&str]) -> anyhow::Result<GenerateArgs> {
        let matches = command().try_get_matches_from(argv)?;
        effective(&GenerateArgs::from_arg_matches(&matches)?)
    }

    #[test]
    fn modes_conflict_only_when_switched_on() {
        assert!(parse(&["--force", "--k8s-secret", "app"]).is_ok());
        let err = parse(&["--force", "--verify"]).unwrap_err();
        assert_eq!(Failure::of(&err), Some(Failure::Config));
        assert!(format!("{err:#}").contains("--force cannot be used with --verify"));
        assert!(parse(&["--list", "--list-backups"]).is_err());
        assert!(parse(&["--k8s-secret", "app", "--list"]).is_err());
        assert!(parse(&["--namespace", "prod"]).is_err());
        // Empty values count as unset; `newest` is the newest backup.
        let args = parse(&["--k8s-secret=", "--namespace=", "--output=", "--restore="]).unwrap();
        assert!(args.k8s_secret.is_none() && args.namespace.is_none());
        assert!(args.output.is_none() && args.restore.is_none());
        assert_eq!(parse(&["--restore=newest"]).unwrap().restore, Some(None));
        assert_eq!(parse(&["--restore"]).unwrap().restore, Some(None));
        assert_eq!(
            parse(&["--restore", "backup-x"]).unwrap().restore,
            Some(Some("backup-x".to_owned()))
        );
    }
}

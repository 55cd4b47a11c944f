//! Backups of the secret set: `<dir>/backups/backup-YYYYMMDD-HHMMSS[-N]/keys/`.
//!
//! A backup is assembled in a hidden staging directory (`backups/.backup.tmp-…`), every file
//! and directory in it fsynced, and only then renamed to its final name and `backups/`
//! fsynced. So a backup that carries a `backup-…` name is always complete and durable, even
//! if the process is killed while copying; callers take it before their first overwrite.
//! Names use UTC; a second backup within the same second gets a `-1`, `-2`, … suffix, and
//! ordering parses the suffix numerically so `-10` sorts after `-9`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use zeroize::Zeroizing;

use super::atomic::{self, create_synced, ensure_private_dir, sync_dir, test_delay};
use super::catalog;
use super::clock::Utc;

/// Prefix of every backup directory name.
pub const PREFIX: &str = "backup-";

/// The sort key of a backup directory name: its timestamp and collision suffix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackupKey {
    stamp: String,
    suffix: u32,
}

/// Parses `backup-YYYYMMDD-HHMMSS` or `backup-YYYYMMDD-HHMMSS-N`; anything else is not ours.
pub fn parse_name(name: &str) -> Option<BackupKey> {
    let rest = name.strip_prefix(PREFIX)?;
    let (stamp, suffix) = match rest.get(15..) {
        Some("") => (rest, 0),
        Some(tail) => {
            let digits = tail.strip_prefix('-')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (&rest[..15], digits.parse().ok()?)
        }
        None => return None,
    };
    let bytes = stamp.as_bytes();
    let shape_ok = bytes.len() == 15
        && bytes[8] == b'-'
        && bytes[..8].iter().chain(&bytes[9..]).all(u8::is_ascii_digit);
    shape_ok.then(|| BackupKey {
        stamp: stamp.to_owned(),
        suffix,
    })
}

/// The name for the `attempt`-th try at a backup taken at `time` (0: no suffix).
pub fn name_for(time: &Utc, attempt: u32) -> String {
    match attempt {
        0 => format!("{PREFIX}{}", time.compact()),
        n => format!("{PREFIX}{}-{n}", time.compact()),
    }
}

/// `<dir>/backups`.
pub fn backups_dir(root: &Path) -> PathBuf {
    root.join("backups")
}

/// A backup on disk.
#[derive(Debug, Clone)]
pub struct Backup {
    pub name: String,
    pub path: PathBuf,
    key: BackupKey,
}

impl Backup {
    /// The directory holding the backed-up files.
    pub fn keys(&self) -> PathBuf {
        self.path.join("keys")
    }
}

/// Every backup under `<dir>/backups`, oldest first. Staging leftovers are not listed.
pub fn list(root: &Path) -> anyhow::Result<Vec<Backup>> {
    let dir = backups_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    let mut backups = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(key) = parse_name(&name) else {
            continue;
        };
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            backups.push(Backup {
                path: entry.path(),
                name,
                key,
            });
        }
    }
    backups.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(backups)
}

/// The catalog files present in a keys directory, in catalog order.
pub fn present_files(keys: &Path) -> Vec<&'static str> {
    catalog::ENTRIES
        .iter()
        .map(|entry| entry.file)
        .filter(|file| keys.join(file).is_file())
        .collect()
}

/// Copies `files` from `keys` into a new complete, durable backup and returns it.
pub fn create(root: &Path, keys: &Path, files: &[&str]) -> anyhow::Result<Backup> {
    let backups = backups_dir(root);
    ensure_private_dir(&backups)?;
    let staging = backups.join(atomic::temp_name("backup"));
    let staged_keys = staging.join("keys");
    ensure_private_dir(&staged_keys)
        .with_context(|| format!("creating backup staging directory {}", staging.display()))?;
    for file in files {
        let source = keys.join(file);
        let bytes = Zeroizing::new(
            fs::read(&source)
                .with_context(|| format!("reading {} for the backup", source.display()))?,
        );
        create_synced(&staged_keys.join(file), &bytes)?;
        test_delay();
    }
    // The copies are synced; now their directory entries, then the staging dir's `keys`.
    sync_dir(&staged_keys)?;
    sync_dir(&staging)?;
    test_delay();

    let now = Utc::now();
    let mut attempt = 0;
    let (name, path) = loop {
        let name = name_for(&now, attempt);
        let path = backups.join(&name);
        // Runs are serialised by the lock in `mod.rs`, so check-then-rename cannot race;
        // and rename(2) refuses to replace a non-empty directory anyway.
        if !path.exists() {
            fs::rename(&staging, &path)
                .with_context(|| format!("renaming the backup into {}", path.display()))?;
            break (name, path);
        }
        attempt += 1;
    };
    // The backup exists under its name only once this rename is durable.
    sync_dir(&backups)?;
    test_delay();
    let key = parse_name(&name).with_context(|| format!("backup name {name} does not parse"))?;
    Ok(Backup { name, path, key })
}

/// Removes the oldest backups so that at most `keep` remain; returns the removed names.
pub fn prune(root: &Path, keep: usize) -> anyhow::Result<Vec<String>> {
    let backups = list(root)?;
    let excess = backups.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for backup in backups.into_iter().take(excess) {
        fs::remove_dir_all(&backup.path)
            .with_context(|| format!("removing old backup {}", backup.path.display()))?;
        removed.push(backup.name);
    }
    if !removed.is_empty() {
        sync_dir(&backups_dir(root))?;
    }
    Ok(removed)
}

/// Finds the backup `--restore` names: the newest when `name` is `None`; a path when it
/// contains `/`; otherwise a directory name under `<dir>/backups`.
pub fn resolve(root: &Path, name: Option<&str>) -> anyhow::Result<Backup> {
    let backup = match name {
        None => list(root)?
            .pop()
            .with_context(|| format!("no backups in {}", backups_dir(root).display()))?,
        Some(name) => {
            let path = if name.contains('/') {
                PathBuf::from(name)
            } else {
                backups_dir(root).join(name)
            };
            let base = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let key = parse_name(&base).unwrap_or(BackupKey {
                stamp: String::new(),
                suffix: 0,
            });
            Backup {
                name: base,
                path,
                key,
            }
        }
    };
    if !backup.keys().is_dir() {
        anyhow::bail!(
            "{} is not a backup (it has no keys/ directory)",
            backup.path.display()
        );
    }
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_order_numerically() {
        assert!(parse_name("backup-20251123-120000").is_some());
        assert!(parse_name("backup-20251123-120000-3").is_some());
        for bad in [
            "backup-20251123-12000",
            "backup-20251123_120000",
            "backup-20251123-120000-",
            "backup-20251123-120000-x",
            "backup-2025112a-120000",
            ".backup.tmp-1-ab",
            "notes.txt",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        let mut names = vec![
            "backup-20251123-120000-10",
            "backup-20251123-120001",
            "backup-20251123-120000-2",
            "backup-20251122-235959",
            "backup-20251123-120000",
        ];
        names.sort_by_key(|n| parse_name(n).unwrap());
        assert_eq!(
            names,
            [
                "backup-20251122-235959",
                "backup-20251123-120000",
                "backup-20251123-120000-2",
                "backup-20251123-120000-10",
                "backup-20251123-120001",
            ]
        );
    }

    #[test]
    fn name_for_adds_a_suffix_on_retry() {
        let t = Utc::from_unix(1_763_899_200);
        assert_eq!(name_for(&t, 0), "backup-20251123-120000");
        assert_eq!(name_for(&t, 2), "backup-20251123-120000-2");
    }

    #[test]
    fn create_list_resolve_prune() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let keys = root.path().join("keys");
        fs::create_dir(&keys).unwrap();
        fs::write(keys.join("redis_password.txt"), "one").unwrap();
        let first = create(root.path(), &keys, &["redis_password.txt"]).unwrap();
        fs::write(keys.join("redis_password.txt"), "two").unwrap();
        let second = create(root.path(), &keys, &["redis_password.txt"]).unwrap();
        assert_ne!(first.name, second.name);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&second.path), 0o700);
        assert_eq!(mode(&second.keys()), 0o700);
        assert_eq!(mode(&second.keys().join("redis_password.txt")), 0o600);
        let names: Vec<_> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, [first.name.clone(), second.name.clone()]);
        assert_eq!(resolve(root.path(), None).unwrap().name, second.name);
        let older = resolve(root.path(), Some(&first.name)).unwrap();
        assert_eq!(
            fs::read(older.keys().join("redis_password.txt")).unwrap(),
            b"one"
        );
        assert!(resolve(root.path(), Some("backup-19990101-000000")).is_err());
        assert_eq!(prune(root.path(), 1).unwrap(), [first.name]);
        assert_eq!(list(root.path()).unwrap().len(), 1);
        // No staging directory is left behind.
        assert_eq!(fs::read_dir(backups_dir(root.path())).unwrap().count(), 1);
    }
}

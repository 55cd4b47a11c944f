//! Backups of the secret set: `<dir>/backups/backup-YYYYMMDD-HHMMSS[-N]/keys/`.
//!
//! A backup is assembled in a hidden staging directory (`backups/.backup.tmp-…`), every file
//! and directory in it fsynced, and only then renamed to its final name and `backups/`
//! fsynced. So a backup that carries a `backup-…` name is always complete and durable, even
//! if the process is killed while copying; callers take it before their first overwrite.
//! Names use UTC; a second backup within the same second gets a `-1`, `-2`, … suffix, and
//! ordering parses the suffix numerically so `-10` sorts after `-9`. Everything goes through
//! `Dir` handles: a link where a backup, `backups/` or a copied file belongs is never
//! followed, so no foreign directory is pruned and no link target is copied.

use std::path::PathBuf;

use anyhow::Context;

use super::catalog;
use super::clock::Utc;
use crate::error::Failure;
use crate::fileio::atomic::{self, create_synced, test_delay};
use crate::fileio::dirfd::{Dir, Kind};

/// Prefix of every backup directory name.
pub const PREFIX: &str = "backup-";

/// The sort key of a backup directory name: its timestamp and collision suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
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

/// The name of the backups directory under the secrets directory.
pub const DIR: &str = "backups";

/// The largest file a backup copies: a file in `keys/` can be over the 4096-byte limit of
/// a value (`--force` exists to replace such a file, and backs it up first), but not a
/// disk's worth.
pub const MAX_COPY_BYTES: usize = 1 << 20;

/// A backup on disk.
#[derive(Debug, Clone)]
pub struct Backup {
    pub name: String,
    /// Where it is, for messages.
    pub path: PathBuf,
    key: BackupKey,
}

/// Every backup in `backups` (none if it does not exist), oldest first. Staging leftovers
/// and links (even with a backup's name) are not listed, so never pruned or restored.
pub fn list(backups: Option<&Dir>) -> anyhow::Result<Vec<Backup>> {
    let Some(backups) = backups else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for (name, kind) in backups.entries()? {
        let Some(key) = parse_name(&name) else {
            continue;
        };
        if kind == Kind::Dir {
            found.push(Backup {
                path: backups.path().join(&name),
                name,
                key,
            });
        }
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(found)
}

/// The catalog files present in a keys directory, in catalog order. Anything but a
/// regular file under a catalog name (a link, say) is refused: it can be neither copied
/// nor replaced without touching what it points at.
pub fn present_files(keys: &Dir) -> anyhow::Result<Vec<&'static str>> {
    let mut files = Vec::new();
    for entry in &catalog::ENTRIES {
        if present(keys, entry.file)? {
            files.push(entry.file);
        }
    }
    Ok(files)
}

/// Whether the file `name` is in `keys`; anything but a regular file there is refused (see
/// `present_files`).
pub fn present(keys: &Dir, name: &str) -> anyhow::Result<bool> {
    match keys.kind(name)? {
        Kind::Missing => Ok(false),
        Kind::File => Ok(true),
        kind => {
            Err(anyhow::anyhow!("{} {}", keys.shown(name), kind.problem())).context(Failure::Config)
        }
    }
}

/// Copies `files` from `keys` into a new complete, durable backup in `backups` and
/// returns it.
pub fn create(backups: &Dir, keys: &Dir, files: &[&str]) -> anyhow::Result<Backup> {
    let staging_name = atomic::temp_name("backup");
    let staging = backups
        .private_subdir(&staging_name, atomic::DIR_MODE)
        .context("creating the backup staging directory")?;
    let staged_keys = staging.private_subdir("keys", atomic::DIR_MODE)?;
    for file in files {
        let bytes = keys
            .read_file(file, MAX_COPY_BYTES)
            .with_context(|| format!("reading {} for the backup", keys.shown(file)))?
            .with_context(|| format!("{} disappeared during the backup", keys.shown(file)))?;
        create_synced(&staged_keys, file, &bytes)?;
        test_delay();
    }
    // The copies are synced; now their directory entries, then the staging dir's `keys`.
    staged_keys.sync()?;
    staging.sync()?;
    test_delay();

    let now = Utc::now();
    let mut attempt = 0;
    let name = loop {
        let name = name_for(&now, attempt);
        // RENAME_NOREPLACE: an existing entry of that name (even a link) is never replaced.
        if backups.rename_new(&staging_name, &name)? {
            break name;
        }
        attempt += 1;
    };
    // The backup exists under its name only once this rename is durable.
    backups.sync()?;
    test_delay();
    let key = parse_name(&name).with_context(|| format!("backup name {name} does not parse"))?;
    Ok(Backup {
        path: backups.path().join(&name),
        name,
        key,
    })
}

/// Removes the oldest backups so that at most `keep` remain; returns the removed names.
pub fn prune(backups: Option<&Dir>, keep: usize) -> anyhow::Result<Vec<String>> {
    let Some(dir) = backups else {
        return Ok(Vec::new());
    };
    let found = list(backups)?;
    let excess = found.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for backup in found.into_iter().take(excess) {
        dir.remove_tree(&backup.name)
            .with_context(|| format!("removing old backup {}", backup.path.display()))?;
        removed.push(backup.name);
    }
    if !removed.is_empty() {
        dir.sync()?;
    }
    Ok(removed)
}

/// The backup `--restore` names, with its `keys/` opened: the newest when `name` is
/// `None`; a path when it contains `/`; otherwise a directory name in `backups`.
pub fn resolve(backups: Option<&Dir>, name: Option<&str>) -> anyhow::Result<(Backup, Dir)> {
    let (backup, dir) = match name {
        None => {
            let newest = list(backups)?.pop().with_context(|| {
                format!(
                    "no backups in {}",
                    backups.map_or_else(|| DIR.to_owned(), |b| b.path().display().to_string())
                )
            })?;
            let dir = backups.and_then(|b| b.subdir(&newest.name).transpose());
            (newest, dir)
        }
        Some(name) if name.contains('/') => {
            let path = PathBuf::from(name);
            let base = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let key = parse_name(&base).unwrap_or_default();
            let dir = Some(Dir::open_followed(&path));
            let backup = Backup {
                name: base,
                path,
                key,
            };
            (backup, dir)
        }
        Some(name) => {
            let backups = backups.with_context(|| format!("no backup named {name}"))?;
            let dir = backups.subdir(name)?.with_context(|| {
                format!("no backup named {name} in {}", backups.path().display())
            })?;
            let backup = Backup {
                name: name.to_owned(),
                path: dir.path().to_owned(),
                key: parse_name(name).unwrap_or_default(),
            };
            (backup, Some(Ok(dir)))
        }
    };
    let dir = dir.with_context(|| format!("{} disappeared", backup.path.display()))??;
    let keys = dir.subdir("keys")?.with_context(|| {
        format!(
            "{} is not a backup (it has no keys/ directory)",
            backup.path.display()
        )
    })?;
    Ok((backup, keys))
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
        use std::fs;
        use std::os::unix::fs::PermissionsExt;
        use std::path::Path;
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::create_path(tmp.path(), 0o700).unwrap();
        let keys = root.private_subdir("keys", 0o700).unwrap();
        let backups = root.private_subdir(DIR, 0o700).unwrap();
        let file = tmp.path().join("keys/redis_password.txt");
        fs::write(&file, "one").unwrap();
        let first = create(&backups, &keys, &["redis_password.txt"]).unwrap();
        fs::write(&file, "two").unwrap();
        let second = create(&backups, &keys, &["redis_password.txt"]).unwrap();
        assert_ne!(first.name, second.name);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&second.path), 0o700);
        assert_eq!(mode(&second.path.join("keys")), 0o700);
        assert_eq!(mode(&second.path.join("keys/redis_password.txt")), 0o600);
        let names: Vec<_> = list(Some(&backups))
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, [first.name.clone(), second.name.clone()]);
        assert_eq!(resolve(Some(&backups), None).unwrap().0.name, second.name);
        let (_, older) = resolve(Some(&backups), Some(&first.name)).unwrap();
        assert_eq!(
            &**older.read_file("redis_password.txt", 10).unwrap().unwrap(),
            b"one"
        );
        assert!(resolve(Some(&backups), Some("backup-19990101-000000")).is_err());
        assert!(resolve(None, None).is_err());
        assert_eq!(prune(Some(&backups), 1).unwrap(), [first.name]);
        assert_eq!(list(Some(&backups)).unwrap().len(), 1);
        // No staging directory is left behind.
        assert_eq!(fs::read_dir(tmp.path().join(DIR)).unwrap().count(), 1);
    }
}

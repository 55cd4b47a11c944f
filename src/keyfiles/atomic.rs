//! Durable, atomic file and directory operations for the secret files.
//!
//! A secret file is never written in place: the new value goes to a temp file created
//! 0600 in the same directory, is fsynced, renamed over the old name, and the directory is
//! fsynced. A crash at any moment therefore leaves either the complete old or the complete
//! new file under the name (the replaced script's `>` redirection could leave it empty or
//! torn). Temp files start with `.` and contain `.tmp-`, so a later run can recognise and
//! remove the leftovers of a killed one.
//!
//! `PG_PASSWORD_SYNC_TEST_DELAY_US` is a test-only hook: when set, the write path sleeps
//! that many microseconds between its steps, so the crash test can SIGKILL the process at
//! moments spread across the whole sequence. Nothing else reads it; operators never set it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;

/// Mode of every secret file and of the manifest written with `--output`.
pub const FILE_MODE: u32 = 0o600;

/// Mode of `keys/`, `backups/` and every backup directory.
pub const DIR_MODE: u32 = 0o700;

/// Marker in the names of temp files and staging directories.
pub const TEMP_MARKER: &str = ".tmp-";

/// Test-only: sleeps between the steps of a write when `PG_PASSWORD_SYNC_TEST_DELAY_US` is
/// set, so a test can kill the process in the middle of any step. No effect otherwise.
pub fn test_delay() {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("PG_PASSWORD_SYNC_TEST_DELAY_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_micros)
    });
    if let Some(delay) = delay {
        std::thread::sleep(*delay);
    }
}

/// A short random hex tag for temp names, so concurrent or leftover temps never collide.
fn temp_tag() -> String {
    let mut bytes = [0u8; 6];
    // A clash only costs a retry of the `create_new`; fall back to the pid alone on error.
    let _ = getrandom::fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", std::process::id())
}

/// The name of a temp sibling of `name` (hidden, recognisable by `is_temp_name`).
pub fn temp_name(name: &str) -> String {
    format!(".{name}{TEMP_MARKER}{}", temp_tag())
}

/// Whether a directory entry is a leftover temp file or staging directory.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// Fsyncs a directory, making the creations, renames and removals in it durable: a rename
/// is only an entry in the directory, and without this a crash can forget it even though
/// the file's data was synced.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Creates `dir` (and missing parents) with mode 0700, or tightens an existing one to 0700.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.permissions().mode() & 0o7777 != DIR_MODE {
                fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                    .with_context(|| format!("setting mode 0700 on {}", dir.display()))?;
            }
            Ok(())
        }
        Ok(_) => anyhow::bail!("{} exists and is not a directory", dir.display()),
        Err(_) => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .with_context(|| format!("creating directory {}", dir.display()))?;
            // The umask may have removed bits; set the exact mode.
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .with_context(|| format!("setting mode 0700 on {}", dir.display()))?;
            if let Some(parent) = dir.parent() {
                // Make the new directory entry itself durable.
                sync_dir(if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                })?;
            }
            Ok(())
        }
    }
}

/// Creates a new file (failing if it exists) with mode 0600, writes `contents` and fsyncs it.
pub fn create_synced(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let shown = path.display();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("creating {shown}"))?;
    // `mode` above is filtered by the umask; make it exactly 0600.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
        .with_context(|| format!("setting mode 0600 on {shown}"))?;
    file.write_all(contents)
        .with_context(|| format!("writing {shown}"))?;
    test_delay();
    // The data must be on disk before any name can point at it (see `write_atomic`).
    file.sync_all().with_context(|| format!("syncing {shown}"))
}

/// Removes a temp file when a write fails before its rename.
struct TempGuard<'a>(Option<&'a Path>);

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// Replaces `dir/name` with `contents` atomically and durably (mode 0600). The directory
/// itself is not synced here; call `sync_dir` once after a batch (or use `write_atomic`).
pub fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> anyhow::Result<()> {
    let temp = dir.join(temp_name(name));
    let mut guard = TempGuard(Some(&temp));
    create_synced(&temp, contents)?;
    test_delay();
    let target = dir.join(name);
    // rename(2) swaps the name in one step: readers and a crash see the old or the new file.
    fs::rename(&temp, &target).with_context(|| format!("renaming into {}", target.display()))?;
    guard.0 = None;
    test_delay();
    Ok(())
}

/// `replace_file` followed by an fsync of the directory, so the rename survives a crash.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> anyhow::Result<()> {
    replace_file(dir, name, contents)?;
    sync_dir(dir)?;
    test_delay();
    Ok(())
}

/// Removes temp files and staging directories left in `dir` by a killed run.
pub fn remove_leftovers(dir: &Path) -> anyhow::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_temp_name(name) {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.with_context(|| format!("removing leftover {}", path.display()))?;
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognised() {
        let name = temp_name("redis_password.txt");
        assert!(is_temp_name(&name), "{name}");
        assert!(!is_temp_name("redis_password.txt"));
        assert!(!is_temp_name(".hidden"));
        assert_ne!(name, temp_name("redis_password.txt"));
    }

    #[test]
    fn write_atomic_replaces_with_mode_0600_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        ensure_private_dir(&keys).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&keys), 0o700);
        write_atomic(&keys, "a.txt", b"one").unwrap();
        write_atomic(&keys, "a.txt", b"two").unwrap();
        assert_eq!(fs::read(keys.join("a.txt")).unwrap(), b"two");
        assert_eq!(mode(&keys.join("a.txt")), 0o600);
        assert_eq!(fs::read_dir(&keys).unwrap().count(), 1);
        fs::write(keys.join(temp_name("a.txt")), "x").unwrap();
        fs::create_dir(keys.join(temp_name("staging"))).unwrap();
        assert_eq!(remove_leftovers(&keys).unwrap(), 2);
        assert_eq!(fs::read_dir(&keys).unwrap().count(), 1);
    }

    #[test]
    fn ensure_private_dir_tightens_an_existing_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("keys");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&sub).unwrap();
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }
}

//! Durable, atomic file and directory operations for the secret files.
//!
//! A secret file is never written in place: the new value goes to a temp file created
//! 0600 in the same directory, is fsynced, renamed over the old name, and the directory is
//! fsynced. A crash at any moment therefore leaves either the complete old or the complete
//! new file under the name (the replaced script's `>` redirection could leave it empty or
//! torn). Temp files start with `.` and contain `.tmp-`, so a later run can recognise and
//! remove the leftovers of a killed one. Every step goes through a `Dir` handle, so a link
//! planted at a name is replaced, never written through.
//!
//! `PG_PASSWORD_SYNC_TEST_DELAY_US` is a hook of debug builds only (the test suite's): when
//! set, the write path sleeps that many microseconds between its steps, so the crash test
//! can SIGKILL the process at moments spread across the whole sequence. A release build
//! has no such hook: it reads no such variable.

use anyhow::Context;

use super::dirfd::Dir;

/// Mode of every secret file and of the manifest written with `--output`.
pub const FILE_MODE: u32 = 0o600;

/// Mode of `keys/`, `backups/` and every backup directory.
pub const DIR_MODE: u32 = 0o700;

/// Marker in the names of temp files and staging directories.
pub const TEMP_MARKER: &str = ".tmp-";

/// Debug builds: sleeps between the steps of a write when `PG_PASSWORD_SYNC_TEST_DELAY_US`
/// is set, so a test can kill the process in the middle of any step. No effect otherwise.
#[cfg(debug_assertions)]
pub fn test_delay() {
    use std::sync::OnceLock;
    use std::time::Duration;
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

/// Release builds: nothing (the shipped binary carries no test hook).
#[cfg(not(debug_assertions))]
pub fn test_delay() {}

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

/// Creates the new file `dir/name` (failing if it exists) with mode 0600, writes
/// `contents` and fsyncs it.
pub fn create_synced(dir: &Dir, name: &str, contents: &[u8]) -> anyhow::Result<()> {
    dir.create_synced(name, FILE_MODE, contents, test_delay)
}

/// Removes a temp file when a write fails before its rename.
struct TempGuard<'a>(Option<(&'a Dir, &'a str)>);

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if let Some((dir, name)) = self.0 {
            let _ = dir.remove_file(name);
        }
    }
}

/// Replaces `dir/name` with `contents` atomically and durably (mode 0600); a link at
/// `name` is replaced, never written through. The directory itself is not synced here;
/// call `Dir::sync` once after a batch (or use `write_atomic`).
pub fn replace_file(dir: &Dir, name: &str, contents: &[u8]) -> anyhow::Result<()> {
    let temp = temp_name(name);
    let mut guard = TempGuard(Some((dir, &temp)));
    create_synced(dir, &temp, contents)?;
    test_delay();
    // rename(2) swaps the name in one step: readers and a crash see the old or the new file.
    dir.rename(&temp, name)?;
    guard.0 = None;
    test_delay();
    Ok(())
}

/// `replace_file` followed by an fsync of the directory, so the rename survives a crash.
pub fn write_atomic(dir: &Dir, name: &str, contents: &[u8]) -> anyhow::Result<()> {
    replace_file(dir, name, contents)?;
    dir.sync()?;
    test_delay();
    Ok(())
}

/// Removes temp files and staging directories left in `dir` by a killed run (a link is
/// removed itself, never followed).
pub fn remove_leftovers(dir: &Dir) -> anyhow::Result<usize> {
    let mut removed = 0;
    for (name, _) in dir.entries()? {
        if is_temp_name(&name) {
            dir.remove_tree(&name)
                .with_context(|| format!("removing leftover {}", dir.shown(&name)))?;
            removed += 1;
        }
    }
    if removed > 0 {
        dir.sync()?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

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
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::create_path(tmp.path(), DIR_MODE).unwrap();
        let keys = root.private_subdir("keys", DIR_MODE).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let path = tmp.path().join("keys");
        assert_eq!(mode(&path), 0o700);
        write_atomic(&keys, "a.txt", b"one").unwrap();
        write_atomic(&keys, "a.txt", b"two").unwrap();
        assert_eq!(fs::read(path.join("a.txt")).unwrap(), b"two");
        assert_eq!(mode(&path.join("a.txt")), 0o600);
        assert_eq!(fs::read_dir(&path).unwrap().count(), 1);
        fs::write(path.join(temp_name("a.txt")), "x").unwrap();
        let staging = path.join(temp_name("staging"));
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("f"), "x").unwrap();
        assert_eq!(remove_leftovers(&keys).unwrap(), 2);
        assert_eq!(fs::read_dir(&path).unwrap().count(), 1);
    }

    #[test]
    fn a_private_subdir_tightens_an_existing_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = tmp.path().join("keys");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        let root = Dir::create_path(tmp.path(), DIR_MODE).unwrap();
        root.private_subdir("keys", DIR_MODE).unwrap();
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }
}

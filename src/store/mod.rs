//! The secrets directory on the host, as `generate` and `rotate` both use it: one lock,
//! one backup, one catalog.
//!
//! Everything under the directory is reached through directory handles opened without
//! following a link, and files are replaced atomically and durably (`fileio`, the one
//! file-access layer); a complete, durable backup is made before anything is overwritten
//! (`backup`). The catalog
//! of the eleven files (`catalog`), their checks (`check`), fresh values (`random`) and the
//! clock of backup names (`clock`) live here too, because both commands write the same set.
//! The lock (`lock`) is an exclusive `flock` on the directory's own handle for the whole run,
//! so a `generate` and a `rotate` never interleave their writes.

pub mod backup;
pub mod catalog;
pub mod check;
pub mod clock;
pub mod random;

use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use crate::error::Failure;

use crate::fileio::atomic;
pub use crate::fileio::dirfd::Dir;

/// The default of `--dir` (`generate` and `rotate`): the template's secrets directory.
pub const DEFAULT_DIR: &str = "infra/secrets";

/// The largest file of the set (`pg_service.conf`, 64 KiB); the bound of `read_exact`.
pub const MAX_FILE_BYTES: usize = 64 * 1024;

/// What a run does to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Replace,
    Keep,
}

/// The secrets directory under the run's exclusive lock, with `keys/` (and `backups/` once
/// it exists) opened through the root's handle.
pub struct Locked {
    _lock: Flock<OwnedFd>,
    pub root: Dir,
    pub keys: Dir,
    pub backups: Option<Dir>,
}

/// Takes the exclusive lock on the secrets directory `dir` (created when missing) for the
/// whole run, so two runs cannot interleave their writes or remove each other's temp files
/// as leftovers; opens `keys/` and removes the temp files a killed run left. The lock is on
/// the directory's own handle (opened without following a link), not a file.
pub fn lock(dir: &Path) -> anyhow::Result<Locked> {
    let root = Dir::create_path(dir, atomic::DIR_MODE)?;
    let lock = Flock::lock(root.try_clone_fd()?, FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            anyhow::anyhow!(
                "another `generate` or `rotate` is running on {} ({errno})",
                dir.display()
            )
            .context(Failure::TryLater)
        },
    )?;
    let keys = root.private_subdir("keys", atomic::DIR_MODE)?;
    let backups = root.subdir(backup::DIR)?;
    // Temp files of a killed run are incomplete by definition: remove them, in the
    // directory itself too (where `rotate` keeps its record).
    atomic::remove_leftovers(&root)?;
    atomic::remove_leftovers(&keys)?;
    if let Some(backups) = &backups {
        atomic::remove_leftovers(backups)?;
    }
    Ok(Locked {
        _lock: lock,
        root,
        keys,
        backups,
    })
}

impl Locked {
    /// `backups/`, created when missing.
    pub fn backups_dir(&mut self) -> anyhow::Result<&Dir> {
        let backups = match &mut self.backups {
            Some(backups) => backups,
            none => none.insert(self.root.private_subdir(backup::DIR, atomic::DIR_MODE)?),
        };
        Ok(backups)
    }

    /// A complete, durable backup of `files` (names in `keys/`); returns its name.
    pub fn backup(&mut self, files: &[&str]) -> anyhow::Result<backup::Backup> {
        self.backups_dir()?;
        let backups = self.backups.as_ref().context("opening backups/")?;
        backup::create(backups, &self.keys, files)
    }

    /// The `keys/` of backup `name`, opened without following a link.
    pub fn backup_keys(&self, name: &str) -> anyhow::Result<Dir> {
        self.backups
            .as_ref()
            .and_then(|b| b.subdir(name).transpose())
            .transpose()?
            .and_then(|b| b.subdir("keys").transpose())
            .transpose()?
            .with_context(|| format!("backup {name} (or its keys/) is missing"))
    }
}

/// Replaces `dir/name` atomically and durably (mode 0600; a link there is replaced, never
/// written through).
pub fn write(dir: &Dir, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    atomic::write_atomic(dir, name, bytes).with_context(|| format!("writing {}", dir.shown(name)))
}

/// A file's exact bytes (for a byte-for-byte restore), bounded by `MAX_FILE_BYTES`; never
/// through a link.
pub fn read_exact(dir: &Dir, name: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    dir.read_file(name, MAX_FILE_BYTES)?
        .with_context(|| format!("{} is missing", dir.shown(name)))
}

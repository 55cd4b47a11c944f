//! The inotify watches behind the watch loop: which paths are watched, and re-arming them.
//!
//! Two kinds of target, both non-recursive (ARCHITECTURE.md, "The life of a rotation"):
//! - every directory that can hold a secret: Kubernetes swaps its `..data` symlink, editors
//!   and generators rename files into it, so only a directory watch sees those;
//! - every secret file as currently resolved: a Compose single-file bind mount keeps its
//!   inode when the host renames a new file over its source, and only in-place rewrites of
//!   that inode show through, which a watch on the mount point's directory does not see.
//!
//! Watches are tied to inodes, and renames, swaps and remounts replace inodes. `notify` also
//! drops a path's watch by name when it sees a delete or move of that name, which can hit a
//! watch we re-established a moment before. So `arm` simply re-establishes every watch each
//! time it runs (a handful of syscalls per burst) instead of trying to track which ones are
//! still good, and records the identity (device, inode) it armed. `drifted` compares those
//! identities with what the paths point at now: the loop polls it once a second, which is how
//! a directory missing at start, removed and recreated, or mounted over (no inotify event at
//! all) is picked up.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{Config, SecretRef};

/// What a path points at (following symlinks), so a replaced inode is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

pub fn identity(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// Every file of the secret set, as configured (not yet resolved). The one list the watch
/// loop uses to tell a secret file from a stranger in the same directory: watches, the
/// in-place-write tracking and the stability check all follow it, so a file added to the
/// set is covered by the same rules.
fn secret_refs(config: &Config) -> Vec<SecretRef> {
    // Every file a sync reads (in overlap mode the twins' and `pg_service.conf` too), and
    // the superuser's, which the sync may log in with.
    let mut refs: Vec<SecretRef> = config.secret_files().into_iter().map(|(_, s)| s).collect();
    refs.push(config.superuser_secret.clone());
    refs
}

/// Whether `path` is, or could become by the lookup rules, a file of the secret set:
/// `NAME` or `NAME.txt` in a secret directory, or an explicit path. Pure (no I/O), so a
/// file that appears beside the one in use (`NAME` next to `NAME.txt`) is recognised from
/// its first write on.
pub fn is_secret_file(config: &Config, path: &Path) -> bool {
    secret_refs(config).iter().any(|secret| match secret {
        SecretRef::Path(p) => p == path,
        SecretRef::Name(name) => {
            let in_dir = path
                .parent()
                .is_some_and(|dir| config.secret_dirs.iter().any(|d| d == dir));
            let file = path.file_name().and_then(|f| f.to_str());
            in_dir
                && file.is_some_and(|f| {
                    f == name || f.strip_suffix(".txt").is_some_and(|stem| stem == name)
                })
        }
    })
}

/// Every path to watch right now: the secret directories, then each resolvable secret file.
fn targets(config: &Config) -> Vec<(PathBuf, Kind)> {
    let mut targets: Vec<(PathBuf, Kind)> = Vec::new();
    // SECRETS_SOURCE_DIR and KEYS_DIR may well be the same directory.
    for dir in config.watched_dirs() {
        if !targets.iter().any(|(p, _)| *p == dir) {
            targets.push((dir, Kind::Dir));
        }
    }
    for secret in &secret_refs(config) {
        // An unresolvable secret is reported by the read; its directory watch (or the
        // once-a-second check) notices when it appears.
        if let Ok(path) = config.resolve(secret)
            && !targets.iter().any(|(p, _)| *p == path)
        {
            targets.push((path, Kind::File));
        }
    }
    targets
}

/// The watcher and what it was armed on.
pub struct Watches {
    watcher: RecommendedWatcher,
    /// Path → the identity it had when its watch was established.
    armed: HashMap<PathBuf, FileId>,
    /// Directories already warned about as missing (warn once, until they appear).
    missing: HashSet<PathBuf>,
    /// Paths whose watch failed, already warned about (warn once, until it works).
    failed: HashSet<PathBuf>,
}

/// True when every configured secret resolves to an existing file.
fn all_resolve(config: &Config) -> bool {
    config
        .secret_files()
        .iter()
        .all(|(_, secret)| config.resolve(secret).is_ok())
}

impl Watches {
    /// Starts an inotify watcher whose events go to `events` (from notify's own thread).
    pub fn new(events: UnboundedSender<notify::Result<Event>>) -> anyhow::Result<Watches> {
        let watcher = RecommendedWatcher::new(
            move |event: notify::Result<Event>| {
                // The loop only stops listening when it is being dropped.
                let _ = events.send(event);
            },
            notify::Config::default(),
        )
        .context("starting the inotify file watcher")?;
        Ok(Watches {
            watcher,
            armed: HashMap::new(),
            missing: HashSet::new(),
            failed: HashSet::new(),
        })
    }

    /// (Re-)establishes a watch on every target. Missing directories are warned about once
    /// and left to the once-a-second `drifted` check.
    pub fn arm(&mut self, config: &Config) {
        let targets = targets(config);
        let stale: Vec<PathBuf> = self
            .armed
            .keys()
            .filter(|p| !targets.iter().any(|(t, _)| t == *p))
            .cloned()
            .collect();
        for path in stale {
            // Errors mean the watch is already gone (its inode was deleted).
            let _ = self.watcher.unwatch(&path);
            self.armed.remove(&path);
        }
        for (path, kind) in targets {
            if self.armed.remove(&path).is_some() {
                let _ = self.watcher.unwatch(&path);
            }
            let Some(id) = identity(&path) else {
                if kind == Kind::Dir && self.missing.insert(path.clone()) {
                    // A missing directory is only worth a warning when some secret cannot
                    // be found without it: an absent `/run/secrets` beside a complete
                    // KEYS_DIR is the normal case.
                    if all_resolve(config) {
                        tracing::info!(
                            "secret directory {} does not exist (every secret was found \
                             elsewhere); watching for it to appear",
                            path.display()
                        );
                    } else {
                        tracing::warn!(
                            "secret directory {} does not exist; its secrets will be picked \
                             up when it appears (checking every second)",
                            path.display()
                        );
                    }
                }
                continue;
            };
            match self.watcher.watch(&path, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.armed.insert(path.clone(), id);
                    self.failed.remove(&path);
                    if self.missing.remove(&path) {
                        tracing::info!("secret directory {} appeared; watching it", path.display());
                    }
                    tracing::debug!(path = %path.display(), ?kind, "watching");
                }
                Err(err) => {
                    if self.failed.insert(path.clone()) {
                        tracing::warn!(
                            "cannot watch {}: {err}; retrying every second",
                            path.display()
                        );
                    }
                }
            }
        }
    }

    /// Whether some target appeared, disappeared or now points at another inode since `arm`
    /// (then the caller treats it as a file event: re-arm and re-read).
    pub fn drifted(&self, config: &Config) -> bool {
        let targets = targets(config);
        if self
            .armed
            .keys()
            .any(|p| !targets.iter().any(|(t, _)| t == p))
        {
            return true;
        }
        targets
            .iter()
            .any(|(path, _)| identity(path) != self.armed.get(path).copied())
    }

    /// How many directories and files are watched (for the log).
    pub fn counts(&self, config: &Config) -> (usize, usize) {
        let dirs = config.watched_dirs();
        let watched_dirs = self.armed.keys().filter(|p| dirs.contains(p)).count();
        (watched_dirs, self.armed.len() - watched_dirs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoleMap;

    fn config(dir: &Path) -> Config {
        let map = RoleMap::new(
            "postgres",
            None,
            &crate::config::test_named_roles(),
            &[
                "postgres=postgres_password".into(),
                format!("x={}", dir.join("sub/x_pw").display()),
            ],
        )
        .unwrap();
        let mut config = crate::config::config_of(map, false);
        config.secret_dirs = vec![dir.join("missing"), dir.to_path_buf()];
        config
    }

    #[test]
    fn targets_are_the_directories_then_the_resolved_files_once_each() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgres_password.txt"), "pw\n").unwrap();
        let c = config(dir.path());
        let got: Vec<(PathBuf, Kind)> = targets(&c);
        assert_eq!(
            got,
            [
                (dir.path().join("missing"), Kind::Dir),
                (dir.path().to_path_buf(), Kind::Dir),
                (dir.path().join("sub"), Kind::Dir),
                (dir.path().join("postgres_password.txt"), Kind::File),
                (dir.path().join("sub/x_pw"), Kind::File),
            ]
        );
    }

    #[test]
    fn secret_files_are_the_lookup_names_in_secret_dirs_and_explicit_paths() {
        let dir = Path::new("/k");
        let c = config(dir);
        for yes in [
            "/k/postgres_password",
            "/k/postgres_password.txt",
            "/k/missing/postgres_password.txt",
            "/k/sub/x_pw",
        ] {
            assert!(is_secret_file(&c, Path::new(yes)), "{yes}");
        }
        for no in [
            "/k/.postgres_password.txt.tmp",
            "/k/postgres_password.txt.swp",
            "/k/other/postgres_password",
            "/k/sub/x_pw.txt",
            "/k/..data",
            "/k",
        ] {
            assert!(!is_secret_file(&c, Path::new(no)), "{no}");
        }
    }

    #[test]
    fn the_same_directory_configured_twice_is_watched_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.secret_dirs = vec![dir.path().to_path_buf(), dir.path().to_path_buf()];
        c.roles.truncate(1);
        assert_eq!(targets(&c), [(dir.path().to_path_buf(), Kind::Dir)]);
    }

    #[test]
    fn drift_is_seen_when_a_directory_appears_or_a_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgres_password.txt"), "pw\n").unwrap();
        let c = config(dir.path());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = Watches::new(tx).unwrap();
        w.arm(&c);
        assert!(!w.drifted(&c));
        assert_eq!(w.counts(&c), (1, 1));
        std::fs::create_dir(dir.path().join("missing")).unwrap();
        assert!(w.drifted(&c), "a missing directory appeared");
        w.arm(&c);
        assert!(!w.drifted(&c));
        assert_eq!(w.counts(&c), (2, 1));
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "new\n").unwrap();
        std::fs::rename(&tmp, dir.path().join("postgres_password.txt")).unwrap();
        assert!(w.drifted(&c), "the file's inode changed");
        w.arm(&c);
        assert!(!w.drifted(&c));
    }
}

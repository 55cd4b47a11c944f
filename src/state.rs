//! The health state file shared by `run`/`watch` (writer) and `health` (reader).
//!
//! `health` runs as a separate process (compose `HEALTHCHECK`, Kubernetes probes), so what
//! the long-running process knows has to be on disk: which process wrote it, whether the
//! final server was ready, and the outcome of the last sync together with *which versions*
//! of the secret files it read. The file holds no secret and no hash of one: a version is
//! identified by the file's path, device, inode, size, mtime and ctime (nanoseconds), which
//! `health` compares with a fresh `stat`, so a rotation that has not been synced yet is
//! seen without reading any secret. Writes are atomic (temp file, fsync, rename, fsync of
//! the directory) so a probe never reads a half-written file.
//!
//! Location: `--state-dir` (default `/run/pg-password-sync`); when that is not writable
//! (non-root), the first writable of `$XDG_RUNTIME_DIR/pg-password-sync` and
//! `/tmp/pg-password-sync-<uid>`. `health` looks in the same places, in the same order,
//! and takes the first that holds a state file.

use std::fs::{self, DirBuilder, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use nix::unistd::{AccessFlags, Uid, access};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The file name inside the state directory.
pub const FILE_NAME: &str = "state.json";

/// The version of one secret file a sync read (no content, no hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub role: String,
    pub path: PathBuf,
    /// `None` when the file could not be found or stat'ed.
    pub stat: Option<StatStamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl StatStamp {
    /// Stats `path` following symlinks (the sync reads through Kubernetes' `..data` link).
    pub fn of(path: &Path) -> Option<StatStamp> {
        let meta = fs::metadata(path).ok()?;
        Some(StatStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        })
    }
}

/// The secret files of a configuration as they are now. Taken *before* a sync reads them,
/// so a rotation racing the sync makes the recorded stamp older than the file, never newer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(pub Vec<FileStamp>);

impl Snapshot {
    pub fn take(config: &Config) -> Snapshot {
        Snapshot(
            config
                .secret_files()
                .into_iter()
                .map(|(login, secret)| match config.resolve(&secret) {
                    Ok(path) => FileStamp {
                        role: login,
                        stat: StatStamp::of(&path),
                        path,
                    },
                    Err(_) => FileStamp {
                        role: login,
                        path: PathBuf::new(),
                        stat: None,
                    },
                })
                .collect(),
        )
    }
}

/// The outcome of the last sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSync {
    pub ok: bool,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub files: Vec<FileStamp>,
}

/// Everything in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The pid of the process that wrote the file (in its pid namespace).
    pub pid: u32,
    /// The final server accepts connections.
    pub ready: bool,
    /// The pid of the final postmaster, when the writer knows it.
    pub postmaster_pid: Option<i32>,
    pub last_sync: Option<LastSync>,
}

/// Where the state of this process is recorded.
#[derive(Debug, Clone)]
pub struct StateFile {
    pub path: PathBuf,
    state: Arc<Mutex<State>>,
}

impl StateFile {
    /// The state file in `dir` (falling back to a writable directory when `dir` is not).
    pub fn new(dir: &Path) -> StateFile {
        let candidates = candidates(dir);
        let chosen = candidates
            .iter()
            .find(|c| match prepare_dir(c) {
                Ok(()) => true,
                Err(err) => {
                    tracing::debug!("state dir {} not usable: {err:#}", c.display());
                    false
                }
            })
            .unwrap_or(&candidates[0]);
        if chosen != &candidates[0] {
            tracing::info!(
                "state dir {} is not writable; using {}",
                dir.display(),
                chosen.display()
            );
        }
        StateFile {
            path: chosen.join(FILE_NAME),
            state: Arc::new(Mutex::new(State {
                pid: std::process::id(),
                ..State::default()
            })),
        }
    }

    /// Records whether the final server is ready.
    pub fn record_ready(&self, ready: bool) {
        self.update(|state| {
            state.ready = ready;
            if !ready {
                state.postmaster_pid = None;
            }
        });
    }

    /// Records that the final server (postmaster `pid`) is ready.
    pub fn record_ready_pid(&self, pid: i32) {
        self.update(|state| {
            state.ready = true;
            state.postmaster_pid = Some(pid);
        });
    }

    /// Records the outcome of a sync that read the files as they were in `snapshot`.
    pub fn record_sync_of(&self, snapshot: Snapshot, ok: bool) {
        self.update(|state| {
            state.last_sync = Some(LastSync {
                ok,
                at_ms: now_ms(),
                files: snapshot.0,
            });
        });
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        let snapshot = {
            let mut state = match self.state.lock() {
                Ok(state) => state,
                Err(poisoned) => poisoned.into_inner(),
            };
            change(&mut state);
            state.clone()
        };
        // Health is advisory: a state file we cannot write is logged, never fatal.
        if let Err(err) = write_atomic(&self.path, &snapshot) {
            tracing::warn!("cannot write the state file: {err:#}");
        }
    }

    /// Finds the state file a writer with `--state-dir dir` would have used.
    pub fn locate(dir: &Path) -> Option<PathBuf> {
        candidates(dir)
            .into_iter()
            .map(|c| c.join(FILE_NAME))
            .find(|p| p.is_file())
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> anyhow::Result<State> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading the state file {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing the state file {}", path.display()))
    }
}

/// The directories tried, in order.
pub fn candidates(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
    {
        out.push(runtime.join("pg-password-sync"));
    }
    out.push(PathBuf::from(format!(
        "/tmp/pg-password-sync-{}",
        Uid::effective()
    )));
    out
}

/// Creates `dir` if needed and checks that we can write into it. A directory in a shared
/// place (`/tmp`) must be ours and not a symlink, or another user could redirect our
/// writes. Mode 0755: the file is not secret, and `health` may run as another user.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            if dir.starts_with("/tmp") && meta.uid() != Uid::effective().as_raw() {
                bail!("{} belongs to another user", dir.display());
            }
        }
        Err(_) => DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?,
    }
    // `access` answers for our effective ids, including read-only mounts.
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .with_context(|| format!("{} is not writable", dir.display()))
}

/// temp file → fsync → rename → fsync of the directory.
fn write_atomic(path: &Path, state: &State) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_vec_pretty(state).context("serialising the state")?;
    text.push(b'\n');
    let result = (|| {
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .context("setting the state file mode")?;
        file.write_all(&text)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::new(dir.path());
        assert_eq!(state.path, dir.path().join(FILE_NAME));
        state.record_ready_pid(42);
        let read = StateFile::read(&state.path).unwrap();
        assert!(read.ready);
        assert_eq!(read.postmaster_pid, Some(42));
        assert_eq!(read.pid, std::process::id());
        assert_eq!(StateFile::locate(dir.path()), Some(state.path.clone()));
        state.record_sync_of(Snapshot::default(), true);
        assert!(StateFile::read(&state.path).unwrap().last_sync.unwrap().ok);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn stamps_change_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        fs::write(&path, "one\n").unwrap();
        let before = StatStamp::of(&path).unwrap();
        assert_eq!(StatStamp::of(&path), Some(before));
        fs::write(dir.path().join("t"), "two-two\n").unwrap();
        fs::rename(dir.path().join("t"), &path).unwrap();
        assert_ne!(StatStamp::of(&path), Some(before));
        assert_eq!(StatStamp::of(&dir.path().join("missing")), None);
    }

    #[test]
    fn falls_back_when_the_dir_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, "").unwrap();
        let state = StateFile::new(&file);
        assert_ne!(state.path.parent(), Some(file.as_path()));
        assert!(candidates(&file).len() >= 2);
    }
}

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
//! Location: `--state-dir` (default `/run/pg-password-sync`); when that is not usable, the
//! first usable of `<state-dir>/uid-<uid>` (a private subdirectory of a shared directory,
//! such as a Kubernetes emptyDir), `$XDG_RUNTIME_DIR/pg-password-sync` and a per-user
//! fallback: for root `/run/pg-password-sync-0` (only root can create names in `/run`),
//! for anyone else `/tmp/pg-password-sync-<uid>`. `health` looks in the same places, in
//! the same order, as its own user (so it must run as the writer's user, or as root
//! beside a root writer).
//!
//! Nobody else may steer these writes or forge what `health` reads. The directory is
//! opened once, with `O_DIRECTORY|O_NOFOLLOW`, and judged on that descriptor: it must
//! belong to our effective uid and be writable by no one else. Every later name is
//! resolved relative to the descriptor, through `fileio::dirfd::Dir` like every file of
//! this program, so swapping the directory's path afterwards changes nothing, and the temp
//! file is created with `O_CREAT|O_EXCL|O_NOFOLLOW`, so a planted link or file is never
//! written through. The reader applies the same rules on its own descriptors and trusts a
//! state file only when it and its directory belong to one uid (root or the reader's own),
//! are writable by that uid alone, and the file is a regular file with one name.
//!
//! Health fails closed: when a write fails (a full or read-only file system), the stale
//! file is removed (an unlink needs no space) and an empty marker is left, so `health`
//! reports that the state could not be written instead of the last outcome it recorded.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open};
use nix::libc;
use nix::sys::stat::{FileStat, Mode, fstat};
use nix::unistd::{AccessFlags, Uid, faccessat};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::fileio::dirfd::Dir;

/// The file name inside the state directory.
pub const FILE_NAME: &str = "state.json";

/// The default of `--state-dir` (`run` and `watch` write there, `health` and `status` read).
pub const DEFAULT_DIR: &str = "/run/pg-password-sync";

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
    /// The last sync that asked the server found it in recovery (a standby), so `health`
    /// can say so without the data directory (a sidecar). Absent in files written before
    /// it was recorded: read as `false`, as `health` said then.
    #[serde(default)]
    pub standby: bool,
    pub last_sync: Option<LastSync>,
    /// Per login, when this process last set its password (Unix time in milliseconds), for
    /// `status`. Absent in files written before it was recorded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub changed_at_ms: BTreeMap<String, u64>,
}

/// Left empty (it needs no space) beside the state file when a write failed, so that
/// `health` can say why there is no state file.
pub const UNWRITABLE_NAME: &str = ".state.json.unwritable";

/// Largest state file `health` reads (a real one is a few hundred bytes per secret).
const MAX_STATE_BYTES: u64 = 1 << 20;

/// Where the state of this process is recorded.
#[derive(Debug, Clone)]
pub struct StateFile {
    /// The state file's path, for messages only: every access goes through `dir`.
    pub path: PathBuf,
    /// The checked state directory, opened once; `None` when no candidate was usable
    /// (logged at start; nothing is written then and `health` reports no state).
    dir: Option<Arc<Dir>>,
    state: Arc<Mutex<State>>,
}

impl StateFile {
    /// The state file in `dir` (falling back to another directory of ours when `dir` is
    /// not usable).
    pub fn new(dir: &Path) -> StateFile {
        let candidates = candidates(dir);
        let mut reasons = Vec::new();
        let mut chosen = None;
        for candidate in &candidates {
            match open_own_dir(candidate) {
                Ok(fd) => {
                    chosen = Some((candidate.clone(), Dir::from_checked(fd, candidate.clone())));
                    break;
                }
                Err(err) => reasons.push(format!("{err:#}")),
            }
        }
        let state = Arc::new(Mutex::new(State {
            pid: std::process::id(),
            ..State::default()
        }));
        match chosen {
            Some((path, dir)) => {
                if path != candidates[0] {
                    tracing::info!(
                        "state dir not usable ({}); using {}",
                        reasons.join("; "),
                        path.display()
                    );
                }
                StateFile {
                    path: path.join(FILE_NAME),
                    dir: Some(Arc::new(dir)),
                    state,
                }
            }
            None => {
                tracing::warn!(
                    "no usable state directory ({}): `health` will report unhealthy",
                    reasons.join("; ")
                );
                StateFile {
                    path: candidates[0].join(FILE_NAME),
                    dir: None,
                    state,
                }
            }
        }
    }

    /// Records whether the final server is ready.
    pub fn record_ready(&self, ready: bool) {
        self.update(|state| {
            state.ready = ready;
            if !ready {
                // The next server is not known to be a standby until a sync asks it.
                state.postmaster_pid = None;
                state.standby = false;
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

    /// Records the outcome of a sync that read the files as they were in `snapshot`, and
    /// whether the server was a standby when the sync asked it (`None`: it did not ask, as
    /// when nothing changed or the sync failed; the last answer stands).
    pub fn record_sync_of(&self, snapshot: Snapshot, ok: bool, standby: Option<bool>) {
        self.update(|state| {
            if let Some(standby) = standby {
                state.standby = standby;
            }
            state.last_sync = Some(LastSync {
                ok,
                at_ms: now_ms(),
                files: snapshot.0,
            });
        });
    }

    /// Records that the passwords of `logins` were just set (nothing is written when none
    /// was).
    pub fn record_changed(&self, logins: &[&str]) {
        if logins.is_empty() {
            return;
        }
        let at = now_ms();
        self.update(|state| {
            for login in logins {
                state.changed_at_ms.insert((*login).to_owned(), at);
            }
        });
    }

    /// What this process has recorded so far (the in-memory copy of the file).
    pub fn snapshot(&self) -> State {
        match self.state.lock() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Records whether the server is a standby, for a sync that did not read the files
    /// (a resync re-applying the last applied set); written only when it changed.
    pub fn record_standby(&self, standby: bool) {
        let changed = match self.state.lock() {
            Ok(state) => state.standby != standby,
            Err(poisoned) => poisoned.into_inner().standby != standby,
        };
        if changed {
            self.update(|state| state.standby = standby);
        }
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
        // No usable directory: said once at start.
        let Some(dir) = &self.dir else {
            return;
        };
        // Health is advisory: a state file we cannot write is logged, never fatal; but
        // the old file must not keep speaking for us.
        if let Err(err) = write_atomic(dir, &snapshot) {
            match fail_closed(dir) {
                Ok(()) => tracing::warn!(
                    "cannot write the state file {}: {err:#}; removed the old one, so \
                     `health` reports unhealthy until a write succeeds",
                    self.path.display()
                ),
                Err(also) => tracing::error!(
                    "cannot write the state file {}: {err:#}; nor remove the old one: {also:#}",
                    self.path.display()
                ),
            }
        }
    }
}

/// What `health` found: the state file's path and its content, or why there is none it
/// can trust.
pub fn load(dir: &Path) -> Result<(PathBuf, State), String> {
    let euid = Uid::effective().as_raw();
    let mut ignored = Vec::new();
    for candidate in candidates(dir) {
        let (fd, stat) = match open_dir(&candidate) {
            Ok(opened) => opened,
            Err(Errno::ENOENT) => continue,
            Err(err) => {
                ignored.push(describe_open_error(&candidate, err));
                continue;
            }
        };
        // A directory the writer would not have used is skipped as the writer did.
        if let Some(problem) = reader_dir_problem(stat.st_uid, stat.st_mode, euid) {
            ignored.push(format!("{} {problem}", candidate.display()));
            continue;
        }
        let path = candidate.join(FILE_NAME);
        let dir = Dir::from_checked(fd, candidate.clone());
        // Never through a link, a FIFO cannot stall us, a file with two names is refused:
        // none of them is the writer's file.
        let file = match dir.open_file(FILE_NAME) {
            Ok(Some((file, _))) => file,
            Ok(None) => {
                if matches!(dir.stat(UNWRITABLE_NAME), Ok(Some(_))) {
                    return Err(format!(
                        "the state file {} could not be written (the log of `run`/`watch` \
                         says why)",
                        path.display()
                    ));
                }
                continue;
            }
            Err(err) => return Err(format!("{err:#}: not trusted")),
        };
        return read_trusted(file, &path, stat.st_uid).map(|state| (path, state));
    }
    let mut reason = format!(
        "no state file under {} (or its fallbacks): `run`/`watch` has not started",
        dir.display()
    );
    if !ignored.is_empty() {
        reason.push_str(&format!("; ignored {}", ignored.join("; ")));
    }
    Err(reason)
}

/// Reads a state file opened in a trusted directory owned by `dir_owner`, after checking
/// the open file itself.
fn read_trusted(file: File, path: &Path, dir_owner: u32) -> Result<State, String> {
    let stat = fstat(&file).map_err(|err| format!("checking {}: {err}", path.display()))?;
    if let Some(problem) = reader_file_problem(stat.st_uid, stat.st_mode, dir_owner) {
        return Err(format!("{} {problem}", path.display()));
    }
    if stat.st_size as u64 > MAX_STATE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_STATE_BYTES} bytes",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(MAX_STATE_BYTES)
        .read_to_string(&mut text)
        .map_err(|err| format!("reading the state file {}: {err}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|err| format!("parsing the state file {}: {err}", path.display()))
}

/// The directories tried, in order.
pub fn candidates(dir: &Path) -> Vec<PathBuf> {
    let euid = Uid::effective().as_raw();
    // A directory shared with others (a Kubernetes emptyDir is mode 0777, owned by root)
    // is not ours to write in, but a private subdirectory of ours inside it is.
    let mut out = vec![dir.to_path_buf(), dir.join(format!("uid-{euid}"))];
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
    {
        out.push(runtime.join("pg-password-sync"));
    }
    out.push(fallback_dir(euid));
    out
}

/// The last resort of user `euid`: never a world-writable place for root, where another
/// user could pre-create or swap the name (`/run` is root's alone).
pub fn fallback_dir(euid: u32) -> PathBuf {
    if euid == 0 {
        PathBuf::from("/run/pg-password-sync-0")
    } else {
        PathBuf::from(format!("/tmp/pg-password-sync-{euid}"))
    }
}

/// Opens a directory without following a link at its last component. Everything after
/// is done through the descriptor, so the path can be swapped without effect.
fn open_dir(path: &Path) -> Result<(OwnedFd, FileStat), Errno> {
    let fd = open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let stat = fstat(&fd)?;
    Ok((fd, stat))
}

fn describe_open_error(path: &Path, err: Errno) -> String {
    match err {
        // O_NOFOLLOW|O_DIRECTORY report a link as either.
        Errno::ELOOP | Errno::ENOTDIR => {
            format!("{} is a symbolic link or not a directory", path.display())
        }
        err => format!("opening {}: {err}", path.display()),
    }
}

/// Creates `dir` if needed, opens it and checks the opened directory: ours, writable by
/// no one else, writable by us. Mode 0755 when created: the file is not secret, and
/// `health` may run as another user.
fn open_own_dir(dir: &Path) -> anyhow::Result<OwnedFd> {
    // `mkdir` never follows a link at the last component; whatever is there now is
    // judged below, on its descriptor, not by this path.
    let created = DirBuilder::new().recursive(true).mode(0o755).create(dir);
    let (fd, stat) = match open_dir(dir) {
        Ok(opened) => opened,
        Err(err) => {
            return Err(match created {
                Err(create) => anyhow!(create).context(format!("creating {}", dir.display())),
                Ok(()) => anyhow!(describe_open_error(dir, err)),
            });
        }
    };
    if let Some(problem) = writer_dir_problem(stat.st_uid, stat.st_mode, Uid::effective().as_raw())
    {
        bail!("{} {problem}", dir.display());
    }
    // AT_EACCESS: answered for our effective ids, as the writes will be; a read-only
    // mount fails here too.
    faccessat(
        &fd,
        ".",
        AccessFlags::W_OK | AccessFlags::X_OK,
        AtFlags::AT_EACCESS,
    )
    .with_context(|| format!("{} is not writable", dir.display()))?;
    Ok(fd)
}

/// Why a directory owned by `owner` with `mode` may not hold the state of user `euid`.
fn writer_dir_problem(owner: u32, mode: u32, euid: u32) -> Option<String> {
    if owner != euid {
        return Some(format!("belongs to uid {owner}, not to us (uid {euid})"));
    }
    writable_by_others(mode)
}

/// Why `health`, running as `euid`, may not trust a directory owned by `owner`: only
/// root's or its own, writable by the owner alone.
fn reader_dir_problem(owner: u32, mode: u32, euid: u32) -> Option<String> {
    if owner != 0 && owner != euid {
        return Some(format!(
            "belongs to uid {owner}, neither root nor the user running `health` (uid {euid})"
        ));
    }
    writable_by_others(mode)
}

/// Why a state file owned by `owner` with `mode` is not trusted in a directory that
/// belongs to `dir_owner`.
fn reader_file_problem(owner: u32, mode: u32, dir_owner: u32) -> Option<String> {
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Some("is not a regular file: not trusted".into());
    }
    if owner != dir_owner {
        return Some(format!(
            "belongs to uid {owner}, not to uid {dir_owner} who writes this directory: not trusted"
        ));
    }
    writable_by_others(mode).map(|problem| format!("{problem}: not trusted"))
}

fn writable_by_others(mode: u32) -> Option<String> {
    (mode & 0o022 != 0).then(|| format!("is writable by other users (mode {:o})", mode & 0o7777))
}

/// temp file → fsync → rename → fsync of the directory, all through `dir`. The temp name
/// is fixed per process, so a crashed earlier process with our pid (PID 1 is always 1)
/// leaves nothing behind for long.
fn write_atomic(dir: &Dir, state: &State) -> anyhow::Result<()> {
    let tmp = format!(".{FILE_NAME}.{}.tmp", std::process::id());
    let mut text = serde_json::to_vec_pretty(state).context("serialising the state")?;
    text.push(b'\n');
    let result = (|| {
        // The name itself goes, never what a link points to; only we can write here.
        dir.remove_file(&tmp)?;
        // 0644 whatever the umask: `health` may run as another user; nothing secret here.
        dir.create_synced(&tmp, 0o644, &text, || {})?;
        dir.rename(&tmp, FILE_NAME)?;
        dir.sync()
    })();
    if result.is_err() {
        let _ = dir.remove_file(&tmp);
    } else {
        // A write succeeded again: the marker of an earlier failure is obsolete.
        let _ = dir.remove_file(UNWRITABLE_NAME);
    }
    result
}

/// After a failed write: removes the stale state file (an unlink needs no free space, so
/// this works on a full file system) and leaves the empty marker `health` reports.
fn fail_closed(dir: &Dir) -> anyhow::Result<()> {
    dir.remove_file(FILE_NAME)
        .context("removing the stale state file")?;
    // Best effort (it may exist already): an empty file needs an inode but no data block.
    // Without it `health` still reports unhealthy ("no state file").
    let _ = dir.create_synced(UNWRITABLE_NAME, 0o644, b"", || {});
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory of ours, mode 0755 (tempfile makes 0700).
    fn own_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = own_dir();
        let state = StateFile::new(dir.path());
        assert_eq!(state.path, dir.path().join(FILE_NAME));
        state.record_ready_pid(42);
        let (path, read) = load(dir.path()).unwrap();
        assert_eq!(path, state.path);
        assert!(read.ready);
        assert_eq!(read.postmaster_pid, Some(42));
        assert_eq!(read.pid, std::process::id());
        state.record_sync_of(Snapshot::default(), true, None);
        assert!(load(dir.path()).unwrap().1.last_sync.unwrap().ok);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
        let mode = fs::metadata(&state.path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn the_standby_flag_follows_the_syncs_that_asked() {
        let dir = own_dir();
        let state = StateFile::new(dir.path());
        state.record_sync_of(Snapshot::default(), true, Some(true));
        assert!(load(dir.path()).unwrap().1.standby);
        // A sync that did not ask the server leaves the last answer.
        state.record_sync_of(Snapshot::default(), true, None);
        assert!(load(dir.path()).unwrap().1.standby);
        state.record_standby(false);
        assert!(!load(dir.path()).unwrap().1.standby);
        state.record_sync_of(Snapshot::default(), true, Some(true));
        state.record_ready(false);
        assert!(!load(dir.path()).unwrap().1.standby);
        // A file written before the flag existed reads as not a standby.
        let old: State = serde_json::from_str(
            r#"{"pid":1,"ready":true,"postmaster_pid":null,"last_sync":null}"#,
        )
        .unwrap();
        assert!(!old.standby && old.ready);
    }

    #[test]
    fn a_planted_temp_link_is_replaced_never_followed() {
        let dir = own_dir();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        fs::write(&target, "keep me\n").unwrap();
        let tmp = dir
            .path()
            .join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        let state = StateFile::new(dir.path());
        state.record_ready(true);
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me\n");
        assert!(load(dir.path()).unwrap().1.ready);
        assert!(!tmp.exists() && fs::symlink_metadata(&tmp).is_err());
    }

    #[test]
    fn a_failed_write_removes_the_stale_state_and_leaves_the_marker() {
        let dir = own_dir();
        let state = StateFile::new(dir.path());
        state.record_sync_of(Snapshot::default(), true, None);
        assert!(load(dir.path()).is_ok());
        // A directory where the temp file goes cannot be removed by unlinkat: every
        // write fails from now on, as on a full file system.
        let tmp = dir
            .path()
            .join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        fs::create_dir(&tmp).unwrap();
        state.record_sync_of(Snapshot::default(), false, None);
        let why = load(dir.path()).unwrap_err();
        assert!(why.contains("could not be written"), "{why}");
        assert!(!state.path.exists());
        // Writable again: the marker goes, the state is back.
        fs::remove_dir(&tmp).unwrap();
        state.record_sync_of(Snapshot::default(), true, None);
        assert!(load(dir.path()).unwrap().1.last_sync.unwrap().ok);
        assert!(!dir.path().join(UNWRITABLE_NAME).exists());
    }

    #[test]
    fn directory_and_file_rules() {
        // The writer: ours, writable by no one else.
        assert_eq!(writer_dir_problem(1000, 0o40755, 1000), None);
        assert_eq!(writer_dir_problem(0, 0o40700, 0), None);
        assert!(
            writer_dir_problem(65534, 0o40755, 0)
                .unwrap()
                .contains("uid 65534")
        );
        assert!(writer_dir_problem(0, 0o41777, 0).unwrap().contains("1777"));
        assert!(writer_dir_problem(0, 0o40775, 0).is_some());
        // The reader: root's or its own, writable by the owner alone.
        assert_eq!(reader_dir_problem(0, 0o40755, 1000), None);
        assert_eq!(reader_dir_problem(1000, 0o40755, 1000), None);
        assert!(reader_dir_problem(65534, 0o40755, 0).is_some());
        assert!(reader_dir_problem(0, 0o40757, 0).is_some());
        // The file: regular, the directory owner's, writable by no one else.
        assert_eq!(reader_file_problem(0, 0o100644, 0), None);
        assert!(reader_file_problem(65534, 0o100644, 0).is_some());
        assert!(reader_file_problem(0, 0o100666, 0).is_some());
        assert!(reader_file_problem(0, 0o010644, 0).is_some());
    }

    #[test]
    fn root_never_falls_back_to_a_shared_directory() {
        assert_eq!(fallback_dir(0), PathBuf::from("/run/pg-password-sync-0"));
        assert_eq!(
            fallback_dir(1000),
            PathBuf::from("/tmp/pg-password-sync-1000")
        );
        let dir = own_dir();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, "").unwrap();
        let all = candidates(&file);
        assert_eq!(all[0], file);
        let euid = Uid::effective().as_raw();
        assert_eq!(all[1], file.join(format!("uid-{euid}")));
        assert_eq!(all.last(), Some(&fallback_dir(Uid::effective().as_raw())));
    }

    #[test]
    fn a_shared_directory_gets_a_private_subdirectory() {
        let shared = tempfile::tempdir().unwrap();
        fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let state = StateFile::new(shared.path());
        let private = shared
            .path()
            .join(format!("uid-{}", Uid::effective().as_raw()));
        assert_eq!(state.path, private.join(FILE_NAME));
        assert_eq!(fs::metadata(&private).unwrap().mode() & 0o022, 0);
        state.record_ready(true);
        let (path, read) = load(shared.path()).unwrap();
        assert_eq!(path, state.path);
        assert!(read.ready);
    }

    #[test]
    fn a_foreign_or_open_directory_is_neither_used_nor_trusted() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = format!("{:#}", open_own_dir(dir.path()).unwrap_err());
        assert!(err.contains("writable by other users"), "{err}");
        // A state file there is not believed either.
        fs::write(dir.path().join(FILE_NAME), "{\"pid\":1,\"ready\":true}").unwrap();
        let why = load(dir.path()).unwrap_err();
        assert!(why.contains("writable by other users"), "{why}");
        // A symlink to a good directory is not followed.
        let good = own_dir();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(good.path(), &link).unwrap();
        let err = format!("{:#}", open_own_dir(&link).unwrap_err());
        assert!(err.contains("symbolic link"), "{err}");
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
}

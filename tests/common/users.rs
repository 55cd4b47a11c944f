//! OS users: PostgreSQL refuses to run as root, so when the tests run as root (as CI does)
//! the servers, and the few tests of a non-root binary, run as the OS user `postgres`;
//! otherwise everything runs as the current user. Paths such users must reach are made
//! for them here.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The OS user the server runs as.
pub fn server_os_user() -> String {
    if is_root() {
        "postgres".to_owned()
    } else {
        nix::unistd::User::from_uid(nix::unistd::Uid::effective())
            .ok()
            .flatten()
            .map(|u| u.name)
            .expect("current user has a name")
    }
}

/// A command that runs as the server's OS user: `setpriv` when root (it execs in place,
/// so signals reach the command), the plain command otherwise.
pub fn as_server_user(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Gives a path to the server's OS user (when root) so it can use it.
pub fn chown_to_server(path: &Path) {
    if is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("postgres user");
        nix::unistd::chown(path, Some(user.uid), Some(user.gid)).unwrap();
    }
}

/// A throwaway directory the server's OS user can use (mode 0755, owned by it).
pub fn server_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_to_server(dir.path());
    dir
}

/// Writes a file and gives it to the server's OS user.
pub fn write_as_server(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    chown_to_server(path);
}

/// A copy of `path` (a file or a directory tree) that every user can read and run, in a
/// directory kept for the whole test binary. Processes that drop to `postgres` or
/// `nobody` cannot always reach the checkout itself: a clone under a 0700 directory (as
/// `mktemp -d` makes) is closed to them.
pub fn shared_copy(path: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("pps-shared-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    });
    // Tests run in parallel threads: one copies, the others wait for it (and never see
    // a half-made copy).
    static COPYING: Mutex<()> = Mutex::new(());
    let _copying = COPYING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = Path::new(path);
    let target = dir.path().join(source.file_name().unwrap());
    if !target.exists() {
        let partial = dir.path().join(".partial");
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_file(&partial);
        let status = Command::new("cp")
            .arg("-a")
            .arg(source)
            .arg(&partial)
            .status()
            .unwrap();
        assert!(status.success(), "copying {path}");
        let status = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&partial)
            .status()
            .unwrap();
        assert!(status.success(), "opening {path} to every user");
        std::fs::rename(&partial, &target).unwrap();
    }
    target
}

//! Starting CMD: the one child the supervisor runs.
//!
//! The child must start in a clean state even though PID 1 blocks every signal for its
//! signalfd: a blocked mask is inherited across fork and exec, and a postgres started with
//! SIGTERM/SIGINT blocked would ignore `docker stop`. std's `Command` (Rust 1.95, measured
//! here: the child's `SigBlk` was all ones) only restores SIGPIPE, not the mask, and
//! resetting it ourselves would need an `unsafe` `pre_exec`. So the child is started with
//! `posix_spawn`, whose attributes do it in the child before exec: an empty signal mask
//! (`POSIX_SPAWN_SETSIGMASK`) and default dispositions (`POSIX_SPAWN_SETSIGDEF`, which
//! undoes Rust's ignored SIGPIPE). glibc's `posix_spawn` reports exec's errno (ENOENT,
//! EACCES) as its result, which becomes the shell's 127/126; the `PATH` search is ours, done
//! the way a shell does it (see `resolve`).
//!
//! Only the pid is kept and nothing here ever waits: the reaper owns every `waitpid`.
//! stdin, stdout and stderr are inherited, so postgres' log passes through untouched. So
//! are the working directory (no `chdir("/")`: CMD runs where the image's `WORKDIR` says)
//! and the process group: signals are forwarded to the child's pid only, so a group of its
//! own would buy nothing.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;
use nix::unistd::{AccessFlags, access};

use super::exit;

/// Why CMD did not start, with the exit code `run` reports for it.
#[derive(Debug)]
pub struct SpawnFailure {
    pub code: u8,
    pub message: String,
}

/// Spawns `cmd` (searched in `PATH` when it has no `/`) with our environment and returns
/// its pid.
pub fn spawn(cmd: &[String], withheld: &[&str]) -> Result<Pid, SpawnFailure> {
    let Some(program) = cmd.first() else {
        return Err(SpawnFailure {
            code: exit::NOT_FOUND,
            message: "no command to run".into(),
        });
    };
    let fail = |code: u8, what: String| SpawnFailure {
        code,
        message: format!("cannot run {program}: {what}"),
    };
    let argv = cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            fail(
                exit::CANNOT_EXECUTE,
                "an argument contains a NUL byte".into(),
            )
        })?;
    // The environment cannot contain NUL bytes (it came through execve), so none is lost.
    let envp: Vec<CString> = std::env::vars_os()
        .filter(|(key, _)| !withheld.iter().any(|w| key.as_bytes() == w.as_bytes()))
        .filter_map(|(key, value)| {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            CString::new(entry).ok()
        })
        .collect();
    let setup = || -> nix::Result<(PosixSpawnAttr, PosixSpawnFileActions)> {
        let mut attr = PosixSpawnAttr::init()?;
        attr.set_sigmask(&SigSet::empty())?;
        let mut defaults = SigSet::all();
        defaults.remove(Signal::SIGKILL);
        defaults.remove(Signal::SIGSTOP);
        attr.set_sigdefault(&defaults)?;
        attr.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
        )?;
        Ok((attr, PosixSpawnFileActions::init()?))
    };
    let (attr, actions) =
        setup().map_err(|err| fail(exit::CANNOT_EXECUTE, format!("preparing the spawn: {err}")))?;
    let Some(path) = resolve(program) else {
        return Err(fail(exit::NOT_FOUND, "command not found".into()));
    };
    match posix_spawn(path.as_path(), &actions, &attr, &argv, &envp) {
        Ok(pid) => {
            tracing::info!(pid = pid.as_raw(), command = %program, "started child");
            Ok(pid)
        }
        Err(errno) => Err(fail(code_for(errno), errno.desc().to_owned())),
    }
}

/// Finds `program` the way a shell does: a name with a `/` is used as is; otherwise the
/// first executable regular file named so in `PATH`, else the first non-executable one (exec
/// then fails with EACCES: 126), else nothing (127). `posix_spawnp` would report EACCES for
/// a missing command when some `PATH` directory is not searchable, which is not "found".
fn resolve(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let candidates: Vec<PathBuf> = std::env::split_paths(&path)
        .map(|dir| {
            // An empty PATH entry means the current directory.
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            dir.join(program)
        })
        .filter(|candidate| candidate.is_file())
        .collect();
    candidates
        .iter()
        .find(|c| access(c.as_path(), AccessFlags::X_OK).is_ok())
        .or(candidates.first())
        .cloned()
}

/// 127 when exec found nothing to run, 126 when it found something it could not run.
fn code_for(errno: Errno) -> u8 {
    exit::spawn_failure_code(std::io::Error::from(errno).kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_like_a_shell() {
        assert_eq!(resolve("/x/y"), Some(PathBuf::from("/x/y")));
        let sh = resolve("sh").unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(resolve("pps-no-such-command-anywhere"), None);
    }

    #[test]
    fn exec_errors_map_to_shell_codes() {
        assert_eq!(code_for(Errno::ENOENT), 127);
        assert_eq!(code_for(Errno::EACCES), 126);
        assert_eq!(code_for(Errno::ENOEXEC), 126);
        let err = spawn(&["/nonexistent/pg-password-sync-test".into()], &[]).unwrap_err();
        assert_eq!(err.code, 127);
        assert!(err.message.contains("/nonexistent"), "{}", err.message);
        assert_eq!(spawn(&[], &[]).unwrap_err().code, 127);
    }
}

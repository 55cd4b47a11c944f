//! Exit-status mapping: how the child's end becomes PID 1's exit code.
//!
//! The container's exit code is what orchestrators and operators see, so `run` must be
//! transparent: the child's own code when it exited, 128+N when signal N killed it (the
//! shell convention `docker` users expect: 137 for SIGKILL, 143 for SIGTERM), and the shell's
//! 127/126 when CMD could not be executed at all. Pure functions, unit-tested here.

use std::io::ErrorKind;

use nix::sys::wait::WaitStatus;

/// Shell convention: the command was not found.
pub const NOT_FOUND: u8 = 127;
/// Shell convention: the command was found but could not be executed.
pub const CANNOT_EXECUTE: u8 = 126;

/// The exit code for a final wait status; `None` for statuses that are not an end
/// (stopped, continued: we never ask for those, but the type has them).
pub fn code_of(status: WaitStatus) -> Option<u8> {
    match status {
        // Only the low 8 bits of an exit status exist; WEXITSTATUS already masked them.
        WaitStatus::Exited(_, code) => Some((code & 0xff) as u8),
        WaitStatus::Signaled(_, signal, _) => Some(128u8.wrapping_add(signal as i32 as u8)),
        _ => None,
    }
}

/// The exit code when spawning CMD failed: 127 for "not found" (ENOENT from exec or from
/// the PATH search), 126 for anything else that stopped the exec (EACCES, ENOEXEC, …).
pub fn spawn_failure_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::NotFound => NOT_FOUND,
        _ => CANNOT_EXECUTE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn exited_and_signaled() {
        let pid = Pid::from_raw(5);
        for code in [0, 1, 2, 7, 126, 127, 255] {
            assert_eq!(code_of(WaitStatus::Exited(pid, code)), Some(code as u8));
        }
        assert_eq!(
            code_of(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(
            code_of(WaitStatus::Signaled(pid, Signal::SIGKILL, true)),
            Some(137)
        );
        assert_eq!(
            code_of(WaitStatus::Signaled(pid, Signal::SIGUSR1, false)),
            Some(138)
        );
        assert_eq!(code_of(WaitStatus::StillAlive), None);
        assert_eq!(code_of(WaitStatus::Continued(pid)), None);
    }

    #[test]
    fn spawn_failures() {
        assert_eq!(spawn_failure_code(ErrorKind::NotFound), 127);
        assert_eq!(spawn_failure_code(ErrorKind::PermissionDenied), 126);
        assert_eq!(spawn_failure_code(ErrorKind::Other), 126);
    }
}

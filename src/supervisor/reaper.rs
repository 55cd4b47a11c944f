//! The one reaper: the only `waitpid` in the process.
//!
//! As PID 1 (or a subreaper) every orphan in the container becomes our child: the
//! grandchildren a shell leaves behind, postgres' temporary init server once the entrypoint
//! is gone, backends of a killed postmaster. Each must be waited for or it stays a zombie.
//! A second waiter (`Child::wait`, `tokio::process`) would steal statuses from this one, so
//! there is none; the exit code of the main child's end is published on a `watch` channel.

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::exit;

pub struct Reaper {
    child: Pid,
    status: watch::Sender<Option<u8>>,
}

impl Reaper {
    /// A reaper for `child`, publishing the exit code its end maps to on `status`.
    pub fn new(child: Pid, status: watch::Sender<Option<u8>>) -> Reaper {
        Reaper { child, status }
    }

    /// Reaps every exited child. Called on each SIGCHLD and periodically: signals coalesce,
    /// so one SIGCHLD may stand for many exits, and `WNOHANG` until 0/ECHILD collects them
    /// all without ever blocking the loop.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!("waitpid failed: {err}");
                    return;
                }
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if pid == self.child {
                        tracing::info!(
                            pid = pid.as_raw(),
                            code = exit::code_of(status),
                            "child exited ({})",
                            describe(status)
                        );
                        // Only exits and deaths end the child (we never ask for stops).
                        if let Some(code) = exit::code_of(status) {
                            self.status.send_replace(Some(code));
                        }
                    } else {
                        tracing::debug!(pid = pid.as_raw(), "reaped an orphan");
                    }
                }
            }
        }
    }
}

/// A short human description of a wait status.
pub fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, signal, core) => {
            format!(
                "killed by {signal}{}",
                if core { ", core dumped" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

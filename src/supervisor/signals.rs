//! Signals: which ones PID 1 takes over, how they are received, and what each one does.
//!
//! Every catchable signal is blocked in the main thread before the runtime or any other
//! thread exists (threads inherit the mask), and consumed through a `signalfd` polled by
//! tokio. Blocked signals are queued, never "ignored", even for a namespace init with no
//! handler: that is what makes a PID 1 without handlers receive SIGTERM/SIGINT at all
//! (a bash PID 1 without traps never sees `docker stop`'s SIGTERM). No async-signal-safety concerns either: the
//! signal arrives as data on a file descriptor.
//!
//! Left unblocked on purpose: the synchronous fault signals (SIGSEGV, SIGBUS, SIGFPE,
//! SIGILL, SIGTRAP, SIGSYS, SIGABRT), so a bug of ours crashes visibly instead of being
//! queued; and SIGPIPE, which Rust ignores: blocked, a write to a closed stderr would queue
//! a SIGPIPE that we would then forward to postgres.

use anyhow::Context;
use nix::libc::signalfd_siginfo;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Signals that stay with their default behaviour (see the module comment).
const NOT_TAKEN: [Signal; 8] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGTRAP,
    Signal::SIGSYS,
    Signal::SIGABRT,
    Signal::SIGPIPE,
];

/// The set of signals PID 1 takes over.
pub fn taken() -> SigSet {
    let mut set = SigSet::all();
    for signal in NOT_TAKEN {
        set.remove(signal);
    }
    set
}

/// Blocks the taken signals in the calling (main) thread and opens the signalfd for them.
/// Must run before any thread is created and before the child is spawned, so that no
/// signal can hit a default disposition in between (std clears the mask in the child).
pub fn block() -> anyhow::Result<SignalFd> {
    let set = taken();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("blocking signals")?;
    // Non-blocking for tokio; close-on-exec so the child never inherits it.
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("opening the signalfd")
}

/// The signalfd registered with tokio.
pub struct Signals {
    fd: AsyncFd<SignalFd>,
}

impl Signals {
    /// Registers the signalfd with the runtime (call inside it).
    pub fn new(fd: SignalFd) -> anyhow::Result<Signals> {
        Ok(Signals { fd: register(fd)? })
    }

    /// The next signal. Standard signals coalesce while pending, so one SIGCHLD can stand
    /// for many exited children: the reaper loops until nothing is left.
    pub async fn recv(&mut self) -> anyhow::Result<signalfd_siginfo> {
        loop {
            let mut guard = self.fd.readable().await.context("waiting for a signal")?;
            match guard.get_inner().read_signal() {
                Ok(Some(info)) => return Ok(info),
                // Spurious wake-up: nothing pending any more.
                Ok(None) => guard.clear_ready(),
                Err(err) => return Err(err).context("reading the signalfd"),
            }
        }
    }
}

/// The one `unsafe` of the crate. tokio 1.54 deprecated the safe `AsyncFd::new` as unsound
/// (tokio#8587) in favour of the `unsafe` `AsyncFd::register_with_interest`, and there is no
/// safe way left to poll a signalfd in the runtime.
fn register(fd: SignalFd) -> anyhow::Result<AsyncFd<SignalFd>> {
    // SAFETY: the contract is that the descriptor is open and stays the same open file for
    // the whole life of the `AsyncFd`. `SignalFd` owns its `OwnedFd` (opened just before),
    // has no method that closes or replaces it, and is moved into the `AsyncFd`, which is
    // then its only owner; `as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|err| anyhow::Error::new(err.into_parts().1))
        .context("registering the signalfd with the runtime")
}

/// What PID 1 does with a received signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGCHLD: reap (never forwarded: it is about our children, not the child's).
    Reap,
    /// Forward unchanged to the child.
    Forward(Signal),
    /// SIGHUP: forward (postgres reloads its configuration) and report it to the caller's
    /// work as an event (what it means there is the caller's business).
    ForwardAndReport,
    /// A real-time signal: it has no `Signal` value to forward with, and postgres uses
    /// none; logged and dropped.
    Drop,
}

/// The action for signal number `signo` (pure).
pub fn action(signo: i32) -> Action {
    match Signal::try_from(signo) {
        Ok(Signal::SIGCHLD) => Action::Reap,
        Ok(Signal::SIGHUP) => Action::ForwardAndReport,
        // Everything else goes to the child as is, like tini: SIGTERM/SIGINT/SIGQUIT are
        // postgres' smart/fast/immediate shutdown, SIGUSR1/2 and SIGWINCH are the child's
        // business, and SIGTSTP/SIGTTIN/SIGTTOU/SIGCONT stop and resume the workload (PID 1
        // itself keeps running: it has them blocked).
        Ok(signal) => Action::Forward(signal),
        Err(_) => Action::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions() {
        assert_eq!(action(Signal::SIGCHLD as i32), Action::Reap);
        assert_eq!(action(Signal::SIGHUP as i32), Action::ForwardAndReport);
        for signal in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGWINCH,
            Signal::SIGTSTP,
            Signal::SIGCONT,
        ] {
            assert_eq!(action(signal as i32), Action::Forward(signal));
        }
        assert_eq!(action(40), Action::Drop);
    }

    #[test]
    fn faults_and_sigpipe_are_not_taken() {
        let set = taken();
        assert!(set.contains(Signal::SIGTERM));
        assert!(set.contains(Signal::SIGCHLD));
        assert!(!set.contains(Signal::SIGSEGV));
        assert!(!set.contains(Signal::SIGPIPE));
    }
}

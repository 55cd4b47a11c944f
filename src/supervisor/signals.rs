//! Signals: which ones PID 1 takes over, how they are received, and what each one does.
//!
//! Every signal is blocked in the main thread before the runtime or any other thread
//! exists (threads inherit the mask), and consumed through a `signalfd` polled by tokio.
//! Blocked signals are queued, never "ignored", even for a namespace init with no handler:
//! that is what makes a PID 1 without handlers receive SIGTERM/SIGINT at all (a bash PID 1
//! without traps never sees `docker stop`'s SIGTERM). No async-signal-safety concerns
//! either: the signal arrives as data on a file descriptor.
//!
//! Every signal means every one, SIGPIPE and the fault signals included, because a signal
//! that is not blocked is not queued for the signalfd:
//! - SIGPIPE: the Rust runtime sets it to `SIG_IGN` before `main`, and the kernel discards
//!   a signal that is ignored and not blocked when it is generated, so `kill -PIPE` never
//!   reached postgres. Blocked, it is queued like the others. Our own writes to a closed
//!   pipe or socket raise a SIGPIPE too (their EPIPE is still returned): it is directed at
//!   the writing thread and reads as `SI_USER` from our own pid, which no other process
//!   can be, so `action` drops it without a word (a log line could hit the same closed
//!   stderr); one raised in a blocking-pool thread stays pending there, never read.
//! - The synchronous fault signals (SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGABRT, SIGFPE,
//!   SIGSYS): sent with `kill`, unblocked, SIGSEGV and SIGBUS went to std's stack-overflow
//!   handler (which resets the disposition and returns: the first one swallowed, the
//!   second fatal), and the others killed a `run` that is not PID 1, orphaning postgres
//!   (as PID 1 the kernel drops a signal whose action is the default). Blocked, a `kill`ed
//!   one is queued and forwarded. A real fault of ours still kills us at once: the kernel
//!   delivers a fault it raises itself (`force_sig_fault`, and seccomp's SIGSYS) even when
//!   blocked, by unblocking it and resetting its action to the default, and it clears the
//!   unkillable flag of a namespace's init for it (checked for SIGSEGV, SIGBUS, SIGILL,
//!   SIGTRAP, SIGFPE and SIGABRT, as a plain process and as PID 1; the test below keeps
//!   checking a stack overflow). What is lost is std's "has overflowed its stack"
//!   message: a stack overflow now dies of SIGSEGV instead of SIGABRT. `abort()` unblocks
//!   SIGABRT itself before raising it, so an abort still aborts (and as PID 1, where the
//!   kernel drops our own SIGABRT, glibc falls back to a forced fault).
//!
//! Not forwarded: SIGKILL and SIGSTOP (they cannot be blocked or caught: they act on `run`
//! itself, and a namespace's init only takes them from outside the namespace), SIGCHLD
//! (about our children, not the child's: it reaps), and the real-time signals (nix has no
//! value to send them with, and postgres uses none: logged and dropped).

use anyhow::Context;
use nix::libc::signalfd_siginfo;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The set of signals PID 1 takes over: all of them (SIGKILL and SIGSTOP are in the set,
/// and the kernel silently leaves them out of any mask).
pub fn taken() -> SigSet {
    SigSet::all()
}

/// Blocks the taken signals in the calling (main) thread and opens the signalfd for them.
/// Must run before any thread is created and before the child is spawned, so that no
/// signal can hit a default disposition in between (the child gets a clean mask and
/// default actions from `posix_spawn`, see `spawn`).
pub fn block() -> anyhow::Result<SignalFd> {
    let set = taken();
    // Blocking, not a handler: a blocked signal is queued even when its action is to
    // ignore it (SIGPIPE, and every default action for a namespace's init), and it waits
    // on the signalfd as data. That includes the fault signals: a `kill`ed SIGSEGV is
    // queued like SIGTERM, while a fault our own code raises is forced through the mask
    // with its default action (see the module comment), so blocking them hides no crash.
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

/// One of the crate's two `unsafe` blocks (the other: `session::connect`'s per-thread credentials). tokio 1.54 deprecated the safe `AsyncFd::new` as unsound
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
    /// The SIGPIPE of our own write to a closed pipe or socket: not the child's business,
    /// and dropped without logging (the closed pipe may be our stderr).
    OwnBrokenPipe,
}

/// The action for signal number `signo` sent by `from_pid` (as the signalfd reports it,
/// in our pid namespace; 0 for a sender outside it or the kernel), when we are `own_pid`
/// (pure).
pub fn action(signo: i32, from_pid: u32, own_pid: u32) -> Action {
    match Signal::try_from(signo) {
        Ok(Signal::SIGCHLD) => Action::Reap,
        Ok(Signal::SIGHUP) => Action::ForwardAndReport,
        // No other process has our pid: a write of ours to a closed pipe or socket (the
        // kernel raises it as `SI_USER` from the writer). We never `kill` ourselves.
        Ok(Signal::SIGPIPE) if from_pid == own_pid => Action::OwnBrokenPipe,
        // Everything else goes to the child as is, like tini: SIGTERM/SIGINT/SIGQUIT are
        // postgres' smart/fast/immediate shutdown, SIGUSR1/2 and SIGWINCH are the child's
        // business, SIGTSTP/SIGTTIN/SIGTTOU/SIGCONT stop and resume the workload (PID 1
        // itself keeps running: it has them blocked), and the fault signals and SIGPIPE
        // can only come from `kill` here (see the module comment).
        Ok(signal) => Action::Forward(signal),
        Err(_) => Action::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u32 = 1;
    const OTHER: u32 = 4242;

    #[test]
    fn actions() {
        assert_eq!(action(Signal::SIGCHLD as i32, OTHER, US), Action::Reap);
        assert_eq!(
            action(Signal::SIGHUP as i32, OTHER, US),
            Action::ForwardAndReport
        );
        for signal in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGWINCH,
            Signal::SIGTSTP,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGCONT,
            Signal::SIGSEGV,
            Signal::SIGBUS,
            Signal::SIGILL,
            Signal::SIGTRAP,
            Signal::SIGABRT,
            Signal::SIGFPE,
            Signal::SIGSYS,
        ] {
            assert_eq!(action(signal as i32, OTHER, US), Action::Forward(signal));
            // Only SIGPIPE is told apart by its sender.
            assert_eq!(action(signal as i32, US, US), Action::Forward(signal));
        }
        assert_eq!(action(40, OTHER, US), Action::Drop);
    }

    #[test]
    fn sigpipe_is_forwarded_unless_it_is_our_own() {
        let pipe = Signal::SIGPIPE as i32;
        assert_eq!(action(pipe, OTHER, US), Action::Forward(Signal::SIGPIPE));
        // From outside our pid namespace (`docker kill -s PIPE`) the sender reads as 0.
        assert_eq!(action(pipe, 0, US), Action::Forward(Signal::SIGPIPE));
        assert_eq!(action(pipe, US, US), Action::OwnBrokenPipe);
        assert_eq!(action(pipe, OTHER, OTHER), Action::OwnBrokenPipe);
    }

    /// Set in the re-executed test binary that runs `overflow_with_every_signal_blocked`.
    const FAULT_CHILD: &str = "PG_PASSWORD_SYNC_TEST_FAULT_CHILD";

    /// A real fault of ours is not held by the mask: the process still dies of it, with
    /// its default action (std's stack-overflow handler does not even run: that would end
    /// in SIGABRT). The one fault safe code can raise is a stack overflow (SIGSEGV on the
    /// guard page), raised in a child: this test binary again, running only the helper
    /// below; as a plain process and, where possible, as a pid namespace's init, whose
    /// signals with a default action the kernel otherwise drops.
    #[test]
    fn a_real_fault_still_kills_with_every_signal_blocked() {
        use std::os::unix::process::ExitStatusExt;
        let exe = std::env::current_exe().unwrap();
        let helper = [
            "--exact",
            "supervisor::signals::tests::overflow_with_every_signal_blocked",
            "--test-threads=1",
        ];
        let mut plain = std::process::Command::new(&exe);
        plain.args(helper);
        let mut init = std::process::Command::new("unshare");
        init.args(["--pid", "--fork", "--mount-proc"])
            .arg(&exe)
            .args(helper);
        let can_unshare = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .output()
            .is_ok_and(|out| out.status.success());
        for (what, mut cmd) in [("plain", plain), ("init", init)] {
            if what == "init" && !can_unshare {
                continue;
            }
            let out = cmd.env(FAULT_CHILD, "1").output().unwrap();
            // unshare ends itself with its child's signal.
            assert_eq!(
                out.status.signal(),
                Some(Signal::SIGSEGV as i32),
                "{what}: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Not a test of its own: the child of the one above (returns at once otherwise).
    #[test]
    fn overflow_with_every_signal_blocked() {
        if std::env::var_os(FAULT_CHILD).is_none() {
            return;
        }
        let _signalfd = block().unwrap();
        std::process::exit(recurse(0) as i32);
    }

    /// Unbounded recursion in practice (the frame is kept by `black_box`).
    fn recurse(depth: u64) -> u64 {
        let frame = std::hint::black_box([depth; 256]);
        if frame[0] == u64::MAX {
            return 0;
        }
        recurse(frame[1] + 1).wrapping_add(frame[2])
    }

    #[test]
    fn every_signal_is_taken_faults_and_sigpipe_included() {
        let set = taken();
        for signal in Signal::iterator() {
            assert!(set.contains(signal), "{signal}");
        }
    }
}

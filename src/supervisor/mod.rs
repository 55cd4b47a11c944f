//! PID-1 mechanics, and nothing else: take over the signals, spawn one child, forward
//! signals to it, reap every zombie, and exit with the child's status. Like tini's `main()`,
//! it knows nothing of what the child is or of what the caller does meanwhile.
//!
//! The order is the reason this module exists (ARCHITECTURE.md, "Rules that hold
//! everywhere"): `Supervisor::take_signals` blocks every signal and opens the signalfd
//! before the runtime or any thread exists and before the child is spawned, so no signal
//! meets a default disposition; it also sets the subreaper flag, so the child's
//! orphans come to us. `Supervisor::run` then spawns the child and lets one task own the
//! signalfd and the reaper (the only `waitpid` in the process), while the caller's work
//! future runs beside it. SIGHUP is forwarded like every other signal and also reported to
//! the work as a plain event. When the child ends the work is simply dropped: nothing else
//! has to stop; the caller's `after_exit` runs (bounded) and we exit with the child's status.

mod exit;
mod reaper;
mod signals;
mod spawn;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::unistd::{Pid, getpid};
use tokio::sync::{mpsc, watch};

use reaper::Reaper;
use signals::{Action, Signals};

/// How often the reaper runs even without SIGCHLD (a safety net; signals do the work).
const SAFETY_REAP: Duration = Duration::from_secs(1);

/// A process that has taken over its signals: the first step of being PID 1.
pub struct Supervisor {
    signalfd: SignalFd,
}

/// The supervised child, as the caller's work sees it.
#[derive(Debug, Clone, Copy)]
pub struct Child {
    pub pid: Pid,
}

/// One message per SIGHUP received, sent after it was forwarded to the child.
pub type Hangups = mpsc::UnboundedReceiver<()>;

impl Child {
    /// Sends `signal` to the child (e.g. to stop it). ESRCH (already gone, not yet reaped)
    /// is expected and ignored.
    pub fn signal(&self, signal: Signal) {
        forward(self.pid, signal);
    }
}

impl Supervisor {
    /// Blocks the taken signals and opens the signalfd, then becomes a child subreaper when
    /// not PID 1. Must be called first in `main`'s thread, before any other thread exists
    /// (every later thread inherits the mask).
    pub fn take_signals() -> anyhow::Result<Supervisor> {
        let signalfd = signals::block()?;
        if getpid().as_raw() != 1 {
            // Not PID 1 (a test, `docker run --init`…): become the reaper of our orphans
            // anyway, so a temporary server and grandchildren are ours to reap and stop.
            nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
        }
        Ok(Supervisor { signalfd })
    }

    /// Spawns `command` (without the `withheld_env` variables), then runs `work` (given the
    /// child and its SIGHUP events) beside the signal forwarding and reaping until the child
    /// ends, then `after_exit`, and returns
    /// the child's exit code (127/126 when it cannot be spawned). An error of `work` does
    /// not end the child (the work signals it if it wants it gone): it is returned once the
    /// child has ended, instead of the code.
    pub fn run<W, WF, A, AF>(
        self,
        command: &[String],
        withheld_env: &[&str],
        work: W,
        after_exit: A,
    ) -> anyhow::Result<u8>
    where
        W: FnOnce(Child, Hangups) -> WF,
        WF: Future<Output = anyhow::Result<()>>,
        A: FnOnce(Pid) -> AF,
        AF: Future<Output = ()>,
    {
        let runtime = crate::runtime::new()?;
        let child = match spawn::spawn(command, withheld_env) {
            Ok(pid) => pid,
            Err(failure) => {
                tracing::error!("{}", failure.message);
                return Ok(failure.code);
            }
        };
        // Everything after the spawn: the signal task beside the work until the child ends.
        let signalfd = self.signalfd;
        let result = runtime.block_on(async move {
            let (status_tx, mut status_rx) = watch::channel(None::<u8>);
            let (hangup_tx, hangups) = mpsc::unbounded_channel();
            let signals = Signals::new(signalfd)?;
            tokio::spawn(signal_loop(
                signals,
                Reaper::new(child, status_tx),
                child,
                hangup_tx,
            ));

            let work = work(Child { pid: child }, hangups);
            tokio::pin!(work);
            let mut work_done = false;
            let mut work_error = None;
            let code = loop {
                tokio::select! {
                    changed = status_rx.wait_for(Option::is_some) => {
                        // The sender lives in the signal task, which never ends; a closed
                        // channel would mean it panicked, and there is no status to report
                        // then.
                        match changed.map(|code| *code) {
                            Ok(Some(code)) => break code,
                            Ok(None) => continue,
                            Err(_) => {
                                anyhow::bail!("the signal and reaper task ended unexpectedly")
                            }
                        }
                    }
                    outcome = &mut work, if !work_done => {
                        work_done = true;
                        work_error = outcome.err();
                    }
                }
            };
            let exited_at = Instant::now();
            after_exit(child).await;
            tracing::info!(
                code,
                after_child_ms = exited_at.elapsed().as_millis() as u64,
                "exiting"
            );
            match work_error {
                Some(err) => Err(err),
                None => Ok(code),
            }
        });
        // Do not wait for anything still running in the runtime (a connection task): the
        // child is gone and PID 1 must exit promptly.
        runtime.shutdown_background();
        result
    }
}

/// Owns the signalfd and the reaper: forwards signals, reaps on SIGCHLD and periodically,
/// reports each SIGHUP on `hangups`.
async fn signal_loop(
    mut signals: Signals,
    reaper: Reaper,
    child: Pid,
    hangups: mpsc::UnboundedSender<()>,
) {
    let mut safety = tokio::time::interval(SAFETY_REAP);
    // As the signalfd reports senders: in our own pid namespace (1 when we are its init).
    let own_pid = getpid().as_raw() as u32;
    loop {
        tokio::select! {
            received = signals.recv() => match received {
                Ok(info) => {
                    let signo = info.ssi_signo as i32;
                    match signals::action(signo, info.ssi_pid, own_pid) {
                        Action::Reap => reaper.reap_all(),
                        Action::Forward(signal) => {
                            tracing::info!(signal = %signal, from_pid = info.ssi_pid, "forwarding");
                            forward(child, signal);
                        }
                        Action::ForwardAndReport => {
                            tracing::info!(signal = %Signal::SIGHUP, from_pid = info.ssi_pid, "forwarding");
                            forward(child, Signal::SIGHUP);
                            // No receiver (the work ended or ignores them): nothing to do.
                            let _ = hangups.send(());
                        }
                        Action::Drop => tracing::warn!(signo, "real-time signal not forwarded"),
                        // Our own EPIPE's signal: nothing to do, not even a log line.
                        Action::OwnBrokenPipe => {}
                    }
                }
                Err(err) => {
                    // Should never happen; keep reaping on the timer rather than spin.
                    tracing::error!("{err:#}");
                    tokio::time::sleep(SAFETY_REAP).await;
                }
            },
            _ = safety.tick() => reaper.reap_all(),
        }
    }
}

/// Sends `signal` to the child. ESRCH (already gone, not yet reaped) is expected.
/// To its pid, not its process group (tini's default too): postgres relays each signal to
/// its own processes the way it means it (a smart shutdown lets the backends finish their
/// sessions), and each of them is in a session of its own (`setsid`) anyway.
fn forward(child: Pid, signal: Signal) {
    if let Err(err) = kill(child, signal) {
        tracing::debug!(signal = %signal, "not forwarded: {err}");
    }
}

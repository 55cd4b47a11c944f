//! Where the OIDC client secrets come from: the user secrets file, else the environment,
//! else (on a terminal) a prompt that does not echo.
//!
//! These three values are issued by the identity providers and must match their
//! configuration, so they are never generated. Every value needed by a run is gathered
//! before anything is written: a missing value in non-interactive mode is an error naming
//! the variables, raised while `keys/` is still untouched. Values are only ever held as
//! `Secret`s; messages name variables, never values.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{LocalFlags, SetArg, Termios, tcgetattr, tcsetattr};
use zeroize::Zeroizing;

use super::envfile::{self, EnvFile};
use crate::error::Failure;
use crate::fileio::dirfd::{Dir, read_followed_file};
use crate::secret::{MAX_SECRET_BYTES, Secret};
use crate::store::check::is_placeholder;

/// What is wrong with a value for a secret file, if anything (never quoting it).
pub fn value_problem(value: &str) -> Option<&'static str> {
    if value.trim().is_empty() {
        Some("is empty")
    } else if value.contains(['\n', '\r']) {
        Some("contains a line break")
    } else if value.contains('\0') {
        Some("contains a NUL byte")
    } else if value.len() > MAX_SECRET_BYTES {
        Some("is longer than 4096 bytes")
    } else {
        None
    }
}

/// The name of the default user secrets file in the secrets directory.
pub const ENV_FILE: &str = "user-provided.env";

/// The largest user secrets file read: three values and comments fit many times over, and
/// the size is checked on the open descriptor before a byte is read.
const MAX_ENV_BYTES: usize = 64 * 1024;

/// Reads the user secrets file: the one the operator named (`explicit`, found by its path),
/// else `ENV_FILE` in the secrets directory `root` (opened through its handle, never
/// through a link). Either is opened without blocking and must be a regular file of at most
/// `MAX_ENV_BYTES`. A missing default file is fine (`None`); a missing named file, or one
/// that is refused or does not parse, is a configuration error. Lines the shell would read
/// differently draw a warning naming the line.
pub fn load_env_file(
    root: Option<&Dir>,
    path: &Path,
    explicit: bool,
) -> anyhow::Result<Option<EnvFile>> {
    // A configuration error, said once (a refusal of the file is one already).
    let config = |err: anyhow::Error| match Failure::of(&err) {
        Some(_) => err,
        None => err.context(Failure::Config),
    };
    let bytes = if explicit {
        read_followed_file(path, MAX_ENV_BYTES).map_err(config)?
    } else {
        match root.map(|root| root.read_file(ENV_FILE, MAX_ENV_BYTES)) {
            None => return Ok(None),
            Some(read) => match read.map_err(config)? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        }
    };
    let file = envfile::parse(&bytes)
        .with_context(|| format!("parsing {}", path.display()))
        .context(Failure::Config)?;
    for (line, note) in file.notes() {
        tracing::warn!("{} line {line}: {note}", path.display());
    }
    Ok(Some(file))
}

/// Whether prompting is allowed: stdin is a terminal and `--non-interactive` is not set.
pub fn interactive(non_interactive: bool) -> bool {
    !non_interactive && std::io::stdin().is_terminal()
}

/// Gathers the value of every variable in `vars`, in order: the env file, the environment,
/// then a hidden prompt when `interactive`. An empty assignment counts as missing.
pub fn collect(
    vars: &[&'static str],
    file: Option<&EnvFile>,
    file_path: &Path,
    interactive: bool,
) -> anyhow::Result<Vec<Secret>> {
    let mut found: Vec<Option<Secret>> = Vec::with_capacity(vars.len());
    for var in vars {
        let from_file = file
            .and_then(|f| f.get(var))
            .filter(|s| !s.expose().is_empty());
        let value = match from_file {
            Some(secret) => Some(secret.clone()),
            None => std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(Secret::new),
        };
        found.push(value);
    }
    let missing: Vec<&str> = vars
        .iter()
        .zip(&found)
        .filter(|(_, v)| v.is_none())
        .map(|(var, _)| *var)
        .collect();
    if !missing.is_empty() && !interactive {
        return Err(anyhow::anyhow!(
            "missing {}: set {} in {} or the environment (or run on a terminal to be asked)",
            if missing.len() == 1 {
                "an OIDC client secret"
            } else {
                "OIDC client secrets"
            },
            missing.join(", "),
            file_path.display()
        ))
        .context(Failure::Config);
    }
    let mut values = Vec::with_capacity(vars.len());
    for (var, value) in vars.iter().zip(found) {
        let value = match value {
            Some(value) => value,
            None => prompt_hidden(var)?,
        };
        if let Some(problem) = value_problem(value.expose()) {
            return Err(anyhow::anyhow!("the value of {var} {problem}")).context(Failure::Config);
        }
        if is_placeholder(value.expose()) {
            tracing::warn!("{var} holds a placeholder value; `generate --verify` will fail");
        }
        values.push(value);
    }
    Ok(values)
}

/// Puts the terminal's saved settings back when dropped (also on an error path).
struct RestoreTerminal(Termios);

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        // TCSAFLUSH: input not read yet (a line half-typed when a signal came) is dropped,
        // so it never reaches the shell, which would show it with echo on.
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSAFLUSH, &self.0);
    }
}

/// The signals that would end the process while a hidden prompt waits: Ctrl-C, Ctrl-\\, a
/// closed terminal, `kill`. Left to their default action they would leave the terminal
/// with echo off.
const PROMPT_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGTERM,
];

/// Keeps `PROMPT_SIGNALS` blocked (queued, so none is lost) while it lives, and puts the
/// previous signal mask back when dropped.
struct HeldSignals {
    previous: SigSet,
    fd: SignalFd,
}

impl HeldSignals {
    fn hold() -> anyhow::Result<HeldSignals> {
        // A signal ignored by whoever started us (`nohup`, `trap '' INT`) stays ignored:
        // blocked, it would be queued and end the prompt after all.
        let ignored = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| signal_mask(&status, "SigIgn"))
            .unwrap_or(0);
        let mut set = SigSet::empty();
        for signal in PROMPT_SIGNALS {
            if ignored & (1 << (signal as i32 - 1)) == 0 {
                set.add(signal);
            }
        }
        let mut previous = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut previous))
            .context("holding back interrupt signals during the prompt")?;
        let held = |fd| HeldSignals { previous, fd };
        match SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => Ok(held(fd)),
            Err(err) => {
                let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
                Err(err).context("opening a signalfd for the prompt")
            }
        }
    }

    /// Waits until a line can be read from stdin (`Ok`), or one of the signals arrives
    /// (an `Interrupted` error naming it; the caller's guards then restore the terminal).
    fn wait_for_line(&self, var: &str) -> anyhow::Result<()> {
        let stdin = std::io::stdin();
        loop {
            let mut fds = [
                PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.fd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err).context("waiting for input at the prompt"),
            }
            if fds[1].any().unwrap_or(false) {
                let signal = match self.fd.read_signal() {
                    Ok(Some(info)) => i32::try_from(info.ssi_signo)
                        .ok()
                        .and_then(|n| Signal::try_from(n).ok()),
                    _ => None,
                }
                .unwrap_or(Signal::SIGINT);
                return Err(anyhow::anyhow!(
                    "interrupted ({}) while asking for {var}; nothing was written",
                    signal.as_str()
                ))
                .context(Failure::Interrupted(signal));
            }
            // Readable, at end of input or hung up: the read reports which.
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                return Ok(());
            }
        }
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        // A signal that came after the line was read is still pending: unblocked, it takes
        // its default action now, with the terminal already restored (dropped first).
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.previous), None);
    }
}

/// The signal set `field` (`SigIgn`, `SigBlk`, …) of a `/proc/PID/status` text, as a bit
/// mask (bit N-1 = signal N).
fn signal_mask(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        u64::from_str_radix(value.trim(), 16).ok()
    })
}

/// Asks for `var` on stderr and reads one line from the terminal with echo switched off.
fn prompt_hidden(var: &str) -> anyhow::Result<Secret> {
    let stdin = std::io::stdin();
    // Held before echo goes off and released after it is back on (drop order: `restore`
    // is declared later, so it is dropped first).
    let held = HeldSignals::hold()?;
    let original = tcgetattr(stdin.as_fd()).context("reading the terminal settings")?;
    let mut silent = original.clone();
    // No echo of the typed characters; ECHONL still shows the final newline.
    silent.local_flags.remove(LocalFlags::ECHO);
    silent.local_flags.insert(LocalFlags::ECHONL);
    // Echo goes off before the prompt appears, so nothing typed in answer is ever shown;
    // TCSAFLUSH drops anything typed ahead of the prompt (it was echoed, so it is not used).
    tcsetattr(stdin.as_fd(), SetArg::TCSAFLUSH, &silent).context("switching terminal echo off")?;
    let restore = RestoreTerminal(original);
    eprint!("{var} (input hidden): ");
    let _ = std::io::stderr().flush();
    // Room for the largest value and its line end, allocated once: a longer line is cut
    // at the limit (and refused below) rather than growing, so no reallocation ever frees
    // an un-zeroized copy of what was typed.
    let limit = MAX_SECRET_BYTES + 2;
    let mut line = Zeroizing::new(String::with_capacity(limit));
    held.wait_for_line(var)?;
    stdin
        .lock()
        .take(limit as u64)
        .read_line(&mut line)
        .with_context(|| format!("reading {var} from the terminal"))?;
    drop(restore);
    drop(held);
    if line.len() >= limit && !line.ends_with('\n') {
        return Err(anyhow::anyhow!(
            "the value entered for {var} is longer than {MAX_SECRET_BYTES} bytes"
        ))
        .context(Failure::Config);
    }
    while line.ends_with(['\n', '\r']) {
        line.pop();
    }
    if line.is_empty() {
        return Err(anyhow::anyhow!("no value entered for {var}")).context(Failure::Config);
    }
    Ok(Secret::new(std::mem::take(&mut *line)))
}

/// Asks a yes/no question on stderr and reads the answer from stdin (default no).
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_masks_from_proc_status() {
        let status = "Name:\tx\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000006\n";
        assert_eq!(signal_mask(status, "SigIgn"), Some(0b110)); // SIGINT, SIGQUIT
        assert_eq!(signal_mask(status, "SigBlk"), Some(0));
        assert_eq!(signal_mask(status, "SigCgt"), None);
        assert_eq!(signal_mask("SigIgn:\tnothex\n", "SigIgn"), None);
    }

    #[test]
    fn value_problems() {
        assert_eq!(value_problem("a-real-client-secret"), None);
        assert_eq!(value_problem(" "), Some("is empty"));
        assert_eq!(value_problem("a\nb"), Some("contains a line break"));
        assert_eq!(value_problem("a\0b"), Some("contains a NUL byte"));
        assert_eq!(
            value_problem(&"a".repeat(4097)),
            Some("is longer than 4096 bytes")
        );
    }

    #[test]
    fn file_wins_and_missing_is_named() {
        let file = crate::keyfiles::envfile::parse(
            b"A_TEST_ONLY_VAR=from-file-value-1234\nB_TEST_ONLY_VAR=\n",
        )
        .unwrap();
        let got = collect(&["A_TEST_ONLY_VAR"], Some(&file), Path::new("u.env"), false).unwrap();
        assert_eq!(got[0].expose(), "from-file-value-1234");
        let err = collect(
            &["A_TEST_ONLY_VAR", "B_TEST_ONLY_VAR", "C_TEST_ONLY_VAR"],
            Some(&file),
            Path::new("u.env"),
            false,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert_eq!(Failure::of(&err), Some(Failure::Config));
        assert!(msg.contains("B_TEST_ONLY_VAR, C_TEST_ONLY_VAR"), "{msg}");
        assert!(
            !msg.contains("A_TEST_ONLY_VAR") && !msg.contains("from-file"),
            "{msg}"
        );
    }
}

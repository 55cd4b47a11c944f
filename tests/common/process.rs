//! Running the binary under test: to completion (`run` → `Run`) or in the background
//! (`Running`), directly or as PID 1 of a new pid namespace (`Mode`), with every failure
//! explained by the command, its exit status, its stdout and stderr and, when a server is
//! involved, the tail of the server log.
//!
//! While a process runs, a sampler thread records the argv and environment of it and of
//! every descendant, so the leak checks (`leaks.rs`) can look at processes that have
//! exited since. The command line shown in failures is the program and its arguments,
//! never the environment: tests put secret values into environments (generate's OIDC
//! variables), and a failure message must not print them.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::leaks::proc_strings;
use super::tail;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pg-password-sync");

/// How long collecting a finished process's output may take: after the exit, an orphan
/// that inherited the pipes (subreaper mode) can keep them open until it exits too.
const OUTPUT_LIMIT: Duration = Duration::from_secs(120);

/// A `Command` for the binary with a clean environment: only PATH and `RUST_LOG=info`,
/// so nothing from the developer's shell (PGHOST, KEYS_DIR, PG_PASSWORD_SYNC_*, …)
/// changes the outcome.
pub fn bin() -> Command {
    Mode::Direct.bin()
}

/// How the binary runs: as the direct child of the test (where `run` makes itself a
/// subreaper), or as PID 1 of a new pid namespace with its own `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a new pid namespace (`unshare --pid --fork --mount-proc`); the host pid of
    /// the binary is unshare's child.
    Pid1,
    /// A plain child process; `run` sets PR_SET_CHILD_SUBREAPER.
    Subreaper,
    /// A plain child process (for the subcommands other than `run`).
    Direct,
}

impl Mode {
    /// The binary in this mode, with `bin()`'s clean environment.
    pub fn bin(self) -> Command {
        let mut cmd = match self {
            Mode::Pid1 => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--pid", "--fork", "--mount-proc", BIN]);
                cmd
            }
            Mode::Subreaper | Mode::Direct => Command::new(BIN),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            // A generous liveness bound instead of the 5 s default: on a loaded 2-core CI
            // machine a login (fork, SCRAM on both sides) can take seconds, and a test is
            // not about that. Tests of the timeout itself pass --connect-timeout.
            .env("PG_CONNECT_TIMEOUT", "20s");
        cmd
    }

    /// Whether a test in this mode can run here; prints the skip reason when not (and
    /// fails under CI, see `skip`).
    pub fn available(self, test: &str) -> bool {
        if self == Mode::Pid1 && !can_unshare() {
            super::skip(&format!(
                "{test}: `unshare --pid --fork --mount-proc` is not possible here"
            ));
            return false;
        }
        true
    }
}

/// Whether this machine lets us create a pid namespace (root, or user namespaces).
pub fn can_unshare() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs `$body(mode)` as two tests, named explicitly so that a test's full name can be
/// found with grep: `both_modes!(body => name_as_pid1, name_as_subreaper);`. The PID-1
/// twin is skipped (a failure under CI) where no pid namespace can be made.
macro_rules! both_modes {
    ($body:ident => $pid1:ident, $subreaper:ident) => {
        #[test]
        fn $pid1() {
            $crate::common::process::in_mode($crate::common::Mode::Pid1, stringify!($pid1), $body);
        }

        #[test]
        fn $subreaper() {
            $crate::common::process::in_mode(
                $crate::common::Mode::Subreaper,
                stringify!($subreaper),
                $body,
            );
        }
    };
}
pub(crate) use both_modes;

/// The runner behind `both_modes!`.
pub fn in_mode(mode: Mode, test: &str, body: fn(Mode)) {
    let suffix = match mode {
        Mode::Pid1 => "_as_pid1",
        Mode::Subreaper => "_as_subreaper",
        Mode::Direct => "",
    };
    assert!(test.ends_with(suffix), "{test} should end with {suffix}");
    if mode.available(test) {
        body(mode);
    }
}

/// The command line for messages: program and arguments, not the environment.
pub fn command_line(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// What a finished command did, plus every argv/environ seen of it and its descendants.
pub struct Run {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub proc_seen: Vec<String>,
    /// From the spawn (or from `Running::finish`) to the exit.
    pub elapsed: Duration,
    /// The log of the server the command talked to, shown (its tail) when a check fails.
    pub server_log: Option<PathBuf>,
}

/// The last 25 lines of a server log for failure output, password literals masked: the
/// test clusters log every statement, and test setup sets passwords in plain SQL
/// (`create_roles`, stages played by hand).
pub fn server_log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    mask_password_literals(&tail(&text, 25))
}

/// `text` with the literal after every `PASSWORD '` (any case) replaced by `<masked>`.
pub fn mask_password_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find("password '") {
        let start = at + "password '".len();
        out.push_str(&rest[..start]);
        out.push_str("<masked>");
        // The literal ends at a quote that is not doubled ('' is a quote inside it).
        let literal = &rest[start..];
        let mut end = literal.len();
        let mut chars = literal.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().is_some_and(|&(_, next)| next == '\'') {
                    chars.next();
                } else {
                    end = i;
                    break;
                }
            }
        }
        rest = &literal[end..];
    }
    out.push_str(rest);
    out
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        )?;
        if let Some(log) = &self.server_log {
            write!(f, "\n--- server log tail\n{}", server_log_tail(log))?;
        }
        Ok(())
    }
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Rich failure output (the same as `Display`).
    pub fn describe(&self) -> String {
        self.to_string()
    }

    /// `describe` with stdout withheld (only its size shown), for a command whose stdout
    /// holds secrets by design: a Kubernetes manifest carries every value, base64-encoded.
    pub fn describe_without_stdout(&self) -> String {
        let mut text = format!(
            "command: {}\nstatus: {}\n--- stdout withheld ({} bytes: it may hold secret \
             values)\n--- stderr\n{}",
            self.command,
            self.status,
            self.stdout.len(),
            self.stderr
        );
        if let Some(log) = &self.server_log {
            text.push_str(&format!("\n--- server log tail\n{}", server_log_tail(log)));
        }
        text
    }

    /// Attaches the server log whose tail failures show (`Cluster::run` does this).
    pub fn with_server_log(mut self, log: &Path) -> Run {
        self.server_log = Some(log.to_path_buf());
        self
    }

    #[track_caller]
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status (wanted {code})\n{self}"
        );
        self
    }

    #[track_caller]
    pub fn expect_ok(self) -> Run {
        self.expect_code(0)
    }

    /// Asserts that stdout contains `needle`, showing the whole record otherwise.
    #[track_caller]
    pub fn expect_stdout(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "no {needle:?} on stdout\n{self}"
        );
        self
    }

    /// Asserts that one line of stdout holds every one of `words` (a report line that
    /// names a login and says what happened to it), showing the whole record otherwise.
    #[track_caller]
    pub fn expect_stdout_line(&self, words: &[&str]) -> &Run {
        assert!(
            self.stdout
                .lines()
                .any(|line| words.iter().all(|word| line.contains(word))),
            "no line of stdout holds all of {words:?}\n{self}"
        );
        self
    }

    /// The first line of stdout, else of stderr, that holds every one of `words`.
    pub fn line_with(&self, words: &[&str]) -> Option<&str> {
        self.stdout
            .lines()
            .chain(self.stderr.lines())
            .find(|line| words.iter().all(|word| line.contains(word)))
    }

    /// Asserts that stderr contains `needle`, showing the whole record otherwise.
    #[track_caller]
    pub fn expect_stderr(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "no {needle:?} on stderr\n{self}"
        );
        self
    }
}

/// Runs a setup command (pg_basebackup, pg_ctl, psql) to completion and asserts that it
/// succeeded, showing `what` and its stderr otherwise.
#[track_caller]
pub fn output_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command to completion (see `Running::finish`), with a generous liveness bound.
pub fn run(cmd: Command) -> Run {
    Running::spawn(cmd).finish(Duration::from_secs(120))
}

/// A pid and all its descendants (through `/proc/<pid>/task/*/children`).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let tasks = format!("/proc/{}/task", all[i]);
        if let Ok(entries) = std::fs::read_dir(tasks) {
            for entry in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(entry.path().join("children")) {
                    all.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
            }
        }
        i += 1;
    }
    all
}

/// The first child of `pid`, if any.
pub fn first_child(pid: u32) -> Option<u32> {
    descendants(pid).get(1).copied()
}

/// Polls `condition` until it holds or `limit` passes (a liveness bound): every 5 ms for
/// the first second, so a quick condition is seen at once and a latency measured around the
/// wait (a rotation in force within a second) stays exact to a few milliseconds; then every
/// 50 ms. Many conditions start a process (psql) or log in, and a long wait (a grace
/// period, a failover) polled every 5 ms would keep a core busy, which on a shared CI
/// machine slows every other test running beside it.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    let deadline = started + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        let pause = if started.elapsed() < Duration::from_secs(1) {
            5
        } else {
            50
        };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// Reads a pipe to its end in a thread; the result arrives on the channel.
fn drain(mut reader: impl Read + Send + 'static, live: Arc<Mutex<String>>) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes.extend_from_slice(&buf[..n]);
                    // The live copy is for polling only; the final text is decoded whole
                    // (a chunk may end inside a UTF-8 sequence).
                    live.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

/// A process started in the background with piped output collected as it comes, and the
/// argv/environ of it and its descendants sampled until it exits.
pub struct Running {
    child: Child,
    pub command: String,
    /// The process under test: the child itself, or unshare's child in `Mode::Pid1`.
    pid: u32,
    mode: Mode,
    server_log: Option<PathBuf>,
    stdout: Option<Receiver<String>>,
    stderr: Option<Receiver<String>>,
    stderr_live: Arc<Mutex<String>>,
    stop_sampling: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<BTreeSet<String>>>,
}

impl Running {
    /// Spawns `cmd` (stdin from /dev/null); the process under test is the child itself.
    pub fn spawn(cmd: Command) -> Running {
        Running::spawn_as(Mode::Direct, cmd)
    }

    /// Spawns a command made by `mode.bin()` (or a wrapper that execs into it); in
    /// `Mode::Pid1` waits (bounded) for unshare's child, the namespace's PID 1.
    pub fn spawn_as(mode: Mode, mut cmd: Command) -> Running {
        let command = command_line(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command}: {e}"));
        let outer = child.id();
        let stdout = drain(child.stdout.take().unwrap(), Arc::default());
        let stderr_live = Arc::new(Mutex::new(String::new()));
        let stderr = drain(child.stderr.take().unwrap(), stderr_live.clone());
        let stop_sampling = Arc::new(AtomicBool::new(false));
        let stop = stop_sampling.clone();
        let sampler = std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut rounds = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for pid in descendants(outer) {
                    seen.extend(proc_strings(pid));
                }
                // Every millisecond at first, to catch short-lived helpers; then every
                // 5 ms, so a long-running watcher does not busy a shared CPU.
                rounds += 1;
                let pause = if rounds < 500 { 1 } else { 5 };
                std::thread::sleep(Duration::from_millis(pause));
            }
            seen
        });
        let mut running = Running {
            child,
            command,
            pid: outer,
            mode,
            server_log: None,
            stdout: Some(stdout),
            stderr: Some(stderr),
            stderr_live,
            stop_sampling,
            sampler: Some(sampler),
        };
        if mode == Mode::Pid1 {
            let mut found = None;
            wait_until(Duration::from_secs(10), "unshare's child", || {
                found = first_child(outer);
                found.is_some()
            });
            running.pid = found.unwrap();
        }
        running
    }

    /// Attaches the server log whose tail failures show.
    pub fn with_server_log(mut self, log: &Path) -> Running {
        self.server_log = Some(log.to_path_buf());
        self
    }

    /// The host pid of the process under test (PID 1 of its namespace in `Mode::Pid1`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sends `signal` to the process under test.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid as i32), signal).unwrap();
    }

    /// What the process has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr_live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Polls until stderr contains `needle` (a liveness bound of `limit`).
    #[track_caller]
    pub fn wait_stderr(&self, limit: Duration, needle: &str) {
        let deadline = Instant::now() + limit;
        while !self.stderr_so_far().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr within {limit:?}\ncommand: {}\n--- stderr so far\n{}",
                self.command,
                self.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    #[track_caller]
    pub fn assert_alive(&mut self) {
        assert!(
            self.is_running(),
            "the process exited\ncommand: {}\n--- stderr\n{}",
            self.command,
            self.stderr_so_far()
        );
    }

    /// Waits for the exit, at most `limit` from now (then kills it and fails), and
    /// returns the full record; `elapsed` is the time from this call to the exit.
    #[track_caller]
    pub fn finish(mut self, limit: Duration) -> Run {
        let waiting = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if waiting.elapsed() > limit {
                self.kill();
                panic!(
                    "did not exit within {limit:?}\ncommand: {}\n--- stderr so far\n{}",
                    self.command,
                    self.stderr_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        self.collect(status, waiting.elapsed())
    }

    /// The record of an exited process (bounded by OUTPUT_LIMIT for the pipes).
    fn collect(&mut self, status: ExitStatus, elapsed: Duration) -> Run {
        let read = |rx: Option<Receiver<String>>, what: &str| {
            rx.unwrap()
                .recv_timeout(OUTPUT_LIMIT)
                .unwrap_or_else(|_| panic!("{what} of {} stayed open", self.command))
        };
        let stdout = read(self.stdout.take(), "stdout");
        let stderr = read(self.stderr.take(), "stderr");
        self.stop_sampling.store(true, Ordering::Relaxed);
        let seen = self.sampler.take().unwrap().join().unwrap();
        Run {
            command: self.command.clone(),
            status,
            stdout,
            stderr,
            proc_seen: seen.into_iter().collect(),
            elapsed,
            server_log: self.server_log.clone(),
        }
    }
}

impl Running {
    /// SIGKILL to the process under test (in `Mode::Pid1` that ends its whole namespace)
    /// and to the child, then reaps the child.
    fn kill(&mut self) {
        self.stop_sampling.store(true, Ordering::Relaxed);
        // Only while our child is unreaped: until then neither its pid nor (unshare
        // waiting for it) its child's can have been reused.
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Not finished (a test failed or returned early): nothing may outlive the test.
        if self.stdout.is_some() {
            self.kill();
        }
    }
}

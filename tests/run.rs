//! `run` as PID 1 and as a subreaper, and `health`.
//!
//! PID-1 tests start the binary with `unshare --pid --fork --mount-proc`, which makes it
//! PID 1 of a new pid namespace with its own `/proc` (its host pid is unshare's child);
//! subreaper tests start it directly, where it sets `PR_SET_CHILD_SUBREAPER`; tests that
//! hold in both modes are written once and declared twice with `both_modes!`. PostgreSQL
//! tests go through `docker/test/docker-entrypoint.sh`, the stand-in for the official
//! image's entrypoint that the e2e test image also uses (initdb, temporary socket-only
//! server, the init SQL of `docker/test/initdb.d`, `exec postgres`).
//! Every wait polls a condition; wall-clock limits are generous liveness bounds (a loaded
//! CI machine must not fail them): how fast a stop is, `scripts/bench.sh` measures.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The stand-in entrypoint (re-executed as `postgres`, so a copy every user can read).
fn entrypoint() -> PathBuf {
    shared_copy(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/test/docker-entrypoint.sh"
    ))
}
/// Its init scripts: the roles appuser, backupuser, temporaluser (placeholder passwords).
fn initdb_dir() -> PathBuf {
    shared_copy(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/test/initdb.d"))
}
/// The stand-in's pg_hba.conf for these tests (`env` may replace it): trust on the socket,
/// so that the suite also runs as a non-root user (the server then runs as that user,
/// which peer would not map to `postgres`); SCRAM over TCP.
const TEST_HBA: &str = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256";
const COMPLETE: &str = "Password synchronization complete.";
const PG_READY: &str = "database system is ready to accept connections";

/// `/proc/<pid>/status` field `State` letter.
fn proc_state(pid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|s| s.trim().chars().next())
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------- pure init behaviour

fn exit_codes(mode: Mode) {
    for n in [0, 1, 2, 7, 126, 127, 255] {
        let mut cmd = mode.bin();
        cmd.args(["run", "--no-sync", "--", "sh", "-c", &format!("exit {n}")]);
        run(cmd).expect_code(n);
    }
    for (signal, code) in [("TERM", 143), ("KILL", 137), ("USR1", 138)] {
        let mut cmd = mode.bin();
        cmd.args(["run", "--no-sync", "--", "sh", "-c"])
            .arg(format!("kill -{signal} $$"));
        run(cmd).expect_code(code);
    }
}

both_modes!(
    exit_codes =>
    exit_code_is_the_childs_as_pid1,
    exit_code_is_the_childs_as_subreaper
);

fn exec_failures(mode: Mode) {
    let mut cmd = mode.bin();
    cmd.args(["run", "--no-sync", "--", "pps-no-such-command-anywhere"]);
    let out = run(cmd).expect_code(127);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{}", out.describe());
    assert!(errors[0].contains("pps-no-such-command-anywhere"));

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = mode.bin();
    cmd.args(["run", "--no-sync", "--"]).arg(&script);
    run(cmd).expect_code(126);
}

both_modes!(
    exec_failures =>
    command_not_found_is_127_and_not_executable_126_as_pid1,
    command_not_found_is_127_and_not_executable_126_as_subreaper
);

#[test]
fn log_lines_on_a_pipe_carry_no_terminal_escape_codes() {
    // A container log is a pipe: `docker logs` showed `pid\x1b[0m\x1b[2m=\x1b[0m7`.
    let mut cmd = Mode::Subreaper.bin();
    cmd.args(["run", "--no-sync", "--", "true"]);
    let out = run(cmd).expect_ok();
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("[pg-password-sync] INFO started child"))
        .unwrap_or_else(|| panic!("no 'started child' line:\n{}", out.stderr));
    assert!(line.contains(" pid="), "{line:?}");
    assert!(!out.stderr.contains('\x1b'), "{:?}", out.stderr);
}

#[test]
fn child_starts_with_no_blocked_and_no_ignored_signals() {
    // PID 1 blocks every signal for its signalfd; the child must not inherit that mask
    // (postgres would never see SIGTERM), nor Rust's ignored SIGPIPE.
    let mut cmd = Mode::Subreaper.bin();
    // grep is our direct child and reads its own status: the mask it got from us.
    cmd.args([
        "run",
        "--no-sync",
        "--",
        "grep",
        "-E",
        "^Sig(Blk|Ign)",
        "/proc/self/status",
    ]);
    let out = run(cmd).expect_ok();
    let field = |name: &str| {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{}", out.describe()));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(field("SigBlk:"), 0, "{}", out.stdout);
    let sigpipe_bit = 1u64 << (Signal::SIGPIPE as u32 - 1);
    assert_eq!(field("SigIgn:") & sigpipe_bit, 0, "{}", out.stdout);
}

#[test]
fn an_initialised_data_directory_keeps_the_superuser_password_out_of_the_childs_environment() {
    // The official entrypoint exports POSTGRES_PASSWORD (read from POSTGRES_PASSWORD_FILE)
    // and execs postgres, which would carry it in /proc/*/environ. It only needs it to
    // initialise an empty PGDATA.
    let data = tempfile::tempdir().unwrap();
    let child_env = |initialised: bool| {
        if initialised {
            std::fs::write(data.path().join("PG_VERSION"), "15\n").unwrap();
        }
        let mut cmd = Mode::Subreaper.bin();
        cmd.env("POSTGRES_PASSWORD_FILE", "/run/secrets/postgres_password")
            .env("POSTGRES_PASSWORD", "not-a-real-password")
            .env("PGDATA", data.path())
            .args(["run", "--no-sync", "--", "env"]);
        let out = run(cmd).expect_ok();
        out.stdout
    };
    // Failures show the variables' names: the environment holds the password.
    let names = |env: &str| -> Vec<String> {
        env.lines()
            .map(|l| l.split('=').next().unwrap_or_default().to_owned())
            .collect()
    };
    let fresh = child_env(false);
    assert!(
        fresh.contains("POSTGRES_PASSWORD_FILE="),
        "{:?}",
        names(&fresh)
    );
    let initialised = child_env(true);
    assert!(
        !initialised.contains("POSTGRES_PASSWORD"),
        "{:?}",
        names(&initialised)
    );
    assert!(
        initialised.contains("PGDATA="),
        "the rest is passed on: {:?}",
        names(&initialised)
    );
}

/// Every standard signal `run` can receive, in number order: 1–31 except SIGKILL and
/// SIGSTOP (which no process can catch or block: they act on `run` itself) and SIGCHLD
/// (which is about `run`'s own children: it reaps, and never forwards it).
fn forwardable_signals() -> Vec<Signal> {
    (1..=31)
        .map(|n| Signal::try_from(n).unwrap())
        .filter(|s| ![Signal::SIGKILL, Signal::SIGSTOP, Signal::SIGCHLD].contains(s))
        .collect()
}

/// The table test: each signal is sent to `run` and must reach the child exactly once,
/// with `run` alive afterwards. The child is a bash script that traps every one of them
/// and appends its number to a file. Trapping also gives the job-control signals
/// (SIGTSTP, SIGTTIN, SIGTTOU) a handler, so they are recorded instead of stopping it, and
/// SIGCONT resumes nothing but is still recorded. This covers what tini's and dumb-init's
/// suites send: SIGPIPE (Rust starts with it ignored) and the fault signals sent with
/// `kill` (SIGSEGV and SIGBUS meet std's stack-overflow handler, the others kill a process
/// that does not block them): each must reach the child, and none may end `run`.
fn signals_reach_the_child(mode: Mode) {
    let table = forwardable_signals();
    assert_eq!(table.len(), 28);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("signals.log");
    let script = dir.path().join("child.sh");
    let mut text = String::from("#!/bin/bash\nf=\"$1\"\nnote() { echo \"$1\" >>\"$f\"; }\n");
    for signal in &table {
        let n = *signal as i32;
        text.push_str(&format!("trap 'note {n}' {n}\n"));
    }
    text.push_str(
        "note ready\nwhile [ ! -e \"$f.stop\" ]; do sleep 0.05 & wait \"$!\"; done\nexit 0\n",
    );
    std::fs::write(&script, text).unwrap();
    let mut cmd = mode.bin();
    cmd.args(["run", "--no-sync", "--", "bash"])
        .arg(&script)
        .arg(&log);
    let mut sup = Running::spawn_as(mode, cmd);
    let lines = || log_lines(&log);
    wait_until(Duration::from_secs(10), "the child's traps", || {
        lines().first().map(String::as_str) == Some("ready")
    });
    for (i, signal) in table.iter().enumerate() {
        sup.signal(*signal);
        let what = format!(
            "{signal} to reach the child (received so far: {:?})",
            lines()
        );
        wait_until(Duration::from_secs(10), &what, || {
            lines().len() > i + 1 || !sup.is_running()
        });
        assert!(
            sup.is_running(),
            "{signal} ended `run`\n--- stderr\n{}",
            sup.stderr_so_far()
        );
        assert_eq!(
            lines()[i + 1],
            (*signal as i32).to_string(),
            "{:?}",
            lines()
        );
    }
    // SIGHUP is forwarded and, with --no-sync, nothing else: the log says only that.
    sup.wait_stderr(Duration::from_secs(10), "forwarding signal=SIGPIPE");
    let stderr = sup.stderr_so_far();
    let hangup = stderr
        .lines()
        .filter(|l| l.contains("SIGHUP"))
        .collect::<Vec<_>>();
    assert_eq!(hangup.len(), 1, "{stderr}");
    assert!(hangup[0].contains("forwarding"), "{stderr}");
    assert!(
        !stderr.contains("re-sync"),
        "--no-sync never re-syncs:\n{stderr}"
    );

    std::fs::write(dir.path().join("signals.log.stop"), "").unwrap();
    sup.finish(Duration::from_secs(10)).expect_ok();
    let mut expected = vec!["ready".to_owned()];
    expected.extend(table.iter().map(|s| (*s as i32).to_string()));
    assert_eq!(lines(), expected, "each signal arrived exactly once");
}

both_modes!(
    signals_reach_the_child =>
    every_signal_reaches_the_child_exactly_once_as_pid1,
    every_signal_reaches_the_child_exactly_once_as_subreaper
);

fn orphans_are_reaped(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("spawned");
    let mut cmd = mode.bin();
    // Each `( sleep & )` subshell exits at once: its sleep is orphaned to PID 1 / us.
    cmd.args(["run", "--no-sync", "--", "sh", "-c"])
        .arg(
            "i=0; while [ $i -lt 50 ]; do (sleep 0.3 &); i=$((i+1)); done; \
             echo >\"$0\"; exec sleep 1000",
        )
        .arg(&marker);
    let sup = Running::spawn_as(mode, cmd);
    wait_until(Duration::from_secs(10), "the orphans", || marker.exists());
    // Some orphans are still sleeping now; they are ours.
    let orphans = descendants(sup.pid())
        .into_iter()
        .filter(|p| comm(*p) == "sleep")
        .count();
    assert!(orphans > 1, "orphans were reparented to us");
    // All 50 exit; none may stay a zombie: only we and the child remain.
    wait_until(Duration::from_secs(20), "all orphans reaped", || {
        let pids = descendants(sup.pid());
        pids.len() == 2 && pids.iter().all(|p| proc_state(*p) != Some('Z'))
    });
    sup.signal(Signal::SIGTERM);
    sup.finish(Duration::from_secs(10)).expect_code(143);
}

both_modes!(
    orphans_are_reaped =>
    fifty_orphans_leave_no_zombie_as_pid1,
    fifty_orphans_leave_no_zombie_as_subreaper
);

/// The lines a test child has noted in `log` so far (none while it does not exist).
fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

// ------------------------------------------------------------------ with PostgreSQL

/// A fresh (empty) PGDATA for the stand-in entrypoint, secret files with new passwords,
/// and a state directory.
struct Pg {
    /// Holds data/ and sock/; removed on drop.
    _root: tempfile::TempDir,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    keys: Keys,
    state: tempfile::TempDir,
    secrets: Vec<String>,
}

impl Pg {
    fn new() -> Pg {
        let root = server_dir("pps-run-");
        let data = root.path().join("data");
        let sock = root.path().join("sock");
        let status = as_server_user("mkdir").arg(&sock).status().unwrap();
        assert!(status.success());
        let keys = Keys::new();
        let secrets = keys.write_new(&DEFAULT_ROLES, "run pw'\"\\ ü");
        Pg {
            _root: root,
            data,
            sock,
            port: free_port(),
            keys,
            state: tempfile::tempdir().unwrap(),
            secrets,
        }
    }

    fn secrets(&self) -> Vec<&str> {
        self.secrets.iter().map(String::as_str).collect()
    }

    /// `command` started in the background as `mode`.
    fn spawn(&self, mode: Mode, env: &[(&str, &str)], flags: &[&str], pg: &[&str]) -> Running {
        Running::spawn_as(mode, self.command(mode, env, flags, pg))
    }

    /// `run` with the stand-in entrypoint; `env` goes to both (INIT_DELAY, PG_HBA, …).
    fn command(&self, mode: Mode, env: &[(&str, &str)], flags: &[&str], pg: &[&str]) -> Command {
        let mut cmd = mode.bin();
        // PGHOST is the entrypoint's socket directory (its servers are told it) and
        // PG_BINDIR where it finds initdb, pg_ctl, psql and postgres.
        cmd.env("PGDATA", &self.data)
            .env("PGHOST", &self.sock)
            .env("PG_BINDIR", pg_bindir())
            .env("PGPORT", self.port.to_string())
            .env("INITDB_DIR", initdb_dir())
            .env("POSTGRES_INITDB_ARGS", "--no-sync")
            .env("PG_HBA", TEST_HBA)
            .env(
                "POSTGRES_EXTRA_CONF",
                "log_statement = 'all'\nlog_min_error_statement = 'error'\nfsync = off",
            );
        for (key, value) in env {
            cmd.env(key, value);
        }
        cmd.arg("run")
            .arg("--keys-dir")
            .arg(self.keys.path())
            .arg("--secrets-source-dir")
            .arg(self.keys.path().join("no-such-dir"))
            .args(["--temporal-db-user", "temporaluser"])
            .arg("--state-dir")
            .arg(self.state.path())
            .args(flags)
            .arg("--")
            .arg(entrypoint())
            .args(["postgres", "-c", "listen_addresses=127.0.0.1"])
            .args(pg);
        cmd
    }

    /// `health`, run where `run` runs (inside its pid namespace for PID 1).
    fn health(&self, sup: &Running) -> Run {
        let mut cmd = match sup.mode() {
            Mode::Pid1 => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["-t", &sup.pid().to_string(), "--pid", "--mount", BIN]);
                cmd
            }
            Mode::Subreaper | Mode::Direct => Command::new(BIN),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("health")
            .arg("--pgdata")
            .arg(&self.data)
            .arg("--state-dir")
            .arg(self.state.path());
        run(cmd)
    }

    fn cluster_state(&self) -> String {
        let out = as_server_user(pg_bin("pg_controldata"))
            .arg(&self.data)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    fn assert_new_passwords(&self) {
        for ((role, _), secret) in DEFAULT_ROLES.iter().zip(&self.secrets) {
            if let Err(err) = login_tcp(self.port, role, secret) {
                panic!("login as {role} with its new password failed: {err}");
            }
        }
        login_tcp(self.port, "appuser", "placeholder-appuser")
            .expect_err("the placeholder password no longer works");
    }

    /// Processes whose argv mentions this data directory (a postmaster started with -D).
    fn postgres_processes(&self) -> Vec<String> {
        let data = self.data.display().to_string();
        all_proc_strings()
            .into_iter()
            .filter(|s| s.contains(&data) && s.contains("postgres -D"))
            .collect()
    }
}

/// Fresh PGDATA, 2 s init delay: exactly one sync, after the final server is ready; all
/// roles hold their new passwords; SIGINT (`docker stop` for the postgres image) stops
/// everything cleanly (10 s is a liveness bound; `scripts/bench.sh` measures the stop).
/// No secret anywhere.
fn fresh_init_then_stop(mode: Mode) {
    let pg = Pg::new();
    let sup = pg.spawn(mode, &[("INIT_DELAY", "2")], &[], &[]);
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    let before_stop = sup.stderr_so_far();
    pg.assert_new_passwords();
    let health = pg.health(&sup).expect_ok();

    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10));
    eprintln!("{mode:?}: stopped {:?} after SIGINT", out.elapsed);
    let out = out.expect_ok();
    assert_eq!(pg.cluster_state(), "shut down", "{}", out.describe());

    assert_eq!(
        out.stderr.matches(COMPLETE).count(),
        1,
        "exactly one sync:\n{}",
        out.stderr
    );
    // The temporary server (pg_ctl sends its log to stdout) and the final one (stderr)
    // both said "ready"; the sync came after the final server's, and after init.
    assert!(out.stdout.contains(PG_READY), "{}", out.describe());
    assert_eq!(before_stop.matches(PG_READY).count(), 1, "{before_stop}");
    assert_eq!(before_stop.matches("PostgreSQL is ready").count(), 1);
    let final_ready = before_stop.find(PG_READY).unwrap();
    let first_role_line = before_stop.find("role \"").unwrap();
    let init_done = before_stop.find("init process complete").unwrap();
    assert!(
        init_done < final_ready && final_ready < first_role_line,
        "{before_stop}"
    );
    for (role, _) in DEFAULT_ROLES {
        assert!(
            out.stderr.contains(&format!("role {role:?}: changed")),
            "{}",
            out.stderr
        );
    }
    if let Some(line) = out.stderr.lines().find(|l| l.contains("first sync done")) {
        eprintln!("{mode:?}: {line}");
    }
    assert_no_leak(&pg.secrets(), None, &[&out, &health]);
}

both_modes!(
    fresh_init_then_stop =>
    fresh_pgdata_syncs_once_after_the_final_server_and_sigint_stops_cleanly_as_pid1,
    fresh_pgdata_syncs_once_after_the_final_server_and_sigint_stops_cleanly_as_subreaper
);

/// An idle client connected with psql over the socket; dropping stdin disconnects it.
struct IdleClient {
    child: std::process::Child,
}

impl IdleClient {
    fn connect(pg: &Pg) -> IdleClient {
        let mut child = psql_superuser(&pg.sock, pg.port)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"SELECT 'connected';\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        // psql's aligned output starts with the column header; the session is open.
        assert!(!line.is_empty(), "psql did not connect");
        IdleClient { child }
    }

    fn leave(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn sigterm_waits_for_an_idle_client(mode: Mode) {
    let pg = Pg::new();
    let mut sup = pg.spawn(mode, &[], &[], &[]);
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    let client = IdleClient::connect(&pg);
    sup.signal(Signal::SIGTERM);
    sup.wait_stderr(Duration::from_secs(10), "received smart shutdown request");
    // Smart shutdown: postgres waits for the client, and so does PID 1. Observed over a
    // window (this is the property under test, not a synchronisation).
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        assert!(
            sup.is_running(),
            "PID 1 exited while a client was connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    client.leave();
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert_eq!(pg.cluster_state(), "shut down");
    assert_no_leak(&pg.secrets(), None, &[&out]);
}

both_modes!(
    sigterm_waits_for_an_idle_client =>
    sigterm_waits_for_an_idle_client_then_exits_zero_as_pid1,
    sigterm_waits_for_an_idle_client_then_exits_zero_as_subreaper
);

fn postgres_failing_to_start(mode: Mode) {
    let pg = Pg::new();
    let sup = pg.spawn(mode, &[], &[], &["-c", "no_such_setting_pps=1"]);
    // postgres exits 1 on a configuration error.
    let out = sup.finish(Duration::from_secs(120)).expect_code(1);
    assert!(out.stderr.contains("no_such_setting_pps"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("role \""),
        "no sync was attempted:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("sync failed"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("PostgreSQL is ready"),
        "{}",
        out.stderr
    );
}

both_modes!(
    postgres_failing_to_start =>
    postgres_failing_to_start_is_not_synced_and_its_code_propagates_as_pid1,
    postgres_failing_to_start_is_not_synced_and_its_code_propagates_as_subreaper
);

fn postmaster_killed(mode: Mode) {
    let pg = Pg::new();
    let sup = pg.spawn(mode, &[], &[], &[]);
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    // The entrypoint exec'ed into postgres: our child is the postmaster.
    let postmaster = first_child(sup.pid()).unwrap();
    assert_eq!(comm(postmaster), "postgres");
    kill(Pid::from_raw(postmaster as i32), Signal::SIGKILL).unwrap();
    // A liveness bound: the reaper reports the exit at once; the time is printed.
    let out = sup.finish(Duration::from_secs(10));
    eprintln!(
        "{mode:?}: exited {:?} after the postmaster was killed",
        out.elapsed
    );
    out.expect_code(137);
}

both_modes!(
    postmaster_killed =>
    postmaster_sigkilled_after_ready_exits_137_promptly_as_pid1,
    postmaster_sigkilled_after_ready_exits_137_promptly_as_subreaper
);

fn root_with_peer_only(mode: Mode) {
    if !is_root() {
        skip("the root/peer test needs root");
        return;
    }
    let pg = Pg::new();
    // Root-only secret files, as Compose delivers them.
    let meta = std::fs::metadata(pg.keys.path().join("postgres_app_user_pw.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let hba = "local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256";
    let sup = pg.spawn(mode, &[("PG_HBA", hba)], &[], &[]);
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    pg.assert_new_passwords();
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert_no_leak(&pg.secrets(), None, &[&out]);
}

both_modes!(
    root_with_peer_only =>
    as_root_with_only_peer_for_postgres_and_root_only_secret_files_as_pid1,
    as_root_with_only_peer_for_postgres_and_root_only_secret_files_as_subreaper
);

fn health_follows_the_sync(mode: Mode) {
    let pg = Pg::new();
    let sup = pg.spawn(mode, &[("INIT_DELAY", "2")], &["--no-watch"], &[]);
    // Before the sync (the init delay): not healthy.
    sup.wait_stderr(Duration::from_secs(60), "init delay");
    let before = pg.health(&sup).expect_code(8);
    assert_eq!(before.stderr.lines().count(), 1, "{}", before.stderr);

    sup.wait_stderr(Duration::from_secs(60), COMPLETE);
    let after = pg.health(&sup).expect_ok();

    // A rotation without a sync (--no-watch): no longer healthy, and it says why.
    let rotated = unique("rotated");
    pg.keys.write("postgres_app_user_pw", &rotated);
    let stale = pg.health(&sup).expect_code(8);
    assert!(
        stale.stderr.contains("postgres_app_user_pw"),
        "{}",
        stale.describe()
    );

    // SIGHUP re-syncs (and reloads postgres): healthy again; the log says both.
    sup.signal(Signal::SIGHUP);
    sup.wait_stderr(Duration::from_secs(10), "forwarding signal=SIGHUP");
    sup.wait_stderr(Duration::from_secs(10), "SIGHUP: re-syncing every role");
    wait_until(Duration::from_secs(30), "a resync", || {
        sup.stderr_so_far().matches(COMPLETE).count() == 2
    });
    wait_until(Duration::from_secs(10), "healthy again", || {
        pg.health(&sup).code() == Some(0)
    });
    login_tcp(pg.port, "appuser", &rotated).unwrap();

    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    let mut secrets = pg.secrets();
    secrets.push(&rotated);
    assert_no_leak(&secrets, None, &[&out, &before, &after, &stale]);
}

both_modes!(
    health_follows_the_sync =>
    health_is_8_before_the_sync_0_after_and_8_after_an_unsynced_rotation_as_pid1,
    health_is_8_before_the_sync_0_after_and_8_after_an_unsynced_rotation_as_subreaper
);

fn sigint_during_init(mode: Mode) {
    let pg = Pg::new();
    let sup = pg.spawn(mode, &[("INIT_DELAY", "60")], &[], &[]);
    sup.wait_stderr(Duration::from_secs(60), "init delay");
    assert_eq!(
        pg.postgres_processes().len(),
        1,
        "the temporary server runs"
    );
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10));
    eprintln!(
        "{mode:?}: exited {:?} after SIGINT during init",
        out.elapsed
    );
    // The entrypoint's own status (its INT trap exits 130).
    let out = out.expect_code(130);
    assert!(
        out.stderr.contains("temporary server stopped"),
        "{}",
        out.stderr
    );
    assert_eq!(pg.cluster_state(), "shut down", "{}", out.stderr);
    assert!(!pg.data.join("postmaster.pid").exists());
    assert_eq!(pg.postgres_processes(), Vec::<String>::new());
    assert!(!out.stderr.contains(COMPLETE));
    assert_no_leak(&pg.secrets(), None, &[&out]);
}

both_modes!(
    sigint_during_init =>
    sigint_during_init_stops_the_temporary_server_as_pid1,
    sigint_during_init_stops_the_temporary_server_as_subreaper
);

#[test]
fn exit_on_sync_failure_stops_postgres_and_exits_with_the_failure_code() {
    let mode = Mode::Subreaper;
    let pg = Pg::new();
    // An empty secret file is a configuration error (exit 3).
    pg.keys.write_raw("postgres_app_ro_pw.txt", b"\n");
    let sup = pg.spawn(mode, &[], &["--exit-on-sync-failure"], &[]);
    let out = sup.finish(Duration::from_secs(120)).expect_code(3);
    assert!(out.stderr.contains("postgres_app_ro_pw"), "{}", out.stderr);
    assert_eq!(pg.cluster_state(), "shut down");
}

/// Watching is on by default inside `run`: a rotation of the files reaches the server
/// without a restart (same postmaster), and `health` follows it.
fn rotation_while_running(mode: Mode) {
    let pg = Pg::new();
    let sup = pg.spawn(
        mode,
        &[],
        &["--debounce", "20ms", "--resync-interval", "0"],
        &[],
    );
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    pg.assert_new_passwords();
    let postmaster = postmaster_pid(&pg.data);

    let rotated: Vec<String> = (0..2).map(|i| unique(&format!("live{i}"))).collect();
    pg.keys.write("postgres_app_user_pw", &rotated[0]);
    pg.keys.write("postgres_app_ro_pw", &rotated[1]);
    wait_until(
        Duration::from_secs(10),
        "the rotation to be in force",
        || {
            login_tcp(pg.port, "appuser", &rotated[0]).is_ok()
                && login_tcp(pg.port, "backupuser", &rotated[1]).is_ok()
        },
    );
    login_tcp(pg.port, "appuser", &pg.secrets[1]).expect_err("the old password is gone");
    assert_eq!(
        postmaster_pid(&pg.data),
        postmaster,
        "the server was not restarted"
    );
    wait_until(
        Duration::from_secs(10),
        "health to follow the rotation",
        || pg.health(&sup).code() == Some(0),
    );

    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert!(out.stderr.contains("passwords rotated"), "{}", out.stderr);
    // Each rotation reports like any sync, ending with the line operators grep for.
    assert!(out.stderr.matches(COMPLETE).count() >= 2, "{}", out.stderr);
    let mut secrets = pg.secrets();
    secrets.extend(rotated.iter().map(String::as_str));
    assert_no_leak(&secrets, None, &[&out]);
}

/// Line 1 of `postmaster.pid`.
fn postmaster_pid(data: &Path) -> String {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

both_modes!(
    rotation_while_running =>
    a_rotation_reaches_the_running_server_without_a_restart_as_pid1,
    a_rotation_reaches_the_running_server_without_a_restart_as_subreaper
);

/// Invalid secret files at start: no backoff loop; the watcher applies them once fixed.
#[test]
fn secret_files_fixed_after_start_are_applied_by_the_watcher() {
    let pg = Pg::new();
    let missing = pg.keys.path().join("postgres_app_ro_pw.txt");
    std::fs::remove_file(&missing).unwrap();
    let sup = pg.spawn(Mode::Subreaper, &[], &["--debounce", "20ms"], &[]);
    sup.wait_stderr(Duration::from_secs(120), "waiting for valid secret files");
    pg.keys.write("postgres_app_ro_pw", &pg.secrets[2]);
    wait_until(
        Duration::from_secs(10),
        "the fixed files to be applied",
        || login_tcp(pg.port, "backupuser", &pg.secrets[2]).is_ok(),
    );
    pg.assert_new_passwords();
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert!(
        out.stderr.contains("postgres_app_ro_pw"),
        "the file was named: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("retrying the sync"), "{}", out.stderr);
    assert_no_leak(&pg.secrets(), None, &[&out]);
}

/// The watcher starting right after the first sync only looks for files changed in between:
/// no second full pass over the server, so a role that does not exist is warned about by the
/// first sync and then by each full resync (here one SIGHUP), not once more at the start.
#[test]
fn watching_starts_without_a_second_full_sync() {
    let pg = Pg::new();
    let sup = pg.spawn(
        Mode::Subreaper,
        &[("RUST_LOG", "debug")],
        &["--app-db-user", "ghost", "--resync-interval", "0"],
        &[],
    );
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    sup.wait_stderr(Duration::from_secs(10), "trigger=\"start of watching\"");
    sup.signal(Signal::SIGHUP);
    // The resync's own outcome line: everything before it has been logged.
    sup.wait_stderr(
        Duration::from_secs(10),
        "all passwords already in force trigger=\"resync request\"",
    );
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    let warnings = out.stderr.matches("role does not exist; skipped").count();
    assert_eq!(
        warnings, 2,
        "one warning from the first sync, one from the SIGHUP resync:\n{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("secret files unchanged; nothing to do trigger=\"start of watching\""),
        "{}",
        out.stderr
    );
    assert_no_leak(&pg.secrets(), None, &[&out]);
}

/// Debian's Python, which `postgres` can run (a python3 first in root's PATH may live under
/// /root); scripts/lib.sh's ensure_postgres installs it.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Takes every inotify instance the OS user `postgres` may have (`fs.inotify.
/// max_user_instances`), until dropped. Only this test runs our binary as `postgres`; the
/// servers themselves use no inotify.
///
/// The limit is the user's, machine-wide: test processes running at once (scripts/test.sh
/// runs this test once per PostgreSQL major, in parallel) would take the instances from
/// each other, and one's drop would hand another's `run` an inotify it must not get. So a
/// hog holds an exclusive lock on `INOTIFY_LOCK` from before it starts until it is gone.
struct InotifyHog {
    child: std::process::Child,
    _turn: std::fs::File,
}

/// The lock file of the inotify hogs of every test process on this machine (only root
/// makes a hog: in /run, where no other user can plant a name).
const INOTIFY_LOCK: &str = "/run/pg-password-sync-tests-inotify.lock";

impl InotifyHog {
    /// `None` (the test is skipped; under CI it fails) when the limit cannot be reached.
    fn take_all() -> Option<InotifyHog> {
        let turn = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(INOTIFY_LOCK)
            .unwrap_or_else(|e| panic!("opening {INOTIFY_LOCK}: {e}"));
        // Blocks while another test process holds every instance (a minute at most).
        turn.lock()
            .unwrap_or_else(|e| panic!("locking {INOTIFY_LOCK}: {e}"));
        const HOG: &str = r#"
import ctypes, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while libc.inotify_init() >= 0:
    fds.append(1)
print(len(fds), ctypes.get_errno(), flush=True)
sys.stdin.read()
"#;
        let mut child = as_server_user(SYSTEM_PYTHON)
            .args(["-c", HOG])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let hog = InotifyHog { child, _turn: turn };
        // EMFILE from the per-user limit, not from the hog's own descriptor limit: a
        // fresh process of the same user must fail too.
        let probe = as_server_user(SYSTEM_PYTHON)
            .args([
                "-c",
                "import ctypes; print(ctypes.CDLL(None).inotify_init() < 0)",
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&probe.stdout).trim() != "True" {
            skip(&format!(
                "could not use up the inotify instances of user postgres (hog: {line})"
            ));
            return None;
        }
        Some(hog)
    }
}

impl Drop for InotifyHog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The lock goes with `_turn`, after the instances are free again.
    }
}

/// When inotify cannot be had at all, `run` keeps supervising and still re-syncs: on SIGHUP
/// and every `--resync-interval`. Runs as the OS user `postgres` (a non-root container).
#[test]
fn without_inotify_run_resyncs_on_sighup_and_on_the_interval() {
    if !is_root() {
        skip("without_inotify_run_resyncs_on_sighup_and_on_the_interval: needs root");
        return;
    }
    let pg = Pg::new();
    let chown_to_postgres = |path: &Path| {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "chown {}", path.display());
    };
    chown_to_postgres(pg.keys.path());
    chown_to_postgres(pg.state.path());
    let rotate = |value: &str| {
        pg.keys.write("postgres_app_user_pw", value);
        chown_to_postgres(&pg.keys.path().join("postgres_app_user_pw.txt"));
    };

    // `run` as postgres, in degraded mode: watching fails at start for want of inotify.
    let start = |interval: &str| {
        let inner = pg.command(Mode::Subreaper, &[], &["--resync-interval", interval], &[]);
        let mut cmd = as_server_user(shared_copy(BIN));
        cmd.env_clear().args(inner.get_args());
        for (key, value) in inner.get_envs() {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        let sup = Running::spawn_as(Mode::Subreaper, cmd);
        sup.wait_stderr(Duration::from_secs(120), COMPLETE);
        sup.wait_stderr(
            Duration::from_secs(10),
            "re-syncing on SIGHUP and every --resync-interval only",
        );
        sup
    };
    let stop = |sup: Running| {
        sup.signal(Signal::SIGINT);
        let out = sup.finish(Duration::from_secs(10)).expect_ok();
        assert_eq!(pg.cluster_state(), "shut down", "{}", out.describe());
        out
    };
    let Some(hog) = InotifyHog::take_all() else {
        return;
    };

    // No periodic resync: only the SIGHUP can apply this rotation.
    let sup = start("0");
    pg.assert_new_passwords();
    let by_sighup = unique("sighup pw");
    rotate(&by_sighup);
    sup.signal(Signal::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "SIGHUP to apply the rotation",
        || login_tcp(pg.port, "appuser", &by_sighup).is_ok(),
    );
    let first = stop(sup);

    // No SIGHUP: the periodic resync applies it.
    let sup = start("1s");
    let by_interval = unique("interval pw");
    rotate(&by_interval);
    wait_until(
        Duration::from_secs(15),
        "the periodic resync to apply the rotation",
        || login_tcp(pg.port, "appuser", &by_interval).is_ok(),
    );
    let second = stop(sup);
    drop(hog);

    let mut secrets = pg.secrets();
    secrets.extend([by_sighup.as_str(), by_interval.as_str()]);
    assert_no_leak(&secrets, None, &[&first, &second]);
}

impl Standby {
    /// `run` (as a subreaper) with `keys`, `state` and the run `options`, supervising the
    /// standby's postgres listening on TCP at `listen` (empty: the socket only).
    fn run_cmd(&self, keys: &Keys, state: &Path, options: &[&str], listen: &str) -> Command {
        let port = self.port.to_string();
        let mut cmd = Mode::Subreaper.bin();
        cmd.arg("run")
            .arg("--keys-dir")
            .arg(keys.path())
            .arg("--pgdata")
            .arg(&self.data)
            .arg("--pghost")
            .arg(&self.sock)
            .args(["--pgport", &port])
            .arg("--state-dir")
            .arg(state)
            .args(options)
            .arg("--");
        let postgres = as_server_user(pg_bin("postgres"));
        cmd.arg(postgres.get_program()).args(postgres.get_args());
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &port, "-c"])
            .arg(format!("listen_addresses={listen}"))
            .arg("-k")
            .arg(&self.sock);
        cmd
    }
}

/// A standby (hot standby of a harness primary): `run` treats `standby` as ready, skips the
/// sync and says so, keeps supervising, and stops it cleanly.
#[test]
fn a_standby_is_supervised_and_its_sync_skipped() {
    let primary = Cluster::start_default();
    let standby = Standby::of(&primary, "pps-standby-");
    let keys = Keys::new();
    keys.write_new(&DEFAULT_ROLES, "standby");
    let state = tempfile::tempdir().unwrap();
    let cmd = standby.run_cmd(&keys, state.path(), &[], "");
    let sup = Running::spawn_as(Mode::Subreaper, cmd);
    sup.wait_stderr(
        Duration::from_secs(60),
        "standby (in recovery): sync skipped",
    );
    let mut sup = sup;
    assert!(sup.is_running(), "run keeps supervising the standby");
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert!(!out.stderr.contains(" ERROR "), "{}", out.stderr);
}

/// `run` and its child, started with `run`'s stderr a pipe whose reader is gone; both are
/// killed if the test ends early.
struct ClosedStderr {
    outer: std::process::Child,
    /// The host pid of `run` (unshare's child in `Mode::Pid1`).
    pid: u32,
}

impl ClosedStderr {
    fn spawn(mode: Mode, mut cmd: Command) -> ClosedStderr {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let outer = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(writer)
            .spawn()
            .unwrap();
        // Our copy of the write end goes with `cmd`.
        drop(cmd);
        let mut started = ClosedStderr {
            pid: outer.id(),
            outer,
        };
        if mode == Mode::Pid1 {
            let outer = started.pid;
            wait_until(Duration::from_secs(10), "unshare's child", || {
                first_child(outer).is_some()
            });
            started.pid = first_child(outer).unwrap();
        }
        started
    }
}

impl Drop for ClosedStderr {
    fn drop(&mut self) {
        if self.outer.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = self.outer.kill();
            let _ = self.outer.wait();
        }
    }
}

/// A container whose log reader went away: every line `run` writes fails with EPIPE and
/// raises a SIGPIPE at `run` itself. That SIGPIPE is ours, not the child's (it is not
/// forwarded, while a SIGPIPE sent with `kill` is), and neither it nor the lost lines end
/// `run` while the child runs: it still exits with the child's code.
fn closed_stderr(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("signals.log");
    let script = dir.path().join("child.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\nf=\"$1\"\nnote() { echo \"$1\" >>\"$f\"; }\n\
         trap 'note USR1' USR1\ntrap 'note USR2' USR2\ntrap 'note PIPE' PIPE\nnote ready\n\
         while [ ! -e \"$f.stop\" ]; do sleep 0.05 & wait \"$!\"; done\nexit 7\n",
    )
    .unwrap();
    let lines = || log_lines(&log);
    let mut cmd = mode.bin();
    cmd.env("RUST_LOG", "debug")
        .args(["run", "--no-sync", "--", "bash"])
        .arg(&script)
        .arg(&log);
    let mut run = ClosedStderr::spawn(mode, cmd);
    wait_until(Duration::from_secs(10), "the child's traps", || {
        lines().first().map(String::as_str) == Some("ready")
    });
    // Each signal is logged ("forwarding"), and each of those lines raises our SIGPIPE
    // before the signal is forwarded; so when the child has USR2, the SIGPIPE of USR1's
    // line has long been handled.
    for (n, signal) in [Signal::SIGUSR1, Signal::SIGUSR2].into_iter().enumerate() {
        kill(Pid::from_raw(run.pid as i32), signal).unwrap();
        wait_until(Duration::from_secs(10), "the child's note", || {
            lines().len() > n + 1 || run.outer.try_wait().unwrap().is_some()
        });
        assert!(
            run.outer.try_wait().unwrap().is_none(),
            "run ended on a closed stderr: {:?}",
            lines()
        );
    }
    assert_eq!(
        lines(),
        ["ready", "USR1", "USR2"],
        "our SIGPIPE is not the child's"
    );
    // A SIGPIPE sent to `run` is still forwarded.
    kill(Pid::from_raw(run.pid as i32), Signal::SIGPIPE).unwrap();
    wait_until(Duration::from_secs(10), "the forwarded SIGPIPE", || {
        lines().len() > 3
    });
    std::fs::write(dir.path().join("signals.log.stop"), "").unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = run.outer.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "run did not exit"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(7), "the child's code");
    assert_eq!(lines(), ["ready", "USR1", "USR2", "PIPE"]);
}

both_modes!(
    closed_stderr =>
    a_closed_stderr_neither_ends_run_nor_sends_the_child_a_sigpipe_as_pid1,
    a_closed_stderr_neither_ends_run_nor_sends_the_child_a_sigpipe_as_subreaper
);

// ------------------------------------------------------- SIGHUP storms and failover

/// A SIGHUP storm: every signal is forwarded, but the resyncs merge (one running, at most
/// one waiting), so 1,000 SIGHUPs cost a handful of resyncs, not a queue of them.
#[test]
fn a_storm_of_a_thousand_sighups_costs_a_handful_of_resyncs() {
    let pg = Pg::new();
    let sup = pg.spawn(
        Mode::Subreaper,
        &[("RUST_LOG", "debug")],
        &["--resync-interval", "0"],
        &[],
    );
    sup.wait_stderr(Duration::from_secs(120), COMPLETE);
    sup.wait_stderr(Duration::from_secs(10), "watching 1 secret directory");
    let resyncs = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.contains("sync transaction done") && l.contains("resync request"))
            .count()
    };
    // Paced, so that each signal is received on its own (back-to-back signals would
    // merge in the kernel already): about a second and a half of SIGHUPs.
    let storm = std::time::Instant::now();
    for _ in 0..1_000 {
        sup.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_micros(1_500));
    }
    // One resync at once, then at most one a second while the storm lasts, and one for
    // the requests of its last second.
    let allowed = 2 + storm.elapsed().as_secs() as usize;
    // Until the resyncs stop coming: at least one, then none for three seconds (three
    // times the spacing of resyncs, so a deferred one is not missed).
    let mut last = (0, Instant::now());
    wait_until(Duration::from_secs(60), "the resyncs to end", || {
        let count = resyncs(&sup.stderr_so_far());
        if count != last.0 {
            last = (count, Instant::now());
        }
        count > 0 && last.1.elapsed() > Duration::from_secs(3)
    });
    let count = resyncs(&sup.stderr_so_far());
    assert!(
        (1..=allowed).contains(&count),
        "1,000 SIGHUPs cost {count} full resyncs (at most {allowed})"
    );
    pg.assert_new_passwords();
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert_no_leak(&pg.secrets(), None, &[&out]);
}

/// Failover: `run` supervises a hot standby of a harness primary (sync skipped, `health`
/// says standby); a rotation is written while it is a standby; the standby is promoted
/// (`pg_ctl promote`) and the new password logs in soon after, with the sync logged after
/// the promotion. The periodic resync is off: only the promotion can apply it. With
/// `watching` off (`--no-watch`) the promotion is still watched for.
fn rotation_on_a_standby_then_promotion(watching: bool) {
    let primary = Cluster::start_default();
    let olds = [unique("primary app"), unique("primary ro")];
    primary.create_roles(&[("appuser", &olds[0]), ("backupuser", &olds[1])]);
    primary.clear_log();
    let standby = Standby::of(&primary, "pps-promote-");
    let (data, port) = (&standby.data, standby.port);
    let keys = Keys::new();
    let secrets = keys.write_new(&DEFAULT_ROLES[..3], "standby");
    let state = tempfile::tempdir().unwrap();
    let mut options = vec!["--debounce", "20ms", "--resync-interval", "0"];
    if !watching {
        options.push("--no-watch");
    }
    let cmd = standby.run_cmd(&keys, state.path(), &options, "127.0.0.1");
    let health = || {
        let mut cmd = bin();
        cmd.arg("health")
            .arg("--pgdata")
            .arg(data)
            .arg("--keys-dir")
            .arg(keys.path())
            .arg("--state-dir")
            .arg(state.path());
        run(cmd)
    };
    let mut sup = Running::spawn_as(Mode::Subreaper, cmd);
    sup.wait_stderr(
        Duration::from_secs(60),
        "standby (in recovery): sync skipped",
    );
    if watching {
        sup.wait_stderr(Duration::from_secs(10), "watching the secret files");
    }
    let on_standby = health();

    // The rotation arrives while it is a standby: seen (when watching), skipped.
    let rotated = unique("rotated on the standby");
    keys.write("postgres_app_user_pw", &rotated);
    if watching {
        wait_until(Duration::from_secs(10), "the rotation to be seen", || {
            sup.stderr_so_far().matches("sync skipped").count() >= 2
        });
    }
    login_tcp(port, "appuser", &rotated).expect_err("a standby keeps the primary's passwords");
    login_tcp(port, "appuser", &olds[0]).expect("the primary's password works on the standby");
    let before_promotion = sup.stderr_so_far().len();

    standby.promote();
    // `pg_ctl promote` waits for the promotion; the 10 s bound is for liveness, the time to
    // the first login with the new password is printed (promised: within a second).
    let promoted = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the rotation to be in force after the promotion",
        || login_tcp(port, "appuser", &rotated).is_ok(),
    );
    eprintln!(
        "watching={watching}: new password in force {:?} after pg_ctl promote returned",
        promoted.elapsed()
    );
    login_tcp(port, "appuser", &olds[0]).expect_err("the old password is gone");
    for ((role, _), secret) in DEFAULT_ROLES[1..3].iter().zip(&secrets[1..]) {
        let secret = if *role == "appuser" { &rotated } else { secret };
        login_tcp(port, role, secret).unwrap_or_else(|e| panic!("{role}: {e}"));
    }
    // The report follows the COMMIT that the logins above already saw.
    wait_until(Duration::from_secs(10), "the sync to be reported", || {
        sup.stderr_so_far()[before_promotion..].contains("appuser\": changed")
    });
    let stderr = sup.stderr_so_far();
    let (standby_part, promoted_part) = stderr.split_at(before_promotion);
    assert!(
        !standby_part.contains("appuser\": changed"),
        "nothing was applied while it was a standby:\n{stderr}"
    );
    let promoted_at = promoted_part
        .find("no longer a standby")
        .unwrap_or_else(|| panic!("the promotion is logged:\n{stderr}"));
    let changed_at = promoted_part
        .find("appuser\": changed")
        .unwrap_or_else(|| panic!("the sync is logged:\n{stderr}"));
    assert!(
        promoted_at < changed_at,
        "the sync follows the promotion:\n{stderr}"
    );

    // `health` said standby before, and is healthy (no longer a standby) after.
    let on_standby = on_standby.expect_ok();
    on_standby.expect_stdout("standby");
    wait_until(
        Duration::from_secs(10),
        "health after the promotion",
        || {
            let h = health();
            h.code() == Some(0) && !h.stdout.contains("standby")
        },
    );

    assert!(sup.is_running());
    sup.signal(Signal::SIGINT);
    let out = sup.finish(Duration::from_secs(10)).expect_ok();
    assert!(!out.stderr.contains(" ERROR "), "{}", out.stderr);
    let mut all: Vec<&str> = secrets.iter().map(String::as_str).collect();
    all.push(&rotated);
    assert_no_leak(&all, Some(&primary), &[&out, &on_standby]);
}

#[test]
fn a_rotation_made_on_a_standby_is_applied_when_it_is_promoted() {
    rotation_on_a_standby_then_promotion(true);
}

#[test]
fn a_rotation_made_on_a_standby_is_applied_when_it_is_promoted_without_watching() {
    rotation_on_a_standby_then_promotion(false);
}

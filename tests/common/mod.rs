//! The one test harness: throwaway PostgreSQL clusters, the binary under test, leak checks.
//!
//! Every integration test drives the real binary (`CARGO_BIN_EXE_pg-password-sync`)
//! against a real PostgreSQL 15 server. A cluster is a copy of one template made by
//! `initdb` per test binary, with its own port, socket directory and log, configured
//! with `log_statement=all` so the leak checks have something to look at. Run as root
//! (as CI does), the server runs as the OS user `postgres` because PostgreSQL refuses
//! root; otherwise as the current user, mapped to the `postgres` role by `pg_ident`.
#![allow(dead_code)]

pub mod k8s;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pg-password-sync");

/// Directory of the PostgreSQL 15 server binaries.
pub fn pg_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PG_BINDIR").map_or_else(
        || PathBuf::from("/usr/lib/postgresql/15/bin"),
        PathBuf::from,
    );
    dir.join(name)
}

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

/// A throwaway directory the server's OS user can use (mode 0700, owned by it).
pub fn server_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_to_server(dir.path());
    dir
}

fn template() -> &'static Path {
    static TEMPLATE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = TEMPLATE.get_or_init(|| {
        let dir = server_dir("pps-template-");
        let data = dir.path().join("data");
        let out = as_server_user(pg_bin("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("running initdb (is postgresql-15 installed? scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "initdb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, data)
    });
    path
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

/// A free TCP port on the loopback (bound and released; the server binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Options for a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// Replace the default `pg_hba.conf`.
    pub hba: Option<String>,
}

/// A throwaway cluster: `data/`, `sock/`, `server.log` in one temp dir.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    running: bool,
}

impl Cluster {
    /// A configured cluster, not started.
    pub fn init(options: &ClusterOptions) -> Cluster {
        let root = server_dir("pps-cluster-");
        let data = root.path().join("data");
        let sock = root.path().join("sock");
        let status = as_server_user("cp")
            .arg("-a")
            .arg(template())
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success(), "copying the template cluster");
        let status = as_server_user("mkdir").arg(&sock).status().unwrap();
        assert!(status.success());
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             log_statement = 'all'\nlog_min_error_statement = 'error'\nlogging_collector = off\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\n\
             max_connections = 60\npassword_encryption = 'scram-sha-256'\n",
            sock.display()
        );
        for line in &options.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let hba = options.hba.clone().unwrap_or_else(|| {
            "local all postgres peer map=harness\n\
             local replication postgres peer map=harness\n\
             local all all scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
                .to_owned()
        });
        let ident = format!("harness {} postgres\n", server_os_user());
        write_as_server(&data.join("postgresql.auto.conf"), &conf);
        write_as_server(&data.join("pg_hba.conf"), &hba);
        write_as_server(&data.join("pg_ident.conf"), &ident);
        Cluster {
            log: root.path().join("server.log"),
            root,
            data,
            sock,
            port,
            running: false,
        }
    }

    /// A started cluster with the default options.
    pub fn start_default() -> Cluster {
        Cluster::start_with(&ClusterOptions::default())
    }

    pub fn start_with(options: &ClusterOptions) -> Cluster {
        let mut cluster = Cluster::init(options);
        cluster.start();
        cluster
    }

    /// `pg_ctl start -w`.
    pub fn start(&mut self) {
        let out = as_server_user(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        self.running = true;
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&mut self) {
        if self.running {
            let _ = as_server_user(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .output();
            self.running = false;
        }
    }

    /// Marks a cluster as started by someone else (e.g. `run`), so Drop stops it.
    pub fn set_running(&mut self, running: bool) {
        self.running = running;
    }

    /// Runs SQL as the superuser over the socket (peer) with psql; panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_output(sql);
        // The SQL is not shown: test setup passes passwords through here.
        assert!(
            out.status.success(),
            "psql failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn psql_output(&self, sql: &str) -> std::process::Output {
        // The SQL goes through stdin, not argv: tests pass role setup through here.
        let mut child = psql_superuser(&self.sock, self.port)
            .args(["-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Creates LOGIN roles with the given passwords (plaintext through psql's stdin: this
    /// is test setup, and leak checks only look for the *new* secrets).
    pub fn create_roles(&self, roles: &[(&str, &str)]) {
        let mut sql = String::new();
        for (role, password) in roles {
            let _ = writeln!(
                sql,
                "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN \
                 CREATE ROLE {id} LOGIN; END IF; END$$; ALTER ROLE {id} PASSWORD {pw};",
                id = quote_ident(role),
                lit = quote_literal(role),
                pw = quote_literal(password)
            );
        }
        self.psql(&sql);
    }

    /// The stored verifier of a role (None for NULL; panics when the role is absent).
    pub fn rolpassword(&self, role: &str) -> Option<String> {
        let out = self.psql(&format!(
            "SELECT coalesce(rolpassword, '<null>') FROM pg_authid WHERE rolname = {}",
            quote_literal(role)
        ));
        assert!(!out.is_empty(), "role {role} does not exist");
        (out != "<null>").then_some(out)
    }

    /// Logs in over TCP with SCRAM, in-process (no password in any argv or env).
    pub fn login(&self, role: &str, password: &str) -> Result<(), String> {
        login_tcp(self.port, role, password)
    }

    pub fn assert_login(&self, role: &str, password: &str) {
        if let Err(err) = self.login(role, password) {
            panic!(
                "login as {role} failed: {err}\nserver log:\n{}",
                self.log_tail(20)
            );
        }
    }

    pub fn assert_no_login(&self, role: &str, password: &str) {
        assert!(
            self.login(role, password).is_err(),
            "login as {role} unexpectedly worked"
        );
    }

    /// Empties the server log (the server appends, so it keeps writing at the new end).
    /// Called after test setup that itself sends a plaintext password, so the leak checks
    /// look only at what the code under test caused.
    pub fn clear_log(&self) {
        std::fs::File::options()
            .write(true)
            .open(&self.log)
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_text(), lines)
    }

    /// Arguments for the binary that point it at this cluster.
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "--pghost".into(),
            self.sock.display().to_string(),
            "--pgport".into(),
            self.port.to_string(),
            "--pgdata".into(),
            self.data.display().to_string(),
        ]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_server_user(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// psql as the superuser over the socket in `sock` (peer authentication as the server's
/// OS user), without reading any psqlrc.
pub fn psql_superuser(sock: &Path, port: u16) -> Command {
    let mut cmd = as_server_user(pg_bin("psql"));
    cmd.args(["-X", "-q", "-U", "postgres", "-d", "postgres", "-h"])
        .arg(sock)
        .args(["-p", &port.to_string()]);
    cmd
}

fn write_as_server(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    chown_to_server(path);
}

/// SQL identifier quoting for test setup.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQL literal quoting for test setup (standard_conforming_strings is on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Logs in over TCP to 127.0.0.1:`port`.
pub fn login_tcp(port: u16, role: &str, password: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user(role)
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Skips a test that cannot run on this machine, with the reason on stderr; under CI
/// (`CI` set, as `.ci/run` is run) a skip is a failure, so a runner that lost root or pid
/// namespaces cannot turn the PID-1 and root tests green without running them.
pub fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {reason}"
    );
    eprintln!("SKIP: {reason}");
}

/// A unique suffix so secrets of concurrently running tests never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// A directory of secret files (root-only when running as root, as Compose delivers them).
pub struct Keys {
    pub dir: tempfile::TempDir,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::Builder::new()
            .prefix("pps-keys-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Keys { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name.txt` (0600) with the value and a trailing newline, atomically.
    pub fn write(&self, name: &str, value: &str) {
        self.write_raw(&format!("{name}.txt"), format!("{value}\n").as_bytes());
    }

    pub fn write_raw(&self, file: &str, bytes: &[u8]) {
        let tmp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, self.path().join(file)).unwrap();
    }
}

/// The four default roles and the key file each reads.
pub const DEFAULT_ROLES: [(&str, &str); 4] = [
    ("postgres", "postgres_password"),
    ("appuser", "postgres_app_user_pw"),
    ("backupuser", "postgres_app_ro_pw"),
    ("temporaluser", "postgres_temporal_pw"),
];

/// A `Command` for the binary with a clean environment: only PATH and what the test adds,
/// so nothing from the developer's shell (PGHOST, KEYS_DIR, …) changes the outcome.
pub fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    cmd
}

/// `bin()` with the configuration for `cluster` and `keys` (four default roles).
pub fn bin_for(subcommand: &str, cluster: &Cluster, keys: &Keys) -> Command {
    let mut cmd = bin();
    cmd.arg(subcommand)
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(keys.path())
        .arg("--secrets-source-dir")
        .arg(keys.path().join("no-such-dir"))
        .args(["--temporal-db-user", "temporaluser"]);
    cmd
}

/// What a finished command did, plus every argv/environ seen of it and its descendants.
pub struct Run {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub proc_seen: Vec<String>,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Rich failure output: the command, its status, stdout, stderr (and a server log tail).
    pub fn describe(&self, cluster: Option<&Cluster>) -> String {
        let mut text = format!(
            "command: {}\nstatus: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        );
        if let Some(cluster) = cluster {
            let _ = write!(text, "\n--- server log tail\n{}", cluster.log_tail(25));
        }
        text
    }

    pub fn expect_code(&self, code: i32, cluster: Option<&Cluster>) -> &Run {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status\n{}",
            self.describe(cluster)
        );
        self
    }

    pub fn expect_ok(&self, cluster: Option<&Cluster>) -> &Run {
        self.expect_code(0, cluster)
    }

    /// Asserts that stdout contains `needle`, showing the whole record otherwise.
    pub fn expect_stdout(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "no {needle:?} on stdout\n{}",
            self.describe(None)
        );
        self
    }

    /// Asserts that stderr contains `needle`, showing the whole record otherwise.
    pub fn expect_stderr(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "no {needle:?} on stderr\n{}",
            self.describe(None)
        );
        self
    }
}

/// Runs a command to completion (see `Running::finish`), with a generous liveness bound.
pub fn run(cmd: Command) -> Run {
    Running::spawn(cmd).finish(Duration::from_secs(120))
}

fn drain(mut reader: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
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

/// argv and environment of a process, NULs shown as spaces.
pub fn proc_strings(pid: u32) -> Vec<String> {
    ["cmdline", "environ"]
        .iter()
        .filter_map(|f| std::fs::read(format!("/proc/{pid}/{f}")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}

/// argv and environment of every process on the machine right now.
pub fn all_proc_strings() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                out.extend(proc_strings(pid));
            }
        }
    }
    out
}

/// Asserts that none of `secrets` appears in the server log, in any run's stdout/stderr,
/// in the argv/environ sampled from those runs, or in any live process's argv/environ.
pub fn assert_no_leak(secrets: &[&str], cluster: Option<&Cluster>, runs: &[&Run]) {
    let mut places: Vec<(String, String)> = Vec::new();
    if let Some(cluster) = cluster {
        places.push(("server log".into(), cluster.log_text()));
    }
    for run in runs {
        places.push((format!("stdout of {}", run.command), run.stdout.clone()));
        places.push((format!("stderr of {}", run.command), run.stderr.clone()));
        for seen in &run.proc_seen {
            places.push((format!("a process of {}", run.command), seen.clone()));
        }
    }
    for seen in all_proc_strings() {
        places.push(("a live process's cmdline/environ".into(), seen));
    }
    for secret in secrets {
        assert!(!secret.is_empty());
        for (place, text) in &places {
            // Never print the text itself: it would put the secret in the test output.
            assert!(!text.contains(secret), "a secret leaked into {place}");
        }
    }
}

/// Polls `condition` every 5 ms until it holds or `limit` passes (a liveness bound).
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Spawns a long-running command with piped output collected in the background.
pub struct Running {
    pub child: Child,
    pub command: String,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    stderr_live: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let command = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = drain(child.stdout.take().unwrap());
        let live = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = live.clone();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            loop {
                match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            sink.lock().unwrap().clone()
        });
        Running {
            child,
            command,
            stdout: Some(stdout),
            stderr: Some(stderr),
            stderr_live: live,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the process has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr_live.lock().unwrap().clone()
    }

    /// Waits (bounded) for exit and returns the full record, sampling
    /// `/proc/<pid>/{cmdline,environ}` of the process and its descendants meanwhile.
    pub fn finish(mut self, limit: Duration) -> Run {
        let started = Instant::now();
        let mut seen = BTreeSet::new();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            for pid in descendants(self.child.id()) {
                seen.extend(proc_strings(pid));
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let status = self.child.wait().unwrap();
                let stderr = self.stderr.take().unwrap().join().unwrap();
                panic!(
                    "{} did not exit within {limit:?} ({status:?})\nstderr:\n{stderr}",
                    self.command
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        Run {
            command: self.command.clone(),
            status,
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
            proc_seen: seen.into_iter().collect(),
            elapsed: started.elapsed(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.stdout.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

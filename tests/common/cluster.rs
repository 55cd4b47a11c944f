//! Throwaway PostgreSQL clusters: one template made by `initdb` per test binary, copied for
//! each test, with its own port, socket directory and log, configured with
//! `log_statement=all` so the leak checks have something to look at. Run as root (as CI
//! does), the server runs as the OS user `postgres`; otherwise as the current user,
//! mapped to the `postgres` role by `pg_ident`.
//!
//! Every server binary and client comes from `PG_BINDIR` (default: PostgreSQL 15 from
//! Debian's packages), so the suite can run against another major version. Builds of
//! other origins put the socket in /tmp by default, so every server started here is told
//! its socket directory and every client is given `-h <socket directory>`.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::keys::Keys;
use super::process::{Run, bin, mask_password_literals, run};
use super::tail;
use super::users::{as_server_user, server_dir, server_os_user, write_as_server};

/// Where the PostgreSQL server binaries are: `PG_BINDIR`, by default
/// /usr/lib/postgresql/15/bin.
pub fn pg_bindir() -> PathBuf {
    std::env::var_os("PG_BINDIR").map_or_else(
        || PathBuf::from("/usr/lib/postgresql/15/bin"),
        PathBuf::from,
    )
}

/// A PostgreSQL program (`initdb`, `pg_ctl`, `psql`, …) from `pg_bindir()`.
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bindir().join(name)
}

/// The major version of the server under test (from `postgres --version`), for the tests
/// of what differs between majors (`scram_iterations` exists from 16 on, say).
pub fn pg_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new(pg_bin("postgres"))
            .arg("--version")
            .output()
            .expect("running postgres --version");
        // "postgres (PostgreSQL) 16.2", Debian's with " (Debian …)" after it.
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no major version in {text:?}"))
    })
}

/// The template cluster (initdb once per test binary; it needs no socket).
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
            .unwrap_or_else(|e| {
                panic!(
                    "running {} ({e}; is PostgreSQL installed? scripts/test.sh installs it)",
                    pg_bin("initdb").display()
                )
            });
        assert!(
            out.status.success(),
            "initdb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, data)
    });
    path
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
        // The socket directory is set explicitly: builds other than Debian's default to
        // /tmp, shared by every cluster of the run.
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
            self.pg_ctl_stop("fast");
            self.running = false;
        }
    }

    /// `pg_ctl stop -m MODE`, waiting; its outcome is seen by whoever needs the server
    /// gone (a stop of a server that already exited fails, and that is fine).
    fn pg_ctl_stop(&self, mode: &str) {
        let _ = as_server_user(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"])
            .output();
    }

    /// Marks a cluster as started by someone else (e.g. `run`), so Drop stops it.
    pub fn set_running(&mut self, running: bool) {
        self.running = running;
    }

    /// Runs SQL as the superuser over the socket (peer) with psql; panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// `psql` in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = self.psql_output_in(db, sql);
        // The SQL is not shown: test setup passes passwords through here (and psql's error
        // may quote the statement, so its password literals are masked too).
        assert!(
            out.status.success(),
            "psql failed:\n{}",
            mask_password_literals(&String::from_utf8_lossy(&out.stderr))
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn psql_output(&self, sql: &str) -> std::process::Output {
        self.psql_output_in("postgres", sql)
    }

    /// `psql_output` in database `db` (psql takes the last `-d`).
    pub fn psql_output_in(&self, db: &str, sql: &str) -> std::process::Output {
        psql_stdin(&self.sock, self.port, db, sql)
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

    /// Creates LOGIN `roles` on throwaway passwords (plaintext through psql: setup), then
    /// empties the server log so the leak checks see only what the binary caused.
    pub fn create_throwaway_roles<'a>(&self, roles: impl IntoIterator<Item = &'a str>) {
        let roles: Vec<(&str, String)> = roles
            .into_iter()
            .map(|role| (role, super::unique("throwaway")))
            .collect();
        let pairs: Vec<(&str, &str)> = roles.iter().map(|(r, p)| (*r, p.as_str())).collect();
        self.create_roles(&pairs);
        self.clear_log();
    }

    /// Creates `appdb`, owned by the application login `appuser` (which must exist), and
    /// returns its name: a binary pointed at the application's database (`PGDATABASE`, as
    /// is common) connects where that login may attach settings and plant functions.
    pub fn app_owned_database(&self) -> &'static str {
        self.psql("CREATE DATABASE appdb OWNER appuser");
        "appdb"
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
        mask_password_literals(&tail(&self.log_text(), lines))
    }

    /// Runs `cmd` to completion; failures show this server's log tail too.
    pub fn run(&self, cmd: Command) -> Run {
        run(cmd).with_server_log(&self.log)
    }

    /// Arguments for the binary that point it at this cluster.
    pub fn conn_args(&self) -> Vec<String> {
        conn_args(&self.sock, self.port, &self.data)
    }

    /// `watch` on this cluster with the secrets of `keys` only (no source directory),
    /// its state file in `state`, and a 50 ms quiet period; the caller adds the rest.
    pub fn watch_command(&self, keys: &Path, state: &Path) -> Command {
        let mut watch = bin();
        watch
            .arg("watch")
            .args(self.conn_args())
            .arg("--keys-dir")
            .arg(keys)
            .arg("--secrets-source-dir")
            .arg(state.join("none"))
            .args(["--debounce", "50ms"])
            .arg("--state-dir")
            .arg(state);
        watch
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            self.pg_ctl_stop("immediate");
        }
    }
}

/// Arguments for the binary that point it at the server on socket directory `sock`, `port`,
/// with data directory `data`.
pub fn conn_args(sock: &Path, port: u16, data: &Path) -> Vec<String> {
    vec![
        "--pghost".into(),
        sock.display().to_string(),
        "--pgport".into(),
        port.to_string(),
        "--pgdata".into(),
        data.display().to_string(),
    ]
}

/// psql as the superuser on the server at `sock`/`port`, database `db`, running `sql` sent
/// through stdin (never argv: tests pass role setup through here); unaligned, tuples only,
/// stopping at the first error.
pub fn psql_stdin(sock: &Path, port: u16, db: &str, sql: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = psql_superuser(sock, port)
        .args(["-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
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

/// SQL identifier quoting for test setup.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQL literal quoting for test setup (standard_conforming_strings is on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Runs `future` to completion on a current-thread runtime of its own: the tests are
/// synchronous, the PostgreSQL client is not.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The client settings of a password login as `role` over TCP to 127.0.0.1:`port`,
/// database `postgres`, with a bounded connect.
pub fn tcp_login_config(port: u16, role: &str, password: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(role)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    config
}

/// Logs in over TCP to 127.0.0.1:`port`.
pub fn login_tcp(port: u16, role: &str, password: &str) -> Result<(), String> {
    block_on(async {
        let (client, connection) = tcp_login_config(port, role, password)
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

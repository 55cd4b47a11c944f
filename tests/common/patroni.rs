//! Patroni clusters for the cluster tests (`tests/clusters.rs`): one etcd and N Patroni
//! nodes (Debian's `etcd-server` and `patroni`, installed by scripts/test.sh), every one
//! on the loopback with its own ports (PostgreSQL, Patroni's REST API, etcd's client and
//! peer ports), its own socket directory and data directory, in one temp dir of the
//! server's OS user. Run as root, etcd, Patroni and PostgreSQL run as `postgres`.
//!
//! Patroni's configuration is the least that makes a cluster fail over fast: a short
//! leader TTL and loop, `pg_rewind` on (a rejoining old leader rewinds as the superuser:
//! no separate rewind role, so the superuser's password is what it needs), a replication
//! role, `pg_hba.conf` with SCRAM for 127.0.0.1 and peer for the superuser on the socket
//! (what a sidecar uses), and every statement logged, for the leak checks. Each node's
//! log holds Patroni's lines and its PostgreSQL's (the server logs to Patroni's stderr).
//!
//! Everything started here stops when the cluster is dropped: Patroni first (so that it
//! restarts nothing), then each server with an immediate stop, then whatever still names
//! the cluster's directory (a Patroni left by a test's `run`), then etcd.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;

/// Patroni's leader TTL, loop and retry timeout: a failed leader's key expires within
/// `TTL`, and a replica takes over in the loop after.
const TTL: u32 = 5;
const LOOP_WAIT: u32 = 1;
const RETRY_TIMEOUT: u32 = 2;

/// Liveness bound for a cluster to come up, a leader to be elected, a node to rejoin.
pub const CLUSTER_LIMIT: Duration = Duration::from_secs(90);

/// The replication role Patroni creates at bootstrap.
pub const REPLICATION_ROLE: &str = "replicator";

/// One etcd member on the loopback.
pub struct Etcd {
    pub client_port: u16,
    child: Child,
}

impl Etcd {
    fn start(root: &Path) -> Etcd {
        let (client_port, peer_port) = (free_port(), free_port());
        let dir = root.join("etcd");
        assert!(
            as_server_user("mkdir")
                .arg(&dir)
                .status()
                .unwrap()
                .success(),
            "making etcd's directory"
        );
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(root.join("etcd.log")).unwrap();
        let child = as_server_user("etcd")
            .args(["--name", "pps", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("pps={peer}")])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (scripts/test.sh installs etcd-server)");
        let etcd = Etcd { client_port, child };
        wait_until(Duration::from_secs(30), "etcd to answer", || {
            http(client_port, "GET", "/health", None)
                .is_some_and(|(code, body)| code == 200 && body.contains("true"))
        });
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Patroni node.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    /// PostgreSQL's port.
    pub port: u16,
    /// Patroni's REST API port.
    pub api_port: u16,
    /// Patroni's configuration file.
    pub config: PathBuf,
    /// Patroni's log, with its server's.
    pub log: PathBuf,
    patroni: Option<Child>,
}

impl Node {
    /// Patroni's command line for this node, run as the server's OS user (`setpriv` and
    /// `env` exec in place, so the pid is Patroni's): what a test's `run -- …` starts. It
    /// runs in the node's directory: Patroni's bootstrap enters its working directory
    /// again, and the test's (a checkout in a `mktemp -d` directory, say) may be closed to
    /// the server's OS user.
    pub fn patroni_command(&self) -> Vec<String> {
        let mut argv = Vec::new();
        if is_root() {
            argv.extend(
                [
                    "setpriv",
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ]
                .map(str::to_owned),
            );
        }
        let dir = self.config.parent().expect("the node's directory");
        argv.extend(["env".to_owned(), "-C".to_owned(), dir.display().to_string()]);
        argv.push("patroni".to_owned());
        argv.push(self.config.display().to_string());
        argv
    }

    /// Starts Patroni (appending to its log).
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let argv = self.patroni_command();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting patroni (scripts/test.sh installs it)");
        self.patroni = Some(child);
    }

    /// The node fails: Patroni and its postmaster are killed (SIGKILL), as when its
    /// machine dies. The server's other processes end when they see the postmaster gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.patroni.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.postmaster_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// The pid `postmaster.pid` names while that process lives and is this node's server
    /// (its command line names the data directory): a server that ran in another pid
    /// namespace (under `run` as PID 1) left a pid that means something else here.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&self.data.display().to_string())
            .then_some(pid)
    }

    /// The first line of `postmaster.pid` (a pid in the server's own pid namespace).
    pub fn postmaster_pid_line(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next().map(str::to_owned)
    }

    /// Whether Patroni says this node holds the leader key.
    pub fn is_leader(&self) -> bool {
        http(self.api_port, "GET", "/leader", None).is_some_and(|(code, _)| code == 200)
    }

    /// Whether Patroni says this node runs as a replica.
    pub fn is_replica(&self) -> bool {
        http(self.api_port, "GET", "/replica", None).is_some_and(|(code, _)| code == 200)
    }

    /// psql as the superuser over the socket (peer); panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_output(sql);
        assert!(
            out.status.success(),
            "psql on {} failed:\n{}",
            self.name,
            mask_password_literals(&String::from_utf8_lossy(&out.stderr))
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn psql_output(&self, sql: &str) -> std::process::Output {
        psql_stdin(&self.sock, self.port, "postgres", sql)
    }

    /// Logs in over TCP with SCRAM, in-process.
    pub fn login(&self, role: &str, password: &str) -> Result<(), String> {
        login_tcp(self.port, role, password)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's log lines (Patroni's own lines start with a date and a comma).
    pub fn server_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| !is_patroni_line(l))
            .map(str::to_owned)
            .collect()
    }

    /// Arguments that point the binary at this node's server over its socket.
    pub fn conn_args(&self) -> Vec<String> {
        conn_args(&self.sock, self.port, &self.data)
    }
}

impl Node {
    /// The statements `application` sent to this node while it was a replica, from its
    /// server log (simple and extended protocol alike): a replica starts with "entering standby mode" (a clone's first start, a
    /// demotion, a rejoin) and stops being one at "selected new timeline ID" (its
    /// promotion). A node that bootstrapped the cluster starts as the primary.
    pub fn statements_while_replica(&self, application: &str) -> Vec<String> {
        let tag = format!("] {application}: ");
        let mut replica = false;
        let mut found = Vec::new();
        for line in self.server_lines() {
            if line.contains("entering standby mode") {
                replica = true;
            } else if line.contains("selected new timeline ID") {
                replica = false;
            } else if replica
                && line.contains(&tag)
                && (line.contains("LOG:  statement: ") || line.contains("LOG:  execute "))
            {
                found.push(line);
            }
        }
        found
    }
}

/// Patroni's own log lines: `2026-01-01 00:00:00,123 INFO: …`.
fn is_patroni_line(line: &str) -> bool {
    line.len() > 24 && line.as_bytes()[19] == b',' && line.as_bytes()[4] == b'-'
}

/// A Patroni cluster on one etcd.
pub struct PatroniCluster {
    pub root: tempfile::TempDir,
    pub scope: String,
    pub nodes: Vec<Node>,
    superuser_password: String,
    etcd: Option<Etcd>,
}

impl PatroniCluster {
    /// `n` nodes configured (Patroni not started) with `superuser_password` for the
    /// superuser Patroni creates and logs in as.
    pub fn new(n: usize, superuser_password: &str) -> PatroniCluster {
        let root = server_dir("pps-patroni-");
        let scope = unique("pps").replace('-', "_");
        let etcd = Etcd::start(root.path());
        let replication_password = unique("replication");
        let nodes = (1..=n)
            .map(|i| {
                node(
                    root.path(),
                    &scope,
                    &format!("node{i}"),
                    etcd.client_port,
                    superuser_password,
                    &replication_password,
                )
            })
            .collect();
        PatroniCluster {
            root,
            scope,
            nodes,
            superuser_password: superuser_password.to_owned(),
            etcd: Some(etcd),
        }
    }

    /// `new`, every node started, and `wait_ready`.
    pub fn start(n: usize, superuser_password: &str) -> PatroniCluster {
        let mut cluster = PatroniCluster::new(n, superuser_password);
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster.wait_ready();
        cluster
    }

    /// The superuser's password, as Patroni's configuration holds it.
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// Waits until one node leads and every other one runs as a replica that streams
    /// from it.
    pub fn wait_ready(&self) {
        let started = Instant::now();
        let leader = self.wait_leader(None);
        wait_until(CLUSTER_LIMIT, "every replica to stream", || {
            self.nodes
                .iter()
                .enumerate()
                .all(|(i, node)| i == leader || (node.is_replica() && streams(node)))
        });
        eprintln!(
            "patroni: {} node(s) up, {} leads, after {:?}",
            self.nodes.len(),
            self.nodes[leader].name,
            started.elapsed()
        );
    }

    /// The index of the node that leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(Node::is_leader)
    }

    /// Waits for a leader other than `not` and returns its index.
    pub fn wait_leader(&self, not: Option<usize>) -> usize {
        let mut found = None;
        wait_until(CLUSTER_LIMIT, "a leader", || {
            found = self.leader().filter(|&i| Some(i) != not);
            found.is_some()
        });
        found.unwrap()
    }

    /// A switchover from the leader `from` to `to` through Patroni's REST API; returns
    /// once Patroni says it is done.
    pub fn switchover(&self, from: usize, to: usize) {
        let body = format!(
            "{{\"leader\": \"{}\", \"candidate\": \"{}\"}}",
            self.nodes[from].name, self.nodes[to].name
        );
        let answer = http(
            self.nodes[from].api_port,
            "POST",
            "/switchover",
            Some(&body),
        );
        assert!(
            answer.as_ref().is_some_and(|(code, _)| *code == 200),
            "switchover {} -> {}: {answer:?}",
            self.nodes[from].name,
            self.nodes[to].name
        );
    }

    /// Restarts the server of node `i` through Patroni (a new postmaster pid).
    pub fn restart(&self, i: usize) {
        let answer = http(self.nodes[i].api_port, "POST", "/restart", Some("{}"));
        assert!(
            answer.as_ref().is_some_and(|(code, _)| *code == 200),
            "restart of {}: {answer:?}",
            self.nodes[i].name
        );
    }

    /// `host,host,…` and `port,port,…` of every node, as libpq's multi-host form.
    pub fn host_list(&self) -> (String, String) {
        let hosts: Vec<&str> = self.nodes.iter().map(|_| "127.0.0.1").collect();
        let ports: Vec<String> = self.nodes.iter().map(|n| n.port.to_string()).collect();
        (hosts.join(","), ports.join(","))
    }

    /// Every node's log (Patroni's and its server's lines), with where it comes from.
    pub fn logs(&self) -> Vec<(String, String)> {
        let mut logs: Vec<(String, String)> = self
            .nodes
            .iter()
            .map(|n| (format!("{}'s Patroni and server log", n.name), n.log_text()))
            .collect();
        logs.push((
            "etcd's log".into(),
            std::fs::read_to_string(self.root.path().join("etcd.log")).unwrap_or_default(),
        ));
        logs
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.patroni.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // A Patroni a test started under `run` is its own; whatever is left that names
        // this cluster's directory goes before the servers are stopped.
        kill_patronis_under(self.root.path());
        for node in &self.nodes {
            // pg_ctl signals the pid of postmaster.pid: only when it is this server's.
            if node.postmaster_pid().is_some() {
                let _ = as_server_user(pg_bin("pg_ctl"))
                    .arg("-D")
                    .arg(&node.data)
                    .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                    .output();
            }
        }
        self.etcd.take();
    }
}

/// SIGKILL to every Patroni whose command line names a file under `root` (by pid, found
/// in `/proc`): a Patroni that a test's `run` started and that outlived it.
fn kill_patronis_under(root: &Path) {
    let root = root.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("patroni") && cmdline.contains(&root) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Whether a replica's WAL receiver streams.
pub fn streams(node: &Node) -> bool {
    let out = node.psql_output("SELECT status FROM pg_stat_wal_receiver");
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "streaming"
}

/// Writes node `name`'s directories and Patroni configuration (0600: it holds the
/// superuser's and the replication role's passwords).
fn node(
    root: &Path,
    scope: &str,
    name: &str,
    etcd_port: u16,
    superuser_password: &str,
    replication_password: &str,
) -> Node {
    let dir = root.join(name);
    let sock = dir.join("sock");
    for d in [&dir, &sock] {
        assert!(as_server_user("mkdir").arg(d).status().unwrap().success());
    }
    let node = Node {
        name: name.to_owned(),
        log: dir.join("patroni.log"),
        config: dir.join("patroni.yml"),
        data: dir.join("data"),
        dir,
        sock,
        port: free_port(),
        api_port: free_port(),
        patroni: None,
    };
    let yaml = patroni_yaml(&node, scope, etcd_port)
        .replace("{superuser_password}", superuser_password)
        .replace("{replication_password}", replication_password);
    write_as_server(&node.config, &yaml);
    std::fs::set_permissions(
        &node.config,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    node
}

/// Patroni's configuration of `node`, with `{superuser_password}` and
/// `{replication_password}` left for the caller to fill in.
fn patroni_yaml(node: &Node, scope: &str, etcd_port: u16) -> String {
    format!(
        "scope: {scope}
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: {LOOP_WAIT}
    retry_timeout: {RETRY_TIMEOUT}
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 60
  initdb:
    - encoding: UTF8
    - locale: C
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {bin_dir}
  pgpass: {pgpass}
  authentication:
    superuser:
      username: postgres
      password: '{{superuser_password}}'
    replication:
      username: {REPLICATION_ROLE}
      password: '{{replication_password}}'
  parameters:
    unix_socket_directories: '{sock}'
    password_encryption: scram-sha-256
    log_statement: all
    log_line_prefix: '%m [%p] %a: '
    log_min_error_statement: error
    logging_collector: 'off'
    fsync: 'off'
    synchronous_commit: 'off'
    full_page_writes: 'on'
    shared_buffers: 16MB
  pg_hba:
    - local all postgres peer map=harness
    - host all all 127.0.0.1/32 scram-sha-256
    - host replication {REPLICATION_ROLE} 127.0.0.1/32 scram-sha-256
  pg_ident:
    - harness {os_user} postgres
",
        name = node.name,
        api_port = node.api_port,
        port = node.port,
        data = node.data.display(),
        bin_dir = pg_bindir().display(),
        pgpass = node.dir.join("pgpass").display(),
        sock = node.sock.display(),
        os_user = server_os_user(),
    )
}

/// One HTTP/1.0 request to 127.0.0.1:`port` (Patroni's REST API, etcd): the status code
/// and the body, or `None` when nothing answered in time.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    // A switchover answers once it is done.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let code = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Some((code, body))
}

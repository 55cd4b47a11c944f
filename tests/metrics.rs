//! The metrics (`--metrics-listen`, `--metrics-file`) and `status` against their real
//! consumers and real servers: `promtool check metrics` (Debian's `prometheus` package)
//! on the listener's answer and on the file, a Prometheus server on the loopback scraping
//! a `watch` sidecar through a staged rotation, clients that hold the listener's
//! connections or send a request byte by byte while a SIGTERM is forwarded and a rotation
//! is applied, `status` as a table and as JSON, and no listener unless one is asked for.
//!
//! Every wait is a poll for the observable outcome under a generous liveness bound. The
//! two delays the attack test measures are printed; what it asserts is that both happen
//! while the attack goes on, well inside the time the attack lasts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::session::Session;
use crate::common::*;
use nix::sys::signal::Signal;

/// Liveness bound for anything a watcher, the server or Prometheus must get to.
const LIMIT: Duration = Duration::from_secs(60);

/// The overlapped roles of these tests and their password files.
const ROLES: [(&str, &str); 2] = [
    ("appuser", "postgres_app_user_pw"),
    ("backupuser", "postgres_app_ro_pw"),
];

/// Every family the exposition must hold from the start (overlap mode).
const FAMILIES: [&str; 15] = [
    "pg_password_sync_build_info",
    "pg_password_sync_server_ready",
    "pg_password_sync_server_standby",
    "pg_password_sync_last_sync_attempt_timestamp_seconds",
    "pg_password_sync_last_sync_success_timestamp_seconds",
    "pg_password_sync_syncs_total",
    "pg_password_sync_password_changes_total",
    "pg_password_sync_sync_failures_total",
    "pg_password_sync_file_event_to_commit_seconds",
    "pg_password_sync_blocking_sessions_total",
    "pg_password_sync_drift_restored_total",
    "pg_password_sync_login_published",
    "pg_password_sync_login_valid_until_timestamp_seconds",
    "pg_password_sync_login_sessions",
    "pg_password_sync_stage_pending",
];

// ---- the overlap setup ------------------------------------------------------------------

fn twin_file(file: &str) -> String {
    format!("{}_alt_pw", file.strip_suffix("_pw").unwrap())
}

/// A cluster with the two roles, keys for every role and twin, `pg_service.conf`
/// publishing each role's own login.
struct Setup {
    cluster: Cluster,
    keys: Keys,
    /// (login, password) of every login.
    pw: Vec<(String, String)>,
    state: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let cluster = Cluster::start_default();
        cluster.create_throwaway_roles(ROLES.map(|(role, _)| role));
        let keys = Keys::new();
        let mut pw = Vec::new();
        for (role, file) in ROLES {
            let role_pw = unique(&format!("{role} metrics pw"));
            let twin_pw = unique(&format!("{role} metrics twin"));
            keys.write(file, &role_pw);
            keys.write(&twin_file(file), &twin_pw);
            pw.push((role.to_owned(), role_pw));
            pw.push((format!("{role}_alt"), twin_pw));
        }
        let setup = Setup {
            cluster,
            keys,
            pw,
            state: tempfile::tempdir().unwrap(),
        };
        setup.publish(&[("appuser", "appuser"), ("backupuser", "backupuser")]);
        setup
    }

    fn get(&self, login: &str) -> String {
        self.pw.iter().find(|(l, _)| l == login).unwrap().1.clone()
    }

    /// Writes `pg_service.conf` publishing, per role, `login` with its password.
    fn publish(&self, logins: &[(&str, &str)]) {
        let mut text = String::from("# test\n");
        for (role, login) in logins {
            text.push_str(&format!(
                "\n[{role}]\nuser={login}\npassword={}\nhost=127.0.0.1\n",
                self.get(login)
            ));
        }
        self.keys.write_raw("pg_service.conf", text.as_bytes());
    }

    /// A new password in the file of appuser's twin (what `rotate` stages).
    fn stage_twin(&mut self) -> String {
        let value = unique("appuser_alt staged");
        self.keys.write(&twin_file("postgres_app_user_pw"), &value);
        self.pw
            .iter_mut()
            .find(|(l, _)| l == "appuser_alt")
            .unwrap()
            .1 = value.clone();
        value
    }

    fn secrets(&self) -> Vec<String> {
        self.pw.iter().map(|(_, p)| p.clone()).collect()
    }

    /// A command of the binary for this setup (overlap mode, its keys and state dir).
    fn command(&self, sub: &str, extra: &[&str]) -> Command {
        let mut cmd = bin();
        cmd.arg(sub)
            .args(self.cluster.conn_args())
            .arg("--keys-dir")
            .arg(self.keys.path())
            .arg("--secrets-source-dir")
            .arg(self.keys.path().join("no-such-dir"))
            .arg("--overlap")
            .arg("--state-dir")
            .arg(self.state.path());
        // The superuser stays out of the role map: it keeps peer access over the socket.
        for (role, file) in ROLES {
            cmd.arg("--role").arg(format!("{role}={file}"));
        }
        cmd.args(extra);
        cmd
    }

    /// `watch --overlap` on this setup, waiting until its first sync is in force.
    fn watch(&self, extra: &[&str]) -> Running {
        let mut args = vec!["--debounce", "50ms", "--grace", "10m"];
        args.extend_from_slice(extra);
        let running =
            Running::spawn(self.command("watch", &args)).with_server_log(&self.cluster.log);
        let (login, pw) = ("appuser", self.get("appuser"));
        wait_until(LIMIT, "the first sync", || {
            self.cluster.login(login, &pw).is_ok()
        });
        running.wait_stderr(LIMIT, "watching");
        running
    }
}

// ---- HTTP, the listener and Prometheus ---------------------------------------------------

/// One HTTP/1.1 GET to 127.0.0.1:`port` (connection closed by the server): status code
/// and body.
fn http_get(port: u16, target: &str) -> Result<(u16, String), String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connecting: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("reading: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of the head")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok((code, body.to_owned()))
}

/// The listener's answer to GET /metrics, once it answers.
fn scrape(port: u16) -> String {
    let mut body = String::new();
    wait_until(LIMIT, "the metrics listener", || {
        match http_get(port, "/metrics") {
            Ok((200, text)) => {
                body = text;
                true
            }
            _ => false,
        }
    });
    body
}

/// The value of the one sample of `series` (a name with its labels, as written) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// `promtool check metrics` on `text` (stdin): its exit status and output.
fn promtool_check(text: &[u8]) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool (scripts/test.sh installs Debian's prometheus package)");
    child.stdin.take().unwrap().write_all(text).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A Prometheus server on the loopback scraping `target` every second, with a temp
/// config and data directory; stopped (SIGTERM, bounded) on drop.
struct Prometheus {
    running: Option<Running>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: pg-password-sync\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let prometheus = Prometheus {
            running: Some(Running::spawn(cmd)),
            port,
            _dir: dir,
        };
        wait_until(LIMIT, "Prometheus to be ready", || {
            matches!(http_get(port, "/-/ready"), Ok((200, _)))
        });
        prometheus
    }

    /// The samples of an instant PromQL query: (labels, value) each.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let (code, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .unwrap_or_else(|e| panic!("querying Prometheus: {e}"));
        assert_eq!(code, 200, "query {promql:?}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        answer["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that must have exactly one sample, once it has one.
    fn wait_value(&self, what: &str, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut value = f64::NAN;
        wait_until(LIMIT, what, || match self.query(promql).as_slice() {
            [(_, v)] if ok(*v) => {
                value = *v;
                true
            }
            _ => false,
        });
        value
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.signal(Signal::SIGTERM);
            let _ = running.finish(Duration::from_secs(60));
        }
    }
}

/// Percent-encoding of a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---- the tests ---------------------------------------------------------------------------

#[test]
fn the_listener_and_the_file_hold_every_series_from_the_start_and_pass_promtool() {
    let setup = Setup::new();
    let port = free_port();
    let file = setup.state.path().join("pg_password_sync.prom");
    let listen = format!("127.0.0.1:{port}");
    let watcher = setup.watch(&[
        "--metrics-listen",
        &listen,
        "--metrics-file",
        file.to_str().unwrap(),
    ]);
    let served = scrape(port);
    let written = std::fs::read_to_string(&file).unwrap();
    for (what, text) in [("the listener's answer", &served), ("the file", &written)] {
        let (ok, said) = promtool_check(text.as_bytes());
        assert!(ok, "promtool check metrics refused {what}:\n{said}\n{text}");
        for family in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "no {family} in {what}:\n{text}"
            );
        }
        for series in [
            "pg_password_sync_syncs_total{result=\"failure\",trigger=\"promotion\"}",
            "pg_password_sync_sync_failures_total{class=\"lock\"}",
            "pg_password_sync_login_sessions{login=\"backupuser_alt\",role=\"backupuser\"}",
        ] {
            assert_eq!(
                sample(text, series),
                Some(0.0),
                "{series} in {what}:\n{text}"
            );
        }
        let start = "pg_password_sync_syncs_total{result=\"success\",trigger=\"start\"}";
        assert!(
            sample(text, start).is_some_and(|v| v >= 1.0),
            "{what}:\n{text}"
        );
        for secret in setup.secrets() {
            assert!(!text.contains(&secret), "a password appears in {what}");
        }
    }
    // The series of the server's logins arrive with their first read.
    wait_until(LIMIT, "the logins read into the file", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let series = "pg_password_sync_login_valid_until_timestamp_seconds{login=\"appuser\",role=\"appuser\"}";
        sample(&text, series) == Some(f64::INFINITY)
    });
    let (ok, said) = promtool_check(&std::fs::read(&file).unwrap());
    assert!(
        ok,
        "promtool check metrics refused the file with +Inf:\n{said}"
    );
    assert_eq!(http_get(port, "/").map(|(c, _)| c), Ok(404));
    drop(watcher);
}

#[test]
fn a_prometheus_server_sees_a_rotation_move_its_counter_and_timestamp_and_the_retiring_sessions() {
    let mut setup = Setup::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let watcher = setup.watch(&["--metrics-listen", &listen]);
    let prometheus = Prometheus::start(port);
    let changes = "pg_password_sync_password_changes_total{role=\"appuser_alt\"}";
    let success = "pg_password_sync_last_sync_success_timestamp_seconds";
    let before = prometheus.wait_value("the first scrape", changes, |v| v >= 1.0);
    let synced_at = prometheus.wait_value("the first sync's time", success, |v| v > 0.0);
    // An application session on the login about to retire.
    let session = Session::connect(setup.cluster.port, "appuser", &setup.get("appuser"));

    let staged = setup.stage_twin();
    wait_until(LIMIT, "the staged twin to log in", || {
        setup.cluster.login("appuser_alt", &staged).is_ok()
    });
    prometheus.wait_value(
        "the pending stage",
        "pg_password_sync_stage_pending{role=\"appuser\"}",
        |v| v == 1.0,
    );
    setup.publish(&[("appuser", "appuser_alt"), ("backupuser", "backupuser")]);
    prometheus.wait_value(
        "the published twin",
        "pg_password_sync_login_published{login=\"appuser_alt\"}",
        |v| v == 1.0,
    );
    prometheus.wait_value("the rotation's counter", changes, |v| v > before);
    prometheus.wait_value("the rotation's timestamp", success, |v| v > synced_at);
    let retiring = "pg_password_sync_login_sessions{login=\"appuser\"} \
                    and on (role, login) pg_password_sync_login_published == 0 \
                    and on (role, login) \
                        (pg_password_sync_login_valid_until_timestamp_seconds - time()) > 0";
    prometheus.wait_value("the retiring login's session", retiring, |v| v >= 1.0);
    prometheus.wait_value(
        "no stage pending any more",
        "pg_password_sync_stage_pending{role=\"appuser\"}",
        |v| v == 0.0,
    );
    assert!(
        session.alive(),
        "the retiring login keeps its session during its grace"
    );
    drop(prometheus);
    watcher.signal(Signal::SIGTERM);
    let run = watcher.finish(LIMIT).expect_ok();
    let secrets = setup.secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak(&secrets, None, &[&run]);
}

/// Clients that hold the listener: `idle` connections that never send (reopened when the
/// listener closes them) and one request sent a byte every 50 ms (resent when cut off).
/// Runs until `stop`, at most five minutes, against 127.0.0.1 only.
struct Attack {
    stop: Arc<AtomicBool>,
    /// Connections opened and bytes sent so far.
    opened: Arc<AtomicUsize>,
    dribbled: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Attack {
    fn start(port: u16, idle: usize) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let (opened, dribbled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let deadline = Instant::now() + Duration::from_secs(300);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let idler = {
            let (stop, opened) = (stop.clone(), opened.clone());
            let dribbled = dribbled.clone();
            std::thread::spawn(move || {
                // The byte-by-byte request takes its slot first: both are in place then.
                while dribbled.load(Ordering::Relaxed) < 3 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut held: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // Closed by the listener (a read returns 0): replaced.
                    held.retain(|s| {
                        s.set_nonblocking(true).unwrap();
                        let mut byte = [0u8; 1];
                        !matches!((&*s).read(&mut byte), Ok(0))
                    });
                    while held.len() < idle {
                        let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                        else {
                            break;
                        };
                        opened.fetch_add(1, Ordering::Relaxed);
                        held.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let dribbler = {
            let (stop, dribbled) = (stop.clone(), dribbled.clone());
            std::thread::spawn(move || {
                let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    for byte in request.iter().chain(std::iter::repeat(&b'a')) {
                        if stop.load(Ordering::Relaxed) || s.write_all(&[*byte]).is_err() {
                            break;
                        }
                        dribbled.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        };
        Attack {
            stop,
            opened,
            dribbled,
            threads: vec![idler, dribbler],
        }
    }

    /// Waits until the attack holds connections and has sent bytes.
    fn wait_under_way(&self, idle: usize) {
        wait_until(LIMIT, "the attack to hold the listener", || {
            self.opened.load(Ordering::Relaxed) >= idle && self.dribbled.load(Ordering::Relaxed) > 5
        });
    }

    /// Connections opened and bytes sent so far.
    fn progress(&self) -> (usize, usize) {
        (
            self.opened.load(Ordering::Relaxed),
            self.dribbled.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A child that writes the time at which SIGTERM reaches it to `out` (renamed into place,
/// so `out` never exists half-written), then exits 0 (`ready` is written once its handler
/// is in place).
fn signal_recorder(out: &Path, ready: &Path) -> Vec<String> {
    let script = "import os, signal, sys, time\n\
                  def got(*_):\n    open(sys.argv[1] + '.tmp', 'w').write(repr(time.time()))\n    \
                  os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n    sys.exit(0)\n\
                  signal.signal(signal.SIGTERM, got)\n\
                  open(sys.argv[2], 'w').write('ready')\n\
                  while True:\n    signal.pause()\n";
    vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        script.into(),
        out.display().to_string(),
        ready.display().to_string(),
    ]
}

#[test]
fn idle_connections_and_a_byte_by_byte_request_delay_neither_a_sigterm_nor_a_rotation() {
    const IDLE: usize = 64;
    // SIGTERM's forwarding, by `run` as PID 1 (as a subreaper where no pid namespace can be
    // made), supervising a child that records when the signal reaches it.
    let mode = if can_unshare() {
        Mode::Pid1
    } else {
        Mode::Subreaper
    };
    let dir = tempfile::tempdir().unwrap();
    let (out, ready) = (dir.path().join("got-term"), dir.path().join("ready"));
    let port = free_port();
    let mut cmd = mode.bin();
    cmd.arg("run")
        .args(["--pgdata", dir.path().to_str().unwrap()])
        .args(["--keys-dir", dir.path().to_str().unwrap()])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .arg("--")
        .args(signal_recorder(&out, &ready));
    let run = Running::spawn_as(mode, cmd);
    wait_until(LIMIT, "the child's handler", || ready.exists());
    scrape(port);
    let attack = Attack::start(port, IDLE);
    attack.wait_under_way(IDLE);
    let sent = unix_now();
    run.signal(Signal::SIGTERM);
    wait_until(LIMIT, "SIGTERM to reach the child", || out.exists());
    let reached: f64 = std::fs::read_to_string(&out).unwrap().parse().unwrap();
    let forwarding = reached - sent;
    let (opened, dribbled) = attack.progress();
    let record = run.finish(LIMIT).expect_ok();
    eprintln!(
        "measured: SIGTERM forwarded in {:.1} ms while {opened} connections were opened \
         and {dribbled} bytes dribbled",
        forwarding * 1000.0
    );
    drop(attack);
    assert!(
        forwarding < 5.0,
        "SIGTERM took {forwarding:.1} s to reach the child\n{record}"
    );

    // A rotation applied by a `watch` sidecar under the same attack.
    let cluster = Cluster::start_default();
    cluster.create_throwaway_roles(["appuser", "backupuser", "temporaluser"]);
    let keys = Keys::new();
    let first = keys.write_new(&DEFAULT_ROLES, "attack-first");
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let mut cmd = bin_for("watch", &cluster, &keys);
    cmd.args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .args(["--state-dir", state.path().to_str().unwrap()]);
    let watcher = Running::spawn(cmd).with_server_log(&cluster.log);
    wait_until(LIMIT, "the first sync", || {
        cluster.login("appuser", &first[1]).is_ok()
    });
    watcher.wait_stderr(LIMIT, "watching");
    scrape(port);
    let attack = Attack::start(port, IDLE);
    attack.wait_under_way(IDLE);
    let new = unique("attack-rotated");
    let written = Instant::now();
    keys.write("postgres_app_user_pw", &new);
    wait_until(LIMIT, "the rotation under attack", || {
        cluster.login("appuser", &new).is_ok()
    });
    let rotation = written.elapsed();
    let (opened, dribbled) = attack.progress();
    eprintln!(
        "measured: rotation in force {} ms after the write while {opened} connections were \
         opened and {dribbled} bytes dribbled",
        rotation.as_millis()
    );
    drop(attack);
    assert!(
        rotation < Duration::from_secs(5),
        "the rotation took {rotation:?}"
    );
    // The listener serves again once the attack is over.
    assert!(scrape(port).contains("pg_password_sync_password_changes_total{role=\"appuser\"} 2"));
    watcher.signal(Signal::SIGTERM);
    let stopped = watcher.finish(LIMIT).expect_ok();
    assert_no_leak(&[new.as_str()], Some(&cluster), &[&stopped]);
}

#[test]
fn status_shows_each_login_published_valid_until_sessions_and_a_pending_stage() {
    let mut setup = Setup::new();
    let watcher = setup.watch(&[]);
    let session = Session::connect(setup.cluster.port, "appuser", &setup.get("appuser"));
    let staged = setup.stage_twin();
    wait_until(LIMIT, "the staged twin to log in", || {
        setup.cluster.login("appuser_alt", &staged).is_ok()
    });
    let deadline = Instant::now() + LIMIT;
    let json: serde_json::Value = loop {
        let run = setup
            .cluster
            .run(setup.command("status", &["--format", "json"]));
        let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        if run.code() == Some(0) && json["roles"][0]["stage_pending"] == "appuser_alt" {
            break json;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the stage\n{run}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let app = &json["roles"][0];
    assert_eq!(app["role"], "appuser", "{json}");
    let (own, twin) = (&app["logins"][0], &app["logins"][1]);
    assert_eq!(own["login"], "appuser");
    assert_eq!(own["published"], true);
    assert!(own["sessions"].as_i64().unwrap() >= 1, "{json}");
    assert_eq!(twin["login"], "appuser_alt");
    assert_eq!(twin["published"], false);
    assert_eq!(twin["valid_until"], "infinity");
    assert!(twin["last_change_ms"].as_u64().is_some(), "{json}");
    assert_eq!(json["healthy"], true, "{json}");

    let table = setup.cluster.run(setup.command("status", &[])).expect_ok();
    table.expect_stdout("healthy: ");
    table.expect_stdout_line(&["ROLE", "LOGIN", "PUBLISHED", "VALID UNTIL", "SESSIONS"]);
    table.expect_stdout_line(&["appuser", "appuser_alt", "no", "infinity", "pending"]);
    table.expect_stdout_line(&["backupuser", "backupuser_alt", "no", "-infinity"]);
    drop(session);

    watcher.signal(Signal::SIGTERM);
    let stopped = watcher.finish(LIMIT).expect_ok();
    // Its writer gone, the state is not healthy: exit 8, the facts still shown.
    let unhealthy = setup
        .cluster
        .run(setup.command("status", &[]))
        .expect_code(8);
    unhealthy.expect_stdout("not healthy: ");
    unhealthy.expect_stdout_line(&["appuser", "appuser_alt"]);
    let secrets = setup.secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak(&secrets, None, &[&table, &unhealthy, &stopped]);
}

/// The socket inodes `pid` has open.
fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The inodes of the TCP sockets in LISTEN state (IPv4 and IPv6).
fn listening_inodes(pid: u32) -> Vec<String> {
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| {
            let text =
                std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.get(3) == Some(&"0A"))
                        .then(|| fields.get(9).map(|s| (*s).to_owned()))?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn without_the_flags_there_is_no_listener_and_no_file() {
    let setup = Setup::new();
    let watcher = setup.watch(&[]);
    let pid = watcher.pid();
    let listening = listening_inodes(pid);
    let ours: Vec<String> = socket_inodes(pid)
        .into_iter()
        .filter(|inode| listening.contains(inode))
        .collect();
    assert!(ours.is_empty(), "watch listens on a TCP socket: {ours:?}");
    let stray: Vec<PathBuf> = std::fs::read_dir(setup.state.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "prom"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert!(
        !watcher.stderr_so_far().contains("metrics"),
        "{}",
        watcher.stderr_so_far()
    );
    // The same check sees a listener when there is one.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let with = setup.watch(&["--metrics-listen", &listen]);
    scrape(port);
    let listening = listening_inodes(with.pid());
    assert!(
        socket_inodes(with.pid())
            .iter()
            .any(|i| listening.contains(i)),
        "the check finds a listener"
    );
}

#[test]
fn a_password_restored_after_drift_and_a_blocking_session_ended_are_counted() {
    let cluster = Cluster::start_default();
    cluster.create_throwaway_roles(["appuser", "backupuser", "temporaluser"]);
    let keys = Keys::new();
    let secrets = keys.write_new(&DEFAULT_ROLES, "drift");
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("pps.prom");
    let mut cmd = bin_for("watch", &cluster, &keys);
    cmd.args(["--state-dir", state.path().to_str().unwrap()])
        .args(["--metrics-file", file.to_str().unwrap()])
        .args(["--terminate-blockers-after", "1s"]);
    let watcher = Running::spawn(cmd).with_server_log(&cluster.log);
    wait_until(LIMIT, "the first sync", || {
        cluster.login("appuser", &secrets[1]).is_ok()
    });
    watcher.wait_stderr(LIMIT, "watching");
    let value = |series: &str| sample(&std::fs::read_to_string(&file).unwrap_or_default(), series);

    // Someone sets another password behind our back; the next full resync restores it.
    cluster.create_throwaway_roles(["appuser"]);
    watcher.signal(Signal::SIGHUP);
    wait_until(LIMIT, "the drift to be counted", || {
        value("pg_password_sync_drift_restored_total{role=\"appuser\"}") == Some(1.0)
    });
    cluster.assert_login("appuser", &secrets[1]);
    assert_eq!(
        value("pg_password_sync_syncs_total{result=\"success\",trigger=\"sighup\"}"),
        Some(1.0)
    );

    // A login holding the sync's lock is named, then ended, and the resync goes through.
    let blocker = Session::connect(cluster.port, "appuser", &secrets[1]);
    blocker.hold_sync_lock();
    watcher.signal(Signal::SIGHUP);
    wait_until(LIMIT, "the blocker to be counted and ended", || {
        value("pg_password_sync_blocking_sessions_total") == Some(1.0)
            && value("pg_password_sync_blocking_sessions_ended_total") == Some(1.0)
    });
    assert!(!blocker.alive(), "the blocking session was ended");
    wait_until(LIMIT, "the blocked resync to succeed", || {
        value("pg_password_sync_syncs_total{result=\"success\",trigger=\"sighup\"}") == Some(2.0)
    });
    let text = std::fs::read_to_string(&file).unwrap();
    let (ok, said) = promtool_check(text.as_bytes());
    assert!(ok, "{said}");
    watcher.signal(Signal::SIGTERM);
    let stopped = watcher.finish(LIMIT).expect_ok();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak(&secrets, None, &[&stopped]);
    assert!(secrets.iter().all(|s| !text.contains(s)));
}

#[test]
fn the_example_alert_rules_of_the_docs_pass_promtool() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let rules = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block in docs/metrics.md");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool check rules refused docs/metrics.md's rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for alert in [
        "PgPasswordSyncNoSuccessfulSync",
        "PgPasswordSyncRotationFailing",
        "PgPasswordSyncRetiringLoginInUse",
        "PgPasswordSyncPublishedLoginExpiring",
    ] {
        assert!(rules.contains(alert), "{alert}");
    }
}

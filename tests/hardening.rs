//! Hostile surroundings: another local user racing the state directory, a state file
//! someone else wrote, a full state file system, a secret file swapped for a FIFO, and a
//! server whose listen backlog is full. What must hold: no write ever goes through
//! anything another user controls, `health` believes only its writer and fails closed,
//! and PID 1 keeps forwarding signals whatever a read or a connect meets.
//!
//! Most of these need root (another user to attack with, `mount`, a server run as
//! `postgres`): without it they are skipped (a failure under CI, see `skip`). The attacker
//! runs as `nobody` through `setpriv`, with Perl for its tight loop.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const COMPLETE: &str = "Password synchronization complete.";
const NOBODY: u32 = 65534;

/// Tests that touch the machine-wide fallback names (`/tmp/pg-password-sync-0`,
/// `/run/pg-password-sync-0`) take turns.
static FALLBACK_NAMES: Mutex<()> = Mutex::new(());

fn fallback_names() -> std::sync::MutexGuard<'static, ()> {
    FALLBACK_NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn needs_root(test: &str) -> bool {
    if !is_root() {
        skip(&format!("{test} needs root"));
        return false;
    }
    true
}

/// A directory `nobody` owns (mode 0755), in /tmp so that renames reach /tmp's names.
fn nobody_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_nobody(dir.path());
    dir
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// A command run as `nobody` (no groups).
fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        program,
    ]);
    cmd
}

/// A root-only file with known content, in a root-only directory.
struct Precious {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const PRECIOUS: &str = "root's own data\n";

impl Precious {
    fn new() -> Precious {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, PRECIOUS).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Precious { _dir: dir, path }
    }

    /// Content, mode and owner as made.
    fn untouched(&self) -> bool {
        let meta = std::fs::metadata(&self.path).unwrap();
        std::fs::read_to_string(&self.path).unwrap() == PRECIOUS
            && meta.mode() & 0o7777 == 0o600
            && meta.uid() == 0
    }
}

/// A background process killed (and reaped) on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes what a run left under a fallback name, when root made it.
fn remove_roots(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.is_dir()
        && meta.uid() == 0
    {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Removes a fallback name's directory made by root or by these tests' `nobody` (an
/// attacker's directory left there would stop the next race before it starts).
fn remove_leftover(path: &Path) {
    remove_roots(path);
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.is_dir()
        && meta.uid() == NOBODY
    {
        let _ = std::fs::remove_dir_all(path);
    }
}

// ------------------------------------------------------------ the state directory

/// `run` as root with an unusable `--state-dir` and no XDG_RUNTIME_DIR, while `nobody`
/// swaps its own directory in and out of the old fallback name `/tmp/pg-password-sync-0`
/// with `.state.json.1.tmp` (PID 1's temp name) planted as a link to a root-only file.
/// That file must stay untouched however often `run` starts, and the state must end in
/// a directory only root can write.
#[test]
fn a_local_user_racing_the_state_dir_fallback_never_gets_root_to_write_through_a_link() {
    let test = "a_local_user_racing_the_state_dir_fallback_never_gets_root_to_write_through_a_link";
    if !needs_root(test) || !Mode::Pid1.available(test) {
        return;
    }
    let _names = fallback_names();
    let old_fallback = PathBuf::from("/tmp/pg-password-sync-0");
    let new_fallback = PathBuf::from("/run/pg-password-sync-0");
    remove_leftover(&old_fallback);
    remove_roots(&new_fallback);
    let precious = Precious::new();
    let attacker = nobody_dir("pps-attacker-");
    let own = attacker.path().join("d");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = own.join(".state.json.1.tmp");
    std::os::unix::fs::symlink(&precious.path, &planted).unwrap();
    chown_nobody(&planted);
    chown_nobody(&own);
    let stop = attacker.path().join("stop");
    let script = "my ($own, $name, $stop) = @ARGV; \
                  until (-e $stop) { rename($own, $name); rename($name, $own); }";
    let swapper = Background(
        as_nobody("perl")
            .args(["-e", script])
            .arg(&own)
            .arg(&old_fallback)
            .arg(&stop)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let keys = Keys::new();
    keys.write_new(&DEFAULT_ROLES, "race");
    // A regular file is no directory: the state must go to the fallback.
    let not_a_dir = keys.path().join("not-a-dir");
    std::fs::write(&not_a_dir, "").unwrap();
    let mut last = None;
    for attempt in 0..60 {
        let mut cmd = Mode::Pid1.bin();
        cmd.arg("run")
            .arg("--keys-dir")
            .arg(keys.path())
            .arg("--secrets-source-dir")
            .arg(keys.path().join("none"))
            .arg("--state-dir")
            .arg(&not_a_dir)
            .args(["--", "true"]);
        let out = run(cmd);
        assert!(
            precious.untouched(),
            "attempt {attempt}: root wrote through the planted link\n{out}"
        );
        // Root's own directory under the old name would end the race: start afresh.
        remove_roots(&old_fallback);
        last = Some(out);
    }
    // The loop ends after a whole swap, with its directory back in its own place.
    std::fs::write(&stop, "").unwrap();
    let mut swapper = swapper;
    wait_until(
        Duration::from_secs(10),
        "the attacker's loop to end",
        || swapper.0.try_wait().unwrap().is_some(),
    );
    remove_leftover(&old_fallback);
    let last = last.unwrap().expect_ok();
    last.expect_stderr(&format!("using {}", new_fallback.display()));
    let meta = std::fs::symlink_metadata(new_fallback.join("state.json")).unwrap();
    assert!(meta.is_file() && meta.uid() == 0, "{last}");
    assert_eq!(
        std::fs::symlink_metadata(&new_fallback).unwrap().mode() & 0o022,
        0
    );
    remove_roots(&new_fallback);
    assert!(precious.untouched());
}

/// A state file that says "ready, synced" (its writer's pid is alive: ours), planted by
/// `nobody` in a directory of its own, given as `--state-dir`, and under the old fallback
/// name: `health` as root must not believe it, and must say why.
#[test]
fn health_does_not_believe_a_state_file_another_user_wrote() {
    if !needs_root("health_does_not_believe_a_state_file_another_user_wrote") {
        return;
    }
    // Root's fallback may hold a real state file of another test's `run`.
    let _names = fallback_names();
    let forged = format!(
        "{{\"pid\":{},\"ready\":true,\"postmaster_pid\":null,\
         \"last_sync\":{{\"ok\":true,\"at_ms\":0,\"files\":[]}}}}\n",
        std::process::id()
    );
    let plant = |dir: &Path| {
        let file = dir.join("state.json");
        std::fs::write(&file, &forged).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        chown_nobody(&file);
    };
    let health = |state_dir: &Path| {
        let mut cmd = bin();
        cmd.arg("health")
            .arg("--pgdata")
            .arg(state_dir.join("no-pgdata"))
            .arg("--state-dir")
            .arg(state_dir);
        run(cmd)
    };

    // nobody's own directory, named by --state-dir.
    let theirs = nobody_dir("pps-forged-");
    plant(theirs.path());
    let out = health(theirs.path()).expect_code(8);
    out.expect_stderr("uid 65534");

    // root's directory, but open to everyone (as /tmp is): the file is not root's.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    plant(open.path());
    let out = health(open.path()).expect_code(8);
    out.expect_stderr("writable by other users");

    // The fallback name of old, pre-created by nobody; --state-dir does not exist.
    let old_fallback = Path::new("/tmp/pg-password-sync-0");
    remove_leftover(old_fallback);
    if std::fs::symlink_metadata(old_fallback).is_err() {
        std::fs::create_dir(old_fallback).unwrap();
        std::fs::set_permissions(old_fallback, std::fs::Permissions::from_mode(0o755)).unwrap();
        plant(old_fallback);
        chown_nobody(old_fallback);
        let missing = theirs.path().join("missing");
        let out = health(&missing);
        let _ = std::fs::remove_dir_all(old_fallback);
        out.expect_code(8);
    }
}

// ------------------------------------------------------------ health fails closed

/// A mounted tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the file system is full.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join("filler")).unwrap();
        let block = [0u8; 4096];
        loop {
            if file.write_all(&block).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `watch` with its state on a small tmpfs: healthy after the first sync; then the file
/// system fills up and a resync fails (the server is gone). The state file cannot record
/// that, and `health` must not go on reading the stale "synced": unhealthy, saying why.
#[test]
fn health_is_unhealthy_when_the_state_file_cannot_be_written() {
    if !needs_root("health_is_unhealthy_when_the_state_file_cannot_be_written") {
        return;
    }
    let Some(tmpfs) = Tmpfs::mount("64k") else {
        skip("cannot mount a tmpfs here");
        return;
    };
    let mut cluster = Cluster::start_default();
    cluster.create_roles(&[
        ("appuser", "placeholder-appuser"),
        ("backupuser", "placeholder-backupuser"),
        ("temporaluser", "placeholder-temporaluser"),
    ]);
    let keys = Keys::new();
    let secrets = keys.write_new(&DEFAULT_ROLES, "full");
    let mut cmd = bin_for("watch", &cluster, &keys);
    cmd.args(["--debounce", "50ms", "--state-dir"])
        .arg(tmpfs.path());
    let watcher = Running::spawn(cmd).with_server_log(&cluster.log);
    watcher.wait_stderr(Duration::from_secs(60), COMPLETE);
    let health = |cluster: &Cluster| {
        let mut cmd = bin_for("health", cluster, &keys);
        cmd.arg("--state-dir").arg(tmpfs.path());
        run(cmd)
    };
    let before = health(&cluster).expect_ok();

    tmpfs.fill();
    cluster.stop();
    watcher.signal(Signal::SIGHUP);
    watcher.wait_stderr(Duration::from_secs(60), "cannot write the state file");
    // Removing the stale file frees room a retry may use to record the failure: either
    // verdict is the truth, the stale "synced" is not.
    let after = health(&cluster).expect_code(8);
    assert!(
        after.stderr.contains("could not be written") || after.stderr.contains("last sync failed"),
        "{after}"
    );

    // Space again: the next outcome is recorded and believed.
    std::fs::remove_file(tmpfs.path().join("filler")).unwrap();
    cluster.start();
    watcher.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(60), "healthy again", || {
        health(&cluster).code() == Some(0)
    });

    watcher.signal(Signal::SIGTERM);
    let out = watcher.finish(Duration::from_secs(30)).expect_ok();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak(&secrets, Some(&cluster), &[&out, &before, &after]);
}

// ------------------------------------------------------------ PID 1 never blocks

/// `run` supervising a real postmaster (`postgres -D`, as the server's OS user, exec'd
/// in place by setpriv so that the child is the postmaster), with a cluster whose roles
/// exist, four fresh secret files and a state directory.
struct Supervised {
    cluster: Cluster,
    keys: Keys,
    _state: tempfile::TempDir,
    secrets: Vec<String>,
    running: Running,
}

impl Supervised {
    /// With `refuse_sync`, the server rejects every local login, so each sync fails at
    /// its connect within milliseconds (after reading every secret): many reads, fast.
    fn start(mode: Mode, extra: &[&str], refuse_sync: bool) -> Supervised {
        let mut cluster = Cluster::start_default();
        cluster.create_roles(&[
            ("appuser", "placeholder-appuser"),
            ("backupuser", "placeholder-backupuser"),
            ("temporaluser", "placeholder-temporaluser"),
        ]);
        cluster.stop();
        cluster.clear_log();
        if refuse_sync {
            write_as_server(
                &cluster.data.join("pg_hba.conf"),
                "local all all reject\nhost all all 127.0.0.1/32 scram-sha-256\n",
            );
        }
        let keys = Keys::new();
        let secrets = keys.write_new(&DEFAULT_ROLES, "pid1");
        let state = tempfile::tempdir().unwrap();
        let mut cmd = mode.bin();
        cmd.arg("run")
            .args(cluster.conn_args())
            .arg("--keys-dir")
            .arg(keys.path())
            .arg("--secrets-source-dir")
            .arg(keys.path().join("no-such-dir"))
            .args(["--temporal-db-user", "temporaluser"])
            .arg("--state-dir")
            .arg(state.path())
            .args(extra)
            .arg("--")
            .args([
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(pg_bin("postgres"))
            .arg("-D")
            .arg(&cluster.data);
        let running = Running::spawn_as(mode, cmd);
        cluster.set_running(true);
        let started = if refuse_sync {
            "PostgreSQL is ready"
        } else {
            COMPLETE
        };
        running.wait_stderr(Duration::from_secs(120), started);
        Supervised {
            cluster,
            keys,
            _state: state,
            secrets,
            running,
        }
    }

    /// The postmaster: `run`'s child (host pid).
    fn postmaster(&self) -> u32 {
        first_child(self.running.pid()).expect("the postmaster is run's child")
    }

    /// Whether one of `run`'s threads sits in system call `nr` (from /proc, as root).
    fn blocked_in(&self, nr: u32) -> bool {
        let tasks = format!("/proc/{}/task", self.running.pid());
        std::fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .any(|task| {
                std::fs::read_to_string(task.path().join("syscall"))
                    .is_ok_and(|text| text.split_whitespace().next() == Some(&nr.to_string()))
            })
    }

    /// SIGTERM to `run`: its "forwarding" line for SIGTERM must appear at once (5 s is a
    /// generous bound for a thread that is free).
    fn sigterm_is_forwarded(&self) {
        let before = self.forwarded_sigterms();
        self.running.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.forwarded_sigterms() == before {
            assert!(
                Instant::now() < deadline,
                "SIGTERM was not forwarded within 5 s: PID 1 is blocked\n--- stderr so far\n{}",
                tail(&self.running.stderr_so_far(), 30)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn forwarded_sigterms(&self) -> usize {
        self.running
            .stderr_so_far()
            .lines()
            .filter(|l| l.contains("forwarding") && l.contains("SIGTERM"))
            .count()
    }

    /// Waits for postgres and `run` to end (status 0: a clean smart shutdown), and checks
    /// that no secret leaked.
    fn finish(mut self) {
        let out = self.running.finish(Duration::from_secs(60));
        self.cluster.set_running(false);
        let out = out.with_server_log(&self.cluster.log).expect_ok();
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        assert_no_leak(&secrets, Some(&self.cluster), &[&out]);
    }
}

#[cfg(target_arch = "x86_64")]
const SYS_OPENAT: u32 = 257;
#[cfg(target_arch = "x86_64")]
const SYS_CONNECT: u32 = 42;
#[cfg(target_arch = "aarch64")]
const SYS_OPENAT: u32 = 56;
#[cfg(target_arch = "aarch64")]
const SYS_CONNECT: u32 = 203;

/// While a secret file keeps being exchanged with a FIFO (`renameat2(RENAME_EXCHANGE)` in
/// a tight loop), SIGHUPs make resyncs that read every secret (and then fail at once at
/// the connect, which the server rejects: so they are many). A read may meet the FIFO
/// between looking at the name and opening it: the open must not wait for a writer.
/// Then SIGTERM is forwarded at once and postgres stops.
fn fifo_swapped_in(mode: Mode) {
    if !needs_root("fifo_swapped_in") {
        return;
    }
    // No file watch: its events would flood; SIGHUP makes every read.
    let mut sup = Supervised::start(mode, &["--no-watch"], true);
    // The first secret a sync reads: a refused FIFO ends the read of the set at once.
    let name = sup.keys.path().join("postgres_password.txt");
    let spare = sup.keys.path().join("spare");
    nix::unistd::mkfifo(&spare, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let exchange = || {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &name,
            nix::fcntl::AT_FDCWD,
            &spare,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .unwrap();
    };
    let stop = AtomicBool::new(false);
    let mut swaps = 0u64;
    std::thread::scope(|scope| {
        let swapper = scope.spawn(|| {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                exchange();
                swaps += 1;
            }
            swaps
        });
        // Until a read is stuck (what a blocking open does) or for 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !sup.blocked_in(SYS_OPENAT) {
            sup.running.signal(Signal::SIGHUP);
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        swaps = swapper.join().unwrap();
    });
    let met = sup
        .running
        .stderr_so_far()
        .matches("not a regular file")
        .count();
    let stuck = sup.blocked_in(SYS_OPENAT);
    eprintln!("{mode:?}: {swaps} swaps; {met} reads met a FIFO; stuck: {stuck}");
    assert!(
        swaps > 1000 && met > 0,
        "{swaps} swaps, {met} reads met a FIFO"
    );
    // The name holds the regular file again; whatever a stuck open waits on is a FIFO
    // that never gets a writer.
    if !std::fs::symlink_metadata(&name).unwrap().is_file() {
        exchange();
    }
    sup.running.assert_alive();
    sup.sigterm_is_forwarded();
    sup.finish();
}

both_modes!(
    fifo_swapped_in =>
    sigterm_is_forwarded_while_a_secret_file_is_swapped_for_a_fifo_as_pid1,
    sigterm_is_forwarded_while_a_secret_file_is_swapped_for_a_fifo_as_subreaper
);

/// The postmaster is stopped (SIGSTOP) and its listen backlog filled with unauthenticated
/// connects; a resync then meets a socket that accepts nothing. SIGTERM must still be
/// forwarded at once, and postgres exits once continued.
fn full_backlog(mode: Mode) {
    if !needs_root("full_backlog") {
        return;
    }
    let mut sup = Supervised::start(mode, &[], false);
    let postmaster = Pid::from_raw(sup.postmaster() as i32);
    let socket = sup
        .cluster
        .sock
        .join(format!(".s.PGSQL.{}", sup.cluster.port));
    kill(postmaster, Signal::SIGSTOP).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Non-blocking connects until the kernel says the backlog is full.
    let flood = runtime.block_on(async {
        let mut flood = Vec::new();
        loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(stream) => flood.push(stream),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break flood,
                Err(err) => panic!("connecting to {}: {err}", socket.display()),
            }
            assert!(flood.len() < 20_000, "the backlog never filled");
        }
    });
    assert!(
        flood.len() > 10,
        "{} connects filled the backlog",
        flood.len()
    );

    // A resync now connects to the full backlog (the log says so; a connect that blocks
    // instead shows in /proc).
    sup.running.signal(Signal::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "a connect to the full backlog",
        || sup.blocked_in(SYS_CONNECT) || sup.running.stderr_so_far().contains("listen backlog"),
    );
    sup.running.assert_alive();
    sup.sigterm_is_forwarded();

    drop(flood);
    drop(runtime);
    kill(postmaster, Signal::SIGCONT).unwrap();
    sup.finish();
}

both_modes!(
    full_backlog =>
    sigterm_is_forwarded_while_the_servers_listen_backlog_is_full_as_pid1,
    sigterm_is_forwarded_while_the_servers_listen_backlog_is_full_as_subreaper
);

/// iptables rules that drop every packet to and from one local TCP port, as a network
/// partition does to a server on another host: nothing is refused or reset, the peer just
/// falls silent. Removed on drop; tagged, so that rules a killed test run left behind
/// (a drop never ran) are removed by the next one instead of silencing a reused port.
struct Partition {
    port: u16,
}

impl Partition {
    const DIRECTIONS: [&str; 2] = ["--dport", "--sport"];
    const TAG: &str = "pg-password-sync-test-partition";

    fn rule(action: &str, direction: &str, port: u16) -> bool {
        // `-w`: wait for the xtables lock (legacy iptables) rather than fail while another
        // process, such as the Docker engine of the e2e test beside the suite, changes rules.
        Command::new("iptables")
            .arg("-w")
            .args([action, "INPUT", "-p", "tcp", direction, &port.to_string()])
            .args(["-m", "comment", "--comment", Self::TAG, "-j", "DROP"])
            .output()
            .is_ok_and(|out| out.status.success())
    }

    fn start(port: u16) -> Option<Partition> {
        Self::remove_stale();
        if !Self::rule("-I", Self::DIRECTIONS[0], port) {
            return None;
        }
        let partition = Partition { port };
        assert!(
            Self::rule("-I", Self::DIRECTIONS[1], port),
            "iptables -I --sport"
        );
        Some(partition)
    }

    /// Removes every tagged rule (`iptables -S` prints each as the `-A …` that adds it).
    fn remove_stale() {
        let Ok(out) = Command::new("iptables")
            .args(["-w", "-S", "INPUT"])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(spec) = line.strip_prefix("-A ")
                && line.contains(Self::TAG)
            {
                let _ = Command::new("iptables")
                    .args(["-w", "-D"])
                    .args(spec.split_whitespace().map(|w| w.trim_matches('"')))
                    .output();
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for direction in Self::DIRECTIONS {
            Self::rule("-D", direction, self.port);
        }
    }
}

/// A server over TCP (a sidecar whose `PGHOST` is another host) that falls silent in the
/// middle of a sync: the sync must notice within its TCP silence limit and fail, not wait
/// for the kernel's default of hours. The sync is held up by a superuser's lock first (never
/// ended, with a lock wait of ten minutes), so the partition meets it waiting for an
/// answer only the server could end.
#[test]
fn a_server_that_falls_silent_over_tcp_ends_the_sync_instead_of_hanging_it() {
    if !needs_root("a_server_that_falls_silent_over_tcp_ends_the_sync_instead_of_hanging_it") {
        return;
    }
    let cluster = Cluster::start_default();
    cluster.create_throwaway_roles(["appuser", "backupuser", "temporaluser"]);
    let keys = Keys::new();
    let first = keys.write_new(&DEFAULT_ROLES, "silent0");
    cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    let mut holder = psql_superuser(&cluster.sock, cluster.port);
    holder.args([
        "-c",
        "SELECT pg_advisory_lock(x'7067707773796e63'::bigint)",
        "-c",
        "SELECT pg_sleep(3600)",
    ]);
    let _holder = Running::spawn(holder);
    wait_until(Duration::from_secs(30), "the lock to be held", || {
        cluster.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == "1"
    });

    // New passwords for the roles; the superuser's stays, since the sync logs in with it.
    let next = keys.write_new(&DEFAULT_ROLES[1..], "silent1");
    let mut cmd = bin();
    cmd.args(["sync", "--pghost", "127.0.0.1", "--pgport"])
        .arg(cluster.port.to_string())
        .arg("--keys-dir")
        .arg(keys.path())
        .arg("--secrets-source-dir")
        .arg(keys.path().join("no-such-dir"))
        .args(["--temporal-db-user", "temporaluser"])
        .env("PG_PASSWORD_SYNC_LOCK_WAIT_TIMEOUT", "600s")
        .env("PG_CONNECT_TIMEOUT", "5s");
    let sync = Running::spawn(cmd).with_server_log(&cluster.log);
    sync.wait_stderr(
        Duration::from_secs(30),
        "the sync is blocked by other sessions",
    );
    let Some(partition) = Partition::start(cluster.port) else {
        skip("iptables cannot add a rule here");
        return;
    };
    let cut = Instant::now();
    // The silence limit (15 s) and a connect attempt of the watchdog (5 s) at most; twice
    // that as the liveness bound. Without the limit the sync waits for hours.
    let out = sync.finish(Duration::from_secs(60));
    let noticed = cut.elapsed();
    drop(partition);
    eprintln!("the sync ended {noticed:?} after the server fell silent");
    // The statement in flight fails (a SQL failure: run and watch retry it with backoff).
    let out = out.expect_code(5);
    out.expect_stderr("taking the sync lock: connection closed");
    // Nothing was applied: the first passwords still log in.
    for ((role, _), password) in DEFAULT_ROLES.iter().zip(&first) {
        cluster.assert_login(role, password);
    }
    let secrets: Vec<&str> = first.iter().chain(&next).map(String::as_str).collect();
    assert_no_leak(&secrets, Some(&cluster), &[&out]);
}

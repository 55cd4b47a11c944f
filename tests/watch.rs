//! `watch` (the sidecar) against real PostgreSQL clusters (from `PG_BINDIR`): Kubernetes
//! AtomicWriter swaps, renames and in-place rewrites, superuser rotation by password only,
//! invalid files, rapid swaps, a secrets directory missing or remounted, SIGHUP, SIGTERM,
//! and no plaintext anywhere.
//!
//! Every wait is a poll for the observable outcome (a login with the new password works)
//! under a generous liveness bound; latency itself is measured by a benchmark elsewhere.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::k8s::SecretVolume;
use crate::common::*;
use nix::sys::signal::Signal;

/// Liveness bound for a rotation to be in force (debounce is 50 ms in these tests).
const LIMIT: Duration = Duration::from_secs(10);

/// The three non-superuser default roles (the superuser keeps peer access over the socket).
const APP_ROLES: [(&str, &str); 3] = [
    ("appuser", "postgres_app_user_pw"),
    ("backupuser", "postgres_app_ro_pw"),
    ("temporaluser", "postgres_temporal_pw"),
];

/// A running `watch` sidecar.
struct Watcher {
    running: Running,
    _state: tempfile::TempDir,
}

impl Watcher {
    /// `watch` on `cluster` with `keys_dir` (and a missing SECRETS_SOURCE_DIR, as in a
    /// container without Docker secrets), 50 ms debounce, plus `extra` arguments.
    fn start(cluster: &Cluster, keys_dir: &Path, extra: &[&str]) -> Watcher {
        Watcher::start_with_conn(cluster.conn_args(), keys_dir, extra)
    }

    fn start_with_conn(conn: Vec<String>, keys_dir: &Path, extra: &[&str]) -> Watcher {
        Watcher::start_wrapped(bin(), conn, keys_dir, extra)
    }

    /// `watch` run by `cmd`: the binary itself, or a wrapper whose last argument before
    /// ours execs it (so the pid and signals are the watcher's).
    fn start_wrapped(
        mut cmd: std::process::Command,
        conn: Vec<String>,
        keys_dir: &Path,
        extra: &[&str],
    ) -> Watcher {
        let state = tempfile::tempdir().unwrap();
        // 50 ms unless the test chooses its own.
        let debounce = if extra.contains(&"--debounce") {
            &[][..]
        } else {
            &["--debounce", "50ms"][..]
        };
        cmd.arg("watch")
            .args(conn)
            .arg("--keys-dir")
            .arg(keys_dir)
            .arg("--secrets-source-dir")
            .arg(state.path().join("no-docker-secrets"))
            .args(["--temporal-db-user", "temporaluser"])
            .args(debounce)
            .arg("--state-dir")
            .arg(state.path())
            .args(extra);
        Watcher {
            running: Running::spawn(cmd),
            _state: state,
        }
    }

    fn signal(&self, signal: Signal) {
        self.running.signal(signal);
    }

    fn stderr(&self) -> String {
        self.running.stderr_so_far()
    }

    /// Waits (`what`) for a line with `needle` and asserts that it is a WARN naming the
    /// application user's file; returns stderr so far.
    fn assert_app_file_warned(&self, what: &str, needle: &str) -> String {
        self.wait_stderr(what, needle);
        let stderr = self.stderr();
        let refusal = stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default();
        assert!(
            refusal.contains(" WARN ") && refusal.contains("postgres_app_user_pw.txt"),
            "the warning names the file: {refusal}\n{stderr}"
        );
        stderr
    }

    fn wait_stderr(&self, what: &str, needle: &str) {
        wait_until(LIMIT, what, || self.stderr().contains(needle));
    }

    /// Waits for the rotation line that follows `before` (a login with the new password
    /// can succeed between the COMMIT and that line) and returns stderr so far.
    fn wait_rotation_after(&self, before: usize) -> String {
        wait_until(LIMIT, "the rotation to be reported", || {
            rotations(&self.stderr()) > before
        });
        self.stderr()
    }

    fn assert_alive(&mut self) {
        self.running.assert_alive();
    }

    /// SIGTERM, then the exit must be 0 and prompt. The record includes the watcher's
    /// argv and environment as seen just before, for the leak checks.
    fn stop(mut self, cluster: &Cluster) -> Run {
        self.assert_alive();
        let seen = proc_strings(self.running.pid());
        assert!(!seen.is_empty(), "/proc of the watcher is readable");
        self.signal(Signal::SIGTERM);
        let mut run = self
            .running
            .finish(LIMIT)
            .with_server_log(&cluster.log)
            .expect_ok();
        run.proc_seen.extend(seen);
        run
    }
}

/// Polls until `role` can log in with `password`.
fn wait_login(cluster: &Cluster, role: &str, password: &str) {
    wait_until(
        LIMIT,
        &format!("{role} to log in with its new password"),
        || cluster.login(role, password).is_ok(),
    );
}

/// One fresh secret per default role (DEFAULT_ROLES order), with characters that need care.
fn fresh(tag: &str) -> Vec<String> {
    DEFAULT_ROLES
        .iter()
        .map(|(role, _)| unique(&format!("{tag}-{role} '\"\\ ü")))
        .collect()
}

/// The AtomicWriter payload for `secrets` (file names without `.txt`, as in a Secret).
fn payload(secrets: &[String]) -> Vec<(&'static str, Vec<u8>)> {
    DEFAULT_ROLES
        .iter()
        .zip(secrets)
        .map(|((_, file), secret)| (*file, secret.as_bytes().to_vec()))
        .collect()
}

fn update(volume: &mut SecretVolume, secrets: &[String]) {
    let payload = payload(secrets);
    let files: Vec<(&str, &[u8])> = payload.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    volume.update(&files);
}

/// Creates the three app roles with throwaway passwords (plaintext through psql: setup),
/// then empties the server log so the leak checks see only what the watcher caused.
fn create_app_roles(cluster: &Cluster) {
    cluster.create_throwaway_roles(APP_ROLES.map(|(role, _)| role));
}

/// Writes a secret file the way a generator does: a temp file elsewhere, renamed in.
fn write_file(dir: &Path, name: &str, value: &str) {
    let staging = tempfile::tempdir_in(dir.parent().unwrap()).unwrap();
    let tmp = staging.path().join(name);
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn write_all(dir: &Path, secrets: &[String]) {
    for ((_, file), secret) in DEFAULT_ROLES.iter().zip(secrets) {
        write_file(dir, &format!("{file}.txt"), secret);
    }
}

fn wait_all(cluster: &Cluster, secrets: &[String]) {
    for ((role, _), secret) in DEFAULT_ROLES.iter().zip(secrets) {
        wait_login(cluster, role, secret);
    }
}

/// A cluster with the app roles, a keys directory holding a fresh set tagged `tag`, and a
/// watcher (started with `extra`) that has applied it.
struct Synced {
    cluster: Cluster,
    keys: Keys,
    secrets: Vec<String>,
    watcher: Watcher,
}

fn synced(tag: &str, extra: &[&str]) -> Synced {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let keys = Keys::new();
    let secrets = fresh(tag);
    write_all(keys.path(), &secrets);
    // At debug level the start-of-watching check logs even when nothing changed.
    let mut cmd = bin();
    cmd.env("RUST_LOG", "debug");
    let watcher = Watcher::start_wrapped(cmd, cluster.conn_args(), keys.path(), extra);
    wait_all(&cluster, &secrets);
    // Armed, and the check of files changed since the first sync done: from here on every
    // write raises an event the loop sees before it reads. (A file written in place before
    // the watches exist is read at once, its writer unknown to inotify.)
    watcher.wait_stderr("the start of watching", "start of watching");
    Synced {
        cluster,
        keys,
        secrets,
        watcher,
    }
}

/// Sets a new password on `role` behind the watcher's back (plaintext through psql, then
/// the log is emptied so the leak checks see only what the watcher caused); returns it.
fn change_behind_its_back(cluster: &Cluster, role: &str) -> String {
    let intruder = unique("intruder");
    cluster.psql(&format!(
        "ALTER ROLE {role} PASSWORD {}",
        quote_literal(&intruder)
    ));
    cluster.clear_log();
    intruder
}

fn refs(all: &[Vec<String>]) -> Vec<&str> {
    all.iter().flatten().map(String::as_str).collect()
}

/// No secret of `groups` nor any of `more` leaked (see `assert_no_leak`) through the
/// watcher's `run` or the server log.
fn assert_none_leaked(cluster: &Cluster, groups: &[Vec<String>], more: &[&str], run: &Run) {
    let mut all = refs(groups);
    all.extend(more);
    assert_no_leak(&all, Some(cluster), &[run]);
}

/// Every line the watcher logged at WARN or ERROR. The (deliberately absent) Docker secrets
/// directory is not one of them: every secret is found in the keys directory.
fn problems(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

#[test]
fn kubernetes_atomic_writer_swaps_are_each_applied() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let root = tempfile::tempdir().unwrap();
    let mut volume = SecretVolume::new(&root.path().join("secrets"));
    let mut all = vec![fresh("k8s0")];
    update(&mut volume, &all[0]);

    let mut watcher = Watcher::start(&cluster, &volume.dir, &["--resync-interval", "0"]);
    wait_all(&cluster, &all[0]);
    for round in 1..=3 {
        let next = fresh(&format!("k8s{round}"));
        update(&mut volume, &next);
        wait_all(&cluster, &next);
        let previous = &all[round - 1];
        for ((role, _), old) in DEFAULT_ROLES.iter().zip(previous) {
            cluster.assert_no_login(role, old);
        }
        all.push(next);
    }
    watcher.assert_alive();
    let stderr = watcher.wait_rotation_after(2);
    assert_eq!(
        rotations(&stderr),
        3,
        "one rotation line per swap:\n{stderr}"
    );
    assert!(problems(&stderr).is_empty(), "{stderr}");
    assert_no_leak(&refs(&all), Some(&cluster), &[]);
    let run = watcher.stop(&cluster);
    assert_no_leak(&refs(&all), Some(&cluster), &[&run]);
}

#[test]
fn a_kubernetes_swap_is_applied_without_waiting_for_the_debounce() {
    // With a ten-minute quiet period only the `..data` rename, which completes the set by
    // design, can get the new passwords in force within the liveness bound.
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let root = tempfile::tempdir().unwrap();
    let mut volume = SecretVolume::new(&root.path().join("secrets"));
    let first = fresh("slow0");
    update(&mut volume, &first);
    let watcher = Watcher::start(
        &cluster,
        &volume.dir,
        &["--debounce", "10m", "--resync-interval", "0"],
    );
    wait_all(&cluster, &first);
    let next = fresh("slow1");
    update(&mut volume, &next);
    wait_all(&cluster, &next);
    watcher.wait_rotation_after(0);
    let run = watcher.stop(&cluster);
    assert_eq!(
        run.stderr.matches("passwords rotated").count(),
        1,
        "{}",
        run.stderr
    );
    assert_no_leak(&refs(&[first, next]), Some(&cluster), &[&run]);
}

#[test]
fn a_file_renamed_in_and_an_in_place_rewrite_are_each_applied() {
    let Synced {
        cluster,
        keys,
        secrets: first,
        watcher,
    } = synced("first", &[]);

    // A new name renamed into the directory: `NAME` wins over `NAME.txt` from now on.
    let renamed = unique("renamed-in");
    write_file(keys.path(), "postgres_app_ro_pw", &renamed);
    wait_login(&cluster, "backupuser", &renamed);
    cluster.assert_no_login("backupuser", &first[2]);

    // A rename over an existing file.
    let replaced = unique("replaced");
    write_file(keys.path(), "postgres_app_user_pw.txt", &replaced);
    wait_login(&cluster, "appuser", &replaced);
    cluster.assert_no_login("appuser", &first[1]);

    // An in-place rewrite (same inode, as through a single-file bind mount).
    let path = keys.path().join("postgres_temporal_pw.txt");
    let inode = std::fs::metadata(&path).unwrap().ino();
    let rewritten = unique("rewritten");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    writeln!(file, "{rewritten}").unwrap();
    drop(file);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    wait_login(&cluster, "temporaluser", &rewritten);
    cluster.assert_no_login("temporaluser", &first[3]);

    // After the stop, so a warning logged late is not missed.
    let run = watcher.stop(&cluster);
    assert!(problems(&run.stderr).is_empty(), "{}", run.stderr);
    let first = [first];
    let mut secrets = refs(&first);
    secrets.extend([renamed.as_str(), replaced.as_str(), rewritten.as_str()]);
    assert_no_leak(&secrets, Some(&cluster), &[&run]);
}

#[test]
fn an_in_place_rewrite_through_a_single_file_bind_mount_is_applied() {
    // A Compose `secrets: file:` mount, for real: the watcher runs in its own mount
    // namespace where `ctr/app_secret` is a bind mount of `host/app_secret`. An in-place
    // rewrite on the host raises no event on `ctr/` (the inode's parent is `host/`), so
    // only the watch on the file itself sees it.
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let keys = Keys::new();
    let (host, ctr) = (keys.path().join("host"), keys.path().join("ctr"));
    std::fs::create_dir(&host).unwrap();
    std::fs::create_dir(&ctr).unwrap();
    let (host_file, ctr_file) = (host.join("app_secret"), ctr.join("app_secret"));
    let first = unique("bind-first");
    std::fs::write(&host_file, format!("{first}\n")).unwrap();
    std::fs::write(&ctr_file, b"mount point\n").unwrap();

    let mut wrapper = std::process::Command::new("unshare");
    wrapper
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .arg(&host_file)
        .arg(&ctr_file)
        .arg(BIN);
    let role = format!("--role=appuser={}", ctr_file.display());
    let watcher = Watcher::start_wrapped(wrapper, cluster.conn_args(), &ctr, &[&role]);
    wait_login(&cluster, "appuser", &first);
    // Outside the namespace the mount point still holds its own content (compared, not
    // printed: a bind mount that leaked out would show the secret).
    assert!(
        std::fs::read(&ctr_file).unwrap() == b"mount point\n",
        "outside the namespace {} no longer holds its own content",
        ctr_file.display()
    );

    let second = unique("bind-second");
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&host_file)
        .unwrap()
        .write_all(format!("{second}\n").as_bytes())
        .unwrap();
    wait_login(&cluster, "appuser", &second);
    cluster.assert_no_login("appuser", &first);
    let run = watcher.stop(&cluster);
    assert_no_leak(&[&first, &second], Some(&cluster), &[&run]);
}

#[test]
fn the_superuser_is_rotated_twice_when_only_password_auth_works() {
    let cluster = Cluster::start_default();
    let keys = Keys::new();
    let first = fresh("su0");
    // Setup: the server already has the first set (plaintext through psql), then the log
    // is emptied.
    let roles: Vec<(&str, &str)> = DEFAULT_ROLES
        .iter()
        .zip(&first)
        .map(|((role, _), pw)| (*role, pw.as_str()))
        .collect();
    cluster.create_roles(&roles);
    cluster.clear_log();
    write_all(keys.path(), &first);

    // TCP to 127.0.0.1: the harness' hba wants SCRAM there, so no peer/trust way in.
    let conn = vec![
        "--pghost".to_owned(),
        "127.0.0.1".to_owned(),
        "--pgport".to_owned(),
        cluster.port.to_string(),
    ];
    let watcher = Watcher::start_with_conn(conn, keys.path(), &[]);
    watcher.wait_stderr("the first sync", "Password synchronization complete.");

    let mut all = vec![first];
    for round in 1..=2 {
        let mut next = all[round - 1].clone();
        next[0] = unique(&format!("su{round}-postgres"));
        next[1] = unique(&format!("su{round}-appuser"));
        write_all(keys.path(), &next);
        wait_login(&cluster, "postgres", &next[0]);
        wait_login(&cluster, "appuser", &next[1]);
        cluster.assert_no_login("postgres", &all[round - 1][0]);
        all.push(next);
    }
    // After the stop, so a warning logged late is not missed.
    let run = watcher.stop(&cluster);
    assert!(problems(&run.stderr).is_empty(), "{}", run.stderr);
    assert_no_leak(&refs(&all), Some(&cluster), &[&run]);
}

#[test]
fn an_empty_file_is_refused_and_the_next_valid_one_applied() {
    let Synced {
        cluster,
        keys,
        secrets: first,
        mut watcher,
    } = synced("empty0", &[]);

    keys.write_raw("postgres_app_user_pw.txt", b"");
    watcher.assert_app_file_warned("the empty file to be reported", "is empty");
    watcher.assert_alive();
    cluster.assert_login("appuser", &first[1]);
    for ((role, _), secret) in DEFAULT_ROLES.iter().zip(&first) {
        cluster.assert_login(role, secret);
    }

    let valid = unique("after-empty");
    keys.write("postgres_app_user_pw", &valid);
    wait_login(&cluster, "appuser", &valid);
    cluster.assert_no_login("appuser", &first[1]);
    let run = watcher.stop(&cluster);
    let first = [first];
    let mut secrets = refs(&first);
    secrets.push(&valid);
    assert_no_leak(&secrets, Some(&cluster), &[&run]);
}

#[test]
fn twenty_swaps_fifty_ms_apart_end_in_the_last_state() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let root = tempfile::tempdir().unwrap();
    let mut volume = SecretVolume::new(&root.path().join("secrets"));
    let mut all = vec![fresh("burst0")];
    update(&mut volume, &all[0]);
    let watcher = Watcher::start(&cluster, &volume.dir, &[]);
    wait_all(&cluster, &all[0]);

    for i in 1..=20 {
        let next = fresh(&format!("burst{i}"));
        update(&mut volume, &next);
        all.push(next);
        // Pacing of the producer (a rotation every 50 ms), not synchronisation.
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = all.last().unwrap();
    wait_all(&cluster, last);
    for ((role, _), old) in DEFAULT_ROLES.iter().zip(&all[19]) {
        cluster.assert_no_login(role, old);
    }
    // After the stop, so a warning logged late is not missed.
    let run = watcher.stop(&cluster);
    assert!(problems(&run.stderr).is_empty(), "{}", run.stderr);
    assert_no_leak(&refs(&all), Some(&cluster), &[&run]);
}

#[test]
fn a_secrets_directory_missing_at_start_is_picked_up_when_it_appears() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let root = tempfile::tempdir().unwrap();
    let dir: PathBuf = root.path().join("keys");
    let mut watcher = Watcher::start(&cluster, &dir, &[]);
    watcher.wait_stderr(
        "a warning about the missing directory",
        &format!("WARN secret directory {} does not exist", dir.display()),
    );
    watcher.assert_alive();

    let secrets = fresh("late");
    std::fs::create_dir(&dir).unwrap();
    write_all(&dir, &secrets);
    wait_all(&cluster, &secrets);
    let run = watcher.stop(&cluster);
    assert!(
        run.stderr
            .contains(&format!("secret directory {} appeared", dir.display())),
        "{}",
        run.stderr
    );
    assert_no_leak(&refs(&[secrets]), Some(&cluster), &[&run]);
}

#[test]
fn a_removed_and_recreated_secrets_directory_is_picked_up() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let root = tempfile::tempdir().unwrap();
    let dir: PathBuf = root.path().join("keys");
    std::fs::create_dir(&dir).unwrap();
    let first = fresh("mount0");
    write_all(&dir, &first);
    let mut watcher = Watcher::start(&cluster, &dir, &[]);
    wait_all(&cluster, &first);

    std::fs::remove_dir_all(&dir).unwrap();
    watcher.wait_stderr(
        "a warning about the vanished directory",
        &format!("secret directory {} does not exist", dir.display()),
    );
    watcher.assert_alive();
    // Nothing was applied meanwhile: the passwords in force stay.
    for ((role, _), secret) in DEFAULT_ROLES.iter().zip(&first) {
        cluster.assert_login(role, secret);
    }

    let second = fresh("mount1");
    std::fs::create_dir(&dir).unwrap();
    write_all(&dir, &second);
    wait_all(&cluster, &second);
    cluster.assert_no_login("appuser", &first[1]);
    let run = watcher.stop(&cluster);
    assert_no_leak(&refs(&[first, second]), Some(&cluster), &[&run]);
}

#[test]
fn sighup_restores_a_password_changed_behind_its_back_and_sigterm_exits_0() {
    // No periodic resync: only the SIGHUP can restore the password.
    let Synced {
        cluster,
        secrets,
        watcher,
        // Kept alive: unbound, the keys directory would be deleted at once.
        keys: _keys,
    } = synced("hup", &["--resync-interval", "0"]);

    let intruder = change_behind_its_back(&cluster, "appuser");
    cluster.assert_no_login("appuser", &secrets[1]);

    watcher.signal(Signal::SIGHUP);
    wait_login(&cluster, "appuser", &secrets[1]);
    cluster.assert_no_login("appuser", &intruder);
    // The report follows the COMMIT the login saw; a stop before it would drop it.
    watcher.wait_stderr("the resync report", "trigger: resync request");
    let run = watcher.stop(&cluster);
    assert!(run.stderr.contains("SIGHUP received"), "{}", run.stderr);
    assert!(
        run.stderr.contains("trigger: resync request"),
        "{}",
        run.stderr
    );
    assert_no_leak(&refs(&[secrets]), Some(&cluster), &[&run]);
}

/// A file change applies the roles whose file changed and leaves the others alone (no
/// check of their stored verifiers on the way to the new password): a password changed
/// behind our back stays until a full resync (here SIGHUP) restores it.
#[test]
fn a_file_change_applies_only_the_roles_whose_file_changed() {
    let Synced {
        cluster,
        keys,
        secrets,
        watcher,
    } = synced("only", &["--resync-interval", "0", "--debounce", "20ms"]);

    let intruder = change_behind_its_back(&cluster, "backupuser");
    let rotated = unique("only-rotated");
    write_file(keys.path(), "postgres_app_user_pw.txt", &rotated);
    wait_login(&cluster, "appuser", &rotated);
    watcher.wait_stderr("the rotation report", "passwords rotated: appuser changed,");
    cluster
        .login("backupuser", &intruder)
        .expect("a file change does not touch the roles whose file did not change");

    watcher.signal(Signal::SIGHUP);
    wait_login(&cluster, "backupuser", &secrets[2]);
    watcher.wait_stderr("the resync report", "passwords rotated: backupuser changed");
    let run = watcher.stop(&cluster);
    assert!(
        run.stderr.contains("passwords rotated: backupuser changed"),
        "the SIGHUP resync restored it: {}",
        run.stderr
    );
    assert_no_leak(&refs(&[secrets, vec![rotated]]), Some(&cluster), &[&run]);
}

#[test]
fn the_periodic_resync_restores_a_password_changed_behind_its_back() {
    let Synced {
        cluster,
        secrets,
        watcher,
        // Kept alive: unbound, the keys directory would be deleted at once.
        keys: _keys,
    } = synced("periodic", &["--resync-interval", "1s"]);

    change_behind_its_back(&cluster, "backupuser");
    wait_login(&cluster, "backupuser", &secrets[2]);
    watcher.wait_stderr("the resync report", "trigger: periodic resync");
    let run = watcher.stop(&cluster);
    assert!(
        run.stderr.contains("trigger: periodic resync"),
        "{}",
        run.stderr
    );
    assert_no_leak(&refs(&[secrets]), Some(&cluster), &[&run]);
}

#[test]
fn it_waits_for_the_server_and_retries_a_rotation_made_while_the_server_was_down() {
    let mut cluster = Cluster::init(&ClusterOptions::default());
    let keys = Keys::new();
    let first = fresh("down0");
    write_all(keys.path(), &first);
    let watcher = Watcher::start(&cluster, keys.path(), &[]);
    watcher.wait_stderr("the wait for the server", "waiting for PostgreSQL");

    cluster.start();
    create_app_roles(&cluster);
    // The app roles did not exist at the first sync (reported missing); the SIGHUP resync
    // gives them their passwords.
    watcher.wait_stderr("the first sync", "Password synchronization complete.");
    watcher.signal(Signal::SIGHUP);
    wait_all(&cluster, &first);

    cluster.stop();
    let second = fresh("down1");
    write_all(keys.path(), &second);
    watcher.wait_stderr("the failed apply", "retrying in");
    cluster.start();
    wait_all(&cluster, &second);
    let run = watcher.stop(&cluster);
    assert_no_leak(&refs(&[first, second]), Some(&cluster), &[&run]);
}

#[test]
fn a_sidecar_without_the_data_directory_reports_health_from_its_syncs() {
    // A sidecar shares the socket, not PGDATA: health must judge by the watcher's syncs.
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let keys = Keys::new();
    let first = fresh("side0");
    write_all(keys.path(), &first);
    let mut conn = cluster.conn_args();
    let at = conn.iter().position(|a| a == "--pgdata").unwrap();
    conn[at + 1] = "/nonexistent-pgdata".into();
    // A ten-minute debounce keeps the in-place rewrite below unsynced while health looks
    // at it (a rename would be applied at once, whatever the debounce).
    let watcher = Watcher::start_with_conn(conn, keys.path(), &["--debounce", "10m"]);
    wait_all(&cluster, &first);
    let health = || {
        let mut cmd = bin();
        cmd.args(["health", "--pgdata", "/nonexistent-pgdata", "--state-dir"])
            .arg(watcher._state.path());
        run(cmd)
    };
    wait_until(LIMIT, "health to report the first sync", || {
        health().code() == Some(0)
    });
    let changed = unique("side1");
    std::fs::write(
        keys.path().join("postgres_app_user_pw.txt"),
        format!("{changed}\n"),
    )
    .unwrap();
    let out = health().with_server_log(&cluster.log).expect_code(8);
    assert!(
        out.stderr.contains("changed since the last sync"),
        "{}",
        out.describe()
    );
    let run = watcher.stop(&cluster);
    let first = [first];
    let mut secrets = refs(&first);
    secrets.push(changed.as_str());
    assert_no_leak(&secrets, Some(&cluster), &[&run, &out]);
}

/// Failover seen from a sidecar without the data directory: on a hot standby
/// (`pg_basebackup`) `health` says standby (healthy) from the watcher's syncs alone; after
/// `pg_ctl promote` the promotion's sync applies the files and `health` no longer does.
#[test]
fn a_sidecar_on_a_standby_reports_it_until_the_promotion() {
    let primary = Cluster::start_default();
    create_app_roles(&primary);
    let mut standby = Standby::of(&primary, "pps-sidecar-standby-");
    standby.start();
    let keys = Keys::new();
    let secrets = fresh("sidestandby");
    write_all(keys.path(), &secrets);
    let conn = vec![
        "--pghost".into(),
        standby.sock.display().to_string(),
        "--pgport".into(),
        standby.port.to_string(),
        "--pgdata".into(),
        "/nonexistent-pgdata".into(),
    ];
    let mut watcher = Watcher::start_with_conn(conn, keys.path(), &[]);
    watcher.wait_stderr(
        "the sync to be skipped",
        "standby (in recovery): sync skipped",
    );
    let health = || {
        let mut cmd = bin();
        cmd.args(["health", "--pgdata", "/nonexistent-pgdata", "--keys-dir"])
            .arg(keys.path())
            .arg("--state-dir")
            .arg(watcher._state.path());
        run(cmd)
    };
    let on_standby = health().expect_ok();
    on_standby.expect_stdout("PostgreSQL is a standby (in recovery)");
    login_tcp(standby.port, "appuser", &secrets[1])
        .expect_err("a standby keeps the primary's passwords");

    standby.promote();
    for ((role, _), secret) in DEFAULT_ROLES.iter().zip(&secrets) {
        wait_until(
            LIMIT,
            &format!("{role} to log in after the promotion"),
            || login_tcp(standby.port, role, secret).is_ok(),
        );
    }
    // The state is written just after the commit those logins saw.
    wait_until(LIMIT, "health to stop saying standby", || {
        let h = health();
        h.code() == Some(0) && !h.stdout.contains("standby")
    });
    let promoted = health().expect_ok();

    watcher.assert_alive();
    watcher.signal(Signal::SIGTERM);
    let out = watcher.running.finish(LIMIT).expect_ok();
    assert_no_leak(&refs(&[secrets]), None, &[&out, &on_standby, &promoted]);
}

// ------------------------------------------------ when a file's value is taken, and storms

/// Opens `path` for an in-place rewrite: same inode, truncated, one descriptor.
fn open_in_place(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

/// Lines of `stderr` that report a rotation (one per applied change).
fn rotations(stderr: &str) -> usize {
    stderr.matches("passwords rotated").count()
}

/// Polls, for `duration`, that `role` never logs in with `password` (the watcher must not
/// have applied it), with a short pause between attempts.
fn never_logs_in(cluster: &Cluster, role: &str, password: &str, duration: Duration) {
    let started = std::time::Instant::now();
    while started.elapsed() < duration {
        assert!(
            cluster.login(role, password).is_err(),
            "{role} logged in with a half-written value after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_file_rewritten_in_place_in_two_chunks_is_never_applied_half() {
    let Synced {
        cluster,
        keys,
        secrets,
        mut watcher,
    } = synced("chunks", &[]);
    let path = keys.path().join("postgres_app_user_pw.txt");
    // The first chunk alone is long enough to pass every value rule: only the rule for
    // when a value is taken can keep it out.
    let first_half = unique("FirstHalf-long-enough");
    let second_half = unique("-SecondHalf");
    let whole = format!("{first_half}{second_half}");
    let before = rotations(&watcher.stderr());

    let mut file = open_in_place(&path);
    file.write_all(first_half.as_bytes()).unwrap();
    file.flush().unwrap();
    // One second between the chunks, through the same open descriptor: far longer than
    // the 50 ms quiet period and the old one-second maximum wait.
    never_logs_in(
        &cluster,
        "appuser",
        &first_half,
        Duration::from_millis(1_200),
    );
    cluster.assert_login("appuser", &secrets[1]);
    writeln!(file, "{second_half}").unwrap();
    drop(file);

    wait_login(&cluster, "appuser", &whole);
    cluster.assert_no_login("appuser", &first_half);
    let stderr = watcher.wait_rotation_after(before);
    assert_eq!(
        rotations(&stderr) - before,
        1,
        "one rotation, of the whole value:\n{stderr}"
    );
    watcher.assert_alive();
    let run = watcher.stop(&cluster);
    assert_none_leaked(
        &cluster,
        &[secrets],
        &[first_half.as_str(), whole.as_str()],
        &run,
    );
}

#[test]
fn a_slow_writer_past_the_maximum_wait_is_applied_only_when_it_closes() {
    // The default quiet period (250 ms): ten of them are the maximum wait, 2.5 s.
    let Synced {
        cluster,
        keys,
        secrets,
        watcher,
    } = synced("slow", &["--debounce", "250ms"]);
    let path = keys.path().join("postgres_app_user_pw.txt");
    let chunks: Vec<String> = (0..8).map(|i| format!("chunk{i}-{}", unique(""))).collect();
    let whole = chunks.concat();
    let before = rotations(&watcher.stderr());

    let mut file = open_in_place(&path);
    let mut written = String::new();
    for chunk in &chunks {
        file.write_all(chunk.as_bytes()).unwrap();
        file.flush().unwrap();
        written.push_str(chunk);
        // 8 × 450 ms: the writer holds the file for 3.6 s, past the maximum wait.
        never_logs_in(&cluster, "appuser", &written, Duration::from_millis(450));
    }
    // Still open: the old password is in force, nothing was rotated.
    cluster.assert_login("appuser", &secrets[1]);
    assert_eq!(rotations(&watcher.stderr()), before, "{}", watcher.stderr());
    writeln!(file).unwrap();
    drop(file);

    wait_login(&cluster, "appuser", &whole);
    let stderr = watcher.wait_rotation_after(before);
    assert_eq!(rotations(&stderr) - before, 1, "{stderr}");
    let run = watcher.stop(&cluster);
    assert_none_leaked(&cluster, &[secrets, chunks], &[whole.as_str()], &run);
}

#[test]
fn a_writer_killed_after_one_byte_is_refused_by_the_minimum_length() {
    let Synced {
        cluster,
        keys,
        secrets,
        watcher,
    } = synced("killed", &[]);
    let path = keys.path().join("postgres_app_user_pw.txt");
    let before = rotations(&watcher.stderr());
    // A shell that truncates the file, writes one byte and is killed with the descriptor
    // still open (the kernel closes it).
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3>"$1"; printf F >&3; kill -KILL $$"#)
        .arg("sh")
        .arg(&path)
        .status()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the writer was killed"
    );
    // Compared, not printed: anything else there would be a password.
    assert!(
        std::fs::read(&path).unwrap() == b"F",
        "postgres_app_user_pw.txt does not hold the killed writer's one byte"
    );
    let stderr = watcher.assert_app_file_warned("the one-byte file to be refused", "minimum of 12");
    cluster.assert_login("appuser", &secrets[1]);
    cluster.assert_no_login("appuser", "F");
    assert_eq!(rotations(&stderr), before, "{stderr}");

    // The next valid value is applied.
    let fixed = unique("fixed");
    write_file(keys.path(), "postgres_app_user_pw.txt", &fixed);
    wait_login(&cluster, "appuser", &fixed);
    let run = watcher.stop(&cluster);
    assert_none_leaked(&cluster, &[secrets], &[fixed.as_str()], &run);
}

#[test]
fn a_plain_rename_is_applied_without_waiting_for_the_debounce() {
    // With a ten-minute quiet period only the rename itself (complete on arrival) can get
    // the new password in force within the liveness bound; a second rename right after
    // is applied too.
    let Synced {
        cluster,
        keys,
        secrets,
        watcher,
    } = synced("rename", &["--debounce", "10m", "--resync-interval", "0"]);
    let first = unique("renamed-once");
    write_file(keys.path(), "postgres_app_user_pw.txt", &first);
    let second = unique("renamed-twice");
    write_file(keys.path(), "postgres_app_ro_pw.txt", &second);
    wait_login(&cluster, "appuser", &first);
    wait_login(&cluster, "backupuser", &second);
    let run = watcher.stop(&cluster);
    assert!(problems(&run.stderr).is_empty(), "{}", run.stderr);
    assert_none_leaked(
        &cluster,
        &[secrets],
        &[first.as_str(), second.as_str()],
        &run,
    );
}

/// The resyncs of every role a watcher's debug log shows for SIGHUP.
fn requested_resyncs(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains("sync transaction done") && l.contains("resync request"))
        .count()
}

#[test]
fn a_storm_of_a_thousand_sighups_costs_a_handful_of_resyncs() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let keys = Keys::new();
    let secrets = fresh("storm");
    write_all(keys.path(), &secrets);
    let mut cmd = bin();
    cmd.env("RUST_LOG", "debug");
    let watcher = Watcher::start_wrapped(cmd, cluster.conn_args(), keys.path(), &[]);
    wait_all(&cluster, &secrets);
    watcher.wait_stderr("the watch loop", "watching 1 secret directory");

    // Paced, so that each signal is received on its own (back-to-back signals would
    // merge in the kernel already): about a second and a half of SIGHUPs.
    let storm = std::time::Instant::now();
    for _ in 0..1_000 {
        watcher.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_micros(1_500));
    }
    // One resync at once, then at most one a second while the storm lasts, and one for
    // the requests of its last second.
    let allowed = 2 + storm.elapsed().as_secs() as usize;
    // Until the resyncs stop coming: at least one, then none for three seconds (three
    // times the spacing of resyncs, so a deferred one is not missed).
    let mut last = (0, std::time::Instant::now());
    wait_until(Duration::from_secs(60), "the resyncs to end", || {
        let count = requested_resyncs(&watcher.stderr());
        if count != last.0 {
            last = (count, std::time::Instant::now());
        }
        count > 0 && last.1.elapsed() > Duration::from_secs(3)
    });
    let resyncs = requested_resyncs(&watcher.stderr());
    assert!(
        (1..=allowed).contains(&resyncs),
        "1,000 SIGHUPs cost {resyncs} full resyncs (at most {allowed})"
    );
    // Still answering: a password changed behind its back is restored by the next one.
    let intruder = change_behind_its_back(&cluster, "appuser");
    watcher.signal(Signal::SIGHUP);
    wait_login(&cluster, "appuser", &secrets[1]);
    let run = watcher.stop(&cluster);
    assert_none_leaked(&cluster, &[secrets], &[intruder.as_str()], &run);
}

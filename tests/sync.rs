//! `sync` and `verify` against real PostgreSQL clusters (from `PG_BINDIR`): passwords
//! change in one transaction, only SCRAM verifiers reach the server, nothing leaks, and
//! every kind of bad input exits with its documented code.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::common::session::{SYNC_LOCK, Session};
use crate::common::*;
use nix::sys::signal::Signal;

/// Creates the four default roles with old passwords and writes new ones to `keys`.
/// Returns the new secrets in DEFAULT_ROLES order.
fn setup(cluster: &Cluster, keys: &Keys) -> Vec<String> {
    cluster.create_throwaway_roles(DEFAULT_ROLES.map(|(role, _)| role));
    keys.write_new(&DEFAULT_ROLES, "new pw'\"\\ ü")
}

/// Neither an `ALTER ROLE … PASSWORD` statement nor a verifier is in the server log.
fn assert_no_password_statement(log: &str) {
    assert!(
        !log.contains("ALTER ROLE"),
        "a password statement reached the server log"
    );
    assert!(
        !log.contains("SCRAM-SHA-256$"),
        "a verifier reached the server log"
    );
}

/// `sub` (sync, verify) against the cluster and keys, with extra arguments.
fn run_with(sub: &str, cluster: &Cluster, keys: &Keys, extra: &[&str]) -> Run {
    let mut cmd = bin_for(sub, cluster, keys);
    cmd.args(extra);
    cluster.run(cmd)
}

/// A started cluster with the default roles on old passwords, and keys with new ones.
fn started() -> (Cluster, Keys, Vec<String>) {
    set_up_on(Cluster::start_default())
}

/// `cluster` with the default roles on old passwords, and keys with new ones.
fn set_up_on(cluster: Cluster) -> (Cluster, Keys, Vec<String>) {
    let keys = Keys::new();
    let secrets = setup(&cluster, &keys);
    (cluster, keys, secrets)
}

/// `pg_authid.rolpassword` of the default roles, in DEFAULT_ROLES order.
fn stored_verifiers(cluster: &Cluster) -> Vec<Option<String>> {
    DEFAULT_ROLES
        .iter()
        .map(|(role, _)| cluster.rolpassword(role))
        .collect()
}

/// The roles whose verifier differs between two `stored_verifiers`, for failure messages
/// (they name roles; the verifiers themselves are secrets and never shown).
fn changed_roles(before: &[Option<String>], after: &[Option<String>]) -> Vec<&'static str> {
    DEFAULT_ROLES
        .iter()
        .enumerate()
        .filter(|(i, _)| before.get(*i) != after.get(*i))
        .map(|(_, (role, _))| *role)
        .collect()
}

fn secrets_ref(secrets: &[String]) -> Vec<&str> {
    secrets.iter().map(String::as_str).collect()
}

/// Every default role logs in with its new secret (`secrets` in DEFAULT_ROLES order).
fn assert_new_passwords_log_in(cluster: &Cluster, secrets: &[String]) {
    for ((role, _), secret) in DEFAULT_ROLES.iter().zip(secrets) {
        cluster.assert_login(role, secret);
    }
}

#[test]
fn four_roles_move_to_new_passwords_and_old_ones_stop_working() {
    let cluster = Cluster::start_default();
    let keys = Keys::new();
    let old_app = unique("old-app");
    cluster.create_roles(&[("appuser", &old_app)]);
    let secrets = setup(&cluster, &keys);
    cluster.assert_no_login("appuser", &secrets[1]);

    let out = cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    for (role, _) in DEFAULT_ROLES {
        out.expect_stdout(&format!("role {role:?}: changed"));
    }
    assert_eq!(
        out.stdout.lines().last(),
        Some("Password synchronization complete.")
    );
    assert_new_passwords_log_in(&cluster, &secrets);
    cluster.assert_no_login("appuser", &old_app);
    for (role, _) in DEFAULT_ROLES {
        let stored = cluster.rolpassword(role).unwrap();
        assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{role}");
    }
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn second_run_reports_unchanged_and_leaves_verifiers_byte_identical() {
    let (cluster, keys, secrets) = started();
    cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    let before = stored_verifiers(&cluster);

    let out = cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    for (role, _) in DEFAULT_ROLES {
        out.expect_stdout(&format!("role {role:?}: unchanged"));
    }
    let after = stored_verifiers(&cluster);
    assert!(
        before == after,
        "the second run changed the verifiers of {:?}",
        changed_roles(&before, &after)
    );
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn json_report_and_dry_run_changes_nothing() {
    let (cluster, keys, secrets) = started();
    let before = stored_verifiers(&cluster);

    let out = run_with("sync", &cluster, &keys, &["--dry-run", "--format", "json"]).expect_ok();
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(report["dry_run"], true);
    let statuses: Vec<&str> = report["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["would_change"; 4]);
    let after = stored_verifiers(&cluster);
    assert!(
        before == after,
        "--dry-run changed the verifiers of {:?}",
        changed_roles(&before, &after)
    );
    cluster.assert_no_login("appuser", &secrets[1]);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_failing_statement_rolls_back_everything_and_leaks_nothing() {
    // `pg_monitor` is a predefined role: ALTER ROLE … PASSWORD on it fails inside the
    // transaction, after `appuser` was already altered. With log_min_error_statement=error
    // a failing plaintext statement would be logged in full.
    let cluster = Cluster::start_default();
    let keys = Keys::new();
    let old = unique("old-app");
    cluster.create_roles(&[("appuser", &old)]);
    let new_app = unique("new-app");
    let monitor = unique("monitor");
    keys.write("app", &new_app);
    keys.write("monitor", &monitor);
    cluster.clear_log();
    let mut cmd = bin();
    cmd.arg("sync")
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(keys.path())
        .args(["--role", "appuser=app", "--role", "pg_monitor=monitor"]);
    let out = cluster.run(cmd).expect_code(5);
    out.expect_stderr("pg_monitor");
    cluster.assert_login("appuser", &old);
    cluster.assert_no_login("appuser", &new_app);
    let log = cluster.log_text();
    assert!(
        log.contains("ERROR"),
        "the statement did fail on the server:\n{}",
        cluster.log_tail(20)
    );
    assert_no_password_statement(&log);
    assert_no_leak(&[&new_app, &monitor], Some(&cluster), &[&out]);
}

#[test]
fn only_verifiers_are_sent_and_no_logging_setting_shows_them() {
    // md5 as the server default: a plaintext ALTER ROLE would be stored as md5, so a SCRAM
    // verifier in pg_authid proves the client sent one. Every logging knob that can print
    // a statement is turned up; none may show the verifier or the statement.
    let cluster = Cluster::start_with(&ClusterOptions {
        extra_conf: vec![
            "password_encryption = 'md5'".into(),
            "log_min_duration_statement = 0".into(),
            "log_min_duration_sample = 0".into(),
            "log_statement_sample_rate = 1".into(),
            "log_transaction_sample_rate = 1".into(),
            "debug_print_parse = on".into(),
            "debug_print_rewritten = on".into(),
            "debug_print_plan = on".into(),
        ],
        ..ClusterOptions::default()
    });
    let keys = Keys::new();
    let secrets = setup(&cluster, &keys);
    let out = cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    for (role, _) in DEFAULT_ROLES {
        let stored = cluster.rolpassword(role).unwrap();
        assert!(
            stored.starts_with("SCRAM-SHA-256$4096:"),
            "{role}: a plaintext was sent"
        );
    }
    let log = cluster.log_text();
    assert!(log.contains("duration:"), "the noisy settings are in force");
    assert_no_password_statement(&log);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn twenty_concurrent_syncs_all_succeed() {
    let (cluster, keys, secrets) = started();
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let cmd = bin_for("sync", &cluster, &keys);
            std::thread::spawn(move || run(cmd))
        })
        .collect();
    let runs: Vec<Run> = handles
        .into_iter()
        .map(|h| h.join().unwrap().with_server_log(&cluster.log).expect_ok())
        .collect();
    let mut changed = 0;
    for out in &runs {
        changed += out.stdout.matches(": changed").count();
    }
    // Serialised by the advisory lock: each role is changed by exactly one run.
    assert_eq!(changed, 4, "each role changed once across all runs");
    assert_new_passwords_log_in(&cluster, &secrets);
    let refs: Vec<&Run> = runs.iter().collect();
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &refs);
}

#[test]
fn verify_passes_after_sync_and_names_the_role_changed_behind_its_back() {
    let (cluster, keys, secrets) = started();
    cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();

    let out = run_with("verify", &cluster, &keys, &["--host", "127.0.0.1"]).expect_ok();
    assert_eq!(out.stdout.matches(": ok").count(), 4, "{}", out.describe());

    cluster.psql("ALTER ROLE backupuser PASSWORD 'changed-behind-its-back'");
    let out2 = cluster
        .run(bin_for("verify", &cluster, &keys))
        .expect_code(7);
    out2.expect_stdout("role \"backupuser\": FAILED");
    out2.expect_stderr("backupuser");
    assert_eq!(out2.stdout.matches(": ok").count(), 3);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out, &out2]);
}

#[test]
fn verify_checks_that_the_owner_refuses_login() {
    let (cluster, keys, secrets) = started();
    let owner_pw = unique("owner");
    cluster.psql(&format!(
        "CREATE ROLE appowner NOLOGIN PASSWORD {}",
        quote_literal(&owner_pw)
    ));
    keys.write("postgres_app_owner_pw", &owner_pw);
    cluster.clear_log();
    cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    let out = run_with("verify", &cluster, &keys, &["--owner", "appowner"]).expect_ok();
    out.expect_stdout("role \"appowner\": ok (refuses login");

    cluster.psql("ALTER ROLE appowner LOGIN");
    let out2 = run_with("verify", &cluster, &keys, &["--owner", "appowner"]).expect_code(7);
    let mut all = secrets_ref(&secrets);
    all.push(&owner_pw);
    assert_no_leak(&all, Some(&cluster), &[&out, &out2]);
}

#[test]
fn as_root_with_only_peer_for_postgres_and_root_only_secret_files() {
    if !is_root() {
        skip("needs root (CI runs as root)");
        return;
    }
    let cluster = Cluster::start_with(&ClusterOptions {
        hba: Some("local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256\n".into()),
        ..ClusterOptions::default()
    });
    let keys = Keys::new();
    let secrets = setup(&cluster, &keys);
    for entry in std::fs::read_dir(keys.path()).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    }
    // The superuser's password file is wrong, so only peer authentication can work.
    keys.write("postgres_password", &secrets[0]);
    let out = run_with(
        "sync",
        &cluster,
        &keys,
        &[
            "--role",
            "appuser=postgres_app_user_pw",
            "--postgres-password-file",
            "/nonexistent",
        ],
    )
    .expect_ok();
    out.expect_stdout("role \"appuser\": changed");
    cluster.assert_login("appuser", &secrets[1]);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn falls_back_to_the_superuser_password_file() {
    // No peer rule at all: the sync must authenticate with postgres_password over the socket.
    let mut cluster = Cluster::init(&ClusterOptions {
        hba: Some("local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n".into()),
        ..ClusterOptions::default()
    });
    let old_super = unique("old-super");
    // Set the superuser password while trust still applies (initdb -A trust template).
    std::fs::write(
        cluster.data.join("pg_hba.conf.scram"),
        std::fs::read(cluster.data.join("pg_hba.conf")).unwrap(),
    )
    .unwrap();
    std::fs::write(cluster.data.join("pg_hba.conf"), "local all all trust\n").unwrap();
    cluster.start();
    cluster.psql(&format!(
        "ALTER ROLE postgres PASSWORD {}",
        quote_literal(&old_super)
    ));
    let new_app = unique("new-app");
    cluster.create_roles(&[("appuser", "x-old")]);
    std::fs::rename(
        cluster.data.join("pg_hba.conf.scram"),
        cluster.data.join("pg_hba.conf"),
    )
    .unwrap();
    cluster.psql("SELECT pg_reload_conf()");
    cluster.clear_log();
    let keys = Keys::new();
    keys.write("postgres_password", &old_super);
    keys.write("postgres_app_user_pw", &new_app);
    let mut cmd = bin();
    cmd.arg("sync")
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(keys.path())
        .args(["--role", "appuser=postgres_app_user_pw"]);
    let out = cluster.run(cmd).expect_ok();
    cluster.assert_login("appuser", &new_app);
    assert_no_leak(&[&old_super, &new_app], Some(&cluster), &[&out]);
}

#[test]
fn odd_role_names_and_passwords_work_exactly() {
    let cluster = Cluster::start_default();
    let keys = Keys::new();
    let names = [
        "Mixed Case",
        "with \"quotes\" and 'apostrophes'",
        "ünïcødé rôle",
        "back\\slash",
    ];
    let passwords: Vec<String> = [
        "  leading and trailing spaces  ",
        "quo'te\"dbl\\back",
        "ünïcødé €𝄞",
        "tab\there",
    ]
    .iter()
    .map(|p| format!("{p}{}", unique("")))
    .collect();
    let olds: Vec<(&str, &str)> = names.iter().map(|n| (*n, "old-password")).collect();
    cluster.create_roles(&olds);
    cluster.clear_log();
    let mut cmd = bin();
    cmd.arg("sync")
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(keys.path());
    for (i, (name, password)) in names.iter().zip(&passwords).enumerate() {
        keys.write_raw(&format!("r{i}"), format!("{password}\r\n").as_bytes());
        cmd.arg("--role").arg(format!("{name}=r{i}"));
    }
    let out = cluster.run(cmd).expect_ok();
    for (name, password) in names.iter().zip(&passwords) {
        cluster.assert_login(name, password);
        // Only the trailing CR/LF was stripped: a trimmed variant must not log in.
        if password.trim() != password {
            cluster.assert_no_login(name, password.trim());
        }
    }
    let refs: Vec<&str> = passwords.iter().map(String::as_str).collect();
    assert_no_leak(&refs, Some(&cluster), &[&out]);
}

#[test]
fn missing_role_is_a_warning_or_an_error_under_strict() {
    let (cluster, keys, secrets) = started();
    keys.write("ghost_pw", &unique("ghost"));
    let out = run_with(
        "sync",
        &cluster,
        &keys,
        &[
            "--role",
            "appuser=postgres_app_user_pw",
            "--role",
            "ghost=ghost_pw",
        ],
    )
    .expect_ok();
    out.expect_stdout("role \"ghost\": missing");
    out.expect_stderr("WARN");
    cluster.assert_login("appuser", &secrets[1]);

    cluster.psql("ALTER ROLE appuser PASSWORD 'reset-behind-its-back'");
    let out2 = run_with(
        "sync",
        &cluster,
        &keys,
        &[
            "--strict",
            "--role",
            "appuser=postgres_app_user_pw",
            "--role",
            "ghost=ghost_pw",
        ],
    )
    .expect_code(6);
    out2.expect_stderr("ghost");
    // Nothing applied under --strict.
    cluster.assert_no_login("appuser", &secrets[1]);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out, &out2]);
}

/// Every bad secret file: exit 3, one line naming the file, nothing applied.
#[test]
fn bad_secret_files_apply_nothing_and_name_the_file() {
    let (cluster, keys, secrets) = started();
    cluster.run(bin_for("sync", &cluster, &keys)).expect_ok();
    let good_backup = unique("good-new");
    type Breaker = Box<dyn Fn(&Keys)>;
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "missing",
            Box::new(|k: &Keys| {
                std::fs::remove_file(k.path().join("postgres_app_ro_pw.txt")).unwrap()
            }),
        ),
        (
            "empty",
            Box::new(|k: &Keys| k.write_raw("postgres_app_ro_pw.txt", b"")),
        ),
        (
            "whitespace",
            Box::new(|k: &Keys| k.write_raw("postgres_app_ro_pw.txt", b"  \t \n")),
        ),
        (
            "nul",
            Box::new(|k: &Keys| k.write_raw("postgres_app_ro_pw.txt", b"abc\0def\n")),
        ),
        (
            "utf8",
            Box::new(|k: &Keys| k.write_raw("postgres_app_ro_pw.txt", b"abc\xff\xfedef\n")),
        ),
        (
            "oversize",
            Box::new(|k: &Keys| k.write_raw("postgres_app_ro_pw.txt", &[b'x'; 5000])),
        ),
        (
            "directory",
            Box::new(|k: &Keys| {
                std::fs::remove_file(k.path().join("postgres_app_ro_pw.txt")).unwrap();
                std::fs::create_dir(k.path().join("postgres_app_ro_pw.txt")).unwrap();
            }),
        ),
    ];
    for (what, break_it) in cases {
        // A valid change to another role that must NOT be applied.
        keys.write("postgres_app_user_pw", &good_backup);
        break_it(&keys);
        let out = cluster.run(bin_for("sync", &cluster, &keys)).expect_code(3);
        let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{what}: {}", out.describe());
        assert!(
            errors[0].contains("postgres_app_ro_pw"),
            "{what}: {}",
            out.describe()
        );
        assert!(out.stdout.is_empty(), "{what}: {}", out.describe());
        cluster.assert_no_login("appuser", &good_backup);
        cluster.assert_login("appuser", &secrets[1]);
        assert_no_leak(&[&good_backup, &secrets[1]], Some(&cluster), &[&out]);
        // Restore.
        let path = keys.path().join("postgres_app_ro_pw.txt");
        if path.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        }
        keys.write("postgres_app_ro_pw", &secrets[2]);
        keys.write("postgres_app_user_pw", &secrets[1]);
    }
}

#[test]
fn unreadable_secret_file_is_a_config_error() {
    let keys = Keys::new();
    keys.write("x", "value");
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        keys.path().join("x.txt"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    // Root reads any file whatever its mode: run the binary as `nobody` then.
    let mut cmd = if is_root() {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(shared_copy(BIN))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd
    } else {
        bin()
    };
    cmd.arg("sync")
        .arg("--keys-dir")
        .arg(keys.path())
        .args(["--role", "r=x"]);
    let out = run(cmd).expect_code(3);
    out.expect_stderr("x.txt");
    out.expect_stderr("ermission denied");
}

#[test]
fn configuration_errors_exit_3_before_connecting() {
    let keys = Keys::new();
    keys.write("x", "value");
    for bad in [
        vec!["--role", "no-equals-sign"],
        vec![
            "--role",
            &*Box::leak(format!("{}=x", "r".repeat(64)).into_boxed_str()),
        ],
        vec!["--role", "=x"],
    ] {
        let mut cmd = bin();
        cmd.arg("sync")
            .arg("--keys-dir")
            .arg(keys.path())
            .args(&bad)
            .args(["--pghost", "/nonexistent"]);
        let out = run(cmd).expect_code(3);
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "one line: {}",
            out.describe()
        );
    }
}

#[test]
fn server_down_or_wrong_port_is_a_connect_error_without_hanging() {
    let keys = Keys::new();
    for (name, _) in DEFAULT_ROLES.iter().map(|(r, f)| (f, r)) {
        keys.write(name, &unique("v"));
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    for host in [dir.path().display().to_string(), "127.0.0.1".to_owned()] {
        let mut cmd = bin();
        cmd.arg("sync").arg("--keys-dir").arg(keys.path()).args([
            "--pghost",
            &host,
            "--pgport",
            &port,
            "--connect-timeout",
            "3s",
        ]);
        let out = run(cmd).expect_code(4);
        assert!(
            out.elapsed < Duration::from_secs(30),
            "took {:?}",
            out.elapsed
        );
        out.expect_stderr("cannot connect");
    }
}

#[test]
fn the_server_under_test_is_the_major_pg_bindir_names() {
    // The major-version matrix runs this suite with PG_BINDIR pointing at each major: make
    // sure the cluster really is that server, not a default one found elsewhere.
    let cluster = Cluster::start_default();
    let num: u32 = cluster
        .psql("SHOW server_version_num")
        .parse()
        .expect("server_version_num is a number");
    assert_eq!(num / 10_000, pg_major(), "PG_BINDIR={:?}", pg_bindir());
}

// ---- Hostile sessions: bounded rotation time, deadlocks, odd role names, iterations ----

/// Gives `role` a known password (test setup, then the log is cleared) and returns it.
fn known_password(cluster: &Cluster, role: &str) -> String {
    let password = unique("hostile-own");
    cluster.create_roles(&[(role, &password)]);
    cluster.clear_log();
    password
}

/// A session of appuser logged in with a known password (the leaked login), and that
/// password.
fn hostile_login(cluster: &Cluster) -> (String, Session) {
    let own = known_password(cluster, "appuser");
    let session = Session::connect(cluster.port, "appuser", &own);
    (own, session)
}

/// `known_password` for a role that is then made a superuser (the log cleared again).
fn known_superuser(cluster: &Cluster, role: &str) -> String {
    let password = known_password(cluster, role);
    cluster.psql(&format!("ALTER ROLE {} SUPERUSER", quote_ident(role)));
    cluster.clear_log();
    password
}

/// The sync against `cluster`, with the blocking-session settings in the environment (so
/// a build without them ignores them and shows the unbounded wait).
fn sync_with_env(cluster: &Cluster, keys: &Keys, env: &[(&str, &str)]) -> Run {
    let mut cmd = bin_for("sync", cluster, keys);
    for (name, value) in env {
        cmd.env(name, value);
    }
    // Well beyond every bound the tests set; a sync that waits forever fails here.
    Running::spawn(cmd).finish(Duration::from_secs(45))
}

/// The setting that ends blocking non-superuser sessions after a time (or `off`).
const TERMINATE_AFTER: &str = "PG_PASSWORD_SYNC_TERMINATE_BLOCKERS_AFTER";

/// The sync with ending blocking sessions after `terminate_after` and giving up waiting
/// for the lock after `lock_wait`.
fn sync_bounded(cluster: &Cluster, keys: &Keys, terminate_after: &str, lock_wait: &str) -> Run {
    sync_with_env(
        cluster,
        keys,
        &[
            (TERMINATE_AFTER, terminate_after),
            ("PG_PASSWORD_SYNC_LOCK_WAIT_TIMEOUT", lock_wait),
        ],
    )
}

/// The rotation applied: every new secret logs in, appuser's `refused` passwords no
/// longer do, no verifier reached the server log and no secret leaked.
fn assert_rotated(cluster: &Cluster, secrets: &[String], refused: &[&str], out: &Run) {
    assert_new_passwords_log_in(cluster, secrets);
    for password in refused {
        cluster.assert_no_login("appuser", password);
    }
    assert_no_verifier_in_log(cluster);
    assert_no_leak(&secrets_ref(secrets), Some(cluster), &[out]);
}

/// The role's verifier is not in the server log, nor any password statement of ours.
fn assert_no_verifier_in_log(cluster: &Cluster) {
    let log = cluster.log_text();
    assert!(
        !log.contains("SCRAM-SHA-256$"),
        "a verifier reached the server log"
    );
}

#[test]
fn a_login_holding_the_sync_lock_is_ended_and_the_rotation_applies() {
    let (cluster, keys, secrets) = started();
    let (own, hostile) = hostile_login(&cluster);
    hostile.hold_sync_lock();

    let out = sync_with_env(&cluster, &keys, &[(TERMINATE_AFTER, "2s")]);
    let out = out.expect_ok();
    out.expect_stderr("the sync is blocked by other sessions: ")
        .expect_stderr(&format!(
            "pid {} (role \"appuser\", \"idle\" for ",
            hostile.pid
        ))
        .expect_stderr("ended blocking non-superuser sessions: ");
    assert!(out.elapsed >= Duration::from_secs(2), "{:?}", out.elapsed);
    assert!(!hostile.alive(), "the blocking session was ended");
    assert_new_passwords_log_in(&cluster, &secrets);
    cluster.assert_no_login("appuser", &own);
    assert_no_password_statement(&cluster.log_text());
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_login_holding_its_own_pg_authid_row_is_ended_and_the_rotation_applies() {
    let (cluster, keys, secrets) = started();
    let (own, hostile) = hostile_login(&cluster);
    let other = unique("hostile-other");
    hostile.lock_own_row(&other);

    let out = sync_with_env(&cluster, &keys, &[(TERMINATE_AFTER, "2s")]);
    let out = out.expect_ok();
    out.expect_stdout("role \"appuser\": changed")
        .expect_stderr(&format!(
            "pid {} (role \"appuser\", \"idle in transaction\" for ",
            hostile.pid
        ))
        .expect_stderr("ended blocking non-superuser sessions: ");
    assert!(!hostile.alive(), "the blocking session was ended");
    assert_rotated(&cluster, &secrets, &[&own, &other], &out);
}

#[test]
fn a_superuser_session_blocking_the_sync_is_named_waited_for_and_never_ended() {
    let (cluster, keys, secrets) = started();
    let boss = known_superuser(&cluster, "boss");
    let admin = Session::connect(cluster.port, "boss", &boss);
    admin.hold_sync_lock();
    let before = stored_verifiers(&cluster);

    let out = sync_bounded(&cluster, &keys, "1s", "3s");
    let out = out.expect_code(5);
    out.expect_stderr(&format!("pid {} (role \"boss\", superuser, ", admin.pid))
        .expect_stderr("gave up after waiting ")
        .expect_stderr("superuser and server sessions are never ended");
    assert!(!out.stderr.contains("ended blocking"), "{}", out.describe());
    assert!(admin.alive(), "a superuser session is never ended");
    let after = stored_verifiers(&cluster);
    assert!(
        after == before,
        "nothing was applied, yet the verifiers of {:?} changed",
        changed_roles(&before, &after)
    );
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn with_ending_sessions_off_a_blocking_login_is_waited_for_then_the_sync_fails() {
    let (cluster, keys, secrets) = started();
    let (own, hostile) = hostile_login(&cluster);
    hostile.hold_sync_lock();
    let before = stored_verifiers(&cluster);

    let out = sync_bounded(&cluster, &keys, "off", "2s");
    let out = out.expect_code(5);
    out.expect_stderr(&format!("pid {} (role \"appuser\", ", hostile.pid))
        .expect_stderr("--terminate-blockers-after is off");
    assert!(hostile.alive(), "nothing ends a session when it is off");
    let after = stored_verifiers(&cluster);
    assert!(
        after == before,
        "nothing was applied, yet the verifiers of {:?} changed",
        changed_roles(&before, &after)
    );
    cluster.assert_login("appuser", &own);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_deadlock_with_a_login_puts_no_verifier_in_the_server_log() {
    // The login locks its own pg_authid row, the sync takes its lock and waits for that
    // row, then the login asks for the sync's lock: a deadlock. The server's report names
    // the query of every process in the cycle (outside any log_* setting's reach).
    let (cluster, keys, secrets) = started();
    let (_, hostile) = hostile_login(&cluster);
    hostile.lock_own_row(&unique("hostile-other"));
    let sync = Running::spawn(bin_for("sync", &cluster, &keys));
    let waiting_for_hostile = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {} = ANY(pg_blocking_pids(pid))",
        hostile.pid
    );
    wait_until(
        Duration::from_secs(30),
        "the sync to wait for the row",
        || cluster.psql(&waiting_for_hostile) != "0",
    );
    let lock = hostile.send(&format!("SELECT pg_advisory_lock({SYNC_LOCK})"));
    let out = sync.finish(Duration::from_secs(45));
    // One side was rolled back by the deadlock check; it is never the sync (whose
    // deadlock_timeout is longer than its waits), so the rotation applied.
    let hostile_result = lock.recv_timeout(Duration::from_secs(30)).unwrap();
    let log = cluster.log_text();
    assert!(
        log.contains("deadlock detected"),
        "there was a deadlock:\n{}",
        cluster.log_tail(30)
    );
    assert_no_verifier_in_log(&cluster);
    let out = out.expect_ok();
    assert!(
        hostile_result.is_err(),
        "the login's request was the victim"
    );
    cluster.assert_login("appuser", &secrets[1]);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_role_name_with_a_control_character_is_refused_and_shown_escaped() {
    let keys = Keys::new();
    keys.write_new(&DEFAULT_ROLES, "v");
    for name in ["appuser\n", "app\u{1b}[2Juser"] {
        let mut cmd = bin();
        cmd.arg("sync")
            .arg("--keys-dir")
            .arg(keys.path())
            .args(["--pghost", "/nonexistent"])
            // As a Kubernetes value can carry it: with its trailing newline.
            .env("APP_DB_USER", name);
        let out = run(cmd);
        let out = out.expect_code(3);
        out.expect_stderr(&format!("{name:?}"))
            .expect_stderr("control character");
        assert!(
            !out.stderr.contains(name),
            "the name was printed raw:\n{}",
            out.describe()
        );
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.describe());
    }
}

/// The major version of the server binaries under test (`PG_BINDIR`).
fn server_major() -> u32 {
    let out = std::process::Command::new(pg_bin("postgres"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| word.split('.').next()?.parse().ok())
        .expect("a version number")
}

/// The method and iteration count of a role's stored verifier (`SCRAM-SHA-256$4096`): what
/// a failing assertion may show, unlike the verifier's keys.
fn scram_head(cluster: &Cluster, role: &str) -> String {
    let stored = cluster.rolpassword(role).unwrap_or_default();
    stored.split(':').next().unwrap_or_default().to_owned()
}

#[test]
fn verifiers_follow_the_servers_scram_iterations() {
    let major = server_major();
    if major < 16 {
        // Not a `skip()`: before 16 the setting does not exist and 4096 is the only count
        // (the other tests check it); this test runs when PG_BINDIR is a 16+ server.
        eprintln!("SKIP: PostgreSQL {major} has no scram_iterations (set PG_BINDIR to 16+)");
        return;
    }
    let cluster = Cluster::start_with(&ClusterOptions {
        extra_conf: vec!["scram_iterations = 8192".into()],
        ..ClusterOptions::default()
    });
    let keys = Keys::new();
    let secrets = setup(&cluster, &keys);
    let out = cluster.run(bin_for("sync", &cluster, &keys));
    let out = out.expect_ok();
    for ((role, _), secret) in DEFAULT_ROLES.iter().zip(&secrets) {
        assert_eq!(scram_head(&cluster, role), "SCRAM-SHA-256$8192", "{role}");
        cluster.assert_login(role, secret);
    }
    let again = run(bin_for("sync", &cluster, &keys));
    let again = again.expect_ok();
    again.expect_stdout("role \"appuser\": unchanged");

    // The same password stored with fewer rounds than the server asks for is re-made.
    cluster.psql(&format!(
        "SET scram_iterations = 4096; ALTER ROLE appuser PASSWORD {}",
        quote_literal(&secrets[1])
    ));
    assert_eq!(scram_head(&cluster, "appuser"), "SCRAM-SHA-256$4096");
    cluster.clear_log();
    let upgrade = run(bin_for("sync", &cluster, &keys));
    let upgrade = upgrade.expect_ok();
    upgrade
        .expect_stdout("role \"appuser\": changed")
        .expect_stdout("role \"backupuser\": unchanged");
    assert_eq!(scram_head(&cluster, "appuser"), "SCRAM-SHA-256$8192");
    cluster.assert_login("appuser", &secrets[1]);
    assert_no_verifier_in_log(&cluster);
    assert_no_leak(
        &secrets_ref(&secrets),
        Some(&cluster),
        &[&out, &again, &upgrade],
    );
}

#[test]
fn a_watcher_rotation_held_up_by_the_leaked_login_is_applied_and_the_log_says_why() {
    let (cluster, keys, secrets) = started();
    let state = tempfile::tempdir().unwrap();
    let mut cmd = bin_for("watch", &cluster, &keys);
    cmd.args(["--debounce", "50ms", "--state-dir"])
        .arg(state.path())
        .env("PG_PASSWORD_SYNC_TERMINATE_BLOCKERS_AFTER", "2s");
    let watcher = Running::spawn(cmd);
    wait_until(Duration::from_secs(30), "the first sync", || {
        cluster.login("appuser", &secrets[1]).is_ok()
    });
    // The attacker knows the password in force and keeps its pg_authid row locked.
    let hostile = Session::connect(cluster.port, "appuser", &secrets[1]);
    hostile.lock_own_row(&unique("hostile-other"));
    let rotated = unique("rotated pw");
    keys.write("postgres_app_user_pw", &rotated);
    wait_until(
        Duration::from_secs(30),
        "the rotation to be in force",
        || cluster.login("appuser", &rotated).is_ok(),
    );
    cluster.assert_no_login("appuser", &secrets[1]);
    assert!(!hostile.alive(), "the blocking session was ended");
    watcher.signal(Signal::SIGTERM);
    let out = watcher.finish(Duration::from_secs(30));
    out.expect_stderr(&format!(
        "the sync is blocked by other sessions: pid {} (role \"appuser\"",
        hostile.pid
    ))
    .expect_stderr("ended blocking non-superuser sessions: ");
    assert_no_verifier_in_log(&cluster);
    let mut all = secrets_ref(&secrets);
    all.push(&rotated);
    assert_no_leak(&all, Some(&cluster), &[&out]);
}

#[test]
fn a_database_owner_cannot_plant_functions_the_superuser_sync_runs() {
    let (cluster, keys, secrets) = started();
    known_password(&cluster, "appuser");
    let db = cluster.app_owned_database();
    // Everything below is done as appuser (SET ROLE): what the owner of the database the
    // sync connects to can do with only its own rights. Each planted function makes its
    // caller's role, when that is a superuser, grant superuser to appuser, then behaves
    // like the catalog's function.
    cluster.psql_in(
        db,
        "SET ROLE appuser;\n\
         CREATE SCHEMA trap;\n\
         CREATE FUNCTION trap.escalate() RETURNS void LANGUAGE plpgsql AS $$ BEGIN \
           IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN \
             EXECUTE 'ALTER ROLE appuser SUPERUSER'; END IF; END $$;\n\
         CREATE FUNCTION trap.pg_is_in_recovery() RETURNS boolean LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM trap.escalate(); RETURN pg_catalog.pg_is_in_recovery(); END $$;\n\
         CREATE FUNCTION trap.pg_advisory_xact_lock(bigint) RETURNS void LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM trap.escalate(); PERFORM pg_catalog.pg_advisory_xact_lock($1); END $$;\n\
         CREATE FUNCTION trap.pg_blocking_pids(integer) RETURNS integer[] LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM trap.escalate(); RETURN pg_catalog.pg_blocking_pids($1); END $$;\n\
         CREATE VIEW trap.pg_authid AS SELECT a.* FROM pg_catalog.pg_authid a, \
           LATERAL (SELECT trap.escalate()) e;\n\
         ALTER DATABASE appdb SET search_path = trap, pg_catalog;",
    );
    let out = sync_with_env(&cluster, &keys, &[("PGDATABASE", db)]).expect_ok();
    assert_eq!(
        cluster.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'appuser'"),
        "f",
        "the sync ran a function the application planted, as the superuser"
    );
    assert_rotated(&cluster, &secrets, &[], &out);
}

#[test]
fn a_database_owner_cannot_make_the_superuser_sync_run_as_itself_or_fail() {
    let (cluster, keys, secrets) = started();
    known_password(&cluster, "appuser");
    let db = cluster.app_owned_database();
    // `role` set for the database: every session there starts with SET ROLE appuser, and
    // the superuser is a member of every role, so its sessions would too. Read-only
    // transactions and tiny timeouts would make every sync fail.
    let mut settings = "SET ROLE appuser; ALTER DATABASE appdb SET role = 'appuser'; \
         ALTER DATABASE appdb SET default_transaction_read_only = on; \
         ALTER DATABASE appdb SET idle_in_transaction_session_timeout = '1ms'; \
         ALTER DATABASE appdb SET statement_timeout = '1ms'; \
         ALTER DATABASE appdb SET lock_timeout = '1ms';"
        .to_owned();
    if pg_major() >= 17 {
        settings.push_str("ALTER DATABASE appdb SET transaction_timeout = '1ms';");
    }
    cluster.psql_in(db, &settings);
    let out = sync_with_env(&cluster, &keys, &[("PGDATABASE", db)]).expect_ok();
    assert_new_passwords_log_in(&cluster, &secrets);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_database_owner_cannot_hide_a_password_it_set_behind_the_syncs_snapshot() {
    let (cluster, keys, secrets) = started();
    sync_with_env(&cluster, &keys, &[]).expect_ok();
    // The owner of the database the sync connects to makes its transactions see the
    // catalog as it was when they began, holds the sync's lock, and sets a password of its
    // own choosing while the sync waits for the lock.
    let db = cluster.app_owned_database();
    cluster.psql_in(
        db,
        "SET ROLE appuser; \
         ALTER DATABASE appdb SET default_transaction_isolation = 'repeatable read';",
    );
    let hostile = Session::connect_in(cluster.port, "appuser", &secrets[1], db);
    hostile.hold_sync_lock();
    let mut cmd = bin_for("sync", &cluster, &keys);
    cmd.env("PGDATABASE", db).env(TERMINATE_AFTER, "off");
    let sync = Running::spawn(cmd);
    wait_until(
        Duration::from_secs(30),
        "the sync to wait for its lock",
        || {
            cluster
                .psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                != "0"
        },
    );
    let chosen = unique("chosen-by-the-owner");
    hostile
        .exec(&format!(
            "ALTER ROLE appuser PASSWORD {}",
            quote_literal(&chosen)
        ))
        .unwrap();
    hostile.exec("SELECT pg_advisory_unlock_all()").unwrap();
    let out = sync.finish(Duration::from_secs(45)).expect_ok();
    cluster.assert_no_login("appuser", &chosen);
    assert_new_passwords_log_in(&cluster, &secrets);
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

/// A cluster that allows prepared transactions (off by default: `max_prepared_transactions`
/// is 0, which keeps this attack out), with the default roles set up.
fn started_with_prepared_transactions() -> (Cluster, Keys, Vec<String>) {
    set_up_on(Cluster::start_with(&ClusterOptions {
        extra_conf: vec!["max_prepared_transactions = 4".into()],
        ..ClusterOptions::default()
    }))
}

/// Runs `sql` as `role` (password login over TCP) in database `db`, and ends the session:
/// what a leaked login can leave behind with `PREPARE TRANSACTION`.
fn psql_login(cluster: &Cluster, role: &str, password: &str, db: &str, sql: &str) {
    output_ok(
        as_server_user(pg_bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &cluster.port.to_string(),
                "-U",
                role,
                "-d",
                db,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password),
        &format!("psql as {role}"),
    );
}

/// `role` prepares a transaction `gid` that holds the sync's lock, and ends its session.
fn prepare_holding_sync_lock(cluster: &Cluster, role: &str, password: &str, gid: &str) {
    psql_login(
        cluster,
        role,
        password,
        "postgres",
        &format!(
            "BEGIN; SELECT pg_advisory_xact_lock({SYNC_LOCK}); PREPARE TRANSACTION {};",
            quote_literal(gid)
        ),
    );
}

/// The global transaction ids still prepared.
fn prepared_gids(cluster: &Cluster) -> String {
    cluster.psql("SELECT string_agg(gid, ',' ORDER BY gid) FROM pg_prepared_xacts")
}

#[test]
fn a_prepared_transaction_of_a_login_holding_its_own_row_is_rolled_back_and_the_rotation_applies() {
    let (cluster, keys, secrets) = started_with_prepared_transactions();
    let own = known_password(&cluster, "appuser");
    cluster.psql("CREATE DATABASE otherdb");
    cluster.clear_log();
    // pg_authid is shared by all databases: the login locks its row from another database,
    // and the prepared transaction keeps the lock with no session that could be ended.
    psql_login(
        &cluster,
        "appuser",
        &own,
        "otherdb",
        &format!(
            "BEGIN; ALTER ROLE appuser PASSWORD {}; PREPARE TRANSACTION 'held-row';",
            quote_literal(&unique("hostile-other"))
        ),
    );
    let out = sync_bounded(&cluster, &keys, "1s", "5s");
    let out = out.expect_ok();
    out.expect_stderr(
        "prepared transaction \"held-row\" (role \"appuser\", database \"otherdb\", prepared ",
    )
    .expect_stderr("rolled back blocking prepared transactions of non-superusers: ");
    assert_eq!(
        prepared_gids(&cluster),
        "",
        "the prepared transaction is gone"
    );
    assert_rotated(&cluster, &secrets, &[&own], &out);
}

#[test]
fn a_prepared_transaction_of_a_login_holding_the_sync_lock_is_rolled_back() {
    let (cluster, keys, secrets) = started_with_prepared_transactions();
    let own = known_password(&cluster, "appuser");
    prepare_holding_sync_lock(&cluster, "appuser", &own, "held-lock");
    let out = sync_bounded(&cluster, &keys, "1s", "5s");
    let out = out.expect_ok();
    out.expect_stderr(
        "prepared transaction \"held-lock\" (role \"appuser\", database \"postgres\"",
    );
    assert_eq!(prepared_gids(&cluster), "");
    assert_new_passwords_log_in(&cluster, &secrets);
    assert_no_password_statement(&cluster.log_text());
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

/// Names a synchronous standby that never connects, as a standby that is down (or a
/// REPLICATION login posing as one that never confirms) does: from now on every commit
/// and every end of a prepared transaction waits for it, with no timeout. Returns once a
/// commit of another session is seen waiting (`SyncRep`), the proof that it does.
fn hold_commits_for_an_absent_standby(cluster: &Cluster) -> Running {
    set_synchronous_standby_names(cluster, "SET synchronous_standby_names = 'absent_standby'");
    let mut probe = psql_superuser(&cluster.sock, cluster.port);
    probe.args(["-c", "CREATE ROLE sync_rep_probe"]);
    let probe = Running::spawn(probe);
    wait_until(
        Duration::from_secs(30),
        "a commit to wait for the synchronous standby",
        || commits_waiting_for_standbys(cluster) == "1",
    );
    probe
}

/// `ALTER SYSTEM <change>` of `synchronous_standby_names`, in force at once.
fn set_synchronous_standby_names(cluster: &Cluster, change: &str) {
    cluster.psql(&format!("ALTER SYSTEM {change}"));
    cluster.psql("SELECT pg_reload_conf()");
}

/// How many sessions' commits wait for a synchronous standby right now.
fn commits_waiting_for_standbys(cluster: &Cluster) -> String {
    cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
}

#[test]
fn a_synchronous_standby_that_never_confirms_holds_neither_the_rotation_nor_a_rollback() {
    // Commits that wait for standbys (the harness turns that off for speed).
    let (cluster, keys, secrets) = set_up_on(Cluster::start_with(&ClusterOptions {
        extra_conf: vec![
            "max_prepared_transactions = 4".into(),
            "synchronous_commit = on".into(),
        ],
        ..ClusterOptions::default()
    }));
    let own = known_password(&cluster, "appuser");
    // A leaked login's prepared transaction holding the sync's lock: the watchdog must end
    // it with ROLLBACK PREPARED, which waits for the standby too.
    prepare_holding_sync_lock(&cluster, "appuser", &own, "held-lock");
    let probe = hold_commits_for_an_absent_standby(&cluster);

    let out = sync_bounded(&cluster, &keys, "1s", "5s");
    let out = out.expect_ok();
    out.expect_stderr("rolled back blocking prepared transactions of non-superusers: ");
    assert_eq!(prepared_gids(&cluster), "");
    // In force at once: a commit waiting for the standby would not be visible yet.
    assert_rotated(&cluster, &secrets, &[&own], &out);
    assert_eq!(
        commits_waiting_for_standbys(&cluster),
        "1",
        "the server still holds other commits for the standby"
    );

    set_synchronous_standby_names(&cluster, "RESET synchronous_standby_names");
    probe.finish(Duration::from_secs(30)).expect_ok();
}

#[test]
fn a_superuser_prepared_transaction_is_named_and_never_rolled_back() {
    let (cluster, keys, secrets) = started_with_prepared_transactions();
    let boss = known_superuser(&cluster, "boss");
    prepare_holding_sync_lock(&cluster, "boss", &boss, "admin");
    let before = stored_verifiers(&cluster);
    let out = sync_bounded(&cluster, &keys, "1s", "3s");
    let out = out.expect_code(5);
    out.expect_stderr(
        "prepared transaction \"admin\" (role \"boss\", superuser, database \"postgres\"",
    )
    .expect_stderr("gave up after waiting ");
    assert_eq!(prepared_gids(&cluster), "admin", "never rolled back");
    let after = stored_verifiers(&cluster);
    assert!(
        after == before,
        "nothing was applied, yet the verifiers of {:?} changed",
        changed_roles(&before, &after)
    );
    cluster.psql("ROLLBACK PREPARED 'admin'");
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_replication_login_holding_the_sync_lock_from_a_walsender_is_ended() {
    let (cluster, keys, secrets) = started();
    let own = known_password(&cluster, "appuser");
    // A REPLICATION login (a change-data-capture user, say) opens a logical replication
    // connection: a walsender, not a client backend, that still runs plain SQL.
    cluster.psql("ALTER ROLE appuser REPLICATION");
    cluster.clear_log();
    let mut walsender = as_server_user(pg_bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=appuser dbname=postgres replication=database",
            cluster.port
        ))
        .env("PGPASSWORD", &own)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = walsender.stdin.as_mut().unwrap();
        writeln!(stdin, "SELECT pg_advisory_lock({SYNC_LOCK});").unwrap();
        stdin.flush().unwrap();
    }
    wait_until(
        Duration::from_secs(20),
        "the walsender to hold the lock",
        || {
            cluster.psql(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted AND a.backend_type = 'walsender'",
            ) == "1"
        },
    );
    let pid = cluster.psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'");

    let out = sync_bounded(&cluster, &keys, "1s", "5s");
    drop(walsender.stdin.take());
    let _ = walsender.kill();
    let _ = walsender.wait();
    let out = out.expect_ok();
    out.expect_stderr(&format!(
        "ended blocking non-superuser sessions: pid {pid} (role \"appuser\""
    ));
    assert_new_passwords_log_in(&cluster, &secrets);
    assert_no_password_statement(&cluster.log_text());
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

#[test]
fn a_superuser_locking_pg_authid_while_the_sync_waits_cannot_stall_it_past_its_bound() {
    let (cluster, keys, secrets) = started();
    let boss = known_superuser(&cluster, "boss");
    let admin = Session::connect(cluster.port, "boss", &boss);
    admin.exec("BEGIN").unwrap();
    admin
        .exec(&format!("SELECT pg_advisory_xact_lock({SYNC_LOCK})"))
        .unwrap();
    let mut cmd = bin_for("sync", &cluster, &keys);
    cmd.env("PG_PASSWORD_SYNC_TERMINATE_BLOCKERS_AFTER", "off")
        .env("PG_PASSWORD_SYNC_LOCK_WAIT_TIMEOUT", "4s");
    let sync = Running::spawn(cmd);
    // Once the watchdog has named the blocker (its second connection is open), the
    // administrator's transaction also locks pg_authid, which that connection reads.
    sync.wait_stderr(
        Duration::from_secs(20),
        "the sync is blocked by other sessions",
    );
    let _locked = admin.send("LOCK TABLE pg_authid IN ACCESS EXCLUSIVE MODE");
    let out = sync.finish(Duration::from_secs(30));
    drop(admin);
    let out = out.expect_code(5);
    out.expect_stderr("gave up after waiting ");
    assert_no_leak(&secrets_ref(&secrets), Some(&cluster), &[&out]);
}

/// The harness's failure output masks the password literals of test setup in the server
/// log tail it shows.
#[test]
fn failure_output_masks_password_literals_of_the_server_log() {
    assert_eq!(
        mask_password_literals(
            "LOG:  statement: ALTER ROLE \"a\" PASSWORD 'se''cret' VALID UNTIL 'x'\n\
             LOG:  statement: create role b login password 'other'"
        ),
        "LOG:  statement: ALTER ROLE \"a\" PASSWORD '<masked>' VALID UNTIL 'x'\n\
         LOG:  statement: create role b login password '<masked>'"
    );
    assert_eq!(
        mask_password_literals("PASSWORD 'open"),
        "PASSWORD '<masked>"
    );
}

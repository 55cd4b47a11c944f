//! Overlap mode's files and `rotate` against real PostgreSQL 15 clusters: `generate
//! --overlap`, the staged rotation (stage, wait for checked TCP logins, publish), its
//! refusals (a login inside its grace period or still open, a server that trusts the
//! connection), the rollback when the staged logins never log in, and the split run
//! (`--stage-only`, `--publish-only`, `--abort`).
//!
//! Most tests play the sync's database side by hand (`act_as_sync`, `apply_stage_by_hand`)
//! so that they test `rotate` alone; the tests named `with_the_sync_…` run the real
//! `watch --overlap` and check the whole cycle, grace enforced by the server included.

mod common;
mod overlap_fixture;

use std::time::Duration;

use common::*;
use overlap_fixture::*;

/// Every file `generate --overlap` writes, beyond the catalog's eleven.
const OVERLAP_FILES: [&str; 4] = [
    "postgres_app_user_alt_pw.txt",
    "postgres_app_ro_alt_pw.txt",
    "postgres_temporal_alt_pw.txt",
    SERVICE_FILE,
];

/// Single-login secrets a rotation regenerates.
const SINGLE_LOGIN: [&str; 6] = [
    "postgres_password.txt",
    "postgres_app_owner_pw.txt",
    "postgres_temporal_pw.txt",
    "redis_password.txt",
    "session_signing_secret.txt",
    "csrf_signing_secret.txt",
];

const OIDC_FILES: [&str; 3] = [
    "oidc_google_client_secret.txt",
    "oidc_microsoft_client_secret.txt",
    "oidc_keycloak_client_secret.txt",
];

#[test]
fn generate_overlap_creates_twin_files_and_a_service_file_publishing_each_role_itself() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(generate_cmd(dir.path(), &["--overlap"]));
    let first = first.expect_ok();
    let keys = dir.path().join("keys");
    for file in &OVERLAP_FILES[..2] {
        first.expect_stdout(&format!("created {}", keys.join(file).display()));
    }
    first.expect_stdout(&format!("created {}", keys.join(SERVICE_FILE).display()));
    // Without TEMPORAL_DB_USER the temporal role is not overlapped (as `run` skips it).
    assert!(!keys.join("postgres_temporal_alt_pw.txt").exists());
    let source = Source { dir };
    for (role, _, file, twin_file) in PAIRS {
        let (user, password) = source.published(role);
        assert_eq!(user, role);
        assert_eq!(password, source.value(file));
        let twin = source.value(twin_file);
        assert_eq!(twin.len(), 32);
        assert_ne!(twin, source.value(file));
    }
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(source.keys().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode(SERVICE_FILE), 0o600);
    assert_eq!(mode("postgres_app_user_alt_pw.txt"), 0o600);

    // A second run keeps everything, and --verify --overlap checks the pairing.
    let before = source.snapshot();
    run(generate_cmd(source.path(), &["--overlap"]))
        .expect_ok()
        .expect_stdout("kept");
    assert_eq!(source.snapshot(), before);
    run(generate_cmd(source.path(), &["--verify", "--overlap"]))
        .expect_ok()
        .expect_stdout("all 14 secret files");
    let listed = run(generate_cmd(source.path(), &["--list", "--overlap"]));
    let listed = listed.expect_ok();
    for file in &OVERLAP_FILES[..2] {
        listed.expect_stdout(file);
    }
    listed.expect_stdout(SERVICE_FILE);

    // A published password that differs from its login's file fails --verify, unquoted.
    let published = source.published("appuser").1;
    let other = format!("{}x", source.value("postgres_app_user_pw.txt"));
    std::fs::write(source.keys().join("postgres_app_user_pw.txt"), &other).unwrap();
    let bad = run(generate_cmd(source.path(), &["--verify", "--overlap"]));
    let bad = bad.expect_code(7);
    bad.expect_stdout("[appuser] the password of login \"appuser\" differs");
    std::fs::write(source.keys().join("postgres_app_user_pw.txt"), &published).unwrap();

    // The Kubernetes Secret carries the twin files and the service file.
    let mut cmd = generate_cmd(
        source.path(),
        &["--overlap", "--k8s-secret", "app-secrets", "--output"],
    );
    cmd.arg(source.path().join("secret.yaml"));
    let manifest = run(cmd);
    let manifest = manifest.expect_ok();
    let yaml = std::fs::read_to_string(source.path().join("secret.yaml")).unwrap();
    for key in [
        "postgres_app_user_alt_pw:",
        "postgres_app_ro_alt_pw:",
        "pg_service.conf:",
    ] {
        assert!(yaml.contains(key), "no {key} in the manifest");
    }
    assert_no_leak(&[&published, &other], None, &[&first, &bad, &manifest]);

    // --force gives every login a new password and publishes each role itself again, after
    // a backup that holds the overlap files too.
    let before = source.snapshot();
    run(generate_cmd(source.path(), &["--overlap", "--force"])).expect_ok();
    for (role, _, file, twin_file) in PAIRS {
        assert_ne!(source.value(twin_file).as_bytes(), &before[twin_file][..]);
        assert_eq!(
            source.published(role),
            (role.to_owned(), source.value(file))
        );
    }
    let backup = source.backups().pop().unwrap();
    assert_eq!(snapshot(&backup.join("keys")), before);
    // … and --restore puts all of it back.
    run(generate_cmd(source.path(), &["--restore", "--yes"])).expect_ok();
    assert_eq!(source.snapshot(), before);

    // A plain `generate --force` on that directory (an old runbook) keeps the set
    // consistent: pg_service.conf there means overlap mode.
    run(generate_cmd(source.path(), &["--force"])).expect_ok();
    for (role, _, file, _) in PAIRS {
        assert_eq!(
            source.published(role),
            (role.to_owned(), source.value(file))
        );
    }
    run(generate_cmd(source.path(), &["--verify"])).expect_ok();
}

/// A cluster with the application roles, a generated set, and the sync's state played by
/// hand with the unpublished logins `VALID UNTIL unpublished_until`.
fn prepared(unpublished_until: &str) -> (Cluster, Source) {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let source = Source::generate();
    act_as_sync(&cluster, &source, unpublished_until);
    cluster.clear_log();
    (cluster, source)
}

#[test]
fn rotate_stages_the_unpublished_logins_waits_for_them_then_publishes() {
    let (cluster, source) = prepared("'-infinity'");
    let before = source.snapshot();
    let rotating = Running::spawn(rotate_cmd(source.path(), cluster.port, &["--wait", "60s"]));
    apply_stage_by_hand(&cluster, &source, &before);
    let done = rotating.finish(Duration::from_secs(90));
    let done = done.with_server_log(&cluster.log).expect_ok();
    done.expect_stdout("staged a new password for login \"appuser_alt\" (role \"appuser\")")
        .expect_stdout("login \"appuser_alt\" logs in with its staged password")
        .expect_stdout("published login \"appuser_alt\" for role \"appuser\"")
        .expect_stdout("role \"backupuser\": ok (publishes login \"backupuser_alt\"");

    let after = source.snapshot();
    let mut secrets = Vec::new();
    for (role, twin, file, twin_file) in PAIRS {
        // The published login's file is untouched; the twin's is new and now published.
        assert_eq!(after[file], before[file], "{file}");
        assert_ne!(after[twin_file], before[twin_file], "{twin_file}");
        assert_eq!(
            source.published(role),
            (twin.to_owned(), source.value(twin_file))
        );
        cluster.assert_login(twin, &source.value(twin_file));
        // The previous login still works: the sync (not rotate) starts its grace period.
        cluster.assert_login(role, &source.value(file));
        secrets.push(source.value(twin_file));
    }
    for file in SINGLE_LOGIN {
        assert_ne!(after[file], before[file], "{file} was not regenerated");
        secrets.push(source.value(file));
    }
    for file in OIDC_FILES {
        assert_eq!(after[file], before[file], "{file} changed");
    }
    // The backup holds the complete previous set, byte for byte; no record is left.
    let backup = source.backups().pop().unwrap();
    assert_eq!(snapshot(&backup.join("keys")), before);
    assert!(!source.path().join("rotate-pending.json").exists());
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_leak(&refs, None, &[&done]);
}

#[test]
fn rotate_is_refused_while_a_login_to_rekey_may_be_in_use_and_force_proceeds() {
    for (until, needle) in [
        ("now() + interval '1 hour'", "inside its grace period until"),
        ("'infinity'", "has no expiry on the server"),
    ] {
        let (cluster, source) = prepared(until);
        let before = source.snapshot();
        let refused = run(rotate_cmd(source.path(), cluster.port, &["--wait", "5s"]));
        refused
            .with_server_log(&cluster.log)
            .expect_code(3)
            .expect_stderr(needle)
            .expect_stderr("nothing was written");
        assert_eq!(source.snapshot(), before, "a refused rotation wrote files");
        assert!(
            source.backups().is_empty(),
            "a refused rotation made a backup"
        );

        // --force proceeds (and warns).
        let rotating = Running::spawn(rotate_cmd(
            source.path(),
            cluster.port,
            &["--wait", "60s", "--force"],
        ));
        apply_stage_by_hand(&cluster, &source, &before);
        let forced = rotating.finish(Duration::from_secs(90));
        forced
            .with_server_log(&cluster.log)
            .expect_ok()
            .expect_stderr("--force: re-keying anyway");
        assert_eq!(source.published("appuser").0, "appuser_alt");
    }
}

#[test]
fn with_the_database_unreachable_rotate_times_out_and_restores_the_staged_files() {
    let (mut cluster, source) = prepared("'-infinity'");
    let before = source.snapshot();
    // The server answers the grace check, then goes away before any staged login can work
    // (no sync runs either, so none ever would).
    let rotating = Running::spawn(rotate_cmd(source.path(), cluster.port, &["--wait", "4s"]));
    wait_until(Duration::from_secs(30), "rotate to stage", || {
        source.value("postgres_app_user_alt_pw.txt").as_bytes()
            != &before["postgres_app_user_alt_pw.txt"][..]
    });
    cluster.stop();
    let done = rotating.finish(Duration::from_secs(60));
    assert_ne!(done.code(), Some(0), "{}", done.describe());
    done.expect_stderr("timed out after 4s")
        .expect_stderr("rolled back")
        .expect_stdout("byte for byte");
    assert_eq!(
        source.snapshot(),
        before,
        "the staged files were not restored"
    );
    assert!(!source.path().join("rotate-pending.json").exists());
    cluster.start();
    for (role, _, file, _) in PAIRS {
        let (user, password) = source.published(role);
        assert_eq!(user, role);
        assert_eq!(password, source.value(file));
        cluster.assert_login(&user, &password);
    }

    // Unreachable from the start: refused without --force (nothing written) …
    cluster.stop();
    let refused = run(rotate_cmd(source.path(), cluster.port, &["--wait", "2s"]));
    refused
        .expect_code(4)
        .expect_stderr("cannot ask the server");
    assert_eq!(source.snapshot(), before);
    // … and with --force it stages, times out and restores.
    let forced = run(rotate_cmd(
        source.path(),
        cluster.port,
        &["--wait", "2s", "--force"],
    ));
    assert_ne!(forced.code(), Some(0), "{}", forced.describe());
    forced.expect_stderr("rolled back");
    assert_eq!(source.snapshot(), before);
}

#[test]
fn a_server_that_accepts_a_wrong_password_is_never_taken_as_proof() {
    let cluster = Cluster::start_with(&ClusterOptions {
        hba: Some(
            "local all postgres peer map=harness\n\
             host all all 127.0.0.1/32 trust\n"
                .into(),
        ),
        ..ClusterOptions::default()
    });
    create_app_roles(&cluster);
    let source = Source::generate();
    act_as_sync(&cluster, &source, "'-infinity'");
    let before = source.snapshot();
    let done = run(rotate_cmd(source.path(), cluster.port, &["--wait", "30s"]));
    assert_ne!(done.code(), Some(0), "{}", done.describe());
    done.expect_stderr("accepted a wrong password")
        .expect_stderr("rolled back");
    // It gave up at once rather than waiting out --wait.
    assert!(done.elapsed < Duration::from_secs(25), "{:?}", done.elapsed);
    assert_eq!(source.snapshot(), before);
}

#[test]
fn a_split_rotation_stages_then_publishes_or_aborts() {
    let (cluster, source) = prepared("'-infinity'");
    let before = source.snapshot();
    run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]))
        .with_server_log(&cluster.log)
        .expect_ok()
        .expect_stdout("staged");
    assert!(source.path().join("rotate-pending.json").exists());
    assert_ne!(source.snapshot(), before);
    assert_eq!(source.published("appuser").0, "appuser");
    // A second rotation is refused while a stage is pending.
    run(rotate_cmd(source.path(), cluster.port, &[]))
        .expect_code(3)
        .expect_stderr("a staged rotation is pending");
    // --abort restores byte for byte.
    run(rotate_cmd(source.path(), cluster.port, &["--abort"])).expect_ok();
    assert_eq!(source.snapshot(), before);
    assert!(!source.path().join("rotate-pending.json").exists());

    // Stage again, then publish without a login check of its own.
    run(rotate_cmd(source.path(), cluster.port, &["--stage-only"])).expect_ok();
    let staged = source.snapshot();
    run(rotate_cmd(source.path(), cluster.port, &["--publish-only"]))
        .expect_ok()
        .expect_stdout("published login \"appuser_alt\"");
    for (role, twin, _, twin_file) in PAIRS {
        assert_eq!(
            source.published(role),
            (twin.to_owned(), source.value(twin_file))
        );
        assert_eq!(source.value(twin_file).as_bytes(), &staged[twin_file][..]);
    }
    run(rotate_cmd(source.path(), cluster.port, &["--publish-only"]))
        .expect_code(3)
        .expect_stderr("no staged rotation to finish");
}

// ---- with the sync side (`watch --overlap`) ------------------------------------------

/// `watch --overlap --grace GRACE` over `keys`.
fn overlap_watcher(
    cluster: &Cluster,
    keys: &std::path::Path,
    grace: &str,
) -> (Running, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let mut cmd = bin();
    cmd.arg("watch")
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(keys)
        .arg("--secrets-source-dir")
        .arg(state.path().join("none"))
        .args(["--debounce", "50ms", "--overlap", "--grace", grace])
        .arg("--state-dir")
        .arg(state.path());
    (Running::spawn(cmd), state)
}

#[test]
fn with_the_sync_the_previous_login_dies_after_grace_and_a_rotation_inside_it_is_refused() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let source = Source::generate();
    let (mut watcher, _state) = overlap_watcher(&cluster, &source.keys(), "10s");
    assert_still_running(&mut watcher);
    let first_password = source.value("postgres_app_user_pw.txt");
    wait_until(Duration::from_secs(30), "the first sync", || {
        cluster.login("appuser", &first_password).is_ok()
    });

    run(rotate_cmd(source.path(), cluster.port, &["--wait", "60s"]))
        .with_server_log(&cluster.log)
        .expect_ok();
    let (user, password) = source.published("appuser");
    assert_eq!(user, "appuser_alt");
    cluster.assert_login(&user, &password);

    // Inside the grace period: refused, nothing changes.
    let before = source.snapshot();
    cluster
        .run(rotate_cmd(source.path(), cluster.port, &["--wait", "5s"]))
        .expect_code(3);
    assert_eq!(source.snapshot(), before);

    // After it, the server refuses the previous login and the published one works.
    wait_until(Duration::from_secs(30), "the grace period to end", || {
        cluster.login("appuser", &first_password).is_err()
    });
    cluster.assert_login(&user, &password);

    // Now a rotation proceeds, re-keying `appuser` and publishing it.
    run(rotate_cmd(source.path(), cluster.port, &["--wait", "60s"]))
        .with_server_log(&cluster.log)
        .expect_ok();
    let (user, password) = source.published("appuser");
    assert_eq!(user, "appuser");
    assert_ne!(password, first_password);
    cluster.assert_login(&user, &password);
}

#[test]
fn a_wait_not_shorter_than_the_grace_or_a_planted_link_is_refused_before_any_write() {
    let source = Source::generate();
    let before = source.snapshot();
    let backups = source.backups().len();
    // No server is needed: both refusals come before any connection or write.
    let port = free_port();
    let mut cmd = rotate_cmd(source.path(), port, &["--wait", "20m"]);
    cmd.env("PG_PASSWORD_SYNC_GRACE", "15m");
    run(cmd)
        .expect_code(3)
        .expect_stderr("--wait 20m must be shorter than the sync's --grace 15m");
    run(rotate_cmd(
        source.path(),
        port,
        &["--wait", "2s", "--grace", "2s"],
    ))
    .expect_code(3);

    // A link in place of pg_service.conf is never followed, by rotate or generate.
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("elsewhere.conf");
    std::fs::write(&target, "[appuser]\nuser=mallory\n").unwrap();
    let service = source.keys().join(SERVICE_FILE);
    let kept = std::fs::read(&service).unwrap();
    std::fs::remove_file(&service).unwrap();
    std::os::unix::fs::symlink(&target, &service).unwrap();
    run(rotate_cmd(source.path(), port, &["--wait", "2s"]))
        .expect_code(3)
        .expect_stderr("symbolic link");
    run(generate_cmd(source.path(), &["--overlap", "--force"]))
        .expect_code(3)
        .expect_stderr("symbolic link");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"[appuser]\nuser=mallory\n",
        "the link's target was written"
    );
    std::fs::remove_file(&service).unwrap();
    std::fs::write(&service, kept).unwrap();
    assert_eq!(source.snapshot(), before);
    assert_eq!(source.backups().len(), backups, "a backup was made");
}

#[test]
fn a_service_file_that_disagrees_with_the_password_files_is_refused_before_any_write() {
    let source = Source::generate();
    // [appuser] publishes the role itself, but with its twin's password.
    let own = source.value("postgres_app_user_pw.txt");
    let twin = source.value("postgres_app_user_alt_pw.txt");
    let service = source.keys().join(SERVICE_FILE);
    let text = std::fs::read_to_string(&service).unwrap();
    let broken = text.replace(&format!("password={own}\n"), &format!("password={twin}\n"));
    assert_ne!(broken, text);
    std::fs::write(&service, broken).unwrap();
    let before = source.snapshot();
    let backups = source.backups().len();
    // No server is needed: the files are checked before any connection or write.
    let refused = run(rotate_cmd(source.path(), free_port(), &["--wait", "2s"]));
    let refused = refused.expect_code(3);
    refused
        .expect_stderr("pg_service.conf: section [appuser]")
        .expect_stderr("differs from its password file (postgres_app_user_pw.txt)")
        .expect_stderr("restore it or run `generate --overlap --force`");
    assert_eq!(source.snapshot(), before);
    assert_eq!(source.backups().len(), backups, "a backup was made");
    assert_no_leak(&[&own, &twin], None, &[&refused]);
}

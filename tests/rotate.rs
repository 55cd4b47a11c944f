//! Overlap mode's files and `rotate` against real PostgreSQL 15 clusters: `generate
//! --overlap`, the staged rotation (stage, wait for checked TCP logins, publish), its
//! refusals (a login inside its grace period or still open, a server that trusts the
//! connection), the rollback when the staged logins never log in, the split run
//! (`--stage-only`, `--publish-only`, `--abort`), and `rotate` SIGKILLed at moments spread
//! over every stage (the set stays one the sync accepts, `--abort` ends a pending record).
//!
//! The last section holds the attacks on a rotation: a function the application plants
//! in its database, a missing superuser password file, sessions kept open on a retired
//! login, `generate` or a changed file under a pending stage, an aborted stage.
//!
//! Most tests play the sync's database side by hand (`act_as_sync`, `apply_stage_by_hand`)
//! so that they test `rotate` alone; the tests named `with_the_sync_…` run the real
//! `watch --overlap` and check the whole cycle, grace enforced by the server included.

use std::time::Duration;

use crate::common::session::Session;
use crate::common::source::*;
use crate::common::*;

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
        assert!(password == source.value(file), "{role}: published password");
        let twin = source.value(twin_file);
        assert_eq!(twin.len(), 32);
        assert!(
            twin != source.value(file),
            "{role}: the twin's password is its own"
        );
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
    assert_same_files(&source.snapshot(), &before, "files changed");
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
    let bad = bad.expect_code(9);
    bad.expect_stdout("section [appuser]: the password for login \"appuser\" differs");
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
        assert!(
            source.value(twin_file).as_bytes() != &before[twin_file][..],
            "{twin_file} was not regenerated"
        );
        assert!(
            source.published(role) == (role.to_owned(), source.value(file)),
            "[{role}] does not publish the role with its password"
        );
    }
    let backup = source.backups().pop().unwrap();
    assert_same_files(&snapshot(&backup.join("keys")), &before, "files changed");
    // … and --restore puts all of it back.
    run(generate_cmd(source.path(), &["--restore", "--yes"])).expect_ok();
    assert_same_files(&source.snapshot(), &before, "files changed");

    // A plain `generate --force` on that directory (an old runbook) keeps the set
    // consistent: pg_service.conf there means overlap mode.
    run(generate_cmd(source.path(), &["--force"])).expect_ok();
    for (role, _, file, _) in PAIRS {
        assert!(
            source.published(role) == (role.to_owned(), source.value(file)),
            "plain --force: [{role}] does not publish the role with its password"
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
        assert!(after[file] == before[file], "{file} (published) changed");
        assert!(
            after[twin_file] != before[twin_file],
            "{twin_file} was not staged"
        );
        assert!(
            source.published(role) == (twin.to_owned(), source.value(twin_file)),
            "[{role}] does not publish {twin} with its password"
        );
        cluster.assert_login(twin, &source.value(twin_file));
        // The previous login still works: the sync (not rotate) starts its grace period.
        cluster.assert_login(role, &source.value(file));
        secrets.push(source.value(twin_file));
    }
    for file in SINGLE_LOGIN {
        assert!(after[file] != before[file], "{file} was not regenerated");
        secrets.push(source.value(file));
    }
    for file in OIDC_FILES {
        assert!(after[file] == before[file], "{file} changed");
    }
    // The backup holds the complete previous set, byte for byte; no record is left.
    let backup = source.backups().pop().unwrap();
    assert_same_files(&snapshot(&backup.join("keys")), &before, "files changed");
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
            .expect_code(75)
            .expect_stderr(needle)
            .expect_stderr("nothing was written");
        assert_same_files(
            &source.snapshot(),
            &before,
            "a refused rotation wrote files",
        );
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
    assert_same_files(
        &source.snapshot(),
        &before,
        "the staged files were not restored",
    );
    assert!(!source.path().join("rotate-pending.json").exists());
    cluster.start();
    for (role, _, file, _) in PAIRS {
        let (user, password) = source.published(role);
        assert_eq!(user, role);
        assert!(password == source.value(file), "{role}: published password");
        cluster.assert_login(&user, &password);
    }

    // Unreachable from the start: refused without --force (nothing written) …
    cluster.stop();
    let refused = run(rotate_cmd(source.path(), cluster.port, &["--wait", "2s"]));
    refused
        .expect_code(4)
        .expect_stderr("cannot ask the server");
    assert_same_files(&source.snapshot(), &before, "files changed");
    // … and with --force it stages, times out and restores.
    let forced = run(rotate_cmd(
        source.path(),
        cluster.port,
        &["--wait", "2s", "--force"],
    ));
    assert_ne!(forced.code(), Some(0), "{}", forced.describe());
    forced.expect_stderr("rolled back");
    assert_same_files(&source.snapshot(), &before, "files changed");
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
    assert_same_files(&source.snapshot(), &before, "files changed");
}

/// A run killed while staging leaves a login whose file still holds its password from
/// before the rotation (the server let it expire): `--publish-only` must refuse to publish
/// it, changing nothing, and `--abort` still restores the set.
#[test]
fn publish_only_refuses_a_stage_that_did_not_finish() {
    let (cluster, source) = prepared("'-infinity'");
    let before = source.snapshot();
    run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]))
        .with_server_log(&cluster.log)
        .expect_ok();
    // As a kill before the staged write of the second role's twin file would leave it.
    let (_, twin, _, twin_file) = PAIRS[1];
    std::fs::write(source.keys().join(twin_file), &before[twin_file]).unwrap();
    let half = source.snapshot();

    let out = run(rotate_cmd(source.path(), cluster.port, &["--publish-only"]));
    let out = out.expect_code(3);
    out.expect_stderr("the stage did not finish")
        .expect_stderr(twin)
        .expect_stderr("rotate --abort");
    assert!(
        source.snapshot() == half,
        "--publish-only changed files of an unfinished stage"
    );
    for (role, ..) in PAIRS {
        assert_eq!(source.published(role).0, role, "nothing was published");
    }
    run(rotate_cmd(source.path(), cluster.port, &["--abort"])).expect_ok();
    assert!(source.snapshot() == before, "--abort restores the set");
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
    assert!(source.snapshot() != before, "nothing was staged");
    assert_eq!(source.published("appuser").0, "appuser");
    // A second rotation is refused while a stage is pending.
    run(rotate_cmd(source.path(), cluster.port, &[]))
        .expect_code(75)
        .expect_stderr("a staged rotation is pending");
    // --abort restores byte for byte.
    run(rotate_cmd(source.path(), cluster.port, &["--abort"])).expect_ok();
    assert_same_files(&source.snapshot(), &before, "files changed");
    assert!(!source.path().join("rotate-pending.json").exists());

    // Stage again, then publish without a login check of its own.
    run(rotate_cmd(source.path(), cluster.port, &["--stage-only"])).expect_ok();
    let staged = source.snapshot();
    run(rotate_cmd(source.path(), cluster.port, &["--publish-only"]))
        .expect_ok()
        .expect_stdout("published login \"appuser_alt\"");
    for (role, twin, _, twin_file) in PAIRS {
        assert!(
            source.published(role) == (twin.to_owned(), source.value(twin_file)),
            "[{role}] does not publish the twin with its password"
        );
        assert!(
            source.value(twin_file).as_bytes() == &staged[twin_file][..],
            "{twin_file} is not the staged value"
        );
    }
    run(rotate_cmd(source.path(), cluster.port, &["--publish-only"]))
        .expect_code(3)
        .expect_stderr("no staged rotation to finish");
}

// ---- with the sync side (`watch --overlap`) ------------------------------------------

/// One-shot `sync --overlap` over the keys of `source`, plus `extra`.
fn overlap_sync(cluster: &Cluster, source: &Source, extra: &[&str]) -> Run {
    let mut cmd = bin();
    cmd.arg("sync")
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(source.keys())
        .arg("--secrets-source-dir")
        .arg(source.path().join("no-source-dir"))
        .arg("--overlap")
        .args(extra);
    cluster.run(cmd)
}

/// The secret values of the set as it is now, for leak checks (never printed): every
/// file's but `pg_service.conf`'s, which repeats the login files' values, and the OIDC
/// files', which are the fixture's constants that other tests' processes carry.
fn set_values(source: &Source) -> Vec<String> {
    source
        .snapshot()
        .into_iter()
        .filter(|(file, _)| file != SERVICE_FILE && !OIDC_FILES.contains(&file.as_str()))
        .map(|(file, value)| {
            // (Not `unwrap`: the error's Debug holds the bytes.)
            let text = String::from_utf8(value).unwrap_or_else(|_| panic!("{file} is not UTF-8"));
            text.trim_end_matches(['\n', '\r']).to_owned()
        })
        .collect()
}

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

/// A cluster with the app roles, a secrets directory from `generate --overlap`, and a
/// running `watch --overlap` (grace 60 s) that has applied it: every published login logs
/// in.
fn watched_source() -> (Cluster, Source, Running, tempfile::TempDir) {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let source = Source::generate();
    let (mut watcher, state) = overlap_watcher(&cluster, &source.keys(), "60s");
    assert_still_running(&mut watcher);
    wait_until(Duration::from_secs(30), "the first sync", || {
        PAIRS.iter().all(|(role, ..)| {
            let (login, password) = source.published(role);
            cluster.login(&login, &password).is_ok()
        })
    });
    (cluster, source, watcher, state)
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
        .expect_code(75);
    assert_same_files(&source.snapshot(), &before, "files changed");

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
    assert!(password != first_password, "the published password changed");
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
    // Compared, not printed: what was written through the link would be a service file.
    assert!(
        std::fs::read(&target).unwrap() == b"[appuser]\nuser=mallory\n",
        "the link's target was written"
    );
    std::fs::remove_file(&service).unwrap();
    std::fs::write(&service, kept).unwrap();
    assert_same_files(&source.snapshot(), &before, "files changed");
    assert_eq!(source.backups().len(), backups, "a backup was made");
}

/// The temp file of a record write that was killed (`rotate-pending.json` is written in
/// the directory itself, outside `keys/`) is removed by the next run's lock, whatever that
/// run then does (here `--abort`, refused: there is no record).
#[test]
fn the_temp_file_of_a_killed_record_write_is_removed_by_the_next_run() {
    let source = Source::generate();
    let leftover = source.path().join(".rotate-pending.json.tmp-4242");
    std::fs::write(&leftover, b"{\"backup\":").unwrap();
    run(rotate_cmd(source.path(), free_port(), &["--abort"]))
        .expect_code(3)
        .expect_stderr("no staged rotation to finish");
    assert!(!leftover.exists(), "the leftover temp file is still there");
}

/// A section of the operator's own with a line the writer refuses (older libpq reads at
/// most 253 bytes a line; the reader accepts up to 1021): the publish could not rewrite
/// the file, so the rotation is refused before the backup, the record or any stage.
#[test]
fn a_service_file_the_publish_could_not_rewrite_is_refused_before_any_write() {
    let source = Source::generate();
    let service = source.keys().join(SERVICE_FILE);
    let mut text = std::fs::read_to_string(&service).unwrap();
    text.push_str(&format!(
        "\n[reporting]\nhost=db\noptions=-c search_path={}\n",
        "s".repeat(300)
    ));
    std::fs::write(&service, text).unwrap();
    let before = source.snapshot();
    let backups = source.backups().len();
    let refused = run(rotate_cmd(source.path(), free_port(), &["--wait", "2s"]));
    let refused = refused.expect_code(3);
    // Refused with the files, before the server is asked (there is none here).
    refused.expect_stderr("pg_service.conf could not be rewritten by the publish");
    assert_same_files(
        &source.snapshot(),
        &before,
        "a refused rotation wrote files",
    );
    assert_eq!(source.backups().len(), backups, "a backup was made");
    assert!(!source.path().join("rotate-pending.json").exists());
    let values: Vec<String> = PAIRS
        .iter()
        .flat_map(|(_, _, file, twin_file)| [source.value(file), source.value(twin_file)])
        .collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_leak(&values, None, &[&refused]);
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
    assert!(broken != text, "the test broke nothing");
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
    assert_same_files(&source.snapshot(), &before, "files changed");
    assert_eq!(source.backups().len(), backups, "a backup was made");
    assert_no_leak(&[&own, &twin], None, &[&refused]);
}

// ---- SIGKILL at any moment -----------------------------------------------------------

/// Microseconds `rotate` sleeps between the steps of each write (`keyfiles/atomic.rs`'s
/// test hook, which the backup, the record, the staged files and the publish all go
/// through), so kills land inside every step rather than between whole writes.
const KILL_DELAY_US: &str = "10000";

/// Kill moments spread evenly over one uninterrupted run.
const SPREAD_KILLS: u32 = 40;

/// Files a rotation writes: the two unpublished logins' and the six single-login secrets.
const STAGED_COUNT: usize = 8;

/// Where a killed rotation stopped, read from what it left and what it printed (the
/// report's buckets; stdout is line-buffered, so every line printed before the kill is
/// there).
fn landed(
    before: &std::collections::BTreeMap<String, Vec<u8>>,
    after: &std::collections::BTreeMap<String, Vec<u8>>,
    pending: bool,
    new_backup: bool,
    backup_staging_left: bool,
    stdout: &str,
    finished: bool,
) -> &'static str {
    let service_changed = after[SERVICE_FILE] != before[SERVICE_FILE];
    let changed = before.iter().filter(|(f, v)| after[*f] != **v).count();
    let logged_in = stdout.matches("logs in with its staged password").count();
    match (pending, service_changed) {
        _ if finished => "after the end (the run had completed)",
        (false, true) => "published and record removed (final check)",
        (true, true) => "published, record not yet removed",
        (true, false) if changed == STAGED_COUNT && !stdout.contains("waiting up to") => {
            "every file staged, last write finishing"
        }
        (true, false) if changed == STAGED_COUNT && logged_in < PAIRS.len() => {
            "waiting for the staged logins"
        }
        (true, false) if changed == STAGED_COUNT => "publishing (before the rename)",
        (true, false) if changed > 0 => "staging (some files written)",
        (true, false) => "record written, nothing staged yet",
        (false, false) if new_backup => "backup done, record not yet written",
        (false, false) if backup_staging_left => "copying the backup",
        (false, false) => "grace check (before the backup)",
    }
}

/// The names in `dir` that are neither `allowed` nor a temp file of a killed write
/// (`.NAME.tmp-…`, which nothing reads as a secret).
fn unexpected_entries(dir: &std::path::Path, allowed: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !(allowed(n) || is_temp(n)))
                .collect()
        })
        .unwrap_or_default()
}

/// A temp file or staging directory of a write (`keyfiles/atomic.rs`'s names).
fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// The hidden entries (temp files, staging directories) of `dir`.
fn hidden_entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The state a crash test carries from round to round.
struct Crashes<'a> {
    cluster: &'a Cluster,
    source: &'a Source,
    /// The set before the current round's rotation.
    before: std::collections::BTreeMap<String, Vec<u8>>,
    /// Every value seen in the set (never printed; compared with every output at the end).
    secrets: std::collections::BTreeSet<String>,
    runs: Vec<Run>,
    landed: std::collections::BTreeMap<&'static str, u32>,
}

impl Crashes<'_> {
    /// `rotate` (full run) with the test delay; `--force` because after each completed
    /// round the login to re-key next is inside its grace period (the watcher's 60 s):
    /// the grace check still runs and is killed like every other step, it only does not
    /// refuse.
    fn rotate(&self) -> std::process::Command {
        let mut cmd = rotate_cmd(
            self.source.path(),
            self.cluster.port,
            &["--wait", "30s", "--force"],
        );
        cmd.env("PG_PASSWORD_SYNC_TEST_DELAY_US", KILL_DELAY_US);
        cmd
    }

    /// One-shot `sync --overlap` over the keys (the sync the invariants are about).
    fn sync(&mut self) -> Run {
        overlap_sync(self.cluster, self.source, &["--grace", "60s"])
    }

    fn remember_values(&mut self) {
        self.secrets.extend(set_values(self.source));
    }

    /// Checks every invariant after a rotation that ended (killed or not) at `what`,
    /// brings the set back the way docs/overlap.md says (`rotate --abort` while a record is
    /// pending), and makes the result the next round's starting set.
    fn check(&mut self, what: &str, killed: Run, backups_before: usize, recover: &str) {
        let before = self.before.clone();
        let after = self.source.snapshot();
        self.remember_values();
        let root = self.source.path();
        let pending = root.join("rotate-pending.json").exists();
        let new_backup = self.source.backups().len() > backups_before;
        let staging_left = !hidden_entries(&root.join("backups")).is_empty();
        let stage = landed(
            &before,
            &after,
            pending,
            new_backup,
            staging_left,
            &killed.stdout,
            killed.status.success(),
        );
        *self.landed.entry(stage).or_default() += 1;
        let context = format!("{what}: killed at {stage:?}, exit {}", killed.status);

        // (a) Every file of the set is there, complete (atomic renames); anything else in
        // keys/ or backups/ is a temp of the killed write, which nothing reads as a
        // secret and the next locked run removes.
        let names: Vec<&String> = after.keys().collect();
        let expected: Vec<&String> = before.keys().collect();
        assert_eq!(names, expected, "{context}: the set's files changed");
        let changed: Vec<&str> = before
            .iter()
            .filter(|(f, v)| after[*f] != **v)
            .map(|(f, _)| f.as_str())
            .collect();
        for file in &changed {
            let value = &after[*file];
            if *file == SERVICE_FILE {
                continue;
            }
            assert!(
                value.len() >= 32 && !value.contains(&b'\n'),
                "{context}: {file} is torn"
            );
        }
        let stray = unexpected_entries(&self.source.keys(), |n| before.contains_key(n));
        assert!(
            stray.is_empty(),
            "{context}: unexpected in keys/: {stray:?}"
        );
        let stray = unexpected_entries(&root.join("backups"), |n| n.starts_with("backup-"));
        assert!(
            stray.is_empty(),
            "{context}: unexpected in backups/: {stray:?}"
        );
        let stray = unexpected_entries(root, |n| {
            ["keys", "backups", "rotate-pending.json", "no-source-dir"].contains(&n)
        });
        assert!(
            stray.is_empty(),
            "{context}: unexpected in the directory: {stray:?}"
        );

        // (d) A complete backup of the previous set exists as soon as anything differs,
        // and every named backup is complete.
        if !changed.is_empty() {
            assert!(
                self.source
                    .backups()
                    .iter()
                    .any(|b| snapshot(&b.join("keys")) == before),
                "{context}: {changed:?} changed but no backup holds the previous set"
            );
        }
        for backup in self.source.backups() {
            assert_eq!(
                snapshot(&backup.join("keys")).len(),
                before.len(),
                "{context}: {} is incomplete",
                backup.display()
            );
        }

        // (b) The sync accepts the set as the kill left it (a stage never touches a
        // published login or pg_service.conf, and the publish is one rename) …
        let first = self.sync();
        let first = first.expect_ok();
        self.runs.push(first);
        self.runs.push(killed);
        // … and a pending record is ended as the refusal of a re-run says: `--abort`
        // undoes it byte for byte before the publish; after the publish (killed before
        // the record was removed) `--abort` and `--publish-only` both keep the published
        // set and remove the record: undoing it would take back the credential
        // applications may already use.
        if pending {
            let ended = self
                .cluster
                .run(rotate_cmd(root, self.cluster.port, &[recover]));
            let ended = ended.expect_ok();
            let restored = self.source.snapshot();
            if after[SERVICE_FILE] == before[SERVICE_FILE] {
                assert_eq!(recover, "--abort", "{context}: only --abort is tried here");
                // (Compared, never printed: the values are secrets.)
                assert!(
                    restored == before,
                    "{context}: --abort did not restore the set"
                );
            } else {
                assert!(restored == after, "{context}: {recover} undid a publish");
            }
            assert!(
                !root.join("rotate-pending.json").exists(),
                "{context}: {recover} left the record"
            );
            for dir in [self.source.keys(), root.join("backups")] {
                let left = hidden_entries(&dir);
                assert!(left.is_empty(), "{context}: {recover} left {left:?}");
            }
            self.runs.push(ended);
            let synced = self.sync();
            let synced = synced.expect_ok();
            self.runs.push(synced);
        }

        // (c) What pg_service.conf publishes logs in, after the sync.
        for (role, ..) in PAIRS {
            let (login, password) = self.source.published(role);
            if let Err(err) = self.cluster.login(&login, &password) {
                panic!("{context}: role {role}'s published login {login} fails: {err}");
            }
        }
        self.before = self.source.snapshot();
    }

    /// Runs a rotation and SIGKILLs it `at` after its start, or with `moment`, `at` after
    /// `moment` (given the files and the set before the run) holds, polled every
    /// millisecond.
    fn kill(&mut self, what: &str, at: Duration, moment: Option<Moment>, recover: &str) {
        use nix::sys::signal::Signal;
        let backups = self.source.backups().len();
        let mut running = Running::spawn(self.rotate()).with_server_log(&self.cluster.log);
        if let Some(moment) = moment {
            let started = std::time::Instant::now();
            while !moment(self.source, &self.before) {
                // (`is_running` reaps an exited child: it is never signalled then.)
                assert!(
                    running.is_running(),
                    "{what}: rotate ended before its moment"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{what}: the moment never came"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        std::thread::sleep(at);
        // A child that already exited but is not reaped (a moment after the run's end) is
        // a zombie: the signal reaches nothing, and the round checks a finished run.
        running.signal(Signal::SIGKILL);
        let killed = running.finish(Duration::from_secs(30));
        self.check(what, killed, backups, recover);
    }
}

/// A moment of a rotation, told by its files and the set before it.
type Moment = fn(&Source, &std::collections::BTreeMap<String, Vec<u8>>) -> bool;

/// The backup is being copied (its staging directory exists).
fn copying(s: &Source, _: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    !hidden_entries(&s.path().join("backups")).is_empty()
}

/// The record is being written (its temp file exists in the directory itself).
fn recording(s: &Source, _: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    hidden_entries(s.path())
        .iter()
        .any(|n| n.starts_with(".rotate-pending.json"))
}

/// The record is written.
fn recorded(s: &Source, _: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    s.path().join("rotate-pending.json").exists()
}

/// The superuser's file, the third of the eight staged writes, is replaced.
fn staging(s: &Source, before: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    changed(s, before, "postgres_password.txt")
}

/// All eight files are staged (the last write's trailing steps and the wait follow).
fn all_staged(s: &Source, before: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    let now = s.snapshot();
    before
        .iter()
        .filter(|(f, v)| now.get(*f) != Some(*v))
        .count()
        == STAGED_COUNT
}

/// `pg_service.conf` is replaced (the record is removed next).
fn published_now(s: &Source, before: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    changed(s, before, SERVICE_FILE)
}

/// Published and the record removed: the final check runs.
fn checking(s: &Source, before: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    published_now(s, before) && !recorded(s, before)
}

fn changed(s: &Source, before: &std::collections::BTreeMap<String, Vec<u8>>, file: &str) -> bool {
    std::fs::read(s.keys().join(file)).ok().as_ref() != before.get(file)
}

/// `rotate` SIGKILLed at 40 moments spread over a whole run (grace check, backup, record,
/// staged writes, the wait, publish, final check) and at nine moments picked by what it
/// has written, among them the narrow one between the publish and the record's removal.
/// The real `watch --overlap` plays the database side, so the wait succeeds. After every
/// kill: no torn or stray file, a complete backup of the previous set, the sync accepts
/// the set as left, `rotate --abort` undoes a pending record (`--publish-only` finishes a
/// published one), the published logins log in, and no value reaches any output.
#[test]
fn rotate_killed_at_any_moment_leaves_a_consistent_set_and_working_published_logins() {
    let (cluster, source, _watcher, _state) = watched_source();
    let mut crashes = Crashes {
        cluster: &cluster,
        source: &source,
        before: source.snapshot(),
        secrets: Default::default(),
        runs: Vec::new(),
        landed: Default::default(),
    };
    crashes.remember_values();

    // Calibrate: the shorter of two uninterrupted runs (the first one, on cold caches, can
    // take longer, which would put the last moments after every later run's end); both
    // are checked like the killed ones.
    let began = std::time::Instant::now();
    let mut length = Duration::MAX;
    for _ in 0..2 {
        let backups = source.backups().len();
        let full = run(crashes.rotate()).with_server_log(&cluster.log);
        let full = full.expect_ok();
        length = length.min(full.elapsed);
        crashes.check("uninterrupted", full, backups, "--abort");
    }
    crashes.landed.clear();

    for i in 0..SPREAD_KILLS {
        let at = length.mul_f64((f64::from(i) + 0.5) / f64::from(SPREAD_KILLS));
        crashes.kill(&format!("kill {i} at {at:?}"), at, None, "--abort");
    }

    // Moments too narrow (or too early) for the spread, found by what the run has written.
    let zero = Duration::ZERO;
    let ms = Duration::from_millis;
    crashes.kill("just after the start", ms(2), None, "--abort");
    crashes.kill("while copying the backup", zero, Some(copying), "--abort");
    // Its temp file is left in the directory, outside keys/: the next locked run must
    // remove it (the check after the last run below looks).
    crashes.kill("while writing the record", zero, Some(recording), "--abort");
    crashes.kill("right after the record", zero, Some(recorded), "--abort");
    crashes.kill("among the staged writes", zero, Some(staging), "--abort");
    // The last write's two trailing steps take 20 ms; then the wait begins.
    crashes.kill("in the wait", ms(25), Some(all_staged), "--abort");
    // Published, record not yet removed: `--abort` must not restore the published login's
    // file under the new pg_service.conf (a set the sync refuses), and `--publish-only`
    // must go on.
    crashes.kill("after the publish", zero, Some(published_now), "--abort");
    crashes.kill(
        "after the publish",
        zero,
        Some(published_now),
        "--publish-only",
    );
    crashes.kill("in the final check", zero, Some(checking), "--abort");
    let landed = std::mem::take(&mut crashes.landed);
    let kills: u32 = landed.values().sum();

    // A run after all that completes, and leaves no temp file anywhere.
    let backups = source.backups().len();
    let last = run(crashes.rotate()).with_server_log(&cluster.log);
    let last = last.expect_ok();
    crashes.check("last", last, backups, "--abort");
    for dir in [
        source.keys(),
        source.path().join("backups"),
        source.path().to_owned(),
    ] {
        let left = hidden_entries(&dir);
        assert!(left.is_empty(), "{} keeps {left:?}", dir.display());
    }

    let secrets: Vec<&str> = crashes.secrets.iter().map(String::as_str).collect();
    let runs: Vec<&Run> = crashes.runs.iter().collect();
    assert_no_leak(&secrets, Some(&cluster), &runs);
    eprintln!(
        "one run: {length:?}; {kills} kills in {:?}; landed: {landed:?}",
        began.elapsed()
    );
    assert!(
        landed.len() >= 5 && landed.contains_key("published, record not yet removed"),
        "the kills did not spread over the stages: {landed:?}"
    );
}

// ---- Attacks on the rotate side ------------------------------------------------------

/// Whether `role` is a superuser now.
fn is_superuser(cluster: &Cluster, role: &str) -> bool {
    cluster.psql(&format!(
        "SELECT rolsuper::text FROM pg_roles WHERE rolname = {}",
        quote_literal(role)
    )) == "true"
}

/// `rotate` asks the server as the superuser; pointed at the application's database
/// (`PGDATABASE`), it connects where the application login owns the `public` schema and
/// may set the database's `search_path`. A `public.now()` found before the catalog's would
/// run with the superuser's rights. Whatever rotate then does, it must not run it.
#[test]
fn rotate_never_runs_a_function_the_application_planted_in_its_database_as_the_superuser() {
    let (cluster, source) = prepared("'-infinity'");
    let db = cluster.app_owned_database();
    // As appuser, with only the rights of the database's owner: a function that makes the
    // application login a superuser when a superuser calls it, then answers as `now()`.
    cluster.psql_in(
        db,
        "SET ROLE appuser;\n\
         CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql SECURITY INVOKER \
           AS $$ BEGIN \
             IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN \
               EXECUTE 'ALTER ROLE appuser SUPERUSER'; END IF; \
             RETURN pg_catalog.now(); END $$;\n\
         ALTER DATABASE appdb SET search_path = public, pg_catalog;",
    );
    cluster.clear_log();
    assert!(!is_superuser(&cluster, "appuser"));

    let mut cmd = rotate_cmd(source.path(), cluster.port, &["--stage-only"]);
    cmd.env("PGDATABASE", db);
    let out = cluster.run(cmd);
    assert!(
        !is_superuser(&cluster, "appuser"),
        "rotate ran the application's function as the superuser\n{}",
        out.describe()
    );
    let values = set_values(&source);
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_leak(&values, None, &[&out]);
}

/// Without the superuser's password file `rotate` cannot ask the server as the
/// superuser; logging in with an application's published credential instead would read
/// the catalog through a session the application controls (its role's and database's
/// settings). It fails, naming the superuser, before anything is written.
#[test]
fn without_the_superusers_password_file_rotate_fails_naming_it_before_writing_anything() {
    let (cluster, source) = prepared("'-infinity'");
    std::fs::remove_file(source.keys().join("postgres_password.txt")).unwrap();
    let before = source.snapshot();
    let backups = source.backups().len();
    let out = cluster.run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]));
    let out = out.expect_code(4);
    out.expect_stderr("superuser");
    assert_same_files(&source.snapshot(), &before, "files changed");
    assert_eq!(source.backups().len(), backups, "a backup was made");
    assert!(!source.path().join("rotate-pending.json").exists());
    let values = set_values(&source);
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_leak(&values, None, &[&out]);
}

/// A rotation has retired `appuser` (CONNECTION LIMIT 2, which the sync copies to its
/// twin): the watcher (grace 3 s) ended its grace, but two sessions an application opened
/// with its password before the publish (a pool, or whoever holds the leaked password)
/// are still connected, and would be for as long as they like.
struct Retired {
    cluster: Cluster,
    source: Source,
    watcher: Running,
    _state: tempfile::TempDir,
    sessions: Vec<Session>,
    runs: Vec<Run>,
}

/// The sessions of `login` the server has now.
fn sessions_of(cluster: &Cluster, login: &str) -> usize {
    cluster
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = {}",
            quote_literal(login)
        ))
        .parse()
        .unwrap()
}

fn retired_with_open_sessions() -> Retired {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    cluster.psql("ALTER ROLE appuser CONNECTION LIMIT 2");
    let source = Source::generate();
    let (mut watcher, state) = overlap_watcher(&cluster, &source.keys(), "3s");
    assert_still_running(&mut watcher);
    let old = source.value("postgres_app_user_pw.txt");
    wait_until(Duration::from_secs(30), "the first sync", || {
        cluster.login("appuser", &old).is_ok()
    });
    assert_eq!(
        cluster.psql("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'appuser_alt'"),
        "2"
    );
    let sessions: Vec<_> = (0..2)
        .map(|_| Session::connect(cluster.port, "appuser", &old))
        .collect();
    // The rotation that publishes the twin and retires `appuser`.
    let rotated = cluster.run(rotate_cmd(source.path(), cluster.port, &["--wait", "60s"]));
    let rotated = rotated.expect_ok();
    assert_eq!(source.published("appuser").0, "appuser_alt");
    wait_until(
        Duration::from_secs(30),
        "the grace of the retired login to end",
        || {
            cluster.psql(
                "SELECT coalesce(rolvaliduntil < now(), false)::text FROM pg_authid \
                 WHERE rolname = 'appuser'",
            ) == "true"
        },
    );
    assert_eq!(sessions_of(&cluster, "appuser"), 2);
    Retired {
        cluster,
        source,
        watcher,
        _state: state,
        sessions,
        runs: vec![rotated],
    }
}

impl Retired {
    /// Stops the watcher and checks that no value of the set reached any output.
    fn finish(mut self) {
        self.watcher.signal(nix::sys::signal::Signal::SIGTERM);
        let stopped = self.watcher.finish(Duration::from_secs(30));
        self.runs.push(stopped.expect_ok());
        let values = set_values(&self.source);
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let runs: Vec<&Run> = self.runs.iter().collect();
        assert_no_leak(&values, Some(&self.cluster), &runs);
    }
}

#[test]
fn a_sync_after_the_grace_ends_the_sessions_of_the_retired_login_so_it_can_be_rekeyed() {
    let mut r = retired_with_open_sessions();
    let out = overlap_sync(&r.cluster, &r.source, &[]).expect_ok();
    wait_until(
        Duration::from_secs(15),
        "the sessions of the retired login to end",
        || sessions_of(&r.cluster, "appuser") == 0,
    );
    assert!(
        out.line_with(&["retired", "\"appuser\""]).is_some(),
        "the sync did not say it ended the retired login's sessions\n{}",
        out.describe()
    );
    assert!(r.sessions.iter().all(|s| !s.alive()));

    // The next rotation re-keys `appuser`, and its staged login logs in (its connection
    // limit is no longer taken by the retired sessions).
    let rekeyed = r.cluster.run(rotate_cmd(
        r.source.path(),
        r.cluster.port,
        &["--wait", "60s"],
    ));
    let rekeyed = rekeyed.expect_ok();
    rekeyed.expect_stdout("login \"appuser\" logs in with its staged password");
    let (user, password) = r.source.published("appuser");
    assert_eq!(user, "appuser");
    r.cluster.assert_login(&user, &password);
    r.runs.push(out);
    r.runs.push(rekeyed);
    r.finish();
}

#[test]
fn with_keep_retired_sessions_the_sync_leaves_the_sessions_of_a_retired_login_open() {
    let mut r = retired_with_open_sessions();
    let out = overlap_sync(&r.cluster, &r.source, &["--keep-retired-sessions"]).expect_ok();
    assert!(r.sessions.iter().all(Session::alive));
    assert_eq!(sessions_of(&r.cluster, "appuser"), 2);
    r.runs.push(out);
    r.finish();
}

/// `generate --force` over a set with a staged rotation pending would replace the staged
/// values (and everything else), and a later `rotate --abort` would then restore the set
/// from before the stage, the very values the rotation was retiring. It is refused, with
/// nothing written.
#[test]
fn generate_refuses_to_overwrite_a_set_whose_staged_rotation_is_pending() {
    let (cluster, source) = prepared("'-infinity'");
    let before = source.snapshot();
    cluster
        .run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]))
        .expect_ok();
    let staged = source.snapshot();
    let backups = source.backups().len();

    let out = run(generate_cmd(source.path(), &["--force", "--overlap"]));
    let out = out.expect_code(75);
    out.expect_stderr("rotate-pending.json");
    assert_same_files(
        &source.snapshot(),
        &staged,
        "generate wrote over a pending stage",
    );
    assert_eq!(source.backups().len(), backups, "a backup was made");
    assert!(source.path().join("rotate-pending.json").exists());
    out.assert_output_free_of(staged.values().map(Vec::as_slice));

    // The stage is still the rotation's to finish or undo.
    run(rotate_cmd(source.path(), cluster.port, &["--abort"])).expect_ok();
    assert_same_files(
        &source.snapshot(),
        &before,
        "--abort did not restore the set",
    );
}

/// A staged file that someone changed after the stage (a new value renamed into place):
/// `rotate --abort` would put the pre-stage value back over it, undoing a change it knows
/// nothing of. It is refused naming the file, restores nothing and keeps the record.
#[test]
fn abort_refuses_to_roll_back_over_a_staged_file_changed_since_the_stage() {
    let (cluster, source) = prepared("'-infinity'");
    cluster
        .run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]))
        .expect_ok();
    let (_, _, _, twin_file) = PAIRS[0];
    let theirs = unique("someone else's value, long enough");
    source.write(twin_file, &theirs);
    let before_abort = source.snapshot();

    let out = run(rotate_cmd(source.path(), cluster.port, &["--abort"]));
    let out = out.expect_code(3);
    out.expect_stderr(twin_file)
        .expect_stderr("changed since the stage");
    assert_same_files(&source.snapshot(), &before_abort, "--abort restored files");
    assert!(
        source.path().join("rotate-pending.json").exists(),
        "--abort removed the record"
    );
    out.assert_output_free_of(before_abort.values().map(Vec::as_slice));
}

/// With the real sync: a stage the watcher applied (the staged logins log in, open-ended),
/// then `rotate --abort`. The rollback puts each unpublished login's password from before
/// the stage back in its file, and the sync applies it; that retired password must not
/// come back to life (the login was expired before the stage).
#[test]
fn with_the_sync_an_aborted_stage_never_revives_the_retired_password_of_its_login() {
    let (cluster, source, watcher, _state) = watched_source();
    let retired: Vec<String> = PAIRS.iter().map(|p| source.value(p.3)).collect();

    let staging = cluster.run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]));
    let staging = staging.expect_ok();
    let staged: Vec<String> = PAIRS.iter().map(|p| source.value(p.3)).collect();
    for ((_, twin, ..), password) in PAIRS.iter().zip(&staged) {
        wait_until(
            Duration::from_secs(30),
            "the watcher to apply the stage",
            || cluster.login(twin, password).is_ok(),
        );
    }

    let aborted = cluster.run(rotate_cmd(source.path(), cluster.port, &["--abort"]));
    let aborted = aborted.expect_ok();
    for (((_, twin, _, twin_file), old), new) in PAIRS.iter().zip(&retired).zip(&staged) {
        assert!(
            source.value(twin_file) == *old,
            "{twin_file}: --abort did not restore it"
        );
        wait_until(
            Duration::from_secs(30),
            "the watcher to apply the rollback",
            || cluster.login(twin, new).is_err(),
        );
        assert!(
            cluster.login(twin, old).is_err(),
            "the retired password of {twin} logs in again after the aborted stage"
        );
    }
    watcher.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = watcher.finish(Duration::from_secs(30)).expect_ok();
    let mut values = set_values(&source);
    values.extend(staged);
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_leak(&values, Some(&cluster), &[&staging, &aborted, &stopped]);
}

/// The wrong order: overlap mode switched on in the files (`generate --overlap`) and a
/// rotation staged before any sync ran with `--overlap`, so the twins do not exist yet.
/// The sync then creates each twin from its file, which holds the staged password, and a
/// twin created unpublished starts expired: the stage could never log in, the rotation
/// would time out, and its rollback would reach the sync as a new "stage" of a password
/// nobody staged. `rotate` must refuse to stage a login the server does not have yet.
#[test]
fn rotate_refuses_to_stage_a_twin_the_sync_has_not_created_yet() {
    let cluster = Cluster::start_default();
    create_app_roles(&cluster);
    let source = Source::generate();
    // The sync so far runs without overlap mode: roles and superuser synced, no twins.
    let plain = run_sync_without_overlap(&cluster, &source);
    assert_eq!(
        cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname LIKE '%\\_alt'"),
        "0"
    );
    let before = source.snapshot();

    let refused = cluster.run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]));
    let refused = refused.expect_code(3);
    refused
        .expect_stderr("appuser_alt")
        .expect_stderr("nothing was written");
    assert_same_files(
        &source.snapshot(),
        &before,
        "a refused rotation wrote files",
    );
    assert!(
        !source.path().join("rotate-pending.json").exists(),
        "a refused rotation left a record"
    );

    // Once the overlap sync has created the twins, the same rotation stages and its
    // staged logins log in.
    let created = overlap_sync(&cluster, &source, &[]).expect_ok();
    let staging = cluster.run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]));
    let staging = staging.expect_ok();
    let applied = overlap_sync(&cluster, &source, &[]).expect_ok();
    for (_, twin, _, twin_file) in PAIRS {
        cluster.assert_login(twin, &source.value(twin_file));
    }
    let values = set_values(&source);
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_leak(
        &values,
        Some(&cluster),
        &[&plain, &refused, &created, &staging, &applied],
    );
}

/// One-shot `sync` without overlap mode over the keys of `source`.
fn run_sync_without_overlap(cluster: &Cluster, source: &Source) -> Run {
    let mut cmd = bin();
    cmd.arg("sync")
        .args(cluster.conn_args())
        .arg("--keys-dir")
        .arg(source.keys())
        .arg("--secrets-source-dir")
        .arg(source.path().join("no-source-dir"));
    cluster.run(cmd).expect_ok()
}

/// While a staged rotation is pending, its backup is what `rotate --abort` restores byte
/// for byte (and what `--publish-only` checks the stage against). A routine tidy-up,
/// `generate --backup-only --keep-backups 1`, must not prune it: the stage could then be
/// neither undone nor finished.
#[test]
fn generate_never_prunes_the_backup_of_a_pending_stage() {
    let (cluster, source) = prepared("'-infinity'");
    let before = source.snapshot();
    cluster
        .run(rotate_cmd(source.path(), cluster.port, &["--stage-only"]))
        .expect_ok();
    let stage_backup = source.backups().pop().unwrap();

    let tidy = run(generate_cmd(
        source.path(),
        &["--backup-only", "--keep-backups", "1"],
    ));
    assert!(
        stage_backup.exists(),
        "the pending stage's backup was pruned\n{}",
        tidy.describe()
    );
    let aborted = run(rotate_cmd(source.path(), cluster.port, &["--abort"]));
    aborted.expect_ok();
    assert_same_files(
        &source.snapshot(),
        &before,
        "--abort did not restore the set",
    );
}

/// A listener on the address `rotate` (or a sync over TCP) connects to that is not the
/// server: another local user who bound the port while postgres restarts. It asks for the
/// password in clear text (or as MD5) and keeps everything the client sends after its
/// startup packet, for the test to look into.
struct CleartextTrap {
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl CleartextTrap {
    fn start(code: u32) -> CleartextTrap {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let read_packet = |stream: &mut std::net::TcpStream| -> Option<Vec<u8>> {
                        let mut len = [0u8; 4];
                        stream.read_exact(&mut len).ok()?;
                        let len = u32::from_be_bytes(len) as usize;
                        let mut body = vec![0u8; len.checked_sub(4)?];
                        stream.read_exact(&mut body).ok()?;
                        Some(body)
                    };
                    let Some(startup) = read_packet(&mut stream) else {
                        return;
                    };
                    if startup.len() == 4 {
                        // SSLRequest / GSSENCRequest: not spoken here; then the startup.
                        let _ = stream.write_all(b"N");
                        if read_packet(&mut stream).is_none() {
                            return;
                        }
                    }
                    // AuthenticationCleartextPassword (3) or MD5Password (5, with a salt).
                    let mut request = vec![b'R'];
                    if code == 5 {
                        request.extend_from_slice(&12u32.to_be_bytes());
                        request.extend_from_slice(&5u32.to_be_bytes());
                        request.extend_from_slice(b"salt");
                    } else {
                        request.extend_from_slice(&8u32.to_be_bytes());
                        request.extend_from_slice(&code.to_be_bytes());
                    }
                    if stream.write_all(&request).is_err() {
                        return;
                    }
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer);
                    sink.lock().unwrap().extend_from_slice(&answer);
                });
            }
        });
        CleartextTrap { port, received }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

/// `rotate` logs in as the superuser (its password from `DIR/keys`) to ask the server
/// about grace periods. What answers at `--host`/`--port` may not be the server: another
/// local user's listener there asks for the password in clear text (or for an MD5 hash of
/// it, as good as the password against an `md5` line, and open to offline guessing). The
/// superuser's password must never be sent to it: only a SCRAM exchange, which proves
/// the server knows the verifier and gives the listener nothing to replay, may carry it.
#[test]
fn the_superusers_password_is_never_sent_to_a_listener_that_asks_for_it_in_clear_text() {
    let source = Source::generate();
    let superuser = source.value("postgres_password.txt");
    for code in [3, 5] {
        let trap = CleartextTrap::start(code);
        let before = source.snapshot();
        let out = run(rotate_cmd(source.path(), trap.port, &["--stage-only"]));
        assert_ne!(out.code(), Some(0), "{}", out.describe());
        assert_same_files(&source.snapshot(), &before, "rotate wrote files");
        let received = trap.received();
        let md5 = postgres_protocol::password::md5(superuser.as_bytes(), "postgres");
        assert!(
            !received
                .windows(superuser.len())
                .any(|w| w == superuser.as_bytes()),
            "the superuser's password was sent in clear text to the listener"
        );
        assert!(
            !String::from_utf8_lossy(&received).contains(&md5[3..]),
            "an MD5 hash of the superuser's password was sent to the listener"
        );
        let values = set_values(&source);
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        assert_no_leak(&values, None, &[&out]);
    }
}

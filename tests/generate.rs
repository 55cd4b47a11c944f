//! Integration tests of `pg-password-sync generate`: they drive the built binary on temp
//! directories and check files, modes, backups and output, never the internals.
//!
//! Every command's stdout and stderr is also checked for every secret value the test has
//! seen (old and new), since the generator must never print one. Commands run through the
//! shared harness (`common`); the fixtures here are generate's own (keys directory
//! snapshots, backups, value formats), and none of them needs PostgreSQL.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::terminal::{Session, Terminal, echo_is_on};
use crate::common::*;
use base64::Engine;

const RANDOM_FILES: [&str; 8] = [
    "postgres_password.txt",
    "postgres_app_user_pw.txt",
    "postgres_app_ro_pw.txt",
    "postgres_app_owner_pw.txt",
    "postgres_temporal_pw.txt",
    "redis_password.txt",
    "session_signing_secret.txt",
    "csrf_signing_secret.txt",
];

const OIDC: [(&str, &str); 3] = [
    ("oidc_google_client_secret.txt", "OIDC_GOOGLE_CLIENT_SECRET"),
    (
        "oidc_microsoft_client_secret.txt",
        "OIDC_MICROSOFT_CLIENT_SECRET",
    ),
    (
        "oidc_keycloak_client_secret.txt",
        "OIDC_KEYCLOAK_CLIENT_SECRET",
    ),
];

/// OIDC values the tests provide through the environment.
const OIDC_ENV_VALUES: [&str; 3] = [
    "google-Env-Secret-0123456789",
    "microsoft-Env-Secret-0123456789",
    "keycloak-Env-Secret-0123456789",
];

fn all_files() -> Vec<&'static str> {
    RANDOM_FILES
        .iter()
        .copied()
        .chain(OIDC.iter().map(|(f, _)| *f))
        .collect()
}

/// `pg-password-sync generate --dir DIR ARGS…` with a clean environment (no OIDC or
/// `PG_PASSWORD_SYNC_*` variable, no RUST_LOG).
fn generate(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.env_remove("RUST_LOG")
        .arg("generate")
        .arg("--dir")
        .arg(dir)
        .args(args);
    cmd
}

/// `generate ARGS… --k8s-secret NAME --output OUTPUT`: the manifest to a file.
fn k8s_secret_to(dir: &Path, args: &[&str], name: &str, output: &Path) -> Command {
    let mut cmd = generate(dir, args);
    cmd.args(["--k8s-secret", name, "--output"]).arg(output);
    cmd
}

/// Adds the test OIDC values to the environment of `cmd`.
fn with_oidc_env(mut cmd: Command) -> Command {
    for ((_, var), value) in OIDC.iter().zip(OIDC_ENV_VALUES) {
        cmd.env(var, value);
    }
    cmd
}

/// The file contents of a keys directory, by file name (catalog files only).
type Snapshot = BTreeMap<String, Vec<u8>>;

fn snapshot(keys: &Path) -> Snapshot {
    all_files()
        .into_iter()
        .filter_map(|f| fs::read(keys.join(f)).ok().map(|v| (f.to_owned(), v)))
        .collect()
}

fn values(snapshots: &[&Snapshot]) -> Vec<Vec<u8>> {
    snapshots.iter().flat_map(|s| s.values().cloned()).collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A temp directory with `secrets/` (not yet created) as the generator's DIR.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("secrets");
        Fixture { _tmp: tmp, dir }
    }

    fn keys(&self) -> PathBuf {
        self.dir.join("keys")
    }

    /// Backup directories, oldest first (name order works within these tests' suffixes
    /// only when parsed, so sort by the numeric suffix as the tool does).
    fn backups(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.dir.join("backups")) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("backup-"))
            .collect();
        names.sort_by_key(|n| {
            let stamp = n[7..22].to_owned();
            let suffix: u32 = n.get(23..).map_or(0, |s| s.parse().unwrap());
            (stamp, suffix)
        });
        names
            .into_iter()
            .map(|n| self.dir.join("backups").join(n))
            .collect()
    }

    fn newest_backup(&self) -> PathBuf {
        self.backups().pop().expect("a backup exists")
    }

    /// A complete set generated from the environment's OIDC values.
    fn generated(self) -> (Fixture, Snapshot) {
        let out = run(with_oidc_env(generate(&self.dir, &[]))).expect_ok();
        let snap = snapshot(&self.keys());
        out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
        assert_eq!(snap.len(), 11, "{out}");
        (self, snap)
    }
}

fn is_password(value: &[u8]) -> bool {
    value.len() == 32 && value.iter().all(u8::is_ascii_alphanumeric)
}

fn is_signing(value: &[u8]) -> bool {
    value.len() == 43
        && base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .is_ok_and(|bytes| bytes.len() == 32)
}

/// Whether `value` is a complete value of the kind `file` holds (OIDC: the env value).
fn well_formed(file: &str, value: &[u8]) -> bool {
    match OIDC.iter().position(|(f, _)| *f == file) {
        Some(i) => value == OIDC_ENV_VALUES[i].as_bytes(),
        None if file.contains("signing") => is_signing(value),
        None => is_password(value),
    }
}

#[test]
fn fresh_dir_gets_eleven_files_with_the_documented_names_formats_and_modes() {
    let (fx, snap) = Fixture::new().generated();
    assert_eq!(mode(&fx.dir), 0o700);
    assert_eq!(mode(&fx.keys()), 0o700);
    let mut names: Vec<String> = fs::read_dir(fx.keys())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected: Vec<String> = all_files().into_iter().map(str::to_owned).collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "keys/ holds exactly the 11 files and no temp file"
    );
    for file in all_files() {
        assert_eq!(mode(&fx.keys().join(file)), 0o600, "{file}");
        assert!(
            well_formed(file, &snap[file]),
            "{file} is not in the documented format"
        );
    }
    for file in &RANDOM_FILES[..6] {
        assert!(is_password(&snap[*file]), "{file}");
    }
    // Eight independent random values.
    let mut random: Vec<&Vec<u8>> = RANDOM_FILES.iter().map(|f| &snap[*f]).collect();
    random.sort();
    random.dedup();
    assert_eq!(random.len(), 8);
    assert!(
        !fx.dir.join("backups").exists(),
        "nothing to back up on a fresh dir"
    );
}

#[test]
fn second_run_without_force_changes_nothing() {
    let (fx, before) = Fixture::new().generated();
    let stat = |fx: &Fixture| -> Vec<(u64, i64, i64)> {
        all_files()
            .iter()
            .map(|f| {
                let m = fs::metadata(fx.keys().join(f)).unwrap();
                (m.ino(), m.mtime(), m.mtime_nsec())
            })
            .collect()
    };
    let inodes = stat(&fx);
    // Without OIDC values in the environment: nothing is needed, so nothing is asked for.
    let out = run(generate(&fx.dir, &[])).expect_ok();
    out.assert_output_free_of(values(&[&before]).iter().map(Vec::as_slice));
    assert!(out.stdout.contains("kept"), "{out}");
    assert_same_files(&snapshot(&fx.keys()), &before, "files changed");
    assert_eq!(stat(&fx), inodes, "files were rewritten\n{out}");
    assert!(
        fx.backups().is_empty(),
        "no backup without an overwrite\n{out}"
    );
}

#[test]
fn force_regenerates_random_secrets_keeps_oidc_and_backs_up_the_old_set() {
    let (fx, old) = Fixture::new().generated();
    let out = run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_ok();
    let new = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&old, &new]).iter().map(Vec::as_slice));
    for file in RANDOM_FILES {
        assert!(old[file] != new[file], "{file} was not regenerated\n{out}");
        assert!(well_formed(file, &new[file]), "{file}");
        assert_eq!(mode(&fx.keys().join(file)), 0o600);
    }
    for (i, (file, _)) in OIDC.iter().enumerate() {
        assert!(
            new[*file] == OIDC_ENV_VALUES[i].as_bytes(),
            "{file} does not hold the environment's value"
        );
    }
    let backups = fx.backups();
    assert_eq!(backups.len(), 1, "{out}");
    let backup = &backups[0];
    assert_same_files(
        &snapshot(&backup.join("keys")),
        &old,
        "backup is not the old set byte for byte",
    );
    assert_eq!(mode(&fx.dir.join("backups")), 0o700);
    assert_eq!(mode(backup), 0o700);
    assert_eq!(mode(&backup.join("keys")), 0o700);
    for file in all_files() {
        assert_eq!(mode(&backup.join("keys").join(file)), 0o600, "{file}");
    }
    let name = backup.file_name().unwrap().to_str().unwrap();
    assert!(out.stdout.contains(name), "the backup is reported\n{out}");
}

#[test]
fn force_reads_oidc_values_afresh_from_their_source() {
    let (fx, old) = Fixture::new().generated();
    let env_file = fx.dir.join("user-provided.env");
    fs::write(
        &env_file,
        "OIDC_GOOGLE_CLIENT_SECRET=rotated-google-secret-value\n\
         OIDC_MICROSOFT_CLIENT_SECRET=rotated-microsoft-secret\n",
    )
    .unwrap();
    // Keycloak is not in the file: it comes from the environment.
    let out = run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_ok();
    let new = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&old, &new]).iter().map(Vec::as_slice));
    assert!(
        new["oidc_google_client_secret.txt"] == b"rotated-google-secret-value",
        "oidc_google_client_secret.txt does not hold the env file's new value"
    );
    assert!(
        new["oidc_microsoft_client_secret.txt"] == b"rotated-microsoft-secret",
        "oidc_microsoft_client_secret.txt does not hold the env file's new value"
    );
    assert!(
        new["oidc_keycloak_client_secret.txt"] == OIDC_ENV_VALUES[2].as_bytes(),
        "oidc_keycloak_client_secret.txt does not hold the environment's value"
    );
    assert_same_files(
        &snapshot(&fx.newest_backup().join("keys")),
        &old,
        "files changed",
    );
}

#[test]
fn force_with_no_backup_takes_none() {
    let (fx, old) = Fixture::new().generated();
    let out = run(with_oidc_env(generate(
        &fx.dir,
        &["--force", "--no-backup"],
    )))
    .expect_ok();
    out.assert_output_free_of(
        values(&[&old, &snapshot(&fx.keys())])
            .iter()
            .map(Vec::as_slice),
    );
    assert!(fx.backups().is_empty(), "{out}");
    assert!(snapshot(&fx.keys()) != old, "no file changed");
}

/// Kills `generate --force` with SIGKILL at 200 random moments. After each kill every file
/// must hold a complete old or new value, and if any file changed, the newest backup must
/// be the complete old set. The test-only delay hook stretches the write sequence so the
/// random moments fall throughout it.
#[test]
fn sigkill_at_random_moments_never_leaves_a_torn_file_or_an_unbacked_change() {
    use nix::sys::signal::Signal;

    const DELAY_US: &str = "300";
    let (fx, mut old) = Fixture::new().generated();
    let force = || {
        let mut cmd = with_oidc_env(generate(&fx.dir, &["--force"]));
        cmd.env("PG_PASSWORD_SYNC_TEST_DELAY_US", DELAY_US);
        cmd
    };
    // Calibrate: how long one complete run takes on this machine.
    let started = Instant::now();
    let calibration = run(force()).expect_ok();
    let full = started.elapsed();
    old = {
        let new = snapshot(&fx.keys());
        calibration.assert_output_free_of(values(&[&old, &new]).iter().map(Vec::as_slice));
        new
    };
    let window = full.mul_f64(1.3).as_micros() as u64;

    let (mut unchanged, mut partial, mut complete) = (0, 0, 0);
    // About 10 s on 2 idle cores; the guard only stops a pathologically slow run.
    let began = Instant::now();
    for round in 0..200 {
        assert!(
            began.elapsed() < Duration::from_secs(150),
            "too slow: {round} rounds in 150 s"
        );
        let running = Running::spawn(force());
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).unwrap();
        let at = u64::from_le_bytes(random) % window.max(1);
        // The random kill moment (not a synchronisation: the outcome is checked after the
        // child has been reaped, whatever it managed to do).
        std::thread::sleep(Duration::from_micros(at));
        running.signal(Signal::SIGKILL);
        let out = running.finish(Duration::from_secs(20));

        let new = snapshot(&fx.keys());
        out.assert_output_free_of(values(&[&old, &new]).iter().map(Vec::as_slice));
        assert_eq!(new.len(), 11, "round {round}: a file is missing\n{out}");
        let mut changed = 0;
        for (file, value) in &new {
            if *value != old[file] {
                changed += 1;
                assert!(
                    well_formed(file, value),
                    "round {round}: {file} is torn (killed {at} us in)\n{out}"
                );
            }
        }
        if changed > 0 {
            let backup = fx.newest_backup();
            assert_same_files(
                &snapshot(&backup.join("keys")),
                &old,
                &format!(
                    "round {round}: {changed} files changed but {} is not the old set\n{out}",
                    backup.display()
                ),
            );
        }
        match changed {
            0 => unchanged += 1,
            8 => complete += 1,
            _ => partial += 1,
        }
        old = new;
    }
    eprintln!(
        "one run: {full:?}; 200 kills in {:?}; outcomes: {unchanged} unchanged, {partial} \
         partial, {complete} complete",
        began.elapsed()
    );
    assert!(
        unchanged > 0 && complete + partial > 0,
        "kill moments were not spread out"
    );

    // Every named backup is complete, and a normal run cleans the killed runs' temp files.
    for backup in fx.backups() {
        assert_eq!(
            snapshot(&backup.join("keys")).len(),
            11,
            "{}",
            backup.display()
        );
    }
    run(generate(&fx.dir, &["--verify"])).expect_ok();
    run(generate(&fx.dir, &[])).expect_ok();
    for dir in [fx.keys(), fx.dir.join("backups")] {
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{}: {leftovers:?}", dir.display());
    }
}

#[test]
fn restore_round_trip() {
    let (fx, first) = Fixture::new().generated();
    run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_ok();
    let second = snapshot(&fx.keys());
    assert!(first != second, "--force changed no file");

    // Newest backup (the first set); stdin is not a terminal, so no question is asked.
    let out = run(generate(&fx.dir, &["--restore"])).expect_ok();
    out.assert_output_free_of(values(&[&first, &second]).iter().map(Vec::as_slice));
    assert_same_files(&snapshot(&fx.keys()), &first, &format!("{out}"));
    for file in all_files() {
        assert_eq!(mode(&fx.keys().join(file)), 0o600);
    }
    // The replaced set was backed up first and is now the newest backup.
    assert_same_files(
        &snapshot(&fx.newest_backup().join("keys")),
        &second,
        &format!("{out}"),
    );

    // Restore a named backup (back to the second set), with --yes.
    let name = fx
        .newest_backup()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let out = run(generate(&fx.dir, &["--restore", &name, "--yes"])).expect_ok();
    out.assert_output_free_of(values(&[&first, &second]).iter().map(Vec::as_slice));
    assert_same_files(&snapshot(&fx.keys()), &second, &format!("{out}"));

    let out = run(generate(&fx.dir, &["--restore", "backup-19700101-000000"])).expect_code(3);
    assert_same_files(&snapshot(&fx.keys()), &second, &format!("{out}"));
}

#[test]
fn restore_without_backups_fails_and_changes_nothing() {
    let (fx, snap) = Fixture::new().generated();
    let out = run(generate(&fx.dir, &["--restore"])).expect_code(3);
    assert!(out.stderr.contains("no backups"), "{out}");
    assert_same_files(&snapshot(&fx.keys()), &snap, "files changed");
}

#[test]
fn verify_passes_on_a_fresh_set() {
    let (fx, snap) = Fixture::new().generated();
    let out = run(generate(&fx.dir, &["--verify"])).expect_ok();
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
}

#[test]
fn verify_reports_every_problem_and_exits_7() {
    let (fx, snap) = Fixture::new().generated();
    let keys = fx.keys();
    fs::write(
        keys.join("oidc_google_client_secret.txt"),
        "replace-me-with-your-google-secret",
    )
    .unwrap();
    fs::write(keys.join("redis_password.txt"), "Short1234").unwrap();
    fs::set_permissions(
        keys.join("postgres_password.txt"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fs::remove_file(keys.join("csrf_signing_secret.txt")).unwrap();
    fs::write(keys.join("oidc_keycloak_client_secret.txt"), "\n").unwrap();
    let out = run(generate(&fx.dir, &["--verify"])).expect_code(9);
    let mut seen = values(&[&snap]);
    seen.push(b"Short1234".to_vec());
    out.assert_output_free_of(seen.iter().map(Vec::as_slice));
    let problems: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("problem:"))
        .collect();
    let has = |file: &str, what: &str| {
        problems
            .iter()
            .any(|l| l.contains(file) && l.contains(what))
    };
    assert!(has("oidc_google_client_secret.txt", "placeholder"), "{out}");
    assert!(has("redis_password.txt", "shorter than 24"), "{out}");
    assert!(has("postgres_password.txt", "0644"), "{out}");
    assert!(has("csrf_signing_secret.txt", "missing"), "{out}");
    assert!(has("oidc_keycloak_client_secret.txt", "empty"), "{out}");
    assert_eq!(problems.len(), 5, "{out}");
    assert!(out.stderr.contains("5 problem"), "{out}");
}

#[test]
fn an_oversized_file_is_a_verify_problem_and_force_replaces_it() {
    let (fx, snap) = Fixture::new().generated();
    let big = vec![b'A'; 5000];
    fs::write(fx.keys().join("redis_password.txt"), &big).unwrap();
    let out = run(generate(&fx.dir, &["--verify"])).expect_code(9);
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(
        out.stdout
            .contains("problem: redis_password.txt: is larger than 4096 bytes"),
        "{out}"
    );
    let out = run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_ok();
    let now = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&snap, &now]).iter().map(Vec::as_slice));
    assert!(is_password(&now["redis_password.txt"]), "{out}");
    assert!(
        fs::read(fx.newest_backup().join("keys/redis_password.txt")).unwrap() == big,
        "the oversized redis_password.txt was not backed up byte for byte\n{out}"
    );
    run(generate(&fx.dir, &["--verify"])).expect_ok();
}

#[test]
fn list_shows_names_sizes_modes_and_times_but_no_value() {
    let (fx, snap) = Fixture::new().generated();
    let out = run(generate(&fx.dir, &["--list"])).expect_ok();
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    for file in all_files() {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(file))
            .unwrap_or_else(|| panic!("{file} not listed\n{out}"));
        let size = snap[file].len().to_string();
        assert!(line.split_whitespace().any(|w| w == size), "{line}");
        assert!(line.contains("0600"), "{line}");
        assert!(line.contains(':'), "no time in {line}");
    }
    fs::remove_file(fx.keys().join("redis_password.txt")).unwrap();
    let out = run(generate(&fx.dir, &["--list"])).expect_ok();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("redis_password.txt") && l.contains("missing")),
        "{out}"
    );
}

#[test]
fn backup_only_list_backups_and_keep_backups() {
    let (fx, snap) = Fixture::new().generated();
    for _ in 0..3 {
        let out = run(generate(&fx.dir, &["--backup-only"])).expect_ok();
        out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    }
    let backups = fx.backups();
    assert_eq!(backups.len(), 3);
    for backup in &backups {
        assert_same_files(&snapshot(&backup.join("keys")), &snap, "files changed");
    }
    assert_same_files(
        &snapshot(&fx.keys()),
        &snap,
        "--backup-only changes no file",
    );
    let out = run(generate(&fx.dir, &["--list-backups"])).expect_ok();
    for backup in &backups {
        let name = backup.file_name().unwrap().to_str().unwrap();
        assert!(out.stdout.contains(name), "{out}");
    }
    let out = run(generate(&fx.dir, &["--backup-only", "--keep-backups", "2"])).expect_ok();
    let left = fx.backups();
    assert_eq!(left.len(), 2, "{out}");
    assert!(
        !left.contains(&backups[0]) && !left.contains(&backups[1]),
        "the oldest go\n{out}"
    );
    run(generate(&fx.dir, &["--keep-backups", "0"])).expect_code(2);
}

#[test]
fn user_secrets_file_is_parsed_not_executed() {
    let fx = Fixture::new();
    fs::create_dir_all(&fx.dir).unwrap();
    let marker = fx.dir.join("executed");
    let text = format!(
        "# OIDC client secrets\r\n\
         \r\n\
         export OIDC_GOOGLE_CLIENT_SECRET='g00gle secret # $(touch {m})'\r\n\
         OIDC_MICROSOFT_CLIENT_SECRET=\"ms=secret=with=equals \\\"q\\\"\" # comment\r\n\
         OIDC_KEYCLOAK_CLIENT_SECRET=kc-plain-secret-value   # comment\r\n\
         UNRELATED=$(touch {m})\r\n",
        m = marker.display()
    );
    fs::write(fx.dir.join("user-provided.env"), text).unwrap();
    // The environment also has values: the file wins.
    let out = run(with_oidc_env(generate(&fx.dir, &[]))).expect_ok();
    let snap = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(
        snap["oidc_google_client_secret.txt"]
            == format!("g00gle secret # $(touch {})", marker.display()).as_bytes(),
        "oidc_google_client_secret.txt: the single-quoted value was not taken verbatim"
    );
    assert!(
        snap["oidc_microsoft_client_secret.txt"] == b"ms=secret=with=equals \"q\"",
        "oidc_microsoft_client_secret.txt: the double-quoted value was not unescaped"
    );
    assert!(
        snap["oidc_keycloak_client_secret.txt"] == b"kc-plain-secret-value",
        "oidc_keycloak_client_secret.txt: the plain value (comment dropped) was not taken"
    );
    assert!(!marker.exists(), "the env file was executed");
}

#[test]
fn explicit_user_secrets_file_and_environment_fallback() {
    let fx = Fixture::new();
    let tmp = fx.dir.parent().unwrap().join("elsewhere.env");
    fs::write(&tmp, "OIDC_GOOGLE_CLIENT_SECRET=from-explicit-file-123\n").unwrap();
    let mut cmd = generate(&fx.dir, &["--user-secrets-file", tmp.to_str().unwrap()]);
    cmd.env("OIDC_MICROSOFT_CLIENT_SECRET", "ms-from-environment-123");
    cmd.env("OIDC_KEYCLOAK_CLIENT_SECRET", "kc-from-environment-123");
    let out = run(cmd).expect_ok();
    let snap = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(
        snap["oidc_google_client_secret.txt"] == b"from-explicit-file-123",
        "oidc_google_client_secret.txt does not hold the explicit file's value"
    );
    assert!(
        snap["oidc_microsoft_client_secret.txt"] == b"ms-from-environment-123",
        "oidc_microsoft_client_secret.txt does not hold the environment's value"
    );

    // A named file that does not exist is an error, even though the environment has values.
    let fx = Fixture::new();
    let missing = fx.dir.parent().unwrap().join("missing.env");
    let cmd = generate(&fx.dir, &["--user-secrets-file", missing.to_str().unwrap()]);
    run(with_oidc_env(cmd)).expect_code(3);
    assert!(!fx.keys().exists());
}

#[test]
fn unparseable_env_file_line_is_an_error_with_its_number_not_its_content() {
    let fx = Fixture::new();
    fs::create_dir_all(&fx.dir).unwrap();
    fs::write(
        fx.dir.join("user-provided.env"),
        "OIDC_GOOGLE_CLIENT_SECRET=fine-value-1234567\nOIDC_MICROSOFT_CLIENT_SECRET='TopSecretUnterminated\n",
    )
    .unwrap();
    let out = run(with_oidc_env(generate(&fx.dir, &[]))).expect_code(3);
    assert!(out.stderr.contains("line 2"), "{out}");
    assert!(out.stderr.contains("user-provided.env"), "{out}");
    // (The output is not shown: it would hold the values these check for.)
    assert!(
        !out.stderr.contains("TopSecret") && !out.stdout.contains("TopSecret"),
        "the unparseable line's value appears in the output of {} ({})",
        out.command,
        out.status
    );
    assert!(
        !out.stderr.contains("fine-value"),
        "line 1's value appears on stderr of {} ({})",
        out.command,
        out.status
    );
    assert!(!fx.keys().exists(), "nothing written\n{out}");
}

#[test]
fn missing_oidc_value_non_interactive_fails_before_writing() {
    // Fresh dir: nothing created at all.
    let fx = Fixture::new();
    let mut cmd = generate(&fx.dir, &["--non-interactive"]);
    cmd.env("OIDC_GOOGLE_CLIENT_SECRET", "only-google-is-set-123");
    let out = run(cmd).expect_code(3);
    assert!(out.stderr.contains("OIDC_MICROSOFT_CLIENT_SECRET"), "{out}");
    assert!(out.stderr.contains("OIDC_KEYCLOAK_CLIENT_SECRET"), "{out}");
    assert!(!out.stderr.contains("OIDC_GOOGLE_CLIENT_SECRET"), "{out}");
    assert!(
        !out.stderr.contains("only-google"),
        "the OIDC value that was set appears on stderr of {} ({})",
        out.command,
        out.status
    );
    assert!(!fx.keys().exists(), "keys/ was created\n{out}");

    // Existing set with --force: keys/ untouched and no backup taken.
    let (fx, snap) = Fixture::new().generated();
    let mut cmd = generate(&fx.dir, &["--force"]); // stdin is not a TTY: non-interactive
    cmd.env("OIDC_GOOGLE_CLIENT_SECRET", OIDC_ENV_VALUES[0]);
    cmd.env("OIDC_MICROSOFT_CLIENT_SECRET", OIDC_ENV_VALUES[1]);
    let out = run(cmd).expect_code(3);
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(out.stderr.contains("OIDC_KEYCLOAK_CLIENT_SECRET"), "{out}");
    assert_same_files(&snapshot(&fx.keys()), &snap, "files changed");
    assert!(fx.backups().is_empty(), "{out}");
}

#[test]
fn k8s_secret_manifest_holds_every_key_base64_encoded() {
    let (fx, snap) = Fixture::new().generated();
    // The manifest carries values base64-encoded (by design): failures show everything
    // but stdout.
    let out = run(generate(
        &fx.dir,
        &["--k8s-secret", "app-secrets", "--namespace", "prod"],
    ));
    assert!(out.code() == Some(0), "{}", out.describe_without_stdout());
    // Raw values appear nowhere.
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(
        out.stdout.starts_with("apiVersion: v1\nkind: Secret\n"),
        "{}",
        out.describe_without_stdout()
    );
    assert!(
        out.stdout
            .contains("  name: app-secrets\n  namespace: prod\n"),
        "{}",
        out.describe_without_stdout()
    );
    let data: BTreeMap<&str, &str> = out
        .stdout
        .split("\ndata:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no data section\n{}", out.describe_without_stdout()))
        .lines()
        .map(|l| l.trim().split_once(": ").unwrap())
        .collect();
    assert_eq!(data.len(), 11, "{}", out.describe_without_stdout());
    for file in all_files() {
        let key = file.strip_suffix(".txt").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(data[key])
            .unwrap();
        assert!(
            decoded == snap[file],
            "{key}: the manifest's value is not {file}'s content"
        );
    }

    let manifest = fx.dir.parent().unwrap().join("secret.yaml");
    let out = run(k8s_secret_to(&fx.dir, &[], "app-secrets", &manifest)).expect_ok();
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(
        !out.stdout.contains("data:"),
        "the manifest reached stdout as well\n{}",
        out.describe_without_stdout()
    );
    assert_eq!(mode(&manifest), 0o600);
    assert!(
        fs::read_to_string(&manifest)
            .unwrap()
            .contains("postgres_app_user_pw: ")
    );

    // With the manifest on stdout, every report goes to stderr: stdout stays pure YAML.
    run(generate(&fx.dir, &["--backup-only"])).expect_ok();
    let out = run(with_oidc_env(generate(
        &fx.dir,
        &["--force", "--k8s-secret", "app", "--keep-backups", "1"],
    )));
    assert!(out.code() == Some(0), "{}", out.describe_without_stdout());
    let new = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&snap, &new]).iter().map(Vec::as_slice));
    let shown = out.describe_without_stdout();
    assert!(out.stdout.starts_with("apiVersion: v1\n"), "{shown}");
    assert_eq!(
        out.stdout.lines().count(),
        17,
        "only the manifest on stdout\n{shown}"
    );
    assert!(out.stderr.contains("backed up 11 files"), "{shown}");
    assert!(out.stderr.contains("removed old backup"), "{shown}");
    assert_eq!(fx.backups().len(), 1, "{shown}");

    run(generate(&fx.dir, &["--k8s-secret", "Bad_Name"])).expect_code(3);
    run(generate(
        &fx.dir,
        &["--k8s-secret", "ok", "--namespace", "a.b"],
    ))
    .expect_code(3);
}

#[test]
fn leftover_temp_files_of_a_killed_run_are_removed() {
    let (fx, snap) = Fixture::new().generated();
    let leftover = fx.keys().join(".redis_password.txt.tmp-1-abcdef");
    fs::write(&leftover, "half").unwrap();
    run(generate(&fx.dir, &[])).expect_ok();
    assert!(!leftover.exists());
    assert_same_files(&snapshot(&fx.keys()), &snap, "files changed");
}

/// `generate --dir DIR ARGS…` on a terminal (`None`: skipped, `script` is missing).
fn terminal(dir: &Path, args: &[&str]) -> Option<Terminal> {
    Terminal::start(&generate(dir, args))
}

#[test]
fn on_a_terminal_missing_oidc_values_are_prompted_without_echo() {
    let fx = Fixture::new();
    let typed = [
        "Typed-Google-Secret-7781",
        "Typed-Microsoft-Secret-7782",
        "Typed-Keycloak-Secret-7783",
    ];
    let Some(mut term) = terminal(&fx.dir, &[]) else {
        return;
    };
    for ((_, var), value) in OIDC.iter().zip(typed) {
        term.expect(&format!("{var} (input hidden): "));
        term.type_line(value);
    }
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 0, "{transcript}");
    let snap = snapshot(&fx.keys());
    assert_eq!(snap.len(), 11, "{transcript}");
    // (Transcripts that hold a value are not shown.)
    for ((file, _), value) in OIDC.iter().zip(typed) {
        assert!(
            snap[*file] == value.as_bytes(),
            "{file} does not hold the value typed for it"
        );
        assert!(
            !transcript.contains(value),
            "the secret typed for {file} was echoed"
        );
    }
    for (file, value) in &snap {
        assert!(
            !transcript.contains(&*String::from_utf8_lossy(value)),
            "{file}'s value appears on the terminal"
        );
    }
    assert!(
        echo_is_on(&transcript),
        "echo was not restored:\n{transcript}"
    );
}

/// Ctrl-C in the middle of typing a hidden value: the terminal is restored (echo back on,
/// the half-typed line dropped), nothing is written, and then the process dies of SIGINT
/// (status 130) like any program stopped by Ctrl-C. Left to SIGINT's default action at the
/// prompt it would die with echo off.
#[test]
fn on_a_terminal_ctrl_c_at_the_hidden_prompt_restores_echo_and_writes_nothing() {
    let fx = Fixture::new();
    let Some(mut term) = terminal(&fx.dir, &[]) else {
        return;
    };
    term.expect(&format!("{} (input hidden): ", OIDC[0].1));
    term.type_raw(b"Half-Typed-Secret-9901\x03");
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 130, "{transcript}");
    assert!(
        transcript.contains("interrupted (SIGINT)"),
        "the reason is given:\n{transcript}"
    );
    assert!(
        !transcript.contains("Half-Typed-Secret-9901"),
        "the half-typed secret was echoed (transcript not shown: it holds it)"
    );
    assert!(!fx.keys().exists(), "nothing is written:\n{transcript}");
    assert!(
        echo_is_on(&transcript),
        "echo was not restored:\n{transcript}"
    );
}

#[test]
fn on_a_terminal_non_interactive_still_refuses_to_prompt() {
    let fx = Fixture::new();
    let Some(term) = terminal(&fx.dir, &["--non-interactive"]) else {
        return;
    };
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 3, "{transcript}");
    assert!(
        transcript.contains("OIDC_GOOGLE_CLIENT_SECRET"),
        "{transcript}"
    );
    assert!(!transcript.contains("input hidden"), "{transcript}");
    assert!(!fx.keys().exists());
}

#[test]
fn on_a_terminal_restore_asks_for_confirmation() {
    let (fx, first) = Fixture::new().generated();
    run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_ok();
    let second = snapshot(&fx.keys());

    let Some(mut term) = terminal(&fx.dir, &["--restore"]) else {
        return;
    };
    term.expect("[y/N] ");
    term.type_line("n");
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 1, "{transcript}");
    assert!(transcript.contains("cancelled"), "{transcript}");
    assert_same_files(
        &snapshot(&fx.keys()),
        &second,
        "declined restore changed files",
    );
    assert_eq!(fx.backups().len(), 1, "declined restore took a backup");

    let Some(mut term) = terminal(&fx.dir, &["--restore"]) else {
        return;
    };
    term.expect("[y/N] ");
    term.type_line("y");
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 0, "{transcript}");
    assert_same_files(&snapshot(&fx.keys()), &first, "files changed");
    for (set, snap) in [("restored", &first), ("replaced", &second)] {
        for (file, value) in snap {
            assert!(
                !transcript.contains(&*String::from_utf8_lossy(value)),
                "the {set} set's {file} value appears on the terminal"
            );
        }
    }

    // --yes skips the question.
    let Some(term) = terminal(&fx.dir, &["--restore", "--yes"]) else {
        return;
    };
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 0, "{transcript}");
    assert!(!transcript.contains("[y/N]"), "{transcript}");
    assert_same_files(&snapshot(&fx.keys()), &second, "files changed");
}

#[test]
fn a_second_concurrent_run_is_refused_while_the_directory_is_locked() {
    use nix::fcntl::{Flock, FlockArg};
    let (fx, snap) = Fixture::new().generated();
    let held = Flock::lock(fs::File::open(&fx.dir).unwrap(), FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let out = run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_code(75);
    assert!(
        out.stderr
            .contains("another `generate` or `rotate` is running"),
        "{out}"
    );
    assert_same_files(&snapshot(&fx.keys()), &snap, "files changed");
    assert!(fx.backups().is_empty());
    drop(held);
    run(with_oidc_env(generate(&fx.dir, &["--force"]))).expect_ok();
}

/// A race: were the files to create decided before the lock is taken, a file another run
/// created in between (here: while this run waits at the OIDC prompt) would be overwritten
/// as "new", without a backup. Under the lock the plan is made again.
#[test]
fn a_file_created_while_waiting_at_the_prompt_is_kept_not_overwritten() {
    let (fx, snap) = Fixture::new().generated();
    fs::remove_file(fx.keys().join("redis_password.txt")).unwrap();
    fs::remove_file(fx.keys().join(OIDC[0].0)).unwrap();
    let Some(mut term) = terminal(&fx.dir, &[]) else {
        return;
    };
    term.expect(&format!("{} (input hidden): ", OIDC[0].1));
    // Another run's result appears now, between the first look and the lock.
    let concurrent = "ConcurrentRedisValue0123456789ab";
    fs::write(fx.keys().join("redis_password.txt"), concurrent).unwrap();
    let typed = "Typed-Google-Secret-4242";
    term.type_line(typed);
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 0, "{transcript}");
    let now = snapshot(&fx.keys());
    assert!(
        now["redis_password.txt"] == concurrent.as_bytes(),
        "redis_password.txt, created before the lock, was overwritten:\n{transcript}"
    );
    assert!(transcript.contains("kept"), "{transcript}");
    assert!(
        now[OIDC[0].0] == typed.as_bytes(),
        "{} does not hold the value typed for it",
        OIDC[0].0
    );
    for file in all_files() {
        if file != "redis_password.txt" && file != OIDC[0].0 {
            assert!(now[file] == snap[file], "{file} changed");
        }
    }
    for (set, snap) in [("old", &snap), ("new", &now)] {
        for (file, value) in snap {
            assert!(
                !transcript.contains(&*String::from_utf8_lossy(value)),
                "the {set} set's {file} value appears on the terminal"
            );
        }
    }
}

#[test]
fn k8s_secret_to_a_terminal_is_refused_but_piping_and_output_work() {
    let (fx, snap) = Fixture::new().generated();
    let Some(term) = terminal(&fx.dir, &["--k8s-secret", "app"]) else {
        return;
    };
    let Session { code, transcript } = term.finish();
    // Not shown: were the refusal missing, the transcript would hold the manifest.
    assert_eq!(code, 3, "not refused (transcript not shown)");
    assert!(
        transcript.contains("--output FILE"),
        "the refusal does not name --output FILE (transcript not shown)"
    );
    assert!(
        !transcript.contains("data:"),
        "the manifest reached the terminal"
    );
    for (file, value) in &snap {
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        assert!(
            !transcript.contains(&encoded),
            "{file}'s value reached the terminal, base64-encoded"
        );
    }
    assert_same_files(&snapshot(&fx.keys()), &snap, "files changed");

    // With --force, the refusal comes before any write or backup.
    let Some(term) = terminal(&fx.dir, &["--k8s-secret=app", "--force"]) else {
        return;
    };
    let Session { code, .. } = term.finish();
    assert_eq!(code, 3, "--force: not refused (transcript not shown)");
    assert_same_files(&snapshot(&fx.keys()), &snap, "refused run changed files");
    assert!(fx.backups().is_empty(), "refused run took a backup");

    // To a file, on the same terminal, it works.
    let manifest = fx.dir.parent().unwrap().join("m.yaml");
    let output = format!("--output={}", manifest.display());
    let Some(term) = terminal(&fx.dir, &["--k8s-secret=app", &output]) else {
        return;
    };
    let Session { code, transcript } = term.finish();
    assert_eq!(code, 0, "{transcript}");
    assert!(fs::read_to_string(&manifest).unwrap().contains("data:\n"));
    assert!(
        !transcript.contains("data:"),
        "the manifest reached the terminal as well"
    );
}

#[test]
fn every_option_works_from_its_environment_variable() {
    let (fx, snap) = Fixture::new().generated();
    let with = |vars: &[(&str, &str)], args: &[&str]| {
        let mut cmd = generate(&fx.dir, args);
        for (var, value) in vars {
            cmd.env(var, value);
        }
        run(cmd)
    };
    let oidc = OIDC.iter().map(|(_, var)| *var).zip(OIDC_ENV_VALUES);
    let oidc: Vec<(&str, &str)> = oidc.collect();
    // Modes switched off by their variables (or set empty) do not conflict with --force.
    let mut vars = vec![
        ("PG_PASSWORD_SYNC_VERIFY", "false"),
        ("PG_PASSWORD_SYNC_LIST", "0"),
        ("PG_PASSWORD_SYNC_RESTORE", ""),
        ("PG_PASSWORD_SYNC_K8S_SECRET", ""),
        ("PG_PASSWORD_SYNC_K8S_NAMESPACE", ""),
        ("PG_PASSWORD_SYNC_OUTPUT", ""),
        ("PG_PASSWORD_SYNC_NO_BACKUP", "yes"),
    ];
    vars.extend(&oidc);
    let out = with(&vars, &["--force"]).expect_ok();
    let unbacked = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&snap, &unbacked]).iter().map(Vec::as_slice));
    assert!(
        unbacked["redis_password.txt"] != snap["redis_password.txt"],
        "--force with the other modes' variables off: redis_password.txt was not \
         regenerated\n{out}"
    );
    assert!(fx.backups().is_empty(), "{out}");

    let mut vars = vec![
        ("PG_PASSWORD_SYNC_FORCE", "true"),
        ("PG_PASSWORD_SYNC_VERIFY", "off"),
    ];
    vars.extend(&oidc);
    let out = with(&vars, &[]).expect_ok();
    let forced = snapshot(&fx.keys());
    out.assert_output_free_of(values(&[&unbacked, &forced]).iter().map(Vec::as_slice));
    assert!(
        forced["redis_password.txt"] != unbacked["redis_password.txt"],
        "PG_PASSWORD_SYNC_FORCE=true: redis_password.txt was not regenerated\n{out}"
    );
    assert_eq!(fx.backups().len(), 1, "{out}");

    let out = with(&[("PG_PASSWORD_SYNC_LIST", "1")], &[]).expect_ok();
    assert!(out.stdout.contains("MODIFIED (UTC)"), "{out}");
    let out = with(&[("PG_PASSWORD_SYNC_VERIFY", "yes")], &[]).expect_ok();
    assert!(out.stdout.contains("pass"), "{out}");
    let out = with(&[("PG_PASSWORD_SYNC_LIST_BACKUPS", "on")], &[]).expect_ok();
    assert!(out.stdout.contains("(newest)"), "{out}");
    let out = with(&[("PG_PASSWORD_SYNC_BACKUP_ONLY", "true")], &[]).expect_ok();
    assert!(out.stdout.contains("backed up 11 files"), "{out}");
    assert_eq!(fx.backups().len(), 2, "{out}");
    // Two modes switched on by their variables conflict.
    let out = with(
        &[
            ("PG_PASSWORD_SYNC_LIST", "1"),
            ("PG_PASSWORD_SYNC_VERIFY", "1"),
        ],
        &[],
    )
    .expect_code(3);
    assert!(out.stderr.contains("cannot be used with"), "{out}");

    let manifest = fx.dir.parent().unwrap().join("env.yaml");
    let out = with(
        &[
            ("PG_PASSWORD_SYNC_K8S_SECRET", "app-secrets"),
            ("PG_PASSWORD_SYNC_K8S_NAMESPACE", "prod"),
            ("PG_PASSWORD_SYNC_OUTPUT", manifest.to_str().unwrap()),
        ],
        &[],
    )
    .expect_ok();
    out.assert_output_free_of(values(&[&forced]).iter().map(Vec::as_slice));
    let text = fs::read_to_string(&manifest).unwrap();
    // Only the part before the values is shown.
    let head = text
        .split_once("data:")
        .map_or("(no data section)", |(head, _)| head);
    assert!(
        text.contains("  name: app-secrets\n  namespace: prod\n"),
        "{head}"
    );

    // Restore the oldest backup (the set before PG_PASSWORD_SYNC_FORCE) by name.
    let oldest = fx.backups()[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let out = with(
        &[
            ("PG_PASSWORD_SYNC_RESTORE", &oldest),
            ("PG_PASSWORD_SYNC_YES", "true"),
        ],
        &[],
    )
    .expect_ok();
    out.assert_output_free_of(values(&[&unbacked, &forced]).iter().map(Vec::as_slice));
    assert_same_files(&snapshot(&fx.keys()), &unbacked, &format!("{out}"));
}

// --- Links and special files planted in DIR, and inputs refused before the first write ---
//
// A cloned repository can carry symbolic links anywhere under DIR. `generate` never follows
// one there: it refuses, names the path and the problem, and leaves the link's target as it
// was (content and mode).

/// A file outside DIR that planted links point at, with content that must never be copied
/// anywhere and a mode that must never change.
const TARGET_CONTENT: &str = "outside-target-content-0123456789";

fn outside_target(fx: &Fixture, name: &str) -> PathBuf {
    let path = fx.dir.parent().unwrap().join(name);
    fs::write(&path, TARGET_CONTENT).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// Asserts that `target` still has its content and mode 0644.
fn untouched(target: &Path, out: &Run) {
    // Compared, not printed: what was written through the link would be a key value.
    assert!(
        fs::read_to_string(target).unwrap() == TARGET_CONTENT,
        "the link's target {} was written\n{out}",
        target.display()
    );
    assert_eq!(mode(target), 0o644, "the link's target was chmod'ed\n{out}");
}

/// Asserts that the target's content (raw or base64) appears in no output and no manifest.
fn target_not_revealed(out: &Run, manifest: Option<&Path>) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(TARGET_CONTENT);
    for (text, form) in [(TARGET_CONTENT, "raw"), (encoded.as_str(), "base64")] {
        assert!(
            !out.stdout.contains(text) && !out.stderr.contains(text),
            "the link target's content ({form}) appears in the output of {} ({})",
            out.command,
            out.status
        );
        if let Some(manifest) = manifest {
            let written = fs::read_to_string(manifest).unwrap_or_default();
            assert!(!written.contains(text), "the target reached the manifest");
        }
    }
}

/// `generate --k8s-secret app --output FILE` with a planted link to `target`: refused
/// (exit 3), `target` untouched, neither it nor a key value in any output, no manifest.
fn manifest_refused(fx: &Fixture, snap: &Snapshot, target: &Path) -> Run {
    let manifest = fx.dir.parent().unwrap().join("m.yaml");
    let out = run(k8s_secret_to(&fx.dir, &[], "app", &manifest)).expect_code(3);
    untouched(target, &out);
    target_not_revealed(&out, Some(&manifest));
    out.assert_output_free_of(values(&[snap]).iter().map(Vec::as_slice));
    assert!(!manifest.exists(), "{out}");
    out
}

/// Replaces `keys/FILE` by a symbolic link to `target`.
fn plant_link(fx: &Fixture, file: &str, target: &Path) {
    let link = fx.keys().join(file);
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(target, &link).unwrap();
}

fn is_link(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn a_kept_key_file_that_is_a_symlink_is_refused_and_its_target_not_chmoded() {
    let (fx, snap) = Fixture::new().generated();
    let target = outside_target(&fx, "target.txt");
    plant_link(&fx, "redis_password.txt", &target);
    let out = run(with_oidc_env(generate(&fx.dir, &[]))).expect_code(3);
    untouched(&target, &out);
    target_not_revealed(&out, None);
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(out.stderr.contains("redis_password.txt"), "{out}");
    assert!(out.stderr.contains("symbolic link"), "{out}");
    assert!(is_link(&fx.keys().join("redis_password.txt")), "{out}");
}

#[test]
fn k8s_secret_with_a_symlinked_key_is_refused_and_the_target_never_reaches_the_manifest() {
    let (fx, snap) = Fixture::new().generated();
    let target = outside_target(&fx, "target.txt");
    plant_link(&fx, "session_signing_secret.txt", &target);
    let out = manifest_refused(&fx, &snap, &target);
    assert!(out.stderr.contains("session_signing_secret.txt"), "{out}");
    // To stdout (a pipe) as well.
    let out = run(generate(&fx.dir, &["--k8s-secret", "app"]));
    assert!(out.code() == Some(3), "{}", out.describe_without_stdout());
    target_not_revealed(&out, None);
    assert!(
        !out.stdout.contains("data:"),
        "a manifest reached stdout\n{}",
        out.describe_without_stdout()
    );
}

/// A directory outside DIR that a planted link points at, holding a foreign file named
/// like one of our temp files and a foreign `backup-…` directory.
fn outside_dir(fx: &Fixture) -> PathBuf {
    let elsewhere = fx.dir.parent().unwrap().join("elsewhere");
    fs::create_dir_all(elsewhere.join("backup-20200101-000000/keys")).unwrap();
    fs::write(
        elsewhere.join("backup-20200101-000000/keys/redis_password.txt"),
        TARGET_CONTENT,
    )
    .unwrap();
    fs::write(elsewhere.join(".foreign.tmp-1-abcdef"), TARGET_CONTENT).unwrap();
    fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
    elsewhere
}

/// Asserts that `elsewhere` (from `outside_dir`) is exactly as it was made.
fn outside_dir_untouched(elsewhere: &Path, out: &Run) {
    assert_eq!(mode(elsewhere), 0o755, "{out}");
    let mut names: Vec<String> = fs::read_dir(elsewhere)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [".foreign.tmp-1-abcdef", "backup-20200101-000000"],
        "{out}"
    );
    assert!(
        elsewhere
            .join("backup-20200101-000000/keys/redis_password.txt")
            .exists(),
        "{out}"
    );
}

#[test]
fn keys_as_a_symlink_to_another_directory_is_refused_and_that_directory_untouched() {
    let fx = Fixture::new();
    fs::create_dir_all(&fx.dir).unwrap();
    let elsewhere = outside_dir(&fx);
    std::os::unix::fs::symlink(&elsewhere, fx.keys()).unwrap();
    for args in [
        &[][..],
        &["--force"],
        &["--backup-only"],
        &["--verify"],
        &["--list"],
    ] {
        let out = run(with_oidc_env(generate(&fx.dir, args)));
        assert_ne!(out.status.code(), Some(0), "{out}");
        assert!(out.stderr.contains("keys"), "{out}");
        assert!(out.stderr.contains("symbolic link"), "{out}");
        outside_dir_untouched(&elsewhere, &out);
    }
}

#[test]
fn backups_as_a_symlink_is_refused_and_foreign_backups_are_never_pruned() {
    let (fx, snap) = Fixture::new().generated();
    let elsewhere = outside_dir(&fx);
    std::os::unix::fs::symlink(&elsewhere, fx.dir.join("backups")).unwrap();
    for args in [
        &["--keep-backups", "1"][..],
        &["--backup-only", "--keep-backups", "1"],
        &["--force", "--keep-backups", "1"],
        &["--restore", "backup-20200101-000000", "--yes"],
        &["--list-backups"],
    ] {
        let out = run(with_oidc_env(generate(&fx.dir, args))).expect_code(3);
        assert!(out.stderr.contains("backups"), "{out}");
        assert!(out.stderr.contains("symbolic link"), "{out}");
        outside_dir_untouched(&elsewhere, &out);
        target_not_revealed(&out, None);
        assert_same_files(&snapshot(&fx.keys()), &snap, &format!("{out}"));
    }
}

#[test]
fn force_backup_never_copies_a_symlink_target_and_leaves_the_link_alone() {
    let (fx, snap) = Fixture::new().generated();
    let target = outside_target(&fx, "target.txt");
    plant_link(&fx, "postgres_password.txt", &target);
    for args in [
        &["--force"][..],
        &["--backup-only"],
        &["--restore", "--yes"],
    ] {
        let out = run(with_oidc_env(generate(&fx.dir, args))).expect_code(3);
        untouched(&target, &out);
        target_not_revealed(&out, None);
        assert!(out.stderr.contains("postgres_password.txt"), "{out}");
        assert!(fx.backups().is_empty(), "a backup was taken\n{out}");
        assert!(is_link(&fx.keys().join("postgres_password.txt")), "{out}");
        let now = snapshot(&fx.keys());
        for (file, value) in &snap {
            if file != "postgres_password.txt" {
                assert!(&now[file] == value, "{file} changed\n{out}");
            }
        }
    }
}

#[test]
fn force_with_an_output_in_a_missing_directory_is_refused_before_any_write() {
    let (fx, snap) = Fixture::new().generated();
    let manifest = fx.dir.parent().unwrap().join("missing-dir/secret.yaml");
    let out = run(with_oidc_env(k8s_secret_to(
        &fx.dir,
        &["--force"],
        "app",
        &manifest,
    )))
    .expect_code(3);
    out.assert_output_free_of(values(&[&snap]).iter().map(Vec::as_slice));
    assert!(out.stderr.contains("missing-dir"), "{out}");
    assert_same_files(
        &snapshot(&fx.keys()),
        &snap,
        &format!("keys changed\n{out}"),
    );
    assert!(fx.backups().is_empty(), "a backup was taken\n{out}");
    assert!(!manifest.parent().unwrap().exists());

    // An output that names a directory is refused up front as well.
    let out = run(with_oidc_env(k8s_secret_to(
        &fx.dir,
        &["--force"],
        "app",
        &fx.keys(),
    )))
    .expect_code(3);
    assert_same_files(
        &snapshot(&fx.keys()),
        &snap,
        &format!("keys changed\n{out}"),
    );
    assert!(fx.backups().is_empty(), "a backup was taken\n{out}");
}

/// Runs `cmd` under a 512 MiB address-space limit and a 20 s watchdog; a run that is
/// still going then is killed and fails the test (it was blocked or reading forever).
fn run_bounded(cmd: Command) -> Run {
    let mut limited = Command::new("prlimit");
    limited.arg("--as=536870912").arg(cmd.get_program());
    limited.args(cmd.get_args());
    for (var, value) in cmd.get_envs() {
        match value {
            Some(value) => limited.env(var, value),
            None => limited.env_remove(var),
        };
    }
    Running::spawn(limited).finish(Duration::from_secs(20))
}

#[test]
fn an_env_file_that_is_a_symlink_to_dev_zero_is_refused_quickly() {
    // The default file under DIR: a link there is refused without being opened.
    let fx = Fixture::new();
    fs::create_dir_all(&fx.dir).unwrap();
    let env = fx.dir.join("user-provided.env");
    std::os::unix::fs::symlink("/dev/zero", &env).unwrap();
    let out = run_bounded(with_oidc_env(generate(&fx.dir, &[]))).expect_code(3);
    assert!(out.stderr.contains("user-provided.env"), "{out}");
    assert!(!fx.keys().exists(), "{out}");

    // A file named with --user-secrets-file may be a link (the operator chose the path),
    // but what it opens must be a regular file of bounded size.
    let fx = Fixture::new();
    let link = fx.dir.parent().unwrap().join("zero.env");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    for file in [link.as_path(), Path::new("/dev/zero")] {
        let args = ["--user-secrets-file", file.to_str().unwrap()];
        let out = run_bounded(with_oidc_env(generate(&fx.dir, &args))).expect_code(3);
        assert!(out.stderr.contains("not a regular file"), "{out}");
        assert!(out.stderr.contains(file.to_str().unwrap()), "{out}");
        assert!(!fx.keys().exists(), "{out}");
    }

    // A regular file far larger than any env file is refused before it is read.
    let big = fx.dir.parent().unwrap().join("big.env");
    let file = fs::File::create(&big).unwrap();
    file.set_len(8 << 30).unwrap(); // sparse: 8 GiB of apparent size
    let args = ["--user-secrets-file", big.to_str().unwrap()];
    let out = run_bounded(with_oidc_env(generate(&fx.dir, &args))).expect_code(3);
    assert!(out.stderr.contains("larger than"), "{out}");
    assert!(!fx.keys().exists(), "{out}");
}

#[test]
fn an_env_file_that_is_a_fifo_is_refused_and_never_blocks() {
    let fx = Fixture::new();
    fs::create_dir_all(&fx.dir).unwrap();
    let fifo = fx.dir.join("user-provided.env");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = run_bounded(with_oidc_env(generate(&fx.dir, &[]))).expect_code(3);
    assert!(out.stderr.contains("user-provided.env"), "{out}");
    assert!(out.stderr.contains("not a regular file"), "{out}");
    assert!(!fx.keys().exists(), "{out}");
    let args = ["--user-secrets-file", fifo.to_str().unwrap()];
    let out = run_bounded(with_oidc_env(generate(&fx.dir, &args))).expect_code(3);
    assert!(out.stderr.contains("not a regular file"), "{out}");
}

#[test]
fn dir_itself_as_a_symlink_is_refused() {
    let (fx, snap) = Fixture::new().generated();
    let link = fx.dir.parent().unwrap().join("link-to-secrets");
    std::os::unix::fs::symlink(&fx.dir, &link).unwrap();
    let out = run(with_oidc_env(generate(&link, &["--force"]))).expect_code(3);
    assert!(out.stderr.contains("link-to-secrets"), "{out}");
    assert!(out.stderr.contains("symbolic link"), "{out}");
    assert_same_files(&snapshot(&fx.keys()), &snap, &format!("{out}"));
    assert!(fx.backups().is_empty(), "{out}");
}

#[test]
fn verify_and_list_report_a_symlinked_key_file_without_following_it() {
    let (fx, _snap) = Fixture::new().generated();
    let target = outside_target(&fx, "target.txt");
    plant_link(&fx, "csrf_signing_secret.txt", &target);
    let out = run(generate(&fx.dir, &["--verify"])).expect_code(9);
    assert!(
        out.stdout
            .contains("csrf_signing_secret.txt: is a symbolic link"),
        "{out}"
    );
    let out = run(generate(&fx.dir, &["--list"])).expect_ok();
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("csrf_signing_secret.txt"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("symbolic link"), "{out}");
    // The target's size (33) and mode (0644) are not shown as the file's.
    assert!(!line.contains("0644") && !line.contains(" 33 "), "{out}");
    untouched(&target, &out);
}

#[test]
fn a_symlinked_backup_is_neither_listed_restored_nor_pruned() {
    let (fx, snap) = Fixture::new().generated();
    let elsewhere = outside_dir(&fx);
    run(generate(&fx.dir, &["--backup-only"])).expect_ok();
    let planted = fx.dir.join("backups/backup-20000101-000000");
    std::os::unix::fs::symlink(elsewhere.join("backup-20200101-000000"), &planted).unwrap();
    let out = run(generate(&fx.dir, &["--list-backups"])).expect_ok();
    assert!(!out.stdout.contains("backup-20000101-000000"), "{out}");
    let out = run(generate(
        &fx.dir,
        &["--restore", "backup-20000101-000000", "--yes"],
    ))
    .expect_code(3);
    assert!(out.stderr.contains("symbolic link"), "{out}");
    assert_same_files(&snapshot(&fx.keys()), &snap, &format!("{out}"));
    let out = run(generate(&fx.dir, &["--backup-only", "--keep-backups", "1"])).expect_ok();
    assert!(is_link(&planted), "{out}");
    outside_dir_untouched(&elsewhere, &out);
}

/// Replaces `file` in `keys/` by a hard link to `target`: the same file under two names,
/// which a local user who can write to `keys/` makes to any file on the same filesystem
/// where `fs.protected_hardlinks` is 0 (the kernel's own default).
fn plant_hard_link(fx: &Fixture, file: &str, target: &Path) {
    let link = fx.keys().join(file);
    fs::remove_file(&link).unwrap();
    fs::hard_link(target, &link).unwrap();
}

#[test]
fn a_key_file_hard_linked_to_another_file_is_refused_and_that_file_untouched() {
    let (fx, snap) = Fixture::new().generated();
    let target = outside_target(&fx, "target.txt");
    plant_hard_link(&fx, "redis_password.txt", &target);
    let out = run(with_oidc_env(generate(&fx.dir, &[]))).expect_code(3);
    untouched(&target, &out);
    assert!(out.stderr.contains("redis_password.txt"), "{out}");
    assert!(out.stderr.contains("hard link"), "{out}");
    manifest_refused(&fx, &snap, &target);
}

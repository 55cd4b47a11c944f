//! Overlap mode's sync side against real PostgreSQL 15 clusters: twin logins created in the
//! password transaction, sessions through a twin acting as the role, the published login
//! switching with the server enforcing the old one's grace, `pg_service.conf` checked
//! against the password files and read as real libpq (psql) reads it, `verify --overlap`,
//! and turning overlap off.
//!
//! The last section holds the attacks on the sync: a twin name someone else holds, a twin
//! given powers, a login holding its row against the overlap statements, a one-shot sync
//! racing a watcher, an administrator's lockout, a service file libpq reads differently.
//!
//! Every wait is a poll for the observable outcome under a generous liveness bound.

use std::path::Path;
use std::time::Duration;

use crate::common::relay::Relay;
use crate::common::session::Session;
use crate::common::*;

/// The overlapped roles of these tests and their password files (the superuser is not in
/// the role map: it keeps peer access over the socket and is never overlapped).
const ROLES: [(&str, &str); 2] = [
    ("appuser", "postgres_app_user_pw"),
    ("backupuser", "postgres_app_ro_pw"),
];

/// Liveness bound for anything the server or a watcher must get to.
const LIMIT: Duration = Duration::from_secs(15);

fn twin(role: &str) -> String {
    format!("{role}_alt")
}

fn twin_file(file: &str) -> String {
    format!("{}_alt_pw", file.strip_suffix("_pw").unwrap())
}

/// The current password of every login of the test (role and twin).
struct Passwords(Vec<(String, String)>);

impl Passwords {
    fn get(&self, login: &str) -> &str {
        &self.0.iter().find(|(l, _)| l == login).unwrap().1
    }

    fn set(&mut self, login: &str, value: String) {
        self.0.iter_mut().find(|(l, _)| l == login).unwrap().1 = value;
    }

    fn all(&self) -> Vec<&str> {
        self.0.iter().map(|(_, p)| p.as_str()).collect()
    }
}

/// A cluster with the two roles on throwaway passwords, and keys with new passwords for
/// every role and twin, `pg_service.conf` publishing `published(role)`.
struct Setup {
    cluster: Cluster,
    keys: Keys,
    pw: Passwords,
}

fn setup(published: impl Fn(&str) -> String) -> Setup {
    setup_on(Cluster::start_default(), published)
}

fn setup_on(cluster: Cluster, published: impl Fn(&str) -> String) -> Setup {
    cluster.create_throwaway_roles(ROLES.map(|(role, _)| role));
    // PostgreSQL 15 no longer lets every role create in `public`.
    cluster.psql("GRANT CREATE ON SCHEMA public TO appuser");
    cluster.clear_log();
    let keys = Keys::new();
    let mut pw = Passwords(Vec::new());
    for (role, file) in ROLES {
        let role_pw = unique(&format!("{role} pw'\"\\ ü"));
        let twin_pw = unique(&format!("{role} twin#pw"));
        keys.write(file, &role_pw);
        keys.write(&twin_file(file), &twin_pw);
        pw.0.push((role.to_owned(), role_pw));
        pw.0.push((twin(role), twin_pw));
    }
    let setup = Setup { cluster, keys, pw };
    let logins: Vec<(&str, String)> = ROLES.iter().map(|(r, _)| (*r, published(r))).collect();
    setup.publish(&logins);
    setup
}

impl Setup {
    /// Writes `pg_service.conf` (atomically) publishing, per role, `login` with its
    /// current password.
    fn publish(&self, logins: &[(&str, String)]) {
        self.keys
            .write_raw("pg_service.conf", self.service_text(logins).as_bytes());
    }

    /// The text of a `pg_service.conf` publishing, per role, `login` with its password.
    fn service_text(&self, logins: &[(&str, String)]) -> String {
        let mut text = String::from("# test\n");
        for (role, login) in logins {
            text.push_str(&format!(
                "\n[{role}]\nuser={login}\npassword={}\nhost=127.0.0.1\n",
                self.pw.get(login)
            ));
        }
        text
    }

    /// A new password for `login`, written to its file (what `rotate` stages).
    fn stage(&mut self, login: &str) -> String {
        let value = unique(&format!("{login} staged"));
        let (role, file) = ROLES
            .iter()
            .find(|(r, _)| *r == login || twin(r) == login)
            .unwrap();
        let name = if *role == login {
            (*file).to_owned()
        } else {
            twin_file(file)
        };
        self.keys.write(&name, &value);
        self.pw.set(login, value.clone());
        value
    }

    fn command(&self, sub: &str, extra: &[&str]) -> std::process::Command {
        self.command_at(self.cluster.conn_args(), sub, extra)
    }

    /// `command` reaching the server through `conn` (`--pghost`, `--pgport`, …) instead of
    /// the cluster's socket.
    fn command_at(&self, conn: Vec<String>, sub: &str, extra: &[&str]) -> std::process::Command {
        let mut cmd = bin();
        cmd.arg(sub)
            .args(conn)
            .arg("--keys-dir")
            .arg(self.keys.path())
            .arg("--secrets-source-dir")
            .arg(self.keys.path().join("no-such-dir"));
        for (role, file) in ROLES {
            cmd.arg("--role").arg(format!("{role}={file}"));
        }
        cmd.args(extra);
        cmd
    }

    fn sync(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--overlap"];
        args.extend_from_slice(extra);
        run(self.command("sync", &args))
    }

    fn value(&self, sql: &str) -> String {
        self.cluster.psql(sql)
    }

    /// `rolvaliduntil` as text ('' for NULL).
    fn valid_until(&self, login: &str) -> String {
        self.value(&format!(
            "SELECT coalesce(rolvaliduntil::text, '') FROM pg_authid WHERE rolname = {}",
            quote_literal(login)
        ))
    }

    fn login(&self, login: &str) -> Result<(), String> {
        self.cluster.login(login, self.pw.get(login))
    }

    fn assert_login(&self, login: &str) {
        self.cluster.assert_login(login, self.pw.get(login));
    }

    fn leaks(&self, runs: &[&Run]) {
        assert_no_leak(&self.pw.all(), Some(&self.cluster), runs);
        let log = self.cluster.log_text();
        assert!(
            !log.contains("SCRAM-SHA-256$"),
            "a verifier reached the server log"
        );
        assert!(
            !log.contains("PASSWORD"),
            "a password statement reached the server log"
        );
        // The twin statements run under the same suppression as the passwords.
        for statement in [
            "CREATE ROLE",
            "GRANT ",
            "VALID UNTIL",
            "INTO pg_db_role_setting",
        ] {
            assert!(
                !log.contains(statement),
                "{statement} reached the server log"
            );
        }
    }
}

/// Runs `statements` in one session as `login` over TCP; the first column of the first row
/// of each (empty when none).
fn session(port: u16, login: &str, password: &str, statements: &[&str]) -> Vec<String> {
    block_on(async {
        let (client, connection) = tcp_login_config(port, login, password)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut out = Vec::new();
        for statement in statements {
            let messages = client.simple_query(statement).await.unwrap();
            let first = messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).unwrap_or("").to_owned())
                }
                _ => None,
            });
            out.push(first.unwrap_or_default());
        }
        out
    })
}

/// `xmin` of the rows a sync may write for the logins (pg_authid, pg_db_role_setting,
/// pg_auth_members): unchanged means nothing was written.
fn row_versions(s: &Setup) -> String {
    s.value(
        "SELECT string_agg(x, ',' ORDER BY x) FROM ( \
           SELECT a.rolname || ':' || a.xmin::text AS x FROM pg_authid a \
             WHERE a.rolname IN ('appuser','appuser_alt','backupuser','backupuser_alt') \
           UNION ALL SELECT s.setrole::text || ':' || s.xmin::text FROM pg_db_role_setting s \
           UNION ALL SELECT m.member::text || ':' || m.xmin::text FROM pg_auth_members m) v",
    )
}

#[test]
fn twins_are_created_with_the_passwords_and_a_second_sync_writes_nothing() {
    let s = setup(|role| role.to_owned());
    let out = s.sync(&[]);
    let out = out.expect_ok();
    for (role, _) in ROLES {
        out.expect_stdout(&format!("role {role:?}: changed"));
        out.expect_stdout(&format!("role {:?}: changed", twin(role)));
        out.expect_stdout(&format!("login {:?}: created as the twin", twin(role)));
        s.assert_login(role);
        // Published: never expires. The twin nobody uses yet starts expired.
        assert_eq!(s.valid_until(role), "infinity");
        assert_eq!(s.valid_until(&twin(role)), "-infinity");
        assert!(
            s.login(&twin(role)).is_err(),
            "an unpublished new twin logs in"
        );
        assert_eq!(
            s.value(&format!(
                "SELECT pg_has_role('{}', '{role}', 'MEMBER')::text",
                twin(role)
            )),
            "true"
        );
    }
    let before = (
        s.cluster.rolpassword("appuser_alt"),
        s.cluster.rolpassword("backupuser"),
        row_versions(&s),
    );

    let again = s.sync(&[]);
    let again = again.expect_ok();
    assert_eq!(
        again.stdout.matches(": unchanged").count(),
        4,
        "{}",
        again.describe()
    );
    assert!(!again.stdout.contains("login \""), "{}", again.describe());
    let after = (
        s.cluster.rolpassword("appuser_alt"),
        s.cluster.rolpassword("backupuser"),
        row_versions(&s),
    );
    // Compared, not printed: the first two are stored verifiers.
    assert!(
        before == after,
        "the second sync wrote something (changed: verifier of appuser_alt: {}, of \
         backupuser: {}, row versions: {})",
        before.0 != after.0,
        before.1 != after.1,
        before.2 != after.2
    );
    s.leaks(&[&out, &again]);
}

#[test]
fn a_failing_statement_rolls_back_the_twin_creation_too() {
    // The second role's twin cannot be made (names starting with pg_ are reserved), after
    // the first role's twin was created and before any password is set.
    let s = setup(|role| role.to_owned());
    s.keys.write("monitor_pw", "x-unused-monitor");
    s.keys.write("monitor_alt_pw", "x-unused-monitor-alt");
    let mut text = std::fs::read_to_string(s.keys.path().join("pg_service.conf")).unwrap();
    text.push_str("\n[pg_monitor]\nuser=pg_monitor\npassword=x-unused-monitor\n");
    s.keys.write_raw("pg_service.conf", text.as_bytes());
    let out = run(s.command("sync", &["--overlap", "--role", "pg_monitor=monitor_pw"]));
    let out = out.expect_code(5);
    out.expect_stderr("pg_monitor_alt");
    for (role, _) in ROLES {
        assert_eq!(
            s.value(&format!(
                "SELECT count(*) FROM pg_roles WHERE rolname = '{}'",
                twin(role)
            )),
            "0",
            "the twin of {role} survived the rollback"
        );
        assert!(s.login(role).is_err(), "{role}'s new password was applied");
    }
    s.leaks(&[&out]);
}

#[test]
fn a_session_through_the_twin_acts_as_the_role_with_its_settings() {
    let s = setup(twin);
    s.value(
        "CREATE SCHEMA \"My Schema\" AUTHORIZATION appuser; \
         CREATE SCHEMA extra AUTHORIZATION appuser; \
         ALTER ROLE appuser SET search_path = 'My Schema', extra, public; \
         ALTER ROLE appuser SET statement_timeout = '1234ms'; \
         ALTER ROLE appuser IN DATABASE postgres SET work_mem = '3MB'; \
         ALTER ROLE appuser CONNECTION LIMIT 7",
    );
    s.cluster.clear_log();
    let out = s.sync(&[]);
    let out = out.expect_ok();
    let port = s.cluster.port;
    let probe = [
        "SELECT current_user",
        "SELECT session_user",
        "SHOW search_path",
        "SHOW statement_timeout",
        "SHOW work_mem",
    ];
    let as_role = session(port, "appuser", s.pw.get("appuser"), &probe);
    let as_twin = session(port, "appuser_alt", s.pw.get("appuser_alt"), &probe);
    assert_eq!(as_role[0], "appuser");
    assert_eq!(as_twin[0], "appuser", "current_user of a twin session");
    assert_eq!(as_twin[1], "appuser_alt");
    assert_eq!(
        as_twin[2..],
        as_role[2..],
        "settings differ between role and twin"
    );
    assert_eq!(as_twin[2], "\"My Schema\", extra, public");
    assert_eq!(as_twin[3], "1234ms");
    assert_eq!(as_twin[4], "3MB");
    let after_resets = session(
        port,
        "appuser_alt",
        s.pw.get("appuser_alt"),
        &[
            "CREATE TABLE made_by_twin (x int)",
            "SELECT current_user",
            "RESET ROLE",
            "SELECT current_user",
            "DISCARD ALL",
            "SELECT current_user",
            "RESET ALL",
            "SELECT current_user",
        ],
    );
    assert_eq!(after_resets[1], "appuser");
    assert_eq!(after_resets[3], "appuser", "after RESET ROLE");
    assert_eq!(after_resets[5], "appuser", "after DISCARD ALL");
    assert_eq!(after_resets[7], "appuser", "after RESET ALL");
    assert_eq!(
        s.value(
            "SELECT schemaname || '.' || tableowner FROM pg_tables WHERE tablename = 'made_by_twin'"
        ),
        "My Schema.appuser"
    );
    assert_eq!(
        s.value("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'appuser_alt'"),
        "7"
    );

    // A later change of the role's settings reaches the twin at the next sync.
    s.value(
        "ALTER ROLE appuser SET statement_timeout = '2s'; ALTER ROLE appuser CONNECTION LIMIT 9",
    );
    s.cluster.clear_log();
    let again = s.sync(&[]);
    let again = again.expect_ok();
    again.expect_stdout("brought in line with role \"appuser\"");
    let now = session(
        port,
        "appuser_alt",
        s.pw.get("appuser_alt"),
        &["SHOW statement_timeout"],
    );
    assert_eq!(now[0], "2s");
    assert_eq!(
        s.value("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'appuser_alt'"),
        "9"
    );
    s.leaks(&[&out, &again]);
}

/// A running `watch --overlap` sidecar.
fn watcher(s: &Setup, grace: &str) -> (Running, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let cmd = s.command(
        "watch",
        &[
            "--overlap",
            "--grace",
            grace,
            "--debounce",
            "50ms",
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
    );
    (Running::spawn(cmd), state)
}

#[test]
fn publishing_the_twin_starts_the_old_logins_grace_and_the_server_ends_it() {
    let mut s = setup(|role| role.to_owned());
    let (watch, _state) = watcher(&s, "3s");
    wait_until(LIMIT, "the first sync", || {
        s.login("appuser").is_ok() && s.valid_until("appuser_alt") == "-infinity"
    });

    // Stage: a new password for the unpublished twin. It may log in, and never expires.
    s.stage("appuser_alt");
    wait_until(LIMIT, "the staged twin to log in", || {
        s.login("appuser_alt").is_ok()
    });
    assert_eq!(s.valid_until("appuser_alt"), "infinity");
    assert_eq!(s.valid_until("appuser"), "infinity");
    // Another role's stage arriving in a later event leaves the pending one as it is.
    s.stage("backupuser_alt");
    wait_until(LIMIT, "the second staged twin to log in", || {
        s.login("backupuser_alt").is_ok()
    });
    assert_eq!(s.valid_until("appuser_alt"), "infinity");

    // Publish: only pg_service.conf changes; no password does.
    s.publish(&[
        ("appuser", "appuser_alt".to_owned()),
        ("backupuser", "backupuser".to_owned()),
    ]);
    wait_until(LIMIT, "the old login's grace to start", || {
        let until = s.valid_until("appuser");
        !until.is_empty() && until != "infinity"
    });
    assert_eq!(s.valid_until("appuser_alt"), "infinity");
    assert_eq!(
        s.valid_until("backupuser"),
        "infinity",
        "the other role is untouched"
    );
    // The server ends the old login after the grace; the published one keeps working.
    wait_until(LIMIT, "the server to refuse the old login", || {
        s.login("appuser").is_err()
    });
    s.assert_login("appuser_alt");
    s.assert_login("backupuser");
    // An object made through the new login still belongs to the role.
    session(
        s.cluster.port,
        "appuser_alt",
        s.pw.get("appuser_alt"),
        &["CREATE TABLE after_publish (x int)"],
    );
    assert_eq!(
        s.value("SELECT tableowner FROM pg_tables WHERE tablename = 'after_publish'"),
        "appuser"
    );
    watch.wait_stderr(LIMIT, "no longer published");
    watch.signal(nix::sys::signal::Signal::SIGTERM);
    let out = watch.finish(LIMIT);
    let out = out.expect_ok();
    s.leaks(&[&out]);
}

#[test]
fn a_service_file_that_disagrees_with_the_password_files_applies_nothing() {
    let s = setup(|role| role.to_owned());
    s.sync(&[]).expect_ok();
    let applied_backup = s.pw.get("backupuser").to_owned();
    let mut s = s;
    // A valid change to another role that must not be applied.
    let pending = s.stage("backupuser");
    let service = s.keys.path().join("pg_service.conf");
    let good = std::fs::read(&service).unwrap();
    let app = s.pw.get("appuser").to_owned();
    let app_alt = s.pw.get("appuser_alt").to_owned();
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "wrong password",
            Box::new(move |p: &Path| {
                let text = format!("[appuser]\nuser=appuser\npassword={app_alt}\n");
                std::fs::write(p, text).unwrap();
            }),
            "[appuser]",
        ),
        (
            "unknown login",
            Box::new(move |p: &Path| {
                let text = format!("[appuser]\nuser=mallory\npassword={app}\n");
                std::fs::write(p, text).unwrap();
            }),
            "[appuser]",
        ),
        (
            "missing section",
            Box::new(|p: &Path| std::fs::write(p, "[other]\nuser=appuser\n").unwrap()),
            "[appuser]",
        ),
        (
            "missing file",
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()),
            "pg_service.conf",
        ),
    ];
    let mut runs = Vec::new();
    for (what, break_it, section) in cases {
        break_it(&service);
        let out = s.sync(&[]);
        let out = out.expect_code(3);
        out.expect_stderr("pg_service.conf");
        out.expect_stderr(section);
        assert!(out.stdout.is_empty(), "{what}: {}", out.describe());
        s.cluster.assert_login("backupuser", &applied_backup);
        s.cluster.assert_no_login("backupuser", &pending);
        runs.push(out);
        s.keys.write_raw("pg_service.conf", &good);
    }
    let refs: Vec<&Run> = runs.iter().collect();
    let mut secrets = s.pw.all();
    secrets.push(&applied_backup);
    assert_no_leak(&secrets, Some(&s.cluster), &refs);
}

/// What libpq makes of `pg_service.conf` for `role`: `psql` connecting over TCP as an
/// application does (`PGSERVICEFILE` + `PGSERVICE`, the port from the environment, no
/// password file, no system-wide service file, never a prompt). The login libpq used
/// (`session_user`: a twin's `current_user` is its role), or psql's message, which names
/// logins and never passwords.
fn libpq_login(s: &Setup, role: &str) -> Result<String, String> {
    let out = std::process::Command::new(pg_bin("psql"))
        .args(["-X", "-w", "-q", "-A", "-t", "-c", "SELECT session_user"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVICEFILE", s.keys.path().join("pg_service.conf"))
        .env("PGSERVICE", role)
        .env("PGPORT", s.cluster.port.to_string())
        .env("PGDATABASE", "postgres")
        .env("PGPASSFILE", s.keys.path().join("no-such-pgpass"))
        .env("PGSYSCONFDIR", s.keys.path().join("no-such-dir"))
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A `key=…` line libpq 14-18 reads as several: it reads a line with `fgets` into 1024
/// bytes and checks its length with `strlen`, so a NUL hides the rest of the 1023 bytes,
/// and the next read resumes in the middle of the physical line. `hidden` are the lines
/// libpq sees after `visible`; a reader of whole lines sees one setting.
fn nul_split_line(visible: &str, hidden: &[&str]) -> String {
    let mut line = String::new();
    for (i, piece) in std::iter::once(visible)
        .chain(hidden.iter().copied())
        .enumerate()
    {
        let start = line.len();
        line.push_str(piece);
        if i < hidden.len() {
            line.push('\0');
            line.push_str(&"A".repeat(1023 - (line.len() - start)));
        }
    }
    line
}

#[test]
fn what_the_sync_accepts_in_pg_service_conf_is_what_libpq_logs_in_with() {
    let mut s = setup(twin);
    // A published password with what a reader could get wrong: leading blank, `#`, `=`,
    // quotes, backslash, a tab, non-ASCII letters. libpq takes the value verbatim.
    let tricky = unique(" #lead=ing 'q\"\\\tü ß");
    s.keys.write("postgres_app_user_alt_pw", &tricky);
    s.pw.set("appuser_alt", tricky);
    let published: Vec<(&str, String)> = ROLES.iter().map(|(r, _)| (*r, twin(r))).collect();
    s.publish(&published);
    let mallory = unique("mallory pw");
    s.cluster.create_roles(&[("mallory", &mallory)]);
    s.cluster.clear_log();
    let ok = s.sync(&[]).expect_ok();
    // The equivalence the check rests on: libpq logs in with exactly the published login
    // and password the sync accepted and applied.
    assert_eq!(libpq_login(&s, "appuser"), Ok("appuser_alt".to_owned()));
    assert_eq!(
        libpq_login(&s, "backupuser"),
        Ok("backupuser_alt".to_owned())
    );

    let good = s.service_text(&published);
    let alt = s.pw.get("appuser_alt").to_owned();
    let split = nul_split_line(
        "application_name=app",
        &["user=mallory", &format!("password={mallory}")],
    );
    // (what libpq does with it, as measured with psql 15; the file; its line to name)
    let cases = [
        (
            // libpq logs in as mallory, with mallory's password from the same hidden line.
            Ok("mallory".to_owned()),
            good.replacen("[appuser]\n", &format!("[appuser]\n{split}\n"), 1),
            "line 4:",
        ),
        (
            // libpq keeps a trailing U+00A0 (not `isspace` in C or UTF-8 locales) and sends
            // a password the server refuses.
            Err("password authentication failed".to_owned()),
            good.replacen(
                &format!("password={alt}\n"),
                &format!("password={alt}\u{a0}\n"),
                1,
            ),
            "line 5:",
        ),
    ];
    let mut runs = vec![ok];
    for (libpq, text, line) in cases {
        s.keys.write_raw("pg_service.conf", text.as_bytes());
        match (libpq_login(&s, "appuser"), libpq) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(got), Err(want)) => assert!(got.contains(&want), "{got}"),
            (got, want) => panic!("libpq: {got:?}, measured: {want:?}"),
        }
        let out = s.sync(&[]).expect_code(3);
        out.expect_stderr("pg_service.conf");
        out.expect_stderr(line);
        assert!(out.stdout.is_empty(), "{}", out.describe());
        runs.push(out);
    }
    s.assert_login("appuser_alt");
    let refs: Vec<&Run> = runs.iter().collect();
    let mut secrets = s.pw.all();
    secrets.push(&mallory);
    assert_no_leak(&secrets, Some(&s.cluster), &refs);
}

#[test]
fn a_twin_name_over_63_bytes_is_refused_before_connecting() {
    let keys = Keys::new();
    keys.write("long_pw", "value long enough");
    let role = "r".repeat(60);
    let mut cmd = bin();
    cmd.arg("sync")
        .arg("--keys-dir")
        .arg(keys.path())
        .args(["--overlap", "--pghost", "/nonexistent", "--role"])
        .arg(format!("{role}=long_pw"));
    let out = run(cmd);
    let out = out.expect_code(3);
    out.expect_stderr("64 bytes");
    // A shorter suffix fits.
    let mut ok = bin();
    ok.arg("sync")
        .arg("--keys-dir")
        .arg(keys.path())
        .args([
            "--overlap",
            "--twin-suffix",
            "_b",
            "--pghost",
            "/nonexistent",
            "--role",
        ])
        .arg(format!("{role}=long_pw"));
    let out = run(ok);
    // Past configuration: the twin's password file is what is missing now.
    let out = out.expect_code(3);
    out.expect_stderr("long_b_pw");
}

#[test]
fn verify_overlap_checks_the_published_credentials_and_staged_the_others() {
    let mut s = setup(|role| role.to_owned());
    s.sync(&[]).expect_ok();
    let verify = |s: &Setup, extra: &[&str]| {
        let mut args = vec!["--overlap"];
        args.extend_from_slice(extra);
        run(s.command("verify", &args))
    };
    let published = verify(&s, &[]);
    let published = published.expect_ok();
    published
        .expect_stdout("role \"appuser\": ok (logs in; a wrong password is refused, published)");
    published.expect_stdout("role \"backupuser\": ok");
    assert!(
        !published.stdout.contains("_alt"),
        "{}",
        published.describe()
    );

    // The unpublished twins were created expired: --staged fails on them.
    let staged = verify(&s, &["--staged"]);
    let staged = staged.expect_code(7);
    staged.expect_stdout("role \"appuser_alt\": FAILED");
    // Staged and synced: they log in.
    s.stage("appuser_alt");
    s.stage("backupuser_alt");
    s.sync(&[]).expect_ok();
    let staged_ok = verify(&s, &["--staged"]);
    let staged_ok = staged_ok.expect_ok();
    staged_ok.expect_stdout(
        "role \"appuser_alt\": ok (logs in; a wrong password is refused, unpublished)",
    );

    // The published credential no longer logs in: verify --overlap fails and says which.
    s.cluster
        .psql("ALTER ROLE appuser PASSWORD 'changed-behind-its-back'");
    s.cluster.clear_log();
    let broken = verify(&s, &[]);
    let broken = broken.expect_code(7);
    broken.expect_stdout("role \"appuser\": FAILED");
    // --staged without --overlap is a usage error.
    let mut cmd = s.command("verify", &["--staged"]);
    cmd.arg("--host").arg("127.0.0.1");
    run(cmd).expect_code(3);
    s.leaks(&[&published, &staged, &staged_ok, &broken]);
}

#[test]
fn turning_overlap_off_ends_the_twins_after_their_grace_and_never_drops_them() {
    let s = setup(twin);
    s.sync(&[]).expect_ok();
    s.assert_login("appuser_alt");
    assert_eq!(s.valid_until("appuser_alt"), "infinity");
    // The twin made something (owned by the role); the twin itself owns nothing.
    session(
        s.cluster.port,
        "appuser_alt",
        s.pw.get("appuser_alt"),
        &["CREATE TABLE kept (x int)"],
    );
    s.cluster.clear_log();

    let off = run(s.command("sync", &["--grace", "2s"]));
    let off = off.expect_ok();
    off.expect_stdout("login \"appuser_alt\": overlap mode is off");
    let until = s.valid_until("appuser_alt");
    assert!(!until.is_empty() && until != "infinity", "{until}");
    // Until the grace is over the twin still works; then the server refuses it.
    wait_until(LIMIT, "the server to refuse the retired twin", || {
        s.login("appuser_alt").is_err()
    });
    let later = run(s.command("sync", &["--grace", "2s"]));
    let later = later.expect_ok();
    later.expect_stdout("NOLOGIN");
    for (role, _) in ROLES {
        assert_eq!(
            s.value(&format!(
                "SELECT rolcanlogin::text FROM pg_roles WHERE rolname = '{}'",
                twin(role)
            )),
            "false"
        );
    }
    assert_eq!(
        s.value("SELECT tableowner FROM pg_tables WHERE tablename = 'kept'"),
        "appuser"
    );
    // Nothing more to do afterwards.
    let quiet = run(s.command("sync", &["--grace", "2s"]));
    let quiet = quiet.expect_ok();
    assert!(!quiet.stdout.contains("login \""), "{}", quiet.describe());
    s.leaks(&[&off, &later, &quiet]);
}

#[test]
fn a_twin_name_held_by_someone_elses_role_or_a_superuser_is_refused() {
    for (what, setup_sql) in [
        ("not a twin", "CREATE ROLE appuser_alt LOGIN"),
        (
            "superuser",
            "CREATE ROLE appuser_alt LOGIN SUPERUSER; GRANT appuser TO appuser_alt",
        ),
    ] {
        let s = setup(|role| role.to_owned());
        s.cluster.psql(setup_sql);
        s.cluster.clear_log();
        let out = s.sync(&[]);
        let out = out.expect_code(5);
        out.expect_stderr("appuser_alt");
        out.expect_stderr(if what == "superuser" {
            "is a superuser"
        } else {
            "not created by pg-password-sync"
        });
        // Nothing applied: the role keeps its old password, the other role's twin was
        // not created, and the foreign role got no password.
        assert!(s.login("appuser").is_err(), "{what}");
        assert!(s.cluster.rolpassword("appuser_alt").is_none(), "{what}");
        assert_eq!(
            s.value("SELECT count(*) FROM pg_roles WHERE rolname = 'backupuser_alt'"),
            "0",
            "{what}"
        );
        s.leaks(&[&out]);
    }
}

#[test]
fn health_sees_an_unsynced_change_of_the_published_login() {
    let s = setup(|role| role.to_owned());
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    // A ten-minute debounce keeps the publish, rewritten in place, unsynced while health
    // looks at it (a rename would be applied at once, whatever the debounce).
    let watch = Running::spawn(s.command(
        "watch",
        &["--overlap", "--debounce", "10m", "--state-dir", state_dir],
    ));
    let health = || run(s.command("health", &["--overlap", "--state-dir", state_dir]));
    wait_until(LIMIT, "health to report the first sync", || {
        health().code() == Some(0)
    });
    let text = s.service_text(&[
        ("appuser", "appuser_alt".to_owned()),
        ("backupuser", "backupuser".to_owned()),
    ]);
    std::fs::write(s.keys.path().join("pg_service.conf"), text).unwrap();
    let out = health();
    let out = out.expect_code(8);
    out.expect_stderr("pg_service.conf");
    out.expect_stderr("changed since the last sync");
    watch.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = watch.finish(LIMIT);
    let stopped = stopped.expect_ok();
    s.leaks(&[&out, &stopped]);
}

#[test]
fn a_stage_rolled_back_to_the_old_password_does_not_live_on() {
    let mut s = setup(|role| role.to_owned());
    s.sync(&[]).expect_ok();
    let retired = s.pw.get("appuser_alt").to_owned();
    s.stage("appuser_alt");
    let staged = s.sync(&["--grace", "1h"]);
    let staged = staged.expect_ok();
    staged.expect_stdout("login \"appuser_alt\": staged");
    assert_eq!(s.valid_until("appuser_alt"), "infinity");
    // `rotate` restores the file from its backup when the stage times out.
    s.keys.write("postgres_app_user_alt_pw", &retired);
    s.pw.set("appuser_alt", retired.clone());
    let rolled_back = s.sync(&["--grace", "1h"]);
    let rolled_back = rolled_back.expect_ok();
    rolled_back.expect_stdout("rolled back");
    // The retired password is back in its file, and the server had the login open-ended
    // (`infinity`, from the stage): a grace would bring the retired password back to life
    // for as long. It is expired at once instead.
    assert_eq!(
        s.value(
            "SELECT (rolvaliduntil <= now())::text FROM pg_authid WHERE rolname = 'appuser_alt'"
        ),
        "true",
        "the login of a rolled-back stage is not expired (VALID UNTIL {:?})",
        s.valid_until("appuser_alt")
    );
    assert!(
        s.login("appuser_alt").is_err(),
        "the retired password logs in again after the rollback"
    );
    s.assert_login("appuser");
    s.leaks(&[&staged, &rolled_back]);
}

/// pgaudit loaded and auditing everything: every statement class, catalog relations, bind
/// parameters. The sync leaves it on (an audit trail of role changes is what its users
/// keep it for); what it writes must hold no password and no part of a verifier, for the
/// roles, the twins created in the same transaction and a published-login switch.
#[test]
fn pgaudit_auditing_everything_sees_the_changes_but_no_password_or_verifier() {
    let library = pg_bindir().join("../lib/pgaudit.so");
    if !library.exists() {
        skip(&format!(
            "{} is not installed (Debian: postgresql-15-pgaudit)",
            library.display()
        ));
        return;
    }
    let cluster = Cluster::start_with(&ClusterOptions {
        extra_conf: vec![
            "shared_preload_libraries = 'pgaudit'".into(),
            "pgaudit.log = 'all'".into(),
            "pgaudit.log_catalog = on".into(),
            "pgaudit.log_parameter = on".into(),
            "pgaudit.log_relation = on".into(),
        ],
        hba: None,
    });
    let mut s = setup_on(cluster, |role| role.to_owned());
    let created = s.sync(&[]).expect_ok();
    s.stage("appuser_alt");
    s.publish(&[
        ("appuser", "appuser_alt".to_owned()),
        ("backupuser", "backupuser".to_owned()),
    ]);
    let switched = s.sync(&[]).expect_ok();
    s.assert_login("appuser_alt");

    let log = s.cluster.log_text();
    // Audited, so the checks below look at a real audit trail.
    for seen in [
        "AUDIT: SESSION",
        "ROLE,CREATE ROLE",
        "ROLE,ALTER ROLE",
        "PASSWORD <REDACTED>",
    ] {
        assert!(log.contains(seen), "pgaudit did not write {seen:?}");
    }
    assert_no_leak(&s.pw.all(), Some(&s.cluster), &[&created, &switched]);
    assert!(
        !log.contains("SCRAM-SHA-256$"),
        "a verifier reached the audit log"
    );
    // Salt, stored key and server key of every verifier now stored (never printed).
    let verifiers = s.value(
        "SELECT string_agg(rolpassword, ' ') FROM pg_authid \
         WHERE rolname IN ('appuser', 'appuser_alt', 'backupuser', 'backupuser_alt')",
    );
    let parts: Vec<&str> = verifiers
        .split([' ', '$', ':'])
        .filter(|part| part.len() >= 16)
        .collect();
    assert_eq!(parts.len(), 4 * 3, "four SCRAM verifiers");
    for part in parts {
        assert!(
            !log.contains(part),
            "a part of a stored verifier reached the audit log"
        );
    }
}

// ---- Attacks on the sync side ----------------------------------------------------------

/// `rolname`'s row of `pg_authid`, one column: `column` as text.
fn authid(s: &Setup, login: &str, column: &str) -> String {
    s.value(&format!(
        "SELECT ({column})::text FROM pg_authid WHERE rolname = {}",
        quote_literal(login)
    ))
}

/// Whether `member` is a member of `role`, as the server says (`pg_has_role … MEMBER`).
fn is_member(s: &Setup, member: &str, role: &str) -> bool {
    s.value(&format!(
        "SELECT pg_has_role({}, {}, 'MEMBER')::text",
        quote_literal(member),
        quote_literal(role)
    )) == "true"
}

/// The sync refused the role that holds the twin name `appuser_alt` as not ours, and
/// changed nothing: exit 5 naming it, its stored password as it was (`before`, compared
/// and never printed), the role's new password not applied, no other twin created.
#[track_caller]
fn assert_refused_as_foreign(s: &Setup, out: Run, before: &Option<String>) -> Run {
    let out = out.expect_code(5);
    out.expect_stderr("appuser_alt");
    out.expect_stderr("not created by pg-password-sync");
    assert!(
        s.cluster.rolpassword("appuser_alt") == *before,
        "the sync gave the foreign role a password"
    );
    assert!(
        s.login("appuser").is_err(),
        "the role's password was applied"
    );
    assert_eq!(
        s.value("SELECT count(*) FROM pg_roles WHERE rolname = 'backupuser_alt'"),
        "0"
    );
    out
}

/// A login someone else made under the twin's name sets itself to act as the role
/// (`ALTER ROLE self SET role = …` needs no privilege): the sync must not take it for a
/// twin and GRANT it the role, which would hand the role's rights to whoever owns it.
#[test]
fn a_role_holding_the_twin_name_that_we_did_not_create_is_refused_and_granted_nothing() {
    let s = setup(|role| role.to_owned());
    let foreign = unique("foreign login pw");
    s.cluster.create_roles(&[("appuser_alt", &foreign)]);
    // Logged in as itself, with no privilege at all.
    session(
        s.cluster.port,
        "appuser_alt",
        &foreign,
        &["ALTER ROLE appuser_alt SET role = 'appuser'"],
    );
    s.cluster.clear_log();
    let before = s.cluster.rolpassword("appuser_alt");
    assert!(!is_member(&s, "appuser_alt", "appuser"));

    let out = assert_refused_as_foreign(&s, s.sync(&[]), &before);
    assert!(
        !is_member(&s, "appuser_alt", "appuser"),
        "the sync granted the role to a login it did not create"
    );
    s.leaks(&[&out]);
}

/// A login someone else made under the twin's name and that is a member of the role:
/// still not ours. On PostgreSQL 14 and older the application login itself can make it a
/// member (a session user could grant membership in its own role); from 15 on the server
/// refuses that, and only an administrator's grant makes this state.
#[test]
fn a_member_of_the_role_holding_the_twin_name_that_we_did_not_create_is_refused() {
    let s = setup(|role| role.to_owned());
    let foreign = unique("foreign login pw");
    let app = unique("app login pw");
    s.cluster
        .create_roles(&[("appuser_alt", &foreign), ("appuser", &app)]);
    let grant = "GRANT appuser TO appuser_alt";
    let by_the_app = Session::connect(s.cluster.port, "appuser", &app).exec(grant);
    if pg_major() <= 14 {
        by_the_app.unwrap();
    } else {
        let err = by_the_app.expect_err("PostgreSQL 15+ refuses a self-grant");
        assert!(err.contains("SQLSTATE 42501"), "{err}");
        s.cluster.psql(grant);
    }
    s.cluster.clear_log();
    let before = s.cluster.rolpassword("appuser_alt");
    assert!(is_member(&s, "appuser_alt", "appuser"));

    let out = assert_refused_as_foreign(&s, s.sync(&[]), &before);
    s.leaks(&[&out]);
}

/// A twin the sync created, later given an attribute that reaches beyond its role
/// (CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS) by someone with the rights to: the sync
/// would hand a login with those powers to whoever holds the published password.
#[test]
fn a_twin_given_powers_beyond_its_role_is_refused_naming_the_power() {
    let mut s = setup(|role| role.to_owned());
    s.sync(&[]).expect_ok();
    // A stage the refused syncs must not apply.
    s.stage("appuser_alt");
    let mut runs = Vec::new();
    for power in ["CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS"] {
        s.cluster.psql(&format!("ALTER ROLE appuser_alt {power}"));
        s.cluster.clear_log();
        let out = s.sync(&[]);
        let out = out.expect_code(5);
        out.expect_stderr("appuser_alt");
        out.expect_stderr(power);
        assert!(
            s.login("appuser_alt").is_err(),
            "{power}: the staged password was applied"
        );
        s.cluster.psql(&format!("ALTER ROLE appuser_alt NO{power}"));
        runs.push(out);
    }
    s.cluster.clear_log();
    let refs: Vec<&Run> = runs.iter().collect();
    s.leaks(&refs);
}

/// What tells the sync's twins from anyone else's: a comment on the role (`pg_authid`'s
/// shared description) that only a superuser or a CREATEROLE login may write, so the
/// application login cannot put it on a role of its choosing.
#[test]
fn a_twin_the_sync_creates_is_marked_as_its_own_and_the_app_login_cannot_forge_the_mark() {
    let s = setup(twin);
    let out = s.sync(&[]).expect_ok();
    let mark = s.value(
        "SELECT coalesce(shobj_description(oid, 'pg_authid'), '') FROM pg_authid \
         WHERE rolname = 'appuser_alt'",
    );
    assert!(
        mark.starts_with("pg-password-sync"),
        "the twin carries no mark of the sync: {mark:?}"
    );
    // Both logins of the role, with the passwords now in force.
    for login in ["appuser", "appuser_alt"] {
        let session = Session::connect(s.cluster.port, login, s.pw.get(login));
        for target in ["appuser_alt", "backupuser_alt"] {
            let err = session
                .exec(&format!(
                    "COMMENT ON ROLE {target} IS 'pg-password-sync twin'"
                ))
                .expect_err("an application login commented on a role");
            assert!(err.contains("SQLSTATE 42501"), "{login} on {target}: {err}");
        }
    }
    assert_eq!(
        s.value(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_authid \
             WHERE rolname = 'appuser_alt'"
        ),
        mark
    );
    s.leaks(&[&out]);
}

/// The twin published and the role's own login about to retire: `appuser` already holds
/// its file's password, so the sync's only write to its `pg_authid` row is `VALID UNTIL`
/// (an overlap statement, not a password statement). A session of `appuser` with that
/// password (leaked: the retirement is the answer to it) holds the row with an
/// uncommitted change of its own password, as any login may.
fn row_held_against_the_retirement() -> (Setup, Session) {
    let s = setup(twin);
    s.cluster.create_roles(&[("appuser", s.pw.get("appuser"))]);
    let hostile = Session::connect(s.cluster.port, "appuser", s.pw.get("appuser"));
    hostile.lock_own_row(&unique("hostile other"));
    s.cluster.clear_log();
    (s, hostile)
}

#[test]
fn a_login_holding_its_row_against_the_overlap_statements_is_ended_like_any_blocker() {
    let (s, hostile) = row_held_against_the_retirement();
    let out = s.sync(&[
        "--terminate-blockers-after",
        "1s",
        "--lock-wait-timeout",
        "3s",
    ]);
    let out = out.expect_ok();
    out.expect_stderr(&format!(
        "pid {} (role \"appuser\", \"idle in transaction\" for ",
        hostile.pid
    ))
    .expect_stderr("ended blocking non-superuser sessions: ");
    assert!(!hostile.alive(), "the blocking session was ended");
    let until = s.valid_until("appuser");
    assert!(
        !until.is_empty() && until != "infinity",
        "the retiring login got no end: {until:?}"
    );
    s.assert_login("appuser_alt");
    s.leaks(&[&out]);
}

#[test]
fn with_ending_sessions_off_a_login_holding_its_row_against_the_overlap_statements_is_named() {
    let (s, hostile) = row_held_against_the_retirement();
    let out = s.sync(&[
        "--terminate-blockers-after",
        "off",
        "--lock-wait-timeout",
        "2s",
    ]);
    let out = out.expect_code(5);
    out.expect_stderr(&format!("pid {} (role \"appuser\", ", hostile.pid))
        .expect_stderr("--terminate-blockers-after is off");
    assert!(hostile.alive(), "nothing ends a session when it is off");
    // Nothing applied: the twin was not created.
    assert_eq!(
        s.value("SELECT count(*) FROM pg_roles WHERE rolname = 'appuser_alt'"),
        "0"
    );
    s.leaks(&[&out]);
}

/// A one-shot `sync` reads the files, then connects and queues for the sync lock; a
/// watcher that applies a newer rotation in the meantime must not see it undone by the
/// older values. The one-shot sync connects over TCP through a relay that holds its
/// connection until the watcher has applied the new value, which makes the race exact.
#[test]
fn a_one_shot_sync_never_undoes_a_rotation_the_watcher_applied_while_it_connected() {
    let mut s = setup(|role| role.to_owned());
    // Over TCP the superuser logs in with its password file (peer is for the socket).
    let superuser = unique("superuser pw");
    s.keys.write("postgres_password", &superuser);
    s.cluster.psql(&format!(
        "ALTER ROLE postgres PASSWORD {}",
        quote_literal(&superuser)
    ));
    s.cluster.clear_log();
    let (watch, _state) = watcher(&s, "1h");
    wait_until(LIMIT, "the first sync", || {
        s.login("appuser").is_ok() && s.valid_until("appuser_alt") == "-infinity"
    });

    let relay = Relay::hold(s.cluster.port);
    let conn = vec![
        "--pghost".to_owned(),
        "127.0.0.1".to_owned(),
        "--pgport".to_owned(),
        relay.port.to_string(),
    ];
    let one_shot =
        Running::spawn(s.command_at(conn, "sync", &["--overlap", "--connect-timeout", "60s"]))
            .with_server_log(&s.cluster.log);
    // It has read the files (the twin's old value among them) and is connecting.
    wait_until(LIMIT, "the one-shot sync to connect", || {
        relay.accepted() > 0
    });
    // A rotation stages the twin; the watcher applies it.
    s.stage("appuser_alt");
    wait_until(LIMIT, "the watcher to apply the stage", || {
        s.login("appuser_alt").is_ok()
    });
    relay.release();
    let out = one_shot.finish(LIMIT * 4).expect_ok();

    assert!(
        s.login("appuser_alt").is_ok(),
        "the one-shot sync put back the twin's password from before the rotation"
    );
    watch.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = watch.finish(LIMIT).expect_ok();
    assert_no_leak(&[&superuser], Some(&s.cluster), &[&out, &stopped]);
    s.leaks(&[&out, &stopped]);
}

/// An administrator locks a login out (`VALID UNTIL` in the past on the published login,
/// or `NOLOGIN` on a twin, published or not), say to stop a leaked credential at once: the
/// next sync must not undo it, and says so; `--override-lockouts` lifts it.
#[test]
fn an_administrators_lockout_of_a_login_stands_until_the_sync_is_told_to_override_it() {
    /// One lockout: which login is published, the administrator's statement, the login it
    /// locks out, and whether it is in force.
    struct Lockout {
        published: fn(&str) -> String,
        statement: &'static str,
        login: &'static str,
        in_force: fn(&Setup) -> bool,
    }
    let expired = |s: &Setup| authid(s, "appuser", "rolvaliduntil = '2000-01-01'") == "true";
    let no_login = |s: &Setup| authid(s, "appuser_alt", "rolcanlogin") == "false";
    let cases = [
        Lockout {
            published: |role| role.to_owned(),
            statement: "ALTER ROLE appuser VALID UNTIL '2000-01-01'",
            login: "appuser",
            in_force: expired,
        },
        Lockout {
            published: |role| role.to_owned(),
            statement: "ALTER ROLE appuser_alt NOLOGIN",
            login: "appuser_alt",
            in_force: no_login,
        },
        Lockout {
            published: twin,
            statement: "ALTER ROLE appuser_alt NOLOGIN",
            login: "appuser_alt",
            in_force: no_login,
        },
    ];
    for Lockout {
        published,
        statement,
        login,
        in_force: locked,
    } in cases
    {
        let what = format!("{statement} (published: {})", published("appuser"));
        let s = setup(published);
        s.sync(&[]).expect_ok();
        s.cluster.psql(statement);
        s.cluster.clear_log();
        assert!(locked(&s), "{what}");

        let out = s.sync(&[]).expect_ok();
        assert!(locked(&s), "{what}: the sync lifted the lockout");
        out.expect_stdout_line(&["locked out", &format!("{login:?}")]);
        if published("appuser") == login {
            assert!(
                s.login(login).is_err(),
                "{what}: the locked-out login works"
            );
        }

        let lifted = s.sync(&["--override-lockouts"]).expect_ok();
        assert!(!locked(&s), "{what}: --override-lockouts left it");
        if published("appuser") == login {
            s.assert_login(login);
            assert_eq!(s.valid_until(login), "infinity", "{what}");
        }
        s.leaks(&[&out, &lifted]);
    }
}

/// `pg_service.conf` as libpq reads it: a key libpq does not know makes every application
/// connection through the section fail ("syntax error in service file"), so the set is
/// refused like any other that applications cannot use.
#[test]
fn a_service_file_setting_libpq_does_not_know_is_refused_and_nothing_is_applied() {
    let s = setup(|role| role.to_owned());
    let published: Vec<(&str, String)> = ROLES.iter().map(|(r, _)| (*r, (*r).to_owned())).collect();
    let text = s
        .service_text(&published)
        .replacen("[appuser]\n", "[appuser]\nfoo=bar\n", 1);
    s.keys.write_raw("pg_service.conf", text.as_bytes());
    let libpq = libpq_login(&s, "appuser");
    assert!(
        libpq.as_ref().is_err_and(|e| e.contains("syntax error")),
        "libpq: {libpq:?}"
    );
    let out = s.sync(&[]);
    let out = out.expect_code(3);
    out.expect_stderr("pg_service.conf");
    out.expect_stderr("foo");
    assert!(out.stdout.is_empty(), "{}", out.describe());
    assert!(s.login("appuser").is_err(), "a password was applied");
    assert_eq!(
        s.value("SELECT count(*) FROM pg_roles WHERE rolname LIKE '%\\_alt'"),
        "0",
        "a twin was created"
    );
    s.leaks(&[&out]);
}

/// A section whose credentials are right but whose connection settings send applications
/// elsewhere (`port=1`, a key libpq accepts): the sync has nothing to refuse, but `verify
/// --overlap`, the check that applications can log in, must connect through the section
/// as libpq does and fail.
#[test]
fn verify_overlap_logs_in_through_the_published_section_as_libpq_does() {
    let s = setup(|role| role.to_owned());
    let published: Vec<(&str, String)> = ROLES.iter().map(|(r, _)| (*r, (*r).to_owned())).collect();
    let text = s
        .service_text(&published)
        .replacen("[appuser]\n", "[appuser]\nport=1\n", 1);
    s.keys.write_raw("pg_service.conf", text.as_bytes());
    let synced = s.sync(&[]).expect_ok();
    s.assert_login("appuser");
    // What an application gets through the section.
    let libpq = libpq_login(&s, "appuser");
    assert!(libpq.is_err(), "libpq logged in through port 1: {libpq:?}");

    let verified = run(s.command("verify", &["--overlap"]));
    let verified = verified.expect_code(7);
    verified.expect_stderr("appuser");
    assert!(
        !verified.stdout.contains("role \"appuser\": ok"),
        "{}",
        verified.describe()
    );
    s.leaks(&[&synced, &verified]);
}

// ---- Attacks on the mark and the stage rule (second round) -------------------------------

/// The twin published, the role's own login `appuser` retired with a grace: its password
/// (still in its file until the next rotation stages it) is the leaked one. Returns the
/// setup after the publish, with `appuser`'s grace running for `grace`.
fn retired_role(grace: &str) -> Setup {
    let mut s = setup(|role| role.to_owned());
    s.sync(&[]).expect_ok();
    s.stage("appuser_alt");
    s.sync(&["--grace", grace]).expect_ok();
    s.publish(&[
        ("appuser", "appuser_alt".to_owned()),
        ("backupuser", "backupuser".to_owned()),
    ]);
    s.sync(&["--grace", grace])
        .expect_ok()
        .expect_stdout("no longer published");
    let until = s.valid_until("appuser");
    assert!(!until.is_empty() && until != "infinity", "{until:?}");
    s
}

/// A retired login changes its own password (any login may), in a session opened with its
/// retired (leaked) password while its grace runs. Its file still holds the retired
/// password, so the sync restores that one: a restore, not a stage. Taken for a stage, it
/// gives the retired password `VALID UNTIL infinity`, the very thing the grace exists to
/// end; the next rotation is then refused (the login looks published) or, forced, sees
/// its own stage expired as "rolled back".
#[test]
fn a_retired_login_changing_its_own_password_inside_its_grace_does_not_cancel_the_grace() {
    let s = retired_role("1h");
    let grace_end = s.valid_until("appuser");
    let leaked = Session::connect(s.cluster.port, "appuser", s.pw.get("appuser"));
    leaked
        .exec(&format!(
            "ALTER ROLE appuser PASSWORD {}",
            quote_literal(&unique("chosen by the leaker"))
        ))
        .unwrap();
    s.cluster.clear_log();
    let restored = s.sync(&["--grace", "1h"]).expect_ok();
    assert_eq!(
        s.valid_until("appuser"),
        grace_end,
        "restoring the retired login's password changed its end: {}",
        restored.describe()
    );
    s.assert_login("appuser");
    s.assert_login("appuser_alt");
    s.leaks(&[&restored]);
}

/// The same after the grace: a session opened inside it outlives it (until a sync ends
/// it) and changes the login's password. The sync's restore must leave the login expired,
/// and end that session.
#[test]
fn a_session_outliving_its_logins_grace_cannot_bring_the_retired_password_back() {
    let s = retired_role("3s");
    let leaked = Session::connect(s.cluster.port, "appuser", s.pw.get("appuser"));
    wait_until(LIMIT, "the grace to end", || s.login("appuser").is_err());
    leaked
        .exec(&format!(
            "ALTER ROLE appuser PASSWORD {}",
            quote_literal(&unique("chosen by the leaker"))
        ))
        .unwrap();
    s.cluster.clear_log();
    let after = s.sync(&["--grace", "3s"]).expect_ok();
    assert!(
        s.login("appuser").is_err(),
        "the retired password logs in again, valid until {:?}: {}",
        s.valid_until("appuser"),
        after.describe()
    );
    assert!(!leaked.alive(), "the leaked session outlived the sync");
    s.assert_login("appuser_alt");
    s.leaks(&[&after]);
}

/// A stage reaches the server through two syncs: a one-shot `sync --overlap` applies it
/// first, then a watcher whose last applied set is older (it held the change back: an
/// in-place write waits for its quiet period, here a long `--debounce`) applies the same
/// files. The second one finds the staged password already stored: nothing changed, so
/// the stage stays a stage (`infinity`, the staged login logs in), and is not taken for a
/// stage rolled back (expired at once) or re-keyed (its sessions ended).
#[test]
fn a_stage_another_sync_already_applied_stays_staged_when_the_watcher_applies_it_again() {
    stage_applied_by_a_one_shot_sync_then_by_the_watcher(false);
}

/// The same, with a full resync (SIGHUP; the periodic one alike) inside the watcher's
/// quiet period: the files are mid-change, so the watcher re-applies its last applied
/// set, which is older than what the one-shot sync applied from newer files. An earlier
/// reader must not undo a later writer: the stage must not be rolled back (expired, its
/// sessions ended) while its files still hold it.
#[test]
fn a_resync_inside_the_watchers_quiet_period_never_undoes_a_stage_another_sync_applied() {
    stage_applied_by_a_one_shot_sync_then_by_the_watcher(true);
}

fn stage_applied_by_a_one_shot_sync_then_by_the_watcher(resync_between: bool) {
    let mut s = setup(|role| role.to_owned());
    let state = tempfile::tempdir().unwrap();
    let mut cmd = s.command(
        "watch",
        &[
            "--overlap",
            "--grace",
            "1h",
            "--debounce",
            "4s",
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
    );
    // Its debug log says when a transaction was applied, even one that changed nothing.
    cmd.env("RUST_LOG", "debug");
    let watch = Running::spawn(cmd);
    let applied = |watch: &Running| {
        watch
            .stderr_so_far()
            .matches("sync transaction done")
            .count()
    };
    watch.wait_stderr(LIMIT, "watching 1 secret directory");
    wait_until(LIMIT, "the watcher's first sync", || {
        s.valid_until("appuser_alt") == "-infinity"
    });
    let before = applied(&watch);

    // The stage, written in place: the watcher waits for its quiet period.
    let staged = unique("appuser_alt staged in place");
    let file = s.keys.path().join("postgres_app_user_alt_pw.txt");
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut writer, format!("{staged}\n").as_bytes()).unwrap();
    drop(writer);
    s.pw.set("appuser_alt", staged);
    // Meanwhile a one-shot sync applies it.
    let one_shot = s.sync(&["--grace", "1h"]).expect_ok();
    one_shot.expect_stdout("login \"appuser_alt\": staged");
    assert_eq!(
        applied(&watch),
        before,
        "the watcher applied the stage before the one-shot sync: the test proves nothing"
    );
    s.assert_login("appuser_alt");
    let session = Session::connect(s.cluster.port, "appuser_alt", s.pw.get("appuser_alt"));

    if resync_between {
        watch.signal(nix::sys::signal::Signal::SIGHUP);
        watch.wait_stderr(LIMIT, "re-applies the last applied set");
        wait_until(LIMIT, "the watcher's resync", || applied(&watch) > before);
        assert_eq!(
            s.valid_until("appuser_alt"),
            "infinity",
            "the watcher's resync of its older set ended the stage another sync applied\n{}",
            watch.stderr_so_far()
        );
        s.assert_login("appuser_alt");
        assert!(
            session.alive(),
            "the watcher's resync ended a session of the staged login"
        );
    }
    // The watcher applies the same files from its older set.
    let resynced = applied(&watch);
    wait_until(LIMIT, "the watcher to apply the stage too", || {
        applied(&watch) > resynced
    });
    assert_eq!(
        s.valid_until("appuser_alt"),
        "infinity",
        "the watcher's second apply of the stage ended it\n{}",
        watch.stderr_so_far()
    );
    s.assert_login("appuser_alt");
    assert!(
        session.alive(),
        "the watcher ended a session of the staged login"
    );
    assert!(
        authid(&s, "appuser_alt", "shobj_description(oid, 'pg_authid')").contains("staged"),
        "the mark no longer records the stage"
    );
    drop(session);
    watch.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = watch.finish(LIMIT).expect_ok();
    assert!(
        !stopped.stderr.contains("rolled back"),
        "{}",
        stopped.describe()
    );
    s.leaks(&[&one_shot, &stopped]);
}

/// A SCRAM-SHA-256 verifier of `password` with `iterations` rounds, as any tool (or a
/// server with another `scram_iterations`) may have stored it.
fn verifier_with(password: &str, iterations: u32) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::{Digest, Sha256};
    let salt = *b"sixteen byte slt";
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
    let hmac = |message: &[u8]| {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&salted).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    };
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(Sha256::digest(hmac(b"Client Key"))),
        STANDARD.encode(hmac(b"Server Key"))
    )
}

/// The sync re-makes a stored verifier weaker than the server's `scram_iterations` (an
/// administrator raising it on PostgreSQL 16+ makes every stored verifier weaker; on 15 a
/// verifier made elsewhere with fewer rounds). The password stays the same: that is no
/// new password, so it must neither open a retired login for good (a "stage") nor lift an
/// administrator's lockout of the published one ("a lockout lifted by a new password").
#[test]
fn a_verifier_remade_at_the_servers_strength_is_no_new_password_for_the_overlap_rules() {
    let s = retired_role("1h");
    let grace_end = s.valid_until("appuser");
    // The published login locked out by an administrator.
    s.cluster
        .psql("ALTER ROLE appuser_alt VALID UNTIL '2000-01-01'");
    for login in ["appuser", "appuser_alt"] {
        let weak = verifier_with(s.pw.get(login), 1024);
        s.cluster.psql(&format!(
            "ALTER ROLE {login} PASSWORD {}",
            quote_literal(&weak)
        ));
    }
    s.cluster.clear_log();
    let out = s.sync(&["--grace", "1h"]).expect_ok();
    for login in ["appuser", "appuser_alt"] {
        assert!(
            authid(&s, login, "rolpassword").starts_with("SCRAM-SHA-256$4096:"),
            "{login}: the weak verifier was not re-made: {}",
            out.describe()
        );
    }
    assert_eq!(
        s.valid_until("appuser"),
        grace_end,
        "re-making the retired login's verifier changed its end: {}",
        out.describe()
    );
    assert_eq!(
        authid(&s, "appuser_alt", "rolvaliduntil = '2000-01-01'"),
        "true",
        "re-making the locked-out login's verifier lifted the lockout: {}",
        out.describe()
    );
    out.expect_stdout_line(&["locked out", "\"appuser_alt\""]);
    s.leaks(&[&out]);
}

/// An administrator locks the published login out because its password leaked (`VALID
/// UNTIL` in the past). A session the leaker opened before the lockout changes the
/// login's own password; the sync restores the file's (leaked) password. That restore is
/// no new password: taken for one ("a lockout lifted by a new password"), it gives the
/// leaked password `infinity` again.
#[test]
fn a_locked_out_login_changing_its_own_password_does_not_lift_its_lockout() {
    let s = setup(|role| role.to_owned());
    s.sync(&[]).expect_ok();
    let leaked = Session::connect(s.cluster.port, "appuser", s.pw.get("appuser"));
    s.cluster
        .psql("ALTER ROLE appuser VALID UNTIL '2000-01-01'");
    leaked
        .exec(&format!(
            "ALTER ROLE appuser PASSWORD {}",
            quote_literal(&unique("chosen by the leaker"))
        ))
        .unwrap();
    s.cluster.clear_log();
    let out = s.sync(&[]).expect_ok();
    assert!(
        s.login("appuser").is_err(),
        "the leaked password logs in again, valid until {:?}: {}",
        s.valid_until("appuser"),
        out.describe()
    );
    out.expect_stdout_line(&["locked out", "\"appuser\""]);
    s.leaks(&[&out]);
}

/// A section whose credentials are right and whose host and port are verify's own, but
/// with a setting that makes libpq fail every login through it (channel binding demanded
/// over a connection without TLS, a standby demanded of a primary, a startup option
/// naming no role, a replication connection the login may not make). `verify --overlap`
/// does not follow these: it must not report the role as ok, which would tell the
/// operator (or `scripts/rotate.sh`, polling it before a publish) that applications log in.
#[test]
fn verify_overlap_never_calls_ok_a_section_libpq_cannot_log_in_with() {
    let s = setup(|role| role.to_owned());
    let published: Vec<(&str, String)> = ROLES.iter().map(|(r, _)| (*r, (*r).to_owned())).collect();
    let mut runs = vec![s.sync(&[]).expect_ok()];
    for setting in [
        "channel_binding=require",
        "target_session_attrs=standby",
        "options=-c role=no_such_role",
        "replication=true",
    ] {
        let text = s.service_text(&published).replacen(
            "[appuser]\n",
            &format!("[appuser]\n{setting}\n"),
            1,
        );
        s.keys.write_raw("pg_service.conf", text.as_bytes());
        let libpq = libpq_login(&s, "appuser");
        assert!(libpq.is_err(), "{setting}: libpq logged in: {libpq:?}");
        let verified = run(s.command("verify", &["--overlap", "--host", "127.0.0.1"]));
        assert!(
            !verified.stdout.contains("role \"appuser\": ok"),
            "{setting}: verify called it ok\n{}",
            verified.describe()
        );
        let verified = verified.expect_code(7);
        verified.expect_stdout("appuser");
        runs.push(verified);
    }
    let refs: Vec<&Run> = runs.iter().collect();
    s.leaks(&refs);
}

/// The watcher applies a settled change but queues behind another session's sync lock;
/// meanwhile a writer starts rewriting the unpublished twin's file in place (a stage
/// arriving through a single-file bind mount) and has written part of it. The watcher's
/// read under the lock sees the files changed: it must not take the half-written value
/// then (the watcher takes an in-place write only once its writer closed it and it stood
/// still), which would stage the half value and take the whole one, when it comes, for a
/// stage changed again (expired at once).
#[test]
fn the_read_under_the_sync_lock_never_takes_a_file_its_writer_still_writes() {
    let mut s = setup(|role| role.to_owned());
    let (watch, _state) = watcher(&s, "1h");
    watch.wait_stderr(LIMIT, "watching 1 secret directory");
    wait_until(LIMIT, "the watcher's first sync", || {
        s.login("appuser").is_ok() && s.valid_until("appuser_alt") == "-infinity"
    });
    // Another session holds the sync lock (any login may take it).
    let holder = Session::connect(s.cluster.port, "appuser", s.pw.get("appuser"));
    holder.hold_sync_lock();
    // A settled change the watcher reads, then queues with behind the lock.
    s.stage("backupuser_alt");
    wait_until(LIMIT, "the watcher to queue for the sync lock", || {
        s.value("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == "1"
    });
    // The twin's stage, written in place: the first part only, the writer still at it.
    let whole = unique("appuser_alt staged in two parts");
    let (first, rest) = whole.split_at(whole.len() / 2 + 6);
    let (first, rest) = (first.to_owned(), rest.to_owned());
    let path = s.keys.path().join("postgres_app_user_alt_pw.txt");
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut writer, first.as_bytes()).unwrap();
    std::io::Write::flush(&mut writer).unwrap();
    holder
        .exec(&format!(
            "SELECT pg_advisory_unlock({})",
            crate::common::session::SYNC_LOCK
        ))
        .unwrap();
    // It has the lock now, and finds the files changed.
    wait_until(LIMIT, "the watcher to take the sync lock", || {
        s.value("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == "0"
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        s.cluster.login("appuser_alt", &first).is_err(),
        "the half-written value was applied\n{}",
        watch.stderr_so_far()
    );
    // The writer finishes: the whole value is the stage.
    std::io::Write::write_all(&mut writer, format!("{rest}\n").as_bytes()).unwrap();
    drop(writer);
    s.pw.set("appuser_alt", whole);
    wait_until(LIMIT, "the whole staged value to log in", || {
        s.login("appuser_alt").is_ok()
    });
    assert_eq!(s.valid_until("appuser_alt"), "infinity");
    // The change the watcher queued with is applied too (with the settled write).
    s.assert_login("backupuser_alt");
    drop(holder);
    watch.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = watch.finish(LIMIT).expect_ok();
    assert_no_leak(&[&first], Some(&s.cluster), &[&stopped]);
    s.leaks(&[&stopped]);
}

/// The sync pointed at the application's database (`PGDATABASE`), whose owner, the
/// application login, sets `idle_session_timeout` for every session there: a session idle
/// for a millisecond between two statements (between its login and its first statement,
/// or between the statements that pin it) is ended by the server, and the sync fails,
/// again and again (the old passwords stay, a stage never applies). The pinned superuser
/// session must not be at the mercy of it.
#[test]
fn a_database_owners_idle_session_timeout_never_ends_the_superuser_session() {
    let s = setup(|role| role.to_owned());
    s.cluster.create_roles(&[("appuser", s.pw.get("appuser"))]);
    let db = s.cluster.app_owned_database();
    s.cluster.psql_in(
        db,
        "SET ROLE appuser; ALTER DATABASE appdb SET idle_session_timeout = '1ms';",
    );
    s.cluster.clear_log();
    let mut runs = Vec::new();
    for _ in 0..30 {
        let mut cmd = s.command("sync", &["--overlap"]);
        cmd.env("PGDATABASE", db);
        let out = run(cmd);
        assert!(
            out.code() == Some(0),
            "a sync failed in the application's database\n{}",
            out.describe()
        );
        runs.push(out);
    }
    s.assert_login("appuser");
    let refs: Vec<&Run> = runs.iter().collect();
    s.leaks(&refs);
}

/// Whoever holds a twin's password (a leaked one) can, on PostgreSQL 14 and older, grant
/// membership in the twin to another role it controls (a session user may grant its own
/// role; from 15 on only an administrator can). The twin is a member of the role with
/// INHERIT, so that other role gets the role's rights for good, past every rotation of
/// the twin's password. A twin is ours and LOGIN INHERIT and nothing more: the sync takes
/// such memberships back (naming them), whoever granted them.
#[test]
fn a_membership_in_a_twin_is_taken_back_so_the_roles_rights_do_not_outlive_a_rotation() {
    let s = setup(twin);
    s.sync(&[]).expect_ok();
    let grant = "GRANT appuser_alt TO backupuser";
    let by_the_twin = Session::connect(s.cluster.port, "appuser_alt", s.pw.get("appuser_alt"))
        .exec(&format!("SET ROLE NONE; {grant}"));
    if pg_major() <= 14 {
        by_the_twin.unwrap();
    } else {
        let err = by_the_twin.expect_err("PostgreSQL 15+ refuses a self-grant");
        assert!(err.contains("SQLSTATE 42501"), "{err}");
        s.cluster.psql(grant);
    }
    s.cluster.clear_log();
    assert!(is_member(&s, "backupuser", "appuser"));

    let out = s.sync(&[]).expect_ok();
    assert!(
        !is_member(&s, "backupuser", "appuser"),
        "another role keeps the role's rights through the twin: {}",
        out.describe()
    );
    out.expect_stdout_line(&["\"appuser_alt\"", "\"backupuser\""]);
    s.assert_login("appuser_alt");
    s.leaks(&[&out]);
}

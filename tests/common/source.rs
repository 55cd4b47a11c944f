//! Overlap mode's part of the harness (`rotate`, `fleet`): a secrets directory made
//! by `generate --overlap`, the `rotate` command line, and a stand-in for the sync's
//! database side where a test must not depend on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// OIDC values the tests provide through the environment (generate needs them).
pub const OIDC_ENV: [(&str, &str); 3] = [
    ("OIDC_GOOGLE_CLIENT_SECRET", "google-Env-Secret-0123456789"),
    (
        "OIDC_MICROSOFT_CLIENT_SECRET",
        "microsoft-Env-Secret-0123456789",
    ),
    (
        "OIDC_KEYCLOAK_CLIENT_SECRET",
        "keycloak-Env-Secret-0123456789",
    ),
];

/// The overlapped roles of the default role map (no temporal role) and their files.
pub const PAIRS: [(&str, &str, &str, &str); 2] = [
    (
        "appuser",
        "appuser_alt",
        "postgres_app_user_pw.txt",
        "postgres_app_user_alt_pw.txt",
    ),
    (
        "backupuser",
        "backupuser_alt",
        "postgres_app_ro_pw.txt",
        "postgres_app_ro_alt_pw.txt",
    ),
];

pub const SERVICE_FILE: &str = "pg_service.conf";

/// `generate --dir DIR ARGS…` with the test OIDC values and nothing from our environment.
pub fn generate_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.arg("generate")
        .arg("--dir")
        .arg(dir)
        .arg("--non-interactive")
        .args(args);
    for (var, value) in OIDC_ENV {
        cmd.env(var, value);
    }
    cmd
}

/// `rotate --dir DIR` against the server on 127.0.0.1:`port`, plus `args`.
pub fn rotate_cmd(dir: &Path, port: u16, args: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.arg("rotate")
        .arg("--dir")
        .arg(dir)
        .args(["--pghost", "127.0.0.1", "--pgport", &port.to_string()])
        .args(["--connect-timeout", "10s"])
        .args(args);
    cmd
}

/// A secrets directory written by `generate --overlap`.
pub struct Source {
    pub dir: tempfile::TempDir,
}

impl Source {
    pub fn generate() -> Source {
        let dir = tempfile::Builder::new()
            .prefix("pps-source-")
            .tempdir()
            .unwrap();
        run(generate_cmd(dir.path(), &["--overlap"])).expect_ok();
        Source { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn keys(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// A secret file's value (trailing line ends removed).
    pub fn value(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.keys().join(file)).unwrap();
        text.trim_end_matches(['\n', '\r']).to_owned()
    }

    /// Replaces a secret file of `keys/` with `value` and a newline (0600, written to a
    /// temp file and renamed into place), as a tool other than ours would.
    pub fn write(&self, file: &str, value: &str) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.keys().join(format!(".{file}.test-tmp"));
        std::fs::write(&tmp, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, self.keys().join(file)).unwrap();
    }

    /// Every regular, non-hidden file of `keys/` and its bytes.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        snapshot(&self.keys())
    }

    /// The (login, password) `pg_service.conf` publishes for `role`.
    pub fn published(&self, role: &str) -> (String, String) {
        published(&self.keys().join(SERVICE_FILE), role)
    }

    /// The backups under `backups/`.
    pub fn backups(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.path().join("backups"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        found.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("backup-"))
        });
        found.sort();
        found
    }
}

/// Every regular, non-hidden file of `dir` and its bytes (links followed, as apps do).
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        files.insert(name, std::fs::read(&path).unwrap());
    }
    files
}

/// The (login, password) a service file publishes for `role` (the reading of libpq for
/// the files `rotate` and `generate` write: `key=value` lines under `[role]`).
pub fn published(path: &Path, role: &str) -> (String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut in_section = false;
    let (mut user, mut password) = (None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name == role;
        } else if in_section {
            if let Some(value) = line.strip_prefix("user=") {
                user = Some(value.to_owned());
            } else if let Some(value) = line.strip_prefix("password=") {
                password = Some(value.to_owned());
            }
        }
    }
    (
        user.unwrap_or_else(|| panic!("no user= for [{role}]")),
        password.unwrap_or_else(|| panic!("no password= for [{role}]")),
    )
}

/// The application roles of `PAIRS` (LOGIN, a throwaway password until a sync sets it).
pub fn create_app_roles(cluster: &Cluster) {
    let throwaway = unique("initial");
    cluster.create_roles(&[("appuser", &throwaway), ("backupuser", &throwaway)]);
}

/// Plays the sync's database side by hand, for tests that must not depend on it: every
/// role and twin gets its file's password (twins created when missing, members of their
/// role), the superuser its own, and each *unpublished* login `VALID UNTIL
/// unpublished_until` (an SQL literal such as `'infinity'` or `now() + '1 hour'`), each
/// published one `'infinity'`. Plaintext goes through psql's stdin: test setup only.
pub fn act_as_sync(cluster: &Cluster, source: &Source, unpublished_until: &str) {
    let mut sql = String::new();
    for (role, twin, file, twin_file) in PAIRS {
        let (published, _) = source.published(role);
        sql.push_str(&format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN \
             CREATE ROLE {id} LOGIN INHERIT; GRANT {role_id} TO {id}; END IF; END$$;\n",
            lit = quote_literal(twin),
            id = quote_ident(twin),
            role_id = quote_ident(role),
        ));
        for (login, file) in [(role, file), (twin, twin_file)] {
            sql.push_str(&format!(
                "ALTER ROLE {} PASSWORD {};\n",
                quote_ident(login),
                quote_literal(&source.value(file))
            ));
            // The deadline is computed by the server, then set as a literal (ALTER ROLE
            // takes no expression), as the sync does.
            let until = if login == published {
                "'infinity'".to_owned()
            } else {
                unpublished_until.to_owned()
            };
            sql.push_str(&format!(
                "DO $$BEGIN EXECUTE format('ALTER ROLE %I VALID UNTIL %L', {}, ({until})::timestamptz::text); END$$;\n",
                quote_literal(login)
            ));
        }
    }
    sql.push_str(&format!(
        "ALTER ROLE postgres PASSWORD {};\n",
        quote_literal(&source.value("postgres_password.txt"))
    ));
    cluster.psql(&sql);
}

/// Sets only the staged twins' new passwords (what the sync does when a stage arrives):
/// waits until `rotate` has written every unpublished file differently from `before`.
pub fn apply_stage_by_hand(cluster: &Cluster, source: &Source, before: &BTreeMap<String, Vec<u8>>) {
    let unpublished: Vec<(&str, &str)> = PAIRS
        .iter()
        .map(|(role, twin, file, twin_file)| {
            if source.published(role).0 == *role {
                (*twin, *twin_file)
            } else {
                (*role, *file)
            }
        })
        .collect();
    wait_until(
        std::time::Duration::from_secs(30),
        "rotate to stage every unpublished login",
        || {
            unpublished.iter().all(|(_, file)| {
                std::fs::read(source.keys().join(file)).ok().as_ref() != before.get(*file)
            })
        },
    );
    let mut sql = String::new();
    for (login, file) in unpublished {
        sql.push_str(&format!(
            "ALTER ROLE {} PASSWORD {} VALID UNTIL 'infinity';\n",
            quote_ident(login),
            quote_literal(&source.value(file))
        ));
    }
    cluster.psql(&sql);
}

/// Fails at once, with its stderr, when a sync started in the background exited (a flag it
/// does not know, say) instead of leaving a test to time out waiting for it.
pub fn assert_still_running(sync: &mut Running) {
    std::thread::sleep(std::time::Duration::from_millis(300));
    if !sync.is_running() {
        panic!("the sync exited at start:\n{}", sync.stderr_so_far());
    }
}

//! Overlap mode's vocabulary: every application role gets a twin login, and the login that
//! applications must use right now is published in one `pg_service.conf`.
//!
//! PostgreSQL keeps one password per role, so a password change always has a moment when
//! some client holds the other one. Two logins for one identity remove that moment: a new
//! password is staged on the login nobody uses, checked, and only then published; the login
//! that stopped being published keeps working until the server expires it (`VALID UNTIL`).
//! This module owns the names that follow from a role (the twin login, its password file,
//! the service file); `service_file` owns the published-credential file itself.

pub mod service_file;

use std::path::PathBuf;

use anyhow::bail;

/// Default suffix of a role's twin login (`appuser` → `appuser_alt`).
pub const DEFAULT_TWIN_SUFFIX: &str = "_alt";

/// The file that publishes, per role, the login and password applications must use now.
/// Looked up like every secret (`SECRETS_SOURCE_DIR`, then `KEYS_DIR`; `NAME`, then
/// `NAME.txt`), so Compose, Kubernetes and `generate` deliver it beside the password files.
pub const SERVICE_FILE: &str = "pg_service.conf";

/// PostgreSQL's identifier limit (NAMEDATALEN - 1); a longer twin name would be truncated
/// by the server and could collide with another role.
const MAX_NAME_BYTES: usize = 63;

/// The twin login of `role`. Refused when the server would truncate it, or when the suffix
/// is empty (the twin would be the role itself) or holds control characters.
pub fn twin_login(role: &str, suffix: &str) -> anyhow::Result<String> {
    if suffix.is_empty() {
        bail!("the twin login suffix is empty");
    }
    if suffix.chars().any(char::is_control) {
        bail!("the twin login suffix {suffix:?} contains control characters");
    }
    let twin = format!("{role}{suffix}");
    if twin.len() > MAX_NAME_BYTES {
        bail!(
            "the twin login of role {role:?} would be {} bytes long; PostgreSQL allows at \
             most {MAX_NAME_BYTES} (use a shorter --twin-suffix or role name)",
            twin.len()
        );
    }
    Ok(twin)
}

/// The secret name of a twin's password: the suffix goes before a trailing `_pw`, so the
/// files sort and read as a pair (`postgres_app_user_pw` → `postgres_app_user_alt_pw`);
/// names without `_pw` get it appended (`my_secret` → `my_secret_alt`).
pub fn twin_secret_name(name: &str, suffix: &str) -> String {
    match name.strip_suffix("_pw") {
        Some(stem) => format!("{stem}{suffix}_pw"),
        None => format!("{name}{suffix}"),
    }
}

/// The same rule for a secret given as a path: applied to the file name, keeping a `.txt`
/// extension and the directory (`/k/app_pw.txt` → `/k/app_alt_pw.txt`).
pub fn twin_secret_path(path: &std::path::Path, suffix: &str) -> Option<PathBuf> {
    let file = path.file_name()?.to_str()?;
    let (stem, ext) = match file.strip_suffix(".txt") {
        Some(stem) => (stem, ".txt"),
        None => (file, ""),
    };
    Some(path.with_file_name(format!("{}{ext}", twin_secret_name(stem, suffix))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn twin_names() {
        assert_eq!(twin_login("appuser", "_alt").unwrap(), "appuser_alt");
        assert_eq!(twin_login("My Role", "_b").unwrap(), "My Role_b");
        assert!(twin_login(&"r".repeat(59), "_alt").is_ok());
        let err = twin_login(&"r".repeat(60), "_alt").unwrap_err();
        assert!(format!("{err:#}").contains("64 bytes"), "{err:#}");
        assert!(twin_login("appuser", "").is_err());
        assert!(twin_login("appuser", "_a\n").is_err());
    }

    #[test]
    fn twin_secret_files_pair_with_the_role_file() {
        assert_eq!(
            twin_secret_name("postgres_app_user_pw", "_alt"),
            "postgres_app_user_alt_pw"
        );
        assert_eq!(twin_secret_name("my_secret", "_alt"), "my_secret_alt");
        assert_eq!(
            twin_secret_path(Path::new("/k/app_pw.txt"), "_alt").unwrap(),
            Path::new("/k/app_alt_pw.txt")
        );
        assert_eq!(
            twin_secret_path(Path::new("/k/app"), "_2").unwrap(),
            Path::new("/k/app_2")
        );
    }
}

//! Secret files as the binary reads them: a directory of `NAME.txt` files, written
//! atomically (a temp file renamed in), root-only when running as root as Compose delivers
//! them; and the four default roles with the file each reads.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The four default roles and the key file each reads.
pub const DEFAULT_ROLES: [(&str, &str); 4] = [
    ("postgres", "postgres_password"),
    ("appuser", "postgres_app_user_pw"),
    ("backupuser", "postgres_app_ro_pw"),
    ("temporaluser", "postgres_temporal_pw"),
];

/// A directory of secret files (0700, removed on drop).
pub struct Keys {
    pub dir: tempfile::TempDir,
}

impl Default for Keys {
    fn default() -> Keys {
        Keys::new()
    }
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::Builder::new()
            .prefix("pps-keys-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Keys { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name.txt` (0600) with the value and a trailing newline, atomically.
    pub fn write(&self, name: &str, value: &str) {
        self.write_raw(&format!("{name}.txt"), format!("{value}\n").as_bytes());
    }

    /// Writes a new secret (`prefix` made unique) to the file of each of `roles`; returns
    /// the secrets in `roles` order.
    pub fn write_new(&self, roles: &[(&str, &str)], prefix: &str) -> Vec<String> {
        roles
            .iter()
            .map(|(_, file)| {
                let secret = super::unique(prefix);
                self.write(file, &secret);
                secret
            })
            .collect()
    }

    /// Writes `file` (0600) with exactly `bytes`, atomically.
    pub fn write_raw(&self, file: &str, bytes: &[u8]) {
        let tmp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, self.path().join(file)).unwrap();
    }
}

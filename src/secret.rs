//! Secrets: the `Secret` type and the rules for reading one from a file.
//!
//! A `Secret` can only be seen through `expose()`; its `Debug` and `Display` print
//! `[redacted]`, and its memory is zeroized on drop, so a stray `{:?}`, a panic message or
//! a log line cannot leak a password. The file rules (ARCHITECTURE.md, "Secret files"): the
//! value is the file's bytes minus trailing `\r`/`\n`, and anything that cannot be a
//! password (empty, whitespace only, NUL, not UTF-8, over 4 KiB) is an error that names
//! the file and never quotes it. A file is opened without blocking and judged on the
//! open descriptor (regular file, size) before a byte is read.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use zeroize::{Zeroize, Zeroizing};

/// Largest accepted secret file.
pub const MAX_SECRET_BYTES: usize = 4096;

/// Where a role's secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// Looked up as `NAME`, then `NAME.txt`, in the secret directories.
    Name(String),
    /// An explicit path.
    Path(PathBuf),
}

/// The three named roles of the replaced scripts (`APP_DB_USER`, `APP_DB_RO_USER`,
/// `TEMPORAL_DB_USER`): the default role map, and in overlap mode the sections of
/// `pg_service.conf` that `generate --overlap` writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedRoles {
    pub app: String,
    pub read_only: String,
    /// Skipped when unset or empty.
    pub temporal: Option<String>,
}

impl NamedRoles {
    /// Each named role and the secret file its password is in, in role map order.
    pub fn with_secrets(&self) -> Vec<(&str, &'static str)> {
        let mut roles = vec![
            (self.app.as_str(), "postgres_app_user_pw"),
            (self.read_only.as_str(), "postgres_app_ro_pw"),
        ];
        if let Some(temporal) = self.temporal.as_deref().filter(|t| !t.is_empty()) {
            roles.push((temporal, "postgres_temporal_pw"));
        }
        roles
    }
}

/// One role to keep in step with one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpec {
    pub name: String,
    pub secret: SecretRef,
}

/// A password or other secret value. Redacted when formatted, zeroized when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value; the caller's copy should itself be a `Zeroizing` or dropped soon.
    pub fn new(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }

    /// The value, for the few places that must use it (verifier, login, file write).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Finds a secret file by name: `NAME` then `NAME.txt`, in each directory in order.
/// Returns every path tried when none exists, for the error message.
pub fn locate(name: &str, dirs: &[&Path]) -> Result<PathBuf, Vec<PathBuf>> {
    let mut tried = Vec::new();
    for dir in dirs {
        for candidate in [name.to_owned(), format!("{name}.txt")] {
            let path = dir.join(candidate);
            // `exists` follows symlinks, so a Kubernetes `..data` link counts as present.
            if path.exists() {
                return Ok(path);
            }
            tried.push(path);
        }
    }
    Err(tried)
}

/// Reads and validates one secret file: opened without blocking and judged on the open
/// descriptor, bounded, through `fileio` like every file. Links are followed: a Kubernetes
/// secret volume reaches every file through the `..data` link.
pub fn read_file(path: &Path) -> anyhow::Result<Secret> {
    let shown = path.display();
    let mut bytes = crate::fileio::dirfd::read_followed_file(path, MAX_SECRET_BYTES)
        .with_context(|| format!("reading secret file {shown}"))?;
    parse(std::mem::take(&mut *bytes)).with_context(|| format!("secret file {shown}"))
}

/// Applies the value rules to a file's bytes. Errors describe the problem, never the value.
pub fn parse(mut bytes: Vec<u8>) -> anyhow::Result<Secret> {
    if bytes.len() > MAX_SECRET_BYTES {
        bytes.zeroize();
        bail!("is larger than {MAX_SECRET_BYTES} bytes");
    }
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if let Err(problem) = check(&bytes) {
        bytes.zeroize();
        bail!(problem);
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Secret::new(text)),
        Err(err) => {
            err.into_bytes().zeroize();
            bail!("is not valid UTF-8")
        }
    }
}

/// What is wrong with a (line-end stripped) value, if anything.
fn check(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("is empty".into());
    }
    if bytes.contains(&0) {
        return Err("contains a NUL byte".into());
    }
    match std::str::from_utf8(bytes) {
        Err(_) => Err("is not valid UTF-8".into()),
        Ok(text) if text.chars().all(char::is_whitespace) => Err("contains only whitespace".into()),
        Ok(_) => Ok(()),
    }
}

/// A role spec (`NAME` read from `NAME_pw`) and its secret, for the unit tests of every
/// module that needs a set.
#[cfg(test)]
pub fn test_entry(name: &str, value: &str) -> (RoleSpec, Secret) {
    (
        RoleSpec {
            name: name.into(),
            secret: SecretRef::Name(format!("{name}_pw")),
        },
        Secret::new(value.into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::Mode;
    use std::fs::File;

    fn ok(bytes: &[u8]) -> String {
        parse(bytes.to_vec()).unwrap().expose().to_owned()
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", parse(bytes.to_vec()).unwrap_err())
    }

    #[test]
    fn strips_only_trailing_line_ends() {
        assert_eq!(ok(b"pw\n"), "pw");
        assert_eq!(ok(b"pw\r\n\r\n"), "pw");
        assert_eq!(ok(b"  pw with spaces \t\n"), "  pw with spaces \t");
        assert_eq!(ok("p'w\"\\ü€\n".as_bytes()), "p'w\"\\ü€");
    }

    #[test]
    fn rejects_bad_values_without_quoting_them() {
        assert_eq!(err(b""), "is empty");
        assert_eq!(err(b" \n\t\r\n"), "contains only whitespace");
        assert_eq!(
            err("\u{a0}\u{2003}\n".as_bytes()),
            "contains only whitespace"
        );
        assert_eq!(err(b"sec\0ret"), "contains a NUL byte");
        assert_eq!(err(b"sec\xffret"), "is not valid UTF-8");
        assert_eq!(
            err(&[b'a'; MAX_SECRET_BYTES + 1]),
            "is larger than 4096 bytes"
        );
        assert_eq!(ok(&[b'a'; MAX_SECRET_BYTES]).len(), MAX_SECRET_BYTES);
    }

    #[test]
    fn formatting_never_shows_the_value() {
        let secret = Secret::new("hunter2".into());
        assert_eq!(format!("{secret}"), "[redacted]");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&secret)).contains("hunter2"));
    }

    #[test]
    fn lookup_order_is_source_dir_then_keys_dir_name_then_txt() {
        let source = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let dirs = [source.path(), keys.path()];
        assert_eq!(locate("pw", &dirs).unwrap_err().len(), 4);
        std::fs::write(keys.path().join("pw.txt"), "a").unwrap();
        assert_eq!(locate("pw", &dirs).unwrap(), keys.path().join("pw.txt"));
        std::fs::write(keys.path().join("pw"), "a").unwrap();
        assert_eq!(locate("pw", &dirs).unwrap(), keys.path().join("pw"));
        std::fs::write(source.path().join("pw.txt"), "a").unwrap();
        assert_eq!(locate("pw", &dirs).unwrap(), source.path().join("pw.txt"));
    }

    #[test]
    fn read_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let msg = format!("{:#}", read_file(dir.path()).unwrap_err());
        assert!(msg.contains("is a directory, not a file"), "{msg}");
        let path = dir.path().join("empty");
        std::fs::write(&path, "\n").unwrap();
        let msg = format!("{:#}", read_file(&path).unwrap_err());
        assert!(
            msg.contains("empty") && msg.contains(&*path.to_string_lossy()),
            "{msg}"
        );
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking_and_size_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        // No writer ever comes: a blocking open would hang this test.
        let msg = format!("{:#}", read_file(&fifo).unwrap_err());
        assert!(msg.contains("is not a regular file"), "{msg}");
        let msg = format!("{:#}", read_file(Path::new("/dev/zero")).unwrap_err());
        assert!(msg.contains("is not a regular file"), "{msg}");
        // A link to a regular file is followed (Kubernetes' `..data`).
        let real = dir.path().join("real");
        std::fs::write(&real, "pw\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(read_file(&link).unwrap().expose(), "pw");
        // A huge (sparse) file is refused by its size, before any read.
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(1 << 40).unwrap();
        let msg = format!("{:#}", read_file(&big).unwrap_err());
        assert!(msg.contains("is larger than 4096 bytes"), "{msg}");
    }
}

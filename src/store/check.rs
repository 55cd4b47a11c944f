//! `--verify` and `--list`: inspect the secret files without ever showing a value.
//!
//! Verification collects *every* problem (missing file, mode other than 0600, value shorter
//! than its floor, empty or known placeholder value) rather than stopping at the first, so
//! one run tells the operator everything to fix. The checks on a value are pure functions,
//! tested here; problems are described by file name and kind only.

use anyhow::Context;
use zeroize::Zeroizing;

use super::catalog::{ENTRIES, Entry};
use super::clock::Utc;
use crate::fileio::dirfd::{Dir, Kind};
use crate::secret::MAX_SECRET_BYTES;

/// Values that template files ship with and that must never reach production (compared
/// case-insensitively; the first five also count when they appear inside a value, as in
/// `replace-me-with-your-google-secret`).
const PLACEHOLDERS: [&str; 8] = [
    "replace-me",
    "replace_me",
    "changeme",
    "change-me",
    "change_me",
    "replaceme",
    "secret",
    "password",
];

/// Whether `value` is a known placeholder.
pub fn is_placeholder(value: &str) -> bool {
    let lower = value.trim().to_ascii_lowercase();
    PLACEHOLDERS.contains(&lower.as_str()) || PLACEHOLDERS[..5].iter().any(|p| lower.contains(p))
}

/// The problems of one value (trailing line ends already removed), as short phrases.
pub fn value_problems(entry: &Entry, value: &[u8]) -> Vec<String> {
    if value.iter().all(u8::is_ascii_whitespace) {
        return vec!["is empty".into()];
    }
    let mut problems = Vec::new();
    let (length, text) = match std::str::from_utf8(value) {
        Ok(text) => (text.chars().count(), Some(text)),
        Err(_) => {
            problems.push("is not valid UTF-8".to_owned());
            (value.len(), None)
        }
    };
    if text.is_some_and(is_placeholder) {
        problems.push("holds a placeholder value".into());
    }
    if length < entry.min_len() {
        problems.push(format!(
            "is shorter than {} characters ({length})",
            entry.min_len()
        ));
    }
    problems
}

/// Every problem with the secret set in `keys`, one line each, naming the file. Nothing is
/// followed: a link where a key file belongs is a problem, not a way to its target.
pub fn verify(keys: Option<&Dir>) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for entry in &ENTRIES {
        let (Some(keys), Some(stat)) = (keys, stat(keys, entry.file)?) else {
            problems.push(format!("{}: missing", entry.file));
            continue;
        };
        match Kind::of(&stat) {
            Kind::File => {}
            Kind::Symlink => {
                problems.push(format!("{}: is a symbolic link", entry.file));
                continue;
            }
            _ => {
                problems.push(format!("{}: is not a regular file", entry.file));
                continue;
            }
        }
        let mode = stat.st_mode & 0o7777;
        if mode != 0o600 {
            problems.push(format!(
                "{}: has mode {mode:04o}, expected 0600",
                entry.file
            ));
        }
        if stat.st_size > MAX_SECRET_BYTES as i64 {
            problems.push(format!(
                "{}: is larger than {MAX_SECRET_BYTES} bytes",
                entry.file
            ));
            continue;
        }
        let value = read_value(keys, entry.file)?;
        problems.extend(
            value_problems(entry, &value)
                .into_iter()
                .map(|p| format!("{}: {p}", entry.file)),
        );
    }
    Ok(problems)
}

/// `lstat` of `keys/file`; `None` if it (or `keys/`) is missing.
fn stat(keys: Option<&Dir>, file: &str) -> anyhow::Result<Option<nix::sys::stat::FileStat>> {
    keys.map_or(Ok(None), |keys| keys.stat(file))
}

/// Reads the secret file `keys/file`: its bytes minus trailing `\r`/`\n`. A missing file,
/// a link, a special file or one larger than `MAX_SECRET_BYTES` is an error (as it is for
/// `run`), named without its content.
pub fn read_value(keys: &Dir, file: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut bytes = keys
        .read_file(file, MAX_SECRET_BYTES)?
        .with_context(|| format!("{} is missing", keys.shown(file)))?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

/// One `--list` line per catalog file: name, size, mode and modification time (UTC), from
/// the entry itself: a link is listed as one, not as its target.
pub fn list(keys: Option<&Dir>) -> anyhow::Result<Vec<String>> {
    let files: Vec<&str> = ENTRIES.iter().map(|e| e.file).collect();
    list_files(keys, &files)
}

/// The `--list` lines (header first) of the files named `files` in `keys`.
pub fn list_files(keys: Option<&Dir>, files: &[&str]) -> anyhow::Result<Vec<String>> {
    // At least as wide as the catalog's names, so overlap lines line up below them.
    let width = ENTRIES
        .iter()
        .map(|e| e.file)
        .chain(files.iter().copied())
        .map(str::len)
        .max()
        .unwrap_or(0);
    let mut lines = vec![format!(
        "{:width$}  {:>5}  {:4}  {}",
        "FILE", "BYTES", "MODE", "MODIFIED (UTC)"
    )];
    for file in files {
        let stat = stat(keys, file)?;
        let line = match (stat.as_ref().map(Kind::of), stat) {
            (Some(Kind::File), Some(stat)) => format!(
                "{:width$}  {:>5}  {:04o}  {}",
                file,
                stat.st_size,
                stat.st_mode & 0o7777,
                Utc::from_unix(stat.st_mtime).readable()
            ),
            (None, _) => format!("{:width$}  missing", file),
            (Some(Kind::Symlink), _) => {
                format!("{:width$}  symbolic link (not followed)", file)
            }
            _ => format!("{:width$}  not a regular file", file),
        };
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::catalog::Kind;

    const PASSWORD: Entry = Entry {
        file: "p.txt",
        kind: Kind::Password,
    };
    const SIGNING: Entry = Entry {
        file: "s.txt",
        kind: Kind::Signing,
    };
    const OIDC: Entry = Entry {
        file: "o.txt",
        kind: Kind::Oidc("X"),
    };

    #[test]
    fn placeholders() {
        for value in [
            "replace-me",
            "CHANGEME",
            " secret ",
            "Password",
            "replace-me-with-google",
        ] {
            assert!(is_placeholder(value), "{value}");
        }
        for value in [
            "aB3xY9kL2mN8pQ4rS7tU1vW5",
            "secretive-but-long-enough",
            "passwords",
        ] {
            assert!(!is_placeholder(value), "{value}");
        }
    }

    #[test]
    fn read_value_trims_line_ends_and_refuses_oversize() {
        use std::fs;
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::create_path(tmp.path(), 0o700).unwrap();
        let path = tmp.path().join("v.txt");
        fs::write(&path, b"value\r\n").unwrap();
        let value = read_value(&dir, "v.txt").unwrap();
        assert_eq!(&**value, b"value");
        fs::write(&path, vec![b'a'; MAX_SECRET_BYTES]).unwrap();
        let value = read_value(&dir, "v.txt").unwrap();
        assert_eq!(value.len(), MAX_SECRET_BYTES);
        // Allocated once, for the whole file: reading it never grew (reallocated) it.
        assert_eq!(value.capacity(), MAX_SECRET_BYTES + 1);
        fs::write(&path, vec![b'a'; MAX_SECRET_BYTES + 1]).unwrap();
        let err = format!("{:#}", read_value(&dir, "v.txt").unwrap_err());
        assert!(err.contains("larger than 4096 bytes"), "{err}");
        let err = format!("{:#}", read_value(&dir, "missing.txt").unwrap_err());
        assert!(err.contains("missing.txt is missing"), "{err}");
    }

    #[test]
    fn value_checks() {
        assert!(value_problems(&PASSWORD, &[b'a'; 24]).is_empty());
        assert_eq!(
            value_problems(&PASSWORD, &[b'a'; 23]),
            ["is shorter than 24 characters (23)"]
        );
        assert_eq!(
            value_problems(&SIGNING, &[b'a'; 31]),
            ["is shorter than 32 characters (31)"]
        );
        assert!(value_problems(&SIGNING, &[b'a'; 43]).is_empty());
        assert!(value_problems(&OIDC, &[b'a'; 16]).is_empty());
        assert_eq!(value_problems(&OIDC, b""), ["is empty"]);
        assert_eq!(value_problems(&OIDC, b"  \t"), ["is empty"]);
        assert_eq!(
            value_problems(&OIDC, b"changeme"),
            [
                "holds a placeholder value",
                "is shorter than 16 characters (8)"
            ]
        );
        assert_eq!(
            value_problems(&OIDC, b"replace-me-with-the-real-one"),
            ["holds a placeholder value"]
        );
        // Characters, not bytes: 16 two-byte characters pass, 15 do not.
        assert!(value_problems(&OIDC, "é".repeat(16).as_bytes()).is_empty());
        assert_eq!(value_problems(&OIDC, "é".repeat(15).as_bytes()).len(), 1);
    }
}

//! `--verify` and `--list`: inspect the secret files without ever showing a value.
//!
//! Verification collects *every* problem (missing file, mode other than 0600, value shorter
//! than its floor, empty or known placeholder value) rather than stopping at the first, so
//! one run tells the operator everything to fix. The checks on a value are pure functions,
//! tested here; problems are described by file name and kind only.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use zeroize::Zeroizing;

use super::catalog::{ENTRIES, Entry};
use super::clock::Utc;
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

/// Every problem with the secret set in `keys`, one line each, naming the file.
pub fn verify(keys: &Path) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for entry in &ENTRIES {
        let path = keys.join(entry.file);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                problems.push(format!("{}: missing", entry.file));
                continue;
            }
            Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
        };
        if !meta.is_file() {
            problems.push(format!("{}: is not a regular file", entry.file));
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode != 0o600 {
            problems.push(format!(
                "{}: has mode {mode:04o}, expected 0600",
                entry.file
            ));
        }
        if meta.len() > MAX_SECRET_BYTES as u64 {
            problems.push(format!(
                "{}: is larger than {MAX_SECRET_BYTES} bytes",
                entry.file
            ));
            continue;
        }
        let value = read_value(&path)?;
        problems.extend(
            value_problems(entry, &value)
                .into_iter()
                .map(|p| format!("{}: {p}", entry.file)),
        );
    }
    Ok(problems)
}

/// Reads a secret file's value: its bytes minus trailing `\r`/`\n`. A file larger than
/// `MAX_SECRET_BYTES` is an error (as it is for `run`), named without its content.
///
/// The buffer is allocated once, one byte larger than the largest value, and filled in
/// place, so no reallocation ever leaves an un-zeroized copy of the value behind.
pub fn read_value(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(vec![0u8; MAX_SECRET_BYTES + 1]);
    let mut filled = 0;
    let mut file = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    while filled < bytes.len() {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }
    if filled > MAX_SECRET_BYTES {
        anyhow::bail!("{} is larger than {MAX_SECRET_BYTES} bytes", path.display());
    }
    // Shortening keeps the allocation; the whole of it is zeroized on drop.
    bytes.truncate(filled);
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

/// One `--list` line per catalog file: name, size, mode and modification time (UTC).
pub fn list(keys: &Path) -> anyhow::Result<Vec<String>> {
    let files: Vec<&str> = ENTRIES.iter().map(|e| e.file).collect();
    list_files(keys, &files)
}

/// The `--list` lines (header first) of the files named `files` in `keys`.
pub fn list_files(keys: &Path, files: &[&str]) -> anyhow::Result<Vec<String>> {
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
        let path = keys.join(file);
        let line = match fs::metadata(&path) {
            Ok(meta) => {
                let modified = meta
                    .modified()
                    .map(Utc::from_system)
                    .map_or_else(|_| "-".to_owned(), |t| t.readable());
                format!(
                    "{:width$}  {:>5}  {:04o}  {modified}",
                    file,
                    meta.len(),
                    meta.permissions().mode() & 0o7777
                )
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                format!("{:width$}  missing", file)
            }
            Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
        };
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfiles::catalog::Kind;

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
    fn read_value_trims_line_ends_refuses_oversize_and_never_reallocates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.txt");
        fs::write(&path, b"value\r\n").unwrap();
        let value = read_value(&path).unwrap();
        assert_eq!(&**value, b"value");
        // Preallocated for the largest value: reading one never grew (reallocated) it.
        assert_eq!(value.capacity(), MAX_SECRET_BYTES + 1);
        fs::write(&path, vec![b'a'; MAX_SECRET_BYTES]).unwrap();
        let value = read_value(&path).unwrap();
        assert_eq!(value.len(), MAX_SECRET_BYTES);
        assert_eq!(value.capacity(), MAX_SECRET_BYTES + 1);
        fs::write(&path, vec![b'a'; MAX_SECRET_BYTES + 1]).unwrap();
        let err = format!("{:#}", read_value(&path).unwrap_err());
        assert!(err.contains("larger than 4096 bytes"), "{err}");
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

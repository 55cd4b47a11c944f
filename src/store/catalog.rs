//! The catalog of secret files `generate` manages: their names, how each value is made and
//! the minimum length `--verify` accepts.
//!
//! These eleven names are the contract with the `run` side (which looks them up without
//! `.txt`; ARCHITECTURE.md, "Secret files"), so the list lives in one table that every
//! operation (generate, backup, verify, list, restore, Kubernetes manifest) walks in the
//! same order.

/// How the value of one secret file comes about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 32 characters of `[A-Za-z0-9]` from the OS CSPRNG (database and redis passwords).
    Password,
    /// 32 random bytes, base64url without padding (43 characters).
    Signing,
    /// An OAuth client secret issued by the provider: read from the user secrets file or the
    /// environment (this names the variable), never generated.
    Oidc(&'static str),
}

/// One secret file under `<dir>/keys/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// File name, with `.txt`.
    pub file: &'static str,
    pub kind: Kind,
}

impl Entry {
    /// The key `run` looks up and the Kubernetes Secret holds: the file name without `.txt`.
    pub fn key(&self) -> &'static str {
        self.file.strip_suffix(".txt").unwrap_or(self.file)
    }

    /// The shortest value `--verify` accepts, in characters.
    pub fn min_len(&self) -> usize {
        match self.kind {
            Kind::Password => 24,
            Kind::Signing => 32,
            Kind::Oidc(_) => 16,
        }
    }

    /// Whether `generate` makes this value itself (as opposed to reading it from a source).
    pub fn is_random(&self) -> bool {
        !matches!(self.kind, Kind::Oidc(_))
    }
}

/// The eleven secret files, in the order they are reported.
pub const ENTRIES: [Entry; 11] = [
    Entry {
        file: "postgres_password.txt",
        kind: Kind::Password,
    },
    Entry {
        file: "postgres_app_user_pw.txt",
        kind: Kind::Password,
    },
    Entry {
        file: "postgres_app_ro_pw.txt",
        kind: Kind::Password,
    },
    Entry {
        file: "postgres_app_owner_pw.txt",
        kind: Kind::Password,
    },
    Entry {
        file: "postgres_temporal_pw.txt",
        kind: Kind::Password,
    },
    Entry {
        file: "redis_password.txt",
        kind: Kind::Password,
    },
    Entry {
        file: "session_signing_secret.txt",
        kind: Kind::Signing,
    },
    Entry {
        file: "csrf_signing_secret.txt",
        kind: Kind::Signing,
    },
    Entry {
        file: "oidc_google_client_secret.txt",
        kind: Kind::Oidc("OIDC_GOOGLE_CLIENT_SECRET"),
    },
    Entry {
        file: "oidc_microsoft_client_secret.txt",
        kind: Kind::Oidc("OIDC_MICROSOFT_CLIENT_SECRET"),
    },
    Entry {
        file: "oidc_keycloak_client_secret.txt",
        kind: Kind::Oidc("OIDC_KEYCLOAK_CLIENT_SECRET"),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_keys_drop_txt() {
        let mut files: Vec<&str> = ENTRIES.iter().map(|e| e.file).collect();
        files.sort_unstable();
        files.dedup();
        assert_eq!(files.len(), 11);
        assert_eq!(ENTRIES[1].key(), "postgres_app_user_pw");
        assert!(ENTRIES.iter().all(|e| !e.key().ends_with(".txt")));
    }

    #[test]
    fn floors_follow_the_kind() {
        let floor = |file: &str| ENTRIES.iter().find(|e| e.file == file).unwrap().min_len();
        assert_eq!(floor("postgres_password.txt"), 24);
        assert_eq!(floor("redis_password.txt"), 24);
        assert_eq!(floor("csrf_signing_secret.txt"), 32);
        assert_eq!(floor("oidc_keycloak_client_secret.txt"), 16);
        assert_eq!(ENTRIES.iter().filter(|e| e.is_random()).count(), 8);
    }
}

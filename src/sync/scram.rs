//! SCRAM-SHA-256 verifiers: made on the client, checked against what the server stores.
//!
//! Sending a verifier instead of the plaintext is what keeps the password out of the
//! server log, `pg_stat_activity` and any failing-statement report. Checking the stored
//! verifier first lets an unchanged password stay byte-identical in `pg_authid` (no salt
//! churn, no needless writes). `postgres-protocol` makes verifiers but keeps its checker
//! private, so the check is recomputed here with the stored salt and iteration count
//! (RFC 5802 / RFC 7677, as PostgreSQL's `scram_verify_plain_password`).
//!
//! Verifiers are made here too, not by `postgres-protocol`, because its maker always uses
//! 4096 iterations while PostgreSQL 16+ lets the administrator raise `scram_iterations`:
//! the sync follows the server's setting (`iterations_for`), and a stored verifier with
//! fewer iterations than that setting counts as changed, so it is re-made at the configured
//! strength (one with more is kept: it is not weaker, and re-making it would churn salts).

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The verifier prefix PostgreSQL stores for SCRAM-SHA-256 passwords.
const PREFIX: &str = "SCRAM-SHA-256$";

/// Iteration counts above this are treated as "does not match" (the role is re-set with
/// our default) rather than spending minutes of CPU on one comparison.
const MAX_ITERATIONS: u32 = 1 << 22;

/// PostgreSQL's iteration count before 16 made it a setting (and its default since).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Salt length PostgreSQL uses for the verifiers it makes.
const SALT_LEN: usize = 16;

/// The iteration count for new verifiers, from the server's `scram_iterations` as read with
/// `current_setting('scram_iterations', true)`: `None` (before 16 the setting does not exist)
/// or anything unparsable means the fixed 4096 of those servers. The server accepts 1 to
/// 2^31-1; values above `MAX_ITERATIONS` are capped there, because a verifier we could not
/// afford to check would be re-made on every resync.
pub fn iterations_for(setting: Option<&str>) -> u32 {
    setting
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|&n| n > 0)
        .map_or(DEFAULT_ITERATIONS, |n| n.min(MAX_ITERATIONS))
}

/// A fresh verifier with a random salt and `iterations` PBKDF2 rounds.
pub fn make_verifier(password: &Secret, iterations: u32) -> anyhow::Result<String> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt)
        .map_err(|err| anyhow::anyhow!("{err}"))
        .context("drawing a salt from the operating system's random number generator")?;
    let keys = derive_keys(password, &salt, iterations)
        .context("computing the SCRAM keys (HMAC refused its key)")?;
    Ok(format!(
        "{PREFIX}{iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(keys.stored_key),
        STANDARD.encode(&keys.server_key[..])
    ))
}

/// True when `stored` verifies `password` with at least `min_iterations` rounds: what the
/// sync keeps unchanged. A weaker stored verifier is not even checked (no PBKDF2 spent).
pub fn is_current(stored: &str, password: &Secret, min_iterations: u32) -> bool {
    strong_enough(stored, min_iterations) && verifies(stored, password)
}

/// True when `stored` is a SCRAM-SHA-256 verifier with at least `min_iterations` rounds.
pub fn strong_enough(stored: &str, min_iterations: u32) -> bool {
    parse_verifier(stored).is_some_and(|v| v.iterations >= min_iterations)
}

/// The parts of a stored `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` verifier.
/// No `Debug`: the keys are password-equivalent for an offline guessing attack.
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

/// A tag of a stored SCRAM verifier's salt: the first 8 bytes of the SHA-256 of the salt as
/// stored, in hex; `None` for anything else. It tells one verifier from another (a new one
/// has a new random salt) and holds no part of the verifier: it is written where anyone
/// can read it (the twin's mark) and where an audit log records it.
pub fn salt_tag(stored: &str) -> Option<String> {
    let rest = stored.strip_prefix(PREFIX)?;
    let (params, _) = rest.split_once('$')?;
    let (_, salt) = params.split_once(':')?;
    let digest = Sha256::digest(salt.as_bytes());
    Some(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Parses a stored verifier; `None` for anything else (MD5, plaintext, NULL, malformed).
pub fn parse_verifier(stored: &str) -> Option<Verifier> {
    let rest = stored.strip_prefix(PREFIX)?;
    let (params, keys) = rest.split_once('$')?;
    let (iterations, salt) = params.split_once(':')?;
    let (stored_key, server_key) = keys.split_once(':')?;
    let verifier = Verifier {
        iterations: iterations.parse().ok().filter(|&n| n > 0)?,
        salt: STANDARD.decode(salt).ok()?,
        stored_key: STANDARD.decode(stored_key).ok()?,
        server_key: STANDARD.decode(server_key).ok()?,
    };
    let key_len = <Sha256 as Digest>::output_size();
    (verifier.stored_key.len() == key_len && verifier.server_key.len() == key_len)
        .then_some(verifier)
}

/// True when `stored` is a SCRAM-SHA-256 verifier of `password`.
pub fn verifies(stored: &str, password: &Secret) -> bool {
    let Some(verifier) = parse_verifier(stored) else {
        return false;
    };
    if verifier.iterations > MAX_ITERATIONS {
        return false;
    }
    let Some(keys) = derive_keys(password, &verifier.salt, verifier.iterations) else {
        return false;
    };
    // Not secret-dependent timing that matters here: both sides are our own values.
    keys.stored_key.as_slice() == verifier.stored_key
        && keys.server_key[..] == verifier.server_key[..]
}

/// The two keys a verifier stores.
struct Keys {
    stored_key: Vec<u8>,
    server_key: Zeroizing<Vec<u8>>,
}

/// SaltedPassword = PBKDF2(SASLprep(password), salt, iterations); StoredKey =
/// SHA-256(HMAC(SaltedPassword, "Client Key")); ServerKey = HMAC(SaltedPassword, "Server
/// Key"). `None` only if the HMAC library refused a key.
fn derive_keys(password: &Secret, salt: &[u8], iterations: u32) -> Option<Keys> {
    // PostgreSQL normalises with SASLprep and falls back to the raw bytes when the
    // password is not a valid SASLprep string; do the same so the keys agree.
    let normalized: Zeroizing<String> =
        Zeroizing::new(match stringprep::saslprep(password.expose()) {
            Ok(prepared) => prepared.into_owned(),
            Err(_) => password.expose().to_owned(),
        });
    let mut salted = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(normalized.as_bytes(), salt, iterations, &mut *salted);
    let client_key = hmac(&*salted, b"Client Key")?;
    let server_key = hmac(&*salted, b"Server Key")?;
    Some(Keys {
        stored_key: Sha256::digest(&*client_key).to_vec(),
        server_key,
    })
}

/// HMAC-SHA-256; `None` only if the library refused the key (it takes any length).
fn hmac(key: &[u8], message: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).ok()?;
    mac.update(message);
    Some(Zeroizing::new(mac.finalize().into_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_owned())
    }

    #[test]
    fn own_verifier_round_trips() {
        for pw in [
            "hunter2",
            " leading and trailing ",
            "quo'te\"back\\slash",
            "ünïcødé€",
        ] {
            let v = make_verifier(&secret(pw), DEFAULT_ITERATIONS).unwrap();
            assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
            assert!(verifies(&v, &secret(pw)), "{pw}");
            assert!(!verifies(&v, &secret(&format!("{pw}x"))), "{pw}");
        }
    }

    #[test]
    fn two_verifiers_of_one_password_differ_but_both_verify() {
        let a = make_verifier(&secret("same"), DEFAULT_ITERATIONS).unwrap();
        let b = make_verifier(&secret("same"), DEFAULT_ITERATIONS).unwrap();
        assert_ne!(a, b);
        assert!(verifies(&a, &secret("same")) && verifies(&b, &secret("same")));
    }

    #[test]
    fn verifier_made_by_postgres_verifies() {
        // Made by PostgreSQL 15: CREATE ROLE t PASSWORD 'pencil'; SELECT rolpassword …
        let stored = "SCRAM-SHA-256$4096:lApa4CsaMwF1+Khvdog2BA==$\
                      BLCB/D4e3qHwthKtwahoEo6WYzdgWVTKs3Qx4mFL87c=:\
                      Vhur5L1j4AMik0qeiffROkCFHh0FMe2zkrFkYOF+w6I=";
        assert_eq!(parse_verifier(stored).map(|v| v.iterations), Some(4096));
        assert!(verifies(stored, &secret("pencil")));
        assert!(!verifies(stored, &secret("pencil ")));
        assert!(!verifies(stored, &secret("Pencil")));
    }

    #[test]
    fn non_scram_values_never_verify() {
        for stored in [
            "",
            "md5a3556571e93b0d20722ba62be61e8c2d",
            "pencil",
            "SCRAM-SHA-256$x:abc$def:ghi",
            "SCRAM-SHA-256$4096:c2FsdA==$c2hvcnQ=:c2hvcnQ=",
        ] {
            assert!(parse_verifier(stored).is_none() || !verifies(stored, &secret("pencil")));
            assert!(!verifies(stored, &secret("pencil")), "{stored}");
        }
    }

    #[test]
    fn iterations_follow_the_server_setting() {
        // Before 16 the setting does not exist: current_setting(…, true) is NULL.
        assert_eq!(iterations_for(None), 4096);
        assert_eq!(iterations_for(Some("4096")), 4096);
        assert_eq!(iterations_for(Some("8192")), 8192);
        assert_eq!(iterations_for(Some(" 10000 ")), 10000);
        assert_eq!(iterations_for(Some("1")), 1);
        assert_eq!(iterations_for(Some("0")), 4096);
        assert_eq!(iterations_for(Some("-5")), 4096);
        assert_eq!(iterations_for(Some("lots")), 4096);
        assert_eq!(iterations_for(Some("2147483647")), MAX_ITERATIONS);
    }

    #[test]
    fn verifiers_carry_the_requested_iterations() {
        let v = make_verifier(&secret("pencil"), 8192).unwrap();
        assert!(v.starts_with("SCRAM-SHA-256$8192:"), "{v}");
        assert_eq!(parse_verifier(&v).map(|p| p.salt.len()), Some(SALT_LEN));
        assert!(verifies(&v, &secret("pencil")));
    }

    #[test]
    fn weaker_stored_verifiers_are_not_current() {
        let pw = secret("pencil");
        let weak = make_verifier(&pw, 4096).unwrap();
        let strong = make_verifier(&pw, 8192).unwrap();
        assert!(is_current(&weak, &pw, 4096));
        assert!(
            !is_current(&weak, &pw, 8192),
            "fewer rounds than configured"
        );
        assert!(
            is_current(&strong, &pw, 4096),
            "more rounds than configured is kept"
        );
        assert!(is_current(&strong, &pw, 8192));
        assert!(!is_current(&strong, &secret("other"), 4096));
    }
}

//! SCRAM-SHA-256 verifiers: made on the client, checked against what the server stores.
//!
//! Sending a verifier instead of the plaintext is what keeps the password out of the
//! server log, `pg_stat_activity` and any failing-statement report. Checking the stored
//! verifier first lets an unchanged password stay byte-identical in `pg_authid` (no salt
//! churn, no needless writes). `postgres-protocol` makes verifiers but keeps its checker
//! private, so the check is recomputed here with the stored salt and iteration count
//! (RFC 5802 / RFC 7677, as PostgreSQL's `scram_verify_plain_password`).

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

/// A fresh verifier with a random salt and PostgreSQL's default 4096 iterations.
pub fn make_verifier(password: &Secret) -> String {
    postgres_protocol::password::scram_sha_256(password.expose().as_bytes())
}

/// The parts of a stored `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` verifier.
/// No `Debug`: the keys are password-equivalent for an offline guessing attack.
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
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
    // PostgreSQL normalises with SASLprep and falls back to the raw bytes when the
    // password is not a valid SASLprep string; do the same so the keys agree.
    let normalized: Zeroizing<String> =
        Zeroizing::new(match stringprep::saslprep(password.expose()) {
            Ok(prepared) => prepared.into_owned(),
            Err(_) => password.expose().to_owned(),
        });
    let mut salted = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(
        normalized.as_bytes(),
        &verifier.salt,
        verifier.iterations,
        &mut *salted,
    );
    let (Some(client_key), Some(server_key)) =
        (hmac(&*salted, b"Client Key"), hmac(&*salted, b"Server Key"))
    else {
        return false;
    };
    let stored_key = Sha256::digest(&*client_key);
    // Not secret-dependent timing that matters here: both sides are our own values.
    stored_key.as_slice() == verifier.stored_key && server_key[..] == verifier.server_key[..]
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
            let v = make_verifier(&secret(pw));
            assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
            assert!(verifies(&v, &secret(pw)), "{pw}");
            assert!(!verifies(&v, &secret(&format!("{pw}x"))), "{pw}");
        }
    }

    #[test]
    fn two_verifiers_of_one_password_differ_but_both_verify() {
        let a = make_verifier(&secret("same"));
        let b = make_verifier(&secret("same"));
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
}

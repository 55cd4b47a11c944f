//! Random secret values from the operating system's CSPRNG.
//!
//! Passwords are drawn from the 62 characters `[A-Za-z0-9]` by rejection sampling: a random
//! byte is used only when it is below 248 (= 4 × 62), so `byte % 62` is exactly uniform; a
//! plain `% 62` over all 256 byte values would favour the first 8 symbols (the bias the
//! replaced `openssl rand | tr` pipeline had). Signing secrets are 32 raw bytes, base64url
//! without padding. Every buffer that held random bytes is zeroized.

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The password alphabet.
pub const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Length of generated passwords.
pub const PASSWORD_LEN: usize = 32;

/// Random bytes in a signing secret.
pub const SIGNING_BYTES: usize = 32;

/// Bytes at or above this are rejected: the largest multiple of 62 not above 256.
const ACCEPT_BELOW: u8 = 248;

/// Fills `buf` from the OS CSPRNG (`getrandom(2)` on Linux).
fn os_fill(buf: &mut [u8]) -> anyhow::Result<()> {
    getrandom::fill(buf)
        .map_err(|err| anyhow::anyhow!("{err}"))
        .context("reading the operating system's random number generator")
}

/// Draws `len` alphabet characters using `fill` as the source of random bytes.
fn sample_alphanumeric(
    len: usize,
    mut fill: impl FnMut(&mut [u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(len));
    // 248/256 of the bytes are accepted, so a block of `len + 16` rarely needs a refill.
    let mut block = Zeroizing::new(vec![0u8; len + 16]);
    while out.len() < len {
        fill(&mut block)?;
        for &byte in block.iter() {
            if out.len() == len {
                break;
            }
            if byte < ACCEPT_BELOW {
                out.push(char::from(ALPHABET[usize::from(byte % 62)]));
            }
        }
    }
    Ok(out)
}

/// A new password: `PASSWORD_LEN` characters of `[A-Za-z0-9]`.
pub fn password() -> anyhow::Result<Secret> {
    let mut value = sample_alphanumeric(PASSWORD_LEN, os_fill)?;
    // Moves the String out (no copy); the emptied wrapper has nothing left to zeroize.
    Ok(Secret::new(std::mem::take(&mut *value)))
}

/// A new signing secret: `SIGNING_BYTES` random bytes, base64url without padding.
pub fn signing_secret() -> anyhow::Result<Secret> {
    let mut bytes = Zeroizing::new([0u8; SIGNING_BYTES]);
    os_fill(&mut *bytes)?;
    // Sized up front so encoding never reallocates (and leaves no unzeroized copy behind).
    let mut text = String::with_capacity(SIGNING_BYTES * 4 / 3 + 4);
    URL_SAFE_NO_PAD.encode_string(*bytes, &mut text);
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_bytes_are_skipped_not_folded() {
        // A source that yields 248..=255 (all rejected) then 0, 61, 62, 247.
        let mut calls = 0;
        let source = |buf: &mut [u8]| {
            calls += 1;
            let pattern: &[u8] = if calls == 1 {
                &[248, 249, 255, 250]
            } else {
                &[0, 61, 62, 247]
            };
            for (slot, value) in buf.iter_mut().zip(pattern.iter().cycle()) {
                *slot = *value;
            }
            Ok(())
        };
        let value = sample_alphanumeric(4, source).unwrap();
        // 0 → 'A', 61 → '9', 62 → 0 → 'A', 247 → 247 % 62 = 61 → '9'.
        assert_eq!(value.as_str(), "A9A9");
    }

    #[test]
    fn password_has_the_documented_shape() {
        let pw = password().unwrap();
        assert_eq!(pw.expose().len(), PASSWORD_LEN);
        assert!(pw.expose().bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(pw.expose(), password().unwrap().expose());
    }

    #[test]
    fn signing_secret_is_43_base64url_chars() {
        let s = signing_secret().unwrap();
        assert_eq!(s.expose().len(), 43);
        assert!(
            s.expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(
            URL_SAFE_NO_PAD.decode(s.expose()).unwrap().len(),
            SIGNING_BYTES
        );
    }

    /// Chi-square goodness of fit over the 62 symbols for 10^5 generated characters.
    /// 61 degrees of freedom: the p = 0.001 critical value is about 100.9, so a correct
    /// generator fails this one time in a thousand; a `% 62` without rejection gives
    /// roughly 650 and fails always.
    #[test]
    fn generator_output_is_uniform_by_chi_square() {
        let mut counts = [0u64; 62];
        let mut total = 0u64;
        while total < 100_000 {
            let value = sample_alphanumeric(1000, os_fill).unwrap();
            for byte in value.bytes() {
                let index = ALPHABET.iter().position(|&a| a == byte).unwrap();
                counts[index] += 1;
                total += 1;
            }
        }
        let expected = total as f64 / 62.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 100.9,
            "chi-square {chi2:.1} over 61 dof exceeds 100.9"
        );
    }

    #[test]
    fn modulo_without_rejection_would_fail_the_chi_square() {
        // The same statistic over a biased mapping, to show the test has power.
        let mut counts = [0u64; 62];
        let mut buf = vec![0u8; 100_000];
        os_fill(&mut buf).unwrap();
        for byte in &buf {
            counts[usize::from(byte % 62)] += 1;
        }
        let expected = buf.len() as f64 / 62.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 > 100.9, "biased mapping gave only {chi2:.1}");
    }
}

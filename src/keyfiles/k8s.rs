//! The Kubernetes Secret manifest of `--k8s-secret`: the one place values are written out.
//!
//! Keys are the names `run` looks up (file names without `.txt`). Values go under `data:`
//! base64-encoded, so the manifest is valid YAML whatever bytes a secret holds; the name
//! and namespace are checked against Kubernetes' DNS naming rules, which also makes them
//! safe to write unquoted. The rendered text lives in a zeroizing buffer.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Whether `name` is a DNS-1123 label: 1–63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Whether `name` is a DNS-1123 subdomain (a valid Secret name): dot-separated labels,
/// at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// The exact length of the rendered manifest, so its buffer is allocated once: growing it
/// by reallocation would free un-zeroized copies of the values.
fn rendered_len(
    name: &str,
    namespace: Option<&str>,
    values: &[(&str, Zeroizing<Vec<u8>>)],
) -> usize {
    const HEAD: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: \n";
    const TYPE: &str = "type: Opaque\ndata:\n";
    let namespace = namespace.map_or(0, |ns| "  namespace: \n".len() + ns.len());
    let data: usize = values
        .iter()
        .map(|(key, value)| "  : \n".len() + key.len() + value.len().div_ceil(3) * 4)
        .sum();
    HEAD.len() + name.len() + namespace + TYPE.len() + data
}

/// Renders the manifest. `values` pairs each key with its value bytes.
pub fn render(
    name: &str,
    namespace: Option<&str>,
    values: &[(&str, Zeroizing<Vec<u8>>)],
) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(rendered_len(name, namespace, values)));
    out.push_str("apiVersion: v1\nkind: Secret\nmetadata:\n  name: ");
    out.push_str(name);
    out.push('\n');
    if let Some(namespace) = namespace {
        out.push_str("  namespace: ");
        out.push_str(namespace);
        out.push('\n');
    }
    out.push_str("type: Opaque\ndata:\n");
    for (key, value) in values {
        out.push_str("  ");
        out.push_str(key);
        out.push_str(": ");
        // `out` has exactly the room needed, and `encode_string` appends in place.
        STANDARD.encode_string(&**value, &mut out);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["app-secrets", "a", "x1.example-2", "0abc"] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "App",
            "a_b",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a:b",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        assert!(is_dns_label("prod-1"));
        assert!(!is_dns_label("prod.1"));
    }

    #[test]
    fn manifest_shape() {
        let values = vec![
            ("postgres_password", Zeroizing::new(b"p: w\"'\n#".to_vec())),
            ("redis_password", Zeroizing::new(b"r".to_vec())),
        ];
        let text = render("app", Some("prod"), &values);
        assert_eq!(
            text.as_str(),
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: app\n  namespace: prod\n\
             type: Opaque\ndata:\n  postgres_password: cDogdyInCiM=\n  redis_password: cg==\n"
        );
        assert!(!render("app", None, &values).contains("namespace"));
    }

    #[test]
    fn manifest_buffer_is_allocated_once_even_for_the_largest_values() {
        let big = crate::secret::MAX_SECRET_BYTES;
        let keys = ["a", "bb", "ccc", "dddd"];
        let values: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| (*key, Zeroizing::new(vec![b'x'; big - i])))
            .collect();
        for namespace in [None, Some("prod")] {
            let text = render("app-secrets", namespace, &values);
            let expected = rendered_len("app-secrets", namespace, &values);
            // Growing would have doubled the capacity: it is still exactly what was reserved.
            assert_eq!(text.len(), expected);
            assert_eq!(text.capacity(), expected);
        }
    }
}

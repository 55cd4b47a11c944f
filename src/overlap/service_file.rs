//! `pg_service.conf`: the one file that tells applications which login of a role to use now,
//! and with which password.
//!
//! libpq reads it at every new connection (`PGSERVICEFILE` + `PGSERVICE`, or `service=`), so
//! publishing a login is one atomic rename of this file, and no reader can ever see one
//! login with another login's password. Our reading must agree with libpq's exactly, since
//! the sync refuses a set whose published password differs from the password files. libpq's
//! rules: a line's trailing white space is dropped and its leading white space skipped;
//! empty lines and lines starting with `#` are ignored; `[name]` opens a section;
//! `key=value` splits at the first `=` and keeps the value verbatim (leading blanks
//! included); within a section the first setting of a key wins, and a second section of the
//! same name is never read. We accept a strict subset: anything libpq would read
//! differently from how it looks (a repeated section or key, `key = value`, text after
//! `]`) is an error here, so that what we check is what applications get. Errors name the
//! line, never its text: a line may hold a password.

use anyhow::bail;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// libpq before PostgreSQL 14 read service files into a 256-byte line buffer and refused
/// longer lines; staying under it keeps older clients working.
pub const MAX_LINE_BYTES: usize = 255;

/// One `[name]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The service name; overlap mode names each section after its role.
    pub name: String,
    /// The login (`user=`), if set.
    pub user: Option<String>,
    /// The login's password (`password=`), if set.
    pub password: Option<Secret>,
    /// Every other `key=value` (host, port, dbname, sslmode…), kept in order.
    pub other: Vec<(String, String)>,
}

impl Section {
    /// A section with only a login and its password.
    pub fn login(name: &str, user: &str, password: Secret) -> Section {
        Section {
            name: name.to_owned(),
            user: Some(user.to_owned()),
            password: Some(password),
            other: Vec::new(),
        }
    }
}

/// A whole service file: its sections in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceFile {
    pub sections: Vec<Section>,
}

impl ServiceFile {
    /// The section named `name`.
    pub fn get(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Points section `name` at `user` with `password`, keeping its other settings; adds
    /// the section when missing.
    pub fn publish(&mut self, name: &str, user: &str, password: Secret) {
        match self.sections.iter_mut().find(|s| s.name == name) {
            Some(section) => {
                section.user = Some(user.to_owned());
                section.password = Some(password);
            }
            None => self.sections.push(Section::login(name, user, password)),
        }
    }
}

/// Parses a service file (see the module comment for the accepted subset).
pub fn parse(text: &str) -> anyhow::Result<ServiceFile> {
    let mut file = ServiceFile::default();
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw.trim_end().trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                bail!(
                    "{}: line {number}: a section header must be `[name]` alone",
                    super::SERVICE_FILE
                );
            };
            check_name(name).map_err(|problem| {
                anyhow::anyhow!(
                    "{}: line {number}: the section name {problem}",
                    super::SERVICE_FILE
                )
            })?;
            if file.get(name).is_some() {
                // libpq stops at the second one and never reads it.
                bail!(
                    "{}: line {number}: section [{name}] appears twice",
                    super::SERVICE_FILE
                );
            }
            file.sections.push(Section {
                name: name.to_owned(),
                user: None,
                password: None,
                other: Vec::new(),
            });
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!(
                "{}: line {number}: expected `key=value` or `[name]`",
                super::SERVICE_FILE
            );
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            // `key = value` would make libpq look up the keyword `key ` and fail.
            bail!(
                "{}: line {number}: the key must be lower-case letters and `_`, directly \
                 followed by `=`",
                super::SERVICE_FILE
            );
        }
        let Some(section) = file.sections.last_mut() else {
            bail!(
                "{}: line {number}: a setting before the first [section]",
                super::SERVICE_FILE
            );
        };
        let repeated = match key {
            "user" => section.user.replace(value.to_owned()).is_some(),
            "password" => section
                .password
                .replace(Secret::new(value.to_owned()))
                .is_some(),
            "service" => bail!(
                "{}: line {number}: `service=` inside a service file is not allowed",
                super::SERVICE_FILE
            ),
            _ if section.other.iter().any(|(k, _)| k == key) => true,
            _ => {
                section.other.push((key.to_owned(), value.to_owned()));
                false
            }
        };
        if repeated {
            // libpq would use the first one; a reader of the file might believe the second.
            bail!(
                "{}: line {number}: `{key}` is set twice in section [{}]",
                super::SERVICE_FILE,
                section.name
            );
        }
    }
    Ok(file)
}

/// Writes the file in the form `parse` reads back identically. Values libpq would read
/// differently (a line end inside, trailing white space, which libpq drops) and lines
/// older clients cannot read are refused, naming the section and key only.
pub fn render(file: &ServiceFile) -> anyhow::Result<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::from(
        "# Written by pg-password-sync: the login each role's applications use now.\n\
         # Use with PGSERVICEFILE=<this file> PGSERVICE=<role>. Replaced atomically.\n",
    ));
    for section in &file.sections {
        check_name(&section.name).map_err(|problem| {
            anyhow::anyhow!("{}: the section name {problem}", super::SERVICE_FILE)
        })?;
        out.push_str(&format!("\n[{}]\n", section.name));
        let user = section.user.as_deref().map(|u| ("user", u));
        let password = section.password.as_ref().map(|p| ("password", p.expose()));
        let other = section.other.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (key, value) in user.into_iter().chain(password).chain(other) {
            if value.contains(['\n', '\r']) || value.ends_with(char::is_whitespace) {
                bail!(
                    "{}: the {key} of section [{}] ends with white space or holds a line end, \
                     which libpq would not read back",
                    super::SERVICE_FILE,
                    section.name
                );
            }
            if key.len() + 1 + value.len() > MAX_LINE_BYTES {
                bail!(
                    "{}: the {key} of section [{}] makes a line longer than {MAX_LINE_BYTES} \
                     bytes, which libpq before PostgreSQL 14 cannot read",
                    super::SERVICE_FILE,
                    section.name
                );
            }
            out.push_str(key);
            out.push('=');
            out.push_str(value);
            out.push('\n');
        }
    }
    Ok(out)
}

/// What is wrong with a section name, if anything.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.contains(['[', ']']) || name.chars().any(char::is_control) {
        return Err("contains `[`, `]` or control characters");
    }
    if name != name.trim() {
        return Err("starts or ends with white space");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_owned())
    }

    #[test]
    fn round_trip_keeps_every_section_and_setting() {
        let mut file = ServiceFile::default();
        file.publish("appuser", "appuser_alt", secret("p=w#1 x"));
        file.sections.push(Section {
            name: "reporting".into(),
            user: None,
            password: None,
            other: vec![
                ("host".into(), "db".into()),
                ("dbname".into(), "app".into()),
            ],
        });
        let text = render(&file).unwrap();
        assert_eq!(parse(&text).unwrap(), file);
        file.publish("appuser", "appuser", secret("new"));
        let again = parse(&render(&file).unwrap()).unwrap();
        assert_eq!(
            again.get("appuser").unwrap().user.as_deref(),
            Some("appuser")
        );
        assert_eq!(
            again
                .get("appuser")
                .unwrap()
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "new"
        );
        assert_eq!(again.get("reporting").unwrap().other.len(), 2);
    }

    #[test]
    fn reads_like_libpq() {
        let file =
            parse("# c\n\n  [a]\r\nuser=x  \npassword= lead\n  # indented comment\n").unwrap();
        let a = file.get("a").unwrap();
        assert_eq!(a.user.as_deref(), Some("x"));
        // libpq keeps the blank after `=` and drops trailing ones.
        assert_eq!(a.password.as_ref().unwrap().expose(), " lead");
    }

    #[test]
    fn refuses_what_libpq_would_read_differently_without_quoting_it() {
        for (text, needle) in [
            ("[a]\n[a]\n", "appears twice"),
            ("[a]\nuser=x\nuser=y\n", "set twice"),
            ("[a]\npassword=s3cret\npassword=other\n", "set twice"),
            ("[a]\nuser = x\n", "directly"),
            ("[a] x\n", "alone"),
            ("user=x\n", "before the first"),
            ("[a]\nhunter2\n", "key=value"),
            ("[a]\nservice=b\n", "not allowed"),
            ("[]\n", "empty"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains("s3cret") && !err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn refuses_values_that_would_not_read_back() {
        for bad in ["trailing ", "line\nend", "cr\r"] {
            let mut file = ServiceFile::default();
            file.publish("a", "a", secret(bad));
            let err = format!("{:#}", render(&file).unwrap_err());
            assert!(!err.contains(bad.trim()), "{err}");
        }
        let mut long = ServiceFile::default();
        long.publish("a", "a", secret(&"x".repeat(MAX_LINE_BYTES)));
        assert!(render(&long).is_err());
        let mut fits = ServiceFile::default();
        fits.publish(
            "a",
            "a",
            secret(&"x".repeat(MAX_LINE_BYTES - "password=".len())),
        );
        assert!(render(&fits).is_ok());
    }
}

//! `pg_service.conf`: the one file that tells applications which login of a role to use now,
//! and with which password.
//!
//! libpq reads it at every new connection (`PGSERVICEFILE` + `PGSERVICE`, or `service=`), so
//! publishing a login is one atomic rename of this file, and no reader can ever see one
//! login with another login's password. Our reading must agree with libpq's exactly, since
//! the sync refuses a set whose published password differs from the password files. libpq's
//! rules (`parseServiceFile`, PostgreSQL 14-18, checked against psql 15): a line is what
//! `fgets` reads into 1024 bytes (256 before 14), measured with `strlen`, and one that
//! fills the buffer is refused as too long; C `isspace` white space (ASCII only in the C
//! and UTF-8 locales) is dropped at both ends; empty lines and lines starting with `#` are
//! ignored; `[name]` opens a section; with LDAP support a line starting with `ldap` is an
//! LDAP URL; `key=value` splits at the first `=` and keeps the value verbatim (leading
//! blanks included); within a section the first setting of a key wins, and a second
//! section of the same name is never read. We accept a strict subset: anything libpq would
//! read differently from how it looks (a NUL byte, which ends a line for libpq, other
//! white space at a line's end, a repeated section or key, `key = value`, text after `]`)
//! is an error here, so that what we check is what applications get. Errors name the line,
//! never its text: a line may hold a password.

use anyhow::bail;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The longest line `render` writes, newline excluded. libpq before PostgreSQL 14 read a
/// line with `fgets` into 256 bytes and refused one of 255 bytes or more, its newline
/// included; staying under it keeps older clients working.
pub const MAX_LINE_BYTES: usize = 253;

/// The longest line `parse` reads, newline excluded: libpq 14-18 read into 1024 bytes and
/// refuse a line of 1023 bytes or more with its newline (psql 15 reads 1021 bytes and a
/// newline, and refuses 1022). A longer line is refused here too, rather than accepted
/// while every application's connection fails on it.
pub const MAX_READ_LINE_BYTES: usize = 1021;

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

/// The connection keywords libpq accepts in a service file besides `user` and `password`
/// (PostgreSQL 14-18, the union: a newer client's keyword is accepted, since the file
/// cannot know which libpq reads it). libpq refuses any other key ("syntax error in
/// service file"), so every application using the section would fail. `service` and
/// `servicefile` are not here: libpq does not nest services (refused by `parse` too).
const LIBPQ_KEYS: [&str; 47] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "target_session_attrs",
    "load_balance_hosts",
    "require_auth",
    "min_protocol_version",
    "max_protocol_version",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
    "scram_client_key",
    "scram_server_key",
    "sslkeylogfile",
];

/// Refuses a key of `section` that libpq does not accept, naming the key (never a value).
pub fn check_keys(section: &Section) -> anyhow::Result<()> {
    for (key, _) in &section.other {
        if !LIBPQ_KEYS.contains(&key.as_str()) {
            bail!(
                "{key:?} is not a connection keyword libpq accepts: every application \
                 using this section would fail to connect"
            );
        }
    }
    Ok(())
}

/// Parses a service file (see the module comment for the accepted subset).
pub fn parse(text: &str) -> anyhow::Result<ServiceFile> {
    let mut file = ServiceFile::default();
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let Some(line) = setting_line(raw, number)? else {
            continue;
        };
        match line.strip_prefix('[') {
            Some(rest) => add_section(&mut file, rest, number)?,
            None => add_setting(&mut file, line, number)?,
        }
    }
    Ok(file)
}

/// A problem on line `number`, named by line, never by its text (it may hold a password).
fn at_line(number: usize, problem: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: line {number}: {problem}", super::SERVICE_FILE)
}

/// The line as libpq reads it, refused where libpq would read it otherwise than it looks;
/// `None` for an empty line or a comment.
fn setting_line(raw: &str, number: usize) -> anyhow::Result<Option<&str>> {
    // libpq measures what `fgets` read with `strlen`: a NUL ends the line there, and in a
    // line longer than its buffer the bytes after the buffer are read as more lines. psql
    // 15 logs in with a `user=` and `password=` hidden after NULs in a `host=` line, while
    // a reader of whole lines sees the settings after it. Refused on every line, comments
    // included: a NUL also hides a line's length from libpq.
    if raw.contains('\0') {
        return Err(at_line(
            number,
            "holds a NUL byte, where libpq would end the line",
        ));
    }
    if raw.len() > MAX_READ_LINE_BYTES {
        return Err(at_line(
            number,
            &format!("longer than {MAX_READ_LINE_BYTES} bytes, which libpq refuses as too long"),
        ));
    }
    let line = raw.trim_matches(is_libpq_space);
    if line.starts_with(char::is_whitespace) || line.ends_with(char::is_whitespace) {
        // libpq keeps it (psql 15 sends a password ending in U+00A0 with it, and reads
        // neither a section nor a key behind one), while a reader of the file does not see
        // it; and another C library's locale may count it as white space.
        return Err(at_line(
            number,
            "starts or ends with non-ASCII white space, which libpq keeps as part of the line",
        ));
    }
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    if line.starts_with("ldap") {
        // libpq built with LDAP (Debian's is) looks such a line up as an LDAP URL that
        // supplies the settings, and reads no further in the section when it answers.
        return Err(at_line(
            number,
            "a line starting with `ldap` is an LDAP lookup for libpq, not a setting",
        ));
    }
    Ok(Some(line))
}

/// `[name]` (its `[` already taken): a new section.
fn add_section(file: &mut ServiceFile, rest: &str, number: usize) -> anyhow::Result<()> {
    let Some(name) = rest.strip_suffix(']') else {
        return Err(at_line(number, "a section header must be `[name]` alone"));
    };
    check_name(name).map_err(|problem| at_line(number, &format!("the section name {problem}")))?;
    if file.get(name).is_some() {
        // libpq stops at the second one and never reads it.
        return Err(at_line(number, &format!("section [{name}] appears twice")));
    }
    file.sections.push(Section {
        name: name.to_owned(),
        user: None,
        password: None,
        other: Vec::new(),
    });
    Ok(())
}

/// `key=value` in the current section.
fn add_setting(file: &mut ServiceFile, line: &str, number: usize) -> anyhow::Result<()> {
    let Some((key, value)) = line.split_once('=') else {
        return Err(at_line(number, "expected `key=value` or `[name]`"));
    };
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        // `key = value` would make libpq look up the keyword `key ` and fail.
        return Err(at_line(
            number,
            "the key must be lower-case letters and `_`, directly followed by `=`",
        ));
    }
    let Some(section) = file.sections.last_mut() else {
        return Err(at_line(number, "a setting before the first [section]"));
    };
    let repeated = match key {
        "user" => section.user.replace(value.to_owned()).is_some(),
        "password" => section
            .password
            .replace(Secret::new(value.to_owned()))
            .is_some(),
        // libpq refuses a nested service; PostgreSQL 19's a nested `servicefile=` too
        // (older ones do not know the keyword).
        "service" | "servicefile" => {
            return Err(at_line(
                number,
                &format!("`{key}=` inside a service file is not allowed"),
            ));
        }
        _ if section.other.iter().any(|(k, _)| k == key) => true,
        _ => {
            section.other.push((key.to_owned(), value.to_owned()));
            false
        }
    };
    if repeated {
        // libpq would use the first one; a reader of the file might believe the second.
        return Err(at_line(
            number,
            &format!("`{key}` is set twice in section [{}]", section.name),
        ));
    }
    Ok(())
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
        if section.name.len() + 2 > MAX_LINE_BYTES {
            bail!(
                "{}: the section name is longer than libpq before PostgreSQL 14 reads",
                super::SERVICE_FILE
            );
        }
        out.push_str(&format!("\n[{}]\n", section.name));
        let user = section.user.as_deref().map(|u| ("user", u));
        let password = section.password.as_ref().map(|p| ("password", p.expose()));
        let other = section.other.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (key, value) in user.into_iter().chain(password).chain(other) {
            // A NUL would end the value for libpq (and `parse` refuses it).
            if value.contains(['\n', '\r', '\0']) || value.ends_with(char::is_whitespace) {
                bail!(
                    "{}: the {key} of section [{}] ends with white space or holds a line end \
                     or a NUL, which libpq would not read back",
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

/// White space as libpq's `isspace` sees it in the C locale, and for these bytes in every
/// glibc UTF-8 locale too (bytes from 0x80 up are never white space there): what libpq
/// drops at both ends of a line. `str::trim` would drop U+00A0 and others as well.
fn is_libpq_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
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

    /// The message of `parse`'s refusal of `text`; never prints the parsed file, whose
    /// other settings could hold a test secret.
    fn refused(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted a file libpq reads differently"),
            Err(err) => format!("{err:#}"),
        }
    }

    /// One line that libpq reads as `first` followed by the lines `hidden`: each piece
    /// ends in a NUL and padding up to 1023 bytes, where libpq 14+'s `fgets` into 1024
    /// bytes stops and the next read resumes; its `strlen` length check never sees the
    /// padding. Measured with psql 15: it logs in with a hidden `user=`/`password=`.
    fn nul_split_line(first: &str, hidden: &[&str]) -> String {
        let mut line = String::new();
        for piece in std::iter::once(&first).chain(hidden.iter().take(hidden.len() - 1)) {
            let start = line.len();
            line.push_str(piece);
            line.push('\0');
            while line.len() - start < 1023 {
                line.push('A');
            }
        }
        line.push_str(hidden[hidden.len() - 1]);
        line
    }

    #[test]
    fn a_nul_byte_is_refused_since_libpq_reads_a_line_only_up_to_it() {
        let split = nul_split_line("host=db", &["user=mallory", "password=s3cret"]);
        for text in [
            // psql 15 logs in as mallory; a reader of whole lines sees host= and then the
            // published login.
            format!("[a]\n{split}\nuser=a\npassword=hunter2\n"),
            // libpq reads `hunter2`; the NUL and what follows are never sent.
            "[a]\nuser=a\npassword=hunter2\0s3cret\n".to_owned(),
            // libpq reads an empty line and skips it.
            "[a]\n\0s3cret\nuser=a\npassword=hunter2\n".to_owned(),
            "# s3cret\0\n[a]\nuser=a\npassword=hunter2\n".to_owned(),
        ] {
            let err = refused(&text);
            assert!(err.contains("NUL"), "{err}");
            assert!(!err.contains("s3cret") && !err.contains("hunter2"), "{err}");
        }
        let err = refused(&format!("[a]\n{split}\nuser=a\n"));
        assert!(err.contains("line 2:"), "{err}");
    }

    #[test]
    fn only_what_libpq_strips_is_stripped_and_other_white_space_at_a_line_end_is_refused() {
        // libpq strips C `isspace` (space, \t, \n, \v, \f, \r) from both ends of a line.
        let file = parse("\x0b[a]\x0c\n\x0c\tuser=a \x0b\r\npassword=\x0bpw\t\n").unwrap();
        let a = file.get("a").unwrap();
        assert_eq!(a.user.as_deref(), Some("a"));
        assert_eq!(a.password.as_ref().unwrap().expose(), "\x0bpw");
        // Non-ASCII white space is not `isspace` for libpq in the C and UTF-8 locales: psql
        // 15 sends `pw\u{a0}`, logs in as `a\u{85}`, and reads neither `\u{3000}[a]` as a
        // section nor `\u{a0}user=` as a key. Read as trimmed, each would look like `a`/`pw`.
        for (text, line) in [
            ("[a]\nuser=a\npassword=s3cret\u{a0}\n", 3),
            ("[a]\nuser=a\u{85}\npassword=s3cret\n", 2),
            ("\u{3000}[a]\nuser=a\npassword=s3cret\n", 1),
            ("[a]\n\u{a0}user=a\npassword=s3cret\n", 2),
            ("[a]\u{2003}\nuser=a\npassword=s3cret\n", 1),
            ("[a]\nuser=a\npassword=s3cret\n\u{a0}# c\n", 4),
        ] {
            let err = refused(text);
            assert!(err.contains(&format!("line {line}:")), "{text:?}: {err}");
            assert!(err.contains("white space"), "{text:?}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn a_line_libpq_refuses_as_too_long_is_refused() {
        // psql 15: a line of 1021 bytes and its newline is read, one of 1022 is "too long".
        let text = |n: usize| format!("[a]\nuser=a\n#{}\n", "x".repeat(n - 1));
        assert!(parse(&text(MAX_READ_LINE_BYTES)).is_ok());
        let err = refused(&text(MAX_READ_LINE_BYTES + 1));
        assert!(err.contains("line 3:") && err.contains("long"), "{err}");
    }

    #[test]
    fn lines_libpq_reads_other_than_as_a_setting_are_refused() {
        for text in [
            // libpq with LDAP support (Debian's) reads a line starting with `ldap` as an
            // LDAP URL to fetch the settings from, not as `key=value`.
            "[a]\nldapserver=x\nuser=a\n",
            // PostgreSQL 19's libpq refuses a nested service file, older ones the keyword.
            "[a]\nservicefile=/other\nuser=a\n",
        ] {
            let err = refused(text);
            assert!(err.contains("line 2:"), "{text:?}: {err}");
        }
    }

    #[test]
    fn render_refuses_a_nul_and_keeps_lines_old_libpq_reads() {
        let mut file = ServiceFile::default();
        file.publish("a", "a", secret("s3cret\0x"));
        // Matched, not unwrapped: an `Ok` would print the rendered password.
        let err = match render(&file) {
            Ok(_) => panic!("rendered a NUL, which libpq would cut the value at"),
            Err(err) => format!("{err:#}"),
        };
        assert!(!err.contains("s3cret"), "{err}");
        // libpq 9.x-13 refuses a line of 255 bytes or more with its newline.
        assert_eq!(MAX_LINE_BYTES, 253);
    }
}

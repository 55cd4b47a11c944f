//! Parser for the user secrets file (`<dir>/user-provided.env`), which holds the OIDC
//! client secrets issued by the identity providers.
//!
//! The replaced script `source`d this file, so any line in it ran as shell code. Here it is
//! parsed as data, accepting what such files contain in practice: comments, blank lines,
//! `export ` prefixes, single quotes (literal), double quotes (with `\"`, `\\`, `\$` and
//! `` \` `` escapes; `$` is never expanded), `=` inside values, trailing ` # comments` and
//! CRLF line ends. A line it cannot read is an error with its line number and never its
//! content, since the line may be a secret.
//!
//! Where the shell would read a value differently, this parser keeps it simple and says so
//! rather than guessing: an unquoted value is taken literally up to a trailing comment, so
//! `a\ b` keeps its backslash, `$'…'` / `$"…"` are not interpreted, quotes inside an
//! unquoted word are kept and `$` is never expanded; each of these draws a warning naming
//! the line (`EnvFile::notes`). Adjacent quoted parts (`'a'"b"`, which the shell joins)
//! are an error. Single-quote a value that holds any of `\ $ ' "` to get it verbatim.

use std::fmt;

use zeroize::Zeroizing;

use crate::secret::Secret;

/// A parsed env file: variables in file order (a later assignment wins on lookup).
#[derive(Debug, Default)]
pub struct EnvFile {
    vars: Vec<(String, Secret)>,
    notes: Vec<(usize, &'static str)>,
}

/// Why a line could not be parsed; displays the line number and the problem only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub problem: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for ParseError {}

impl EnvFile {
    /// The value of `key`, if assigned (the last assignment wins, as in the shell).
    pub fn get(&self, key: &str) -> Option<&Secret> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Lines whose value the shell would read differently: (line number, how).
    pub fn notes(&self) -> &[(usize, &'static str)] {
        &self.notes
    }
}

/// Parses the bytes of an env file.
pub fn parse(bytes: &[u8]) -> Result<EnvFile, ParseError> {
    let mut file = EnvFile::default();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let text = std::str::from_utf8(raw).map_err(|_| ParseError {
            line,
            problem: "is not valid UTF-8",
        })?;
        if let Some((key, mut value, note)) =
            parse_line(text).map_err(|problem| ParseError { line, problem })?
        {
            // Move the String out of its `Zeroizing` wrapper without copying it.
            file.vars
                .push((key, Secret::new(std::mem::take(&mut *value))));
            file.notes.extend(note.map(|note| (line, note)));
        }
    }
    Ok(file)
}

/// One assignment: the name, the value and how the shell would differ, if it would.
type Assignment = (String, Zeroizing<String>, Option<&'static str>);

/// Parses one line (without its `\n`): `None` for blank and comment lines.
fn parse_line(line: &str) -> Result<Option<Assignment>, &'static str> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let text = line.trim_start();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let text = match text.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => text,
    };
    let (key, raw) = text.split_once('=').ok_or("expected KEY=VALUE")?;
    let key = key.trim_end();
    if !is_name(key) {
        return Err("invalid variable name");
    }
    let raw = raw.trim_start();
    let value = parse_value(raw)?;
    let note = if raw.starts_with(['\'', '"']) {
        None
    } else {
        unquoted_note(&value)
    };
    Ok(Some((key.to_owned(), value, note)))
}

/// How the shell would read an unquoted value differently from this parser, if it would.
fn unquoted_note(value: &str) -> Option<&'static str> {
    if value.starts_with("$'") || value.starts_with("$\"") {
        Some("`$'…'` and `$\"…\"` are not interpreted: the value is taken literally")
    } else if value.contains(['\'', '"']) {
        Some("quotes inside an unquoted value are kept (the shell would remove them)")
    } else if value.contains('\\') {
        Some("a backslash in an unquoted value is kept (the shell would drop it)")
    } else if value.contains('$') {
        Some("`$` is not expanded (the shell would expand it)")
    } else {
        None
    }
}

/// Whether `key` is a shell variable name.
fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses the right-hand side of an assignment.
fn parse_value(raw: &str) -> Result<Zeroizing<String>, &'static str> {
    let mut value = Zeroizing::new(String::with_capacity(raw.len()));
    let rest = if let Some(body) = raw.strip_prefix('\'') {
        let end = body.find('\'').ok_or("unterminated single quote")?;
        value.push_str(&body[..end]);
        &body[end + 1..]
    } else if let Some(body) = raw.strip_prefix('"') {
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, e @ ('"' | '\\' | '$' | '`'))) => value.push(e),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => value.push('\\'),
                },
                c => value.push(c),
            }
        }
        &body[end.ok_or("unterminated double quote")?..]
    } else {
        // Unquoted: up to a `#` that starts a word (a trailing comment), trailing blanks off.
        let cut = raw
            .char_indices()
            .find(|&(i, c)| c == '#' && i > 0 && raw[..i].ends_with([' ', '\t']))
            .map_or(raw.len(), |(i, _)| i);
        value.push_str(raw[..cut].trim_end());
        return Ok(value);
    };
    let rest = rest.trim_start();
    if rest.is_empty() || rest.starts_with('#') {
        Ok(value)
    } else {
        Err("unexpected text after the closing quote")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(text: &str, key: &str) -> Option<String> {
        parse(text.as_bytes())
            .unwrap()
            .get(key)
            .map(|s| s.expose().to_owned())
    }

    #[test]
    fn accepts_the_usual_forms() {
        let text = "# OIDC secrets\n\
                    \n\
                    A=plain\n\
                    export B=exported\n\
                    C='single # not a comment $HOME'\n\
                    D=\"double \\\"q\\\" \\\\ \\$HOME $HOME \\n\" # trailing\n\
                    E=with=equals==\n\
                    F=crlf\r\n\
                    \x20\x20G = spaced   # comment\n\
                    H=\n\
                    I=a#b\n\
                    export\tJ='x'\r\n\
                    A=second\n";
        assert_eq!(get(text, "A").as_deref(), Some("second"));
        assert_eq!(get(text, "B").as_deref(), Some("exported"));
        assert_eq!(
            get(text, "C").as_deref(),
            Some("single # not a comment $HOME")
        );
        assert_eq!(
            get(text, "D").as_deref(),
            Some("double \"q\" \\ $HOME $HOME \\n")
        );
        assert_eq!(get(text, "E").as_deref(), Some("with=equals=="));
        assert_eq!(get(text, "F").as_deref(), Some("crlf"));
        assert_eq!(get(text, "G").as_deref(), Some("spaced"));
        assert_eq!(get(text, "H").as_deref(), Some(""));
        assert_eq!(get(text, "I").as_deref(), Some("a#b"));
        assert_eq!(get(text, "J").as_deref(), Some("x"));
        assert_eq!(get(text, "MISSING"), None);
        assert!(parse(b"").unwrap().get("A").is_none());
    }

    #[test]
    fn errors_give_the_line_number_only() {
        let cases: [(&[u8], usize, &str); 7] = [
            (
                b"A=1\nthis is not an assignment-secretvalue\n",
                2,
                "expected KEY=VALUE",
            ),
            (
                b"A=1\r\nB=2\r\nC='secretvalue\r\n",
                3,
                "unterminated single quote",
            ),
            (b"A=\"secretvalue\n", 1, "unterminated double quote"),
            (b"\n\n1A=secretvalue\n", 3, "invalid variable name"),
            (
                b"A='x'secretvalue\n",
                1,
                "unexpected text after the closing quote",
            ),
            (b"exportA B=secretvalue\n", 1, "invalid variable name"),
            (b"A=1\nB=\xffsecretvalue\n", 2, "is not valid UTF-8"),
        ];
        for (text, line, problem) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err, ParseError { line, problem }, "{text:?}");
            assert!(!err.to_string().contains("secretvalue"));
        }
    }

    #[test]
    fn quoting_the_shell_reads_differently_draws_a_note_on_its_line() {
        let text = "A=plain\nB=a\\ b\nC=$'x\\ty'\nD=it's\nE=$HOME\nF='a\\ b'\nG=\"$x\"\n";
        let file = parse(text.as_bytes()).unwrap();
        let lines: Vec<usize> = file.notes().iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [2, 3, 4, 5]);
        // The values are still taken literally.
        assert_eq!(file.get("B").unwrap().expose(), "a\\ b");
        assert_eq!(file.get("C").unwrap().expose(), "$'x\\ty'");
        assert!(file.notes()[1].1.contains("not interpreted"));
        // Adjacent quoted parts, which the shell would join, are refused.
        assert_eq!(
            parse(b"A='a'\"b\"\n").unwrap_err().problem,
            "unexpected text after the closing quote"
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            "[A-Za-z_][A-Za-z0-9_]{0,20}"
        }

        /// A line end: LF or CRLF.
        fn eol() -> impl Strategy<Value = &'static str> {
            prop_oneof![Just("\n"), Just("\r\n")]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any bytes: no panic, and an error names a line of the input and a fixed
            /// phrase, never any of the input's text.
            #[test]
            fn arbitrary_bytes_never_panic_and_errors_name_only_a_line(
                bytes in proptest::collection::vec(any::<u8>(), 0..512)
            ) {
                if let Err(err) = parse(&bytes) {
                    let lines = bytes.split(|&b| b == b'\n').count();
                    prop_assert!((1..=lines).contains(&err.line));
                    prop_assert_eq!(err.to_string(), format!("line {}: {}", err.line, err.problem));
                }
            }

            /// Lines made of shell-ish characters: the same, exercising quotes and escapes.
            #[test]
            fn shellish_text_never_panics(text in "[A-Z_=' \"\\\\$#a-z\t\r\n]{0,200}") {
                if let Err(err) = parse(text.as_bytes()) {
                    prop_assert!(err.line >= 1 && err.line <= text.split('\n').count());
                }
            }

            /// A single-quoted value comes back verbatim, `export` and a trailing comment
            /// or not, with no note.
            #[test]
            fn single_quoted_values_round_trip(
                key in name(),
                value in "[^'\n\r]{0,60}",
                export in any::<bool>(),
                comment in any::<bool>(),
                end in eol(),
            ) {
                let text = format!(
                    "{}{key}='{value}'{}{end}",
                    if export { "export " } else { "" },
                    if comment { "  # note" } else { "" },
                );
                let file = parse(text.as_bytes()).unwrap();
                prop_assert_eq!(file.get(&key).map(Secret::expose), Some(value.as_str()));
                prop_assert!(file.notes().is_empty());
            }

            /// A double-quoted value with `\`, `"`, `$` and a backtick escaped comes back
            /// verbatim.
            #[test]
            fn double_quoted_values_round_trip(
                key in name(),
                value in "[^\n\r]{0,60}",
                end in eol(),
            ) {
                let mut quoted = String::new();
                for c in value.chars() {
                    if matches!(c, '\\' | '"' | '$' | '`') {
                        quoted.push('\\');
                    }
                    quoted.push(c);
                }
                let file = parse(format!("{key}=\"{quoted}\"{end}").as_bytes()).unwrap();
                prop_assert_eq!(file.get(&key).map(Secret::expose), Some(value.as_str()));
            }

            /// A plain unquoted word comes back verbatim, with no note.
            #[test]
            fn plain_unquoted_values_round_trip(
                key in name(),
                value in "[A-Za-z0-9_.:/+=@%,~-]{0,40}",
                end in eol(),
            ) {
                let file = parse(format!("{key}={value}{end}").as_bytes()).unwrap();
                prop_assert_eq!(file.get(&key).map(Secret::expose), Some(value.as_str()));
                prop_assert!(file.notes().is_empty());
            }

            /// In a file of many assignments, the last one of each name wins.
            #[test]
            fn the_last_assignment_wins(
                assignments in proptest::collection::vec(
                    (prop_oneof![Just("A"), Just("B"), Just("C")], "[^'\n\r]{0,20}"),
                    1..20,
                ),
            ) {
                let text: String = assignments
                    .iter()
                    .map(|(key, value)| format!("{key}='{value}'\n# comment\n\n"))
                    .collect();
                let file = parse(text.as_bytes()).unwrap();
                for key in ["A", "B", "C"] {
                    let last = assignments.iter().rev().find(|(k, _)| *k == key);
                    prop_assert_eq!(
                        file.get(key).map(Secret::expose),
                        last.map(|(_, v)| v.as_str())
                    );
                }
            }
        }
    }
}

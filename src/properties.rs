//! Property tests over the parsers that read outside input: secret file values,
//! `postmaster.pid` (and `/proc/<pid>/stat`), `--role` specs and role names, and durations.
//!
//! Each of these reads text someone else wrote (a mounted secret, the server, a process that
//! chose its own name, an operator's environment), so example tests alone are not enough:
//! these generate many inputs, including arbitrary bytes, and check what must hold for every
//! one of them: no panic, no secret in an error, control characters never printed raw, and
//! values that survive a round trip through the format the outside writes. The env file's own
//! properties live beside its parser (`keyfiles/envfile.rs`). Case counts are kept modest
//! (256–512 per property) so the unit tests stay fast.

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;

use crate::config::parse_duration;
use crate::config::{MAX_ROLE_BYTES, SecretRef, check_role_name, parse_role_spec};
use crate::postmaster::{self, Kin, PidFile, PmStatus, PostmasterRule, Readiness};
use crate::secret::{self, MAX_SECRET_BYTES};
use crate::session::locks::Blockers;

/// The longest accepted duration (a year), as `parse_duration` documents it.
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Every window of `n` characters of `text`.
fn windows(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.windows(n).map(|w| w.iter().collect()).collect()
}

/// The first window of four or more characters of `value` (raw, or as `{:?}` would escape
/// it) that appears in `message`: a leak of the value, or of part of it.
fn leaked_part(value: &[u8], message: &str) -> Option<String> {
    let raw = String::from_utf8_lossy(value).into_owned();
    let escaped = format!("{raw:?}");
    let escaped = &escaped[1..escaped.len() - 1];
    windows(&raw, 4)
        .into_iter()
        .chain(windows(escaped, 4))
        .find(|w| message.contains(w.as_str()))
}

/// A character that must never reach a log line raw: a control character (newline, tab,
/// escape, C1 controls) or a Unicode line or paragraph separator.
fn breaks_a_log_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

// ---- secret file values ---------------------------------------------------------------

/// What is done to a good value to make it a bad file (or not).
#[derive(Debug, Clone)]
enum Fault {
    None,
    Nul(usize),
    InvalidUtf8(usize),
    OnlyWhitespace(String),
    Oversize,
    Empty,
}

/// The body of a value. Its alphabet (upper-case letters, punctuation, non-ASCII) shares no
/// run of four characters with the parser's fixed messages (lower-case words, `NUL`, `UTF-8`,
/// `4096`), so any window of it found in an error is a leak, not a coincidence.
fn body() -> impl Strategy<Value = String> {
    "[A-Z!#%&*+,./:;<=>?@^_|~éß€漢😀]{4,40}"
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => Just(Fault::None),
        1 => any::<usize>().prop_map(Fault::Nul),
        1 => any::<usize>().prop_map(Fault::InvalidUtf8),
        1 => "[ \t\u{a0}\u{2003}\u{3000}]{1,8}".prop_map(Fault::OnlyWhitespace),
        1 => Just(Fault::Oversize),
        1 => Just(Fault::Empty),
    ]
}

/// Trailing line ends as editors, `echo` and Windows tools leave them.
fn line_ends() -> impl Strategy<Value = String> {
    "[\r\n]{0,4}"
}

/// The file's bytes for `body` with `fault` applied, then `ends` appended.
fn faulty_file(body: &str, fault: &Fault, ends: &str) -> Vec<u8> {
    let mut bytes = body.as_bytes().to_vec();
    match fault {
        Fault::None => {}
        Fault::Nul(at) => bytes.insert(at % (bytes.len() + 1), 0),
        // 0xFF never occurs in UTF-8, wherever it lands.
        Fault::InvalidUtf8(at) => bytes.insert(at % (bytes.len() + 1), 0xff),
        Fault::OnlyWhitespace(space) => bytes = space.as_bytes().to_vec(),
        Fault::Oversize => {
            while bytes.len() <= MAX_SECRET_BYTES {
                bytes.extend_from_slice(body.as_bytes());
            }
        }
        Fault::Empty => bytes.clear(),
    }
    bytes.extend_from_slice(ends.as_bytes());
    bytes
}

/// A value a secret file can hold: no NUL, not only whitespace, no trailing line end.
/// Sometimes long, to reach the size limit from both sides.
fn storable_value() -> impl Strategy<Value = String> {
    let short = "[^\0]{1,64}".boxed();
    let long = ("[^\0]{1,8}", 500usize..1100)
        .prop_map(|(unit, times)| unit.repeat(times))
        .boxed();
    prop_oneof![3 => short, 1 => long]
        .prop_map(|value| value.trim_end_matches(['\r', '\n']).to_owned())
        .prop_filter("a storable value", |value| {
            !value.is_empty() && !value.chars().all(char::is_whitespace)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes at all: no panic; an accepted value is exactly the input minus trailing
    /// line ends and obeys every rule; a refusal is a fixed text.
    #[test]
    fn secret_parse_of_arbitrary_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec(any::<u8>(), 4000..4200),
        ]
    ) {
        match secret::parse(bytes.clone()) {
            Ok(secret) => {
                let mut expected = bytes.as_slice();
                while let [rest @ .., b'\r' | b'\n'] = expected {
                    expected = rest;
                }
                prop_assert_eq!(secret.expose().as_bytes(), expected);
                prop_assert!(bytes.len() <= MAX_SECRET_BYTES);
                prop_assert!(!secret.expose().is_empty());
                prop_assert!(!secret.expose().contains('\0'));
                prop_assert!(!secret.expose().chars().all(char::is_whitespace));
            }
            Err(err) => {
                // Each refusal is one of the parser's fixed texts, word for word, so it
                // quotes nothing of the input. (Looking for pieces of random input in the
                // message instead would find a chance "than" in 4 KB of random bytes.)
                let message = format!("{err:#}");
                let too_big = format!("is larger than {MAX_SECRET_BYTES} bytes");
                let fixed = [
                    "is empty",
                    "contains a NUL byte",
                    "is not valid UTF-8",
                    "contains only whitespace",
                    too_big.as_str(),
                ];
                prop_assert!(fixed.contains(&message.as_str()), "{:?}", message);
            }
        }
    }

    /// Every kind of bad file (NUL, invalid UTF-8, only whitespace, too big, empty) is
    /// refused with a one-line message that holds no four characters of the value, raw or
    /// escaped; the same body without the fault is accepted exactly.
    #[test]
    fn secret_errors_never_quote_the_value(
        body in body(),
        fault in fault(),
        ends in line_ends(),
    ) {
        let bytes = faulty_file(&body, &fault, &ends);
        match (secret::parse(bytes.clone()), &fault) {
            (Ok(secret), Fault::None) => prop_assert_eq!(secret.expose(), body.as_str()),
            (Ok(_), fault) => prop_assert!(false, "{:?} was accepted", fault),
            (Err(err), Fault::None) => prop_assert!(false, "a good value was refused: {:#}", err),
            (Err(err), _) => {
                let message = format!("{err:#}");
                let leak = leaked_part(&bytes, &message);
                prop_assert!(leak.is_none(), "{:?} leaks {:?}", message, leak);
                prop_assert!(!message.chars().any(breaks_a_log_line), "{:?}", message);
            }
        }
    }

    /// A value written with any mix of trailing `\r`/`\n` reads back exactly, or, when
    /// the file is over the size limit, is refused for its size and nothing else.
    #[test]
    fn secret_values_round_trip_through_line_ends(
        value in storable_value(),
        ends in line_ends(),
    ) {
        let file = format!("{value}{ends}").into_bytes();
        let fits = file.len() <= MAX_SECRET_BYTES;
        match secret::parse(file) {
            Ok(secret) => {
                prop_assert!(fits);
                prop_assert_eq!(secret.expose(), value.as_str());
            }
            Err(err) => {
                prop_assert!(!fits, "refused: {:#}", err);
                prop_assert_eq!(format!("{err:#}"), format!("is larger than {MAX_SECRET_BYTES} bytes"));
            }
        }
    }
}

proptest! {
    // Each case writes a real file: fewer of them.
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The same round trip through a real file and `read_file`, which adds only the file's
    /// name to a refusal.
    #[test]
    fn secret_files_round_trip(
        value in storable_value(),
        ends in line_ends(),
        fault in fault(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let good = matches!(fault, Fault::None);
        let bytes = if good {
            format!("{value}{ends}").into_bytes()
        } else {
            faulty_file(&value, &fault, &ends)
        };
        std::fs::write(&path, &bytes).unwrap();
        match secret::read_file(&path) {
            Ok(secret) => {
                prop_assert!(good && bytes.len() <= MAX_SECRET_BYTES, "{:?} was accepted", fault);
                prop_assert_eq!(secret.expose(), value.as_str());
            }
            Err(err) => {
                let message = format!("{err:#}");
                prop_assert!(!good || bytes.len() > MAX_SECRET_BYTES, "refused: {}", message);
                prop_assert!(message.contains(&*path.to_string_lossy()), "{}", message);
            }
        }
    }
}

// ---- postmaster.pid and /proc/<pid>/stat ------------------------------------------------

/// The fields the server writes, as generated.
#[derive(Debug, Clone)]
struct PidFields {
    pid: i32,
    data_dir: String,
    start: u64,
    /// `None` is written as an empty line or as garbage.
    port: Option<u16>,
    port_garbage: String,
    socket_dir: Option<String>,
    listen: String,
    shmem: String,
    /// `None`: an old server that writes seven lines.
    status: Option<PmStatus>,
    padding: usize,
}

/// A line's text with no whitespace at either end (the parser trims each line), and no
/// newline (which would make it two lines).
fn trimmed_line() -> impl Strategy<Value = String> {
    "(\\S([^\n]{0,30}\\S)?)?"
}

fn status() -> impl Strategy<Value = PmStatus> {
    prop_oneof![
        Just(PmStatus::Starting),
        Just(PmStatus::Stopping),
        Just(PmStatus::Ready),
        Just(PmStatus::Standby),
        "[a-z][a-z ]{0,10}[a-z]"
            .prop_filter("not a known status", |s| {
                !matches!(s.as_str(), "starting" | "stopping" | "ready" | "standby")
            })
            .prop_map(PmStatus::Other),
    ]
}

fn pid_fields() -> impl Strategy<Value = PidFields> {
    (
        (1..=i32::MAX, trimmed_line(), any::<u64>()),
        (
            proptest::option::of(any::<u16>()),
            "([a-z]{1,5})?",
            proptest::option::of(trimmed_line().prop_map(|d| format!("/{d}"))),
        ),
        (
            "(\\*|[0-9.:]{1,20})?",
            "[0-9 ]{0,25}",
            proptest::option::of(status()),
            0usize..4,
        ),
    )
        .prop_map(
            |(
                (pid, data_dir, start),
                (port, port_garbage, socket_dir),
                (listen, shmem, status, padding),
            )| {
                PidFields {
                    pid,
                    data_dir,
                    start,
                    port,
                    port_garbage,
                    socket_dir,
                    listen,
                    shmem,
                    status,
                    padding,
                }
            },
        )
}

/// The file as the server writes it (status padded with spaces, every line ended).
fn render(fields: &PidFields) -> String {
    let port = fields
        .port
        .map_or_else(|| fields.port_garbage.clone(), |p| p.to_string());
    let mut text = format!(
        "{}\n{}\n{}\n{port}\n{}\n{}\n{}\n",
        fields.pid,
        fields.data_dir,
        fields.start,
        fields.socket_dir.as_deref().unwrap_or(""),
        fields.listen,
        fields.shmem,
    );
    if let Some(status) = &fields.status {
        let word = match status {
            PmStatus::Starting => "starting",
            PmStatus::Stopping => "stopping",
            PmStatus::Ready => "ready",
            PmStatus::Standby => "standby",
            PmStatus::Other(other) => other,
        };
        text.push_str(&format!("{word}{}\n", " ".repeat(fields.padding)));
    }
    text
}

fn expected(fields: &PidFields) -> PidFile {
    PidFile {
        pid: fields.pid,
        port: fields.port,
        socket_dir: fields.socket_dir.as_ref().map(PathBuf::from),
        listen: Some(fields.listen.clone()).filter(|l| !l.is_empty()),
        status: fields.status.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any text: no panic, and whatever is accepted names a positive pid, and a status only
    /// once the file has a finished eighth line.
    #[test]
    fn pid_file_parse_of_arbitrary_text(
        text in prop_oneof![
            any::<String>(),
            "[-0-9a-z /.*\n\r\t]{0,120}",
        ]
    ) {
        if let Some(file) = postmaster::parse(&text) {
            prop_assert!(file.pid > 0);
            if file.status.is_some() {
                prop_assert!(text.matches('\n').count() >= 8);
            }
        }
    }

    /// A file rendered from generated fields parses back to the same pid, port, socket
    /// directory and status.
    #[test]
    fn pid_file_round_trips(fields in pid_fields()) {
        let text = render(&fields);
        prop_assert_eq!(postmaster::parse(&text), Some(expected(&fields)));
    }

    /// A file read while the server is still writing it (any prefix) never yields a wrong
    /// status, and is never "ready" for our child unless the whole file says so.
    #[test]
    fn a_partial_pid_file_is_never_wrongly_ready(fields in pid_fields()) {
        let text = render(&fields);
        let full = expected(&fields);
        for cut in (0..=text.len()).filter(|&cut| text.is_char_boundary(cut)) {
            let Some(file) = postmaster::parse(&text[..cut]) else {
                continue;
            };
            if file.status.is_some() {
                prop_assert_eq!(&file, &full, "prefix {:?}", &text[..cut]);
            }
            for kin in [Kin::Cmd, Kin::Descendant] {
                let verdict = postmaster::check(Some(&file), fields.pid, kin, PostmasterRule::default());
                if let Readiness::Ready(ready, _) = verdict {
                    prop_assert_eq!(&ready, &full);
                    prop_assert!(full.status.as_ref().is_some_and(PmStatus::accepts_connections));
                }
            }
        }
    }

    /// `/proc/<pid>/stat` with any process name (a process chooses its own, `)` and
    /// spaces included): the state letter is still the one after the name.
    #[test]
    fn proc_state_survives_any_process_name(
        pid in 1..=i32::MAX,
        comm in "[^\0]{0,16}",
        state in proptest::sample::select(vec!['R', 'S', 'D', 'Z', 'T', 't', 'X', 'I']),
        rest in "( [0-9-]{1,10}){0,20}",
    ) {
        let stat = format!("{pid} ({comm}) {state}{rest}\n");
        prop_assert_eq!(postmaster::proc_state(&stat), Some(state));
    }

    /// Arbitrary `/proc/<pid>/stat` text: no panic.
    #[test]
    fn proc_state_of_arbitrary_text(text in any::<String>()) {
        let _ = postmaster::proc_state(&text);
    }
}

// ---- --role specs and role names ---------------------------------------------------------

/// Specs rich in the characters that matter: `=`, `/`, control characters (C0, DEL, C1),
/// line separators and multi-byte characters.
fn tricky_spec() -> impl Strategy<Value = String> {
    "[a-z=/\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\u{2028}\u{2029} é漢😀]{0,80}"
}

/// A role name the server would keep as given: no `=` (it ends the name in a spec), no
/// control character, at most 63 bytes.
fn good_role_name() -> impl Strategy<Value = String> {
    "[^=\\p{Cc}]{1,40}".prop_filter("at most 63 bytes", |name| name.len() <= MAX_ROLE_BYTES)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any spec: no panic; an accepted spec splits at its first `=` into a non-empty name
    /// and file; a refusal prints no control character raw. Whatever name passes the role
    /// name check has 1 to 63 bytes and no control character.
    #[test]
    fn role_specs_of_arbitrary_text(spec in prop_oneof![any::<String>(), tricky_spec()]) {
        match parse_role_spec(&spec) {
            Ok(role) => {
                let file = match &role.secret {
                    SecretRef::Name(name) => {
                        prop_assert!(!name.contains('/'));
                        name.clone()
                    }
                    SecretRef::Path(path) => {
                        let path = path.to_str().unwrap().to_owned();
                        prop_assert!(path.contains('/'));
                        path
                    }
                };
                prop_assert!(!role.name.is_empty() && !file.is_empty());
                prop_assert!(!role.name.contains('='));
                prop_assert_eq!(format!("{}={file}", role.name), spec.clone());
                match check_role_name(&role.name) {
                    Ok(()) => {
                        prop_assert!(role.name.len() <= MAX_ROLE_BYTES);
                        prop_assert!(!role.name.chars().any(char::is_control));
                    }
                    Err(err) => {
                        let message = format!("{err:#}");
                        prop_assert!(!message.chars().any(breaks_a_log_line), "{:?}", message);
                    }
                }
            }
            Err(err) => {
                let message = format!("{err:#}");
                prop_assert!(!message.chars().any(breaks_a_log_line), "{:?}", message);
            }
        }
    }

    /// Any role name: accepted only with 1 to 63 bytes and no control character; refused
    /// with a message that prints no control character raw and says which rule it broke.
    #[test]
    fn role_names_of_arbitrary_text(name in prop_oneof![any::<String>(), tricky_spec()]) {
        match check_role_name(&name) {
            Ok(()) => {
                prop_assert!(!name.is_empty() && name.len() <= MAX_ROLE_BYTES);
                prop_assert!(!name.chars().any(char::is_control));
            }
            Err(err) => {
                let message = format!("{err:#}");
                prop_assert!(!message.chars().any(breaks_a_log_line), "{:?}", message);
                if name.chars().any(char::is_control) {
                    prop_assert!(
                        message.contains("control character") || message.contains("NUL"),
                        "{}", message
                    );
                }
            }
        }
    }

    /// A good name and any file round-trip through a spec: a file with a `/` is a path,
    /// one without is a name to look up.
    #[test]
    fn role_specs_round_trip(name in good_role_name(), file in "[^\0]{1,60}") {
        let role = parse_role_spec(&format!("{name}={file}")).unwrap();
        prop_assert_eq!(&role.name, &name);
        let expected = if file.contains('/') {
            SecretRef::Path(PathBuf::from(&file))
        } else {
            SecretRef::Name(file.clone())
        };
        prop_assert_eq!(role.secret, expected);
        prop_assert!(check_role_name(&name).is_ok());
    }
}

// ---- durations ---------------------------------------------------------------------------

fn unit() -> impl Strategy<Value = (&'static str, u64)> {
    proptest::sample::select(vec![
        ("ms", 1),
        ("s", 1_000),
        ("", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
    ])
}

/// Small numbers, any number, and numbers at the one-year limit in every unit.
fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..10_000,
        any::<u64>(),
        (0u64..5).prop_map(|d| 365 * 24 + d - 2),
        (0u64..5).prop_map(|d| 365 * 24 * 60 + d - 2),
        (0u64..5).prop_map(|d| 365 * 24 * 3_600 + d - 2),
        (0u64..5).prop_map(|d| 365 * 24 * 3_600_000 + d - 2),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `<n><unit>` (with spaces around) is `n` of that unit when at most a year, and
    /// refused when longer, overflow included.
    #[test]
    fn durations_round_trip(
        n in amount(),
        (unit, millis) in unit(),
        before in "[ \t]{0,2}",
        after in "[ \t]{0,2}",
    ) {
        let text = format!("{before}{n}{unit}{after}");
        let parsed = parse_duration(&text);
        match n.checked_mul(millis).map(Duration::from_millis).filter(|d| *d <= YEAR) {
            Some(expected) => prop_assert_eq!(parsed, Ok(expected)),
            None => prop_assert!(parsed.is_err(), "{:?} gave {:?}", text, parsed),
        }
    }

    /// Any text: no panic, never more than a year, and `--terminate-blockers-after`
    /// (which adds `off` and friends) never gives a zero or over-long limit.
    #[test]
    fn durations_of_arbitrary_text(
        text in prop_oneof![
            any::<String>(),
            "[ 0-9msh+\\-.\u{660}-\u{669}\u{ff10}-\u{ff19}µ]{0,12}",
        ]
    ) {
        if let Ok(duration) = parse_duration(&text) {
            prop_assert!(duration <= YEAR);
        }
        if let Ok(Some(limit)) = Blockers::parse_terminate_after(&text) {
            prop_assert!(!limit.is_zero() && limit <= YEAR);
        }
    }
}

//! A command on a pseudo-terminal: run by util-linux `script` inside a shell that then
//! prints the command's exit status and `stty -a`, so a test can type at prompts, see what
//! was echoed, and check that the terminal was left with echo on.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// Printed by the shell after the command, followed by its exit status.
const EXIT_MARKER: &str = "command-exit=";

/// A terminal session.
pub struct Terminal {
    child: Child,
    input: ChildStdin,
    chunks: Receiver<Vec<u8>>,
    transcript: String,
    seen: usize,
    command: String,
}

/// What a finished session showed.
pub struct Session {
    /// The command's exit status.
    pub code: i32,
    /// Everything the terminal showed.
    pub transcript: String,
}

/// Whether the `stty -a` of a session's `transcript`, run after the command, shows echo
/// on (`echo`, not `-echo`).
pub fn echo_is_on(transcript: &str) -> bool {
    let stty = transcript.split(EXIT_MARKER).nth(1).unwrap_or_default();
    stty.split(|c: char| c.is_whitespace() || c == ';')
        .any(|word| word == "echo")
}

impl Terminal {
    /// Starts `cmd` (its program, arguments and the variables it sets; a terminal session
    /// starts from an empty environment plus PATH) on a terminal. `None` (the test is
    /// skipped) when `script` is not installed.
    pub fn start(cmd: &Command) -> Option<Terminal> {
        let words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        // The line goes through a shell unquoted: the words must be plain.
        let plain =
            |s: &str| !s.contains(|c: char| c.is_whitespace() || "'\"\\$`;&|<>()".contains(c));
        assert!(words.iter().all(|w| plain(w)), "not plain words: {words:?}");
        let line = format!(
            // `trap`: a Ctrl-C reaches the shell too; it must live on to report.
            "trap : INT; {}; echo \"{EXIT_MARKER}$?\"; stty -a",
            words.join(" ")
        );
        let mut script = Command::new("script");
        script
            .args(["-qec", &line, "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => script.env(key, value),
                None => script.env_remove(key),
            };
        }
        script
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match script.spawn() {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                super::skip("util-linux `script` is not installed");
                return None;
            }
            Err(err) => panic!("spawning script: {err}"),
        };
        let input = child.stdin.take().unwrap();
        let mut output = child.stdout.take().unwrap();
        let (tx, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Some(Terminal {
            child,
            input,
            chunks,
            transcript: String::new(),
            seen: 0,
            command: words.join(" "),
        })
    }

    /// Waits until `text` appears after what was already consumed, then consumes it.
    #[track_caller]
    pub fn expect(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(at) = self.transcript[self.seen..].find(text) {
                self.seen += at + text.len();
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.transcript.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!(
                    "waiting for {text:?} on the terminal\ncommand: {}\ntranscript:\n{}",
                    self.command, self.transcript
                ),
            }
        }
    }

    /// Types a line.
    pub fn type_line(&mut self, text: &str) {
        self.type_raw(format!("{text}\n").as_bytes());
    }

    /// Types bytes as they are (control characters included), without a line end.
    pub fn type_raw(&mut self, bytes: &[u8]) {
        self.input.write_all(bytes).unwrap();
        self.input.flush().unwrap();
    }

    /// Waits for the end of the session (bounded).
    #[track_caller]
    pub fn finish(mut self) -> Session {
        self.expect(EXIT_MARKER);
        let code_at = self.seen;
        // Read to the end of the session (the reader thread ends at EOF).
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Ok(chunk) = self
            .chunks
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.transcript.push_str(&String::from_utf8_lossy(&chunk));
        }
        drop(self.input);
        let status = self.child.wait().unwrap();
        let code: i32 = self.transcript[code_at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no exit code in:\n{}", self.transcript));
        assert!(
            status.success(),
            "script failed: {status}\n{}",
            self.transcript
        );
        Session {
            code,
            transcript: self.transcript,
        }
    }
}

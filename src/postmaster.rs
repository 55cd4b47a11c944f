//! `postmaster.pid`: the pure parser, liveness checks of the pid it names, and the
//! readiness wait of `run`.
//!
//! The file is the one place where the server itself says which process is the postmaster,
//! where its socket is and whether it accepts connections (line 8, `PM_STATUS`). Reading it
//! is what lets `run` tell the entrypoint's temporary init server (a different pid) from the
//! final server (the pid of our child, because the entrypoint `exec`s into postgres), and
//! what lets `health` and the exit path check a postmaster without connecting. Parsing is a
//! pure function so every shape of the file (partially written, old versions, standby) is
//! unit-tested without a server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// The file name inside the data directory.
pub const PID_FILE: &str = "postmaster.pid";

/// How often the readiness wait re-reads `postmaster.pid`: the first sync should follow
/// readiness within about 10 ms, and one small read is cheap.
pub const POLL: Duration = Duration::from_millis(10);

/// How often the readiness wait says it is still waiting.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// `PM_STATUS` (line 8) as the server writes it (padded with spaces; we trim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PmStatus {
    Starting,
    Stopping,
    Ready,
    Standby,
    /// Any other text (a future server version); never treated as ready.
    Other(String),
}

impl PmStatus {
    fn parse(text: &str) -> PmStatus {
        match text.trim() {
            "starting" => PmStatus::Starting,
            "stopping" => PmStatus::Stopping,
            "ready" => PmStatus::Ready,
            "standby" => PmStatus::Standby,
            other => PmStatus::Other(other.to_owned()),
        }
    }

    /// Up: `ready` (a primary, or a hot standby: the server writes `ready` for both) or
    /// `standby` (in recovery and not accepting connections, as a warm standby; a sync then
    /// fails to connect and is retried).
    pub fn accepts_connections(&self) -> bool {
        matches!(self, PmStatus::Ready | PmStatus::Standby)
    }
}

/// The fields of `postmaster.pid` we use. Lines (PostgreSQL 10+): 1 pid, 2 data dir,
/// 3 start time, 4 port, 5 first socket directory, 6 first listen address, 7 shared
/// memory key, 8 status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFile {
    pub pid: i32,
    pub port: Option<u16>,
    /// Empty in the file when the server has no Unix socket.
    pub socket_dir: Option<PathBuf>,
    /// `None` while the server has not written line 8 yet (or an old server never does).
    pub status: Option<PmStatus>,
}

/// Parses the file's text. `None` when line 1 is not a positive pid: the file is being
/// written (the server writes it in steps) or is not a postmaster.pid at all.
pub fn parse(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.split('\n').collect();
    let pid: i32 = lines.first()?.trim().parse().ok()?;
    // A standalone backend writes its pid negated; it accepts no connections.
    if pid <= 0 {
        return None;
    }
    let line = |n: usize| lines.get(n - 1).map(|l| l.trim());
    let port = line(4).and_then(|l| l.parse().ok());
    let socket_dir = line(5).filter(|l| !l.is_empty()).map(PathBuf::from);
    // A line without its terminating newline may still be growing: only trust line 8
    // once the server finished it.
    let status = if lines.len() > 8 {
        line(8).map(PmStatus::parse)
    } else {
        None
    };
    Some(PidFile {
        pid,
        port,
        socket_dir,
        status,
    })
}

/// The file that keeps a server in standby mode (PostgreSQL 12 and later). The server
/// removes it when it is promoted.
pub const STANDBY_SIGNAL: &str = "standby.signal";

/// Whether the data directory says its server is a standby: `standby.signal` is there, or
/// the status line is `standby`. The status line alone cannot tell: a hot standby that
/// accepts connections writes `ready`, exactly like a primary. One `stat`, no connection.
pub fn is_standby(pgdata: &Path, file: Option<&PidFile>) -> bool {
    file.is_some_and(|f| f.status == Some(PmStatus::Standby))
        || pgdata.join(STANDBY_SIGNAL).exists()
}

/// Reads and parses `<pgdata>/postmaster.pid`; `None` when absent, unreadable or partial.
pub fn read(pgdata: &Path) -> Option<PidFile> {
    read_text(&pgdata.join(PID_FILE))
        .ok()
        .as_deref()
        .and_then(parse)
}

/// Reads the file without ever blocking (`fileio`): the data directory belongs to the
/// server's OS user, and a FIFO put there must not freeze `run`.
fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = crate::fileio::dirfd::read_followed_file(path, 64 * 1024)?;
    Ok(String::from_utf8(bytes.to_vec())?)
}

/// Whether `pid` names a live (not zombie) process. `kill(pid, 0)` says whether the pid
/// exists (EPERM still means it exists); `/proc/<pid>/stat` tells a zombie apart, because a
/// zombie answers `kill` until its parent reaps it.
pub fn is_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(_) => return false,
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => proc_state(&stat) != Some('Z'),
        Err(_) => true,
    }
}

/// The state letter of a `/proc/<pid>/stat` line (the field after the `)` that ends comm).
pub fn proc_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Whether `pid` looks like a PostgreSQL server process, so a stale `postmaster.pid` whose
/// pid was reused by something else is never signalled. Without `/proc`, trust the file.
pub fn is_postgres(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => matches!(comm.trim(), "postgres" | "postmaster"),
        Err(_) => true,
    }
}

/// What the readiness wait found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Our child is the postmaster and it accepts connections.
    Ready(PidFile),
    /// Not yet, with a short description for the progress line.
    Waiting(String),
}

/// One readiness check of a parsed file against the pid of our child (pure).
pub fn check(file: Option<&PidFile>, child: i32) -> Readiness {
    let Some(file) = file else {
        return Readiness::Waiting("no postmaster.pid yet".into());
    };
    if file.pid != child {
        return Readiness::Waiting(format!(
            "postmaster.pid names pid {} (a temporary init server?), not our child {child}",
            file.pid
        ));
    }
    match &file.status {
        Some(status) if status.accepts_connections() => Readiness::Ready(file.clone()),
        Some(status) => Readiness::Waiting(format!("postmaster status is {status:?}")),
        None => Readiness::Waiting("postmaster has not reported its status yet".into()),
    }
}

/// Waits until the final server (pid `child`) says it accepts connections. No give-up
/// timer: crash recovery can take minutes, and the caller drops this future when the child
/// exits. Polls every 10 ms (cheap: one small read) and logs progress every 10 s.
pub async fn wait_ready(pgdata: &Path, child: i32) -> PidFile {
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_state = String::new();
    tracing::info!(pgdata = %pgdata.display(), "waiting for PostgreSQL to be ready");
    let path = pgdata.join(PID_FILE);
    loop {
        let verdict = match read_text(&path) {
            Ok(text) => check(parse(&text).as_ref(), child),
            Err(err) if err.downcast_ref::<Errno>() == Some(&Errno::ENOENT) => check(None, child),
            // Not found is normal before the first start; anything else (permissions) would
            // otherwise wait forever in silence.
            Err(err) => Readiness::Waiting(format!("cannot read {}: {err:#}", path.display())),
        };
        match verdict {
            Readiness::Ready(file) => {
                tracing::info!(
                    pid = file.pid,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "PostgreSQL is ready"
                );
                return file;
            }
            Readiness::Waiting(state) => {
                if state != last_state {
                    tracing::debug!(%state, "readiness");
                    last_state = state;
                }
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    tracing::info!(
                        waited_s = started.elapsed().as_secs(),
                        state = %last_state,
                        "still waiting for PostgreSQL to be ready"
                    );
                    last_progress = Instant::now();
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str = "4242\n/var/lib/postgresql/data\n1700000000\n5432\n/var/run/postgresql\n*\n  5432001    32768\nready   \n";

    #[test]
    fn parses_a_ready_file() {
        let file = parse(READY).unwrap();
        assert_eq!(file.pid, 4242);
        assert_eq!(file.port, Some(5432));
        assert_eq!(file.socket_dir, Some(PathBuf::from("/var/run/postgresql")));
        assert_eq!(file.status, Some(PmStatus::Ready));
        assert_eq!(check(Some(&file), 4242), Readiness::Ready(file.clone()));
    }

    #[test]
    fn statuses() {
        for (text, status) in [
            ("starting", PmStatus::Starting),
            ("stopping", PmStatus::Stopping),
            ("standby ", PmStatus::Standby),
            ("ready   ", PmStatus::Ready),
            ("weird", PmStatus::Other("weird".into())),
        ] {
            let file = parse(&READY.replace("ready   ", text)).unwrap();
            assert_eq!(file.status, Some(status));
        }
        assert!(PmStatus::Standby.accepts_connections());
        assert!(!PmStatus::Starting.accepts_connections());
    }

    #[test]
    fn partial_and_foreign_files() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("\n"), None);
        assert_eq!(parse("abc\n"), None);
        assert_eq!(parse("-4242\n/data\n"), None, "standalone backend");
        let partial = parse("4242\n/data\n1700000000\n5432\n").unwrap();
        assert_eq!(partial.status, None);
        assert_eq!(partial.socket_dir, None);
        // Line 8 without its newline may still be growing.
        let growing = parse(READY.trim_end_matches('\n')).unwrap();
        assert_eq!(growing.status, None);
        assert!(matches!(check(Some(&growing), 4242), Readiness::Waiting(_)));
    }

    #[test]
    fn socket_only_and_no_socket() {
        let text = "7\n/d\n1\n6000\n\n\n0 0\nready\n";
        let file = parse(text).unwrap();
        assert_eq!(file.socket_dir, None);
        assert_eq!(file.port, Some(6000));
    }

    #[test]
    fn the_temporary_server_is_not_ready_for_us() {
        let file = parse(READY).unwrap();
        match check(Some(&file), 99) {
            Readiness::Waiting(why) => assert!(why.contains("4242"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(check(None, 99), Readiness::Waiting(_)));
        let starting = parse(&READY.replace("ready   ", "starting")).unwrap();
        assert!(matches!(
            check(Some(&starting), 4242),
            Readiness::Waiting(_)
        ));
    }

    #[test]
    fn a_standby_is_told_by_its_signal_file_or_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let ready = parse(READY).unwrap();
        assert!(!is_standby(dir.path(), Some(&ready)));
        assert!(!is_standby(dir.path(), None));
        let warm = parse(&READY.replace("ready   ", "standby ")).unwrap();
        assert!(is_standby(dir.path(), Some(&warm)));
        // A hot standby writes `ready`: only the signal file tells.
        std::fs::write(dir.path().join(STANDBY_SIGNAL), "").unwrap();
        assert!(is_standby(dir.path(), Some(&ready)));
        assert!(is_standby(dir.path(), None));
    }

    #[test]
    fn proc_stat_state() {
        assert_eq!(proc_state("12 (postgres) S 1 12 12"), Some('S'));
        assert_eq!(proc_state("12 (a) b) Z 1"), Some('Z'));
        assert_eq!(proc_state("garbage"), None);
        assert!(is_alive(std::process::id() as i32));
    }
}

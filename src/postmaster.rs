//! `postmaster.pid`: the pure parser, liveness checks of the pid it names, and the
//! readiness wait of `run`.
//!
//! The file is the one place where the server itself says which process is the postmaster,
//! where its socket is and whether it accepts connections (line 8, `PM_STATUS`). Reading it
//! is what lets `run` tell the entrypoint's temporary init server from the final server,
//! and what lets `health` and the exit path check a postmaster without connecting. Parsing
//! is a pure function so every shape of the file (partially written, old versions,
//! standby) is unit-tested without a server.
//!
//! Which postmaster is the final server (`PostmasterRule`, `check`): CMD's own pid, because
//! the official entrypoint `exec`s into postgres; or, when CMD is not itself the postmaster
//! (Patroni, a supervisor script), one that descends from CMD (`kin`: its parents lead to
//! CMD, or it is an orphan of CMD's tree that the kernel gave to `run`, the subreaper) and
//! listens on TCP. The entrypoint's temporary init server descends from CMD too, while
//! `pg_ctl` waits for it and after: it is the server started with `listen_addresses=''`,
//! so that no client reaches a half-initialised database, and is never taken.

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
    /// The first TCP address it listens on (line 6); empty in the file, `None` here, when
    /// it listens on no TCP address (`listen_addresses=''`).
    pub listen: Option<String>,
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
    let listen = line(6).filter(|l| !l.is_empty()).map(str::to_owned);
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
        listen,
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

/// Which postmaster `run` takes for the final server (`--postmaster`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostmasterRule {
    /// Only CMD's own pid: CMD `exec`s into postgres (the official entrypoint).
    Cmd,
    /// CMD's own pid, or a descendant of CMD that listens on TCP (Patroni, a supervisor):
    /// never the entrypoint's socket-only temporary server.
    #[default]
    Descendant,
    /// CMD's own pid or any descendant, socket-only too (a supervisor whose final server
    /// listens on the socket only; never with the official entrypoint).
    AnyDescendant,
}

impl PostmasterRule {
    pub fn parse(text: &str) -> Result<PostmasterRule, String> {
        match text.trim() {
            "cmd" => Ok(PostmasterRule::Cmd),
            "descendant" => Ok(PostmasterRule::Descendant),
            "any-descendant" => Ok(PostmasterRule::AnyDescendant),
            other => Err(format!(
                "`{other}` is not cmd, descendant or any-descendant"
            )),
        }
    }
}

/// How the process `postmaster.pid` names is related to CMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kin {
    /// CMD itself.
    Cmd,
    /// A descendant of CMD: its parents lead to CMD, or to `run` (an orphan of CMD's tree:
    /// `run` starts nothing else, and as subreaper or PID 1 it adopts them).
    Descendant,
    /// Anything else (another server's stale file, a pid reused since).
    Stranger,
}

/// How `pid` is related to `child` (CMD), from the parents `/proc` names. A process that
/// is not a postgres server is a stranger, whatever its parents.
pub fn kin(pid: i32, child: i32) -> Kin {
    if pid == child {
        return Kin::Cmd;
    }
    if !is_postgres(pid) {
        return Kin::Stranger;
    }
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    let mut at = pid;
    // Deep enough for any supervisor tree; a loop in /proc cannot happen, a bound is cheap.
    for _ in 0..64 {
        match parent(at) {
            Some(p) if p == child || p == own => return Kin::Descendant,
            Some(p) if p > 1 => at = p,
            _ => return Kin::Stranger,
        }
    }
    Kin::Stranger
}

/// The parent pid of `pid` (field 4 of `/proc/<pid>/stat`).
fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// What the readiness wait found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The final server accepts connections (`Kin::Cmd` or `Kin::Descendant`).
    Ready(PidFile, Kin),
    /// Not yet, with a short description for the progress line.
    Waiting(String),
}

/// One readiness check of a parsed file (pure): the postmaster it names (`kin` of it to
/// CMD, pid `child`) is the final server by `rule`, and accepts connections.
pub fn check(file: Option<&PidFile>, child: i32, kin: Kin, rule: PostmasterRule) -> Readiness {
    let Some(file) = file else {
        return Readiness::Waiting("no postmaster.pid yet".into());
    };
    let pid = file.pid;
    let taken = match (kin, rule) {
        (Kin::Cmd, _) => Ok(()),
        (Kin::Stranger, _) | (Kin::Descendant, PostmasterRule::Cmd) => Err(format!(
            "postmaster.pid names pid {pid} (a temporary init server?), not our child {child}"
        )),
        (Kin::Descendant, PostmasterRule::Descendant) if file.listen.is_none() => Err(format!(
            "postmaster.pid names pid {pid}, a descendant of CMD ({child}) that listens on no \
             TCP address: the official entrypoint's temporary init server, which is never \
             synced (--postmaster any-descendant takes a socket-only server)"
        )),
        (Kin::Descendant, _) => Ok(()),
    };
    if let Err(why) = taken {
        return Readiness::Waiting(why);
    }
    match &file.status {
        Some(status) if status.accepts_connections() => Readiness::Ready(file.clone(), kin),
        Some(status) => Readiness::Waiting(format!("postmaster status is {status:?}")),
        None => Readiness::Waiting("postmaster has not reported its status yet".into()),
    }
}

/// Waits until the final server (CMD, pid `child`, or a descendant by `rule`) says it
/// accepts connections. No give-up timer: crash recovery can take minutes, and the caller
/// drops this future when the child exits. Polls every 10 ms (cheap: one small read, and
/// a few more of `/proc` for a postmaster that is not CMD) and logs progress every 10 s.
pub async fn wait_ready(pgdata: &Path, child: i32, rule: PostmasterRule) -> (PidFile, Kin) {
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_state = String::new();
    tracing::info!(pgdata = %pgdata.display(), "waiting for PostgreSQL to be ready");
    let path = pgdata.join(PID_FILE);
    loop {
        let verdict = match read_text(&path) {
            Ok(text) => {
                let file = parse(&text);
                let kin = file.as_ref().map_or(Kin::Stranger, |f| kin(f.pid, child));
                check(file.as_ref(), child, kin, rule)
            }
            Err(err) if err.downcast_ref::<Errno>() == Some(&Errno::ENOENT) => {
                check(None, child, Kin::Stranger, rule)
            }
            // Not found is normal before the first start; anything else (permissions) would
            // otherwise wait forever in silence.
            Err(err) => Readiness::Waiting(format!("cannot read {}: {err:#}", path.display())),
        };
        match verdict {
            Readiness::Ready(file, kin) => {
                tracing::info!(
                    pid = file.pid,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "PostgreSQL is ready{}",
                    if kin == Kin::Descendant {
                        " (a postmaster CMD started)"
                    } else {
                        ""
                    }
                );
                return (file, kin);
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
        assert_eq!(file.listen.as_deref(), Some("*"));
        assert_eq!(
            check(Some(&file), 4242, Kin::Cmd, PostmasterRule::Cmd),
            Readiness::Ready(file.clone(), Kin::Cmd)
        );
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
        assert!(matches!(
            check(Some(&growing), 4242, Kin::Cmd, PostmasterRule::default()),
            Readiness::Waiting(_)
        ));
    }

    #[test]
    fn socket_only_and_no_socket() {
        let text = "7\n/d\n1\n6000\n\n\n0 0\nready\n";
        let file = parse(text).unwrap();
        assert_eq!(file.socket_dir, None);
        assert_eq!(file.listen, None);
        assert_eq!(file.port, Some(6000));
    }

    #[test]
    fn the_temporary_server_is_not_ready_for_us() {
        let file = parse(READY).unwrap();
        for kin in [Kin::Stranger, Kin::Descendant] {
            match check(Some(&file), 99, kin, PostmasterRule::Cmd) {
                Readiness::Waiting(why) => assert!(why.contains("4242"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            check(None, 99, Kin::Stranger, PostmasterRule::default()),
            Readiness::Waiting(_)
        ));
        let starting = parse(&READY.replace("ready   ", "starting")).unwrap();
        assert!(matches!(
            check(Some(&starting), 4242, Kin::Cmd, PostmasterRule::default()),
            Readiness::Waiting(_)
        ));
        // The entrypoint's temporary server: CMD's descendant on the socket only
        // (listen_addresses=''), never taken by default.
        let socket_only = parse(&READY.replace("\n*\n", "\n\n")).unwrap();
        assert_eq!(socket_only.listen, None);
        match check(
            Some(&socket_only),
            99,
            Kin::Descendant,
            PostmasterRule::default(),
        ) {
            Readiness::Waiting(why) => assert!(why.contains("temporary init server"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check(
                Some(&socket_only),
                99,
                Kin::Descendant,
                PostmasterRule::AnyDescendant
            ),
            Readiness::Ready(_, Kin::Descendant)
        ));
    }

    #[test]
    fn a_postmaster_that_descends_from_cmd_and_listens_on_tcp_is_the_final_server() {
        let file = parse(READY).unwrap();
        assert_eq!(
            check(Some(&file), 99, Kin::Descendant, PostmasterRule::default()),
            Readiness::Ready(file.clone(), Kin::Descendant)
        );
        assert!(matches!(
            check(
                Some(&file),
                99,
                Kin::Stranger,
                PostmasterRule::AnyDescendant
            ),
            Readiness::Waiting(_)
        ));
        assert_eq!(PostmasterRule::parse("cmd"), Ok(PostmasterRule::Cmd));
        assert_eq!(
            PostmasterRule::parse("any-descendant"),
            Ok(PostmasterRule::AnyDescendant)
        );
        assert!(PostmasterRule::parse("child").is_err());
    }

    #[test]
    fn kin_follows_the_parents_in_proc() {
        let own = std::process::id() as i32;
        assert_eq!(kin(own, own), Kin::Cmd);
        // Not a postgres process: a stranger whatever its parents.
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(kin(sleeper.id() as i32, own), Kin::Stranger);
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert_eq!(
            parent(own),
            Some(std::os::unix::process::parent_id() as i32)
        );
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

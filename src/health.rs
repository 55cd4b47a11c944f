//! `health`: the probe. Exit 0 only when postgres is ready and the last sync of the
//! *current* secret files succeeded; otherwise exit 8 with a one-line reason.
//!
//! It runs as a short-lived separate process (compose `HEALTHCHECK`, Kubernetes probes),
//! so it judges from what it can observe without a password: the state file written by
//! `run`/`watch` (is its writer alive, was the server ready, did the last sync succeed,
//! which file versions did it read), `postmaster.pid` (is the postmaster alive and
//! `ready`), and a fresh `stat` of each recorded secret file, which catches a rotation that
//! has not been synced. On a standby it says so and stays healthy (exit 0: the server
//! serves reads and its passwords arrive by replication). It tells a standby by the data
//! directory when it can read it (`standby.signal`, or the status line), else (a `watch`
//! sidecar) by what the last sync that asked the server found (`pg_is_in_recovery()`,
//! recorded in the state file).
//! Process checks use pids as seen in the writer's pid namespace, so
//! the probe must run in the container (as `docker exec` and `HEALTHCHECK` do).
//!
//! It fails closed: a state file is believed only when root or the probe's own user wrote
//! it in a directory no one else can write (see `state`), and a state file its writer
//! could not update is gone, so it never speaks for a later failure.

use std::path::PathBuf;

use anyhow::anyhow;

use crate::config::Config;
use crate::error::Failure;
use crate::postmaster;
use crate::state::{self, Snapshot, StatStamp, State};

/// What `health` was asked to check.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// `None` when the configuration does not validate: the state file and the server
    /// still decide, only the check of the secret lookup is skipped.
    pub config: Option<Config>,
    /// The data directory (`--pgdata`), when this process can see it.
    pub pgdata: PathBuf,
    /// Directory holding the state file written by `run`/`watch`.
    pub state_dir: PathBuf,
}

/// `pg-password-sync health`.
pub fn command(settings: HealthSettings) -> anyhow::Result<u8> {
    match evaluate(&settings) {
        Ok(summary) => {
            println!("healthy: {summary}");
            Ok(0)
        }
        Err(reason) => Err(anyhow!(reason).context(Failure::Unhealthy)),
    }
}

/// The verdict: a summary when healthy, the reason otherwise.
pub fn evaluate(args: &HealthSettings) -> Result<String, String> {
    // Only a state file of a trusted writer counts (ours or root's, in a directory no
    // one else can write): anything else is the reason for "unhealthy".
    let (path, state) = state::load(&args.state_dir)?;
    if !postmaster::is_alive(state.pid as i32) {
        return Err(format!(
            "the process that wrote {} (pid {}) is not running",
            path.display(),
            state.pid
        ));
    }
    if !state.ready {
        return Err("PostgreSQL is not ready yet".into());
    }
    let pgdata = &args.pgdata;
    // The data directory, when readable, is the fresher word on recovery.
    let mut standby = state.standby;
    match (postmaster::read(pgdata), state.postmaster_pid) {
        // A `watch` sidecar usually cannot see the server's data directory: the successful
        // connection of its last sync is then the evidence that the server is up, and
        // whether that sync found a standby.
        (None, None) => {}
        (None, Some(_)) => {
            return Err(format!(
                "cannot read {}",
                pgdata.join(postmaster::PID_FILE).display()
            ));
        }
        (Some(pidfile), expected) => {
            check_postmaster(&pidfile, expected)?;
            standby = postmaster::is_standby(pgdata, Some(&pidfile));
        }
    }
    // The lookup is redone: a new `NAME` beside `NAME.txt`, or a file appearing in
    // SECRETS_SOURCE_DIR, changes the secret in force without touching the recorded file.
    if let Some(config) = &args.config {
        lookup_verdict(&state, &Snapshot::take(config))?;
    }
    sync_verdict(&state).map(|summary| on_standby(summary, standby))
}

/// A standby is healthy but says so: its passwords arrive by replication, the sync is
/// skipped, and the sync runs when it is promoted.
fn on_standby(summary: String, standby: bool) -> String {
    if standby {
        format!(
            "PostgreSQL is a standby (in recovery): passwords arrive by replication and are \
             synced when it is promoted; {summary}"
        )
    } else {
        summary
    }
}

/// Fails when a role's secret now resolves to another existing file than the last sync
/// read. (A secret that no longer resolves at all shows as a missing file below.)
fn lookup_verdict(state: &State, now: &Snapshot) -> Result<(), String> {
    let Some(last) = &state.last_sync else {
        return Ok(());
    };
    for current in now.0.iter().filter(|f| f.stat.is_some()) {
        if let Some(read) = last.files.iter().find(|f| f.role == current.role)
            && read.path != current.path
        {
            return Err(format!(
                "the secret for role {:?} is now {} (the last sync read {})",
                current.role,
                current.path.display(),
                read.path.display()
            ));
        }
    }
    Ok(())
}

/// The part of the verdict about the server: the pid file names the synced server, which
/// is alive and accepting connections.
fn check_postmaster(pidfile: &postmaster::PidFile, expected: Option<i32>) -> Result<(), String> {
    if let Some(expected) = expected
        && expected != pidfile.pid
    {
        return Err(format!(
            "postmaster.pid names pid {}, not the server {expected} that was synced",
            pidfile.pid
        ));
    }
    match &pidfile.status {
        Some(status) if status.accepts_connections() => {}
        other => return Err(format!("postmaster status is {other:?}, not ready")),
    }
    if !postmaster::is_alive(pidfile.pid) {
        return Err(format!("postmaster pid {} is not running", pidfile.pid));
    }
    Ok(())
}

/// The part of the verdict about the last sync (pure but for the fresh `stat`s).
fn sync_verdict(state: &State) -> Result<String, String> {
    let Some(last) = &state.last_sync else {
        return Err("no sync has completed yet".into());
    };
    if !last.ok {
        return Err("the last sync failed".into());
    }
    for file in &last.files {
        if file.stat.is_none() {
            return Err(format!(
                "the secret file for role {:?} was missing at the last sync",
                file.role
            ));
        }
        if StatStamp::of(&file.path) != file.stat {
            return Err(format!(
                "secret file {} (role {:?}) changed since the last sync",
                file.path.display(),
                file.role
            ));
        }
    }
    Ok(format!(
        "PostgreSQL is ready and the last sync of {} secret file(s) is current",
        last.files.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{FileStamp, LastSync};

    fn synced(path: &std::path::Path, ok: bool) -> State {
        State {
            pid: 1,
            ready: true,
            last_sync: Some(LastSync {
                ok,
                at_ms: 0,
                files: vec![FileStamp {
                    role: "appuser".into(),
                    path: path.to_path_buf(),
                    stat: StatStamp::of(path),
                }],
            }),
            ..State::default()
        }
    }

    #[test]
    fn a_standby_says_so() {
        let summary = on_standby("the last sync is current".into(), true);
        assert!(summary.starts_with("PostgreSQL is a standby"), "{summary}");
        assert!(summary.ends_with("the last sync is current"), "{summary}");
        assert_eq!(on_standby("x".into(), false), "x");
    }

    #[test]
    fn sync_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "a\n").unwrap();
        assert!(sync_verdict(&synced(&path, true)).is_ok());
        assert!(sync_verdict(&synced(&path, false)).is_err());
        assert!(sync_verdict(&State::default()).is_err());

        let state = synced(&path, true);
        std::fs::write(dir.path().join("new"), "bb\n").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        std::fs::write(dir.path().join("pw.txt"), "c\n").unwrap();
        let moved = Snapshot(vec![FileStamp {
            role: "appuser".into(),
            path: dir.path().join("pw.txt"),
            stat: StatStamp::of(&dir.path().join("pw.txt")),
        }]);
        let why = lookup_verdict(&state, &moved).unwrap_err();
        assert!(why.contains("is now"), "{why}");
        assert!(lookup_verdict(&state, &Snapshot(state.last_sync.clone().unwrap().files)).is_ok());

        let why = sync_verdict(&state).unwrap_err();
        assert!(why.contains("changed since the last sync"), "{why}");
        assert!(!why.contains("bb"));
    }
}

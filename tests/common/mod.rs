//! The one test harness of the one integration test binary (`tests/tests.rs`): every test
//! module does `use crate::common::*;` and drives the real binary (`BIN`) through it.
//!
//! - `process`: the binary (`bin`, `Mode`), running it to completion (`run` → `Run`) or in
//!   the background (`Running`), `both_modes!` for tests of `run` as PID 1 and as a
//!   subreaper, `descendants`, `wait_until`.
//! - `cluster`: throwaway PostgreSQL clusters from `PG_BINDIR` (`Cluster`), psql, logins.
//! - `standby`: hot standbys of a harness primary (`pg_basebackup`), and their promotion.
//! - `keys`: secret-file directories (`Keys`) and the four default roles.
//! - `leaks`: the checks that no secret reached a log, an output or any process's
//!   argv/environment.
//! - `session`: login sessions of the test's own that stay open while the binary runs
//!   (`session::Session`, not re-exported: `terminal` has a `Session` too).
//! - `relay`: a TCP relay that holds a client's connections until the test releases them.
//! - `users`: running as the server's OS user when the tests run as root.
//! - `terminal`: a command on a pseudo-terminal (prompts, echo).
//! - `k8s`: Kubernetes' AtomicWriter, for Secret volume updates.
//! - `source`: overlap mode's secrets directories made by `generate --overlap` (`Source`),
//!   the `rotate` command line, and a stand-in for the sync's database side.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod cluster;
pub mod k8s;
pub mod keys;
pub mod leaks;
pub mod process;
pub mod relay;
pub mod session;
pub mod source;
pub mod standby;
pub mod terminal;
pub mod users;

pub use cluster::*;
pub use keys::*;
pub use leaks::*;
pub use process::*;
pub use standby::*;
pub use users::*;

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Skips a test that cannot run on this machine, with the reason on stderr; under CI
/// (`CI` set) a skip is a failure, so a runner that lost root or pid namespaces cannot
/// turn the PID-1 and root tests green without running them.
pub fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {reason}"
    );
    eprintln!("SKIP: {reason}");
}

/// A unique suffix so secrets of concurrently running tests never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

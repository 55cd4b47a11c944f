//! The health state file shared by `run`/`watch` (writer) and `health` (reader).
//!
//! PLACEHOLDER API (filled in by the `run` work): the signatures below are the contract
//! that `supervisor/` and `watch.rs` code against.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Where the state of this process is recorded.
#[derive(Debug, Clone)]
pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    /// The state file in `dir` (falling back to a writable directory when `dir` is not).
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join("state.json"),
        }
    }

    /// Records whether the final server is ready.
    pub fn record_ready(&self, _ready: bool) {}

    /// Records the outcome of a sync of the secret files `config` names (ok or not).
    pub fn record_sync(&self, _config: &Config, _ok: bool) {}
}

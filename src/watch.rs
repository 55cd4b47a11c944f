//! Watching the secret files (`watch` command and inside `run`).
//!
//! PLACEHOLDER (filled in by the watch work): `watch_loop` is the contract `run` calls after
//! its first successful sync.

use crate::cli::{WatchArgs, WatchOptionsArgs};
use crate::state::StateFile;
use crate::sync::Syncer;

/// `pg-password-sync watch` (sidecar).
pub fn command(_args: WatchArgs) -> anyhow::Result<u8> {
    anyhow::bail!("watch is not implemented yet")
}

/// Watches the secret directories and re-syncs on change, on the periodic timer and on
/// every message on `resync` (SIGHUP), recording each outcome in `state`. Runs until an
/// unrecoverable error; the caller drops it to stop (e.g. when the child exits).
pub async fn watch_loop(
    _syncer: &mut Syncer,
    _options: &WatchOptionsArgs,
    _state: &StateFile,
    _resync: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    std::future::pending().await
}

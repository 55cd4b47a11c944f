//! The one path every sync of the long-running modes (`run`, `watch`) takes: read the
//! secret files, apply them as the scope says, and record the outcome in the state file
//! that `health` reads. Kept in one place so the snapshot is always taken before the read
//! and the state is always written before anything is logged.

use crate::state::{Snapshot, StateFile};

use super::{Report, Reread, Scope, Syncer};

/// One sync of the current secret files, recorded in `state`.
///
/// `Ok(None)`: with `Scope::ChangedOnly`, the files hold exactly the last applied set, so
/// nothing was sent (no connection). `Err` with `Failure::Config`: the files are not a valid
/// set and nothing was applied; any other `Err`: the apply failed and was rolled back. The
/// state is recorded before returning, so whoever sees the caller's log line finds `health`
/// already current.
pub async fn sync_and_record(
    syncer: &mut Syncer,
    state: &StateFile,
    scope: Scope,
    reread: Reread,
) -> anyhow::Result<Option<Report>> {
    // Taken before the read, so `health` can tell whether a file changed after it.
    let snapshot = Snapshot::take(&syncer.config);
    let result = syncer.sync_files(scope, reread).await;
    let standby = result
        .as_ref()
        .ok()
        .and_then(|report| report.as_ref().map(|r| r.standby));
    state.record_sync_of(snapshot, result.is_ok(), standby);
    if let Ok(Some(report)) = &result {
        state.record_changed(&report.changed());
    }
    result
}

/// Logs a sync's report: one line per role, then the completion line operators grep for
/// (`Password synchronization complete.`), or the standby notice.
pub fn log_report(report: &Report) {
    for line in report.lines() {
        tracing::info!("{line}");
    }
}

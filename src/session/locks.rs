//! Bounded waits for the sync's locks, and what is done about the sessions that hold them.
//!
//! The sync needs two kinds of lock that any login can hold against it: the advisory lock
//! whose key is public (`pg_advisory_lock` is open to every role), and the `pg_authid` row
//! of a role, which that role locks with an uncommitted `ALTER ROLE … PASSWORD`. A rotation
//! may be the answer to a leaked credential, so the holder of that credential must not be
//! able to postpone it. While a statement of the sync waits, a watchdog looks at the
//! server through a second connection (opened only once a wait has lasted `FIRST_LOOK`):
//! it names the blocking sessions in one log line (pid, role, state and for how long;
//! never their query text, which could hold a password), ends the blocking sessions of
//! non-superuser roles once the sync has been held up for `terminate_after`, and cancels
//! its own statement when the total wait reaches `lock_wait`, with an error naming the
//! sessions it waited for. Superuser sessions are never ended: they are the
//! administrator's, and the wait for them is only bounded.
//!
//! Where `max_prepared_transactions` is above its default of 0, a login can also leave
//! its lock in a prepared transaction (`BEGIN; ALTER ROLE self PASSWORD …; PREPARE
//! TRANSACTION …`, from any database since `pg_authid` is shared), which no session holds
//! and `pg_terminate_backend` cannot end. Such a transaction is found through `pg_locks`
//! and `pg_prepared_xacts`, named by its global id, owner and database, and, when its
//! owner is not a superuser, rolled back (`ROLLBACK PREPARED`, in its own database) on the
//! same schedule as a session is ended: a rotation is not postponed by any non-superuser.
//! A distributed transaction has no reason to hold a role's `pg_authid` row or the sync's
//! key for long; its transaction manager learns of the rollback at `COMMIT PREPARED`.

use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Error};

/// A commit that waits for no standby (see `sync::sql::bounds`); the watchdog's
/// `ROLLBACK PREPARED` sets it for its session too, since ending a transaction waits the same way.
pub const SYNCHRONOUS_COMMIT_LOCAL: &str = "synchronous_commit = local";

/// How long a statement waits before the watchdog first looks for blockers: a concurrent
/// sync (the advisory lock's purpose) usually finishes well before this.
const FIRST_LOOK: Duration = Duration::from_secs(1);

/// How often it looks again while the wait goes on.
const POLL: Duration = Duration::from_millis(250);

/// The longest one look may take (its queries are catalog reads that take milliseconds,
/// but a superuser's `LOCK TABLE pg_authid` makes them wait): the watchdog must never be
/// what keeps the sync from seeing its own statement end.
const LOOK_LIMIT: Duration = Duration::from_secs(2);

/// The least total wait: enough for termination to happen before the sync gives up.
const TERMINATE_GRACE: Duration = Duration::from_secs(2);

/// What the sync does about sessions that hold the locks it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blockers {
    /// The longest the sync waits for locks in total before it fails.
    pub lock_wait: Duration,
    /// End blocking non-superuser sessions once the sync has waited this long (`None`:
    /// never end any).
    pub terminate_after: Option<Duration>,
}

impl Default for Blockers {
    fn default() -> Blockers {
        Blockers {
            lock_wait: Duration::from_secs(30),
            terminate_after: Some(Duration::from_secs(10)),
        }
    }
}

impl Blockers {
    /// The total wait actually allowed: `lock_wait`, raised when needed so that ending a
    /// blocker after `terminate_after` happens before the sync gives up.
    pub fn total_wait(&self) -> Duration {
        match self.terminate_after {
            Some(after) => self.lock_wait.max(after + TERMINATE_GRACE),
            None => self.lock_wait,
        }
    }

    /// `--terminate-blockers-after` as given: a duration, or `0`/`off` for never.
    pub fn parse_terminate_after(text: &str) -> Result<Option<Duration>, String> {
        match text.trim() {
            "off" | "never" | "no" | "false" => Ok(None),
            other => crate::config::parse_duration(other).map(|d| Some(d).filter(|d| !d.is_zero())),
        }
    }
}

/// What one sync's watchdog saw: how many distinct sessions (or prepared transactions)
/// held the sync up, and how many of them it ended (or rolled back). Summed over syncs by
/// whoever keeps count (`Syncer::take_tally`, the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub blocked: u64,
    pub ended: u64,
}

impl Tally {
    pub fn add(self, other: Tally) -> Tally {
        Tally {
            blocked: self.blocked + other.blocked,
            ended: self.ended + other.ended,
        }
    }
}

/// The error of a sync that gave up waiting for locks (the watchdog's own limit, or the
/// server's `lock_timeout`): its own type, so that a failure can be told apart as a lock
/// wait from any other SQL failure (the metrics' `lock` class) without changing its text.
#[derive(Debug)]
pub struct GaveUp(pub String);

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GaveUp {}

/// Whether `err` is a sync that gave up waiting for locks.
pub fn gave_up(err: &anyhow::Error) -> bool {
    err.downcast_ref::<GaveUp>().is_some()
}

/// One session that blocks the sync, as `pg_blocking_pids` and `pg_stat_activity` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocker {
    pub pid: i32,
    /// `None` for a prepared transaction or a background process (no login role).
    pub role: Option<String>,
    pub superuser: bool,
    /// `pg_stat_activity.state` (`active`, `idle in transaction`, …), empty when unknown.
    pub state: String,
    /// Since its transaction (or, idle, its last state change) began.
    pub for_secs: f64,
    /// A session a login opened: a client backend, or a walsender (a logical replication
    /// connection runs plain SQL too, so a REPLICATION login can hold our locks from one;
    /// a walsender that only streams never holds them), as opposed to the server's own
    /// processes (autovacuum workers, background workers, …).
    pub client: bool,
    /// Set for a prepared transaction (pid 0): its global id and database.
    pub prepared: Option<Prepared>,
}

/// A prepared transaction that blocks the sync (`pg_prepared_xacts`).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub gid: String,
    pub database: String,
}

impl Blocker {
    /// Only sessions of login roles without superuser are ended: background processes are
    /// the server's own, and superusers' sessions the administrator's.
    /// A prepared transaction (no session) is rolled back on the same terms: when it is
    /// known to belong to a non-superuser.
    pub fn may_be_ended(&self) -> bool {
        let by_login = self.role.is_some() && !self.superuser;
        match self.prepared {
            Some(_) => by_login,
            None => self.client && by_login && self.pid > 0,
        }
    }
}

impl Blocker {
    /// `role "name"` (or `unknown` without one), then `, superuser` when it is one: who
    /// holds it, the same way for a session and a prepared transaction.
    fn write_role(&self, f: &mut fmt::Formatter<'_>, unknown: &str) -> fmt::Result {
        match &self.role {
            // Debug quoting: a role name is outside input and may hold control characters.
            Some(role) => write!(f, "role {role:?}")?,
            None => f.write_str(unknown)?,
        }
        if self.superuser {
            f.write_str(", superuser")?;
        }
        Ok(())
    }
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(prepared) = &self.prepared {
            // Debug quoting: the global id and names are outside input.
            write!(f, "prepared transaction {:?} (", prepared.gid)?;
            self.write_role(f, "owner unknown")?;
            return write!(
                f,
                ", database {:?}, prepared {:.1}s ago)",
                prepared.database, self.for_secs
            );
        }
        if self.pid == 0 {
            return f.write_str("a prepared transaction");
        }
        write!(f, "pid {} (", self.pid)?;
        self.write_role(f, "no role")?;
        let state = if self.state.is_empty() {
            "state unknown"
        } else {
            &self.state
        };
        write!(f, ", {state:?} for {:.1}s)", self.for_secs)
    }
}

/// `a, b, c` for log lines and errors.
pub fn describe(blockers: &[Blocker]) -> String {
    let mut text = String::new();
    for (i, blocker) in blockers.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        let _ = write!(text, "{blocker}");
    }
    text
}

/// Who blocks backend `$1` from a lock. Only identities and states are read, never the
/// `query` column. A prepared transaction shows up as pid 0, outside `pg_stat_activity`.
const BLOCKERS_SQL: &str = "\
    SELECT b.pid, a.usename::text, coalesce(r.rolsuper, false), coalesce(a.state, ''), \
           coalesce(extract(epoch FROM now() - coalesce(a.xact_start, a.state_change, \
                                                        a.backend_start))::float8, 0), \
           coalesce(a.backend_type IN ('client backend', 'walsender'), false) \
    FROM unnest(pg_blocking_pids($1)) AS b(pid) \
    LEFT JOIN pg_stat_activity a ON a.pid = b.pid \
    LEFT JOIN pg_roles r ON r.oid = a.usesysid \
    ORDER BY b.pid";

/// The prepared transactions that hold a lock backend `$1` waits for. `pg_blocking_pids`
/// shows them only as pid 0; `pg_locks` shows their locks with no pid, and each one's own
/// transaction id lock (same virtual transaction) links it to `pg_prepared_xacts`. An
/// owner that is not a role any more counts as a superuser (never rolled back).
const PREPARED_SQL: &str = "\
    SELECT DISTINCT p.gid, p.owner::text, coalesce(r.rolsuper, true), p.database::text, \
           extract(epoch FROM now() - p.prepared)::float8 \
    FROM pg_catalog.pg_locks w \
    JOIN pg_catalog.pg_locks h ON h.pid IS NULL AND h.granted \
         AND h.locktype = w.locktype \
         AND h.database IS NOT DISTINCT FROM w.database \
         AND h.relation IS NOT DISTINCT FROM w.relation \
         AND h.page IS NOT DISTINCT FROM w.page \
         AND h.tuple IS NOT DISTINCT FROM w.tuple \
         AND h.virtualxid IS NOT DISTINCT FROM w.virtualxid \
         AND h.transactionid IS NOT DISTINCT FROM w.transactionid \
         AND h.classid IS NOT DISTINCT FROM w.classid \
         AND h.objid IS NOT DISTINCT FROM w.objid \
         AND h.objsubid IS NOT DISTINCT FROM w.objsubid \
    JOIN pg_catalog.pg_locks x ON x.pid IS NULL AND x.locktype = 'transactionid' \
         AND x.virtualtransaction = h.virtualtransaction \
    JOIN pg_catalog.pg_prepared_xacts p ON p.transaction = x.transactionid \
    LEFT JOIN pg_catalog.pg_roles r ON r.rolname = p.owner \
    WHERE w.pid = $1 AND NOT w.granted \
    ORDER BY p.gid";

/// Ends session `$1` only if it is still what `may_be_ended` allows (a non-superuser
/// login's client backend or walsender) and still blocks backend `$2`: no row otherwise.
const TERMINATE_SQL: &str = "\
    SELECT pg_catalog.pg_terminate_backend(a.pid) \
    FROM pg_catalog.pg_stat_activity a \
    JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid \
    WHERE a.pid = $1 AND NOT r.rolsuper \
      AND a.backend_type IN ('client backend', 'walsender') \
      AND a.pid = ANY (pg_catalog.pg_blocking_pids($2))";

/// Opens a second connection as the superuser, like the sync's own: to the sync's
/// database (`None`, the watchdog's) or to the one named (where a prepared transaction
/// must be rolled back).
pub type Connector<'a> = Box<
    dyn Fn(Option<String>) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Client>> + 'a>>
        + 'a,
>;

/// Watches the waits of one sync (all its attempts) from a second connection.
pub struct Watchdog<'a> {
    policy: Blockers,
    connect: Connector<'a>,
    /// The sync's backend, whose waits are watched (set per attempt: a retry may use the
    /// same connection, but the pid is read again rather than assumed).
    backend_pid: i32,
    /// When the first statement the watchdog found blocked began to wait. The termination
    /// and give-up clocks run from here across statements and attempts, so a chain of
    /// blockers cannot restart them (and the sync's own work does not count).
    blocked_since: Option<Instant>,
    monitor: Option<Client>,
    monitor_failed: bool,
    /// The blockers last named in the log (a new line only when the set changes).
    reported: Vec<i32>,
    /// The blockers last seen, for the error when the sync gives up.
    last_seen: Vec<Blocker>,
    /// Set when the watchdog cancelled the sync's statement itself.
    gave_up: bool,
    /// Sessions already ended (a dying session may still show up on the next look).
    ended: Vec<i32>,
    /// Prepared transactions already rolled back, by global id.
    rolled_back: Vec<String>,
    /// Every blocker seen (`pid:<pid>` or `gid:<global id>`), for the tally.
    seen: Vec<String>,
}

impl<'a> Watchdog<'a> {
    pub fn new(policy: Blockers, connect: Connector<'a>) -> Watchdog<'a> {
        Watchdog {
            policy,
            connect,
            backend_pid: 0,
            blocked_since: None,
            monitor: None,
            monitor_failed: false,
            reported: Vec::new(),
            last_seen: Vec::new(),
            gave_up: false,
            ended: Vec::new(),
            rolled_back: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// How many distinct blockers this watchdog saw, and how many it ended.
    pub fn tally(&self) -> Tally {
        Tally {
            blocked: self.seen.len() as u64,
            ended: (self.ended.len() + self.rolled_back.len()) as u64,
        }
    }

    pub fn set_backend_pid(&mut self, pid: i32) {
        self.backend_pid = pid;
    }

    /// Time left before the sync gives up waiting (zero when it is over).
    pub fn time_left(&self) -> Duration {
        self.policy.total_wait().saturating_sub(self.waited())
    }

    /// How long the sync has been held up so far.
    fn waited(&self) -> Duration {
        self.blocked_since
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Runs one statement that may wait for a lock, watching the wait. `what` says what the
    /// statement does, for the error.
    pub async fn guard<T>(
        &mut self,
        what: &str,
        statement: impl Future<Output = Result<T, Error>>,
    ) -> anyhow::Result<T> {
        let mut statement = std::pin::pin!(statement);
        let started = Instant::now();
        let mut next_look = tokio::time::Instant::now() + FIRST_LOOK;
        loop {
            tokio::select! {
                result = &mut statement => return self.outcome(what, started, result),
                () = tokio::time::sleep_until(next_look) => {
                    if tokio::time::timeout(LOOK_LIMIT, self.look(started)).await.is_err() {
                        // Its session is stuck behind a lock (its statement_timeout ends
                        // that on the server); the next look opens a new one.
                        self.monitor = None;
                        if !self.monitor_failed {
                            tracing::warn!(
                                "the sync is waiting for a lock; looking for who holds it \
                                 took over {}s",
                                LOOK_LIMIT.as_secs_f64()
                            );
                        }
                        self.monitor_failed = true;
                    }
                    next_look = tokio::time::Instant::now() + POLL;
                }
            }
        }
    }

    /// The statement's result; a wait that ran out becomes an error naming the blockers.
    fn outcome<T>(
        &self,
        what: &str,
        started: Instant,
        result: Result<T, Error>,
    ) -> anyhow::Result<T> {
        let err = match result {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let timed_out = matches!(
            err.code(),
            Some(&SqlState::LOCK_NOT_AVAILABLE) | Some(&SqlState::QUERY_CANCELED)
        );
        if !(timed_out || self.gave_up) {
            return Err(err).context(what.to_owned());
        }
        let waited = self.waited().max(started.elapsed()).as_secs_f64();
        let held_by = if self.last_seen.is_empty() {
            "another session (no second connection could be opened to name it)".to_owned()
        } else {
            describe(&self.last_seen)
        };
        let why = if self.last_seen.iter().any(|b| !b.may_be_ended()) {
            "superuser and server sessions are never ended"
        } else if self.policy.terminate_after.is_none() {
            "--terminate-blockers-after is off"
        } else {
            "the blocking sessions could not be ended"
        };
        // When the watchdog cancelled the statement, the server's "canceling statement due
        // to user request" would only confuse; its own timeouts say what they are.
        let server = match (self.gave_up, err.as_db_error()) {
            (false, Some(db)) => format!(" (server: {})", db.message()),
            _ => String::new(),
        };
        Err(anyhow::Error::new(GaveUp(format!(
            "gave up after waiting {waited:.1}s for locks held by {held_by} ({why}); \
             nothing was changed{server}"
        ))))
        .context(what.to_owned())
    }

    /// One look at who blocks the sync (whose waiting statement began at `statement_started`);
    /// names them, ends the ones that may be ended once their time is up, and cancels the
    /// sync's own statement when the total wait is over.
    async fn look(&mut self, statement_started: Instant) {
        let blockers = match self.blockers().await {
            Ok(blockers) => blockers,
            Err(err) => {
                if !self.monitor_failed {
                    tracing::warn!(
                        "the sync is waiting for a lock; cannot see who holds it: {err:#}"
                    );
                }
                self.monitor_failed = true;
                // The server-side lock_timeout still ends the wait.
                return;
            }
        };
        if blockers.is_empty() {
            return;
        }
        for blocker in &blockers {
            let key = match &blocker.prepared {
                Some(prepared) => format!("gid:{}", prepared.gid),
                None => format!("pid:{}", blocker.pid),
            };
            if !self.seen.contains(&key) {
                self.seen.push(key);
            }
        }
        let since = *self.blocked_since.get_or_insert(statement_started);
        let waited = since.elapsed();
        let pids: Vec<i32> = blockers.iter().map(|b| b.pid).collect();
        if pids != self.reported {
            let action = match self.policy.terminate_after {
                Some(after) => format!(
                    "non-superuser sessions are ended after {}s, superuser ones waited for \
                     up to {}s",
                    after.as_secs_f64(),
                    self.policy.total_wait().as_secs_f64()
                ),
                None => format!(
                    "waiting up to {}s (ending sessions is off)",
                    self.policy.total_wait().as_secs_f64()
                ),
            };
            tracing::warn!(
                waited = format_args!("{:.1}s", waited.as_secs_f64()),
                "the sync is blocked by other sessions: {}; {action}",
                describe(&blockers)
            );
            self.reported = pids;
        }
        self.last_seen = blockers;
        if let Some(after) = self.policy.terminate_after
            && waited >= after
        {
            self.terminate().await;
        }
        if waited >= self.policy.total_wait() && !self.gave_up {
            self.gave_up = true;
            self.cancel_own().await;
        }
    }

    async fn blockers(&mut self) -> anyhow::Result<Vec<Blocker>> {
        if self.monitor.as_ref().is_none_or(Client::is_closed) {
            let monitor = (self.connect)(None)
                .await
                .context("opening a second connection")?;
            // The server ends a look stuck behind a lock, as the client stops waiting.
            monitor
                .batch_execute(&format!(
                    "SET statement_timeout = {}",
                    LOOK_LIMIT.as_millis()
                ))
                .await
                .context("bounding the second connection's statements")?;
            self.monitor = Some(monitor);
        }
        let monitor = self.monitor.as_ref().context("no second connection")?;
        let rows = monitor
            .query(BLOCKERS_SQL, &[&self.backend_pid])
            .await
            .context("reading who blocks the sync (pg_blocking_pids)")?;
        let mut blockers: Vec<Blocker> = rows
            .iter()
            .map(|row| Blocker {
                pid: row.get(0),
                role: row.get(1),
                superuser: row.get(2),
                state: row.get(3),
                for_secs: row.get(4),
                client: row.get(5),
                prepared: None,
            })
            .collect();
        if blockers.iter().any(|b| b.pid == 0) {
            let rows = monitor
                .query(PREPARED_SQL, &[&self.backend_pid])
                .await
                .context("reading which prepared transactions block the sync (pg_locks)")?;
            // Found: they replace the anonymous pid-0 entry; else it stays, never ended.
            if !rows.is_empty() {
                blockers.retain(|b| b.pid != 0);
                blockers.extend(rows.iter().map(|row| Blocker {
                    pid: 0,
                    role: row.get(1),
                    superuser: row.get(2),
                    state: "prepared".to_owned(),
                    for_secs: row.get(4),
                    client: false,
                    prepared: Some(Prepared {
                        gid: row.get(0),
                        database: row.get(3),
                    }),
                }));
            }
        }
        Ok(blockers)
    }

    /// Ends the blockers that may be ended (one log line for all of them).
    async fn terminate(&mut self) {
        let Some(monitor) = &self.monitor else {
            return;
        };
        let mut ended = Vec::new();
        for blocker in self
            .last_seen
            .iter()
            .filter(|b| b.may_be_ended() && b.prepared.is_none() && !self.ended.contains(&b.pid))
        {
            // pg_terminate_backend rolls back the session's transaction and closes it,
            // which releases its locks (advisory ones included) at once. The conditions are
            // checked again in the same statement: the session seen a moment ago may have
            // ended and its pid been reused, or its role been made a superuser since.
            match monitor
                .query_opt(TERMINATE_SQL, &[&blocker.pid, &self.backend_pid])
                .await
            {
                Ok(Some(row)) if row.get::<_, bool>(0) => ended.push(blocker.clone()),
                // No longer a non-superuser session blocking us: nothing to end (the next
                // look sees it again if it still blocks).
                Ok(None) => {}
                Ok(Some(_)) => tracing::warn!(pid = blocker.pid, "could not end blocking session"),
                Err(err) => {
                    tracing::warn!(pid = blocker.pid, "could not end blocking session: {err}")
                }
            }
        }
        self.ended.extend(ended.iter().map(|b| b.pid));
        if !ended.is_empty() {
            tracing::warn!(
                waited = format_args!("{:.1}s", self.waited().as_secs_f64()),
                "ended blocking non-superuser sessions: {}",
                describe(&ended)
            );
        }
        self.roll_back_prepared().await;
    }

    /// Rolls back the blocking prepared transactions that may be ended, each through a
    /// connection of its own to its database (`ROLLBACK PREPARED` works only there).
    async fn roll_back_prepared(&mut self) {
        let due: Vec<Blocker> = self
            .last_seen
            .iter()
            .filter(|b| {
                b.may_be_ended()
                    && b.prepared
                        .as_ref()
                        .is_some_and(|p| !self.rolled_back.contains(&p.gid))
            })
            .cloned()
            .collect();
        let mut done = Vec::new();
        for blocker in due {
            let Some(prepared) = &blocker.prepared else {
                continue;
            };
            match self.roll_back(prepared).await {
                Ok(()) => {
                    self.rolled_back.push(prepared.gid.clone());
                    done.push(blocker);
                }
                Err(err) => tracing::warn!(
                    "could not roll back blocking prepared transaction {:?}: {err:#}",
                    prepared.gid
                ),
            }
        }
        if !done.is_empty() {
            tracing::warn!(
                waited = format_args!("{:.1}s", self.waited().as_secs_f64()),
                "rolled back blocking prepared transactions of non-superusers: {}",
                describe(&done)
            );
        }
    }

    async fn roll_back(&self, prepared: &Prepared) -> anyhow::Result<()> {
        let client = (self.connect)(Some(prepared.database.clone()))
            .await
            .with_context(|| format!("connecting to database {:?}", prepared.database))?;
        // Ending a prepared transaction waits for a synchronous standby like a commit does
        // (`sql::bounds`); a message of its own, since ROLLBACK PREPARED refuses to run
        // inside the implicit transaction of a multi-statement message.
        client
            .batch_execute(&format!("SET {}", SYNCHRONOUS_COMMIT_LOCAL))
            .await
            .context("setting synchronous_commit = local before ROLLBACK PREPARED")?;
        // A utility statement takes no parameters: the global id goes in as a literal.
        client
            .batch_execute(&format!(
                "ROLLBACK PREPARED {}",
                postgres_protocol::escape::escape_literal(&prepared.gid)
            ))
            .await
            .context("ROLLBACK PREPARED")?;
        Ok(())
    }

    /// Cancels the sync's own waiting statement (the error then comes back through it).
    async fn cancel_own(&mut self) {
        if let Some(monitor) = &self.monitor
            && let Err(err) = monitor
                .query_one("SELECT pg_cancel_backend($1)", &[&self.backend_pid])
                .await
        {
            // The server-side lock_timeout, a little longer, ends the wait instead.
            tracing::debug!("cancelling the sync's own wait: {err}");
        }
    }
}

/// True for the error the server raises when it broke a deadlock by rolling back the sync.
pub fn is_deadlock(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<Error>())
        .any(|e| e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocker(pid: i32, role: Option<&str>, superuser: bool, client: bool) -> Blocker {
        Blocker {
            pid,
            role: role.map(str::to_owned),
            superuser,
            state: "idle in transaction".into(),
            for_secs: 12.34,
            client,
            prepared: None,
        }
    }

    #[test]
    fn only_non_superuser_logins_may_be_ended() {
        assert!(blocker(10, Some("appuser"), false, true).may_be_ended());
        assert!(!blocker(10, Some("postgres"), true, true).may_be_ended());
        assert!(!blocker(10, None, false, false).may_be_ended());
        assert!(!blocker(10, Some("appuser"), false, false).may_be_ended());
        assert!(!blocker(0, None, false, false).may_be_ended());
    }

    #[test]
    fn blockers_are_named_with_escaped_roles() {
        let text = describe(&[
            blocker(41, Some("app\nuser"), false, true),
            blocker(42, Some("postgres"), true, true),
            blocker(0, None, false, false),
        ]);
        assert_eq!(
            text,
            "pid 41 (role \"app\\nuser\", \"idle in transaction\" for 12.3s), \
             pid 42 (role \"postgres\", superuser, \"idle in transaction\" for 12.3s), \
             a prepared transaction"
        );
        assert_eq!(
            blocker(43, None, false, false).to_string(),
            "pid 43 (no role, \"idle in transaction\" for 12.3s)"
        );
    }

    #[test]
    fn prepared_transactions_are_named_and_only_non_superuser_ones_may_be_ended() {
        let prepared = |role: Option<&str>, superuser| Blocker {
            pid: 0,
            state: "prepared".into(),
            prepared: Some(Prepared {
                gid: "g\n1".into(),
                database: "other db".into(),
            }),
            ..blocker(0, role, superuser, false)
        };
        assert!(prepared(Some("appuser"), false).may_be_ended());
        assert!(!prepared(Some("boss"), true).may_be_ended());
        assert!(!prepared(None, false).may_be_ended());
        assert_eq!(
            describe(&[
                prepared(Some("appuser"), false),
                prepared(Some("boss"), true)
            ]),
            "prepared transaction \"g\\n1\" (role \"appuser\", database \"other db\", \
             prepared 12.3s ago), prepared transaction \"g\\n1\" (role \"boss\", superuser, \
             database \"other db\", prepared 12.3s ago)"
        );
        assert_eq!(
            prepared(None, false).to_string(),
            "prepared transaction \"g\\n1\" (owner unknown, database \"other db\", \
             prepared 12.3s ago)"
        );
    }

    #[test]
    fn terminate_after_parses_off_and_zero_as_never() {
        let parse = Blockers::parse_terminate_after;
        assert_eq!(parse("10s"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse("off"), Ok(None));
        assert_eq!(parse("0"), Ok(None));
        assert!(parse("soon").is_err());
    }

    #[test]
    fn total_wait_leaves_room_for_termination() {
        let policy = |wait, after: Option<u64>| Blockers {
            lock_wait: Duration::from_secs(wait),
            terminate_after: after.map(Duration::from_secs),
        };
        assert_eq!(policy(30, Some(10)).total_wait(), Duration::from_secs(30));
        assert_eq!(policy(5, Some(10)).total_wait(), Duration::from_secs(12));
        assert_eq!(policy(5, None).total_wait(), Duration::from_secs(5));
        assert_eq!(Blockers::default(), policy(30, Some(10)));
    }
}

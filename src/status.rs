//! `status`: the facts the metrics publish, for a person (a table) and for scripts
//! (`--format json`): per role its logins, which one `pg_service.conf` publishes, each
//! login's `VALID UNTIL` and open sessions, when this process last set its password, and a
//! pending stage; with `health`'s verdict and its exit codes (0 healthy, 8 not).
//!
//! Read, never written: the server through the one pinned superuser session
//! (`session::superuser`, the OS identity first, then the superuser's password file), one
//! catalog read bounded by the connect timeout (`overlap::server::read_logins`; the pending
//! stage is the twin's mark); the state file of `run`/`watch` (`state::load`, with its
//! trust rules); `pg_service.conf` for which login is published. No secret is printed: the
//! service file's passwords are read with it and dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use serde::Serialize;

use crate::config::Config;
use crate::error::Failure;
use crate::health::{self, HealthSettings};
use crate::overlap;
use crate::overlap::server::{LoginFacts, read_logins, staged_login};
use crate::session;
use crate::state::{self, State};
use crate::store::clock::Utc;
use crate::sync::ReportFormat;

/// What `status` was asked to show.
#[derive(Debug, Clone)]
pub struct StatusSettings {
    pub config: Config,
    /// The data directory (`--pgdata`), when this process can see it.
    pub pgdata: PathBuf,
    /// Directory holding the state file written by `run`/`watch`.
    pub state_dir: PathBuf,
    pub format: ReportFormat,
}

/// Everything `status` says.
#[derive(Debug, Serialize)]
struct Status {
    /// `health`'s verdict.
    healthy: bool,
    /// Its summary, or why not healthy.
    health: String,
    /// The state of `run`/`watch`, or why there is none to trust.
    state: Part<StateView>,
    /// Whether the server is a standby, or why it could not be asked.
    server: Part<ServerView>,
    roles: Vec<RoleView>,
}

/// A part of the status: what was read, or (in JSON `{"error": …}`) why it was not.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Part<T> {
    Read(T),
    Unread { error: String },
}

impl<T> From<Result<T, String>> for Part<T> {
    fn from(result: Result<T, String>) -> Part<T> {
        match result {
            Ok(value) => Part::Read(value),
            Err(error) => Part::Unread { error },
        }
    }
}

#[derive(Debug, Serialize)]
struct StateView {
    ready: bool,
    standby: bool,
    last_sync_ok: Option<bool>,
    last_sync_at_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ServerView {
    standby: bool,
}

#[derive(Debug, Serialize)]
struct RoleView {
    role: String,
    /// Overlap mode: the login whose stage waits for its publish.
    stage_pending: Option<String>,
    logins: Vec<LoginView>,
}

#[derive(Debug, Serialize)]
struct LoginView {
    login: String,
    /// Overlap mode: whether `pg_service.conf` publishes it (`None`: not overlapped, or
    /// the file could not be read).
    published: Option<bool>,
    /// `None` when the server could not be read.
    exists: Option<bool>,
    /// `VALID UNTIL` as the server writes it; `None` for no end (or unknown).
    valid_until: Option<String>,
    sessions: Option<i64>,
    /// When this process last set its password (Unix milliseconds).
    last_change_ms: Option<u64>,
}

/// `pg-password-sync status`.
pub fn command(settings: StatusSettings) -> anyhow::Result<u8> {
    let config = &settings.config;
    let verdict = health::evaluate(&HealthSettings {
        config: Some(config.clone()),
        pgdata: settings.pgdata.clone(),
        state_dir: settings.state_dir.clone(),
    });
    let state = state::load(&settings.state_dir).map(|(_, state)| state);
    let server = crate::runtime::block_on(read_server(config)).map_err(|err| format!("{err:#}"));
    let status = build(config, verdict, state, server);
    print(&status, settings.format)?;
    let unhealthy = match (&status.healthy, &status.server) {
        (false, _) => Some(status.health.clone()),
        (true, Part::Unread { error }) => Some(format!("the server could not be read: {error}")),
        (true, Part::Read(_)) => None,
    };
    match unhealthy {
        None => Ok(0),
        Some(why) => Err(anyhow!(why).context(Failure::Unhealthy)),
    }
}

/// What the server says: whether it is a standby, and each login's facts.
struct ServerFacts {
    standby: bool,
    logins: Vec<LoginFacts>,
}

/// Asks the server as the superuser, each wait bounded by the connect timeout.
async fn read_server(config: &Config) -> anyhow::Result<ServerFacts> {
    let password = config.superuser_password().and_then(Result::ok);
    let passwords: Vec<_> = password
        .iter()
        .map(|secret| (secret, "superuser password file"))
        .collect();
    let client = session::superuser(config, &passwords, None).await?;
    let limit = config.connection.connect_timeout;
    let read = async {
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
        let logins = read_logins(&client, &config.logins()).await?;
        anyhow::Ok(ServerFacts {
            standby: row.get(0),
            logins,
        })
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| anyhow!("no answer within {limit:?} (a lock on pg_authid?)"))?
        .context("reading the logins")
        .context(Failure::Sql)
}

/// Per role, the login `pg_service.conf` publishes (empty when it cannot be read).
fn published(config: &Config) -> BTreeMap<String, String> {
    let Some(overlap) = &config.overlap else {
        return BTreeMap::new();
    };
    let file = config
        .resolve(&overlap.service_file)
        .and_then(|path| overlap::read_service_file(&path));
    match file {
        Ok(file) => file
            .sections
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.user.clone()?)))
            .collect(),
        Err(err) => {
            tracing::warn!("which login is published is unknown: {err:#}");
            BTreeMap::new()
        }
    }
}

/// Puts the facts together, role by role.
fn build(
    config: &Config,
    verdict: Result<String, String>,
    state: Result<State, String>,
    server: Result<ServerFacts, String>,
) -> Status {
    let published = published(config);
    let facts = |login: &str| {
        server
            .as_ref()
            .ok()
            .and_then(|s| s.logins.iter().find(|f| f.login == login))
    };
    let changed = |login: &str| {
        state
            .as_ref()
            .ok()
            .and_then(|s| s.changed_at_ms.get(login).copied())
    };
    let view = |login: &str, published: Option<bool>| {
        let fact = facts(login);
        LoginView {
            login: login.to_owned(),
            published,
            exists: fact.map(|f| f.exists),
            valid_until: fact.and_then(|f| f.valid_until_text.clone()),
            sessions: fact.map(|f| f.sessions),
            last_change_ms: changed(login),
        }
    };
    let roles = config
        .roles
        .iter()
        .map(
            |role| match config.pairs().iter().find(|p| p.role == role.name) {
                None => RoleView {
                    role: role.name.clone(),
                    stage_pending: None,
                    logins: vec![view(&role.name, None)],
                },
                Some(pair) => {
                    let shown = published.get(&pair.role);
                    let is = |login: &str| shown.map(|p| p == login);
                    let comment = facts(&pair.twin).and_then(|f| f.comment.as_deref());
                    RoleView {
                        role: pair.role.clone(),
                        stage_pending: staged_login(pair, comment),
                        logins: vec![
                            view(&pair.role, is(&pair.role)),
                            view(&pair.twin, is(&pair.twin)),
                        ],
                    }
                }
            },
        )
        .collect();
    Status {
        healthy: verdict.is_ok(),
        health: verdict.unwrap_or_else(|why| why),
        state: state
            .map(|s| StateView {
                ready: s.ready,
                standby: s.standby,
                last_sync_ok: s.last_sync.as_ref().map(|l| l.ok),
                last_sync_at_ms: s.last_sync.as_ref().map(|l| l.at_ms),
            })
            .into(),
        server: server.map(|s| ServerView { standby: s.standby }).into(),
        roles,
    }
}

fn print(status: &Status, format: ReportFormat) -> anyhow::Result<()> {
    match format {
        ReportFormat::Json => println!(
            "{}",
            serde_json::to_string(status).context("serialising the status")?
        ),
        ReportFormat::Text => {
            for line in text(status) {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// The status for a person: a summary, then one row per login.
fn text(status: &Status) -> Vec<String> {
    let mut lines = vec![format!(
        "{}: {}",
        if status.healthy {
            "healthy"
        } else {
            "not healthy"
        },
        status.health
    )];
    lines.push(match &status.state {
        Part::Read(s) => format!(
            "state: {}, last sync {}",
            if s.ready { "ready" } else { "not ready" },
            match (s.last_sync_ok, s.last_sync_at_ms) {
                (Some(ok), Some(at)) =>
                    format!("{} at {}", if ok { "ok" } else { "failed" }, when(at)),
                _ => "none yet".to_owned(),
            }
        ),
        Part::Unread { error } => format!("state: {error}"),
    });
    lines.push(match &status.server {
        Part::Read(s) => format!("server: {}", if s.standby { "standby" } else { "primary" }),
        Part::Unread { error } => format!("server: not read: {error}"),
    });
    let mut rows = vec![
        [
            "ROLE",
            "LOGIN",
            "PUBLISHED",
            "VALID UNTIL",
            "SESSIONS",
            "LAST CHANGE",
            "STAGE",
        ]
        .map(str::to_owned),
    ];
    for role in &status.roles {
        for login in &role.logins {
            rows.push(row(role, login));
        }
    }
    lines.extend(table(&rows));
    lines
}

/// One login's row of the table.
fn row(role: &RoleView, login: &LoginView) -> [String; 7] {
    let unknown = || "?".to_owned();
    [
        role.role.clone(),
        login.login.clone(),
        match login.published {
            Some(true) => "yes".to_owned(),
            Some(false) => "no".to_owned(),
            None => "-".to_owned(),
        },
        match (login.exists, &login.valid_until) {
            (None, _) => unknown(),
            (Some(false), _) => "(no such role)".to_owned(),
            (Some(true), Some(until)) => until.clone(),
            (Some(true), None) => "(no end)".to_owned(),
        },
        login.sessions.map_or_else(unknown, |n| n.to_string()),
        login.last_change_ms.map_or_else(|| "-".to_owned(), when),
        match &role.stage_pending {
            Some(staged) if *staged == login.login => "pending".to_owned(),
            _ => "-".to_owned(),
        },
    ]
}

/// Rows as aligned columns.
fn table(rows: &[[String; 7]]) -> Vec<String> {
    let mut widths = [0usize; 7];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

/// Unix milliseconds as UTC, to the second.
fn when(ms: u64) -> String {
    let t = Utc::from_unix(i64::try_from(ms / 1000).unwrap_or(i64::MAX / 2));
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_say_what_is_unknown_and_what_is_pending() {
        let role = RoleView {
            role: "app".into(),
            stage_pending: Some("app_alt".into()),
            logins: Vec::new(),
        };
        let known = LoginView {
            login: "app_alt".into(),
            published: Some(false),
            exists: Some(true),
            valid_until: Some("infinity".into()),
            sessions: Some(2),
            last_change_ms: Some(1_700_000_000_000),
        };
        let row_text = row(&role, &known).join("|");
        assert_eq!(
            row_text,
            "app|app_alt|no|infinity|2|2023-11-14 22:13:20 UTC|pending"
        );
        let unread = LoginView {
            login: "app".into(),
            published: None,
            exists: None,
            valid_until: None,
            sessions: None,
            last_change_ms: None,
        };
        assert_eq!(row(&role, &unread).join("|"), "app|app|-|?|?|-|-");
        let lines = table(&[row(&role, &known), row(&role, &unread)]);
        assert!(lines[0].starts_with("app  app_alt  no "), "{lines:?}");
    }
}

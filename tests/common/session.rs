//! Login sessions of the test's own (TCP, password), each on a thread of its own, for
//! the sessions an attacker or an application keeps open while the binary runs: holding
//! the sync's advisory lock or a role's `pg_authid` row, or just staying connected.

use std::time::Duration;

use super::cluster::{block_on, quote_literal, tcp_login_config};

/// The advisory lock key the sync takes (published, so any login can take it too).
pub const SYNC_LOCK: &str = "x'7067707773796e63'::bigint";

/// A statement's result, as sent back by a `Session`.
pub type Reply = std::sync::mpsc::Receiver<Result<(), String>>;

/// A statement for a `Session`'s thread, and where its result goes.
type Request = (String, std::sync::mpsc::Sender<Result<(), String>>);

/// A login session of its own (TCP, password), on a thread of its own: each statement is
/// sent at once and its result comes back on a channel, so a statement that waits for a
/// lock does not stop the test.
pub struct Session {
    pub pid: i32,
    tx: Option<tokio::sync::mpsc::UnboundedSender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    pub fn connect(port: u16, role: &str, password: &str) -> Session {
        Self::connect_in(port, role, password, "postgres")
    }

    /// `connect`, to database `db`.
    pub fn connect_in(port: u16, role: &str, password: &str, db: &str) -> Session {
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Request>();
        let (role, password, db) = (role.to_owned(), password.to_owned(), db.to_owned());
        let thread = std::thread::spawn(move || {
            block_on(async move {
                let mut config = tcp_login_config(port, &role, &password);
                config.dbname(&db);
                config.application_name("hostile test session");
                let (client, connection) = match config.connect(tokio_postgres::NoTls).await {
                    Ok(pair) => pair,
                    Err(err) => {
                        let _ = pid_tx.send(Err(err.to_string()));
                        return;
                    }
                };
                tokio::spawn(connection);
                let pid: i32 = client
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .unwrap()
                    .get(0);
                let _ = pid_tx.send(Ok(pid));
                let client = std::sync::Arc::new(client);
                while let Some((sql, reply)) = rx.recv().await {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let result = client.batch_execute(&sql).await.map_err(|e| describe(&e));
                        let _ = reply.send(result);
                    });
                }
            });
        });
        let pid = pid_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("session thread answered")
            .expect("session logged in");
        Session {
            pid,
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Sends a statement without waiting for it.
    pub fn send(&self, sql: &str) -> Reply {
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        self.tx
            .as_ref()
            .unwrap()
            .send((sql.to_owned(), reply_tx))
            .unwrap();
        reply_rx
    }

    /// Runs a statement and waits (bounded) for its result.
    pub fn exec(&self, sql: &str) -> Result<(), String> {
        self.send(sql)
            .recv_timeout(Duration::from_secs(60))
            .expect("statement finished")
    }

    /// Takes the sync's advisory lock for the session (a session-level lock: it is held
    /// until the session ends).
    pub fn hold_sync_lock(&self) {
        self.exec(&format!("SELECT pg_advisory_lock({SYNC_LOCK})"))
            .unwrap();
    }

    /// Opens a transaction that changes appuser's password to `other`, holding its
    /// pg_authid row locked until the transaction ends (the login's own right).
    pub fn lock_own_row(&self, other: &str) {
        self.exec("BEGIN").unwrap();
        self.exec(&format!(
            "ALTER ROLE appuser PASSWORD {}",
            quote_literal(other)
        ))
        .unwrap();
    }

    /// Whether the server still serves this session.
    pub fn alive(&self) -> bool {
        self.exec("SELECT 1").is_ok()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Ends the command loop; the runtime then drops the connection.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A statement's error as the tests look at it: the client's text, and the SQLSTATE when
/// the server sent one (`… (SQLSTATE 42501)`). Never a password: the statements tests
/// send through a session carry none of the secrets under test.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.code() {
        Some(code) => format!("{err} (SQLSTATE {})", code.code()),
        None => err.to_string(),
    }
}

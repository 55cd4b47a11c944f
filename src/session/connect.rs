//! Connecting to the server as the superuser, in this order (the first that works wins):
//!
//! 1. The Unix socket with the process's OS identity (peer or trust). Started as root, the
//!    socket is connected with the effective uid/gid of the sync user (default `postgres`),
//!    on a thread of its own, because the server reads the peer's credentials at
//!    `connect()` time: that is what lets the image's `local all postgres peer` admit us
//!    while we stay root for reading root-only secret files.
//! 2. The superuser's password from its secret file.
//! 3. The last superuser password this process applied (`run`/`watch` only), for a
//!    rotation of the superuser when peer authentication is not available.
//!
//! With a list of servers (`PGHOST=a,b,c`) each is tried in that order by the caller
//! (`session::superuser`), with every method, before the next: libpq's order.
//!
//! Passwords are handed to tokio-postgres in memory; nothing goes through argv or env.
//! They leave only through SCRAM: every connection is read through `auth_watch`, which
//! fails it before tokio-postgres answers a request for the password in clear text or as
//! MD5 (what a listener that is not the server would ask for).
//! No connect blocks the runtime's thread (which forwards `run`'s signals): the socket is
//! non-blocking, a full listen backlog is retried, and the configured connect timeout
//! bounds the whole attempt. Over TCP, a server that falls silent once connected (its host
//! gone, a partition) is noticed within `TCP_SILENCE_LIMIT` instead of the kernel's default
//! of hours: the server's own timeouts cannot end a wait whose answer never arrives.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use nix::libc;
use socket2::{Domain, SockAddr, Socket, Type};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::auth_watch::Watched;
use crate::config::{Config, Host, OsIdentity, Server};
use crate::error::Failure;
use crate::secret::Secret;

/// One way of authenticating, tried in order until one works.
pub enum Auth<'a> {
    /// No password: the OS identity (peer) or a trust rule.
    Identity,
    /// A password, with a label for messages ("from postgres_password", …).
    Password(&'a Secret, &'static str),
}

impl Auth<'_> {
    fn label(&self) -> &'static str {
        match self {
            Auth::Identity => "OS identity",
            Auth::Password(_, label) => label,
        }
    }
}

/// A connection with what the server reported about itself at startup (before any
/// statement): what libpq's `target_session_attrs` looks at first.
pub struct Connected {
    pub client: Client,
    /// `in_hot_standby` (PostgreSQL 14+ reports it; `None` before).
    pub in_hot_standby: Option<bool>,
    /// `default_transaction_read_only` (reported from 14 on).
    pub default_read_only: Option<bool>,
}

/// Connects as `user` to `server`, trying each method in turn. The error lists why each
/// failed (messages from the server and the client library never contain the password).
pub async fn connect_any(
    config: &Config,
    server: &Server,
    user: &str,
    methods: &[Auth<'_>],
) -> anyhow::Result<Connected> {
    let mut reasons = Vec::new();
    for auth in methods {
        match connect(config, server, user, auth).await {
            Ok(connected) => {
                tracing::debug!(user, method = auth.label(), "connected");
                return Ok(connected);
            }
            Err(err) => reasons.push(format!("{}: {err:#}", auth.label())),
        }
    }
    Err(anyhow!("{}", reasons.join("; ")))
        .with_context(|| format!("connecting as {user:?} to {}", describe_server(server)))
        .context(Failure::Connect)
}

/// Where the servers are, for messages: each of the list, in order.
pub fn describe(config: &Config) -> String {
    let all: Vec<String> = config
        .connection
        .servers
        .iter()
        .map(describe_server)
        .collect();
    all.join(", ")
}

/// Where one server is, for messages.
pub fn describe_server(server: &Server) -> String {
    match &server.host {
        Host::Socket(dir) => socket_path(dir, server.port).display().to_string(),
        Host::Tcp(host) => format!("{host}:{}", server.port),
    }
}

/// The socket file of a server: `<dir>/.s.PGSQL.<port>`.
pub fn socket_path(dir: &Path, port: u16) -> std::path::PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

// `STARTUP_OPTIONS` as a literal, so that `concat!` can extend it.
macro_rules! startup_options {
    () => {
        "-c idle_session_timeout=0 -c statement_timeout=0 -c lock_timeout=0 \
         -c idle_in_transaction_session_timeout=0"
    };
}

/// Settings sent in the startup packet, which take precedence over a database's and a
/// role's settings (`ALTER DATABASE … SET`): the timeouts a database owner could set to a
/// millisecond so that our session ends or its first statement fails before anything could
/// clear them (between the login and the first statement, during the statement that pins
/// the session, or between two statements that pin it). Each exists on every supported
/// major (14+). The other settings such an owner can attach are cleared by the pinning
/// statements (`session::superuser`), which these let run.
const STARTUP_OPTIONS: &str = startup_options!();

/// `STARTUP_OPTIONS` with `transaction_timeout` (PostgreSQL 17+), which a server of an
/// older major refuses as an unknown setting after the login.
const STARTUP_OPTIONS_17: &str = concat!(startup_options!(), " -c transaction_timeout=0");

/// Whether to send `STARTUP_OPTIONS_17`: yes until a server refuses it (an older major),
/// then not again in this process; `session::superuser` clears `transaction_timeout` in its
/// first statement either way, and this closes the moment before it.
static STARTUP_TRANSACTION_TIMEOUT: AtomicBool = AtomicBool::new(true);

/// One connection attempt to `server`, bounded by the configured connect timeout (per
/// server, as libpq's `connect_timeout`); on a server older than 17, a second one the
/// first time (see `STARTUP_TRANSACTION_TIMEOUT`).
pub async fn connect(
    config: &Config,
    server: &Server,
    user: &str,
    auth: &Auth<'_>,
) -> anyhow::Result<Connected> {
    if STARTUP_TRANSACTION_TIMEOUT.load(Ordering::Relaxed) {
        match connect_with(config, server, user, auth, STARTUP_OPTIONS_17).await {
            Err(err) if refuses_transaction_timeout(&err) => {
                STARTUP_TRANSACTION_TIMEOUT.store(false, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    connect_with(config, server, user, auth, STARTUP_OPTIONS).await
}

/// The server's answer to a startup packet naming a setting it does not have (42704).
fn refuses_transaction_timeout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error)
            .is_some_and(|db| {
                db.code() == &SqlState::UNDEFINED_OBJECT
                    && db.message().contains("transaction_timeout")
            })
    })
}

async fn connect_with(
    config: &Config,
    server: &Server,
    user: &str,
    auth: &Auth<'_>,
    options: &str,
) -> anyhow::Result<Connected> {
    let mut pg = tokio_postgres::Config::new();
    pg.user(user)
        .dbname(&config.connection.dbname)
        .application_name("pg-password-sync")
        // Sent with the login, so they are in force before the session's first statement
        // (see `STARTUP_OPTIONS`).
        .options(options)
        // No SSLRequest (NoTls would skip it too): `Watched` reads the stream from its
        // first byte as messages.
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(config.connection.connect_timeout);
    if let Auth::Password(secret, _) = auth {
        pg.password(secret.expose());
    }
    let attempt = async {
        let connected = match &server.host {
            Host::Socket(dir) => {
                let identity = match auth {
                    Auth::Identity => config.connection.sync_identity,
                    Auth::Password(..) => None,
                };
                let stream = connect_socket(&socket_path(dir, server.port), identity).await?;
                let (client, connection) = pg.connect_raw(Watched::new(stream), NoTls).await?;
                started(client, connection)
            }
            Host::Tcp(host) => {
                let stream = tcp_stream(host, server.port).await?;
                let (client, connection) = pg.connect_raw(Watched::new(stream), NoTls).await?;
                started(client, connection)
            }
        };
        anyhow::Ok(connected)
    };
    tokio::time::timeout(config.connection.connect_timeout, attempt)
        .await
        .map_err(|_| anyhow!("timed out after {:?}", config.connection.connect_timeout))?
}

/// How long a TCP peer may leave what we sent unacknowledged, or a keepalive probe
/// unanswered, before the connection counts as lost. A live server's kernel acknowledges
/// at once, however long the server itself takes to answer (a lock wait of the sync), so
/// this only ends connections to a server that is gone.
pub const TCP_SILENCE_LIMIT: Duration = Duration::from_secs(15);
/// Keepalive probes while waiting for an answer: the first after this much quiet, then one
/// every `TCP_KEEPALIVE_INTERVAL`, so a silent peer is noticed within the limit above even
/// when we have nothing left to send.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const TCP_KEEPALIVE_RETRIES: u32 = 5;

/// A TCP connection to `host:port` (a name is resolved off the runtime's thread, and each
/// address tried in turn) whose silence is bounded by `TCP_SILENCE_LIMIT`: the one way
/// both the sync and `verify` reach a server over TCP.
pub async fn tcp_stream(host: &str, port: u16) -> anyhow::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    // Small request/answer messages: no waiting to fill a segment.
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let socket = socket2::SockRef::from(&stream);
    socket
        .set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(TCP_KEEPALIVE_IDLE)
                .with_interval(TCP_KEEPALIVE_INTERVAL)
                .with_retries(TCP_KEEPALIVE_RETRIES),
        )
        .context("setting TCP keepalives")?;
    // TCP_USER_TIMEOUT also caps the keepalive probes: whichever comes first ends it.
    socket
        .set_tcp_user_timeout(Some(TCP_SILENCE_LIMIT))
        .context("setting TCP_USER_TIMEOUT")?;
    Ok(stream)
}

/// A started connection: what the server reported at startup is read, then the
/// connection is driven in the background (`spawn_connection`).
pub fn started<S, T>(client: Client, connection: tokio_postgres::Connection<S, T>) -> Connected
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let flag = |name: &str| connection.parameter(name).map(|value| value == "on");
    let connected = Connected {
        client,
        in_hot_standby: flag("in_hot_standby"),
        default_read_only: flag("default_transaction_read_only"),
    };
    spawn_connection(connection);
    connected
}

/// Drives a connection in the background; its end is logged at debug level only.
pub fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!("connection closed: {err}");
        }
    });
}

/// Connects the Unix socket, as `identity` when given (we are root then), without ever
/// blocking the runtime's thread: `run`'s signal forwarding and reaping share it. The
/// caller's connect timeout bounds the whole (this future is dropped when it expires).
async fn connect_socket(
    path: &Path,
    identity: Option<OsIdentity>,
) -> anyhow::Result<tokio::net::UnixStream> {
    let shown = path.display();
    let mut pause = BACKLOG_PAUSE_MIN;
    let socket = loop {
        let attempt = match identity {
            None => start_connect(path),
            Some(id) => start_connect_as(id, path.to_path_buf()).await?,
        };
        match attempt {
            Ok(socket) => break socket,
            // A full listen backlog (a stopped or flooded server): a non-blocking connect
            // to a Unix socket says EAGAIN and offers nothing to wait on, so try again.
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if pause == BACKLOG_PAUSE_MIN {
                    tracing::warn!(
                        "the listen backlog of {shown} is full (the server accepts no \
                         connections); retrying until the connect timeout"
                    );
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKLOG_PAUSE_MAX);
            }
            Err(err) => return Err(err).with_context(|| format!("connecting to {shown}")),
        }
    };
    let stream = tokio::net::UnixStream::from_std(StdUnixStream::from(OwnedFd::from(socket)))
        .context("registering the socket")?;
    // Not expected for a Unix socket on Linux, but allowed by POSIX: a connect still in
    // progress completes when the socket turns writable.
    stream
        .writable()
        .await
        .with_context(|| format!("connecting to {shown}"))?;
    if let Some(err) = stream.take_error().context("reading the socket's state")? {
        return Err(err).with_context(|| format!("connecting to {shown}"));
    }
    Ok(stream)
}

/// First and last pause between connects refused by a full listen backlog.
const BACKLOG_PAUSE_MIN: Duration = Duration::from_millis(5);
const BACKLOG_PAUSE_MAX: Duration = Duration::from_millis(200);

/// A non-blocking socket with its connect started: connected (Unix sockets connect at
/// once), in progress, or an error (`WouldBlock` for a full backlog).
fn start_connect(path: &Path) -> std::io::Result<Socket> {
    let address = SockAddr::unix(path)?;
    // socket2 sets close-on-exec: the child postgres must not inherit our connection.
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&address) {
        Ok(()) => Ok(socket),
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(err) => Err(err),
    }
}

/// `start_connect` with the effective uid/gid of `identity`, on a thread of its own. The
/// server reads the peer's credentials at `connect()` time, so only the connect needs
/// them. They are changed for that one thread, which ends right after: the process's
/// other threads (PBKDF2, the runtime reading root-only secret files) keep root's.
async fn start_connect_as(
    identity: OsIdentity,
    path: PathBuf,
) -> anyhow::Result<std::io::Result<Socket>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("peer-connect".into())
        .spawn(move || {
            let result = set_thread_identity(identity).and_then(|()| start_connect(&path));
            let _ = tx.send(result);
        })
        .context("starting the thread of the peer connection")?;
    // The thread makes four system calls, none of which can block, and ends.
    rx.await
        .context("the thread of the peer connection ended without an answer")
}

/// Switches the effective gid, then uid, of the *calling thread only* to `identity`.
///
/// Linux keeps credentials per thread; glibc's `setegid`/`seteuid` (and nix's, which call
/// them) apply a change to every thread of the process, so while one thread connects as
/// `postgres`, another could fail to read a root-only secret file. The raw system calls
/// change only this thread; the saved ids stay root's.
fn set_thread_identity(identity: OsIdentity) -> std::io::Result<()> {
    const UNCHANGED: libc::c_long = -1;
    let gid = libc::c_long::from(identity.gid.as_raw());
    let uid = libc::c_long::from(identity.uid.as_raw());
    // SAFETY: setresgid/setresuid take three integers and touch no memory; their only
    // effect is on this thread's credentials, which is the point.
    let rc = unsafe { libc::syscall(libc::SYS_setresgid, UNCHANGED, gid, UNCHANGED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, UNCHANGED, uid, UNCHANGED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{Gid, Uid};

    #[test]
    fn the_identity_changes_only_the_connecting_thread() {
        if !Uid::effective().is_root() {
            return;
        }
        let nobody = OsIdentity {
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
        };
        let seen = std::thread::spawn(move || {
            set_thread_identity(nobody).unwrap();
            (Uid::effective().as_raw(), Gid::effective().as_raw())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (65534, 65534));
        assert!(Uid::effective().is_root() && Gid::effective().as_raw() == 0);
    }
}

//! Connecting to the server as the superuser, in this order (the first that works wins):
//!
//! 1. The Unix socket with the process's OS identity (peer or trust). Started as root, the
//!    socket is connected with the effective uid/gid of the sync user (default `postgres`),
//!    because the server reads the peer's credentials at `connect()` time: that is what
//!    lets the image's `local all postgres peer` admit us while we stay root for reading
//!    root-only secret files.
//! 2. The superuser's password from its secret file.
//! 3. The last superuser password this process applied (`run`/`watch` only), for a
//!    rotation of the superuser when peer authentication is not available.
//!
//! Passwords are handed to tokio-postgres in memory; nothing goes through argv or env.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;

use anyhow::{Context, anyhow};
use nix::unistd::{Gid, Uid, setegid, seteuid};
use tokio_postgres::{Client, NoTls};

use crate::config::{Config, Host, OsIdentity};
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

/// Connects as `user`, trying each method in turn. The error lists why each failed
/// (messages from the server and the client library never contain the password).
pub async fn connect_any(
    config: &Config,
    user: &str,
    methods: &[Auth<'_>],
) -> anyhow::Result<Client> {
    let mut reasons = Vec::new();
    for auth in methods {
        match connect(config, user, auth).await {
            Ok(client) => {
                tracing::debug!(user, method = auth.label(), "connected");
                return Ok(client);
            }
            Err(err) => reasons.push(format!("{}: {err:#}", auth.label())),
        }
    }
    Err(anyhow!("{}", reasons.join("; ")))
        .with_context(|| format!("connecting as {user:?} to {}", describe(config)))
        .context(Failure::Connect)
}

/// Where the server is, for messages.
pub fn describe(config: &Config) -> String {
    match &config.host {
        Host::Socket(dir) => socket_path(dir, config.port).display().to_string(),
        Host::Tcp(host) => format!("{host}:{}", config.port),
    }
}

/// The socket file of a server: `<dir>/.s.PGSQL.<port>`.
pub fn socket_path(dir: &Path, port: u16) -> std::path::PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// One connection attempt, bounded by the configured connect timeout.
pub async fn connect(config: &Config, user: &str, auth: &Auth<'_>) -> anyhow::Result<Client> {
    let mut pg = tokio_postgres::Config::new();
    pg.user(user)
        .dbname(&config.dbname)
        .application_name("pg-password-sync")
        .connect_timeout(config.connect_timeout);
    if let Auth::Password(secret, _) = auth {
        pg.password(secret.expose());
    }
    let attempt = async {
        let client = match &config.host {
            Host::Socket(dir) => {
                let identity = match auth {
                    Auth::Identity => config.sync_identity,
                    Auth::Password(..) => None,
                };
                let stream = connect_socket(&socket_path(dir, config.port), identity)?;
                let (client, connection) = pg.connect_raw(stream, NoTls).await?;
                spawn_connection(connection);
                client
            }
            Host::Tcp(host) => {
                pg.host(host).port(config.port);
                let (client, connection) = pg.connect(NoTls).await?;
                spawn_connection(connection);
                client
            }
        };
        anyhow::Ok(client)
    };
    tokio::time::timeout(config.connect_timeout, attempt)
        .await
        .map_err(|_| anyhow!("timed out after {:?}", config.connect_timeout))?
}

/// Drives a connection in the background; its end is logged at debug level only.
fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
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

/// Connects the Unix socket, as `identity` when given (we are root then).
fn connect_socket(
    path: &Path,
    identity: Option<OsIdentity>,
) -> anyhow::Result<tokio::net::UnixStream> {
    let stream = match identity {
        None => StdUnixStream::connect(path),
        Some(id) => with_effective_identity(id, || StdUnixStream::connect(path))?,
    }
    .with_context(|| format!("connecting to {}", path.display()))?;
    stream
        .set_nonblocking(true)
        .context("making the socket non-blocking")?;
    tokio::net::UnixStream::from_std(stream).context("registering the socket")
}

/// Runs `f` with the effective uid/gid switched to `identity`, then switches back to root.
/// Only the effective ids change (the saved uid stays 0), so switching back is allowed;
/// glibc applies `seteuid` to every thread, so no thread runs with mixed credentials.
fn with_effective_identity<T>(identity: OsIdentity, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    setegid(identity.gid).context("switching the effective gid for the peer connection")?;
    if let Err(err) = seteuid(identity.uid) {
        let _ = setegid(Gid::from_raw(0));
        return Err(err).context("switching the effective uid for the peer connection");
    }
    let result = f();
    seteuid(Uid::from_raw(0)).context("switching the effective uid back to root")?;
    setegid(Gid::from_raw(0)).context("switching the effective gid back to root")?;
    Ok(result)
}

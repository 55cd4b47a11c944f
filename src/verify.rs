//! `verify`: log in as every configured role with its current secret, the way the
//! application will (TCP + SCRAM), and report which roles work.
//!
//! This is the check after a rotation: it proves the server accepts what the files say,
//! independently of how the passwords got there. A NOLOGIN owner role can be checked to
//! still refuse logins (`--owner`).
//!
//! A successful login only proves something when the server checked the password. The
//! official postgres image runs `initdb` without `-A`, so its `pg_hba.conf` trusts
//! 127.0.0.1 and ::1 and only the appended `host all all all scram-sha-256` line asks for
//! a password: on loopback any password "works". So before a login counts, the same role
//! must first be refused with a deliberately wrong, random password (SQLSTATE 28P01);
//! a role whose wrong password is accepted is reported `not verifiable` and fails the run.
//! Verify logs in at `--host` (one host or a list), else at `PGHOST` when it names TCP
//! hosts; else (a socket directory, as in the container) it tries 127.0.0.1 and then this
//! machine's own non-loopback addresses (the container's, read from the kernel with
//! getifaddrs), and uses the first one where the server checks passwords. A list of hosts
//! is followed as libpq does (`PGTARGETSESSIONATTRS`): each server in order, the first of
//! the kind asked for (`session::target`), and each with its own wrong-password check.
//!
//! A refused wrong password does not prove that the answer came from the server: anyone
//! can listen on a port where the server does not (a local user on the machine's own
//! address, when postgres listens on loopback only; whoever a `--host` name resolves to),
//! refuse the decoy, and ask for the real password in clear text. So verify logs in
//! through `session::auth_watch`, which fails the connection before anything is sent when the
//! server asks for the password in clear text or as MD5: a password leaves only through
//! SCRAM, which never reveals it and whose final message proves that the server holds
//! the role's verifier (tokio-postgres checks that signature). A login counts as `ok` only
//! when it went through that exchange: a stand-in that refuses each decoy and lets each
//! real login in without asking for anything proves nothing, and is `not verifiable`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use nix::net::if_::InterfaceFlags;
use serde::Serialize;
use tokio_postgres::{Client, NoTls};
use zeroize::Zeroizing;

use crate::config::{Config, Host, RoleSpec, SecretRef, SecretSet, Server, TargetSession};
use crate::error::Failure;
use crate::overlap::service_file::Section;
use crate::secret::{self, Secret};
use crate::session::auth_watch::Watched;
use crate::session::connect;
use crate::session::target::{self, NoTarget};
use crate::sync::ReportFormat;

/// Where verify logs in when no `--host`/`PG_VERIFY_HOST` is given (tried first).
const DEFAULT_HOST: &str = "127.0.0.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ok,
    Failed,
    /// The server let a wrong password in: a successful login would prove nothing.
    NotVerifiable,
}

#[derive(Debug, Serialize)]
struct RoleCheck {
    role: String,
    ok: bool,
    status: Status,
    /// `host:port` the check logged in at.
    at: String,
    detail: String,
}

impl RoleCheck {
    fn new(role: &str, status: Status, at: &str, detail: String) -> RoleCheck {
        RoleCheck {
            role: role.to_owned(),
            ok: status == Status::Ok,
            status,
            at: at.to_owned(),
            detail,
        }
    }
}

/// What `verify` was asked to check.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    pub config: Config,
    /// Host to log in over TCP; `None`: find an address where the server checks passwords.
    pub host: Option<String>,
    /// A NOLOGIN owner role that must refuse login.
    pub owner: Option<String>,
    /// Overlap mode: also check the unpublished logins.
    pub staged: bool,
    pub format: ReportFormat,
}

/// `pg-password-sync verify`.
pub fn command(settings: VerifySettings) -> anyhow::Result<u8> {
    crate::runtime::block_on(verify(settings))
}

async fn verify(args: VerifySettings) -> anyhow::Result<u8> {
    let mut config = args.config.clone();
    if args.staged && config.overlap.is_none() {
        return Err(anyhow::anyhow!("--staged needs --overlap")).context(Failure::Config);
    }
    // Any length: verify reports whether the values in force log in, whatever they are.
    let secrets = config.load_secrets(0)?;
    let probe_role = secrets.entries.first().map(|(spec, _)| spec.name.as_str());
    config.connection.servers = servers_to_verify(&config, &args, probe_role).await?;
    let mut checks = Vec::new();
    for (spec, secret, what) in logins_to_verify(&secrets, args.staged) {
        let published = secrets
            .published
            .iter()
            .find(|p| p.published_login() == spec.name);
        let section = published.and_then(|p| secrets.service.as_ref()?.get(&p.role));
        let mut check = match section.map(|section| through_section(&config, section)) {
            None => check_role(&config, &spec.name, secret).await,
            Some(Ok(through)) => check_role(&through, &spec.name, secret).await,
            Some(Err(why)) => {
                RoleCheck::new(&spec.name, Status::Failed, &connect::describe(&config), why)
            }
        };
        check.detail.push_str(what);
        checks.push(check);
    }
    if let Some(owner) = &args.owner {
        checks.push(check_owner(&config, owner).await?);
    }
    report(&checks, args.format)?;
    verdict(&checks, &connect::describe(&config))
}

/// Where verify logs in: `--host` (a list pairs with `PGPORT` as libpq pairs them), else
/// `PGHOST` when every entry is a TCP host, else the first discovered address where the
/// server checks passwords (`choose_host`), on the first port.
async fn servers_to_verify(
    config: &Config,
    args: &VerifySettings,
    probe_role: Option<&str>,
) -> anyhow::Result<Vec<Server>> {
    let tcp_only = |servers: &[Server]| servers.iter().all(|s| matches!(s.host, Host::Tcp(_)));
    if let Some(hosts) = &args.host {
        let servers =
            crate::config::servers(hosts, &ports_text(config)).context(Failure::Config)?;
        if !tcp_only(&servers) {
            return Err(anyhow::anyhow!(
                "--host names a socket directory; verify logs in over TCP, as applications do"
            ))
            .context(Failure::Config);
        }
        return Ok(servers);
    }
    if tcp_only(&config.connection.servers) {
        return Ok(config.connection.servers.clone());
    }
    let port = config
        .connection
        .servers
        .first()
        .map_or(crate::config::DEFAULT_PORT, |s| s.port);
    let host = choose_host(config, port, &discovery_candidates(), probe_role).await;
    Ok(vec![Server {
        host: Host::Tcp(host),
        port,
    }])
}

/// The connection an application makes through its `pg_service.conf` section: the
/// section's `host` (or `hostaddr`), `port`, `dbname` and `target_session_attrs` replace
/// verify's own, as libpq lets them (a list of hosts included). A section verify cannot
/// follow is an error saying why (an application may still connect, but nothing here
/// proves it): a socket directory, a kind of session verify does not look for, or an
/// `sslmode` that demands TLS, which verify's SCRAM-only login does not speak.
fn through_section(config: &Config, section: &Section) -> Result<Config, String> {
    let setting = |key: &str| {
        section
            .other
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut through = config.clone();
    let name = &section.name;
    // libpq takes only numeric addresses there, and fails every login otherwise.
    if let Some(addr) = setting("hostaddr")
        && addr
            .split(',')
            .any(|a| a.trim().parse::<std::net::IpAddr>().is_err())
    {
        return Err(format!(
            "pg_service.conf section [{name}]: hostaddr {addr:?} is not a numeric address, \
             which libpq refuses"
        ));
    }
    let hosts = setting("hostaddr").or(setting("host"));
    if hosts.is_some() || setting("port").is_some() {
        let hosts = hosts.map_or_else(|| hosts_text(config), str::to_owned);
        let ports = setting("port").map_or_else(|| ports_text(config), str::to_owned);
        through.connection.servers = crate::config::servers(&hosts, &ports)
            .map_err(|err| format!("pg_service.conf section [{name}]: {err:#}"))?;
        if let Some(dir) = through
            .connection
            .servers
            .iter()
            .find_map(|s| match &s.host {
                Host::Socket(dir) => Some(dir.display().to_string()),
                Host::Tcp(_) => None,
            })
        {
            return Err(format!(
                "pg_service.conf section [{name}] connects to the socket directory {dir:?}: \
                 verify follows TCP hosts only, so what applications get is not checked"
            ));
        }
    }
    if let Some(attrs) = setting("target_session_attrs") {
        through.connection.target = TargetSession::parse(attrs)
            .map_err(|why| format!("pg_service.conf section [{name}]: {why}"))?;
    }
    if let Some(dbname) = setting("dbname") {
        through.connection.dbname = dbname.to_owned();
    }
    if let Some(mode @ ("require" | "verify-ca" | "verify-full")) = setting("sslmode") {
        return Err(format!(
            "pg_service.conf section [{name}] asks for sslmode={mode}, which verify does \
             not speak: what applications get is not checked"
        ));
    }
    // Any other setting libpq accepts may make every application's login fail on its own
    // (`channel_binding=require` without TLS, `target_session_attrs=standby`, a startup
    // option, a replication connection, a value libpq refuses): only those known not to
    // are passed over.
    if let Some((key, _)) = section
        .other
        .iter()
        .find(|(key, value)| !passed_over(key, value))
    {
        return Err(format!(
            "pg_service.conf section [{name}] sets {key}, which verify does not follow: what \
             applications get is not checked"
        ));
    }
    Ok(through)
}

/// The hosts of `config`'s servers in libpq's list form.
fn hosts_text(config: &Config) -> String {
    let hosts: Vec<String> = config
        .connection
        .servers
        .iter()
        .map(|s| match &s.host {
            Host::Tcp(host) => host.clone(),
            Host::Socket(dir) => dir.display().to_string(),
        })
        .collect();
    hosts.join(",")
}

/// The ports of `config`'s servers in libpq's list form (one when they all agree, so
/// that it pairs with a section's list of hosts).
fn ports_text(config: &Config) -> String {
    let ports: Vec<String> = config
        .connection
        .servers
        .iter()
        .map(|s| s.port.to_string())
        .collect();
    if ports.windows(2).all(|w| w[0] == w[1]) {
        ports.first().cloned().unwrap_or_default()
    } else {
        ports.join(",")
    }
}

/// Whether verify may pass over a section's `key=value` (or follows it): a setting that
/// cannot by itself make a password login over TCP without TLS fail, with a value libpq
/// accepts. Names the cases; anything else is not followed.
fn passed_over(key: &str, value: &str) -> bool {
    let integer = || value.trim().parse::<i32>().is_ok();
    match key {
        "host" | "hostaddr" | "port" | "dbname" => true,
        "application_name" | "fallback_application_name" | "passfile" => true,
        "connect_timeout"
        | "keepalives"
        | "keepalives_idle"
        | "keepalives_interval"
        | "keepalives_count"
        | "tcp_user_timeout" => integer(),
        "sslmode" => matches!(value, "disable" | "allow" | "prefer"),
        "channel_binding" | "gssencmode" => matches!(value, "disable" | "prefer"),
        // Followed (`through_section`) when it is a kind verify looks for.
        "target_session_attrs" => TargetSession::parse(value).is_ok(),
        "load_balance_hosts" => matches!(value, "disable" | "random"),
        _ => false,
    }
}

/// What `verify` checks, with a note for its report: without overlap every login of the
/// set; with it the published login of each overlapped role (its password is the one
/// `pg_service.conf` holds, checked equal on reading) and every other role (the
/// superuser), plus with `staged` each unpublished login with its file's password.
fn logins_to_verify(set: &SecretSet, staged: bool) -> Vec<(&RoleSpec, &Secret, &'static str)> {
    set.entries
        .iter()
        .filter_map(|(spec, secret)| {
            let name = spec.name.as_str();
            match set.published.iter().find(|p| p.which(name).is_some()) {
                None => Some((spec, secret, "")),
                Some(p) if p.published_login() == name => Some((spec, secret, ", published")),
                Some(_) if staged => Some((spec, secret, ", unpublished")),
                Some(_) => None,
            }
        })
        .collect()
}

/// Prints the report on stdout.
fn report(checks: &[RoleCheck], format: ReportFormat) -> anyhow::Result<()> {
    match format {
        ReportFormat::Text => {
            for check in checks {
                let verdict = match check.status {
                    Status::Ok => "ok",
                    Status::Failed => "FAILED",
                    Status::NotVerifiable => "not verifiable",
                };
                println!("role {:?}: {verdict} ({})", check.role, check.detail);
            }
        }
        ReportFormat::Json => println!(
            "{}",
            serde_json::to_string(checks).context("serialising the report")?
        ),
    }
    Ok(())
}

/// Exit status of the run: 0 when every check passed, else `Failure::Verify` (exit 7)
/// naming the failed roles, with a hint when the server trusted the connection.
fn verdict(checks: &[RoleCheck], at: &str) -> anyhow::Result<u8> {
    let roles = |status| {
        checks
            .iter()
            .filter(|c| c.status == status)
            .map(|c| c.role.as_str())
            .collect::<Vec<_>>()
    };
    let (failed, unverifiable) = (roles(Status::Failed), roles(Status::NotVerifiable));
    if !unverifiable.is_empty() {
        let failed_too = if failed.is_empty() {
            String::new()
        } else {
            format!("; role(s) {failed:?} failed")
        };
        return Err(anyhow::anyhow!(
            "role(s) {unverifiable:?} not verifiable: the server at {at} accepts any password \
             (a trust line in pg_hba.conf){failed_too}. Hint: verify over an address that \
             pg_hba.conf checks, e.g. --host (or PG_VERIFY_HOST) with the server's \
             container/pod IP or service name; the official image trusts only 127.0.0.1 and ::1"
        ))
        .context(Failure::Verify);
    }
    if failed.is_empty() {
        Ok(0)
    } else {
        Err(anyhow::anyhow!("role(s) {failed:?} failed")).context(Failure::Verify)
    }
}

/// What a login with a wrong password showed about a connection.
#[derive(Debug)]
enum Probe {
    /// Refused as a wrong password (SQLSTATE 28P01): the server checks passwords here.
    Checked,
    /// Accepted: a trust rule (or anything else that ignores the password) applies.
    Trusted,
    /// Any other failure (no server, no pg_hba.conf entry, unknown role, …).
    Failed(anyhow::Error),
}

/// Logs in as `role` at `server` with a fresh random password that cannot be the real one.
async fn probe(config: &Config, server: &Server, role: &str) -> Probe {
    let decoy = match decoy_password() {
        Ok(decoy) => decoy,
        Err(err) => return Probe::Failed(err),
    };
    match login_one(config, server, role, &decoy).await {
        Ok(_) => Probe::Trusted,
        Err(err) if sqlstate_is(&err, &tokio_postgres::error::SqlState::INVALID_PASSWORD) => {
            Probe::Checked
        }
        Err(err) => Probe::Failed(err),
    }
}

/// 32 random bytes from the kernel, hex-encoded: never a password anyone set. It is a
/// `Secret` like the real ones, so it is redacted everywhere and zeroized on drop.
fn decoy_password() -> anyhow::Result<Secret> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).map_err(|err| anyhow::anyhow!("getrandom: {err}"))?;
    let mut text = String::with_capacity(64);
    for byte in bytes.iter() {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    Ok(Secret::new(text))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Picks the first candidate where the server checks `role`'s password. When none does,
/// the first trusting candidate (its roles are then reported not verifiable), else the
/// first one (its roles then report the connection error).
async fn choose_host(
    config: &Config,
    port: u16,
    candidates: &[String],
    role: Option<&str>,
) -> String {
    let first = candidates
        .first()
        .cloned()
        .unwrap_or_else(|| DEFAULT_HOST.to_owned());
    let Some(role) = role else {
        return first;
    };
    if candidates.len() < 2 {
        return first;
    }
    let mut trusted = None;
    for host in candidates {
        let server = Server {
            host: Host::Tcp(host.clone()),
            port,
        };
        let at = connect::describe_server(&server);
        match probe(config, &server, role).await {
            Probe::Checked => {
                tracing::info!("verifying at {at}: the server checks passwords there");
                return host.clone();
            }
            Probe::Trusted => {
                tracing::info!(
                    "{at} accepts a wrong password (pg_hba.conf trusts it); trying the next address"
                );
                trusted.get_or_insert_with(|| host.clone());
            }
            Probe::Failed(err) => tracing::info!("{at} is not usable: {err:#}"),
        }
    }
    trusted.unwrap_or(first)
}

/// What one checked login showed.
#[derive(Debug)]
pub enum Login {
    /// A wrong password was refused and the real one accepted through a full SCRAM exchange.
    LoggedIn,
    /// The server accepted a wrong password: no login there proves anything.
    Trusted,
    /// A wrong password was refused, but the real login went through without a SCRAM
    /// exchange (not the same server or rule each time): it proves nothing either.
    Unchecked,
    /// The probe or the login failed (wrong password, unknown role, no server, …).
    Failed(anyhow::Error),
}

/// The one login check (also `rotate`'s): `role` must first be refused with a random
/// wrong password, and only then log in with `secret`, over `config`'s connection.
pub async fn checked_login(config: &Config, role: &str, secret: &Secret) -> Login {
    checked_login_at(config, role, secret).await.0
}

/// What one server of the list made of a checked login.
enum Attempt {
    Done(Login),
    /// It is not the kind of server `PGTARGETSESSIONATTRS` asks for.
    PassedOver(&'static str),
    /// No connection (refused, timed out): libpq tries the next host.
    Unreachable(anyhow::Error),
}

/// `checked_login`, and where it ended. With a list of servers, each in order (its own
/// wrong password first) until one is the kind asked for, as libpq does: a server that
/// answers ends the search (a wrong password, an unknown role), one that cannot be reached
/// or is of the wrong kind does not.
async fn checked_login_at(config: &Config, role: &str, secret: &Secret) -> (Login, String) {
    let mut passed_over = NoTarget {
        target: config.connection.target,
        standbys: 0,
        reasons: Vec::new(),
    };
    for server in &config.connection.servers {
        let at = connect::describe_server(server);
        match checked_login_one(config, server, role, secret).await {
            Attempt::Done(login) => return (login, at),
            Attempt::Unreachable(err) if config.connection.servers.len() == 1 => {
                return (Login::Failed(err), at);
            }
            Attempt::Unreachable(err) => passed_over.reasons.push(format!("{at}: {err:#}")),
            Attempt::PassedOver(why) => {
                passed_over.standbys += 1;
                passed_over.reasons.push(format!("{at}: {why}"));
            }
        }
    }
    let err = anyhow::Error::new(passed_over);
    (Login::Failed(err), connect::describe(config))
}

async fn checked_login_one(
    config: &Config,
    server: &Server,
    role: &str,
    secret: &Secret,
) -> Attempt {
    match probe(config, server, role).await {
        Probe::Checked => {}
        Probe::Trusted => return Attempt::Done(Login::Trusted),
        Probe::Failed(err) if is_unreached(&err) => return Attempt::Unreachable(err),
        Probe::Failed(err) => return Attempt::Done(Login::Failed(err)),
    }
    // Through the SCRAM-only login: a clear-text request is refused before anything is
    // sent, and only a completed SCRAM exchange proves the server holds the verifier.
    match login_one(config, server, role, secret).await {
        Ok((connected, Checked::Scram)) => {
            match target::check_login(
                &connected,
                config.connection.target,
                config.connection.connect_timeout,
            )
            .await
            {
                Ok(None) => Attempt::Done(Login::LoggedIn),
                Ok(Some(why)) => Attempt::PassedOver(why),
                Err(err) => Attempt::Done(Login::Failed(err)),
            }
        }
        Ok((_, Checked::Not)) => Attempt::Done(Login::Unchecked),
        Err(err) => Attempt::Done(Login::Failed(err)),
    }
}

/// One login role: a wrong password must be refused, then the real one accepted.
async fn check_role(config: &Config, role: &str, secret: &Secret) -> RoleCheck {
    let (login, at) = checked_login_at(config, role, secret).await;
    match login {
        Login::LoggedIn => RoleCheck::new(
            role,
            Status::Ok,
            &at,
            "logs in; a wrong password is refused".into(),
        ),
        Login::Trusted => RoleCheck::new(
            role,
            Status::NotVerifiable,
            &at,
            format!(
                "the server trusts this connection: pg_hba.conf lets {role:?} in at {at} \
                 with a wrong password, so a login proves nothing"
            ),
        ),
        Login::Unchecked => RoleCheck::new(
            role,
            Status::NotVerifiable,
            &at,
            format!(
                "the server let {role:?} in at {at} without checking a password (no SCRAM \
                 exchange), although it refused a wrong one just before: not the same server \
                 or rule each time, so a login proves nothing"
            ),
        ),
        Login::Failed(err) => RoleCheck::new(role, Status::Failed, &at, format!("{err:#}")),
    }
}

/// The NOLOGIN owner role must be refused as such (its password does not matter: the
/// server refuses a NOLOGIN role after authentication, trust or not).
async fn check_owner(config: &Config, owner: &str) -> anyhow::Result<RoleCheck> {
    let at = connect::describe(config);
    let path = config
        .resolve(&SecretRef::Name("postgres_app_owner_pw".into()))
        .context(Failure::Config)?;
    let secret = secret::read_file(&path).context(Failure::Config)?;
    let result = login_first(config, owner, &secret).await;
    Ok(match result {
        Ok(_) => RoleCheck::new(
            owner,
            Status::Failed,
            &at,
            "NOLOGIN owner role accepted a login".into(),
        ),
        Err(err) if refuses_login(&err) => {
            RoleCheck::new(owner, Status::Ok, &at, "refuses login (NOLOGIN)".into())
        }
        Err(err) => RoleCheck::new(
            owner,
            Status::Failed,
            &at,
            format!("unexpected error instead of a NOLOGIN refusal: {err:#}"),
        ),
    })
}

/// True when the server refused the login because the role may not log in (SQLSTATE
/// 28000 with "not permitted to log in"), as opposed to a wrong password or no server.
fn refuses_login(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error)
            .is_some_and(|db| db.message().contains("not permitted to log in"))
    })
}

/// True when the server answered with this SQLSTATE.
fn sqlstate_is(err: &anyhow::Error, state: &tokio_postgres::error::SqlState) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            .is_some_and(|code| code == state)
    })
}

/// Whether a login that succeeded proved the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    /// Through SCRAM, whose final message (its signature checked by tokio-postgres) shows
    /// the server holds the role's verifier.
    Scram,
    /// Let in without any password exchange.
    Not,
}

/// Logs in at the first server of the list that can be reached (libpq does not try the
/// next one after an answer, even a refusal).
async fn login_first(config: &Config, role: &str, password: &Secret) -> anyhow::Result<Client> {
    let mut last = None;
    for server in &config.connection.servers {
        match login_one(config, server, role, password).await {
            Err(err) if is_unreached(&err) => last = Some(err),
            result => return result.map(|(connected, _)| connected.client),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no server to log in at")))
}

/// The TCP connection to a server could not be made (refused, unreachable, timed out):
/// libpq then tries the next host of the list.
#[derive(Debug)]
struct Unreached;

impl std::fmt::Display for Unreached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no connection")
    }
}

impl std::error::Error for Unreached {}

/// anyhow finds a context value (`err.context(Unreached)`) as well as a root error.
fn is_unreached(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Unreached>().is_some()
}

/// Logs in as `role` with `password` over TCP to `server`, the way the application does,
/// except that the password is sent only through SCRAM (`session::auth_watch`).
async fn login_one(
    config: &Config,
    server: &Server,
    role: &str,
    password: &Secret,
) -> anyhow::Result<(connect::Connected, Checked)> {
    let Host::Tcp(host) = &server.host else {
        // Verify always sets TCP hosts; a socket would be the superuser's way in.
        anyhow::bail!("verify logs in over TCP only");
    };
    let mut pg = tokio_postgres::Config::new();
    pg.user(role)
        .dbname(&config.connection.dbname)
        .application_name("pg-password-sync")
        // No SSLRequest: its one-byte answer is no message, and `Watched` reads the
        // stream from its first byte as messages (NoTls would skip it anyway).
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .password(password.expose());
    let attempt = async {
        let stream = connect::tcp_stream(host, server.port)
            .await
            .map_err(|err| err.context(Unreached))?;
        let scram_done = Arc::new(AtomicBool::new(false));
        let watched = Watched::reporting(stream, scram_done.clone());
        let (client, connection) = pg.connect_raw(watched, NoTls).await?;
        let checked = if scram_done.load(Ordering::Relaxed) {
            Checked::Scram
        } else {
            Checked::Not
        };
        anyhow::Ok((connect::started(client, connection), checked))
    };
    tokio::time::timeout(config.connection.connect_timeout, attempt)
        .await
        .map_err(|_| {
            anyhow::Error::new(Unreached).context(format!(
                "timed out after {:?}",
                config.connection.connect_timeout
            ))
        })?
}

/// 127.0.0.1, then this machine's own addresses (see `own_addresses`).
fn discovery_candidates() -> Vec<String> {
    let mut hosts = vec![DEFAULT_HOST.to_owned()];
    hosts.extend(own_addresses().iter().map(IpAddr::to_string));
    hosts
}

/// The addresses of this machine's (container's) interfaces, from the kernel
/// (getifaddrs: netlink, so no /proc parsing). A failure only means no extra candidates.
fn own_addresses() -> Vec<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => reachable_non_loopback(addrs.filter_map(|a| {
            let address = a.address?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((a.flags, ip))
        })),
        Err(err) => {
            tracing::debug!("getifaddrs: {err}");
            Vec::new()
        }
    }
}

/// Addresses worth trying, IPv4 first: interfaces that are up, not loopback (pg_hba.conf's
/// trust lines of the official image are for loopback), not IPv6 link-local (needs a
/// scope id), no duplicates.
fn reachable_non_loopback(
    addrs: impl IntoIterator<Item = (InterfaceFlags, IpAddr)>,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for (flags, ip) in addrs {
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if flags.contains(InterfaceFlags::IFF_UP)
            && !flags.contains(InterfaceFlags::IFF_LOOPBACK)
            && !ip.is_loopback()
            && !ip.is_unspecified()
            && !link_local_v6
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out.sort_by_key(IpAddr::is_ipv6);
    out
}

#[cfg(test)]
mod tests {

    use crate::secret::test_entry as entry;

    #[test]
    fn a_section_is_followed_as_libpq_does_or_refused_with_a_reason() {
        let config = crate::config::test_config();
        let section = |other: &[(&str, &str)]| Section {
            name: "app".into(),
            user: Some("app".into()),
            password: None,
            other: other
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let through = through_section(
            &config,
            &section(&[
                ("host", "db.example"),
                ("port", "6432"),
                ("dbname", "appdb"),
            ]),
        )
        .unwrap();
        let tcp = |host: &str, port| Server {
            host: Host::Tcp(host.into()),
            port,
        };
        assert_eq!(through.connection.servers, [tcp("db.example", 6432)]);
        assert_eq!(through.connection.dbname, "appdb");
        let same = through_section(
            &config,
            &section(&[
                ("sslmode", "prefer"),
                ("application_name", "app"),
                ("connect_timeout", "10"),
                ("target_session_attrs", "any"),
            ]),
        )
        .unwrap();
        assert_eq!(same.connection.servers, config.connection.servers);
        // A list of hosts, paired with the section's ports as libpq pairs them, and the
        // kind of session the application asks for.
        let cluster = through_section(
            &config,
            &section(&[
                ("host", "n1,n2,n3"),
                ("port", "5001,5002,5003"),
                ("target_session_attrs", "read-write"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cluster.connection.servers,
            [tcp("n1", 5001), tcp("n2", 5002), tcp("n3", 5003)]
        );
        assert_eq!(cluster.connection.target, TargetSession::ReadWrite);
        for (other, needle) in [
            (("port", "x"), "not a port number"),
            (("host", "/run/postgresql"), "TCP hosts only"),
            (("host", "a,/run/postgresql"), "TCP hosts only"),
            (
                ("target_session_attrs", "standby"),
                "no password can be set",
            ),
            (("sslmode", "verify-full"), "sslmode=verify-full"),
            (("channel_binding", "require"), "sets channel_binding"),
            (("options", "-c role=x"), "sets options"),
            (("replication", "true"), "sets replication"),
            (("connect_timeout", "soon"), "sets connect_timeout"),
            (("hostaddr", "db.example"), "not a numeric address"),
        ] {
            let err = through_section(&config, &section(&[other])).unwrap_err();
            assert!(err.contains(needle) && err.contains("[app]"), "{err}");
        }
    }

    #[test]
    fn an_unreached_server_is_told_apart_however_the_error_is_wrapped() {
        let refused = anyhow::anyhow!("connection refused");
        assert!(is_unreached(&refused.context(Unreached).context("outer")));
        assert!(is_unreached(
            &anyhow::Error::new(Unreached).context("timed out")
        ));
        assert!(!is_unreached(&anyhow::anyhow!(
            "password authentication failed"
        )));
    }

    #[test]
    fn verify_checks_the_published_logins_and_with_staged_the_others() {
        let entries = vec![
            entry("postgres", "a"),
            entry("app", "b"),
            entry("app_alt", "c"),
        ];
        let mut pair = crate::overlap::Pair::of(&entries[1].0, "_alt").unwrap();
        pair.published = crate::overlap::Login::Twin;
        let set = SecretSet {
            entries,
            published: vec![pair],
            service: None,
        };
        let names = |staged| -> Vec<String> {
            logins_to_verify(&set, staged)
                .iter()
                .map(|(spec, _, note)| format!("{}{note}", spec.name))
                .collect()
        };
        assert_eq!(names(false), ["postgres", "app_alt, published"]);
        assert_eq!(
            names(true),
            ["postgres", "app, unpublished", "app_alt, published"]
        );
        let plain = SecretSet {
            entries: set.entries.clone(),
            published: Vec::new(),
            service: None,
        };
        assert_eq!(logins_to_verify(&plain, true).len(), 3);
    }

    use super::*;

    #[test]
    fn candidates_skip_loopback_down_and_link_local_and_put_ipv4_first() {
        let up = InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING;
        let addrs = [
            (up | InterfaceFlags::IFF_LOOPBACK, "127.0.0.1"),
            (up | InterfaceFlags::IFF_LOOPBACK, "::1"),
            (up, "fd00::2"),
            (up, "fe80::1"),
            (up, "172.18.0.2"),
            (InterfaceFlags::empty(), "172.17.0.1"),
            (up, "172.18.0.2"),
            (up, "10.0.0.5"),
        ]
        .map(|(flags, ip)| (flags, ip.parse::<IpAddr>().unwrap()));
        let got: Vec<String> = reachable_non_loopback(addrs)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["172.18.0.2", "10.0.0.5", "fd00::2"]);
    }

    #[test]
    fn decoys_are_long_random_and_redacted() {
        let (a, b) = (decoy_password().unwrap(), decoy_password().unwrap());
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?} {a}").contains(a.expose()));
    }

    #[test]
    fn not_verifiable_fails_with_a_hint() {
        let checks = [
            RoleCheck::new("a", Status::Ok, "h:1", String::new()),
            RoleCheck::new("b", Status::NotVerifiable, "h:1", String::new()),
        ];
        let err = verdict(&checks, "127.0.0.1:5432").unwrap_err();
        assert_eq!(Failure::of(&err), Some(Failure::Verify));
        let text = format!("{err:#}");
        assert!(text.contains("[\"b\"] not verifiable"), "{text}");
        assert!(text.contains("--host"), "{text}");
        assert_eq!(verdict(&checks[..1], "x").unwrap(), 0);
    }
}

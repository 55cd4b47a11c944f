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
//! Without an explicit `--host`, verify tries 127.0.0.1 and then this machine's own
//! non-loopback addresses (the container's, read from the kernel with getifaddrs), and
//! uses the first one where the server checks passwords.

use std::net::IpAddr;

use anyhow::Context;
use nix::net::if_::InterfaceFlags;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::config::{Config, ConfigSettings, Host, SecretRef};
use crate::error::Failure;
use crate::overlap;
use crate::secret::{self, Secret};
use crate::sync::ReportFormat;
use crate::sync::connect::{self, Auth};

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
    pub config: ConfigSettings,
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
    let mut config = Config::from_settings(&args.config)?;
    if args.staged && config.overlap.is_none() {
        return Err(anyhow::anyhow!("--staged needs --overlap")).context(Failure::Config);
    }
    let secrets = config.load_secrets()?;
    let candidates = match &args.host {
        Some(host) => vec![host.clone()],
        None => discovery_candidates(),
    };
    let probe_role = secrets.entries.first().map(|(spec, _)| spec.name.as_str());
    config.host = Host::Tcp(choose_host(&config, &candidates, probe_role).await);
    let mut checks = Vec::new();
    for (spec, secret, what) in overlap::logins_to_verify(&secrets, args.staged) {
        let mut check = check_role(&config, &spec.name, secret).await;
        check.detail.push_str(what);
        checks.push(check);
    }
    if let Some(owner) = &args.owner {
        checks.push(check_owner(&config, owner).await?);
    }
    report(&checks, args.format)?;
    verdict(&checks, &connect::describe(&config))
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

/// Logs in as `role` with a fresh random password that cannot be the real one.
async fn probe(config: &Config, role: &str) -> Probe {
    let decoy = match decoy_password() {
        Ok(decoy) => decoy,
        Err(err) => return Probe::Failed(err),
    };
    match connect::connect(
        config,
        role,
        &Auth::Password(&decoy, "wrong password probe"),
    )
    .await
    {
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
async fn choose_host(config: &Config, candidates: &[String], role: Option<&str>) -> String {
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
    let mut probe_config = config.clone();
    for host in candidates {
        probe_config.host = Host::Tcp(host.clone());
        let at = connect::describe(&probe_config);
        match probe(&probe_config, role).await {
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
    /// A wrong password was refused and the real one accepted.
    LoggedIn,
    /// The server accepted a wrong password: no login there proves anything.
    Trusted,
    /// The probe or the login failed (wrong password, unknown role, no server, …).
    Failed(anyhow::Error),
}

/// The one login check (also `rotate`'s): `role` must first be refused with a random
/// wrong password, and only then log in with `secret`, over `config`'s connection.
pub async fn checked_login(config: &Config, role: &str, secret: &Secret) -> Login {
    match probe(config, role).await {
        Probe::Checked => {}
        Probe::Trusted => return Login::Trusted,
        Probe::Failed(err) => return Login::Failed(err),
    }
    match connect::connect(config, role, &Auth::Password(secret, "secret file")).await {
        Ok(_) => Login::LoggedIn,
        Err(err) => Login::Failed(err),
    }
}

/// One login role: a wrong password must be refused, then the real one accepted.
async fn check_role(config: &Config, role: &str, secret: &Secret) -> RoleCheck {
    let at = connect::describe(config);
    match checked_login(config, role, secret).await {
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
    let result = connect::connect(config, owner, &Auth::Password(&secret, "secret file")).await;
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

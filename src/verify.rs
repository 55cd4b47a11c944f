//! `verify`: log in as every configured role with its current secret, the way the
//! application will (TCP + SCRAM), and report which roles work.
//!
//! This is the check after a rotation: it proves the server accepts what the files say,
//! independently of how the passwords got there. A NOLOGIN owner role can be checked to
//! still refuse logins (`--owner`).

use anyhow::Context;
use serde::Serialize;

use crate::config::{Config, ConfigSettings, Host, SecretRef};
use crate::error::Failure;
use crate::overlap;
use crate::secret;
use crate::sync::ReportFormat;
use crate::sync::connect::{self, Auth};

#[derive(Debug, Serialize)]
struct RoleCheck {
    role: String,
    ok: bool,
    detail: String,
}

/// What `verify` was asked to check.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    pub config: ConfigSettings,
    /// Host to log in over TCP.
    pub host: String,
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
    config.host = Host::Tcp(args.host.clone());
    if args.staged && config.overlap.is_none() {
        return Err(anyhow::anyhow!("--staged needs --overlap")).context(Failure::Config);
    }
    let secrets = config.load_secrets()?;
    let mut checks = Vec::new();
    for (spec, secret, what) in overlap::logins_to_verify(&secrets, args.staged) {
        let result =
            connect::connect(&config, &spec.name, &Auth::Password(secret, "secret file")).await;
        checks.push(match result {
            Ok(_) => RoleCheck {
                role: spec.name.clone(),
                ok: true,
                detail: format!("logs in{what}"),
            },
            Err(err) => RoleCheck {
                role: spec.name.clone(),
                ok: false,
                detail: format!("{err:#}"),
            },
        });
    }
    if let Some(owner) = &args.owner {
        let path = config
            .resolve(&SecretRef::Name("postgres_app_owner_pw".into()))
            .context(Failure::Config)?;
        let secret = secret::read_file(&path).context(Failure::Config)?;
        let result =
            connect::connect(&config, owner, &Auth::Password(&secret, "secret file")).await;
        checks.push(match result {
            Ok(_) => RoleCheck {
                role: owner.clone(),
                ok: false,
                detail: "NOLOGIN owner role accepted a login".into(),
            },
            Err(err) if refuses_login(&err) => RoleCheck {
                role: owner.clone(),
                ok: true,
                detail: "refuses login (NOLOGIN)".into(),
            },
            Err(err) => RoleCheck {
                role: owner.clone(),
                ok: false,
                detail: format!("unexpected error instead of a NOLOGIN refusal: {err:#}"),
            },
        });
    }
    match args.format {
        ReportFormat::Text => {
            for check in &checks {
                let verdict = if check.ok { "ok" } else { "FAILED" };
                println!("role {:?}: {verdict} ({})", check.role, check.detail);
            }
        }
        ReportFormat::Json => println!(
            "{}",
            serde_json::to_string(&checks).context("serialising the report")?
        ),
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.role.as_str())
        .collect();
    if failed.is_empty() {
        Ok(0)
    } else {
        Err(anyhow::anyhow!("role(s) {failed:?} failed")).context(Failure::Verify)
    }
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

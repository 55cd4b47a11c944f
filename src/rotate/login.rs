//! The one login check of a rotation: log in over TCP with SCRAM, the way applications do,
//! and count the login only where the server checks passwords.
//!
//! A login proves that the server holds a password only if a wrong one is refused: behind
//! a `trust` line in `pg_hba.conf` (the official image trusts 127.0.0.1 and ::1) every
//! password "works", and publishing a login on that evidence could hand applications a
//! password the server never got. So each check first logs in with a fresh random decoy,
//! which must be refused as a wrong password (SQLSTATE 28P01), and only then with the real
//! one. `verify` makes the same check; this is kept as one small function so that both can
//! share one implementation once they meet.

use tokio_postgres::error::SqlState;

use crate::config::Config;
use crate::secret::Secret;
use crate::sync::connect::{self, Auth};

/// What one checked login showed.
#[derive(Debug)]
pub enum Outcome {
    /// A wrong password was refused and the real one accepted.
    LoggedIn,
    /// The server accepted a wrong password: no login here proves anything.
    Trusted,
    /// The login failed (wrong password, unknown role, no server, …).
    Failed(anyhow::Error),
}

/// Logs in as `user` with `password` over the configured (TCP) connection, after checking
/// that a wrong password is refused there.
pub async fn checked(config: &Config, user: &str, password: &Secret) -> Outcome {
    let decoy = match crate::keyfiles::overlap::new_password() {
        Ok(decoy) => decoy,
        Err(err) => return Outcome::Failed(err),
    };
    // The decoy is 32 random characters: it cannot be anyone's password in practice.
    match connect::connect(
        config,
        user,
        &Auth::Password(&decoy, "wrong password probe"),
    )
    .await
    {
        Ok(_) => return Outcome::Trusted,
        Err(err) if !is_wrong_password(&err) => return Outcome::Failed(err),
        Err(_) => {}
    }
    match connect::connect(config, user, &Auth::Password(password, "secret file")).await {
        Ok(client) => match client.simple_query("SELECT 1").await {
            Ok(_) => Outcome::LoggedIn,
            Err(err) => Outcome::Failed(anyhow::Error::new(err)),
        },
        Err(err) => Outcome::Failed(err),
    }
}

/// True when the server refused the login as a wrong password (SQLSTATE 28P01), which it
/// also says for a role that does not exist (so as not to reveal which roles exist).
pub fn is_wrong_password(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            .is_some_and(|code| *code == SqlState::INVALID_PASSWORD)
    })
}

//! `verify`: placeholder.
use crate::cli::VerifyArgs;
pub async fn command(_args: VerifyArgs) -> anyhow::Result<u8> {
    anyhow::bail!("verify is not implemented yet")
}

//! `health`: placeholder.
use crate::cli::HealthArgs;
pub fn command(_args: HealthArgs) -> anyhow::Result<u8> {
    anyhow::bail!("health is not implemented yet")
}

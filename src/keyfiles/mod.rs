//! The secret-file generator (`generate`): placeholder until the generator lands.

use clap::Args;

/// Options of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {}

/// Runs `generate`.
pub fn run(_args: &GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("generate is not implemented yet")
}

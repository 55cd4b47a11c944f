//! `run`: placeholder.
use crate::cli::RunArgs;
pub fn run(_args: RunArgs) -> anyhow::Result<u8> {
    anyhow::bail!("run is not implemented yet")
}

//! Entry point: parse the command line, start logging, dispatch, map errors to exit codes.
//!
//! Everything with behaviour lives in the modules ARCHITECTURE.md maps; this file only wires
//! them together, so a reader sees every mode at a glance. Each subcommand's module has the
//! same entry, `command(settings) -> anyhow::Result<u8>`, fed by `cli.rs`'s conversion
//! (which validates the configuration: a mistake fails here, before any command starts).

mod backoff;
mod cli;
mod config;
mod error;
mod fileio;
mod health;
mod keyfiles;
mod logging;
mod metrics;
mod overlap;
mod patroni;
mod postmaster;
#[cfg(test)]
mod properties;
mod rotate;
mod run;
mod runtime;
mod secret;
mod session;
mod state;
mod status;
mod store;
mod supervisor;
mod sync;
mod verify;
mod watch;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use error::{EXIT_UNEXPECTED, Failure};

fn main() -> ExitCode {
    // No core dump and no ptrace by other users of this process: its memory holds secrets.
    // (Reset by exec, so the supervised postgres is unaffected.) Failing is not fatal.
    let _ = nix::sys::prctl::set_dumpable(false);
    let cli = Cli::parse();
    logging::init(cli.log_format.into());
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            tracing::error!("{err:#}");
            let failure = Failure::of(&err);
            if let Some(Failure::Interrupted(signal)) = failure {
                // Die of the signal (its default action; the terminal is restored by now),
                // so a calling shell or script sees Ctrl-C and stops too, instead of going
                // on after an ordinary failure. The exit code below is the fallback.
                let _ = nix::sys::signal::raise(signal);
            }
            ExitCode::from(failure.map_or(EXIT_UNEXPECTED, Failure::exit_code))
        }
    }
}

/// Runs one subcommand; `Ok` carries the exit code (non-zero for `run`'s child status).
fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => run::command(args.try_into()?),
        Command::Sync(args) => sync::command(args.try_into()?),
        Command::Watch(args) => watch::command(args.try_into()?),
        Command::Verify(args) => verify::command(args.try_into()?),
        Command::Health(args) => health::command(args.into()),
        Command::Status(args) => status::command(args.try_into()?),
        Command::Generate(args) => keyfiles::command(args.into()),
        Command::Rotate(args) => rotate::command(args.try_into()?),
    }
}

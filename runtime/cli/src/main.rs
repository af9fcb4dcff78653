//! `trenv`: a runc-compatible OCI runtime with CRIU restore.

mod cli;
mod commands;
mod logging;
mod stats;

use std::process::ExitCode;

use clap::Parser;
use logging::LogFormat;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let format: LogFormat = match cli.global.log_format.parse() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("trenv: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(cli.global.log.as_deref(), format, cli.global.debug) {
        eprintln!("trenv: cannot open log {:?}: {e}", cli.global.log);
        return ExitCode::from(2);
    }
    match commands::dispatch(&cli.global, cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!("{msg}");
            // Logged errors go to --log (containerd reads them there); people read stderr.
            if cli.global.log.is_some() {
                eprintln!("trenv: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}

//! `natrix`: the relay and connectivity cluster in one binary.
//!
//! `natrix up` runs every role in one process with in-memory coordination;
//! `natrix cdx` (and, as they land, `relay` and `lookup`) run one role each;
//! `natrix probe` asks a STUN server where the caller is.

mod cli;
mod probe;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = natrix_telemetry::logging::init(cli.global.log_format, &cli.global.log) {
        eprintln!("natrix: {e:#}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Command::Up(args) => serve::run(&cli.global, serve::Roles::all(), &args.cdx),
        Command::Cdx(args) => serve::run(&cli.global, serve::Roles::cdx_only(), &args.cdx),
        Command::Probe(args) => probe::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("natrix: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

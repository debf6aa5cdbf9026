//! `natrix`: the relay and connectivity cluster in one binary.
//!
//! `natrix up` runs every role in one process with in-memory coordination;
//! `natrix cdx` and `natrix relay` (and, as it lands, `lookup`) run one role
//! each;
//! `natrix probe` asks a STUN server where the caller is.

mod cli;
mod cluster;
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
        Command::Up(args) => serve::Plan::up(
            args.relay.clone(),
            args.cluster_secret.clone(),
            args.lookup.clone(),
        )
        .and_then(|plan| serve::run(&cli.global, plan)),
        Command::Cdx(args) => serve::run(
            &cli.global,
            serve::Plan {
                cdx: Some(args.cdx.clone()),
                ..Default::default()
            },
        ),
        Command::Relay(args) => serve::run(
            &cli.global,
            serve::Plan {
                relay: Some(args.relay.clone()),
                ..Default::default()
            },
        ),
        Command::Lookup(args) => serve::run(
            &cli.global,
            serve::Plan {
                lookup: Some((args.lookup.clone(), args.auth_secrets.clone())),
                cluster_secret: Some(args.cluster_secret.clone()),
                ..Default::default()
            },
        ),
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

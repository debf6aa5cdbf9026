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

/// `natrix secret rotate|list`.
fn secret(global: &cli::Global, action: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let url = global.redis_url.as_ref().context(
        "the shared TURN secrets live in the coordination store: give --redis-url (NATRIX_REDIS_URL)",
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    runtime.block_on(async {
        let store = natrix_store::Store::redis(&url.0, natrix_store::RedisOptions::default())
            .await
            .with_context(|| format!("connecting to Redis at {url:?}"))?;
        if action == "rotate" {
            let secret = crate::serve::random_token(40);
            let id = natrix_registry::secrets::rotate(&store, secret)
                .await
                .context("storing the new secret")?;
            println!("new TURN secret {id}: relays and lookup use it within a second");
        }
        let now = natrix_registry::unix_ms();
        for (i, s) in natrix_registry::secrets::list(&store)
            .await
            .context("reading the secrets")?
            .iter()
            .enumerate()
        {
            let age = std::time::Duration::from_secs(now.saturating_sub(s.created_ms) / 1000);
            println!(
                "{} {}  age {}",
                if i == 0 { "*" } else { " " },
                s.key_id,
                humantime::format_duration(age)
            );
        }
        anyhow::Ok(())
    })
}

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
            (args.stun_alternate_port, args.stun_alternate_ip),
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
        Command::Secret { action } => secret(&cli.global, action),
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

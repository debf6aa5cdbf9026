//! `natrix`: the relay and connectivity cluster in one binary.
//!
//! `natrix up` runs every role in one process with in-memory coordination;
//! `natrix cdx` and `natrix relay` (and, as it lands, `lookup`) run one role
//! each;
//! `natrix probe` asks a STUN server where the caller is.

mod admin;
mod cli;
mod cluster;
mod config;
mod probe;
mod serve;
mod upgrade;
mod usage;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// `natrix secret rotate|list`.
fn secret(global: &cli::Global, action: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (runtime, store) = store_for(global, "the shared TURN secrets")?;
    runtime.block_on(async {
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

/// Connects to the cluster's Redis for a management command.
fn store_for(
    global: &cli::Global,
    what: &str,
) -> anyhow::Result<(tokio::runtime::Runtime, natrix_store::Store)> {
    use anyhow::Context as _;
    let url = global.redis_url.as_ref().with_context(|| {
        format!("{what} live in the coordination store: give --redis-url (NATRIX_REDIS_URL)")
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let store = runtime
        .block_on(natrix_store::Store::redis(
            &url.0,
            natrix_store::RedisOptions::default(),
        ))
        .with_context(|| format!("connecting to Redis at {url:?}"))?;
    Ok((runtime, store))
}

fn apikey(global: &cli::Global, args: &cli::ApikeyArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use natrix_registry::apikeys;
    let (runtime, store) = store_for(global, "API keys")?;
    let name = &args.name;
    runtime.block_on(async {
        match args.action.as_str() {
            "create" => {
                let scopes = if args.scopes.is_empty() {
                    vec![natrix_model::apikey::Scope::Plan]
                } else {
                    args.scopes.clone()
                };
                let limits = apikeys::Limits {
                    rate: args.rate,
                    max_sessions: args.max_sessions,
                };
                let key = apikeys::create(&store, name, &scopes, limits, rand::random())
                    .await
                    .context("storing the new key")?;
                println!("{}", key.expose());
                eprintln!(
                    "API key {} ({name}) created; it is shown once, keep it. lookup accepts it within a second.",
                    key.id()
                );
            }
            "revoke" => {
                let id = args
                    .id
                    .as_deref()
                    .context("`natrix apikey revoke` needs the key id")?;
                if !apikeys::revoke(&store, id).await.context("revoking")? {
                    anyhow::bail!("no API key {id}");
                }
                println!("revoked {id}");
            }
            _ => {
                for (id, k) in apikeys::list(&store).await.context("reading the keys")? {
                    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.label()).collect();
                    let or_default =
                        |v: Option<String>| v.unwrap_or_else(|| "default".to_owned());
                    println!(
                        "{id}  {}  {}  rate={}  max_sessions={}",
                        k.name,
                        scopes.join(","),
                        or_default(k.rate.map(|r| r.to_string())),
                        or_default(k.max_sessions.map(|r| r.to_string())),
                    );
                }
            }
        }
        anyhow::Ok(())
    })
}

fn grant(args: &cli::GrantArgs) -> anyhow::Result<()> {
    use natrix_model::grant;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ttl = args.ttl.as_secs();
    if ttl == 0 || ttl > grant::MAX_GRANT_TTL {
        anyhow::bail!("--ttl must be between 1s and 1h");
    }
    let scopes = if args.scopes.is_empty() {
        vec![natrix_model::apikey::Scope::Plan]
    } else {
        args.scopes.clone()
    };
    let claims = grant::Claims {
        aud: grant::AUDIENCE.to_owned(),
        sub: args.sub.clone(),
        exp: now + ttl,
        iat: Some(now),
        nbf: None,
        scope: scopes
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(" "),
        dev: args.dev.clone(),
    };
    if claims.sub.is_empty() || claims.sub.len() > grant::MAX_SUBJECT_LEN {
        anyhow::bail!("--sub must be 1 to 128 bytes");
    }
    println!("{}", grant::mint(&args.secret, &claims));
    Ok(())
}

/// The command line, over the config file's defaults when there is one,
/// and whether `--log` (or `NATRIX_LOG`, or the file) chose the log filter.
fn parse() -> Result<(Cli, bool), ExitCode> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = match config::config_path(&args) {
        None => Cli::command(),
        Some(path) => match config::ConfigFile::load(&path) {
            Ok(file) => file.apply(Cli::command()),
            Err(e) => {
                eprintln!("natrix: config: {e:#}");
                return Err(ExitCode::from(2));
            }
        },
    };
    let matches = command.get_matches_from(args);
    // A file's value is a default too: compare with the built-in one.
    let log_chosen = matches.value_source("log") != Some(clap::parser::ValueSource::DefaultValue)
        || matches
            .get_one::<String>("log")
            .is_some_and(|l| l != "info");
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((cli, log_chosen))
}

/// `natrix config check|example`.
fn config_command(args: &cli::ConfigArgs) -> anyhow::Result<()> {
    match (args.action.as_str(), &args.file) {
        ("example", _) => {
            print!("{}", config::example());
            Ok(())
        }
        (_, Some(file)) => {
            config::ConfigFile::load(file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        (_, None) => anyhow::bail!("natrix config check FILE"),
    }
}

/// `natrix man DIR`: natrix.1 and natrix-<command>.1.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = Cli::command();
    let mut pages = vec![("natrix".to_owned(), root.clone())];
    for sub in root.get_subcommands() {
        let name = format!("natrix-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, cmd) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let (cli, log_chosen) = match parse() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    // `natrix up` on a terminal shows one summary instead of its startup
    // log (warnings still show); JSON logs are unchanged.
    let first_screen = matches!(cli.command, Command::Up(_))
        && !log_chosen
        && natrix_telemetry::logging::is_human(cli.global.log_format);
    let filter = if first_screen {
        "warn"
    } else {
        &cli.global.log
    };
    if let Err(e) = natrix_telemetry::logging::init(cli.global.log_format, filter) {
        eprintln!("natrix: {e:#}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Command::Up(args) => serve::Plan::up(
            args.relay.clone(),
            args.cluster_secret.clone(),
            args.lookup.clone(),
            args.signal.clone(),
            (args.stun_alternate_port, args.stun_alternate_ip),
            first_screen,
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
                signal: args.signal.clone(),
                cluster_secret: Some(args.cluster_secret.clone()),
                ..Default::default()
            },
        ),
        Command::Probe(args) => probe::run(args),
        Command::Secret { action } => secret(&cli.global, action),
        Command::Apikey(args) => apikey(&cli.global, args),
        Command::Grant(args) => grant(args),
        Command::Usage(args) => usage::run(&cli.global, args),
        Command::Admin(args) => admin::run(&cli.global, args),
        Command::Config(args) => config_command(args),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "natrix",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => man_pages(dir),
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

//! The config file: `--config FILE` (or `NATRIX_CONFIG`), TOML, a section
//! per role holding that role's flags by their long names:
//!
//! ```toml
//! [global]            # every command: log, metrics-listen, redis-url, …
//! metrics-listen = "127.0.0.1:9090"
//! [relay]             # natrix relay, and the relay role of natrix up
//! max-allocations-per-ip = 200
//! [cdx]               # natrix cdx
//! [lookup]            # natrix lookup (and signalling), and natrix up's lookup
//! [up]                # natrix up only (e.g. stun-alternate-port)
//! ```
//!
//! A value in the file is a flag's default: the environment variable and
//! the flag itself override it (flag > environment > file > built-in
//! default). Unknown sections and keys are errors naming the nearest valid
//! one; values are checked by the flag's own parser before anything starts
//! (`natrix config check FILE` does only that). `natrix config example`
//! prints a file with every flag, its help and its default.

use std::fmt::Write as _;
use std::path::Path;

use clap::{ArgAction, CommandFactory as _};

use crate::cli::Cli;

/// Sections, in the order they apply (a later one wins), and the commands
/// each configures. The first command is the one whose flags the section
/// holds.
const SECTIONS: [(&str, &[&str]); 5] = [
    ("global", &[]),
    ("relay", &["relay", "up"]),
    ("cdx", &["cdx"]),
    ("lookup", &["lookup", "up"]),
    ("up", &["up"]),
];

/// Flags no file sets.
const NOT_IN_FILES: [&str; 3] = ["help", "version", "config"];

/// One key of a section: the flag's long name and its values.
type Entry = (String, Vec<String>);

/// A parsed, checked config file: per section, its keys.
#[derive(Debug, Default)]
pub(crate) struct ConfigFile {
    sections: Vec<(String, Vec<Entry>)>,
}

/// The command a section's keys are checked against.
fn section_command(section: &str) -> clap::Command {
    let root = Cli::command();
    match SECTIONS.iter().find(|(s, _)| *s == section) {
        Some((_, [first, ..])) => root
            .find_subcommand(first)
            .cloned()
            .unwrap_or_else(|| clap::Command::new(section.to_owned())),
        _ => {
            // Global: the root's global flags only.
            let mut cmd = clap::Command::new("natrix").no_binary_name(true);
            for a in root.get_arguments().filter(|a| a.is_global_set()) {
                cmd = cmd.arg(a.clone().global(false));
            }
            cmd
        }
    }
}

/// The flags (long names) a file may set in `cmd`, with whether each takes
/// several values.
fn keys_of(cmd: &clap::Command) -> Vec<(String, bool, bool)> {
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            if NOT_IN_FILES.contains(&long) || a.is_positional() {
                return None;
            }
            let flag = matches!(a.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
            let many = matches!(a.get_action(), ArgAction::Append)
                || a.get_value_delimiter().is_some()
                || a.get_num_args().is_some_and(|n| n.max_values() > 1);
            Some((long.to_owned(), flag, many))
        })
        .collect()
}

/// The valid name nearest to `wrong`.
fn nearest<'a>(wrong: &str, valid: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    valid.min_by(|a, b| {
        strsim::levenshtein(wrong, a)
            .cmp(&strsim::levenshtein(wrong, b))
            .then(a.cmp(b))
    })
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

impl ConfigFile {
    /// Reads and checks `path`.
    pub(crate) fn load(path: &Path) -> anyhow::Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        ConfigFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses and checks a config file's text: sections, keys, value shapes
    /// and every value through its flag's parser.
    pub(crate) fn parse(text: &str) -> Result<ConfigFile, String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut file = ConfigFile::default();
        for (section, body) in &table {
            let known = SECTIONS.iter().any(|(s, _)| s == section);
            if !known {
                let near = nearest(section, SECTIONS.iter().map(|(s, _)| *s)).unwrap_or("global");
                return Err(format!(
                    "unknown section [{section}] (did you mean [{near}]?)"
                ));
            }
            let toml::Value::Table(body) = body else {
                return Err(format!(
                    "`{section}` must be a section ([{section}]), not a value"
                ));
            };
            let cmd = section_command(section);
            let keys = keys_of(&cmd);
            let mut entries = Vec::new();
            for (key, value) in body {
                let Some((_, flag, many)) = keys.iter().find(|(k, ..)| k == key) else {
                    let near = nearest(key, keys.iter().map(|(k, ..)| k.as_str())).unwrap_or("");
                    return Err(format!(
                        "[{section}] unknown key `{key}` (the nearest valid one is `{near}`)"
                    ));
                };
                let values = match value {
                    toml::Value::Array(items) if *many => items
                        .iter()
                        .map(scalar)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| format!("[{section}] {key}: a list of plain values"))?,
                    toml::Value::Array(_) => {
                        return Err(format!("[{section}] {key} takes one value, not a list"));
                    }
                    toml::Value::Boolean(_) if !*flag => {
                        return Err(format!(
                            "[{section}] {key} takes a value, not true or false"
                        ));
                    }
                    v if *flag && !matches!(v, toml::Value::Boolean(_)) => {
                        return Err(format!("[{section}] {key} is true or false"));
                    }
                    v => vec![scalar(v).ok_or_else(|| {
                        format!("[{section}] {key}: a string, number or boolean")
                    })?],
                };
                check_values(&cmd, section, key, *flag, &values)?;
                entries.push((key.clone(), values));
            }
            file.sections.push((section.clone(), entries));
        }
        Ok(file)
    }

    /// `Cli::command()` with this file's values as defaults of the flags of
    /// the commands its sections configure.
    pub(crate) fn apply(&self, mut root: clap::Command) -> clap::Command {
        for (section, commands) in SECTIONS {
            let Some((_, entries)) = self.sections.iter().find(|(s, _)| s == section) else {
                continue;
            };
            if section == "global" {
                for (key, values) in entries {
                    root = with_default(root, key, values);
                }
                continue;
            }
            for sub in commands {
                root = root.mut_subcommand(sub, |mut cmd| {
                    for (key, values) in entries {
                        cmd = with_default(cmd, key, values);
                    }
                    cmd
                });
            }
        }
        root
    }
}

/// Sets `values` as the default of `cmd`'s flag `--key`, if it has one.
fn with_default(cmd: clap::Command, key: &str, values: &[String]) -> clap::Command {
    let Some(id) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(key))
        .map(|a| a.get_id().clone())
    else {
        return cmd;
    };
    let values: Vec<clap::builder::OsStr> = values.iter().map(|v| v.clone().into()).collect();
    // A flag the file sets is no longer required on the command line.
    cmd.mut_arg(id, |a| a.default_values(values).required(false))
}

/// Runs `values` through `--key`'s parser (alone: other required flags
/// are not asked for).
fn check_values(
    cmd: &clap::Command,
    section: &str,
    key: &str,
    flag: bool,
    values: &[String],
) -> Result<(), String> {
    let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(key)) else {
        return Ok(());
    };
    let probe = clap::Command::new("natrix-config")
        .no_binary_name(true)
        .arg(arg.clone().required(false).env(None::<&str>).global(false));
    let mut argv = Vec::new();
    if flag {
        if values.iter().any(|v| v == "true") {
            argv.push(format!("--{key}"));
        }
    } else {
        for v in values {
            argv.push(format!("--{key}={v}"));
        }
    }
    probe.try_get_matches_from(argv).map(|_| ()).map_err(|e| {
        let why = e.to_string();
        let why = why
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ");
        format!("[{section}] {key}: {why}")
    })
}

/// The `--config` file named on the command line or in `NATRIX_CONFIG`
/// (read before the command line is parsed: the file sets its defaults).
pub(crate) fn config_path(args: &[std::ffi::OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(std::path::PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    std::env::var_os("NATRIX_CONFIG").map(std::path::PathBuf::from)
}

/// `natrix config example`: every section and flag, its help, its default.
pub(crate) fn example() -> String {
    let mut out = String::from(
        "# natrix configuration (TOML): a section per role, keys are the flags'\n\
         # long names. Every line below is commented out with its default;\n\
         # uncomment to change. Environment variables (NATRIX_*) and flags\n\
         # override this file. Check a file with `natrix config check FILE`.\n",
    );
    let mut seen_in_roles: Vec<String> = Vec::new();
    let global_keys: Vec<String> = keys_of(&section_command("global"))
        .into_iter()
        .map(|k| k.0)
        .collect();
    for (section, commands) in SECTIONS {
        let cmd = section_command(section);
        let applies = if commands.is_empty() {
            "every command".to_owned()
        } else {
            commands
                .iter()
                .map(|c| format!("natrix {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(out, "\n[{section}]  # {applies}\n");
        let globals: &[String] = if section == "global" {
            &[]
        } else {
            &global_keys
        };
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if NOT_IN_FILES.contains(&long)
                || arg.is_positional()
                || globals.iter().any(|g| g == long)
            {
                continue;
            }
            // `[up]` lists only what no other role's section holds.
            if section == "up" && seen_in_roles.iter().any(|s| s == long) {
                continue;
            }
            seen_in_roles.push(long.to_owned());
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            out.push('\n');
            for line in wrap(&help, 76) {
                let _ = writeln!(out, "# {line}");
            }
            if let Some(env) = arg.get_env() {
                let _ = writeln!(out, "# (environment: {})", env.to_string_lossy());
            }
            let flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            match (flag, defaults.as_slice()) {
                (true, _) => {
                    let _ = writeln!(out, "#{long} = false");
                }
                (false, []) => {
                    let _ = writeln!(out, "# {long}: no default");
                }
                (false, [one]) => {
                    let _ = writeln!(out, "#{long} = {}", toml_value(one));
                }
                (false, many) => {
                    let items: Vec<String> = many.iter().map(|v| toml_value(v)).collect();
                    let _ = writeln!(out, "#{long} = [{}]", items.join(", "));
                }
            }
        }
    }
    out
}

/// A default as TOML: numbers bare, everything else a string.
fn toml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || (v.parse::<f64>().is_ok() && v.contains('.')) {
        v.to_owned()
    } else {
        // A JSON string is a TOML basic string.
        serde_json::Value::String(v.to_owned()).to_string()
    }
}

/// `text` in lines of at most `width` characters (paragraphs kept).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.split("\n\n") {
        if !lines.is_empty() {
            lines.push(String::new());
        }
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::FromArgMatches as _;

    fn parse_with(text: &str, argv: &[&str]) -> Cli {
        let file = ConfigFile::parse(text).unwrap();
        let matches = file
            .apply(Cli::command())
            .try_get_matches_from(argv)
            .unwrap();
        Cli::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn the_example_checks_commented_and_uncommented() {
        let text = example();
        ConfigFile::parse(&text).unwrap();
        // Every default, set explicitly, is a valid file too.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            uncommented.contains("\nmax-allocations-per-ip = 1000"),
            "{uncommented}"
        );
        ConfigFile::parse(&uncommented).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn unknown_sections_and_keys_name_the_nearest_valid_one() {
        let e = ConfigFile::parse("[rellay]\n").unwrap_err();
        assert!(e.contains("[rellay]") && e.contains("[relay]"), "{e}");
        let e = ConfigFile::parse("[relay]\nmax-allocation-per-ip = 5\n").unwrap_err();
        assert!(
            e.contains("`max-allocation-per-ip`") && e.contains("`max-allocations-per-ip`"),
            "{e}"
        );
        // A lookup flag is not a relay key.
        let e = ConfigFile::parse("[relay]\napi-key-rate = 5\n").unwrap_err();
        assert!(e.contains("unknown key `api-key-rate`"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_by_the_flags_own_parser() {
        for (text, says) in [
            (
                "[relay]\nmax-allocations-per-ip = \"many\"\n",
                "max-allocations-per-ip",
            ),
            ("[global]\nmetrics-listen = \"nowhere\"\n", "metrics-listen"),
            ("[global]\nredis-url = \"http://x\"\n", "Redis URL"),
            ("[relay]\nmax-allocations-per-ip = [1, 2]\n", "one value"),
            ("[lookup]\nopen-registration = \"yes\"\n", "true or false"),
            ("[relay]\nidle-timeout = \"soon\"\n", "idle-timeout"),
            ("relay = 5\n", "section"),
            ("[relay\n", "TOML"),
        ] {
            let e = ConfigFile::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_file_sets_defaults_that_flags_override_and_sections_reach_their_commands() {
        let text = "[global]\nregion = \"eu\"\n\
                    [relay]\nmax-allocations-per-ip = 7\n\
                    [lookup]\napi-key-rate = 3.5\nopen-registration = true\n";
        let cli = parse_with(text, &["natrix", "up"]);
        assert_eq!(cli.global.region, "eu");
        let crate::cli::Command::Up(up) = &cli.command else {
            panic!("up")
        };
        assert_eq!(up.relay.max_allocations_per_ip, 7);
        assert_eq!(up.lookup.api_key_rate, 3.5);
        assert!(up.signal.open_registration);
        // A flag wins over the file.
        let cli = parse_with(
            text,
            &[
                "natrix",
                "--region",
                "us",
                "relay",
                "--max-allocations-per-ip",
                "9",
            ],
        );
        assert_eq!(cli.global.region, "us");
        let crate::cli::Command::Relay(relay) = &cli.command else {
            panic!("relay")
        };
        assert_eq!(relay.relay.max_allocations_per_ip, 9);
    }

    #[test]
    fn shared_relay_ports_are_dealt_to_the_loops_in_pairs_and_checked() {
        let relay = |extra: &[&str]| {
            let mut args = vec!["natrix", "relay", "--relay-ports", "50000-50009"];
            args.extend_from_slice(extra);
            let cli = parse_with("", &args);
            let crate::cli::Command::Relay(relay) = cli.command else {
                panic!("relay")
            };
            relay.relay
        };
        let r = relay(&["--relay-multiplex-ports", "3480-3487"]);
        assert_eq!(r.multiplex_ports_of(0, 2), [3480, 3481, 3484, 3485]);
        assert_eq!(r.multiplex_ports_of(1, 2), [3482, 3483, 3486, 3487]);
        // Fewer pairs than loops: one each.
        assert_eq!(r.multiplex_ports_of(3, 5), [3483]);
        assert!(r.check_multiplex_ports(8).is_ok());
        let e = r.check_multiplex_ports(9).unwrap_err().to_string();
        assert!(e.contains("8 port(s) for 9 relay loops"), "{e}");
        assert_eq!(r.capacity(), 100_000, "past the range, shared sockets");
        let e = relay(&["--relay-multiplex-ports", "50009-50010"])
            .check_multiplex_ports(1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps --relay-ports"), "{e}");
        let r = relay(&[]);
        assert!(r.multiplex_ports_of(0, 1).is_empty());
        assert_eq!(r.capacity(), 10, "the port range");
    }
}

//! `--config vblock.toml`: a TOML file with the same keys as the flags of `vblock serve`.
//!
//! Precedence is flags > environment (`VBLOCK_*`) > config file > built-in defaults. The file is
//! applied by turning each of its keys into the *default* of the flag of the same long name,
//! so clap itself keeps flags and environment variables above it. Keys are the long flag names
//! (`data-dir`, `buffer-size`, `s3-force-path-style`; `_` may stand for `-`); an unknown key,
//! a table or an array is an error that names the key.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Errors reading or applying the config file (exit code 2, like bad flags).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key that is no flag of `vblock serve`, or a value that is not a string, number or bool.
    #[error("config file {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// The config file named by `--config FILE` / `--config=FILE` in `args`, else by
/// `VBLOCK_CONFIG`. Read before clap parses, because the file changes what clap parses with.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("VBLOCK_CONFIG").map(PathBuf::from)
}

/// Applies the file at `path` to the `serve` subcommand of `cmd`. Returns the command and the
/// ids of the flags the file set (for `--print-config`).
pub fn apply(cmd: Command, path: &Path) -> Result<(Command, BTreeSet<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let key_error = |message: String| ConfigError::Key {
        path: path.to_owned(),
        message,
    };
    let Some(serve) = cmd.find_subcommand("serve") else {
        return Ok((cmd, BTreeSet::new()));
    };
    // (on the root command, arg id, value): global flags such as log-format live on the root.
    let mut defaults = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let named = |a: &&clap::Arg| a.get_long() == Some(long.as_str()) && long != "config";
        let found = match serve.get_arguments().find(named) {
            Some(a) => Some((false, a)),
            None => cmd.get_arguments().find(named).map(|a| (true, a)),
        };
        let Some((on_root, arg)) = found else {
            return Err(key_error(format!(
                "unknown key `{key}` (keys are the long flags of `vblock serve`, e.g. data-dir)"
            )));
        };
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(key_error(format!(
                    "`{key}` must be a string, number or boolean"
                )))
            }
        };
        defaults.push((on_root, arg.get_id().to_string(), value));
    }
    let set = defaults.iter().map(|(_, id, _)| id.clone()).collect();
    let mut cmd = cmd;
    for (on_root, id, value) in defaults {
        cmd = if on_root {
            cmd.mut_arg(id, |a| a.default_value(value))
        } else {
            cmd.mut_subcommand("serve", |s| s.mut_arg(id, |a| a.default_value(value)))
        };
    }
    Ok((cmd, set))
}

/// The effective settings of `vblock serve` as TOML, each line commented with where the value
/// came from: `flag`, `env`, `config file`, `default`. Flags without a value are left out.
pub fn effective(serve: &Command, matches: &ArgMatches, from_file: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for arg in serve.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if matches!(long, "config" | "print-config" | "help" | "version") {
            continue;
        }
        let Some(values) = matches.get_raw(id) else {
            continue;
        };
        let value = values
            .map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(",");
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) => "env",
            _ if from_file.contains(id) => "config file",
            _ => "default",
        };
        let shown = match value.as_str() {
            "true" | "false" => value.clone(),
            v if v.parse::<i64>().is_ok() => value.clone(),
            _ => format!("{value:?}"),
        };
        out.push_str(&format!("{long} = {shown}  # {source}\n"));
    }
    out
}

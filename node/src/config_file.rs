//! The node's config file: TOML at `--config`, `$HERD_CONFIG`, or else
//! `$XDG_CONFIG_HOME/herd/node.toml` (`~/.config/herd/node.toml`) when it exists. Its keys are
//! the long flags of `herd-node run` and `pull` (`data-dir` or `data_dir`); a value the command
//! line or the environment gives wins over the file, which wins over the built-in default.
//! The file's settings become flags appended to the command line, so clap checks them as it
//! checks everything else.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;

/// Subcommands that read the file.
const READERS: [&str; 2] = ["run", "pull"];

/// `$XDG_CONFIG_HOME/herd/node.toml`, or `~/.config/herd/node.toml`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|dir| dir.join("herd/node.toml"))
}

/// The settings taken from a config file: the command line to parse, and the file with the
/// flags it supplied (to name the file if clap refuses one of them).
#[derive(Debug)]
pub struct Applied {
    pub args: Vec<OsString>,
    pub from_file: Option<(PathBuf, Vec<String>)>,
}

/// `args` with the config file's settings appended for the flags neither the command line nor
/// the environment set. Other subcommands than `run` and `pull` are left alone.
pub fn apply(cmd: &clap::Command, args: Vec<OsString>) -> Result<Applied> {
    let unchanged = |args| Applied {
        args,
        from_file: None,
    };
    // A lenient first parse: the file may supply what the command line lacks.
    let Ok(matches) = cmd.clone().ignore_errors(true).try_get_matches_from(&args) else {
        return Ok(unchanged(args));
    };
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(unchanged(args));
    };
    if !READERS.contains(&name) {
        return Ok(unchanged(args));
    }
    let given = sub.get_one::<PathBuf>("config").cloned();
    let Some(path) = given.clone().or_else(default_path) else {
        return Ok(unchanged(args));
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if given.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(unchanged(args));
        }
        Err(e) => bail!("cannot read the config file {}: {e}", path.display()),
    };
    let table: toml::Table = toml::from_str(&text).with_context(|| {
        format!(
            "the config file {} is not valid TOML (deploy/node.toml is an example)",
            path.display()
        )
    })?;
    let subcommand = cmd.find_subcommand(name).expect("matched above");
    let known: HashSet<String> = READERS
        .iter()
        .filter_map(|r| cmd.find_subcommand(r))
        .flat_map(|c| c.get_arguments().map(|a| a.get_id().to_string()))
        .collect();
    let mut extra: Vec<OsString> = Vec::new();
    let mut flags = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        if id == "config" || !known.contains(&id) {
            bail!(
                "{}: unknown setting `{key}` (the settings are the flags of `herd-node run --help`)",
                path.display()
            );
        }
        // A setting of the other subcommand (pull's `out` while running, say).
        let Some(arg) = subcommand
            .get_arguments()
            .find(|a| a.get_id() == id.as_str())
        else {
            continue;
        };
        if matches!(
            sub.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let long = format!("--{}", arg.get_long().unwrap_or(&id));
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) => extra.push(long.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => extra.extend([long.clone().into(), s.into()]),
                toml::Value::Integer(_) | toml::Value::Float(_) => {
                    extra.extend([long.clone().into(), v.to_string().into()])
                }
                other => bail!(
                    "{}: `{key}` must be a string, a number or true/false, not {}",
                    path.display(),
                    other.type_str()
                ),
            }
        }
        flags.push(long);
    }
    let mut args = args;
    args.extend(extra);
    Ok(Applied {
        args,
        from_file: Some((path, flags)),
    })
}

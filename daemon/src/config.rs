//! capsad's config file (`--config FILE`, TOML): every flag as a key of
//! the same name (`memory-budget-mib = 8192`, or with underscores), a
//! list for a repeatable flag (`dns = ["10.0.0.2"]`), true for a switch
//! without a value (`no-network = true`). Flags on the command line win
//! over the file.

use std::ffi::OsString;
use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Toml { path: String, message: String },
    #[error("{path}: {key}: no such setting (the settings are capsad's flags: capsad --help)")]
    Unknown { path: String, key: String },
    #[error("{path}: {key}: {what}")]
    Value {
        path: String,
        key: String,
        what: &'static str,
    },
}

/// The command line with `--config FILE`'s settings put before the rest:
/// `args` is the whole command line (program name first); `flags` names
/// each flag that takes a value, and `switches` each that takes none.
pub fn expand(
    args: Vec<OsString>,
    flags: &[String],
    switches: &[String],
) -> Result<Vec<OsString>, ConfigError> {
    let Some(at) = args.iter().position(|a| a == "--config") else {
        return Ok(args);
    };
    let Some(file) = args.get(at + 1).cloned() else {
        // clap says a value is missing.
        return Ok(args);
    };
    let path = Path::new(&file);
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let settings = settings(&path.display().to_string(), &text, flags, switches)?;
    let given: Vec<OsString> = args[1..at].iter().chain(&args[at + 2..]).cloned().collect();
    // A flag on the command line replaces the file's (all of a list's).
    let on_command_line = |flag: &str| {
        given.iter().filter_map(|a| a.to_str()).any(|a| {
            a == flag
                || a.strip_prefix(flag)
                    .is_some_and(|rest| rest.starts_with('='))
        })
    };
    let mut expanded = vec![args[0].clone()];
    for (flag, value) in settings {
        if !on_command_line(&flag) {
            expanded.push(OsString::from(flag));
            expanded.extend(value.map(OsString::from));
        }
    }
    expanded.extend(given);
    Ok(expanded)
}

/// The flags a config file's text stands for, each with its value (a
/// switch has none).
fn settings(
    path: &str,
    text: &str,
    flags: &[String],
    switches: &[String],
) -> Result<Vec<(String, Option<String>)>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Toml {
            path: path.to_string(),
            message: e.message().to_string(),
        })?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let bad = |what| ConfigError::Value {
            path: path.to_string(),
            key: key.clone(),
            what,
        };
        if switches.contains(&flag) {
            match value {
                toml::Value::Boolean(true) => out.push((format!("--{flag}"), None)),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("true or false")),
            }
        } else if flags.contains(&flag) && flag != "config" {
            let values = match value {
                toml::Value::Array(items) => items,
                one => vec![one],
            };
            for value in values {
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(n) => n.to_string(),
                    toml::Value::Float(x) => x.to_string(),
                    toml::Value::Boolean(b) => if b { "on" } else { "off" }.to_string(),
                    _ => return Err(bad("a string, a number, a boolean or a list of them")),
                };
                out.push((format!("--{flag}"), Some(text)));
            }
        } else {
            return Err(ConfigError::Unknown {
                path: path.to_string(),
                key,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn settings_become_flags_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("capsad.toml");
        std::fs::write(
            &file,
            "root = \"/srv/capsa\"\nmemory_budget_mib = 4096\ndns = [\"10.0.0.2\", \"10.0.0.3\"]\n\
             no-network = true\njail = false\n",
        )
        .unwrap();
        let args: Vec<OsString> = ["capsad", "--config", file.to_str().unwrap(), "--root", "/x"]
            .iter()
            .map(OsString::from)
            .collect();
        let flags = names(&["root", "memory-budget-mib", "dns", "jail", "config"]);
        let expanded = expand(args, &flags, &names(&["no-network"])).unwrap();
        let expanded: Vec<&str> = expanded.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            expanded,
            [
                "capsad",
                "--dns",
                "10.0.0.2",
                "--dns",
                "10.0.0.3",
                "--jail",
                "off",
                "--memory-budget-mib",
                "4096",
                "--no-network",
                "--root",
                "/x"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let flags = names(&["root"]);
        let switches = names(&["no-network"]);
        assert_eq!(
            settings("f", "rooot = \"/x\"", &flags, &switches).unwrap_err(),
            ConfigError::Unknown {
                path: "f".into(),
                key: "rooot".into()
            }
        );
        assert!(matches!(
            settings("f", "no_network = 3", &flags, &switches).unwrap_err(),
            ConfigError::Value { key, .. } if key == "no_network"
        ));
        assert!(matches!(
            settings("f", "root = {a = 1}", &flags, &switches).unwrap_err(),
            ConfigError::Value { .. }
        ));
        assert!(matches!(
            settings("f", "root = ", &flags, &switches).unwrap_err(),
            ConfigError::Toml { .. }
        ));
        assert!(matches!(
            settings(
                "f",
                "config = \"other.toml\"",
                &names(&["config"]),
                &switches
            )
            .unwrap_err(),
            ConfigError::Unknown { .. }
        ));
    }
}

//! A run's environment as docker takes it: `-e KEY=VALUE`, `-e KEY` (the
//! value this shell has; left out when it has none), and `--env-file
//! FILE` (a KEY=VALUE or KEY per line; blank lines and `#` comments
//! skipped). Later settings win; the files come first, then `-e`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indexmap::IndexMap;

pub fn variables(
    pairs: &[String],
    files: &[PathBuf],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<IndexMap<String, String>> {
    let mut variables = IndexMap::new();
    let mut set = |entry: &str, whence: &dyn Fn() -> String| -> Result<()> {
        match entry.split_once('=') {
            Some(("", _)) => bail!("{}: {entry:?} has no name", whence()),
            Some((key, value)) => {
                variables.insert(key.to_string(), value.to_string());
            }
            None if entry.is_empty() => bail!("{}: an empty variable", whence()),
            None => {
                if let Some(value) = lookup(entry) {
                    variables.insert(entry.to_string(), value);
                }
            }
        }
        Ok(())
    };
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--env-file {}", file.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            set(line, &|| format!("{} line {}", file.display(), number + 1))?;
        }
    }
    for pair in pairs {
        set(pair, &|| format!("-e {pair}"))?;
    }
    Ok(variables)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(name: &str) -> Option<String> {
        (name == "HOME").then(|| "/root".to_string())
    }

    #[test]
    fn pairs_names_from_the_shell_and_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.env");
        std::fs::write(
            &file,
            "# settings\n\nMODE=file\nHOME\nGREETING=a=b\nUNSET\n",
        )
        .unwrap();
        let found = variables(
            &["MODE=flag".into(), "HOME".into(), "NOWHERE".into()],
            &[file],
            shell,
        )
        .unwrap();
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            found,
            [("MODE", "flag"), ("HOME", "/root"), ("GREETING", "a=b")]
        );
    }

    #[test]
    fn nameless_entries_and_missing_files_are_errors() {
        assert!(variables(&["=x".into()], &[], shell).is_err());
        assert!(variables(&["".into()], &[], shell).is_err());
        let err = variables(&[], &["/nonexistent/app.env".into()], shell).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/app.env"),
            "{err:#}"
        );
    }
}

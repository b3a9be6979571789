//! The agent's settings, read from `capsa.*` kernel parameters.

use anyhow::{bail, Context, Result};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// Power the VM off right after printing the ready line.
    pub exit_after_ready: bool,
}

impl BootParams {
    pub fn from_proc() -> Result<Self> {
        let cmdline =
            std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?;
        Self::parse(&cmdline)
    }

    pub fn parse(cmdline: &str) -> Result<Self> {
        let mut params = BootParams::default();
        for word in cmdline.split_whitespace() {
            let Some(setting) = word.strip_prefix("capsa.") else {
                continue;
            };
            let (key, value) = setting.split_once('=').unwrap_or((setting, "1"));
            match key {
                "exit_after_ready" => params.exit_after_ready = parse_bool(key, value)?,
                _ => bail!("unknown agent parameter capsa.{key}"),
            }
        }
        Ok(params)
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => bail!("capsa.{key}={value}: expected 1 or 0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_capsa_parameters_and_ignores_the_kernels() {
        let p = BootParams::parse("console=ttyS0 quiet capsa.exit_after_ready=1").unwrap();
        assert!(p.exit_after_ready);
        let p = BootParams::parse("console=ttyS0 capsa.exit_after_ready").unwrap();
        assert!(p.exit_after_ready);
        assert_eq!(
            BootParams::parse("panic=-1").unwrap(),
            BootParams::default()
        );
    }

    #[test]
    fn rejects_unknown_or_malformed_parameters() {
        let err = BootParams::parse("capsa.exit_after_ready=maybe").unwrap_err();
        assert!(err.to_string().contains("expected 1 or 0"), "{err}");
        let err = BootParams::parse("capsa.bogus=1").unwrap_err();
        assert!(err.to_string().contains("capsa.bogus"), "{err}");
    }
}

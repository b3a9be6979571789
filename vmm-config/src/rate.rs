//! A device's rate limit as the command line carries it: the options
//! `bps=N` (bytes per second), `ops=N` (requests or frames per second)
//! and `burst-ms=N` (how much more than the rate may pass at once, as
//! that many milliseconds' worth; 100 unless said).

use crate::device::ArgError;

pub const DEFAULT_BURST_MS: u32 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
    pub burst_ms: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            bytes_per_sec: None,
            ops_per_sec: None,
            burst_ms: DEFAULT_BURST_MS,
        }
    }
}

impl RateLimit {
    /// Whether it limits anything.
    pub fn is_set(&self) -> bool {
        self.bytes_per_sec.is_some() || self.ops_per_sec.is_some()
    }

    /// Takes `key=value` if it is one of the rate options.
    pub(crate) fn take_option(
        limit: &mut Option<RateLimit>,
        key: &str,
        value: &str,
    ) -> Result<bool, ArgError> {
        let number = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ArgError::BadRate(format!("{key}={value}")))
        };
        if !matches!(key, "bps" | "ops" | "burst-ms") {
            return Ok(false);
        }
        let n = number()?;
        let entry = limit.get_or_insert_with(RateLimit::default);
        match key {
            "bps" => entry.bytes_per_sec = Some(n),
            "ops" => entry.ops_per_sec = Some(n),
            _ => {
                entry.burst_ms =
                    u32::try_from(n).map_err(|_| ArgError::BadRate(format!("{key}={value}")))?
            }
        }
        Ok(true)
    }

    pub(crate) fn push_options(limit: &Option<RateLimit>, arg: &mut String) {
        let Some(limit) = limit else { return };
        if let Some(bytes) = limit.bytes_per_sec {
            arg.push_str(&format!(",bps={bytes}"));
        }
        if let Some(ops) = limit.ops_per_sec {
            arg.push_str(&format!(",ops={ops}"));
        }
        arg.push_str(&format!(",burst-ms={}", limit.burst_ms));
    }
}

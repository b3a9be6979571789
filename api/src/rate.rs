//! A rate limit in a group spec (`diskRateLimit`, `networkRateLimit`):
//! bytes and operations per second, with a burst, for each of the group's
//! disks and (each way) its network interface.

use serde::{Deserialize, Serialize};

/// Below these a guest can hardly boot or be reached.
pub const MIN_BYTES_PER_SEC: u64 = 64 << 10;
pub const MAX_BURST_MS: u32 = 60_000;

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "RateLimit")]
pub struct RateLimitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    /// Disk requests, or network frames, per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_per_sec: Option<u64>,
    /// How much above the rate may pass at once, as that many
    /// milliseconds' worth (100 unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u32>,
}

impl RateLimitSpec {
    /// What is wrong with it, each problem prefixed by `field`.
    pub fn problems(&self, field: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.bytes_per_sec.is_none() && self.ops_per_sec.is_none() {
            problems.push(format!(
                "{field}: give bytesPerSec, opsPerSec or both (leave the limit out for none)"
            ));
        }
        if let Some(bytes) = self.bytes_per_sec {
            if bytes < MIN_BYTES_PER_SEC {
                problems.push(format!(
                    "{field}.bytesPerSec: {bytes} is below the minimum of {MIN_BYTES_PER_SEC}"
                ));
            }
        }
        if self.ops_per_sec == Some(0) {
            problems.push(format!("{field}.opsPerSec: 0 would stop the device"));
        }
        if let Some(burst) = self.burst_ms {
            if burst == 0 || burst > MAX_BURST_MS {
                problems.push(format!(
                    "{field}.burstMs: {burst} is not between 1 and {MAX_BURST_MS}"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_would_stop_a_device_are_refused() {
        let ok = RateLimitSpec {
            bytes_per_sec: Some(10 << 20),
            ops_per_sec: Some(500),
            burst_ms: Some(50),
        };
        assert!(ok.problems("diskRateLimit").is_empty());
        let empty = RateLimitSpec::default().problems("diskRateLimit");
        assert!(empty[0].starts_with("diskRateLimit: give"), "{empty:?}");
        let bad = RateLimitSpec {
            bytes_per_sec: Some(1),
            ops_per_sec: Some(0),
            burst_ms: Some(0),
        }
        .problems("networkRateLimit");
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].starts_with("networkRateLimit.bytesPerSec: 1 is below"));
    }
}

//! Sizes and CPU counts as people type them (`512m`, `1.5g`, `0.5`).

/// A size in MiB from `512` (MiB, as before), or a number with a unit:
/// `b`, `k`, `m`, `g`, `t` (powers of 1024, any case, an optional `b` or
/// `ib` after: `512MiB`, `1.5GB`). Rounded up to whole MiB; 0 stays 0.
pub fn parse_mib(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b').filter(|u| !u.is_empty()))
        .unwrap_or(unit);
    let bytes_per: f64 = match unit {
        "" | "m" => (1u64 << 20) as f64,
        "b" => 1.0,
        "k" => 1024.0,
        "g" => (1u64 << 30) as f64,
        "t" => (1u64 << 40) as f64,
        _ => {
            return Err(format!(
                "{trimmed:?}: expected a size such as 512m, 1.5g or 512 (MiB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("{trimmed:?}: expected a size such as 512m, 1.5g or 512 (MiB)"))?;
    let mib = (value * bytes_per / (1u64 << 20) as f64).ceil();
    if mib > u64::MAX as f64 / 2.0 {
        return Err(format!("{trimmed:?} is too large"));
    }
    Ok(mib as u64)
}

/// CPUs as docker takes them: a count, fractional or not (`0.5`, `2`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cpus(pub f64);

impl Cpus {
    /// The vCPUs a VM needs for this much CPU time (rounded up).
    pub fn vcpus(self) -> u8 {
        self.0.ceil().clamp(1.0, 255.0) as u8
    }

    /// The host CPU time limit it means, where a whole count of vCPUs
    /// does not say it already.
    pub fn limit(self) -> Option<f64> {
        (self.0.fract() != 0.0).then_some(self.0)
    }
}

pub fn parse_cpus(text: &str) -> Result<Cpus, String> {
    match text.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n <= 255.0 => Ok(Cpus(n)),
        _ => Err(format!(
            "{text:?}: expected a number of CPUs above 0, such as 2 or 0.5"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_the_units_people_type() {
        for (text, mib) in [
            ("512", 512),
            ("512m", 512),
            ("512M", 512),
            ("512MiB", 512),
            ("1.5g", 1536),
            ("1.5GB", 1536),
            ("2G", 2048),
            ("1t", 1 << 20),
            ("1024k", 1),
            ("1k", 1),
            ("1048576b", 1),
            ("0", 0),
            (" 64m ", 64),
        ] {
            assert_eq!(parse_mib(text), Ok(mib), "{text}");
        }
        for bad in ["", "m", "1.5x", "-1m", "1e400", "one", "1..5g", "NaN"] {
            assert!(parse_mib(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fractional_cpus_are_a_vcpu_count_and_a_limit() {
        let half = parse_cpus("0.5").unwrap();
        assert_eq!((half.vcpus(), half.limit()), (1, Some(0.5)));
        let two = parse_cpus("2").unwrap();
        assert_eq!((two.vcpus(), two.limit()), (2, None));
        let odd = parse_cpus("1.5").unwrap();
        assert_eq!((odd.vcpus(), odd.limit()), (2, Some(1.5)));
        for bad in ["0", "-1", "x", "inf", "300"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }
}

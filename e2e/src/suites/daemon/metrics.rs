//! The daemon's /metrics scrape, read as samples (name, labels, value) and
//! checked for the web group's series.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

pub type Labels = BTreeMap<String, String>;

/// A series and what its value must be.
type Expected<'a> = (&'a str, &'a Labels, fn(f64) -> bool);

/// The samples of a Prometheus/OpenMetrics text exposition; a line that
/// is neither a comment nor a sample is an error.
pub fn samples(text: &str) -> Result<Vec<(String, Labels, f64)>> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value: {line}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, Labels::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels: {line}"))?;
                let mut labels = Labels::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (key, quoted) = pair
                        .split_once('=')
                        .with_context(|| format!("bad label: {line}"))?;
                    let value = quoted
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .with_context(|| format!("unquoted label: {line}"))?;
                    labels.insert(key.to_string(), value.to_string());
                }
                (name, labels)
            }
        };
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        out.push((name.to_string(), labels, value));
    }
    Ok(out)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The web group is up, has VMM memory and network traffic, and its main
/// container's series are there; the start histogram counted it.
pub fn check_web(text: &str) -> Result<String> {
    ensure!(text.trim_end().ends_with("# EOF"), "no # EOF at the end");
    let samples = samples(text)?;
    let value = |name: &str, wanted: &Labels| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l == wanted)
            .map(|(_, _, v)| *v)
    };
    let web = labels(&[("group", "web")]);
    let main = labels(&[("group", "web"), ("container", "main")]);
    let checks: [Expected; 6] = [
        ("capsa_group_up", &web, |v| v == 1.0),
        ("capsa_vmm_memory_bytes", &web, |v| v > 0.0),
        ("capsa_network_to_guest_bytes_total", &web, |v| v > 0.0),
        ("capsa_container_cpu_seconds_total", &main, |v| v >= 0.0),
        ("capsa_container_up", &main, |v| v == 1.0),
        ("capsa_group_start_seconds_count", &Labels::new(), |v| {
            v >= 1.0
        }),
    ];
    for (name, wanted, ok) in checks {
        match value(name, wanted) {
            Some(v) if ok(v) => {}
            other => bail!("{name} {wanted:?}: {other:?}"),
        }
    }
    Ok(format!("{} samples", samples.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_with_their_labels() {
        let text =
            "# TYPE capsa_group_up gauge\ncapsa_group_up{group=\"web\"} 1\ncapsa_images 2\n# EOF\n";
        let samples = samples(text).unwrap();
        assert_eq!(
            samples[0],
            ("capsa_group_up".into(), labels(&[("group", "web")]), 1.0)
        );
        assert_eq!(samples[1].2, 2.0);
        assert!(super::samples("capsa_group_up{group=web} 1").is_err());
        assert!(super::samples("capsa up 1").is_err());
    }
}

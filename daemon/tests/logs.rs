//! capsad's own log: lines with levels, as JSON objects when asked, and
//! nothing under the level asked for.

mod common;

#[test]
fn json_lines_carry_a_level_and_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(dir.path(), &["--log-format", "json"]);
    let stderr = common::stderr_of(daemon);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    let listening = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("listening on"))
        })
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(listening["level"], "INFO");
    assert!(listening["timestamp"].is_string(), "{listening}");
}

#[test]
fn lines_under_the_level_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(dir.path(), &["--log-level", "warn"]);
    let stderr = common::stderr_of(daemon);
    assert!(!stderr.contains("listening on"), "{stderr}");
}

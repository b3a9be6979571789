//! The rows in Capsa: each row's image imported, the rows that exit by
//! themselves as the containers of one group, the stopped rows as the
//! containers of a second (stopped through the API with the table's
//! timeout once all have reported); each container's report and exit
//! read back through the API.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_api::{ContainerStatus, GroupView};
use hyper::Method;

use super::probe::{Caught, ProcessReport};
use super::table::{Row, HOSTNAME, STOP_TIMEOUT_SECS};
use super::Observed;
use crate::suites::daemon::Capsad;

fn image_name(row: &Row) -> String {
    format!("conf-{}", row.name)
}

pub fn import(d: &Capsad, layouts: &[(String, PathBuf)]) -> Result<()> {
    for (name, layout) in layouts {
        let out = d.capsa(&[
            "image",
            "import",
            &layout.to_string_lossy(),
            "--name",
            &format!("conf-{name}"),
        ])?;
        ensure!(out.code == Some(0), "importing {name}: {}", out.describe());
    }
    Ok(())
}

fn container_spec(row: &Row) -> serde_json::Value {
    let mut spec = serde_json::json!({"name": row.name, "image": image_name(row)});
    let o = row.spec;
    if let Some(command) = o.command {
        spec["command"] = serde_json::json!(command);
    }
    if let Some(args) = o.args {
        spec["args"] = serde_json::json!(args);
    }
    if !o.env.is_empty() {
        let env: serde_json::Map<String, serde_json::Value> = o
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        spec["env"] = serde_json::Value::Object(env);
    }
    if let Some(dir) = o.working_dir {
        spec["workingDir"] = serde_json::json!(dir);
    }
    if let Some(user) = o.user {
        spec["user"] = serde_json::json!(user);
    }
    if let Some(signal) = o.stop_signal {
        spec["stopSignal"] = serde_json::json!(signal);
    }
    spec
}

/// The report and the caught signal in a container's log.
fn from_log(d: &Capsad, row: &Row) -> Result<(Option<ProcessReport>, Option<i32>)> {
    let lines = d.logs(HOSTNAME, row.name)?;
    let stdout = lines.iter().filter(|l| l.stream == "stdout");
    let mut report = None;
    let mut caught = None;
    for line in stdout {
        if let Ok(r) = serde_json::from_str::<ProcessReport>(&line.line) {
            report.get_or_insert(r);
        } else if let Ok(c) = serde_json::from_str::<Caught>(&line.line) {
            caught = Some(c.signal);
        }
    }
    Ok((report, caught))
}

/// Runs `rows` (all stopped, or none) as one group named HOSTNAME.
pub fn run_group(d: &Capsad, rows: &[&Row]) -> Result<HashMap<String, Observed>> {
    let spec = serde_json::json!({
        "name": HOSTNAME,
        "restartPolicy": "Never",
        "memoryMib": 512,
        "containers": rows.iter().map(|r| container_spec(r)).collect::<Vec<_>>(),
    });
    let client = d.client()?;
    let _: GroupView = client.call(Method::POST, "/v1/groups", Some(spec.to_string()))?;
    let result = (|| {
        let _: GroupView =
            client.call(Method::POST, &format!("/v1/groups/{HOSTNAME}/start"), None)?;
        if rows.iter().any(|r| r.stopped) {
            // Stopped once every row has reported (so has its traps set).
            let deadline = Instant::now() + Duration::from_secs(60);
            for row in rows {
                while from_log(d, row)?.0.is_none() {
                    ensure!(Instant::now() < deadline, "{} did not report", row.name);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let _: GroupView = client.call(
                Method::POST,
                &format!("/v1/groups/{HOSTNAME}/stop?timeout={STOP_TIMEOUT_SECS}"),
                None,
            )?;
        }
        let mut observed = HashMap::new();
        for row in rows {
            let exit = d.wait(HOSTNAME, row.name)?;
            let (report, caught) = from_log(d, row)?;
            observed.insert(
                row.name.to_string(),
                Observed {
                    report,
                    exit_code: Some(exit.exit_code),
                    signal: exit.signal,
                    caught,
                    error: None,
                },
            );
        }
        let view: GroupView = d.group(HOSTNAME)?;
        for container in &view.containers {
            let entry = observed
                .get_mut(&container.name)
                .context("a container not in the table")?;
            if container.status != ContainerStatus::Exited {
                entry.error = Some(format!("left {:?}", container.status));
            }
        }
        Ok(observed)
    })();
    let _: Result<serde_json::Value> =
        client.call(Method::DELETE, &format!("/v1/groups/{HOSTNAME}"), None);
    result
}

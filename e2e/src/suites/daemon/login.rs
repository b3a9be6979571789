//! `capsa login` against a registry on loopback that asks for a login
//! (docker-registry with htpasswd): a pull without it is refused, a wrong
//! password is refused and kept nowhere, the right one is checked by
//! capsad and kept in docker's config.json, pulls then use it, and
//! `capsa logout` forgets it.

use anyhow::{ensure, Result};
use capsa_api::ImageView;
use hyper::Method;

use super::harness::{Capsad, NETNS};
use crate::registry::Registry;
use crate::suite::Suite;

const GUARDED: &str = "127.0.0.1:5001";
const USER: &str = "e2e-user";
const PASSWORD: &str = "e2e-s3cret";

pub fn run(s: &mut Suite, d: &Capsad) -> Result<()> {
    let _registry = Registry::start_with(
        d.artifacts,
        Some(NETNS),
        GUARDED,
        &d.work,
        Some((USER, PASSWORD)),
    )?;
    let docker = d.work.join("docker-config");
    let _ = std::fs::remove_dir_all(&docker);
    let env = [("DOCKER_CONFIG", docker.as_os_str())];
    let reference = format!("{GUARDED}/library/busybox:latest");
    s.check(
        "capsa login then pulls from a registry on loopback that requires it, and pushes to it",
        || {
            let anonymous = d.capsa_in(&["image", "pull", &reference], None, &env)?;
            ensure!(
                anonymous.code != Some(0) && anonymous.stderr.contains("credentials"),
                "a pull without a login: {}",
                anonymous.describe()
            );
            let login = |password: &str| {
                d.capsa_in(
                    &["login", GUARDED, "-u", USER, "--password-stdin"],
                    Some(format!("{password}\n").as_bytes()),
                    &env,
                )
            };
            let wrong = login("not-it")?;
            ensure!(
                wrong.code != Some(0),
                "a wrong password: {}",
                wrong.describe()
            );
            ensure!(
                !docker.join("config.json").exists(),
                "a refused login was kept"
            );
            login(PASSWORD)?.exited_with(0, &["Login Succeeded"])?;
            let config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(docker.join("config.json"))?)?;
            ensure!(
                config["auths"][GUARDED]["auth"].is_string(),
                "config.json: {config}"
            );
            let pulled = d.capsa_in(&["--json", "image", "pull", &reference], None, &env)?;
            ensure!(
                pulled.code == Some(0),
                "a pull after the login: {}",
                pulled.describe()
            );
            let view: ImageView = serde_json::from_str(&pulled.stdout)?;
            ensure!(view.name == reference, "{view:?}");
            // Push, with the same login, and pull it back under that name.
            let pushed_as = format!("{GUARDED}/team/pushed:v1");
            let pushed = d.capsa_in(
                &["--json", "image", "push", &reference, &pushed_as],
                None,
                &env,
            )?;
            ensure!(pushed.code == Some(0), "push: {}", pushed.describe());
            let pushed: capsa_api::PushView = serde_json::from_str(&pushed.stdout)?;
            ensure!(
                pushed.digest == view.digest,
                "pushed {pushed:?}, had {view:?}"
            );
            let back = d.capsa_in(&["--json", "image", "pull", &pushed_as], None, &env)?;
            ensure!(back.code == Some(0), "pull back: {}", back.describe());
            let back: ImageView = serde_json::from_str(&back.stdout)?;
            ensure!(back.digest == view.digest, "{back:?}");
            let _: serde_json::Value = d.client()?.call(
                Method::DELETE,
                &format!("/v1/images?name={pushed_as}"),
                None,
            )?;
            let logout = d.capsa_in(&["logout", GUARDED], None, &env)?;
            ensure!(logout.code == Some(0), "{}", logout.describe());
            let config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(docker.join("config.json"))?)?;
            ensure!(
                config["auths"].get(GUARDED).is_none(),
                "after logout: {config}"
            );
            let _: serde_json::Value = d.client()?.call(
                Method::DELETE,
                &format!("/v1/images?name={reference}"),
                None,
            )?;
            Ok(format!(
                "without a login: {}; pulled {}",
                anonymous.stderr.lines().last().unwrap_or_default(),
                view.digest
            ))
        },
    );
    Ok(())
}

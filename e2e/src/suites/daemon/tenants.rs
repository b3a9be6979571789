//! Tenants over capsad's TLS listener, against real microVMs (in the
//! networks suite, whose capsad serves it): a tenant runs a group and
//! execs into it with the real `capsa` over TLS; another tenant gets the
//! not-found answer for it and sees none of it; no token gets 401; a
//! group past the quota is refused with the limit named; the tenant's
//! groups join a network of its own.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use capsa_api::{ApiError, ErrorCode, GroupView, NetworkView, VersionView};
use capsa_cli::client::{Client, Endpoint};
use hyper::Method;
use sha2::{Digest, Sha256};

use super::harness::{Capsad, Output, COMMAND_TIMEOUT, NETNS};
use crate::suite::Suite;
use crate::vm;

/// The TLS listener, on loopback in capsad's namespace.
const LISTEN: &str = "127.0.0.1:17443";
const ALICE: &str = "alice-e2e-token";
const BOB: &str = "bob-e2e-token";

/// Writes the certificates and the tenants file, and gives capsad the
/// flags that serve them; call before its first start.
pub fn configure(d: &mut Capsad) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
        .signed_by(&key, &ca, &ca_key)?;
    let dir = d.root().join("tls");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    let digest = |token: &str| hex::encode(Sha256::digest(token.as_bytes()));
    std::fs::write(
        dir.join("tenants.toml"),
        format!(
            "[[tenant]]\nname = \"alice\"\ntoken-sha256 = \"{}\"\n[tenant.quota]\ngroups = 1\nmemory-mib = 1024\n\n[[tenant]]\nname = \"bob\"\ntoken-sha256 = \"{}\"\n",
            digest(ALICE),
            digest(BOB)
        ),
    )?;
    for (flag, value) in [
        ("--tls-listen", OsString::from(LISTEN)),
        ("--tls-cert", dir.join("cert.pem").into()),
        ("--tls-key", dir.join("key.pem").into()),
        ("--tenants", dir.join("tenants.toml").into()),
    ] {
        d.daemon_args.push(flag.into());
        d.daemon_args.push(value);
    }
    Ok(())
}

fn ca(d: &Capsad) -> PathBuf {
    d.root().join("tls/ca.pem")
}

/// The real `capsa`, in capsad's namespace, as a tenant over TLS.
fn capsa_as(d: &Capsad, token: &str, args: &[&str]) -> Result<Output> {
    let mut all: Vec<OsString> = vec![
        "--host".into(),
        format!("https://{LISTEN}").into(),
        "--tls-ca".into(),
        ca(d).into(),
    ];
    all.extend(args.iter().map(OsString::from));
    let mut command = d
        .artifacts
        .command_in(Some(NETNS), &d.artifacts.path("capsa"), &all);
    command.env("CAPSA_TOKEN", token);
    let run = vm::Background::spawn_with(command, None)?.finish_or_fail(COMMAND_TIMEOUT)?;
    Ok(Output::from(run))
}

/// `call` made from a thread in capsad's namespace (where the listener
/// is), as the tenant of `token` (none: no credentials).
fn api_as<T: Send + 'static>(
    d: &Capsad,
    token: Option<&str>,
    call: impl FnOnce(&Client) -> Result<T> + Send + 'static,
) -> Result<T> {
    let endpoint = Endpoint::parse(
        &format!("https://{LISTEN}"),
        Some(&ca(d)),
        token.map(str::to_string),
    )?;
    std::thread::spawn(move || {
        let netns = std::fs::File::open(format!("/run/netns/{NETNS}"))?;
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering capsad's network namespace")?;
        call(&Client::to(endpoint)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the API thread panicked"))?
}

fn refusal<T: std::fmt::Debug>(answer: Result<T>) -> Result<ApiError> {
    match answer {
        Ok(value) => anyhow::bail!("wanted a refusal; got {value:?}"),
        Err(e) => e
            .downcast::<ApiError>()
            .map_err(|e| anyhow::anyhow!("wanted an API error; got {e:#}")),
    }
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    s.check(
        "over TLS, tenant alice runs a group and execs into it; bob gets the not-found answer for it; no token gets 401",
        || {
            let version = api_as(d, Some(ALICE), |c| {
                c.call::<VersionView>(Method::GET, "/v1/version", None)
            })?;
            ensure!(version.tenant.as_deref() == Some("alice"), "{version:?}");
            let out = capsa_as(
                d,
                ALICE,
                &["run", "-d", "--name", "tenant-a", "-m", "256m", "busybox", "sleep", "600"],
            )?;
            ensure!(out.code == Some(0), "run: {}", out.describe());
            let exec = capsa_as(d, ALICE, &["exec", "tenant-a", "sh", "-c", "echo exec-$((6*7))"])?;
            exec.exited_with(0, &["exec-42"])?;
            let alice_sees: Vec<GroupView> =
                api_as(d, Some(ALICE), |c| c.call(Method::GET, "/v1/groups", None))?;
            let names: Vec<&str> = alice_sees.iter().map(|g| g.name.as_str()).collect();
            ensure!(names == ["tenant-a"], "alice sees {names:?}");
            ensure!(
                alice_sees[0].spec.network.as_deref() == Some("alice"),
                "alice's group is on {:?}",
                alice_sees[0].spec.network
            );
            let networks: Vec<NetworkView> =
                api_as(d, Some(ALICE), |c| c.call(Method::GET, "/v1/networks", None))?;
            let names: Vec<&str> = networks.iter().map(|n| n.name.as_str()).collect();
            ensure!(names == ["alice"], "alice's networks: {names:?}");

            let missing = refusal(api_as(d, Some(BOB), |c| {
                c.call::<GroupView>(Method::GET, "/v1/groups/no-such-group", None)
            }))?;
            for (method, path) in [
                (Method::GET, "/v1/groups/tenant-a"),
                (Method::DELETE, "/v1/groups/tenant-a"),
                (Method::POST, "/v1/groups/tenant-a/stop"),
                (Method::GET, "/v1/groups/tenant-a/containers/main/logs"),
            ] {
                let answer = refusal(api_as(d, Some(BOB), move |c| {
                    c.call::<serde_json::Value>(method, path, None)
                }))?;
                ensure!(
                    answer.code == ErrorCode::NotFound
                        && answer.message == missing.message.replace("no-such-group", "tenant-a"),
                    "bob {path}: {answer:?} (a missing group: {missing:?})"
                );
            }
            let bob_exec = capsa_as(d, BOB, &["exec", "tenant-a", "true"])?;
            ensure!(bob_exec.code != Some(0), "bob's exec: {}", bob_exec.describe());
            let bob_sees: Vec<GroupView> =
                api_as(d, Some(BOB), |c| c.call(Method::GET, "/v1/groups", None))?;
            ensure!(bob_sees.is_empty(), "bob sees {bob_sees:?}");
            let anonymous = refusal(api_as(d, None, |c| {
                c.call::<Vec<GroupView>>(Method::GET, "/v1/groups", None)
            }))?;
            ensure!(anonymous.code == ErrorCode::Unauthorized, "{anonymous:?}");
            Ok(format!(
                "exec: {}; bob: {}; no token: {}",
                exec.stdout.trim(),
                missing.message,
                anonymous.message
            ))
        },
    );
    s.check(
        "a tenant's group past its quota is refused, the limit named",
        || {
            let spec = serde_json::json!({
                "name": "tenant-b",
                "containers": [{"name": "main", "image": "busybox"}],
            })
            .to_string();
            let answer = refusal(api_as(d, Some(ALICE), move |c| {
                c.call::<GroupView>(Method::POST, "/v1/groups", Some(spec))
            }))?;
            ensure!(
                answer.code == ErrorCode::QuotaExceeded
                    && answer.details.len() == 1
                    && answer.details[0]
                        .starts_with("groups: 1 held and 1 asked for, above the quota of 1"),
                "{answer:?}"
            );
            Ok(format!("{}: {}", answer.message, answer.details.join("; ")))
        },
    );
    s.check("a tenant removes its group and its network", || {
        for args in [
            &["stop", "tenant-a"][..],
            &["rm", "tenant-a"],
            &["network", "rm", "alice"],
        ] {
            let out = capsa_as(d, ALICE, args)?;
            ensure!(out.code == Some(0), "{args:?}: {}", out.describe());
        }
        Ok(String::new())
    });
    Ok(())
}

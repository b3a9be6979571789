//! Starts from templates: a shape's first group boots and capsad builds
//! its template after; the next groups of that shape are clones restored
//! from it, each with its own identity (address, MAC, boot id, random
//! bytes), running containers whose exec, logs, network and volumes work;
//! a restarted capsad keeps the templates and adopts the clones; a group
//! may opt out; a corrupted template is deleted and the group boots from
//! its kernel, with an event that says why.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsa_api::{GroupStatus, SystemInfoView, TemplateView};
use hyper::Method;

use super::harness::Capsad;
use crate::suite::Suite;

/// How long a template's build may take nested (a boot and a snapshot).
const BUILD_PATIENCE: Duration = Duration::from_secs(240);

/// What a clone says of itself.
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    boot_id: String,
    random: String,
    mac: String,
    address: String,
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    d.start()?;
    let import = d.import_busybox()?;
    import.succeeded("import")?;
    let mut template = None;
    s.check(
        "a shape's first group boots from its kernel, and capsad builds its template after",
        || {
            let web = d.capsa(&[
                "run", "-d", "--name", "first", "busybox", "sh", "-c",
                "mkdir -p /www && echo served-by-first > /www/index.html && exec httpd -f -p 80 -h /www",
            ])?;
            web.succeeded("run -d first")?;
            let view = d.group("first")?;
            ensure!(view.template.is_none(), "first came from {:?}", view.template);
            let built = wait_for_template(d)?;
            ensure!(
                built.cpus == view.cpus && built.memory_mib == view.memory_mib && built.nic,
                "{built:?} for {} vCPU, {} MiB",
                view.cpus,
                view.memory_mib
            );
            let detail = format!(
                "template {} built in {} ms, {} MiB on disk",
                built.id,
                built.build_ms,
                built.disk_bytes >> 20
            );
            template = Some(built);
            Ok(detail)
        },
    );
    let Some(template) = template else {
        bail!("no template was built");
    };
    let mut identities = Vec::new();
    s.check(
        "a group restored from the template runs its container: logs, exec, a volume, the network",
        || {
            exits(d, &["volume", "create", "kept", "--size", "16"])?;
            let run = d.capsa(&[
                "run",
                "-d",
                "--name",
                "clone-a",
                "-v",
                "kept:/data",
                "busybox",
                "sh",
                "-c",
                "echo hello-from-a; echo written-by-a > /data/file; exec sleep 600",
            ])?;
            run.succeeded("run -d clone-a")?;
            restored_from(d, "clone-a", &template.id)?;
            let logs = wait_for_log(d, "clone-a", "hello-from-a")?;
            let read = exec(d, "clone-a", "cat /data/file")?;
            ensure!(read == "written-by-a", "the volume holds {read:?}");
            let first_ip = d.group("first")?.ip.context("first has no address")?;
            let fetched = exec(
                d,
                "clone-a",
                &format!("timeout 10 wget -q -O - http://{first_ip}/"),
            )?;
            ensure!(fetched == "served-by-first", "wget got {fetched:?}");
            Ok(format!(
                "log {logs:?}; the volume and first's httpd answered"
            ))
        },
    );
    s.check(
        "two clones of one template differ: random bytes, boot id, MAC and address",
        || {
            let run = d.capsa(&["run", "-d", "--name", "clone-b", "busybox", "sleep", "600"])?;
            run.succeeded("run -d clone-b")?;
            restored_from(d, "clone-b", &template.id)?;
            for name in ["clone-a", "clone-b"] {
                let identity = identity(d, name)?;
                let view = d.group(name)?;
                let ip = view.ip.context("no address")?;
                ensure!(
                    identity.address == ip.to_string()
                        && identity.mac == capsa_network::mac_for(ip).to_string(),
                    "{name} has {identity:?}, its group {ip}"
                );
                identities.push(identity);
            }
            let (a, b) = (&identities[0], &identities[1]);
            ensure!(
                a.boot_id != b.boot_id
                    && a.random != b.random
                    && a.mac != b.mac
                    && a.address != b.address,
                "{a:?} and {b:?}"
            );
            Ok(format!("{a:?} and {b:?}"))
        },
    );
    s.check(
        "a restarted capsad keeps the template and adopts the clones; the next group is a clone too",
        || {
            d.kill();
            d.start()?;
            let view = d.group("clone-a")?;
            ensure!(
                view.status == GroupStatus::Running && view.template.as_ref() == Some(&template.id),
                "clone-a after the restart: {:?} from {:?}",
                view.status,
                view.template
            );
            let read = exec(d, "clone-a", "cat /data/file")?;
            ensure!(read == "written-by-a", "the volume holds {read:?}");
            let kept = templates(d)?;
            ensure!(
                kept.iter().any(|t| t.id == template.id),
                "templates after the restart: {kept:?}"
            );
            let run = d.capsa(&["run", "--rm", "--name", "clone-c", "busybox", "echo", "from-c"])?;
            run.exited_with(0, &["from-c"])?;
            Ok("clone-a answered; clone-c ran".into())
        },
    );
    s.check(
        "a group that opts out (--cold-boot) boots from its kernel",
        || {
            let run = d.capsa(&[
                "run",
                "-d",
                "--cold-boot",
                "--name",
                "cold",
                "busybox",
                "sleep",
                "600",
            ])?;
            run.succeeded("run -d cold")?;
            let view = d.group("cold")?;
            ensure!(
                view.template.is_none() && view.spec.cold_boot,
                "cold came from {:?}",
                view.template
            );
            exits(d, &["rm", "cold"])?;
            Ok("booted".into())
        },
    );
    s.check(
        "a corrupted template is deleted, and the group boots from its kernel with an event saying so",
        || {
            let state = d
                .root()
                .join("root/templates")
                .join(&template.id)
                .join("state");
            let bytes = std::fs::read(&state).context("the template's state")?;
            std::fs::write(&state, &bytes[..bytes.len() / 2])?;
            let run = d.capsa(&["run", "-d", "--name", "clone-d", "busybox", "sleep", "600"])?;
            run.succeeded("run -d clone-d")?;
            let view = d.group("clone-d")?;
            ensure!(
                view.status == GroupStatus::Running && view.template.is_none(),
                "clone-d: {:?} from {:?}",
                view.status,
                view.template
            );
            let event = d
                .seen()
                .into_iter()
                .find(|e| e.group == "clone-d" && e.action == "template-failed")
                .context("no template-failed event")?;
            let detail = event.detail.unwrap_or_default();
            ensure!(detail.contains(&template.id), "the event says {detail:?}");
            let kept = templates(d)?;
            ensure!(kept.is_empty(), "templates left: {kept:?}");
            Ok(detail)
        },
    );
    for name in ["first", "clone-a", "clone-b", "clone-d"] {
        let _ = d.capsa(&["rm", name]);
    }
    Ok(())
}

fn exits(d: &Capsad, args: &[&str]) -> Result<()> {
    let out = d.capsa(args)?;
    out.succeeded(&format!("capsa {args:?}"))?;
    Ok(())
}

/// What `script` prints in `group`'s container, trimmed.
fn exec(d: &Capsad, group: &str, script: &str) -> Result<String> {
    let out = d.capsa(&["exec", group, "--", "sh", "-c", script])?;
    out.succeeded(&format!("exec in {group}"))?;
    Ok(out.stdout.trim().to_string())
}

fn templates(d: &Capsad) -> Result<Vec<TemplateView>> {
    let info: SystemInfoView = d.client()?.call(Method::GET, "/v1/system/info", None)?;
    info.templates.context("system info shows no templates")
}

/// The first template capsad lists, once it lists one.
pub(super) fn wait_for_template(d: &Capsad) -> Result<TemplateView> {
    let deadline = Instant::now() + BUILD_PATIENCE;
    loop {
        if let Some(template) = templates(d)?.into_iter().next() {
            return Ok(template);
        }
        if Instant::now() > deadline {
            bail!("no template after {} s", BUILD_PATIENCE.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn restored_from(d: &Capsad, group: &str, template: &str) -> Result<()> {
    let view = d.group(group)?;
    ensure!(
        view.status == GroupStatus::Running && view.template.as_deref() == Some(template),
        "{group}: {:?}, from {:?}",
        view.status,
        view.template
    );
    Ok(())
}

fn wait_for_log(d: &Capsad, group: &str, line: &str) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = d.log_lines(group, "main")?;
        if lines.iter().any(|l| l == line) {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            bail!("{group}'s log: {lines:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn identity(d: &Capsad, group: &str) -> Result<Identity> {
    let text = exec(
        d,
        group,
        "cat /proc/sys/kernel/random/boot_id; \
         head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
         cat /sys/class/net/eth0/address; \
         ip -4 -o addr show eth0 | sed 's/.* inet \\([0-9.]*\\)\\/.*/\\1/'",
    )?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let [boot_id, random, mac, address] = lines[..] else {
        bail!("{group} said {text:?}");
    };
    Ok(Identity {
        boot_id: boot_id.into(),
        random: random.into(),
        mac: mac.into(),
        address: address.into(),
    })
}

//! The `images` suite: a real-size image (Debian bookworm minbase with
//! python3, built by scripts/debian-image.sh) through capsad: its layer is
//! converted into a disk image once, at import, and then served from the
//! cache; it runs at the default VM size; two groups read the same host
//! file; a damaged cache entry is noticed and converted again by a
//! restarted daemon; `run --rm` leaves no scratch disk; a group without a
//! scratch disk writes to memory. And names as docker users type them:
//! `busybox` pulled from a Docker Hub mirror on loopback (Debian's
//! docker-registry, filled by scripts/registry-data.sh), then run.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use capsa_api::{GroupView, ImageView, ImportRequest};
use hyper::Method;

use super::harness::{Capsad, NETNS};
use crate::registry::Registry;
use crate::suite::Suite;
use capsa_cli::client::Note;

const IMAGE: &str = "debian";
/// The Docker Hub mirror, in capsad's network namespace.
const MIRROR: &str = "127.0.0.1:5000";

/// Starts a one-container group of the Debian image running `command`;
/// returns the start's progress lines.
fn start(d: &Capsad, name: &str, command: &[&str]) -> Result<Vec<String>> {
    let spec = serde_json::json!({"name": name, "containers": [
        {"name": "main", "image": IMAGE, "command": command}]});
    let client = d.client()?;
    let _: GroupView = client.call(Method::POST, "/v1/groups", Some(spec.to_string()))?;
    let mut progress = Vec::new();
    let _: GroupView = client.call_with_progress(
        Method::POST,
        &format!("/v1/groups/{name}/start"),
        None,
        |line| progress.push(line.to_string()),
    )?;
    Ok(progress)
}

fn remove(d: &Capsad, name: &str) -> Result<()> {
    let _: serde_json::Value =
        d.client()?
            .call(Method::DELETE, &format!("/v1/groups/{name}"), None)?;
    Ok(())
}

fn layer_images(d: &Capsad) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(d.root().join("root/layer-images"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .collect())
}

/// The (device, inode) of every regular file a process has open.
fn open_files(pid: u32) -> Result<HashSet<(u64, u64)>> {
    let mut files = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            if meta.is_file() {
                files.insert((meta.dev(), meta.ino()));
            }
        }
    }
    Ok(files)
}

fn says(progress: &[String], what: &str) -> bool {
    progress.iter().any(|p| p.contains(what))
}

pub fn run(s: &mut Suite, d: &mut Capsad) -> Result<()> {
    let _registry = Registry::start(d.artifacts, Some(NETNS), MIRROR, &d.work)?;
    d.daemon_args = vec![
        "--registry-mirror".into(),
        format!("http://{MIRROR}").into(),
    ];
    d.start()?;
    let layout = d.artifacts.path("debian-oci");
    let request = ImportRequest {
        path: layout.to_string_lossy().into_owned(),
        name: Some(IMAGE.into()),
    };
    let mut imported = Vec::new();
    let mut moved: Vec<capsa_api::Transfer> = Vec::new();
    let _: ImageView = d.client()?.call_with_notes(
        Method::POST,
        "/v1/images/import",
        Some(serde_json::to_string(&request)?),
        |note| match note {
            Note::Line(line) => imported.push(line.to_string()),
            Note::Transfer(transfer) => moved.push(transfer.clone()),
        },
    )?;
    s.check(
        "its layer is converted into a disk image at import, with progress (lines, and each big blob's bytes as they are copied)",
        || {
            ensure!(says(&imported, "converted to a disk image"), "{imported:?}");
            ensure!(!moved.is_empty(), "no byte counts");
            let mut last: std::collections::HashMap<&str, u64> = Default::default();
            for transfer in &moved {
                let before = last.insert(&transfer.id, transfer.done).unwrap_or(0);
                ensure!(
                    transfer.done > before && transfer.done <= transfer.total,
                    "{transfer:?} after {before}"
                );
            }
            Ok(imported
                .iter()
                .find(|p| p.contains("converted"))
                .cloned()
                .unwrap_or_default())
        },
    );
    s.check(
        "python3 -c 'print(6*7)' prints 42 at the default VM size, converting nothing",
        || {
            let first = start(d, "py", &["python3", "-c", "print(6*7)"])?;
            let exit = d.wait("py", "main")?;
            let lines: Vec<String> = d.logs("py", "main")?.into_iter().map(|l| l.line).collect();
            remove(d, "py")?;
            ensure!(exit.exit_code == 0 && lines == ["42"], "{exit:?} {lines:?}");
            ensure!(
                says(&first, "disk image cached") && !says(&first, "converted"),
                "{first:?}"
            );
            Ok(format!("256 MiB; {}", first.join("; ")))
        },
    );
    s.check(
        "two groups run the image at once, reading the same host file, and the second start converts nothing",
        || {
            let a = start(d, "one", &["sleep", "60"])?;
            let b = start(d, "two", &["sleep", "60"])?;
            let result = (|| {
                ensure!(
                    says(&a, "disk image cached") && !says(&a, "converted"),
                    "{a:?}"
                );
                ensure!(says(&b, "disk image cached"), "{b:?}");
                let images = layer_images(d)?;
                ensure!(images.len() == 1, "{images:?}");
                let meta = std::fs::metadata(&images[0])?;
                let image = (meta.dev(), meta.ino());
                for name in ["one", "two"] {
                    let pid = d.group(name)?.vmm_pid.context("no VMM")?;
                    // A jailed VMM's descriptors are its child's (the
                    // process capsad started is the jail's supervisor).
                    let mut open = Vec::new();
                    for process in capsa_vm_process::vmm_processes(pid) {
                        open.extend(open_files(process)?);
                    }
                    ensure!(
                        open.contains(&image),
                        "{name}'s VMM does not have {} open",
                        images[0].display()
                    );
                }
                Ok(format!(
                    "both VMMs have inode {} open ({} MiB)",
                    image.1,
                    meta.len() >> 20
                ))
            })();
            remove(d, "one")?;
            remove(d, "two")?;
            result
        },
    );
    s.check(
        "run --rm leaves no group directory and no scratch disk",
        || {
            let out = d.capsa(&["run", "--rm", IMAGE, "true"])?;
            ensure!(out.code == Some(0), "{}", out.describe());
            let left: Vec<_> = std::fs::read_dir(d.root().join("root/groups"))?
                .flatten()
                .map(|e| e.path())
                .collect();
            ensure!(left.is_empty(), "{left:?}");
            Ok("nothing left".into())
        },
    );
    s.check(
        "a group with scratchMib 0 has no scratch disk and writes its layer to memory",
        || {
            let spec = serde_json::json!({"name": "mem", "scratchMib": 0, "containers": [
                {"name": "main", "image": IMAGE,
                 "command": ["sh", "-c", "echo data > /written && cat /written && sleep 30"]}]});
            let client = d.client()?;
            let _: GroupView = client.call(Method::POST, "/v1/groups", Some(spec.to_string()))?;
            let _: GroupView = client.call(Method::POST, "/v1/groups/mem/start", None)?;
            let result = (|| {
                let deadline = Instant::now() + Duration::from_secs(60);
                let lines = loop {
                    let lines: Vec<String> =
                        d.logs("mem", "main")?.into_iter().map(|l| l.line).collect();
                    if !lines.is_empty() || Instant::now() > deadline {
                        break lines;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                };
                ensure!(lines == ["data"], "{lines:?}");
                let scratch = d.root().join("root/groups/mem/scratch.img");
                ensure!(!scratch.exists(), "{} exists", scratch.display());
                Ok("wrote /written; no scratch.img".to_string())
            })();
            remove(d, "mem")?;
            result
        },
    );
    s.check(
        "a full scratch disk is the container's own ENOSPC, in one sentence, and capsad goes on",
        || {
            let full = d.capsa(&[
                "run", "--rm", "--scratch", "64", IMAGE, "sh", "-c",
                "dd if=/dev/zero of=/big bs=1M count=100 2>&1 | grep -o 'No space left on device' | head -1; exit 7",
            ])?;
            full.exited_with(7, &["No space left on device"])?;
            let groups: Vec<GroupView> = d.client()?.call(Method::GET, "/v1/groups", None)?;
            ensure!(groups.is_empty(), "{groups:?}");
            Ok(full.describe())
        },
    );
    s.check(
        "pull busybox, then run busybox: Docker Hub names from a mirror on loopback",
        || {
            let pulled = d.capsa(&["image", "pull", "busybox"])?;
            ensure!(pulled.code == Some(0), "pull: {}", pulled.describe());
            let images: Vec<ImageView> = d.client()?.call(Method::GET, "/v1/images", None)?;
            ensure!(
                images.iter().any(|i| i.name == "busybox:latest"),
                "{images:?}"
            );
            d.capsa(&["run", "--rm", "busybox", "echo", "hi"])?
                .exited_with(0, &["hi"])?;
            Ok(format!(
                "pulled {} via {MIRROR}, ran it",
                pulled.stdout.trim()
            ))
        },
    );
    s.check(
        "run pulls an image it does not have (--pull missing), and --pull never refuses",
        || {
            let removed = d.capsa(&["image", "rm", "busybox"])?;
            ensure!(removed.code == Some(0), "rm: {}", removed.describe());
            let never = d.capsa(&["run", "--rm", "--pull", "never", "busybox", "true"])?;
            ensure!(
                never.code != Some(0) && never.stderr.contains("no image"),
                "--pull never: {}",
                never.describe()
            );
            let run = d.capsa(&[
                "run",
                "--rm",
                "docker.io/library/busybox:latest",
                "echo",
                "again",
            ])?;
            run.exited_with(0, &["again"])?;
            ensure!(run.stderr.contains("pulling"), "{}", run.describe());
            Ok(format!("--pull never: {}", never.stderr.trim()))
        },
    );
    s.check(
        "a damaged cached disk image is noticed by a restarted daemon and converted again",
        || {
            // The Debian layer's: the biggest (busybox's is there too).
            let images = layer_images(d)?;
            let image: &Path = images
                .iter()
                .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .context("no layer image")?;
            let mut bytes = std::fs::read(image)?;
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x55;
            std::fs::write(image, &bytes)?;
            d.kill();
            d.start()?;
            let progress = start(d, "again", &["python3", "-c", "print(6*7)"])?;
            let exit = d.wait("again", "main")?;
            remove(d, "again")?;
            ensure!(says(&progress, "damaged"), "{progress:?}");
            ensure!(exit.exit_code == 0, "{exit:?}");
            Ok(progress
                .iter()
                .find(|p| p.contains("damaged"))
                .cloned()
                .unwrap_or_default())
        },
    );
    super::login::run(s, d)?;
    Ok(())
}

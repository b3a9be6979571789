//! The `images` suite: a real-size image (Debian bookworm minbase with
//! python3, built by scripts/debian-image.sh) through capsad: it runs at
//! the default VM size, its layer is converted into a disk image once and
//! then served from the cache, two groups read the same host file, a
//! damaged cache entry is noticed and converted again by a restarted
//! daemon, and `run --rm` leaves no scratch disk.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use capsa_api::GroupView;
use hyper::Method;

use super::harness::Capsad;
use crate::suite::Suite;

const IMAGE: &str = "debian";

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
    d.start()?;
    let layout = d.artifacts.path("debian-oci");
    let import = d.capsa(&[
        "image",
        "import",
        &layout.to_string_lossy(),
        "--name",
        IMAGE,
    ])?;
    ensure!(import.code == Some(0), "import: {}", import.describe());
    let mut first = Vec::new();
    s.check(
        "python3 -c 'print(6*7)' prints 42 at the default VM size",
        || {
            first = start(d, "py", &["python3", "-c", "print(6*7)"])?;
            let exit = d.wait("py", "main")?;
            let lines: Vec<String> = d.logs("py", "main")?.into_iter().map(|l| l.line).collect();
            remove(d, "py")?;
            ensure!(exit.exit_code == 0 && lines == ["42"], "{exit:?} {lines:?}");
            Ok(format!("256 MiB; {}", first.join("; ")))
        },
    );
    s.check(
        "its layer was converted into a disk image at that first start",
        || {
            ensure!(says(&first, "converted to a disk image"), "{first:?}");
            Ok(first
                .iter()
                .find(|p| p.contains("converted"))
                .cloned()
                .unwrap_or_default())
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
                    ensure!(
                        open_files(pid)?.contains(&image),
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
        "a damaged cached disk image is noticed by a restarted daemon and converted again",
        || {
            let images = layer_images(d)?;
            let image: &Path = images.first().context("no layer image")?;
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
    Ok(())
}

//! `capsa cp` both ways with a running container: a directory tree (a
//! binary file, a symbolic link) in and back out unchanged, a file under a
//! new name, a container's own files out; a destination whose parent does
//! not exist, and a container that is not running, are clear errors.

use anyhow::{ensure, Result};

use super::harness::Capsad;
use crate::suite::Suite;

pub fn run(s: &mut Suite, d: &Capsad) {
    s.check(
        "capsa cp copies a tree into a running container and back out unchanged, a file under a new name, and the container's own files out",
        || {
            let out = d.capsa(&["run", "-d", "--name", "copier", "busybox", "sleep", "600"])?;
            ensure!(out.code == Some(0), "run -d: {}", out.describe());
            let result = copies(d);
            d.delete("copier")?;
            result
        },
    );
}

fn copies(d: &Capsad) -> Result<String> {
    let host = d.root().join("copies");
    let _ = std::fs::remove_dir_all(&host);
    let tree = host.join("tree");
    std::fs::create_dir_all(tree.join("sub"))?;
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    std::fs::write(tree.join("sub/all-bytes.bin"), &binary)?;
    std::fs::write(tree.join("a.txt"), b"alpha\n")?;
    std::os::unix::fs::symlink("sub/all-bytes.bin", tree.join("link"))?;
    let tree_arg = tree.to_string_lossy().to_string();

    let into = d.capsa(&["cp", &tree_arg, "copier:/tmp"])?;
    ensure!(into.code == Some(0), "cp in: {}", into.describe());
    let renamed = d.capsa(&["cp", &format!("{tree_arg}/a.txt"), "copier:/renamed.txt"])?;
    ensure!(
        renamed.code == Some(0),
        "cp a file in: {}",
        renamed.describe()
    );
    let seen = d.capsa(&[
        "exec",
        "copier",
        "sh",
        "-c",
        "cat /tmp/tree/a.txt /renamed.txt; readlink /tmp/tree/link; sha256sum < /tmp/tree/sub/all-bytes.bin | cut -c1-16; echo made > /made.txt",
    ])?;
    let digest = digest_prefix(&binary);
    seen.exited_with(0, &["alpha", "alpha", "sub/all-bytes.bin", &digest])?;

    let back = host.join("back");
    let out = d.capsa(&["cp", "copier:/tmp/tree", &back.to_string_lossy()])?;
    ensure!(out.code == Some(0), "cp out: {}", out.describe());
    ensure!(
        std::fs::read(back.join("sub/all-bytes.bin"))? == binary,
        "the binary file changed on its way"
    );
    ensure!(
        std::fs::read(back.join("a.txt"))? == b"alpha\n",
        "a.txt changed"
    );
    ensure!(
        std::fs::read_link(back.join("link"))? == std::path::Path::new("sub/all-bytes.bin"),
        "the link changed"
    );
    let made = d.capsa(&["cp", "copier:/made.txt", &host.to_string_lossy()])?;
    ensure!(made.code == Some(0), "cp a file out: {}", made.describe());
    ensure!(
        std::fs::read(host.join("made.txt"))? == b"made\n",
        "made.txt"
    );

    let nowhere = d.capsa(&["cp", &tree_arg, "copier:/no/such/dir/x"])?;
    ensure!(
        nowhere.code != Some(0) && nowhere.stderr.contains("/no/such/dir"),
        "a missing parent: {}",
        nowhere.describe()
    );
    let missing = d.capsa(&["cp", "copier:/no-such-file", &host.to_string_lossy()])?;
    ensure!(
        missing.code != Some(0) && missing.stderr.contains("/no-such-file"),
        "a missing source: {}",
        missing.describe()
    );
    Ok(format!(
        "in and out: {} bytes intact; missing parent: {}",
        binary.len(),
        nowhere.stderr.trim()
    ))
}

/// The first 16 hex digits of `data`'s SHA-256, as `sha256sum | cut -c1-16`
/// prints them.
fn digest_prefix(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))[..16].to_string()
}

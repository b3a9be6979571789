//! Layers converted to EROFS images, checked against `unpack` of the same
//! tar: the image, mounted by this host's kernel, must hold exactly the
//! tree unpack writes (names, types, modes, owners, times, data, symlink
//! targets, device numbers, hard links, extended attributes, overlay
//! whiteouts and opaque markers), and every layer unpack refuses must be
//! refused. Runs as root (mounting, and unpack's owners and devices).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use capsa_layers::erofs::{convert, ConvertSummary};
use capsa_layers::{unpack, UnpackError};
use tar::EntryType;

/// What a tree holds at one path.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    /// Directories' times move while they are filled; files' must match.
    mtime: Option<i64>,
    data: Vec<u8>,
    rdev: u64,
    nlink: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn walk(
    root: &Path,
    at: &Path,
    out: &mut BTreeMap<String, Seen>,
    inodes: &mut BTreeMap<u64, Vec<String>>,
) {
    for entry in fs::read_dir(at).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let kind = meta.mode() & 0o170_000;
        let data = match kind {
            0o100_000 => fs::read(&path).unwrap(),
            0o120_000 => fs::read_link(&path)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes(),
            _ => Vec::new(),
        };
        let xattrs = if kind == 0o120_000 {
            BTreeMap::new()
        } else {
            xattr::list(&path)
                .unwrap()
                .map(|k| {
                    let key = k.to_string_lossy().into_owned();
                    let value = xattr::get(&path, &k).unwrap().unwrap_or_default();
                    (key, value)
                })
                .collect()
        };
        let whiteout = kind == 0o020_000 && meta.rdev() == 0;
        if kind != 0o040_000 {
            inodes.entry(meta.ino()).or_default().push(name.clone());
        }
        out.insert(
            name,
            Seen {
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                // Whiteouts' times mean nothing (unpack's are the clock's).
                mtime: (kind != 0o040_000 && kind != 0o120_000 && !whiteout)
                    .then_some(meta.mtime()),
                data,
                rdev: meta.rdev(),
                nlink: meta.nlink(),
                xattrs,
            },
        );
        if kind == 0o040_000 {
            walk(root, &path, out, inodes);
        }
    }
}

/// A tree's entries, and its hard-linked names grouped.
fn snapshot(root: &Path) -> (BTreeMap<String, Seen>, Vec<Vec<String>>) {
    let (mut seen, mut inodes) = (BTreeMap::new(), BTreeMap::new());
    walk(root, root, &mut seen, &mut inodes);
    let mut links: Vec<Vec<String>> = inodes.into_values().filter(|n| n.len() > 1).collect();
    for names in &mut links {
        names.sort();
    }
    links.sort();
    (seen, links)
}

/// Converts `tar` and mounts the image; the mount point, unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
    _image: tempfile::NamedTempFile,
    summary: ConvertSummary,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn mounted(tar: &[u8]) -> Mounted {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let summary = convert(tar, image.as_file_mut()).unwrap();
    assert_eq!(
        fs::metadata(image.path()).unwrap().len(),
        summary.image_bytes
    );
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "erofs", "-o", "loop,ro"])
        .arg(image.path())
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting the image");
    Mounted {
        dir,
        _image: image,
        summary,
    }
}

/// The image and unpack's directory hold the same tree.
fn assert_same_as_unpack(tar: &[u8]) -> ConvertSummary {
    let unpacked = tempfile::tempdir().unwrap();
    unpack(tar, unpacked.path()).unwrap();
    let image = mounted(tar);
    let (want, want_links) = snapshot(unpacked.path());
    let (got, got_links) = snapshot(image.dir.path());
    let want_names: Vec<&String> = want.keys().collect();
    let got_names: Vec<&String> = got.keys().collect();
    assert_eq!(got_names, want_names, "the same names");
    for (name, seen) in &want {
        assert_eq!(&got[name], seen, "{name}");
    }
    assert_eq!(got_links, want_links, "the same hard links");
    let root_unpacked = fs::metadata(unpacked.path()).unwrap();
    let root_image = fs::metadata(image.dir.path()).unwrap();
    assert_eq!(
        (root_image.mode(), root_image.uid()),
        (root_unpacked.mode(), root_unpacked.uid()),
        "the root's metadata"
    );
    image.summary
}

fn with<F: FnOnce(&mut Entry)>(mut e: Entry, f: F) -> Entry {
    f(&mut e);
    e
}

#[test]
fn every_kind_of_entry_comes_out_as_unpack_writes_it() {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let block: Vec<u8> = vec![b'b'; 4096];
    let long_name = format!("deep/{}/file", "n".repeat(250));
    let mut tar = tar_of(&[
        with(dir("./"), |e| e.mode = 0o750),
        dir("bin"),
        file("bin/tool", &big),
        with(file("bin/setuid", b"#!/bin/sh\n"), |e| e.mode = 0o4755),
        hard_link("bin/tool-again", "bin/tool"),
        file("small", b"hi"),
        hard_link("small-too", "small"),
        file("exactly-a-block", &block),
        file("empty", b""),
        symlink("bin/sh", "/bin/busybox"),
        symlink("rel", "../../escape-is-only-text"),
        with(dir("home/user"), |e| {
            e.mode = 0o700;
            e.uid = 1000;
            e.gid = 1000;
        }),
        with(file("home/user/.profile", b"export A=1\n"), |e| {
            e.uid = 1000;
            e.gid = 100;
            e.mode = 0o600;
        }),
        with(file("tagged", b"t"), |e| {
            e.pax = vec![
                ("SCHILY.xattr.user.capsa".into(), b"tag value".to_vec()),
                (
                    "SCHILY.xattr.security.capability".into(),
                    vec![
                        1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
            ]
        }),
        with(entry("run/pipe", EntryType::Fifo), |e| e.mode = 0o600),
        with(entry("dev/null", EntryType::Char), |e| e.device = (1, 3)),
        with(entry("dev/loop300", EntryType::Block), |e| {
            e.device = (7, 300)
        }),
        file("app/.wh.gone", b""),
        file("cache/.wh..wh..opq", b""),
        file("cache/new", b"n"),
    ]);
    append_long_name(&mut tar, &long_name, 5);
    let summary = assert_same_as_unpack(&tar);
    assert_eq!(summary.entries, 21);
    assert!(summary.file_bytes >= 300_000);
}

#[test]
fn big_directories_span_blocks_and_later_entries_replace_earlier_ones() {
    let mut entries = vec![dir("many")];
    for i in 0..700 {
        entries.push(file(
            &format!("many/file-{i:04}-{}", "x".repeat(i % 40)),
            b".",
        ));
    }
    entries.extend([
        file("a", b"file"),
        dir("a"),
        file("a/inner", b"1"),
        symlink("b", "a"),
        file("b", b"now a file"),
        dir("c"),
        file("c/x", b"x"),
        file("c", b"c replaced the directory"),
        file("d", &vec![b'd'; 10_000]),
        file("d", b"short now"),
    ]);
    assert_same_as_unpack(&tar_of(&entries));
    // Names are found by the driver's binary search, block by block.
    let tar = tar_of(&entries);
    let image = mounted(&tar);
    for i in [0, 1, 350, 698, 699] {
        let name = format!("many/file-{i:04}-{}", "x".repeat(i % 40));
        assert_eq!(fs::read(image.dir.path().join(name)).unwrap(), b".");
    }
}

fn assert_both_refuse(entries: &[Entry], reason: &str) {
    let tar = tar_of(entries);
    let unpacked = tempfile::tempdir().unwrap();
    let by_unpack = unpack(tar.as_slice(), unpacked.path());
    let mut image = tempfile::tempfile().unwrap();
    let by_convert = convert(tar.as_slice(), &mut image);
    for (who, result) in [
        ("unpack", by_unpack.map(|_| ())),
        ("convert", by_convert.map(|_| ())),
    ] {
        match result {
            Err(UnpackError::Refused { reason: why, .. }) => {
                assert!(why.contains(reason), "{who}: {why:?} should say {reason:?}")
            }
            other => panic!("{who}: {other:?} instead of a refusal saying {reason:?}"),
        }
    }
}

#[test]
fn what_unpack_refuses_convert_refuses() {
    for (name, reason) in [
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("/etc/evil", "absolute"),
    ] {
        assert_both_refuse(&[file(name, b"x")], reason);
    }
    for entry_name in ["link/evil", "link/sub/evil"] {
        assert_both_refuse(
            &[symlink("link", "/tmp"), file(entry_name, b"x")],
            "link is a symlink",
        );
    }
    assert_both_refuse(
        &[symlink("etc", "/etc"), file("etc/.wh.passwd", b"")],
        "symlink",
    );
    assert_both_refuse(&[symlink("etc", "/etc"), dir("etc/sub")], "symlink");
    for (name, target, reason) in [
        ("h1", "/etc/passwd", "absolute"),
        ("h2", "../secret", "'..'"),
        ("h3", "etc/passwd", "not in this layer"),
        ("h5", "dir", "directory"),
        ("h6", "h6", "itself"),
    ] {
        assert_both_refuse(&[dir("dir"), hard_link(name, target)], reason);
    }
    assert_both_refuse(&[file(".wh..", b"")], "invalid name");
    let redirect = with(dir("d"), |e| {
        e.pax = vec![(
            "SCHILY.xattr.trusted.overlay.redirect".into(),
            b"/etc".to_vec(),
        )]
    });
    assert_both_refuse(&[redirect], "trusted.overlay.redirect");
}

#[test]
fn a_truncated_layer_is_an_error() {
    let big: Vec<u8> = vec![7; 100_000];
    let tar = tar_of(&[file("big", &big)]);
    let mut image = tempfile::tempfile().unwrap();
    let result = convert(&tar[..50_000], &mut image);
    assert!(matches!(result, Err(UnpackError::Read(_))), "{result:?}");
}

#[test]
fn images_stack_as_overlay_lower_layers_with_whiteouts_and_opaque_directories() {
    let base = mounted(&tar_of(&[
        file("app/keep", b"k"),
        file("app/gone", b"g"),
        file("cache/old", b"o"),
        file("cache/sub/older", b"o"),
    ]));
    let top = mounted(&tar_of(&[
        file("app/.wh.gone", b""),
        file("cache/.wh..wh..opq", b""),
        file("cache/new", b"n"),
    ]));
    let merged = tempfile::tempdir().unwrap();
    let options = format!(
        "lowerdir={}:{}",
        top.dir.path().display(),
        base.dir.path().display()
    );
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(merged.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting the overlay");
    let seen = |p: &str| merged.path().join(p).exists();
    let view = (
        seen("app/keep"),
        seen("app/gone"),
        seen("cache/old"),
        seen("cache/sub"),
        seen("cache/new"),
    );
    let _ = Command::new("umount").arg(merged.path()).status();
    assert_eq!(view, (true, false, false, false, true));
}

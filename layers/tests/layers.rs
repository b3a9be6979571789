//! Unpacking and importing real tar layers built here, including hostile
//! ones. Runs as root (as the agent does): ownership, device nodes, trusted
//! xattrs and the overlay and tmpfs mounts need it.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

mod common;
use common::*;

use capsa_layers::{unpack, Compression, Digest, LayerError, LayerSpec, LayerStore, UnpackError};
use tar::EntryType;

/// A spec that matches `blob`, whose uncompressed tar is `tar`.
fn spec_for(
    tar: &[u8],
    blob: &[u8],
    compression: Compression,
    parent: Option<Digest>,
) -> LayerSpec {
    LayerSpec {
        digest: Digest::of(blob),
        diff_id: Digest::of(tar),
        compression,
        size: Some(blob.len() as u64),
        parent,
    }
}

fn unpack_into(
    entries: &[Entry],
) -> (
    tempfile::TempDir,
    Result<capsa_layers::UnpackSummary, UnpackError>,
) {
    let dir = tempfile::tempdir().unwrap();
    let result = unpack(tar_of(entries).as_slice(), dir.path());
    (dir, result)
}

fn assert_refused(
    result: Result<capsa_layers::UnpackSummary, UnpackError>,
    entry_name: &str,
    reason_part: &str,
) {
    match result {
        Err(UnpackError::Refused { entry, reason }) => {
            assert_eq!(entry, entry_name);
            assert!(
                reason.contains(reason_part),
                "reason {reason:?} lacks {reason_part:?}"
            );
            let message = UnpackError::Refused { entry, reason }.to_string();
            assert!(message.contains(entry_name), "{message}");
        }
        other => panic!("expected {entry_name:?} to be refused, got {other:?}"),
    }
}

fn empty_dir(path: &Path) -> bool {
    fs::read_dir(path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[test]
fn unpacks_every_kind_of_entry_with_its_metadata() {
    let mut setuid = file("bin/tool", b"#!/bin/sh\n");
    setuid.mode = 0o4755;
    setuid.uid = 1000;
    setuid.gid = 1001;
    setuid.mtime = 1_234_567_890;
    let mut secret = dir("home/user");
    secret.mode = 0o700;
    secret.uid = 1000;
    secret.mtime = 1_111_111_111;
    let mut tagged = file("tagged", b"x");
    tagged.pax = vec![("SCHILY.xattr.user.capsa".into(), b"tag value".to_vec())];
    let mut fifo = entry("run/pipe", EntryType::Fifo);
    fifo.mode = 0o600;
    let mut null = entry("dev/null", EntryType::Char);
    null.mode = 0o666;
    null.device = (1, 3);
    let long_name = format!("deep/{}/file", "n".repeat(150));

    let mut entries = vec![
        dir("bin"),
        setuid,
        symlink("bin/sh", "/bin/tool"),
        hard_link("bin/tool-again", "bin/tool"),
        secret,
        tagged,
        fifo,
        null,
    ];
    // A long name goes through the GNU long-name extension.
    let mut tar = tar_of(&entries);
    append_long_name(&mut tar, &long_name, 0);
    entries.clear();

    let root = tempfile::tempdir().unwrap();
    let summary = unpack(tar.as_slice(), root.path()).unwrap();
    assert_eq!(summary.entries, 9);
    assert_eq!(summary.file_bytes, 10 + 1 + 4);

    let tool = fs::metadata(root.path().join("bin/tool")).unwrap();
    assert_eq!(
        tool.mode() & 0o7777,
        0o4755,
        "the set-uid bit survives chown"
    );
    assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
    assert_eq!(tool.mtime(), 1_234_567_890);
    assert_eq!(
        fs::read_link(root.path().join("bin/sh")).unwrap(),
        Path::new("/bin/tool")
    );
    let again = fs::metadata(root.path().join("bin/tool-again")).unwrap();
    assert_eq!((again.ino(), again.nlink()), (tool.ino(), 2));
    let home = fs::metadata(root.path().join("home/user")).unwrap();
    assert_eq!((home.mode() & 0o7777, home.uid()), (0o700, 1000));
    assert_eq!(home.mtime(), 1_111_111_111, "directory times are set last");
    assert_eq!(
        xattr::get(root.path().join("tagged"), "user.capsa")
            .unwrap()
            .as_deref(),
        Some(&b"tag value"[..])
    );
    assert!(fs::metadata(root.path().join("run/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    let null = fs::metadata(root.path().join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(fs::read(root.path().join(&long_name)).unwrap(), b"long");
}

#[test]
fn later_entries_replace_earlier_ones() {
    let (root, result) = unpack_into(&[
        file("a", b"file"),
        dir("a"),
        file("a/inner", b"1"),
        symlink("b", "a"),
        file("b", b"now a file"),
    ]);
    result.unwrap();
    assert!(root.path().join("a").is_dir());
    assert_eq!(fs::read(root.path().join("b")).unwrap(), b"now a file");
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_opaque_directories() {
    let (root, result) = unpack_into(&[
        dir("etc"),
        file("etc/.wh.passwd", b""),
        file("var/cache/.wh..wh..opq", b""),
        file(".wh..wh.plnk", b""),
    ]);
    result.unwrap();
    let whiteout = fs::symlink_metadata(root.path().join("etc/passwd")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(!root.path().join("etc/.wh.passwd").exists());
    assert_eq!(
        xattr::get(root.path().join("var/cache"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!root.path().join("var/cache/.wh..wh..opq").exists());
    assert!(
        !root.path().join(".wh..wh.plnk").exists(),
        "aufs bookkeeping is ignored"
    );
}

/// Stacks two imported layers with overlayfs, as a container's root is.
#[test]
fn overlay_of_a_chain_applies_both_whiteout_forms() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(store_dir.path()).unwrap();
    let base = tar_of(&[
        file("app/keep", b"k"),
        file("app/gone", b"g"),
        file("cache/old", b"o"),
        file("cache/sub/older", b"o"),
    ]);
    let base_blob = gzip(&base);
    let base_spec = spec_for(&base, &base_blob, Compression::Gzip, None);
    let base_chain = store
        .import(&base_spec, base_blob.as_slice())
        .unwrap()
        .chain_id;
    let top = tar_of(&[
        file("app/.wh.gone", b""),
        file("cache/.wh..wh..opq", b""),
        file("cache/new", b"n"),
    ]);
    let top_spec = spec_for(&top, &top, Compression::None, Some(base_chain));
    let top_chain = store.import(&top_spec, top.as_slice()).unwrap().chain_id;

    let lower = store.lower_dirs(&top_chain).unwrap();
    assert_eq!(lower.len(), 2);
    let merged = tempfile::tempdir().unwrap();
    let options = format!(
        "lowerdir={}",
        lower
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    );
    nix::mount::mount(
        Some("overlay"),
        merged.path(),
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .expect("mounting overlayfs needs root, as the agent has");
    let seen = |p: &str| merged.path().join(p).exists();
    let view = (
        seen("app/keep"),
        seen("app/gone"),
        seen("cache/old"),
        seen("cache/sub"),
        seen("cache/new"),
    );
    nix::mount::umount(merged.path()).unwrap();
    assert_eq!(view, (true, false, false, false, true));
}

#[test]
fn refuses_paths_that_leave_the_root() {
    for (name, reason) in [
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("/etc/evil", "absolute"),
    ] {
        let (root, result) = unpack_into(&[file(name, b"x")]);
        assert_refused(result, name, reason);
        assert!(empty_dir(root.path()));
    }
}

#[test]
fn refuses_writing_through_symlinks() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap();
    for (link_target, entry_name) in [
        (target, "link/evil"),
        ("..", "link/evil"),
        ("../../..", "link/sub/evil"),
    ] {
        let (_root, result) = unpack_into(&[symlink("link", link_target), file(entry_name, b"x")]);
        assert_refused(result, entry_name, "link is a symlink");
        assert!(empty_dir(outside.path()), "nothing was written outside");
    }
    // Nor may a directory entry or a whiteout pass through one.
    let (_root, result) = unpack_into(&[symlink("etc", target), file("etc/.wh.passwd", b"")]);
    assert_refused(result, "etc/.wh.passwd", "symlink");
    let (_root, result) = unpack_into(&[symlink("etc", target), dir("etc/sub")]);
    assert_refused(result, "etc/sub", "symlink");
    assert!(empty_dir(outside.path()));
}

#[test]
fn refuses_hard_links_to_outside_the_layer() {
    let outside = tempfile::tempdir().unwrap();
    let outside_file = outside.path().join("secret");
    fs::write(&outside_file, b"s").unwrap();
    let cases = [
        ("h1", outside_file.to_str().unwrap().to_string(), "absolute"),
        ("h2", "../secret".to_string(), "'..'"),
        ("h3", "etc/passwd".to_string(), "not in this layer"),
        ("h4", "link/secret".to_string(), "not a directory"),
        ("h5", "dir".to_string(), "directory"),
        ("h6", "h6".to_string(), "itself"),
    ];
    for (name, target, reason) in cases {
        let (_root, result) = unpack_into(&[
            symlink("link", outside.path().to_str().unwrap()),
            dir("dir"),
            hard_link(name, &target),
        ]);
        assert_refused(result, name, reason);
    }
    assert_eq!(fs::metadata(&outside_file).unwrap().nlink(), 1);
}

#[test]
fn refuses_invalid_whiteouts_and_reserved_xattrs() {
    let (_root, result) = unpack_into(&[file(".wh..", b"")]);
    assert_refused(result, ".wh..", "invalid name");
    let mut redirect = dir("d");
    redirect.pax = vec![(
        "SCHILY.xattr.trusted.overlay.redirect".into(),
        b"/etc".to_vec(),
    )];
    let (_root, result) = unpack_into(&[redirect]);
    assert_refused(result, "d", "trusted.overlay.redirect");
}

fn sample_layer() -> Vec<u8> {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    tar_of(&[
        dir("data"),
        file("data/big", &big),
        file("data/small", b"hi"),
    ])
}

fn store() -> (tempfile::TempDir, LayerStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    (dir, store)
}

/// Nothing of a failed import is visible or left behind.
fn assert_nothing_committed(dir: &Path, store: &LayerStore, spec: &LayerSpec) {
    assert!(!store.contains(&spec.chain_id()));
    assert!(empty_dir(&dir.join("chains")));
    assert!(empty_dir(&dir.join("staging")));
}

#[test]
fn imports_gzip_zstd_and_uncompressed_layers() {
    let tar = sample_layer();
    let zstd_blob = zstd::encode_all(tar.as_slice(), 1).unwrap();
    for (blob, compression) in [
        (gzip(&tar), Compression::Gzip),
        (zstd_blob, Compression::Zstd),
        (tar.clone(), Compression::None),
    ] {
        let (dir, store) = store();
        let spec = spec_for(&tar, &blob, compression, None);
        let imported = store.import(&spec, blob.as_slice()).unwrap();
        assert_eq!(
            imported.chain_id, spec.diff_id,
            "a base layer's chain id is its diff id"
        );
        assert_eq!(imported.blob_bytes, blob.len() as u64);
        let layer = &store.lower_dirs(&imported.chain_id).unwrap()[0];
        assert_eq!(fs::read(layer.join("data/big")).unwrap().len(), 300_000);
        assert!(empty_dir(&dir.path().join("staging")));
    }
}

#[test]
fn a_digest_mismatch_is_refused_and_nothing_is_committed() {
    let tar = sample_layer();
    let blob = gzip(&tar);
    let (dir, store) = store();
    let mut spec = spec_for(&tar, &blob, Compression::Gzip, None);
    spec.digest = Digest::of(b"something else");
    let error = store.import(&spec, blob.as_slice()).unwrap_err();
    assert!(
        matches!(error, LayerError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(&spec.digest.to_string()));
    assert_nothing_committed(dir.path(), &store, &spec);
}

#[test]
fn a_diff_id_mismatch_is_refused() {
    let tar = sample_layer();
    let blob = gzip(&tar);
    let (dir, store) = store();
    let mut spec = spec_for(&tar, &blob, Compression::Gzip, None);
    spec.diff_id = Digest::of(b"another tar");
    let error = store.import(&spec, blob.as_slice()).unwrap_err();
    assert!(
        matches!(error, LayerError::DiffIdMismatch { .. }),
        "{error}"
    );
    assert_nothing_committed(dir.path(), &store, &spec);
}

#[test]
fn corrupt_gzip_is_an_error_and_nothing_is_committed() {
    let tar = sample_layer();
    let blob = gzip(&tar);
    let mut corrupt = blob.clone();
    let middle = corrupt.len() / 2;
    for byte in &mut corrupt[middle..middle + 64] {
        *byte ^= 0x5a;
    }
    let (dir, store) = store();
    // The manifest's digest matches the corrupt bytes: the gzip decoder
    // itself must catch it.
    let spec = LayerSpec {
        digest: Digest::of(&corrupt),
        ..spec_for(&tar, &blob, Compression::Gzip, None)
    };
    let error = store.import(&spec, corrupt.as_slice()).unwrap_err();
    assert!(
        matches!(
            error,
            LayerError::Unpack {
                source: UnpackError::Read(_),
                ..
            }
        ),
        "{error}"
    );
    assert_nothing_committed(dir.path(), &store, &spec);

    // Garbage that is not gzip at all.
    let spec = LayerSpec {
        digest: Digest::of(b"not gzip"),
        size: Some(8),
        ..spec
    };
    let error = store.import(&spec, &b"not gzip"[..]).unwrap_err();
    assert!(error.to_string().contains("corrupt"), "{error}");
    assert_nothing_committed(dir.path(), &store, &spec);
}

#[test]
fn a_truncated_blob_is_an_error_and_nothing_is_committed() {
    let tar = sample_layer();
    let blob = gzip(&tar);
    let (dir, store) = store();
    let spec = spec_for(&tar, &blob, Compression::Gzip, None);
    for cut in [blob.len() / 2, blob.len() - 4] {
        let error = store.import(&spec, &blob[..cut]).unwrap_err();
        assert!(matches!(error, LayerError::SizeMismatch { .. }), "{error}");
        assert_nothing_committed(dir.path(), &store, &spec);
    }
    // Without a size to compare, the digest still catches it, even when the
    // cut falls on a tar block boundary that ends the archive cleanly.
    let spec = LayerSpec {
        size: None,
        ..spec_for(&tar, &tar, Compression::None, None)
    };
    let error = store.import(&spec, &tar[..1024]).unwrap_err();
    assert!(
        matches!(error, LayerError::DigestMismatch { .. }),
        "{error}"
    );
    assert_nothing_committed(dir.path(), &store, &spec);
}

#[test]
fn a_refused_entry_fails_the_import_and_nothing_is_committed() {
    let tar = tar_of(&[file("ok", b"fine"), file("../escape", b"x")]);
    let (dir, store) = store();
    let spec = spec_for(&tar, &tar, Compression::None, None);
    let error = store.import(&spec, tar.as_slice()).unwrap_err();
    assert!(error.to_string().contains("\"../escape\""), "{error}");
    assert_nothing_committed(dir.path(), &store, &spec);
}

/// A reader that must not be touched.
struct Untouchable;

impl Read for Untouchable {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        panic!("the blob of a chain already in the store was read")
    }
}

#[test]
fn chains_are_shared_and_need_their_parent() {
    let (_dir, store) = store();
    let base = sample_layer();
    let base_spec = spec_for(&base, &base, Compression::None, None);
    let top = tar_of(&[file("top", b"t")]);
    let orphan = spec_for(&top, &top, Compression::None, Some(base_spec.chain_id()));
    let error = store.import(&orphan, top.as_slice()).unwrap_err();
    assert!(matches!(error, LayerError::UnknownParent { .. }), "{error}");

    store.import(&base_spec, base.as_slice()).unwrap();
    let imported = store.import(&orphan, top.as_slice()).unwrap();
    assert_eq!(
        imported.chain_id.to_string(),
        format!(
            "{}",
            Digest::of(format!("{} {}", base_spec.diff_id, orphan.diff_id).as_bytes())
        )
    );
    let again = store.import(&orphan, Untouchable).unwrap();
    assert!(again.already_present);
    let lower = store.lower_dirs(&imported.chain_id).unwrap();
    assert!(lower[0].join("top").exists() && lower[1].join("data/big").exists());
    let missing = Digest::of(b"no such chain");
    assert!(matches!(
        store.lower_dirs(&missing),
        Err(LayerError::UnknownChain(_))
    ));
}

#[test]
fn leftovers_of_a_crashed_import_are_cleared_on_open() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("staging/1234-0/diff")).unwrap();
    LayerStore::open(dir.path()).unwrap();
    assert!(empty_dir(&dir.path().join("staging")));
}

#[test]
fn a_full_disk_is_a_clear_error_and_nothing_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        dir.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=256k"),
    )
    .expect("mounting a small tmpfs needs root, as the agent has");
    let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    let tar = tar_of(&[file("huge", &big)]);
    let spec = spec_for(&tar, &tar, Compression::None, None);
    let outcome = LayerStore::open(dir.path()).map(|store| {
        let error = store.import(&spec, tar.as_slice()).unwrap_err();
        let committed = store.contains(&spec.chain_id());
        (
            error.to_string(),
            committed,
            empty_dir(&dir.path().join("staging")),
        )
    });
    nix::mount::umount(dir.path()).unwrap();
    let (message, committed, staging_empty) = outcome.unwrap();
    assert!(
        message.contains("\"huge\"") && message.contains("No space left"),
        "{message}"
    );
    assert!(!committed && staging_empty);
}

#[test]
fn permissions_of_read_only_directories_do_not_stop_their_contents() {
    let mut locked = dir("locked");
    locked.mode = 0o555;
    let (root, result) = unpack_into(&[locked, file("locked/inside", b"i")]);
    result.unwrap();
    let mode = fs::metadata(root.path().join("locked"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o555);
}

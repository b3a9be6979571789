use super::*;

fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    build(&mut builder);
    builder.into_inner().unwrap()
}

fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o755);
    header
}

fn file(builder: &mut tar::Builder<Vec<u8>>, path: &str, content: &[u8]) {
    let mut header = header(tar::EntryType::Regular, content.len() as u64);
    // set_path refuses `..`: write the name field as a hostile tar would.
    let name = &mut header.as_old_mut().name;
    name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_cksum();
    builder.append(&header, content).unwrap();
}

fn dir(builder: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut header = header(tar::EntryType::Directory, 0);
    header.set_path(path).unwrap();
    header.set_cksum();
    builder.append(&header, &[][..]).unwrap();
}

fn symlink(builder: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut header = header(tar::EntryType::Symlink, 0);
    header.set_path(path).unwrap();
    header.set_link_name(target).unwrap();
    header.set_cksum();
    builder.append(&header, &[][..]).unwrap();
}

#[test]
fn a_directory_goes_into_a_directory_and_a_file_takes_a_new_name() {
    let from = tempfile::tempdir().unwrap();
    let tree = from.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a.txt"), b"alpha").unwrap();
    fs::write(tree.join("run.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(
        tree.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub/a.txt", tree.join("link")).unwrap();
    let mut packed = Vec::new();
    pack(&tree, &mut packed).unwrap();

    let to = tempfile::tempdir().unwrap();
    let done = unpack(&packed[..], to.path()).unwrap();
    assert_eq!(done.entries, 5);
    assert_eq!(
        fs::read(to.path().join("tree/sub/a.txt")).unwrap(),
        b"alpha"
    );
    assert_eq!(fs::read(to.path().join("tree/link")).unwrap(), b"alpha");
    let mode = fs::metadata(to.path().join("tree/run.sh")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o755
    );

    // Into a name that does not exist: the top entry takes it.
    unpack(&packed[..], &to.path().join("copy")).unwrap();
    assert_eq!(
        fs::read(to.path().join("copy/sub/a.txt")).unwrap(),
        b"alpha"
    );

    let mut one = Vec::new();
    pack(&tree.join("sub/a.txt"), &mut one).unwrap();
    unpack(&one[..], &to.path().join("renamed.txt")).unwrap();
    assert_eq!(fs::read(to.path().join("renamed.txt")).unwrap(), b"alpha");
    // A second copy over a file replaces it.
    fs::write(to.path().join("renamed.txt"), b"old").unwrap();
    unpack(&one[..], &to.path().join("renamed.txt")).unwrap();
    assert_eq!(fs::read(to.path().join("renamed.txt")).unwrap(), b"alpha");
}

#[test]
fn a_missing_parent_is_a_clear_error() {
    let to = tempfile::tempdir().unwrap();
    let one = archive(|b| file(b, "f", b"x"));
    let e = unpack(&one[..], &to.path().join("no/such/place")).unwrap_err();
    assert!(matches!(e, CopyError::NoParent(_)), "{e}");
}

#[test]
fn what_could_escape_or_is_not_a_plain_file_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let to = tempfile::tempdir().unwrap();
    let escapes = [
        archive(|b| file(b, "../evil", b"x")),
        archive(|b| file(b, "/etc/evil", b"x")),
        archive(|b| {
            dir(b, "top");
            file(b, "top/../../evil", b"x");
        }),
        // Through its own symbolic link.
        archive(|b| {
            dir(b, "top");
            symlink(b, "top/out", outside.path().to_str().unwrap());
            file(b, "top/out/evil", b"x");
        }),
        archive(|b| {
            dir(b, "top");
            dir(b, "other");
        }),
        archive(|b| {
            let mut h = header(tar::EntryType::Char, 0);
            h.set_path("dev").unwrap();
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }),
        archive(|b| {
            dir(b, "top");
            let mut h = header(tar::EntryType::Link, 0);
            h.set_path("top/hard").unwrap();
            h.set_link_name("/etc/shadow").unwrap();
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }),
        // A file before its directory.
        archive(|b| file(b, "top/deep/f", b"x")),
    ];
    for (i, bad) in escapes.iter().enumerate() {
        let e = unpack(&bad[..], to.path()).unwrap_err();
        assert!(matches!(e, CopyError::Refused { .. }), "{i}: {e}");
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(!to.path().parent().unwrap().join("evil").exists());
    // A symbolic link already at the destination is not followed either.
    let to = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), to.path().join("top")).unwrap();
    let through = archive(|b| {
        dir(b, "top");
        file(b, "top/evil", b"x");
    });
    unpack(&through[..], to.path()).unwrap();
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(fs::symlink_metadata(to.path().join("top"))
        .unwrap()
        .is_dir());
    assert_eq!(fs::read(to.path().join("top/evil")).unwrap(), b"x");
    // Not a tar at all.
    assert!(unpack(&b"not a tar, just words"[..], to.path()).is_err());
    assert!(matches!(
        unpack(&[0u8; 1024][..], to.path()),
        Err(CopyError::Empty)
    ));
}

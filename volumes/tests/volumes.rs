//! Volumes made with the real mkfs.ext4, grown and removed; the file
//! system is read with dumpe2fs and e2fsck, here, by the test (capsad
//! runs neither).

use std::process::Command;

use capsa_volumes::{VolumeError, VolumeStore};

fn block_count(image: &std::path::Path) -> u64 {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let blocks: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let size: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    blocks * size
}

#[test]
fn a_volume_is_an_ext4_image_that_grows_and_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = VolumeStore::open(dir.path()).unwrap();
    let volume = store.create("data", 16).unwrap();
    assert_eq!(volume.size_bytes, 16 << 20);
    let image = store.image("data").unwrap();
    assert_eq!(block_count(&image), 16 << 20);
    assert!(matches!(
        store.create("data", 16),
        Err(VolumeError::Exists(_))
    ));

    let grown = store.grow("data", 32).unwrap();
    assert_eq!(grown.size_bytes, 32 << 20);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 << 20);
    assert_eq!(
        block_count(&image),
        16 << 20,
        "the file system is the guest's to grow"
    );
    let check = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let shrink = store.grow("data", 16).unwrap_err().to_string();
    assert!(shrink.contains("volumes only grow"), "{shrink}");

    assert_eq!(store.list().unwrap(), vec![grown]);
    store.remove("data").unwrap();
    assert!(matches!(store.get("data"), Err(VolumeError::NotFound(_))));
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn bad_names_and_sizes_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = VolumeStore::open(dir.path()).unwrap();
    for name in ["", "../x", "Data", "a/b", "-x"] {
        assert!(
            matches!(store.create(name, 16), Err(VolumeError::InvalidName(_))),
            "{name:?}"
        );
    }
    assert!(matches!(
        store.create("tiny", 1),
        Err(VolumeError::BadSize { .. })
    ));
    assert!(matches!(
        store.remove("nope"),
        Err(VolumeError::NotFound(_))
    ));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

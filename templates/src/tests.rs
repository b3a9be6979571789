use super::*;
use capsa_vmm_config::DiskConfig;

fn vm_config(dir: &Path) -> VmConfig {
    for name in ["vmlinux", "initrd", "capsa-vmm"] {
        std::fs::write(dir.join(name), name).unwrap();
    }
    VmConfig {
        vmm: dir.join("capsa-vmm"),
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd"),
        seccomp: capsa_vmm_config::Seccomp::Kill,
    }
}

/// A template as a build leaves it, without the VM.
fn keep(templates: &Templates, shape: &Shape) -> Template {
    let dir = templates.dir.join(shape.id());
    std::fs::create_dir_all(&dir).unwrap();
    let meta = Meta {
        shape: shape.clone(),
        built_at_ms: 1,
        build_ms: 2,
    };
    std::fs::write(dir.join(META), serde_json::to_vec(&meta).unwrap()).unwrap();
    std::fs::write(dir.join(STATE), b"{}").unwrap();
    std::fs::write(dir.join(MEMORY), b"").unwrap();
    templates.find(shape).unwrap()
}

#[test]
fn a_shape_is_its_files_digests_size_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let templates = Templates::open(&dir.path().join("templates")).unwrap();
    let config = vm_config(dir.path());
    let shape = templates.shape(&config, 2, 512, true).unwrap();
    assert_eq!(shape.read_only_disks, READ_ONLY_SLOTS);
    assert_eq!(
        shape.id(),
        templates.shape(&config, 2, 512, true).unwrap().id()
    );
    let others = [
        templates.shape(&config, 1, 512, true).unwrap(),
        templates.shape(&config, 2, 256, true).unwrap(),
        templates.shape(&config, 2, 512, false).unwrap(),
    ];
    for other in &others {
        assert_ne!(other.id(), shape.id());
    }
    // A new kernel is another shape (its digest is read again once the
    // file changed).
    std::thread::sleep(Duration::from_millis(10));
    std::fs::write(&config.kernel, "another kernel").unwrap();
    let rebuilt = templates.shape(&config, 2, 512, true).unwrap();
    assert_ne!(rebuilt.kernel_sha256, shape.kernel_sha256);
    assert_ne!(rebuilt.id(), shape.id());
}

use std::time::Duration;

#[test]
fn a_template_is_found_only_for_its_very_shape() {
    let dir = tempfile::tempdir().unwrap();
    let templates = Templates::open(&dir.path().join("templates")).unwrap();
    let shape = templates
        .shape(&vm_config(dir.path()), 1, 256, true)
        .unwrap();
    assert!(templates.find(&shape).is_none());
    let template = keep(&templates, &shape);
    assert_eq!(template.id, shape.id());
    let (state, _memory) = template.open().unwrap();
    assert_eq!(state.metadata().unwrap().len(), 2);
    // A meta.json that holds another shape under this id is not it.
    let mut other = shape.clone();
    other.vmm_sha256 = "0".repeat(64);
    let meta = Meta {
        shape: other,
        built_at_ms: 1,
        build_ms: 1,
    };
    std::fs::write(
        template.dir().join(META),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    assert!(templates.find(&shape).is_none());
    // Nor is a meta.json that is not one.
    std::fs::write(template.dir().join(META), b"\x00garbage").unwrap();
    assert!(templates.find(&shape).is_none());
    assert!(templates.list().is_empty());
}

#[test]
fn one_build_at_a_time_and_none_of_a_discarded_template() {
    let dir = tempfile::tempdir().unwrap();
    let templates = Templates::open(&dir.path().join("templates")).unwrap();
    let shape = templates
        .shape(&vm_config(dir.path()), 1, 256, false)
        .unwrap();
    let claim = templates.claim(&shape).unwrap();
    assert!(templates.claim(&shape).is_none(), "being built");
    drop(claim);
    let template = keep(&templates, &shape);
    assert!(templates.claim(&shape).is_none(), "kept already");
    assert_eq!(templates.list().len(), 1);
    templates.discard(&template.id).unwrap();
    assert!(!template.dir().exists());
    assert!(templates.find(&shape).is_none());
    assert!(templates.claim(&shape).is_none(), "broken");
}

#[test]
fn what_a_stopped_build_left_is_removed_and_the_directory_is_roots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("templates");
    std::fs::create_dir_all(path.join("0123456789abcdef.partial")).unwrap();
    Templates::open(&path).unwrap();
    assert!(!path.join("0123456789abcdef.partial").exists());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn disks_take_the_slots_of_their_kind_and_empty_files_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    make_empty_disks_for_test(dir.path());
    let layer = DiskConfig::at("/layers/a.erofs", true, Some("l-a".into()));
    let scratch = DiskConfig::at("/g/scratch.ext4", false, Some("scratch".into()));
    let row = slotted(&[scratch.clone(), layer.clone()], dir.path()).unwrap();
    assert_eq!(row.len(), READ_ONLY_SLOTS + WRITABLE_SLOTS);
    assert_eq!(row[0], layer);
    assert_eq!(row[READ_ONLY_SLOTS], scratch);
    assert!(row[..READ_ONLY_SLOTS].iter().all(|d| d.read_only));
    assert!(row[READ_ONLY_SLOTS..].iter().all(|d| !d.read_only));
    // Each unused writable slot has a file of its own (the VMM locks it).
    let writable: std::collections::HashSet<_> =
        row[READ_ONLY_SLOTS..].iter().map(|d| &d.path).collect();
    assert_eq!(writable.len(), WRITABLE_SLOTS);
    assert!(row[1..].iter().all(|d| d.path.exists() || d.id.is_some()));
    let too_many = vec![layer; READ_ONLY_SLOTS + 1];
    assert!(slotted(&too_many, dir.path()).is_none());
}

fn make_empty_disks_for_test(dir: &Path) {
    slots::make_empty_disks(dir).unwrap();
}

//! Importing images built here: an OCI layout written by hand, the same
//! layout tarred (oci-archive), and a `docker save` tar.

mod common;

use std::fs;

use capsa_image_store::{normalize_name, ImageStore, Progress, StoreError};
use capsa_layers::Digest;
use common::{config_json, layer_tar, oci_layout, tar_directory};

fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

#[test]
fn names_get_latest_and_bad_names_are_refused() {
    assert_eq!(
        normalize_name("busybox").unwrap(),
        "docker.io/library/busybox:latest"
    );
    assert_eq!(
        normalize_name("reg.local:5000/app").unwrap(),
        "reg.local:5000/app:latest"
    );
    assert_eq!(
        normalize_name("app:1.2").unwrap(),
        "docker.io/library/app:1.2"
    );
    for bad in ["", "../x", "a b", "-x", "a/../b"] {
        assert!(normalize_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn imports_an_oci_layout_and_the_store_is_itself_one() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    let manifest = oci_layout(&layout, "latest", b"hi");
    let mut reported = Vec::new();
    let summary = store
        .import_layout(&layout, Some("latest"), "busybox", &mut |p| {
            reported.push(p)
        })
        .unwrap();
    // The manifest, the config and the layer, each new.
    assert_eq!(reported.len(), 3, "{reported:?}");
    assert!(reported.iter().all(|p| matches!(
        p,
        Progress::Blob {
            already_present: false,
            ..
        }
    )));
    assert_eq!(summary.name, "busybox:latest");
    assert_eq!(summary.manifest_digest, manifest);
    assert_eq!(summary.layers, 1);
    assert_eq!(store.list().unwrap(), vec![summary.clone()]);
    // Another layout reader finds it by its full name.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(store.layout().join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "docker.io/library/busybox:latest"
    );
    // Importing again under another name stores no blob twice.
    let blobs = fs::read_dir(store.layout().join("blobs/sha256"))
        .unwrap()
        .count();
    let mut reported = Vec::new();
    store
        .import_layout(&layout, None, "copy:v1", &mut |p| reported.push(p))
        .unwrap();
    assert!(
        reported.len() == 3
            && reported.iter().all(|p| matches!(
                p,
                Progress::Blob {
                    already_present: true,
                    ..
                }
            )),
        "{reported:?}"
    );
    assert_eq!(
        fs::read_dir(store.layout().join("blobs/sha256"))
            .unwrap()
            .count(),
        blobs
    );
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn a_corrupt_blob_is_refused_and_nothing_is_tagged() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    oci_layout(&layout, "latest", b"hi");
    // Flip a byte of the biggest blob (the layer).
    let mut blobs: Vec<_> = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    blobs.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let layer = blobs.last().unwrap();
    let mut bytes = fs::read(layer).unwrap();
    bytes[10] ^= 0xff;
    fs::write(layer, bytes).unwrap();
    let error = store
        .import_layout(&layout, None, "broken", &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(error, StoreError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(store.list().unwrap().is_empty());
    assert_eq!(fs::read_dir(store.layout().join("tmp")).unwrap().count(), 0);
}

#[test]
fn imports_an_oci_archive() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    oci_layout(&layout, "1.0", b"archived");
    let archive = dir.path().join("image.tar");
    tar_directory(&layout, &archive);
    let summary = store
        .import_archive(&archive, Some("app"), &mut |_| {})
        .unwrap();
    assert_eq!((summary.name.as_str(), summary.layers), ("app:latest", 1));
}

#[test]
fn imports_a_docker_save_tar() {
    let (dir, store) = store();
    let save = dir.path().join("save");
    fs::create_dir_all(save.join("abc123")).unwrap();
    let tar = layer_tar(b"from docker");
    fs::write(save.join("abc123/layer.tar"), &tar).unwrap();
    let config = config_json(&Digest::of(&tar));
    let config_name = format!("{}.json", Digest::of(&config).hex());
    fs::write(save.join(&config_name), &config).unwrap();
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["saved/app:2"],
        "Layers": ["abc123/layer.tar"],
    }]);
    fs::write(
        save.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let archive = dir.path().join("save.tar");
    tar_directory(&save, &archive);
    let summary = store.import_archive(&archive, None, &mut |_| {}).unwrap();
    assert_eq!((summary.name.as_str(), summary.layers), ("saved/app:2", 1));
    // The layer, uncompressed, is its own diff id.
    assert!(store.has_blob(&Digest::of(&tar).to_string()));
}

#[test]
fn archives_that_escape_or_are_not_images_are_refused() {
    let (dir, store) = store();
    let archive = dir.path().join("evil.tar");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..9].copy_from_slice(b"../escape");
    header.set_size(1);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, &b"x"[..]).unwrap();
    fs::write(&archive, builder.into_inner().unwrap()).unwrap();
    let error = store
        .import_archive(&archive, Some("evil"), &mut |_| {})
        .unwrap_err();
    assert!(error.to_string().contains("leaves the archive"), "{error}");
    assert!(!dir.path().join("escape").exists());

    let not_image = dir.path().join("plain.tar");
    tar_directory(&dir.path().join("store/blobs"), &not_image);
    let error = store
        .import_archive(&not_image, Some("x"), &mut |_| {})
        .unwrap_err();
    assert!(
        error.to_string().contains("neither an oci-archive"),
        "{error}"
    );
}

#[test]
fn remove_refuses_images_in_use_and_gc_frees_their_blobs() {
    let (dir, store) = store();
    let layout = dir.path().join("layout");
    oci_layout(&layout, "latest", b"hi");
    store
        .import_layout(&layout, None, "keep", &mut |_| {})
        .unwrap();
    let other = dir.path().join("other");
    oci_layout(&other, "latest", b"other content");
    store
        .import_layout(&other, None, "drop", &mut |_| {})
        .unwrap();

    let error = store
        .remove("drop", |_| Some("group web".to_string()))
        .unwrap_err();
    assert!(matches!(error, StoreError::InUse(..)), "{error}");
    store.remove("drop", |_| None).unwrap();
    assert!(matches!(
        store.remove("drop", |_| None),
        Err(StoreError::NotFound(_))
    ));
    let (blobs, bytes) = store.garbage_collect().unwrap();
    assert_eq!(blobs, 3, "the manifest, config and layer of 'drop' only");
    assert!(bytes > 0);
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(matches!(
        store.summary("nothing"),
        Err(StoreError::NotFound(_))
    ));
}

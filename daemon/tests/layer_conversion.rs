//! capsad converts layers in a child of its own binary that drops root
//! first (capsa_image_store::converter): the real capsad binary, as the
//! daemon runs it.

use std::fs::File;
use std::path::{Path, PathBuf};

use capsa_image_store::converter::{Converter, UNPRIVILEGED_ID};
use capsa_layers::{Compression, Digest, LayerSpec};

fn child(empty: &Path) -> Converter {
    Converter::Child {
        program: PathBuf::from(env!("CARGO_BIN_EXE_capsad")),
        uid: UNPRIVILEGED_ID,
        gid: UNPRIVILEGED_ID,
        empty_dir: empty.to_path_buf(),
    }
}

/// An uncompressed layer holding `entries` (path, content), the paths
/// written into the headers as they are, unchecked.
fn layer(dir: &Path, entries: &[(&str, &[u8])]) -> (LayerSpec, PathBuf) {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *content).unwrap();
    }
    let bytes = builder.into_inner().unwrap();
    let digest = Digest::of(&bytes);
    let blob = dir.join(digest.hex());
    std::fs::write(&blob, &bytes).unwrap();
    let spec = LayerSpec {
        digest,
        diff_id: digest,
        compression: Compression::None,
        size: Some(bytes.len() as u64),
        parent: None,
    };
    (spec, blob)
}

fn root() -> bool {
    let root = is_root();
    if !root {
        eprintln!("skipped: the conversion child drops root, so the test needs it");
    }
    root
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn empty_dir(dir: &Path) -> PathBuf {
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    empty
}

#[test]
fn a_layer_is_converted_by_an_unprivileged_child() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (spec, blob) = layer(
        dir.path(),
        &[("etc/motd", b"hello\n"), ("bin/app", b"\x7fELF")],
    );
    let out_path = dir.path().join("out.erofs");
    let (summary, uid) = child(&empty_dir(dir.path()))
        .convert(
            &spec,
            File::open(&blob).unwrap(),
            File::create(&out_path).unwrap(),
        )
        .unwrap();
    assert_eq!(uid, UNPRIVILEGED_ID, "converted as nobody");
    assert!(summary.entries >= 2, "{summary:?}");
    assert_eq!(
        std::fs::metadata(&out_path).unwrap().len(),
        summary.image_bytes
    );
    // The same bytes as a conversion in this process.
    let here = dir.path().join("here.erofs");
    Converter::InProcess
        .convert(
            &spec,
            File::open(&blob).unwrap(),
            File::create(&here).unwrap(),
        )
        .unwrap();
    assert_eq!(
        std::fs::read(&here).unwrap(),
        std::fs::read(&out_path).unwrap()
    );
}

#[test]
fn the_childs_refusals_name_the_layer_in_one_sentence() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = empty_dir(dir.path());
    let (spec, blob) = layer(dir.path(), &[("../escape", b"x")]);
    let e = child(&empty)
        .convert(
            &spec,
            File::open(&blob).unwrap(),
            File::create(dir.path().join("a.erofs")).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&spec.digest.to_string()) && e.contains("escape"),
        "{e}"
    );
    assert!(!e.contains('{'), "no debug or JSON text: {e}");

    // A blob that is not the layer the manifest names.
    let (mut other, blob) = layer(dir.path(), &[("a", b"a")]);
    other.digest = spec.digest;
    let e = child(&empty)
        .convert(
            &other,
            File::open(&blob).unwrap(),
            File::create(dir.path().join("b.erofs")).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(&spec.digest.to_string()), "{e}");

    // A child that dies without a word is an error, not a hang or a crash.
    let dead = Converter::Child {
        program: "/bin/false".into(),
        uid: UNPRIVILEGED_ID,
        gid: UNPRIVILEGED_ID,
        empty_dir: empty,
    };
    let e = dead
        .convert(
            &spec,
            File::open(&blob).unwrap(),
            File::create(dir.path().join("c.erofs")).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("without a result"), "{e}");
}

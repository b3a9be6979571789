//! Image tars: `oci-archive` (an OCI layout, tarred) and `docker save`
//! (manifest.json, a config and uncompressed layer tars; newer Docker
//! writes an OCI layout beside it, which is then preferred).

use std::fs;
use std::path::{Component, Path};

use oci_spec::image::MediaType;

use crate::{invalid, io_error, normalize_name, ImageStore, ImageSummary, Progress, StoreError};

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

pub fn import(
    store: &ImageStore,
    archive: &Path,
    name: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImageSummary, StoreError> {
    let scratch = store.root.join("tmp").join(format!(
        "archive-{}-{}",
        std::process::id(),
        store
            .next_temp
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = unpack_archive(archive, &scratch)
        .and_then(|()| import_unpacked(store, &scratch, archive, name, progress));
    let _ = fs::remove_dir_all(&scratch);
    result
}

/// Extracts the archive's regular files and directories, refusing any path
/// that would leave `target`.
fn unpack_archive(archive: &Path, target: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(target).map_err(io_error("creating", target))?;
    let file = fs::File::open(archive).map_err(io_error("reading", archive))?;
    let mut tar = tar::Archive::new(file);
    let bad = |e: std::io::Error| {
        invalid(
            archive.display().to_string(),
            format!("not a readable tar: {e}"),
        )
    };
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(invalid(
                archive.display().to_string(),
                format!("entry {} leaves the archive", path.display()),
            ));
        }
        let relative: std::path::PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        if relative.as_os_str().is_empty() {
            continue;
        }
        let destination = target.join(&relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&destination).map_err(io_error("creating", &destination))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = destination.parent() {
                    fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
                }
                let mut out =
                    fs::File::create(&destination).map_err(io_error("creating", &destination))?;
                std::io::copy(&mut entry, &mut out).map_err(bad)?;
            }
            // Docker's saves link identical layers; nothing else matters.
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let link = entry.link_name().map_err(bad)?.ok_or_else(|| {
                    invalid(archive.display().to_string(), "link without a target")
                })?;
                let source = if entry.header().entry_type() == tar::EntryType::Link {
                    target.join(&link)
                } else {
                    destination.parent().unwrap_or(target).join(&link)
                };
                let source = fs::canonicalize(&source).map_err(io_error("resolving", &source))?;
                let root = fs::canonicalize(target).map_err(io_error("resolving", target))?;
                if !source.starts_with(&root) {
                    return Err(invalid(
                        archive.display().to_string(),
                        format!("link {} leaves the archive", path.display()),
                    ));
                }
                if let Some(parent) = destination.parent() {
                    fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
                }
                fs::copy(&source, &destination).map_err(io_error("copying", &source))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn import_unpacked(
    store: &ImageStore,
    dir: &Path,
    archive: &Path,
    name: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImageSummary, StoreError> {
    let docker_manifest = dir.join("manifest.json");
    let is_layout = dir.join("oci-layout").exists() && dir.join("index.json").exists();
    if is_layout && (!docker_manifest.exists() || name.is_some()) {
        let name = name.ok_or_else(|| {
            invalid(
                archive.display().to_string(),
                "an oci-archive needs a name to import as",
            )
        })?;
        return store.import_layout(dir, None, name, progress);
    }
    if !docker_manifest.exists() {
        return Err(invalid(
            archive.display().to_string(),
            "neither an oci-archive (no oci-layout) nor a docker save (no manifest.json)",
        ));
    }
    let text = fs::read(&docker_manifest).map_err(io_error("reading", &docker_manifest))?;
    let manifests: Vec<DockerManifest> =
        serde_json::from_slice(&text).map_err(|e| invalid("manifest.json", e.to_string()))?;
    let manifest = match manifests.as_slice() {
        [only] => only,
        _ => {
            return Err(invalid(
                "manifest.json",
                "holds more than one image; save one at a time",
            ))
        }
    };
    let name = match name {
        Some(name) => name.to_string(),
        None => manifest
            .repo_tags
            .as_ref()
            .and_then(|tags| tags.first())
            .cloned()
            .ok_or_else(|| invalid(archive.display().to_string(), "untagged: give a name"))?,
    };
    let name = normalize_name(&name)?;
    let inside = |relative: &str| -> Result<std::path::PathBuf, StoreError> {
        let path = Path::new(relative);
        if path.components().all(|c| matches!(c, Component::Normal(_))) {
            Ok(dir.join(path))
        } else {
            Err(invalid(
                "manifest.json",
                format!("path {relative} leaves the archive"),
            ))
        }
    };
    let config_path = inside(&manifest.config)?;
    let config_file = fs::File::open(&config_path).map_err(io_error("reading", &config_path))?;
    let blob = store.store_blob(config_file, None)?;
    let config = (blob.digest.clone(), blob.size);
    progress(blob.into());
    let mut layers = Vec::new();
    for layer in &manifest.layers {
        let path = inside(layer)?;
        let file = fs::File::open(&path).map_err(io_error("reading", &path))?;
        let blob = store.store_blob(file, None)?;
        let (digest, size) = (blob.digest.clone(), blob.size);
        progress(blob.into());
        let media_type = if is_gzip(&path)? {
            MediaType::ImageLayerGzip
        } else {
            MediaType::ImageLayer
        };
        layers.push((digest, size, media_type));
    }
    store.tag_new_manifest(&name, config, &layers)
}

fn is_gzip(path: &Path) -> Result<bool, StoreError> {
    use std::io::Read;
    let mut magic = [0u8; 2];
    let mut file = fs::File::open(path).map_err(io_error("reading", path))?;
    let n = file.read(&mut magic).map_err(io_error("reading", path))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

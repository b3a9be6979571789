//! OCI images in an image layout directory (index.json, blobs/), as umoci,
//! skopeo and `ctr export` write them, and the runtime spec their config
//! implies.

use std::fs::File;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxCapabilitiesBuilder, ProcessBuilder,
    RootBuilder, Spec, UserBuilder,
};

/// The annotation that carries a manifest's tag in an index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image layout {}: {what}: {message}", layout.display())]
    Layout {
        layout: PathBuf,
        what: String,
        message: String,
    },
    #[error("image layout {}: no manifest tagged {reference:?} (tags: {tags})", layout.display())]
    NoSuchTag {
        layout: PathBuf,
        reference: String,
        tags: String,
    },
}

/// One layer: the manifest's descriptor and the config's diff id.
#[derive(Debug, Clone)]
pub struct ImageLayer {
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct OciImage {
    pub layers: Vec<ImageLayer>,
    pub config: ImageConfiguration,
}

impl OciImage {
    /// The image tagged `reference` in `layout`, or its only image.
    pub fn open(layout: &Path, reference: Option<&str>) -> Result<Self, ImageError> {
        let failed = |what: &str, message: String| ImageError::Layout {
            layout: layout.to_path_buf(),
            what: what.to_string(),
            message,
        };
        let index = ImageIndex::from_file(layout.join("index.json"))
            .map_err(|e| failed("index.json", e.to_string()))?;
        let tag = |d: &Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        let manifest = match reference {
            Some(reference) => index
                .manifests()
                .iter()
                .find(|d| tag(d).as_deref() == Some(reference))
                .ok_or_else(|| ImageError::NoSuchTag {
                    layout: layout.to_path_buf(),
                    reference: reference.to_string(),
                    tags: index
                        .manifests()
                        .iter()
                        .filter_map(tag)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
            None => match index.manifests().as_slice() {
                [only] => only,
                _ => {
                    return Err(failed(
                        "index.json",
                        "more than one image: name the tag".into(),
                    ))
                }
            },
        };
        Self::open_manifest(layout, manifest.digest().as_ref())
    }

    /// The image whose manifest has `digest` in `layout`.
    pub fn open_manifest(layout: &Path, digest: &str) -> Result<Self, ImageError> {
        let failed = |what: &str, message: String| ImageError::Layout {
            layout: layout.to_path_buf(),
            what: what.to_string(),
            message,
        };
        let manifest_path = blob_path(layout, digest)
            .ok_or_else(|| failed("manifest", format!("bad digest {digest}")))?;
        let manifest = ImageManifest::from_file(&manifest_path)
            .map_err(|e| failed("manifest", e.to_string()))?;
        let config_path = blob_path(layout, manifest.config().digest().as_ref())
            .ok_or_else(|| failed("config", "bad digest".into()))?;
        let config = ImageConfiguration::from_file(&config_path)
            .map_err(|e| failed("config", e.to_string()))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(failed(
                "config",
                format!(
                    "{} diff ids for {} layers",
                    diff_ids.len(),
                    manifest.layers().len()
                ),
            ));
        }
        let layers = manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .map(|(layer, diff_id)| {
                let digest = layer.digest().to_string();
                let path = blob_path(layout, &digest)
                    .ok_or_else(|| failed("layer", format!("bad digest {digest}")))?;
                Ok(ImageLayer {
                    digest,
                    diff_id: diff_id.clone(),
                    media_type: layer.media_type().to_string(),
                    size: layer.size(),
                    path,
                })
            })
            .collect::<Result<_, ImageError>>()?;
        Ok(OciImage { layers, config })
    }

    /// The runtime spec for running this image: its entrypoint and command
    /// (or `args` instead of the command), environment, working directory
    /// and user, on the default OCI namespaces and mounts.
    pub fn spec(&self, args: Option<&[String]>) -> Result<Spec, ImageError> {
        let config = self.config.config().clone().unwrap_or_default();
        let mut command: Vec<String> = config.entrypoint().clone().unwrap_or_default();
        match args {
            Some(args) => command.extend(args.iter().cloned()),
            None => command.extend(config.cmd().clone().unwrap_or_default()),
        }
        let mut env = config.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let cwd = config
            .working_dir()
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into());
        let mut spec = Spec::default();
        let defaults = spec.process().clone().unwrap_or_default();
        let process = ProcessBuilder::default()
            .args(command)
            .env(env)
            .cwd(cwd)
            // The runtime resolves the image's `user[:group]` in the
            // container's own /etc/passwd and /etc/group.
            .user(
                UserBuilder::default()
                    .uid(0u32)
                    .gid(0u32)
                    .username(config.user().clone().unwrap_or_default())
                    .build()
                    .expect("all fields set"),
            )
            .capabilities(docker_capabilities())
            .rlimits(defaults.rlimits().clone().unwrap_or_default())
            .no_new_privileges(true)
            .build()
            .expect("all fields set");
        spec.set_process(Some(process));
        // The sandbox's hostname, not oci-spec's placeholder.
        spec.set_hostname(None);
        // Containers write to their own layer, as Docker's do.
        spec.set_root(Some(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .expect("all fields set"),
        ));
        Ok(spec)
    }
}

/// The capabilities Docker and containerd give a container by default,
/// which images expect (ping needs NET_RAW, package managers CHOWN...).
fn docker_capabilities() -> LinuxCapabilities {
    use Capability::*;
    let set: Capabilities = [
        AuditWrite,
        Chown,
        DacOverride,
        Fowner,
        Fsetid,
        Kill,
        Mknod,
        NetBindService,
        NetRaw,
        Setfcap,
        Setgid,
        Setpcap,
        Setuid,
        SysChroot,
    ]
    .into_iter()
    .collect();
    LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .build()
        .expect("all fields set")
}

/// `blobs/<algorithm>/<hex>` for a digest, refusing anything that could
/// name a path outside the layout.
fn blob_path(layout: &Path, digest: &str) -> Option<PathBuf> {
    let (algorithm, hex) = digest.split_once(':')?;
    let clean = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (clean(algorithm) && clean(hex)).then(|| layout.join("blobs").join(algorithm).join(hex))
}

/// Opens a layer blob for sending.
pub fn open_layer(layer: &ImageLayer) -> std::io::Result<File> {
    File::open(&layer.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_stay_inside_the_layout() {
        let layout = Path::new("/l");
        assert_eq!(
            blob_path(layout, "sha256:abc").unwrap(),
            Path::new("/l/blobs/sha256/abc")
        );
        for bad in ["sha256:../x", "sha256/../..:x", "abc", "sha256:", ":abc"] {
            assert!(blob_path(layout, bad).is_none(), "{bad}");
        }
    }
}

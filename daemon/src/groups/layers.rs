//! A group's images as disks: each layer's EROFS image (converted once,
//! `capsa_image_store::layer_images`) attached read-only to the VM, its
//! serial drawn from its chain id, so that the same layer is the same disk
//! in every group and a container's disks follow from its image alone.

use std::collections::HashSet;

use capsa_api::ContainerSpec;
use capsa_guest_client::OciImage;
use capsa_image_store::layer_images::{LayerImages, LayerSource};
use capsa_layers::{chain_id, Compression, Digest, LayerSpec};
use capsa_vmm_config::DiskConfig;

use super::oci;
use crate::errors::{internal, store_error};
use capsa_api::ApiError;

/// The serial (the VMM's id=, at most 20 bytes) of a layer's disk.
pub fn serial(chain: &Digest) -> String {
    format!("l{}", &chain.hex()[..19])
}

/// The image's layers as the image store holds them, base first.
pub fn sources(image: &OciImage) -> Result<Vec<LayerSource>, ApiError> {
    let mut parent: Option<Digest> = None;
    image
        .layers
        .iter()
        .map(|layer| {
            let parse = |what: &str, text: &str| {
                text.parse::<Digest>()
                    .map_err(|e| internal(format!("layer {}: {what}: {e}", layer.digest)))
            };
            let spec = LayerSpec {
                digest: parse("digest", &layer.digest)?,
                diff_id: parse("diff id", &layer.diff_id)?,
                compression: Compression::from_media_type(&layer.media_type)
                    .map_err(|e| internal(e.to_string()))?,
                size: Some(layer.size),
                parent,
            };
            parent = Some(chain_id(parent.as_ref(), &spec.diff_id));
            Ok(LayerSource {
                spec,
                blob: layer.path.clone(),
            })
        })
        .collect()
}

/// The serials of a container's image layers, topmost first.
pub fn serials(image: &OciImage) -> Result<Vec<String>, ApiError> {
    Ok(sources(image)?
        .iter()
        .rev()
        .map(|s| serial(&s.spec.chain_id()))
        .collect())
}

/// Every layer disk the containers need, each once, converting what is
/// not cached yet (each layer's outcome goes to `report`).
pub fn disks(
    images: &LayerImages,
    layout: &std::path::Path,
    containers: &[ContainerSpec],
    report: &mut dyn FnMut(String),
) -> Result<Vec<DiskConfig>, ApiError> {
    let mut seen = HashSet::new();
    let mut disks = Vec::new();
    for container in containers {
        let image =
            OciImage::open(layout, Some(&oci::normalized(&container.image))).map_err(internal)?;
        let sources: Vec<LayerSource> = sources(&image)?
            .into_iter()
            .filter(|s| seen.insert(s.spec.chain_id()))
            .collect();
        let paths = images
            .ensure(&sources, &mut |event| {
                report(format!("container {}: {event}", container.name))
            })
            .map_err(store_error)?;
        for (source, path) in sources.iter().zip(paths) {
            disks.push(DiskConfig {
                path,
                read_only: true,
                id: Some(serial(&source.spec.chain_id())),
            });
        }
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_fit_virtio_and_differ_by_chain() {
        let a = serial(&Digest::of(b"a"));
        assert_eq!(a.len(), 20);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, serial(&Digest::of(b"b")));
    }
}

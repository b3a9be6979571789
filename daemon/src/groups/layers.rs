//! A group's images as disks: each layer's EROFS image (converted once,
//! `capsa_image_store::layer_images`) attached read-only to the VM, its
//! serial drawn from its chain id, so that the same layer is the same disk
//! in every group and a container's disks follow from its image alone.

use std::collections::HashSet;

use capsa_guest_client::OciImage;
use capsa_image_store::layer_images::{LayerImages, LayerSource};
use capsa_layers::{chain_id, Compression, Digest, LayerSpec};
use capsa_vmm_config::DiskConfig;

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

/// The image's layers as disk images, base first, converting what is not
/// cached yet (each layer's outcome goes to `report`). `skip` holds the
/// chains already served, which are left out (and get added).
fn convert(
    images: &LayerImages,
    image: &OciImage,
    skip: &mut HashSet<Digest>,
    report: &mut dyn FnMut(String),
) -> Result<Vec<DiskConfig>, ApiError> {
    let sources: Vec<LayerSource> = sources(image)?
        .into_iter()
        .filter(|s| skip.insert(s.spec.chain_id()))
        .collect();
    let paths = images
        .ensure(&sources, &mut |event| report(event.to_string()))
        .map_err(store_error)?;
    Ok(sources
        .iter()
        .zip(paths)
        .map(|(source, path)| DiskConfig::at(path, true, Some(serial(&source.spec.chain_id()))))
        .collect())
}

/// Converts every layer of `image` not cached yet: what import and pull
/// do, so that a first start finds its disks ready.
pub fn prepare(
    images: &LayerImages,
    image: &OciImage,
    report: &mut dyn FnMut(String),
) -> Result<(), ApiError> {
    convert(images, image, &mut HashSet::new(), report).map(drop)
}

/// Every layer disk the containers (name, image) need, each once.
pub fn disks(
    images: &LayerImages,
    containers: &[(String, OciImage)],
    report: &mut dyn FnMut(String),
) -> Result<Vec<DiskConfig>, ApiError> {
    let mut seen = HashSet::new();
    let mut disks = Vec::new();
    for (name, image) in containers {
        disks.extend(convert(images, image, &mut seen, &mut |event| {
            report(format!("container {name}: {event}"))
        })?);
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

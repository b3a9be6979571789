//! The rows' images: the payload's busybox layer and a layer with the
//! probe and the table's users, under one image config per row, each in
//! an OCI layout of its own (for `capsa image import`); and the same two
//! layers unpacked as crun's root filesystem.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use capsa_guest_client::OciImage;
use oci_spec::image::{
    ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, RootFsBuilder,
};
use sha2::{Digest, Sha256};

use super::table::{Row, GROUPS, PROBE, USERS};

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

/// The probe layer: /probe, /etc/passwd and /etc/group, /home/app.
fn probe_layer(probe: &Path) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, uid: u64, data: &[u8], kind: tar::EntryType| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        tar.append_data(&mut header, path, data)
    };
    let passwd: String = USERS
        .iter()
        .map(|(name, uid, gid, home)| format!("{name}:x:{uid}:{gid}:{name}:{home}:/bin/sh\n"))
        .collect();
    let group: String = GROUPS
        .iter()
        .map(|(name, gid, members)| format!("{name}:x:{gid}:{}\n", members.join(",")))
        .collect();
    let binary = fs::read(probe).with_context(|| format!("reading {}", probe.display()))?;
    add(
        PROBE.trim_start_matches('/'),
        0o755,
        0,
        &binary,
        tar::EntryType::Regular,
    )?;
    add(
        "etc/passwd",
        0o644,
        0,
        passwd.as_bytes(),
        tar::EntryType::Regular,
    )?;
    add(
        "etc/group",
        0o644,
        0,
        group.as_bytes(),
        tar::EntryType::Regular,
    )?;
    add("home/app", 0o755, 1000, &[], tar::EntryType::Directory)?;
    Ok(tar.into_inner()?)
}

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// Writes `bytes` as a blob of `layout`; returns its digest.
fn blob(layout: &Path, bytes: &[u8]) -> Result<String> {
    let digest = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(digest.trim_start_matches("sha256:")), bytes)?;
    Ok(digest)
}

fn descriptor(media_type: MediaType, digest: &str, size: usize) -> Result<Descriptor> {
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest.parse::<oci_spec::image::Digest>()?)
        .size(size as u64)
        .build()?)
}

pub struct Images {
    /// One OCI layout per row, by row name.
    pub layouts: Vec<(String, PathBuf)>,
    /// The two layers unpacked, for crun.
    pub rootfs: PathBuf,
}

pub fn build(work: &Path, busybox_layout: &Path, probe: &Path, rows: &[Row]) -> Result<Images> {
    let busybox = OciImage::open(busybox_layout, None)?;
    let base = busybox.layers.first().context("busybox has no layer")?;
    let base_bytes = fs::read(&base.path)?;
    let probe_tar = probe_layer(probe)?;
    let probe_digest = sha256(&probe_tar);
    let mut layouts = Vec::new();
    for row in rows {
        let layout = work.join("layouts").join(row.name);
        let _ = fs::remove_dir_all(&layout);
        fs::create_dir_all(&layout)?;
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        blob(&layout, &base_bytes)?;
        blob(&layout, &probe_tar)?;
        let image = row.image;
        let mut config = ConfigBuilder::default().env(words(image.env));
        if let Some(entrypoint) = image.entrypoint {
            config = config.entrypoint(words(entrypoint));
        }
        if let Some(cmd) = image.cmd {
            config = config.cmd(words(cmd));
        }
        if let Some(dir) = image.working_dir {
            config = config.working_dir(dir.to_string());
        }
        if let Some(user) = image.user {
            config = config.user(user.to_string());
        }
        if let Some(signal) = image.stop_signal {
            config = config.stop_signal(signal.to_string());
        }
        let configuration = ImageConfigurationBuilder::default()
            .architecture(oci_spec::image::Arch::Amd64)
            .os(oci_spec::image::Os::Linux)
            .config(config.build()?)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![base.diff_id.clone(), probe_digest.clone()])
                    .build()?,
            )
            .build()?;
        let config_bytes = serde_json::to_vec(&configuration)?;
        let config_digest = blob(&layout, &config_bytes)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(
                MediaType::ImageConfig,
                &config_digest,
                config_bytes.len(),
            )?)
            .layers(vec![
                descriptor(
                    MediaType::from(base.media_type.as_str()),
                    &base.digest,
                    base_bytes.len(),
                )?,
                descriptor(MediaType::ImageLayer, &probe_digest, probe_tar.len())?,
            ])
            .build()?;
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let manifest_digest = blob(&layout, &manifest_bytes)?;
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .manifests(vec![descriptor(
                MediaType::ImageManifest,
                &manifest_digest,
                manifest_bytes.len(),
            )?])
            .build()?;
        fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
        layouts.push((row.name.to_string(), layout));
    }
    let rootfs = work.join("rootfs");
    let _ = fs::remove_dir_all(&rootfs);
    fs::create_dir_all(&rootfs)?;
    let gz = flate2::read::GzDecoder::new(fs::File::open(&base.path)?);
    unpack(tar::Archive::new(gz), &rootfs).context("unpacking busybox")?;
    unpack(tar::Archive::new(probe_tar.as_slice()), &rootfs).context("unpacking the probe")?;
    Ok(Images { layouts, rootfs })
}

fn unpack<R: std::io::Read>(mut archive: tar::Archive<R>, into: &Path) -> Result<()> {
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.unpack(into)?;
    Ok(())
}

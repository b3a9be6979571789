//! Capsa's host image store. It is itself an OCI image layout:
//!
//! ```text
//! ROOT/oci-layout
//! ROOT/index.json               one manifest per tag ("name:tag" in the
//!                               org.opencontainers.image.ref.name annotation)
//! ROOT/blobs/sha256/<hex>       every blob, once, named by its verified digest
//! ROOT/tmp/                     blobs being written
//! ```
//!
//! so an image in it opens like any layout (capsa_guest_client::OciImage).
//! A blob is hashed while it is written and renamed into place (after an
//! fsync) only when its digest matches; index.json is replaced atomically.
//! Images come from an OCI layout directory, an `oci-archive` tar or a
//! `docker save` tar (whose layers it describes with an OCI manifest).

mod archive;
pub mod converter;
pub mod layer_images;
pub mod name;

pub use name::{normalize_name, ImageName};

/// How an import or a pull is going, for progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The image's manifest was found (pulls).
    Manifest { digest: String },
    /// Bytes of a blob read so far (every MiB or so, while it is stored).
    Fetching {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A blob is in the store.
    Blob {
        digest: String,
        size: u64,
        already_present: bool,
    },
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Progress::Manifest { digest } => write!(f, "manifest {digest}"),
            Progress::Fetching {
                digest,
                done,
                total,
            } => write!(f, "{digest}: {done} of {total} bytes"),
            Progress::Blob {
                digest,
                size,
                already_present: true,
            } => write!(f, "{digest} ({size} bytes) already present"),
            Progress::Blob { digest, size, .. } => write!(f, "{digest} ({size} bytes) stored"),
        }
    }
}

/// Reads a blob, reporting how much has been read every MiB.
pub(crate) struct Counting<'a, R> {
    inner: R,
    digest: &'a str,
    total: u64,
    done: u64,
    reported: u64,
    progress: &'a mut dyn FnMut(Progress),
}

impl<'a, R> Counting<'a, R> {
    pub(crate) fn new(
        inner: R,
        digest: &'a str,
        total: u64,
        progress: &'a mut dyn FnMut(Progress),
    ) -> Self {
        Counting {
            inner,
            digest,
            total,
            done: 0,
            reported: 0,
            progress,
        }
    }
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= 1 << 20 {
            self.reported = self.done;
            (self.progress)(Progress::Fetching {
                digest: self.digest.to_string(),
                done: self.done,
                total: self.total.max(self.done),
            });
        }
        Ok(n)
    }
}

/// A blob written (or found) in the store.
struct Blob {
    digest: String,
    size: u64,
    already_present: bool,
}

impl From<Blob> for Progress {
    fn from(blob: Blob) -> Self {
        Progress::Blob {
            digest: blob.digest,
            size: blob.size,
            already_present: blob.already_present,
        }
    }
}
pub mod registry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use capsa_layers::{Digest, HashingReader};
use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType};

/// The annotation that carries a manifest's tag in an index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {expected}: the bytes have digest {actual}: corrupt")]
    DigestMismatch { expected: String, actual: Digest },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("no image {0:?} (see `capsa image ls`)")]
    NotFound(String),
    #[error("image {0:?} is in use by {1}; remove that first")]
    InUse(String, String),
    #[error(
        "invalid image name {name:?}: {reason} (use [REGISTRY/]NAME[:TAG][@DIGEST], lowercase)"
    )]
    InvalidName { name: String, reason: String },
    /// A conversion child's report, which names the layer.
    #[error("{message}")]
    Conversion { layer: String, message: String },
    /// The source names the layer.
    #[error("{source}")]
    Layer {
        layer: String,
        #[source]
        source: Box<capsa_layers::LayerError>,
    },
}

fn invalid(what: impl Into<String>, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One tagged image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// `name:tag`.
    pub name: String,
    pub manifest_digest: String,
    /// Config, manifest and layers, in bytes.
    pub size: u64,
    pub layers: usize,
}

pub struct ImageStore {
    root: PathBuf,
    /// index.json is read, changed and replaced under this lock.
    index_lock: Mutex<()>,
    next_temp: AtomicU64,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for dir in [root.join("blobs/sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        }
        let layout = root.join("oci-layout");
        if !layout.exists() {
            fs::write(&layout, r#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(io_error("writing", &layout))?;
        }
        let store = ImageStore {
            root: root.to_path_buf(),
            index_lock: Mutex::new(()),
            next_temp: AtomicU64::new(0),
        };
        if !root.join("index.json").exists() {
            store.write_index(&empty_index()?)?;
        }
        Ok(store)
    }

    /// The store's directory: an OCI image layout.
    pub fn layout(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let parsed: Digest = digest
            .parse()
            .map_err(|e| invalid(format!("digest {digest}"), format!("{e}")))?;
        Ok(self.root.join("blobs/sha256").join(parsed.hex()))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.exists())
    }

    /// Writes a blob, checking it against `expected` (when given) before it
    /// becomes visible; a blob already present is not written twice.
    pub fn put_blob(
        &self,
        reader: impl Read,
        expected: Option<&str>,
    ) -> Result<(String, u64), StoreError> {
        self.store_blob(reader, expected)
            .map(|blob| (blob.digest, blob.size))
    }

    /// put_blob, saying whether the store already had the blob.
    fn store_blob(&self, reader: impl Read, expected: Option<&str>) -> Result<Blob, StoreError> {
        if let Some(expected) = expected {
            if self.has_blob(expected) {
                let path = self.blob_path(expected)?;
                let size = fs::metadata(&path)
                    .map_err(io_error("reading", &path))?
                    .len();
                return Ok(Blob {
                    digest: expected.to_string(),
                    size,
                    already_present: true,
                });
            }
        }
        let temp = self.root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = File::create(&temp).map_err(io_error("creating", &temp))?;
            let mut hashing = HashingReader::new(reader);
            io::copy(&mut hashing, &mut file).map_err(io_error("writing", &temp))?;
            file.sync_all().map_err(io_error("syncing", &temp))?;
            let (digest, size) = hashing.finish();
            if let Some(expected) = expected {
                if digest.to_string() != expected {
                    return Err(StoreError::DigestMismatch {
                        expected: expected.to_string(),
                        actual: digest,
                    });
                }
            }
            let target = self.root.join("blobs/sha256").join(digest.hex());
            let already_present = target.exists();
            fs::rename(&temp, &target).map_err(io_error("committing", &target))?;
            Ok(Blob {
                digest: digest.to_string(),
                size,
                already_present,
            })
        })();
        if temp.exists() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn put_bytes(&self, bytes: &[u8]) -> Result<(String, u64), StoreError> {
        self.put_blob(bytes, None)
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(io_error("reading", &path))
    }

    fn read_index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.root.join("index.json");
        let file = File::open(&path).map_err(io_error("reading", &path))?;
        ImageIndex::from_reader(file).map_err(|e| invalid("index.json", e.to_string()))
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), StoreError> {
        let text = index
            .to_string()
            .map_err(|e| invalid("index.json", e.to_string()))?;
        write_atomically(&self.root.join("index.json"), text.as_bytes())
    }

    /// Tags `manifest` (a descriptor of a manifest already in the store) as
    /// `name`, replacing what the name pointed at.
    fn tag(&self, name: &str, manifest: &Descriptor) -> Result<(), StoreError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.read_index()?;
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| tag_of(d).as_deref() != Some(name))
            .cloned()
            .collect();
        let mut tagged = manifest.clone();
        let mut annotations = tagged.annotations().clone().unwrap_or_default();
        annotations.insert(REF_NAME.to_string(), name.to_string());
        tagged.set_annotations(Some(annotations));
        manifests.push(tagged);
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    /// Copies the image tagged `reference` (or the only one) in the OCI
    /// layout `source` into the store as `name`, reporting each blob.
    pub fn import_layout(
        &self,
        source: &Path,
        reference: Option<&str>,
        name: &str,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImageSummary, StoreError> {
        let name = normalize_name(name)?;
        let index_path = source.join("index.json");
        let index = ImageIndex::from_file(&index_path)
            .map_err(|e| invalid(format!("{}", index_path.display()), e.to_string()))?;
        let manifest = match reference {
            Some(reference) => index
                .manifests()
                .iter()
                .find(|d| raw_tag_of(d).as_deref() == Some(reference))
                .ok_or_else(|| {
                    StoreError::NotFound(format!("{reference} in {}", source.display()))
                })?,
            None => match index.manifests().as_slice() {
                [only] => only,
                _ => {
                    return Err(invalid(
                        source.display().to_string(),
                        "holds more than one image: name the one to import",
                    ))
                }
            },
        };
        let mut copy = |digest: &str| -> Result<(), StoreError> {
            let hex = digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| invalid(format!("digest {digest}"), "not sha256"))?;
            let path = source.join("blobs/sha256").join(hex);
            let file = File::open(&path).map_err(io_error("reading", &path))?;
            let total = file.metadata().map_or(0, |m| m.len());
            let counted = Counting::new(file, digest, total, &mut *progress);
            let stored = self.store_blob(counted, Some(digest))?;
            progress(stored.into());
            Ok(())
        };
        let manifest_digest = manifest.digest().to_string();
        copy(&manifest_digest)?;
        let parsed = self.manifest(&manifest_digest)?;
        copy(parsed.config().digest().as_ref())?;
        for layer in parsed.layers() {
            copy(layer.digest().as_ref())?;
        }
        let descriptor = Descriptor::new(
            MediaType::ImageManifest,
            manifest.size(),
            manifest.digest().clone(),
        );
        self.tag(&name, &descriptor)?;
        self.summary(&name)
    }

    /// Imports an `oci-archive` tar or a `docker save` tar as `name` (for a
    /// docker-save tar with one image, `name` may be None to keep its tag).
    pub fn import_archive(
        &self,
        archive: &Path,
        name: Option<&str>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImageSummary, StoreError> {
        archive::import(self, archive, name, progress)
    }

    pub(crate) fn manifest(&self, digest: &str) -> Result<ImageManifest, StoreError> {
        let bytes = self.read_blob(digest)?;
        ImageManifest::from_reader(bytes.as_slice())
            .map_err(|e| invalid(format!("manifest {digest}"), e.to_string()))
    }

    pub fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let index = self.read_index()?;
        let mut names: Vec<String> = index.manifests().iter().filter_map(tag_of).collect();
        names.sort();
        names.iter().map(|name| self.summary(name)).collect()
    }

    /// The image `name` (`:latest` when untagged) or NotFound; a name
    /// with a digest must point at that manifest.
    pub fn summary(&self, name: &str) -> Result<ImageSummary, StoreError> {
        let name = ImageName::parse(name)?;
        let index = self.read_index()?;
        let descriptor = find(&index, &name)?;
        let digest = descriptor.digest().to_string();
        let manifest = self.manifest(&digest)?;
        let size = descriptor.size()
            + manifest.config().size()
            + manifest.layers().iter().map(|l| l.size()).sum::<u64>();
        Ok(ImageSummary {
            name: name.familiar(),
            manifest_digest: digest,
            size,
            layers: manifest.layers().len(),
        })
    }

    /// Tags the manifest `digest`, already in the store, as `name` again
    /// (what an import that must be undone puts back).
    pub fn retag(&self, name: &str, digest: &str) -> Result<(), StoreError> {
        let key = normalize_name(name)?;
        let path = self.blob_path(digest)?;
        let size = fs::metadata(&path)
            .map_err(io_error("reading", &path))?
            .len();
        let digest = digest
            .parse::<oci_spec::image::Digest>()
            .map_err(|e| invalid("manifest digest", e.to_string()))?;
        self.tag(
            &key,
            &Descriptor::new(MediaType::ImageManifest, size, digest),
        )
    }

    /// Untags `name`. `in_use` names who uses an image, if anyone does.
    pub fn remove(
        &self,
        name: &str,
        in_use: impl Fn(&str) -> Option<String>,
    ) -> Result<(), StoreError> {
        let parsed = ImageName::parse(name)?;
        let name = parsed.key();
        if let Some(user) = in_use(&name) {
            return Err(StoreError::InUse(parsed.familiar(), user));
        }
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.read_index()?;
        let before = index.manifests().len();
        let kept: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| tag_of(d).as_deref() != Some(name.as_str()))
            .cloned()
            .collect();
        if kept.len() == before {
            return Err(StoreError::NotFound(parsed.familiar()));
        }
        index.set_manifests(kept);
        self.write_index(&index)
    }

    /// Deletes every blob no tagged image reaches; returns (blobs, bytes).
    pub fn garbage_collect(&self) -> Result<(usize, u64), StoreError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let index = self.read_index()?;
        let mut reachable = HashSet::new();
        for descriptor in index.manifests() {
            let digest = descriptor.digest().to_string();
            let manifest = self.manifest(&digest)?;
            reachable.insert(digest);
            reachable.insert(manifest.config().digest().to_string());
            for layer in manifest.layers() {
                reachable.insert(layer.digest().to_string());
            }
        }
        let dir = self.root.join("blobs/sha256");
        let mut removed = (0, 0);
        for entry in fs::read_dir(&dir).map_err(io_error("listing", &dir))? {
            let entry = entry.map_err(io_error("listing", &dir))?;
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            if !reachable.contains(&digest) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(io_error("removing", &entry.path()))?;
                removed.0 += 1;
                removed.1 += size;
            }
        }
        Ok(removed)
    }

    /// The chain id of every layer of every tagged image: what the layer
    /// images (`layer_images`) must keep.
    pub fn chains_in_use(&self) -> Result<HashSet<Digest>, StoreError> {
        let index = {
            let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.read_index()?
        };
        let mut chains = HashSet::new();
        for descriptor in index.manifests() {
            let manifest = self.manifest(descriptor.digest().as_ref())?;
            let config_path = self.blob_path(manifest.config().digest().as_ref())?;
            let config = oci_spec::image::ImageConfiguration::from_file(&config_path)
                .map_err(|e| invalid(format!("config {}", config_path.display()), e.to_string()))?;
            let mut parent: Option<Digest> = None;
            for diff_id in config.rootfs().diff_ids() {
                let diff: Digest = diff_id
                    .parse()
                    .map_err(|e| invalid(format!("diff id {diff_id}"), format!("{e}")))?;
                let chain = capsa_layers::chain_id(parent.as_ref(), &diff);
                chains.insert(chain);
                parent = Some(chain);
            }
        }
        Ok(chains)
    }

    /// Stores an OCI manifest for a config and layers already in the store
    /// and tags it.
    fn tag_new_manifest(
        &self,
        name: &str,
        config: (String, u64),
        layers: &[(String, u64, MediaType)],
    ) -> Result<ImageSummary, StoreError> {
        let mut manifest = BTreeMap::new();
        manifest.insert("schemaVersion", serde_json::json!(2));
        manifest.insert(
            "mediaType",
            serde_json::json!("application/vnd.oci.image.manifest.v1+json"),
        );
        manifest.insert(
            "config",
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.0,
                "size": config.1,
            }),
        );
        let layers: Vec<serde_json::Value> = layers
            .iter()
            .map(|(digest, size, media_type)| {
                serde_json::json!({"mediaType": media_type.to_string(), "digest": digest, "size": size})
            })
            .collect();
        manifest.insert("layers", serde_json::json!(layers));
        let bytes =
            serde_json::to_vec(&manifest).map_err(|e| invalid("manifest", e.to_string()))?;
        let (digest, size) = self.put_bytes(&bytes)?;
        let digest_value = digest
            .parse::<oci_spec::image::Digest>()
            .map_err(|e| invalid("manifest digest", e.to_string()))?;
        self.tag(
            name,
            &Descriptor::new(MediaType::ImageManifest, size, digest_value),
        )?;
        self.summary(name)
    }
}

/// The store key a manifest is tagged with (a tag written by an older
/// Capsa, such as `busybox:latest`, reads as its key).
fn tag_of(descriptor: &Descriptor) -> Option<String> {
    let tag = raw_tag_of(descriptor)?;
    Some(normalize_name(&tag).unwrap_or(tag))
}

/// The ref-name annotation as written (in a layout being imported, often
/// a bare tag such as `latest`).
fn raw_tag_of(descriptor: &Descriptor) -> Option<String> {
    descriptor
        .annotations()
        .as_ref()
        .and_then(|a: &HashMap<String, String>| a.get(REF_NAME))
        .cloned()
}

/// The manifest `name` is: its tag's, which must be the pinned digest if
/// the name has one; a name with a digest only finds any tag of the
/// repository at that digest.
fn find<'a>(index: &'a ImageIndex, name: &ImageName) -> Result<&'a Descriptor, StoreError> {
    let key = name.key();
    let not_found = || StoreError::NotFound(name.familiar());
    let tagged = index
        .manifests()
        .iter()
        .find(|d| tag_of(d).as_deref() == Some(key.as_str()));
    let Some(digest) = name.digest() else {
        return tagged.ok_or_else(not_found);
    };
    let at_digest = |d: &&Descriptor| d.digest().to_string() == digest;
    match tagged {
        // A key with the digest in it was pulled by that digest (which
        // may be an index's).
        Some(d) if at_digest(&d) || key.contains('@') => Ok(d),
        Some(_) => Err(StoreError::NotFound(format!(
            "{} at {digest} (the tag points at another manifest)",
            name.familiar()
        ))),
        None => {
            let repository = format!("{}:", name.repository_key());
            index
                .manifests()
                .iter()
                .filter(|d| tag_of(d).is_some_and(|t| t.starts_with(&repository)))
                .find(at_digest)
                .ok_or_else(not_found)
        }
    }
}

fn empty_index() -> Result<ImageIndex, StoreError> {
    ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::<Descriptor>::new())
        .build()
        .map_err(|e| invalid("index.json", e.to_string()))
}

/// Replaces `path` with `bytes` so a reader sees the old or the new file,
/// never a mix, and the new one survives a crash once this returns.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomically_with_mode(path, bytes, 0o644)
}

/// write_atomically, the file created with `mode` (before the umask): 0600
/// for what only its owner may read.
pub fn write_atomically_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let _ = fs::remove_file(&temp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(io_error("creating", &temp))?;
    file.write_all(bytes).map_err(io_error("writing", &temp))?;
    file.sync_all().map_err(io_error("syncing", &temp))?;
    fs::rename(&temp, path).map_err(io_error("replacing", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("syncing", dir))?;
    }
    Ok(())
}

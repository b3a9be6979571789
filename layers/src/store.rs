//! Unpacked layers kept per chain id, so every container of an image in the
//! group stacks the same directories as overlayfs lower layers.
//!
//! ```text
//! ROOT/chains/<chain id hex>/diff     the layer's own entries, overlay form
//! ROOT/chains/<chain id hex>/parent   the parent chain id, empty for a base
//! ROOT/staging/<n>/                   an import in progress
//! ```
//!
//! An import unpacks into staging and is renamed into `chains/` only after
//! the blob's digest and the tar stream's diff id both check out, so a
//! corrupt, truncated or refused layer never becomes visible.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::read::MultiGzDecoder;

use crate::digest::{Digest, HashingReader};
use crate::unpack::{unpack, UnpackError, UnpackSummary};

/// Longer chains than this would not fit overlayfs' mount options anyway.
pub const MAX_CHAIN_DEPTH: usize = 128;

/// How much decompressed layer is produced at a time.
const DECOMPRESS_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression an OCI or Docker layer media type names.
    pub fn from_media_type(media_type: &str) -> Result<Self, LayerError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Ok(Compression::Zstd)
            }
            other => Err(LayerError::UnknownMediaType(other.to_string())),
        }
    }
}

/// One layer as an image manifest and config describe it.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// The blob's digest (compressed bytes) from the manifest.
    pub digest: Digest,
    /// The uncompressed tar's digest from the image config.
    pub diff_id: Digest,
    pub compression: Compression,
    /// The blob's size from the manifest, when known.
    pub size: Option<u64>,
    /// The chain id of the layers below, `None` for the base layer.
    pub parent: Option<Digest>,
}

impl LayerSpec {
    pub fn chain_id(&self) -> Digest {
        chain_id(self.parent.as_ref(), &self.diff_id)
    }
}

/// The OCI chain id: the diff id for a base layer, otherwise
/// sha256(parent chain id + " " + diff id).
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => *diff_id,
        Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer media type {0:?} is not a tar, tar+gzip or tar+zstd layer")]
    UnknownMediaType(String),
    #[error("layer {digest}: its parent chain {parent} is not in the store")]
    UnknownParent { digest: Digest, parent: Digest },
    #[error("layer {expected}: the blob received has digest {actual} ({bytes} bytes): corrupt or truncated in transfer")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        bytes: u64,
    },
    #[error("layer {expected}: {bytes} bytes received, the manifest says {size}")]
    SizeMismatch {
        expected: Digest,
        size: u64,
        bytes: u64,
    },
    #[error("layer {digest}: its uncompressed content has digest {actual}, the image config says {expected}")]
    DiffIdMismatch {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: Digest,
        #[source]
        source: UnpackError,
    },
    #[error("chain {0} is not in the store")]
    UnknownChain(Digest),
    #[error("chain {0} is deeper than {MAX_CHAIN_DEPTH} layers or loops")]
    ChainTooDeep(Digest),
    #[error("layer store: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub chain_id: Digest,
    /// Zeroes when the chain was already in the store and nothing was read.
    pub summary: UnpackSummary,
    pub blob_bytes: u64,
    pub already_present: bool,
}

pub struct LayerStore {
    root: PathBuf,
    next_staging: AtomicU64,
}

impl LayerStore {
    /// Opens (creating) the store at `root` and clears imports that a crash
    /// left half done.
    pub fn open(root: &Path) -> Result<Self, LayerError> {
        let store = LayerStore {
            root: root.to_path_buf(),
            next_staging: AtomicU64::new(0),
        };
        let staging = store.root.join("staging");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_error("clearing", &staging))?;
        }
        for dir in [store.root.join("chains"), staging] {
            fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        }
        Ok(store)
    }

    fn chain_dir(&self, chain_id: &Digest) -> PathBuf {
        self.root.join("chains").join(chain_id.hex())
    }

    pub fn contains(&self, chain_id: &Digest) -> bool {
        self.chain_dir(chain_id).join("diff").is_dir()
    }

    /// Verifies and unpacks one layer blob read from `blob`, unless its chain
    /// is already here (then `blob` is not read at all).
    pub fn import<R: Read>(&self, spec: &LayerSpec, blob: R) -> Result<Imported, LayerError> {
        let chain_id = spec.chain_id();
        if self.contains(&chain_id) {
            return Ok(Imported {
                chain_id,
                summary: UnpackSummary::default(),
                blob_bytes: 0,
                already_present: true,
            });
        }
        if let Some(parent) = spec.parent {
            if !self.contains(&parent) {
                return Err(LayerError::UnknownParent {
                    digest: spec.digest,
                    parent,
                });
            }
        }
        let staging = self.root.join("staging").join(format!(
            "{}-{}",
            std::process::id(),
            self.next_staging.fetch_add(1, Ordering::Relaxed)
        ));
        let result = self.import_into(spec, blob, &staging);
        let finished = result.and_then(|(summary, blob_bytes)| {
            let destination = self.chain_dir(&chain_id);
            match fs::rename(&staging, &destination) {
                Ok(()) => {}
                // Someone imported the same chain meanwhile: theirs serves.
                Err(_) if self.contains(&chain_id) => {}
                Err(e) => return Err(io_error("committing", &destination)(e)),
            }
            Ok(Imported {
                chain_id,
                summary,
                blob_bytes,
                already_present: false,
            })
        });
        if staging.exists() {
            // Best effort: a leftover is cleared at the next open anyway.
            let _ = fs::remove_dir_all(&staging);
        }
        finished
    }

    fn import_into<R: Read>(
        &self,
        spec: &LayerSpec,
        blob: R,
        staging: &Path,
    ) -> Result<(UnpackSummary, u64), LayerError> {
        let diff_dir = staging.join("diff");
        fs::create_dir_all(&diff_dir).map_err(io_error("creating", &diff_dir))?;
        let parent_file = staging.join("parent");
        let parent = spec.parent.map(|p| p.to_string()).unwrap_or_default();
        fs::write(&parent_file, parent).map_err(io_error("writing", &parent_file))?;

        verified(spec, blob, |tar| unpack(tar, &diff_dir))
    }
}

/// Reads `blob` (decompressed) through `apply`, verifying the blob's
/// digest and size and the tar's diff id; returns what `apply` returned
/// and the blob's size. Used to unpack and to convert, so both refuse the
/// same corrupt or truncated layers.
pub fn verified<R: Read, T>(
    spec: &LayerSpec,
    blob: R,
    apply: impl FnOnce(&mut dyn Read) -> Result<T, UnpackError>,
) -> Result<(T, u64), LayerError> {
    let mut compressed = HashingReader::new(blob);
    let applied = {
        let decoder: Box<dyn Read + '_> = match spec.compression {
            Compression::None => Box::new(&mut compressed),
            Compression::Gzip => Box::new(MultiGzDecoder::new(&mut compressed)),
            Compression::Zstd => match zstd::stream::read::Decoder::new(&mut compressed) {
                Ok(decoder) => Box::new(decoder),
                Err(e) => Box::new(FailingReader(Some(e))),
            },
        };
        let mut diff = HashingReader::new(decoder);
        // tar reads 512-byte blocks; the decompressors run far faster
        // asked for large pieces.
        let applied = {
            let mut buffered = io::BufReader::with_capacity(DECOMPRESS_CHUNK, &mut diff);
            // The diff id covers the tar's trailing padding too, hence
            // reading to the end.
            apply(&mut buffered).and_then(|result| {
                io::copy(&mut buffered, &mut io::sink()).map_err(UnpackError::Read)?;
                Ok(result)
            })
        };
        applied.map(|result| (result, diff.finish().0))
    };
    let (result, diff_digest) = match applied {
        Ok(done) => done,
        Err(e) => return Err(finish_failed(spec, compressed, e)),
    };
    let blob_bytes = check_blob(spec, compressed)?;
    if diff_digest != spec.diff_id {
        return Err(LayerError::DiffIdMismatch {
            digest: spec.digest,
            expected: spec.diff_id,
            actual: diff_digest,
        });
    }
    Ok((result, blob_bytes))
}

/// The error to report when unpacking failed: a blob that does not match
/// its digest explains any unpack error, so that comes first.
fn finish_failed<R: Read>(
    spec: &LayerSpec,
    compressed: HashingReader<R>,
    error: UnpackError,
) -> LayerError {
    match check_blob(spec, compressed) {
        Err(mismatch @ (LayerError::DigestMismatch { .. } | LayerError::SizeMismatch { .. })) => {
            mismatch
        }
        _ => LayerError::Unpack {
            digest: spec.digest,
            source: error,
        },
    }
}

impl LayerStore {
    /// The layer directories of `chain_id`, topmost first, as overlayfs'
    /// `lowerdir=` wants them.
    pub fn lower_dirs(&self, chain_id: &Digest) -> Result<Vec<PathBuf>, LayerError> {
        let mut dirs = Vec::new();
        let mut current = Some(*chain_id);
        while let Some(chain) = current {
            if dirs.len() == MAX_CHAIN_DEPTH {
                return Err(LayerError::ChainTooDeep(*chain_id));
            }
            if !self.contains(&chain) {
                return Err(LayerError::UnknownChain(chain));
            }
            let dir = self.chain_dir(&chain);
            let parent_file = dir.join("parent");
            let parent =
                fs::read_to_string(&parent_file).map_err(io_error("reading", &parent_file))?;
            current = match parent.trim() {
                "" => None,
                text => Some(text.parse().map_err(|e| LayerError::Io {
                    what: "parsing",
                    path: parent_file.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                })?),
            };
            dirs.push(dir.join("diff"));
        }
        Ok(dirs)
    }
}

/// Reads the rest of the blob and checks it against the manifest.
fn check_blob<R: Read>(
    spec: &LayerSpec,
    mut compressed: HashingReader<R>,
) -> Result<u64, LayerError> {
    let drained = compressed.drain();
    let (actual, bytes) = compressed.finish();
    if let Err(e) = drained {
        return Err(LayerError::Unpack {
            digest: spec.digest,
            source: UnpackError::Read(e),
        });
    }
    if let Some(size) = spec.size {
        if size != bytes {
            return Err(LayerError::SizeMismatch {
                expected: spec.digest,
                size,
                bytes,
            });
        }
    }
    if actual != spec.digest {
        return Err(LayerError::DigestMismatch {
            expected: spec.digest,
            actual,
            bytes,
        });
    }
    Ok(bytes)
}

/// Stands in for a decoder that could not even start, so its error surfaces
/// as the layer's read error.
struct FailingReader(Option<io::Error>);

impl Read for FailingReader {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| io::Error::other("the decompressor failed")))
    }
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

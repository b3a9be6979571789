//! Each image layer converted once into an EROFS image (capsa-layers'
//! `erofs`), kept beside the image store and shared by every group whose
//! VM attaches it as a read-only disk:
//!
//! ```text
//! DIR/<chain id hex>.erofs        the layer's image
//! DIR/<chain id hex>.json         its sha256 and size, written after it
//! DIR/<chain id hex>.<n>.partial  a conversion under way
//! ```
//!
//! A conversion writes a partial file, syncs it and renames it into place,
//! then the record; an image without its record is never used (and a
//! crash leaves only partials, cleared at open). Two starts that need
//! the same layer wait for one conversion. The first use in a daemon's
//! life checks the image against its record; a damaged one is converted
//! again from the blob.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use capsa_layers::erofs::ConvertSummary;

use crate::converter::Converter;
use capsa_layers::{Digest, LayerSpec};
use serde::{Deserialize, Serialize};

use crate::{io_error, write_atomically, StoreError};

/// One layer of an image: how to read its blob.
#[derive(Debug, Clone)]
pub struct LayerSource {
    pub spec: LayerSpec,
    pub blob: PathBuf,
}

/// What `ensure` did for one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerEvent {
    Cached {
        chain_id: Digest,
    },
    Converted {
        chain_id: Digest,
        summary: ConvertSummary,
        seconds: f64,
    },
    /// The cached image did not match its record; converted again.
    Rebuilt {
        chain_id: Digest,
        why: String,
    },
}

impl std::fmt::Display for LayerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerEvent::Cached { chain_id } => write!(f, "layer {chain_id}: disk image cached"),
            LayerEvent::Converted {
                chain_id,
                summary,
                seconds,
            } => write!(
                f,
                "layer {chain_id}: converted to a disk image ({} entries, {} bytes of files, {} byte image) in {seconds:.1} s",
                summary.entries, summary.file_bytes, summary.image_bytes
            ),
            LayerEvent::Rebuilt { chain_id, why } => {
                write!(f, "layer {chain_id}: cached disk image damaged ({why}); converting it again")
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    sha256: String,
    bytes: u64,
}

pub struct LayerImages {
    dir: PathBuf,
    /// One lock per chain: a conversion and its waiters.
    locks: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    /// Images checked against their record in this process.
    verified: Mutex<HashSet<Digest>>,
    next_partial: AtomicU64,
    converter: Converter,
}

fn sha256_of(path: &Path) -> io::Result<(Digest, u64)> {
    let mut reader = capsa_layers::HashingReader::new(BufReader::new(File::open(path)?));
    let bytes = io::copy(&mut reader, &mut io::sink())?;
    Ok((reader.finish().0, bytes))
}

impl LayerImages {
    /// Opens (creating) the cache at `dir`, clearing what crashed
    /// conversions left.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        for entry in fs::read_dir(dir).map_err(io_error("listing", dir))? {
            let path = entry.map_err(io_error("listing", dir))?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                fs::remove_file(&path).map_err(io_error("removing", &path))?;
            }
        }
        Ok(LayerImages {
            dir: dir.to_path_buf(),
            locks: Mutex::default(),
            verified: Mutex::default(),
            next_partial: AtomicU64::new(0),
            converter: Converter::InProcess,
        })
    }

    /// Conversions run in `program` as an unprivileged conversion child
    /// (`converter`) when this process is root; `program` calls
    /// `converter::serve_if_asked` first in its main.
    pub fn isolated(mut self, program: PathBuf) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let empty = self.dir.join("empty");
        fs::create_dir_all(&empty).map_err(io_error("creating", &empty))?;
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o555))
            .map_err(io_error("setting the mode of", &empty))?;
        self.converter = Converter::for_daemon(program, empty);
        Ok(self)
    }

    fn image_path(&self, chain: &Digest) -> PathBuf {
        self.dir.join(format!("{}.erofs", chain.hex()))
    }

    fn record_path(&self, chain: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", chain.hex()))
    }

    /// The disk images of `layers` (base first), converting those not yet
    /// cached; `report` hears each layer's outcome.
    pub fn ensure(
        &self,
        layers: &[LayerSource],
        report: &mut dyn FnMut(&LayerEvent),
    ) -> Result<Vec<PathBuf>, StoreError> {
        layers
            .iter()
            .map(|layer| {
                let (path, event) = self.ensure_one(layer)?;
                report(&event);
                Ok(path)
            })
            .collect()
    }

    fn lock(&self, chain: &Digest) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(*chain).or_default().clone()
    }

    fn ensure_one(&self, layer: &LayerSource) -> Result<(PathBuf, LayerEvent), StoreError> {
        let chain_id = layer.spec.chain_id();
        let lock = self.lock(&chain_id);
        let _converting = lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.image_path(&chain_id);
        let damaged = match self.check(&chain_id) {
            Ok(true) => return Ok((path, LayerEvent::Cached { chain_id })),
            Ok(false) => None,
            Err(why) => Some(why),
        };
        let started = Instant::now();
        let summary = self.convert(layer, &chain_id)?;
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(chain_id);
        let event = match damaged {
            Some(why) => LayerEvent::Rebuilt { chain_id, why },
            None => LayerEvent::Converted {
                chain_id,
                summary,
                seconds: started.elapsed().as_secs_f64(),
            },
        };
        Ok((path, event))
    }

    /// Whether a usable image is cached: Ok(false) when there is none,
    /// Err(why) when the one there does not match its record.
    fn check(&self, chain: &Digest) -> Result<bool, String> {
        let (image, record) = (self.image_path(chain), self.record_path(chain));
        let Ok(text) = fs::read(&record) else {
            return Ok(false);
        };
        let record: Record =
            serde_json::from_slice(&text).map_err(|e| format!("its record: {e}"))?;
        let size = fs::metadata(&image)
            .map(|m| m.len())
            .map_err(|e| e.to_string())?;
        if size != record.bytes {
            return Err(format!("{size} bytes, {} recorded", record.bytes));
        }
        if self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(chain)
        {
            return Ok(true);
        }
        let (digest, _) = sha256_of(&image).map_err(|e| e.to_string())?;
        if digest.to_string() != record.sha256 {
            return Err(format!("sha256 {digest}, {} recorded", record.sha256));
        }
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*chain);
        Ok(true)
    }

    fn convert(&self, layer: &LayerSource, chain: &Digest) -> Result<ConvertSummary, StoreError> {
        let (image, record) = (self.image_path(chain), self.record_path(chain));
        let _ = fs::remove_file(&record);
        let partial = self.dir.join(format!(
            "{}.{}.partial",
            chain.hex(),
            self.next_partial.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let blob = File::open(&layer.blob).map_err(io_error("opening", &layer.blob))?;
            let out = File::create(&partial).map_err(io_error("creating", &partial))?;
            let (summary, _) = self.converter.convert(
                &layer.spec,
                blob,
                out.try_clone().map_err(io_error("opening", &partial))?,
            )?;
            out.sync_all().map_err(io_error("syncing", &partial))?;
            let (digest, bytes) = sha256_of(&partial).map_err(io_error("reading", &partial))?;
            fs::rename(&partial, &image).map_err(io_error("committing", &image))?;
            let text = serde_json::to_vec(&Record {
                sha256: digest.to_string(),
                bytes,
            })
            .map_err(|e| crate::invalid("layer image record", e.to_string()))?;
            write_atomically(&record, &text)?;
            Ok(summary)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&partial);
        }
        result
    }

    /// Removes the images of chains not in `keep`; returns how many.
    pub fn retain(&self, keep: &HashSet<Digest>) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(io_error("listing", &self.dir))? {
            let path = entry.map_err(io_error("listing", &self.dir))?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let chain: Option<Digest> = format!("sha256:{stem}").parse().ok();
            if let Some(chain) = chain.filter(|c| !keep.contains(c)) {
                let lock = self.lock(&chain);
                let _converting = lock.lock().unwrap_or_else(|e| e.into_inner());
                fs::remove_file(&path).map_err(io_error("removing", &path))?;
                if path.extension().is_some_and(|e| e == "erofs") {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Reads the cached image of `chain`, for tests of damage.
    pub fn image_of(&self, chain: &Digest) -> PathBuf {
        self.image_path(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_layers::Compression;

    fn layer(dir: &Path, entries: &[(&str, &[u8])]) -> LayerSource {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let blob = dir.join(format!("blob-{}", Digest::of(&tar).hex()));
        fs::write(&blob, &tar).unwrap();
        LayerSource {
            spec: LayerSpec {
                digest: Digest::of(&tar),
                diff_id: Digest::of(&tar),
                compression: Compression::None,
                size: Some(tar.len() as u64),
                parent: None,
            },
            blob,
        }
    }

    fn events(images: &LayerImages, layers: &[LayerSource]) -> Vec<String> {
        let mut seen = Vec::new();
        images
            .ensure(layers, &mut |e| {
                seen.push(
                    match e {
                        LayerEvent::Cached { .. } => "cached",
                        LayerEvent::Converted { .. } => "converted",
                        LayerEvent::Rebuilt { .. } => "rebuilt",
                    }
                    .to_string(),
                )
            })
            .unwrap();
        seen
    }

    #[test]
    fn a_layer_is_converted_once_and_then_served_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let source = layer(dir.path(), &[("a", b"one")]);
        let images = LayerImages::open(&dir.path().join("cache")).unwrap();
        assert_eq!(
            events(&images, std::slice::from_ref(&source)),
            ["converted"]
        );
        assert_eq!(events(&images, std::slice::from_ref(&source)), ["cached"]);
        // A new daemon checks the image against its record, once.
        let images = LayerImages::open(&dir.path().join("cache")).unwrap();
        assert_eq!(events(&images, &[source]), ["cached"]);
    }

    #[test]
    fn a_damaged_image_is_converted_again_and_a_partial_one_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let source = layer(dir.path(), &[("a", b"one")]);
        let cache = dir.path().join("cache");
        let images = LayerImages::open(&cache).unwrap();
        events(&images, std::slice::from_ref(&source));
        let image = images.image_of(&source.spec.chain_id());
        let mut bytes = fs::read(&image).unwrap();
        bytes[5000] ^= 0xff;
        fs::write(&image, &bytes).unwrap();
        let images = LayerImages::open(&cache).unwrap();
        assert_eq!(events(&images, std::slice::from_ref(&source)), ["rebuilt"]);
        assert_eq!(events(&images, std::slice::from_ref(&source)), ["cached"]);
        // A crash between the image and its record: no record, no use.
        fs::remove_file(cache.join(format!("{}.json", source.spec.chain_id().hex()))).unwrap();
        fs::write(cache.join("x.0.partial"), b"half").unwrap();
        let images = LayerImages::open(&cache).unwrap();
        assert!(!cache.join("x.0.partial").exists());
        assert_eq!(events(&images, &[source]), ["converted"]);
    }

    #[test]
    fn two_starts_wait_for_one_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1u8; 4 << 20];
        let source = layer(dir.path(), &[("big", &big)]);
        let images = Arc::new(LayerImages::open(&dir.path().join("cache")).unwrap());
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let (images, source) = (images.clone(), source.clone());
                std::thread::spawn(move || events(&images, &[source]))
            })
            .collect();
        let mut seen: Vec<String> = runs.into_iter().flat_map(|r| r.join().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, ["cached", "converted"]);
    }

    #[test]
    fn a_corrupt_blob_is_an_error_naming_the_layer_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = layer(dir.path(), &[("a", b"one")]);
        source.spec.diff_id = Digest::of(b"something else");
        source.spec.digest = source.spec.diff_id;
        let cache = dir.path().join("cache");
        let images = LayerImages::open(&cache).unwrap();
        let error = images
            .ensure(std::slice::from_ref(&source), &mut |_| {})
            .unwrap_err();
        assert!(
            error.to_string().contains(&source.spec.digest.to_string()),
            "{error}"
        );
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
    }

    #[test]
    fn images_of_chains_no_longer_used_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            layer(dir.path(), &[("a", b"1")]),
            layer(dir.path(), &[("b", b"2")]),
        );
        let cache = dir.path().join("cache");
        let images = LayerImages::open(&cache).unwrap();
        events(&images, &[a.clone(), b.clone()]);
        let keep = HashSet::from([a.spec.chain_id()]);
        assert_eq!(images.retain(&keep).unwrap(), 1);
        assert_eq!(events(&images, &[a]), ["cached"]);
        assert_eq!(events(&images, &[b]), ["converted"]);
    }
}

//! Layer uploads: the host announces a layer (StartLayer), streams its
//! blob in order (WriteLayer) and ends it (CommitLayer). An import thread
//! verifies and unpacks the bytes as they arrive (capsa-layers), so the
//! blob is never held whole in the guest's memory.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use capsa_layers::{Compression, Digest, Imported, LayerError, LayerSpec, LayerStore};

use crate::errors::ApiError;

/// Uploads in progress at once; more are refused rather than queued.
const MAX_UPLOADS: usize = 16;
/// Chunks buffered between the API and the import thread.
const CHUNKS_IN_FLIGHT: usize = 4;
/// An upload whose host stops sending for this long is abandoned.
const UPLOAD_IDLE_LIMIT: Duration = Duration::from_secs(120);

enum Chunk {
    Data(Vec<u8>),
    Abort,
}

struct Upload {
    digest: Digest,
    received: u64,
    chunks: Option<SyncSender<Chunk>>,
    import: Option<JoinHandle<Result<Imported, LayerError>>>,
}

pub struct Images {
    store: Arc<LayerStore>,
    /// Each upload locked on its own, so a slow import holds up only its
    /// own chunks.
    uploads: Mutex<HashMap<u64, Arc<Mutex<Upload>>>>,
    next_upload: AtomicU64,
}

pub struct Started {
    pub chain_id: Digest,
    pub already_present: bool,
    pub upload_id: u64,
}

impl Images {
    pub fn new(store: Arc<LayerStore>) -> Self {
        Images {
            store,
            uploads: Mutex::new(HashMap::new()),
            next_upload: AtomicU64::new(1),
        }
    }

    pub fn store(&self) -> &Arc<LayerStore> {
        &self.store
    }

    pub fn start(
        &self,
        digest: &str,
        diff_id: &str,
        media_type: &str,
        size: u64,
        parent_chain_id: &str,
    ) -> Result<Started, ApiError> {
        let parse = |what: &str, text: &str| {
            text.parse::<Digest>()
                .map_err(|e| ApiError::invalid(format!("{what}: {e}")))
        };
        let parent = match parent_chain_id {
            "" => None,
            text => Some(parse("parent_chain_id", text)?),
        };
        let spec = LayerSpec {
            digest: parse("digest", digest)?,
            diff_id: parse("diff_id", diff_id)?,
            compression: Compression::from_media_type(media_type)
                .map_err(|e| ApiError::invalid(e.to_string()))?,
            size: (size > 0).then_some(size),
            parent,
        };
        let chain_id = spec.chain_id();
        if self.store.contains(&chain_id) {
            return Ok(Started {
                chain_id,
                already_present: true,
                upload_id: 0,
            });
        }
        if let Some(parent) = parent.filter(|p| !self.store.contains(p)) {
            return Err(ApiError::precondition(format!(
                "layer {digest}: its parent chain {parent} has not been sent"
            )));
        }
        let mut uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if uploads.len() >= MAX_UPLOADS {
            return Err(ApiError::exhausted(format!(
                "{MAX_UPLOADS} layer uploads are already in progress"
            )));
        }
        let digest = spec.digest;
        let (sender, receiver) = sync_channel(CHUNKS_IN_FLIGHT);
        let store = self.store.clone();
        let import = std::thread::Builder::new()
            .name("layer-import".into())
            .spawn(move || store.import(&spec, ChunkReader::new(receiver)))
            .map_err(|e| ApiError::internal(format!("cannot start an import: {e}")))?;
        let upload_id = self.next_upload.fetch_add(1, Ordering::Relaxed);
        uploads.insert(
            upload_id,
            Arc::new(Mutex::new(Upload {
                digest,
                received: 0,
                chunks: Some(sender),
                import: Some(import),
            })),
        );
        Ok(Started {
            chain_id,
            already_present: false,
            upload_id,
        })
    }

    pub fn write(&self, upload_id: u64, offset: u64, data: Vec<u8>) -> Result<(), ApiError> {
        let upload = self.get(upload_id)?;
        let mut upload = upload.lock().unwrap_or_else(|e| e.into_inner());
        if offset != upload.received {
            return Err(ApiError::invalid(format!(
                "layer {}: chunk at offset {offset}, expected {}",
                upload.digest, upload.received
            )));
        }
        let length = data.len() as u64;
        let sent = upload
            .chunks
            .as_ref()
            .is_some_and(|chunks| chunks.send(Chunk::Data(data)).is_ok());
        if !sent {
            // The import stopped early: it has refused the layer.
            let outcome = finish(&mut upload);
            drop(upload);
            self.forget(upload_id);
            return Err(outcome.err().unwrap_or_else(|| {
                ApiError::invalid(format!(
                    "layer upload {upload_id}: more data than the layer"
                ))
            }));
        }
        upload.received += length;
        Ok(())
    }

    pub fn commit(&self, upload_id: u64) -> Result<Imported, ApiError> {
        let upload = self.get(upload_id)?;
        let mut upload = upload.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = finish(&mut upload);
        drop(upload);
        self.forget(upload_id);
        outcome
    }

    pub fn abort(&self, upload_id: u64) -> Result<(), ApiError> {
        let upload = self.get(upload_id)?;
        let mut upload = upload.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(chunks) = upload.chunks.take() {
            let _ = chunks.send(Chunk::Abort);
        }
        let _ = finish(&mut upload);
        drop(upload);
        self.forget(upload_id);
        Ok(())
    }

    fn get(&self, upload_id: u64) -> Result<Arc<Mutex<Upload>>, ApiError> {
        let uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads
            .get(&upload_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no layer upload {upload_id}")))
    }

    fn forget(&self, upload_id: u64) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads.remove(&upload_id);
    }
}

/// Waits for the import thread and maps its outcome.
fn finish(upload: &mut Upload) -> Result<Imported, ApiError> {
    upload.chunks = None;
    let import = upload
        .import
        .take()
        .ok_or_else(|| ApiError::internal("the import was already collected".into()))?;
    match import.join() {
        Ok(Ok(imported)) => Ok(imported),
        Ok(Err(e)) => Err(ApiError::from_layer(e)),
        Err(_) => Err(ApiError::internal(format!(
            "layer {}: the import thread panicked",
            upload.digest
        ))),
    }
}

/// The blob as the import thread reads it: the chunks in order, end of
/// file when the sender is dropped (commit), an error on abort or when
/// the host goes quiet.
struct ChunkReader {
    chunks: Receiver<Chunk>,
    current: Vec<u8>,
    position: usize,
}

impl ChunkReader {
    fn new(chunks: Receiver<Chunk>) -> Self {
        ChunkReader {
            chunks,
            current: Vec::new(),
            position: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.chunks.recv_timeout(UPLOAD_IDLE_LIMIT) {
                Ok(Chunk::Data(data)) => {
                    self.current = data;
                    self.position = 0;
                }
                Ok(Chunk::Abort) => return Err(io::Error::other("upload aborted by the host")),
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the host sent nothing for too long; upload abandoned",
                    ))
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.position);
        buf[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

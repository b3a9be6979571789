//! OCI image layers for Capsa: each blob's digest and diff id verified,
//! decompressed (gzip, zstd or none) and unpacked without ever writing
//! outside its directory, into a store keyed by chain id whose directories
//! overlayfs stacks as a container's read-only root.

pub mod digest;
pub mod erofs;
pub mod store;
pub mod unpack;

pub use digest::{Digest, DigestError, HashingReader};
pub use store::{chain_id, Compression, Imported, LayerError, LayerSpec, LayerStore};
pub use unpack::{unpack, UnpackError, UnpackSummary};

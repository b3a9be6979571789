//! Guest memory in a snapshot: written as one file, the regions one after
//! another, its zero pages left as holes; restored by mapping that file
//! privately, so that every VM restored from it shares the pages it has
//! not written through the host's page cache, and its own writes stay its
//! own (copy-on-write).

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SnapshotError;
use crate::memory::ram_ranges;

const PAGE: usize = 4096;

fn io(what: &'static str) -> impl Fn(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// Writes every region of `memory` into `file` at its place in the
/// snapshot, skipping pages of zeros (the file keeps holes there), and
/// always writing the last page, so that the file has its whole length.
pub fn dump(memory: &GuestMemoryMmap, file: &File) -> Result<(), SnapshotError> {
    let mut offset: u64 = 0;
    let regions: Vec<_> = memory.iter().collect();
    let last_region = regions.len().saturating_sub(1);
    for (r, region) in regions.into_iter().enumerate() {
        let len = region.len() as usize;
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| SnapshotError::Refused("a memory region has no host mapping".into()))?;
        // SAFETY: `host` maps `len` bytes of this region for as long as
        // `memory` lives; every vCPU and device is stopped, so nothing
        // writes to it while it is read here.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let pages = bytes.chunks(PAGE).enumerate();
        let page_count = len.div_ceil(PAGE);
        for (p, page) in pages {
            let last = r == last_region && p + 1 == page_count;
            if last || page.iter().any(|&b| b != 0) {
                file.write_all_at(page, offset + (p * PAGE) as u64)
                    .map_err(io("write the guest's memory"))?;
            }
        }
        offset += len as u64;
    }
    file.sync_all().map_err(io("flush the guest's memory"))
}

/// Guest memory of `size` bytes, mapped privately from a snapshot's memory
/// file, which must be exactly that long.
pub fn map(file: File, size: u64) -> Result<GuestMemoryMmap, SnapshotError> {
    let length = file
        .metadata()
        .map_err(io("read the memory file's size"))?
        .len();
    if length != size {
        return Err(SnapshotError::Damaged(format!(
            "its memory file holds {length} bytes, not the {size} its state says"
        )));
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let region = MmapRegionBuilder::new_with_bitmap(len as usize, ())
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| SnapshotError::Refused(format!("cannot map the memory file: {e}")))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start.0))
                .ok_or_else(|| SnapshotError::Refused("a memory region overflows".into()))?,
        );
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::Refused(format!("cannot lay out the memory: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u64 = 4 << 20;

    #[test]
    fn memory_goes_out_sparse_and_comes_back_private() {
        let memory = crate::memory::allocate(SIZE).unwrap();
        memory.write_slice(b"kernel", GuestAddress(0x1000)).unwrap();
        memory
            .write_slice(b"heap", GuestAddress(SIZE - 0x2000))
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        dump(&memory, &file).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), SIZE);
        // Three pages written (two with data and the last), the rest holes.
        assert!(meta.blocks() * 512 <= 64 * 1024, "{} blocks", meta.blocks());

        let clone = file.try_clone().unwrap();
        let restored = map(file, SIZE).unwrap();
        let mut word = [0u8; 6];
        restored
            .read_slice(&mut word, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&word, b"kernel");
        let mut word = [0u8; 4];
        restored
            .read_slice(&mut word, GuestAddress(SIZE - 0x2000))
            .unwrap();
        assert_eq!(&word, b"heap");
        // A write to the restored memory stays its own.
        restored.write_slice(b"mine", GuestAddress(0x1000)).unwrap();
        let mut on_file = [0u8; 4];
        clone.read_exact_at(&mut on_file, 0x1000).unwrap();
        assert_eq!(&on_file, b"kern");
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(SIZE / 2).unwrap();
        let err = map(file, SIZE).err().unwrap();
        assert!(err.to_string().contains("memory file holds"), "{err}");
    }
}

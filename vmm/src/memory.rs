//! Guest RAM: allocation, registration with KVM, and the e820 map.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{
    E820_RAM, E820_RESERVED, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size_mib} MiB of guest memory: {source}")]
    Allocate {
        size_mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused guest memory slot {slot}: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// One line of the e820 map handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Host-side RAM ranges backing `size` bytes of guest memory: contiguous from
/// zero up to the MMIO gap, the rest relocated above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// The guest's view of its physical memory. The legacy hole between the EBDA
/// and 1 MiB is reserved (the ACPI tables live there) even though it is
/// backed, so the kernel never hands it out.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let end = start.raw_value() + len;
        let start = start.raw_value().max(HIMEM_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// The end of RAM below the MMIO gap, where the initrd goes.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

pub fn allocate(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size_mib: size >> 20,
        source,
    })
}

pub fn register(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let host_addr =
            memory
                .get_host_address(region.start_addr())
                .map_err(|_| MemoryError::Register {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
        let mem_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `memory`, which the VM
        // keeps alive for as long as the VmFd exists.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    #[test]
    fn small_memory_is_one_range_with_legacy_hole() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: HIMEM_START - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 128 * MIB - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let size = 5 * 1024 * MIB;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[1].0, GuestAddress(MMIO_GAP_END));
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, size);
        let map = e820_map(size);
        let high = map.last().unwrap();
        assert_eq!(high.addr, MMIO_GAP_END);
        assert_eq!(high.size, size - MMIO_GAP_START);
        let low = map[2];
        assert_eq!(low.addr + low.size, MMIO_GAP_START);
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }
}

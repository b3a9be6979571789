//! Loading the kernel and initrd and writing the PVH boot information.
//!
//! The kernel is an uncompressed ELF `vmlinux` with a PVH entry note
//! (CONFIG_PVH): the vCPU starts directly at that entry in 32-bit protected
//! mode with %ebx pointing at an `hvm_start_info`, which carries the command
//! line, the e820 map, the initrd and the ACPI RSDP.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MIB, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use crate::memory::{self, E820Entry};

/// Memory the kernel needs beyond its own image and the initrd to get as far
/// as running /init (page tables, slab, the unpacked initramfs's metadata).
const BOOT_HEADROOM: u64 = 32 * MIB;
const PT_LOAD: u32 = 1;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {}: {source}", path.display())]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is not an x86-64 ELF kernel ({reason}); Capsa boots the uncompressed `vmlinux`, not a bzImage",
        path.display()
    )]
    NotElfKernel { path: PathBuf, reason: String },
    #[error("kernel {} has no PVH entry point: build it with CONFIG_PVH=y", path.display())]
    NoPvhEntry { path: PathBuf },
    #[error("cannot read initrd {}: {source}", path.display())]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{memory_mib} MiB of guest memory is too little: the kernel loads up to {kernel_end_mib} MiB \
         and the initrd is {initrd_mib} MiB; give at least {needed_mib} MiB"
    )]
    TooLittleMemory {
        memory_mib: u64,
        kernel_end_mib: u64,
        initrd_mib: u64,
        needed_mib: u64,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error(
        "e820 map has {0} entries, more than the {PVH_MEMMAP_MAX_ENTRIES} the boot area holds"
    )]
    MemmapTooLarge(usize),
    #[error("writing the boot information into guest memory: {0}")]
    Configure(String),
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub start_info: GuestAddress,
}

pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_size: u64,
}

/// The kernel and initrd, open: they are opened before the VMM enters
/// its jail and loaded after.
pub struct Images {
    kernel: File,
    initrd: Option<(File, u64)>,
}

/// Opens the kernel and initrd of `spec`, and checks that they fit its
/// memory.
pub fn open(spec: &BootSpec) -> Result<Images, BootError> {
    let mut kernel = File::open(spec.kernel).map_err(|source| BootError::OpenKernel {
        path: spec.kernel.to_owned(),
        source,
    })?;
    let kernel_end = kernel_load_end(&mut kernel).map_err(|reason| BootError::NotElfKernel {
        path: spec.kernel.to_owned(),
        reason,
    })?;
    let initrd = match spec.initrd {
        Some(path) => {
            let failed = |source| BootError::ReadInitrd {
                path: path.to_owned(),
                source,
            };
            let file = File::open(path).map_err(failed)?;
            let size = file.metadata().map_err(failed)?.len();
            Some((file, size))
        }
        None => None,
    };
    let initrd_size = initrd.as_ref().map_or(0, |i| i.1);
    check_memory(spec.memory_size, kernel_end, initrd_size)?;
    Ok(Images { kernel, initrd })
}

pub fn load(
    memory: &GuestMemoryMmap,
    spec: &BootSpec,
    images: Images,
) -> Result<BootEntry, BootError> {
    let Images { mut kernel, initrd } = images;
    let loaded =
        Elf::load(memory, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::NotElfKernel {
                path: spec.kernel.to_owned(),
                reason: e.to_string(),
            }
        })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => entry,
        _ => {
            return Err(BootError::NoPvhEntry {
                path: spec.kernel.to_owned(),
            })
        }
    };

    let mut modules = Vec::new();
    if let (Some(path), Some((mut file, size))) = (spec.initrd, initrd) {
        let addr = (memory::low_ram_end(spec.memory_size) - size) & !(PAGE_SIZE - 1);
        memory
            .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
            .map_err(|e| BootError::ReadInitrd {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
        modules.push(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
    }

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    write_start_info(memory, &memory::e820_map(spec.memory_size), &modules)?;
    Ok(BootEntry {
        entry,
        start_info: GuestAddress(PVH_INFO_START),
    })
}

fn check_memory(memory_size: u64, kernel_end: u64, initrd_size: u64) -> Result<(), BootError> {
    // The initramfs is unpacked into page cache while its archive is still
    // in memory, so it counts twice.
    let needed = kernel_end + 2 * initrd_size + BOOT_HEADROOM;
    let low_ram = memory::low_ram_end(memory_size);
    if needed > low_ram {
        return Err(BootError::TooLittleMemory {
            memory_mib: memory_size / MIB,
            kernel_end_mib: kernel_end.div_ceil(MIB),
            initrd_mib: initrd_size.div_ceil(MIB),
            needed_mib: needed.div_ceil(MIB),
        });
    }
    Ok(())
}

/// The highest guest physical address the kernel's loadable segments reach,
/// read from its program headers so memory can be checked before loading.
fn kernel_load_end(kernel: &mut File) -> Result<u64, String> {
    let mut ehdr = Elf64_Ehdr::default();
    read_struct(kernel, 0, &mut ehdr).map_err(|e| format!("cannot read ELF header: {e}"))?;
    if ehdr.e_ident[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err("no ELF magic".into());
    }
    if ehdr.e_phentsize as usize != std::mem::size_of::<Elf64_Phdr>() {
        return Err("unexpected program header size".into());
    }
    let mut end = 0u64;
    for index in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = Elf64_Phdr::default();
        let offset = ehdr.e_phoff + index * u64::from(ehdr.e_phentsize);
        read_struct(kernel, offset, &mut phdr)
            .map_err(|e| format!("cannot read program header {index}: {e}"))?;
        if phdr.p_type == PT_LOAD {
            let seg_end = phdr
                .p_paddr
                .checked_add(phdr.p_memsz)
                .ok_or_else(|| format!("program header {index} overflows"))?;
            end = end.max(seg_end);
        }
    }
    if end == 0 {
        return Err("no loadable segments".into());
    }
    Ok(end)
}

fn read_struct<T: vm_memory::ByteValued>(
    file: &mut File,
    offset: u64,
    out: &mut T,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(out.as_mut_slice())
}

fn write_start_info(
    memory: &GuestMemoryMmap,
    e820: &[E820Entry],
    modules: &[hvm_modlist_entry],
) -> Result<(), BootError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemmapTooLarge(e820.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        rsdp_paddr: ACPI_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, memory)
        .map_err(|e| BootError::Configure(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_check_counts_kernel_initrd_and_headroom() {
        assert!(check_memory(128 * MIB, 24 * MIB, 4 * MIB).is_ok());
        let err = check_memory(16 * MIB, 24 * MIB, 4 * MIB).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("16 MiB of guest memory is too little"),
            "{text}"
        );
        assert!(text.contains("at least 64 MiB"), "{text}");
    }

    #[test]
    fn start_info_points_at_cmdline_memmap_and_modules() {
        let memory = memory::allocate(64 * MIB).unwrap();
        let modules = [hvm_modlist_entry {
            paddr: 0x100_0000,
            size: 42,
            ..Default::default()
        }];
        write_start_info(&memory, &memory::e820_map(64 * MIB), &modules).unwrap();
        let info: hvm_start_info = memory.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        let module: hvm_modlist_entry = memory.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(module.size, 42);
    }
}

//! Per-vCPU setup: CPUID with a coherent topology, boot MSRs, the PVH entry
//! register state, FPU and local APIC.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::BootEntry;
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM cannot report its supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("setting CPUID on vCPU {cpu}: {source}")]
    SetCpuid { cpu: u8, source: kvm_ioctls::Error },
    #[error("setting MSRs on vCPU {cpu}: {what}")]
    SetMsrs { cpu: u8, what: String },
    #[error("setting {what} on vCPU {cpu}: {source}")]
    SetState {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing the boot GDT: {0}")]
    Gdt(vm_memory::GuestMemoryError),
}

/// The CPUID KVM supports on this host, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)
}

/// Topology presented to the guest: one socket, `count` cores, one thread
/// per core, APIC id = vCPU index.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub cpu: u8,
    pub count: u8,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const FEATURES_ECX_HYPERVISOR: u32 = 1 << 31;
const FEATURES_EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

fn ceil_log2(n: u8) -> u32 {
    (n.max(1) as u32).next_power_of_two().trailing_zeros()
}

/// Logical processors sharing a cache, minus one: L1 and L2 are per core,
/// L3 is shared by the whole socket. `eax` is a leaf 4 / 0x8000001d value.
fn cache_sharing(eax: u32, count: u32) -> u32 {
    let level = (eax >> 5) & 0x7;
    if level >= 3 {
        count - 1
    } else {
        0
    }
}

/// Rewrites the host-derived CPUID so each vCPU sees its own APIC id and all
/// of them agree on how many cores there are.
pub fn patch_cpuid(cpuid: &mut CpuId, topo: Topology) {
    let apic_id = u32::from(topo.cpu);
    let count = u32::from(topo.count);
    let core_bits = ceil_log2(topo.count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                entry.ecx |= FEATURES_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= FEATURES_EDX_HTT;
                } else {
                    entry.edx &= !FEATURES_EDX_HTT;
                }
            }
            // Deterministic cache parameters: only valid cache entries carry
            // the sharing and core counts.
            LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
                entry.eax = (entry.eax & 0x3fff)
                    | (cache_sharing(entry.eax, count) << 14)
                    | ((count - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = TOPOLOGY_LEVEL_SMT << 8;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | 1;
                    }
                    index => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = index;
                    }
                }
            }
            LEAF_AMD_EXT_FEATURES => {
                if count > 1 {
                    entry.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZE_IDS => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY if entry.eax & 0x1f != 0 => {
                entry.eax = (entry.eax & !(0xfff << 14)) | (cache_sharing(entry.eax, count) << 14);
            }
            LEAF_AMD_EXT_APIC_ID => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

// MSR numbers (Intel SDM vol. 4; KVM emulates them on AMD too).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled with write-back as the default memory type.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

// Flat 4 GiB segments for the 32-bit PVH entry: null, code, data, TSS.
const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Writes the boot GDT and an empty IDT; shared by all vCPUs.
pub fn write_gdt(memory: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (index, entry) in GDT.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * index as u64))
            .map_err(CpuError::Gdt)?;
    }
    memory
        .write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(CpuError::Gdt)
}

/// Decodes a GDT descriptor into the form KVM takes.
fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let granular = (descriptor >> 55) & 1 == 1;
    kvm_segment {
        base: 0,
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: granular as u8,
        ..Default::default()
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Puts one vCPU into the state the PVH boot protocol promises.
pub fn configure(
    vcpu: &VcpuFd,
    supported: &CpuId,
    topo: Topology,
    boot: BootEntry,
) -> Result<(), CpuError> {
    let cpu = topo.cpu;
    let state_err = |what| move |source| CpuError::SetState { cpu, what, source };

    let mut cpuid = supported.clone();
    patch_cpuid(&mut cpuid, topo);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| CpuError::SetCpuid { cpu, source })?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::SetMsrs {
        cpu,
        what: format!("{e:?}"),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(|e| CpuError::SetMsrs {
        cpu,
        what: e.to_string(),
    })?;
    if written != entries.len() {
        return Err(CpuError::SetMsrs {
            cpu,
            what: format!(
                "KVM accepted only {written} of {} (refused MSR {:#x})",
                entries.len(),
                entries[written].index
            ),
        });
    }

    let mut sregs = vcpu.get_sregs().map_err(state_err("special registers"))?;
    let code = segment(CODE_SELECTOR, GDT[1]);
    let data = segment(DATA_SELECTOR, GDT[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, GDT[3]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(state_err("special registers"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry.0,
        rbx: boot.start_info.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(state_err("registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(state_err("FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(state_err("local APIC"))?;
    for (offset, mode) in [
        (LAPIC_LVT_LINT0, APIC_MODE_EXTINT),
        (LAPIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(state_err("local APIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ..Default::default()
        }
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_shared_core_count() {
        let base = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0, 0),
            entry(LEAF_EXT_TOPOLOGY, 0, 0),
            entry(LEAF_EXT_TOPOLOGY, 1, 0),
            entry(LEAF_AMD_SIZE_IDS, 0, 0),
            entry(LEAF_AMD_EXT_APIC_ID, 0, 0),
        ])
        .unwrap();
        let mut cpuid = base.clone();
        patch_cpuid(&mut cpuid, Topology { cpu: 2, count: 3 });
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].edx & FEATURES_EDX_HTT, 0);
        assert_ne!(e[0].ecx & FEATURES_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 3, 2));
        assert_eq!(e[3].ecx & 0xff, 2);
        assert_eq!(e[4].eax, 2);
    }

    #[test]
    fn gdt_descriptors_decode_to_flat_segments() {
        let code = segment(CODE_SELECTOR, GDT[1]);
        assert_eq!(
            (code.limit, code.type_, code.db, code.g, code.s),
            (0xffff_ffff, 0xb, 1, 1, 1)
        );
        let tss = segment(TSS_SELECTOR, GDT[3]);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
    }
}

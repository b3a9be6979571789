//! One vCPU's state: what KVM holds of it, read after the vCPU has left
//! KVM_RUN for good, and written back, in the order KVM needs, before a
//! restored vCPU first runs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// More MSRs than any KVM lists: a state that claims more is damaged.
pub const MAX_MSRS: usize = 1024;
/// More CPUID leaves than KVM takes.
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Index and value of each MSR KVM would give.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// Reads the MSRs of `wanted` that KVM gives for this vCPU: KVM_GET_MSRS
/// stops at the first it cannot read, which is then left out.
fn read_msrs(vcpu: &VcpuFd, wanted: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut read = Vec::with_capacity(wanted.len());
    let mut rest = wanted;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooMany {
            what: "MSRs",
            count: entries.len(),
        })?;
        let count = vcpu.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        read.extend(
            msrs.as_slice()
                .iter()
                .take(count)
                .map(|entry| (entry.index, entry.data)),
        );
        // The MSR at `count`, if any, could not be read: skip it.
        rest = rest.get(count + 1..).unwrap_or(&[]);
    }
    Ok(read)
}

impl VcpuState {
    /// `msr_list`: the MSRs KVM lists for saving (KVM_GET_MSR_INDEX_LIST).
    pub fn save(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<Self, SnapshotError> {
        let cpuid = vcpu
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(kvm("read the CPUID"))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: vcpu.get_mp_state().map_err(kvm("read the MP state"))?,
            regs: vcpu.get_regs().map_err(kvm("read the registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(kvm("read the special registers"))?,
            xsave: vcpu.get_xsave().map_err(kvm("read the XSAVE area"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("read the XCRs"))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(kvm("read the debug registers"))?,
            lapic: vcpu.get_lapic().map_err(kvm("read the local APIC"))?,
            msrs: read_msrs(vcpu, msr_list)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm("read the pending events"))?,
        })
    }

    /// Whether the counts a damaged file could inflate are in bounds.
    pub fn check(&self) -> Result<(), SnapshotError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(SnapshotError::TooMany {
                what: "MSRs",
                count: self.msrs.len(),
            });
        }
        if self.cpuid.is_empty() || self.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(SnapshotError::TooMany {
                what: "CPUID leaves",
                count: self.cpuid.len(),
            });
        }
        Ok(())
    }

    /// Writes the state into a vCPU made for it (the in-kernel irqchip
    /// exists already): CPUID first, pending events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        self.check()?;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::TooMany {
            what: "CPUID leaves",
            count: self.cpuid.len(),
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm("set the registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm("set the special registers"))?;
        // SAFETY: a kvm_xsave is the fixed 4 KiB area KVM_SET_XSAVE reads;
        // KVM reads no more than that struct, which is whole here.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("set the XSAVE area"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("set the XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm("set the debug registers"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm("set the local APIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooMany {
            what: "MSRs",
            count: entries.len(),
        })?;
        let written = vcpu.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if written != entries.len() {
            let index = entries.get(written).map_or(0, |e| e.index);
            return Err(SnapshotError::Refused(format!(
                "KVM refused MSR {index:#x} of the snapshot"
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("set the pending events"))?;
        Ok(())
    }
}

//! Snapshots of a running microVM, and VMs restored from them.
//!
//! A snapshot is two files: the state (this module's `VmState`, JSON with
//! a format number and the VMM's version) and the guest's memory
//! (`memory`). It is taken with every vCPU out of KVM_RUN for good and
//! every device worker stopped, then the VMM ends; a restore builds the
//! same machine (vCPUs, irqchip, PIT, the devices in the same order and
//! kinds, each with a new backend), writes the state back and runs it.

pub mod memory;
pub mod take;
pub mod vcpu;

use std::fs::File;
use std::io::{Read, Write};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::virtio::mmio::TransportState;
pub use vcpu::VcpuState;

/// This layout of the state; a state of another is not read.
pub const FORMAT: u32 = 1;
/// The VMM that wrote a state is the only one that reads it.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A state file longer than this is not one (a 64-vCPU state is about
/// 2 MiB of JSON).
const MAX_STATE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the snapshot is damaged: {0}")]
    Damaged(String),
    #[error("the snapshot was written by capsa-vmm {found} (format {format}); this is capsa-vmm {VMM_VERSION} (format {FORMAT})")]
    Version { found: String, format: u32 },
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
    #[error("too many {what} ({count})")]
    TooMany { what: &'static str, count: usize },
    #[error("{0}")]
    Refused(String),
}

/// The serial port's registers (vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegisters {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialRegisters {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegisters) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What the VM-wide parts of KVM hold.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl MachineState {
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let kvm = |what| move |source| SnapshotError::Kvm { what, source };
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm("read the interrupt controllers"))?;
            irqchips.push(chip);
        }
        Ok(MachineState {
            irqchips,
            pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm("read the VM's clock"))?,
        })
    }

    /// Writes the state into a VM with its irqchip and PIT made and no
    /// vCPU running yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let kvm = |what| move |source| SnapshotError::Kvm { what, source };
        if self.irqchips.len() != IRQCHIPS.len()
            || self
                .irqchips
                .iter()
                .zip(IRQCHIPS)
                .any(|(chip, id)| chip.chip_id != id)
        {
            return Err(SnapshotError::Damaged(
                "its interrupt controllers are not a PIC pair and an IOAPIC".into(),
            ));
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(kvm("set the interrupt controllers"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("set the PIT"))?;
        // The clock goes on from where it stood (the guest sees no jump);
        // KVM takes no flags but its own on a set.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("set the VM's clock"))?;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub format: u32,
    pub vmm_version: String,
    pub memory_mib: u64,
    pub machine: MachineState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialRegisters,
    /// Each virtio device's transport, in the VM's order.
    pub devices: Vec<TransportState>,
}

impl VmState {
    /// Writes the state, whole, to `file`.
    pub fn write(&self, mut file: &File) -> Result<(), SnapshotError> {
        let text = serde_json::to_vec(self)
            .map_err(|e| SnapshotError::Refused(format!("cannot encode the state: {e}")))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .map_err(|source| SnapshotError::Io {
                what: "write the snapshot's state",
                source,
            })
    }

    /// Reads a state and checks what a damaged or foreign file would get
    /// wrong: its format and VMM, and counts in bounds.
    pub fn read(file: &File) -> Result<Self, SnapshotError> {
        let mut text = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|source| SnapshotError::Io {
                what: "read the snapshot's state",
                source,
            })?;
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::Damaged(format!(
                "its state is over {MAX_STATE_BYTES} bytes"
            )));
        }
        // The header alone first: a state of another VMM is told as such,
        // not as a parse error.
        #[derive(Deserialize)]
        struct Header {
            format: u32,
            vmm_version: String,
        }
        let header: Header = serde_json::from_slice(&text)
            .map_err(|e| SnapshotError::Damaged(format!("its state does not parse: {e}")))?;
        if header.format != FORMAT || header.vmm_version != VMM_VERSION {
            return Err(SnapshotError::Version {
                found: header.vmm_version,
                format: header.format,
            });
        }
        let state: VmState = serde_json::from_slice(&text)
            .map_err(|e| SnapshotError::Damaged(format!("its state does not parse: {e}")))?;
        if state.vcpus.is_empty() || state.vcpus.len() > usize::from(u8::MAX) {
            return Err(SnapshotError::Damaged(format!(
                "it has {} vCPUs",
                state.vcpus.len()
            )));
        }
        for vcpu in &state.vcpus {
            vcpu.check()?;
        }
        Ok(state)
    }

    /// Whether the VM about to be built is the one the snapshot is of.
    pub fn check_fits(
        &self,
        vcpus: u8,
        memory_mib: u64,
        device_types: &[u32],
    ) -> Result<(), SnapshotError> {
        if self.vcpus.len() != usize::from(vcpus) {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} vCPUs, the VM {vcpus}",
                self.vcpus.len()
            )));
        }
        if self.memory_mib != memory_mib {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} MiB of memory, the VM {memory_mib} MiB",
                self.memory_mib
            )));
        }
        let saved: Vec<u32> = self.devices.iter().map(|d| d.device_type).collect();
        if saved != device_types {
            let names = |types: &[u32]| {
                types
                    .iter()
                    .map(|&t| crate::virtio::mmio::thread_name(t))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(SnapshotError::Mismatch(format!(
                "its devices are [{}], the VM's [{}]",
                names(&saved),
                names(device_types)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn file_with(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        file
    }

    #[test]
    fn a_state_of_another_vmm_or_format_is_told_as_such() {
        let other = format!(r#"{{"format": {FORMAT}, "vmm_version": "0.0.0-other"}}"#);
        let err = VmState::read(&file_with(other.as_bytes())).err().unwrap();
        assert!(matches!(err, SnapshotError::Version { .. }), "{err}");
        assert!(err.to_string().contains("0.0.0-other"), "{err}");
        let newer = format!(r#"{{"format": 99, "vmm_version": "{VMM_VERSION}"}}"#);
        let err = VmState::read(&file_with(newer.as_bytes())).err().unwrap();
        assert!(
            matches!(err, SnapshotError::Version { format: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_state_is_a_clear_error() {
        for bytes in [&b""[..], b"{\"format\": 1", b"\x00\x01garbage"] {
            let err = VmState::read(&file_with(bytes)).err().unwrap();
            assert!(matches!(err, SnapshotError::Damaged(_)), "{bytes:?}: {err}");
        }
        // The right header over a body that is not a VM's state.
        let body = format!(r#"{{"format": {FORMAT}, "vmm_version": "{VMM_VERSION}", "vcpus": 3}}"#);
        let err = VmState::read(&file_with(body.as_bytes())).err().unwrap();
        assert!(
            err.to_string().starts_with("the snapshot is damaged"),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_state_is_not_read_whole() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(MAX_STATE_BYTES + 10).unwrap();
        let err = VmState::read(&file).err().unwrap();
        assert!(err.to_string().contains("over"), "{err}");
    }

    #[test]
    fn serial_registers_round_trip() {
        let state = vm_superio::serial::SerialState {
            interrupt_enable: 0x0f,
            line_control: 0x03,
            in_buffer: vec![b'a', b'b'],
            ..Default::default()
        };
        let saved: SerialRegisters = state.clone().into();
        assert_eq!(vm_superio::serial::SerialState::from(&saved), state);
    }
}

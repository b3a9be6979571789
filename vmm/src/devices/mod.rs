//! Devices of the microVM and the port I/O bus that dispatches to them.

pub mod bus;
pub mod console;
pub mod legacy;

use std::sync::mpsc::Sender;

/// Something the guest did that ends (or may end) the VM's run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// Powered off through the ACPI sleep control register (S5).
    PowerOff,
    /// Reset through the i8042 controller (or a KVM reset system event).
    Reset,
    /// The kernel reported a panic through pvpanic.
    Panic,
    /// A triple fault: KVM shut the vCPU down.
    TripleFault,
    /// A vCPU stopped for a reason KVM reported as an error.
    VcpuFailure(String),
    /// Whoever started the VMM asked for a snapshot (not the guest's doing).
    SnapshotAsked,
    /// Whoever was to ask for a snapshot closed the control socket without
    /// asking: it is gone, and so is the VM's purpose.
    SnapshotAbandoned,
}

/// Where devices report guest events; cloned into each device and vCPU.
#[derive(Clone, Debug)]
pub struct EventSender(pub Sender<GuestEvent>);

impl EventSender {
    pub fn send(&self, event: GuestEvent) {
        // The receiver lives as long as the VM runs; once it is gone nobody
        // is interested in further events, so a failed send is fine.
        let _ = self.0.send(event);
    }
}

/// The i8042's reset line.
impl vm_superio::Trigger for EventSender {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.send(GuestEvent::Reset);
        Ok(())
    }
}

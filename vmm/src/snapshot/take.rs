//! Taking a snapshot, once asked on the control socket: the vCPUs are
//! stopped, the devices paused, everything read and written out, and the
//! answer given on the control socket. The VMM ends after it either way.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use kvm_ioctls::{VcpuFd, VmFd};

use super::{memory, MachineState, SnapshotError, VcpuState, VmState, FORMAT, VMM_VERSION};
use crate::devices::bus::DeviceBus;
use crate::devices::{EventSender, GuestEvent};
use crate::virtio::Memory;

/// The VMM's side of `--snapshot-to`.
pub struct SnapshotFiles {
    pub control: UnixStream,
    pub state: File,
    pub memory: File,
}

impl SnapshotFiles {
    /// Waits, on a thread of its own, for the byte that asks for the
    /// snapshot, and reports it as a guest event; a control socket closed
    /// without it ends the VM (its starter died: nobody will ever ask).
    /// `filter`: the thread's own seccomp filter (`Role::Control`).
    pub fn watch(
        &self,
        events: EventSender,
        filter: Option<seccompiler::BpfProgram>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let mut control = self.control.try_clone()?;
        std::thread::Builder::new()
            .name("snapshot-control".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install_on_this_thread(filter.as_ref()) {
                    events.send(GuestEvent::VcpuFailure(e.to_string()));
                    return;
                }
                let mut byte = [0u8; 1];
                events.send(match control.read(&mut byte) {
                    Ok(1) => GuestEvent::SnapshotAsked,
                    _ => GuestEvent::SnapshotAbandoned,
                });
            })
    }

    /// Says how it went on the control socket, one line.
    pub fn answer(&mut self, result: &Result<(), SnapshotError>) {
        let line = match result {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {e}\n"),
        };
        // Whoever asked may be gone; the VMM's exit status says it too.
        let _ = self.control.write_all(line.as_bytes());
    }
}

/// What a snapshot is taken of.
pub struct Machine<'a> {
    pub vm: &'a VmFd,
    pub memory: &'a Memory,
    pub devices: &'a DeviceBus,
    pub memory_mib: u64,
    /// The MSRs KVM lists for saving.
    pub msr_list: &'a [u32],
}

/// Writes the snapshot of `machine`, whose vCPUs have stopped (`vcpus`,
/// None for one that did not stop when told).
pub fn take(
    machine: &Machine<'_>,
    vcpus: &[Option<VcpuFd>],
    files: &SnapshotFiles,
) -> Result<(), SnapshotError> {
    let vcpus: Vec<&VcpuFd> = vcpus
        .iter()
        .map(|v| {
            v.as_ref()
                .ok_or_else(|| SnapshotError::Refused("a vCPU did not stop when told".into()))
        })
        .collect::<Result<_, _>>()?;
    let devices = machine.devices.pause_virtio();
    let serial = machine.devices.legacy.serial_state().into();
    let state = VmState {
        format: FORMAT,
        vmm_version: VMM_VERSION.to_string(),
        memory_mib: machine.memory_mib,
        machine: MachineState::save(machine.vm)?,
        vcpus: vcpus
            .iter()
            .map(|vcpu| VcpuState::save(vcpu, machine.msr_list))
            .collect::<Result<_, _>>()?,
        serial,
        devices,
    };
    state.write(&files.state)?;
    memory::dump(machine.memory, &files.memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (SnapshotFiles, UnixStream) {
        let (control, theirs) = UnixStream::pair().unwrap();
        let files = SnapshotFiles {
            control,
            state: tempfile::tempfile().unwrap(),
            memory: tempfile::tempfile().unwrap(),
        };
        (files, theirs)
    }

    #[test]
    fn a_byte_asks_for_the_snapshot_and_a_closed_socket_ends_the_vm() {
        let (asked, mut theirs) = files();
        let (sender, events) = std::sync::mpsc::channel();
        let watcher = asked.watch(EventSender(sender), None).unwrap();
        theirs.write_all(b"s").unwrap();
        watcher.join().unwrap();
        assert!(matches!(events.recv().unwrap(), GuestEvent::SnapshotAsked));

        let (abandoned, theirs) = files();
        let (sender, events) = std::sync::mpsc::channel();
        let watcher = abandoned.watch(EventSender(sender), None).unwrap();
        drop(theirs);
        watcher.join().unwrap();
        assert!(matches!(
            events.recv().unwrap(),
            GuestEvent::SnapshotAbandoned
        ));
    }
}

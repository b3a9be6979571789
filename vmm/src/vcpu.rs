//! The vCPU threads: each runs KVM_RUN in a loop and forwards exits to the
//! devices, until the guest stops it or the VMM kicks it out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::DeviceBus;
use crate::devices::{EventSender, GuestEvent};

/// The signal that interrupts KVM_RUN so a vCPU thread notices it must stop.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; its only job is to make KVM_RUN return
/// EINTR instead of the default action killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from)
}

/// What happened to one vCPU, for the record.
enum Stop {
    Requested,
    Guest(GuestEvent),
}

pub fn spawn(
    index: u8,
    mut vcpu: VcpuFd,
    devices: Arc<DeviceBus>,
    events: EventSender,
    stop: Arc<AtomicBool>,
    filter: Option<BpfProgram>,
) -> std::io::Result<JoinHandle<Option<VcpuFd>>> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            // A vCPU's own filter goes in before it runs guest code.
            if let Err(e) = crate::seccomp::install_on_this_thread(filter.as_ref()) {
                events.send(GuestEvent::VcpuFailure(e.to_string()));
                return None;
            }
            match run_loop(&mut vcpu, &devices, &stop) {
                Stop::Guest(event) => {
                    events.send(event);
                    None
                }
                Stop::Requested => {
                    // An exit handled just before the stop (a port or MMIO
                    // read) is completed by entering KVM_RUN once more,
                    // told to leave at once: the vCPU's state is then whole.
                    vcpu.set_kvm_immediate_exit(1);
                    let _ = vcpu.run();
                    vcpu.set_kvm_immediate_exit(0);
                    Some(vcpu)
                }
            }
        })
}

fn run_loop(vcpu: &mut VcpuFd, devices: &DeviceBus, stop: &AtomicBool) -> Stop {
    loop {
        if stop.load(Ordering::Acquire) {
            return Stop::Requested;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => devices.legacy.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => devices.legacy.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => return Stop::Guest(GuestEvent::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => return Stop::Guest(GuestEvent::PowerOff),
                KVM_SYSTEM_EVENT_RESET => return Stop::Guest(GuestEvent::Reset),
                KVM_SYSTEM_EVENT_CRASH => return Stop::Guest(GuestEvent::Panic),
                other => {
                    return Stop::Guest(GuestEvent::VcpuFailure(format!(
                        "unknown KVM system event {other}"
                    )))
                }
            },
            Ok(VcpuExit::Hlt) => {
                return Stop::Guest(GuestEvent::VcpuFailure(
                    "vCPU halted outside the in-kernel irqchip".into(),
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Stop::Guest(GuestEvent::VcpuFailure(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                return Stop::Guest(GuestEvent::VcpuFailure(format!(
                    "KVM internal error at guest rip {rip:#x}"
                )));
            }
            Ok(other) => {
                return Stop::Guest(GuestEvent::VcpuFailure(format!(
                    "unexpected vCPU exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => return Stop::Guest(GuestEvent::VcpuFailure(format!("KVM_RUN failed: {e}"))),
        }
    }
}

/// Stops every vCPU thread: raise the flag, then signal each thread until it
/// leaves KVM_RUN (a signal that lands just before KVM_RUN is entered would
/// otherwise be missed). Threads that never stop are left behind. Returns
/// the vCPUs of the threads that stopped because they were told to, in
/// order, or None where one did not (it stopped on its own, or never).
pub fn stop_all(
    handles: Vec<JoinHandle<Option<VcpuFd>>>,
    stop: &AtomicBool,
    timeout: Duration,
) -> Vec<Option<VcpuFd>> {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + timeout;
    let mut vcpus = Vec::with_capacity(handles.len());
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            let _ = handle.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        vcpus.push(if handle.is_finished() {
            handle.join().ok().flatten()
        } else {
            None
        });
    }
    vcpus
}

//! Building a microVM from a `VmConfig` and running it to completion.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError, MmioDevice};
use crate::boot::{self, BootError, BootSpec};
use crate::cpu::{self, CpuError, Topology};
use crate::devices::bus::DeviceBus;
use crate::devices::console::{ConsoleTail, ConsoleWriter, CONSOLE_LIMIT_BYTES};
use crate::devices::legacy::LegacyDevices;
use crate::devices::{EventSender, GuestEvent};
use crate::layout::{
    KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, MIB, SERIAL_IRQ, VIRTIO_IRQS, VIRTIO_MMIO_BASE,
};
use crate::memory::{self, MemoryError};
use crate::seccomp::{self, Role};
use crate::snapshot::take::{self, SnapshotFiles};
use crate::snapshot::{SnapshotError, VcpuState, VmState};
use crate::vcpu;
use crate::virtio::block::{Block, DiskConfig, DiskError};
use crate::virtio::mmio::{MmioTransport, TransportError, MMIO_WINDOW_SIZE};
use crate::virtio::net::{Net, NetConfig};
use crate::virtio::rng::Rng;
use crate::virtio::vsock::{Vsock, VsockConfig, VsockError};
use crate::virtio::{Interrupt, VirtioDevice};
use capsa_tap::TapError;

/// Kernel parameters the VMM itself depends on: the console is the 8250,
/// reboots go through the i8042 (which the VMM sees), and a panic reboots at
/// once after pvpanic has told us about it.
pub const REQUIRED_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Text the kernel prints on panic; a reset preceded by it is a panic that
/// happened before the pvpanic driver was up.
const PANIC_BANNER: &str = "Kernel panic - not syncing";
/// After pvpanic fires, how long the guest gets to finish printing.
const PANIC_FLUSH_GRACE: Duration = Duration::from_millis(1000);
const MAX_VCPUS: u8 = 64;
const MIN_MEMORY_MIB: u64 = 32;
/// Above this the guest's memory would not fit the 46-bit physical space we
/// promise the kernel in practice; it also catches unit mistakes (GiB vs MiB).
const MAX_MEMORY_MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub enum ConsoleOutput {
    Stdout,
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Extra kernel parameters, appended after `REQUIRED_CMDLINE`.
    pub cmdline: String,
    pub console: ConsoleOutput,
    /// virtio-blk disks, in the order the guest names them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Attach a virtio-rng fed from the host's getrandom.
    pub rng: bool,
    /// virtio-net interfaces on host taps (eth0, eth1, ... in the guest).
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock bridged to Unix sockets.
    pub vsock: Option<VsockConfig>,
    /// The seccomp filter's action on a system call it does not allow.
    pub seccomp: capsa_vmm_config::Seccomp,
    /// The jail the VMM enters once its backends are open, before the VM
    /// exists (see capsa-jail).
    pub jail: Option<capsa_vmm_config::JailConfig>,
    /// Where a snapshot goes when asked for (see capsa-vmm-config).
    pub snapshot_to: Option<capsa_vmm_config::SnapshotTo>,
    /// A snapshot to restore instead of booting.
    pub restore_from: Option<capsa_vmm_config::RestoreFrom>,
}

/// Descriptors a jailed VMM may hold: KVM's, its vCPUs', eventfds, epoll,
/// its disks, tap and vsock, and one per vsock connection.
const JAIL_OPEN_FILES: u64 = 1024;
/// Threads of a jailed VMM (vCPUs, device workers, connections).
const JAIL_THREADS: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{0}")]
    Jail(#[from] capsa_jail::JailError),
    #[error("{0}")]
    Fds(#[from] capsa_vmm_config::ArgError),
    #[error("cannot open /dev/kvm: {0} (is KVM enabled on this host, and may this user use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("{0} vCPUs requested: Capsa supports 1 to {1} on this host")]
    VcpuCount(u8, u8),
    #[error(
        "{0} MiB of guest memory requested: give between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB"
    )]
    MemorySize(u64),
    #[error("KVM refused to {what}: {source}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot open console output {}: {source}", path.display())]
    ConsoleFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("{0} virtio devices requested: at most {1} fit")]
    TooManyDevices(usize, usize),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("restoring the devices: {0}")]
    DeviceState(#[from] crate::virtio::mmio::StateError),
    #[error("restoring the serial port: {0}")]
    Serial(String),
}

/// How the guest's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
    Panic,
    TripleFault,
    VcpuFailure(String),
    /// Stopped for a snapshot, which was written.
    Snapshotted,
    /// Stopped because the snapshot's control socket closed unasked.
    SnapshotAbandoned,
}

impl GuestExit {
    /// Power-off and reset are the guest's own orderly ways out.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            GuestExit::PowerOff | GuestExit::Reset | GuestExit::Snapshotted
        )
    }

    /// The VMM process's exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::PowerOff | GuestExit::Reset | GuestExit::Snapshotted => 0,
            GuestExit::Panic => 2,
            GuestExit::TripleFault => 3,
            GuestExit::VcpuFailure(_) => 4,
            GuestExit::SnapshotAbandoned => 5,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            GuestExit::PowerOff => "guest powered off".into(),
            GuestExit::Reset => "guest reset".into(),
            GuestExit::Panic => "guest kernel panicked".into(),
            GuestExit::TripleFault => "guest triple-faulted".into(),
            GuestExit::VcpuFailure(why) => format!("vCPU failed: {why}"),
            GuestExit::Snapshotted => "snapshot taken".into(),
            GuestExit::SnapshotAbandoned => {
                "the snapshot's control socket closed before it asked: stopped".into()
            }
        }
    }
}

pub struct VmOutcome {
    pub exit: GuestExit,
    pub console_tail: ConsoleTail,
}

impl VmConfig {
    fn validate(&self, kvm: &Kvm) -> Result<(), VmError> {
        let max = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS)) as u8;
        if self.vcpus == 0 || self.vcpus > max {
            return Err(VmError::VcpuCount(self.vcpus, max));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(VmError::MemorySize(self.memory_mib));
        }
        capsa_vmm_config::inherited_fds(&self.disks, &self.nets, self.vsock.as_ref())?;
        Ok(())
    }

    pub fn full_cmdline(&self) -> String {
        let extra = self.cmdline.trim();
        if extra.is_empty() {
            REQUIRED_CMDLINE.to_string()
        } else {
            format!("{REQUIRED_CMDLINE} {extra}")
        }
    }

    /// Opens every backend, in the order the guest will see the devices.
    fn virtio_devices(&self) -> Result<Vec<Box<dyn VirtioDevice>>, VmError> {
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for disk in &self.disks {
            devices.push(Box::new(Block::open(disk)?));
        }
        for net in &self.nets {
            devices.push(Box::new(Net::new(net)?));
        }
        if let Some(vsock) = &self.vsock {
            devices.push(Box::new(Vsock::new(vsock)?));
        }
        if self.rng {
            devices.push(Box::new(Rng));
        }
        if devices.len() > VIRTIO_IRQS.len() {
            return Err(VmError::TooManyDevices(devices.len(), VIRTIO_IRQS.len()));
        }
        Ok(devices)
    }
}

/// Boots the VM described by `config` and runs it until the guest stops.
/// Every backend and file is opened first; then the VMM enters its jail,
/// if it has one; only then is the VM made (KVM ties a VM to the process
/// that makes it, and the jail is a new process).
pub fn run(config: &VmConfig) -> Result<VmOutcome, VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    config.validate(&kvm)?;
    let setup = |what| move |source| VmError::KvmSetup { what, source };

    let virtio = config.virtio_devices()?;
    let device_types: Vec<u32> = virtio.iter().map(|d| d.device_type()).collect();
    let console = console_sink(config)?;
    let memory_size = config.memory_mib * MIB;
    let cmdline = config.full_cmdline();
    let boot_spec = BootSpec {
        kernel: &config.kernel,
        initrd: config.initrd.as_deref(),
        cmdline: &cmdline,
        memory_size,
    };
    // A restored VM reads no kernel: its memory has it.
    let images = match config.restore_from {
        None => Some(boot::open(&boot_spec)?),
        Some(_) => None,
    };
    let restore_files = config.restore_from.map(restore_files).transpose()?;
    let mut snapshot_files = config.snapshot_to.map(snapshot_files).transpose()?;
    let msr_list = match snapshot_files {
        Some(_) => kvm
            .get_msr_index_list()
            .map_err(setup("list the MSRs to save"))?
            .as_slice()
            .to_vec(),
        None => Vec::new(),
    };
    if let Some(jail) = &config.jail {
        let largest_disk = virtio.iter().map(|d| d.backing_bytes()).max().unwrap_or(0);
        capsa_jail::enter(&capsa_jail::Jail {
            root: jail.root.clone(),
            uid: jail.uid,
            gid: jail.gid,
            limits: capsa_jail::Limits {
                open_files: JAIL_OPEN_FILES,
                threads: JAIL_THREADS,
                // Writes reach the disks' ends, the console its bound and
                // a snapshot's memory file the guest's size.
                file_size: largest_disk.max(CONSOLE_LIMIT_BYTES + MIB).max(memory_size),
            },
        })?;
    }
    // A snapshot's state is read in the jail, with no more privilege than
    // the guest's VMM has.
    let restored = match restore_files {
        Some((state, memory)) => {
            let state = VmState::read(&state)?;
            state.check_fits(config.vcpus, config.memory_mib, &device_types)?;
            Some((state, memory))
        }
        None => None,
    };

    let vm = kvm.create_vm().map_err(setup("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(setup("place the TSS"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(setup("place the identity map"))?;
    vm.create_irq_chip()
        .map_err(setup("create the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(setup("create the in-kernel PIT"))?;

    let (state, memory) = match restored {
        Some((state, file)) => (
            Some(state),
            crate::snapshot::memory::map(file, memory_size)?,
        ),
        None => (None, memory::allocate(memory_size)?),
    };
    memory::register(&vm, &memory)?;

    let (events_tx, events_rx) = channel();
    let events = EventSender(events_tx);
    let tail = ConsoleTail::default();
    let serial = state.as_ref().map(|s| (&s.serial).into());
    let legacy = create_legacy_devices(&vm, console, &tail, events.clone(), serial.as_ref())?;
    let mut bus = DeviceBus::new(legacy);
    let virtio_layout = attach_virtio(&vm, &memory, &mut bus, virtio)?;
    let devices = Arc::new(bus);
    let vcpus = match (&state, images) {
        (Some(state), _) => restore_vcpus(&vm, state)?,
        (None, Some(images)) => {
            let entry = boot::load(&memory, &boot_spec, images)?;
            acpi::write_tables(&memory, config.vcpus, &virtio_layout)?;
            cpu::write_gdt(&memory)?;
            boot_vcpus(&kvm, &vm, config.vcpus, entry)?
        }
        (None, None) => {
            return Err(VmError::Snapshot(SnapshotError::Refused(
                "neither a kernel nor a snapshot to start from".into(),
            )))
        }
    };

    vcpu::install_kick_handler().map_err(VmError::Thread)?;
    // Everything is open and mapped: from here on the VMM only runs. Then
    // each thread adds its role's filter, the devices' before any vCPU
    // runs, each vCPU's before its first KVM_RUN, the main thread's once
    // it has started them.
    crate::seccomp::install(config.seccomp)?;
    devices.for_each_device_thread(|device_type, thread| {
        let program = seccomp::role_program(Role::Device(device_type), config.seccomp)?;
        thread
            .call(move || seccomp::install_on_this_thread(program.as_ref()))
            .map_err(VmError::Thread)??;
        Ok::<(), VmError>(())
    })?;
    if let Some(state) = &state {
        // Live devices start serving on their threads, filtered already.
        devices.restore_virtio(&state.devices)?;
    }
    if let Some(files) = &snapshot_files {
        let filter = seccomp::role_program(Role::Control, config.seccomp)?;
        files
            .watch(events.clone(), filter)
            .map_err(VmError::Thread)?;
    }
    let vcpu_filter = seccomp::role_program(Role::Vcpu, config.seccomp)?;
    let main_filter = seccomp::role_program(
        Role::Main {
            snapshots: snapshot_files.is_some(),
        },
        config.seccomp,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let handle = vcpu::spawn(
            index as u8,
            vcpu,
            devices.clone(),
            events.clone(),
            stop.clone(),
            vcpu_filter.clone(),
        );
        match handle {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                vcpu::stop_all(handles, &stop, Duration::from_secs(1));
                return Err(VmError::Thread(e));
            }
        }
    }
    if let Err(e) = seccomp::install_on_this_thread(main_filter.as_ref()) {
        vcpu::stop_all(handles, &stop, Duration::from_secs(1));
        return Err(e.into());
    }

    let exit = wait_for_exit(&events_rx, &tail);
    let stopped = vcpu::stop_all(handles, &stop, Duration::from_secs(2));
    let mut result = Ok(());
    if exit == GuestExit::Snapshotted {
        if let Some(files) = snapshot_files.as_mut() {
            let machine = take::Machine {
                vm: &vm,
                memory: &memory,
                devices: &devices,
                memory_mib: config.memory_mib,
                msr_list: &msr_list,
            };
            result = take::take(&machine, &stopped, files);
            files.answer(&result);
        }
    }
    devices.shut_down();
    // The guest's memory and VM fd must outlive the vCPU threads.
    drop(stopped);
    drop(vm);
    drop(memory);
    result?;
    Ok(VmOutcome {
        exit,
        console_tail: tail,
    })
}

/// The vCPUs of a fresh VM, each set up to enter the kernel at `entry`.
fn boot_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u8,
    entry: boot::BootEntry,
) -> Result<Vec<kvm_ioctls::VcpuFd>, VmError> {
    let supported_cpuid = cpu::supported_cpuid(kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VmError::KvmSetup {
                what: "create a vCPU",
                source,
            })?;
        let topology = Topology { cpu: index, count };
        cpu::configure(&vcpu, &supported_cpuid, topology, entry)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// The VM-wide state and the vCPUs of a snapshot, written into `vm`.
fn restore_vcpus(vm: &VmFd, state: &VmState) -> Result<Vec<kvm_ioctls::VcpuFd>, VmError> {
    state.machine.restore(vm)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in state.vcpus.iter().enumerate() {
        let vcpu = vm
            .create_vcpu(index as u64)
            .map_err(|source| VmError::KvmSetup {
                what: "create a vCPU",
                source,
            })?;
        VcpuState::restore(saved, &vcpu)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Takes over the descriptors of `--restore-from`.
fn restore_files(from: capsa_vmm_config::RestoreFrom) -> Result<(File, File), VmError> {
    let adopt = |fd, what| {
        crate::fds::adopt(fd)
            .map_err(|source| VmError::Snapshot(SnapshotError::Io { what, source }))
    };
    Ok((
        File::from(adopt(from.state, "take the snapshot's state descriptor")?),
        File::from(adopt(from.memory, "take the snapshot's memory descriptor")?),
    ))
}

/// Takes over the descriptors of `--snapshot-to`.
fn snapshot_files(to: capsa_vmm_config::SnapshotTo) -> Result<SnapshotFiles, VmError> {
    let adopt = |fd, what| {
        crate::fds::adopt(fd)
            .map_err(|source| VmError::Snapshot(SnapshotError::Io { what, source }))
    };
    Ok(SnapshotFiles {
        control: std::os::unix::net::UnixStream::from(adopt(
            to.control,
            "take the snapshot control descriptor",
        )?),
        state: File::from(adopt(to.state, "take the snapshot's state descriptor")?),
        memory: File::from(adopt(to.memory, "take the snapshot's memory descriptor")?),
    })
}

/// Where the guest's console goes, opened before the jail.
fn console_sink(config: &VmConfig) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match &config.console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| VmError::ConsoleFile {
                path: path.clone(),
                source,
            })?)
        }
    })
}

fn create_legacy_devices(
    vm: &VmFd,
    sink: Box<dyn Write + Send>,
    tail: &ConsoleTail,
    events: EventSender,
    serial: Option<&vm_superio::serial::SerialState>,
) -> Result<LegacyDevices, VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::KvmSetup {
        what: "create the serial interrupt eventfd",
        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|source| VmError::KvmSetup {
            what: "register the serial irqfd",
            source,
        })?;
    let console = ConsoleWriter::new(sink, tail.clone());
    match serial {
        Some(state) => {
            LegacyDevices::restored(serial_irq, console, events, state).map_err(VmError::Serial)
        }
        None => Ok(LegacyDevices::new(serial_irq, console, events)),
    }
}

/// Puts each virtio device in its MMIO window with its own interrupt line,
/// wires its queue notifications to ioeventfds and its interrupt to an
/// irqfd, and returns where each device is, for the DSDT that announces
/// them to the guest.
fn attach_virtio(
    vm: &VmFd,
    memory: &crate::virtio::Memory,
    bus: &mut DeviceBus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<Vec<MmioDevice>, VmError> {
    let setup = |what| move |source| VmError::KvmSetup { what, source };
    let mut layout = Vec::with_capacity(devices.len());
    for (index, (device, &irq)) in devices.into_iter().zip(VIRTIO_IRQS).enumerate() {
        let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW_SIZE;
        let irq_event = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::KvmSetup {
            what: "create a virtio interrupt eventfd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        vm.register_irqfd(&irq_event, irq)
            .map_err(setup("register a virtio irqfd"))?;
        let transport = MmioTransport::new(device, memory.clone(), Interrupt::new(irq_event))?;
        let notify = base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(event, &IoEventAddress::Mmio(notify), queue as u32)
                .map_err(setup("register a virtio queue ioeventfd"))?;
        }
        layout.push(MmioDevice {
            base,
            size: MMIO_WINDOW_SIZE,
            gsi: irq,
        });
        bus.add_virtio(base, transport);
    }
    Ok(layout)
}

/// Waits for the event that ends the run and classifies it.
fn wait_for_exit(events: &Receiver<GuestEvent>, tail: &ConsoleTail) -> GuestExit {
    // Every device and vCPU holds a sender, so this only fails if all of
    // them are gone, which means every vCPU thread has ended.
    let Ok(first) = events.recv() else {
        return GuestExit::VcpuFailure("all vCPU threads ended".into());
    };
    match first {
        GuestEvent::Panic => {
            // pvpanic fires from the panic notifier; with panic=-1 the guest
            // then flushes its console and resets. Wait for that, briefly.
            match events.recv_timeout(PANIC_FLUSH_GRACE) {
                Ok(_) | Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            GuestExit::Panic
        }
        GuestEvent::Reset if tail.text().contains(PANIC_BANNER) => GuestExit::Panic,
        GuestEvent::Reset => GuestExit::Reset,
        GuestEvent::PowerOff => GuestExit::PowerOff,
        GuestEvent::TripleFault => GuestExit::TripleFault,
        GuestEvent::VcpuFailure(why) => GuestExit::VcpuFailure(why),
        GuestEvent::SnapshotAsked => GuestExit::Snapshotted,
        GuestEvent::SnapshotAbandoned => GuestExit::SnapshotAbandoned,
    }
}

//! Where things live in guest physical memory and I/O port space.
//!
//! The low megabyte mirrors a PC closely enough for Linux: RAM up to the
//! EBDA, a reserved hole up to 1 MiB where the ACPI tables sit, and RAM above
//! it. Between 3 GiB and 4 GiB there is no RAM: the IOAPIC, LAPIC and MMIO
//! devices live there.

/// Flat 32-bit GDT the vCPUs start with (PVH entry is 32-bit protected mode).
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;

/// `hvm_start_info` handed to the kernel in %ebx, followed by its tables.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Room for this many e820 entries after `PVH_MEMMAP_START`.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 16;

/// Kernel command line; x86 Linux reads at most 2048 bytes of it.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area: RAM below, reserved above.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the reserved hole below 1 MiB.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x20000;
/// First byte above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
// The ACPI tables must sit in the reserved hole the e820 map declares.
const _: () = assert!(ACPI_START > EBDA_START && ACPI_START + ACPI_SIZE <= HIMEM_START);

/// The MMIO gap: no RAM from here to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// KVM needs three pages for the TSS and one for the identity map, inside
/// the MMIO gap so they never shadow guest RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy I/O ports.
pub const I8042_PORT_BASE: u16 = 0x60;
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_COUNT: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// pvpanic as QEMU places it; the guest finds it through ACPI (QEMU0001).
pub const PVPANIC_PORT: u16 = 0x505;
/// ACPI hardware-reduced sleep control and status registers (FADT).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;

pub const MIB: u64 = 1 << 20;

/// e820 entry types (ACPI spec, "Address Range Types").
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// virtio-mmio register windows, one page each, at the bottom of the MMIO
/// gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// IOAPIC pins (GSIs) for virtio devices, declared edge-triggered in the
/// DSDT since an irqfd delivers edges. 4 is the serial port's; the IOAPIC
/// has 24 pins.
pub const VIRTIO_IRQS: &[u32] = &[
    5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];

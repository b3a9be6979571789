//! ACPI tables describing the machine to the guest: the CPUs (MADT), a
//! hardware-reduced FADT whose sleep control register lets the guest power
//! off, and a DSDT with the S5 sleep state and the pvpanic device.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_SIZE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, IOAPIC_ADDR,
    LAPIC_ADDR, PVPANIC_PORT, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_COUNT,
};

const OEM_ID: [u8; 6] = *b"CAPSA ";
const OEM_REVISION: u32 = 1;
/// Sleep type the DSDT's \_S5 announces; the power-off device matches it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// IA-PC boot architecture flags: no VGA, no CMOS RTC (saves probing).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes, more than the {ACPI_SIZE} reserved for them")]
    TooLarge { needed: u64 },
    #[error("writing ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Where a virtio-mmio device sits, for its DSDT entry.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The ACPI ID Linux's virtio-mmio driver matches.
const VIRTIO_MMIO_HID: &str = "LNRO0005";

fn dsdt(virtio: &[MmioDevice]) -> Vec<u8> {
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    let s5_name = aml::Name::new("_S5_".into(), &s5);
    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvpanic_res = aml::Name::new("_CRS".into(), &pvpanic_crs);
    let pvpanic = aml::Device::new("PEVT".into(), vec![&pvpanic_hid, &pvpanic_res]);
    // Hardware-reduced ACPI means no legacy PIC: the kernel maps the UART's
    // IRQ only if the device, with its interrupt, is described here.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_io = aml::IO::new(
        SERIAL_PORT_BASE,
        SERIAL_PORT_BASE,
        1,
        SERIAL_PORT_COUNT as u8,
    );
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_res = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_res]);
    // The same goes for virtio-mmio devices: announced on the command line
    // their IRQ numbers would never be mapped to IOAPIC pins.
    let virtio_devices: Vec<VirtioAml> = virtio
        .iter()
        .enumerate()
        .map(|(index, device)| VirtioAml::new(index, device))
        .collect();
    let virtio_aml: Vec<aml::Device> = virtio_devices.iter().map(VirtioAml::device).collect();
    let mut bus_children: Vec<&dyn Aml> = vec![&com1, &pvpanic];
    bus_children.extend(virtio_aml.iter().map(|d| d as &dyn Aml));
    let system_bus = aml::Scope::new("\\_SB_".into(), bus_children);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"CAPSADSD", OEM_REVISION);
    let mut body = Vec::new();
    s5_name.to_aml_bytes(&mut body);
    system_bus.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The pieces of one virtio device's AML, owned so the borrowed tree can
/// be built from them.
struct VirtioAml {
    name: String,
    hid: aml::Name,
    uid: aml::Name,
    crs: aml::Name,
}

impl VirtioAml {
    fn new(index: usize, device: &MmioDevice) -> Self {
        let memory = aml::Memory32Fixed::new(true, device.base as u32, device.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, device.gsi);
        let crs = aml::ResourceTemplate::new(vec![&memory, &irq]);
        Self {
            name: format!("V{index:03}"),
            hid: aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID),
            uid: aml::Name::new("_UID".into(), &(index as u32)),
            crs: aml::Name::new("_CRS".into(), &crs),
        }
    }

    fn device(&self) -> aml::Device<'_> {
        aml::Device::new(
            self.name.as_str().into(),
            vec![&self.hid, &self.uid, &self.crs],
        )
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CAPSAFAC", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::Headless)
        .dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_CONTROL_PORT.into(),
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_STATUS_PORT.into(),
    );
    to_bytes(&fadt.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"CAPSAAPC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    to_bytes(&madt)
}

/// Lays the tables out from `ACPI_START` (RSDP first, as `hvm_start_info`
/// points there) and writes them into guest memory.
pub fn write_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[MmioDevice],
) -> Result<(), AcpiError> {
    let align = |addr: u64| (addr + 15) & !15;
    let xsdt_addr = align(ACPI_START + Rsdp::len() as u64);
    // The XSDT holds two pointers (FADT, MADT): header plus 16 bytes.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let dsdt_addr = align(fadt_addr + FADT::len() as u64);
    let dsdt = dsdt(virtio);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = madt(vcpus);
    let end = madt_addr + madt.len() as u64;
    if end - ACPI_START > ACPI_SIZE {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
        });
    }

    let mut xsdt = XSDT::new(OEM_ID, *b"CAPSAXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), 36 + 16);

    memory.write_slice(
        &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(ACPI_START),
    )?;
    memory.write_slice(&xsdt, GuestAddress(xsdt_addr))?;
    memory.write_slice(&fadt(dsdt_addr), GuestAddress(fadt_addr))?;
    memory.write_slice(&dsdt, GuestAddress(dsdt_addr))?;
    memory.write_slice(&madt, GuestAddress(madt_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_links() {
        let memory = crate::memory::allocate(16 * MIB).unwrap();
        let virtio = [
            MmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        write_tables(&memory, 3, &virtio).unwrap();
        let mut rsdp = [0u8; 36];
        memory
            .read_slice(&mut rsdp, GuestAddress(ACPI_START))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());

        let read_table = |addr: u64| {
            let mut header = [0u8; 8];
            memory.read_slice(&mut header, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
            let mut table = vec![0u8; len];
            memory.read_slice(&mut table, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&table), "bad checksum in {:?}", &header[..4]);
            table
        };
        let xsdt = read_table(xsdt_addr);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"QEMU0001"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        for name in [b"V000", b"V001"] {
            assert!(dsdt.windows(4).any(|w| w == name), "virtio device in DSDT");
        }
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        let madt = read_table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        let mut kinds = Vec::new();
        let mut offset = 44;
        while offset < madt.len() {
            kinds.push(madt[offset]);
            offset += madt[offset + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 0, 1], "three local APICs and an IOAPIC");
    }
}

//! Port I/O devices: the 8250 console, the i8042 (reset only), pvpanic and
//! the ACPI sleep registers. Accesses arrive on vCPU threads as KVM exits;
//! each device is tiny and behind its own lock.

use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleWriter;
use super::{EventSender, GuestEvent};
use crate::acpi::S5_SLEEP_TYPE;
use crate::layout::{
    ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, I8042_PORT_BASE, PVPANIC_PORT,
    SERIAL_PORT_BASE, SERIAL_PORT_COUNT,
};

/// Raises the serial IRQ through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// ACPI hardware-reduced sleep control register fields.
const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
/// What a read from a port nobody decodes returns on a PC: a floating bus.
const UNCLAIMED_READ: u8 = 0xff;

pub struct LegacyDevices {
    serial: Mutex<Serial<IrqTrigger, NoEvents, ConsoleWriter>>,
    i8042: Mutex<I8042Device<EventSender>>,
    events: EventSender,
}

impl LegacyDevices {
    pub fn new(serial_irq: EventFd, console: ConsoleWriter, events: EventSender) -> Self {
        Self {
            serial: Mutex::new(Serial::new(IrqTrigger(serial_irq), console)),
            i8042: Mutex::new(I8042Device::new(events.clone())),
            events,
        }
    }

    /// The devices of a VM restored from a snapshot: the serial port with
    /// its saved registers (raising the interrupt the guest was owed).
    pub fn restored(
        serial_irq: EventFd,
        console: ConsoleWriter,
        events: EventSender,
        serial: &vm_superio::serial::SerialState,
    ) -> Result<Self, String> {
        let serial = Serial::from_state(serial, IrqTrigger(serial_irq), NoEvents, console)
            .map_err(|e| match e {
                vm_superio::serial::Error::FullFifo => {
                    "the serial port's saved receive buffer is over its size".to_string()
                }
                _ => "cannot raise the serial port's interrupt".to_string(),
            })?;
        Ok(Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device::new(events.clone())),
            events,
        })
    }

    /// The serial port's registers, for a snapshot.
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
    }

    /// Handles an `in` from the guest. Unknown ports read as 0xff.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(UNCLAIMED_READ);
        let Some(first) = data.first_mut() else {
            return;
        };
        if let Some(offset) = serial_offset(port) {
            *first = lock(&self.serial).read(offset);
        } else if let Some(offset) = i8042_offset(port) {
            *first = lock(&self.i8042).read(offset);
        } else if port == PVPANIC_PORT {
            // The driver reads the events we support before enabling them.
            *first = PVPANIC_PANICKED;
        } else if port == ACPI_SLEEP_CONTROL_PORT || port == ACPI_SLEEP_STATUS_PORT {
            *first = 0;
        }
    }

    /// Handles an `out` from the guest. Writes to unknown ports are ignored.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if let Some(offset) = serial_offset(port) {
            // Output errors are absorbed by ConsoleWriter; an interrupt that
            // cannot be raised only delays the guest's driver.
            let _ = lock(&self.serial).write(offset, value);
        } else if let Some(offset) = i8042_offset(port) {
            let _ = lock(&self.i8042).write(offset, value);
        } else if port == PVPANIC_PORT {
            if value & (PVPANIC_PANICKED | PVPANIC_CRASH_LOADED) != 0 {
                self.events.send(GuestEvent::Panic);
            }
        } else if port == ACPI_SLEEP_CONTROL_PORT
            && value & SLEEP_ENABLE != 0
            && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE
        {
            self.events.send(GuestEvent::PowerOff);
        }
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    let offset = port.checked_sub(SERIAL_PORT_BASE)?;
    (offset < SERIAL_PORT_COUNT).then_some(offset as u8)
}

fn i8042_offset(port: u16) -> Option<u8> {
    // Data port 0x60 and command/status port 0x64.
    match port.checked_sub(I8042_PORT_BASE)? {
        offset @ (0 | 4) => Some(offset as u8),
        _ => None,
    }
}

/// A device lock poisoned by a panicking vCPU thread still guards valid
/// state (every update is a single register write), so keep using it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console::ConsoleTail;
    use std::sync::mpsc::{channel, Receiver};

    fn devices() -> (LegacyDevices, Receiver<GuestEvent>, ConsoleTail) {
        let (tx, rx) = channel();
        let tail = ConsoleTail::default();
        let console = ConsoleWriter::new(Box::new(std::io::sink()), tail.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (LegacyDevices::new(irq, console, EventSender(tx)), rx, tail)
    }

    #[test]
    fn serial_output_reaches_the_console() {
        let (dev, _rx, tail) = devices();
        for b in b"hi\n" {
            dev.pio_write(SERIAL_PORT_BASE, &[*b]);
        }
        assert_eq!(tail.text(), "hi\n");
    }

    #[test]
    fn i8042_reset_command_is_a_reset_event() {
        let (dev, rx, _) = devices();
        dev.pio_write(I8042_PORT_BASE + 4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), GuestEvent::Reset);
        dev.pio_write(I8042_PORT_BASE + 4, &[0xaa]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn only_sleep_enable_with_s5_powers_off() {
        let (dev, rx, _) = devices();
        dev.pio_write(
            ACPI_SLEEP_CONTROL_PORT,
            &[3 << SLEEP_TYPE_SHIFT | SLEEP_ENABLE],
        );
        dev.pio_write(
            ACPI_SLEEP_CONTROL_PORT,
            &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT],
        );
        assert!(rx.try_recv().is_err());
        dev.pio_write(
            ACPI_SLEEP_CONTROL_PORT,
            &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT | SLEEP_ENABLE],
        );
        assert_eq!(rx.try_recv().unwrap(), GuestEvent::PowerOff);
    }

    #[test]
    fn pvpanic_advertises_and_reports_panics() {
        let (dev, rx, _) = devices();
        let mut data = [0u8; 1];
        dev.pio_read(PVPANIC_PORT, &mut data);
        assert_eq!(data[0], PVPANIC_PANICKED);
        dev.pio_write(PVPANIC_PORT, &[PVPANIC_PANICKED]);
        assert_eq!(rx.try_recv().unwrap(), GuestEvent::Panic);
    }

    #[test]
    fn garbage_accesses_are_harmless() {
        let (dev, rx, _) = devices();
        let mut wide = [0u8; 4];
        for port in [0u16, 0x80, 0x3ff, 0xffff, PVPANIC_PORT + 1] {
            dev.pio_read(port, &mut wide);
            dev.pio_read(port, &mut []);
            dev.pio_write(port, &[]);
            dev.pio_write(port, &[0x12, 0x34]);
        }
        dev.pio_read(0x80, &mut wide);
        assert_eq!(wide, [UNCLAIMED_READ; 4]);
        assert!(rx.try_recv().is_err());
    }
}

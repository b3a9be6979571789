//! Routes the vCPUs' port and MMIO exits to the devices behind them.

use std::sync::Mutex;

use super::legacy::LegacyDevices;
use crate::virtio::mmio::{MmioTransport, StateError, TransportState, MMIO_WINDOW_SIZE};

pub struct DeviceBus {
    pub legacy: LegacyDevices,
    virtio: Vec<VirtioSlot>,
}

struct VirtioSlot {
    base: u64,
    transport: Mutex<MmioTransport>,
}

impl DeviceBus {
    pub fn new(legacy: LegacyDevices) -> Self {
        Self {
            legacy,
            virtio: Vec::new(),
        }
    }

    pub fn add_virtio(&mut self, base: u64, transport: MmioTransport) {
        self.virtio.push(VirtioSlot {
            base,
            transport: Mutex::new(transport),
        });
    }

    fn find(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        self.virtio.iter().find_map(|slot| {
            let offset = addr.checked_sub(slot.base)?;
            (offset < MMIO_WINDOW_SIZE).then_some((slot, offset))
        })
    }

    /// Reads from MMIO space; nothing there reads as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((slot, offset)) => lock(&slot.transport).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes to MMIO space; writes to nothing are dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.find(addr) {
            lock(&slot.transport).write(offset, data);
        }
    }

    /// Runs `arm(device type, its thread)` for each virtio device, in turn
    /// (each device thread's own seccomp filter goes in this way).
    pub fn for_each_device_thread<E>(
        &self,
        mut arm: impl FnMut(u32, &crate::virtio::worker::DeviceThread) -> Result<(), E>,
    ) -> Result<(), E> {
        for slot in &self.virtio {
            let transport = lock(&slot.transport);
            let (device_type, thread) = transport.device_thread();
            arm(device_type, thread)?;
        }
        Ok(())
    }

    /// The virtio devices' types, in the guest's order.
    pub fn virtio_types(&self) -> Vec<u32> {
        self.virtio
            .iter()
            .map(|slot| lock(&slot.transport).device_type())
            .collect()
    }

    /// Stops every device worker and returns each transport's state, for
    /// a snapshot; the devices serve nothing after this.
    pub fn pause_virtio(&self) -> Vec<TransportState> {
        self.virtio
            .iter()
            .map(|slot| lock(&slot.transport).pause())
            .collect()
    }

    /// Takes a snapshot's transport states over, one per device in order,
    /// bringing live again the devices the guest had live.
    pub fn restore_virtio(&self, states: &[TransportState]) -> Result<(), StateError> {
        for (index, (slot, state)) in self.virtio.iter().zip(states).enumerate() {
            lock(&slot.transport).restore(index, state)?;
        }
        Ok(())
    }

    /// Stops every device worker (before the guest memory goes away).
    pub fn shut_down(&self) {
        for slot in &self.virtio {
            lock(&slot.transport).write(
                u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS),
                &0u32.to_le_bytes(),
            );
        }
    }
}

/// A transport whose lock a panicking thread poisoned still holds a
/// consistent register file (each write is applied whole), so keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

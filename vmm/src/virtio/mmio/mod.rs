//! The virtio-mmio transport, version 2 (virtio 1.x "modern" only): the
//! register file a driver uses to negotiate features, set up queues and
//! drive the device status state machine (virtio spec 4.2.2).

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use std::sync::Arc;

mod state;
pub use state::{StateError, TransportState};

use super::worker::{DeviceThread, Worker};
use super::{
    ActivateContext, Interrupt, Memory, VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "QEMU"'s vendor ID is taken; any value works for Linux.
const VENDOR_ID: u32 = 0x4153_5043; // "CPSA"
/// Size of each device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create a queue of {0} entries: {1}")]
    Queue(u16, virtio_queue::Error),
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start the device's thread: {0}")]
    Thread(std::io::Error),
}

/// The name of a device's thread, by its virtio device type.
pub fn thread_name(device_type: u32) -> &'static str {
    match device_type {
        1 => "virtio-net",
        2 => "virtio-blk",
        4 => "virtio-rng",
        19 => "virtio-vsock",
        _ => "virtio",
    }
}

/// One virtio device as the guest sees it at one MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: Memory,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    /// Registered with KVM as ioeventfds on QueueNotify, one per queue.
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    /// Dropped before `thread` (see Drop), whose job it is.
    worker: Option<Worker>,
    thread: Arc<DeviceThread>,
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        // The worker's loop ends before its thread is joined.
        self.worker = None;
    }
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: Memory,
        interrupt: Interrupt,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| TransportError::Queue(max, e))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?);
        }
        let thread = DeviceThread::spawn(thread_name(device.device_type()))
            .map_err(TransportError::Thread)?;
        Ok(Self {
            device,
            memory,
            interrupt,
            queues,
            queue_events,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            worker: None,
            thread: Arc::new(thread),
        })
    }

    /// The device's type and its thread, to give the thread its filter.
    pub fn device_thread(&self) -> (u32, &DeviceThread) {
        (self.device.device_type(), &self.thread)
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The queue notification eventfds, for registration as ioeventfds.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn status_is(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK,
    /// and only while the queue is not live.
    fn queue_config_writable(&self) -> bool {
        self.status_is(VIRTIO_CONFIG_S_FEATURES_OK)
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        data.fill(0);
        // Registers are 32 bits wide and read as a whole (spec 4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => {
                let broken = if self.interrupt.needs_reset() {
                    VIRTIO_CONFIG_S_NEEDS_RESET
                } else {
                    0
                };
                self.status | broken
            }
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
                self.device
                    .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let queue_writable = self.queue_config_writable();
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            // Only between DRIVER and FEATURES_OK (spec 3.1.1).
            VIRTIO_MMIO_DRIVER_FEATURES
                if self.status_is(VIRTIO_CONFIG_S_DRIVER)
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 =>
            {
                let value = u64::from(value);
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32)
                    }
                    // Feature words beyond 64 bits: nothing to accept.
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    if !q.ready() {
                        // Sizes above the maximum or not a power of two are
                        // refused by the queue; `is_valid` catches them at ready.
                        q.set_size(value.min(u32::from(u16::MAX)) as u16);
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY if queue_writable => self.set_queue_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue_writable => {
                self.with_idle_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue_writable => {
                self.with_idle_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue_writable => {
                self.with_idle_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue_writable => {
                self.with_idle_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queue_writable => {
                self.with_idle_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue_writable => {
                self.with_idle_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally KVM signals the ioeventfd itself and this exit
                // never happens; without one, do what KVM would have done.
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            // Read-only or unknown registers, or queue registers written at
            // the wrong time: ignored.
            _ => {}
        }
    }

    fn with_idle_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            if !q.ready() {
                f(q);
            }
        }
    }

    fn set_queue_ready(&mut self, ready: bool) {
        let memory = self.memory.clone();
        let Some(q) = self.selected_queue() else {
            return;
        };
        q.set_ready(ready);
        // is_valid judges a queue marked ready.
        if ready && !q.is_valid(&memory) {
            // Rings outside guest memory: the queue stays down and the
            // device is broken until reset.
            q.set_ready(false);
            self.interrupt.mark_broken();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        // The driver may not clear bits other than by reset, nor set
        // NEEDS_RESET, which is the device's.
        if value & self.status != self.status || added & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            self.worker = None;
            return;
        }
        // Each step needs the one before it (spec 3.1.1).
        let steps = [
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, 0),
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ];
        let mut next = self.status;
        for (bit, needs) in steps {
            if added & bit == 0 {
                continue;
            }
            if next & needs != needs {
                return;
            }
            next |= bit;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads FEATURES_OK back and gives up when unset.
            return;
        }
        let activate = added & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        self.status = next;
        if activate {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features() == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut queue_events = Vec::with_capacity(self.queues.len());
        for (queue, event) in self.queues.iter().zip(&self.queue_events) {
            // The worker gets its own copy; ours keeps answering register
            // reads (QueueReady and so on) until the next reset.
            let copy = Queue::try_from(queue.state()).map_err(|e| e.to_string());
            let event = event.try_clone().map_err(|e| e.to_string());
            match (copy, event) {
                (Ok(mut copy), Ok(event)) => {
                    copy.set_event_idx(event_idx);
                    queues.push(copy);
                    queue_events.push(event);
                }
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("capsa-vmm: cannot activate a virtio device: {e}");
                    self.interrupt.mark_broken();
                    return;
                }
            }
        }
        let context = ActivateContext {
            memory: self.memory.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            thread: self.thread.clone(),
        };
        match self.device.activate(context) {
            Ok(worker) => self.worker = Some(worker),
            Err(e) => {
                eprintln!(
                    "capsa-vmm: cannot activate virtio device type {}: {e}",
                    self.device.device_type()
                );
                self.interrupt.mark_broken();
            }
        }
    }

    fn reset(&mut self) {
        // Stops and joins the worker: no queue is touched after this.
        self.worker = None;
        for queue in &mut self.queues {
            queue.reset();
        }
        for event in &self.queue_events {
            let _ = event.read();
        }
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }

    /// True while a worker serves the device (for tests and diagnostics).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{writable, Guest, DATA_START};

    fn rng_guest() -> Guest {
        Guest::new(Box::new(Rng))
    }

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let mut g = rng_guest();
        assert_eq!(g.read_reg(VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(g.read_reg(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(g.read_reg(VIRTIO_MMIO_DEVICE_ID), 4);
        assert_ne!(g.device_features() & VIRTIO_F_VERSION_1, 0);
        // Narrow or unaligned register reads return nothing.
        let mut narrow = [0xaau8; 2];
        g.transport.read(0, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        let mut unaligned = [0xaau8; 4];
        g.transport.read(1, &mut unaligned);
        assert_eq!(unaligned, [0; 4]);
    }

    #[test]
    fn features_must_include_version_1_and_nothing_unoffered() {
        let mut g = rng_guest();
        assert_eq!(
            g.negotiate(0) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "legacy driver refused"
        );
        g.write_reg(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(
            g.negotiate(VIRTIO_F_VERSION_1 | 1 << 40) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "unoffered feature refused"
        );
        g.write_reg(VIRTIO_MMIO_STATUS, 0);
        assert_ne!(
            g.negotiate(VIRTIO_F_VERSION_1) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
    }

    #[test]
    fn status_steps_cannot_be_skipped_or_cleared() {
        let mut g = rng_guest();
        // DRIVER_OK straight away, or FEATURES_OK without DRIVER: ignored.
        g.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(g.status(), 0);
        g.write_reg(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(g.status(), 0);
        g.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        g.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(
            g.status(),
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            "bits only reset clears"
        );
        g.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_NEEDS_RESET | 1);
        assert_eq!(
            g.status(),
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            "NEEDS_RESET is the device's"
        );
        assert!(!g.transport.is_active());
    }

    #[test]
    fn queues_cannot_be_set_up_before_features_ok_or_changed_while_live() {
        let mut g = rng_guest();
        g.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        g.write_reg(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        g.setup_queue(0, 16);
        assert_eq!(g.read_reg(VIRTIO_MMIO_QUEUE_READY), 0, "before FEATURES_OK");
        g.write_reg(VIRTIO_MMIO_STATUS, 0);
        g.activate(0, 1, 16);
        g.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        g.write_reg(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1234_5000);
        g.write_reg(VIRTIO_MMIO_QUEUE_NUM, 2);
        // Still working with the original rings.
        g.write(DATA_START, &[0; 64]);
        g.add_chain(0, &[writable(DATA_START, 64)]);
        g.notify(0);
        assert!(g.wait_used(0, 1));
    }

    #[test]
    fn rings_outside_memory_or_bad_sizes_never_go_live() {
        let mut g = rng_guest();
        g.negotiate(VIRTIO_F_VERSION_1);
        g.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        g.write_reg(VIRTIO_MMIO_QUEUE_NUM, 16);
        g.write_reg(VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
        g.write_reg(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
        g.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(g.read_reg(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // A size that is not a power of two, or too big, is not taken.
        g.write_reg(VIRTIO_MMIO_STATUS, 0);
        g.negotiate(VIRTIO_F_VERSION_1);
        g.write_reg(VIRTIO_MMIO_QUEUE_NUM, 3);
        g.write_reg(VIRTIO_MMIO_QUEUE_NUM, 4096);
        g.write_reg(VIRTIO_MMIO_QUEUE_SEL, 7);
        g.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(g.read_reg(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 7");
    }

    #[test]
    fn notifications_for_unknown_queues_and_garbage_writes_are_harmless() {
        let mut g = rng_guest();
        g.activate(0, 1, 16);
        for offset in (0..0x200u64).step_by(4) {
            if offset == u64::from(VIRTIO_MMIO_STATUS) {
                continue;
            }
            g.transport.write(offset, &0xffff_ffffu32.to_le_bytes());
            g.transport.write(offset + 1, &[0xff]);
        }
        g.notify(9999);
        assert!(g.transport.is_active());
        g.write(DATA_START, &[0; 64]);
        g.add_chain(0, &[writable(DATA_START, 64)]);
        g.notify(0);
        assert!(g.wait_used(0, 1), "still serving");
    }

    #[test]
    fn a_flood_of_notifications_coalesces_and_the_device_still_serves() {
        let mut g = rng_guest();
        g.activate(0, 1, 16);
        for _ in 0..100_000 {
            g.notify(0);
        }
        g.write(DATA_START, &[0; 64]);
        g.add_chain(0, &[writable(DATA_START, 64)]);
        g.notify(0);
        assert!(g.wait_used(0, 1));
        assert_eq!(g.used_idx(0), 1, "no phantom requests from the kicks");
        assert_eq!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_stops_the_worker_and_clears_everything() {
        let mut g = rng_guest();
        g.activate(0, 1, 16);
        g.write_reg(VIRTIO_MMIO_STATUS, 0);
        assert!(!g.transport.is_active());
        assert_eq!(g.status(), 0);
        g.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(g.read_reg(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(g.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn interrupt_status_is_acknowledged_bit_by_bit() {
        let mut g = rng_guest();
        g.activate(0, 1, 16);
        g.write(DATA_START, &[0; 64]);
        g.add_chain(0, &[writable(DATA_START, 64)]);
        g.notify(0);
        assert!(g.wait_used(0, 1));
        assert_eq!(
            g.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        g.write_reg(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(
            g.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        g.write_reg(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(g.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_ne!(g.read(DATA_START, 64), vec![0; 64], "random bytes arrived");
    }
}

//! A scripted guest driver for unit tests: it owns guest memory, lays out
//! split virtqueues in it and talks to a transport through its registers,
//! exactly as far as a test wants (including wrongly).

use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

pub const MEMORY_SIZE: u64 = 4 << 20;
/// Each queue's rings get 64 KiB starting here; data buffers live above.
const RINGS_START: u64 = 0x1_0000;
const RING_AREA: u64 = 0x1_0000;
pub const DATA_START: u64 = 0x10_0000;

#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn readable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

pub fn writable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

#[derive(Default)]
pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

pub struct Guest {
    pub memory: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub interrupt: Interrupt,
    pub queues: Vec<TestQueue>,
}

impl Guest {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap();
        let interrupt = Interrupt::for_test();
        let transport = MmioTransport::new(device, memory.clone(), interrupt.clone()).unwrap();
        Self {
            memory,
            transport,
            interrupt,
            queues: Vec::new(),
        }
    }

    pub fn read_reg(&mut self, reg: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(u64::from(reg), &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write_reg(&mut self, reg: u32, value: u32) {
        self.transport.write(u64::from(reg), &value.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES);
        self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    pub fn status(&mut self) -> u32 {
        self.read_reg(VIRTIO_MMIO_STATUS)
    }

    /// Negotiates `features` and stops at FEATURES_OK (if the device takes
    /// them); returns the status read back.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.write_reg(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
        self.status()
    }

    /// Lays out queue `index` with `size` entries and marks it ready.
    pub fn setup_queue(&mut self, index: u32, size: u16) {
        self.layout_queue(index as usize, size);
        let q = &self.queues[index as usize];
        let (desc, avail, used) = (q.desc, q.avail, q.used);
        self.write_reg(VIRTIO_MMIO_QUEUE_SEL, index);
        self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        self.write_reg(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        self.write_reg(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        self.write_reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        self.write_reg(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        self.write_reg(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        self.write_reg(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Lays out queue `index` in memory without telling the transport,
    /// for tests that drive a device's queue handler directly.
    pub fn layout_queue(&mut self, index: usize, size: u16) {
        let base = RINGS_START + index as u64 * RING_AREA;
        if self.queues.len() <= index {
            self.queues.resize_with(index + 1, TestQueue::default);
        }
        self.queues[index] = TestQueue {
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + 0x8000,
            next_desc: 0,
            avail_idx: 0,
        };
    }

    /// A live device-side queue over the layout of queue `index`.
    pub fn device_queue(&self, index: usize) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let q = &self.queues[index];
        let mut queue = virtio_queue::Queue::new(q.size).unwrap();
        queue.set_size(q.size);
        queue.set_desc_table_address(Some(q.desc as u32), Some(0));
        queue.set_avail_ring_address(Some(q.avail as u32), Some(0));
        queue.set_used_ring_address(Some(q.used as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    pub fn driver_ok(&mut self) {
        let status = self.status();
        self.write_reg(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// The whole handshake: VERSION_1 plus `features`, `queues` of `size`.
    pub fn activate(&mut self, features: u64, queues: u32, size: u16) {
        let status = self.negotiate(VIRTIO_F_VERSION_1 | features);
        assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "features refused");
        for index in 0..queues {
            self.setup_queue(index, size);
        }
        self.driver_ok();
        assert!(self.transport.is_active());
    }

    /// Writes a raw descriptor into the table without publishing it.
    pub fn write_raw_desc(
        &self,
        queue: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let q = &self.queues[queue];
        let at = GuestAddress(q.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.memory.write_slice(&raw, at).unwrap();
    }

    /// Publishes descriptor `head` in the available ring.
    pub fn publish(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        self.memory.write_obj(head, GuestAddress(slot)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.memory
            .write_obj(q.avail_idx, GuestAddress(q.avail + 2))
            .unwrap();
    }

    /// Sets the available index to anything, as a hostile driver might.
    pub fn set_avail_idx(&mut self, queue: usize, idx: u16) {
        let q = &mut self.queues[queue];
        q.avail_idx = idx;
        self.memory
            .write_obj(idx, GuestAddress(q.avail + 2))
            .unwrap();
    }

    /// Adds a well-formed chain and returns its head.
    pub fn add_chain(&mut self, queue: usize, descs: &[Desc]) -> u16 {
        let size = self.queues[queue].size;
        let head = self.queues[queue].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let mut flags = if d.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = (index + 1) % size;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_raw_desc(queue, index, d.addr, d.len, flags, next);
        }
        self.queues[queue].next_desc = (head + descs.len() as u16) % size;
        self.publish(queue, head);
        head
    }

    pub fn notify(&mut self, queue: u32) {
        self.write_reg(VIRTIO_MMIO_QUEUE_NOTIFY, queue);
    }

    pub fn used_idx(&self, queue: usize) -> u16 {
        self.memory
            .read_obj(GuestAddress(self.queues[queue].used + 2))
            .unwrap()
    }

    /// The used ring entry at position `n`: (head, length).
    pub fn used_entry(&self, queue: usize, n: u16) -> (u32, u32) {
        let q = &self.queues[queue];
        let at = q.used + 4 + 8 * u64::from(n % q.size);
        let id: u32 = self.memory.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.memory.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// Waits for the device's worker to return `count` buffers in total.
    pub fn wait_used(&self, queue: usize, count: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used_idx(queue) >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Waits until the device reports DEVICE_NEEDS_RESET.
    pub fn wait_broken(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.memory.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.memory
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf
    }
}

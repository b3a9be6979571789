//! Virtio 1.x devices on the MMIO transport.
//!
//! The transport (`mmio`) owns the register file the guest's driver talks to
//! from vCPU threads. Once the driver sets DRIVER_OK the device is activated:
//! it gets the guest memory, its queues, one ioeventfd per queue (KVM signals
//! them on a queue notify without leaving the kernel) and an `Interrupt`, and
//! runs on the device's own thread (`worker`). A device that meets a
//! guest error it cannot skip sets `DEVICE_NEEDS_RESET`; nothing the guest
//! writes makes the VMM panic.

pub mod block;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Every Capsa device is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit numbers shared by all device types.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Guest memory as the devices see it.
pub type Memory = GuestMemoryMmap;

/// What a device does when its driver makes it go live.
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio spec, "Device Types").
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Bytes beyond it read
    /// as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }
    /// Writes to the configuration space; most devices ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The size of the host file the device writes into, if any (a
    /// disk's): a jailed VMM may write files up to the largest.
    fn backing_bytes(&self) -> u64 {
        0
    }
    /// The device is about to go live again in a VM restored from a
    /// snapshot, with a new backend: whatever the guest still believes of
    /// the old one (vsock's connections) is to be undone at activation.
    fn restored(&mut self) {}
    /// Starts serving the queues with the features the driver accepted.
    fn activate(&mut self, context: ActivateContext) -> Result<worker::Worker, ActivateError>;
}

/// Everything a device needs to serve its queues.
pub struct ActivateContext {
    pub memory: Memory,
    pub queues: Vec<Queue>,
    /// One per queue, signalled when the driver notifies that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Interrupt,
    pub acked_features: u64,
    /// The device's thread, where its worker loop runs.
    pub thread: Arc<worker::DeviceThread>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot duplicate a file descriptor for the device worker: {0}")]
    Dup(std::io::Error),
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("cannot set up the device backend: {0}")]
    Backend(String),
}

/// Raises the device's interrupt line and records why, for the driver to
/// read in InterruptStatus. Also where a device reports itself broken.
#[derive(Clone)]
pub struct Interrupt {
    inner: Arc<InterruptState>,
}

struct InterruptState {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            inner: Arc::new(InterruptState {
                status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                irq,
            }),
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver
    /// through a configuration change interrupt, as the spec asks.
    pub fn mark_broken(&self) {
        self.inner.needs_reset.store(true, Ordering::Release);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    pub fn needs_reset(&self) -> bool {
        self.inner.needs_reset.load(Ordering::Acquire)
    }

    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Takes the status a snapshot saved, raising the line again if
    /// anything was pending (the guest had not acknowledged it yet).
    pub fn restore(&self, status: u32) {
        let status = status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        if status != 0 {
            self.raise(status);
        }
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Back to the state of a fresh device.
    pub fn reset(&self) {
        self.inner.status.store(0, Ordering::Release);
        self.inner.needs_reset.store(false, Ordering::Release);
    }

    fn raise(&self, bit: u32) {
        self.inner.status.fetch_or(bit, Ordering::AcqRel);
        // A full eventfd counter already means "interrupt pending".
        let _ = self.inner.irq.write(1);
    }

    #[cfg(test)]
    pub fn for_test() -> Self {
        Self::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
    }
}

/// Copies the part of `config` at `offset` into `data`; bytes past its end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Takes the next request the driver made available on `queue`, if any.
/// A driver that claims more new entries than the ring holds is broken.
/// Devices call this until it returns None, which leaves notifications on.
pub fn next_chain<'m>(
    queue: &mut Queue,
    memory: &'m Memory,
) -> Result<Option<virtio_queue::DescriptorChain<&'m Memory>>, worker::DeviceBroken> {
    use virtio_queue::QueueT;
    if !queue.ready() {
        return Ok(None);
    }
    let avail = queue
        .avail_idx(memory, Ordering::Acquire)
        .map_err(|e| worker::DeviceBroken(format!("cannot read the available ring: {e}")))?;
    let pending = avail - std::num::Wrapping(queue.next_avail());
    if pending.0 > queue.size() {
        return Err(worker::DeviceBroken(format!(
            "the driver made {} entries available on a queue of {}",
            pending.0,
            queue.size()
        )));
    }
    if let Some(chain) = queue.pop_descriptor_chain(memory) {
        return Ok(Some(chain));
    }
    // Empty: ask the driver to notify us of its next buffer (with
    // EVENT_IDX this publishes avail_event), then look again, since a
    // buffer added meanwhile would come without a notification.
    let more = queue
        .enable_notification(memory)
        .map_err(|e| worker::DeviceBroken(format!("cannot write the used ring: {e}")))?;
    Ok(if more {
        queue.pop_descriptor_chain(memory)
    } else {
        None
    })
}

/// Returns a finished request to the driver.
pub fn complete(
    queue: &mut Queue,
    memory: &Memory,
    head: u16,
    len: u32,
) -> Result<(), worker::DeviceBroken> {
    use virtio_queue::QueueT;
    queue
        .add_used(memory, head, len)
        .map_err(|e| worker::DeviceBroken(format!("cannot write the used ring: {e}")))
}

/// Serves every request waiting on a queue whose requests are independent
/// (block, rng): `serve` handles one chain and says how many bytes it wrote
/// into it; the driver is interrupted once for the batch.
pub fn serve_queue<'m>(
    queue: &mut Queue,
    memory: &'m Memory,
    interrupt: &Interrupt,
    serve: impl FnMut(virtio_queue::DescriptorChain<&'m Memory>) -> Result<u32, worker::DeviceBroken>,
) -> Result<(), worker::DeviceBroken> {
    serve_queue_limited(queue, memory, interrupt, None, serve)
}

/// The bytes a chain's descriptors span (what a rate limit charges).
pub fn chain_bytes(chain: &virtio_queue::DescriptorChain<&Memory>) -> u64 {
    chain.clone().map(|d| u64::from(d.len())).sum()
}

/// As [`serve_queue`], each chain first admitted by `limiter`: one it does
/// not admit goes back to the queue, and serving stops until the
/// limiter's timer fires.
pub fn serve_queue_limited<'m>(
    queue: &mut Queue,
    memory: &'m Memory,
    interrupt: &Interrupt,
    mut limiter: Option<&mut rate_limiter::RateLimiter>,
    mut serve: impl FnMut(
        virtio_queue::DescriptorChain<&'m Memory>,
    ) -> Result<u32, worker::DeviceBroken>,
) -> Result<(), worker::DeviceBroken> {
    use virtio_queue::QueueOwnedT;
    let mut served = false;
    while let Some(chain) = next_chain(queue, memory)? {
        if let Some(limiter) = limiter.as_deref_mut() {
            if !limiter.admit(chain_bytes(&chain)) {
                queue.go_to_previous_position();
                break;
            }
        }
        let head = chain.head_index();
        let used = serve(chain)?;
        complete(queue, memory, head, used)?;
        served = true;
    }
    if served {
        notify(queue, memory, interrupt)?;
    }
    Ok(())
}

/// Interrupts the driver if it wants to hear about the used buffers.
pub fn notify(
    queue: &mut Queue,
    memory: &Memory,
    interrupt: &Interrupt,
) -> Result<(), worker::DeviceBroken> {
    use virtio_queue::QueueT;
    let needed = queue
        .needs_notification(memory)
        .map_err(|e| worker::DeviceBroken(format!("cannot read the used event index: {e}")))?;
    if needed {
        interrupt.signal_used_queue();
    }
    Ok(())
}

//! virtio-rng (entropy source): fills the driver's buffers from the host's
//! getrandom, so the guest's CRNG is seeded at boot without waiting.

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;

use super::worker::{DeviceBroken, QueueHandler, Registrar, Worker};
use super::{serve_queue, ActivateContext, ActivateError, Interrupt, Memory};

const QUEUE_SIZES: &[u16] = &[256];
/// Caps the work one request can ask for; the driver asks again for more.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng;

impl super::VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn activate(&mut self, mut context: ActivateContext) -> Result<Worker, ActivateError> {
        let queue = context.queues.remove(0);
        let handler = RngQueue {
            memory: context.memory,
            queue,
            interrupt: context.interrupt.clone(),
        };
        Worker::spawn(
            handler,
            context.queue_events,
            context.interrupt,
            &context.thread,
        )
    }
}

pub struct RngQueue {
    pub memory: Memory,
    pub queue: Queue,
    pub interrupt: Interrupt,
}

impl RngQueue {
    /// Serves every request waiting on the queue.
    pub fn process(&mut self) -> Result<(), DeviceBroken> {
        let mut buf = vec![0u8; MAX_BYTES_PER_REQUEST];
        let memory = &self.memory;
        serve_queue(&mut self.queue, memory, &self.interrupt, |chain| {
            // A chain the device cannot write into (bad addresses, read-only
            // buffers) gets nothing; the request still completes.
            let Ok(mut writer) = chain.writer(memory) else {
                return Ok(0);
            };
            let n = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
            fill_random(&mut buf[..n])
                .map_err(|e| DeviceBroken(format!("host getrandom failed: {e}")))?;
            Ok(writer.write_all(&buf[..n]).map_or(0, |()| n as u32))
        })
    }
}

impl QueueHandler for RngQueue {
    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn queue_event(&mut self, _index: usize, _epoll: &Registrar) -> Result<(), DeviceBroken> {
        self.process()
    }
}

/// Fills `buf` from getrandom(2), called directly: the getrandom crate, in
/// a static binary, falls back to opening /dev/urandom, which a jailed VMM
/// has not got.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

//! The thread a live device runs on: an epoll loop over its queues'
//! ioeventfds, its backend's file descriptors and a stop event.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Interrupt};

const STOP_TOKEN: u64 = 0;
const FIRST_QUEUE_TOKEN: u64 = 1;
/// Tokens from here up belong to the device's backend.
pub const FIRST_BACKEND_TOKEN: u64 = 1 << 32;
const MAX_EVENTS: usize = 64;

/// A guest mistake the device cannot step over: the device goes to
/// DEVICE_NEEDS_RESET and stops serving until the driver resets it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceBroken(pub String);

/// A device's queue and backend logic, driven by the worker loop.
pub trait QueueHandler: Send + 'static {
    /// Short name for messages ("virtio-blk").
    fn name(&self) -> &'static str;
    /// Called once on the worker thread, to register backend descriptors.
    fn register(&mut self, _epoll: &Registrar) -> std::io::Result<()> {
        Ok(())
    }
    /// The driver notified queue `index`.
    fn queue_event(&mut self, index: usize, epoll: &Registrar) -> Result<(), DeviceBroken>;
    /// A backend descriptor registered with `token` is ready.
    fn backend_event(
        &mut self,
        _token: u64,
        _events: EventSet,
        _epoll: &Registrar,
    ) -> Result<(), DeviceBroken> {
        Ok(())
    }
    /// The device broke: stop watching every backend descriptor, so that
    /// none keeps the loop busy until the driver resets the device.
    fn quiesce(&mut self, _epoll: &Registrar) {}
}

/// Lets a handler add and remove its own descriptors.
pub struct Registrar {
    epoll: Epoll,
}

impl Registrar {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
        })
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) {
        // Closing the descriptor removes it too; a failure here is harmless.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// A running device worker; dropping it stops the thread.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn<H: QueueHandler>(
        mut handler: H,
        queue_events: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<Self, ActivateError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let stop_for_thread = stop.try_clone().map_err(ActivateError::Worker)?;
        let registrar = Registrar::new().map_err(ActivateError::Worker)?;
        registrar
            .add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)
            .map_err(ActivateError::Worker)?;
        for (index, event) in queue_events.iter().enumerate() {
            registrar
                .add(
                    event.as_raw_fd(),
                    FIRST_QUEUE_TOKEN + index as u64,
                    EventSet::IN,
                )
                .map_err(ActivateError::Worker)?;
        }
        handler
            .register(&registrar)
            .map_err(ActivateError::Worker)?;
        let handle = std::thread::Builder::new()
            .name(handler.name().to_string())
            .spawn(move || {
                run(
                    &mut handler,
                    &registrar,
                    &queue_events,
                    &stop_for_thread,
                    &interrupt,
                )
            })
            .map_err(ActivateError::Worker)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn run<H: QueueHandler>(
    handler: &mut H,
    registrar: &Registrar,
    queue_events: &[EventFd],
    stop: &EventFd,
    interrupt: &Interrupt,
) {
    let mut events = vec![EpollEvent::default(); MAX_EVENTS];
    let mut broken = false;
    loop {
        let ready = match registrar.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("capsa-vmm: {}: epoll failed: {e}", handler.name());
                interrupt.mark_broken();
                return;
            }
        };
        for event in &events[..ready] {
            let token = event.data();
            if token == STOP_TOKEN {
                let _ = stop.read();
                return;
            }
            let result = if token < FIRST_BACKEND_TOKEN {
                let index = (token - FIRST_QUEUE_TOKEN) as usize;
                if let Some(evt) = queue_events.get(index) {
                    // Drain the counter even when broken, or epoll spins.
                    let _ = evt.read();
                }
                if broken {
                    continue;
                }
                handler.queue_event(index, registrar)
            } else {
                if broken {
                    continue;
                }
                handler.backend_event(token, event.event_set(), registrar)
            };
            if let Err(e) = result {
                eprintln!(
                    "capsa-vmm: {}: {e}; the device needs a reset",
                    handler.name()
                );
                broken = true;
                handler.quiesce(registrar);
                interrupt.mark_broken();
            }
        }
    }
}

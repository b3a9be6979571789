//! The thread a live device runs on: an epoll loop over its queues'
//! ioeventfds, its backend's file descriptors and a stop event.
//!
//! Each device has one thread for its whole life (`DeviceThread`), started
//! while the VM is built; an activation runs its worker loop there and a
//! reset ends it. No thread is started once the guest runs, so no thread
//! that meets guest data (a vCPU, a device) may create threads, and each
//! keeps the seccomp filter of its own role (`crate::seccomp`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
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

type Job = Box<dyn FnOnce() + Send>;

/// A device's own thread: it runs the jobs given to it in turn (the
/// device's worker loop, one activation after another; installing its
/// seccomp filter) until it is dropped.
pub struct DeviceThread {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl DeviceThread {
    pub fn spawn(name: &str) -> std::io::Result<Self> {
        let (jobs, queue) = channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            handle: Some(handle),
        })
    }

    /// Runs `job` on the thread once what it runs now has ended.
    fn submit(&self, job: Job) -> std::io::Result<()> {
        let gone = || std::io::Error::other("the device's thread has ended");
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())
    }

    /// Runs `f` on the thread and waits for its result.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (result_tx, result_rx) = channel();
        self.submit(Box::new(move || {
            let _ = result_tx.send(f());
        }))?;
        result_rx
            .recv()
            .map_err(|_| std::io::Error::other("the device's thread ended the call"))
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        // The queue closes: the thread ends after its current job.
        self.jobs = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A running device worker; dropping it stops the loop and waits for it.
pub struct Worker {
    stop: EventFd,
    /// Closed when the loop has ended (its sender goes with the job).
    done: Option<Receiver<()>>,
}

impl Worker {
    /// Runs `handler`'s loop on `thread`.
    pub fn spawn<H: QueueHandler>(
        mut handler: H,
        queue_events: Vec<EventFd>,
        interrupt: Interrupt,
        thread: &DeviceThread,
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
        let (done_tx, done) = channel::<()>();
        thread
            .submit(Box::new(move || {
                run(
                    &mut handler,
                    &registrar,
                    &queue_events,
                    &stop_for_thread,
                    &interrupt,
                );
                drop(done_tx);
            }))
            .map_err(ActivateError::Worker)?;
        Ok(Self {
            stop,
            done: Some(done),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(done) = self.done.take() {
            // Ends with the job, whether it ran or was dropped unrun.
            let _ = done.recv();
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

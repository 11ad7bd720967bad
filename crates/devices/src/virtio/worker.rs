//! The thread a device runs on while active, and the epoll loop it waits in.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{ActivateError, DeviceInterrupt};
use crate::GuestMemory;

/// A running worker: its thread and the EventFd that tells it to stop. The
/// thread returns its state `T` so that the device can be saved or resumed.
pub(crate) struct WorkerThread<T> {
    stop: EventFd,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> WorkerThread<T> {
    /// Runs `body` on a new thread named after `device`; `body` must return
    /// soon after the EventFd it is given becomes readable.
    pub fn spawn(
        device: &'static str,
        body: impl FnOnce(EventFd) -> T + Send + 'static,
    ) -> Result<Self, ActivateError> {
        let thread = || -> io::Result<Self> {
            let stop = EventFd::new(EFD_NONBLOCK)?;
            let worker_stop = stop.try_clone()?;
            let handle = std::thread::Builder::new()
                .name(device.to_owned())
                .spawn(move || body(worker_stop))?;
            Ok(WorkerThread { stop, handle })
        };
        thread().map_err(|source| ActivateError::Thread { device, source })
    }

    /// Stops the thread and returns its state; `None` if it panicked.
    pub fn stop(self) -> Option<T> {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("virtio worker: signalling stop failed: {e}");
        }
        match self.handle.join() {
            Ok(state) => Some(state),
            Err(_) => {
                tracing::error!("virtio worker thread panicked; its queues are lost");
                None
            }
        }
    }
}

/// An epoll set whose events carry a caller-chosen token.
pub(crate) struct EventLoop {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    pub fn new() -> io::Result<Self> {
        Ok(EventLoop {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); 16],
        })
    }

    pub fn add(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        self.add_raw(fd.as_raw_fd(), token, EventSet::IN)
    }

    pub fn add_raw(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Waits up to `timeout_ms` (-1: forever) and returns the ready tokens.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<Vec<u64>> {
        match self.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => Ok(self.events[..n].iter().map(EpollEvent::data).collect()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

/// Drains an EventFd that epoll reported readable (non-blocking: a
/// spurious wake-up reads nothing).
pub(crate) fn drain(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("virtio worker: reading an EventFd failed: {e}");
        }
    }
}

/// A worker that serves one virtqueue. `process_queue` is the part of the
/// spec's notification suppression every such device shares: serve with
/// notifications off, re-enable them and look again before going idle (or
/// a request that raced the re-enable would sit unseen), then interrupt the
/// driver only if it asked to be told.
pub(crate) trait QueueServer {
    /// The device's name in log lines.
    const NAME: &'static str;

    fn queue_and_memory(&mut self) -> (&mut Queue, &GuestMemory);

    fn interrupt(&self) -> &DeviceInterrupt;

    /// Serves available chains; returns whether any went to the used ring.
    /// Stops early when a rate limiter refuses one, and then `throttled`.
    fn serve_available(&mut self) -> bool;

    fn throttled(&self) -> bool;

    fn process_queue(&mut self) {
        let mut used_any = false;
        loop {
            let (queue, mem) = self.queue_and_memory();
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!("{}: disabling notifications: {e}", Self::NAME);
            }
            used_any |= self.serve_available();
            if self.throttled() {
                break;
            }
            let (queue, mem) = self.queue_and_memory();
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("{}: enabling notifications: {e}", Self::NAME);
                    break;
                }
            }
        }
        let (queue, mem) = self.queue_and_memory();
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt().signal_used_queue();
        }
    }
}

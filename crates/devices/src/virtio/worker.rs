//! The thread a device runs on while active, and the epoll loop it waits in.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A running worker: its thread and the EventFd that tells it to stop. The
/// thread returns its state `T` so that the device can be saved or resumed.
pub(crate) struct WorkerThread<T> {
    stop: EventFd,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> WorkerThread<T> {
    /// Runs `body` on a new thread named `name`; `body` must return soon
    /// after the EventFd it is given becomes readable.
    pub fn spawn(name: &str, body: impl FnOnce(EventFd) -> T + Send + 'static) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let worker_stop = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(worker_stop))?;
        Ok(WorkerThread { stop, handle })
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

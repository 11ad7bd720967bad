//! The thread a device runs on while active, and the epoll loop it waits in.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
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
/// a request that raced the re-enable would sit unseen), and interrupt the
/// driver after each pass that used buffers, if it asked to be told.
pub(crate) trait QueueServer {
    /// The device's name in log lines.
    const NAME: &'static str;

    /// How long an emptied ring is polled for the driver's next request
    /// before going idle; zero: never. While the worker polls, the driver
    /// is asked not to notify (each notification is a VM exit).
    const POLL: Duration = Duration::ZERO;

    fn queue_and_memory(&mut self) -> (&mut Queue, &GuestMemory);

    fn interrupt(&self) -> &DeviceInterrupt;

    /// Serves available chains; returns whether any went to the used ring.
    /// Stops early when a rate limiter refuses one, and then `throttled`.
    fn serve_available(&mut self) -> bool;

    fn throttled(&self) -> bool;

    /// Serves until the ring stays empty. A server that polls holds
    /// notifications back on the way, so its caller must look once more
    /// after [`KICK_RACE_GRACE_MS`] of idleness ([`QueueServer::recheck`]).
    fn process_queue(&mut self) {
        let polling = !Self::POLL.is_zero();
        loop {
            if polling {
                self.hold_notifications();
            } else {
                let (queue, mem) = self.queue_and_memory();
                if let Err(e) = queue.disable_notification(mem) {
                    tracing::warn!("{}: disabling notifications: {e}", Self::NAME);
                }
            }
            if self.serve_available() {
                self.notify_driver();
            }
            if self.throttled() {
                break;
            }
            if polling && self.poll_avail() {
                continue;
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
    }

    /// Asks the driver not to notify for any request it can publish before
    /// the worker takes another: with EVENT_IDX, avail_event a whole ring
    /// ahead of what the worker has taken (the driver notifies only once
    /// its index passes avail_event; it cannot publish more than a ring
    /// beyond what was used, and used never passes taken); without, the
    /// NO_NOTIFY flag.
    fn hold_notifications(&mut self) {
        let (queue, mem) = self.queue_and_memory();
        if let Err(e) = hold_notifications(queue, mem) {
            tracing::warn!("{}: holding notifications back: {e}", Self::NAME);
        }
    }

    /// Interrupts the driver if it asked to be told of these used buffers.
    fn notify_driver(&mut self) {
        let (queue, mem) = self.queue_and_memory();
        if queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt().signal_used_queue();
        }
    }

    /// Spins up to [`QueueServer::POLL`] for the avail index to move.
    fn poll_avail(&mut self) -> bool {
        let deadline = Instant::now() + Self::POLL;
        let (queue, mem) = self.queue_and_memory();
        loop {
            match queue.avail_idx(mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != queue.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The late look after [`KICK_RACE_GRACE_MS`] idle: re-enables
    /// notifications (never holding them back, so this look cannot race
    /// itself) and says whether requests are waiting.
    ///
    /// Why: a driver that publishes its avail index and then reads
    /// avail_event without a full barrier between (virtio-drivers does
    /// this) can read the held-back value while the worker re-enables
    /// notifications and reads the old index: neither notices the other.
    /// Its store reaches memory within nanoseconds, so one look later
    /// finds it.
    fn recheck(&mut self) -> bool {
        let (queue, mem) = self.queue_and_memory();
        queue.enable_notification(mem).unwrap_or(true)
    }
}

/// How long an idle worker that held notifications back waits before its
/// one late look at the ring.
pub(crate) const KICK_RACE_GRACE_MS: i32 = 1;

/// See [`QueueServer::hold_notifications`].
fn hold_notifications(queue: &mut Queue, mem: &GuestMemory) -> Result<(), HoldError> {
    if !queue.event_idx_enabled() {
        return Ok(queue.disable_notification(mem)?);
    }
    let ahead = queue.next_avail().wrapping_add(queue.size());
    // avail_event follows the used ring's header and elements (virtio 1.x 2.7.8).
    let addr = GuestAddress(queue.used_ring())
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(HoldError::Address)?;
    Ok(mem.store(ahead.to_le(), addr, Ordering::Relaxed)?)
}

/// Why notifications could not be held back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HoldError {
    #[error("{0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("avail_event lies outside guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("the used ring's address overflows")]
    Address,
}

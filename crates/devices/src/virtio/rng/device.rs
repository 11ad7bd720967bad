//! The virtio-rng device and its worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::EventFd;

use super::RngError;
use crate::rate_limiter::{epoll_timeout, LimiterConfig, RateLimiter};
use crate::virtio::worker::{drain, EventLoop, QueueServer, WorkerThread};
use crate::virtio::{
    ActivateContext, ActivateError, DeviceInterrupt, VirtioDevice, COMMON_FEATURES,
};
use crate::GuestMemory;

const QUEUE_SIZE: u16 = 256;
/// Most entropy handed out per request; larger buffers get this much.
const MAX_REQUEST: usize = 64 * 1024;

/// Counters a test or the control socket can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngStats {
    pub requests: u64,
    pub bytes: u64,
    /// Chains that were malformed (readable buffers, outside memory, loops).
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// A virtio-rng device.
pub struct Rng {
    limiter: Arc<Mutex<RateLimiter>>,
    counters: Arc<Counters>,
    worker: Option<WorkerThread<RngWorker>>,
}

fn lock(limiter: &Mutex<RateLimiter>) -> MutexGuard<'_, RateLimiter> {
    limiter
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Rng {
    /// A device handing out at most what `limit` allows (bytes/s, requests/s).
    pub fn new(limit: LimiterConfig) -> Result<Self, RngError> {
        Ok(Rng {
            limiter: Arc::new(Mutex::new(RateLimiter::new(limit)?)),
            counters: Arc::default(),
            worker: None,
        })
    }

    pub fn limit(&self) -> LimiterConfig {
        lock(&self.limiter).config()
    }

    pub fn stats(&self) -> RngStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RngStats {
            requests: get(&self.counters.requests),
            bytes: get(&self.counters.bytes),
            errors: get(&self.counters.errors),
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::warn!("virtio-rng: write to config space at {offset:#x}; it has none");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        const DEVICE: &str = "virtio-rng";
        let got = ctx.queues.len();
        let (Some(queue), Some(queue_evt)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_events.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueCount {
                device: DEVICE,
                expected: 1,
                got,
            });
        };
        let worker = RngWorker {
            mem: ctx.mem,
            queue,
            queue_evt,
            interrupt: ctx.interrupt,
            limiter: self.limiter.clone(),
            counters: self.counters.clone(),
            buffer: vec![0; MAX_REQUEST],
            throttled: false,
        };
        let thread = WorkerThread::spawn(DEVICE, move |stop| worker.run(stop))?;
        self.worker = Some(thread);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let worker = self.worker.take()?.stop()?;
        lock(&self.limiter).clear_retry();
        Some(vec![worker.queue])
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_QUEUE: u64 = 1;

struct RngWorker {
    mem: GuestMemory,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<DeviceInterrupt>,
    limiter: Arc<Mutex<RateLimiter>>,
    counters: Arc<Counters>,
    buffer: Vec<u8>,
    throttled: bool,
}

impl RngWorker {
    fn run(mut self, stop: EventFd) -> Self {
        let mut events = match EventLoop::new().and_then(|e| {
            e.add(&stop, TOKEN_STOP)?;
            e.add(&self.queue_evt, TOKEN_QUEUE)?;
            Ok(e)
        }) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-rng worker: epoll set-up failed: {e}");
                return self;
            }
        };
        self.process_queue();
        loop {
            let timeout = if self.throttled {
                epoll_timeout([lock(&self.limiter).retry_at()])
            } else {
                -1
            };
            match events.wait(timeout) {
                Ok(tokens) if tokens.contains(&TOKEN_STOP) => return self,
                Ok(_) => drain(&self.queue_evt),
                Err(e) => {
                    tracing::error!("virtio-rng worker: epoll_wait failed: {e}");
                    return self;
                }
            }
            self.process_queue();
        }
    }

    /// The chain's buffers if it terminates and all are device-writable and
    /// inside guest memory.
    fn writable_buffers(&self, descs: &[Descriptor]) -> Option<Vec<Descriptor>> {
        let terminated = descs.last().is_some_and(|d| !d.has_next());
        let valid = descs
            .iter()
            .all(|d| d.is_write_only() && self.mem.check_range(d.addr(), d.len() as usize));
        (terminated && valid).then(|| descs.to_vec())
    }

    /// Fills up to `wanted` bytes of `buffers` with entropy.
    fn fill(&mut self, buffers: &[Descriptor], wanted: usize) -> usize {
        if let Err(e) = getrandom::fill(&mut self.buffer[..wanted]) {
            tracing::error!("virtio-rng: getrandom failed: {e}");
            return 0;
        }
        let mut written = 0;
        for d in buffers {
            let n = (d.len() as usize).min(wanted - written);
            if n == 0 {
                break;
            }
            if let Err(e) = self
                .mem
                .write_slice(&self.buffer[written..written + n], d.addr())
            {
                tracing::warn!("virtio-rng: writing entropy to the guest: {e}");
                break;
            }
            written += n;
        }
        written
    }

    fn add_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(&self.mem, head, len) {
            tracing::warn!("virtio-rng: adding descriptor {head} to the used ring: {e}");
        }
    }
}

impl QueueServer for RngWorker {
    const NAME: &'static str = "virtio-rng";

    fn queue_and_memory(&mut self) -> (&mut Queue, &GuestMemory) {
        (&mut self.queue, &self.mem)
    }

    fn interrupt(&self) -> &DeviceInterrupt {
        &self.interrupt
    }

    fn serve_available(&mut self) -> bool {
        let mut used_any = false;
        self.throttled = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let Some(buffers) = self.writable_buffers(&descs) else {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("virtio-rng: malformed descriptor chain at head {head}");
                self.add_used(head, 0);
                used_any = true;
                continue;
            };
            let wanted: usize = buffers
                .iter()
                .map(|d| d.len() as usize)
                .sum::<usize>()
                .min(MAX_REQUEST);
            if !lock(&self.limiter).consume(wanted as u64) {
                self.queue.go_to_previous_position();
                self.throttled = true;
                break;
            }
            let written = self.fill(&buffers, wanted);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(written as u64, Ordering::Relaxed);
            self.add_used(head, written as u32);
            used_any = true;
        }
        used_any
    }
    fn throttled(&self) -> bool {
        self.throttled
    }
}

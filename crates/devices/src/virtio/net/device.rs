//! The virtio-net device and its worker.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{NetConfig, NetError};
use super::{Tap, VNET_HDR_LEN};
use crate::rate_limiter::{epoll_timeout, LimiterConfig, RateLimiter};
use crate::virtio::worker::{drain, EventLoop, WorkerThread};
use crate::virtio::{
    read_config_bytes, ActivateContext, ActivateError, DeviceInterrupt, VirtioDevice,
    COMMON_FEATURES,
};
use crate::GuestMemory;

/// Largest frame we move: a 64 KiB packet, an Ethernet header and VLAN tag.
const MAX_FRAME: usize = 65_550;
/// Offset of num_buffers in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Counters for `query-net` (bytes are frame bytes, without the header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Frames from the tap the guest could not take (link down, buffer too
    /// small without mergeable buffers).
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Frames from the guest not sent (link down, tap refused).
    pub tx_dropped: u64,
    /// Malformed descriptor chains.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    rx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_dropped: AtomicU64,
    tx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_dropped: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

struct Shared {
    rx_limiter: Mutex<RateLimiter>,
    tx_limiter: Mutex<RateLimiter>,
    counters: Counters,
    link_up: AtomicBool,
    kick: EventFd,
}

fn lock(limiter: &Mutex<RateLimiter>) -> MutexGuard<'_, RateLimiter> {
    limiter
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counters and run-time throttle changes from any thread.
#[derive(Clone)]
pub struct NetHandle {
    shared: Arc<Shared>,
}

impl NetHandle {
    pub fn stats(&self) -> NetStats {
        let c = &self.shared.counters;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_bytes: get(&c.rx_bytes),
            rx_packets: get(&c.rx_packets),
            rx_dropped: get(&c.rx_dropped),
            tx_bytes: get(&c.tx_bytes),
            tx_packets: get(&c.tx_packets),
            tx_dropped: get(&c.tx_dropped),
            errors: get(&c.errors),
        }
    }

    /// (rx, tx) limits in force.
    pub fn throttle(&self) -> (LimiterConfig, LimiterConfig) {
        (
            lock(&self.shared.rx_limiter).config(),
            lock(&self.shared.tx_limiter).config(),
        )
    }

    /// Replaces the limits; traffic waiting under the old ones retries at once.
    pub fn set_throttle(&self, rx: LimiterConfig, tx: LimiterConfig) -> Result<(), NetError> {
        RateLimiter::new(rx)?;
        RateLimiter::new(tx)?;
        lock(&self.shared.rx_limiter).update(rx)?;
        lock(&self.shared.tx_limiter).update(tx)?;
        self.shared.kick.write(1).map_err(NetError::EventFd)
    }
}

/// A virtio-net device: one receive and one transmit queue over a tap.
pub struct Net {
    tap: Option<Tap>,
    config: NetConfig,
    shared: Arc<Shared>,
    worker: Option<WorkerThread<NetWorker>>,
}

impl Net {
    /// A device over `tap`, which must carry the 12-byte virtio-net
    /// header (IFF_VNET_HDR, as `Tap::create` and `Tap::from_fd` set up);
    /// the worker's event loop needs it non-blocking, which is set here.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self, NetError> {
        let qs = config.queue_size;
        if !qs.is_power_of_two() || !(2..=32768).contains(&qs) {
            return Err(NetError::QueueSize(qs));
        }
        tap.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            rx_limiter: Mutex::new(RateLimiter::new(config.rx_limit)?),
            tx_limiter: Mutex::new(RateLimiter::new(config.tx_limit)?),
            counters: Counters::default(),
            link_up: AtomicBool::new(true),
            kick: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
        });
        Ok(Net {
            tap: Some(tap),
            config,
            shared,
            worker: None,
        })
    }

    pub fn handle(&self) -> NetHandle {
        NetHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Hands the tap over (to a device restored from this one's state);
    /// `None` while the worker runs, or once taken.
    pub fn take_tap(&mut self) -> Option<Tap> {
        self.tap.take()
    }

    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::SeqCst)
    }

    /// Sets the link status the guest sees. Call it through
    /// [`crate::virtio::MmioTransport::update_config`] so that the driver
    /// gets a configuration-change interrupt.
    pub fn set_link_up(&mut self, up: bool) {
        self.shared.link_up.store(up, Ordering::SeqCst);
    }

    fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.config.mac.0);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; 2]
    }

    fn avail_features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        COMMON_FEATURES
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            "virtio-net: {}-byte config write at {offset:#x}; ignored (no CTRL_MAC_ADDR)",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        const DEVICE: &str = "virtio-net";
        let got = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let mut evts = ctx.queue_events.into_iter();
        let (Some(rx_queue), Some(tx_queue), Some(rx_evt), Some(tx_evt)) =
            (queues.next(), queues.next(), evts.next(), evts.next())
        else {
            return Err(ActivateError::QueueCount {
                device: DEVICE,
                expected: 2,
                got,
            });
        };
        let Some(tap) = self.tap.take() else {
            return Err(ActivateError::Backend {
                device: DEVICE,
                what: "the tap was lost when a previous worker died".to_owned(),
            });
        };
        let kick = self
            .shared
            .kick
            .try_clone()
            .map_err(|source| ActivateError::EventFd {
                device: DEVICE,
                source,
            })?;
        let worker = NetWorker {
            mem: ctx.mem,
            queues: [rx_queue, tx_queue],
            rx_evt,
            tx_evt,
            kick,
            tap,
            interrupt: ctx.interrupt,
            shared: self.shared.clone(),
            mergeable: ctx.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME],
            rx_pending: None,
            tx_frame: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME),
            rx_throttled: false,
            tx_throttled: false,
        };
        let thread = WorkerThread::spawn(DEVICE, move |stop| worker.run(stop))?;
        self.worker = Some(thread);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let worker = self.worker.take()?.stop()?;
        lock(&self.shared.rx_limiter).clear_retry();
        lock(&self.shared.tx_limiter).clear_retry();
        self.tap = Some(worker.tap);
        let [rx, tx] = worker.queues;
        Some(vec![rx, tx])
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_KICK: u64 = 4;

/// What became of a frame read from the tap.
enum RxOutcome {
    /// Delivered, or dropped: either way it is gone.
    Consumed,
    NoBuffers,
}

struct NetWorker {
    mem: GuestMemory,
    queues: [Queue; 2],
    rx_evt: EventFd,
    tx_evt: EventFd,
    kick: EventFd,
    tap: Tap,
    interrupt: Arc<DeviceInterrupt>,
    shared: Arc<Shared>,
    mergeable: bool,
    /// The frame being received (header included).
    rx_frame: Vec<u8>,
    /// Length of a frame read from the tap that the guest has not taken.
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    rx_throttled: bool,
    tx_throttled: bool,
}

impl NetWorker {
    fn run(mut self, stop: EventFd) -> Self {
        let mut events = match self.event_loop(&stop) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-net worker: epoll set-up failed: {e}");
                return self;
            }
        };
        self.process_tx();
        self.process_rx();
        loop {
            let rx_retry = self
                .rx_throttled
                .then(|| lock(&self.shared.rx_limiter).retry_at())
                .flatten();
            let tx_retry = self
                .tx_throttled
                .then(|| lock(&self.shared.tx_limiter).retry_at())
                .flatten();
            let tokens = match events.wait(epoll_timeout([rx_retry, tx_retry])) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("virtio-net worker: epoll_wait failed: {e}");
                    return self;
                }
            };
            for token in &tokens {
                match *token {
                    TOKEN_STOP => return self,
                    TOKEN_RX => drain(&self.rx_evt),
                    TOKEN_TX => drain(&self.tx_evt),
                    TOKEN_KICK => drain(&self.kick),
                    _ => {}
                }
            }
            self.process_tx();
            self.process_rx();
        }
    }

    fn event_loop(&self, stop: &EventFd) -> std::io::Result<EventLoop> {
        let events = EventLoop::new()?;
        events.add(stop, TOKEN_STOP)?;
        events.add(&self.rx_evt, TOKEN_RX)?;
        events.add(&self.tx_evt, TOKEN_TX)?;
        events.add(&self.kick, TOKEN_KICK)?;
        // Edge-triggered: we read the tap until it is empty or the guest
        // has no room, and an RX notification or timer resumes us.
        events.add_raw(
            self.tap.as_raw_fd(),
            TOKEN_TAP,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        Ok(events)
    }

    fn signal_if_needed(&mut self, queue: usize) {
        if self.queues[queue]
            .needs_notification(&self.mem)
            .unwrap_or(true)
        {
            self.interrupt.signal_used_queue();
        }
    }

    fn add_used(&mut self, queue: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[queue].add_used(&self.mem, head, len) {
            tracing::warn!(
                "virtio-net: queue {queue}: adding descriptor {head} to the used ring: {e}"
            );
        }
    }

    /// The chain's descriptors if it terminates, every buffer has the
    /// direction `writable` and lies inside guest memory.
    fn checked_chain(&self, descs: Vec<Descriptor>, writable: bool) -> Option<Vec<Descriptor>> {
        let terminated = descs.last().is_some_and(|d| !d.has_next());
        let valid = descs.iter().all(|d| {
            d.is_write_only() == writable && self.mem.check_range(d.addr(), d.len() as usize)
        });
        (terminated && valid).then_some(descs)
    }

    fn process_tx(&mut self) {
        let mut used_any = false;
        loop {
            if let Err(e) = self.queues[TX_QUEUE].disable_notification(&self.mem) {
                tracing::warn!("virtio-net: tx: disabling notifications: {e}");
            }
            used_any |= self.send_available();
            if self.tx_throttled {
                break;
            }
            match self.queues[TX_QUEUE].enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("virtio-net: tx: enabling notifications: {e}");
                    break;
                }
            }
        }
        if used_any {
            self.signal_if_needed(TX_QUEUE);
        }
    }

    fn send_available(&mut self) -> bool {
        let mut used_any = false;
        self.tx_throttled = false;
        while let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            used_any = true;
            let Some(descs) = self.checked_chain(chain.collect(), false) else {
                tracing::warn!("virtio-net: tx: malformed descriptor chain at head {head}");
                bump(&self.shared.counters.errors, 1);
                self.add_used(TX_QUEUE, head, 0);
                continue;
            };
            let len: usize = descs.iter().map(|d| d.len() as usize).sum();
            if !(VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME).contains(&len) {
                tracing::warn!("virtio-net: tx: {len}-byte buffer is not a frame with its header");
                bump(&self.shared.counters.errors, 1);
                self.add_used(TX_QUEUE, head, 0);
                continue;
            }
            let frame_len = (len - VNET_HDR_LEN) as u64;
            if !lock(&self.shared.tx_limiter).consume(frame_len) {
                self.queues[TX_QUEUE].go_to_previous_position();
                self.tx_throttled = true;
                return used_any;
            }
            self.transmit(&descs, len);
            self.add_used(TX_QUEUE, head, 0);
        }
        used_any
    }

    fn transmit(&mut self, descs: &[Descriptor], len: usize) {
        let counters = &self.shared.counters;
        if !self.shared.link_up.load(Ordering::Relaxed) {
            bump(&counters.tx_dropped, 1);
            return;
        }
        self.tx_frame.resize(len, 0);
        let mut at = 0;
        for d in descs {
            let n = d.len() as usize;
            if let Err(e) = self
                .mem
                .read_slice(&mut self.tx_frame[at..at + n], d.addr())
            {
                tracing::warn!("virtio-net: tx: reading the frame: {e}");
                bump(&counters.errors, 1);
                return;
            }
            at += n;
        }
        match self.tap.write_frame(&self.tx_frame) {
            Ok(_) => {
                bump(&counters.tx_packets, 1);
                bump(&counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
            }
            Err(e) => {
                tracing::debug!(
                    "virtio-net: tx: tap {} refused a frame: {e}",
                    self.tap.name()
                );
                bump(&counters.tx_dropped, 1);
            }
        }
    }

    /// Moves frames from the tap into the guest until the tap is empty, the
    /// guest has no buffers, or the rx limiter says wait.
    fn process_rx(&mut self) {
        let mut used_any = false;
        self.rx_throttled = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            tracing::warn!("virtio-net: rx: reading tap {}: {e}", self.tap.name());
                        }
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            if len < VNET_HDR_LEN || !self.shared.link_up.load(Ordering::Relaxed) {
                bump(&self.shared.counters.rx_dropped, 1);
                self.rx_pending = None;
                continue;
            }
            let frame_len = (len - VNET_HDR_LEN) as u64;
            if !lock(&self.shared.rx_limiter).consume(frame_len) {
                self.rx_throttled = true;
                break;
            }
            match self.receive(len) {
                RxOutcome::Consumed => {
                    used_any = true;
                    self.rx_pending = None;
                }
                RxOutcome::NoBuffers => {
                    lock(&self.shared.rx_limiter).refund(frame_len);
                    // Ask for a notification when buffers come; if some
                    // came meanwhile, try again at once.
                    match self.queues[RX_QUEUE].enable_notification(&self.mem) {
                        Ok(true) => continue,
                        _ => break,
                    }
                }
            }
        }
        if let Err(e) = self.queues[RX_QUEUE].enable_notification(&self.mem) {
            tracing::warn!("virtio-net: rx: enabling notifications: {e}");
        }
        if used_any {
            self.signal_if_needed(RX_QUEUE);
        }
    }

    /// Puts `rx_frame[..len]` into as many receive chains as it needs
    /// (one without mergeable buffers); gives them all back if there are
    /// not enough.
    fn receive(&mut self, len: usize) -> RxOutcome {
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut first_chain = Vec::new();
        let mut at = 0;
        while at < len {
            let Some(chain) = self.queues[RX_QUEUE].pop_descriptor_chain(&self.mem) else {
                for _ in 0..used.len() {
                    self.queues[RX_QUEUE].go_to_previous_position();
                }
                return RxOutcome::NoBuffers;
            };
            let head = chain.head_index();
            let Some(descs) = self.checked_chain(chain.collect(), true) else {
                tracing::warn!(
                    "virtio-net: rx: malformed descriptor chain at head {head}; frame dropped"
                );
                bump(&self.shared.counters.errors, 1);
                used.push((head, 0));
                return self.drop_frame(used);
            };
            let written = self.scatter(&descs, &self.rx_frame[at..len]);
            if at == 0 {
                if written < VNET_HDR_LEN {
                    used.push((head, 0));
                    return self.drop_frame(used);
                }
                first_chain = descs;
            }
            at += written;
            used.push((head, written as u32));
            if !self.mergeable {
                break;
            }
        }
        if at < len {
            // Without mergeable buffers a frame must fit one chain.
            return self.drop_frame(used);
        }
        let num_buffers = (used.len() as u16).to_le_bytes();
        // Rewrite the header's last bytes (num_buffers) in the first chain.
        let mut header = [0u8; VNET_HDR_LEN];
        header.copy_from_slice(&self.rx_frame[..VNET_HDR_LEN]);
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&num_buffers);
        self.scatter(&first_chain, &header);
        bump(&self.shared.counters.rx_packets, 1);
        bump(&self.shared.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
        for (head, written) in used {
            self.add_used(RX_QUEUE, head, written);
        }
        RxOutcome::Consumed
    }

    /// Returns the chains taken for a frame that cannot be delivered, empty.
    fn drop_frame(&mut self, used: Vec<(u16, u32)>) -> RxOutcome {
        bump(&self.shared.counters.rx_dropped, 1);
        for (head, _) in used {
            self.add_used(RX_QUEUE, head, 0);
        }
        RxOutcome::Consumed
    }

    /// Copies `bytes` into the chain's buffers from their start; returns
    /// how many fitted.
    fn scatter(&self, descs: &[Descriptor], bytes: &[u8]) -> usize {
        let mut at = 0;
        for d in descs {
            let n = (d.len() as usize).min(bytes.len() - at);
            if n == 0 {
                break;
            }
            if let Err(e) = self.mem.write_slice(&bytes[at..at + n], d.addr()) {
                tracing::warn!("virtio-net: rx: writing the frame: {e}");
                break;
            }
            at += n;
        }
        at
    }
}
